"""The sc store component with its volume files: appliers, sparse files, snapshots as copies,
removals after commit, refusals with EC2 codes, divergent-suffix undo, snapshot installs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from euca_runtime.cluster.scstore import (
    GIB,
    VolumeFiles,
    register_files,
    snapshot_create_op,
    snapshot_delete_op,
    sparse_copy,
    unregister_files,
    volume_attach_op,
    volume_create_op,
    volume_delete_op,
    volume_detach_op,
)
from euca_runtime.store import Store, StoreError, sqlite_url


class Replica:
    """One sc replica: its store and volume files, applying records like the node does."""

    def __init__(self, root: Path, name: str) -> None:
        self.store = Store.open(sqlite_url(root / f"{name}.db"), component="sc", group="sc/c1")
        self.files = VolumeFiles(root / name)
        register_files(self.store.engine.url, self.files)
        self.store.add_listener(self._on_changes)
        self.seq = 0

    def _on_changes(self, ch: object) -> None:
        if ch.reset:  # type: ignore[attr-defined]
            self.files.forget_removals()
            self.files.reconcile(self.store.scan("sc_volume"), self.store.scan("sc_snapshot"))
        else:
            self.files.committed(ch.position.seq)  # type: ignore[attr-defined]

    def apply(self, *ops: dict, epoch: int = 1) -> None:
        self.seq += 1
        try:
            self.store.apply(epoch, self.seq, list(ops))
        except StoreError:
            self.seq -= 1
            raise

    def close(self) -> None:
        unregister_files(self.store.engine.url)
        self.store.close()


@pytest.fixture
def rep(tmp_path: Path) -> Iterator[Replica]:
    r = Replica(tmp_path, "a")
    try:
        yield r
    finally:
        r.close()


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_create_makes_a_sparse_file_of_the_size(rep: Replica) -> None:
    rep.apply(volume_create_op("vol-00000001", 2, None, 1.0))
    path = rep.files.volume_path("vol-00000001")
    assert path.stat().st_size == 2 * GIB
    assert _allocated(path) < 1 << 20  # sparse: nothing allocated
    row = rep.store.get_row("sc_volume", "vol-00000001")
    assert row is not None and row["size_gib"] == 2 and row["attach_instance"] is None


def test_snapshot_is_a_copy_keeping_data_and_holes(rep: Replica) -> None:
    rep.apply(volume_create_op("vol-00000001", 1, None, 1.0))
    vol = rep.files.volume_path("vol-00000001")
    with open(vol, "r+b") as fh:  # an instance wrote something in the middle
        fh.seek(GIB // 2)
        fh.write(b"hello volume")
    rep.apply(snapshot_create_op("snap-00000001", "vol-00000001", 1, 2.0))
    snap = rep.files.snapshot_path("snap-00000001")
    assert snap.stat().st_size == GIB
    with open(snap, "rb") as fh:
        fh.seek(GIB // 2)
        assert fh.read(12) == b"hello volume"
        fh.seek(0)
        assert fh.read(4096) == bytes(4096)
    assert _allocated(snap) < 4 << 20
    # A volume from the snapshot is a copy of it, grown to its own size.
    rep.apply(volume_create_op("vol-00000002", 3, "snap-00000001", 3.0))
    v2 = rep.files.volume_path("vol-00000002")
    assert v2.stat().st_size == 3 * GIB
    with open(v2, "rb") as fh:
        fh.seek(GIB // 2)
        assert fh.read(12) == b"hello volume"


def test_sparse_copy_of_a_file_with_several_extents(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as fh:
        os.ftruncate(fh.fileno(), 64 << 20)
        for off in (0, 10 << 20, (64 << 20) - 5):
            fh.seek(off)
            fh.write(b"12345")
    sparse_copy(src, dst, 64 << 20)
    assert src.read_bytes() == dst.read_bytes()


def test_attach_detach_and_delete_rules(rep: Replica) -> None:
    rep.apply(volume_create_op("vol-00000001", 1, None, 1.0))
    rep.apply(volume_attach_op("vol-00000001", "i-00000001", "/dev/sdf", "attaching", 5.0))
    with pytest.raises(StoreError, match="VolumeInUse"):
        rep.apply(volume_attach_op("vol-00000001", "i-00000002", "/dev/sdf", "attaching", 6.0))
    with pytest.raises(StoreError, match="VolumeInUse"):
        rep.apply(volume_delete_op("vol-00000001"))
    rep.apply(volume_attach_op("vol-00000001", "i-00000001", "/dev/sdf", "attached", 5.0))
    assert rep.store.get_row("sc_volume", "vol-00000001")["attach_status"] == "attached"  # type: ignore[index]
    rep.apply(volume_detach_op("vol-00000001"))
    rep.apply(volume_detach_op("vol-00000001"))  # idempotent
    rep.apply(volume_delete_op("vol-00000001"))
    assert not rep.files.volume_path("vol-00000001").exists()  # unlinked after the commit
    with pytest.raises(StoreError, match=r"InvalidVolume\.NotFound"):
        rep.apply(volume_delete_op("vol-00000001"))


def test_refusals_change_nothing(rep: Replica) -> None:
    rep.apply(volume_create_op("vol-00000001", 1, None, 1.0))
    for op, code in [
        (volume_create_op("vol-00000001", 1, None, 1.0), "InvalidVolume.Duplicate"),
        (volume_create_op("vol-00000002", 1, "snap-0000dead", 1.0), "InvalidSnapshot.NotFound"),
        (volume_create_op("vol-00000003", 0, None, 1.0), "InvalidParameterValue"),
        (snapshot_create_op("snap-00000001", "vol-0000dead", 1, 1.0), "InvalidVolume.NotFound"),
        (snapshot_delete_op("snap-0000dead"), "InvalidSnapshot.NotFound"),
    ]:
        with pytest.raises(StoreError, match=code.replace(".", r"\.")):
            rep.apply(op)
    assert rep.store.position().seq == 1
    assert sorted(p.name for p in rep.files.volumes.iterdir()) == ["vol-00000001"]
    assert not list(rep.files.snapshots.iterdir())


def test_divergent_suffix_undo_restores_rows_and_files(rep: Replica) -> None:
    rep.apply(volume_create_op("vol-00000001", 1, None, 1.0))
    rep.apply(volume_attach_op("vol-00000001", "i-00000001", "/dev/sdf", "attached", 2.0))
    # A deposed primary's suffix: detach, delete, a new volume and a snapshot.
    rep.apply(volume_detach_op("vol-00000001"), epoch=1)
    rep.apply(volume_delete_op("vol-00000001"), epoch=1)
    rep.apply(volume_create_op("vol-00000002", 1, None, 3.0), epoch=1)
    rep.apply(snapshot_create_op("snap-00000002", "vol-00000002", 1, 4.0), epoch=1)
    assert not rep.files.volume_path("vol-00000001").exists()
    rep.store.truncate_after(2)
    rep.seq = 2
    row = rep.store.get_row("sc_volume", "vol-00000001")
    assert row is not None and row["attach_instance"] == "i-00000001" and row["attach_status"] == "attached"
    assert rep.files.volume_path("vol-00000001").exists()
    assert rep.store.get_row("sc_volume", "vol-00000002") is None
    assert not rep.files.volume_path("vol-00000002").exists()
    assert not rep.files.snapshot_path("snap-00000002").exists()


def test_snapshot_install_reconciles_the_files(tmp_path: Path) -> None:
    a, b = Replica(tmp_path, "a"), Replica(tmp_path, "b")
    try:
        b.apply(volume_create_op("vol-000000bb", 1, None, 1.0))  # b's own (divergent) state
        a.apply(volume_create_op("vol-00000001", 1, None, 1.0))
        a.apply(snapshot_create_op("snap-00000001", "vol-00000001", 1, 2.0))
        a.apply(volume_create_op("vol-00000002", 2, "snap-00000001", 3.0))
        b.store.import_snapshot(list(a.store.export_snapshot()))
        assert sorted(p.name for p in b.files.volumes.iterdir()) == ["vol-00000001", "vol-00000002"]
        assert [p.name for p in b.files.snapshots.iterdir()] == ["snap-00000001"]
        assert b.files.volume_path("vol-00000002").stat().st_size == 2 * GIB
    finally:
        a.close()
        b.close()


def test_reconcile_removes_orphans_and_temporaries(rep: Replica) -> None:
    rep.apply(volume_create_op("vol-00000001", 1, None, 1.0))
    (rep.files.volumes / "vol-00000009").write_bytes(b"")  # from a rolled-back transaction
    (rep.files.snapshots / "snap-00000009.tmp").write_bytes(b"")
    rep.files.volume_path("vol-00000001").unlink()
    removed, made = rep.files.reconcile(rep.store.scan("sc_volume"), rep.store.scan("sc_snapshot"))
    assert (removed, made) == (2, 1)
    assert [p.name for p in rep.files.volumes.iterdir()] == ["vol-00000001"]
