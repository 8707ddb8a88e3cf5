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
      service: child      # child: the proxy starts the CC service as its child process;
                          # external: the service runs on its own (the systemd unit
                          # euca-cc@<cluster> of role euca_cc) and the proxy talks to it
      # with service: external only, and then all three required:
      gateway: 127.0.0.1:7190           # loopback address the proxy's gateway listens on
      service_address: 127.0.0.1:7191   # loopback address the CC service listens on
      token_file: /etc/eucalyptus/cc/cluster01.token  # absolute path: the shared API token

Other component types take no options.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

NC_DRIVERS = ("process", "record")
CC_SERVICE_MODES = ("child", "external")
CC_EXTERNAL_KEYS = ("gateway", "service_address", "token_file")


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}: must be an integer > 0, got {value!r}")
    return value


def _seconds(value: Any, key: str, most: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= most:
        raise ValueError(f"{key}: must be a number of seconds in (0, {most:g}], got {value!r}")
    return float(value)


def loopback_address(value: Any, key: str) -> tuple[str, int]:
    """``(host, port)`` of a loopback ``host:port`` (``[::1]:port`` for IPv6); ValueError names `key`."""
    text = value if isinstance(value, str) else ""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not loopback or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(
            f"{key}: must be a loopback 'address:port' (e.g. 127.0.0.1:7190, [::1]:7190), got {value!r}"
        )
    return host, int(port)


def _cc(opts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "poll_interval" in opts:
        out["poll_interval"] = _seconds(opts["poll_interval"], "poll_interval", 60.0)
    if "nc_timeout" in opts:
        out["nc_timeout"] = _seconds(opts["nc_timeout"], "nc_timeout", 60.0)
    mode = opts.get("service", "child")
    if mode not in CC_SERVICE_MODES:
        raise ValueError(f"service: must be one of {', '.join(CC_SERVICE_MODES)}, got {mode!r}")
    if mode == "child":
        for key in CC_EXTERNAL_KEYS:
            if key in opts:
                raise ValueError(f"{key}: only with service: external (a child service gets its own)")
        if "service" in opts:
            out["service"] = mode
        return out
    for key in CC_EXTERNAL_KEYS:
        if key not in opts:
            raise ValueError(f"{key}: required with service: external")
    gateway = loopback_address(opts["gateway"], "gateway")
    service = loopback_address(opts["service_address"], "service_address")
    if gateway == service:
        raise ValueError(f"service_address: must differ from gateway, both are {opts['gateway']!r}")
    token = opts["token_file"]
    if not isinstance(token, str) or not token.startswith("/") or "\x00" in token:
        raise ValueError(f"token_file: must be an absolute path, got {token!r}")
    out.update(
        service=mode, gateway=opts["gateway"], service_address=opts["service_address"], token_file=token
    )
    return out


def check_options(ctype: str, value: Any) -> dict[str, Any]:
    """The validated options of a component of type `ctype`; ValueError names the bad key."""
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping, got {value!r}")
    opts = dict(value)
    allowed: tuple[str, ...]
    if ctype == "nc":
        allowed = ("cores", "memory_mib", "disk_gib", "driver")
    elif ctype == "cc":
        allowed = ("poll_interval", "nc_timeout", "service", *CC_EXTERNAL_KEYS)
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
        out = _cc(opts)
    return out
