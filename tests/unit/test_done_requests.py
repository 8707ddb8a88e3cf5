"""Done-request tables (`euca_runtime.store.requests`) on real stores: the walrus and clc ones
record a request id in the same record as a delete, answer `done` from the cache, prune expired
rows a few per write, and undo like any op (a divergent suffix is discarded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from euca_runtime.services.clc import CLC_REQUESTS, CLC_SPEC
from euca_runtime.store import ObjectCache, Store, sqlite_url
from euca_runtime.store.requests import PRUNE_PER_WRITE, REQUEST_TTL, DoneRequests
from euca_runtime.walrus.model import WALRUS, WALRUS_REQUESTS

Fixture = tuple[Store, ObjectCache, DoneRequests]


@pytest.fixture(params=["walrus", "clc"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fixture]:
    component = str(request.param)
    st = Store.open(sqlite_url(tmp_path / f"{component}.db"), component=component, group=component)
    done = WALRUS_REQUESTS if component == "walrus" else CLC_REQUESTS
    yield st, ObjectCache(st, warm=True), done
    st.close()


def test_recorded_in_the_write_then_done(store: Fixture) -> None:
    st, cache, done = store
    assert not done.done(cache, "r1")
    assert done.ops(cache, None, "DeleteBucket", 100.0) == []
    assert not done.done(cache, None)
    st.apply(1, 1, done.ops(cache, "r1", "DeleteBucket", 100.0))
    assert done.done(cache, "r1")
    assert not done.done(cache, "r2")
    row = cache.get(done.table, "r1")
    assert row is not None and row["action"] == "DeleteBucket" and row["created_ts"] == 100.0


def test_expired_rows_pruned_a_few_per_write(store: Fixture) -> None:
    st, cache, done = store
    n = PRUNE_PER_WRITE + 3
    for i in range(n):
        st.apply(1, i + 1, done.ops(cache, f"old{i}", "DeleteUser", float(i)))
    later = REQUEST_TTL + n + 1.0
    ops = done.ops(cache, "new", "DeleteUser", later)
    assert len(ops) == 1 + PRUNE_PER_WRITE
    st.apply(1, n + 1, ops)
    left = {r["request_id"] for r in cache.items(done.table)}
    assert left == {"new"} | {f"old{i}" for i in range(PRUNE_PER_WRITE, n)}  # the oldest went first
    st.apply(1, n + 2, done.ops(cache, "newer", "DeleteUser", later))
    assert {r["request_id"] for r in cache.items(done.table)} == {"new", "newer"}


def test_a_discarded_suffix_forgets_the_request(store: Fixture) -> None:
    """A record from a deposed primary's divergent suffix is undone: the request is not done."""
    st, cache, done = store
    st.apply(1, 1, done.ops(cache, "kept", "DeleteVolume", 1.0))
    st.apply(1, 2, done.ops(cache, "lost", "DeleteVolume", 2.0))
    assert st.truncate_after(1) == 1
    assert done.done(cache, "kept")
    assert not done.done(cache, "lost")


def test_the_row_carries_the_first_result_and_undoes_to_it(store: Fixture) -> None:
    """A create records what its retry answers (``result``); a delete's row has none. `row` is
    the one lookup (`done` asks it); a put over a row undoes to the row it replaced."""
    st, cache, done = store
    assert done.row(cache, None) is None and done.row(cache, "r1") is None
    st.apply(1, 1, done.ops(cache, "r1", "CompleteMultipartUpload", 5.0, "abc-2"))
    st.apply(1, 2, done.ops(cache, "r2", "DeleteBucket", 6.0))
    row = done.row(cache, "r1")
    assert row is not None and (row["action"], row["created_ts"], row["result"]) == (
        "CompleteMultipartUpload",
        5.0,
        "abc-2",
    )
    row = done.row(cache, "r2")
    assert row is not None and row["result"] is None and done.done(cache, "r2")
    st.apply(1, 3, done.ops(cache, "r1", "CreateAccessKey", 7.0, "other"))
    assert st.truncate_after(2) == 1
    row = done.row(cache, "r1")
    assert row is not None and (row["action"], row["result"]) == ("CompleteMultipartUpload", "abc-2")


def test_migrations_match_the_request_models(store: Fixture) -> None:
    """The component's migrations (``clc_0005`` / ``walrus_0003`` add ``result``) create the
    request table exactly as the model declares it."""
    st, _, done = store
    combined = sa.MetaData()
    model_table = (CLC_SPEC if done is CLC_REQUESTS else WALRUS).metadata.tables[done.table]
    model_table.to_metadata(combined)
    with st.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), combined)
    # compare_metadata also reports the store's other tables as not in `combined`: keep ours.
    ours = [d for d in diff if done.table in repr(d)]
    assert ours == [], ours
