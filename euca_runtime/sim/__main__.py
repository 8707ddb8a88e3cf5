"""Replay simulation schedules: ``python -m euca_runtime.sim --seed 1234 --trace``."""

from __future__ import annotations

import argparse
import sys
import time

from euca_runtime.sim.variants import VARIANTS
from euca_runtime.sim.world import TOPOLOGIES, SimConfig, run_schedule


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m euca_runtime.sim", description=__doc__)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--count", type=int, default=1, help="number of consecutive seeds")
    ap.add_argument("--variant", default="correct", choices=sorted(VARIANTS))
    ap.add_argument("--topology", default=None, choices=sorted(TOPOLOGIES))
    ap.add_argument("--trace", action="store_true", help="print every protocol event and fault")
    args = ap.parse_args(argv)
    config = SimConfig(variant=args.variant, topology=args.topology)
    trace = print if args.trace else None
    failed = 0
    started = time.perf_counter()
    for seed in range(args.seed, args.seed + args.count):
        result = run_schedule(seed, config, trace)
        if not result.ok or args.count == 1:
            print(result.describe())
            if args.trace:
                print("faults:", *result.faults, sep="\n  ")
        failed += not result.ok
    print(f"{args.count} schedule(s), {failed} failed, {time.perf_counter() - started:.2f}s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
