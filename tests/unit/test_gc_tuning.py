"""euca_runtime.gc_tuning: what a runtime process does to its collector after start-up."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import gc, json
from euca_runtime import gc_tuning
junk = [[i] for i in range(50_000)]
gc_tuning.watch()
gc_tuning.watch()
done = gc_tuning.tune()
cycle = []
cycle.append(cycle)
del cycle
gc.collect(0)
print(json.dumps({
    "done": done,
    "threshold": gc.get_threshold(),
    "frozen": gc.get_freeze_count(),
    "callbacks": sum(cb is gc_tuning.PAUSES for cb in gc.callbacks),
    "count": gc_tuning.PAUSES.count,
    "seconds": gc_tuning.PAUSES.seconds,
}))
"""


def test_tune_freezes_what_start_up_left_and_raises_the_thresholds() -> None:
    # In a child process: freezing and thresholds are process-wide.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout)
    assert got["threshold"] == [10_000, 20, 100]
    assert got["done"]["thresholds"] == [10_000, 20, 100]
    assert got["frozen"] == got["done"]["frozen"] >= 50_000  # the start-up objects, junk included
    assert got["callbacks"] == 1  # watch() is idempotent
    # The full collection inside tune() and the young one after it were counted and timed.
    assert got["count"][2] >= 1 and got["count"][0] >= 1
    assert got["seconds"][2] > 0
