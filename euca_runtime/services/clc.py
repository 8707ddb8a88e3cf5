"""The clc component (placeholder): owns the service registry, the topology of the cloud.

The registry is a replicated table of the clc group: one row per service instance
(``name``, ``type``, ``partition``, ``node``, ``host``, ``registered``). Instances register
themselves when they first see an ENABLED clc (incremental boot, I4); ``eucactl register`` /
``deregister`` change rows explicitly. A deregistered row is kept as a tombstone
(``registered = False``) so the instance does not register itself again.

The IAM and EC2 APIs of the clc come with a later issue; they add tables to the same
component (its Alembic branch ``clc``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Boolean, Float, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from euca_runtime.component import (
    Component,
    ComponentHandler,
    ComponentType,
    RequestInfo,
    register_type,
)
from euca_runtime.store import ApplyContext, ComponentSpec, StoreError, register_component


class ClcBase(DeclarativeBase):
    """Declarative base of the clc component (Alembic branch `clc`)."""


class RegistryEntry(ClcBase):
    """One registered (or deregistered) service instance."""

    __tablename__ = "registry"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    type: Mapped[str] = mapped_column(String(32), nullable=False)
    partition: Mapped[str | None] = mapped_column(String(64), nullable=True)
    node: Mapped[str] = mapped_column(String(64), nullable=False)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    registered: Mapped[bool] = mapped_column(Boolean, nullable=False)
    updated_ts: Mapped[float] = mapped_column(Float, nullable=False)


CLC_SPEC = register_component(ComponentSpec("clc", ClcBase.metadata))

_FIELDS = ("type", "partition", "node", "host", "registered", "updated_ts")


def registry_put_op(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A registry upsert op (every field explicit, so replicas agree exactly)."""
    op: dict[str, Any] = {"op": "put", "table": "registry", "name": entry["name"]}
    for f in _FIELDS:
        op[f] = entry.get(f)
    return op


@CLC_SPEC.applier("registry", "put")
def _apply_put(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    name = op.get("name")
    if not isinstance(name, str) or not name:
        raise StoreError(f"registry put needs a name, got {name!r}")
    row = ctx.session.get(RegistryEntry, name)
    values = {f: op.get(f) for f in _FIELDS}
    values["registered"] = bool(values["registered"])
    values["updated_ts"] = float(values["updated_ts"] or 0.0)
    if row is None:
        ctx.session.add(RegistryEntry(name=name, **values))
        return [{"op": "delete", "table": "registry", "name": name}]
    undo = registry_put_op({"name": name, **{f: getattr(row, f) for f in _FIELDS}})
    for f, v in values.items():
        setattr(row, f, v)
    return [undo]


@CLC_SPEC.applier("registry", "delete")
def _apply_delete(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    row = ctx.session.get(RegistryEntry, op.get("name"))
    if row is None:
        return []
    undo = registry_put_op({"name": row.name, **{f: getattr(row, f) for f in _FIELDS}})
    ctx.session.delete(row)
    return [undo]


def _row(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": entry["name"], **{f: entry[f] for f in _FIELDS}}


class Clc(Component):
    """The clc placeholder: registry reads and writes over the bus."""

    def registry(self) -> list[dict[str, Any]]:
        """Every registry row (from the warm cache)."""
        cache = self.ctx.cache
        if cache is None:
            return []
        return sorted((_row(r) for r in cache.items("registry")), key=lambda r: r["name"])

    def handlers(self) -> Mapping[str, ComponentHandler]:
        async def list_registry(body: Any, request: RequestInfo) -> list[dict[str, Any]]:
            await self._fault_point()
            return self.registry()

        async def register(body: Any, request: RequestInfo) -> dict[str, Any]:
            """Upsert rows; with ``only_new`` skip names already present (self-registration)."""
            await self._fault_point()
            entries = body.get("entries", []) if isinstance(body, Mapping) else []
            only_new = bool(body.get("only_new")) if isinstance(body, Mapping) else False
            cache = self.ctx.cache
            ops = []
            for e in entries:
                if not isinstance(e, Mapping) or not e.get("name") or not e.get("type") or not e.get("node"):
                    continue
                current = cache.get("registry", e["name"]) if cache is not None else None
                if only_new and current is not None:
                    continue
                row = {
                    "name": e["name"],
                    "type": e["type"],
                    "partition": e.get("partition"),
                    "node": e["node"],
                    "host": e.get("host"),
                    "registered": bool(e.get("registered", True)),
                    "updated_ts": time.time(),
                }
                if current is not None and all(current[f] == row[f] for f in _FIELDS if f != "updated_ts"):
                    continue
                ops.append(registry_put_op(row))
            if ops:
                await self.ctx.write(ops, request.expires_at)
            return {"changed": len(ops), "registry": self.registry()}

        return {"list_registry": list_registry, "register": register}


CLC = register_type(
    ComponentType(
        name="clc",
        factory=Clc,
        replicated=True,
        store_component="clc",
        description="cloud controller: service registry (IAM/EC2 come later)",
    )
)
