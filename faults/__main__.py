"""`python -m faults --seed N --duration S [--quick] [--bed NAME]`: one run of the fault suite.

Deploys the HA cloud onto a fresh testbed bed (root, as `make demo`), runs the workloads under a
seeded nemesis schedule of about S seconds of faults (or, with --quick, one step each of kill -9,
partition primary/backup and SIGSTOP), heals, checks, writes `faults/results/<date>-<seed>.json`
(and the history next to it), removes the bed. Exit status 0: no anomaly and every step
recovered; 1: anomalies (see the result file); 2: the run itself failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from faults.nemesis import ALL, named_schedule, random_schedule
from faults.runner import RESULTS, Plan, run
from faults.workloads import Mix
from testbed.model import TestbedError

QUICK = ["kill9", "partition-backup", "sigstop"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="schedule and workload seed (default: the time)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of faults in the schedule")
    p.add_argument("--quick", action="store_true", help="the quick schedule: " + ", ".join(QUICK))
    p.add_argument(
        "--faults", default="", help=f"comma-separated fault kinds, one step each ({', '.join(ALL)})"
    )
    p.add_argument("--bed", default="flt", help="testbed bed name (default flt)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where result files go")
    p.add_argument("--limit", type=int, default=2000, help="operations per client at most")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("paramiko", "botocore", "invoke", "fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seed = int(time.time()) % 1_000_000 if args.seed is None else args.seed
    if args.quick or args.faults:
        kinds = QUICK if args.quick else [k for k in args.faults.split(",") if k]
        unknown = sorted(set(kinds) - set(ALL))
        if unknown:
            print(f"faults: unknown fault kind(s) {unknown}; known: {', '.join(ALL)}", file=sys.stderr)
            return 2
        steps = named_schedule(kinds, seed)
    else:
        steps = random_schedule(seed, args.duration)
    plan = Plan(seed=seed, steps=steps, mix=Mix(limit=args.limit))
    print(f"faults: seed {seed}, {len(steps)} steps, bed {args.bed}", flush=True)
    try:
        result = run(plan, bed=args.bed, out=args.out)
    except (TestbedError, TimeoutError, OSError) as exc:
        print(f"faults: the run failed: {exc}", file=sys.stderr)
        return 2
    summary = {
        k: result[k]
        for k in (
            "seed",
            "valid",
            "anomalies",
            "recovered",
            "final_recovery_s",
            "op_counts",
            "deploy_s",
            "duration_s",
        )
    }
    summary["steps"] = [
        {"faults": s["started"], "recovery_s": s["recovery_s"], "failover_s": s.get("failover_s")}
        for s in result["steps"]
    ]
    print(json.dumps(summary, indent=2))
    print(f"faults: result {args.out}/{result['label']}.json")
    return 0 if result["valid"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
