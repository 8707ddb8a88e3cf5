"""ORM models of the tables every instance database has (the `core` Alembic branch).

Components declare their own tables on their own declarative base (see
`euca_runtime.store.kv` for the first one); these core tables are the store's own
bookkeeping and are never part of a component's snapshot.

The Alembic migrations under `euca_runtime/migrations/versions` are the source of truth
for the schema; `tests/unit/test_store.py` checks that these models and the migrated
schema agree.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only makes `INTEGER PRIMARY KEY` an alias of the rowid (the fast clustered key);
# PostgreSQL gets a 64-bit column.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class CoreBase(DeclarativeBase):
    """Declarative base of the store's own tables (Alembic branch `core`)."""


class Fence(CoreBase):
    """Per service group: the fence (highest epoch seen) and the replica position.

    One row per group; a component database has exactly one. Every apply, import and
    truncate locks this row first, which serialises writers on PostgreSQL (SQLite has a
    single writer anyway).

    - `epoch`: the highest epoch ever seen; records stamped lower are rejected (I1).
    - `applied_epoch`, `applied_seq`: the last record applied (or the snapshot's position).
    - `base_epoch`, `base_seq`: the last record *before* the retained change log (trimmed
      away or covered by an imported snapshot), so the epoch at every seq in
      [base_seq, applied_seq] is known.
    """

    __tablename__ = "fence"

    group_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    applied_epoch: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    applied_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    base_epoch: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    base_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    updated_ts: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)


class ChangeLog(CoreBase):
    """The recent change records, for catch-up and for undoing a divergent suffix.

    `ops` and `undo` are msgpack blobs (lists of op dicts; bytes stay bytes). `undo` holds
    the inverse ops, already in the order they must be applied to revert the record.
    """

    __tablename__ = "changelog"

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=False)
    epoch: Mapped[int] = mapped_column(BigInteger, nullable=False)
    ops: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    undo: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    ts: Mapped[float] = mapped_column(Float, nullable=False)


class VoterPromise(CoreBase):
    """A lease voter's persisted promise for one group (a small JSON document)."""

    __tablename__ = "voter_promise"

    group_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    promise: Mapped[str] = mapped_column(Text, nullable=False)
    updated_ts: Mapped[float] = mapped_column(Float, nullable=False)


class ServiceState(CoreBase):
    """The operator-set target state of a service instance (e.g. STOPPED); survives restarts."""

    __tablename__ = "service_state"

    service: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_ts: Mapped[float] = mapped_column(Float, nullable=False)


__all__ = ["ChangeLog", "CoreBase", "Fence", "SeqType", "ServiceState", "VoterPromise"]
