"""Turning a non-HA cloud into an HA one by an inventory edit, online, and back with remove-host.

A bed of three hosts: first h1 (clc) and h3 (arbitrator) with `euca_voters: [h1]` (one clc and
one arbitrator would be two voters). While a client writes through h1's kv API, the inventory
gets h2 in the clc group and loses `euca_voters`, and `site.yml` runs again: h2 is installed with
`join: true`, h1 and h3 are reloaded (their runtime's pid does not change) and h2's instances end
DISABLED and in sync with the voters h1, h2, h3; the writer sees no error. Then h2 leaves the
inventory again and `playbooks/runbooks/remove-host.yml` hands its primaries back, deregisters it
and moves the voters back to h1 alone, still without a writer error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_harness import Cloud, Writer, topology, wait_until

from testbed import bed as tb

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    name = f"dpab{os.getpid() % 1000}"
    try:
        tb.up(name, 3)
        yield Cloud(name, tmp_path)
    finally:
        tb.down(name)


def voters_of(cloud: Cloud, host: str) -> dict[str, list[list[str]]] | None:
    doc = cloud.eucactl_json(host, "describe-voters")
    if not doc or any(v.get("joining") for v in doc.get("voters", [])):
        return None
    if any(g.get("pending") for g in doc["groups"]):
        return None
    out: dict[str, list[list[str]]] = {}
    for g in doc["groups"]:
        out[g["group"]] = sorted(sorted(s) for s in (g.get("config") or {}).get("sets", []))
    return out


def test_add_a_backup_by_inventory_edit_then_remove_it(cloud: Cloud) -> None:
    single = topology(cloud.name, cloud.workdir, {"clc": ["h1"], "arbitrator": ["h3"]}, euca_voters=["h1"])
    cloud.write_topology(single)
    cloud.site()
    wait_until(lambda: cloud.groups("h1").get("kv", {}).get("enabled") == ["h1.kv"], 90, "h1.kv ENABLED")
    pids = {h: cloud.main_pid(h) for h in ("h1", "h3")}
    assert all(p not in ("", "0") for p in pids.values()), pids

    writer = Writer(cloud, "h1", "add")
    writer.start()
    try:
        wait_until(lambda: len(writer.acked) >= 20, 60, "the writer's first writes")
        # The edit: h2 joins the clc group; the voters become the default clc + arbitrator hosts.
        ha = topology(cloud.name, cloud.workdir, {"clc": ["h1", "h2"], "arbitrator": ["h3"]})
        cloud.write_topology(ha)
        proc = cloud.site()
        # h2 joins; h1 and h3 are reloaded, never restarted.
        for host in ("h1", "h3"):
            assert f"{host}: peers/voters changed; euca-runtime reloads" in proc.stdout, proc.stdout[-5000:]
        assert cloud.ssh("h2", "grep -x 'join: true' /etc/eucalyptus/runtime.yml").returncode == 0
        assert {h: cloud.main_pid(h) for h in ("h1", "h3")} == pids, "an existing runtime was restarted"

        seen: dict[str, object] = {}

        def in_sync() -> bool:
            groups = cloud.groups("h1")
            seen.update(last=groups)
            return all(
                groups.get(g, {}).get("healthy")
                and {i["node"] for i in groups[g]["instances"]} == {"h1", "h2"}
                for g in ("clc", "kv")
            )

        try:
            wait_until(in_sync, 180, "h2's clc and kv DISABLED and in sync", every=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; h1's describe-groups last said {seen.get('last')}") from None
        target = [["h1", "h2", "h3"]]
        wait_until(
            lambda: (v := voters_of(cloud, "h1")) is not None and all(s == target for s in v.values()),
            120,
            "every group's voters = h1, h2, h3",
            every=1,
        )
        assert {h: cloud.main_pid(h) for h in ("h1", "h3")} == pids
        wait_until(lambda: len(writer.acked) >= 200, 120, "more writes after the join")
        assert writer.errors == [], writer.errors[:5]

        # A second run changes nothing (join stays as rendered).
        again = cloud.site()
        recap = again.stdout[again.stdout.rfind("PLAY RECAP") :]
        assert sum(int(n) for n in re.findall(r"changed=(\d+)", recap)) == 0, recap

        # h2 has every acknowledged write: make it the primary and read them back through it.
        proc = cloud.playbook("playbooks/runbooks/switchover.yml", "-e", "group=kv", "-e", "to=h2.kv")
        assert proc.returncode == 0, proc.stdout[-3000:]
        acked = list(writer.acked)
        missing = [k for k in acked[::7] if cloud.get("h2", k) != k.encode()]
        assert missing == [], missing[:5]

        # Remove h2 again: out of the inventory first, then the runbook.
        cloud.write_topology(single)
        proc = cloud.playbook("playbooks/runbooks/remove-host.yml", "-e", "host=h2")
        assert proc.returncode == 0, proc.stdout[-6000:]
        assert {h: cloud.main_pid(h) for h in ("h1", "h3")} == pids, "remove-host restarted a runtime"
        assert cloud.ssh("h2", "systemctl is-active euca-runtime").stdout.strip() != "active"
        groups = cloud.groups("h1")
        assert groups["kv"]["enabled"] == ["h1.kv"] and groups["clc"]["enabled"] == ["h1.clc"]
        wait_until(
            lambda: (v := voters_of(cloud, "h1")) is not None and all(s == [["h1"]] for s in v.values()),
            60,
            "every group's voters = h1",
        )
        before = len(writer.acked)
        wait_until(lambda: len(writer.acked) >= before + 50, 60, "writes after the removal")
    finally:
        writer.stop()
    assert writer.errors == [], writer.errors[:5]
    assert all(cloud.get("h1", k) == k.encode() for k in writer.acked[::11])
