"""Stand-ins for the users' end of a local cloud's user routes (``euca-runtime up --ha``).

On real hosts an arbitrator probes "distant" addresses that stand for the users (a gateway,
a router, a service on the users' network). A local cloud has none, so ``up --ha`` runs this
small process: one TCP listener per route target, each on its own loopback address
(127.0.0.21, .22, ... see `euca_runtime.local`), which accepts a connection and closes it.
Taking a target *down* closes its listening socket (a connect is then refused: unreachable);
taking it *up* listens again on the same address and port. No root and no firewall needed.

Control (what tests, benchmarks and the README demo use)::

    python -m euca_runtime.route_targets --dir DIR status
    python -m euca_runtime.route_targets --dir DIR down users-a          # every target of a route
    python -m euca_runtime.route_targets --dir DIR up 127.0.0.21:40001   # or single targets

or over HTTP on the control address recorded in DIR/cloud.json (``route_targets.control``),
with the cloud's admin token: ``GET /v1/targets``, ``POST /v1/targets {"targets": [...],
"up": true|false}``. The process is started by ``up`` (any form) when the layout has routes,
and stopped by ``down`` (the whole cloud). Its pid is in DIR/targets.pid, its log in
DIR/targets.log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

PID_FILE = "targets.pid"
LOG_FILE = "targets.log"


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


class TargetSet:
    """The listeners, one per target address; each can be taken down and up again."""

    def __init__(self, targets: Iterable[str]) -> None:
        self.targets = list(dict.fromkeys(targets))
        self._servers: dict[str, asyncio.base_events.Server | None] = {t: None for t in self.targets}
        self._lock = asyncio.Lock()

    @staticmethod
    async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # a connect is all a probe needs

    async def set(self, target: str, up: bool) -> None:
        if target not in self._servers:
            raise KeyError(target)
        async with self._lock:
            server = self._servers[target]
            if up and server is None:
                host, port = _split(target)
                self._servers[target] = await asyncio.start_server(
                    self._serve, host, port, reuse_address=True
                )
            elif not up and server is not None:
                self._servers[target] = None
                server.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 1.0)

    def status(self) -> dict[str, bool]:
        return {t: s is not None for t, s in self._servers.items()}

    async def close(self) -> None:
        for t in self.targets:
            await self.set(t, False)


def make_control_app(targets: TargetSet, token: str) -> web.Application:
    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip(), token):
            return web.json_response({"error": "Unauthorized", "message": "admin token required"}, status=401)
        resp: web.StreamResponse = await handler(request)
        return resp

    async def get(request: web.Request) -> web.Response:
        return web.json_response({"targets": targets.status()})

    async def post(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            names, up = list(body["targets"]), body["up"]
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {"error": "BadRequest", "message": 'body must be {"targets": [ADDR, ...], "up": true|false}'},
                status=400,
            )
        unknown = [n for n in names if n not in targets.status()]
        if unknown or not isinstance(up, bool):
            return web.json_response(
                {"error": "BadRequest", "message": f"unknown targets {unknown} or up not a boolean"},
                status=400,
            )
        for n in names:
            await targets.set(n, up)
        return web.json_response({"targets": targets.status()})

    app = web.Application(middlewares=[auth])
    app.router.add_get("/v1/targets", get)
    app.router.add_post("/v1/targets", post)
    return app


async def serve(root: Path) -> int:
    doc = json.loads((root / "cloud.json").read_text())
    routes: Sequence[Mapping[str, Any]] = doc.get("routes") or []
    control = str(doc["route_targets"]["control"]).removeprefix("http://")
    token = (root / "admin.token").read_text().strip()
    targets = TargetSet(t for r in routes for t in r["targets"])
    for t in targets.targets:
        await targets.set(t, True)
    runner = web.AppRunner(make_control_app(targets, token), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = _split(control)
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"msg": "route targets up", "control": control, "targets": targets.targets}), flush=True)
    await stop.wait()
    await runner.cleanup()
    await targets.close()
    return 0


def resolve(doc: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """Route names and target addresses -> target addresses (ValueError on an unknown one)."""
    routes = {str(r["name"]): list(r["targets"]) for r in doc.get("routes") or []}
    every = {t for ts in routes.values() for t in ts}
    out: list[str] = []
    for n in names:
        if n in routes:
            out += routes[n]
        elif n in every:
            out.append(n)
        else:
            raise ValueError(f"no route or target {n!r} (routes: {', '.join(routes) or 'none'})")
    return out


def control(
    root: Path, names: Sequence[str] | None, up: bool | None, timeout: float = 5.0
) -> dict[str, bool]:
    """Set targets up or down through the running process (status only when `up` is None)."""
    import urllib.request

    doc = json.loads((root / "cloud.json").read_text())
    url = f"{doc['route_targets']['control']}/v1/targets"
    data = None
    if up is not None:
        data = json.dumps({"targets": resolve(doc, names or []), "up": up}).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    req.add_header("Authorization", f"Bearer {(root / 'admin.token').read_text().strip()}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return dict(json.loads(resp.read())["targets"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m euca_runtime.route_targets", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dir", required=True, help="the local cloud's directory")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="run the listeners (started by `euca-runtime up`)")
    sub.add_parser("status", help="show every target and whether it is up")
    for cmd in ("up", "down"):
        p = sub.add_parser(cmd, help=f"take targets {cmd} (route names or ADDR:PORT)")
        p.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    if args.cmd == "serve":
        return asyncio.run(serve(root))
    try:
        state = control(
            root, getattr(args, "names", None), None if args.cmd == "status" else args.cmd == "up"
        )
    except (OSError, ValueError, KeyError) as exc:
        print(f"route_targets: {exc}", file=sys.stderr)
        return 1
    for t, ok in state.items():
        print(f"{t}  {'up' if ok else 'DOWN'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
