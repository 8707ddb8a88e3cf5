"""The per-instance database: engine setup, Alembic migrations, fencing, change log, snapshots.

One `Store` is one database and serves exactly one component instance (one service group):
a process that hosts clc and kv opens two stores, e.g. ``DIR/clc.db`` and ``DIR/kv.db``
(or two PostgreSQL databases). A process may also open a *core-only* store
(`component=None`) for its own local state: lease-voter promises and operator-set
service states.

Why one database per component instance rather than one per process with a schema per
component: each group has its own primary (possibly on another host), its own epoch and
its own seq stream, so nothing ever needs a transaction across two components; a snapshot
import replaces one component's state without touching its neighbours; SQLite has one
writer lock per file, so co-located components do not queue behind each other; each
database carries only its own component's Alembic branch; and an operator can move, back
up or rebuild one instance's data alone (DESIGN.md section 7: "separate databases").

Write path (the replication core's contract):

- `apply(epoch, seq, ops)` applies one change record to the component's tables, appends it
  to the change log and raises the fence, all in ONE transaction, then publishes the
  committed row changes to listeners (the object cache). Records are fenced by epoch
  (`StaleEpoch`), must be contiguous (`GapError`), and re-applying the same (epoch, seq) is
  a no-op returning `ApplyResult.ALREADY_APPLIED`.
- State transfer: `export_snapshot()` streams the component's state and its (epoch, seq)
  as bounded chunks; `import_snapshot(chunks)` replaces the local state atomically; then
  `read_log(seq)` on the source gives the records to `apply` after it.
- A rejoining deposed primary finds the agreed prefix with `common_prefix()` over both
  sides' `epoch_ranges()` and discards its divergent suffix with `truncate_after(seq)`,
  which reverts those records using the undo ops stored with them.

SQLite settings (the embedded default) and why:

- WAL journal: readers (snapshot export, cache misses) never block the writer.
- ``synchronous=FULL``: in WAL mode, FULL syncs the WAL on every commit, so a commit that
  returned survives power loss or an OS crash. With NORMAL a committed transaction can be
  rolled back by a power failure (the WAL is only synced at checkpoints); a backup that
  acknowledged a record and then lost it could later be promoted without it, violating I2
  ("no lost acknowledged write"). The cost is one fsync per commit.
- ``foreign_keys=ON`` (components may declare foreign keys), ``busy_timeout``: a second
  connection waits for the write lock instead of failing at once.
- Write transactions start with ``BEGIN IMMEDIATE`` so the fence check and the write cannot
  interleave with another writer; reads use a deferred ``BEGIN`` (a consistent snapshot
  from their first read on).

PostgreSQL: URLs ``postgresql+psycopg://...`` (``postgresql://`` is taken to mean psycopg 3).
Writers serialise on the group's fence row (``SELECT ... FOR UPDATE``); snapshot export runs
in a REPEATABLE READ transaction with a server-side cursor.
"""

from __future__ import annotations

import enum
import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgpack
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy import Engine, Table, bindparam, create_engine, delete, event, func, inspect, select, tuple_
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

from euca_runtime.clock import Clock, RealClock
from euca_runtime.log import get_logger
from euca_runtime.store.component import (
    ApplyContext,
    ComponentSpec,
    CoreApplier,
    CoreApplyContext,
    Op,
    PrimaryKey,
    get_component,
)
from euca_runtime.store.errors import (
    Divergence,
    GapError,
    LogTruncated,
    SnapshotError,
    StaleEpoch,
    StoreError,
    WrongGroup,
)
from euca_runtime.store.models import ChangeLog, Fence, ServiceState, VoterPromise

log = get_logger("store")

_FENCE = cast(Table, Fence.__table__)
_CHANGELOG = cast(Table, ChangeLog.__table__)

# Prebuilt statements of the lean (Core) write path; SQLAlchemy caches their compiled form.
_Q_FENCE = select(_FENCE).where(_FENCE.c.group_name == bindparam("g")).with_for_update()
_Q_LOG_EPOCH = select(_CHANGELOG.c.epoch).where(_CHANGELOG.c.seq == bindparam("s"))
_I_LOG = _CHANGELOG.insert()
_D_LOG_UPTO = delete(_CHANGELOG).where(_CHANGELOG.c.seq <= bindparam("s"))
_U_FENCE = (
    _FENCE.update()
    .where(_FENCE.c.group_name == bindparam("g"))
    .values(
        epoch=bindparam("f_epoch"),
        applied_epoch=bindparam("f_applied_epoch"),
        applied_seq=bindparam("f_applied_seq"),
        base_epoch=bindparam("f_base_epoch"),
        base_seq=bindparam("f_base_seq"),
        updated_ts=bindparam("f_ts"),
    )
)

SNAPSHOT_FORMAT = 1
"""Version of the snapshot chunk format produced by `Store.export_snapshot`."""
SNAPSHOT_CHUNK_BYTES = 1024 * 1024
"""Default bound on the packed rows of one snapshot "rows" chunk (a single bigger row is alone)."""
_EXPORT_READ_AHEAD = 4
"""Rows a snapshot export fetches from the database at a time (memory: this times the biggest row)."""

SERVICE_STATES = frozenset({"STOPPED", "NOTREADY", "DISABLED", "ENABLED", "BROKEN"})
"""States an operator-set target may hold (DESIGN.md section 5)."""

_BEGIN_OPTION = "euca_sqlite_begin"
_CTX_KEY = "euca_apply_ctx"
_IN_CHUNK = 500  # keys per IN (...) query
_MIGRATION_LOCK_ID = 0x45554341  # "EUCA": pg advisory lock serialising concurrent upgrades


class ApplyResult(enum.Enum):
    """Outcome of `Store.apply`."""

    APPLIED = "applied"
    ALREADY_APPLIED = "already_applied"


@dataclass(frozen=True, order=True)
class Position:
    """The last change record applied: (epoch, seq). (0, 0) is an empty store."""

    epoch: int
    seq: int


@dataclass(frozen=True)
class LogRecord:
    """One change-log record as read back by `Store.read_log`."""

    epoch: int
    seq: int
    ops: list[dict[str, Any]]
    ts: float


@dataclass(frozen=True)
class EpochRange:
    """A run of consecutive seqs written in one epoch: [first_seq, last_seq]."""

    epoch: int
    first_seq: int
    last_seq: int


@dataclass(frozen=True)
class ServiceTarget:
    """An operator-set target state of a service instance."""

    service: str
    state: str
    reason: str | None
    updated_ts: float


RowChanges = Mapping[str, Mapping[PrimaryKey, Mapping[str, Any] | None]]
"""table name -> primary key -> the committed row (column name -> value), None if deleted."""


@dataclass(frozen=True)
class Changes:
    """What a committed write changed, as published to listeners after the commit.

    `reset` means the whole component state was replaced (snapshot import): drop
    everything and reload. Otherwise `rows` lists every changed row with its committed
    value (None when deleted).
    """

    position: Position
    rows: RowChanges = field(default_factory=dict)
    reset: bool = False


ChangeListener = Callable[[Changes], None]


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False)


def sqlite_url(path: str | Path) -> str:
    """The SQLAlchemy URL of a SQLite database file."""
    return URL.create("sqlite", database=str(Path(path).resolve())).render_as_string()


def alembic_config(url: str | None = None, *, script_location: str | Path | None = None) -> Config:
    """An Alembic config for this package's migration scripts (no alembic.ini needed).

    `script_location` overrides the scripts directory (tests use a patched copy).
    """
    import euca_runtime.migrations as migrations_pkg

    cfg = Config()
    location = script_location or Path(migrations_pkg.__file__).parent
    cfg.set_main_option("script_location", str(location))
    cfg.set_main_option("path_separator", "os")
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def make_engine(
    url: str | URL,
    *,
    sqlite_synchronous: str = "FULL",
    busy_timeout_ms: int = 5000,
) -> Engine:
    """An engine configured for the store (see the module docstring for the settings)."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        return _make_sqlite_engine(u, sqlite_synchronous, busy_timeout_ms)
    if backend == "postgresql":
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        return create_engine(u, pool_pre_ping=True)
    raise StoreError(f"unsupported database backend {backend!r} (use sqlite or postgresql)")


def _make_sqlite_engine(u: URL, synchronous: str, busy_timeout_ms: int) -> Engine:
    if synchronous.upper() not in {"NORMAL", "FULL", "EXTRA"}:
        raise StoreError(f"sqlite synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
    if not u.database or u.database == ":memory:" or u.query.get("mode") == "memory":
        raise StoreError("the store needs a SQLite file (an in-memory database is not durable)")
    Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, connect_args={"timeout": busy_timeout_ms / 1000.0})
    sync = synchronous.upper()

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        try:
            mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{u.database}: could not enable WAL (journal_mode={mode})")
            cur.execute(f"PRAGMA synchronous={sync}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _writer(engine: Engine) -> Engine:
    """The same engine, with write transactions that take the SQLite write lock up front."""
    return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})


def migrate(
    engine: Engine,
    component: ComponentSpec | None = None,
    *,
    script_location: str | Path | None = None,
) -> list[str]:
    """Upgrade the database to ``core@head`` (and ``<component branch>@head``). Idempotent.

    Runs in one transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: under an advisory
    lock), so concurrent openers of one database cannot both create the tables. Returns
    the database's Alembic heads afterwards.
    """
    cfg = alembic_config(script_location=script_location)
    targets = ["core@head"]
    if component is not None:
        targets.append(f"{component.branch}@head")
    with _writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_ID})")
        cfg.attributes["connection"] = conn
        for target in targets:
            try:
                command.upgrade(cfg, target)
            except CommandError as exc:
                raise StoreError(f"migration to {target} failed: {exc}") from exc
        heads = MigrationContext.configure(conn).get_current_heads()
    return sorted(heads)


def schema_heads(engine: Engine) -> list[str]:
    """The Alembic revisions a database is at (empty if never migrated)."""
    with engine.connect() as conn:
        return sorted(MigrationContext.configure(conn).get_current_heads())


def common_prefix(local: Sequence[EpochRange], remote: Sequence[EpochRange]) -> int:
    """The highest seq at which two logs agree (0 if they agree on nothing known).

    Two logs agree up to seq s iff their records at s carry the same epoch: one writer
    per epoch, contiguous appends (the log-matching property). The ranges come from each
    side's `Store.epoch_ranges()`; a returned 0 with a non-empty local log usually means a
    snapshot transfer is needed (`truncate_after(0)` raises `LogTruncated` then).
    """
    best = 0
    for mine in local:
        for theirs in remote:
            if mine.epoch != theirs.epoch:
                continue
            lo = max(mine.first_seq, theirs.first_seq)
            hi = min(mine.last_seq, theirs.last_seq)
            if lo <= hi:
                best = max(best, hi)
    return best


def _collect_touched(session: Session, _flush_context: Any) -> None:
    """after_flush hook: note the primary keys of component rows the flush wrote."""
    ctx: ApplyContext | None = session.info.get(_CTX_KEY)
    if ctx is None:
        return
    tables = ctx.component.metadata.tables
    for obj in (*session.new, *session.dirty, *session.deleted):
        state = inspect(obj)
        table = state.mapper.local_table
        if not isinstance(table, Table) or tables.get(table.name) is not table:
            continue
        pk = tuple(state.mapper.primary_key_from_instance(obj))
        ctx.touch(table.name, pk)


class Store:
    """One instance's database. Thread-safe; writers are serialised by an internal lock."""

    def __init__(
        self,
        engine: Engine,
        component: ComponentSpec | None,
        group: str | None,
        *,
        clock: Clock | None = None,
        log_keep: int | None = 10_000,
    ) -> None:
        """Wrap an already migrated engine; most callers want `Store.open`."""
        if component is not None and not group:
            raise StoreError("a component store needs a group name")
        if log_keep is not None and log_keep < 1:
            raise StoreError("log_keep must be at least 1 (or None to keep everything)")
        self.engine = engine
        self.component = component
        self.group = group
        self.clock: Clock = clock or RealClock()
        self.log_keep = log_keep
        self._writer = _writer(engine)
        self._sessions = sessionmaker(self._writer, expire_on_commit=False)
        event.listen(self._sessions, "after_flush", _collect_touched)
        self._readers = sessionmaker(engine, expire_on_commit=False)
        self._lock = threading.RLock()
        self._listeners: list[ChangeListener] = []
        if component is not None:
            self._claim_group()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        url: str | URL,
        component: ComponentSpec | str | None = None,
        group: str | None = None,
        *,
        clock: Clock | None = None,
        log_keep: int | None = 10_000,
        sqlite_synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
    ) -> Store:
        """Open (creating and migrating as needed) one instance's database.

        `component` is a `ComponentSpec` or a registered name ("kv"); None opens a core-only
        store (voter promises, service states). `group` names the service group the
        database serves (defaults to the component name); a database that already belongs
        to another group is refused with `WrongGroup`. `log_keep` is how many recent change
        records to retain for catch-up (None keeps all).
        """
        spec = get_component(component) if isinstance(component, str) else component
        engine = make_engine(url, sqlite_synchronous=sqlite_synchronous, busy_timeout_ms=busy_timeout_ms)
        try:
            heads = migrate(engine, spec)
            store = cls(
                engine,
                spec,
                (group or spec.name) if spec is not None else None,
                clock=clock,
                log_keep=log_keep,
            )
        except BaseException:
            engine.dispose()
            raise
        log.info(
            "store opened",
            extra={
                "url": engine.url.render_as_string(hide_password=True),
                "store_component": spec.name if spec else None,
                "group": store.group,
                "schema": heads,
            },
        )
        return store

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"Store({url!r}, component={self.component.name if self.component else None!r})"

    @property
    def write_lock(self) -> threading.RLock:
        """Held by every write and listener call; hold it to keep writes out (cache warm-up)."""
        return self._lock

    def add_listener(self, fn: ChangeListener) -> None:
        """Call `fn(changes)` after every committed write (in commit order, under `write_lock`).

        A listener must be quick and must not write to the store. An exception it raises is
        logged and does not undo the (already committed) write.
        """
        self._listeners.append(fn)

    def remove_listener(self, fn: ChangeListener) -> None:
        """Stop calling `fn`."""
        if fn in self._listeners:
            self._listeners.remove(fn)

    # ------------------------------------------------------------------ internals

    def _require_component(self) -> ComponentSpec:
        if self.component is None:
            raise StoreError("this is a core-only store (opened without a component)")
        return self.component

    def _claim_group(self) -> None:
        with self._sessions() as session, session.begin():
            rows = session.execute(select(Fence).with_for_update()).scalars().all()
            others = [r.group_name for r in rows if r.group_name != self.group]
            if others:
                raise WrongGroup(f"this database belongs to group {others[0]!r}, not {self.group!r}")
            if not rows:
                session.add(
                    Fence(
                        group_name=self.group,
                        epoch=0,
                        applied_epoch=0,
                        applied_seq=0,
                        base_epoch=0,
                        base_seq=0,
                        updated_ts=self.clock.wall(),
                    )
                )

    def _fence_row(self, session: Session, *, lock: bool) -> Fence:
        stmt = select(Fence).where(Fence.group_name == self.group)
        if lock:
            stmt = stmt.with_for_update()
        return session.execute(stmt).scalar_one()

    @staticmethod
    def _epoch_at(session: Session, f: Fence, seq: int) -> int | None:
        """The epoch of the local record at `seq`; None if it is before the known window."""
        if seq == f.base_seq:
            return f.base_epoch
        if seq < f.base_seq or seq > f.applied_seq:
            return None
        return session.execute(select(ChangeLog.epoch).where(ChangeLog.seq == seq)).scalar_one_or_none()

    def _rows_for(self, session: Session, touched: Mapping[str, set[PrimaryKey]]) -> dict[str, dict]:
        """The committed-to-be values of the touched rows (None for rows that are gone)."""
        spec = self._require_component()
        out: dict[str, dict[PrimaryKey, Mapping[str, Any] | None]] = {}
        for name, keys in touched.items():
            table = spec.table(name)
            pk_cols = list(table.primary_key.columns)
            found: dict[PrimaryKey, Mapping[str, Any] | None] = dict.fromkeys(keys)
            ordered = list(keys)
            for i in range(0, len(ordered), _IN_CHUNK):
                part = ordered[i : i + _IN_CHUNK]
                if len(pk_cols) == 1:
                    cond = pk_cols[0].in_([k[0] for k in part])
                else:
                    cond = tuple_(*pk_cols).in_(part)
                for row in session.execute(select(table).where(cond)):
                    m = dict(row._mapping)
                    found[tuple(m[c.name] for c in pk_cols)] = m
            out[name] = found
        return out

    def _publish(self, changes: Changes) -> None:
        for fn in list(self._listeners):
            try:
                fn(changes)
            except Exception:
                log.exception("store listener failed", extra={"group": self.group})

    def _trim(self, session: Session, f: Fence, keep: int) -> int:
        """Drop log records so that at most `keep` remain after the base; returns how many."""
        new_base = f.applied_seq - keep
        if new_base <= f.base_seq:
            return 0
        epoch = session.execute(select(ChangeLog.epoch).where(ChangeLog.seq == new_base)).scalar_one()
        session.execute(delete(ChangeLog).where(ChangeLog.seq <= new_base))
        dropped = new_base - f.base_seq  # the log is contiguous after the base
        f.base_seq = new_base
        f.base_epoch = epoch
        return dropped

    # ------------------------------------------------------------------ fencing and position

    def fence(self) -> int:
        """The highest epoch this store has seen."""
        self._require_component()
        with self._readers() as session, session.begin():
            return self._fence_row(session, lock=False).epoch

    def position(self) -> Position:
        """The (epoch, seq) of the last applied record (or imported snapshot)."""
        self._require_component()
        with self._readers() as session, session.begin():
            f = self._fence_row(session, lock=False)
            return Position(f.applied_epoch, f.applied_seq)

    def raise_fence(self, epoch: int) -> int:
        """Record that `epoch` exists (e.g. a newer lease was granted); returns the fence.

        From then on records stamped with a lower epoch are rejected. Never lowers it.
        """
        self._require_component()
        with self._lock, self._sessions() as session, session.begin():
            f = self._fence_row(session, lock=True)
            if epoch > f.epoch:
                f.epoch = epoch
                f.updated_ts = self.clock.wall()
                log.info("fence raised", extra={"group": self.group, "epoch": epoch})
            return f.epoch

    def apply(
        self,
        epoch: int,
        seq: int,
        ops: Sequence[Op],
        *,
        stamp: int | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> ApplyResult:
        """Apply change record (epoch, seq, ops) in one transaction with its log entry and fence.

        `stamp` is the fencing token: the epoch of the primary *delivering* the record
        (defaults to `epoch`). A catch-up replays records that older primaries created under
        the current primary's stamp; they keep their own `epoch` in the log, and the fence
        is checked against and raised to `stamp` (the `ReplicaStore.append` contract of
        `euca_runtime.replication`). A record from the future (`epoch > stamp`) is refused.

        Raises `StaleEpoch` if the stamp is below the fence, `GapError` if `seq` is not the
        next one, `Divergence` if a record with another epoch is already at `seq`,
        `UnknownOp` (or the applier's own error) if an op cannot be applied; in every case
        nothing is changed. Re-applying a record already applied returns
        `ApplyResult.ALREADY_APPLIED` and changes nothing (idempotent retries). After the
        commit, listeners (the cache) get the changed rows.

        `before_commit` is called as soon as every op applied cleanly (so a bad op fails before
        it), before the log row, the position update and COMMIT (the fsync); an exception it
        raises rolls the transaction back. A failure after it can only be the database's own
        (I/O, disk full), never the record's content.
        """
        spec = self._require_component()
        if seq < 1:
            raise StoreError(f"seq must be >= 1, got {seq}")
        token = epoch if stamp is None else stamp
        if epoch > token:
            raise StoreError(f"record of epoch {epoch} delivered under the older epoch {token}")
        op_list = [dict(op) for op in ops]
        blob = _pack(op_list)
        core = spec.core_appliers_for(op_list)
        if core is not None:
            return self._apply_core(epoch, seq, op_list, core, blob, token, before_commit)
        with self._lock:
            with self._sessions() as session, session.begin():
                f = self._fence_row(session, lock=True)
                if token < f.epoch:
                    log.warning(
                        "stale record rejected",
                        extra={"group": self.group, "epoch": token, "fence": f.epoch, "seq": seq},
                    )
                    raise StaleEpoch(token, f.epoch)
                if seq <= f.applied_seq:
                    local = self._epoch_at(session, f, seq)
                    if local == epoch or (local is None and seq < f.base_seq and epoch <= f.base_epoch):
                        return ApplyResult.ALREADY_APPLIED
                    raise Divergence(seq, local, epoch)
                if seq != f.applied_seq + 1:
                    raise GapError(f.applied_seq + 1, seq)
                ctx = ApplyContext(session=session, epoch=epoch, seq=seq, component=spec)
                session.info[_CTX_KEY] = ctx
                undo_per_op: list[list[dict[str, Any]]] = []
                for op in op_list:
                    undo_per_op.append(list(spec.lookup(op)(ctx, op)))
                    session.flush()
                if before_commit is not None:
                    before_commit()
                undo = [u for undos in reversed(undo_per_op) for u in undos]
                now = self.clock.wall()
                session.add(ChangeLog(seq=seq, epoch=epoch, ops=blob, undo=_pack(undo), ts=now))
                f.epoch = max(f.epoch, token)
                f.applied_epoch = epoch
                f.applied_seq = seq
                f.updated_ts = now
                if self.log_keep is not None:
                    self._trim(session, f, self.log_keep)
                session.flush()
                rows = self._rows_for(session, ctx.touched)
                session.info.pop(_CTX_KEY, None)
            self._publish(Changes(position=Position(epoch, seq), rows=rows))
        return ApplyResult.APPLIED

    def _core_log_and_fence(
        self,
        conn: Connection,
        f: dict[str, Any],
        logged: list[dict[str, Any]],
        token: int,
        now: float,
    ) -> None:
        """Core path: insert the log rows, trim the log, update the fence row (in `f`)."""
        conn.execute(_I_LOG, logged)
        last = logged[-1]
        f["epoch"] = max(f["epoch"], token)
        f["applied_epoch"], f["applied_seq"] = last["epoch"], last["seq"]
        if self.log_keep is not None:
            new_base = f["applied_seq"] - self.log_keep
            if new_base > f["base_seq"]:
                f["base_epoch"] = conn.execute(_Q_LOG_EPOCH, {"s": new_base}).scalar_one()
                conn.execute(_D_LOG_UPTO, {"s": new_base})
                f["base_seq"] = new_base
        conn.execute(
            _U_FENCE,
            {
                "g": self.group,
                "f_epoch": f["epoch"],
                "f_applied_epoch": f["applied_epoch"],
                "f_applied_seq": f["applied_seq"],
                "f_base_epoch": f["base_epoch"],
                "f_base_seq": f["base_seq"],
                "f_ts": now,
            },
        )

    @staticmethod
    def _core_epoch_at(conn: Connection, f: Mapping[str, Any], seq: int) -> int | None:
        if seq == f["base_seq"]:
            return int(f["base_epoch"])
        if seq < f["base_seq"] or seq > f["applied_seq"]:
            return None
        return conn.execute(_Q_LOG_EPOCH, {"s": seq}).scalar_one_or_none()

    def _apply_core(
        self,
        epoch: int,
        seq: int,
        op_list: list[dict[str, Any]],
        core: list[CoreApplier],
        blob: bytes,
        token: int,
        before_commit: Callable[[], None] | None,
    ) -> ApplyResult:
        """`apply` through the component's Core appliers (same checks, same effects)."""
        spec = self._require_component()
        with self._lock:
            with self._writer.begin() as conn:
                f = dict(conn.execute(_Q_FENCE, {"g": self.group}).one()._mapping)
                if token < f["epoch"]:
                    log.warning(
                        "stale record rejected",
                        extra={"group": self.group, "epoch": token, "fence": f["epoch"], "seq": seq},
                    )
                    raise StaleEpoch(token, f["epoch"])
                if seq <= f["applied_seq"]:
                    local = self._core_epoch_at(conn, f, seq)
                    if local == epoch or (local is None and seq < f["base_seq"] and epoch <= f["base_epoch"]):
                        return ApplyResult.ALREADY_APPLIED
                    raise Divergence(seq, local, epoch)
                if seq != f["applied_seq"] + 1:
                    raise GapError(f["applied_seq"] + 1, seq)
                ctx = CoreApplyContext(conn, epoch, seq, spec)
                undo_per_op = [list(fn(ctx, op)) for fn, op in zip(core, op_list, strict=True)]
                if before_commit is not None:
                    before_commit()
                undo = [u for undos in reversed(undo_per_op) for u in undos]
                now = self.clock.wall()
                row = {"seq": seq, "epoch": epoch, "ops": blob, "undo": _pack(undo), "ts": now}
                self._core_log_and_fence(conn, f, [row], token, now)
            self._publish(Changes(position=Position(epoch, seq), rows=ctx.rows))
        return ApplyResult.APPLIED

    def _apply_batch_core(
        self, records: list[tuple[int, int, list[dict[str, Any]], list[CoreApplier]]], stamp: int
    ) -> Position:
        """`apply_batch` through the component's Core appliers (same checks, same effects)."""
        spec = self._require_component()
        with self._lock:
            with self._writer.begin() as conn:
                f = dict(conn.execute(_Q_FENCE, {"g": self.group}).one()._mapping)
                if stamp < f["epoch"]:
                    log.warning(
                        "stale batch rejected",
                        extra={
                            "group": self.group,
                            "epoch": stamp,
                            "fence": f["epoch"],
                            "seq": records[0][1],
                        },
                    )
                    raise StaleEpoch(stamp, f["epoch"])
                rows: dict[str, dict[PrimaryKey, Mapping[str, Any] | None]] = {}
                logged: list[dict[str, Any]] = []
                now = self.clock.wall()
                last_seq = f["applied_seq"]
                for epoch, seq, op_list, core in records:
                    if seq <= last_seq:
                        raise Divergence(seq, self._core_epoch_at(conn, f, seq), epoch)
                    if seq != last_seq + 1:
                        raise GapError(last_seq + 1, seq)
                    ctx = CoreApplyContext(conn, epoch, seq, spec, rows)
                    undo_per_op = [list(fn(ctx, op)) for fn, op in zip(core, op_list, strict=True)]
                    undo = [u for undos in reversed(undo_per_op) for u in undos]
                    logged.append(
                        {"seq": seq, "epoch": epoch, "ops": _pack(op_list), "undo": _pack(undo), "ts": now}
                    )
                    last_seq = seq
                self._core_log_and_fence(conn, f, logged, stamp, now)
            position = Position(f["applied_epoch"], f["applied_seq"])
            self._publish(Changes(position=position, rows=rows))
        return position

    def apply_batch(self, records: Sequence[tuple[int, int, Sequence[Op]]], *, stamp: int) -> Position:
        """Apply consecutive new records ``(epoch, seq, ops)`` in ONE transaction (one fsync).

        What a backup does with several records of one replication message (catch-up, or
        group-committed records in flight together). All or nothing: the same checks as
        `apply` for each record (fence against `stamp`, chain, ops), and if any fails the
        exception propagates and nothing is applied, so a batch is never acknowledged in part
        (the caller may then retry record by record to apply the good prefix). Unlike
        `apply`, an already-applied record is an error here (`Divergence`/`GapError`). Returns
        the new position; listeners get one `Changes` for the whole batch after the commit.
        """
        spec = self._require_component()
        if not records:
            return self.position()
        for epoch, seq, _ in records:
            if seq < 1:
                raise StoreError(f"seq must be >= 1, got {seq}")
            if epoch > stamp:
                raise StoreError(f"record of epoch {epoch} delivered under the older epoch {stamp}")
        lists = [[dict(op) for op in ops] for _, _, ops in records]
        cores = [spec.core_appliers_for(ops) for ops in lists]
        if all(c is not None for c in cores):
            todo = [
                (e, s, ops, c)
                for (e, s, _), ops, c in zip(records, lists, cores, strict=True)
                if c is not None
            ]
            return self._apply_batch_core(todo, stamp)
        with self._lock:
            with self._sessions() as session, session.begin():
                f = self._fence_row(session, lock=True)
                if stamp < f.epoch:
                    log.warning(
                        "stale batch rejected",
                        extra={"group": self.group, "epoch": stamp, "fence": f.epoch, "seq": records[0][1]},
                    )
                    raise StaleEpoch(stamp, f.epoch)
                ctx: ApplyContext | None = None
                touched: dict[str, set[PrimaryKey]] = {}
                now = self.clock.wall()
                last_seq, last_epoch = f.applied_seq, f.applied_epoch
                for epoch, seq, ops in records:
                    if seq <= last_seq:
                        raise Divergence(seq, self._epoch_at(session, f, seq), epoch)
                    if seq != last_seq + 1:
                        raise GapError(last_seq + 1, seq)
                    op_list = [dict(op) for op in ops]
                    ctx = ApplyContext(session=session, epoch=epoch, seq=seq, component=spec)
                    session.info[_CTX_KEY] = ctx
                    undo_per_op: list[list[dict[str, Any]]] = []
                    for op in op_list:
                        undo_per_op.append(list(spec.lookup(op)(ctx, op)))
                        session.flush()
                    for table, keys in ctx.touched.items():
                        touched.setdefault(table, set()).update(keys)
                    undo = [u for undos in reversed(undo_per_op) for u in undos]
                    session.add(ChangeLog(seq=seq, epoch=epoch, ops=_pack(op_list), undo=_pack(undo), ts=now))
                    last_seq, last_epoch = seq, epoch
                f.epoch = max(f.epoch, stamp)
                f.applied_epoch = last_epoch
                f.applied_seq = last_seq
                f.updated_ts = now
                if self.log_keep is not None:
                    self._trim(session, f, self.log_keep)
                session.flush()
                if ctx is not None:
                    for table, keys in ctx.touched.items():
                        touched.setdefault(table, set()).update(keys)
                rows = self._rows_for(session, touched)
                session.info.pop(_CTX_KEY, None)
            position = Position(last_epoch, last_seq)
            self._publish(Changes(position=position, rows=rows))
        return position

    # ------------------------------------------------------------------ change log

    def log_window(self) -> tuple[int, int]:
        """(first seq still in the log, last applied seq); empty when first > last."""
        self._require_component()
        with self._readers() as session, session.begin():
            f = self._fence_row(session, lock=False)
            return f.base_seq + 1, f.applied_seq

    def read_log(
        self, after_seq: int, limit: int | None = 1000, *, max_bytes: int | None = None
    ) -> list[LogRecord]:
        """The records with seq > `after_seq`, oldest first, at most `limit` of them.

        With `max_bytes`, stops before the records' packed ops exceed it (but returns at least
        one record), reading them a few at a time: memory stays about `max_bytes`.
        Raises `LogTruncated` if some of them were already trimmed (or covered by an
        imported snapshot): the reader needs a snapshot instead.
        """
        self._require_component()
        with self._readers() as session, session.begin():
            f = self._fence_row(session, lock=False)
            if after_seq >= f.applied_seq:
                return []
            if after_seq < f.base_seq:
                raise LogTruncated(after_seq + 1, f.base_seq + 1)
            stmt = (
                select(ChangeLog.epoch, ChangeLog.seq, ChangeLog.ops, ChangeLog.ts)
                .where(ChangeLog.seq > after_seq)
                .order_by(ChangeLog.seq)
            )
            if limit is not None:
                stmt = stmt.limit(limit)
            out: list[LogRecord] = []
            size = 0
            rows = session.execute(stmt.execution_options(yield_per=_EXPORT_READ_AHEAD))
            for epoch, seq, ops, ts in rows:
                size += len(ops)
                if max_bytes is not None and out and size > max_bytes:
                    break
                out.append(LogRecord(epoch=epoch, seq=seq, ops=_unpack(ops), ts=ts))
            rows.close()
            return out

    def epoch_at(self, seq: int) -> int | None:
        """The epoch of the local record at `seq` (0 for seq 0); None if unknown or absent."""
        self._require_component()
        with self._readers() as session, session.begin():
            f = self._fence_row(session, lock=False)
            if seq == 0:
                return 0 if f.base_seq == 0 else None
            return self._epoch_at(session, f, seq)

    def epoch_ranges(self) -> list[EpochRange]:
        """The local log as epoch runs, starting at the base record (what `common_prefix` wants).

        A fresh store gives ``[EpochRange(0, 0, 0)]``. Small: one entry per epoch change.
        """
        self._require_component()
        with self._readers() as session, session.begin():
            f = self._fence_row(session, lock=False)
            ranges = [EpochRange(f.base_epoch, f.base_seq, f.base_seq)]
            stmt = (
                select(ChangeLog.epoch, func.min(ChangeLog.seq), func.max(ChangeLog.seq))
                .group_by(ChangeLog.epoch)
                .order_by(func.min(ChangeLog.seq))
            )
            for epoch, first, last in session.execute(stmt):
                prev = ranges[-1]
                if prev.epoch == epoch and prev.last_seq + 1 == first:
                    ranges[-1] = EpochRange(epoch, prev.first_seq, last)
                else:
                    ranges.append(EpochRange(epoch, first, last))
            return ranges

    def trim_log(self, keep: int | None = None) -> int:
        """Drop all but the `keep` most recent records (default: `log_keep`); returns how many."""
        self._require_component()
        keep = self.log_keep if keep is None else keep
        if keep is None:
            return 0
        with self._lock, self._sessions() as session, session.begin():
            f = self._fence_row(session, lock=True)
            return self._trim(session, f, max(0, keep))

    def truncate_after(self, seq: int, *, older_than: int | None = None) -> int:
        """Discard the records after `seq` (a divergent suffix), reverting their effects.

        Runs the stored undo ops newest first, deletes the records and moves the position
        back to `seq`, in one transaction. With `older_than`, refuses (StoreError) to discard
        any record whose epoch is not lower than it (pass the current primary's epoch: only
        a deposed primary's records may go). Raises `LogTruncated` if the suffix reaches
        before the retained log (a snapshot is needed). Returns the number discarded.
        """
        spec = self._require_component()
        with self._lock:
            with self._sessions() as session, session.begin():
                f = self._fence_row(session, lock=True)
                if seq >= f.applied_seq:
                    return 0
                if seq < f.base_seq:
                    raise LogTruncated(seq + 1, f.base_seq + 1)
                records = (
                    session.execute(
                        select(ChangeLog).where(ChangeLog.seq > seq).order_by(ChangeLog.seq.desc())
                    )
                    .scalars()
                    .all()
                )
                if len(records) != f.applied_seq - seq:
                    raise StoreError(
                        f"change log is not contiguous after seq {seq} ({len(records)} records "
                        f"for {f.applied_seq - seq} seqs)"
                    )
                if older_than is not None:
                    bad = [r.seq for r in records if r.epoch >= older_than]
                    if bad:
                        raise StoreError(
                            f"refusing to discard seq {bad[-1]}..{bad[0]}: not older than epoch {older_than}"
                        )
                ctx = ApplyContext(session=session, epoch=f.epoch, seq=seq, component=spec)
                session.info[_CTX_KEY] = ctx
                for record in records:
                    for op in _unpack(record.undo):
                        spec.lookup(op)(ctx, op)
                        session.flush()
                    session.delete(record)
                session.flush()
                f.applied_epoch = self._epoch_at(session, f, seq) or 0
                f.applied_seq = seq
                f.updated_ts = self.clock.wall()
                session.flush()
                rows = self._rows_for(session, ctx.touched)
                session.info.pop(_CTX_KEY, None)
                position = Position(f.applied_epoch, seq)
                discarded = len(records)
            log.warning(
                "divergent suffix discarded",
                extra={"group": self.group, "seq": seq, "discarded": discarded},
            )
            self._publish(Changes(position=position, rows=rows))
        return discarded

    # ------------------------------------------------------------------ snapshots

    def export_snapshot(
        self, chunk_rows: int = 500, max_bytes: int = SNAPSHOT_CHUNK_BYTES
    ) -> Iterator[dict[str, Any]]:
        """Stream the component's whole state as chunks, from one consistent read.

        Chunks (plain dicts of msgpack-able values):

        - ``{"type": "begin", "format": 1, "component", "group", "epoch", "seq", "fence",
          "tables": [{"name", "columns"}, ...]}``: (epoch, seq) is the position the state
          corresponds to; replay the source's log after `seq` on top of it.
        - ``{"type": "rows", "table", "rows": [[value, ...], ...]}``: at most `chunk_rows`
          rows and, unless a single row is bigger, at most about `max_bytes` of packed rows;
          values in the order of that table's "columns".
        - ``{"type": "end", "rows": {table: count}, "sha256": hex}``: a digest of all rows.

        Memory is bounded by one chunk plus a few rows of read-ahead (rows are fetched
        `_EXPORT_READ_AHEAD` at a time, never a whole table). The read transaction stays
        open until the iterator is exhausted or closed: consume it or call `.close()` on it
        (a state transfer keeps it open across the network round trips of its chunks).
        """
        spec = self._require_component()
        if chunk_rows < 1:
            raise StoreError("chunk_rows must be at least 1")
        if max_bytes < 1:
            raise StoreError("max_bytes must be at least 1")
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                f = conn.execute(select(_FENCE).where(Fence.group_name == self.group)).one()
                yield {
                    "type": "begin",
                    "format": SNAPSHOT_FORMAT,
                    "component": spec.name,
                    "group": self.group,
                    "epoch": f.applied_epoch,
                    "seq": f.applied_seq,
                    "fence": f.epoch,
                    "tables": [{"name": t.name, "columns": [c.name for c in t.columns]} for t in spec.tables],
                }
                digest = hashlib.sha256()
                counts: dict[str, int] = {}
                for table in spec.tables:
                    counts[table.name] = 0
                    stmt = select(table).order_by(*table.primary_key.columns)
                    result = conn.execution_options(yield_per=min(chunk_rows, _EXPORT_READ_AHEAD)).execute(
                        stmt
                    )
                    rows: list[list[Any]] = []
                    size = 0
                    for r in result:
                        row = list(r)
                        packed = _pack([table.name, row])
                        if rows and (len(rows) >= chunk_rows or size + len(packed) > max_bytes):
                            counts[table.name] += len(rows)
                            yield {"type": "rows", "table": table.name, "rows": rows}
                            rows, size = [], 0
                        digest.update(packed)
                        rows.append(row)
                        size += len(packed)
                    if rows:
                        counts[table.name] += len(rows)
                        yield {"type": "rows", "table": table.name, "rows": rows}
                yield {"type": "end", "rows": counts, "sha256": digest.hexdigest()}

    def snapshot_digest(self) -> tuple[Position, str]:
        """(position, sha256 of the component state): equal on replicas in the same state."""
        position = Position(0, 0)
        for chunk in self.export_snapshot():
            if chunk["type"] == "begin":
                position = Position(chunk["epoch"], chunk["seq"])
            elif chunk["type"] == "end":
                return position, chunk["sha256"]
        raise SnapshotError("snapshot stream ended without an end chunk")

    def import_snapshot(self, chunks: Iterable[Mapping[str, Any]]) -> Position:
        """Replace the component's state with a snapshot stream, atomically.

        Consumes `chunks` (as produced by `export_snapshot`, possibly from another host)
        inside one write transaction (see `begin_import`): deletes every row of the
        component's tables and the change log, inserts the snapshot's rows, checks counts and
        digest, and sets the position to the snapshot's (epoch, seq) and the fence to the
        higher of both fences. If the stream is malformed, truncated, corrupted or raises,
        nothing changes. Raises `StaleEpoch` for a snapshot whose fence is below the local
        fence (it comes from a deposed primary). Listeners get ``Changes(reset=True)``.
        Returns the new position; continue with the source's `read_log(position.seq)`.
        """
        it = iter(chunks)
        head = next(it, None)
        if not head:
            raise SnapshotError("snapshot stream does not start with a begin chunk")
        imp = self.begin_import(head)
        try:
            for chunk in it:
                position = imp.add(chunk)
                if position is not None:
                    return position
            raise SnapshotError("snapshot stream ended without an end chunk")
        finally:
            imp.abort()

    def begin_import(self, head: Mapping[str, Any]) -> SnapshotImport:
        """Start replacing the component's state with a snapshot, chunk by chunk.

        `head` is the stream's begin chunk; feed the following chunks to `SnapshotImport.add`
        as they arrive (e.g. one network message at a time). Everything happens in one write
        transaction that commits only when the end chunk checked out: until then readers see
        the old state, and `abort()`, an error or a crash (the transaction is never committed)
        leaves the store exactly as it was. Memory stays bounded by one chunk. While an import
        is open it holds the database's write lock: do not write to the store from anywhere
        else (abort it first).
        """
        return SnapshotImport(self, head)

    @staticmethod
    def _check_snapshot_tables(spec: ComponentSpec, declared: Any) -> dict[str, tuple[Table, list[str]]]:
        if not isinstance(declared, list):
            raise SnapshotError("snapshot begin chunk has no table list")
        got = {d["name"]: list(d["columns"]) for d in declared}
        want = {t.name: [c.name for c in t.columns] for t in spec.tables}
        if {k: sorted(v) for k, v in got.items()} != {k: sorted(v) for k, v in want.items()}:
            raise SnapshotError(f"snapshot schema {got} does not match the local schema {want}")
        return {name: (spec.table(name), cols) for name, cols in got.items()}

    # ------------------------------------------------------------------ reads

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """An ORM session in a read transaction (consistent snapshot); do not write with it."""
        with self._readers() as session, session.begin():
            yield session

    def get_row(self, table: str, pk: PrimaryKey | Any) -> dict[str, Any] | None:
        """One component row by primary key from the database (the cache's miss path)."""
        spec = self._require_component()
        key = pk if isinstance(pk, tuple) else (pk,)
        t = spec.table(table)
        cols = list(t.primary_key.columns)
        if len(cols) != len(key):
            raise StoreError(f"table {table} has a {len(cols)}-column primary key, got {key!r}")
        cond = [c == v for c, v in zip(cols, key, strict=True)]
        with self.engine.connect() as conn:
            row = conn.execute(select(t).where(*cond)).first()
            return dict(row._mapping) if row is not None else None

    def scan(self, table: str) -> list[dict[str, Any]]:
        """Every row of a component table, in primary-key order, from the database."""
        spec = self._require_component()
        t = spec.table(table)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(t).order_by(*t.primary_key.columns))]

    # ------------------------------------------------------------------ local state: voter promises

    def get_promise(self, group: str) -> dict[str, Any] | None:
        """The lease voter's persisted promise for `group`, or None."""
        with self._readers() as session, session.begin():
            row = session.get(VoterPromise, group)
            return json.loads(row.promise) if row is not None else None

    def put_promise(self, group: str, promise: Mapping[str, Any]) -> None:
        """Persist the voter's promise for `group`; durable when this returns."""
        doc = json.dumps(dict(promise), sort_keys=True, separators=(",", ":"))
        with self._lock, self._sessions() as session, session.begin():
            session.merge(VoterPromise(group_name=group, promise=doc, updated_ts=self.clock.wall()))

    def promises(self) -> dict[str, dict[str, Any]]:
        """Every persisted promise, by group."""
        with self._readers() as session, session.begin():
            return {
                r.group_name: json.loads(r.promise) for r in session.execute(select(VoterPromise)).scalars()
            }

    # ------------------------------------------------------------------ local state: service targets

    def set_service_state(self, service: str, state: str, reason: str | None = None) -> ServiceTarget:
        """Persist the operator-set target state of a service instance (durable on return)."""
        state = state.upper()
        if state not in SERVICE_STATES:
            raise StoreError(f"unknown service state {state!r}; one of {sorted(SERVICE_STATES)}")
        now = self.clock.wall()
        with self._lock, self._sessions() as session, session.begin():
            session.merge(ServiceState(service=service, state=state, reason=reason, updated_ts=now))
        log.info("service target set", extra={"service": service, "state": state, "reason": reason})
        return ServiceTarget(service, state, reason, now)

    def get_service_state(self, service: str) -> ServiceTarget | None:
        """The operator-set target state of `service`, or None if none was set."""
        with self._readers() as session, session.begin():
            row = session.get(ServiceState, service)
            return ServiceTarget(row.service, row.state, row.reason, row.updated_ts) if row else None

    def clear_service_state(self, service: str) -> bool:
        """Forget the operator-set target of `service`; True if there was one."""
        with self._lock, self._sessions() as session, session.begin():
            row = session.get(ServiceState, service)
            if row is None:
                return False
            session.delete(row)
            return True

    def service_states(self) -> dict[str, ServiceTarget]:
        """Every operator-set target, by service name."""
        with self._readers() as session, session.begin():
            return {
                r.service: ServiceTarget(r.service, r.state, r.reason, r.updated_ts)
                for r in session.execute(select(ServiceState)).scalars()
            }


class SnapshotImport:
    """One snapshot being imported chunk by chunk (`Store.begin_import`); single-threaded use.

    Holds one write transaction: the begin chunk is checked, the component's tables and change
    log are emptied, each `add`ed rows chunk is inserted, and the end chunk (row counts and
    digest must match) commits and publishes ``Changes(reset=True)``. Any error aborts (rolls
    back) and re-raises; so does `abort()`. Nothing is visible to readers before the commit.
    """

    def __init__(self, store: Store, head: Mapping[str, Any]) -> None:
        spec = store._require_component()
        if not isinstance(head, Mapping) or head.get("type") != "begin":
            raise SnapshotError("snapshot stream does not start with a begin chunk")
        if head.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"unsupported snapshot format {head.get('format')!r}")
        self.store = store
        self.tables = store._check_snapshot_tables(spec, head.get("tables"))
        try:
            self.position = Position(int(head["epoch"]), int(head["seq"]))
            self.snap_fence = int(head["fence"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"bad snapshot begin chunk: {exc}") from exc
        self.counts = dict.fromkeys(self.tables, 0)
        self.rows = 0
        self._digest = hashlib.sha256()
        self._conn: Connection | None = store._writer.connect()
        try:
            self._trans = self._conn.begin()
            f = self._conn.execute(
                select(_FENCE).where(Fence.group_name == store.group).with_for_update()
            ).one()
            if self.snap_fence < f.epoch:
                raise StaleEpoch(self.snap_fence, f.epoch)
            self._fence = int(f.epoch)
            for table in reversed(spec.tables):
                self._conn.execute(delete(table))
            self._conn.execute(delete(_CHANGELOG))
        except BaseException:
            self.abort()
            raise

    @property
    def open(self) -> bool:
        """Neither committed nor aborted yet."""
        return self._conn is not None

    def add(self, chunk: Mapping[str, Any]) -> Position | None:
        """Apply one chunk after the begin chunk; returns the new position once committed."""
        if self._conn is None:
            raise SnapshotError("this snapshot import is already finished")
        try:
            return self._add(self._conn, chunk)
        except BaseException:
            self.abort()
            raise

    def _add(self, conn: Connection, chunk: Mapping[str, Any]) -> Position | None:
        kind = chunk.get("type") if isinstance(chunk, Mapping) else None
        if kind == "rows":
            name = chunk.get("table")
            if name not in self.tables:
                raise SnapshotError(f"rows for unknown table {name!r}")
            table, columns = self.tables[name]
            rows = chunk.get("rows") or []
            for row in rows:
                self._digest.update(_pack([name, list(row)]))
            if rows:
                conn.execute(table.insert(), [dict(zip(columns, row, strict=True)) for row in rows])
            self.counts[name] += len(rows)
            self.rows += len(rows)
            return None
        if kind != "end":
            raise SnapshotError(f"unexpected chunk type {kind!r}")
        if chunk.get("rows") != self.counts:
            raise SnapshotError(f"row counts differ: sent {chunk.get('rows')}, got {self.counts}")
        if chunk.get("sha256") != self._digest.hexdigest():
            raise SnapshotError("snapshot digest mismatch")
        store, position = self.store, self.position
        conn.execute(
            _FENCE.update()
            .where(Fence.group_name == store.group)
            .values(
                epoch=max(self._fence, self.snap_fence),
                applied_epoch=position.epoch,
                applied_seq=position.seq,
                base_epoch=position.epoch,
                base_seq=position.seq,
                updated_ts=store.clock.wall(),
            )
        )
        with store._lock:
            self._trans.commit()
            self._close()
            log.info(
                "snapshot imported",
                extra={
                    "group": store.group,
                    "epoch": position.epoch,
                    "seq": position.seq,
                    "rows": self.counts,
                },
            )
            store._publish(Changes(position=position, reset=True))
        return position

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def abort(self) -> None:
        """Roll back (idempotent; a no-op after the commit)."""
        conn = self._conn
        if conn is None:
            return
        try:
            trans = getattr(self, "_trans", None)
            if trans is not None and trans.is_active:
                trans.rollback()
        finally:
            self._close()
