"""The `kv` component's data layer: the first user of the component plug-in interface.

Ops (all with "table": "kv"):

- ``{"op": "put", "table": "kv", "key": str, "value": bytes, "version": int | None}``:
  insert or replace; `version` defaults to the previous version + 1 (1 for a new key).
  The primary may set it explicitly so that the record fully determines the result.
- ``{"op": "delete", "table": "kv", "key": str}``: remove the key (a no-op if absent).

A `str` value is stored as its UTF-8 bytes; reads always return bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from sqlalchemy import BigInteger, LargeBinary, String, Table, bindparam, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from euca_runtime.store.component import ApplyContext, ComponentSpec, CoreApplyContext, register_component
from euca_runtime.store.errors import StoreError


class KvBase(DeclarativeBase):
    """Declarative base of the kv component (Alembic branch `kv`)."""


class KvEntry(KvBase):
    """One key: its value and a version that grows with every put."""

    __tablename__ = "kv"

    key: Mapped[str] = mapped_column(String(1024), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    version: Mapped[int] = mapped_column(BigInteger, nullable=False)


KV = register_component(ComponentSpec("kv", KvBase.metadata))


def put_op(key: str, value: bytes | str, version: int | None = None) -> dict[str, Any]:
    """Build a kv put op."""
    op: dict[str, Any] = {"op": "put", "table": "kv", "key": key, "value": value}
    if version is not None:
        op["version"] = version
    return op


def delete_op(key: str) -> dict[str, Any]:
    """Build a kv delete op."""
    return {"op": "delete", "table": "kv", "key": key}


def _key(op: Mapping[str, Any]) -> str:
    key = op.get("key")
    if not isinstance(key, str):
        raise StoreError(f"kv op needs a str key, got {key!r}")
    return key


def _value(key: str, op: Mapping[str, Any]) -> bytes:
    value = op.get("value")
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise StoreError(f"kv put {key!r}: value must be bytes or str, got {type(value).__name__}")
    return value


@KV.applier("kv", "put")
def _apply_put(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    key = _key(op)
    value = _value(key, op)
    row = ctx.session.get(KvEntry, key)
    if row is None:
        version = op.get("version")
        ctx.session.add(KvEntry(key=key, value=value, version=1 if version is None else version))
        return [delete_op(key)]
    undo = [put_op(key, row.value, row.version)]
    row.value = value
    version = op.get("version")
    row.version = row.version + 1 if version is None else version
    return undo


@KV.applier("kv", "delete")
def _apply_delete(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    key = _key(op)
    row = ctx.session.get(KvEntry, key)
    if row is None:
        return []
    undo = [put_op(key, row.value, row.version)]
    ctx.session.delete(row)
    return undo


# The lean write path (Core statements, no ORM unit of work): the same effects and undo ops as
# the appliers above, two statements per op; the rows go to the cache as written.
_KV = cast(Table, KvEntry.__table__)
_GET = select(_KV.c.value, _KV.c.version).where(_KV.c.key == bindparam("k"))
_INSERT = _KV.insert()
_UPDATE = _KV.update().where(_KV.c.key == bindparam("k")).values(value=bindparam("v"), version=bindparam("n"))
_DELETE = delete(_KV).where(_KV.c.key == bindparam("k"))


@KV.core_applier("kv", "put")
def _core_put(ctx: CoreApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    key = _key(op)
    value = _value(key, op)
    version = op.get("version")
    old = ctx.conn.execute(_GET, {"k": key}).first()
    if old is None:
        undo = [delete_op(key)]
        version = 1 if version is None else version
        ctx.conn.execute(_INSERT, {"key": key, "value": value, "version": version})
    else:
        undo = [put_op(key, old.value, old.version)]
        version = old.version + 1 if version is None else version
        ctx.conn.execute(_UPDATE, {"k": key, "v": value, "n": version})
    ctx.changed("kv", key, {"key": key, "value": value, "version": version})
    return undo


@KV.core_applier("kv", "delete")
def _core_delete(ctx: CoreApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    key = _key(op)
    old = ctx.conn.execute(_GET, {"k": key}).first()
    if old is None:
        return []
    ctx.conn.execute(_DELETE, {"k": key})
    ctx.changed("kv", key, None)
    return [put_op(key, old.value, old.version)]


def _utf8(key: Any) -> bool:
    """A str that SQLite (and msgpack) can store: encodable as UTF-8 (no lone surrogates)."""
    if not isinstance(key, str):
        return False
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


def _put_cannot_fail(op: Mapping[str, Any]) -> bool:
    version = op.get("version")
    return (
        _utf8(op.get("key"))
        and isinstance(op.get("value"), bytes)
        and (version is None or (type(version) is int and -(2**63) <= version < 2**63))
    )


def _delete_cannot_fail(op: Mapping[str, Any]) -> bool:
    return _utf8(op.get("key"))


# Checked puts (bytes values) and deletes always apply (an upsert and a delete by key): the
# primary sends their records to the backups before its own apply (`register_send_first`).
KV.register_send_first("kv", "put", _put_cannot_fail)
KV.register_send_first("kv", "delete", _delete_cannot_fail)
