"""Replication: ordered apply, fencing, gaps, catch-up, state transfer, divergent suffix, in-sync."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from euca_runtime import replication
from euca_runtime.replication import (
    CatchUpRequest,
    ChainError,
    ChangeRecord,
    Fenced,
    FencedError,
    MemoryReplicaStore,
    NotReadyError,
    Replicate,
    ReplicateAck,
    ReplicationBackup,
    ReplicationConfig,
    ReplicationPrimary,
    Send,
    SnapshotChunk,
    SnapshotPull,
    kv_put,
)

G = "kv"
CFG = ReplicationConfig(batch=8, join_lag=4, drop_after=1.0, catch_up_retry=0.5)


def rec(seq: int, epoch: int, prev: int, key: str | None = None) -> ChangeRecord:
    return ChangeRecord(epoch, seq, prev, (kv_put(key or f"k{seq}", seq),))


def ready_primary(store: MemoryReplicaStore | None = None, epoch: int = 1, members: Any = ("a", "b")):
    p = ReplicationPrimary("a", G, epoch, store or MemoryReplicaStore(), members, CFG, now=0.0)
    assert p.next_in_sync_proposal(0.0) == {"a"}
    p.on_in_sync_recorded({"a"})
    assert p.ready
    return p


def only(sends: list[Send], kind: type) -> list[Any]:
    return [s.msg for s in sends if isinstance(s.msg, kind)]


def pump(
    primary: ReplicationPrimary, backup: ReplicationBackup, sends: list[Send], now: float, limit: int = 200
) -> None:
    """Deliver messages between one primary and one backup until quiet (a perfect network)."""
    queue = list(sends)
    for _ in range(limit):
        if not queue:
            return
        s = queue.pop(0)
        if s.to == backup.name:
            queue += backup.handle(s.msg, now)
        elif isinstance(s.msg, ReplicateAck):
            queue += primary.on_ack(s.msg, now)
        elif isinstance(s.msg, CatchUpRequest):
            queue += primary.on_catch_up(s.msg, now)
        elif isinstance(s.msg, SnapshotPull):
            queue += primary.on_pull(s.msg, now)
    raise AssertionError("messages kept flowing")


# --------------------------------------------------------------------------- the store


def test_store_appends_in_order_with_fence_and_chain() -> None:
    s = MemoryReplicaStore()
    s.append(rec(1, 1, 0), 1)
    s.append(rec(2, 2, 1), 2)
    assert (s.last_seq, s.last_epoch, s.fence_epoch) == (2, 2, 2)
    with pytest.raises(ChainError):
        s.append(rec(4, 2, 2), 2)  # gap
    with pytest.raises(ChainError):
        s.append(rec(3, 2, 1), 2)  # prev_epoch does not match
    with pytest.raises(FencedError):
        s.append(rec(3, 1, 2), 1)  # delivered under an older epoch than the fence
    with pytest.raises(ChainError):
        s.append(rec(3, 5, 2), 3)  # a record from the future
    assert s.state == {"k1": 1, "k2": 2}


def test_store_catch_up_may_replay_older_epochs_under_a_newer_stamp() -> None:
    s = MemoryReplicaStore()
    s.raise_fence(5)
    s.append(rec(1, 1, 0), 5)  # created at epoch 1, delivered by the primary of epoch 5
    assert s.epoch_at(1) == 1 and s.fence_epoch == 5


def test_store_compaction_and_snapshot() -> None:
    s = MemoryReplicaStore(retention=3)
    for i in range(1, 7):
        s.append(rec(i, 1, 0 if i == 1 else 1), 1)
    assert s.records_after(2, 10) is None
    assert [r.seq for r in s.records_after(3, 10) or []] == [4, 5, 6]
    assert s.epoch_at(3) == 1 and s.epoch_at(2) is None and s.epoch_at(7) is None
    snap = s.snapshot()
    other = MemoryReplicaStore()
    other.install(snap)
    assert other.state == s.state and (other.last_seq, other.last_epoch) == (6, 1)
    other.state["k1"] = "changed"
    assert s.state["k1"] == 1  # snapshots are copies


def test_kv_machine_rejects_unknown_ops() -> None:
    s = MemoryReplicaStore()
    s.append(ChangeRecord(1, 1, 0, ({"op": "put", "key": "x", "value": 1}, {"op": "delete", "key": "x"})), 1)
    assert s.state == {}
    with pytest.raises(ValueError):
        s.append(ChangeRecord(1, 2, 1, ({"op": "frobnicate"},)), 1)


# --------------------------------------------------------------------------- primary


def test_primary_needs_its_in_sync_set_recorded_first() -> None:
    store = MemoryReplicaStore()
    p = ReplicationPrimary("a", G, 3, store, ["a", "b"], CFG, now=0.0)
    assert store.fence_epoch == 3
    with pytest.raises(NotReadyError):
        p.append([kv_put("x", 1)], 0.0)
    assert p.next_in_sync_proposal(0.0) == {"a"}
    assert p.next_in_sync_proposal(0.0) is None  # one proposal at a time
    p.on_in_sync_recorded({"a"})
    rec1, _ = p.append([kv_put("x", 1)], 0.0)
    assert rec1 == ChangeRecord(3, 1, 0, (kv_put("x", 1),))
    assert p.commit_seq == 1  # no backup in sync: committed at once


def test_primary_refuses_an_epoch_below_the_store_fence() -> None:
    store = MemoryReplicaStore()
    store.raise_fence(7)
    with pytest.raises(FencedError):
        ReplicationPrimary("a", G, 6, store, ["a"], CFG)


def test_backup_joins_then_every_write_waits_for_it() -> None:
    p = ready_primary()
    bstore = MemoryReplicaStore()
    b = ReplicationBackup("b", G, bstore, CFG)
    for i in range(3):
        p.append([kv_put(f"k{i}", i)], 0.0)
    pump(p, b, p.tick(0.1), 0.1)
    assert bstore.state == {"k0": 0, "k1": 1, "k2": 2}
    assert "b" in p.joined and p.lag("b") == 0
    assert p.next_in_sync_proposal(0.2) == {"a", "b"}
    p.on_in_sync_recorded({"a", "b"})
    assert p.recorded == {"a", "b"} and not p.joined
    rec4, sends = p.append([kv_put("k3", 3)], 0.3)
    assert p.commit_seq == 3  # waits for b
    assert only(sends, Replicate)[0].records == (rec4,)
    acks = b.handle(sends[0].msg, 0.31)
    assert only(acks, ReplicateAck) == [ReplicateAck(G, "b", 1, 4)]
    p.on_ack(acks[0].msg, 0.32)
    assert p.commit_seq == 4


def test_acks_from_another_epoch_or_stranger_do_not_count() -> None:
    p = ready_primary()
    p.on_in_sync_recorded({"a", "b"})
    p.append([kv_put("x", 1)], 0.0)
    p.on_ack(ReplicateAck(G, "b", 2, 1), 0.1)
    p.on_ack(ReplicateAck(G, "zz", 1, 1), 0.1)
    assert p.commit_seq == 0
    p.on_ack(ReplicateAck(G, "b", 1, 1), 0.1)
    assert p.commit_seq == 1


def test_lagging_backup_is_dropped_only_after_the_voters_recorded_it() -> None:
    p = ready_primary()
    p.on_in_sync_recorded({"a", "b"})
    p.append([kv_put("x", 1)], 10.0)
    assert p.next_in_sync_proposal(10.5) is None  # not yet: drop_after is 1 s
    proposal = p.next_in_sync_proposal(11.0)
    assert proposal == {"a"}
    # Until the voters have recorded it, the write stays unacknowledged.
    p.append([kv_put("y", 2)], 11.1)
    p.tick(11.2)
    assert p.commit_seq == 0 and "b" in p.required()
    done = p.on_in_sync_recorded({"a"})
    assert done == [1, 2] and p.commit_seq == 2 and p.required() == set()


def test_primary_streams_more_after_each_ack_and_resends_on_tick() -> None:
    p = ready_primary()
    store_b = MemoryReplicaStore()
    b = ReplicationBackup("b", G, store_b, CFG)
    pump(p, b, p.tick(0.0), 0.0)  # b syncs at seq 0
    for i in range(20):
        p.append([kv_put(f"k{i}", i)], 1.0)  # all lost on the way
    assert only(p.tick(1.1), Replicate)[0].records == ()  # in flight: not resent yet
    pump(p, b, p.tick(1.0 + CFG.resend_after), 1.0 + CFG.resend_after)
    assert store_b.last_seq == 20 and p.lag("b") == 0


def test_deregistered_member_is_dropped() -> None:
    p = ready_primary()
    p.on_in_sync_recorded({"a", "b"})
    p.set_members(["a"], 1.0)
    assert p.next_in_sync_proposal(1.0) == {"a"}
    assert p.lag("b") is None


# --------------------------------------------------------------------------- backup


def replicate(epoch: int, records: list[ChangeRecord], last: tuple[int, int] | None = None) -> Replicate:
    if last is None:
        last = (records[-1].seq, records[-1].epoch) if records else (0, 0)
    return Replicate(G, "p", epoch, tuple(records), last[0], last[1], 0)


def test_backup_applies_in_order_and_acks() -> None:
    bstore = MemoryReplicaStore()
    b = ReplicationBackup("b", G, bstore, CFG)
    out = b.handle(replicate(1, [rec(1, 1, 0), rec(2, 1, 1)]), 0.0)
    assert only(out, ReplicateAck) == [ReplicateAck(G, "b", 1, 2)]
    assert bstore.state == {"k1": 1, "k2": 2} and b.last_heard == 0.0


def test_backup_fences_lower_epochs_and_raises_for_higher() -> None:
    store = MemoryReplicaStore()
    b = ReplicationBackup("b", G, store, CFG)
    b.handle(replicate(3, [rec(1, 3, 0)]), 0.0)
    assert store.fence_epoch == 3
    out = b.handle(replicate(2, [rec(2, 2, 3)]), 0.1)
    assert only(out, Fenced) == [Fenced(G, "b", 3)]
    assert store.last_seq == 1
    snap = SnapshotChunk(G, "p", 2, 1, 3, 1, 0, 5, 2, {"pairs": []}, True)
    assert only(b.handle(snap, 0.2), Fenced) == [Fenced(G, "b", 3)]
    b.handle(replicate(4, [], last=(0, 0)), 0.3)  # heartbeat of a newer primary
    assert store.fence_epoch == 4


def test_backup_buffers_a_gap_asks_for_catch_up_and_fills_it() -> None:
    b = ReplicationBackup("b", G, MemoryReplicaStore(), CFG)
    b.handle(replicate(1, [rec(1, 1, 0)]), 0.0)
    out = b.handle(replicate(1, [rec(3, 1, 1)]), 0.1)
    assert only(out, CatchUpRequest) == [CatchUpRequest(G, "b", 1, 1, 1)]
    assert only(out, ReplicateAck) == [ReplicateAck(G, "b", 1, 1)]
    # The same gap does not cause a request storm, but it is repeated after the retry interval.
    assert only(b.handle(replicate(1, [rec(4, 1, 1)]), 0.2), CatchUpRequest) == []
    assert only(b.handle(replicate(1, [rec(4, 1, 1)]), 0.7), CatchUpRequest) != []
    out = b.handle(replicate(1, [rec(2, 1, 1)]), 0.8)
    assert b.store.last_seq == 4
    assert only(out, ReplicateAck) == [ReplicateAck(G, "b", 1, 4)]


def test_duplicates_are_acked_not_reapplied() -> None:
    b = ReplicationBackup("b", G, MemoryReplicaStore(), CFG)
    msg = replicate(1, [rec(1, 1, 0), rec(2, 1, 1)])
    b.handle(msg, 0.0)
    out = b.handle(msg, 0.1)
    assert only(out, ReplicateAck) == [ReplicateAck(G, "b", 1, 2)] and b.store.last_seq == 2


def test_restarted_backup_resyncs_from_a_heartbeat() -> None:
    store = MemoryReplicaStore()
    ReplicationBackup("b", G, store, CFG).handle(replicate(1, [rec(1, 1, 0)]), 0.0)
    b = ReplicationBackup("b", G, store, CFG)  # volatile state lost
    out = b.handle(replicate(1, [], last=(1, 1)), 5.0)
    assert only(out, ReplicateAck) == [ReplicateAck(G, "b", 1, 1)]
    behind = ReplicationBackup("b", G, store, CFG).handle(replicate(1, [], last=(3, 1)), 5.0)
    assert only(behind, CatchUpRequest) == [CatchUpRequest(G, "b", 1, 1, 1)]


def test_catch_up_from_the_log_when_the_position_is_a_prefix() -> None:
    p = ready_primary(members=("a", "b"))
    for i in range(5):
        p.append([kv_put(f"k{i}", i)], 0.0)
    out = p.on_catch_up(CatchUpRequest(G, "b", 1, 2, 1), 0.1)
    (msg,) = only(out, Replicate)
    assert [r.seq for r in msg.records] == [3, 4, 5]


def test_catch_up_beyond_the_retained_log_is_a_state_transfer() -> None:
    store = MemoryReplicaStore(retention=2)
    p = ready_primary(store)
    for i in range(6):
        p.append([kv_put(f"k{i}", i)], 0.0)
    bstore = MemoryReplicaStore()
    b = ReplicationBackup("b", G, bstore, CFG)
    pump(p, b, p.tick(0.1), 0.1)
    assert bstore.state == store.state and bstore.last_seq == 6
    assert p.lag("b") == 0


def test_divergent_suffix_of_a_deposed_primary_is_discarded() -> None:
    # Old primary "b" (epoch 1) wrote seq 1..3; only seq 1..2 reached "a".
    old = MemoryReplicaStore()
    for r in (rec(1, 1, 0), rec(2, 1, 1), rec(3, 1, 1, key="lost")):
        old.append(r, 1)
    new = MemoryReplicaStore()
    new.append(rec(1, 1, 0), 1)
    new.append(rec(2, 1, 1), 1)
    # "a" takes over at epoch 2 and writes its own seq 3 and 4.
    p = ready_primary(new, epoch=2, members=("a", "b"))
    p.append([kv_put("new3", 3)], 0.0)
    p.append([kv_put("new4", 4)], 0.0)
    b = ReplicationBackup("b", G, old, CFG)
    # b's record 3 (epoch 1) is not in a's history: prev_epoch mismatch, catch-up, state transfer.
    first = b.handle(replicate(2, [new.records_after(3, 1)[0]], last=(4, 2)), 0.1)  # type: ignore[index]
    assert only(first, CatchUpRequest) == [CatchUpRequest(G, "b", 2, 3, 1)]
    pump(p, b, first, 0.1)
    assert "lost" not in old.state
    assert old.state == new.state and (old.last_seq, old.last_epoch) == (4, 2)
    assert p.lag("b") == 0


def test_divergent_longer_suffix_is_discarded_too() -> None:
    old = MemoryReplicaStore()
    for r in (rec(1, 1, 0), rec(2, 1, 1), rec(3, 1, 1), rec(4, 1, 1)):
        old.append(r, 1)
    new = MemoryReplicaStore()
    new.append(rec(1, 1, 0), 1)
    p = ready_primary(new, epoch=2)
    b = ReplicationBackup("b", G, old, CFG)
    pump(p, b, p.tick(0.0), 0.0)  # heartbeat at (1, 1): b is ahead, so not a prefix
    assert old.state == {"k1": 1} and old.last_seq == 1


def test_stale_or_duplicated_state_transfer_is_ignored() -> None:
    store = MemoryReplicaStore()
    b = ReplicationBackup("b", G, store, CFG)
    b.handle(replicate(1, [rec(1, 1, 0), rec(2, 1, 1)]), 0.0)
    stale = SnapshotChunk(G, "p", 1, 0, 0, 1, 0, 1, 1, {"pairs": [["k1", 1]]}, True)
    assert b.handle(stale, 0.1) == []
    assert store.last_seq == 2
    fresh = SnapshotChunk(G, "p", 1, 2, 1, 2, 0, 5, 1, {"pairs": [["x", 1]]}, True)
    assert only(b.handle(fresh, 0.2), ReplicateAck) == [ReplicateAck(G, "b", 1, 5)]
    assert b.handle(fresh, 0.3) == []  # its duplicate no longer matches our position
    assert store.state == {"x": 1}


def test_primary_rate_limits_repeated_state_transfers() -> None:
    p = ready_primary(MemoryReplicaStore(retention=1))
    for i in range(3):
        p.append([kv_put(f"k{i}", i)], 0.0)
    ask = CatchUpRequest(G, "b", 1, 0, 0)
    (first,) = only(p.on_catch_up(ask, 1.0), SnapshotChunk)
    assert p.on_catch_up(ask, 1.1) == []
    assert only(p.on_catch_up(ask, 1.6), SnapshotChunk) == [first]  # the lost first chunk, again


# --------------------------------------------------------------------------- chunked state transfer


def transfer_setup(
    keys: int = 10, items: int = 3, retention: int = 2
) -> tuple[ReplicationPrimary, MemoryReplicaStore, ReplicationBackup]:
    """A primary whose log no longer covers seq 0 and an empty backup: catch-up is a transfer."""
    pstore = MemoryReplicaStore(retention=retention, chunk_items=items)
    p = ready_primary(pstore)
    for i in range(keys):
        p.append([kv_put(f"k{i}", i)], 0.0)
    return p, pstore, ReplicationBackup("b", G, MemoryReplicaStore(), CFG)


def test_state_transfer_streams_chunks_pulled_one_at_a_time() -> None:
    p, pstore, b = transfer_setup(keys=10, items=3)
    sends = b.handle(replicate(1, [], last=(10, 1)), 0.1)
    (ask,) = only(sends, CatchUpRequest)
    (chunk,) = only(p.on_catch_up(ask, 0.1), SnapshotChunk)
    seen = []
    while True:
        assert chunk.epoch == 1 and (chunk.seq, chunk.snap_epoch) == (10, 1)
        seen.append(chunk.index)
        out = b.handle(chunk, 0.2)
        if chunk.last:
            break
        # Atomic: nothing is visible (state, position) before the last chunk, nothing is acked.
        assert b.store.state == {} and b.position == (0, 0) and only(out, ReplicateAck) == []
        assert b.transfer == (chunk.index + 1, 10)
        (pull,) = only(out, SnapshotPull)
        assert (pull.transfer, pull.index) == (chunk.transfer, chunk.index + 1)
        (chunk,) = only(p.on_pull(pull, 0.2), SnapshotChunk)
    assert seen == [0, 1, 2, 3]  # 10 keys in chunks of 3
    assert only(out, ReplicateAck) == [ReplicateAck(G, "b", 1, 10)]
    assert b.store.state == pstore.state and b.position == (10, 1) and b.transfer is None
    p.on_ack(only(out, ReplicateAck)[0], 0.3)
    assert p.transfers == {} and p.lag("b") == 0


def test_snapshot_is_consistent_and_the_log_follows_from_its_seq() -> None:
    p, pstore, b = transfer_setup(keys=10, items=3, retention=5)
    (ask,) = only(b.handle(replicate(1, [], last=(10, 1)), 0.1), CatchUpRequest)
    queue = p.on_catch_up(ask, 0.1)
    writes = 0
    for _ in range(100):  # writes continue during the transfer (not delivered to b directly)
        if not queue:
            break
        s = queue.pop(0)
        if s.to == "b":
            if isinstance(s.msg, SnapshotChunk) and writes < 3:
                p.append([kv_put(f"late{writes}", writes)], 0.2)
                writes += 1
            queue += b.handle(s.msg, 0.2)
        elif isinstance(s.msg, SnapshotPull):
            queue += p.on_pull(s.msg, 0.2)
        elif isinstance(s.msg, ReplicateAck):
            queue += p.on_ack(s.msg, 0.2)
    assert b.position == (13, 1) and b.store.state == pstore.state
    assert {"late0", "late1", "late2"} <= set(b.store.state)


def test_lost_chunk_is_pulled_again_after_the_retry_interval() -> None:
    p, pstore, b = transfer_setup()
    (ask,) = only(b.handle(replicate(1, [], last=(10, 1)), 0.0), CatchUpRequest)
    (c0,) = only(p.on_catch_up(ask, 0.0), SnapshotChunk)
    (pull,) = only(b.handle(c0, 0.0), SnapshotPull)
    p.on_pull(pull, 0.0)  # chunk 1 is lost on the way
    assert b.handle(replicate(1, [], last=(10, 1)), 0.2) == []  # heartbeats: no records applied, no ack
    (again,) = only(b.handle(replicate(1, [], last=(10, 1)), 0.6), SnapshotPull)
    assert again == pull
    (c1,) = only(p.on_pull(again, 0.6), SnapshotChunk)
    assert c1.index == 1
    assert b.handle(c1, 0.7) and b.handle(c1, 0.7) == []  # the duplicate is ignored
    pump(p, b, b.handle(replicate(1, [], last=(10, 1)), 1.4), 1.4)
    assert b.store.state == pstore.state and b.position == (10, 1)


def test_stalled_transfer_is_abandoned_and_restarted_from_scratch() -> None:
    p, pstore, b = transfer_setup()
    (ask,) = only(b.handle(replicate(1, [], last=(10, 1)), 0.0), CatchUpRequest)
    (c0,) = only(p.on_catch_up(ask, 0.0), SnapshotChunk)
    b.handle(c0, 0.0)  # its pull is lost, and every re-pull too
    timeout = CFG.transfer_timeout
    assert only(b.handle(replicate(1, [], last=(10, 1)), timeout - 0.1), SnapshotPull)
    (ask2,) = only(b.handle(replicate(1, [], last=(10, 1)), timeout + 0.1), CatchUpRequest)
    assert b.transfer is None and b.position == (0, 0) and b.store.state == {}
    (n0,) = only(p.on_catch_up(ask2, timeout + 0.1), SnapshotChunk)
    assert n0.transfer != c0.transfer and n0.index == 0
    pump(p, b, b.handle(n0, timeout + 0.2), timeout + 0.2)
    assert b.store.state == pstore.state


def test_primary_closes_an_abandoned_transfer() -> None:
    p, _, b = transfer_setup()
    (ask,) = only(b.handle(replicate(1, [], last=(10, 1)), 0.0), CatchUpRequest)
    p.on_catch_up(ask, 0.0)
    assert p.transfers == {"b": (1, 10)}
    p.tick(CFG.transfer_timeout / 2)
    assert p.transfers
    p.tick(CFG.transfer_timeout + 0.1)
    assert p.transfers == {}
    p.on_catch_up(ask, 20.0)
    p.close()  # step-down releases every open snapshot
    assert p.transfers == {}


def test_failover_mid_transfer_aborts_it_and_the_new_primary_starts_over() -> None:
    p, pstore, b = transfer_setup()
    (ask,) = only(b.handle(replicate(1, [], last=(10, 1)), 0.0), CatchUpRequest)
    (c0,) = only(p.on_catch_up(ask, 0.0), SnapshotChunk)
    (pull,) = only(b.handle(c0, 0.0), SnapshotPull)
    (c1,) = only(p.on_pull(pull, 0.0), SnapshotChunk)
    # The primary dies; "c" (which had everything) takes over at epoch 2.
    cstore = MemoryReplicaStore(retention=2, chunk_items=3)
    cstore.install(pstore.snapshot())
    p2 = ReplicationPrimary("c", G, 2, cstore, ["b", "c"], CFG, now=1.0)
    p2.next_in_sync_proposal(1.0)
    p2.on_in_sync_recorded({"c"})
    p2.append([kv_put("after", 1)], 1.0)
    out = b.handle(Replicate(G, "c", 2, (), 11, 2, 11), 1.0)
    assert b.transfer is None and b.store.fence_epoch == 2 and b.store.state == {}
    # The old primary's chunk arrives late: fenced, nothing applied.
    assert only(b.handle(c1, 1.1), Fenced) == [Fenced(G, "b", 2)]
    assert b.store.state == {} and b.position == (0, 0)
    (ask2,) = only(out, CatchUpRequest)
    assert ask2.epoch == 2
    pump(p2, b, p2.on_catch_up(ask2, 1.1), 1.1)
    assert b.store.state == cstore.state and b.position == (11, 2) and b.synced_epoch == 2


def test_bad_chunk_aborts_the_transfer_and_it_is_asked_again() -> None:
    p, pstore, b = transfer_setup()
    (ask,) = only(b.handle(replicate(1, [], last=(10, 1)), 0.0), CatchUpRequest)
    (c0,) = only(p.on_catch_up(ask, 0.0), SnapshotChunk)
    bad = SnapshotChunk(G, "p", 1, 0, 0, c0.transfer, 0, 10, 1, {"garbage": 1}, False)
    assert b.handle(bad, 0.0) == [] and b.transfer is None and b.store.state == {}
    (ask2,) = only(b.handle(replicate(1, [], last=(10, 1)), 0.1), CatchUpRequest)
    assert ask2 == ask
    pump(p, b, p.on_catch_up(ask2, 0.7), 0.7)
    assert b.store.state == pstore.state


# --------------------------------------------------------------------------- codec


# --------------------------------------------------------------------------- early send, batches


class FailingCommitStore(MemoryReplicaStore):
    """A store whose commit fails after the record was checked and its ops applied."""

    fail = False

    def append(self, record: ChangeRecord, stamp: int, before_commit: Any = None) -> None:
        if not self.fail:
            super().append(record, stamp, before_commit)
            return
        if before_commit is not None:
            before_commit()
        raise OSError("disk full")


def in_sync_pair(store: MemoryReplicaStore | None = None) -> tuple[ReplicationPrimary, ReplicationBackup]:
    p = ready_primary(store)
    b = ReplicationBackup("b", G, MemoryReplicaStore(), CFG)
    pump(p, b, p.tick(0.0), 0.0)
    assert p.next_in_sync_proposal(0.0) == {"a", "b"}
    p.on_in_sync_recorded({"a", "b"})
    return p, b


def test_early_send_goes_out_before_the_local_commit_and_commits_after_both() -> None:
    p, b = in_sync_pair()
    seen: list[tuple[int, list[Send]]] = []
    r, rest = p.append(
        [kv_put("x", 1), kv_put("y", 2)], 1.0, early=lambda s: seen.append((p.store.last_seq, s))
    )
    assert rest == []
    assert len(seen) == 1 and seen[0][0] == 0  # sent while the primary had not committed seq 1
    msg = only(seen[0][1], Replicate)[0]
    assert msg.records == (r,) and (msg.last_seq, msg.last_epoch) == (1, 1)
    assert p.commit_seq == 0  # durable here, but not yet at the in-sync backup
    acks = b.handle(msg, 1.01)
    assert b.store.state == {"x": 1, "y": 2}  # one record: both writes in one apply
    p.on_ack(acks[0].msg, 1.02)
    assert p.commit_seq == 1


def test_a_bad_op_fails_before_anything_is_sent() -> None:
    p, _ = in_sync_pair()
    seen: list[list[Send]] = []
    with pytest.raises(ValueError, match="unknown op"):
        p.append([kv_put("x", 1), {"op": "nope"}], 1.0, early=seen.append)
    assert seen == [] and p.ready and p.store.last_seq == 0
    r, _ = p.append([kv_put("x", 1)], 1.1, early=seen.append)
    assert r.seq == 1 and len(seen) == 1  # the seq is reused: nobody saw the failed record


def test_commit_failure_after_the_early_send_retires_the_primary() -> None:
    store = FailingCommitStore()
    p, b = in_sync_pair(store)
    store.fail = True
    seen: list[list[Send]] = []
    with pytest.raises(OSError):
        p.append([kv_put("x", 1)], 1.0, early=seen.append)
    assert p.failed and not p.ready and p.commit_seq == 0
    with pytest.raises(NotReadyError):  # seq 1 of this epoch may exist at a backup: never reuse it
        p.append([kv_put("other", 2)], 1.1, early=seen.append)
    b.handle(only(seen[0], Replicate)[0], 1.0)
    assert b.store.state == {"x": 1}  # the backup has a record that was never acknowledged


def test_unacknowledged_record_only_at_the_backup_is_kept_or_discarded_safely() -> None:
    """The primary's early send reached the backup, then the primary died before its commit."""
    # (a) the backup takes over at epoch 2: the old primary rejoins and simply catches up.
    old_a = MemoryReplicaStore()
    b_store = MemoryReplicaStore()
    b_store.append(rec(1, 1, 0, key="early"), 1)
    pb = ReplicationPrimary("b", G, 2, b_store, ("a", "b"), CFG, now=0.0)
    pb.next_in_sync_proposal(0.0)
    pb.on_in_sync_recorded({"b"})
    rejoin = ReplicationBackup("a", G, old_a, CFG)
    pump_named(pb, rejoin, pb.tick(0.1), 0.1)
    assert old_a.state == {"early": 1} and pb.lag("a") == 0
    # (b) the old primary wins epoch 2 instead and writes its own seq 1: the backup's record is
    # a divergent suffix, discarded by state transfer; it was never acknowledged to anyone.
    a_store = MemoryReplicaStore()
    b_store2 = MemoryReplicaStore()
    b_store2.append(rec(1, 1, 0, key="early"), 1)
    pa = ready_primary(a_store, epoch=2)
    pa.append([kv_put("mine", 1)], 0.0)
    b2 = ReplicationBackup("b", G, b_store2, CFG)
    pump(pa, b2, pa.tick(0.1), 0.1)
    assert b_store2.state == {"mine": 1} and (b_store2.last_seq, b_store2.last_epoch) == (1, 2)


def pump_named(primary: ReplicationPrimary, backup: ReplicationBackup, sends: list[Send], now: float) -> None:
    """`pump` for a pair whose names are not the default ones."""
    queue = list(sends)
    for _ in range(200):
        if not queue:
            return
        s = queue.pop(0)
        if s.to == backup.name:
            queue += backup.handle(s.msg, now)
        elif isinstance(s.msg, ReplicateAck):
            queue += primary.on_ack(s.msg, now)
        elif isinstance(s.msg, CatchUpRequest):
            queue += primary.on_catch_up(s.msg, now)
    raise AssertionError("messages kept flowing")


def test_a_batch_applied_only_in_part_is_acknowledged_only_up_to_its_last_applied_record() -> None:
    bstore = MemoryReplicaStore()
    b = ReplicationBackup("b", G, bstore, CFG)
    b.handle(replicate(1, [rec(1, 1, 0)]), 0.0)
    bad = ChangeRecord(1, 3, 1, ({"op": "nope"},))
    with pytest.raises(ValueError):
        b.handle(replicate(1, [rec(2, 1, 1), bad, rec(4, 1, 1)]), 0.1)
    assert bstore.last_seq == 2  # records are applied one transaction each, in order
    acks = only(b.handle(replicate(1, [], last=(4, 1)), 0.2), ReplicateAck)
    assert [a.seq for a in acks] == [2]  # never more than what is durably applied


def test_fencing_rejects_a_whole_batch_from_an_old_epoch() -> None:
    bstore = MemoryReplicaStore()
    b = ReplicationBackup("b", G, bstore, CFG)
    b.handle(replicate(3, [rec(1, 3, 0)]), 0.0)
    out = b.handle(replicate(2, [rec(2, 2, 3), rec(3, 2, 2), rec(4, 2, 2)]), 0.1)
    assert [s.msg for s in out] == [Fenced(G, "b", 3)]
    assert bstore.last_seq == 1 and bstore.state == {"k1": 1}


def test_codec_roundtrip() -> None:
    r = rec(3, 2, 1)
    for msg in (
        Replicate(G, "a", 2, (r,), 3, 2, 2),
        ReplicateAck(G, "b", 2, 3),
        Fenced(G, "b", 4),
        CatchUpRequest(G, "b", 2, 1, 1),
        SnapshotChunk(G, "a", 2, 1, 1, 7, 3, 5, 2, [{"type": "rows", "rows": [[b"k", 1]]}], False),
        SnapshotPull(G, "b", 2, 7, 4),
    ):
        assert replication.decode(replication.encode(msg)) == msg
    with pytest.raises(ValueError):
        replication.decode({"type": "Replicate", "records": [[1]]})
    with pytest.raises(ValueError):
        replication.decode({"type": "Bogus"})


# --------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    writes=st.integers(min_value=1, max_value=40),
    loss=st.sampled_from([0.0, 0.2, 0.5]),
    dup=st.sampled_from([0.0, 0.3]),
    retention=st.sampled_from([3, 1000]),
)
def test_backup_converges_over_a_bad_network(
    seed: int, writes: int, loss: float, dup: float, retention: int
) -> None:
    """Loss, duplication and arbitrary reordering between a primary and an in-sync backup:
    the backup's log is always a prefix of the primary's, nothing is acknowledged that the
    backup lacks, and once the network behaves, both hold the same state."""
    rng = random.Random(seed)
    pstore = MemoryReplicaStore(retention=retention, chunk_items=2)  # multi-chunk state transfers
    p = ready_primary(pstore)
    p.on_in_sync_recorded({"a", "b"})
    bstore = MemoryReplicaStore()
    b = ReplicationBackup("b", G, bstore, CFG)
    net: list[Send] = []
    now = 0.0
    written = 0
    for _step in range(600):
        now += 0.05
        r = rng.random()
        if written < writes and r < 0.3:
            _, sends = p.append([kv_put(f"k{written}", written)], now)
            written += 1
            net += sends
        elif r < 0.4:
            net += p.tick(now)
        elif net:
            s = net.pop(rng.randrange(len(net)))
            if rng.random() < loss and now < 20:
                continue
            if rng.random() < dup:
                net.append(s)
            if s.to == "b":
                net += b.handle(s.msg, now)
            elif isinstance(s.msg, ReplicateAck):
                net += p.on_ack(s.msg, now)
            elif isinstance(s.msg, CatchUpRequest):
                net += p.on_catch_up(s.msg, now)
            elif isinstance(s.msg, SnapshotPull):
                net += p.on_pull(s.msg, now)
        # Invariants after every step.
        for seq in range(max(1, bstore.last_seq - 3), bstore.last_seq + 1):
            mine, theirs = bstore.epoch_at(seq), pstore.epoch_at(seq)
            assert mine is None or theirs is None or mine == theirs
        if p.commit_seq > 0:
            assert bstore.last_seq >= p.commit_seq
        # Drain-and-settle phase once the writes are done: deliver everything, lose nothing.
        if written == writes and now > 20:
            break
    for _ in range(50):
        net += p.tick(now)
        pump(p, b, net, now, limit=10_000)
        net = []
        if p.commit_seq == pstore.last_seq and bstore.last_seq == pstore.last_seq:
            break
        now += 0.6
    assert bstore.state == pstore.state
    assert p.commit_seq == pstore.last_seq == writes


def test_backup_applies_a_multi_record_message_as_one_batch() -> None:
    batches: list[list[int]] = []

    class Recording(MemoryReplicaStore):
        def append_batch(self, records: Any, stamp: int) -> None:
            batches.append([r.seq for r in records])
            super().append_batch(records, stamp)

    bstore = Recording()
    b = ReplicationBackup("b", G, bstore, CFG)
    out = b.handle(replicate(1, [rec(2, 1, 1), rec(1, 1, 0), rec(3, 1, 1), rec(5, 1, 1)]), 0.0)
    assert batches == [[1, 2, 3]]  # the run extending the log, in one step; 5 waits for 4
    assert only(out, ReplicateAck) == [ReplicateAck(G, "b", 1, 3)]
    b.handle(replicate(1, [rec(4, 1, 1)], last=(5, 1)), 0.1)
    assert bstore.last_seq == 5 and bstore.state == {f"k{i}": i for i in range(1, 6)}


def test_tick_does_not_flood_a_slow_backup_with_records_already_in_flight() -> None:
    """A restarted backup catching up under load: resending the same unacknowledged batch on
    every tick made it skip duplicates forever (its acks timed out behind them)."""
    p, b = in_sync_pair()
    for i in range(20):
        p.append([kv_put(f"k{i}", i)], 1.0)  # sent, not yet acknowledged (a slow backup)
    assert only(p.tick(1.1), Replicate)[0].records == ()  # in flight: a heartbeat only
    resent = only(p.tick(1.0 + CFG.catch_up_retry), Replicate)[0]  # unacknowledged for too long
    assert [r.seq for r in resent.records] == list(range(1, 9))
    pump(p, b, [Send("b", resent)], 1.6)  # each ack pulls the next batch at once
    assert b.store.last_seq == 20 and p.lag("b") == 0


class CountingStore(MemoryReplicaStore):
    """Counts the log reads of the primary (what `ack_is_light` promises to avoid)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def records_after(self, seq: int, limit: int, max_bytes: int | None = None) -> list[ChangeRecord] | None:
        self.reads += 1
        return super().records_after(seq, limit, max_bytes)


def test_steady_state_acks_are_light_and_a_light_ack_never_reads_the_store() -> None:
    """`ack_is_light` lets the node run an ack on its event loop; it must be True for the
    streaming steady state and never True for an ack whose handling reads the log."""
    rng = random.Random(7)
    store = CountingStore()
    p = ready_primary(store)
    p.on_in_sync_recorded({"a", "b"})
    b = ReplicationBackup("b", G, MemoryReplicaStore(), CFG)
    pump(p, b, p.tick(0.0), 0.0)
    now, light_seen, heavy_seen = 0.0, 0, 0
    for i in range(300):
        now += 0.01
        _, sends = p.append([kv_put(f"k{i}", i)], now)
        if i % 50 >= 30 or rng.random() < 0.1:
            continue  # lost on the way (bursts, so catch-up comes in several batches)
        queue = list(sends) if rng.random() < 0.9 else p.tick(now + CFG.resend_after)
        for _ in range(100):
            if not queue:
                break
            s = queue.pop(0)
            if s.to == "b":
                queue += b.handle(s.msg, now)
            elif isinstance(s.msg, ReplicateAck):
                light = p.ack_is_light(s.msg)
                before = store.reads
                queue += p.on_ack(s.msg, now)
                if light:
                    light_seen += 1
                    assert store.reads == before, f"a light ack read the store (write {i})"
                else:
                    heavy_seen += 1
            elif isinstance(s.msg, CatchUpRequest):
                queue += p.on_catch_up(s.msg, now)
    assert light_seen > 100 and heavy_seen > 0


# --------------------------------------------------------------------------- send first


def test_send_first_goes_out_before_the_local_apply_and_commits_after_both() -> None:
    p, b = in_sync_pair()
    r, sends = p.prepare([kv_put("x", 1)], 1.0)
    msg = only(sends, Replicate)[0]
    assert msg.records == (r,) and r.seq == 1
    assert p.store.last_seq == 0 and p.store.state == {}  # out before the primary applied it
    acks = b.handle(msg, 1.01)
    assert b.store.state == {"x": 1}
    assert p.commit_prepared(r) == []  # durable here, but its ack is not in yet
    assert p.store.state == {"x": 1} and p.commit_seq == 0
    p.on_ack(acks[0].msg, 1.02)
    assert p.commit_seq == 1


def test_send_first_ack_before_the_local_commit_commits_nothing() -> None:
    p, b = in_sync_pair()
    r, sends = p.prepare([kv_put("x", 1)], 1.0)
    acks = b.handle(only(sends, Replicate)[0], 1.01)
    p.on_ack(acks[0].msg, 1.02)
    assert p.commit_seq == 0  # the backup has it, the primary not yet: not acknowledged (I2)
    p.commit_prepared(r)
    assert p.commit_seq == 0
    pump(p, b, p.tick(1.5), 1.5)  # the next heartbeat's ack counts
    assert p.commit_seq == 1


def test_send_first_commit_failure_retires_the_primary() -> None:
    store = FailingCommitStore()
    p, b = in_sync_pair(store)
    store.fail = True
    r, sends = p.prepare([kv_put("x", 1)], 1.0)
    with pytest.raises(OSError):
        p.commit_prepared(r)
    assert p.failed and not p.ready and p.commit_seq == 0
    with pytest.raises(NotReadyError):  # seq 1 of this epoch is at the backup: never reuse it
        p.prepare([kv_put("other", 2)], 1.1)
    b.handle(only(sends, Replicate)[0], 1.0)
    assert b.store.state == {"x": 1}  # held by the backup, never acknowledged to anyone


def test_send_first_is_refused_when_fenced_and_sends_nothing() -> None:
    store = MemoryReplicaStore()
    p, _ = in_sync_pair(store)
    store.raise_fence(2)
    with pytest.raises(FencedError):
        p.prepare([kv_put("x", 1)], 1.0)
    assert p.peers["b"].sent_upto == 0 and p.store.last_seq == 0


def test_one_prepared_record_at_a_time() -> None:
    p, _ = in_sync_pair()
    r, _ = p.prepare([kv_put("x", 1)], 1.0)
    with pytest.raises(ChainError):
        p.prepare([kv_put("y", 2)], 1.0)
    with pytest.raises(ChainError):
        p.append([kv_put("y", 2)], 1.0)
    with pytest.raises(ChainError):
        p.commit_prepared(rec(1, 1, 0))
    p.commit_prepared(r)
    r2, _ = p.prepare([kv_put("y", 2)], 1.1)
    assert (r2.seq, r2.prev_epoch) == (2, 1)
