"""User-route failover with real processes (``up --ha``; docs/arbitrator.md).

node-c's arbitrator watches route ``users-a`` (stands for node-a) and ``users-b`` (node-b),
two TCP targets each, served by the local cloud's route-target stand-ins; a test takes
targets down by closing their listeners (`euca_runtime.route_targets`). Route settings of
the local cloud: interval 0.5 s, threshold 3, recover 3, failback manual.

Every wait polls a condition with a deadline; "no failover happened" is checked after the
arbitrator has done a given number of probe rounds (its round counter), not after a sleep.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from runtime_harness import Cloud, Writer, http, wait_until

from euca_runtime import route_targets

GROUPS = ("clc", "kv", "walrus", "cc/cluster01", "sc/cluster01")
"""Every group of node-a and node-b; a route's failover moves them all."""


def name(node: str, group: str) -> str:
    """The service name of `group`'s instance on `node` (``cc/cluster01`` -> ``node.cc.cluster01``)."""
    return f"{node}.{group.replace('/', '.')}"


def set_targets(cloud: Cloud, names: list[str], up: bool) -> None:
    route_targets.control(cloud.root, names, up)


def route(cloud: Cloud, name: str) -> dict[str, Any]:
    """The arbitrator's report about route `name` (node-c's status document)."""
    status, body = http("GET", f"{cloud.admin_url('node-c')}/v1/status", token=cloud.token, timeout=5)
    assert status == 200, body
    return next(r for r in json.loads(body)["routes"] if r["name"] == name)


def targets_of(cloud: Cloud, name: str) -> list[str]:
    return next(list(r["targets"]) for r in cloud.layout.doc["routes"] if r["name"] == name)


def events(cloud: Cloud) -> list[dict[str, Any]]:
    proc = cloud.ctl("describe-services", "-o", "json", "--events")
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout)["events"])


def settled_on(cloud: Cloud, primary: str, backup: str) -> bool:
    rows = {s["name"]: s for s in cloud.services()}
    return all(
        rows[name(primary, g)]["state"] == "ENABLED"
        and rows[name(backup, g)]["state"] == "DISABLED"
        and rows[name(backup, g)]["in_sync"]
        for g in GROUPS
    )


def routes_up(cloud: Cloud) -> bool:
    return all(
        route(cloud, r)["state"] == "UP" and not route(cloud, r)["lost"] for r in ("users-a", "users-b")
    )


def wait_rounds(cloud: Cloud, name: str, more: int) -> None:
    """Wait until the arbitrator has probed route `name` `more` more times."""
    start = route(cloud, name)["rounds"]
    wait_until(lambda: route(cloud, name)["rounds"] >= start + more, what=f"{more} more rounds of {name}")


def test_route_down_fails_over_keeps_writes_and_stays_until_switchover(ha_cloud: Cloud) -> None:
    wait_until(lambda: settled_on(ha_cloud, "node-a", "node-b"), what="HA settled on node-a")
    wait_until(lambda: routes_up(ha_cloud), what="both routes UP")
    with Writer(ha_cloud, ["node-b", "node-b", "node-a"], "rt") as writer:
        wait_until(lambda: writer.count() >= 30, what="writes flowing")
        set_targets(ha_cloud, ["users-a"], up=False)  # every target of node-a's route
        cut_at = time.monotonic()
        for g in GROUPS:
            wait_until(
                lambda g=g: ha_cloud.enabled(g, via="node-b") == name("node-b", g),
                what=f"node-b's {g} ENABLED",
            )
        wait_until(lambda: any(a[1] > cut_at for a in writer.acked), what="writes acknowledged after the cut")
    for g in GROUPS:
        row = ha_cloud.service(name("node-a", g), via="node-a")
        assert row["state"] == "NOTREADY" and "route users-a is DOWN" in row["cause"], row
    assert writer.missing(via="node-b") == []  # every acknowledged write kept (I2)
    evs = events(ha_cloud)
    assert any(e["service"] == "node-c.arbitrator" and "route users-a DOWN" in e["cause"] for e in evs)
    assert any(e["service"] == "route:users-a" and e["new"] == "DOWN" and e["node"] == "node-a" for e in evs)

    # The route comes back: node-a catches up and stands by, the primary stays on node-b.
    set_targets(ha_cloud, ["users-a"], up=True)
    wait_until(lambda: route(ha_cloud, "users-a")["state"] == "UP", what="users-a UP again")
    wait_until(lambda: settled_on(ha_cloud, "node-b", "node-a"), what="node-a back as an in-sync backup")
    epochs = {g: ha_cloud.service(name("node-b", g))["epoch"] for g in GROUPS}
    wait_rounds(ha_cloud, "users-a", 8)  # well past recover + threshold: a policy would have acted
    for g in GROUPS:
        row = ha_cloud.service(name("node-b", g))
        assert row["state"] == "ENABLED" and row["epoch"] == epochs[g], row  # manual failback: no move
    assert not any(e["service"] == "node-a.kv" and "failback" in e["cause"] for e in events(ha_cloud))

    # The operator moves it back.
    proc = ha_cloud.ctl("switchover", "kv", "--to", "node-a.kv")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    wait_until(lambda: ha_cloud.enabled("kv") == "node-a.kv", what="node-a.kv ENABLED after switchover")
    assert ha_cloud.enabled("clc") == "node-b.clc"  # only what the operator asked for moved
    ha_cloud.put("node-b", "after-switchover", b"ok")
    assert ha_cloud.get("node-a", "after-switchover") == b"ok"


def test_one_target_of_two_down_is_an_advisory_and_no_failover(ha_cloud: Cloud) -> None:
    wait_until(lambda: settled_on(ha_cloud, "node-a", "node-b"), what="HA settled on node-a")
    wait_until(lambda: routes_up(ha_cloud), what="both routes UP")
    epochs = {g: ha_cloud.service(name("node-a", g))["epoch"] for g in GROUPS}
    lost = targets_of(ha_cloud, "users-a")[0]
    set_targets(ha_cloud, [lost], up=False)
    wait_until(lambda: route(ha_cloud, "users-a")["lost"] == [f"tcp {lost}"], what="the target reported lost")
    assert route(ha_cloud, "users-a")["state"] == "UP"
    assert route(ha_cloud, "users-a")["status"] == "DEGRADED"
    wait_rounds(ha_cloud, "users-a", 3 * 3)  # three times the threshold more
    for g in GROUPS:
        row = ha_cloud.service(name("node-a", g))
        assert row["state"] == "ENABLED" and row["epoch"] == epochs[g], row
    evs = events(ha_cloud)
    advisories = [e for e in evs if "route users-a ADVISORY" in e["cause"]]
    assert len(advisories) == 1 and f"tcp {lost}" in advisories[0]["cause"], advisories
    assert not any(e["service"] == "route:users-a" for e in evs)  # never DOWN for node-a
    arb = ha_cloud.service("node-c.arbitrator")
    assert "users-a DEGRADED" in arb["cause"], arb
    _, body = http("GET", f"{ha_cloud.admin_url('node-c')}/metrics", token=ha_cloud.token)
    text = body.decode()
    assert 'euca_route_advisories_total{route="users-a"} 1' in text
    assert 'euca_route_targets_lost{route="users-a"} 1' in text and 'euca_route_up{route="users-a"} 1' in text

    set_targets(ha_cloud, [lost], up=True)
    wait_until(lambda: route(ha_cloud, "users-a")["lost"] == [], what="the target restored")
    assert any("route users-a advisory cleared" in e["cause"] for e in events(ha_cloud))


def test_a_flapping_route_does_not_make_the_leadership_flap(ha_cloud: Cloud) -> None:
    """Every target of node-a's route flaps (down and up again every 0.2-0.8 intervals, a
    seeded pattern, bounded). The route may go DOWN once (then node-b takes over), but the
    primary never moves back and forth: at most one move per group, never back to node-a."""
    wait_until(lambda: settled_on(ha_cloud, "node-a", "node-b"), what="HA settled on node-a")
    wait_until(lambda: routes_up(ha_cloud), what="both routes UP")
    interval = float(route(ha_cloud, "users-a")["interval"])
    rng = random.Random(5307)
    started = time.time()
    up = True
    for _ in range(40):  # about 10 s of flapping
        up = not up
        set_targets(ha_cloud, ["users-a"], up=up)
        time.sleep(rng.uniform(0.2, 0.8) * interval)  # pacing the fault pattern, not synchronisation
    set_targets(ha_cloud, ["users-a"], up=True)
    wait_until(lambda: route(ha_cloud, "users-a")["state"] == "UP", what="users-a UP after the flapping")
    wait_rounds(ha_cloud, "users-a", 6)
    evs = [e for e in events(ha_cloud) if e["ts"] >= started and e["old"] != e["new"]]  # transitions
    report = route(ha_cloud, "users-a")
    history = "\n".join(f"{e['ts']:.3f} {e['service']} {e['old']} -> {e['new']}: {e['cause']}" for e in evs)
    for g in GROUPS:
        enabled = [
            e["service"]
            for e in evs
            if e["service"] in (name("node-a", g), name("node-b", g)) and e["new"] == "ENABLED"
        ]
        assert len(enabled) <= 1, (g, enabled, history)  # at most one move
        assert enabled in ([], [name("node-b", g)]), (g, enabled)  # and never back
        assert ha_cloud.enabled(g) == (enabled[0] if enabled else name("node-a", g))
    moves = sum(1 for e in evs if e["new"] == "ENABLED")
    print(f"flapping: route transitions {report['transitions']}, moves {moves}")
