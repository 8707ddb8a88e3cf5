"""The NC (node controller): one per node, not HA (as in Eucalyptus 3), partitioned by cluster.

It reports its capacity and the instances its hypervisor driver runs, and starts, stops,
attaches and detaches through that driver (`euca_runtime.cluster.driver`). Like the
arbitrator it is an independent instance (``replicated=False``): ENABLED whenever it is
healthy. The CC calls a given NC by instance name (``Node.call_instance``), so its methods
are ``peer_handlers`` (docs/cluster-api.md): ``nc.describe``, ``nc.run``, ``nc.terminate``,
``nc.attach``, ``nc.detach`` (the names without the ``nc.`` prefix are accepted too).

Fencing of deposed CCs: every call of the CC service carries ``cc_epoch``, the lease epoch
of the CC that sends it (a DISABLED CC's polls carry none). The NC keeps the highest epoch
it has seen (persisted in ``<state_dir>/fence.json``) and refuses a mutating call stamped
with a lower one (``Fenced``): a CC that lost its lease cannot start an instance on this NC
after the new CC has looked at it, so a retried ``run_instances`` never makes a duplicate.

Capacity (``options``: cores, memory_mib, disk_gib) defaults to the host's real figures;
``nc.run`` refuses with ``InsufficientInstanceCapacity`` what does not fit, whatever the CC
believed. State: ``<data_dir>/nc/<instance name>/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from euca_runtime.cluster.driver import DriverError, HypervisorDriver, InstanceSpec, make_driver
from euca_runtime.cluster.instance_types import INSTANCE_TYPES
from euca_runtime.component import (
    Component,
    ComponentHandler,
    ComponentType,
    InstanceContext,
    RequestError,
    RequestInfo,
    register_type,
)
from euca_runtime.log import get_logger

log = get_logger("nc")

METHODS = ("describe", "run", "terminate", "attach", "detach")


def host_capacity(data_dir: Path) -> dict[str, int]:
    """The host's real figures: CPU count, MemTotal, size of the data dir's file system."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory_mib = 1024
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_mib = int(line.split()[1]) // 1024
                break
    disk_gib = max(1, shutil.disk_usage(data_dir).total // (1024**3))
    return {"cores": max(1, cores), "memory_mib": max(1, memory_mib), "disk_gib": int(disk_gib)}


def _str_field(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError("InvalidParameterValue", f"{key} must be a non-empty string, got {value!r}")
    return value


def _epoch_of(body: Mapping[str, Any]) -> int | None:
    value = body.get("cc_epoch")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError("InvalidParameterValue", f"cc_epoch must be an integer >= 0, got {value!r}")
    return value


class NodeController(Component):
    """One NC (see the module docstring)."""

    def __init__(self, ctx: InstanceContext, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(ctx)
        opts = dict(options if options is not None else getattr(ctx, "options", {}) or {})
        data_dir = Path(getattr(ctx, "data_dir", "."))
        self.state_dir = data_dir / "nc" / ctx.name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        real = host_capacity(data_dir)
        self.capacity = {k: int(opts.get(k, real[k])) for k in ("cores", "memory_mib", "disk_gib")}
        try:
            self.driver: HypervisorDriver = make_driver(str(opts.get("driver", "process")), self.state_dir)
        except DriverError as exc:
            raise ValueError(str(exc)) from None
        self.fence = self._load_fence()
        self._lock = asyncio.Lock()
        log.info(
            "nc ready",
            extra={"service": ctx.name, "driver": self.driver.name, **self.capacity, "fence": self.fence},
        )

    # -- fencing

    @property
    def _fence_path(self) -> Path:
        return self.state_dir / "fence.json"

    def _load_fence(self) -> int:
        try:
            return int(json.loads(self._fence_path.read_text())["cc_epoch"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self._fence_path}: unreadable: {exc}") from None

    def _save_fence(self, epoch: int) -> None:
        tmp = self._fence_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"cc_epoch": epoch}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._fence_path)

    async def _observe(self, epoch: int | None, mutating: bool) -> None:
        """Raise the fence to `epoch`; refuse a mutating call from a deposed CC."""
        if epoch is None:
            return
        if epoch < self.fence:
            if mutating:
                raise RequestError(
                    "Fenced", f"{self.ctx.name} has seen CC epoch {self.fence}; this call carries {epoch}"
                )
            return
        if epoch > self.fence:
            await asyncio.to_thread(self._save_fence, epoch)
            self.fence = epoch
            log.info("cc epoch observed", extra={"service": self.ctx.name, "epoch": epoch})

    # -- component

    async def health(self) -> None:
        await self._fault_point()
        if not os.access(self.state_dir, os.W_OK):
            raise RuntimeError(f"{self.state_dir} is not writable")

    def handlers(self) -> Mapping[str, ComponentHandler]:
        return {}

    def peer_handlers(self) -> Mapping[str, ComponentHandler]:
        table: dict[str, ComponentHandler] = {
            "describe": self._describe,
            "run": self._run,
            "terminate": self._terminate,
            "attach": self._attach,
            "detach": self._detach,
        }
        return table | {f"nc.{k}": v for k, v in table.items()}

    async def close(self) -> None:
        self.driver.close()

    async def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except DriverError as exc:
            raise RequestError("IncorrectState", str(exc)) from None

    async def describe(self) -> dict[str, Any]:
        """``nc.describe``: the driver's running set now, and the capacity."""
        recs = await self._call(self.driver.list)
        return {
            "node": self.ctx.name,
            "runtime_node": self.ctx.node_name,
            "driver": self.driver.name,
            **self.capacity,
            "cc_epoch": self.fence,
            "instances": [r.public() for r in recs],
        }

    async def _describe(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        body = body if isinstance(body, Mapping) else {}
        await self._observe(_epoch_of(body), mutating=False)
        async with self._lock:
            return await self.describe()

    async def _run(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        if not isinstance(body, Mapping):
            raise RequestError("InvalidParameterValue", "nc.run needs a mapping body")
        instance_id = _str_field(body, "instance_id")
        itype = _str_field(body, "instance_type")
        image_id = _str_field(body, "image_id")
        known = INSTANCE_TYPES.get(itype)
        if known is None:
            raise RequestError(
                "InvalidParameterValue",
                f"unknown instance type {itype!r} (known: {', '.join(INSTANCE_TYPES)})",
            )
        need = {}
        for key in ("cores", "memory_mib", "disk_gib"):
            value = body.get(key, getattr(known, key))
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RequestError("InvalidParameterValue", f"{key} must be an integer > 0, got {value!r}")
            need[key] = value
        async with self._lock:
            await self._observe(_epoch_of(body), mutating=True)
            recs = await self._call(self.driver.list)
            for r in recs:
                if r.instance_id == instance_id and r.live:
                    return r.public()  # idempotent: already running here
            used = {k: sum(getattr(r, k) for r in recs if r.live) for k in need}
            short = [k for k in need if used[k] + need[k] > self.capacity[k]]
            if short:
                raise RequestError(
                    "InsufficientInstanceCapacity",
                    f"{self.ctx.name}: not enough "
                    + ", ".join(f"{k} ({self.capacity[k] - used[k]} free, {need[k]} asked)" for k in short),
                )
            spec = InstanceSpec(
                instance_id, itype, image_id, need["cores"], need["memory_mib"], need["disk_gib"]
            )
            rec = await self._call(self.driver.run, spec)
            log.info("instance running", extra={"service": self.ctx.name, "instance": instance_id})
            return rec.public()

    async def _terminate(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        body = body if isinstance(body, Mapping) else {}
        instance_id = _str_field(body, "instance_id")
        async with self._lock:
            await self._observe(_epoch_of(body), mutating=True)
            rec = await self._call(self.driver.terminate, instance_id)
        if rec is None:
            return {"instance_id": instance_id, "state": "terminated", "volumes": [], "unknown": True}
        return rec.public()

    async def _attach(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        body = body if isinstance(body, Mapping) else {}
        args = [_str_field(body, k) for k in ("instance_id", "volume_id", "device")]
        path = str(body.get("path") or "")
        async with self._lock:
            await self._observe(_epoch_of(body), mutating=True)
            rec = await self._call(self.driver.attach, *args, path)
        return rec.public()

    async def _detach(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        body = body if isinstance(body, Mapping) else {}
        args = [_str_field(body, k) for k in ("instance_id", "volume_id")]
        async with self._lock:
            await self._observe(_epoch_of(body), mutating=True)
            rec = await self._call(self.driver.detach, *args)
        return rec.public()


NC = register_type(
    ComponentType(
        name="nc",
        factory=NodeController,
        partitioned=True,
        replicated=False,
        description="node controller: runs instances through a hypervisor driver (not HA)",
    )
)
