"""Garbage-collector settings of a runtime process (`euca-runtime serve`), and their counters.

Measured on the replication benchmark (docs/performance.md, "Garbage-collector pauses"): with
CPython's default thresholds (700, 10, 10), a runtime process under 32 writing clients ran a
full (generation 2) collection every few seconds, each 50-180 ms, over about 200,000 tracked
objects; most of them never die (the modules, the SQLAlchemy tables and the object cache) and
most of those collections freed nothing. Those pauses were the writes' p99, and a replicated
write pays for the pauses of the primary and of its backup.

So once the process has started (its modules imported, its stores opened, its caches warmed),
`tune` collects once, then freezes every object that is left (`gc.freeze`: the collector never
scans them again; they are still freed by reference counting when they go) and raises the
thresholds to `THRESHOLDS`: the young generation is collected every 10,000 net allocations
instead of 700 (about 2 ms each), the middle one every 20 young collections, and a full
collection is considered only after 100 middle ones. Cyclic garbage is still collected, young,
where nearly all of it dies. The cost: a reference cycle among the frozen start-up objects that
later becomes garbage is never freed (a bounded amount: at most what existed at start).
"""

from __future__ import annotations

import gc
import time
from typing import Any

THRESHOLDS = (10_000, 20, 100)
"""gc.set_threshold after start-up (CPython's default: 700, 10, 10)."""


class Pauses:
    """Counts collections per generation and the seconds they took (a gc callback)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        gen = int(info.get("generation", 0))
        if 0 <= gen <= 2:
            self.count[gen] += 1
            self.seconds[gen] += took
        self.longest = max(self.longest, took)


PAUSES = Pauses()


def watch() -> None:
    """Start counting this process's collections (idempotent)."""
    if PAUSES not in gc.callbacks:
        gc.callbacks.append(PAUSES)


def tune(thresholds: tuple[int, int, int] = THRESHOLDS) -> dict[str, Any]:
    """Collect, freeze what survived start-up, raise the thresholds; what was done."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
    return {"frozen": gc.get_freeze_count(), "thresholds": list(thresholds)}
