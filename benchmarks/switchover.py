"""Write unavailability during a planned switchover (`eucactl switchover kv --to BACKUP`).

Load: 4 clients PUT continuously, 2 through each process's kv API. Per trial the kv primary is
handed to the other instance (alternating direction). Unavailability = the longest gap between
consecutive acknowledged writes (all clients together) from the moment eucactl is started until
0.5 s after it returned; the same statistic over a steady 1 s window just before is the noise
floor. Client errors are every non-200 answer in the trial. Targets: gap < 100 ms, zero errors.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from benchmarks._cloud import Writer, cloud, ctl, summary

TARGET_GAP_S = 0.1


def _max_gap(acks: list[float], lo: float, hi: float) -> float:
    inside = sorted(a for a in acks if lo <= a <= hi)
    points = [lo, *inside, hi]
    return max(b - a for a, b in itertools.pairwise(points))


def run(trials: int = 6) -> dict[str, Any]:
    gaps: list[float] = []
    floors: list[float] = []
    durations: list[float] = []
    max_lat: list[float] = []
    errors = 0
    with cloud(ha=True) as c:
        with Writer([c.kv_url("node-a"), c.kv_url("node-b")] * 2, f"sw{time.monotonic_ns()}") as w:
            w.wait_acks(50)
            for _ in range(trials):
                c.wait_ha(("kv",))
                source = c.primary_node("kv")
                target = c.instance("kv", c.other_node(source))
                time.sleep(1.0)  # a steady window for the noise floor (load keeps running)
                t0 = time.monotonic()
                proc = ctl(c.root, "switchover", "kv", "--to", target)
                t1 = time.monotonic()
                if proc.returncode != 0:
                    raise RuntimeError(f"switchover failed: {proc.stderr or proc.stdout}")
                time.sleep(0.5)
                acked, errs = w.snapshot()
                acks = [a for _, a, _, _ in acked]
                gaps.append(_max_gap(acks, t0, t1 + 0.5))
                floors.append(_max_gap(acks, t0 - 1.0, t0))
                durations.append(t1 - t0)
                max_lat.append(max((a - s for s, a, _, _ in acked if t0 <= s <= t1 + 0.5), default=0.0))
                errors += sum(1 for s, _, _ in errs if s >= t0 - 1.0)
    gap = summary(gaps)
    return {
        "trials": trials,
        "clients": 4,
        "write_gap_seconds": gap,
        "steady_gap_seconds": summary(floors),
        "max_write_latency_seconds": summary(max_lat),
        "eucactl_seconds": summary(durations),
        "client_errors": errors,
        "target_gap_s": TARGET_GAP_S,
        "met": gap["p50"] < TARGET_GAP_S and gap["max"] < TARGET_GAP_S and errors == 0,
    }
