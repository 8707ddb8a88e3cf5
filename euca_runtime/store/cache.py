"""The write-through object cache in front of a component store.

Reads are served from memory. There is one write path, `Store.apply` (and the state
transfer calls `import_snapshot` / `truncate_after`): the store commits, then publishes the
committed rows to the cache, so the cache never shows an uncommitted or rolled-back write.

Warm-up policy: **load everything at startup** (`ObjectCache(store, warm=True)` or
`warm()`), except tables a component declares lazy. DESIGN.md section 7 asks that a backup
that becomes primary serves at steady-state latency at once; a lazily filled cache would
make the first read of every key after a failover (or a restart) a database read, exactly
the latency cliff we must not have. Control-plane state (accounts, keys, volume and object
metadata) is small enough to hold whole; a component with a table too large to hold (say,
object metadata of a huge Walrus) marks it in `ComponentSpec.lazy_tables`, and that table
is filled on demand (positive entries only) and kept current by every write.

A cache that was never warmed behaves lazily for every table: that is the cold-start
baseline the benchmarks compare against. `stats()` exposes hits and misses (a miss is a
read that had to go to the database).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from euca_runtime.log import get_logger
from euca_runtime.store.component import PrimaryKey
from euca_runtime.store.db import Changes, Store
from euca_runtime.store.errors import StoreError

log = get_logger("store")

Row = Mapping[str, Any]


@dataclass(frozen=True)
class CacheStats:
    """Counters since creation (or the last `reset_stats`), plus the current size.

    - hits: reads answered from memory (including "no such row" for a complete table);
    - misses: reads that went to the database;
    - loaded_rows: rows read from the database by warm-up, misses and scans;
    - updated_rows: rows changed by committed writes;
    - resets: whole-state replacements (snapshot imports);
    - size: rows held now.
    """

    hits: int
    misses: int
    loaded_rows: int
    updated_rows: int
    resets: int
    size: int

    @property
    def hit_ratio(self) -> float:
        """hits / (hits + misses); 1.0 before any read."""
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


@dataclass
class _Table:
    name: str
    lazy: bool
    rows: dict[PrimaryKey, Row] = field(default_factory=dict)
    complete: bool = False  # every row of the table is in `rows`; a missing key does not exist


class ObjectCache:
    """Immutable row snapshots of one component's tables, kept current by the store."""

    def __init__(self, store: Store, *, warm: bool = False) -> None:
        """Attach to `store` (a component store); with `warm=True`, load it now."""
        if store.component is None:
            raise StoreError("an object cache needs a component store")
        self.store = store
        self.component = store.component
        self._mu = threading.RLock()
        self._tables = {
            t.name: _Table(t.name, lazy=t.name in self.component.lazy_tables) for t in self.component.tables
        }
        self._warmed = False
        self._generation = 0
        self._hits = 0
        self._misses = 0
        self._loaded = 0
        self._updated = 0
        self._resets = 0
        store.add_listener(self._on_changes)
        if warm:
            self.warm()

    def close(self) -> None:
        """Detach from the store (the cache stops following writes)."""
        self.store.remove_listener(self._on_changes)

    # ------------------------------------------------------------------ warm-up

    def warm(self) -> int:
        """Load every non-lazy table whole; returns the number of rows loaded.

        Holds the store's write lock meanwhile, so no write can slip between the read and
        the install. After a snapshot import the cache re-warms itself.
        """
        with self.store.write_lock:
            loaded = 0
            fresh: dict[str, dict[PrimaryKey, Row]] = {}
            for name, t in self._tables.items():
                if t.lazy:
                    continue
                pk_cols = [c.name for c in self.component.table(name).primary_key.columns]
                rows = self.store.scan(name)
                fresh[name] = {tuple(r[c] for c in pk_cols): MappingProxyType(r) for r in rows}
                loaded += len(rows)
            with self._mu:
                for name, table_rows in fresh.items():
                    t = self._tables[name]
                    t.rows = table_rows
                    t.complete = True
                self._generation += 1
                self._loaded += loaded
                self._warmed = True
        log.info("cache warmed", extra={"store_component": self.component.name, "rows": loaded})
        return loaded

    @property
    def warmed(self) -> bool:
        """Whether `warm()` ran (the cache then re-warms after snapshot imports)."""
        return self._warmed

    # ------------------------------------------------------------------ reads

    def get(self, table: str, key: PrimaryKey | Any) -> Row | None:
        """The row of `table` with primary key `key` (a scalar or a tuple), or None."""
        pk = key if isinstance(key, tuple) else (key,)
        with self._mu:
            t = self._table(table)
            row = t.rows.get(pk)
            if row is not None or t.complete:
                self._hits += 1
                return row
            self._misses += 1
            generation = self._generation
        loaded = self.store.get_row(table, pk)
        if loaded is None:
            return None
        frozen = MappingProxyType(loaded)
        with self._mu:
            self._loaded += 1
            # Install only if no write was published meanwhile (it could be newer than us).
            if generation == self._generation:
                t.rows[pk] = frozen
        return frozen

    def items(self, table: str) -> list[Row]:
        """Every row of `table`. From memory if the table is complete, else from the database
        (which then completes a non-lazy table)."""
        with self._mu:
            t = self._table(table)
            if t.complete:
                self._hits += 1
                return list(t.rows.values())
            self._misses += 1
            generation = self._generation
        scanned = self.store.scan(table)
        pk_cols = [c.name for c in self.component.table(table).primary_key.columns]
        frozen: list[Row] = [MappingProxyType(r) for r in scanned]
        with self._mu:
            self._loaded += len(frozen)
            if not t.lazy and generation == self._generation:
                t.rows = {tuple(r[c] for c in pk_cols): r for r in frozen}
                t.complete = True
        return list(frozen)

    def contains(self, table: str, key: PrimaryKey | Any) -> bool:
        """Whether the row exists (same cost and counters as `get`)."""
        return self.get(table, key) is not None

    def _table(self, name: str) -> _Table:
        try:
            return self._tables[name]
        except KeyError:
            raise StoreError(f"component {self.component.name} has no table {name!r}") from None

    # ------------------------------------------------------------------ writes (from the store)

    def _on_changes(self, changes: Changes) -> None:
        """Store listener: install committed rows; on a reset drop everything (and re-warm)."""
        if changes.reset:
            with self._mu:
                for t in self._tables.values():
                    t.rows = {}
                    t.complete = False
                self._generation += 1
                self._resets += 1
            if self._warmed:
                self.warm()
            return
        with self._mu:
            self._generation += 1
            for name, rows in changes.rows.items():
                cached = self._tables.get(name)
                if cached is None:
                    continue
                for pk, row in rows.items():
                    if row is None:
                        cached.rows.pop(pk, None)
                    else:
                        cached.rows[pk] = MappingProxyType(dict(row))
                    self._updated += 1

    # ------------------------------------------------------------------ metrics

    def stats(self) -> CacheStats:
        """Current counters and size."""
        with self._mu:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                loaded_rows=self._loaded,
                updated_rows=self._updated,
                resets=self._resets,
                size=sum(len(t.rows) for t in self._tables.values()),
            )

    def reset_stats(self) -> None:
        """Zero the counters (not the contents)."""
        with self._mu:
            self._hits = self._misses = self._loaded = self._updated = self._resets = 0
