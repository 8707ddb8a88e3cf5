"""Seeded deterministic simulation of leases, membership and replication (issue 3).

Environment:
  EUCA_SIM_SCHEDULES  how many schedules (default 3000: about 20 s on 2 cores)
  EUCA_SIM_BASE_SEED  first seed (default 0), for exploring further seeds in CI or locally
  EUCA_SIM_SEED       replay exactly this seed (with EUCA_SIM_TRACE=1 for the event trace)
  EUCA_SIM_VARIANT    protocol variant for the replayed/explored schedules (default: correct)
  EUCA_SIM_WORKERS    worker processes (default: min(2, cpu count))

A failing schedule prints itself with the command that replays it.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

from euca_runtime.sim import TOPOLOGIES, VARIANTS, ScheduleResult, SimConfig, run_schedule

SCHEDULES = int(os.environ.get("EUCA_SIM_SCHEDULES", "3000"))
BASE_SEED = int(os.environ.get("EUCA_SIM_BASE_SEED", "0"))
REPLAY_SEED = os.environ.get("EUCA_SIM_SEED")
VARIANT = os.environ.get("EUCA_SIM_VARIANT", "correct")
WORKERS = int(os.environ.get("EUCA_SIM_WORKERS", str(min(2, os.cpu_count() or 1))))
BROKEN_SEARCH_LIMIT = 1000


def _run_seeds(args: tuple[list[int], str]) -> list[ScheduleResult]:
    seeds, variant = args
    config = SimConfig(variant=variant)
    results = []
    for seed in seeds:
        r = run_schedule(seed, config)
        r.faults = [] if r.ok else r.faults  # keep what crosses the process boundary small
        results.append(r)
    return results


def _run_many(seeds: list[int], variant: str) -> list[ScheduleResult]:
    if WORKERS <= 1 or len(seeds) < 50:
        return _run_seeds((seeds, variant))
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    chunks = [(seeds[i :: WORKERS * 8], variant) for i in range(WORKERS * 8)]
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context(method)) as pool:
        results = [r for chunk in pool.map(_run_seeds, chunks) for r in chunk]
    return sorted(results, key=lambda r: r.seed)


def test_replay_env_seed() -> None:
    """`EUCA_SIM_SEED=N` replays one schedule, printing its trace with EUCA_SIM_TRACE=1."""
    if REPLAY_SEED is None:
        pytest.skip("set EUCA_SIM_SEED to replay one schedule")
    trace = print if os.environ.get("EUCA_SIM_TRACE") else None
    result = run_schedule(int(REPLAY_SEED), SimConfig(variant=VARIANT), trace)
    print(result.describe())
    print("faults:", *result.faults, sep="\n  ")
    assert result.ok, result.describe()


def test_random_schedules_keep_the_invariants() -> None:
    if REPLAY_SEED is not None:
        pytest.skip("replaying a single seed")
    seeds = list(range(BASE_SEED, BASE_SEED + SCHEDULES))
    started = time.perf_counter()
    results = _run_many(seeds, VARIANT)
    elapsed = time.perf_counter() - started
    assert [r.seed for r in results] == seeds
    failed = [r for r in results if not r.ok]
    summary = (
        f"{len(results)} schedules ({VARIANT}) in {elapsed:.1f}s on {WORKERS} worker(s): "
        f"{len(failed)} failed, {sum(r.failovers for r in results)} failovers, "
        f"{sum(r.acked for r in results)} acknowledged writes, {sum(r.events for r in results)} events"
    )
    print(summary)
    for r in failed[:10]:
        print(r.describe())
    assert not failed, (
        f"{len(failed)} schedules broke an invariant; first: seeds {[r.seed for r in failed[:10]]}\n"
        + ("\n".join(r.describe() for r in failed[:3]))
    )
    if VARIANT != "correct" or len(results) < 200:
        return
    # The run must not pass vacuously: faults happened, failovers happened, writes were
    # acknowledged, every topology ran, and the recovery paths were taken.
    with_failover = sum(r.failovers > 0 for r in results) / len(results)
    assert with_failover >= 0.5, f"only {with_failover:.0%} of schedules saw a failover"
    assert all(r.converged for r in results)
    assert sum(r.acked for r in results) >= 20 * len(results)
    assert {r.topology for r in results} == set(TOPOLOGIES)
    stats: Counter[str] = Counter()
    for r in results:
        stats.update(r.stats)
    for key in (
        "fault:partition",
        "fault:one_way",
        "fault:isolate",
        "fault:pause",
        "fault:crash",
        "fault:loss",
        "DeathCertificate",
        "CatchUpRequest",
        "state_transfer_installed",
        "divergent_suffix_discarded",
        "InSyncUpdate",
        "reconfigure",
        "ConfigUpdate",
    ):
        assert stats[key] > 0, f"the simulation never exercised {key}"


@pytest.mark.parametrize("variant", sorted(v for v in VARIANTS if v != "correct"))
def test_broken_variant_is_caught(variant: str) -> None:
    """Each deliberately broken protocol variant fails a checker within a bounded search."""
    expected, _ = VARIANTS[variant]
    config = SimConfig(variant=variant)
    for seed in range(BROKEN_SEARCH_LIMIT):
        result = run_schedule(seed, config)
        if not result.ok:
            found = {v.invariant for v in result.violations}
            assert found & expected, f"{variant} broke {found}, expected {expected}: {result.describe()}"
            return
    pytest.fail(f"no schedule among {BROKEN_SEARCH_LIMIT} caught the broken variant {variant}")


def test_a_seed_replays_exactly() -> None:
    a = run_schedule(7)
    b = run_schedule(7)
    assert (a.digest, a.events, a.acked, a.failovers, a.stats) == (
        b.digest,
        b.events,
        b.acked,
        b.failovers,
        b.stats,
    )
    assert run_schedule(8).digest != a.digest


def test_replay_does_not_depend_on_hash_randomisation() -> None:
    code = (
        "from euca_runtime.sim import run_schedule; r = run_schedule(11); print(r.digest, r.events, r.acked)"
    )
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(out.stdout.strip())
    r = run_schedule(11)
    assert outputs == {f"{r.digest} {r.events} {r.acked}"}
