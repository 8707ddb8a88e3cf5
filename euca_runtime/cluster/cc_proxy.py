"""The CC proxy: the ``cc`` component that represents the stateless CC service on the bus.

One instance per CC host of a cluster (``cc/<cluster>``, e.g. primary on node-a, backup on
node-b). The group is *leased, stateless* (`ComponentType` with ``replicated=True`` and no
store): the lease core, voters and epochs work as for any group; there is nothing to
replicate, so every healthy instance is a DISABLED hot standby and the holder serves as soon
as it is elected.

The proxy

* with option ``service: child`` (the default; ``euca-runtime up``) starts the CC service
  (`euca_runtime.cluster.cc_service`) as its child process and restarts it when it exits (at
  most once a second); the service writes ``service.json`` (pid, url) under
  ``<data_dir>/cc/<instance name>/`` and exits when its parent is gone. Both share one random
  token per start for the two loopback APIs;
* with ``service: external`` (deployed hosts: the systemd unit ``euca-cc@<cluster>``) talks to
  a service that runs on its own at the fixed loopback ``service_address``, serves the gateway
  at the fixed loopback ``gateway``, and reads the shared token from ``token_file`` (re-read
  when the file changes; refused when group or others may read it). It neither starts nor
  stops that service; one that is not running fails the health probe like a dead child;
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
  before acting) and when it stops being ENABLED, and tells a service it has not seen before
  (a new pid: first contact, a restarted unit, a runtime restarted under a running service)
  what it is now.
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

from euca_runtime.cluster.cc_service import METHODS, NC_TIMEOUT, POLL_INTERVAL, read_token_file
from euca_runtime.cluster.options import loopback_address
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
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
        self.external = opts.get("service", "child") == "external"
        self.gateway_host, self.gateway_port = "127.0.0.1", 0
        self.service_url: str | None = None
        self.token_file: Path | None = None
        self.token = secrets.token_urlsafe(24)
        if self.external:
            self.gateway_host, self.gateway_port = loopback_address(opts["gateway"], "gateway")
            host, port = loopback_address(opts["service_address"], "service_address")
            self.service_url = f"http://{_url_host(host)}:{port}"
            self.token_file = Path(str(opts["token_file"]))
            self.token = ""  # read from token_file when first needed
        self._token_stamp: tuple[int, int, int] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.url: str | None = None
        self.gateway_url: str | None = None
        self._gateway: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._next_spawn = 0.0
        self._lock = asyncio.Lock()
        self.restarts = 0
        self.last_exit: str | None = None
        self.seen_pid: int | None = None  # the service process the health probe last answered from
        self._enabled_epoch: int | None = None  # our epoch while ENABLED, None otherwise
        self._role_lock = asyncio.Lock()
        self._sync_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the service process

    def _http(self) -> ClientSession:
        if self._session is None:
            self._session = ClientSession()
        return self._session

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _load_token(self) -> None:
        """External mode: (re-)read the token file when it is new or changed; raises while unusable."""
        assert self.token_file is not None
        try:
            st = self.token_file.stat()
        except OSError as exc:
            self.token, self._token_stamp = "", None
            raise RuntimeError(f"CC token file {self.token_file}: {exc.strerror or exc}") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._token_stamp and self.token:
            return
        try:
            self.token = read_token_file(str(self.token_file))
        except ValueError as exc:
            self.token, self._token_stamp = "", None
            raise RuntimeError(f"CC {exc}") from None
        self._token_stamp = stamp

    async def _ensure_gateway(self) -> str:
        if self.gateway_url is not None:
            return self.gateway_url
        runner = web.AppRunner(self._gateway_app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.gateway_host, self.gateway_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = f"{_url_host(self.gateway_host)}:{self.gateway_port}"
            raise RuntimeError(f"CC gateway cannot listen on {where}: {exc.strerror or exc}") from None
        server = getattr(site, "_server", None)
        assert server is not None and server.sockets
        port = server.sockets[0].getsockname()[1]
        self._gateway = runner
        self.gateway_url = f"http://{_url_host(self.gateway_host)}:{port}"
        log.info("cc gateway listening", extra={"service": self.ctx.name, "url": self.gateway_url})
        return self.gateway_url

    async def _ensure_service(self) -> str:
        """The running service's URL; starts (or restarts) it, raising while it is not up."""
        if self.external:
            assert self.service_url is not None
            self._load_token()
            await self._ensure_gateway()
            self.url = self.service_url
            return self.url
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
                # The runtime's systemd notify socket and watchdog are its own, not the child's.
                env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
                env["EUCA_CC_TOKEN"] = self.token
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
        if self.external:
            return self.seen_pid
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def _what(self) -> str:
        if self.external:
            return f"CC service at {self.service_url}"
        return f"CC service (pid {self.service_pid})"

    # ------------------------------------------------------------------ the gateway

    def _gateway_app(self) -> web.Application:
        node = getattr(self.ctx, "node", None)
        group = f"nc/{self.cluster}"

        @web.middleware
        async def auth(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            token = self.token  # empty while an external token file is unusable: nobody gets in
            if scheme.lower() != "bearer" or not token or not secrets.compare_digest(value.strip(), token):
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
                f"{url}/v1/health", headers=self._auth(), timeout=ClientTimeout(total=HEALTH_TIMEOUT)
            ) as resp:
                doc = await resp.json()
                status = resp.status
        except (ClientError, TimeoutError, ValueError) as exc:
            why = str(exc) or type(exc).__name__
            raise RuntimeError(f"{self._what()} did not answer its health probe: {why}") from None
        pid = doc.get("pid") if isinstance(doc, dict) else None
        if isinstance(pid, int) and pid != self.seen_pid:
            if self.external:
                log.info("cc service found", extra={"service": self.ctx.name, "pid": pid, "url": url})
            self.seen_pid = pid
            # A service we have not seen: tell it what we are now (in the background: with an
            # epoch it fences the NCs first, which must not count against the probe's deadline).
            if self._sync_task is None or self._sync_task.done():
                self._sync_task = asyncio.create_task(self._role(sync=True), name=f"role-{self.ctx.name}")
        if status == 401:
            raise RuntimeError(
                f"{self._what()} refused our token (the token file changed; restart the service)"
            )
        if status != 200:
            cause = doc.get("cause", status) if isinstance(doc, dict) else status
            raise RuntimeError(f"CC service unhealthy: {cause}")

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
                f"{url}/v1/call", json=doc, headers=self._auth(), timeout=ClientTimeout(total=remaining)
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

    async def _role(self, sync: bool = False) -> None:
        """Tell the service our epoch (None: not ENABLED), as it is when the lock is ours."""
        async with self._role_lock:
            url = self.url
            if url is None:
                return
            epoch = self._enabled_epoch
            with contextlib.suppress(ClientError, TimeoutError, ValueError):
                async with self._http().post(
                    f"{url}/v1/role",
                    json={"epoch": epoch},
                    headers=self._auth(),
                    timeout=ClientTimeout(total=5.0),
                ) as resp:
                    await resp.read()
                if sync:
                    log.info("cc service told its role", extra={"service": self.ctx.name, "epoch": epoch})

    async def on_enabled(self, epoch: int) -> None:
        log.info("cc enabled", extra={"service": self.ctx.name, "epoch": epoch, "pid": self.service_pid})
        self._enabled_epoch = epoch
        await self._role()

    async def on_disabled(self) -> None:
        self._enabled_epoch = None
        await self._role()

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            await asyncio.gather(self._sync_task, return_exceptions=True)
        proc = self.proc  # None in external mode: that service outlives us
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
        description="cluster controller proxy: leases cc/<cluster>, fronts the stateless CC service",
    )
)
