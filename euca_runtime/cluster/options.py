"""The ``options`` of cluster component instances in a runtime configuration (docs/cluster.md).

``nc``::

    options:
      cores: 8            # capacity the NC offers (default: the host's CPU count)
      memory_mib: 16384   # default: the host's MemTotal
      disk_gib: 200       # default: the size of the file system holding the data dir
      driver: process     # process (a placeholder process per instance) | record (no process)

``cc``::

    options:
      poll_interval: 1.0  # seconds between two polls of every NC (the CC's view is this fresh)
      nc_timeout: 0.8     # deadline of one NC call (a describe that misses it: the NC is lost)

Other component types take no options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NC_DRIVERS = ("process", "record")


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}: must be an integer > 0, got {value!r}")
    return value


def _seconds(value: Any, key: str, most: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= most:
        raise ValueError(f"{key}: must be a number of seconds in (0, {most:g}], got {value!r}")
    return float(value)


def check_options(ctype: str, value: Any) -> dict[str, Any]:
    """The validated options of a component of type `ctype`; ValueError names the bad key."""
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping, got {value!r}")
    opts = dict(value)
    allowed: tuple[str, ...]
    if ctype == "nc":
        allowed = ("cores", "memory_mib", "disk_gib", "driver")
    elif ctype == "cc":
        allowed = ("poll_interval", "nc_timeout")
    else:
        if opts:
            raise ValueError(f"a {ctype} takes no options")
        return {}
    for key in opts:
        if key not in allowed:
            raise ValueError(f"{key}: unknown option of a {ctype} (allowed: {', '.join(allowed)})")
    out: dict[str, Any] = {}
    if ctype == "nc":
        for key in ("cores", "memory_mib", "disk_gib"):
            if key in opts:
                out[key] = _int(opts[key], key)
        if "driver" in opts:
            if opts["driver"] not in NC_DRIVERS:
                raise ValueError(f"driver: must be one of {', '.join(NC_DRIVERS)}, got {opts['driver']!r}")
            out["driver"] = opts["driver"]
    else:
        if "poll_interval" in opts:
            out["poll_interval"] = _seconds(opts["poll_interval"], "poll_interval", 60.0)
        if "nc_timeout" in opts:
            out["nc_timeout"] = _seconds(opts["nc_timeout"], "nc_timeout", 60.0)
    return out
