"""Run benchmarks and merge their results into benchmarks/results/<date>.json.

``python -m benchmarks [--out FILE] [NAME[:ARG=VALUE...] ...]`` runs the named benchmarks (all of
them without a name). Each benchmark's result replaces that benchmark's entry in today's file
(or FILE); the others stay, so benchmarks can be run one at a time (``make bench BENCH=failover``).
``NAME:ARG=VALUE`` overrides an argument of the benchmark's ``run()`` (a Python literal), e.g. a
small smoke run: ``python -m benchmarks --out /tmp/smoke.json 'site_yml:sizes=(3,):reruns=1'``.
Every entry records the machine's load average when it started and when it ended.
"""

from __future__ import annotations

import ast
import datetime
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

# name -> module (imported lazily: the testbed benchmark needs root and testbed tooling).
BENCHMARKS = {
    "testbed_boot": "benchmarks.testbed_boot",
    "replication_cost": "benchmarks.replication_cost",
    "failover": "benchmarks.failover",
    "switchover": "benchmarks.switchover",
    "read_after_failover": "benchmarks.read_after_failover",
    "arbitrator": "benchmarks.arbitrator",
    "cc_scale": "benchmarks.cc_scale",
    "s3_iam": "benchmarks.s3_iam",
    "failover_timeline": "benchmarks.failover_timeline",
    "site_yml": "benchmarks.site_yml",
    "machine_kill": "benchmarks.machine_kill",
    "add_backup": "benchmarks.add_backup",
    "recovery": "benchmarks.recovery",
}


def runner(name: str) -> Callable[..., dict[str, Any]]:
    fn: Callable[..., dict[str, Any]] = importlib.import_module(BENCHMARKS[name]).run
    return fn


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'name:arg=value:arg=value' -> (name, {arg: literal value})."""
    name, *args = spec.split(":")
    kwargs: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"bad benchmark argument {arg!r} in {spec!r}: use NAME:ARG=VALUE")
        kwargs[key] = ast.literal_eval(value)
    return name, kwargs


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def main(argv: list[str]) -> int:
    out = RESULTS / f"{datetime.date.today().isoformat()}.json"
    if argv[:1] == ["--out"] and len(argv) >= 2:
        out, argv = Path(argv[1]), argv[2:]
    try:
        wanted = [parse_spec(a) for a in argv] or [(name, {}) for name in BENCHMARKS]
    except (ValueError, SyntaxError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    unknown = [w for w, _ in wanted if w not in BENCHMARKS]
    if unknown:
        print(f"bench: unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    for name, kwargs in wanted:
        print(f"bench: {name} {kwargs or ''}...", flush=True)
        start = machine()
        t0 = time.monotonic()
        entry = runner(name)(**kwargs)
        start["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        entry["_run"] = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - t0, 1),
            "machine": start,
            **({"arguments": {k: repr(v) for k, v in kwargs.items()}} if kwargs else {}),
        }
        results[name] = entry
        results["date"] = entry["_run"]["date"]
        results["machine"] = {k: v for k, v in start.items() if not k.startswith("loadavg")}
        print(json.dumps(entry, indent=2), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")  # after each: a later failure keeps it
    print(f"bench: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
