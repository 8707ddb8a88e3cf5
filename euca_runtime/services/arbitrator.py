"""The arbitrator component: a witness that holds no data and watches user routes
(DESIGN.md section 10; docs/arbitrator.md).

Its process is a lease voter (configured in ``voters``). The component probes every route in
the process's configuration (``routes``) once per ``interval``: every target of the route in
one concurrent round (TCP connect or ICMP echo, `euca_runtime.probes`), fed to a pure
`euca_runtime.routes.RouteMonitor`. Route changes are recorded as events of this instance
(``describe-services --events``), logged, counted in the metrics, and reach the nodes in the
process's gossiped status document (``routes``): at once on a change and every gossip period
otherwise. The nodes act on them (`euca_runtime.node`): the replicated instances of a node
behind a DOWN route give up their leases.

The instance is independent (not a primary/backup group): it is ENABLED whenever its process
is healthy and it can probe. When ICMP targets are configured but the process may open no
ICMP socket, it stays NOTREADY with a message saying what to change, and reports nothing
(the nodes keep their last verdict: a route the arbitrator cannot see is not DOWN).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from euca_runtime.component import Component, ComponentHandler, ComponentType, RequestInfo, register_type
from euca_runtime.config import Route
from euca_runtime.log import get_logger
from euca_runtime.probes import IcmpUnavailable, Prober
from euca_runtime.routes import Failback, ProbeResult, RouteEvent, RouteMonitor

if TYPE_CHECKING:
    from euca_runtime.node import Instance

log = get_logger("arbitrator")


class Arbitrator(Component):
    """A witness voter host that probes its routes and reports them to the nodes."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.instance = cast("Instance", ctx)
        self.routes: tuple[Route, ...] = tuple(self.instance.node.cfg.routes)
        self.monitors: dict[str, RouteMonitor] = {
            r.name: RouteMonitor(
                r.name,
                [str(t) for t in r.targets],
                threshold=r.threshold,
                recover=r.recover,
                nodes=r.nodes,
                failback=Failback(r.failback_after),
            )
            for r in self.routes
        }
        self.prober = Prober()
        self.unavailable: str | None = None
        try:
            self.prober.open([t for r in self.routes for t in r.targets])
        except IcmpUnavailable as exc:
            self.unavailable = str(exc.strerror or exc)
            log.error("cannot probe", extra={"node": ctx.node_name, "reason": self.unavailable})
        self._loops: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------------ component hooks

    async def health(self) -> None:
        await self._fault_point()
        if self.unavailable:
            raise RuntimeError(self.unavailable)

    def handlers(self) -> Mapping[str, ComponentHandler]:
        async def ping(body: object, request: RequestInfo) -> dict[str, str]:
            return {"node": self.ctx.node_name}

        async def routes(body: object, request: RequestInfo) -> list[dict[str, Any]]:
            return self.route_reports() or []

        return {"ping": ping, "routes": routes}

    async def on_enabled(self, epoch: int) -> None:
        if self._loops or self.unavailable:
            return
        node = self.instance.node
        for route in self.routes:
            self._loops.append(node.spawn(self._route_loop(route, self.monitors[route.name])))
        if self.routes:
            log.info(
                "probing routes",
                extra={
                    "node": self.ctx.node_name,
                    "routes": [r.name for r in self.routes],
                    "icmp": self.prober.icmp_modes,
                },
            )

    async def on_disabled(self) -> None:
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    def state_note(self) -> str:
        """Appended to the instance's cause in describe-services."""
        if not self.routes:
            return "no routes configured"
        return "routes: " + ", ".join(f"{m.name} {m.status()}" for m in self.monitors.values())

    # ------------------------------------------------------------------ reports

    def route_reports(self) -> list[dict[str, Any]] | None:
        """Every route's report, or None while this arbitrator is not probing (the nodes then
        keep what they last heard instead of forgetting the routes)."""
        if not self._loops:
            return None
        out = []
        for route in self.routes:
            doc = self.monitors[route.name].report()
            doc.update(
                arbitrator=self.ctx.node_name,
                interval=route.interval,
                threshold=route.threshold,
                recover=route.recover,
            )
            out.append(doc)
        return out

    # ------------------------------------------------------------------ probing

    async def _route_loop(self, route: Route, monitor: RouteMonitor) -> None:
        clock = self.instance.node.clock
        targets = list(route.targets)
        next_at = clock.monotonic()
        while True:
            try:
                results = await self.prober.round(targets, route.probe_timeout)
            except Exception as exc:
                log.exception("probe round failed", extra={"route": route.name})
                results = {str(t): ProbeResult(False, f"probe error: {exc}") for t in targets}
            now = clock.monotonic()
            for ev in monitor.observe(results, now):
                self._record(ev)
            next_at += route.interval
            if next_at < now:  # a slow round: skip, do not burst
                next_at = now + route.interval
            await asyncio.sleep(next_at - now)

    def _record(self, ev: RouteEvent) -> None:
        node = self.instance.node
        text = f"route {ev.route} {ev.message}"
        level = log.warning if ev.kind in ("down", "advisory") else log.info
        level(
            text, extra={"node": self.ctx.node_name, "route": ev.route, "event": ev.kind, "round": ev.round}
        )
        node.note(self.ctx.name, text, 0)
        self.instance.update_state()
        node.gossip_soon()


ARBITRATOR = register_type(
    ComponentType(
        name="arbitrator",
        factory=Arbitrator,
        replicated=False,
        description="witness voter host; probes user routes and reports them to the nodes",
    )
)
