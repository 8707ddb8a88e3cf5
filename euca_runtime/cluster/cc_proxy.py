"""The CC proxy: the ``cc`` component that represents the stateless CC service on the bus.

One instance per CC host of a cluster (``cc/<cluster>``, e.g. primary on node-a, backup on
node-b). The group is *leased, stateless* (`ComponentType` with ``replicated=True`` and no
store): the lease core, voters and epochs work as for any group; there is nothing to
replicate, so every healthy instance is a DISABLED hot standby and the holder serves as soon
as it is elected.

The proxy

* starts the CC service (`euca_runtime.cluster.cc_service`) as its child process and restarts
  it when it exits (at most once a second); the service writes ``service.json`` (pid, url)
  under ``<data_dir>/cc/<instance name>/`` and exits when its parent is gone;
* serves the service a loopback *gateway* (``GET /v1/ncs``: the cluster's NCs from the
  topology; ``POST /v1/nc``: one NC call, made over the bus with ``Node.call_instance``), so
  the service reaches every NC wherever it runs, through mutual TLS, without knowing hosts;
* probes the service's health (``GET /v1/health`` within `HEALTH_TIMEOUT`): a dead, hung or
  not-polling service makes the instance NOTREADY, which gives up the lease, and the backup CC
  takes over;
* forwards every ``cc.*`` bus method to its service with its lease epoch (only the ENABLED
  instance serves: the bus routes there); a refusal marked ``retry`` (the service was deposed
  meanwhile) is answered ``Unavailable`` so the bus retries the ENABLED CC;
* tells the service its epoch when it becomes ENABLED (the service fences the NCs with it
  before acting) and when it stops being ENABLED.

Both the proxy and the service share one random token (per start) for the two loopback APIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from euca_runtime.cluster.cc_service import METHODS, NC_TIMEOUT, POLL_INTERVAL
from euca_runtime.component import (
    Component,
    ComponentHandler,
    ComponentType,
    InstanceContext,
    RequestError,
    RequestInfo,
    ServiceUnavailable,
    register_type,
)
from euca_runtime.log import get_logger

log = get_logger("cc")

HEALTH_TIMEOUT = 0.6
RESPAWN_EVERY = 1.0
STOP_GRACE = 3.0


class CCProxy(Component):
    """One CC instance (see the module docstring)."""

    def __init__(self, ctx: InstanceContext) -> None:
        super().__init__(ctx)
        opts = dict(getattr(ctx, "options", {}) or {})
        self.poll_interval = float(opts.get("poll_interval", POLL_INTERVAL))
        self.nc_timeout = float(opts.get("nc_timeout", min(NC_TIMEOUT, self.poll_interval)))
        if not ctx.partition:
            raise ValueError("a cc needs a partition (its cluster)")
        self.cluster = ctx.partition
        self.state_dir = Path(getattr(ctx, "data_dir", ".")) / "cc" / ctx.name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_urlsafe(24)
        self.proc: asyncio.subprocess.Process | None = None
        self.url: str | None = None
        self.gateway_url: str | None = None
        self._gateway: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._next_spawn = 0.0
        self._lock = asyncio.Lock()
        self.restarts = 0
        self.last_exit: str | None = None

    # ------------------------------------------------------------------ the child process

    def _http(self) -> ClientSession:
        if self._session is None:
            self._session = ClientSession(headers={"Authorization": f"Bearer {self.token}"})
        return self._session

    async def _ensure_gateway(self) -> str:
        if self.gateway_url is not None:
            return self.gateway_url
        runner = web.AppRunner(self._gateway_app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = getattr(site, "_server", None)
        assert server is not None and server.sockets
        port = server.sockets[0].getsockname()[1]
        self._gateway = runner
        self.gateway_url = f"http://127.0.0.1:{port}"
        return self.gateway_url

    async def _ensure_service(self) -> str:
        """The running service's URL; starts (or restarts) it, raising while it is not up."""
        async with self._lock:
            proc = self.proc
            if proc is not None and proc.returncode is not None:
                self.last_exit = f"CC service (pid {proc.pid}) exited with {proc.returncode}"
                log.warning(
                    "cc service exited",
                    extra={"service": self.ctx.name, "pid": proc.pid, "returncode": proc.returncode},
                )
                self.proc, self.url = None, None
                proc = None
            if proc is None:
                now = time.monotonic()
                if now < self._next_spawn:
                    raise RuntimeError(f"{self.last_exit}; restarting")
                self._next_spawn = now + RESPAWN_EVERY
                gateway = await self._ensure_gateway()
                with contextlib.suppress(FileNotFoundError):
                    (self.state_dir / "service.json").unlink()
                env = {**os.environ, "EUCA_CC_TOKEN": self.token}
                self.proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "euca_runtime.cluster.cc_service",
                    "--cluster",
                    self.cluster,
                    "--gateway",
                    gateway,
                    "--state-dir",
                    str(self.state_dir),
                    "--poll-interval",
                    str(self.poll_interval),
                    "--nc-timeout",
                    str(self.nc_timeout),
                    "--node",
                    self.ctx.node_name,
                    stdin=asyncio.subprocess.DEVNULL,
                    env=env,
                )
                if self.last_exit is not None:
                    self.restarts += 1
                log.info("cc service started", extra={"service": self.ctx.name, "pid": self.proc.pid})
            assert self.proc is not None
            if self.url is None:
                try:
                    doc = json.loads((self.state_dir / "service.json").read_text())
                except (OSError, ValueError):
                    doc = {}
                if doc.get("pid") != self.proc.pid:
                    raise RuntimeError(f"CC service starting (pid {self.proc.pid})")
                self.url = str(doc["url"])
            return self.url

    @property
    def service_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    # ------------------------------------------------------------------ the gateway

    def _gateway_app(self) -> web.Application:
        node = getattr(self.ctx, "node", None)
        group = f"nc/{self.cluster}"

        @web.middleware
        async def auth(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip(), self.token):
                return web.json_response({"error": "Unauthorized", "message": "bad token"}, status=401)
            return await handler(request)

        async def ncs(request: web.Request) -> web.Response:
            names = sorted(node.members(group)) if node is not None else []
            return web.json_response({"ncs": names})

        async def nc_call(request: web.Request) -> web.Response:
            try:
                doc = await request.json()
                name, method = str(doc["nc"]), str(doc["method"])
                body = doc.get("body") or {}
                timeout = min(max(float(doc.get("timeout", 1.0)), 0.05), 30.0)
            except (ValueError, KeyError, TypeError) as exc:
                return web.json_response({"error": "BadRequest", "message": str(exc)}, status=400)
            if node is None:
                return web.json_response({"error": "Unavailable", "message": "no runtime"}, status=503)
            try:
                result = await node.call_instance(name, method, body, timeout=timeout)
            except ServiceUnavailable as exc:
                return web.json_response({"error": "Unavailable", "message": str(exc)}, status=503)
            except RequestError as exc:
                return web.json_response({"error": exc.kind, "message": exc.message}, status=409)
            return web.json_response({"result": result})

        app = web.Application(middlewares=[auth], client_max_size=4 * 1024 * 1024)
        app.router.add_get("/v1/ncs", ncs)
        app.router.add_post("/v1/nc", nc_call)
        return app

    # ------------------------------------------------------------------ component

    async def health(self) -> None:
        await self._fault_point()
        url = await self._ensure_service()
        try:
            async with self._http().get(
                f"{url}/v1/health", timeout=ClientTimeout(total=HEALTH_TIMEOUT)
            ) as resp:
                doc = await resp.json()
                status = resp.status
        except (ClientError, TimeoutError, ValueError) as exc:
            why = str(exc) or type(exc).__name__
            pid = self.service_pid
            raise RuntimeError(f"CC service (pid {pid}) did not answer its health probe: {why}") from None
        if status != 200:
            raise RuntimeError(f"CC service unhealthy: {doc.get('cause', status)}")

    def handlers(self) -> Mapping[str, ComponentHandler]:
        table: dict[str, ComponentHandler] = {}
        for name in METHODS:
            table[name] = self._forwarder(name)
            table[f"cc.{name}"] = table[name]
        return table

    def _forwarder(self, method: str) -> ComponentHandler:
        async def forward(body: Any, request: RequestInfo) -> Any:
            return await self.forward(method, body, request.expires_at)

        return forward

    async def forward(self, method: str, body: Any, expires_at: float) -> Any:
        url = self.url
        if url is None:
            raise ServiceUnavailable(f"{self.ctx.name}: CC service not running", "Unavailable")
        remaining = max(0.05, min(30.0, expires_at - time.monotonic()))
        epoch = int(getattr(self.ctx, "epoch", 0) or 0)
        doc = {"method": method, "body": body, "epoch": epoch}
        try:
            async with self._http().post(
                f"{url}/v1/call", json=doc, timeout=ClientTimeout(total=remaining)
            ) as resp:
                out = await resp.json()
                status = resp.status
        except (ClientError, TimeoutError, ValueError) as exc:
            raise ServiceUnavailable(
                f"{self.ctx.name}: CC service: {exc or type(exc).__name__}", "Unavailable"
            ) from None
        if status == 200:
            return out.get("result")
        kind, message = str(out.get("error", "Error")), str(out.get("message", ""))
        if out.get("retry"):
            raise ServiceUnavailable(f"{self.ctx.name}: {kind}: {message}", "Unavailable")
        raise RequestError(kind, message)

    async def _role(self, epoch: int | None) -> None:
        url = self.url
        if url is None:
            return
        with contextlib.suppress(ClientError, TimeoutError, ValueError):
            async with self._http().post(
                f"{url}/v1/role", json={"epoch": epoch}, timeout=ClientTimeout(total=5.0)
            ) as resp:
                await resp.read()

    async def on_enabled(self, epoch: int) -> None:
        log.info("cc enabled", extra={"service": self.ctx.name, "epoch": epoch, "pid": self.service_pid})
        await self._role(epoch)

    async def on_disabled(self) -> None:
        await self._role(None)

    async def close(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._session is not None:
            await self._session.close()
        if self._gateway is not None:
            await self._gateway.cleanup()


CC = register_type(
    ComponentType(
        name="cc",
        factory=CCProxy,
        partitioned=True,
        replicated=True,
        store_component=None,
        description="cluster controller proxy: leases cc/<cluster>, runs and fronts the stateless CC service",
    )
)
