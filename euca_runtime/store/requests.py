"""Requests that took effect, remembered by request id: a retry gets the first answer.

A request is held and retried across a failover with the same request id (the front end that
received it gives it one and the bus retries the same body, docs/api.md). A create finds its own
row again by the row's ``request_id``, but a delete leaves nothing behind: when the primary
applied and replicated a delete and then died before answering, the retry at the new primary
would find nothing to delete and answer ``NoSuchEntity`` (``NoSuchBucket``, ...) for a delete
that took effect. So a delete also writes a row ``{request_id, action, created_ts}`` in the
*same* change record, in its component's request table; the retry finds it and answers success.
A create whose result may be gone by the time of its retry (the user or key deleted meanwhile,
the multipart upload completed into an object) records what the retry needs to answer as the
first attempt did: in ``action`` (``CreateUser <user id>``) or in ``result`` (a string the
action defines: a CreateAccessKey's key id, user name and sealed secret, a
CompleteMultipartUpload's ETag).

A component that needs this declares a model with `RequestRowMixin` on its own declarative base
(and an Alembic migration creating the table), registers it with `register_request_table`, and
asks a `DoneRequests` for that table for a request's row (or whether it is done) and for the ops
that record it.
Rows older than `REQUEST_TTL` are pruned, at most `PRUNE_PER_WRITE` by each recording write.

Ops (the clc's row ops' shape): ``{"op": "put", "table": T, "row": {request_id, action,
created_ts, result}}`` (``result`` may be absent: None) and ``{"op": "delete", "table": T,
"pk": [request_id]}`` (a no-op if absent).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import Float, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from euca_runtime.store.component import ApplyContext, ComponentSpec
from euca_runtime.store.errors import StoreError

REQUEST_TTL = 600.0
"""How long a done request is remembered (seconds; far beyond any request's deadline)."""
PRUNE_PER_WRITE = 16
"""Expired request rows removed by one write at most (keeps every change record small)."""
_COLUMNS = ("request_id", "action", "created_ts", "result")


class RequestRowMixin:
    """The columns of a request table (mix into a model on the component's own base)."""

    request_id: Mapped[str] = mapped_column(String(160), primary_key=True)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    created_ts: Mapped[float] = mapped_column(Float, nullable=False)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)


class _Cache(Protocol):
    def get(self, table: str, key: Any) -> Mapping[str, Any] | None: ...

    def items(self, table: str) -> list[Mapping[str, Any]]: ...


def request_put_op(
    table: str, request_id: str, action: str, now: float, result: str | None = None
) -> dict[str, Any]:
    row = {"request_id": request_id, "action": action, "created_ts": now, "result": result}
    return {"op": "put", "table": table, "row": row}


def request_delete_op(table: str, request_id: str) -> dict[str, Any]:
    return {"op": "delete", "table": table, "pk": [request_id]}


class DoneRequests:
    """The request table `table` of one component, read through its object cache."""

    def __init__(self, table: str) -> None:
        self.table = table

    def row(
        self, cache: _Cache, request_id: str | None, action: str | None = None
    ) -> Mapping[str, Any] | None:
        """The done row of the request with this id (``request_id, action, created_ts,
        result``), or None if no request with this id took effect (or it had no id). With
        `action`, only a row of that action (its ``action`` is `action` or ``<action> <detail>``)."""
        row = cache.get(self.table, request_id) if request_id else None
        if row is None or action is None:
            return row
        return row if str(row["action"]).split(" ", 1)[0] == action else None

    def done(self, cache: _Cache, request_id: str | None) -> bool:
        """Whether a request with this id already took effect."""
        return self.row(cache, request_id) is not None

    def ops(
        self, cache: _Cache, request_id: str | None, action: str, now: float, result: str | None = None
    ) -> list[dict[str, Any]]:
        """Ops recording `request_id` as done (none without an id) with its `action` and
        `result`, plus the pruning of a few expired rows; write them in the same change record
        as the change the request made."""
        if not request_id:
            return []
        expired = sorted(
            (r for r in cache.items(self.table) if r["created_ts"] < now - REQUEST_TTL),
            key=lambda r: r["created_ts"],
        )
        return [
            request_put_op(self.table, request_id, action, now, result),
            *(request_delete_op(self.table, r["request_id"]) for r in expired[:PRUNE_PER_WRITE]),
        ]


def register_request_table(spec: ComponentSpec, model: type[Any]) -> DoneRequests:
    """Register the put/delete appliers of `model`'s table in `spec`; returns its `DoneRequests`."""
    table = str(model.__tablename__)

    def put(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
        row = op.get("row")
        request_id = row.get("request_id") if isinstance(row, Mapping) else None
        if not isinstance(row, Mapping) or not isinstance(request_id, str):
            raise StoreError(f"{table} put needs a row with a request_id")
        values = {c: row.get(c) for c in _COLUMNS}
        current = ctx.session.get(model, request_id)
        if current is None:
            ctx.session.add(model(**values))
            return [request_delete_op(table, request_id)]
        undo = {"op": "put", "table": table, "row": {c: getattr(current, c) for c in _COLUMNS}}
        for c, v in values.items():
            setattr(current, c, v)
        return [undo]

    def delete(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
        pk = op.get("pk")
        if not isinstance(pk, list | tuple) or len(pk) != 1:
            raise StoreError(f"{table} delete needs pk [request_id]")
        current = ctx.session.get(model, pk[0])
        if current is None:
            return []
        undo = {"op": "put", "table": table, "row": {c: getattr(current, c) for c in _COLUMNS}}
        ctx.session.delete(current)
        return [undo]

    spec.register_applier(table, "put", put)
    spec.register_applier(table, "delete", delete)
    return DoneRequests(table)
