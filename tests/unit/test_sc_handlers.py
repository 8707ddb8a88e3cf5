"""The sc bus methods over a real store (writes applied in place, as a lone primary would):
idempotent retries by id, attachment states, EC2 error codes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_fakes import REQ, LocalCtx

from euca_runtime.component import RequestError
from euca_runtime.services.sc import Sc


@pytest.fixture
def sc(tmp_path: Path) -> Iterator[Sc]:
    async def make() -> Sc:
        return Sc(LocalCtx(tmp_path, "sc", "c1", "sc"))

    comp = asyncio.run(make())
    try:
        yield comp
    finally:
        asyncio.run(comp.close())
        comp.ctx.close()  # type: ignore[attr-defined]


def call(sc: Sc, method: str, body: Any) -> Any:
    return asyncio.run(sc.handlers()[method](body, REQ))


def code_of(sc: Sc, method: str, body: Any) -> str:
    with pytest.raises(RequestError) as info:
        call(sc, method, body)
    return info.value.kind


def test_create_is_idempotent_by_id(sc: Sc) -> None:
    v = call(sc, "sc.create_volume", {"volume_id": "vol-00000001", "size_gib": 1, "snapshot_id": None})
    assert v["status"] == "available" and v["attachment"] is None and Path(v["path"]).exists()
    again = call(sc, "sc.create_volume", {"volume_id": "vol-00000001", "size_gib": 1, "snapshot_id": None})
    assert again == v and sc.ctx.writes == 1  # type: ignore[attr-defined]
    assert (
        code_of(sc, "sc.create_volume", {"volume_id": "vol-00000001", "size_gib": 2})
        == "InvalidVolume.Duplicate"
    )


def test_bad_parameters(sc: Sc) -> None:
    assert code_of(sc, "sc.create_volume", {"volume_id": "v-1", "size_gib": 1}) == "InvalidVolumeID.Malformed"
    assert code_of(sc, "sc.create_volume", {"volume_id": "vol-00000001"}) == "MissingParameter"
    assert (
        code_of(sc, "sc.create_volume", {"volume_id": "vol-00000001", "size_gib": 0})
        == "InvalidParameterValue"
    )
    assert (
        code_of(
            sc,
            "sc.create_volume",
            {"volume_id": "vol-00000001", "size_gib": 1, "snapshot_id": "snap-00000009"},
        )
        == "InvalidSnapshot.NotFound"
    )
    assert code_of(sc, "sc.delete_volume", {"volume_id": "vol-00000009"}) == "InvalidVolume.NotFound"


def test_attach_states_and_volume_in_use(sc: Sc) -> None:
    call(sc, "sc.create_volume", {"volume_id": "vol-00000001", "size_gib": 1})
    body = {"volume_id": "vol-00000001", "instance_id": "i-00000001", "device": "/dev/sdf"}
    v = call(sc, "sc.mark_attached", {**body, "status": "attaching"})
    assert v["status"] == "in-use" and v["attachment"]["status"] == "attaching"
    assert call(sc, "sc.mark_attached", body)["attachment"]["status"] == "attached"
    writes = sc.ctx.writes  # type: ignore[attr-defined]
    call(sc, "sc.mark_attached", body)  # a retry: no new write
    assert sc.ctx.writes == writes  # type: ignore[attr-defined]
    assert code_of(sc, "sc.mark_attached", {**body, "instance_id": "i-00000002"}) == "VolumeInUse"
    assert code_of(sc, "sc.delete_volume", {"volume_id": "vol-00000001"}) == "VolumeInUse"
    assert (
        code_of(sc, "sc.mark_detached", {"volume_id": "vol-00000001", "instance_id": "i-00000002"})
        == "IncorrectState"
    )
    v = call(sc, "sc.mark_detached", {"volume_id": "vol-00000001", "status": "detaching"})
    assert v["attachment"]["status"] == "detaching"
    assert code_of(sc, "sc.mark_attached", body) == "IncorrectState"
    v = call(sc, "sc.mark_detached", {"volume_id": "vol-00000001", "instance_id": "i-00000001"})
    assert v["status"] == "available" and v["attachment"] is None
    assert call(sc, "sc.mark_detached", {"volume_id": "vol-00000001"})["status"] == "available"
    assert call(sc, "sc.delete_volume", {"volume_id": "vol-00000001"}) == {
        "volume_id": "vol-00000001",
        "deleted": True,
    }
    assert call(sc, "sc.describe_volumes", {"volume_ids": None}) == {"volumes": []}


def test_snapshots(sc: Sc) -> None:
    call(sc, "sc.create_volume", {"volume_id": "vol-00000001", "size_gib": 2})
    s = call(sc, "sc.create_snapshot", {"snapshot_id": "snap-00000001", "volume_id": "vol-00000001"})
    assert s["status"] == "completed" and s["size_gib"] == 2 and s["progress"] == "100%"
    assert call(sc, "sc.create_snapshot", {"snapshot_id": "snap-00000001", "volume_id": "vol-00000001"}) == s
    assert (
        code_of(sc, "sc.create_snapshot", {"snapshot_id": "snap-00000002", "volume_id": "vol-00000009"})
        == "InvalidVolume.NotFound"
    )
    v = call(
        sc, "sc.create_volume", {"volume_id": "vol-00000002", "size_gib": 3, "snapshot_id": "snap-00000001"}
    )
    assert v["snapshot_id"] == "snap-00000001" and v["size_gib"] == 3
    assert (
        code_of(
            sc,
            "sc.create_volume",
            {"volume_id": "vol-00000003", "size_gib": 1, "snapshot_id": "snap-00000001"},
        )
        == "InvalidParameterValue"
    )
    listed = call(sc, "sc.describe_snapshots", {"snapshot_ids": ["snap-00000001", "snap-00000009"]})
    assert [x["snapshot_id"] for x in listed["snapshots"]] == ["snap-00000001"]
    call(sc, "sc.delete_snapshot", {"snapshot_id": "snap-00000001"})
    assert code_of(sc, "sc.delete_snapshot", {"snapshot_id": "snap-00000001"}) == "InvalidSnapshot.NotFound"
    vols = call(sc, "sc.describe_volumes", {"volume_ids": ["vol-00000002"]})["volumes"]
    assert [x["volume_id"] for x in vols] == ["vol-00000002"]
