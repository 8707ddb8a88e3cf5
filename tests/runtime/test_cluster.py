"""CC and NC through the bus, in real processes: `up` and `up --ha` clouds on loopback.

The ``cc.*`` methods are called the way every component calls them, through the bus by
(type, partition), here from the admin API's ``POST /v1/call`` of a chosen node. Nothing
sleeps to synchronise: every wait polls a condition with a deadline (`wait_until`)."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from runtime_harness import Cloud, cc_service_pid, http, placeholders, run_cli, wait_until

from euca_runtime.cluster.driver import proc_start_ticks

CLUSTER = "cluster01"


def cc(cloud: Cloud, via: str, method: str, body: Any = None, timeout: float = 15.0) -> tuple[int, Any]:
    doc = {"type": "cc", "partition": CLUSTER, "method": method, "body": body or {}, "timeout": timeout}
    status, raw = http(
        "POST", f"{cloud.admin_url(via)}/v1/call", json.dumps(doc).encode(), cloud.token, timeout=timeout + 5
    )
    out = json.loads(raw)
    return status, out.get("result") if status == 200 else out


def ok(cloud: Cloud, via: str, method: str, body: Any = None) -> Any:
    status, res = cc(cloud, via, method, body)
    assert status == 200, f"{method} via {via}: {status} {res}"
    return res


def run_body(*ids: str, itype: str = "t1.micro") -> dict[str, Any]:
    return {
        "instances": [{"instance_id": i, "instance_type": itype, "image_id": "emi-00000001"} for i in ids]
    }


def states(cloud: Cloud, via: str) -> dict[str, str]:
    res = ok(cloud, via, "cc.describe_instances", {"instance_ids": None})
    ids = [i["instance_id"] for i in res["instances"]]
    assert len(ids) == len(set(ids)), f"an instance reported twice: {ids}"
    return {i["instance_id"]: i["state"] for i in res["instances"]}


def test_single_cloud_runs_describes_terminates(single_cloud: Cloud) -> None:
    cloud = single_cloud
    rows = json.loads(cloud.ctl("describe-services", "-o", "json").stdout)
    by_type = {r["type"]: r for r in rows}
    assert by_type["cc"]["state"] == "ENABLED" and by_type["cc"]["partition"] == CLUSTER
    assert by_type["nc"]["state"] == "ENABLED" and by_type["nc"]["partition"] == CLUSTER
    nodes = ok(cloud, "node-a", "cc.describe_nodes")["nodes"]
    assert [(n["node"], n["state"], n["cores"]) for n in nodes] == [("node-a.nc.cluster01", "up", 8)]

    ids = [f"i-{n:08x}" for n in range(1, 4)]
    res = ok(cloud, "node-a", "cc.run_instances", run_body(*ids))
    assert [(i["instance_id"], i["state"]) for i in res["instances"]] == [(i, "running") for i in ids]
    assert ok(cloud, "node-a", "cc.run_instances", run_body(*ids)) == res  # a retry starts nothing new
    assert sorted(placeholders(cloud.root)) == ids
    assert states(cloud, "node-a") == dict.fromkeys(ids, "running")

    status, err = cc(cloud, "node-a", "cc.run_instances", run_body(*[f"i-{n:08x}" for n in range(10, 16)]))
    assert status == 409 and err["error"] == "InsufficientInstanceCapacity", err  # 3 + 6 > 8 cores
    assert sorted(placeholders(cloud.root)) == ids  # nothing of the refused call started
    status, err = cc(cloud, "node-a", "cc.run_instances", run_body("i-00000020", itype="z9.huge"))
    assert status == 409 and err["error"] == "InvalidParameterValue" and "z9.huge" in err["message"]

    res = ok(cloud, "node-a", "cc.terminate_instances", {"instance_ids": [ids[0], "i-0000dead"]})
    assert [(i["instance_id"], i["previous_state"], i["state"]) for i in res["instances"]] == [
        (ids[0], "running", "terminated"),
        ("i-0000dead", "terminated", "terminated"),
    ]
    assert sorted(placeholders(cloud.root)) == ids[1:]
    assert states(cloud, "node-a") == {ids[0]: "terminated", ids[1]: "running", ids[2]: "running"}


def test_cc_failover_kill_service_then_kill_runtime(ha_cloud: Cloud) -> None:
    cloud = ha_cloud
    group = f"cc/{CLUSTER}"
    ids = [f"i-{n:08x}" for n in range(1, 7)]
    for pair in (ids[0:2], ids[2:4], ids[4:6]):
        ok(cloud, "node-a", "cc.run_instances", run_body(*pair))
    running = dict.fromkeys(ids, "running")
    assert states(cloud, "node-b") == running
    before = placeholders(cloud.root)
    assert sorted(before) == ids

    # 1. kill -9 of just the ENABLED CC's service process: its proxy goes NOTREADY, gives up
    #    the lease, the other CC takes over and reports every instance at once.
    first = wait_until(lambda: cloud.enabled(group), what="an ENABLED cc")
    first_node = first.split(".")[0]
    other = "node-b" if first_node == "node-a" else "node-a"
    pid = wait_until(lambda: cc_service_pid(cloud, first_node), what="the cc service pid")
    os.kill(pid, signal.SIGKILL)
    assert states(cloud, other) == running  # held by the bus across the failover, then answered
    wait_until(lambda: cloud.enabled(group) == f"{other}.cc.{CLUSTER}", what=f"{other}'s cc ENABLED")
    # The killed service is restarted by its proxy, which comes back as the hot standby.
    wait_until(lambda: cloud.service(first, via=other)["state"] == "DISABLED", what="the old cc DISABLED")
    assert cc_service_pid(cloud, first_node) not in (None, pid)
    # Retrying the same run starts nothing twice (the new CC finds them on the NC).
    res = ok(cloud, other, "cc.run_instances", run_body(*ids))
    assert {i["instance_id"] for i in res["instances"]} == set(ids)
    assert placeholders(cloud.root) == before

    # 2. kill -9 of the runtime process now hosting the ENABLED CC: the backup takes over; the
    #    dead runtime's CC service exits with it.
    dead_service = cc_service_pid(cloud, other)
    os.kill(cloud.pid(other), signal.SIGKILL)
    assert states(cloud, first_node) == running
    wait_until(lambda: cloud.enabled(group, via=first_node) == first, what=f"{first} ENABLED again")
    wait_until(
        lambda: dead_service is None or proc_start_ticks(dead_service) is None, what="orphan cc service gone"
    )
    res = ok(cloud, first_node, "cc.run_instances", run_body("i-00000007"))
    assert res["instances"][0]["state"] == "running"
    assert states(cloud, first_node) == running | {"i-00000007": "running"}
    assert sorted(placeholders(cloud.root)) == [*ids, "i-00000007"]

    # 3. The killed node comes back as the hot standby; a planned switchover moves the lease
    #    to it like any group's (nothing to catch up), and it reports everything at once.
    run_cli("up", "--dir", str(cloud.root), "--node", other)
    back = f"{other}.cc.{CLUSTER}"
    wait_until(lambda: cloud.service(back, via=first_node)["state"] == "DISABLED", what=f"{back} DISABLED")
    proc = cloud.ctl("switchover", group, "--to", back)
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: cloud.enabled(group) == back, what=f"{back} ENABLED after the switchover")
    assert states(cloud, first_node) == running | {"i-00000007": "running"}


def test_nc_death_lost_then_found_again(ha_cloud: Cloud) -> None:
    cloud = ha_cloud
    ids = [f"i-{n:08x}" for n in range(1, 4)]
    ok(cloud, "node-a", "cc.run_instances", run_body(*ids))
    launch = {
        i["instance_id"]: i["launch_time"] for i in ok(cloud, "node-a", "cc.describe_instances")["instances"]
    }
    pids = placeholders(cloud.root)

    # The NC's runtime dies (its instances, like VMs, live on): the CC reports them lost.
    os.kill(cloud.pid("node-c"), signal.SIGKILL)
    wait_until(lambda: states(cloud, "node-a") == dict.fromkeys(ids, "lost"), what="instances reported lost")
    nodes = ok(cloud, "node-a", "cc.describe_nodes")["nodes"]
    assert [(n["node"], n["state"]) for n in nodes] == [("node-c.nc.cluster01", "lost")]
    # Nothing else breaks: the CC answers, refuses what it cannot place, other services serve.
    status, err = cc(cloud, "node-a", "cc.run_instances", run_body("i-00000009"))
    assert status == 409 and err["error"] == "InsufficientInstanceCapacity"
    cloud.put("node-a", "still-writable", b"yes")
    assert cloud.get("node-b", "still-writable") == b"yes"

    # The NC restarts and finds its instances again (same processes, same launch times).
    run_cli("up", "--dir", str(cloud.root), "--node", "node-c")
    wait_until(lambda: states(cloud, "node-b") == dict.fromkeys(ids, "running"), what="instances found again")
    again = {
        i["instance_id"]: i["launch_time"] for i in ok(cloud, "node-b", "cc.describe_instances")["instances"]
    }
    assert again == launch and placeholders(cloud.root) == pids

    # A placeholder (the instance itself) dies: reported terminated, with the reason.
    os.kill(pids[ids[0]], signal.SIGKILL)
    wait_until(lambda: states(cloud, "node-a")[ids[0]] == "terminated", what="dead instance terminated")
    dead = ok(cloud, "node-a", "cc.describe_instances", {"instance_ids": [ids[0]]})["instances"][0]
    assert dead["reason"] == "instance process exited unexpectedly"
    res = ok(cloud, "node-a", "cc.terminate_instances", {"instance_ids": ids})
    assert [i["state"] for i in res["instances"]] == ["terminated"] * 3
    assert placeholders(cloud.root) == {}
