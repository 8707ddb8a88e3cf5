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
from typing import Any

from sqlalchemy import BigInteger, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from euca_runtime.store.component import ApplyContext, ComponentSpec, register_component
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


@KV.applier("kv", "put")
def _apply_put(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    key = _key(op)
    value = op.get("value")
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, bytes):
        raise StoreError(f"kv put {key!r}: value must be bytes or str, got {type(value).__name__}")
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
