"""Test doubles at the bus boundary of the cluster components (unit tests only).

- `LocalCtx`: the `InstanceContext` of a lone primary over a real store: `write` applies the
  ops as the next change record, as the node does once every in-sync backup has them.
- `FakeCC`: the CC's bus methods (docs/cluster-api.md) over an in-memory cluster with a fixed
  number of instance slots on one NC ``nc-1``; `down` makes every call fail as an unreachable
  group does; `nc_lost` makes the NC stop answering (its instances are reported ``lost``, a
  terminate or attach/detach cannot reach them), `restart_cold` stands for a CC enabled afresh,
  whose view has no instance of a lost NC (the NC still runs them), `nc_back` for the NC
  answering again with every instance it ran, and `deregister_nc` for the operator removing it.
- `Bus`: routes `call(type, zone, method, body)` to a `FakeCC` or a real `Sc` component, and
  answers `resolve(group)` (which groups have an ENABLED instance) like `Node.resolve`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from euca_runtime.component import RequestError, RequestInfo, ServiceUnavailable, WriteResult
from euca_runtime.store import ObjectCache, Store, StoreError, sqlite_url

REQ = RequestInfo("m", "node-a", 1e18)


class LocalCtx:
    """A lone primary's context: real store and cache, writes applied in place."""

    def __init__(self, root: Path, type_: str, partition: str | None, component: str) -> None:
        self.type, self.partition = type_, partition
        self.group = f"{type_}/{partition}" if partition else type_
        self.name = f"node-a.{type_}" + (f".{partition}" if partition else "")
        self.node_name = "node-a"
        self.data_dir = root
        self.store = Store.open(sqlite_url(root / f"{self.name}.db"), component=component, group=self.group)
        self.cache = ObjectCache(self.store, warm=True)
        self.seq = 0
        self.writes = 0
        self.node: Any = None
        self.bus: Bus | None = None

    async def write(self, ops: Sequence[Mapping[str, Any]], expires_at: float | None = None) -> WriteResult:
        try:
            self.store.apply(1, self.seq + 1, [dict(o) for o in ops])
        except StoreError as exc:
            raise RequestError("BadRequest", f"write refused: {exc}") from None
        self.seq += 1
        self.writes += 1
        return WriteResult(1, self.seq)

    async def call(
        self,
        type_: str,
        partition: str | None,
        method: str,
        body: Any = None,
        *,
        timeout: float = 5.0,
        dedupe: bool = True,
    ) -> Any:
        assert self.bus is not None
        return await self.bus.call(type_, partition, method, body)

    def close(self) -> None:
        self.cache.close()
        self.store.close()


class FakeCC:
    """The cc.* methods of one cluster with `slots` instance slots (one NC)."""

    def __init__(self, slots: int = 4) -> None:
        self.slots = slots
        self.instances: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.down = False
        self.nc_lost = False
        self.nc_gone = False
        self.unseen: dict[str, dict[str, Any]] = {}
        """Instances the NC runs that a cold CC never saw (back in the view with `nc_back`)."""

    def restart_cold(self) -> None:
        """A new CC: it knows what the NC answers, nothing if the NC is lost (`scheduler.rebuild`)."""
        if self.nc_lost:
            self.unseen.update(self.instances)
            self.instances.clear()

    def deregister_nc(self) -> None:
        """The operator deregisters the lost NC: the CC forgets it and every instance on it."""
        self.instances.clear()
        self.unseen.clear()
        self.nc_gone = True

    def nc_back(self) -> None:
        """The NC answers again: the CC's next poll sees every instance it runs."""
        self.nc_lost = False
        for iid, inst in self.unseen.items():
            self.instances.setdefault(iid, inst)
        self.unseen.clear()

    def _nodes(self) -> dict[str, str]:
        return {} if self.nc_gone else {"nc-1": "lost" if self.nc_lost else "up"}

    def _running(self) -> int:
        return sum(1 for i in self.instances.values() if i["state"] != "terminated")

    async def handle(self, method: str, body: Any) -> Any:
        if self.down:
            raise ServiceUnavailable("cc/c1: no ENABLED instance known", "Unavailable")
        self.calls.append((method, body))
        if method == "cc.run_instances":
            new = [i for i in body["instances"] if i["instance_id"] not in self.instances]
            if new and self.nc_lost:
                raise RequestError("InsufficientInstanceCapacity", "no NC of cluster c1 is up")
            if self._running() + len(new) > self.slots:
                raise RequestError("InsufficientInstanceCapacity", "not enough free cores in cluster c1")
            for i in new:
                self.instances[i["instance_id"]] = {**i, "state": "pending", "node": "nc-1", "volumes": []}
            return {
                "instances": [
                    {
                        "instance_id": i["instance_id"],
                        "node": "nc-1",
                        "state": self.instances[i["instance_id"]]["state"],
                    }
                    for i in body["instances"]
                ]
            }
        if method == "cc.describe_instances":
            for i in self.instances.values():  # the NC booted them meanwhile
                if i["state"] == "pending":
                    i["state"] = "running"
            ids = body.get("instance_ids")
            lost = {"state": "lost"} if self.nc_lost else {}
            return {
                "instances": [
                    {**i, **(lost if i["state"] != "terminated" else {})}
                    for k, i in self.instances.items()
                    if ids is None or k in ids
                ],
                "nodes": self._nodes(),
            }
        if method == "cc.terminate_instances":
            out: list[dict[str, Any]] = []
            for iid in body["instance_ids"]:
                i = self.instances.get(iid)
                if i is None:  # never seen by this CC: reported terminated, without a node
                    out.append({"instance_id": iid, "previous_state": "terminated", "state": "terminated"})
                elif self.nc_lost and i["state"] != "terminated":  # cannot be reached
                    out.append(
                        {"instance_id": iid, "previous_state": "lost", "state": "lost", "node": "nc-1"}
                    )
                else:
                    prev, i["state"] = i["state"], "terminated"
                    i["volumes"] = []
                    out.append(
                        {"instance_id": iid, "previous_state": prev, "state": "terminated", "node": "nc-1"}
                    )
            return {"instances": out, "nodes": self._nodes()}
        if method in ("cc.attach_volume", "cc.detach_volume"):
            i = self.instances.get(body["instance_id"])
            if i is None or i["state"] == "terminated":
                raise RequestError("InvalidInstanceID.NotFound", f"no instance {body['instance_id']}")
            if self.nc_lost:
                raise RequestError("IncorrectState", f"the instance {body['instance_id']} is lost")
            vols = [v for v in i["volumes"] if v["volume_id"] != body["volume_id"]]
            if method == "cc.attach_volume":
                vols.append({"volume_id": body["volume_id"], "device": body["device"]})
            i["volumes"] = vols
            return dict(i)
        raise RequestError("NoHandler", method)


class Bus:
    """Routes calls of the clc to the cluster's fake CC and real SC."""

    def __init__(self, zone: str, cc: FakeCC, sc: Any) -> None:
        self.zone, self.cc, self.sc = zone, cc, sc
        self.sc_down = False

    def resolve(self, group: str) -> tuple[str, str] | None:
        if group == f"cc/{self.zone}" and not self.cc.down:
            return ("node-a", f"node-a.cc.{self.zone}")
        if group == f"sc/{self.zone}" and not self.sc_down:
            return ("node-a", f"node-a.sc.{self.zone}")
        return None

    async def call(self, type_: str, zone: str | None, method: str, body: Any) -> Any:
        if zone != self.zone:
            raise ServiceUnavailable(f"{type_}/{zone}: no ENABLED instance known", "Unavailable")
        if type_ == "cc":
            return await self.cc.handle(method, body)
        if type_ == "sc":
            if self.sc_down:
                raise ServiceUnavailable(f"sc/{zone}: no ENABLED instance known", "Unavailable")
            return await self.sc.handlers()[method](body, REQ)
        raise ServiceUnavailable(f"{type_}/{zone}: no such group", "Unavailable")
