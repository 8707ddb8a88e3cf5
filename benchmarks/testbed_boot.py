"""How long `testbed up --hosts N` takes and how much memory the idle hosts use."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from testbed import bed as tb


def host_pss_kib(leader: int) -> tuple[int, int]:
    """Sum of Pss over every process in the pid namespace of `leader`: (kib, processes)."""
    total = count = 0
    for proc in tb.processes_in_host(leader):
        try:
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    count += 1
        except OSError:
            continue
    return total, count


def run(hosts: int = 5, trials: int = 3, settle: float = 10.0) -> dict[str, Any]:
    ups: list[float] = []
    pss: list[float] = []
    procs = 0
    for trial in range(trials):
        name = f"bb{os.getpid() % 1000}{trial}"
        t0 = time.monotonic()
        try:
            bed = tb.up(name, hosts)
            ups.append(time.monotonic() - t0)
            time.sleep(settle)  # measuring idle memory: let boot-time work finish
            per_host = [host_pss_kib(h.leader) for h in bed.hosts if h.leader]
            pss.append(sum(k for k, _ in per_host) / 1024)
            procs = per_host[0][1]
        finally:
            tb.down(name)
    return {
        "hosts": hosts,
        "trials": trials,
        "up_seconds": {"median": statistics.median(ups), "min": min(ups), "max": max(ups)},
        "idle_pss_mib_total": {"median": statistics.median(pss), "min": min(pss), "max": max(pss)},
        "idle_pss_mib_per_host": statistics.median(pss) / hosts,
        "processes_per_host": procs,
    }
