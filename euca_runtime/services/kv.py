"""The kv component: an internal replicated key-value service, for tests and benchmarks.

Bus methods (served by the ENABLED instance of the ``kv`` group, wherever it runs):

- ``get {key}`` -> ``{"key", "value": bytes, "version"}`` or None;
- ``put {key, value: bytes}`` -> ``{"key", "epoch", "seq"}`` once every in-sync backup applied it;
- ``delete {key}`` -> ``{"key", "epoch", "seq"}``;
- ``keys {prefix}`` -> sorted list of keys.

User API (`make_api_app`), on every process that hosts kv (config ``api.kv``); any process
accepts a request and forwards it over the bus to the ENABLED instance, holding and retrying it
across a failover until its deadline:

- ``GET /kv/<key>``: 200 with the raw value (header ``X-Kv-Version``), 404 if absent;
- ``PUT /kv/<key>`` (raw body): 200 ``{"key", "epoch", "seq"}`` once replicated;
- ``DELETE /kv/<key>``: 200 ``{"key", "epoch", "seq"}``;
- ``GET /kv/?prefix=P``: 200 ``{"keys": [...]}``;
- ``GET /healthz``: 200 ``{"node", "ok": true}`` (no forwarding).

Every call takes ``?timeout=SECONDS`` (default 10): the request's whole deadline. Errors are
JSON ``{"error", "message"}``: 400 for a bad request, 503 when no ENABLED instance answered
before the deadline (the write may or may not have happened; retrying a put is safe).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from euca_runtime.component import (
    Component,
    ComponentHandler,
    ComponentType,
    RequestError,
    RequestInfo,
    ServiceUnavailable,
    register_type,
)
from euca_runtime.store import delete_op, put_op

if TYPE_CHECKING:
    from euca_runtime.node import Node

MAX_KEY = 1024
MAX_VALUE = 4 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0


def _key(body: Any) -> str:
    key = body.get("key") if isinstance(body, Mapping) else None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise RequestError("BadRequest", f"key must be a non-empty string of at most {MAX_KEY} characters")
    return key


class Kv(Component):
    """The kv component: reads from the warm cache, writes replicated."""

    def handlers(self) -> Mapping[str, ComponentHandler]:
        return {"get": self.get, "put": self.put, "delete": self.delete, "keys": self.keys}

    async def get(self, body: Any, request: RequestInfo) -> dict[str, Any] | None:
        await self._fault_point()
        key = _key(body)
        assert self.ctx.cache is not None
        row = self.ctx.cache.get("kv", key)
        if row is None:
            return None
        return {"key": key, "value": row["value"], "version": row["version"]}

    async def put(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        key = _key(body)
        value = body.get("value")
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes) or len(value) > MAX_VALUE:
            raise RequestError("BadRequest", f"value must be bytes of at most {MAX_VALUE} bytes")
        res = await self.ctx.write([put_op(key, value)], request.expires_at)
        return {"key": key, "epoch": res.epoch, "seq": res.seq}

    async def delete(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        key = _key(body)
        res = await self.ctx.write([delete_op(key)], request.expires_at)
        return {"key": key, "epoch": res.epoch, "seq": res.seq}

    async def keys(self, body: Any, request: RequestInfo) -> list[str]:
        await self._fault_point()
        prefix = body.get("prefix", "") if isinstance(body, Mapping) else ""
        assert self.ctx.cache is not None
        return sorted(r["key"] for r in self.ctx.cache.items("kv") if str(r["key"]).startswith(prefix or ""))


KV = register_type(
    ComponentType(
        name="kv",
        factory=Kv,
        replicated=True,
        store_component="kv",
        description="internal replicated key-value service (tests, benchmarks)",
    )
)


# --------------------------------------------------------------------------- HTTP API


def _timeout(request: web.Request) -> float:
    raw = request.query.get("timeout")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="timeout must be a number of seconds") from None
    if not math.isfinite(value) or value <= 0 or value > 300:
        raise web.HTTPBadRequest(text="timeout must be in (0, 300] seconds")
    return value


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": kind, "message": message}, status=status)


def make_api_app(node: Node) -> web.Application:
    """The kv HTTP API of one process; every call is forwarded to the ENABLED kv instance."""

    async def call(request: web.Request, method: str, body: dict[str, Any]) -> Any:
        return await node.call("kv", None, method, body, timeout=_timeout(request))

    async def handle(request: web.Request) -> web.StreamResponse:
        key = request.match_info.get("key", "")
        try:
            if request.method == "GET" and not key:
                keys = await call(request, "keys", {"prefix": request.query.get("prefix", "")})
                return web.json_response({"keys": keys})
            if request.method == "GET":
                doc = await call(request, "get", {"key": key})
                if doc is None:
                    return _error(404, "NotFound", f"no key {key!r}")
                return web.Response(body=doc["value"], headers={"X-Kv-Version": str(doc["version"])})
            if request.method == "PUT":
                value = await request.read()
                return web.json_response(await call(request, "put", {"key": key, "value": value}))
            if request.method == "DELETE":
                return web.json_response(await call(request, "delete", {"key": key}))
        except RequestError as exc:
            return _error(400, exc.kind, exc.message)
        except ServiceUnavailable as exc:
            return _error(503, exc.kind, str(exc))
        return _error(405, "MethodNotAllowed", request.method)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"node": node.name, "ok": True})

    app = web.Application(client_max_size=MAX_VALUE + 1024)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/kv/", handle)
    app.router.add_route("*", "/kv/{key:.+}", handle)
    return app
