"""How a component plugs its own tables and change ops into the store.

A component (kv, clc, walrus, sc, ...) declares:

- its ORM models on its **own** declarative base, so its tables live in their own
  `MetaData` (only they are exported in its snapshots and loaded into its cache);
- an Alembic branch (label = the component name by default) under
  `euca_runtime/migrations/versions` that creates those tables;
- one *applier* per (table, op) pair. An applier gets an `ApplyContext` (an ORM session
  inside the apply transaction) and one op dict, changes rows through the session, and
  returns the *undo* ops that revert exactly that change (used to discard a divergent
  suffix). Undo ops are ordinary ops of the same component.

Example (the kv component is the reference)::

    class ClcBase(DeclarativeBase): ...
    CLC = register_component(ComponentSpec("clc", ClcBase.metadata))

    @CLC.applier("account", "put")
    def _put_account(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import MetaData, Table
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from euca_runtime.store.errors import StoreError, UnknownOp

Op = Mapping[str, Any]
"""One change op: a small dict with at least "op" and "table" keys."""

PrimaryKey = tuple[Any, ...]


@dataclass
class ApplyContext:
    """What an applier gets: the session of the apply transaction and the record's stamp.

    Rows changed through `session` (add/delete/attribute changes) are tracked
    automatically for the cache. An applier that changes rows with a bulk Core statement
    must call `touch(table, pk)` for each row it changed.
    """

    session: Session
    epoch: int
    seq: int
    component: ComponentSpec
    touched: dict[str, set[PrimaryKey]] = field(default_factory=dict)

    def touch(self, table: str, pk: PrimaryKey | Any) -> None:
        """Mark a row as changed so the cache reloads it after the commit."""
        key = pk if isinstance(pk, tuple) else (pk,)
        self.touched.setdefault(table, set()).add(key)


OpApplier = Callable[[ApplyContext, Op], list[dict[str, Any]]]
"""Applies one op in the apply transaction; returns the ops that undo it."""


@dataclass
class CoreApplyContext:
    """What a *core* applier gets: the Core connection of the apply transaction.

    The lean write path (`ComponentSpec.register_core_applier`): no ORM unit of work, and the
    applier reports the committed-to-be value of every row it changes with `changed` (the
    cache gets exactly those after the commit, without reading them back).
    """

    conn: Connection
    epoch: int
    seq: int
    component: ComponentSpec
    rows: dict[str, dict[PrimaryKey, Mapping[str, Any] | None]] = field(default_factory=dict)

    def changed(self, table: str, pk: PrimaryKey | Any, row: Mapping[str, Any] | None) -> None:
        """Row `pk` of `table` now holds `row` (every column; None: deleted)."""
        key = pk if isinstance(pk, tuple) else (pk,)
        self.rows.setdefault(table, {})[key] = row


CoreApplier = Callable[[CoreApplyContext, Op], list[dict[str, Any]]]
"""Applies one op through Core statements; returns the undo ops, reports rows via `changed`.
Must have exactly the effect (rows and undo ops) of the op's ORM applier."""

OpCheck = Callable[[Op], bool]
"""True when the op's Core applier cannot refuse it, whatever the rows hold (only the
database itself can fail then: I/O, disk full). See `ComponentSpec.register_send_first`."""


class ComponentSpec:
    """A component's tables, Alembic branch and op appliers."""

    def __init__(
        self,
        name: str,
        metadata: MetaData,
        *,
        branch: str | None = None,
        appliers: Mapping[tuple[str, str], OpApplier] | None = None,
        lazy_tables: Iterable[str] = (),
    ) -> None:
        """Declare a component.

        `branch` is the Alembic branch label that creates `metadata`'s tables (defaults
        to `name`). `lazy_tables` names tables the object cache fills on demand instead of
        preloading at warm-up (for tables too large to hold in memory whole).
        """
        self.name = name
        self.metadata = metadata
        self.branch = branch or name
        self._appliers: dict[tuple[str, str], OpApplier] = dict(appliers or {})
        self._core: dict[tuple[str, str], CoreApplier] = {}
        self._send_first: dict[tuple[str, str], OpCheck] = {}
        self.lazy_tables = frozenset(lazy_tables)
        unknown = self.lazy_tables - set(metadata.tables)
        if unknown:
            raise StoreError(f"component {name}: lazy_tables not in its metadata: {sorted(unknown)}")

    def __repr__(self) -> str:
        return f"ComponentSpec({self.name!r}, tables={sorted(self.metadata.tables)})"

    @property
    def tables(self) -> list[Table]:
        """The component's tables, parents before children (foreign-key order)."""
        return list(self.metadata.sorted_tables)

    def table(self, name: str) -> Table:
        """One of the component's tables by name."""
        try:
            return self.metadata.tables[name]
        except KeyError:
            raise StoreError(f"component {self.name} has no table {name!r}") from None

    @property
    def appliers(self) -> Mapping[tuple[str, str], OpApplier]:
        """The registered appliers, keyed by (table, op)."""
        return dict(self._appliers)

    def register_applier(self, table: str, op: str, fn: OpApplier) -> None:
        """Register `fn` to apply ops {"table": table, "op": op, ...}."""
        self.table(table)
        self._appliers[(table, op)] = fn

    def applier(self, table: str, op: str) -> Callable[[OpApplier], OpApplier]:
        """Decorator form of `register_applier`."""

        def deco(fn: OpApplier) -> OpApplier:
            self.register_applier(table, op, fn)
            return fn

        return deco

    def register_core_applier(self, table: str, op: str, fn: CoreApplier) -> None:
        """Register a lean Core version of the (table, op) applier (which must exist).

        `Store.apply` uses the Core appliers when every op of a record has one (one statement
        or two per op instead of the ORM's unit of work); otherwise the ORM appliers.
        """
        self.table(table)
        if (table, op) not in self._appliers:
            raise StoreError(f"component {self.name}: a core applier needs the ORM applier of {table}/{op}")
        self._core[(table, op)] = fn

    def core_applier(self, table: str, op: str) -> Callable[[CoreApplier], CoreApplier]:
        """Decorator form of `register_core_applier`."""

        def deco(fn: CoreApplier) -> CoreApplier:
            self.register_core_applier(table, op, fn)
            return fn

        return deco

    def register_send_first(self, table: str, op: str, check: OpCheck) -> None:
        """Let the primary send (table, op) ops to its backups before applying them itself.

        `check(op)` must return True only for an op that the (table, op) Core applier always
        applies, whatever the rows hold: a record of such ops goes out before the primary's
        own apply (`ReplicationPrimary.prepare`), so the two applies overlap; a record the
        primary then failed to apply would retire it (a failover), which only a database
        failure may cause. Ops of any other kind are applied first and sent after.
        """
        if (table, op) not in self._core:
            raise StoreError(f"component {self.name}: send-first needs the core applier of {table}/{op}")
        self._send_first[(table, op)] = check

    def send_first_ok(self, ops: Iterable[Op]) -> bool:
        """Every op is of a send-first kind and passes its check (see `register_send_first`)."""
        checks = self._send_first
        if not checks:
            return False
        for op in ops:
            try:
                check = checks.get((op["table"], op["op"]))
            except (KeyError, TypeError):
                return False
            if check is None or not check(op):
                return False
        return True

    def core_appliers_for(self, ops: Iterable[Op]) -> list[CoreApplier] | None:
        """The Core applier of every op, or None if any op has none (use the ORM path)."""
        core = self._core
        if not core:
            return None
        out: list[CoreApplier] = []
        for op in ops:
            try:
                fn = core.get((op["table"], op["op"]))
            except (KeyError, TypeError):
                return None
            if fn is None:
                return None
            out.append(fn)
        return out

    def lookup(self, op: Op) -> OpApplier:
        """The applier for one op; raises UnknownOp if there is none."""
        try:
            key = (op["table"], op["op"])
        except (KeyError, TypeError):
            raise UnknownOp(f"component {self.name}: malformed op {op!r}") from None
        try:
            return self._appliers[key]
        except KeyError:
            raise UnknownOp(f"component {self.name}: no applier for table={key[0]!r} op={key[1]!r}") from None

    def derive(self, name: str, appliers: Mapping[tuple[str, str], OpApplier]) -> ComponentSpec:
        """A new spec over the same tables and branch with extra or replaced appliers."""
        merged = {**self._appliers, **appliers}
        spec = ComponentSpec(
            name, self.metadata, branch=self.branch, appliers=merged, lazy_tables=self.lazy_tables
        )
        # Core appliers stay only where the ORM applier they mirror is unchanged.
        spec._core = {k: fn for k, fn in self._core.items() if k not in appliers}
        spec._send_first = {k: fn for k, fn in self._send_first.items() if k in spec._core}
        return spec


_REGISTRY: dict[str, ComponentSpec] = {}


def register_component(spec: ComponentSpec) -> ComponentSpec:
    """Make `spec` known by name (for `Store.open(url, component="name")`)."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing is not spec:
        raise StoreError(f"component {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_component(name: str) -> ComponentSpec:
    """A registered component by name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise StoreError(f"unknown component {name!r}; registered: {sorted(_REGISTRY)}") from None


def registered_components() -> dict[str, ComponentSpec]:
    """Every registered component, by name."""
    return dict(_REGISTRY)
