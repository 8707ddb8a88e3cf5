"""The component model: what a hosted component declares and what the runtime gives it.

A *component type* (`ComponentType`) declares:

- its name (``kv``, ``clc``, ``walrus``, ``sc``, ``cc``, ``nc``, ``arbitrator``) and whether it
  is *partitioned* (one group per cluster, e.g. ``sc/cluster01``) or cloud-wide;
- whether it is *replicated* (a primary/backup group with leases, epochs and a replicated
  store) or independent (every instance serves on its own, e.g. an arbitrator);
- its ORM spec: the name of a `euca_runtime.store.ComponentSpec` (tables, Alembic branch, op
  appliers) when it owns replicated state;
- a factory that builds the `Component` object for one instance.

A `Component` (one per hosted instance) provides a health probe (`health`, called with a
timeout by the runtime: raising or hanging makes the instance NOTREADY while the process lives
on) and its bus handlers (`handlers`: method name -> ``async def handler(body, request)``).
It reads through `InstanceContext.cache` (the write-through object cache, warm on backups too)
and writes through `InstanceContext.write(ops)`, which returns once every in-sync backup has
applied the change (I2). Handlers only run on the ENABLED instance of a replicated group: the
bus routes by (type, partition) to wherever that is.

This module also holds the adapters between the pure protocol cores and the SQL store:
`SqlReplicaStore` (the `euca_runtime.replication.ReplicaStore` protocol over one component
`Store`) and `SqlVoterStorage` (the lease `VoterStorage` over the process's core-only store).
Both are blocking; the node calls them from a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from euca_runtime.log import get_logger
from euca_runtime.replication import ChainError, ChangeRecord, FencedError, Snapshot
from euca_runtime.store import LogTruncated, ObjectCache, SnapshotError, SnapshotImport, Store, StoreError

_log = get_logger("component")

HA_STATES = ("STOPPED", "NOTREADY", "DISABLED", "ENABLED", "BROKEN")
"""Service states (DESIGN.md section 5)."""

OPERATOR_STATES = ("ENABLED", "DISABLED", "STOPPED")
"""States an operator may ask for with ``eucactl modify-service``."""


class ServiceUnavailable(Exception):
    """The request could not be served here (not the ENABLED instance, stepping down, ...)."""

    def __init__(self, message: str, kind: str = "NotPrimary") -> None:
        super().__init__(message)
        self.kind = kind


class RequestError(Exception):
    """A request the component refuses (bad input, unknown method): not retried elsewhere."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class WriteResult:
    """A committed replicated write: the record's position."""

    epoch: int
    seq: int


@dataclass(frozen=True)
class RequestInfo:
    """What a handler knows about the request it serves."""

    method: str
    peer: str
    """The node the request came from (this node for a local call)."""
    expires_at: float
    """The request's deadline on this process's monotonic clock."""


ComponentHandler = Callable[[Any, RequestInfo], Awaitable[Any]]
"""``async def handler(body, request) -> response body`` (msgpack-able values)."""


class InstanceContext(Protocol):
    """What the runtime gives a component instance."""

    name: str
    type: str
    partition: str | None
    group: str
    node_name: str

    @property
    def store(self) -> Store | None: ...

    @property
    def cache(self) -> ObjectCache | None: ...

    async def write(self, ops: Sequence[Mapping[str, Any]], expires_at: float | None = None) -> WriteResult:
        """Replicate and apply `ops` as one change record; returns once committed (I2)."""
        ...

    async def call(
        self,
        type_: str,
        partition: str | None,
        method: str,
        body: Any = None,
        *,
        timeout: float = 5.0,
        dedupe: bool = True,
    ) -> Any:
        """Call the ENABLED instance of another group (location independent, I5)."""
        ...


class Component:
    """Base class of a hosted component. Subclasses add handlers and a better probe."""

    fault: str | None = None
    """Test fault injection: ``"hang"`` makes the probe and every handler hang."""

    def __init__(self, ctx: InstanceContext) -> None:
        self.ctx = ctx

    async def health(self) -> None:
        """Raise (or hang) when the component cannot serve. Default: a store read."""
        await self._fault_point()
        store = self.ctx.store
        if store is not None:
            await asyncio.to_thread(store.position)

    def handlers(self) -> Mapping[str, ComponentHandler]:
        """Bus methods served by the ENABLED instance."""
        return {}

    def peer_handlers(self) -> Mapping[str, ComponentHandler]:
        """Bus methods one instance of the group calls on another, named, instance in any
        state (``InstanceContext.call_peer``), e.g. a primary streaming bytes to a backup."""
        return {}

    def sync_blocked(self) -> bool:
        """True while this replica lacks data its applied log refers to: it then does not
        acknowledge replication (so it is not counted, nor recorded, in sync). Called from
        the replication thread; must be quick and thread-safe."""
        return False

    async def on_enabled(self, epoch: int) -> None:
        """Called when this instance becomes ENABLED (the lease holder, ready to write)."""

    async def on_disabled(self) -> None:
        """Called when this instance stops being ENABLED."""

    async def close(self) -> None:
        """Called once when the process stops the instance (release child processes, files)."""

    async def _fault_point(self) -> None:
        if self.fault == "hang":
            await asyncio.Event().wait()  # never set: hang until cancelled
        elif self.fault == "error":
            raise RuntimeError("injected fault")


@dataclass(frozen=True)
class ComponentType:
    """A kind of component the runtime can host."""

    name: str
    factory: Callable[[InstanceContext], Component]
    partitioned: bool = False
    replicated: bool = True
    """A leased primary/backup group. With a `store_component` its state is replicated; without
    one it is *leased, stateless* (e.g. the CC proxy): one ENABLED instance, epochs and voters
    as usual, and every healthy instance is a hot standby (nothing to catch up)."""
    store_component: str | None = None
    """The `euca_runtime.store` ComponentSpec name holding its tables (None: no state)."""
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


_TYPES: dict[str, ComponentType] = {}


def register_type(ctype: ComponentType) -> ComponentType:
    """Make a component type known to the runtime (idempotent for the same object)."""
    existing = _TYPES.get(ctype.name)
    if existing is not None and existing is not ctype:
        raise ValueError(f"component type {ctype.name!r} is already registered")
    _TYPES[ctype.name] = ctype
    return ctype


def get_type(name: str) -> ComponentType:
    """A registered component type; imports the bundled services on first use."""
    if name not in _TYPES:
        import euca_runtime.services  # noqa: F401  (registers the bundled types)
    try:
        return _TYPES[name]
    except KeyError:
        raise ValueError(f"unknown component type {name!r}; known: {sorted(_TYPES)}") from None


def component_types() -> dict[str, ComponentType]:
    """Every registered component type."""
    import euca_runtime.services  # noqa: F401

    return dict(_TYPES)


def group_key(type_: str, partition: str | None) -> str:
    """The service group's key: ``kv``, ``clc``, ``sc/cluster01``."""
    return f"{type_}/{partition}" if partition else type_


def split_group(group: str) -> tuple[str, str | None]:
    """Inverse of `group_key`."""
    type_, _, partition = group.partition("/")
    return type_, partition or None


# --------------------------------------------------------------------------- store adapters


class SqlReplicaStore:
    """The replication core's `ReplicaStore` over one component `Store` (blocking).

    The position and fence are cached in memory: only this adapter writes to the store (all
    calls come from the instance's single replication thread), so the cache stays exact.
    State transfer streams the store's own chunk format (`Store.export_snapshot`, one read
    transaction) in messages of about `max_bytes`, and installs it with `Store.begin_import`
    (one write transaction, committed by the last chunk). An install in progress is aborted
    by any other write (`append`, `raise_fence`): the store never holds two writers.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._sink: _SqlSnapshotSink | None = None
        self.reload()

    def reload(self) -> None:
        """Re-read position and fence from the database."""
        pos = self.store.position()
        self._fence = self.store.fence()
        self._last_seq = pos.seq
        self._last_epoch = pos.epoch

    def abort_install(self, why: str) -> None:
        """Roll back a snapshot install in progress, if any (the store stays as it was)."""
        sink, self._sink = self._sink, None
        if sink is not None and sink.open:
            _log.warning("snapshot install aborted", extra={"group": self.store.group, "reason": why})
            sink.abort()

    @property
    def fence_epoch(self) -> int:
        return self._fence

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def last_epoch(self) -> int:
        return self._last_epoch

    def raise_fence(self, epoch: int) -> None:
        if epoch > self._fence:
            self.abort_install(f"fence raised to {epoch}")
            self._fence = self.store.raise_fence(epoch)

    def epoch_at(self, seq: int) -> int | None:
        if seq == self._last_seq:
            return self._last_epoch
        if seq > self._last_seq or seq < 0:
            return None
        return self.store.epoch_at(seq)

    def records_after(self, seq: int, limit: int, max_bytes: int | None = None) -> list[ChangeRecord] | None:
        if seq > self._last_seq or seq < 0:
            return None
        if seq == self._last_seq:
            return []
        prev = self.epoch_at(seq)
        if prev is None:
            return None
        try:
            rows = self.store.read_log(seq, limit, max_bytes=max_bytes)
        except LogTruncated:
            return None
        out: list[ChangeRecord] = []
        for row in rows:
            out.append(ChangeRecord(row.epoch, row.seq, prev, tuple(row.ops)))
            prev = row.epoch
        return out

    def append(
        self, record: ChangeRecord, stamp: int, before_commit: Callable[[], None] | None = None
    ) -> None:
        self.abort_install("a record was appended")
        if stamp < self._fence:
            raise FencedError(stamp, self._fence)
        if record.epoch > stamp:
            raise ChainError(f"record of epoch {record.epoch} delivered under older epoch {stamp}")
        if record.seq != self._last_seq + 1 or record.prev_epoch != self._last_epoch:
            raise ChainError(
                f"record ({record.seq}, {record.epoch}) prev {record.prev_epoch} does not follow "
                f"({self._last_seq}, {self._last_epoch})"
            )
        self.store.apply(record.epoch, record.seq, record.ops, stamp=stamp, before_commit=before_commit)
        self._fence = max(self._fence, stamp)
        self._last_seq, self._last_epoch = record.seq, record.epoch

    def open_snapshot(self, max_bytes: int) -> _SqlSnapshotSource:
        return _SqlSnapshotSource(self.store, max_bytes)

    def begin_install(self, seq: int, epoch: int) -> _SqlSnapshotSink:
        self.abort_install("a new snapshot install")
        self._sink = _SqlSnapshotSink(self, seq, epoch)
        return self._sink

    def append_batch(self, records: Sequence[ChangeRecord], stamp: int) -> None:
        if stamp < self._fence:
            raise FencedError(stamp, self._fence)
        last_seq, last_epoch = self._last_seq, self._last_epoch
        for record in records:
            if record.seq != last_seq + 1 or record.prev_epoch != last_epoch:
                raise ChainError(
                    f"record ({record.seq}, {record.epoch}) prev {record.prev_epoch} does not follow "
                    f"({last_seq}, {last_epoch})"
                )
            last_seq, last_epoch = record.seq, record.epoch
        pos = self.store.apply_batch([(r.epoch, r.seq, r.ops) for r in records], stamp=stamp)
        self._fence = max(self._fence, stamp)
        self._last_seq, self._last_epoch = pos.seq, pos.epoch

    def snapshot(self) -> Snapshot:
        """The whole state in memory (tests and small stores only; transfers use `open_snapshot`)."""
        chunks = list(self.store.export_snapshot())
        head = chunks[0]
        return Snapshot(int(head["seq"]), int(head["epoch"]), chunks)

    def install(self, snapshot: Snapshot) -> None:
        if not isinstance(snapshot.state, list):
            raise StoreError("a snapshot's state must be the store's chunk list")
        self.abort_install("a whole snapshot install")
        self.store.import_snapshot(snapshot.state)
        self.reload()


class _SqlSnapshotSource:
    """`Store.export_snapshot` regrouped into transfer chunks: lists of store chunks, each list
    at most one "rows" chunk (about `max_bytes`) plus the begin and end chunks around it."""

    def __init__(self, store: Store, max_bytes: int) -> None:
        self._gen: Iterator[dict[str, Any]] | None = store.export_snapshot(
            chunk_rows=1_000_000, max_bytes=max(1, max_bytes)
        )
        head = next(self._gen)
        self.seq, self.epoch = int(head["seq"]), int(head["epoch"])
        self._pending: dict[str, Any] | None = head

    def next_chunk(self) -> tuple[Any, bool]:
        gen = self._gen
        if gen is None:
            raise SnapshotError("the snapshot is closed")
        out: list[dict[str, Any]] = []
        has_rows = False
        while True:
            chunk = self._pending if self._pending is not None else next(gen, None)
            self._pending = None
            if chunk is None:
                raise SnapshotError("snapshot export ended without an end chunk")
            if chunk["type"] == "rows":
                if has_rows:
                    self._pending = chunk
                    return out, False
                has_rows = True
            out.append(chunk)
            if chunk["type"] == "end":
                self.close()
                return out, True

    def close(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()  # type: ignore[attr-defined]


class _SqlSnapshotSink:
    """Feeds transfer chunks to a `SnapshotImport` (one write transaction until the last one)."""

    def __init__(self, owner: SqlReplicaStore, seq: int, epoch: int) -> None:
        self.owner, self.seq, self.epoch = owner, seq, epoch
        self.imp: SnapshotImport | None = None
        self.open = True

    def add(self, data: Any, last: bool) -> None:
        if not self.open:
            raise SnapshotError("this snapshot install is finished")
        try:
            if not isinstance(data, list) or not all(isinstance(c, Mapping) for c in data):
                raise SnapshotError("a transfer chunk must be a list of store chunks")
            done = False
            for chunk in data:
                if self.imp is None:
                    if (chunk.get("seq"), chunk.get("epoch")) != (self.seq, self.epoch):
                        raise SnapshotError(
                            f"snapshot begins at ({chunk.get('seq')}, {chunk.get('epoch')}), "
                            f"announced ({self.seq}, {self.epoch})"
                        )
                    self.imp = self.owner.store.begin_import(chunk)
                elif done:
                    raise SnapshotError("data after the end chunk")
                else:
                    done = self.imp.add(chunk) is not None
            if last != done:
                raise SnapshotError("the end chunk and the last transfer chunk disagree")
        except BaseException:
            self.abort()
            raise
        if done:
            self.open = False
            if self.owner._sink is self:
                self.owner._sink = None
            self.owner.reload()

    def abort(self) -> None:
        self.open = False
        imp, self.imp = self.imp, None
        if imp is not None:
            imp.abort()
        if self.owner._sink is self:
            self.owner._sink = None


class SqlVoterStorage:
    """The lease voter's `VoterStorage` over the process's core-only store (blocking)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def load(self) -> Mapping[str, Mapping[str, Any]]:
        return self.store.promises()

    def save(self, group: str, record: Mapping[str, Any]) -> None:
        self.store.put_promise(group, record)


__all__ = [
    "HA_STATES",
    "OPERATOR_STATES",
    "Component",
    "ComponentHandler",
    "ComponentType",
    "InstanceContext",
    "RequestError",
    "RequestInfo",
    "ServiceUnavailable",
    "SqlReplicaStore",
    "SqlVoterStorage",
    "WriteResult",
    "component_types",
    "get_type",
    "group_key",
    "register_type",
    "split_group",
]
