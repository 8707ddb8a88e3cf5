"""Run benchmarks and merge their results into benchmarks/results/<date>.json.

``python -m benchmarks [NAME ...]`` runs the named benchmarks (all of them without a name).
Each benchmark's result replaces that benchmark's entry in today's file; the others stay, so
benchmarks can be run one at a time (``make bench BENCH=failover``).
"""

from __future__ import annotations

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
}


def runner(name: str) -> Callable[[], dict[str, Any]]:
    fn: Callable[[], dict[str, Any]] = importlib.import_module(BENCHMARKS[name]).run
    return fn


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def main(argv: list[str]) -> int:
    wanted = argv or list(BENCHMARKS)
    unknown = [w for w in wanted if w not in BENCHMARKS]
    if unknown:
        print(f"bench: unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    out = RESULTS / f"{datetime.date.today().isoformat()}.json"
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    for name in wanted:
        print(f"bench: {name} ...", flush=True)
        t0 = time.monotonic()
        entry = runner(name)()
        entry["_run"] = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - t0, 1),
            "machine": machine(),
        }
        results[name] = entry
        results["date"] = entry["_run"]["date"]
        results["machine"] = {k: v for k, v in entry["_run"]["machine"].items() if k != "loadavg_at_start"}
        print(json.dumps(entry, indent=2), flush=True)
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")  # after each: a later failure keeps it
    print(f"bench: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
