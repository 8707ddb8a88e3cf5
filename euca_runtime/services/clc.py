"""The clc component: owns the service registry (the topology) and the identities (IAM).

The registry is a replicated table of the clc group: one row per service instance
(``name``, ``type``, ``partition``, ``node``, ``host``, ``registered``). Instances register
themselves when they first see an ENABLED clc (incremental boot, I4); ``eucactl register`` /
``deregister`` change rows explicitly. A deregistered row is kept as a tombstone
(``registered = False``) so the instance does not register itself again.

Identity (Alembic revision ``clc_0002``): accounts, users and access keys, tables
``iam_account``, ``iam_user`` and ``iam_access_key``, written with generic row ops
(``{"op": "put", "table": T, "row": {...}}`` / ``{"op": "delete", "table": T, "pk": [...]}``).
Secret access keys are stored AES-GCM encrypted (`euca_runtime.credentials`). The IAM logic
and its bus methods (``iam.*``) live in `euca_runtime.services.iam`; the ENABLED clc creates
the ``eucalyptus`` account and its ``admin`` user and key on first boot.

EC2 (Alembic revision ``clc_0003``): the user-visible records of the EC2 API, tables
``ec2_image``, ``ec2_reservation``, ``ec2_instance``, ``ec2_volume`` and ``ec2_snapshot`` (same
generic row ops). The logic and its bus method (``ec2.action``) live in
`euca_runtime.services.ec2`; the ENABLED clc registers the default image on first boot.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Boolean, Float, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from euca_runtime.component import (
    Component,
    ComponentHandler,
    ComponentType,
    RequestInfo,
    register_type,
)
from euca_runtime.store import ApplyContext, ComponentSpec, StoreError, register_component
from euca_runtime.store.requests import RequestRowMixin, register_request_table


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


class IamAccount(ClcBase):
    """An account (the ``eucalyptus`` admin account is made at first boot)."""

    __tablename__ = "iam_account"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(12), nullable=False, unique=True)
    created_ts: Mapped[float] = mapped_column(Float, nullable=False)


class IamUser(ClcBase):
    """A user of an account; names are unique per account regardless of case (as in IAM)."""

    __tablename__ = "iam_user"

    account: Mapped[str] = mapped_column(String(64), primary_key=True)
    name_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    user_id: Mapped[str] = mapped_column(String(32), nullable=False)
    path: Mapped[str] = mapped_column(String(512), nullable=False)
    created_ts: Mapped[float] = mapped_column(Float, nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class IamAccessKey(ClcBase):
    """An access key; `secret` is AES-GCM ciphertext (nonce + ciphertext + tag)."""

    __tablename__ = "iam_access_key"

    access_key: Mapped[str] = mapped_column(String(128), primary_key=True)
    account: Mapped[str] = mapped_column(String(64), nullable=False)
    user_key: Mapped[str] = mapped_column(String(64), nullable=False)
    secret: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    created_ts: Mapped[float] = mapped_column(Float, nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Ec2Image(ClcBase):
    """A registered machine image (``emi-...``); the default one is made at first boot."""

    __tablename__ = "ec2_image"

    image_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account: Mapped[str] = mapped_column(String(64), nullable=False)
    owner_id: Mapped[str] = mapped_column(String(12), nullable=False)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    description: Mapped[str | None] = mapped_column(String(255), nullable=True)
    location: Mapped[str | None] = mapped_column(String(255), nullable=True)
    architecture: Mapped[str] = mapped_column(String(16), nullable=False)
    is_public: Mapped[bool] = mapped_column(Boolean, nullable=False)
    created_ts: Mapped[float] = mapped_column(Float, nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(160), nullable=True)


class Ec2Reservation(ClcBase):
    """One RunInstances call: its instances share it. ``request_id``: the client token or the
    request's id (a retry finds its reservation instead of launching again)."""

    __tablename__ = "ec2_reservation"

    reservation_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account: Mapped[str] = mapped_column(String(64), nullable=False)
    owner_id: Mapped[str] = mapped_column(String(12), nullable=False)
    zone: Mapped[str] = mapped_column(String(64), nullable=False)
    created_ts: Mapped[float] = mapped_column(Float, nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(160), nullable=True)


class Ec2Instance(ClcBase):
    """An instance's user-visible record. ``phase`` is the clc's intent (``launching``,
    ``launched``, ``terminating``, ``terminated``); ``state`` the last state the CC reported."""

    __tablename__ = "ec2_instance"

    instance_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    reservation_id: Mapped[str] = mapped_column(String(32), nullable=False)
    account: Mapped[str] = mapped_column(String(64), nullable=False)
    image_id: Mapped[str] = mapped_column(String(32), nullable=False)
    instance_type: Mapped[str] = mapped_column(String(32), nullable=False)
    zone: Mapped[str] = mapped_column(String(64), nullable=False)
    launch_index: Mapped[int] = mapped_column(Integer, nullable=False)
    launch_ts: Mapped[float] = mapped_column(Float, nullable=False)
    phase: Mapped[str] = mapped_column(String(16), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    node: Mapped[str | None] = mapped_column(String(64), nullable=True)
    client_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(String(255), nullable=True)
    terminated_ts: Mapped[float | None] = mapped_column(Float, nullable=True)


class Ec2Volume(ClcBase):
    """A volume's owner record (the SC of its zone holds the volume). ``phase``: ``creating``,
    ``created``, ``deleting``."""

    __tablename__ = "ec2_volume"

    volume_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account: Mapped[str] = mapped_column(String(64), nullable=False)
    owner_id: Mapped[str] = mapped_column(String(12), nullable=False)
    zone: Mapped[str] = mapped_column(String(64), nullable=False)
    size_gib: Mapped[int] = mapped_column(Integer, nullable=False)
    snapshot_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_ts: Mapped[float] = mapped_column(Float, nullable=False)
    phase: Mapped[str] = mapped_column(String(16), nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(160), nullable=True)


class Ec2Snapshot(ClcBase):
    """A snapshot's owner record (the SC of its volume's zone holds the snapshot)."""

    __tablename__ = "ec2_snapshot"

    snapshot_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account: Mapped[str] = mapped_column(String(64), nullable=False)
    owner_id: Mapped[str] = mapped_column(String(12), nullable=False)
    volume_id: Mapped[str] = mapped_column(String(32), nullable=False)
    zone: Mapped[str] = mapped_column(String(64), nullable=False)
    size_gib: Mapped[int] = mapped_column(Integer, nullable=False)
    description: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_ts: Mapped[float] = mapped_column(Float, nullable=False)
    phase: Mapped[str] = mapped_column(String(16), nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(160), nullable=True)


class ClcRequest(RequestRowMixin, ClcBase):
    """A request that took effect, by its request id (Alembic ``clc_0004``, ``result`` in
    ``clc_0005``): IAM DeleteUser/DeleteAccessKey, CreateUser/CreateAccessKey, EC2
    DeleteVolume/DeleteSnapshot (`euca_runtime.store.requests`)."""

    __tablename__ = "clc_request"


CLC_SPEC = register_component(ComponentSpec("clc", ClcBase.metadata))

_ROW_MODELS: dict[str, type[ClcBase]] = {
    "iam_account": IamAccount,
    "iam_user": IamUser,
    "iam_access_key": IamAccessKey,
    "ec2_image": Ec2Image,
    "ec2_reservation": Ec2Reservation,
    "ec2_instance": Ec2Instance,
    "ec2_volume": Ec2Volume,
    "ec2_snapshot": Ec2Snapshot,
}


def _columns(model: type[ClcBase]) -> list[str]:
    return [c.name for c in model.__table__.columns]  # type: ignore[attr-defined]


def _pk(model: type[ClcBase]) -> list[str]:
    return [c.name for c in model.__table__.primary_key.columns]  # type: ignore[attr-defined]


def row_put_op(table: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """Insert or replace one IAM or EC2 row (every column explicit, so replicas agree exactly)."""
    model = _ROW_MODELS[table]
    return {"op": "put", "table": table, "row": {c: row.get(c) for c in _columns(model)}}


def row_delete_op(table: str, pk: Sequence[Any]) -> dict[str, Any]:
    """Delete one IAM or EC2 row by primary key (a no-op if absent)."""
    return {"op": "delete", "table": table, "pk": list(pk)}


def _apply_row_put(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    table = str(op.get("table"))
    model = _ROW_MODELS[table]
    row = op.get("row")
    if not isinstance(row, Mapping):
        raise StoreError(f"{table} put needs a row mapping")
    pk = tuple(row.get(c) for c in _pk(model))
    if any(v is None for v in pk):
        raise StoreError(f"{table} put: primary key {_pk(model)} incomplete")
    current = ctx.session.get(model, pk)
    if current is None:
        ctx.session.add(model(**{c: row.get(c) for c in _columns(model)}))
        return [row_delete_op(table, pk)]
    undo = row_put_op(table, {c: getattr(current, c) for c in _columns(model)})
    for c in _columns(model):
        setattr(current, c, row.get(c))
    return [undo]


def _apply_row_delete(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    table = str(op.get("table"))
    model = _ROW_MODELS[table]
    pk = op.get("pk")
    if not isinstance(pk, list | tuple) or len(pk) != len(_pk(model)):
        raise StoreError(f"{table} delete needs pk {_pk(model)}")
    current = ctx.session.get(model, tuple(pk))
    if current is None:
        return []
    undo = row_put_op(table, {c: getattr(current, c) for c in _columns(model)})
    ctx.session.delete(current)
    return [undo]


for _table in _ROW_MODELS:
    CLC_SPEC.register_applier(_table, "put", _apply_row_put)
    CLC_SPEC.register_applier(_table, "delete", _apply_row_delete)

CLC_REQUESTS = register_request_table(CLC_SPEC, ClcRequest)
"""Deletes done by request id (`euca_runtime.store.requests`)."""

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
    """The clc: registry reads and writes, and the identity service (``iam.*`` methods)."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        from euca_runtime.services.ec2 import Ec2
        from euca_runtime.services.iam import Identity

        self.identity = Identity(self)
        self.ec2 = Ec2(self)

    async def on_enabled(self, epoch: int) -> None:
        self.identity.on_enabled(epoch)
        self.ec2.on_enabled(epoch)

    async def on_disabled(self) -> None:
        self.identity.on_disabled()
        self.ec2.on_disabled()

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

        return {
            "list_registry": list_registry,
            "register": register,
            **self.identity.handlers(),
            **self.ec2.handlers(),
        }


CLC = register_type(
    ComponentType(
        name="clc",
        factory=Clc,
        replicated=True,
        store_component="clc",
        description="cloud controller: service registry, identity (IAM) and the EC2 API",
    )
)
