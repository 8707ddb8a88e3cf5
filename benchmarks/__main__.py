"""Run every benchmark and write benchmarks/results/<date>.json."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

from benchmarks import testbed_boot

BENCHMARKS = {"testbed_boot": testbed_boot.run}


def main(argv: list[str]) -> int:
    wanted = argv or list(BENCHMARKS)
    unknown = [w for w in wanted if w not in BENCHMARKS]
    if unknown:
        print(f"bench: unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"kernel": platform.release(), "python": platform.python_version()},
    }
    for name in wanted:
        print(f"bench: {name} ...", flush=True)
        results[name] = BENCHMARKS[name]()
        print(json.dumps(results[name], indent=2), flush=True)
    out = Path(__file__).parent / "results" / f"{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"bench: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
