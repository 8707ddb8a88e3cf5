"""site.yml's rolling restart and the runbooks rolling-upgrade, arbitrator-routes and
replace-host on a site.yml-deployed bed.

Four hosts: h1, h2 clc (with kv), h3 arbitrator, h4 spare (in no group). One cloud for the module;
the tests run in file order, each leaving a healthy cloud: site.yml applying a change that needs
a restart, then the rolling-upgrade runbook (each under a writer: every runtime restarted, backups
first, no writer error), a route change that restarts only the arbitrator, and the replacement of
a killed h2 by h4.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_harness import UPSTREAM, Cloud, Writer, topology, wait_until

from testbed import bed as tb

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.timeout(3600)]


def layout(cloud: Cloud, clc: list[str], **extra: Any) -> dict[str, Any]:
    return topology(cloud.name, cloud.workdir, {"clc": clc, "arbitrator": ["h3"]}, **extra)


def healthy(cloud: Cloud, host: str = "h1") -> bool:
    groups = cloud.groups(host)
    return bool(groups) and all(g["healthy"] for g in groups.values())


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    name = f"dprb{os.getpid() % 1000}"
    try:
        tb.up(name, 4)
        c = Cloud(name, tmp_path_factory.mktemp("dprb"))
        c.write_topology(layout(c, ["h1", "h2"]))
        c.site()
        wait_until(lambda: healthy(c), 120, "a healthy cloud", every=1)
        yield c
    finally:
        tb.down(name)


def test_site_yml_restarts_one_host_at_a_time_and_the_primary_after_a_switchover(cloud: Cloud) -> None:
    """A converge that needs a restart everywhere (log_level cannot be reloaded) on a running HA
    cloud: the euca_runtime role restarts nothing itself, playbooks/rolling-restart.yml restarts
    the hosts without a primary first, then the primary's host after its switchover."""
    before = {h: cloud.main_pid(h) for h in ("h1", "h2", "h3")}
    primary = cloud.groups("h1")["kv"]["enabled"][0].split(".")[0]
    backup = "h2" if primary == "h1" else "h1"
    cloud.write_topology(layout(cloud, ["h1", "h2"], euca_runtime_log_level="warning"))
    writer = Writer(cloud, [backup, primary], "sr")
    writer.start()
    try:
        proc = cloud.site()
    finally:
        writer.stop()
    assert writer.errors == [], writer.errors[:5]
    after = {h: cloud.main_pid(h) for h in ("h1", "h2", "h3")}
    assert all(after[h] != before[h] for h in after), (before, after)
    out = proc.stdout
    role = out.index("PLAY [Install and configure the euca-ha runtime")
    first = out.index("PLAY [Restart the marked runtimes that hold no primary")
    last = out.index("PLAY [Switch each marked primary's host over")
    assert "RUNNING HANDLER [euca_runtime : Restart euca-runtime now]" not in out[role:first]
    first_play = out[first:last]
    assert f"changed: [{backup}]" in first_play and "changed: [h3]" in first_play, first_play[-3000:]
    assert f"changed: [{primary}]" not in first_play, first_play[-3000:]
    assert re.search(rf"TASK \[Hand every primary on this host.*?\nchanged: \[{primary}\]", out[last:], re.S)
    assert f"changed: [{primary}]" in out[last:], out[last:][-3000:]
    wait_until(lambda: healthy(cloud), 60, "a healthy cloud", every=1)
    assert cloud.groups(backup)["kv"]["enabled"] == [f"{backup}.kv"]  # no move back: no flapping
    assert all(cloud.get(backup, k) == k.encode() for k in writer.acked[::9])
    # Converged: a rerun restarts nothing.
    again = cloud.site()
    assert "PLAY [Switch each marked primary's host over" in again.stdout
    assert {h: cloud.main_pid(h) for h in ("h1", "h2", "h3")} == after


def test_rolling_upgrade_restarts_backups_first_and_never_a_primary(cloud: Cloud) -> None:
    before = {h: cloud.main_pid(h) for h in ("h1", "h2", "h3")}
    primary = cloud.groups("h1")["kv"]["enabled"][0].split(".")[0]
    backup = "h2" if primary == "h1" else "h1"
    # A change that needs a restart on every host (log_level is not reloadable).
    cloud.write_topology(layout(cloud, ["h1", "h2"], euca_runtime_log_level="debug"))
    writer = Writer(cloud, [backup, primary], "ru")  # every host restarts: use both endpoints
    writer.start()
    try:
        proc = cloud.playbook("playbooks/runbooks/rolling-upgrade.yml")
        assert proc.returncode == 0, proc.stdout[-6000:]
    finally:
        writer.stop()
    assert writer.errors == [], writer.errors[:5]
    after = {h: cloud.main_pid(h) for h in ("h1", "h2", "h3")}
    assert all(after[h] != before[h] for h in after), (before, after)
    # The backup host was done in the first play; the primary's host only after its switchover.
    first = proc.stdout.index("PLAY [Upgrade the hosts that hold no primary")
    last = proc.stdout.index("PLAY [Switch each primary's host over")
    assert re.search(
        rf"TASK \[euca_runtime : Restart when a configuration key.*?\n(changed|ok): \[{backup}\]",
        proc.stdout[first:last],
        re.S,
    ), proc.stdout[first:last][-3000:]
    assert f"changed: [{primary}" in proc.stdout[last:], proc.stdout[last:][-3000:]
    assert "Hand every primary on this host to an in-sync backup on another host" in proc.stdout[last:]
    assert healthy(cloud)
    assert all(cloud.get(backup, k) == k.encode() for k in writer.acked[::9])


def test_arbitrator_routes_show_and_change_restarts_only_the_arbitrator(cloud: Cloud) -> None:
    proc = cloud.playbook("playbooks/runbooks/arbitrator-routes.yml")
    assert proc.returncode == 0 and "running" in proc.stdout and "icmp" in proc.stdout, proc.stdout[-3000:]
    before = {h: cloud.main_pid(h) for h in ("h1", "h2", "h3")}
    routes = [{"name": "users", "targets": [{"icmp": UPSTREAM}], "threshold": 5, "interval": 0.5}]
    doc = layout(cloud, ["h1", "h2"], euca_runtime_log_level="debug")
    doc["all"]["children"]["arbitrator"]["hosts"]["h3"]["euca_arbitrator_routes"] = routes
    cloud.write_topology(doc)
    proc = cloud.playbook("playbooks/runbooks/arbitrator-routes.yml", "-e", "apply=true")
    assert proc.returncode == 0, proc.stdout[-5000:]
    after = {h: cloud.main_pid(h) for h in ("h1", "h2", "h3")}
    assert after["h3"] != before["h3"] and after["h1"] == before["h1"] and after["h2"] == before["h2"]
    assert "threshold: 5" in cloud.ssh("h3", "cat /etc/eucalyptus/runtime.yml").stdout
    assert healthy(cloud)


def test_replace_a_dead_host_by_a_new_one(cloud: Cloud) -> None:
    tb.kill(cloud.name, "h2")
    try:
        wait_until(lambda: cloud.groups("h1").get("kv", {}).get("enabled") == ["h1.kv"], 60, "h1.kv primary")
        doc = layout(cloud, ["h1", "h4"], euca_runtime_log_level="debug")
        doc["all"]["children"]["arbitrator"]["hosts"]["h3"]["euca_arbitrator_routes"] = [
            {"name": "users", "targets": [{"icmp": UPSTREAM}], "threshold": 5, "interval": 0.5}
        ]
        cloud.write_topology(doc)
        proc = cloud.playbook("playbooks/runbooks/replace-host.yml", "-e", "host=h2", "--limit", "!h2")
        assert proc.returncode == 0, proc.stdout[-6000:]
        assert cloud.ssh("h4", "grep -x 'join: true' /etc/eucalyptus/runtime.yml").returncode == 0

        def replaced() -> bool:
            groups = cloud.groups("h1")
            kv = groups.get("kv", {})
            h4 = [i for i in kv.get("instances", []) if i["node"] == "h4"]
            return (
                kv.get("enabled") == ["h1.kv"]
                and bool(h4)
                and h4[0]["state"] == "DISABLED"
                and h4[0]["in_sync"]
            )

        wait_until(replaced, 180, "h4.kv DISABLED and in sync", every=1)
        doc2 = cloud.eucactl_json("h1", "describe-voters")
        sets = {
            g["group"]: sorted(sorted(s) for s in g["config"]["sets"]) for g in doc2["groups"] if g["config"]
        }
        assert all(s == [["h1", "h3", "h4"]] for s in sets.values()), sets
        # The dead host's instances were deregistered without it: tombstones, not missing members.
        old = [r for r in cloud.eucactl_json("h1", "describe-services") if r["node"] == "h2"]
        assert old and all(r["state"] == "STOPPED" and r["cause"].startswith("deregistered") for r in old), (
            old
        )
    finally:
        tb.start(cloud.name, "h2")
