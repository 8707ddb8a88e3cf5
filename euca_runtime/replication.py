"""Primary/backup log replication with fencing and state transfer (DESIGN.md section 7, I1/I2).

Pure protocol core: no I/O, no clocks, no tasks. Entry points take the caller's monotonic `now`
and message objects and return `Send(to, msg)` pairs; the durable side (state, change log,
fence) sits behind the `ReplicaStore` protocol, which the SQLAlchemy store implements and
`MemoryReplicaStore` implements for tests and the simulation.

The log. Every write becomes a `ChangeRecord(epoch, seq, prev_epoch, ops)`: `epoch` is the
epoch of the primary that created it, `seq` its position (1, 2, ...), `prev_epoch` the epoch of
the record at ``seq - 1`` (0 before the first), `ops` small opaque dicts for the state machine.
A primary creates each position at most once per epoch, and a replica accepts a record only
when `prev_epoch` matches its own last position, so two logs holding the same ``(seq, epoch)``
agree on everything before it (the log-matching property). A log position is the pair
``(last_seq, last_epoch)``.

Primary (`ReplicationPrimary`): appends, sends records to every member, and counts a write as
acknowledged (`commit_seq`) only once every *required* backup acknowledged it. Required =
the voter-recorded in-sync set, plus members of a pending in-sync proposal, plus backups that
caught up to within `join_lag` and are on their way in. It drops a backup that made no progress
for `drop_after` only by proposing a smaller set to the voters (`next_in_sync_proposal`); until
the lease module reports it recorded (`on_in_sync_recorded`) it keeps waiting for that backup.
It adds a backup only once the backup has acknowledged everything already committed.
A write is either applied first and sent before the local commit (`append`, with `early`), or,
for ops that cannot fail to apply, sent first and applied and committed after (`prepare`, then
`commit_prepared`); either way it counts only once committed here and acked by the required set.

Backup (`ReplicationBackup`): fences (a message from an epoch below the highest it has seen is
answered with `Fenced`), applies records strictly in order, buffers out-of-order ones and asks
for catch-up on a gap or a mismatch. Catch-up is log records from its position when the
primary's log contains that position, otherwise a state transfer: a snapshot of the primary's
whole state at ``(seq, epoch)`` that replaces the backup's state, which is how a deposed
primary's divergent suffix (records beyond the new primary's history from an older epoch) is
discarded. A snapshot is installed only in answer to a request made from the backup's current
position, so a stale or duplicated one can never move a replica backwards.

State transfer is streamed and pulled. The primary opens a consistent snapshot (one read
transaction, `ReplicaStore.open_snapshot`) and sends its first `SnapshotChunk` (chunks of about
`ReplicationConfig.chunk_bytes`); the backup applies each chunk to a staged install
(`ReplicaStore.begin_install`, one write transaction in the SQL store) and pulls the next one
with `SnapshotPull`. So at most one chunk is in flight per backup and memory on both sides is
a few chunks, whatever the size of the state. Every chunk carries the primary's epoch: chunks
of an older epoch are fenced, and a newer epoch (a failover) aborts the staged install. The
staged state becomes visible only with the last chunk, atomically, after which the backup acks
the snapshot's seq and the primary continues with its log from there. Until then the backup
keeps its old state and position, applies no records, acks nothing and so stays out of the
in-sync set (NOTREADY); a transfer that stops progressing for `transfer_timeout` (or whose
primary changed, or that failed to apply) is aborted and started again from scratch. A lost
chunk is pulled again after `catch_up_retry`: the primary keeps the last chunk it sent.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from euca_runtime.codec import Codec
from euca_runtime.lease import Send
from euca_runtime.log import get_logger

log = get_logger("replication")

NEVER = float("-inf")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    epoch: int
    seq: int
    prev_epoch: int
    ops: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Whole state as of log position (seq, epoch). `state` is opaque (the state machine's)."""

    seq: int
    epoch: int
    state: Any


class FencedError(RuntimeError):
    """A write stamped with an epoch lower than the highest this store has seen."""

    def __init__(self, epoch: int, fence: int) -> None:
        super().__init__(f"epoch {epoch} is fenced off (highest seen: {fence})")
        self.epoch = epoch
        self.fence = fence


class ChainError(ValueError):
    """A record that does not extend the log (wrong seq or prev_epoch)."""


class NotReadyError(RuntimeError):
    """The primary cannot take writes yet (its in-sync set is not recorded with the voters)."""


@dataclass(frozen=True)
class ReplicationConfig:
    batch: int = 64
    """Records per `Replicate` message."""
    join_lag: int = 64
    """A backup this close to the primary's last seq starts counting towards commits."""
    drop_after: float = 1.0
    """A required backup without progress for this long is proposed for removal."""
    catch_up_retry: float = 0.5
    """Backup: repeat an unanswered catch-up request; primary: repeat a state transfer."""
    buffer_limit: int = 1024
    """Out-of-order records a backup keeps while it waits for the gap to fill."""
    chunk_bytes: int = 1024 * 1024
    """Target size of one `SnapshotChunk` (a single bigger row travels alone) and of the
    records of one catch-up `Replicate` (a single bigger record travels alone)."""
    resend_after: float = 0.3
    """Primary: records sent to a backup and not acknowledged for this long are sent again
    (one catch-up batch in flight at a time, so a slow backup is not buried in duplicates)."""
    transfer_timeout: float = 10.0
    """State transfer without progress for this long is abandoned (backup) or closed (primary)."""


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Replicate:
    """Primary -> backup: records (possibly none: a heartbeat) and the primary's position."""

    group: str
    sender: str
    epoch: int
    records: tuple[ChangeRecord, ...]
    last_seq: int
    last_epoch: int
    commit_seq: int


@dataclass(frozen=True, slots=True)
class ReplicateAck:
    """Backup -> primary: my log equals yours up to `seq` (I am synced to your `epoch`)."""

    group: str
    sender: str
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class Fenced:
    """Replica -> sender of a stale message: I have seen `epoch`, higher than yours."""

    group: str
    sender: str
    epoch: int


@dataclass(frozen=True, slots=True)
class CatchUpRequest:
    """Backup -> primary (of `epoch`): send me what follows my position (last_seq, last_epoch)."""

    group: str
    sender: str
    epoch: int
    last_seq: int
    last_epoch: int


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """Primary -> backup: chunk `index` of state transfer `transfer`.

    The transfer answers a catch-up from (for_seq, for_epoch) that the log cannot serve; the
    snapshot is the primary's state at (seq, snap_epoch); `data` is opaque (the store's chunk
    format); `last` marks the final chunk.
    """

    group: str
    sender: str
    epoch: int
    for_seq: int
    for_epoch: int
    transfer: int
    index: int
    seq: int
    snap_epoch: int
    data: Any
    last: bool


@dataclass(frozen=True, slots=True)
class SnapshotPull:
    """Backup -> primary (of `epoch`): I applied the chunks before `index`; send chunk `index`."""

    group: str
    sender: str
    epoch: int
    transfer: int
    index: int


REPLICATION_MESSAGES: tuple[type, ...] = (
    Replicate,
    ReplicateAck,
    Fenced,
    CatchUpRequest,
    SnapshotChunk,
    SnapshotPull,
)


def _encode_records(records: tuple[ChangeRecord, ...]) -> list[list[Any]]:
    return [[r.epoch, r.seq, r.prev_epoch, [dict(op) for op in r.ops]] for r in records]


def _decode_records(value: Any) -> tuple[ChangeRecord, ...]:
    return tuple(
        ChangeRecord(int(e), int(s), int(p), tuple(dict(op) for op in ops)) for e, s, p, ops in value
    )


def _as_is(value: Any) -> Any:
    return value


# Change records have their own shape; a snapshot chunk's rows travel exactly as the store made them.
_CODEC = Codec(
    "replication",
    REPLICATION_MESSAGES,
    encoders={"records": _encode_records, "data": _as_is},
    decoders={"records": _decode_records, "data": _as_is},
)


def encode(msg: Any) -> dict[str, Any]:
    """A plain dict (msgpack/JSON-able if the ops and snapshot rows are) tagged with its type."""
    return _CODEC.encode(msg)


def decode(doc: Mapping[str, Any]) -> Any:
    """Inverse of `encode`; raises ValueError on anything malformed."""
    return _CODEC.decode(doc)


# --------------------------------------------------------------------------- storage


class StateMachine(Protocol):
    """What change records are applied to (the component's tables, or a dict in tests)."""

    def apply(self, ops: Sequence[Mapping[str, Any]]) -> None: ...

    def snapshot(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


class KVStateMachine:
    """A dict: ops ``{"op": "put", "key": k, "value": v}`` and ``{"op": "delete", "key": k}``."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def apply(self, ops: Sequence[Mapping[str, Any]]) -> None:
        for op in ops:
            kind = op.get("op")
            if kind == "put":
                self.data[op["key"]] = op["value"]
            elif kind == "delete":
                self.data.pop(op["key"], None)
            else:
                raise ValueError(f"unknown op {kind!r}")

    def snapshot(self) -> Any:
        return copy.deepcopy(self.data)

    def restore(self, state: Any) -> None:
        self.data = copy.deepcopy(dict(state))


class SnapshotSource(Protocol):
    """A consistent snapshot being read chunk by chunk (`ReplicaStore.open_snapshot`)."""

    seq: int
    epoch: int

    def next_chunk(self) -> tuple[Any, bool]:
        """The next chunk of data and whether it is the last one."""
        ...

    def close(self) -> None:
        """Release the snapshot (idempotent); done after the last chunk too."""
        ...


class SnapshotSink(Protocol):
    """A snapshot being installed chunk by chunk (`ReplicaStore.begin_install`)."""

    def add(self, data: Any, last: bool) -> None:
        """Stage one chunk; the last one installs everything atomically. Raises on bad data."""
        ...

    def abort(self) -> None:
        """Drop what was staged; the store stays as it was (idempotent)."""
        ...


class ReplicaStore(Protocol):
    """A replica's durable side: state, change log, log position and fence, updated atomically.

    SQL mapping: `append` is one transaction that checks the fence (against the delivering
    primary's epoch, see `append`) and the chain, applies the
    ops to the component tables, inserts the change-log row and moves the position; a
    snapshot install is one transaction that replaces the tables, empties the log and sets the
    base position; `raise_fence` updates the fence row. The log may be compacted (oldest
    records dropped) at any time.
    """

    @property
    def fence_epoch(self) -> int: ...

    @property
    def last_seq(self) -> int: ...

    @property
    def last_epoch(self) -> int: ...

    def raise_fence(self, epoch: int) -> None: ...

    def epoch_at(self, seq: int) -> int | None:
        """Epoch of the record at `seq` (or of the snapshot base); None if not known."""
        ...

    def records_after(self, seq: int, limit: int, max_bytes: int | None = None) -> list[ChangeRecord] | None:
        """Up to `limit` records from ``seq + 1``; None when ``seq + 1`` was compacted away.

        With `max_bytes`, stop before the records' (packed) ops exceed it, but return at least
        one record: a catch-up message stays about that size whatever the records hold.
        """
        ...

    def append(
        self, record: ChangeRecord, stamp: int, before_commit: Callable[[], None] | None = None
    ) -> None:
        """Apply and log `record`, delivered by the primary of epoch `stamp`.

        The fencing token is `stamp`, not `record.epoch`: a catch-up replays records that older
        primaries created, and those keep their own epoch in the log. FencedError if `stamp`
        is below the fence (then raises the fence to `stamp`), ChainError if `record` does not
        extend the log (seq is not last + 1, or prev_epoch is not the last record's epoch).

        `before_commit`, when given, is called once the record is checked and its ops applied
        without error, before it is logged and the transaction commits (the durable part, an
        fsync): the primary sends the record to its backups from there, so their apply
        overlaps the rest of its own. If that rest fails, the exception propagates after the
        call.
        """
        ...

    def append_batch(self, records: Sequence[ChangeRecord], stamp: int) -> None:
        """`append` of consecutive records as one all-or-nothing step (one transaction).

        Used by a backup for the run of records of one message that extends its log: one
        fsync for all of them. If anything fails nothing is applied, and the backup retries
        the records one by one (so the good prefix applies and the bad record raises).
        """
        ...

    def open_snapshot(self, max_bytes: int) -> SnapshotSource:
        """A consistent snapshot of the whole state at the current position, in chunks of about
        `max_bytes`; it stays consistent while writes continue (until it is closed)."""
        ...

    def begin_install(self, seq: int, epoch: int) -> SnapshotSink:
        """Stage a snapshot taken at (seq, epoch) that will replace the state, log and position.

        Nothing changes until the sink's last chunk; while a sink is open no other write may
        happen (`append` or `raise_fence` abort it first).
        """
        ...


class MemoryReplicaStore:
    """`ReplicaStore` in memory, keeping the last `retention` records of the log."""

    def __init__(
        self, machine: StateMachine | None = None, retention: int = 1024, chunk_items: int = 64
    ) -> None:
        self.machine: StateMachine = machine if machine is not None else KVStateMachine()
        self.retention = retention
        self.chunk_items = chunk_items
        """Key/value pairs per snapshot chunk (a dict state; anything else is one chunk)."""
        self._sink: _MemorySnapshotSink | None = None
        self._fence = 0
        self._base_seq = 0
        self._base_epoch = 0
        self._log: list[ChangeRecord] = []

    @property
    def fence_epoch(self) -> int:
        return self._fence

    @property
    def last_seq(self) -> int:
        return self._base_seq + len(self._log)

    @property
    def last_epoch(self) -> int:
        return self._log[-1].epoch if self._log else self._base_epoch

    @property
    def state(self) -> Any:
        """The KV dict when the machine is a `KVStateMachine` (tests, simulation)."""
        return getattr(self.machine, "data", None)

    def raise_fence(self, epoch: int) -> None:
        if self._sink is not None:
            self._sink.abort()
        self._fence = max(self._fence, epoch)

    def epoch_at(self, seq: int) -> int | None:
        if seq == self._base_seq:
            return self._base_epoch
        if self._base_seq < seq <= self.last_seq:
            return self._log[seq - self._base_seq - 1].epoch
        return None

    def records_after(self, seq: int, limit: int, max_bytes: int | None = None) -> list[ChangeRecord] | None:
        if seq < self._base_seq or seq > self.last_seq:
            return None
        start = seq - self._base_seq
        out = self._log[start : start + limit]
        if max_bytes is not None:
            size = 0
            for i, r in enumerate(out):
                size += len(repr(r.ops))
                if i > 0 and size > max_bytes:
                    return out[:i]
        return out

    def append(
        self, record: ChangeRecord, stamp: int, before_commit: Callable[[], None] | None = None
    ) -> None:
        if self._sink is not None:
            self._sink.abort()
        if stamp < self._fence:
            raise FencedError(stamp, self._fence)
        if record.epoch > stamp:
            raise ChainError(f"record of epoch {record.epoch} delivered under older epoch {stamp}")
        if record.seq != self.last_seq + 1 or record.prev_epoch != self.last_epoch:
            raise ChainError(
                f"record ({record.seq}, {record.epoch}) prev {record.prev_epoch} does not follow "
                f"({self.last_seq}, {self.last_epoch})"
            )
        self.machine.apply(record.ops)
        if before_commit is not None:
            before_commit()
        self._fence = max(self._fence, stamp)
        self._log.append(record)
        if len(self._log) > self.retention:
            dropped = self._log[: len(self._log) - self.retention]
            self._log = self._log[len(dropped) :]
            self._base_seq, self._base_epoch = dropped[-1].seq, dropped[-1].epoch

    def append_batch(self, records: Sequence[ChangeRecord], stamp: int) -> None:
        saved = (self.machine.snapshot(), list(self._log), self._fence, self._base_seq, self._base_epoch)
        try:
            for record in records:
                self.append(record, stamp)
        except BaseException:
            state, self._log, self._fence, self._base_seq, self._base_epoch = saved
            self.machine.restore(state)
            raise

    def snapshot(self) -> Snapshot:
        return Snapshot(self.last_seq, self.last_epoch, self.machine.snapshot())

    def install(self, snapshot: Snapshot) -> None:
        self.machine.restore(snapshot.state)
        self._log = []
        self._base_seq, self._base_epoch = snapshot.seq, snapshot.epoch

    def open_snapshot(self, max_bytes: int) -> SnapshotSource:
        return _MemorySnapshotSource(self.snapshot(), self.chunk_items)

    def begin_install(self, seq: int, epoch: int) -> SnapshotSink:
        if self._sink is not None:
            self._sink.abort()
        self._sink = _MemorySnapshotSink(self, seq, epoch)
        return self._sink


class _MemorySnapshotSource:
    """A dict state as chunks of `items` [key, value] pairs; any other state in one chunk."""

    def __init__(self, snap: Snapshot, items: int) -> None:
        self.seq, self.epoch = snap.seq, snap.epoch
        state = snap.state
        self._pairs: list[list[Any]] | None = (
            [[k, v] for k, v in state.items()] if isinstance(state, Mapping) else None
        )
        self._whole = state
        self._items = max(1, items)
        self._pos = 0

    def next_chunk(self) -> tuple[Any, bool]:
        if self._pairs is None:
            return {"whole": self._whole}, True
        part = self._pairs[self._pos : self._pos + self._items]
        self._pos += len(part)
        return {"pairs": part}, self._pos >= len(self._pairs)

    def close(self) -> None:
        self._pairs = []


class _MemorySnapshotSink:
    def __init__(self, store: MemoryReplicaStore, seq: int, epoch: int) -> None:
        self.store, self.seq, self.epoch = store, seq, epoch
        self.staged: dict[Any, Any] = {}
        self.whole: Any = None
        self.open = True

    def add(self, data: Any, last: bool) -> None:
        if not self.open:
            raise ValueError("this snapshot install is finished")
        if not isinstance(data, Mapping) or not ("pairs" in data or "whole" in data):
            self.abort()
            raise ValueError(f"bad snapshot chunk {data!r}")
        if "whole" in data:
            self.whole = data["whole"]
        else:
            for k, v in data["pairs"]:
                self.staged[k] = v
        if last:
            self.open = False
            self.store._sink = None
            self.store.install(Snapshot(self.seq, self.epoch, self.whole if "whole" in data else self.staged))

    def abort(self) -> None:
        if self.open:
            self.open = False
            self.staged = {}
            if self.store._sink is self:
                self.store._sink = None


# --------------------------------------------------------------------------- primary


@dataclass
class _Outgoing:
    """A state transfer the primary serves to one backup: the open snapshot and the last chunk."""

    id: int
    for_pos: tuple[int, int]
    source: SnapshotSource | None
    seq: int
    snap_epoch: int
    started: float
    last_activity: float
    chunk: SnapshotChunk | None = None

    def close(self) -> None:
        src, self.source = self.source, None
        if src is not None:
            src.close()


@dataclass
class _Peer:
    acked: int = -1
    """Highest seq acknowledged under our epoch; -1 until the backup proved it is synced."""
    sent_upto: int = -1
    last_progress: float = NEVER
    behind_since: float | None = None
    sent_at: float = NEVER
    """When what is in flight (sent_upto > acked) was sent, or acks last made progress."""
    transfer: _Outgoing | None = None


class ReplicationPrimary:
    """The writer's side of replication for one group at one epoch.

    Create it when the lease is won (it raises the store's fence to `epoch`), feed it acks and
    catch-up requests, call `tick` periodically, and after every call pass
    `next_in_sync_proposal()` (when not None) to `Candidate.propose_in_sync` and report the
    voters' confirmation back through `on_in_sync_recorded`. A write may be acknowledged to its
    client once `commit_seq` reaches its record's seq. Discard the object on step-down.
    """

    def __init__(
        self,
        name: str,
        group: str,
        epoch: int,
        store: ReplicaStore,
        members: Iterable[str],
        config: ReplicationConfig | None = None,
        now: float = 0.0,
    ) -> None:
        self.name = name
        self.group = group
        self.epoch = epoch
        self.store = store
        self.config = config or ReplicationConfig()
        store.raise_fence(epoch)
        if store.fence_epoch != epoch:
            raise FencedError(epoch, store.fence_epoch)
        self.peers: dict[str, _Peer] = {}
        self.recorded: frozenset[str] | None = None
        self.proposed: frozenset[str] | None = None
        self.joined: set[str] = set()
        self._transfers = 0
        self._prepared: tuple[ChangeRecord, bool] | None = None
        """The record of a `prepare` not yet committed, and whether it was sent to anyone."""
        self.failed = False
        """A record went out but its local commit failed: never take writes again (step down)."""
        self.set_members(members, now)
        self.commit_seq = store.last_seq

    def close(self) -> None:
        """Release every open snapshot (call when this object is discarded: step-down, stop)."""
        for peer in self.peers.values():
            self._end_transfer(peer)

    @staticmethod
    def _end_transfer(peer: _Peer) -> None:
        t, peer.transfer = peer.transfer, None
        if t is not None:
            t.close()

    @property
    def transfers(self) -> dict[str, tuple[int, int]]:
        """Running state transfers: member -> (chunks sent, snapshot seq)."""
        return {
            m: (p.transfer.chunk.index + 1 if p.transfer.chunk else 0, p.transfer.seq)
            for m, p in self.peers.items()
            if p.transfer is not None
        }

    # -- membership

    def set_members(self, members: Iterable[str], now: float) -> None:
        """The group's registered instances (registration/deregistration changes it)."""
        wanted = sorted(set(members) - {self.name})
        for m in wanted:
            self.peers.setdefault(m, _Peer(last_progress=now))
        for m in [m for m in self.peers if m not in wanted]:
            self._end_transfer(self.peers.pop(m))
            self.joined.discard(m)

    @property
    def ready(self) -> bool:
        """May take writes: the voters recorded an in-sync set that contains us."""
        return not self.failed and self.recorded is not None and self.name in self.recorded

    def required(self) -> set[str]:
        """Backups whose ack every new write waits for."""
        req = set(self.joined)
        for s in (self.recorded, self.proposed):
            if s is not None:
                req |= s
        req.discard(self.name)
        return req

    def lag(self, member: str) -> int | None:
        """Change records `member` is behind (None if unknown)."""
        peer = self.peers.get(member)
        if peer is None or peer.acked < 0:
            return None
        return self.store.last_seq - peer.acked

    def _dead(self, member: str, now: float) -> bool:
        peer = self.peers.get(member)
        if peer is None:
            return True
        return peer.behind_since is not None and now - peer.behind_since >= self.config.drop_after

    def next_in_sync_proposal(self, now: float) -> frozenset[str] | None:
        """The in-sync set to propose to the voters now, if it should change (marks it pending)."""
        if self.proposed is not None:
            return None
        if self.recorded is None:
            desired = {self.name}
        else:
            desired = {m for m in self.recorded if m == self.name or not self._dead(m, now)}
            desired |= {m for m in self.joined if self.peers[m].acked >= self.commit_seq}
            desired.add(self.name)
        if self.recorded is not None and desired == self.recorded:
            return None
        self.proposed = frozenset(desired)
        return self.proposed

    def on_in_sync_recorded(self, members: Iterable[str]) -> list[int]:
        """The voters recorded `members` (a majority): adopt it. Returns newly committed seqs."""
        self.recorded = frozenset(members)
        if self.proposed == self.recorded:
            self.proposed = None
        self.joined -= self.recorded
        return self._advance_commit()

    # -- writes

    def append(
        self,
        ops: Sequence[Mapping[str, Any]],
        now: float,
        early: Callable[[list[Send]], None] | None = None,
    ) -> tuple[ChangeRecord, list[Send]]:
        """Log and apply a write; returns its record and the messages replicating it.

        With `early`, the messages are handed to `early` instead, from inside the store's
        append once the ops applied cleanly and before the local commit (its fsync), so the
        backups apply the record while the primary commits it: the write's latency is the
        slower of the two instead of their sum. This keeps I2, since `commit_seq` still needs
        the record durable here (it is in `store.last_seq` only once committed) and acked by
        every required backup. If the local commit fails after the record went out, this
        primary is `failed` (never ready again): a backup may hold that record, so the seq
        must not be reused in this epoch; the caller steps down, and a later primary either
        has the record (harmless: it was never acknowledged) or discards it as a divergent
        suffix through catch-up.
        """
        rec = self._next_record(ops)
        out: list[Send] = []
        emitted = False

        def emit() -> None:
            nonlocal emitted
            out.extend(self._emit(rec, now))
            if early is not None and out:
                emitted = True
                early(list(out))
                out.clear()

        try:
            self.store.append(rec, self.epoch, before_commit=emit if early is not None else None)
        except BaseException:
            if emitted:
                self._retire(rec)
            raise
        if early is None:
            emit()
        self._advance_commit()
        return rec, out

    def prepare(self, ops: Sequence[Mapping[str, Any]], now: float) -> tuple[ChangeRecord, list[Send]]:
        """Send first: the next record and the messages replicating it, before it is applied here.

        The caller sends the messages at once and then applies the record locally with
        `commit_prepared`, so the backups apply it while the primary applies and commits its
        own copy (neither waits for the other's apply). Nothing may touch this object between
        the two calls (the caller runs `commit_prepared` as the next job of its replication
        thread). Only for ops that cannot fail to apply (the caller checks them first, e.g.
        `ComponentSpec.send_first_ok`): a record that fails here after it went out retires this
        primary, as in `append`. I2 holds as in `append`: `commit_seq` needs the record in
        `store.last_seq`, which only `commit_prepared` moves, and every required backup's ack.
        """
        rec = self._next_record(ops)
        if self.store.fence_epoch > self.epoch:
            raise FencedError(self.epoch, self.store.fence_epoch)
        out = self._emit(rec, now)
        self._prepared = (rec, bool(out))
        return rec, out

    def commit_prepared(self, rec: ChangeRecord) -> list[int]:
        """Apply and commit the record of the last `prepare` (its messages are already out).

        Returns the newly committed seqs. If this fails after the record went out, this
        primary is `failed` (see `append`) and the exception propagates.
        """
        prepared = self._prepared
        if prepared is None or prepared[0] is not rec:
            raise ChainError(f"record ({rec.seq}, {rec.epoch}) is not the one prepared")
        self._prepared = None
        try:
            self.store.append(rec, self.epoch)
        except BaseException:
            if prepared[1]:
                self._retire(rec)
            raise
        return self._advance_commit()

    def _next_record(self, ops: Sequence[Mapping[str, Any]]) -> ChangeRecord:
        if not self.ready:
            raise NotReadyError(f"{self.group}: in-sync set not recorded yet")
        if self._prepared is not None:
            raise ChainError(f"{self.group}: record {self._prepared[0].seq} is prepared, not committed")
        store = self.store
        return ChangeRecord(self.epoch, store.last_seq + 1, store.last_epoch, tuple(dict(op) for op in ops))

    def _emit(self, rec: ChangeRecord, now: float) -> list[Send]:
        """The messages sending `rec` to every member streaming in step with us."""
        msg = Replicate(self.group, self.name, self.epoch, (rec,), rec.seq, rec.epoch, self.commit_seq)
        required = self.required()
        out: list[Send] = []
        for name, peer in self.peers.items():
            if name in required and peer.behind_since is None:
                peer.behind_since = now
            if peer.acked >= 0 and peer.sent_upto == rec.seq - 1:
                if peer.sent_upto <= peer.acked:
                    peer.sent_at = now  # the oldest unacknowledged send
                peer.sent_upto = rec.seq
                out.append(Send(name, msg))
        return out

    def _retire(self, rec: ChangeRecord) -> None:
        """A record went out but was not committed here: never take writes again."""
        self.failed = True
        log.error(
            "local commit failed after replicating",
            extra={"group": self.group, "epoch": self.epoch, "seq": rec.seq},
        )

    def _replicate(self, records: tuple[ChangeRecord, ...]) -> Replicate:
        s = self.store
        return Replicate(
            self.group, self.name, self.epoch, records, s.last_seq, s.last_epoch, self.commit_seq
        )

    def _advance_commit(self) -> list[int]:
        if not self.ready:
            return []
        new = self.store.last_seq
        for m in self.required():
            peer = self.peers.get(m)
            new = min(new, peer.acked if peer is not None else -1)
        if new <= self.commit_seq:
            return []
        done = list(range(self.commit_seq + 1, new + 1))
        self.commit_seq = new
        return done

    # -- messages from backups

    def on_ack(self, msg: ReplicateAck, now: float) -> list[Send]:
        peer = self.peers.get(msg.sender)
        if peer is None or msg.epoch != self.epoch:
            return []
        last = self.store.last_seq
        seq = min(msg.seq, last)
        if peer.transfer is not None and seq >= peer.transfer.seq:
            self._end_transfer(peer)  # installed: the log takes over from its seq
        if seq > peer.acked:
            peer.acked = seq
            peer.last_progress = peer.sent_at = now
            peer.behind_since = None if seq >= last else now
        elif seq >= last:
            peer.behind_since = None
        peer.sent_upto = max(peer.sent_upto, peer.acked)
        if msg.sender not in self.required() and peer.acked >= last - self.config.join_lag:
            self.joined.add(msg.sender)
        self._advance_commit()
        if peer.acked < last and peer.sent_upto <= peer.acked:
            return self._send_from(msg.sender, peer, now)
        return []

    def ack_is_light(self, msg: ReplicateAck) -> bool:
        """Whether `on_ack(msg)` runs without touching the store beyond its in-memory position:
        no state transfer to close and no records to read for a backup that is behind what
        was sent to it (the steady state: the backup acked what the primary streamed)."""
        peer = self.peers.get(msg.sender)
        if peer is None or msg.epoch != self.epoch:
            return True
        if peer.transfer is not None:
            return False
        last = self.store.last_seq
        acked = max(peer.acked, min(msg.seq, last))
        return not (acked < last and max(peer.sent_upto, acked) <= acked)

    def _send_from(self, name: str, peer: _Peer, now: float) -> list[Send]:
        recs = self.store.records_after(peer.acked, self.config.batch, self.config.chunk_bytes)
        if not recs:
            return []
        peer.sent_upto, peer.sent_at = recs[-1].seq, now
        return [Send(name, self._replicate(tuple(recs)))]

    def on_catch_up(self, msg: CatchUpRequest, now: float) -> list[Send]:
        peer = self.peers.get(msg.sender)
        if peer is None or msg.epoch != self.epoch:
            return []
        store = self.store
        if msg.last_seq <= store.last_seq and store.epoch_at(msg.last_seq) == msg.last_epoch:
            recs = store.records_after(msg.last_seq, self.config.batch, self.config.chunk_bytes)
            if recs is not None:
                if recs:
                    # It asked from its position: what we sent beyond it was lost (or is
                    # buffered there); stream on from this batch as its acks come in.
                    peer.sent_upto, peer.sent_at = recs[-1].seq, now
                return [Send(msg.sender, self._replicate(tuple(recs)))]
        position = (msg.last_seq, msg.last_epoch)
        t = peer.transfer
        if t is not None and t.for_pos == position:
            if now - t.last_activity < self.config.catch_up_retry:
                return []  # a repeated request while the transfer is being answered
            if t.chunk is not None and t.chunk.index == 0 and now - t.started < self.config.transfer_timeout:
                t.last_activity = now  # the first chunk was lost: send it again
                return [Send(msg.sender, t.chunk)]
        self._end_transfer(peer)
        try:
            source = store.open_snapshot(self.config.chunk_bytes)
        except Exception:
            log.exception("cannot open a snapshot", extra={"group": self.group, "peer": msg.sender})
            return []
        self._transfers += 1
        t = _Outgoing(self._transfers, position, source, source.seq, source.epoch, now, now)
        peer.transfer = t
        log.info(
            "state transfer",
            extra={
                "group": self.group,
                "epoch": self.epoch,
                "peer": msg.sender,
                "from_seq": msg.last_seq,
                "seq": t.seq,
                "transfer": t.id,
            },
        )
        return self._next_chunk(msg.sender, peer, t, now)

    def _next_chunk(self, name: str, peer: _Peer, t: _Outgoing, now: float) -> list[Send]:
        src = t.source
        if src is None:
            return []
        try:
            data, last = src.next_chunk()
        except Exception:
            log.exception(
                "state transfer failed", extra={"group": self.group, "peer": name, "transfer": t.id}
            )
            self._end_transfer(peer)
            return []
        index = t.chunk.index + 1 if t.chunk is not None else 0
        t.chunk = SnapshotChunk(
            self.group,
            self.name,
            self.epoch,
            t.for_pos[0],
            t.for_pos[1],
            t.id,
            index,
            t.seq,
            t.snap_epoch,
            data,
            last,
        )
        t.last_activity = now
        if last:
            t.close()  # the read transaction is not needed any more; keep the chunk for a resend
        return [Send(name, t.chunk)]

    def on_pull(self, msg: SnapshotPull, now: float) -> list[Send]:
        """The backup applied the chunks before `msg.index`: send that one (again, if lost)."""
        peer = self.peers.get(msg.sender)
        if peer is None or msg.epoch != self.epoch:
            return []
        t = peer.transfer
        if t is None or t.id != msg.transfer or t.chunk is None:
            return []
        if msg.index == t.chunk.index:
            t.last_activity = now
            return [Send(msg.sender, t.chunk)]
        if msg.index == t.chunk.index + 1 and not t.chunk.last:
            return self._next_chunk(msg.sender, peer, t, now)
        return []

    def tick(self, now: float) -> list[Send]:
        """Heartbeat every member, resend what is unacknowledged for `catch_up_retry` (what is
        newer goes out as acks come in), forget dead joiners."""
        out: list[Send] = []
        pinned = (self.recorded or frozenset()) | (self.proposed or frozenset())
        required = self.required()
        for name, peer in self.peers.items():
            t = peer.transfer
            if t is not None and now - t.last_activity >= self.config.transfer_timeout:
                log.warning(
                    "state transfer abandoned by the backup",
                    extra={"group": self.group, "epoch": self.epoch, "peer": name, "transfer": t.id},
                )
                self._end_transfer(peer)
            if name in self.joined and name not in pinned and self._dead(name, now):
                self.joined.discard(name)
                peer.behind_since = None
            elif name in required and peer.behind_since is None and peer.acked < self.store.last_seq:
                peer.behind_since = now
            recs = None
            in_flight = peer.sent_upto > peer.acked and now - peer.sent_at < self.config.resend_after
            if 0 <= peer.acked < self.store.last_seq and not in_flight:
                recs = self.store.records_after(peer.acked, self.config.batch, self.config.chunk_bytes)
            if recs:
                peer.sent_upto, peer.sent_at = recs[-1].seq, now
                out.append(Send(name, self._replicate(tuple(recs))))
            else:
                out.append(Send(name, self._replicate(())))
        self._advance_commit()
        return out


# --------------------------------------------------------------------------- backup


@dataclass
class _Incoming:
    """A state transfer a backup is receiving: where it stages chunks and what comes next."""

    primary: str
    epoch: int
    id: int
    seq: int
    snap_epoch: int
    sink: SnapshotSink
    started: float
    last_chunk_at: float
    last_pull_at: float
    next_index: int = 0


class ReplicationBackup:
    """A replica's side of replication for one group: fencing, ordered apply, catch-up."""

    def __init__(
        self, name: str, group: str, store: ReplicaStore, config: ReplicationConfig | None = None
    ) -> None:
        self.name = name
        self.group = group
        self.store = store
        self.config = config or ReplicationConfig()
        self.synced_epoch = 0
        """Epoch of the primary whose log ours is verified to be a prefix of (volatile)."""
        self.primary: str | None = None
        self.last_heard = NEVER
        self._buffer: dict[int, ChangeRecord] = {}
        self._asked: tuple[int, int, int] | None = None
        self._asked_at = NEVER
        self._incoming: _Incoming | None = None

    @property
    def position(self) -> tuple[int, int]:
        return (self.store.last_seq, self.store.last_epoch)

    @property
    def transfer(self) -> tuple[int, int] | None:
        """(chunks applied, snapshot seq) of the state transfer being received, if any."""
        t = self._incoming
        return None if t is None else (t.next_index, t.seq)

    def abort_transfer(self, why: str) -> None:
        """Drop a state transfer being received (staged data discarded, store unchanged)."""
        t, self._incoming = self._incoming, None
        if t is None:
            return
        t.sink.abort()
        self._asked = None
        log.warning(
            "state transfer aborted",
            extra={
                "group": self.group,
                "epoch": t.epoch,
                "peer": t.primary,
                "transfer": t.id,
                "chunks": t.next_index,
                "reason": why,
            },
        )

    def _fence(self, sender: str, epoch: int) -> list[Send] | None:
        """Reject a stale epoch; raise the durable fence for a newer one."""
        fence = self.store.fence_epoch
        if epoch < fence:
            return [Send(sender, Fenced(self.group, self.name, fence))]
        if self._incoming is not None and self._incoming.epoch != epoch:
            self.abort_transfer(f"a primary of epoch {epoch} appeared")
        if epoch > fence:
            self.store.raise_fence(epoch)
        if epoch != self.synced_epoch:
            self._buffer.clear()
        return None

    def on_replicate(self, msg: Replicate, now: float) -> list[Send]:
        rejected = self._fence(msg.sender, msg.epoch)
        if rejected is not None:
            return rejected
        self.primary, self.last_heard = msg.sender, now
        t = self._incoming
        if t is not None:
            # Receiving a snapshot: records wait (the log catch-up follows from its seq).
            quiet = now - t.last_chunk_at
            if quiet < self.config.transfer_timeout:
                if quiet >= self.config.catch_up_retry and now - t.last_pull_at >= self.config.catch_up_retry:
                    t.last_pull_at = now  # the chunk or our pull was lost: pull it again
                    return [Send(t.primary, SnapshotPull(self.group, self.name, t.epoch, t.id, t.next_index))]
                return []
            self.abort_transfer(f"no chunk for {quiet:.1f} s")
        need_catch_up = False
        for rec in self._append_run(sorted(msg.records, key=lambda r: r.seq), msg.epoch):
            if not self._offer(rec, msg.epoch):
                need_catch_up = True
        self._drain(msg.epoch)
        store = self.store
        if not msg.records:
            if self.position == (msg.last_seq, msg.last_epoch):
                self.synced_epoch = msg.epoch
            elif self.synced_epoch != msg.epoch or store.last_seq < msg.last_seq:
                need_catch_up = True
        elif self.synced_epoch == msg.epoch and store.last_seq < msg.last_seq and self._buffer:
            need_catch_up = True
        out: list[Send] = []
        if self.synced_epoch == msg.epoch:
            out.append(Send(msg.sender, ReplicateAck(self.group, self.name, msg.epoch, store.last_seq)))
        if need_catch_up:
            out += self._ask(msg.sender, msg.epoch, now)
        return out

    def _append_run(self, recs: list[ChangeRecord], epoch: int) -> list[ChangeRecord]:
        """Apply the leading records that extend our log in one batch; returns the others."""
        store = self.store
        if len(recs) < 2 or recs[0].seq != store.last_seq + 1 or recs[0].prev_epoch != store.last_epoch:
            return recs
        run = [recs[0]]
        for r in recs[1:]:
            if r.seq != run[-1].seq + 1 or r.prev_epoch != run[-1].epoch:
                break
            run.append(r)
        if len(run) < 2 or any(r.epoch > epoch for r in run):
            return recs
        try:
            store.append_batch(run, epoch)
        except Exception as exc:  # noqa: BLE001 - retried record by record, which raises the real error
            log.warning(
                "batch apply failed; applying record by record",
                extra={"group": self.group, "epoch": epoch, "seq": run[0].seq, "reason": str(exc)},
            )
            return recs
        self.synced_epoch = epoch
        return recs[len(run) :]

    def _offer(self, rec: ChangeRecord, epoch: int) -> bool:
        """Take one record from the primary of `epoch`; False when catch-up is needed."""
        store = self.store
        if rec.epoch > epoch:
            return True  # malformed: a primary never sends records from the future
        last = store.last_seq
        if rec.seq == last + 1:
            if rec.prev_epoch != store.last_epoch:
                return False  # our last record is not theirs: divergent suffix
            store.append(rec, epoch)
            self.synced_epoch = epoch
            return True
        if rec.seq <= last:
            mine = store.epoch_at(rec.seq)
            if mine == rec.epoch:
                if rec.seq == last:
                    self.synced_epoch = epoch  # our last record is theirs: the whole log matches
                return self.synced_epoch == epoch
            # Either compacted away (harmless if already synced) or a conflicting record.
            return mine is None and self.synced_epoch == epoch
        # A gap: keep it for later if we are in step with this primary.
        if self.synced_epoch == epoch and len(self._buffer) < self.config.buffer_limit:
            self._buffer[rec.seq] = rec
        return False

    def _drain(self, epoch: int) -> None:
        while self._buffer and self.synced_epoch == epoch:
            rec = self._buffer.pop(self.store.last_seq + 1, None)
            if rec is None:
                self._buffer = {s: r for s, r in self._buffer.items() if s > self.store.last_seq}
                return
            if not self._offer(rec, epoch):
                self._buffer.clear()
                return

    def _ask(self, primary: str, epoch: int, now: float) -> list[Send]:
        seq, last_epoch = self.position
        key = (epoch, seq, last_epoch)
        if self._asked == key and now - self._asked_at < self.config.catch_up_retry:
            return []
        self._asked, self._asked_at = key, now
        return [Send(primary, CatchUpRequest(self.group, self.name, epoch, seq, last_epoch))]

    def on_chunk(self, msg: SnapshotChunk, now: float) -> list[Send]:
        rejected = self._fence(msg.sender, msg.epoch)
        if rejected is not None:
            return rejected
        t = self._incoming
        if t is None or (t.epoch, t.id, t.primary) != (msg.epoch, msg.transfer, msg.sender):
            if msg.index != 0 or (msg.for_seq, msg.for_epoch) != self.position:
                return []  # answers a request from a position we have left: stale or duplicated
            if t is not None:
                self.abort_transfer(f"replaced by transfer {msg.transfer}")
            t = _Incoming(
                msg.sender,
                msg.epoch,
                msg.transfer,
                msg.seq,
                msg.snap_epoch,
                self.store.begin_install(msg.seq, msg.snap_epoch),
                now,
                now,
                now,
            )
            self._incoming = t
            self.synced_epoch = 0  # our state is about to be replaced: not in step with anyone
            self._buffer.clear()
            log.info(
                "state transfer receiving",
                extra={"group": self.group, "epoch": msg.epoch, "peer": msg.sender, "seq": msg.seq},
            )
        elif msg.index != t.next_index:
            return []  # a duplicate (a resend crossed our pull)
        self.primary, self.last_heard = msg.sender, now
        try:
            t.sink.add(msg.data, msg.last)
        except Exception as exc:  # noqa: BLE001 - any bad chunk aborts the transfer; we ask again
            self.abort_transfer(f"chunk {msg.index} failed: {type(exc).__name__}: {exc}")
            return []
        t.next_index += 1
        t.last_chunk_at = t.last_pull_at = now
        if not msg.last:
            return [Send(msg.sender, SnapshotPull(self.group, self.name, msg.epoch, t.id, t.next_index))]
        self._incoming = None
        if self.position != (msg.seq, msg.snap_epoch):
            log.error(
                "state transfer installed at the wrong position",
                extra={"group": self.group, "peer": msg.sender, "seq": msg.seq, "position": self.position},
            )
            return []
        self.synced_epoch = msg.epoch
        self._asked = None
        log.info(
            "state transfer installed",
            extra={
                "group": self.group,
                "epoch": msg.epoch,
                "peer": msg.sender,
                "seq": msg.seq,
                "chunks": t.next_index,
                "seconds": round(now - t.started, 3),
            },
        )
        return [Send(msg.sender, ReplicateAck(self.group, self.name, msg.epoch, self.store.last_seq))]

    def handle(self, msg: Any, now: float) -> list[Send]:
        if isinstance(msg, Replicate):
            return self.on_replicate(msg, now)
        if isinstance(msg, SnapshotChunk):
            return self.on_chunk(msg, now)
        raise TypeError(f"backup cannot handle {type(msg).__name__}")


def kv_put(key: str, value: Any) -> dict[str, Any]:
    """The op `KVStateMachine` understands for a put."""
    return {"op": "put", "key": key, "value": value}


__all__ = [
    "CatchUpRequest",
    "ChainError",
    "ChangeRecord",
    "Fenced",
    "FencedError",
    "KVStateMachine",
    "MemoryReplicaStore",
    "NotReadyError",
    "ReplicaStore",
    "Replicate",
    "ReplicateAck",
    "ReplicationBackup",
    "ReplicationConfig",
    "ReplicationPrimary",
    "Send",
    "Snapshot",
    "SnapshotChunk",
    "SnapshotPull",
    "SnapshotSink",
    "SnapshotSource",
    "StateMachine",
    "kv_put",
]
