"""The SQL adapters between the pure protocol cores and the store, and the store's `stamp`.

`Store.apply(..., stamp=E)` fences on the delivering primary's epoch: a catch-up replays
records that older primaries created, under the current primary's stamp (the
`ReplicaStore.append` contract of `euca_runtime.replication`). Without it, a backup whose
fence moved past an old epoch could never take those records in order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from euca_runtime.component import SqlReplicaStore, SqlVoterStorage
from euca_runtime.lease import LeaseConfig, LeaseRequest, Voter
from euca_runtime.replication import (
    ChainError,
    ChangeRecord,
    FencedError,
    MemoryReplicaStore,
    Replicate,
    ReplicationBackup,
    ReplicationPrimary,
)
from euca_runtime.store import ObjectCache, StaleEpoch, Store, StoreError, put_op, sqlite_url


def _kv(tmp_path: Path, name: str = "kv") -> Store:
    return Store.open(sqlite_url(tmp_path / f"{name}.db"), component="kv", group="kv")


def test_apply_fences_on_the_stamp_not_the_record_epoch(tmp_path: Path) -> None:
    store = _kv(tmp_path)
    store.raise_fence(5)
    with pytest.raises(StaleEpoch):
        store.apply(1, 1, [put_op("a", b"1")])  # no stamp: the record's epoch is the token
    store.apply(1, 1, [put_op("a", b"1")], stamp=5)  # epoch-1 record replayed by epoch-5 primary
    assert store.position().epoch == 1 and store.fence() == 5
    with pytest.raises(StaleEpoch):
        store.apply(1, 2, [put_op("b", b"2")], stamp=4)
    with pytest.raises(StoreError):
        store.apply(6, 2, [put_op("b", b"2")], stamp=5)  # a record from the future
    store.apply(5, 2, [put_op("b", b"2")], stamp=7)
    assert store.fence() == 7
    store.close()


def test_sql_replica_store_follows_the_replica_store_contract(tmp_path: Path) -> None:
    store = _kv(tmp_path)
    rs = SqlReplicaStore(store)
    assert (rs.fence_epoch, rs.last_seq, rs.last_epoch) == (0, 0, 0)
    assert rs.epoch_at(0) == 0 and rs.records_after(0, 10) == [] and rs.records_after(1, 10) is None
    rs.append(ChangeRecord(1, 1, 0, (put_op("a", b"1"),)), 1)
    rs.append(ChangeRecord(1, 2, 1, (put_op("b", b"2"),)), 3)
    with pytest.raises(ChainError):
        rs.append(ChangeRecord(3, 4, 1, (put_op("c", b"3"),)), 3)  # a gap
    with pytest.raises(ChainError):
        rs.append(ChangeRecord(3, 3, 2, (put_op("c", b"3"),)), 3)  # wrong prev_epoch
    with pytest.raises(FencedError):
        rs.append(ChangeRecord(1, 3, 1, (put_op("c", b"3"),)), 2)
    assert (rs.fence_epoch, rs.last_seq, rs.last_epoch) == (3, 2, 1)
    recs = rs.records_after(0, 10)
    assert recs is not None and [(r.seq, r.epoch, r.prev_epoch) for r in recs] == [(1, 1, 0), (2, 1, 1)]
    snap = rs.snapshot()
    assert (snap.seq, snap.epoch) == (2, 1)

    other = SqlReplicaStore(_kv(tmp_path, "other"))
    other.raise_fence(3)
    other.install(snap)
    assert (other.last_seq, other.last_epoch, other.fence_epoch) == (2, 1, 3)
    assert other.store.get_row("kv", "b")["value"] == b"2"
    store.close()
    other.store.close()


def test_primary_and_backup_over_sql_stores(tmp_path: Path) -> None:
    """The replication core runs unchanged over the SQL adapter: catch-up, then live writes."""
    a, b = _kv(tmp_path, "a"), _kv(tmp_path, "b")
    cache_b = ObjectCache(b, warm=True)
    pa, pb = SqlReplicaStore(a), SqlReplicaStore(b)
    primary = ReplicationPrimary("a", "kv", 2, pa, ["a", "b"], now=0.0)
    primary.on_in_sync_recorded({"a"})
    for i in range(5):
        primary.append([put_op(f"k{i}", b"v")], 0.0)
    backup = ReplicationBackup("b", "kv", pb)
    inbox = primary.tick(0.1)
    for _ in range(20):  # shuttle messages until quiet
        out = []
        for s in inbox:
            if s.to == "b":
                out += backup.handle(s.msg, 0.2)
            else:
                out += (
                    primary.on_ack(s.msg, 0.2)
                    if type(s.msg).__name__ == "ReplicateAck"
                    else primary.on_catch_up(s.msg, 0.2)
                )
        inbox = out
        if not inbox:
            break
    assert pb.last_seq == 5 and cache_b.get("kv", "k4")["value"] == b"v"
    assert isinstance(primary.tick(0.3)[0].msg, Replicate)
    a.close()
    b.close()


def test_voter_promises_persist_in_the_core_store(tmp_path: Path) -> None:
    core = Store.open(sqlite_url(tmp_path / "core.db"))
    cfg = LeaseConfig(duration=1.0)
    voter = Voter("v", SqlVoterStorage(core), cfg, now=0.0)
    reply = voter.handle(LeaseRequest("kv", "a.kv", 4, 1), 0.0)
    assert reply is not None and reply.granted
    again = Voter("v", SqlVoterStorage(core), cfg, now=10.0)
    assert again.view("kv", 10.0).promised == 4 and again.view("kv", 10.0).holder == "a.kv"
    core.close()


def test_memory_and_sql_stores_agree_on_epoch_at(tmp_path: Path) -> None:
    mem, sql = MemoryReplicaStore(), SqlReplicaStore(_kv(tmp_path))
    prev = 0
    for seq, epoch in enumerate([1, 1, 2, 2, 2, 5], start=1):
        rec = ChangeRecord(epoch, seq, prev, (put_op(f"k{seq}", b"v"),))
        mem.append(rec, epoch)
        sql.append(rec, epoch)
        prev = epoch
    assert [mem.epoch_at(s) for s in range(0, 8)] == [sql.epoch_at(s) for s in range(0, 8)]
    sql.store.close()
