"""The CC service's logic over real NCs (record and process drivers) in one event loop.

The transport hands each call to the NC component's own handlers, as the bus would; an NC
marked down does not answer. No mocks of the CC or the NC."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from euca_runtime.cluster.cc_service import CCError, CCService, NcRefused, NcUnavailable
from euca_runtime.cluster.driver import (
    InstanceSpec,
    ProcessDriver,
    RecordDriver,
    kill_placeholders,
    proc_start_ticks,
)
from euca_runtime.cluster.nc import NodeController
from euca_runtime.cluster.options import check_options
from euca_runtime.component import RequestError, RequestInfo
from euca_runtime.config import ConfigError, load_config


@dataclass
class Ctx:
    name: str
    data_dir: Path
    node_name: str = "node-x"
    partition: str = "cluster01"
    options: dict[str, Any] = field(default_factory=dict)


class Transport:
    def __init__(self, ncs: dict[str, NodeController]) -> None:
        self.ncs = ncs
        self.down: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    async def members(self) -> list[str]:
        return sorted(self.ncs)

    async def call(self, nc: str, method: str, body: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        self.calls.append((nc, method))
        if nc in self.down:
            raise NcUnavailable(f"{nc} is down")
        handler = self.ncs[nc].peer_handlers()[method]
        try:
            return await handler(dict(body), RequestInfo(method, "test", 0.0))
        except RequestError as exc:
            raise NcRefused(exc.kind, exc.message) from None


def make_ncs(tmp: Path, n: int, cores: int = 4, driver: str = "record") -> dict[str, NodeController]:
    out = {}
    for i in range(n):
        name = f"nc-{i}"
        opts = {"cores": cores, "memory_mib": 8192, "disk_gib": 100, "driver": driver}
        out[name] = NodeController(Ctx(name, tmp), opts)  # type: ignore[arg-type]
    return out


def run_req(*ids: str, itype: str = "m1.small") -> dict[str, Any]:
    return {"instances": [{"instance_id": i, "instance_type": itype, "image_id": "emi-1"} for i in ids]}


def test_run_describe_terminate_and_idempotent_retries(tmp_path: Path) -> None:
    async def go() -> None:
        t = Transport(make_ncs(tmp_path, 3))
        cc = CCService(t, "cluster01")
        res = await cc.handle("cc.run_instances", run_req("i-1", "i-2", "i-3", "i-4"), epoch=1)
        nodes = [r["node"] for r in res["instances"]]
        assert nodes == ["nc-0", "nc-1", "nc-2", "nc-0"]  # spread: most free cores, then name
        again = await cc.handle("run_instances", run_req("i-1", "i-2", "i-3", "i-4"), epoch=1)
        assert again == res  # a retry places nothing twice
        runs = [c for c in t.calls if c[1] == "nc.run"]
        assert len(runs) == 4
        # A fresh CC (no memory at all) sees the same from the NCs after its first poll.
        other = CCService(t, "cluster01")
        got = await other.handle("cc.describe_instances", {"instance_ids": None}, epoch=2)
        assert {i["instance_id"]: i["node"] for i in got["instances"]} == {
            "i-1": "nc-0",
            "i-2": "nc-1",
            "i-3": "nc-2",
            "i-4": "nc-0",
        }
        retry = await other.handle("cc.run_instances", run_req("i-1", "i-2", "i-3", "i-4"), epoch=2)
        assert [r["node"] for r in retry["instances"]] == nodes
        assert len([c for c in t.calls if c[1] == "nc.run"]) == 4
        term = await other.handle("cc.terminate_instances", {"instance_ids": ["i-2", "i-nope"]}, epoch=2)
        assert term["instances"][0]["previous_state"] == "running"
        assert term["instances"][0]["state"] == "terminated"
        assert term["instances"][1] == {
            "instance_id": "i-nope",
            "previous_state": "terminated",
            "state": "terminated",
        }
        term2 = await other.handle("cc.terminate_instances", {"instance_ids": ["i-2"]}, epoch=2)
        assert term2["instances"][0]["state"] == "terminated"
        desc = await other.handle("cc.describe_instances", {"instance_ids": ["i-2", "i-3"]}, epoch=2)
        assert [(i["instance_id"], i["state"]) for i in desc["instances"]] == [
            ("i-2", "terminated"),
            ("i-3", "running"),
        ]

    asyncio.run(go())


def test_insufficient_capacity_refuses_the_whole_call(tmp_path: Path) -> None:
    async def go() -> None:
        t = Transport(make_ncs(tmp_path, 2, cores=2))
        cc = CCService(t, "cluster01")
        with pytest.raises(CCError) as err:
            await cc.handle("cc.run_instances", run_req("i-1", "i-2", "i-3", itype="c1.medium"), epoch=1)
        assert err.value.kind == "InsufficientInstanceCapacity" and not err.value.retry
        assert not [c for c in t.calls if c[1] == "nc.run"]  # nothing started
        ok = await cc.handle("cc.run_instances", run_req("i-1", "i-2", itype="c1.medium"), epoch=1)
        assert {r["node"] for r in ok["instances"]} == {"nc-0", "nc-1"}
        nodes = await cc.handle("cc.describe_nodes", {}, epoch=1)
        assert [n["free_cores"] for n in nodes["nodes"]] == [0, 0]
        for bad, kind in [
            ({"instances": []}, "InvalidParameterValue"),
            (run_req("i-9", itype="x9.huge"), "InvalidParameterValue"),
            ({"instances": [{"instance_id": "i-1"}]}, "InvalidParameterValue"),
            (run_req("i-7", "i-7"), "InvalidParameterValue"),
        ]:
            with pytest.raises(CCError) as e:
                await cc.handle("cc.run_instances", bad, epoch=1)
            assert e.value.kind == kind
        with pytest.raises(CCError, match="UnknownMethod"):
            await cc.handle("cc.reboot", {}, epoch=1)

    asyncio.run(go())


def test_a_deposed_cc_is_fenced_by_the_ncs(tmp_path: Path) -> None:
    async def go() -> None:
        t = Transport(make_ncs(tmp_path, 2))
        old = CCService(t, "cluster01")
        await old.handle("cc.run_instances", run_req("i-1"), epoch=1)
        new = CCService(t, "cluster01")
        await new.handle("cc.describe_nodes", {}, epoch=2)  # the fencing poll of epoch 2
        with pytest.raises(CCError) as err:
            await old.handle("cc.run_instances", run_req("i-2"), epoch=1)
        assert err.value.kind == "NotPrimary" and err.value.retry
        with pytest.raises(CCError) as err:
            await new.handle("cc.run_instances", run_req("i-3"), epoch=1)  # older than what it has
        assert err.value.retry
        with pytest.raises(CCError) as err:
            await new.handle("cc.describe_nodes", {}, epoch=None)
        assert err.value.kind == "NotPrimary"
        # The fence survives an NC restart (a new NodeController over the same state dir).
        again = NodeController(Ctx("nc-0", tmp_path), {"driver": "record"})  # type: ignore[arg-type]
        assert again.fence == 2

    asyncio.run(go())


def test_a_silent_nc_makes_its_instances_lost_and_nothing_else(tmp_path: Path) -> None:
    async def go() -> None:
        t = Transport(make_ncs(tmp_path, 2))
        cc = CCService(t, "cluster01")
        await cc.handle("cc.run_instances", run_req("i-1", "i-2"), epoch=1)
        t.down.add("nc-1")
        await cc.poll()
        got = {
            i["instance_id"]: i["state"]
            for i in (await cc.handle("cc.describe_instances", {}, epoch=1))["instances"]
        }
        assert got == {"i-1": "running", "i-2": "lost"}
        # A CC enabled now, cold, never sees i-2 but reports its NC lost (the CLC shows it lost).
        standby = CCService(t, "cluster01")  # polls like a DISABLED CC (no epoch: fences nothing)
        await standby.poll()
        cold = standby.describe_instances(None)
        assert [i["instance_id"] for i in cold["instances"]] == ["i-1"]
        assert cold["nodes"] == {"nc-0": "up", "nc-1": "lost"}
        res = await cc.handle("cc.run_instances", run_req("i-3"), epoch=1)
        assert res["instances"][0]["node"] == "nc-0"  # nothing goes to a lost NC
        term = await cc.handle("cc.terminate_instances", {"instance_ids": ["i-2"]}, epoch=1)
        assert term["instances"][0]["state"] == "lost"
        assert term["nodes"] == {"nc-0": "up", "nc-1": "lost"}
        # The cold CC never saw i-2: "terminated" without a node, and its NC lost (not a stop).
        cold_term = await standby.terminate_instances({"instance_ids": ["i-2"]}, 2)
        assert cold_term["instances"] == [
            {"instance_id": "i-2", "previous_state": "terminated", "state": "terminated"}
        ]
        assert cold_term["nodes"]["nc-1"] == "lost"
        with pytest.raises(CCError, match="IncorrectState"):
            await cc.handle(
                "cc.attach_volume", {"instance_id": "i-2", "volume_id": "vol-1", "device": "/dev/sdf"}, 1
            )
        t.down.clear()
        await cc.poll()
        got = {
            i["instance_id"]: i["state"]
            for i in (await cc.handle("cc.describe_instances", {}, epoch=1))["instances"]
        }
        assert got == {"i-1": "running", "i-2": "running", "i-3": "running"}

    asyncio.run(go())


def test_attach_detach_forwarded_to_the_instances_nc(tmp_path: Path) -> None:
    async def go() -> None:
        t = Transport(make_ncs(tmp_path, 2))
        cc = CCService(t, "cluster01")
        await cc.handle("cc.run_instances", run_req("i-1", "i-2"), epoch=1)
        body = {"instance_id": "i-2", "volume_id": "vol-1", "device": "/dev/sdf", "path": "/x"}
        res = await cc.handle("cc.attach_volume", body, epoch=1)
        assert res["node"] == "nc-1" and res["volumes"] == [
            {"volume_id": "vol-1", "device": "/dev/sdf", "path": "/x"}
        ]
        assert (await cc.handle("cc.attach_volume", body, epoch=1))["volumes"] == res["volumes"]  # idempotent
        desc = await CCService(t, "cluster01").handle("cc.describe_instances", {"instance_ids": ["i-2"]}, 2)
        assert desc["instances"][0]["volumes"][0]["volume_id"] == "vol-1"
        res = await cc.handle("cc.detach_volume", {"instance_id": "i-2", "volume_id": "vol-1"}, epoch=2)
        assert res["volumes"] == []
        with pytest.raises(CCError, match=r"InvalidInstanceID\.NotFound"):
            await cc.handle("cc.detach_volume", {"instance_id": "i-9", "volume_id": "vol-1"}, epoch=2)

    asyncio.run(go())


def test_nc_enforces_its_capacity_whatever_the_cc_believes(tmp_path: Path) -> None:
    async def go() -> None:
        nc = make_ncs(tmp_path, 1, cores=1)["nc-0"]
        run = nc.peer_handlers()["nc.run"]
        info = RequestInfo("nc.run", "t", 0.0)
        body = {"instance_id": "i-1", "instance_type": "t1.micro", "image_id": "emi-1"}
        first = await run(body, info)
        assert (await run(body, info)) == first  # idempotent
        with pytest.raises(RequestError) as err:
            await run({**body, "instance_id": "i-2"}, info)
        assert err.value.kind == "InsufficientInstanceCapacity"
        with pytest.raises(RequestError, match="InvalidParameterValue"):
            await run({**body, "instance_type": "nope"}, info)
        desc = await nc.peer_handlers()["describe"]({}, info)
        assert desc["cores"] == 1 and [i["instance_id"] for i in desc["instances"]] == ["i-1"]

    asyncio.run(go())


def test_process_driver_supervises_placeholders_and_survives_a_restart(tmp_path: Path) -> None:
    d = ProcessDriver(tmp_path)
    try:
        a = d.run(InstanceSpec("i-a", "m1.small", "emi-1", 1, 512, 10))
        b = d.run(InstanceSpec("i-b", "m1.small", "emi-1", 1, 512, 10))
        assert a.pid and proc_start_ticks(a.pid) == a.start_ticks
        assert d.run(InstanceSpec("i-a", "m1.small", "emi-1", 1, 512, 10)).pid == a.pid  # idempotent
        # A restarted NC (new driver over the same state dir) finds both running.
        d2 = ProcessDriver(tmp_path)
        assert {r.instance_id: r.state for r in d2.list()} == {"i-a": "running", "i-b": "running"}
        # A killed placeholder shows up as terminated, with the reason.
        assert b.pid is not None
        os.kill(b.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # the kernel takes a moment; the parent reaps it
            if {r.instance_id: r.state for r in d.list()}["i-b"] == "terminated":
                break
            time.sleep(0.01)
        recs = {r.instance_id: r for r in d2.list()}
        assert recs["i-b"].state == "terminated"
        assert recs["i-b"].reason == "instance process exited unexpectedly"
        assert recs["i-a"].state == "running"
        assert d.terminate("i-a") is not None
        assert d.terminate("i-a").state == "terminated"  # type: ignore[union-attr]
        assert proc_start_ticks(a.pid) is None
        assert d.terminate("i-never") is None
    finally:
        kill_placeholders(tmp_path)


def test_record_driver_and_options(tmp_path: Path) -> None:
    d = RecordDriver(tmp_path)
    d.run(InstanceSpec("i-1", "t1.micro", "emi-1", 1, 256, 5))
    d.attach("i-1", "vol-1", "/dev/sdf", "")
    assert [(r.instance_id, r.volumes[0]["volume_id"]) for r in RecordDriver(tmp_path).list()] == [
        ("i-1", "vol-1")
    ]
    assert check_options("nc", {"cores": 4, "driver": "record"}) == {"cores": 4, "driver": "record"}
    assert check_options("cc", {"poll_interval": 0.5}) == {"poll_interval": 0.5}
    for ctype, opts, msg in [
        ("nc", {"cores": 0}, "cores: must be an integer > 0"),
        ("nc", {"driver": "xen"}, "driver: must be one of process, record"),
        ("nc", {"gpus": 1}, "gpus: unknown option"),
        ("cc", {"poll_interval": -1}, "poll_interval: must be a number"),
        ("clc", {"x": 1}, "a clc takes no options"),
    ]:
        with pytest.raises(ValueError, match=msg):
            check_options(ctype, opts)
    cfg = tmp_path / "n.yaml"
    cfg.write_text(
        "node: n1\nlisten: 127.0.0.1:7100\nadmin: 127.0.0.1:7180\n"
        "data_dir: d\ntls: {ca: ca, cert: c, key: k}\nvoters: [n1]\n"
        "components:\n  - {type: nc, partition: c1, name: a, options: {cores: 2}}\n"
        "  - {type: nc, partition: c1, name: b, options: {driver: record}}\n"
    )
    loaded = load_config(cfg)
    assert [dict(c.options) for c in loaded.components] == [{"cores": 2}, {"driver": "record"}]
    cfg.write_text(cfg.read_text().replace("{cores: 2}", "{cores: two}"))
    with pytest.raises(ConfigError, match=r"components\[0\]\.options: cores: must be an integer"):
        load_config(cfg)
