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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from euca_runtime.replication import ChainError, ChangeRecord, FencedError, Snapshot
from euca_runtime.store import LogTruncated, ObjectCache, Store, StoreError

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
    Snapshots are the store's own chunk stream (`Store.export_snapshot`), carried whole in one
    `StateTransfer` message (bounded by the bus frame size).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reload()

    def reload(self) -> None:
        """Re-read position and fence from the database."""
        pos = self.store.position()
        self._fence = self.store.fence()
        self._last_seq = pos.seq
        self._last_epoch = pos.epoch

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
            self._fence = self.store.raise_fence(epoch)

    def epoch_at(self, seq: int) -> int | None:
        if seq == self._last_seq:
            return self._last_epoch
        if seq > self._last_seq or seq < 0:
            return None
        return self.store.epoch_at(seq)

    def records_after(self, seq: int, limit: int) -> list[ChangeRecord] | None:
        if seq > self._last_seq or seq < 0:
            return None
        if seq == self._last_seq:
            return []
        prev = self.epoch_at(seq)
        if prev is None:
            return None
        try:
            rows = self.store.read_log(seq, limit)
        except LogTruncated:
            return None
        out: list[ChangeRecord] = []
        for row in rows:
            out.append(ChangeRecord(row.epoch, row.seq, prev, tuple(row.ops)))
            prev = row.epoch
        return out

    def append(self, record: ChangeRecord, stamp: int) -> None:
        if stamp < self._fence:
            raise FencedError(stamp, self._fence)
        if record.epoch > stamp:
            raise ChainError(f"record of epoch {record.epoch} delivered under older epoch {stamp}")
        if record.seq != self._last_seq + 1 or record.prev_epoch != self._last_epoch:
            raise ChainError(
                f"record ({record.seq}, {record.epoch}) prev {record.prev_epoch} does not follow "
                f"({self._last_seq}, {self._last_epoch})"
            )
        self.store.apply(record.epoch, record.seq, list(record.ops), stamp=stamp)
        self._fence = max(self._fence, stamp)
        self._last_seq, self._last_epoch = record.seq, record.epoch

    def snapshot(self) -> Snapshot:
        chunks = list(self.store.export_snapshot())
        head = chunks[0]
        return Snapshot(int(head["seq"]), int(head["epoch"]), chunks)

    def install(self, snapshot: Snapshot) -> None:
        if not isinstance(snapshot.state, list):
            raise StoreError("a snapshot's state must be the store's chunk list")
        self.store.import_snapshot(snapshot.state)
        self.reload()


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
