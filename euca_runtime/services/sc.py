"""The sc component: a cluster's storage controller (``sc/<cluster>``), replicated like the clc.

Bus methods (docs/cluster-api.md; served by the ENABLED instance of the group, wherever it runs;
the clc's EC2 API is the only caller). Ids are made by the clc, so every mutating method is
idempotent by the id it carries: a retry of a call whose write committed before a failover
finds its own result (same parameters) instead of failing.

- ``sc.create_volume {volume_id, size_gib, snapshot_id | null}`` -> volume dict;
- ``sc.delete_volume {volume_id}`` -> ``{volume_id, deleted}`` (``VolumeInUse`` while attached,
  ``InvalidVolume.NotFound`` for an unknown id);
- ``sc.describe_volumes {volume_ids | null}`` -> ``{volumes}`` (unknown ids are left out);
- ``sc.mark_attached {volume_id, instance_id, device, status?}``: ``status`` ``attaching``
  (before the NC is asked) or ``attached`` (the default: after it answered); ``VolumeInUse``
  when attached to another instance;
- ``sc.mark_detached {volume_id, instance_id?, status?}``: ``status: "detaching"`` marks the
  attachment as going away (before the NC is asked); without it the attachment is cleared;
  with ``instance_id`` the volume must be attached to that instance (``IncorrectState``);
- ``sc.create_snapshot {snapshot_id, volume_id}`` -> snapshot dict; ``sc.delete_snapshot
  {snapshot_id}``; ``sc.describe_snapshots {snapshot_ids | null}`` -> ``{snapshots}``.

Volume dict: ``{volume_id, size_gib, snapshot_id, status ("available" | "in-use"), create_time,
attachment: null | {instance_id, device, status, attach_time}, path}``. Snapshot dict:
``{snapshot_id, volume_id, size_gib, status: "completed", start_time, progress: "100%"}`` (the
copy is made while the op is applied, so a snapshot exists only once complete).

State and files: `euca_runtime.cluster.scstore`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from typing import Any

from euca_runtime.cluster import scstore
from euca_runtime.cluster.scstore import (
    MAX_SIZE_GIB,
    SNAPSHOT_ID_RE,
    VOLUME_ID_RE,
    VolumeFiles,
    refusal,
    register_files,
    snapshot_create_op,
    snapshot_delete_op,
    unregister_files,
    volume_attach_op,
    volume_create_op,
    volume_delete_op,
    volume_detach_op,
)
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
from euca_runtime.store import Changes

log = get_logger("sc")

assert scstore.SC.name == "sc"


def _param(body: Any, name: str, *, required: bool = True) -> Any:
    if not isinstance(body, Mapping):
        raise RequestError("InvalidParameterValue", "the request body must be a mapping")
    v = body.get(name)
    if required and (v is None or v == ""):
        raise RequestError("MissingParameter", f"The request must contain the parameter {name}")
    return v


def _volume_id(v: Any) -> str:
    if not isinstance(v, str) or not VOLUME_ID_RE.fullmatch(v):
        raise RequestError("InvalidVolumeID.Malformed", f'Invalid id: "{v}" (expecting "vol-...")')
    return v


def _snapshot_id(v: Any) -> str:
    if not isinstance(v, str) or not SNAPSHOT_ID_RE.fullmatch(v):
        raise RequestError("InvalidSnapshotID.Malformed", f'Invalid id: "{v}" (expecting "snap-...")')
    return v


def _ids(body: Any, name: str) -> list[str] | None:
    v = body.get(name) if isinstance(body, Mapping) else None
    if v is None:
        return None
    if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
        raise RequestError("InvalidParameterValue", f"{name} must be a list of ids")
    return list(v)


class Sc(Component):
    """One SC instance: its volume files, its handlers (ENABLED only) and its appliers' files."""

    def __init__(self, ctx: InstanceContext) -> None:
        super().__init__(ctx)
        store = ctx.store
        if store is None:
            raise ValueError("sc needs its replicated store")
        data_dir = getattr(ctx, "data_dir", None)
        if data_dir is None:
            raise ValueError("sc needs a data directory")
        self.files = VolumeFiles(data_dir / "sc" / ctx.name)
        self._url = store.engine.url
        register_files(self._url, self.files)
        store.add_listener(self._on_changes)
        self._locks: dict[str, asyncio.Lock] = {}
        removed, made = self.files.reconcile(self._rows("sc_volume"), self._rows("sc_snapshot"))
        log.info("sc files reconciled", extra={"service": ctx.name, "removed": removed, "made": made})

    # ------------------------------------------------------------------ local state

    def _rows(self, table: str) -> list[dict[str, Any]]:
        store = self.ctx.store
        assert store is not None
        with store.read_session() as s:
            model = scstore.Volume if table == "sc_volume" else scstore.Snapshot
            cols = [c.name for c in model.__table__.columns]
            return [{c: getattr(r, c) for c in cols} for r in s.query(model).all()]

    def _on_changes(self, changes: Changes) -> None:
        """Store listener (after each commit): removals, or a full reconcile after an install."""
        if changes.reset:
            self.files.forget_removals()
            self.files.reconcile(self._rows("sc_volume"), self._rows("sc_snapshot"))
        else:
            self.files.committed(changes.position.seq)

    async def close(self) -> None:
        unregister_files(self._url)

    async def health(self) -> None:
        await super().health()
        if not os.access(self.files.root, os.W_OK):
            raise RuntimeError(f"{self.files.root} is not writable")

    def _cache(self) -> Any:
        cache = self.ctx.cache
        if cache is None:
            raise ServiceUnavailable("the sc has no store", "NotReady")
        return cache

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) > 10_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _write(self, ops: list[dict[str, Any]], request: RequestInfo) -> None:
        try:
            await self.ctx.write(ops, request.expires_at)
        except RequestError as exc:
            raise refusal(exc) from None

    # ------------------------------------------------------------------ documents

    def volume_doc(self, r: Mapping[str, Any]) -> dict[str, Any]:
        attachment = None
        if r["attach_instance"]:
            attachment = {
                "instance_id": r["attach_instance"],
                "device": r["attach_device"],
                "status": r["attach_status"],
                "attach_time": r["attach_time"],
            }
        return {
            "volume_id": r["volume_id"],
            "size_gib": r["size_gib"],
            "snapshot_id": r["snapshot_id"],
            "status": "in-use" if attachment else "available",
            "create_time": r["create_time"],
            "attachment": attachment,
            "path": str(self.files.volume_path(r["volume_id"])),
        }

    @staticmethod
    def snapshot_doc(r: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "snapshot_id": r["snapshot_id"],
            "volume_id": r["volume_id"],
            "size_gib": r["size_gib"],
            "status": "completed",
            "start_time": r["start_time"],
            "progress": "100%",
        }

    def _volume(self, vid: str) -> Mapping[str, Any]:
        row = self._cache().get("sc_volume", vid)
        if row is None:
            raise RequestError("InvalidVolume.NotFound", f"The volume '{vid}' does not exist.")
        return row  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ handlers

    def handlers(self) -> Mapping[str, ComponentHandler]:
        return {
            "sc.create_volume": self.create_volume,
            "sc.delete_volume": self.delete_volume,
            "sc.describe_volumes": self.describe_volumes,
            "sc.mark_attached": self.mark_attached,
            "sc.mark_detached": self.mark_detached,
            "sc.create_snapshot": self.create_snapshot,
            "sc.delete_snapshot": self.delete_snapshot,
            "sc.describe_snapshots": self.describe_snapshots,
        }

    async def create_volume(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        vid = _volume_id(_param(body, "volume_id"))
        size = _param(body, "size_gib")
        snap = _param(body, "snapshot_id", required=False) or None
        if snap is not None:
            snap = _snapshot_id(snap)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE_GIB:
            raise RequestError("InvalidParameterValue", f"size_gib must be an integer 1..{MAX_SIZE_GIB}")
        async with self._lock(vid):
            row = self._cache().get("sc_volume", vid)
            if row is None:
                if snap is not None:
                    src = self._cache().get("sc_snapshot", snap)
                    if src is None:
                        raise RequestError(
                            "InvalidSnapshot.NotFound", f"The snapshot '{snap}' does not exist."
                        )
                    if size < src["size_gib"]:
                        raise RequestError(
                            "InvalidParameterValue",
                            f"volume size {size} GiB is smaller than the snapshot's ({src['size_gib']} GiB)",
                        )
                await self._write([volume_create_op(vid, size, snap, time.time())], request)
                row = self._volume(vid)
                log.info("volume created", extra={"service": self.ctx.name, "volume": vid, "size_gib": size})
            elif row["size_gib"] != size or row["snapshot_id"] != snap:
                raise RequestError("InvalidVolume.Duplicate", f"The volume '{vid}' already exists.")
            return self.volume_doc(row)

    async def delete_volume(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        vid = _volume_id(_param(body, "volume_id"))
        async with self._lock(vid):
            row = self._volume(vid)
            if row["attach_instance"]:
                raise RequestError(
                    "VolumeInUse", f"Volume {vid} is currently attached to {row['attach_instance']}"
                )
            await self._write([volume_delete_op(vid)], request)
        log.info("volume deleted", extra={"service": self.ctx.name, "volume": vid})
        return {"volume_id": vid, "deleted": True}

    async def describe_volumes(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        ids = _ids(body, "volume_ids")
        cache = self._cache()
        if ids is None:
            rows = cache.items("sc_volume")
        else:
            rows = [r for r in (cache.get("sc_volume", i) for i in ids) if r is not None]
        return {"volumes": [self.volume_doc(r) for r in sorted(rows, key=lambda r: r["volume_id"])]}

    async def mark_attached(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        vid = _volume_id(_param(body, "volume_id"))
        instance = _param(body, "instance_id")
        device = _param(body, "device")
        status = _param(body, "status", required=False) or "attached"
        if status not in ("attaching", "attached"):
            raise RequestError(
                "InvalidParameterValue", f"status must be attaching or attached, not {status!r}"
            )
        if not isinstance(instance, str) or not isinstance(device, str):
            raise RequestError("InvalidParameterValue", "instance_id and device must be strings")
        async with self._lock(vid):
            row = self._volume(vid)
            current = row["attach_instance"]
            if current is not None and (current != instance or row["attach_device"] != device):
                raise RequestError("VolumeInUse", f"vol {vid} is already attached to an instance ({current})")
            if current is not None and row["attach_status"] == "detaching":
                raise RequestError("IncorrectState", f"Volume {vid} is detaching from {current}")
            if current is None or row["attach_status"] != status:
                when = row["attach_time"] if current is not None else time.time()
                await self._write([volume_attach_op(vid, instance, device, status, when)], request)
                log.info(
                    "volume attachment",
                    extra={"service": self.ctx.name, "volume": vid, "instance": instance, "status": status},
                )
            return self.volume_doc(self._volume(vid))

    async def mark_detached(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        vid = _volume_id(_param(body, "volume_id"))
        instance = _param(body, "instance_id", required=False)
        status = _param(body, "status", required=False)
        if status not in (None, "detaching"):
            raise RequestError("InvalidParameterValue", f"status must be detaching or absent, not {status!r}")
        async with self._lock(vid):
            row = self._volume(vid)
            current = row["attach_instance"]
            if current is None:
                if status == "detaching":
                    raise RequestError("IncorrectState", f"Volume {vid} is not attached")
                return self.volume_doc(row)
            if instance is not None and current != instance:
                raise RequestError(
                    "IncorrectState", f"Volume {vid} is attached to {current}, not to {instance}"
                )
            if status == "detaching":
                if row["attach_status"] != "detaching":
                    op = volume_attach_op(
                        vid, current, row["attach_device"] or "", "detaching", row["attach_time"]
                    )
                    await self._write([op], request)
            else:
                await self._write([volume_detach_op(vid)], request)
            log.info(
                "volume attachment",
                extra={
                    "service": self.ctx.name,
                    "volume": vid,
                    "instance": current,
                    "status": status or "detached",
                },
            )
            return self.volume_doc(self._volume(vid))

    async def create_snapshot(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        sid = _snapshot_id(_param(body, "snapshot_id"))
        vid = _volume_id(_param(body, "volume_id"))
        async with self._lock(sid):
            row = self._cache().get("sc_snapshot", sid)
            if row is None:
                vol = self._volume(vid)
                await self._write([snapshot_create_op(sid, vid, vol["size_gib"], time.time())], request)
                row = self._cache().get("sc_snapshot", sid)
                log.info("snapshot created", extra={"service": self.ctx.name, "snapshot": sid, "volume": vid})
            elif row["volume_id"] != vid:
                raise RequestError("InvalidSnapshot.Duplicate", f"The snapshot '{sid}' already exists.")
            assert row is not None
            return self.snapshot_doc(row)

    async def delete_snapshot(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        sid = _snapshot_id(_param(body, "snapshot_id"))
        async with self._lock(sid):
            if self._cache().get("sc_snapshot", sid) is None:
                raise RequestError("InvalidSnapshot.NotFound", f"The snapshot '{sid}' does not exist.")
            await self._write([snapshot_delete_op(sid)], request)
        log.info("snapshot deleted", extra={"service": self.ctx.name, "snapshot": sid})
        return {"snapshot_id": sid, "deleted": True}

    async def describe_snapshots(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        ids = _ids(body, "snapshot_ids")
        cache = self._cache()
        if ids is None:
            rows = cache.items("sc_snapshot")
        else:
            rows = [r for r in (cache.get("sc_snapshot", i) for i in ids) if r is not None]
        return {"snapshots": [self.snapshot_doc(r) for r in sorted(rows, key=lambda r: r["snapshot_id"])]}


SC_TYPE = register_type(
    ComponentType(
        name="sc",
        factory=Sc,
        partitioned=True,
        replicated=True,
        store_component="sc",
        description="storage controller of a cluster: volumes and snapshots (sparse files)",
    )
)
