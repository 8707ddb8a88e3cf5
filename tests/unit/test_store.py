"""The per-instance store: fencing, ordering, idempotence, crash safety, change log,
snapshots and state transfer, divergent suffixes, local state, migrations.

Every test here except those named `test_sqlite_*` also runs against PostgreSQL from
`tests/integration/test_store_postgres.py`, which overrides the `new_db_url` fixture.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from euca_runtime.clock import ManualClock
from euca_runtime.store import (
    KV,
    ApplyResult,
    ComponentSpec,
    Divergence,
    EpochRange,
    GapError,
    KvBase,
    LogTruncated,
    Position,
    SnapshotError,
    StaleEpoch,
    Store,
    StoreError,
    UnknownOp,
    WrongGroup,
    common_prefix,
    delete_op,
    migrate,
    put_op,
    schema_heads,
    sqlite_url,
)
from euca_runtime.store.models import CoreBase

REPO = Path(__file__).resolve().parents[2]

OpenStore = Callable[..., Store]


# --- fixtures (the PostgreSQL module overrides new_db_url) --------------------------------


@pytest.fixture
def new_db_url(tmp_path: Path) -> Callable[[str | None], str]:
    """A factory of database URLs: a given name always maps to the same database, None to a
    fresh one."""
    counter = itertools.count()

    def make(name: str | None = None) -> str:
        return sqlite_url(tmp_path / f"{name or f'fresh{next(counter)}'}.db")

    return make


@pytest.fixture
def open_store(new_db_url: Callable[[str | None], str]) -> Iterator[OpenStore]:
    """Open stores (kv by default) and close them all at teardown."""
    opened: list[Store] = []

    def make(name: str | None = None, component: ComponentSpec | str | None = "kv", **kw: Any) -> Store:
        store = Store.open(new_db_url(name), component, **kw)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def kv_state(store: Store) -> dict[str, tuple[bytes, int]]:
    """The kv table as {key: (value, version)}."""
    return {r["key"]: (r["value"], r["version"]) for r in store.scan("kv")}


def boom(_ctx: Any, _op: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An applier that fails after earlier ops of its record already wrote."""
    raise RuntimeError("boom")


# --- migrations ------------------------------------------------------------------------------


def test_migrations_idempotent_and_match_models(open_store: OpenStore, new_db_url: Callable) -> None:
    store = open_store("m")
    heads = schema_heads(store.engine)
    assert heads == ["kv_0001"]
    assert migrate(store.engine, KV) == heads  # upgrade head again: a no-op
    store.close()
    again = open_store("m")  # reopening migrates again
    assert schema_heads(again.engine) == heads
    names = set(sa.inspect(again.engine).get_table_names())
    assert {"fence", "changelog", "voter_promise", "service_state", "kv", "alembic_version"} <= names

    combined = sa.MetaData()
    for table in (*CoreBase.metadata.tables.values(), *KvBase.metadata.tables.values()):
        table.to_metadata(combined)
    with again.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), combined)
    assert diff == [], f"models and migrations disagree: {diff}"


def test_core_only_store_has_no_component_tables(open_store: OpenStore) -> None:
    local = open_store("node", component=None)
    names = set(sa.inspect(local.engine).get_table_names())
    assert "kv" not in names
    assert {"fence", "changelog", "voter_promise", "service_state"} <= names
    with pytest.raises(StoreError):
        local.apply(1, 1, [put_op("k", b"v")])


def test_wrong_group_refused(open_store: OpenStore) -> None:
    open_store("g", group="kv").close()
    with pytest.raises(WrongGroup):
        open_store("g", group="kv:other")


# --- apply, fencing, ordering ------------------------------------------------------------------


def test_apply_records_state_log_and_fence(open_store: OpenStore) -> None:
    store = open_store()
    assert store.position() == Position(0, 0)
    assert store.fence() == 0
    assert store.apply(3, 1, [put_op("a", b"1"), put_op("b", "two")]) is ApplyResult.APPLIED
    assert (
        store.apply(3, 2, [put_op("a", b"11"), delete_op("b"), delete_op("missing")]) is ApplyResult.APPLIED
    )
    assert kv_state(store) == {"a": (b"11", 2)}
    assert store.position() == Position(3, 2)
    assert store.fence() == 3
    log = store.read_log(0)
    assert [(r.epoch, r.seq) for r in log] == [(3, 1), (3, 2)]
    assert log[0].ops == [put_op("a", b"1"), put_op("b", "two")]
    assert store.read_log(1)[0].seq == 2
    assert store.read_log(2) == []
    assert store.read_log(0, limit=1)[0].seq == 1


def test_stale_epoch_rejected_without_effect(open_store: OpenStore) -> None:
    store = open_store()
    store.apply(5, 1, [put_op("a", b"1")])
    with pytest.raises(StaleEpoch) as err:
        store.apply(4, 2, [put_op("a", b"stale")])
    assert (err.value.epoch, err.value.fence) == (4, 5)
    assert kv_state(store) == {"a": (b"1", 1)}
    assert store.position() == Position(5, 1)


def test_raise_fence_rejects_older_epochs(open_store: OpenStore) -> None:
    store = open_store()
    store.apply(1, 1, [put_op("a", b"1")])
    assert store.raise_fence(7) == 7
    assert store.raise_fence(3) == 7  # never lowered
    with pytest.raises(StaleEpoch):
        store.apply(6, 2, [put_op("a", b"x")])
    assert store.apply(7, 2, [put_op("a", b"x")]) is ApplyResult.APPLIED
    assert store.position() == Position(7, 2)


def test_gap_rejected(open_store: OpenStore) -> None:
    store = open_store()
    store.apply(1, 1, [put_op("a", b"1")])
    with pytest.raises(GapError) as err:
        store.apply(1, 3, [put_op("b", b"2")])
    assert (err.value.expected, err.value.got) == (2, 3)
    with pytest.raises(StoreError):
        store.apply(1, 0, [])
    assert store.position() == Position(1, 1)


def test_duplicate_is_noop(open_store: OpenStore) -> None:
    store = open_store(log_keep=2)
    for seq in range(1, 6):
        store.apply(1, seq, [put_op("k", str(seq))])
    before = kv_state(store)
    assert store.apply(1, 5, [put_op("k", b"retry")]) is ApplyResult.ALREADY_APPLIED
    assert store.apply(1, 4, [put_op("k", b"retry")]) is ApplyResult.ALREADY_APPLIED
    # Trimmed from the log but provably applied (same epoch as the base record).
    assert store.apply(1, 1, [put_op("k", b"retry")]) is ApplyResult.ALREADY_APPLIED
    assert kv_state(store) == before
    assert store.position() == Position(1, 5)


def test_conflicting_record_at_applied_seq_is_divergence(open_store: OpenStore) -> None:
    store = open_store()
    store.apply(1, 1, [put_op("a", b"1")])
    store.apply(1, 2, [put_op("a", b"2")])
    with pytest.raises(Divergence) as err:
        store.apply(2, 2, [put_op("a", b"other")])
    assert (err.value.seq, err.value.local_epoch, err.value.epoch) == (2, 1, 2)
    assert kv_state(store) == {"a": (b"2", 2)}


def test_failed_apply_leaves_nothing(open_store: OpenStore) -> None:
    spec = KV.derive("kv-boom", {("kv", "boom"): boom})
    store = open_store("boom", component=spec, group="kv")
    store.apply(1, 1, [put_op("a", b"1")])
    with pytest.raises(RuntimeError, match="boom"):
        store.apply(2, 2, [put_op("a", b"2"), put_op("b", b"2"), {"op": "boom", "table": "kv"}])
    with pytest.raises(UnknownOp):
        store.apply(2, 2, [put_op("c", b"3"), {"op": "nope", "table": "kv"}])
    with pytest.raises(UnknownOp):
        store.apply(2, 2, [{"no": "op"}])
    with pytest.raises(StoreError):
        store.apply(2, 2, [put_op("a", b"1"), {"op": "put", "table": "kv", "key": "z", "value": 5}])
    assert kv_state(store) == {"a": (b"1", 1)}
    assert store.position() == Position(1, 1)
    assert store.fence() == 1
    assert [r.seq for r in store.read_log(0)] == [1]
    assert store.apply(2, 2, [put_op("b", b"ok")]) is ApplyResult.APPLIED


def test_pluggable_appliers(open_store: OpenStore) -> None:
    def incr(ctx: Any, op: Mapping[str, Any]) -> list[dict[str, Any]]:
        from euca_runtime.store import KvEntry

        row = ctx.session.get(KvEntry, op["key"])
        if row is None:
            ctx.session.add(KvEntry(key=op["key"], value=b"1", version=1))
            return [delete_op(op["key"])]
        undo = [put_op(row.key, row.value, row.version)]
        row.value = str(int(row.value) + 1).encode()
        row.version += 1
        return undo

    spec = KV.derive("kv-incr", {("kv", "incr"): incr})
    store = open_store("incr", component=spec, group="kv")
    for seq in range(1, 4):
        store.apply(1, seq, [{"op": "incr", "table": "kv", "key": "n"}])
    assert kv_state(store) == {"n": (b"3", 3)}
    assert store.truncate_after(1) == 2
    assert kv_state(store) == {"n": (b"1", 1)}


# --- crash safety -------------------------------------------------------------------------------

_CRASHER = textwrap.dedent(
    """
    import os, sys
    from euca_runtime.store import KV, Store, put_op

    def crash(ctx, op):
        ctx.session.flush()  # the earlier ops of the record reached the database
        os._exit(9)

    spec = KV.derive("kv-crash", {("kv", "crash"): crash})
    store = Store.open(sys.argv[1], spec, group="kv")
    store.apply(2, 2, [put_op("a", b"new"), put_op("b", b"b"), {"op": "crash", "table": "kv"}])
    """
)


def test_process_death_mid_transaction_leaves_nothing(open_store: OpenStore, new_db_url: Callable) -> None:
    store = open_store("crash")
    store.apply(1, 1, [put_op("a", b"old")])
    store.close()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHER, new_db_url("crash")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 9, proc.stderr
    reopened = open_store("crash")
    assert kv_state(reopened) == {"a": (b"old", 1)}
    assert reopened.position() == Position(1, 1)
    assert reopened.fence() == 1
    assert [r.seq for r in reopened.read_log(0)] == [1]
    assert reopened.apply(2, 2, [put_op("a", b"after")]) is ApplyResult.APPLIED


# --- change log ----------------------------------------------------------------------------------


def test_log_is_trimmed_to_recent_records(open_store: OpenStore) -> None:
    store = open_store(log_keep=3)
    for seq in range(1, 11):
        store.apply(1 + seq // 5, seq, [put_op(f"k{seq}", b"v")])
    assert store.log_window() == (8, 10)
    assert [r.seq for r in store.read_log(7)] == [8, 9, 10]
    with pytest.raises(LogTruncated) as err:
        store.read_log(6)
    assert err.value.first_available == 8
    assert store.epoch_at(7) == 2  # the base record's epoch is kept
    assert store.epoch_at(6) is None
    assert store.epoch_ranges() == [EpochRange(2, 7, 9), EpochRange(3, 10, 10)]
    assert store.trim_log(keep=1) == 2
    assert store.log_window() == (10, 10)


def test_log_keep_none_keeps_everything(open_store: OpenStore) -> None:
    store = open_store(log_keep=None)
    for seq in range(1, 30):
        store.apply(1, seq, [put_op("k", b"v")])
    assert store.log_window() == (1, 29)
    assert store.trim_log() == 0


def test_common_prefix() -> None:
    r = EpochRange
    assert common_prefix([r(0, 0, 0)], [r(0, 0, 0)]) == 0
    assert common_prefix([r(0, 0, 0), r(1, 1, 9)], [r(0, 0, 0), r(1, 1, 5), r(2, 6, 8)]) == 5
    assert common_prefix([r(1, 100, 200)], [r(1, 150, 300)]) == 200
    assert common_prefix([r(1, 100, 200)], [r(1, 150, 150), r(2, 151, 300)]) == 150
    assert common_prefix([r(1, 100, 200)], [r(2, 500, 600)]) == 0


# --- divergent suffix --------------------------------------------------------------------------


def test_divergent_suffix_discarded(open_store: OpenStore) -> None:
    old = open_store("old", log_keep=None)  # the deposed primary
    new = open_store("new", log_keep=None)  # the backup that took over
    for seq in range(1, 4):
        for s in (old, new):
            s.apply(1, seq, [put_op("k", str(seq)), put_op(f"only{seq}", b"x")])
    at_3 = old.snapshot_digest()
    old.apply(1, 4, [put_op("k", b"lost"), delete_op("only1"), put_op("zombie", b"z")])
    old.apply(1, 5, [delete_op("k")])
    new.apply(2, 4, [put_op("k", b"new4")])
    new.apply(2, 5, [put_op("fresh", b"f")])
    new.apply(2, 6, [delete_op("only2")])

    agreed = common_prefix(old.epoch_ranges(), new.epoch_ranges())
    assert agreed == 3
    with pytest.raises(StoreError):
        old.truncate_after(agreed, older_than=1)  # would discard epoch-1 records: refused
    assert old.position() == Position(1, 5)
    assert old.truncate_after(agreed, older_than=2) == 2
    assert old.snapshot_digest() == at_3
    assert old.position() == Position(1, 3)
    for rec in new.read_log(agreed):
        assert old.apply(rec.epoch, rec.seq, rec.ops) is ApplyResult.APPLIED
    assert old.snapshot_digest() == new.snapshot_digest()
    assert old.truncate_after(10) == 0


def test_truncate_beyond_the_log_needs_a_snapshot(open_store: OpenStore) -> None:
    store = open_store(log_keep=2)
    for seq in range(1, 6):
        store.apply(1, seq, [put_op("k", str(seq))])
    with pytest.raises(LogTruncated):
        store.truncate_after(1)
    assert store.truncate_after(3) == 2
    assert kv_state(store) == {"k": (b"3", 3)}


# --- snapshots ------------------------------------------------------------------------------------


def test_snapshot_roundtrip_into_stale_store(open_store: OpenStore) -> None:
    src = open_store("src")
    for seq in range(1, 8):
        src.apply(2, seq, [put_op(f"k{seq}", bytes([seq]) * seq), put_op("same", str(seq))])
    src.apply(2, 8, [delete_op("k3")])
    dst = open_store("dst")
    dst.apply(1, 1, [put_op("junk", b"j"), put_op("k1", b"wrong")])
    chunks = list(src.export_snapshot(chunk_rows=2))
    assert chunks[0]["type"] == "begin" and chunks[-1]["type"] == "end"
    assert all(len(c["rows"]) <= 2 for c in chunks if c["type"] == "rows")
    assert dst.import_snapshot(iter(chunks)) == Position(2, 8)
    assert kv_state(dst) == kv_state(src)
    assert dst.snapshot_digest() == src.snapshot_digest()
    assert dst.fence() == 2
    assert dst.log_window() == (9, 8)  # nothing in the log, position from the snapshot
    assert dst.apply(2, 8, [put_op("x", b"dup")]) is ApplyResult.ALREADY_APPLIED
    assert dst.apply(2, 9, [put_op("next", b"n")]) is ApplyResult.APPLIED
    with pytest.raises(GapError):
        dst.apply(2, 11, [])


def test_snapshot_is_one_consistent_read_while_writes_continue(open_store: OpenStore) -> None:
    src = open_store("src")
    for seq in range(1, 6):
        src.apply(1, seq, [put_op(f"k{seq}", b"v")])
    stream = src.export_snapshot(chunk_rows=1)
    head = next(stream)
    first_rows = next(stream)
    src.apply(1, 6, [put_op("k1", b"changed"), put_op("k9", b"new"), delete_op("k5")])
    chunks = [head, first_rows, *stream]
    assert head["seq"] == 5
    dst = open_store("dst")
    assert dst.import_snapshot(chunks) == Position(1, 5)
    assert sorted(kv_state(dst)) == ["k1", "k2", "k3", "k4", "k5"]
    for rec in src.read_log(5):
        dst.apply(rec.epoch, rec.seq, rec.ops)
    assert dst.snapshot_digest() == src.snapshot_digest()


def _broken_streams(chunks: list[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
    rows = [c for c in chunks if c["type"] == "rows"]
    yield "no end", chunks[:-1]
    yield "empty", []
    yield "no begin", chunks[1:]
    yield "bad format", [{**chunks[0], "format": 99}, *chunks[1:]]
    yield "other schema", [{**chunks[0], "tables": [{"name": "kv", "columns": ["key"]}]}, *chunks[1:]]
    yield "tampered row", [chunks[0], {**rows[0], "rows": [["k1", b"evil", 1]]}, *rows[1:], chunks[-1]]
    yield "dropped chunk", [chunks[0], *rows[1:], chunks[-1]]
    yield "unknown table", [chunks[0], {"type": "rows", "table": "nope", "rows": []}, *chunks[1:]]
    yield "unknown chunk", [chunks[0], {"type": "what"}, *chunks[1:]]

    def dies() -> Iterator[dict[str, Any]]:
        yield chunks[0]
        yield rows[0]
        raise ConnectionError("peer went away")

    yield "transport error", dies()


def test_snapshot_import_is_all_or_nothing(open_store: OpenStore) -> None:
    src = open_store("src")
    for seq in range(1, 5):
        src.apply(3, seq, [put_op(f"k{seq}", b"v")])
    chunks = list(src.export_snapshot(chunk_rows=1))
    dst = open_store("dst")
    dst.apply(2, 1, [put_op("mine", b"m")])
    for label, stream in _broken_streams(chunks):
        with pytest.raises((SnapshotError, ConnectionError)):
            dst.import_snapshot(stream)
        assert kv_state(dst) == {"mine": (b"m", 1)}, label
        assert dst.position() == Position(2, 1), label
        assert [r.seq for r in dst.read_log(0)] == [1], label


def test_stale_snapshot_rejected(open_store: OpenStore) -> None:
    src = open_store("src")
    src.apply(1, 1, [put_op("a", b"old primary")])
    dst = open_store("dst")
    dst.raise_fence(2)
    with pytest.raises(StaleEpoch):
        dst.import_snapshot(src.export_snapshot())
    assert kv_state(dst) == {}


def test_snapshot_of_empty_store(open_store: OpenStore) -> None:
    src = open_store("src")
    src.raise_fence(2)  # a new primary that has not written yet
    dst = open_store("dst")
    dst.apply(1, 1, [put_op("a", b"1")])
    assert dst.import_snapshot(src.export_snapshot()) == Position(0, 0)
    assert kv_state(dst) == {}
    assert dst.fence() == 2
    assert dst.apply(2, 1, [put_op("b", b"2")]) is ApplyResult.APPLIED


# --- random histories (hypothesis) ----------------------------------------------------------------

keys = st.sampled_from(["a", "b", "c", "d", "e"])
ops = st.one_of(
    st.builds(put_op, keys, st.binary(max_size=6)),
    st.builds(delete_op, keys),
)
records = st.lists(st.lists(ops, min_size=1, max_size=3), min_size=1, max_size=12)
DB_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@DB_SETTINGS
@given(
    history=records,
    cut=st.integers(min_value=0, max_value=12),
    bumps=st.lists(st.booleans(), min_size=12, max_size=12),
    keep=st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
)
def test_snapshot_plus_log_replay_reproduces_primary(
    open_store: OpenStore, history: list[list[dict[str, Any]]], cut: int, bumps: list[bool], keep: int | None
) -> None:
    primary = open_store(log_keep=keep)
    backup = open_store()
    epoch = 1
    cut = min(cut, len(history))
    snapshot: list[dict[str, Any]] = []
    for seq, record in enumerate(history, start=1):
        if seq - 1 == cut:
            snapshot = list(primary.export_snapshot(chunk_rows=2))
        epoch += bumps[seq - 1]
        assert primary.apply(epoch, seq, record) is ApplyResult.APPLIED
    if cut == len(history):
        snapshot = list(primary.export_snapshot(chunk_rows=2))
    position = backup.import_snapshot(snapshot)
    assert position.seq == cut
    try:
        tail = primary.read_log(position.seq, limit=None)
    except LogTruncated:
        position = backup.import_snapshot(primary.export_snapshot(chunk_rows=3))
        tail = primary.read_log(position.seq, limit=None)
    for rec in tail:
        assert backup.apply(rec.epoch, rec.seq, rec.ops) is ApplyResult.APPLIED
    assert backup.snapshot_digest() == primary.snapshot_digest()
    assert kv_state(backup) == kv_state(primary)
    assert backup.position() == primary.position()


@DB_SETTINGS
@given(common=records, lost=records, won=records)
def test_divergent_suffix_discard_converges(
    open_store: OpenStore,
    common: list[list[dict[str, Any]]],
    lost: list[list[dict[str, Any]]],
    won: list[list[dict[str, Any]]],
) -> None:
    old = open_store(log_keep=None)
    new = open_store(log_keep=None)
    seq = 0
    for seq, record in enumerate(common, start=1):
        old.apply(1, seq, record)
        new.apply(1, seq, record)
    agreed_state = old.snapshot_digest()
    for i, record in enumerate(lost, start=seq + 1):
        old.apply(1, i, record)
    for i, record in enumerate(won, start=seq + 1):
        new.apply(2, i, record)
    point = common_prefix(old.epoch_ranges(), new.epoch_ranges())
    assert point == seq
    old.truncate_after(point, older_than=2)
    assert old.snapshot_digest() == agreed_state
    for rec in new.read_log(point, limit=None):
        old.apply(rec.epoch, rec.seq, rec.ops)
    assert old.snapshot_digest() == new.snapshot_digest()


KV_ORM = ComponentSpec("kv", KvBase.metadata, appliers=KV.appliers)
"""The kv component with its ORM appliers only (KV itself applies kv ops through Core)."""


def _changes_log(store: Store) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    store.add_listener(lambda ch: seen.append({t: dict(rows) for t, rows in ch.rows.items()}))
    return seen


@DB_SETTINGS
@given(history=records, batch=st.integers(min_value=1, max_value=4), back=st.integers(0, 12))
def test_core_kv_path_equals_the_orm_path(
    open_store: OpenStore, history: list[list[dict[str, Any]]], batch: int, back: int
) -> None:
    """The lean Core apply path of kv (records, batches, and undo through a truncate) has
    exactly the effects of the ORM appliers: state, log, undo ops, and the rows published to
    the cache."""
    assert KV.core_appliers_for([put_op("k", b"v"), delete_op("k")]) is not None
    assert KV_ORM.core_appliers_for([put_op("k", b"v")]) is None
    clock = ManualClock()
    core = open_store(log_keep=None, clock=clock)
    orm = open_store(component=KV_ORM, log_keep=None, clock=clock)
    published = {"core": _changes_log(core), "orm": _changes_log(orm)}
    recs = [(1, seq, record) for seq, record in enumerate(history, start=1)]
    for store in (core, orm):
        for i in range(0, len(recs), batch):
            part = recs[i : i + batch]
            if len(part) == 1:
                assert store.apply(*part[0]) is ApplyResult.APPLIED
            else:
                assert store.apply_batch(part, stamp=1) == Position(1, part[-1][1])
        assert store.apply(*recs[-1]) is ApplyResult.ALREADY_APPLIED
    assert published["core"] == published["orm"]
    assert kv_state(core) == kv_state(orm)
    assert core.read_log(0, limit=None) == orm.read_log(0, limit=None)
    with core.engine.connect() as a, orm.engine.connect() as b:
        undo = sa.text("SELECT seq, undo FROM changelog ORDER BY seq")
        assert a.execute(undo).all() == b.execute(undo).all()
    point = max(0, len(history) - back)
    assert core.truncate_after(point) == orm.truncate_after(point)
    assert kv_state(core) == kv_state(orm)
    assert core.position() == orm.position()


def test_core_kv_path_refuses_bad_ops_and_changes_nothing(open_store: OpenStore) -> None:
    store = open_store()
    store.apply(1, 1, [put_op("a", b"1")])
    with pytest.raises(StoreError):
        store.apply(1, 2, [put_op("b", b"2"), {"op": "put", "table": "kv", "key": "c", "value": 5}])
    with pytest.raises(StoreError):
        store.apply_batch([(1, 2, [put_op("b", b"2")]), (1, 3, [{"op": "delete", "table": "kv"}])], stamp=1)
    with pytest.raises(StaleEpoch):
        store.apply(0, 2, [put_op("b", b"2")], stamp=0)
    with pytest.raises(GapError):
        store.apply(1, 3, [put_op("b", b"2")])
    assert kv_state(store) == {"a": (b"1", 1)}
    assert store.position() == Position(1, 1)
    assert store.apply(1, 2, [put_op("a", "x"), delete_op("zz")]) is ApplyResult.APPLIED
    assert kv_state(store) == {"a": (b"x", 2)}


# --- local state -----------------------------------------------------------------------------------


def test_service_state_survives_reopen(open_store: OpenStore) -> None:
    clock = ManualClock()
    local = open_store("node", component=None, clock=clock)
    assert local.get_service_state("kv-node-a") is None
    local.set_service_state("kv-node-a", "stopped", reason="operator: maintenance")
    local.set_service_state("clc-node-a", "ENABLED")
    local.set_service_state("clc-node-a", "DISABLED")
    with pytest.raises(StoreError):
        local.set_service_state("x", "SLEEPING")
    local.close()
    reopened = open_store("node", component=None)
    target = reopened.get_service_state("kv-node-a")
    assert target is not None
    assert (target.state, target.reason, target.updated_ts) == (
        "STOPPED",
        "operator: maintenance",
        clock.wall(),
    )
    assert {k: v.state for k, v in reopened.service_states().items()} == {
        "kv-node-a": "STOPPED",
        "clc-node-a": "DISABLED",
    }
    assert reopened.clear_service_state("kv-node-a") is True
    assert reopened.clear_service_state("kv-node-a") is False


def test_voter_promises_survive_reopen(open_store: OpenStore) -> None:
    local = open_store("voter", component=None)
    assert local.get_promise("clc") is None
    local.put_promise("clc", {"epoch": 4, "holder": "node-a", "expires_in": 3.0})
    local.put_promise("clc", {"epoch": 5, "holder": "node-b", "expires_in": 3.0})
    local.put_promise("kv", {"epoch": 1, "holder": "node-a"})
    local.close()
    reopened = open_store("voter", component=None)
    assert reopened.get_promise("clc") == {"epoch": 5, "holder": "node-b", "expires_in": 3.0}
    assert set(reopened.promises()) == {"clc", "kv"}


def test_fence_and_position_survive_reopen(open_store: OpenStore) -> None:
    store = open_store("p")
    store.apply(4, 1, [put_op("a", b"1")])
    store.raise_fence(6)
    store.close()
    again = open_store("p")
    assert (again.fence(), again.position()) == (6, Position(4, 1))
    with pytest.raises(StaleEpoch):
        again.apply(5, 2, [put_op("a", b"2")])


# --- SQLite-only ------------------------------------------------------------------------------------


def test_sqlite_pragmas(open_store: OpenStore) -> None:
    store = open_store()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_sqlite_memory_and_unknown_backends_refused() -> None:
    with pytest.raises(StoreError):
        Store.open("sqlite://", "kv")
    with pytest.raises(StoreError):
        Store.open("sqlite:///:memory:", "kv")
    with pytest.raises(StoreError):
        Store.open("mysql://x/y", "kv")
    with pytest.raises(StoreError):
        Store.open(sqlite_url("/nonexistent-dir-ok/x.db"), "kv", sqlite_synchronous="OFF")


def test_sqlite_new_branch_revisions_apply_per_component(tmp_path: Path) -> None:
    """A later core revision upgrades existing databases; another component's branch is
    never applied to a kv database."""
    import euca_runtime.migrations as pkg

    scripts = tmp_path / "migrations"
    shutil.copytree(Path(pkg.__file__).parent, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    url = sqlite_url(tmp_path / "kv.db")
    Store.open(url, "kv").close()
    (scripts / "versions" / "core_0002_test.py").write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa
            from alembic import op
            revision = "core_0002"
            down_revision = "core_0001"
            branch_labels = None
            depends_on = None
            def upgrade():
                with op.batch_alter_table("service_state") as batch:
                    batch.add_column(sa.Column("note", sa.Text(), nullable=True))
            def downgrade():
                pass
            """
        )
    )
    (scripts / "versions" / "other_0001_test.py").write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa
            from alembic import op
            revision = "other_0001"
            down_revision = None
            branch_labels = ("other",)
            depends_on = "core_0001"
            def upgrade():
                op.create_table("account", sa.Column("id", sa.Integer, primary_key=True))
            def downgrade():
                pass
            """
        )
    )
    store = Store.open(url, "kv")
    try:
        heads = migrate(store.engine, KV, script_location=scripts)
        assert heads == ["core_0002", "kv_0001"]
        assert migrate(store.engine, KV, script_location=scripts) == heads
        inspector = sa.inspect(store.engine)
        assert "account" not in inspector.get_table_names()
        assert "note" in {c["name"] for c in inspector.get_columns("service_state")}
    finally:
        store.close()


def test_before_commit_runs_after_the_ops_and_can_roll_back(open_store: OpenStore) -> None:
    """The primary's early-send hook: called only once every op applied cleanly, and a failure
    from it (or anything after it) leaves nothing applied."""
    spec = KV.derive("kv-boom2", {("kv", "boom"): boom})
    store = open_store("hook", component=spec, group="kv")
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        store.apply(
            1, 1, [put_op("a", b"1"), {"op": "boom", "table": "kv"}], before_commit=lambda: calls.append(1)
        )
    assert calls == []  # a bad op fails before the hook: nothing was sent
    seen: list[Position] = []
    store.apply(1, 1, [put_op("a", b"1")], before_commit=lambda: seen.append(store.position()))
    assert seen == [Position(0, 0)]  # called before the commit
    assert store.position() == Position(1, 1)

    def fail() -> None:
        raise OSError("commit failed")

    with pytest.raises(OSError, match="commit failed"):
        store.apply(1, 2, [put_op("b", b"2"), put_op("c", b"3")], before_commit=fail)
    assert kv_state(store) == {"a": (b"1", 1)}  # the whole group-committed record or nothing
    assert store.position() == Position(1, 1)


def test_apply_batch_is_one_all_or_nothing_transaction(open_store: OpenStore) -> None:
    spec = KV.derive("kv-boom3", {("kv", "boom"): boom})
    store = open_store("batch", component=spec, group="kv")
    published: list[Any] = []
    store.add_listener(published.append)
    store.apply(1, 1, [put_op("a", b"1")])
    published.clear()
    batch = [
        (1, 2, [put_op("b", b"2")]),
        (2, 3, [put_op("a", b"3"), delete_op("b")]),
        (2, 4, [put_op("c", b"4")]),
    ]
    assert store.apply_batch(batch, stamp=2) == Position(2, 4)
    assert kv_state(store) == {"a": (b"3", 2), "c": (b"4", 1)}
    assert [(r.seq, r.epoch) for r in store.read_log(0)] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert store.fence() == 2
    assert len(published) == 1 and published[0].position == Position(2, 4)  # one publish, after commit
    assert published[0].rows["kv"][("b",)] is None and published[0].rows["kv"][("c",)]["value"] == b"4"
    # A bad op in the last record: nothing of the batch applies.
    with pytest.raises(RuntimeError, match="boom"):
        store.apply_batch([(2, 5, [put_op("d", b"5")]), (2, 6, [{"op": "boom", "table": "kv"}])], stamp=2)
    with pytest.raises(GapError):
        store.apply_batch([(2, 5, [put_op("d", b"5")]), (2, 7, [put_op("e", b"7")])], stamp=2)
    with pytest.raises(Divergence):
        store.apply_batch([(2, 4, [put_op("d", b"5")])], stamp=2)
    with pytest.raises(StaleEpoch):  # fencing: a batch stamped below the fence is refused whole
        store.apply_batch([(1, 5, [put_op("d", b"5")]), (1, 6, [put_op("e", b"6")])], stamp=1)
    with pytest.raises(StoreError):  # a record from the future
        store.apply_batch([(3, 5, [put_op("d", b"5")])], stamp=2)
    assert store.position() == Position(2, 4) and "d" not in kv_state(store)


def test_kv_send_first_accepts_only_ops_its_core_applier_always_applies(open_store: OpenStore) -> None:
    """The primary sends a record of send-first ops before applying it itself, so the check
    must accept only ops that apply whatever the rows hold, and refuse anything doubtful."""
    ok = [put_op("k", b"v"), put_op("k", b"w", version=7), delete_op("k"), delete_op("absent")]
    assert all(KV.send_first_ok([op]) for op in ok)
    assert KV.send_first_ok(ok)
    refused: list[dict[str, Any]] = [
        put_op("k", "a str value"),  # applied, but as its UTF-8 bytes: the applied-first path
        {"op": "put", "table": "kv", "key": 1, "value": b"v"},
        {"op": "put", "table": "kv", "key": "k"},
        put_op("k", b"v", version=2**63),
        {**put_op("k", b"v"), "version": True},
        put_op("\ud800", b"v"),  # not encodable as UTF-8
        {"op": "delete", "table": "kv"},
        {"op": "nope", "table": "kv", "key": "k"},
        {"table": "kv", "key": "k"},
    ]
    for op in refused:
        assert not KV.send_first_ok([op]), op
        assert not KV.send_first_ok([put_op("x", b"v"), op]), op
    assert not KV_ORM.send_first_ok([put_op("k", b"v")])  # no Core applier: no send-first
    store = open_store()
    for seq, op in enumerate(ok + ok, start=1):  # new and existing rows, present and absent keys
        assert store.apply(1, seq, [op]) is ApplyResult.APPLIED
