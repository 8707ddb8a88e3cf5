"""The arbitrator component: a witness that holds no data (DESIGN.md section 10).

Its process is a lease voter (configured in ``voters``); route probing and the route-down
hand-over come with a later issue. The instance is independent (not a primary/backup group):
it is ENABLED whenever its process is healthy.
"""

from __future__ import annotations

from collections.abc import Mapping

from euca_runtime.component import Component, ComponentHandler, ComponentType, RequestInfo, register_type


class Arbitrator(Component):
    """A witness: answers pings; probes routes in a later issue."""

    async def health(self) -> None:
        await self._fault_point()

    def handlers(self) -> Mapping[str, ComponentHandler]:
        async def ping(body: object, request: RequestInfo) -> dict[str, str]:
            return {"node": self.ctx.node_name}

        return {"ping": ping}


ARBITRATOR = register_type(
    ComponentType(
        name="arbitrator",
        factory=Arbitrator,
        replicated=False,
        description="witness voter host; route probing comes later",
    )
)
