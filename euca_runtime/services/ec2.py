"""The EC2 Query API subset of the clc: images, instances, volumes, snapshots, availability zones.

Two halves, as for IAM (`euca_runtime.services.iam`):

- `Ec2`: the logic, run by the ENABLED clc behind its bus method ``ec2.action``. The clc owns the
  user-visible records (images, reservations, instances' owner and launch data, the owner records
  of volumes and snapshots) in its replicated tables, allocates every id (``r-``, ``i-``,
  ``vol-``, ``snap-``, ``emi-`` + 8 hex digits) and writes it *before* it asks the CC or the SC of
  the zone for anything physical (docs/cluster-api.md). A retried request (same client token, or
  the same request id forwarded again across a clc failover) finds its records and re-drives the
  same ids, so it never makes two.
- `make_api_app(node)`: the HTTP front end (``POST /`` form-encoded ``Action=...&Version=2016-11-15``,
  what boto3's ``ec2`` client and the AWS CLI send), on every process that hosts a clc
  (config ``api.ec2``): SigV4 is checked where the request arrives, then the action is forwarded
  over the bus to the ENABLED clc, held and retried across a failover until its deadline.

Records carry a ``phase``: the clc's intent, written before the physical step and updated after it
(``launching`` -> ``launched``, ``terminating`` -> ``terminated``, ``creating`` -> ``created``,
``deleting`` -> gone). A failover between the two writes leaves the intent, which the next ENABLED
clc's reconciler (every `RECONCILE_INTERVAL` s) drives to its end with the same ids (every CC and SC
method is idempotent by id). ``terminating`` ends only when the instance's NC confirms the stop: it
lasts (shown ``shutting-down``) while that NC is lost, see `Ec2._drive_terminate`. Attachments live
in the SC with their own transitional states, see `Ec2._attach` (docs/api.md, "EC2", for the
ordering argument).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

from aiohttp import web

from euca_runtime.cluster.instance_types import INSTANCE_TYPES
from euca_runtime.component import RequestError, RequestInfo, ServiceUnavailable, group_key
from euca_runtime.log import get_logger
from euca_runtime.services.query_api import QueryApi, Refusal, make_query_app
from euca_runtime.sigv4 import AuthError, query_error
from euca_runtime.store import StoreError

if TYPE_CHECKING:
    from euca_runtime.node import Node
    from euca_runtime.services.clc import Clc

log = get_logger("ec2")

API_VERSION = "2016-11-15"
XMLNS = f"http://ec2.amazonaws.com/doc/{API_VERSION}/"
DEFAULT_IMAGE_ID = "emi-00000001"
DEFAULT_IMAGE_NAME = "euca-default"
DEFAULT_INSTANCE_TYPE = "m1.small"
ADMIN_ACCOUNT = "eucalyptus"
MAX_INSTANCES_PER_CALL = 20
MAX_VOLUME_GIB = 1024
CALL_TIMEOUT = 10.0
"""Budget of one call to the CC or SC of a zone (held and retried across their failover)."""
DESCRIBE_TIMEOUT = 3.0
"""DescribeInstances asks the CC for live states this long, then answers from the clc's records."""
API_TIMEOUT = 30.0
"""Budget of one forwarded action (covers a clc failover plus the CC/SC calls)."""
RECONCILE_INTERVAL = 2.0
RECONCILE_GRACE = 15.0
"""The reconciler leaves a launch or a create younger than this to the request that made it."""
TERMINATED_VISIBLE = 3600.0
"""A terminated instance stays visible this long (as in EC2), then DescribeInstances omits it."""
MAX_BODY = 256 * 1024

STATE_CODES = {
    "pending": 0,
    "running": 16,
    "shutting-down": 32,
    "terminated": 48,
    "stopping": 64,
    "stopped": 80,
    "lost": 96,
}

ACTIONS = (
    "DescribeAvailabilityZones",
    "DescribeImages",
    "RegisterImage",
    "RunInstances",
    "DescribeInstances",
    "TerminateInstances",
    "CreateVolume",
    "DescribeVolumes",
    "AttachVolume",
    "DetachVolume",
    "DeleteVolume",
    "CreateSnapshot",
    "DescribeSnapshots",
    "DeleteSnapshot",
)

STATUS = {
    "Unavailable": 503,
    "ServiceUnavailable": 503,
    "InternalError": 500,
    "AuthFailure": 401,
    "UnauthorizedOperation": 403,
}
"""HTTP status of an error code (400 for every other client error, as EC2 answers)."""

ID_RE = {
    "instance": re.compile(r"i-[0-9a-f]{8,17}"),
    "volume": re.compile(r"vol-[0-9a-f]{8,17}"),
    "snapshot": re.compile(r"snap-[0-9a-f]{8,17}"),
    "image": re.compile(r"[ae]mi-[0-9a-f]{8,17}"),
    "reservation": re.compile(r"r-[0-9a-f]{8,17}"),
}
_DEVICE_RE = re.compile(r"/dev/(sd|xvd|vd)[a-z][0-9]{0,2}")
_IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9()\[\] ./'@_-]{3,128}")
ARCHITECTURES = ("x86_64", "i386", "arm64")


def _err(code: str, message: str) -> RequestError:
    return RequestError(code, message)


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


# --------------------------------------------------------------------------- query parameters


def members(params: Mapping[str, Any], prefix: str) -> list[str]:
    """``Prefix.1``, ``Prefix.2``, ... in index order (EC2's flattened lists)."""
    out: list[tuple[int, str]] = []
    for k, v in params.items():
        head, dot, n = k.rpartition(".")
        if dot and head == prefix and n.isdigit():
            out.append((int(n), str(v)))
    return [v for _, v in sorted(out)]


def filters(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """``Filter.N.Name`` / ``Filter.N.Value.M`` as {name: [values]}."""
    out: dict[str, list[str]] = {}
    idx = sorted({int(k.split(".")[1]) for k in params if re.fullmatch(r"Filter\.\d+\.Name", k)})
    for n in idx:
        name = str(params[f"Filter.{n}.Name"])
        out.setdefault(name, []).extend(members(params, f"Filter.{n}.Value"))
    return out


def _required(params: Mapping[str, Any], name: str) -> str:
    v = params.get(name)
    if v is None or v == "":
        raise _err("MissingParameter", f"The request must contain the parameter {name}")
    return str(v)


def _int(params: Mapping[str, Any], name: str, default: int | None, lo: int, hi: int) -> int:
    v = params.get(name)
    if v is None or v == "":
        if default is None:
            raise _err("MissingParameter", f"The request must contain the parameter {name}")
        return default
    try:
        n = int(str(v))
    except ValueError:
        raise _err(
            "InvalidParameterValue", f"Value ({v}) for parameter {name} is invalid. Expected an integer."
        ) from None
    if not lo <= n <= hi:
        raise _err(
            "InvalidParameterValue", f"Value ({v}) for parameter {name} is invalid: must be {lo}..{hi}."
        )
    return n


def check_id(kind: str, value: str) -> str:
    """An id of `kind` or the EC2 ``...ID.Malformed`` error."""
    if not ID_RE[kind].fullmatch(value):
        code = {
            "instance": "InvalidInstanceID.Malformed",
            "volume": "InvalidVolumeID.Malformed",
            "snapshot": "InvalidSnapshotID.Malformed",
            "image": "InvalidAMIID.Malformed",
            "reservation": "InvalidReservationID.Malformed",
        }[kind]
        prefix = {"instance": "i", "volume": "vol", "snapshot": "snap", "image": "emi", "reservation": "r"}[
            kind
        ]
        raise _err(code, f'Invalid id: "{value}" (expecting "{prefix}-...")')
    return value


def _match(value: Any, wanted: Sequence[str] | None) -> bool:
    return wanted is None or str(value) in wanted


class Ec2:
    """The EC2 logic of one clc instance (its handler runs on the ENABLED one only)."""

    def __init__(self, clc: Clc) -> None:
        self.clc = clc
        self.ctx = clc.ctx
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ plumbing

    def _cache(self) -> Any:
        cache = self.ctx.cache
        if cache is None:
            raise ServiceUnavailable("the clc has no store", "NotReady")
        return cache

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) > 10_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _rows(self, table: str) -> list[Mapping[str, Any]]:
        return list(self._cache().items(table))

    def _row(self, table: str, key: str) -> Mapping[str, Any] | None:
        return self._cache().get(table, key)  # type: ignore[no-any-return]

    async def _write(self, ops: list[dict[str, Any]]) -> None:
        if ops:
            await self.ctx.write(ops)

    async def _call(
        self, type_: str, zone: str, method: str, body: Any, timeout: float = CALL_TIMEOUT
    ) -> Any:
        return await self.ctx.call(type_, zone, method, body, timeout=timeout)

    def _new_id(self, prefix: str, table: str, taken: Iterable[str] = ()) -> str:
        used = set(taken)
        while True:
            candidate = f"{prefix}-{secrets.token_hex(4)}"
            if candidate not in used and self._row(table, candidate) is None:
                return candidate

    @staticmethod
    def _put(table: str, row: Mapping[str, Any]) -> dict[str, Any]:
        from euca_runtime.services.clc import row_put_op

        return row_put_op(table, row)

    @staticmethod
    def _delete(table: str, key: str) -> dict[str, Any]:
        from euca_runtime.services.clc import row_delete_op

        return row_delete_op(table, [key])

    def _done_ops(self, rid: str, action: str, result: str | None = None) -> list[dict[str, Any]]:
        """Ops recording that request `rid` deletes (or terminates) something, with what its
        retry answers (`result`; `euca_runtime.store.requests`)."""
        from euca_runtime.services.clc import CLC_REQUESTS

        return CLC_REQUESTS.ops(self._cache(), rid, action, time.time(), result)

    def _done_result(self, rid: str, action: str) -> str | None:
        """The `result` request `rid` recorded when it took effect as `action` (None: none)."""
        from euca_runtime.services.clc import CLC_REQUESTS

        row = CLC_REQUESTS.row(self._cache(), rid, action)
        return None if row is None else row["result"]

    def _deleted_by(self, rid: str, table: str, key: str) -> bool:
        """Whether the record `key` is gone and request `rid` deleted it: the request's retry
        (same request id, forwarded again across a clc failover) answers success, as the first
        attempt did, instead of NotFound."""
        from euca_runtime.services.clc import CLC_REQUESTS

        return self._row(table, key) is None and CLC_REQUESTS.done(self._cache(), rid)

    # ------------------------------------------------------------------ zones

    def zones(self) -> list[str]:
        """One availability zone per registered cluster (partition of a cc, sc or nc)."""
        rows = self.clc.registry()
        return sorted(
            {
                r["partition"]
                for r in rows
                if r["type"] in ("cc", "sc", "nc") and r["partition"] and r["registered"]
            }
        )

    def has_cc(self, zone: str) -> bool:
        """True when a cc instance of `zone` is registered (it may be failing over right now)."""
        return any(
            r["type"] == "cc" and r["partition"] == zone and r["registered"] for r in self.clc.registry()
        )

    def group_enabled(self, type_: str, zone: str) -> bool:
        """True when the (type, zone) group has an ENABLED instance in this process's view."""
        node = getattr(self.ctx, "node", None)
        return node is not None and node.resolve(group_key(type_, zone)) is not None

    def _zone(self, value: str | None) -> str:
        zones = self.zones()
        if value:
            if value not in zones:
                raise _err("InvalidParameterValue", f"Invalid availability zone: [{value}]")
            return value
        for z in zones:
            if self.group_enabled("cc", z):
                return z
        if zones:
            return zones[0]
        raise _err(
            "InsufficientInstanceCapacity", "There is no availability zone (no cluster is registered)."
        )

    # ------------------------------------------------------------------ lifecycle

    def on_enabled(self, epoch: int) -> None:
        self.on_disabled()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._ensure_default_image(), name="ec2-default-image"),
            loop.create_task(self._reconcile_loop(), name="ec2-reconcile"),
        ]

    def on_disabled(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks = []

    async def _ensure_default_image(self) -> None:
        """Register `DEFAULT_IMAGE_ID` (public, owned by the eucalyptus account) once."""
        while True:
            try:
                if self._row("ec2_image", DEFAULT_IMAGE_ID) is not None:
                    return
                account = self._row("iam_account", ADMIN_ACCOUNT)
                if account is None:
                    await asyncio.sleep(0.2)
                    continue
                row = {
                    "image_id": DEFAULT_IMAGE_ID,
                    "account": ADMIN_ACCOUNT,
                    "owner_id": account["account_id"],
                    "name": DEFAULT_IMAGE_NAME,
                    "description": "the default image, registered at first boot",
                    "location": "euca-default/image.manifest.xml",
                    "architecture": "x86_64",
                    "is_public": True,
                    "created_ts": time.time(),
                    "request_id": None,
                }
                async with self._lock(DEFAULT_IMAGE_ID):
                    if self._row("ec2_image", DEFAULT_IMAGE_ID) is None:
                        await self._write([self._put("ec2_image", row)])
                        log.info("default image registered", extra={"image": DEFAULT_IMAGE_ID})
                return
            except ServiceUnavailable:
                await asyncio.sleep(0.2)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await self.reconcile(grace=RECONCILE_GRACE)
            except (RequestError, ServiceUnavailable, StoreError, OSError) as exc:
                log.warning("ec2 reconcile pass failed", extra={"reason": str(exc)})
            await asyncio.sleep(RECONCILE_INTERVAL)

    async def reconcile(self, timeout: float = 5.0, grace: float = 0.0) -> int:
        """Drive every record left in a transitional phase to its end (one pass); returns the
        number of items driven. Failures are left for the next pass. Launches and creates younger
        than `grace` seconds are left alone (their request is driving them)."""
        done = 0
        old = time.time() - grace
        instances = self._rows("ec2_instance")
        for phase, drive in (("launching", self._drive_launch), ("terminating", self._drive_terminate)):
            for res in sorted(
                {
                    i["reservation_id"]
                    for i in instances
                    if i["phase"] == phase and (phase != "launching" or i["launch_ts"] < old)
                }
            ):
                with contextlib.suppress(ServiceUnavailable, RequestError):
                    async with self._lock(res):
                        await drive(res, timeout=timeout)
                    done += 1
        for v in self._rows("ec2_volume"):
            if v["phase"] == "deleting" or (v["phase"] == "creating" and v["created_ts"] < old):
                with contextlib.suppress(ServiceUnavailable, RequestError):
                    async with self._lock(v["volume_id"]):
                        if v["phase"] == "creating":
                            await self._drive_create_volume(v["volume_id"], timeout=timeout)
                        else:
                            await self._drive_delete_volume(v["volume_id"], timeout=timeout)
                    done += 1
        for s in self._rows("ec2_snapshot"):
            if s["phase"] == "deleting" or (s["phase"] == "creating" and s["created_ts"] < old):
                with contextlib.suppress(ServiceUnavailable, RequestError):
                    async with self._lock(s["snapshot_id"]):
                        if s["phase"] == "creating":
                            await self._drive_create_snapshot(s["snapshot_id"], timeout=timeout)
                        else:
                            await self._drive_delete_snapshot(s["snapshot_id"], timeout=timeout)
                    done += 1
        owned = {v["volume_id"] for v in self._rows("ec2_volume")}
        for zone in self.zones():
            if not self.group_enabled("sc", zone):
                continue
            try:
                vols = (await self._call("sc", zone, "sc.describe_volumes", {"volume_ids": None}, timeout))[
                    "volumes"
                ]
            except (ServiceUnavailable, RequestError):
                continue
            for v in vols:
                att = v.get("attachment")
                if v["volume_id"] not in owned or not att or att["status"] not in ("attaching", "detaching"):
                    continue
                with contextlib.suppress(ServiceUnavailable, RequestError):
                    async with self._lock(v["volume_id"]):
                        await self._drive_attachment(zone, v["volume_id"], timeout=timeout)
                    done += 1
        return done

    # ------------------------------------------------------------------ bus method

    def handlers(self) -> Mapping[str, Any]:
        return {"ec2.action": self.action}

    async def action(self, body: Any, request: RequestInfo) -> dict[str, Any]:
        """``{action, params, caller: {account, account_id, user}, request_id}`` -> the result."""
        await self.clc._fault_point()
        if not isinstance(body, Mapping):
            raise _err("InvalidParameterValue", "malformed ec2.action call")
        action = body.get("action")
        fn = getattr(self, f"_do_{action}", None) if action in ACTIONS else None
        if fn is None:
            raise _err("InvalidAction", f"The action {action} is not valid for this web service.")
        caller = dict(body.get("caller") or {})
        if not caller.get("account") or self._row("iam_account", str(caller["account"])) is None:
            raise _err("AuthFailure", f"account {caller.get('account')!r} does not exist")
        caller.setdefault("account_id", self._row("iam_account", str(caller["account"]))["account_id"])  # type: ignore[index]
        params = {str(k): v for k, v in (body.get("params") or {}).items()}
        rid = str(body.get("request_id") or uuid.uuid4())
        result: dict[str, Any] = await fn(caller, params, rid)
        return result

    # ------------------------------------------------------------------ zones and images

    async def _do_DescribeAvailabilityZones(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        zones = self.zones()
        wanted = members(params, "ZoneName")
        for z in wanted:
            if z not in zones:
                raise _err("InvalidParameterValue", f"Invalid availability zone: [{z}]")
        flt = filters(params)
        out = []
        for z in zones:
            if wanted and z not in wanted:
                continue
            cc, sc = self.group_enabled("cc", z), self.group_enabled("sc", z)
            state = "available" if cc else "unavailable"
            doc = {
                "zoneName": z,
                "zoneState": state,
                "regionName": getattr(self, "region", "eucalyptus"),
                "zoneId": z,
                "zoneType": "availability-zone",
                "messageSet": [
                    {"message": f"cc {'ENABLED' if cc else 'not ENABLED'}"},
                    {"message": f"sc {'ENABLED' if sc else 'not ENABLED'}"},
                ],
            }
            if not _match(z, flt.get("zone-name")) or not _match(state, flt.get("state")):
                continue
            out.append(doc)
        return {"availabilityZoneInfo": out}

    def _visible_image(self, caller: Mapping[str, Any], row: Mapping[str, Any]) -> bool:
        return bool(row["is_public"]) or row["account"] == caller["account"]

    def _image_doc(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "imageId": row["image_id"],
            "imageLocation": row["location"] or "",
            "imageState": "available",
            "imageOwnerId": row["owner_id"],
            "creationDate": _iso(row["created_ts"]),
            "isPublic": bool(row["is_public"]),
            "architecture": row["architecture"],
            "imageType": "machine",
            "name": row["name"],
            "description": row["description"] or "",
            "rootDeviceType": "instance-store",
            "virtualizationType": "hvm",
            "hypervisor": "kvm",
        }

    async def _do_DescribeImages(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        ids = [check_id("image", i) for i in members(params, "ImageId")]
        owners = members(params, "Owner")
        flt = filters(params)
        rows = [r for r in self._rows("ec2_image") if self._visible_image(caller, r)]
        by_id = {r["image_id"]: r for r in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise _err("InvalidAMIID.NotFound", f"The image id '[{', '.join(missing)}]' does not exist")
        if ids:
            rows = [by_id[i] for i in ids]
        if owners:
            want = {caller["account_id"] if o == "self" else o for o in owners}
            rows = [
                r
                for r in rows
                if r["owner_id"] in want or (r["account"] == ADMIN_ACCOUNT and "amazon" in want)
            ]
        rows = [
            r
            for r in rows
            if _match(r["image_id"], flt.get("image-id"))
            and _match(r["name"], flt.get("name"))
            and _match(r["architecture"], flt.get("architecture"))
            and _match(r["owner_id"], flt.get("owner-id"))
            and _match("available", flt.get("state"))
        ]
        return {"imagesSet": [self._image_doc(r) for r in sorted(rows, key=lambda r: r["image_id"])]}

    async def _do_RegisterImage(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        name = _required(params, "Name")
        if not _IMAGE_NAME_RE.fullmatch(name):
            raise _err(
                "InvalidAMIName.Malformed",
                "AMI names must be between 3 and 128 characters long, and may contain letters, numbers, "
                "'(', ')', '.', '-', '/' and '_'",
            )
        arch = str(params.get("Architecture") or "x86_64")
        if arch not in ARCHITECTURES:
            raise _err(
                "InvalidParameterValue",
                f"Invalid value '{arch}' for architecture ({', '.join(ARCHITECTURES)})",
            )
        location = str(params.get("ImageLocation") or "") or None
        description = str(params.get("Description") or "") or None
        if description is not None and len(description) > 255:
            raise _err("InvalidParameterValue", "The description must be at most 255 characters")
        key = f"{caller['account']}:{rid}"
        async with self._lock(f"image:{caller['account']}"):
            for r in self._rows("ec2_image"):
                if r["account"] == caller["account"] and r["request_id"] == key:
                    return {"imageId": r["image_id"]}
                if r["account"] == caller["account"] and r["name"] == name:
                    raise _err(
                        "InvalidAMIName.Duplicate",
                        f"AMI name {name} is already in use by AMI {r['image_id']}",
                    )
            row = {
                "image_id": self._new_id("emi", "ec2_image"),
                "account": caller["account"],
                "owner_id": caller["account_id"],
                "name": name,
                "description": description,
                "location": location,
                "architecture": arch,
                "is_public": False,
                "created_ts": time.time(),
                "request_id": key,
            }
            await self._write([self._put("ec2_image", row)])
        log.info("image registered", extra={"image": row["image_id"], "account": caller["account"]})
        return {"imageId": row["image_id"]}

    # ------------------------------------------------------------------ instances

    def _instances_of(self, res_id: str) -> list[Mapping[str, Any]]:
        rows = [i for i in self._rows("ec2_instance") if i["reservation_id"] == res_id]
        return sorted(rows, key=lambda i: i["launch_index"])

    async def _drive_launch(
        self, res_id: str, *, min_count: int | None = None, timeout: float = CALL_TIMEOUT
    ) -> None:
        """Ask the CC to run the reservation's ``launching`` instances (same ids on every try);
        record what it answered. A capacity refusal removes the records (nothing was launched)
        and is raised; with `min_count` fewer instances (down to it) are tried first."""
        rows = [i for i in self._instances_of(res_id) if i["phase"] == "launching"]
        if not rows:
            return
        zone = rows[0]["zone"]
        while True:
            body = {
                "instances": [
                    {
                        "instance_id": i["instance_id"],
                        "instance_type": i["instance_type"],
                        "image_id": i["image_id"],
                    }
                    for i in rows
                ]
            }
            try:
                res = await self._call("cc", zone, "cc.run_instances", body, timeout)
                break
            except RequestError as exc:
                if (
                    exc.kind == "InsufficientInstanceCapacity"
                    and min_count is not None
                    and len(rows) > min_count
                ):
                    extra = rows[min_count:]
                    rows = rows[:min_count]
                    await self._write([self._delete("ec2_instance", i["instance_id"]) for i in extra])
                    continue
                ops = [self._delete("ec2_instance", i["instance_id"]) for i in rows]
                if len(rows) == len(self._instances_of(res_id)):
                    ops.append(self._delete("ec2_reservation", res_id))
                await self._write(ops)
                log.info(
                    "launch refused", extra={"reservation": res_id, "code": exc.kind, "reason": exc.message}
                )
                raise
        placed = {d["instance_id"]: d for d in (res or {}).get("instances", [])}
        ops = []
        for i in rows:
            d = placed.get(i["instance_id"], {})
            ops.append(
                self._put(
                    "ec2_instance",
                    {**i, "phase": "launched", "state": d.get("state") or "pending", "node": d.get("node")},
                )
            )
        await self._write(ops)
        log.info("instances launched", extra={"reservation": res_id, "zone": zone, "instances": len(rows)})

    async def _drive_terminate(self, res_id: str, *, timeout: float = CALL_TIMEOUT) -> None:
        """Terminate the reservation's ``terminating`` instances through the CC; those it
        confirms stopped (`_stopped`) have their volumes freed in the SC and are recorded
        terminated. One the CC cannot reach (its NC is ``lost``) stays ``terminating``, shown
        ``shutting-down``, its volumes still attached (the NC may still use them): the
        reconciler asks again every pass until the NC answers."""
        rows = [i for i in self._instances_of(res_id) if i["phase"] == "terminating"]
        if not rows:
            return
        zone = rows[0]["zone"]
        ids = [i["instance_id"] for i in rows]
        res = await self._call("cc", zone, "cc.terminate_instances", {"instance_ids": ids}, timeout)
        answers = {str(d.get("instance_id")): d for d in (res or {}).get("instances", [])}
        nodes = (res or {}).get("nodes") or {}
        stopped = [i for i in rows if self._stopped(i, answers.get(i["instance_id"]), nodes)]
        waiting = [i["instance_id"] for i in rows if i not in stopped]
        if waiting:
            log.debug("terminate waits for the nc", extra={"reservation": res_id, "instances": waiting})
        if not stopped:
            return
        ids = [i["instance_id"] for i in stopped]
        vols = (await self._call("sc", zone, "sc.describe_volumes", {"volume_ids": None}, timeout))["volumes"]
        for v in vols:
            att = v.get("attachment")
            if att and att["instance_id"] in ids:
                await self._call("sc", zone, "sc.mark_detached", {"volume_id": v["volume_id"]}, timeout)
        now = time.time()
        await self._write(
            [
                self._put(
                    "ec2_instance", {**i, "phase": "terminated", "state": "terminated", "terminated_ts": now}
                )
                for i in stopped
            ]
        )
        log.info("instances terminated", extra={"reservation": res_id, "instances": ids})

    @staticmethod
    def _stopped(row: Mapping[str, Any], answer: Mapping[str, Any] | None, nodes: Mapping[str, Any]) -> bool:
        """Whether the CC's `answer` to ``cc.terminate_instances`` confirms that `row`'s instance
        no longer runs: ``terminated`` from its NC (``node`` set: the NC stopped it, or never ran
        it), or ``terminated`` for an id the CC never saw whose recorded NC the CC does not report
        ``lost`` (`nodes`; a CC enabled cold after that NC died has no record of its instances,
        so its ``terminated`` says nothing about them). ``lost``: its NC cannot be reached."""
        if answer is None or answer.get("state") != "terminated":
            return False
        return bool(answer.get("node")) or not row["node"] or nodes.get(row["node"]) != "lost"

    def _reservation_doc(self, res: Mapping[str, Any], instances: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "reservationId": res["reservation_id"],
            "ownerId": res["owner_id"],
            "groupSet": [],
            "instancesSet": instances,
        }

    def _instance_doc(self, row: Mapping[str, Any], state: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "instanceId": row["instance_id"],
            "imageId": row["image_id"],
            "instanceState": {"code": STATE_CODES.get(state, 0), "name": state},
            "privateDnsName": "",
            "dnsName": "",
            "reason": row["reason"] or "",
            "amiLaunchIndex": row["launch_index"],
            "productCodes": [],
            "instanceType": row["instance_type"],
            "launchTime": _iso(row["launch_ts"]),
            "placement": {"availabilityZone": row["zone"], "tenancy": "default"},
            "monitoring": {"state": "disabled"},
            "groupSet": [],
            "architecture": "x86_64",
            "rootDeviceType": "instance-store",
            "virtualizationType": "hvm",
            "hypervisor": "kvm",
        }
        if row["client_token"]:
            doc["clientToken"] = row["client_token"]
        return doc

    def _shown_state(self, row: Mapping[str, Any], live: Mapping[str, Mapping[str, Any]]) -> str:
        d = live.get(row["instance_id"])
        if row["phase"] == "terminated":
            return "terminated"
        if row["phase"] == "terminating":
            return "terminated" if d is not None and d.get("state") == "terminated" else "shutting-down"
        if d is not None and d.get("state"):
            return str(d["state"])
        return str(row["state"])

    async def _live(self, rows: Sequence[Mapping[str, Any]], timeout: float) -> dict[str, Mapping[str, Any]]:
        """The CC's view of `rows` (zone by zone); a zone whose CC does not answer in time is
        left out (its instances are then shown with the clc's last known state).

        An instance the CC's answer does not list, launched on an NC the CC reports ``lost``, is
        ``lost`` too: a CC enabled cold after that NC died never saw its instances (it has no
        record of them to report lost), and the clc's last known state (``running``) would be a
        guess about an NC nobody can reach."""
        by_zone: dict[str, list[Mapping[str, Any]]] = {}
        for r in rows:
            if r["phase"] != "terminated":
                by_zone.setdefault(r["zone"], []).append(r)
        live: dict[str, Mapping[str, Any]] = {}

        async def one(zone: str, zone_rows: list[Mapping[str, Any]]) -> None:
            ids = [r["instance_id"] for r in zone_rows]
            try:
                res = await self._call("cc", zone, "cc.describe_instances", {"instance_ids": ids}, timeout)
            except (ServiceUnavailable, RequestError) as exc:
                log.info("cc view unavailable", extra={"zone": zone, "reason": str(exc)})
                return
            for d in (res or {}).get("instances", []):
                live[str(d.get("instance_id"))] = d
            nodes = (res or {}).get("nodes") or {}
            for r in zone_rows:
                if r["instance_id"] not in live and r["node"] and nodes.get(r["node"]) == "lost":
                    live[r["instance_id"]] = {
                        "instance_id": r["instance_id"],
                        "node": r["node"],
                        "state": "lost",
                    }

        await asyncio.gather(*(one(z, zr) for z, zr in by_zone.items()))
        return live

    async def _do_RunInstances(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        image_id = check_id("image", _required(params, "ImageId"))
        image = self._row("ec2_image", image_id)
        if image is None or not self._visible_image(caller, image):
            raise _err("InvalidAMIID.NotFound", f"The image id '[{image_id}]' does not exist")
        itype = str(params.get("InstanceType") or DEFAULT_INSTANCE_TYPE)
        if itype not in INSTANCE_TYPES:
            raise _err(
                "InvalidParameterValue",
                f"Invalid value '{itype}' for InstanceType. Valid values: {', '.join(INSTANCE_TYPES)}",
            )
        min_count = _int(params, "MinCount", None, 1, MAX_INSTANCES_PER_CALL)
        max_count = _int(params, "MaxCount", None, 1, MAX_INSTANCES_PER_CALL)
        if min_count > max_count:
            raise _err(
                "InvalidParameterValue", f"MinCount ({min_count}) must not exceed MaxCount ({max_count})"
            )
        zone = self._zone(str(params.get("Placement.AvailabilityZone") or "") or None)
        if not self.has_cc(zone):
            raise _err(
                "InsufficientInstanceCapacity",
                f"There is no cluster controller registered in availability zone {zone}.",
            )
        token = str(params.get("ClientToken") or "") or None
        if token is not None and len(token) > 64:
            raise _err("InvalidParameterValue", "ClientToken must be at most 64 characters")
        key = f"{caller['account']}:{'token:' + token if token else rid}"
        async with self._lock(f"run:{key}"):
            res = next(
                (
                    r
                    for r in self._rows("ec2_reservation")
                    if r["request_id"] == key and r["account"] == caller["account"]
                ),
                None,
            )
            if res is None:
                now = time.time()
                res = {
                    "reservation_id": self._new_id("r", "ec2_reservation"),
                    "account": caller["account"],
                    "owner_id": caller["account_id"],
                    "zone": zone,
                    "created_ts": now,
                    "request_id": key,
                }
                ids: list[str] = []
                ops = [self._put("ec2_reservation", res)]
                for n in range(max_count):
                    iid = self._new_id("i", "ec2_instance", ids)
                    ids.append(iid)
                    row = {
                        "instance_id": iid,
                        "reservation_id": res["reservation_id"],
                        "account": caller["account"],
                        "image_id": image_id,
                        "instance_type": itype,
                        "zone": zone,
                        "launch_index": n,
                        "launch_ts": now,
                        "phase": "launching",
                        "state": "pending",
                        "node": None,
                        "client_token": token,
                        "reason": None,
                        "terminated_ts": None,
                    }
                    ops.append(self._put("ec2_instance", row))
                await self._write(ops)
                log.info(
                    "reservation recorded",
                    extra={"reservation": res["reservation_id"], "instances": ids, "zone": zone},
                )
            # still under the request's lock: the reconciler cannot drive it first
            res_id = res["reservation_id"]
            async with self._lock(res_id):
                await self._drive_launch(res_id, min_count=min_count)
        rows = self._instances_of(res_id)
        docs = [self._instance_doc(r, self._shown_state(r, {})) for r in rows]
        return self._reservation_doc(res, docs)

    def _owned_instances(self, caller: Mapping[str, Any], ids: Sequence[str]) -> list[Mapping[str, Any]]:
        for i in ids:
            check_id("instance", i)
        rows = []
        missing = []
        for i in ids:
            r = self._row("ec2_instance", i)
            if r is None or r["account"] != caller["account"]:
                missing.append(i)
            else:
                rows.append(r)
        if missing:
            ids_text = ", ".join(missing)
            if len(missing) == 1:
                raise _err("InvalidInstanceID.NotFound", f"The instance ID '{ids_text}' does not exist")
            raise _err("InvalidInstanceID.NotFound", f"The instance IDs '{ids_text}' do not exist")
        return rows

    async def _do_DescribeInstances(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        ids = members(params, "InstanceId")
        flt = filters(params)
        if ids:
            rows = self._owned_instances(caller, ids)
        else:
            cutoff = time.time() - TERMINATED_VISIBLE
            rows = [
                r
                for r in self._rows("ec2_instance")
                if r["account"] == caller["account"]
                and not (r["phase"] == "terminated" and (r["terminated_ts"] or 0) < cutoff)
            ]
        for i in flt.get("instance-id", []):
            check_id("instance", i)
        live = await self._live(rows, DESCRIBE_TIMEOUT)
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in sorted(rows, key=lambda r: (r["reservation_id"], r["launch_index"])):
            state = self._shown_state(r, live)
            if not (
                _match(r["instance_id"], flt.get("instance-id"))
                and _match(state, flt.get("instance-state-name"))
                and _match(STATE_CODES.get(state, 0), flt.get("instance-state-code"))
                and _match(r["zone"], flt.get("availability-zone"))
                and _match(r["instance_type"], flt.get("instance-type"))
                and _match(r["image_id"], flt.get("image-id"))
                and _match(r["reservation_id"], flt.get("reservation-id"))
            ):
                continue
            groups.setdefault(r["reservation_id"], []).append(self._instance_doc(r, state))
        out = []
        for res_id, docs in groups.items():
            res = self._row("ec2_reservation", res_id)
            if res is not None:
                out.append(self._reservation_doc(res, docs))
        return {"reservationSet": out}

    async def _do_TerminateInstances(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        ids = members(params, "InstanceId")
        if not ids:
            raise _err("MissingParameter", "The request must contain the parameter InstanceId")
        rows = self._owned_instances(caller, ids)
        previous = await self._live(rows, DESCRIBE_TIMEOUT)
        before = {r["instance_id"]: self._shown_state(r, previous) for r in rows}
        # A retry of this request (same request id, after a clc failover) answers the previous
        # states the first attempt saw, recorded with its terminating write.
        first = self._done_result(rid, "TerminateInstances")
        if first is not None:
            before.update({k: str(v) for k, v in json.loads(first).items() if k in before})
        for res_id in sorted({r["reservation_id"] for r in rows}):
            async with self._lock(res_id):
                mine = [
                    r
                    for r in self._instances_of(res_id)
                    if r["instance_id"] in before and r["phase"] in ("launching", "launched")
                ]
                if mine:
                    await self._write(
                        [
                            *(self._put("ec2_instance", {**r, "phase": "terminating"}) for r in mine),
                            *self._done_ops(rid, "TerminateInstances", json.dumps(before, sort_keys=True)),
                        ]
                    )
                try:
                    await self._drive_terminate(res_id)
                except ServiceUnavailable as exc:
                    log.warning(
                        "terminate left to the reconciler", extra={"reservation": res_id, "reason": str(exc)}
                    )
        out = []
        for i in ids:
            r = self._row("ec2_instance", i)
            assert r is not None
            state = "terminated" if r["phase"] == "terminated" else "shutting-down"
            out.append(
                {
                    "instanceId": i,
                    "currentState": {"code": STATE_CODES[state], "name": state},
                    "previousState": {"code": STATE_CODES.get(before[i], 0), "name": before[i]},
                }
            )
        return {"instancesSet": out}

    # ------------------------------------------------------------------ volumes

    def _owned(
        self, caller: Mapping[str, Any], table: str, key: str, code: str, noun: str
    ) -> Mapping[str, Any]:
        row = self._row(table, key)
        if row is None or row["account"] != caller["account"]:
            raise _err(code, f"The {noun} '{key}' does not exist.")
        return row

    async def _drive_create_volume(self, vid: str, *, timeout: float = CALL_TIMEOUT) -> dict[str, Any] | None:
        row = self._row("ec2_volume", vid)
        if row is None or row["phase"] != "creating":
            return None
        body = {"volume_id": vid, "size_gib": row["size_gib"], "snapshot_id": row["snapshot_id"]}
        try:
            v: dict[str, Any] = await self._call("sc", row["zone"], "sc.create_volume", body, timeout)
        except RequestError:
            await self._write([self._delete("ec2_volume", vid)])
            raise
        await self._write([self._put("ec2_volume", {**row, "phase": "created"})])
        return v

    async def _drive_delete_volume(
        self, vid: str, *, timeout: float = CALL_TIMEOUT, done: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Delete a volume in phase ``deleting`` at its SC, then its record (with `done`: the
        ops recording the request that deletes it, see `_deleted_by`)."""
        row = self._row("ec2_volume", vid)
        if row is None or row["phase"] != "deleting":
            return
        try:
            await self._call("sc", row["zone"], "sc.delete_volume", {"volume_id": vid}, timeout)
        except RequestError as exc:
            if exc.kind != "InvalidVolume.NotFound":
                await self._write([self._put("ec2_volume", {**row, "phase": "created"})])
                raise
        await self._write([self._delete("ec2_volume", vid), *done])

    def _volume_doc(self, row: Mapping[str, Any], v: Mapping[str, Any] | None) -> dict[str, Any]:
        if row["phase"] == "deleting":
            status = "deleting"
        elif v is None:
            status = "creating" if row["phase"] == "creating" else "error"
        else:
            status = str(v["status"])
        attachments = []
        att = v.get("attachment") if v is not None else None
        if att:
            attachments.append(
                {
                    "volumeId": row["volume_id"],
                    "instanceId": att["instance_id"],
                    "device": att["device"],
                    "status": att["status"],
                    "attachTime": _iso(att.get("attach_time")),
                    "deleteOnTermination": False,
                }
            )
        return {
            "volumeId": row["volume_id"],
            "size": row["size_gib"],
            "snapshotId": row["snapshot_id"] or "",
            "availabilityZone": row["zone"],
            "status": status,
            "createTime": _iso(row["created_ts"]),
            "attachmentSet": attachments,
            "volumeType": "standard",
            "encrypted": False,
            "multiAttachEnabled": False,
        }

    async def _sc_volumes(self, zone: str, ids: list[str] | None) -> dict[str, Mapping[str, Any]]:
        res = await self._call("sc", zone, "sc.describe_volumes", {"volume_ids": ids})
        return {v["volume_id"]: v for v in (res or {}).get("volumes", [])}

    async def _do_CreateVolume(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        zone_name = _required(params, "AvailabilityZone")
        zone = self._zone(zone_name)
        snap_id = str(params.get("SnapshotId") or "") or None
        snap = None
        if snap_id is not None:
            check_id("snapshot", snap_id)
            snap = self._owned(caller, "ec2_snapshot", snap_id, "InvalidSnapshot.NotFound", "snapshot")
            if snap["zone"] != zone:
                raise _err(
                    "InvalidParameterValue",
                    f"snapshot {snap_id} is stored in zone {snap['zone']}: create its volumes there",
                )
        if params.get("Size") in (None, "") and snap is None:
            raise _err("MissingParameter", "The request must contain the parameter size or snapshotId")
        size = _int(params, "Size", snap["size_gib"] if snap is not None else None, 1, MAX_VOLUME_GIB)
        if snap is not None and size < snap["size_gib"]:
            raise _err(
                "InvalidParameterValue",
                f"The volume size ({size} GiB) is smaller than the snapshot {snap_id} "
                f"({snap['size_gib']} GiB)",
            )
        vtype = str(params.get("VolumeType") or "standard")
        if vtype != "standard":
            raise _err("InvalidParameterValue", f"Volume type {vtype} is not supported (only standard)")
        token = str(params.get("ClientToken") or "") or None
        key = f"{caller['account']}:{'token:' + token if token else rid}"
        async with self._lock(f"vol:{key}"):
            row = next(
                (
                    r
                    for r in self._rows("ec2_volume")
                    if r["request_id"] == key and r["account"] == caller["account"]
                ),
                None,
            )
            if row is None:
                row = {
                    "volume_id": self._new_id("vol", "ec2_volume"),
                    "account": caller["account"],
                    "owner_id": caller["account_id"],
                    "zone": zone,
                    "size_gib": size,
                    "snapshot_id": snap_id,
                    "created_ts": time.time(),
                    "phase": "creating",
                    "request_id": key,
                }
                await self._write([self._put("ec2_volume", row)])
            # still under the request's lock: the reconciler cannot drive it first
            vid = row["volume_id"]
            async with self._lock(vid):
                await self._drive_create_volume(vid)
                current = self._row("ec2_volume", vid)
                if current is None:
                    raise _err("InvalidVolume.NotFound", f"The volume '{vid}' does not exist.")
                v = (await self._sc_volumes(current["zone"], [vid])).get(vid)
        log.info("volume created", extra={"volume": vid, "zone": zone, "size_gib": size})
        return self._volume_doc(current, v)

    async def _do_DescribeVolumes(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        ids = [check_id("volume", i) for i in members(params, "VolumeId")]
        flt = filters(params)
        if ids:
            rows = [self._owned(caller, "ec2_volume", i, "InvalidVolume.NotFound", "volume") for i in ids]
        else:
            rows = [r for r in self._rows("ec2_volume") if r["account"] == caller["account"]]
        zones = sorted({r["zone"] for r in rows})
        live: dict[str, Mapping[str, Any]] = {}
        for z in zones:
            live.update(await self._sc_volumes(z, [r["volume_id"] for r in rows if r["zone"] == z]))
        out = []
        for r in sorted(rows, key=lambda r: r["volume_id"]):
            doc = self._volume_doc(r, live.get(r["volume_id"]))
            att = doc["attachmentSet"][0] if doc["attachmentSet"] else {}
            if (
                _match(r["volume_id"], flt.get("volume-id"))
                and _match(doc["status"], flt.get("status"))
                and _match(r["zone"], flt.get("availability-zone"))
                and _match(r["size_gib"], flt.get("size"))
                and _match(r["snapshot_id"] or "", flt.get("snapshot-id"))
                and _match(att.get("instanceId", ""), flt.get("attachment.instance-id"))
                and _match(att.get("status", ""), flt.get("attachment.status"))
            ):
                out.append(doc)
        return {"volumeSet": out}

    async def _drive_attachment(self, zone: str, vid: str, *, timeout: float = CALL_TIMEOUT) -> None:
        """Finish an attachment left ``attaching`` or ``detaching`` (by a failover in between)."""
        v = (await self._sc_volumes(zone, [vid])).get(vid)
        att = v.get("attachment") if v is not None else None
        if not att or att["status"] not in ("attaching", "detaching"):
            return
        inst = self._row("ec2_instance", att["instance_id"])
        gone = inst is None or inst["phase"] in ("terminating", "terminated")
        if att["status"] == "attaching" and not gone:
            await self._attach(
                zone, vid, att["instance_id"], att["device"], str(v["path"]) if v else "", timeout
            )
        else:
            await self._detach(zone, vid, att["instance_id"], timeout)

    async def _attach(
        self, zone: str, vid: str, iid: str, device: str, path: str, timeout: float
    ) -> dict[str, Any]:
        """The attach protocol (the caller holds the volume's lock):

        1. ``sc.mark_attached`` status ``attaching``: the SC reserves the volume for the instance
           (no other attach, no delete from now on);
        2. ``cc.attach_volume``: the NC attaches it (idempotent);
        3. ``sc.mark_attached`` status ``attached``.

        The SC therefore never says ``attached`` before the NC has the volume, and never frees a
        volume an NC may still use. A failover between the steps leaves ``attaching``, which a retry
        or the reconciler finishes from step 1 (each step is idempotent); a refusal at step 2 rolls
        back to detached."""
        body = {"volume_id": vid, "instance_id": iid, "device": device}
        v = await self._call("sc", zone, "sc.mark_attached", {**body, "status": "attaching"}, timeout)
        try:
            await self._call(
                "cc",
                zone,
                "cc.attach_volume",
                {"instance_id": iid, "volume_id": vid, "device": device, "path": v.get("path") or path},
                timeout,
            )
        except RequestError:
            await self._call("sc", zone, "sc.mark_detached", {"volume_id": vid, "instance_id": iid}, timeout)
            raise
        done: dict[str, Any] = await self._call(
            "sc", zone, "sc.mark_attached", {**body, "status": "attached"}, timeout
        )
        return done

    async def _detach(self, zone: str, vid: str, iid: str, timeout: float) -> dict[str, Any] | None:
        """The detach protocol, the mirror image: ``sc.mark_detached`` status ``detaching``,
        ``cc.detach_volume`` (a refusal means the NC does not have it: nothing to undo), then
        ``sc.mark_detached`` (the volume is ``available`` only once the NC let go).

        An instance whose NC is ``lost`` may still use the volume: it stays ``detaching`` (None
        is returned), and the reconciler finishes the detach once the NC answers (or frees it
        when the instance's terminate is confirmed, `_drive_terminate`)."""
        with contextlib.suppress(RequestError):  # already detaching, or detached meanwhile
            await self._call(
                "sc",
                zone,
                "sc.mark_detached",
                {"volume_id": vid, "instance_id": iid, "status": "detaching"},
                timeout,
            )
        try:
            await self._call("cc", zone, "cc.detach_volume", {"instance_id": iid, "volume_id": vid}, timeout)
        except RequestError as exc:
            if await self._is_lost(iid, timeout):
                log.info("detach waits for the nc", extra={"volume": vid, "instance": iid})
                return None
            log.info("nc had no such attachment", extra={"volume": vid, "instance": iid, "code": exc.kind})
        done: dict[str, Any] = await self._call("sc", zone, "sc.mark_detached", {"volume_id": vid}, timeout)
        return done

    async def _is_lost(self, iid: str, timeout: float) -> bool:
        """Whether the CC reports instance `iid` ``lost`` (its NC does not answer)."""
        row = self._row("ec2_instance", iid)
        if row is None:
            return False
        live = (await self._live([row], timeout)).get(iid)
        return live is not None and live.get("state") == "lost"

    def _attachment_doc(
        self, vid: str, iid: str, device: str, status: str, ts: float | None
    ) -> dict[str, Any]:
        return {
            "volumeId": vid,
            "instanceId": iid,
            "device": device,
            "status": status,
            "attachTime": _iso(ts),
            "deleteOnTermination": False,
        }

    async def _do_AttachVolume(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        vid = check_id("volume", _required(params, "VolumeId"))
        iid = check_id("instance", _required(params, "InstanceId"))
        device = _required(params, "Device")
        if not _DEVICE_RE.fullmatch(device):
            raise _err(
                "InvalidParameterValue",
                f"Value ({device}) for parameter device is invalid. {device} is not a valid EBS device name.",
            )
        row = self._owned(caller, "ec2_volume", vid, "InvalidVolume.NotFound", "volume")
        inst = self._owned_instances(caller, [iid])[0]
        if row["zone"] != inst["zone"]:
            raise _err(
                "InvalidVolume.ZoneMismatch",
                f"The volume '{vid}' is not in the same availability zone as instance '{iid}'",
            )
        if row["phase"] != "created":
            raise _err("IncorrectState", f"The volume '{vid}' is not 'available'.")
        zone = row["zone"]
        async with self._lock(vid):
            v = (await self._sc_volumes(zone, [vid])).get(vid)
            if v is None:
                raise _err("InvalidVolume.NotFound", f"The volume '{vid}' does not exist.")
            att = v.get("attachment")
            if att and att["status"] == "attached":
                if att["instance_id"] == iid and att["device"] == device:  # a retry
                    return self._attachment_doc(vid, iid, device, "attached", att.get("attach_time"))
                raise _err("VolumeInUse", f"{vid} is already attached to an instance")
            if att and (att["instance_id"] != iid or att["device"] != device or att["status"] != "attaching"):
                raise _err("VolumeInUse", f"{vid} is already attached to an instance")
            if inst["phase"] in ("terminating", "terminated"):
                raise _err("IncorrectInstanceState", f"The instance '{iid}' is not in the 'running' state.")
            live = (await self._live([inst], CALL_TIMEOUT)).get(iid)
            state = self._shown_state(inst, {iid: live} if live is not None else {})
            if state != "running":
                raise _err(
                    "IncorrectInstanceState", f"The instance '{iid}' is not in the 'running' state ({state})."
                )
            done = await self._attach(zone, vid, iid, device, str(v.get("path") or ""), CALL_TIMEOUT)
        att = done.get("attachment") or {}
        log.info("volume attached", extra={"volume": vid, "instance": iid, "device": device})
        return self._attachment_doc(
            vid, iid, device, str(att.get("status") or "attached"), att.get("attach_time")
        )

    async def _do_DetachVolume(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        vid = check_id("volume", _required(params, "VolumeId"))
        want_iid = str(params.get("InstanceId") or "") or None
        if want_iid is not None:
            check_id("instance", want_iid)
        want_device = str(params.get("Device") or "") or None
        row = self._owned(caller, "ec2_volume", vid, "InvalidVolume.NotFound", "volume")
        zone = row["zone"]
        async with self._lock(vid):
            v = (await self._sc_volumes(zone, [vid])).get(vid)
            att = v.get("attachment") if v is not None else None
            if not att:
                raise _err("IncorrectState", f"Volume '{vid}' is in the 'available' state.")
            if (want_iid is not None and att["instance_id"] != want_iid) or (
                want_device is not None and att["device"] != want_device
            ):
                raise _err(
                    "InvalidAttachment.NotFound",
                    f"Attachment point {want_device or att['device']} of instance "
                    f"{want_iid or att['instance_id']} is not attached to volume {vid}",
                )
            done = await self._detach(zone, vid, att["instance_id"], CALL_TIMEOUT)
        if done is None:  # the instance's NC is lost: finished by the reconciler
            return self._attachment_doc(
                vid, att["instance_id"], att["device"], "detaching", att.get("attach_time")
            )
        log.info("volume detached", extra={"volume": vid, "instance": att["instance_id"]})
        return self._attachment_doc(
            vid, att["instance_id"], att["device"], "detached", att.get("attach_time")
        )

    async def _do_DeleteVolume(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        vid = check_id("volume", _required(params, "VolumeId"))
        async with self._lock(vid):
            if self._deleted_by(rid, "ec2_volume", vid):
                return {"return": True}  # our own retry after a failover: the delete took effect
            row = self._owned(caller, "ec2_volume", vid, "InvalidVolume.NotFound", "volume")
            if row["phase"] == "created":
                v = (await self._sc_volumes(row["zone"], [vid])).get(vid)
                if v is not None and v.get("attachment"):
                    raise _err(
                        "VolumeInUse",
                        f"Volume {vid} is currently attached to {v['attachment']['instance_id']}",
                    )
                deleting = self._put("ec2_volume", {**row, "phase": "deleting"})
                await self._write([deleting, *self._done_ops(rid, "DeleteVolume")])
            elif row["phase"] == "creating":
                raise _err("IncorrectState", f"The volume '{vid}' is still being created.")
            await self._drive_delete_volume(vid, done=self._done_ops(rid, "DeleteVolume"))
        log.info("volume deleted", extra={"volume": vid})
        return {"return": True}

    # ------------------------------------------------------------------ snapshots

    async def _drive_create_snapshot(self, sid: str, *, timeout: float = CALL_TIMEOUT) -> None:
        row = self._row("ec2_snapshot", sid)
        if row is None or row["phase"] != "creating":
            return
        try:
            await self._call(
                "sc",
                row["zone"],
                "sc.create_snapshot",
                {"snapshot_id": sid, "volume_id": row["volume_id"]},
                timeout,
            )
        except RequestError:
            await self._write([self._delete("ec2_snapshot", sid)])
            raise
        await self._write([self._put("ec2_snapshot", {**row, "phase": "created"})])

    async def _drive_delete_snapshot(
        self, sid: str, *, timeout: float = CALL_TIMEOUT, done: Sequence[dict[str, Any]] = ()
    ) -> None:
        """Delete a snapshot in phase ``deleting`` at its SC, then its record (with `done`, as
        `_drive_delete_volume`)."""
        row = self._row("ec2_snapshot", sid)
        if row is None or row["phase"] != "deleting":
            return
        try:
            await self._call("sc", row["zone"], "sc.delete_snapshot", {"snapshot_id": sid}, timeout)
        except RequestError as exc:
            if exc.kind != "InvalidSnapshot.NotFound":
                raise
        await self._write([self._delete("ec2_snapshot", sid), *done])

    def _snapshot_doc(self, row: Mapping[str, Any], s: Mapping[str, Any] | None) -> dict[str, Any]:
        if row["phase"] == "creating" or (s is None and row["phase"] == "created"):
            status, progress = ("pending", "0%") if row["phase"] == "creating" else ("error", "0%")
        else:
            status = "completed" if s is not None else "pending"
            progress = str(s.get("progress") or "100%") if s is not None else "0%"
        return {
            "snapshotId": row["snapshot_id"],
            "volumeId": row["volume_id"],
            "status": status,
            "startTime": _iso(row["created_ts"]),
            "progress": progress,
            "ownerId": row["owner_id"],
            "volumeSize": row["size_gib"],
            "description": row["description"] or "",
            "encrypted": False,
            "availabilityZone": row["zone"],
        }

    async def _sc_snapshots(self, zone: str, ids: list[str] | None) -> dict[str, Mapping[str, Any]]:
        res = await self._call("sc", zone, "sc.describe_snapshots", {"snapshot_ids": ids})
        return {s["snapshot_id"]: s for s in (res or {}).get("snapshots", [])}

    async def _do_CreateSnapshot(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        vid = check_id("volume", _required(params, "VolumeId"))
        vol = self._owned(caller, "ec2_volume", vid, "InvalidVolume.NotFound", "volume")
        if vol["phase"] != "created":
            raise _err("IncorrectState", f"The volume '{vid}' is not available for a snapshot.")
        description = str(params.get("Description") or "") or None
        if description is not None and len(description) > 255:
            raise _err("InvalidParameterValue", "The description must be at most 255 characters")
        key = f"{caller['account']}:{rid}"
        async with self._lock(f"snap:{key}"):
            row = next(
                (
                    r
                    for r in self._rows("ec2_snapshot")
                    if r["request_id"] == key and r["account"] == caller["account"]
                ),
                None,
            )
            if row is None:
                row = {
                    "snapshot_id": self._new_id("snap", "ec2_snapshot"),
                    "account": caller["account"],
                    "owner_id": caller["account_id"],
                    "volume_id": vid,
                    "zone": vol["zone"],
                    "size_gib": vol["size_gib"],
                    "description": description,
                    "created_ts": time.time(),
                    "phase": "creating",
                    "request_id": key,
                }
                await self._write([self._put("ec2_snapshot", row)])
            # still under the request's lock: the reconciler cannot drive it first
            sid = row["snapshot_id"]
            async with self._lock(sid):
                await self._drive_create_snapshot(sid)
                current = self._row("ec2_snapshot", sid)
                if current is None:
                    raise _err("InvalidSnapshot.NotFound", f"The snapshot '{sid}' does not exist.")
                s = (await self._sc_snapshots(current["zone"], [sid])).get(sid)
        log.info("snapshot created", extra={"snapshot": sid, "volume": vid})
        return self._snapshot_doc(current, s)

    async def _do_DescribeSnapshots(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        ids = [check_id("snapshot", i) for i in members(params, "SnapshotId")]
        owners = members(params, "Owner")
        flt = filters(params)
        if ids:
            rows = [
                self._owned(caller, "ec2_snapshot", i, "InvalidSnapshot.NotFound", "snapshot") for i in ids
            ]
        else:
            rows = [r for r in self._rows("ec2_snapshot") if r["account"] == caller["account"]]
        if owners:
            want = {caller["account_id"] if o == "self" else o for o in owners}
            rows = [r for r in rows if r["owner_id"] in want]
        live: dict[str, Mapping[str, Any]] = {}
        for z in sorted({r["zone"] for r in rows}):
            live.update(await self._sc_snapshots(z, [r["snapshot_id"] for r in rows if r["zone"] == z]))
        out = []
        for r in sorted(rows, key=lambda r: r["snapshot_id"]):
            doc = self._snapshot_doc(r, live.get(r["snapshot_id"]))
            if (
                _match(r["snapshot_id"], flt.get("snapshot-id"))
                and _match(r["volume_id"], flt.get("volume-id"))
                and _match(doc["status"], flt.get("status"))
                and _match(r["owner_id"], flt.get("owner-id"))
            ):
                out.append(doc)
        return {"snapshotSet": out}

    async def _do_DeleteSnapshot(
        self, caller: Mapping[str, Any], params: Mapping[str, Any], rid: str
    ) -> dict[str, Any]:
        sid = check_id("snapshot", _required(params, "SnapshotId"))
        async with self._lock(sid):
            if self._deleted_by(rid, "ec2_snapshot", sid):
                return {"return": True}  # our own retry after a failover: the delete took effect
            row = self._owned(caller, "ec2_snapshot", sid, "InvalidSnapshot.NotFound", "snapshot")
            if row["phase"] == "creating":
                raise _err("IncorrectState", f"The snapshot '{sid}' is still being created.")
            if row["phase"] == "created":
                await self._write(
                    [
                        self._put("ec2_snapshot", {**row, "phase": "deleting"}),
                        *self._done_ops(rid, "DeleteSnapshot"),
                    ]
                )
            await self._drive_delete_snapshot(sid, done=self._done_ops(rid, "DeleteSnapshot"))
        log.info("snapshot deleted", extra={"snapshot": sid})
        return {"return": True}


# --------------------------------------------------------------------------- XML


def _xml_value(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return f"<{name}>{'true' if value else 'false'}</{name}>"
    if isinstance(value, Mapping):
        return f"<{name}>" + "".join(_xml_value(k, v) for k, v in value.items()) + f"</{name}>"
    if isinstance(value, list):
        return f"<{name}>" + "".join(_xml_value("item", v) for v in value) + f"</{name}>"
    return f"<{name}>{escape(str(value))}</{name}>"


def render_result(action: str, result: Mapping[str, Any], request_id: str) -> str:
    """``<ActionResponse xmlns=EC2><requestId>..</requestId>...members...</ActionResponse>``."""
    inner = "".join(_xml_value(k, v) for k, v in result.items())
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response xmlns="{XMLNS}">'
        f"<requestId>{request_id}</requestId>{inner}</{action}Response>"
    )


def render_error(code: str, message: str, request_id: str) -> str:
    """EC2's error document."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
        f"</Errors><RequestID>{request_id}</RequestID></Response>"
    )


# --------------------------------------------------------------------------- HTTP API


def _auth_error(exc: AuthError) -> Refusal:
    if exc.kind in ("unknown_key", "inactive_key"):
        return 401, "AuthFailure", "AWS was not able to validate the provided access credentials"
    return query_error(exc)


def _validate(action: str, params: Mapping[str, str]) -> Refusal | None:
    if action not in ACTIONS:
        return 400, "InvalidAction", f"The action {action} is not valid for this web service."
    if not params.get("Version"):
        return 400, "MissingParameter", "The request must contain the parameter Version"
    if params.get("DryRun", "").lower() == "true":
        return 412, "DryRunOperation", "Request would have succeeded, but DryRun flag is set."
    return None


QUERY_API = QueryApi(
    service="ec2",
    render_error=lambda status, code, message, rid: render_error(code, message, rid),
    render_result=render_result,
    validate=_validate,
    caller=lambda info: {"account": info.account, "account_id": info.account_id, "user": info.user},
    status=STATUS,
    default_status=400,
    unavailable_code="Unavailable",
    internal_code="InternalError",
    max_body=MAX_BODY,
    control_params=frozenset({"Action", "Version", "DryRun"}),
    auth_error=_auth_error,
)


def make_api_app(node: Node, *, timeout: float = API_TIMEOUT) -> web.Application:
    """The EC2 Query API of one process; actions are forwarded to the ENABLED clc."""
    return make_query_app(node, QUERY_API, timeout=timeout)


__all__ = [
    "ACTIONS",
    "API_VERSION",
    "DEFAULT_IMAGE_ID",
    "Ec2",
    "filters",
    "make_api_app",
    "members",
    "render_error",
    "render_result",
]
