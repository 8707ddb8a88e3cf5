"""The CC service: the stateless cluster controller, a small process of its own (DESIGN.md 2).

Two ways to run it (docs/cluster.md):

* a child of its CC proxy (`euca_runtime.cluster.cc_proxy`, ``service: child``, as
  ``euca-runtime up`` does): ``python -m euca_runtime.cluster.cc_service --cluster cluster01
  --gateway URL --state-dir DIR``, with a random token in the environment (``EUCA_CC_TOKEN``).
  It listens on an ephemeral loopback port (written to ``DIR/service.json``) and exits when its
  parent is gone;
* on its own (``service: external``; the systemd unit ``euca-cc@<cluster>`` of role euca_cc):
  ``... --cluster cluster01 --gateway http://127.0.0.1:7190 --port 7191 --token-file FILE
  --no-parent-watch``. It outlives restarts of the runtime: while the gateway does not answer
  it keeps polling (and reports itself unhealthy), and carries on when the gateway is back.
  Under a ``Type=notify`` unit it says ``READY=1`` once it listens and pings the watchdog.

What it does
------------
* Every poll interval (default 1 s) it asks the runtime (the *gateway* its proxy serves on
  loopback) for the NCs of its cluster and calls ``nc.describe`` on each, all at once, and
  rebuilds its whole view from the answers (`euca_runtime.cluster.scheduler.rebuild`); nothing
  is persisted. The NC calls travel over the bus (mutual TLS, by instance name, wherever the NC
  runs): the service itself never opens a network connection beyond loopback.
* It serves the ``cc.*`` methods of docs/cluster-api.md (``POST /v1/call``), which the proxy
  forwards only while it holds the lease of ``cc/<cluster>``. Every call carries the proxy's
  epoch. A new epoch first runs a *fencing poll*: ``nc.describe`` stamped with the epoch, so
  every NC that answers refuses mutating calls of any older CC from then on; only then does
  the service act. A DISABLED CC's service polls too (without an epoch): its view is warm, so a
  freshly ENABLED CC reports every running instance at once.
* Mutating calls are serialised; an NC's answer to run/terminate/attach/detach goes into the
  view at once (and survives a poll that was already in flight).

HTTP API (loopback, ``Authorization: Bearer <token>``): ``GET /v1/health``, ``POST /v1/call``
``{"method", "body", "epoch"}``, ``POST /v1/role`` ``{"epoch": int | null}``, ``GET /v1/view``.
Errors are ``{"error": KIND, "message", "retry": bool}`` (``retry``: try the CC group again,
e.g. this CC was deposed; else the refusal is the answer, its kind an EC2 error code).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from euca_runtime import sdnotify
from euca_runtime.cluster.instance_types import INSTANCE_TYPES
from euca_runtime.cluster.scheduler import LOST, UP, ClusterView, InsufficientCapacity, place, rebuild
from euca_runtime.log import configure, get_logger

log = get_logger("cc")

POLL_INTERVAL = 1.0
NC_TIMEOUT = 0.8
METHODS = (
    "run_instances",
    "terminate_instances",
    "describe_instances",
    "describe_nodes",
    "attach_volume",
    "detach_volume",
)


class NcUnavailable(Exception):
    """The NC (or its node) did not answer."""


class NcRefused(Exception):
    """The NC refused the call (`kind` is the reason, e.g. ``InsufficientInstanceCapacity``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class CCError(Exception):
    """A refusal of a ``cc.*`` call. `retry`: the caller should try the CC group again."""

    def __init__(self, kind: str, message: str, retry: bool = False) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.retry = retry


class NcTransport(Protocol):
    """How the service reaches the NCs of its cluster (the gateway, or a test double)."""

    async def members(self) -> list[str]: ...

    async def call(self, nc: str, method: str, body: Mapping[str, Any], timeout: float) -> dict[str, Any]: ...


def _ids(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CCError("InvalidParameterValue", f"{what} must be a list of ids or null, got {value!r}")
    return list(value)


def _field(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise CCError("InvalidParameterValue", f"{key} must be a non-empty string, got {value!r}")
    return value


class CCService:
    """The CC's logic over an `NcTransport` (see the module docstring)."""

    def __init__(
        self,
        transport: NcTransport,
        cluster: str,
        *,
        poll_interval: float = POLL_INTERVAL,
        nc_timeout: float = NC_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.cluster = cluster
        self.poll_interval = poll_interval
        self.nc_timeout = nc_timeout
        self.clock = clock
        self.view = ClusterView()
        self.epoch: int | None = None
        self.ready_epoch: int | None = None
        self.polls = 0
        self.started = clock()
        self.last_poll_done: float | None = None
        self.last_poll_ms = 0.0
        self._poll_lock = asyncio.Lock()
        self._role_lock = asyncio.Lock()
        self._mutex = asyncio.Lock()
        self._in_poll: list[tuple[str, dict[str, Any]]] | None = None
        self._placed: dict[str, str] = {}

    # ------------------------------------------------------------------ poll

    async def poll(self) -> ClusterView:
        """One poll of every NC; the view is rebuilt from the answers."""
        async with self._poll_lock:
            t0 = self.clock()
            epoch = self.epoch
            self._in_poll = []
            try:
                members = await self.transport.members()
                body = {"cc_epoch": epoch} if epoch is not None else {}

                async def one(nc: str) -> dict[str, Any] | BaseException:
                    try:
                        return await self.transport.call(nc, "nc.describe", body, self.nc_timeout)
                    except (NcUnavailable, NcRefused) as exc:
                        return exc

                results = await asyncio.gather(*(one(nc) for nc in members))
                answers = dict(zip(members, results, strict=True))
                before = {n for n, v in self.view.nodes.items() if v.state == UP}
                view = rebuild(self.view, members, answers)
                for node, inst in self._in_poll:  # changes made while the poll was in flight
                    if view.nodes.get(node) is not None and view.nodes[node].state == UP:
                        view = view.with_instance(node, inst)
                self.view = view
            finally:
                self._in_poll = None
            after = {n for n, v in self.view.nodes.items() if v.state == UP}
            for nc in sorted(before - after):
                log.warning(
                    "nc lost",
                    extra={
                        "cluster": self.cluster,
                        "peer": nc,
                        "reason": self.view.nodes[nc].reason,
                        "epoch": epoch,
                    },
                )
            for nc in sorted(after - before):
                log.info("nc up", extra={"cluster": self.cluster, "peer": nc, "epoch": epoch})
            self.polls += 1
            self.last_poll_done = self.clock()
            self.last_poll_ms = (self.last_poll_done - t0) * 1000.0
            return self.view

    async def poll_loop(self) -> None:
        gateway_down: str | None = None  # why the NC list could not be read (logged once)
        while True:
            t0 = self.clock()
            try:
                await self.poll()
            except NcUnavailable as exc:  # the runtime (its gateway) is down or restarting
                if gateway_down is None:
                    log.warning(
                        "cc poll: runtime gateway unreachable",
                        extra={"cluster": self.cluster, "reason": str(exc)},
                    )
                gateway_down = str(exc)
            except Exception:
                log.exception("cc poll failed", extra={"cluster": self.cluster})
            else:
                if gateway_down is not None:
                    log.info("cc poll: runtime gateway answers again", extra={"cluster": self.cluster})
                    gateway_down = None
            await asyncio.sleep(max(0.0, self.poll_interval - (self.clock() - t0)))

    def _note(self, node: str, inst: Mapping[str, Any]) -> None:
        doc = dict(inst)
        self.view = self.view.with_instance(node, doc)
        if self._in_poll is not None:
            self._in_poll.append((node, doc))

    def healthy(self) -> tuple[bool, str]:
        """Is the poll loop alive? (A hung service does not answer at all.)"""
        limit = 3 * self.poll_interval + self.nc_timeout + 1.0
        last = self.last_poll_done if self.last_poll_done is not None else self.started
        age = self.clock() - last
        if age > limit:
            return False, f"no poll completed for {age:.1f} s"
        if self.last_poll_done is None:
            return False, "first poll not done yet"
        return True, "polling"

    # ------------------------------------------------------------------ role

    async def set_epoch(self, epoch: int | None) -> None:
        """Adopt the proxy's lease epoch (None: DISABLED). A new epoch runs a fencing poll."""
        async with self._role_lock:
            if epoch is None:
                self.epoch = self.ready_epoch = None
                return
            if self.ready_epoch == epoch:
                return
            if self.epoch is not None and epoch < self.epoch:
                raise CCError("NotPrimary", f"epoch {epoch} is older than {self.epoch}", retry=True)
            self.epoch = epoch
            await self.poll()
            self.ready_epoch = epoch
            log.info(
                "cc enabled: nodes fenced",
                extra={"cluster": self.cluster, "epoch": epoch, "nodes": len(self.view.nodes)},
            )

    # ------------------------------------------------------------------ calls

    async def handle(self, method: str, body: Any, epoch: int | None) -> dict[str, Any]:
        name = method.removeprefix("cc.")
        if name not in METHODS:
            raise CCError("UnknownMethod", f"cc has no method {method!r}")
        if not isinstance(body, Mapping):
            body = {}
        if epoch is None:
            raise CCError("NotPrimary", "this CC is not ENABLED", retry=True)
        await self.set_epoch(epoch)
        if name == "describe_instances":
            return self.describe_instances(_ids(body.get("instance_ids"), "instance_ids"))
        if name == "describe_nodes":
            return {"nodes": [n.describe() for _, n in sorted(self.view.nodes.items())]}
        async with self._mutex:
            if self.ready_epoch != epoch:
                raise CCError("NotPrimary", f"this CC moved on from epoch {epoch}", retry=True)
            if name == "run_instances":
                return await self.run_instances(body, epoch)
            if name == "terminate_instances":
                return await self.terminate_instances(body, epoch)
            return await self.volume(name, body, epoch)

    async def _nc(self, nc: str, method: str, body: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        try:
            return await self.transport.call(
                nc, method, {**body, "cc_epoch": epoch}, max(self.nc_timeout, 2.0)
            )
        except NcRefused as exc:
            if exc.kind == "Fenced":
                raise CCError("NotPrimary", f"deposed: {exc.message}", retry=True) from None
            raise

    def describe_instances(self, ids: Sequence[str] | None) -> dict[str, Any]:
        """The instances of the view (all, or those of `ids` it knows) and the state of every NC
        (``up`` or ``lost``): a caller can tell an instance this CC never saw on a lost NC (a CC
        enabled cold after the NC died) from one that is gone."""
        insts = self.view.instances()
        if ids is not None:
            wanted = set(ids)
            insts = {k: v for k, v in insts.items() if k in wanted}
        return {"instances": [insts[k] for k in sorted(insts)], "nodes": self._node_states()}

    async def run_instances(self, body: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        items = body.get("instances")
        if not isinstance(items, list) or not items:
            raise CCError("InvalidParameterValue", "instances must be a non-empty list")
        reqs: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise CCError("InvalidParameterValue", f"instances[{i}] must be a mapping")
            iid = _field(item, "instance_id")
            itype = _field(item, "instance_type")
            image = _field(item, "image_id")
            t = INSTANCE_TYPES.get(itype)
            if t is None:
                raise CCError(
                    "InvalidParameterValue",
                    f"unknown instance type {itype!r} (known: {', '.join(INSTANCE_TYPES)})",
                )
            if iid in seen:
                raise CCError("InvalidParameterValue", f"instance id {iid} appears twice")
            seen.add(iid)
            reqs.append(
                {
                    "instance_id": iid,
                    "instance_type": itype,
                    "image_id": image,
                    "cores": t.cores,
                    "memory_mib": t.memory_mib,
                    "disk_gib": t.disk_gib,
                }
            )
        results: dict[str, dict[str, Any]] = {}
        todo: list[dict[str, Any]] = []
        known = self.view.instances()
        for req in reqs:
            iid = req["instance_id"]
            found = known.get(iid)
            if found is not None:  # idempotent: already placed (by this CC or an earlier one)
                results[iid] = {"instance_id": iid, "node": found["node"], "state": found["state"]}
            elif iid in self._placed and self.view.nodes.get(self._placed[iid], None) is not None:
                node = self._placed[iid]
                if self.view.nodes[node].state == LOST:  # asked, the answer never came, NC gone
                    results[iid] = {"instance_id": iid, "node": node, "state": LOST}
                else:
                    todo.append(req)
            else:
                todo.append(req)
        started: list[tuple[str, str]] = []
        for attempt in (1, 2):
            if not todo:
                break
            try:
                nodes = [self._placed.get(r["instance_id"]) or "" for r in todo]
                fresh = [r for r, n in zip(todo, nodes, strict=True) if not n]
                plan = iter(place(self.view, fresh))
                nodes = [n or next(plan) for n in nodes]
            except InsufficientCapacity as exc:
                await self._rollback(started, epoch)
                raise CCError("InsufficientInstanceCapacity", str(exc)) from None
            for req, node in zip(todo, nodes, strict=True):
                self._placed[req["instance_id"]] = node

            async def one(req: dict[str, Any], node: str) -> tuple[dict[str, Any], str, Any]:
                try:
                    return req, node, await self._nc(node, "nc.run", req, epoch)
                except (NcRefused, NcUnavailable) as exc:
                    return req, node, exc

            outcome = await asyncio.gather(*(one(r, n) for r, n in zip(todo, nodes, strict=True)))
            todo = []
            for req, node, res in outcome:
                iid = req["instance_id"]
                if isinstance(res, Mapping):
                    self._note(node, res)
                    started.append((iid, node))
                    results[iid] = {"instance_id": iid, "node": node, "state": res.get("state", "pending")}
                elif (
                    isinstance(res, NcRefused) and res.kind == "InsufficientInstanceCapacity" and attempt == 1
                ):
                    self._placed.pop(iid, None)  # our view was stale: look again, place again
                    todo.append(req)
                elif isinstance(res, NcUnavailable):
                    raise CCError("Unavailable", f"{node} did not answer nc.run of {iid}: {res}", retry=True)
                else:
                    await self._rollback(started, epoch)
                    assert isinstance(res, NcRefused)
                    raise CCError(res.kind, res.message)
            if todo:
                await self.poll()
        if todo:
            await self._rollback(started, epoch)
            raise CCError(
                "InsufficientInstanceCapacity", f"no node has room for {len(todo)} of the instances"
            )
        log.info("instances placed", extra={"cluster": self.cluster, "epoch": epoch, "count": len(started)})
        return {"instances": [results[r["instance_id"]] for r in reqs]}

    async def _rollback(self, started: list[tuple[str, str]], epoch: int) -> None:
        """Undo the instances this call started: the whole call is refused."""
        for iid, node in started:
            with contextlib.suppress(NcRefused, NcUnavailable, CCError):
                res = await self._nc(node, "nc.terminate", {"instance_id": iid}, epoch)
                self._note(node, res)

    async def terminate_instances(self, body: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        ids = _ids(body.get("instance_ids"), "instance_ids")
        if not ids:
            raise CCError("InvalidParameterValue", "instance_ids must be a non-empty list")
        known = self.view.instances()
        out: list[dict[str, Any]] = []
        for iid in ids:
            found = known.get(iid)
            if found is None:
                out.append({"instance_id": iid, "previous_state": "terminated", "state": "terminated"})
                continue
            prev, node = found["state"], found["node"]
            if prev == LOST:
                out.append({"instance_id": iid, "previous_state": LOST, "state": LOST, "node": node})
                continue
            try:
                res = await self._nc(node, "nc.terminate", {"instance_id": iid}, epoch)
            except NcUnavailable as exc:
                raise CCError(
                    "Unavailable", f"{node} did not answer nc.terminate of {iid}: {exc}", retry=True
                ) from None
            except NcRefused as exc:
                raise CCError(exc.kind, exc.message) from None
            if not res.get("unknown"):
                self._note(node, res)
            out.append({"instance_id": iid, "previous_state": prev, "state": res.get("state"), "node": node})
        return {"instances": out, "nodes": self._node_states()}

    def _node_states(self) -> dict[str, str]:
        """Every NC of the view and its state (``up`` or ``lost``), as the answers carry them."""
        return {name: n.state for name, n in sorted(self.view.nodes.items())}

    async def volume(self, name: str, body: Mapping[str, Any], epoch: int) -> dict[str, Any]:
        iid = _field(body, "instance_id")
        vol = _field(body, "volume_id")
        found = self.view.find(iid)
        if found is None or found["state"] == "terminated":
            raise CCError("InvalidInstanceID.NotFound", f"the instance {iid} does not exist")
        node = found["node"]
        if found["state"] == LOST:
            raise CCError("IncorrectState", f"the instance {iid} is lost (its node {node} does not answer)")
        req: dict[str, Any] = {"instance_id": iid, "volume_id": vol}
        if name == "attach_volume":
            req["device"] = _field(body, "device")
            req["path"] = str(body.get("path") or "")
        method = "nc.attach" if name == "attach_volume" else "nc.detach"
        try:
            res = await self._nc(node, method, req, epoch)
        except NcUnavailable as exc:
            raise CCError("Unavailable", f"{node} did not answer {method}: {exc}", retry=True) from None
        except NcRefused as exc:
            raise CCError(exc.kind, exc.message) from None
        self._note(node, res)
        return {**res, "node": node}


# --------------------------------------------------------------------------- the process


class GatewayTransport:
    """`NcTransport` through the proxy's loopback gateway (which calls the NCs over the bus)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.session: ClientSession | None = None

    def _session(self) -> ClientSession:
        if self.session is None:
            self.session = ClientSession(headers=self.headers)
        return self.session

    async def members(self) -> list[str]:
        try:
            async with self._session().get(f"{self.url}/v1/ncs", timeout=ClientTimeout(total=2.0)) as resp:
                doc = await resp.json()
        except (ClientError, TimeoutError, ValueError) as exc:
            raise NcUnavailable(f"gateway: {exc}") from None
        return [str(n) for n in doc.get("ncs", [])]

    async def call(self, nc: str, method: str, body: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        doc = {"nc": nc, "method": method, "body": dict(body), "timeout": timeout}
        try:
            async with self._session().post(
                f"{self.url}/v1/nc", json=doc, timeout=ClientTimeout(total=timeout + 1.0)
            ) as resp:
                out = await resp.json()
                status = resp.status
        except (ClientError, TimeoutError, ValueError) as exc:
            raise NcUnavailable(f"{nc}: gateway: {exc or type(exc).__name__}") from None
        if status == 200:
            return dict(out.get("result") or {})
        kind, message = str(out.get("error", "Error")), str(out.get("message", ""))
        if kind == "Unavailable":
            raise NcUnavailable(message)
        raise NcRefused(kind, message)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def make_app(service: CCService, token: str) -> web.Application:
    """The service's loopback HTTP API (see the module docstring)."""

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip(), token):
            return web.json_response(
                {"error": "Unauthorized", "message": "bad token", "retry": False}, status=401
            )
        return await handler(request)

    async def health(request: web.Request) -> web.Response:
        ok, why = service.healthy()
        doc = {
            "ok": ok,
            "cause": why,
            "polls": service.polls,
            "epoch": service.epoch,
            "nodes": len(service.view.nodes),
            "last_poll_ms": round(service.last_poll_ms, 2),
            "pid": os.getpid(),
        }
        return web.json_response(doc, status=200 if ok else 503)

    async def call(request: web.Request) -> web.Response:
        try:
            doc = await request.json()
            method = str(doc["method"])
            epoch = doc.get("epoch")
            epoch = int(epoch) if epoch is not None else None
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response(
                {"error": "InvalidParameterValue", "message": f"bad call: {exc}", "retry": False}, status=400
            )
        try:
            result = await service.handle(method, doc.get("body"), epoch)
        except CCError as exc:
            status = 503 if exc.retry else 409
            return web.json_response(
                {"error": exc.kind, "message": exc.message, "retry": exc.retry}, status=status
            )
        return web.json_response({"result": result})

    async def role(request: web.Request) -> web.Response:
        doc = await request.json()
        epoch = doc.get("epoch")
        try:
            await service.set_epoch(int(epoch) if epoch is not None else None)
        except CCError as exc:
            return web.json_response(
                {"error": exc.kind, "message": exc.message, "retry": exc.retry}, status=409
            )
        return web.json_response({"epoch": service.epoch, "nodes": len(service.view.nodes)})

    async def view(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "generation": service.view.generation,
                "nodes": [n.describe() for _, n in sorted(service.view.nodes.items())],
                "instances": len(service.view.instances()),
            }
        )

    app = web.Application(middlewares=[auth], client_max_size=4 * 1024 * 1024)
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/call", call)
    app.router.add_post("/v1/role", role)
    app.router.add_get("/v1/view", view)
    return app


async def serve(args: argparse.Namespace, token: str) -> int:
    transport = GatewayTransport(args.gateway, token)
    service = CCService(transport, args.cluster, poll_interval=args.poll_interval, nc_timeout=args.nc_timeout)
    runner = web.AppRunner(make_app(service, token), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        log.error(
            "cc service cannot listen", extra={"cluster": args.cluster, "port": args.port, "reason": str(exc)}
        )
        await runner.cleanup()
        return 1
    server = getattr(site, "_server", None)
    port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else args.port
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{port}"
    if args.state_dir:
        state_dir = Path(args.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        ready = state_dir / "service.json"
        tmp = ready.with_suffix(f".tmp.{os.getpid()}")
        tmp.write_text(json.dumps({"pid": os.getpid(), "url": url, "cluster": args.cluster}))
        os.replace(tmp, ready)
    log.info(
        "cc service listening",
        extra={"cluster": args.cluster, "url": url, "pid": os.getpid(), "gateway": args.gateway},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == parent:  # the proxy's runtime died: so do we
            await asyncio.sleep(0.2)
        log.warning("cc service: parent gone, exiting", extra={"cluster": args.cluster})
        stop.set()

    tasks = [asyncio.create_task(service.poll_loop())]
    if not args.no_parent_watch:
        tasks.append(asyncio.create_task(watch_parent()))
    sdnotify.notify("READY=1")
    interval = sdnotify.watchdog_interval()
    if interval:
        tasks.append(asyncio.create_task(sdnotify.watchdog_loop(interval)))
    await stop.wait()
    sdnotify.notify("STOPPING=1")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await transport.close()
    await runner.cleanup()
    log.info("cc service stopped", extra={"cluster": args.cluster})
    return 0


def read_token_file(path: str) -> str:
    """The token in `path`; ValueError when it is unreadable, empty, or readable by group or others."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read(4096).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"token file {path}: {exc}") from None
    if mode & 0o077:
        raise ValueError(f"token file {path}: mode {mode & 0o777:04o} lets others read it (must be 0600)")
    if not token:
        raise ValueError(f"token file {path}: empty")
    return token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="euca_runtime.cluster.cc_service", description=__doc__.splitlines()[0])
    p.add_argument("--cluster", required=True)
    p.add_argument("--gateway", required=True, help="the proxy's loopback gateway URL")
    p.add_argument("--state-dir", default=None, help="where service.json (pid, url) is written (child mode)")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    p.add_argument("--token-file", default=None, help="file holding the API token (else $EUCA_CC_TOKEN)")
    p.add_argument(
        "--no-parent-watch",
        action="store_true",
        help="keep running when the parent process is gone (a service of its own, e.g. under systemd)",
    )
    p.add_argument("--poll-interval", type=float, default=POLL_INTERVAL)
    p.add_argument(
        "--nc-timeout", type=float, default=None, help=f"default: min({NC_TIMEOUT}, poll interval)"
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--node", default=None)
    args = p.parse_args(argv)
    if args.nc_timeout is None:
        args.nc_timeout = min(NC_TIMEOUT, args.poll_interval)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.stderr.write(f"--host must be a loopback address, got {args.host!r}\n")
        return 2
    if args.token_file:
        try:
            token = read_token_file(args.token_file)
        except ValueError as exc:
            sys.stderr.write(f"{exc}\n")
            return 2
    else:
        token = os.environ.get("EUCA_CC_TOKEN", "")
    if not token:
        sys.stderr.write("no token: pass --token-file or set EUCA_CC_TOKEN\n")
        return 2
    configure(args.log_level, node=args.node)
    return asyncio.run(serve(args, token))


if __name__ == "__main__":
    sys.exit(main())
