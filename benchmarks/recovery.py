"""Recovery to full redundancy after a heal (issue 7 target: "recovery to full redundancy within
10 s of a heal for a store of 1,000 users and 1,000 objects").

The HA demo cloud on three testbed hosts, deployed as the fault suite deploys it
(faults/cloud.py: inventories/demo/topology.yml, site.yml, every group redundant, the eucarc):
h1 and h2 primary and backup of clc (with kv), walrus, cc and sc, h3 arbitrator and NC. Filled
through the user APIs with boto3: `users` IAM users and `objects` S3 objects of `object_kib`
KiB (the size reached is read back). Then, while the fault suite's S3 and IAM clients keep
writing through the service VIPs (the eucarc's first URL per API), `trials` times: the walrus
primary's host is partitioned from the other data host (the fault suite's `partition-backup`,
faults/nemesis.py: `testbed partition`) for `partition_seconds`, so the backups fall behind,
then healed; recovery time = from the heal until every host's describe-groups shows every
group with one ENABLED instance and every other DISABLED and in sync (faults/observe.py
`wait_recovered`, the fault suite's own measure). `wait_recovered` asks the three hosts one
after the other over SSH, so a time is late by at most one such round; the round's duration is
measured after each trial and reported as the resolution. Requests of the writer that did not
succeed are counted per trial. The bed is removed at the end, also on failure. Needs root and
the testbed.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _store
from benchmarks._cloud import summary
from faults import cloud as cloud_mod
from faults.cloud import GROUPS
from faults.nemesis import Ctx, Fault, heal_all, run_step
from faults.observe import Hosts, wait_recovered

BED = "bsrec"
USER_PREFIX = "bsuser"
BUCKET = "bench-store"
TARGET_S = 10.0
RECOVERY_TIMEOUT = 300.0  # generous: a loaded machine re-syncs slowly
SETTLE_S = 3.0  # writes flowing to a redundant cloud before each partition


def outcome(samples: list[float | None], target: float = TARGET_S) -> dict[str, Any]:
    """Summary of the recovery times of the trials (None: did not recover in time); met when
    every trial recovered within `target` seconds."""
    done = [s for s in samples if s is not None]
    return {
        "seconds": summary(done, 2),
        "samples": [None if s is None else round(s, 2) for s in samples],
        "not_recovered": len(samples) - len(done),
        "met": bool(samples) and len(done) == len(samples) and max(done) <= target,
    }


def _round_seconds(hosts: Hosts, names: list[str]) -> float:
    """How long one round of describe-groups over every host takes (wait_recovered's step)."""
    t0 = time.monotonic()
    for h in names:
        hosts.groups(h)
    return time.monotonic() - t0


def _trial(ctx: Ctx, partition_seconds: float) -> dict[str, Any]:
    at, bad = wait_recovered(ctx.hosts, ctx.names, ctx.history, GROUPS, RECOVERY_TIMEOUT)
    if at is None:
        raise RuntimeError(f"the cloud is not redundant before the trial: {bad}")
    time.sleep(SETTLE_S)  # part of the procedure: writes to a redundant cloud before the fault
    info = run_step(ctx, [Fault("partition-backup", partition_seconds, group="walrus")])
    if info["started"] != ["partition-backup"]:
        raise RuntimeError(f"the partition did not start: {info}")
    healed = float(info["healed_at"])
    recovered, unhealthy = wait_recovered(ctx.hosts, ctx.names, ctx.history, GROUPS, RECOVERY_TIMEOUT)
    return {
        "recovery_s": None if recovered is None else round(recovered - healed, 2),
        "unhealthy_at_timeout": unhealthy,
        "partitioned": f"{info['faults'][0]['primary']} | {info['faults'][0]['backup']}",
        # on the writer's history clock, to place its errors (`first_errors` give their time)
        "partition_at": round(float(info["at"]), 2),
        "healed_at": round(healed, 2),
        "recovered_at": None if recovered is None else round(recovered, 2),
        "poll_round_s": round(_round_seconds(ctx.hosts, ctx.names), 2),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def run(
    trials: int = 5,
    partition_seconds: float = 5.0,
    users: int = 1000,
    objects: int = 1000,
    object_kib: int = 4,
    bed: str = BED,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"euca-bench-{bed}-"))
    hosts: Hosts | None = None
    try:
        cloud = cloud_mod.deploy(bed, workdir, timeout=RECOVERY_TIMEOUT)
        hosts = cloud.hosts
        store = _store.fill(cloud.endpoints, USER_PREFIX, BUCKET, users, objects, object_kib * 1024)
        budget = trials * (partition_seconds + SETTLE_S + 2 * RECOVERY_TIMEOUT) + 120
        res: list[dict[str, Any]] = []
        # The writer uses the first URL of each API, the service VIP (held by the primary's
        # host), as a client given one address does: through the partitioned backup's own
        # address every request would hang until its timeout.
        vips = dataclasses.replace(cloud.endpoints, iam=cloud.endpoints.iam[:1], s3=cloud.endpoints.s3[:1])
        with _store.Traffic(vips, "bsrec", budget) as traffic:
            ctx = Ctx(bed, cloud.hosts, cloud.names, traffic.history, random.Random(0))
            try:
                for _ in range(trials):
                    res.append(_trial(ctx, partition_seconds))
                    if res[-1]["recovery_s"] is None:
                        break  # a cloud that did not recover: more partitions would pile up on it
            finally:
                heal_all(ctx)
        # Counted once the writer stopped: a request still in flight when a trial ended (held
        # until its timeout) is in the history only once it completed.
        for t in res:
            end = t["recovered_at"] if t["recovered_at"] is not None else t["healed_at"] + RECOVERY_TIMEOUT
            t["writes_during_partition"] = traffic.summary(t["partition_at"], t["healed_at"])["ok"]
            window = traffic.summary(t["partition_at"], end)
            t["client_errors"], t["first_errors"] = window["errors"], window["first_errors"]
        writer = traffic.summary()
    finally:
        if hosts is not None:
            hosts.close()
        try:
            cloud_mod.remove(bed, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    out = outcome([t["recovery_s"] for t in res])
    return {
        "hosts": 3,
        "groups": list(GROUPS),
        "trials": trials,
        "trials_run": len(res),
        "partition_seconds": partition_seconds,
        "deploy_seconds": round(cloud.deploy_seconds, 1),
        "store": store,
        "targets": {"recovery_max_s": TARGET_S},
        "recovery": out,
        "poll_round_seconds": summary([t["poll_round_s"] for t in res], 2),
        "writes_during_partition": [t["writes_during_partition"] for t in res],
        "client_errors": sum(t["client_errors"] for t in res),
        "writer": writer,
        "trial_details": res,
    }
