"""Time to add a backup by inventory edit to a non-HA cloud with a full store (issue 6: "time to
add a backup (inventory edit to in sync) with 1,000 users and 1 GiB of objects stored").

A bed of three testbed hosts. The non-HA cloud of tests/integration/test_deploy_add_backup.py:
h1 holds clc (with kv) and walrus, h3 the arbitrator, `euca_voters: [h1]`; deployed by site.yml.
Through the user APIs (boto3, parallel clients, as any client): `users` IAM users (CreateUser)
and `objects` S3 objects of `object_mib` MiB each (1,000 x 64 x 16 MiB = 1 GiB by default); the
size reached is read back (ListUsers, ListObjectsV2). Then, while the fault suite's S3 and IAM
clients keep writing through h1 (`writer`), the edit: h2 joins the clc and walrus groups (kv
comes with clc), `euca_voters` goes (the voters become h1, h2, h3), and site.yml runs again.

Measured from the start of that site.yml run: its wall time, when h2's instances first appear
(registered), and when every group (clc, kv, walrus) first shows one ENABLED instance and h2's
instance DISABLED and in sync (h1's `eucactl describe-groups -o json`, polled over SSH one
answer after another: a time is when the answer that showed it came back, so it is late by at
most one poll, whose duration is recorded as the resolution). The writer's requests that did not
succeed are counted (the target is none). The bed is removed at the end, also on failure.
Needs root and the testbed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import _store
from benchmarks._cloud import summary
from benchmarks.site_yml import PLAYBOOK_TIMEOUT, harness
from faults.checkers import unhealthy_groups
from faults.observe import Hosts, wait_until
from faults.workloads import Endpoints
from testbed import bed as tb

BED = "bsadd"
GROUPS = ("clc", "kv", "walrus")
OLD, NEW, ARBITRATOR = "h1", "h2", "h3"
USER_PREFIX = "bsuser"
BUCKET = "bench-store"
JOIN_TIMEOUT = 3600.0  # from the start of site.yml until every group is in sync on h2


def in_sync_groups(groups: Sequence[dict[str, Any]], wanted: Sequence[str], nodes: set[str]) -> list[str]:
    """The groups of `wanted` that a describe-groups answer shows fully redundant (one ENABLED,
    every other DISABLED and in sync) with instances on exactly `nodes`."""
    out = []
    for g in groups:
        name = str(g.get("group"))
        if name not in wanted or unhealthy_groups([g]):
            continue
        if {str(i.get("node")) for i in g.get("instances") or []} == nodes:
            out.append(name)
    return sorted(out)


def registered_groups(groups: Sequence[dict[str, Any]], wanted: Sequence[str], node: str) -> list[str]:
    """The groups of `wanted` that list an instance on `node` (in any state)."""
    return sorted(
        str(g.get("group"))
        for g in groups
        if str(g.get("group")) in wanted and any(str(i.get("node")) == node for i in g.get("instances") or [])
    )


class JoinWatch(threading.Thread):
    """Polls `via`'s describe-groups from `t0` (monotonic) until every group of GROUPS is in sync
    on OLD and NEW in one answer, or `timeout`: per group, the first time (seconds after t0) it
    was seen registered and in sync, and when all were in sync at once."""

    def __init__(self, hosts: Hosts, via: str, t0: float, timeout: float) -> None:
        super().__init__(daemon=True, name="join-watch")
        self.hosts, self.via, self.t0, self.timeout = hosts, via, t0, timeout
        self.registered: dict[str, float] = {}
        self.in_sync: dict[str, float] = {}
        self.all_in_sync: float | None = None
        self.polls: list[float] = []
        self.last: list[dict[str, Any]] | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set() and time.monotonic() - self.t0 < self.timeout:
                a = time.monotonic()
                groups = self.hosts.groups(self.via)
                b = time.monotonic()
                self.polls.append(b - a)
                if groups:
                    self.last = groups
                    at = round(b - self.t0, 2)
                    for g in registered_groups(groups, GROUPS, NEW):
                        self.registered.setdefault(g, at)
                    synced = in_sync_groups(groups, GROUPS, {OLD, NEW})
                    for g in synced:
                        self.in_sync.setdefault(g, at)
                    if len(synced) == len(GROUPS):
                        self.all_in_sync = at
                        return
                self.stop_event.wait(0.2)
        finally:
            self.hosts.close()


def _site(cloud: Any) -> float:
    t0 = time.monotonic()
    proc = cloud.playbook("playbooks/site.yml", timeout=PLAYBOOK_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"site.yml failed ({proc.returncode}): {proc.stdout[-4000:]}{proc.stderr[-1000:]}")
    return time.monotonic() - t0


def run(
    users: int = 1000,
    objects: int = 64,
    object_mib: int = 16,
    writer: bool = True,
    bed: str = BED,
) -> dict[str, Any]:
    h = harness()
    workdir = Path(tempfile.mkdtemp(prefix=f"euca-bench-{bed}-"))
    hosts = Hosts(bed)
    try:
        tb.up(bed, 3, timeout=600)  # a loaded machine boots slowly
        cloud = h.Cloud(bed, workdir)
        single = {"clc": [OLD], "walrus": [OLD], "arbitrator": [ARBITRATOR]}
        cloud.write_topology(h.topology(bed, workdir, single, euca_voters=[OLD]))
        deploy = _site(cloud)
        wait_until(
            lambda: in_sync_groups(hosts.groups(OLD) or [], GROUPS, {OLD}) == sorted(GROUPS),
            300,
            "the non-HA cloud's groups ENABLED on h1",
        )
        eucarc = workdir / "eucarc"
        proc = cloud.playbook("playbooks/runbooks/eucarc.yml", "-e", f"euca_eucarc={eucarc}")
        if proc.returncode != 0:
            raise RuntimeError(f"eucarc.yml failed: {proc.stdout[-3000:]}")
        endpoints = Endpoints.from_eucarc(eucarc)
        store = _store.fill(endpoints, USER_PREFIX, BUCKET, users, objects, object_mib * _store.MiB)

        traffic = _store.Traffic(endpoints, "bsadd", JOIN_TIMEOUT + 600) if writer else None
        try:
            if traffic is not None:
                traffic.start()
                wait_until(lambda: traffic.summary()["ok"] >= 20, 120, "the writer's first requests")
            ha = {"clc": [OLD, NEW], "walrus": [OLD, NEW], "arbitrator": [ARBITRATOR]}
            cloud.write_topology(h.topology(bed, workdir, ha))
            load_at_edit = [round(x, 2) for x in os.getloadavg()]
            t0 = time.monotonic()
            t_edit = traffic.history.now() if traffic is not None else 0.0
            watch = JoinWatch(Hosts(bed), OLD, t0, JOIN_TIMEOUT)
            watch.start()
            try:
                site_seconds = _site(cloud)
                watch.join(timeout=JOIN_TIMEOUT + 120)
            finally:
                watch.stop_event.set()
                watch.join(timeout=120)
            t_end = traffic.history.now() if traffic is not None else 0.0
            load_at_sync = [round(x, 2) for x in os.getloadavg()]
        finally:
            if traffic is not None:
                traffic.stop()
        if watch.all_in_sync is None:
            raise RuntimeError(
                f"h2 was not in sync in every group {JOIN_TIMEOUT:.0f} s after site.yml started: "
                f"in sync {watch.in_sync}, registered {watch.registered}; h1 said {watch.last}"
            )
        return {
            "hosts": 3,
            "groups": list(GROUPS),
            "deploy_seconds": round(deploy, 1),
            "store": store,
            "site_yml_seconds": round(site_seconds, 1),
            "registered_seconds": watch.registered,
            "in_sync_seconds_per_group": watch.in_sync,
            "in_sync_seconds": watch.all_in_sync,
            "poll_seconds": summary(watch.polls, 2),
            "writer": traffic.summary(t_edit, t_end) if traffic is not None else None,
            "loadavg_at_edit": load_at_edit,
            "loadavg_at_sync": load_at_sync,
        }
    finally:
        hosts.close()
        try:
            tb.down(bed)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
