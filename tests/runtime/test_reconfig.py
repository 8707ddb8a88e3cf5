"""A non-HA cloud becomes HA online (I3, EUCA-6462), with real processes on 127.0.0.x."""

from __future__ import annotations

import json
import os
import signal

from runtime_harness import Cloud, Writer, http, run_cli, wait_until

from euca_runtime import local


def _voters(cloud: Cloud, via: str = "node-a") -> dict[str, object]:
    status, body = http("GET", f"{cloud.admin_url(via)}/v1/voters", token=cloud.token, timeout=5)
    assert status == 200, body
    return json.loads(body)


def test_up_ha_turns_a_running_non_ha_cloud_into_an_ha_one_under_load(single_cloud: Cloud) -> None:
    cloud = single_cloud
    pid = cloud.pid("node-a")
    assert _voters(cloud)["target"] == ["node-a"]
    with Writer(cloud, ["node-a"], "conv", per_thread_rate=40.0) as writer:
        wait_until(lambda: writer.count() >= 20, what="writes acknowledged before the change")
        run_cli("up", "--ha", "--dir", str(cloud.root))
        before = writer.count()
        wait_until(lambda: writer.count() >= before + 20, what="writes acknowledged after the change")
    cloud.layout = local.Layout.load(cloud.root)
    assert cloud.pid("node-a") == pid, "node-a was restarted"
    assert not writer.errors, f"writes failed during the change: {writer.errors[:5]}"
    assert cloud.layout.mode == "ha" and sorted(cloud.layout.nodes) == ["node-a", "node-b", "node-c"]
    doc = _voters(cloud)
    for g in doc["groups"]:  # type: ignore[attr-defined]
        assert g["config"]["sets"] == [["node-a", "node-b", "node-c"]] and not g["config"]["joint"], g
    assert not any(v["joining"] for v in doc["voters"])  # type: ignore[attr-defined]
    rows = {s["name"]: s for s in cloud.services()}
    assert rows["node-b.kv"]["state"] == "DISABLED" and rows["node-b.kv"]["in_sync"]
    assert rows["node-b.clc"]["state"] == "DISABLED" and rows["node-b.clc"]["in_sync"]
    assert rows["node-a.kv"]["voter_config"]["sets"] == [["node-a", "node-b", "node-c"]]
    eucarc = (cloud.root / "eucarc").read_text()
    for node in ("node-a", "node-b"):
        assert cloud.kv_url(node) in eucarc and cloud.admin_url(node) in eucarc
    # The backup has every acknowledged write: kill -9 the primary and read them from node-b.
    os.kill(cloud.pid("node-a"), signal.SIGKILL)
    wait_until(lambda: cloud.enabled("kv", via="node-b") == "node-b.kv", timeout=30, what="node-b.kv ENABLED")
    assert writer.missing(via="node-b") == []
    cloud.put("node-b", "after-failover", b"ok")


def test_a_joining_node_whose_peer_is_unreachable_never_enables_itself(single_cloud: Cloud) -> None:
    """Fresh node-b and node-c (join: true) are a majority of {a, b, c}, but must not elect
    themselves while node-a, which holds the cloud's data, is unreachable."""
    cloud = single_cloud
    run_cli("down", "--dir", str(cloud.root), "--node", "node-a")
    layout = local.add_ha_nodes(cloud.layout)
    cloud.layout = layout
    for node in ("node-b", "node-c"):
        run_cli("up", "--dir", str(cloud.root), "--node", node)

    def refused_by_both() -> bool:
        row = cloud.service("node-b.kv", via="node-b")
        assert row["state"] in ("NOTREADY",), row
        return "node-b: joining" in row["cause"] and "node-c: joining" in row["cause"]

    wait_until(refused_by_both, timeout=30, what="node-b.kv refused by both fresh voters")
    rows = cloud.services(via="node-b")
    assert not [r["name"] for r in rows if r["state"] == "ENABLED" and r["type"] in ("kv", "clc")]
    # node-a comes back: the cloud is whole again and node-a keeps its data's primary role.
    run_cli("up", "--dir", str(cloud.root), "--node", "node-a")
    wait_until(lambda: cloud.enabled("kv", via="node-a") == "node-a.kv", timeout=30, what="node-a.kv ENABLED")
