"""The write-through object cache: warm and cold reads, updates only after commit, resets on
snapshot import, divergent-suffix discard, lazy tables and the miss/write race."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from euca_runtime.store import (
    KV,
    ComponentSpec,
    ObjectCache,
    StaleEpoch,
    Store,
    StoreError,
    delete_op,
    put_op,
    sqlite_url,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(sqlite_url(tmp_path / "kv.db"), "kv")
    yield s
    s.close()


def fill(store: Store, n: int, epoch: int = 1) -> None:
    for seq in range(1, n + 1):
        store.apply(epoch, seq, [put_op(f"k{seq}", f"v{seq}")])


def test_warm_cache_serves_everything_from_memory(store: Store) -> None:
    fill(store, 5)
    cache = ObjectCache(store, warm=True)
    assert cache.warmed
    stats = cache.stats()
    assert (stats.loaded_rows, stats.size) == (5, 5)
    row = cache.get("kv", "k3")
    assert row is not None and dict(row) == {"key": "k3", "value": b"v3", "version": 1}
    assert cache.get("kv", "absent") is None  # complete table: a hit, no database read
    assert cache.contains("kv", ("k1",))
    assert {r["key"] for r in cache.items("kv")} == {f"k{i}" for i in range(1, 6)}
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (4, 0)
    assert stats.hit_ratio == 1.0
    with pytest.raises(TypeError):
        row["value"] = b"mutated"  # type: ignore[index]


def test_cold_cache_fills_lazily(store: Store) -> None:
    fill(store, 3)
    cache = ObjectCache(store)
    assert cache.get("kv", "k1") is not None
    assert cache.get("kv", "k1") is not None
    assert cache.get("kv", "nope") is None
    assert cache.get("kv", "nope") is None  # absent keys are not cached on a partial table
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loaded_rows) == (1, 3, 1)
    assert len(cache.items("kv")) == 3  # a full scan completes the table
    assert cache.get("kv", "nope") is None
    assert cache.stats().hits == 2
    cache.reset_stats()
    assert cache.stats().hits == 0 and cache.stats().size == 3


def test_writes_reach_the_cache_only_after_commit(store: Store) -> None:
    cache = ObjectCache(store, warm=True)
    store.apply(1, 1, [put_op("a", b"1"), put_op("b", b"2")])
    assert cache.get("kv", "a")["value"] == b"1"  # type: ignore[index]
    store.apply(1, 2, [put_op("a", b"11"), delete_op("b")])
    assert cache.get("kv", "a")["version"] == 2  # type: ignore[index]
    assert cache.get("kv", "b") is None
    updated = cache.stats().updated_rows

    seen: list[Any] = []
    store.add_listener(seen.append)
    with pytest.raises(StaleEpoch):
        store.apply(0, 3, [put_op("a", b"stale")])
    with pytest.raises(StoreError):
        store.apply(1, 3, [put_op("a", b"half"), {"op": "put", "table": "kv", "key": "c", "value": 1}])
    assert seen == []  # nothing committed, nothing published
    assert cache.get("kv", "a")["value"] == b"11"  # type: ignore[index]
    assert cache.get("kv", "c") is None
    assert cache.stats().updated_rows == updated


def test_failing_listener_does_not_undo_or_block(store: Store) -> None:
    def broken(_changes: Any) -> None:
        raise RuntimeError("listener bug")

    store.add_listener(broken)
    cache = ObjectCache(store, warm=True)
    store.apply(1, 1, [put_op("a", b"1")])
    assert cache.get("kv", "a") is not None
    store.remove_listener(broken)
    cache.close()
    store.apply(1, 2, [put_op("a", b"2")])
    assert cache.get("kv", "a")["value"] == b"1"  # type: ignore[index]  # detached


def test_snapshot_import_resets_and_rewarms(tmp_path: Path, store: Store) -> None:
    fill(store, 4, epoch=2)
    other = Store.open(sqlite_url(tmp_path / "other.db"), "kv")
    try:
        other.apply(1, 1, [put_op("stale", b"x"), put_op("k1", b"old")])
        cache = ObjectCache(other, warm=True)
        other.import_snapshot(store.export_snapshot())
        stats = cache.stats()
        assert stats.resets == 1
        assert cache.get("kv", "stale") is None
        assert cache.get("kv", "k1")["value"] == b"v1"  # type: ignore[index]
        assert cache.stats().misses == 0  # re-warmed: still complete

        cold = ObjectCache(other)
        other.import_snapshot(store.export_snapshot())
        assert cold.get("kv", "k2") is not None
        assert cold.stats().misses == 1  # a cold cache stays cold after a reset
    finally:
        other.close()


def test_truncate_after_updates_cache(store: Store) -> None:
    cache = ObjectCache(store, warm=True)
    store.apply(1, 1, [put_op("a", b"1")])
    store.apply(1, 2, [put_op("a", b"2"), put_op("b", b"b")])
    store.apply(1, 3, [delete_op("a")])
    store.truncate_after(1)
    assert dict(cache.get("kv", "a") or {}) == {"key": "a", "value": b"1", "version": 1}
    assert cache.get("kv", "b") is None


def test_backup_cache_is_warm_through_replication(tmp_path: Path, store: Store) -> None:
    backup = Store.open(sqlite_url(tmp_path / "backup.db"), "kv")
    try:
        backup_cache = ObjectCache(backup, warm=True)
        for seq in range(1, 20):
            record = [put_op(f"k{seq % 7}", str(seq))]
            backup.apply(1, seq, record)  # backups apply first, then the primary commits
            store.apply(1, seq, record)
        backup_cache.reset_stats()
        for i in range(7):
            assert backup_cache.get("kv", f"k{i}") == store.get_row("kv", f"k{i}")
        assert backup_cache.stats().misses == 0
    finally:
        backup.close()


def test_lazy_table(tmp_path: Path) -> None:
    spec = ComponentSpec("kv-lazy", KV.metadata, branch="kv", appliers=KV.appliers, lazy_tables=["kv"])
    store = Store.open(sqlite_url(tmp_path / "lazy.db"), spec, group="kv")
    try:
        store.apply(1, 1, [put_op("a", b"1"), put_op("b", b"2")])
        cache = ObjectCache(store, warm=True)
        assert cache.stats().size == 0  # lazy tables are not preloaded
        assert cache.get("kv", "a") is not None
        assert cache.get("kv", "a") is not None
        assert len(cache.items("kv")) == 2
        assert cache.stats().size == 1  # a scan does not pull a lazy table into memory
        store.apply(1, 2, [put_op("c", b"3")])  # writes still populate it
        assert cache.get("kv", "c") is not None
        assert cache.stats().misses == 2
    finally:
        store.close()
    with pytest.raises(StoreError):
        ComponentSpec("bad", KV.metadata, lazy_tables=["nope"])


def test_miss_racing_a_write_does_not_install_stale_row(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.apply(1, 1, [put_op("a", b"old")])
    cache = ObjectCache(store)
    real_get_row = store.get_row

    def get_row_then_write(table: str, pk: Any) -> dict[str, Any] | None:
        row = real_get_row(table, pk)  # read the old value ...
        store.apply(1, 2, [put_op("a", b"new")])  # ... then a write commits and is published
        return row

    monkeypatch.setattr(store, "get_row", get_row_then_write)
    assert cache.get("kv", "a")["value"] == b"old"  # type: ignore[index]
    monkeypatch.setattr(store, "get_row", real_get_row)
    assert cache.get("kv", "a")["value"] == b"new"  # type: ignore[index]


def test_cache_needs_a_component_store(tmp_path: Path) -> None:
    local = Store.open(sqlite_url(tmp_path / "node.db"))
    try:
        with pytest.raises(StoreError):
            ObjectCache(local)
    finally:
        local.close()


def test_unknown_table(store: Store) -> None:
    cache = ObjectCache(store)
    with pytest.raises(StoreError):
        cache.get("nope", 1)
    with pytest.raises(StoreError):
        cache.items("nope")
