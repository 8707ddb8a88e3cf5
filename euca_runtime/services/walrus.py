"""The walrus component: S3 buckets and objects, metadata replicated, bytes replicated in step.

Bus methods (``handlers``; served by the ENABLED instance of the ``walrus`` group, wherever it
runs; the S3 front end on every hosting process calls them, see `euca_runtime.walrus.http`).
Every body carries ``account`` (the caller's account: bucket owner and access check). Errors
are `RequestError(kind=<S3 error code>, message)`:

- ``list_buckets``; ``create_bucket {bucket}``; ``head_bucket {bucket}``; ``delete_bucket {bucket,
  request_id}`` (a retry with the same ``request_id`` after the delete took effect answers
  success, not ``NoSuchBucket``; the same for ``abort_multipart``);
- ``put_small {bucket, key, data, ...put fields}``: a whole object (or part) of at most
  `CHUNK` bytes in one call (retried whole across a failover);
- ``put_begin {bucket, key}`` -> ``{session}``, ``put_data {session, offset, data}`` (chunks of at
  most `CHUNK`, in order), ``put_commit {session, ...put fields}``, ``put_abort {session}``: a
  streamed object or part. Put fields: ``md5`` (hex, from Content-MD5), ``sha256`` (hex, from
  x-amz-content-sha256), ``crc32`` (int), ``size`` (the declared length), ``content_type``,
  ``meta`` {name: value}, ``headers`` {standard header: value}, and for a part
  ``upload_id``, ``part_number``. The answer is ``{etag, size, last_modified}``;
- ``get_object {bucket, key, range}`` (``range``: the Range header or None) -> the object's
  metadata, ``segments`` [[blob_id, size]], ``range`` [first, last] or None and, when the
  requested bytes are at most `INLINE`, ``data``; ``head_object`` the same without data;
- ``read {blob_id, offset, length}`` -> bytes (at most `CHUNK`);
- ``delete_object {bucket, key}``; ``delete_objects {bucket, keys}`` -> ``{deleted, errors}``;
- ``copy_object {bucket, key, src_bucket, src_key, directive, ...}`` (shares the source's
  blobs; no bytes are copied);
- ``list_objects {bucket, prefix, delimiter, max_keys, after}`` -> a page;
- ``create_multipart {bucket, key, ...}`` -> ``{upload_id}``; ``list_parts {bucket, key,
  upload_id, marker, max_parts}``; ``complete_multipart {bucket, key, upload_id, parts}``;
  ``abort_multipart {bucket, key, upload_id, request_id}``.

Byte replication (``peer_handlers``, called by the primary on each other member of the group,
whatever its state): ``blob_begin {blob_id, epoch}``, ``blob_data {blob_id, offset, data}``,
``blob_end {blob_id, size, sha256}`` (fsync), ``blob_whole {blob_id, epoch, data, size,
sha256}`` (all three at once), ``blob_abort {blob_id}``. A put streams every chunk to the local
staging file and to every reachable member at once; after every copy is fsynced the primary
commits the metadata (`ctx.write`), which every in-sync backup applies (installing its staged
copy) before the client is answered. A member the push did not reach lacks the blob when it
applies the op: it records the blob as missing, withholds its replication acks
(`sync_blocked`) and fetches the blob from the ENABLED instance (``read``); the primary meanwhile
drops it from the in-sync set through the voters before it acknowledges anything else (I2).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

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
from euca_runtime.walrus import s3
from euca_runtime.walrus.blobs import BlobError, BlobStore, Digests, check_id
from euca_runtime.walrus.model import (
    WALRUS,
    WALRUS_REQUESTS,
    Blob,
    Object,
    Part,
    blob_put_op,
    object_put_op,
    register_blobstore,
    segments_of,
    unregister_blobstore,
)

log = get_logger("walrus")

CHUNK = 1 << 20
"""Bytes per bus message carrying object data (bus frames are at most 16 MiB)."""
INLINE = 1 << 20
"""GetObject answers carry the bytes themselves up to this size."""
PEER_TIMEOUT = 10.0
"""Budget of one byte-replication call to a backup; a backup that misses it is left behind."""
SESSION_IDLE = 120.0
"""A streamed upload (or a backup's staging file) untouched this long is abandoned."""
HEAL_PAUSE = 0.2

assert WALRUS.name == "walrus"


def _err(code: str, message: str) -> RequestError:
    return RequestError(code, message)


def _from_s3(exc: s3.S3Error) -> RequestError:
    return RequestError(exc.code, exc.message)


def _refusal(exc: RequestError) -> RequestError:
    """A write refused by an applier ("write refused: NoSuchBucket: ...") as its S3 error."""
    if exc.kind in s3.ERROR_STATUS:
        return exc
    e = s3.error_from_text(exc.message)
    return RequestError(e.code, e.message)


def _s(body: Mapping[str, Any], name: str, default: str | None = None) -> str:
    v = body.get(name, default)
    if not isinstance(v, str):
        raise _err("InvalidArgument", f"{name} must be a string")
    return v


def _row(r: Mapping[str, Any]) -> dict[str, Any]:
    return dict(r)


@dataclass
class _Session:
    """A streamed put on the primary."""

    token: str
    blob_id: str
    bucket: str
    key: str
    epoch: int
    peers: list[str]
    size: int = 0
    touched: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Walrus(Component):
    """One walrus instance: its blob store, its handlers and its byte replication."""

    def __init__(self, ctx: InstanceContext) -> None:
        super().__init__(ctx)
        store = ctx.store
        if store is None:
            raise ValueError("walrus needs its replicated store")
        data_dir = getattr(ctx, "data_dir", None)
        if data_dir is None:
            raise ValueError("walrus needs a data directory")
        self.blobs = BlobStore(data_dir / "walrus" / ctx.name)
        self._url = store.engine.url
        register_blobstore(self._url, self.blobs)
        store.add_listener(self._on_changes)
        self._loop = asyncio.get_running_loop()
        self.sessions: dict[str, _Session] = {}
        self._healer: asyncio.Task[None] | None = None
        removed, missing = self.blobs.reconcile(self._referenced(), clear_staging=True)
        log.info(
            "walrus blobs reconciled",
            extra={"service": ctx.name, "removed": removed, "missing": missing},
        )
        if missing:
            self._kick_healer()

    # ------------------------------------------------------------------ local state

    def _referenced(self) -> list[str]:
        store = self.ctx.store
        assert store is not None
        with store.read_session() as s:
            return list(s.execute(select(Blob.blob_id)).scalars())

    def _on_changes(self, changes: Changes) -> None:
        """Store listener (after each commit, on the applying thread)."""
        if changes.reset:
            self.blobs.forget_removals()
            self.blobs.reconcile(self._referenced(), clear_staging=False)
        else:
            self.blobs.committed(changes.position.seq)
        if self.blobs.missing:
            self._loop.call_soon_threadsafe(self._kick_healer)

    def sync_blocked(self) -> bool:
        return bool(self.blobs.missing)

    async def close(self) -> None:
        unregister_blobstore(self._url)
        self.blobs.close()

    async def health(self) -> None:
        await super().health()
        if not os.access(self.blobs.root, os.W_OK):
            raise RuntimeError(f"{self.blobs.root} is not writable")

    # ------------------------------------------------------------------ healing (backups)

    def _kick_healer(self) -> None:
        if self._healer is None or self._healer.done():
            self._healer = self._loop.create_task(self._heal(), name=f"walrus-heal-{self.ctx.name}")

    async def _heal(self) -> None:
        """Fetch every missing blob from the ENABLED instance (in chunks), until none is missing."""
        while True:
            missing = self.blobs.missing_now()
            if not missing:
                return
            for blob_id in missing:
                row = await asyncio.to_thread(self._blob_row, blob_id)
                if row is None:
                    self.blobs.missing.discard(blob_id)  # no longer referenced
                    continue
                try:
                    await self._fetch(blob_id, int(row["size"]), str(row["sha256"]))
                    log.info("walrus blob fetched", extra={"service": self.ctx.name, "blob": blob_id})
                except (RequestError, ServiceUnavailable, BlobError, OSError) as exc:
                    log.warning(
                        "walrus blob fetch failed",
                        extra={"service": self.ctx.name, "blob": blob_id, "reason": str(exc)},
                    )
            await asyncio.sleep(HEAL_PAUSE)

    def _blob_row(self, blob_id: str) -> dict[str, Any] | None:
        store = self.ctx.store
        assert store is not None
        return store.get_row("blobs", blob_id)

    async def _fetch(self, blob_id: str, size: int, sha256: str) -> None:
        tmp = self.blobs.staging / f"fetch-{blob_id}"
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as fh:
                offset = 0
                while offset < size:
                    n = min(CHUNK, size - offset)
                    data = await self.ctx.call(
                        "walrus",
                        None,
                        "read",
                        {"blob_id": blob_id, "offset": offset, "length": n},
                        timeout=10.0,
                        dedupe=False,
                    )
                    if not isinstance(data, bytes) or not data:
                        raise BlobError("ShortRead", f"blob {blob_id}: nothing at offset {offset}")
                    await asyncio.to_thread(fh.write, data)
                    h.update(data)
                    offset += len(data)
                await asyncio.to_thread(_fsync, fh)
            if offset != size or h.hexdigest() != sha256:
                raise BlobError("BadDigest", f"fetched blob {blob_id} does not match its metadata")
            await asyncio.to_thread(self.blobs.install_file, blob_id, tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # ------------------------------------------------------------------ peer side (backups)

    def peer_handlers(self) -> Mapping[str, ComponentHandler]:
        return {
            "blob_begin": self._blob_begin,
            "blob_data": self._blob_data,
            "blob_end": self._blob_end,
            "blob_whole": self._blob_whole,
            "blob_abort": self._blob_abort,
        }

    def _check_epoch(self, body: Mapping[str, Any]) -> None:
        epoch = int(body.get("epoch") or 0)
        fence = int(getattr(self.ctx, "fence", 0) or 0)
        if epoch < fence:
            raise _err("Fenced", f"epoch {epoch} is older than {fence}")

    async def _blob_begin(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        self._check_epoch(body)
        blob_id = check_id(body.get("blob_id"))
        self.blobs.expire_writers(SESSION_IDLE)
        await asyncio.to_thread(self.blobs.begin, blob_id)
        return {}

    async def _blob_data(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        try:
            w = self.blobs.writer(check_id(body.get("blob_id")))
            size = await asyncio.to_thread(w.write, int(body["offset"]), bytes(body["data"]))
        except BlobError as exc:
            raise _err(exc.kind, exc.message) from None
        return {"size": size}

    async def _blob_end(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        blob_id = check_id(body.get("blob_id"))
        try:
            d = await asyncio.to_thread(self.blobs.finish, blob_id)
        except BlobError as exc:
            raise _err(exc.kind, exc.message) from None
        if d.size != int(body["size"]) or d.sha256 != body.get("sha256"):
            self.blobs.abort(blob_id)
            raise _err("BadDigest", f"blob {blob_id} arrived damaged")
        return {}

    async def _blob_whole(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        self._check_epoch(body)
        blob_id = check_id(body.get("blob_id"))
        data = body.get("data")
        if not isinstance(data, bytes):
            raise _err("InvalidArgument", "blob_whole needs bytes")
        self.blobs.expire_writers(SESSION_IDLE)
        try:
            d = await asyncio.to_thread(self.blobs.write_whole, blob_id, data)
        except BlobError as exc:
            raise _err(exc.kind, exc.message) from None
        if d.size != int(body["size"]) or d.sha256 != body.get("sha256"):
            self.blobs.abort(blob_id)
            raise _err("BadDigest", f"blob {blob_id} arrived damaged")
        return {}

    async def _blob_abort(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        self.blobs.abort(check_id(body.get("blob_id")))
        return {}

    # ------------------------------------------------------------------ primary: byte replication

    def _epoch(self) -> int:
        return int(getattr(self.ctx, "epoch", 0) or 0)

    def _peers(self) -> list[str]:
        fn = getattr(self.ctx, "peer_instances", None)
        return list(fn()) if fn is not None else []

    async def _push(self, peers: list[str], method: str, body: dict[str, Any]) -> list[str]:
        """Call `method` on every peer at once; returns the peers that succeeded."""
        if not peers:
            return []
        call_peer = self.ctx.call_peer  # type: ignore[attr-defined]

        async def one(p: str) -> bool:
            try:
                await call_peer(p, method, body, timeout=PEER_TIMEOUT)
                return True
            except (RequestError, ServiceUnavailable, OSError) as exc:
                log.warning(
                    "walrus byte replication to a peer failed; it will fetch the blob later",
                    extra={"service": self.ctx.name, "peer": p, "method": method, "reason": str(exc)},
                )
                return False

        results = await asyncio.gather(*(one(p) for p in peers))
        return [p for p, ok in zip(peers, results, strict=True) if ok]

    async def _discard_blob(self, blob_id: str, peers: list[str]) -> None:
        self.blobs.abort(blob_id)
        if await asyncio.to_thread(self._blob_row, blob_id) is None:
            self.blobs.remove(blob_id)
        await self._push(peers, "blob_abort", {"blob_id": blob_id})

    # ------------------------------------------------------------------ handlers

    def handlers(self) -> Mapping[str, ComponentHandler]:
        return {
            "list_buckets": self.list_buckets,
            "create_bucket": self.create_bucket,
            "head_bucket": self.head_bucket,
            "delete_bucket": self.delete_bucket,
            "put_small": self.put_small,
            "put_begin": self.put_begin,
            "put_data": self.put_data,
            "put_commit": self.put_commit,
            "put_abort": self.put_abort,
            "get_object": self.get_object,
            "head_object": self.head_object,
            "read": self.read,
            "delete_object": self.delete_object,
            "delete_objects": self.delete_objects,
            "copy_object": self.copy_object,
            "list_objects": self.list_objects,
            "create_multipart": self.create_multipart,
            "list_parts": self.list_parts,
            "complete_multipart": self.complete_multipart,
            "abort_multipart": self.abort_multipart,
        }

    def _bucket(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        name = _s(body, "bucket")
        cache = self.ctx.cache
        assert cache is not None
        row = cache.get("buckets", name)
        if row is None:
            raise _err("NoSuchBucket", f"The specified bucket does not exist: {name}")
        account = body.get("account")
        if account is not None and row["owner"] != account:
            raise _err("AccessDenied", f"Access Denied to bucket {name}")
        return row

    async def _write(self, ops: list[dict[str, Any]], info: RequestInfo) -> None:
        try:
            await self.ctx.write(ops, info.expires_at)
        except RequestError as exc:
            raise _refusal(exc) from None

    async def list_buckets(self, body: Any, info: RequestInfo) -> list[dict[str, Any]]:
        await self._fault_point()
        cache = self.ctx.cache
        assert cache is not None
        account = body.get("account") if isinstance(body, Mapping) else None
        rows = [_row(r) for r in cache.items("buckets") if account is None or r["owner"] == account]
        return sorted(rows, key=lambda r: r["name"])

    async def create_bucket(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        name = _s(body, "bucket")
        try:
            s3.check_bucket_name(name)
        except s3.S3Error as exc:
            raise _from_s3(exc) from None
        op = {
            "op": "put",
            "table": "buckets",
            "name": name,
            "owner": _s(body, "account"),
            "created": time.time(),
        }
        await self._write([op], info)
        return {"bucket": name}

    async def head_bucket(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        return _row(self._bucket(body))

    def _done_row(self, body: Mapping[str, Any], action: str) -> Mapping[str, Any] | None:
        """The done row of this request (its ``request_id``) if it already took effect as
        `action`: its retry across a failover answers as the first attempt did
        (`euca_runtime.store.requests`)."""
        cache = self.ctx.cache
        assert cache is not None
        return WALRUS_REQUESTS.row(cache, body.get("request_id"), action)

    def _done_ops(
        self, body: Mapping[str, Any], action: str, now: float | None = None, result: str | None = None
    ) -> list[dict[str, Any]]:
        cache = self.ctx.cache
        assert cache is not None
        when = time.time() if now is None else now
        return WALRUS_REQUESTS.ops(cache, body.get("request_id"), action, when, result)

    async def delete_bucket(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        if self._done_row(body, "DeleteBucket") is not None:
            return {}
        self._bucket(body)
        op = {"op": "delete", "table": "buckets", "name": _s(body, "bucket")}
        await self._write([op, *self._done_ops(body, "DeleteBucket")], info)
        return {}

    # -- puts

    def _put_target(self, body: Mapping[str, Any]) -> None:
        self._bucket(body)
        try:
            s3.check_key(_s(body, "key"))
        except s3.S3Error as exc:
            raise _from_s3(exc) from None
        if body.get("upload_id") is not None:
            cache = self.ctx.cache
            assert cache is not None
            up = cache.get("uploads", _s(body, "upload_id"))
            if up is None or up["bucket"] != body["bucket"] or up["key"] != body["key"]:
                raise _err("NoSuchUpload", "The specified upload does not exist")
            n = body.get("part_number")
            if not isinstance(n, int) or not 1 <= n <= s3.MAX_PART_NUMBER:
                raise _err(
                    "InvalidArgument", f"Part number must be an integer from 1 to {s3.MAX_PART_NUMBER}"
                )

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for token, sess in list(self.sessions.items()):
            if now - sess.touched > SESSION_IDLE and not sess.lock.locked():
                del self.sessions[token]
                self.blobs.abort(sess.blob_id)

    async def put_begin(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        self._put_target(body)
        self._expire_sessions()
        blob_id = uuid.uuid4().hex
        await asyncio.to_thread(self.blobs.begin, blob_id, md5=True)
        epoch = self._epoch()
        peers = await self._push(self._peers(), "blob_begin", {"blob_id": blob_id, "epoch": epoch})
        token = uuid.uuid4().hex
        self.sessions[token] = _Session(token, blob_id, str(body["bucket"]), str(body["key"]), epoch, peers)
        return {"session": token}

    def _session(self, body: Mapping[str, Any]) -> _Session:
        sess = self.sessions.get(str(body.get("session")))
        if sess is None:
            raise _err("NoSuchUploadSession", "this upload is unknown here (a failover?); retry the request")
        return sess

    async def put_data(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        sess = self._session(body)
        data = body.get("data")
        offset = body.get("offset")
        if not isinstance(data, bytes) or len(data) > CHUNK or not isinstance(offset, int):
            raise _err("InvalidArgument", f"data must be at most {CHUNK} bytes at an integer offset")
        async with sess.lock:
            if offset != sess.size:
                raise _err("IncompleteBody", f"offset {offset}, expected {sess.size}")
            w = self.blobs.writer(sess.blob_id)
            local = asyncio.to_thread(w.write, offset, data)
            peers_task = self._push(
                sess.peers, "blob_data", {"blob_id": sess.blob_id, "offset": offset, "data": data}
            )
            _, ok = await asyncio.gather(local, peers_task)
            sess.peers = ok
            sess.size += len(data)
            sess.touched = time.monotonic()
        return {"size": sess.size}

    async def put_abort(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        sess = self.sessions.pop(str(body.get("session")), None)
        if sess is not None:
            await self._discard_blob(sess.blob_id, sess.peers)
        return {}

    async def put_commit(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        sess = self._session(body)
        async with sess.lock:
            self.sessions.pop(sess.token, None)
            try:
                return await self._commit(sess, body, info)
            except BaseException:
                await self._discard_blob(sess.blob_id, sess.peers)
                raise

    async def put_small(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        data = body.get("data")
        if not isinstance(data, bytes) or len(data) > CHUNK:
            raise _err("InvalidArgument", f"put_small takes at most {CHUNK} bytes")
        self._put_target(body)
        blob_id = uuid.uuid4().hex
        sha = hashlib.sha256(data).hexdigest()
        epoch = self._epoch()
        whole = {"blob_id": blob_id, "epoch": epoch, "data": data, "size": len(data), "sha256": sha}
        # The local copy (written and fsynced in one thread hop) and the copies on the peers
        # are made at the same time.
        local, pushed = await asyncio.gather(
            asyncio.to_thread(self.blobs.write_whole, blob_id, data, md5=True),
            self._push(self._peers(), "blob_whole", whole),
            return_exceptions=True,
        )
        peers = pushed if isinstance(pushed, list) else []
        if isinstance(local, BaseException) or isinstance(pushed, BaseException):
            await self._discard_blob(blob_id, peers)
            exc = local if isinstance(local, BaseException) else pushed
            assert isinstance(exc, BaseException)
            if isinstance(exc, BlobError):
                raise _err("InternalError", exc.message) from None
            raise exc
        sess = _Session("", blob_id, str(body["bucket"]), str(body["key"]), epoch, peers, size=len(data))
        try:
            return await self._commit(sess, body, info, peers_done=True, digests=local)
        except BaseException:
            await self._discard_blob(blob_id, peers)
            raise

    async def _commit(
        self,
        sess: _Session,
        body: Mapping[str, Any],
        info: RequestInfo,
        *,
        peers_done: bool = False,
        digests: Digests | None = None,
    ) -> dict[str, Any]:
        """Fsync every copy, check the digests, then commit the metadata (replicated).

        `digests`: the local copy is already finished (fsynced) with these digests."""
        self._put_target(body)
        d = digests if digests is not None else await asyncio.to_thread(self.blobs.finish, sess.blob_id)
        declared = body.get("size")
        if declared is not None and int(declared) != d.size:
            raise _err("IncompleteBody", f"got {d.size} bytes, Content-Length said {declared}")
        if body.get("md5") is not None and body["md5"] != d.md5:
            raise _err("BadDigest", "The Content-MD5 you specified did not match what we received.")
        if body.get("sha256") is not None and body["sha256"] != d.sha256:
            raise _err(
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )
        if body.get("crc32") is not None and int(body["crc32"]) != d.crc32:
            raise _err("BadDigest", "The CRC32 you specified did not match the calculated checksum.")
        if not peers_done:
            sess.peers = await self._push(
                sess.peers, "blob_end", {"blob_id": sess.blob_id, "size": d.size, "sha256": d.sha256}
            )
        assert d.md5 is not None
        now = time.time()
        ops = [blob_put_op(sess.blob_id, d.size, d.sha256, d.md5)]
        if body.get("upload_id") is not None:
            ops.append(
                {
                    "op": "put",
                    "table": "parts",
                    "upload_id": body["upload_id"],
                    "part_number": int(body["part_number"]),
                    "blob_id": sess.blob_id,
                    "size": d.size,
                    "etag": d.md5,
                    "last_modified": now,
                }
            )
        else:
            ops.append(
                object_put_op(
                    sess.bucket,
                    sess.key,
                    size=d.size,
                    etag=d.md5,
                    last_modified=now,
                    content_type=body.get("content_type"),
                    meta=json.dumps(body.get("meta") or {}, sort_keys=True),
                    headers=json.dumps(body.get("headers") or {}, sort_keys=True),
                    segments=json.dumps([[sess.blob_id, d.size]]),
                )
            )
        await self._write(ops, info)
        out: dict[str, Any] = {"etag": d.md5, "size": d.size, "last_modified": now}
        if d.crc32 is not None:
            out["crc32"] = d.crc32
        return out

    # -- reads

    def _object(self, body: Mapping[str, Any]) -> dict[str, Any]:
        self._bucket(body)
        cache = self.ctx.cache
        assert cache is not None
        key = _s(body, "key")
        row = cache.get("objects", (body["bucket"], key))
        if row is None:
            raise _err("NoSuchKey", "The specified key does not exist.")
        doc = _row(row)
        doc["meta"] = json.loads(doc["meta"] or "{}")
        doc["headers"] = json.loads(doc["headers"] or "{}")
        doc["segments"] = segments_of(doc["segments"])
        return doc

    async def head_object(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        doc = self._object(body)
        try:
            doc["range"] = s3.parse_range(body.get("range"), int(doc["size"]))
        except s3.S3Error as exc:
            raise _from_s3(exc) from None
        return doc

    async def get_object(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        doc = await self.head_object(body, info)
        size = int(doc["size"])
        first, last = doc["range"] if doc["range"] is not None else (0, size - 1)
        doc["data"] = None
        if last - first + 1 <= INLINE:
            parts = []
            for blob_id, off, n in s3.plan_reads(doc["segments"], first, last, CHUNK):
                parts.append(await self._read(blob_id, off, n))
            doc["data"] = b"".join(parts)
        return doc

    async def _read(self, blob_id: str, offset: int, length: int) -> bytes:
        try:
            return await asyncio.to_thread(self.blobs.read, blob_id, offset, length)
        except BlobError as exc:
            raise _err("InternalError" if exc.kind == "NoSuchBlob" else exc.kind, exc.message) from None

    async def read(self, body: Any, info: RequestInfo) -> bytes:
        await self._fault_point()
        blob_id = check_id(body.get("blob_id"))
        offset, length = int(body.get("offset", 0)), int(body.get("length", CHUNK))
        if length > CHUNK:
            raise _err("InvalidArgument", f"read at most {CHUNK} bytes at a time")
        return await self._read(blob_id, offset, length)

    # -- deletes and copies

    async def delete_object(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        self._bucket(body)
        key = _s(body, "key")
        await self._write([{"op": "delete", "table": "objects", "bucket": body["bucket"], "key": key}], info)
        return {}

    async def delete_objects(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        self._bucket(body)
        keys = body.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise _err("MalformedXML", "keys must be a list of strings")
        ops, deleted, errors = [], [], []
        for k in keys:
            try:
                s3.check_key(k)
            except s3.S3Error as exc:
                errors.append([k, exc.code, exc.message])
                continue
            ops.append({"op": "delete", "table": "objects", "bucket": body["bucket"], "key": k})
            deleted.append(k)
        if ops:
            await self._write(ops, info)
        return {"deleted": deleted, "errors": errors}

    async def copy_object(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        src = self._object({**body, "bucket": _s(body, "src_bucket"), "key": _s(body, "src_key")})
        self._put_target(body)
        replace = str(body.get("directive") or "COPY").upper() == "REPLACE"
        if (body["bucket"], body["key"]) == (body["src_bucket"], body["src_key"]) and not replace:
            raise _err(
                "InvalidRequest",
                "This copy request is illegal because it is trying to copy an object to itself without "
                "changing the object's metadata, storage class, website redirect location or encryption "
                "attributes.",
            )
        now = time.time()
        meta = body.get("meta") if replace else src["meta"]
        headers = body.get("headers") if replace else src["headers"]
        ctype = body.get("content_type") if replace else src["content_type"]
        op = object_put_op(
            str(body["bucket"]),
            str(body["key"]),
            size=src["size"],
            etag=src["etag"],
            last_modified=now,
            content_type=ctype,
            meta=json.dumps(meta or {}, sort_keys=True),
            headers=json.dumps(headers or {}, sort_keys=True),
            segments=json.dumps([[b, n] for b, n in src["segments"]]),
        )
        await self._write([op], info)
        return {"etag": src["etag"], "last_modified": now}

    # -- listing

    async def list_objects(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        self._bucket(body)
        bucket = str(body["bucket"])
        max_keys = int(body.get("max_keys", s3.MAX_LIST_KEYS))
        max_keys = max(0, min(max_keys, s3.MAX_LIST_KEYS))
        store = self.ctx.store
        assert store is not None

        def fetch(start: str, inclusive: bool, stop: str | None, limit: int) -> list[dict[str, Any]]:
            cols = (Object.key, Object.size, Object.etag, Object.last_modified)
            stmt = select(*cols).where(Object.bucket == bucket)
            stmt = stmt.where(Object.key >= start if inclusive else Object.key > start)
            if stop is not None:
                stmt = stmt.where(Object.key < stop)
            stmt = stmt.order_by(Object.key).limit(limit)
            with store.read_session() as s:
                return [dict(r._mapping) for r in s.execute(stmt)]

        page = await asyncio.to_thread(
            s3.list_keys,
            fetch,
            prefix=str(body.get("prefix") or ""),
            delimiter=str(body.get("delimiter") or ""),
            after=str(body.get("after") or ""),
            max_keys=max_keys,
        )
        return {
            "contents": page.contents,
            "prefixes": page.prefixes,
            "truncated": page.truncated,
            "last": page.last,
        }

    # -- multipart

    async def create_multipart(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        self._bucket(body)
        key = _s(body, "key")
        try:
            s3.check_key(key)
        except s3.S3Error as exc:
            raise _from_s3(exc) from None
        upload_id = uuid.uuid4().hex
        op = {
            "op": "put",
            "table": "uploads",
            "upload_id": upload_id,
            "bucket": body["bucket"],
            "key": key,
            "initiated": time.time(),
            "owner": _s(body, "account"),
            "content_type": body.get("content_type"),
            "meta": json.dumps(body.get("meta") or {}, sort_keys=True),
            "headers": json.dumps(body.get("headers") or {}, sort_keys=True),
        }
        await self._write([op], info)
        return {"upload_id": upload_id}

    def _upload(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        self._bucket(body)
        cache = self.ctx.cache
        assert cache is not None
        up = cache.get("uploads", _s(body, "upload_id"))
        if up is None or up["bucket"] != body.get("bucket") or up["key"] != body.get("key"):
            raise _err("NoSuchUpload", "The specified upload does not exist.")
        return up

    def _parts(self, upload_id: str) -> list[dict[str, Any]]:
        cache = self.ctx.cache
        assert cache is not None
        rows = [_row(p) for p in cache.items("parts") if p["upload_id"] == upload_id]
        return sorted(rows, key=lambda p: p["part_number"])

    async def list_parts(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        up = self._upload(body)
        marker = int(body.get("marker") or 0)
        max_parts = max(1, min(int(body.get("max_parts") or 1000), 1000))
        parts = [p for p in self._parts(str(up["upload_id"])) if p["part_number"] > marker]
        return {"parts": parts[:max_parts], "truncated": len(parts) > max_parts, "owner": up["owner"]}

    async def complete_multipart(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        done = self._done_row(body, "CompleteMultipartUpload")
        if done is not None:
            # Our own retry across a failover: the object was committed and the upload is gone.
            # Answer with the ETag the first attempt computed (the object may have been
            # overwritten or deleted since; answering NoSuchUpload would deny a completed upload).
            return {"etag": done["result"], "last_modified": done["created_ts"]}
        up = self._upload(body)
        wanted = body.get("parts")
        if not isinstance(wanted, list) or not wanted:
            raise _err("MalformedXML", "no parts listed")
        have = {p["part_number"]: p for p in self._parts(str(up["upload_id"]))}
        chosen = []
        prev = 0
        for number, etag in wanted:
            if int(number) <= prev:
                raise _err("InvalidPartOrder", "The list of parts was not in ascending order.")
            prev = int(number)
            part = have.get(int(number))
            if part is None or part["etag"] != s3.unquote_etag(str(etag)):
                raise _err(
                    "InvalidPart",
                    "One or more of the specified parts could not be found. The part may not have been "
                    "uploaded, or the specified entity tag may not match the part's entity tag.",
                )
            chosen.append(part)
        for part in chosen[:-1]:
            if int(part["size"]) < s3.MIN_PART_SIZE:
                raise _err(
                    "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed object size."
                )
        etag = s3.multipart_etag([p["etag"] for p in chosen])
        now = time.time()
        ops = [
            object_put_op(
                str(up["bucket"]),
                str(up["key"]),
                size=sum(int(p["size"]) for p in chosen),
                etag=etag,
                last_modified=now,
                content_type=up["content_type"],
                meta=up["meta"],
                headers=up["headers"],
                segments=json.dumps([[p["blob_id"], int(p["size"])] for p in chosen]),
            ),
            {"op": "delete", "table": "uploads", "upload_id": up["upload_id"]},
            *self._done_ops(body, "CompleteMultipartUpload", now, etag),
        ]
        await self._write(ops, info)
        return {"etag": etag, "last_modified": now}

    async def abort_multipart(self, body: Any, info: RequestInfo) -> dict[str, Any]:
        await self._fault_point()
        if self._done_row(body, "AbortMultipartUpload") is not None:
            return {}
        up = self._upload(body)
        op = {"op": "delete", "table": "uploads", "upload_id": up["upload_id"]}
        await self._write([op, *self._done_ops(body, "AbortMultipartUpload")], info)
        return {}


def _fsync(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


_ = Part  # the parts table is read through the cache

WALRUS_TYPE = register_type(
    ComponentType(
        name="walrus",
        factory=Walrus,
        replicated=True,
        store_component="walrus",
        description="S3 buckets and objects (metadata replicated, bytes replicated in step)",
    )
)
