"""The replicated metadata of walrus: the ``walrus`` store component (Alembic branch ``walrus``).

Tables:

- ``buckets`` (name, owner, created);
- ``objects`` ((bucket, key), size, etag, last_modified, content_type, meta, headers,
  segments): `segments` is a JSON list of ``[blob_id, size]`` whose concatenation is the
  object (one segment for a PutObject, one per part for a completed multipart upload);
- ``blobs`` (blob_id, size, sha256, md5, refs): every blob the metadata refers to, with a
  reference count (objects and parts share blobs after CopyObject and
  CompleteMultipartUpload);
- ``uploads`` (upload_id, bucket, key, initiated, owner, content_type, meta, headers);
- ``parts`` ((upload_id, part_number), blob_id, size, etag, last_modified);
- ``walrus_request`` (request_id, action, created_ts, result): deletes and multipart completions
  done, by request id, so a retry across a failover gets the first answer
  (`euca_runtime.store.requests`, its own ops).

Ops (every op dict has "table" and "op"; every field explicit so replicas agree exactly):

- buckets ``put`` {name, owner, created}: refused (``BucketAlreadyOwnedByYou`` /
  ``BucketAlreadyExists``) if it exists; ``delete`` {name}: refused (``NoSuchBucket``,
  ``BucketNotEmpty`` when objects or multipart uploads remain);
- blobs ``put`` {blob_id, size, sha256, md5}: registers a blob (refs 0) and installs its
  staged bytes (`BlobStore.install`; missing bytes are noted, not refused); ``drop``
  {blob_id}: removes an unreferenced blob (undo of ``put``);
- objects ``put`` {bucket, key, size, etag, last_modified, content_type, meta, headers,
  segments}: the bucket and every segment blob must exist; replaces the previous version
  (its blobs lose a reference); ``delete`` {bucket, key}: no-op if absent;
- uploads ``put`` {upload_id, bucket, key, initiated, owner, content_type, meta, headers};
  ``delete`` {upload_id}: also deletes its parts;
- parts ``put`` {upload_id, part_number, blob_id, size, etag, last_modified}: the upload must
  exist (``NoSuchUpload``); replaces the part of the same number; ``delete``.

A blob whose reference count drops to zero is deleted from the table in the same record,
and its file is unlinked after the commit (`BlobStore.schedule_removal`). Appliers refuse
with `StoreError("<S3 code>: message")`; on the primary that refusal comes back to the
handler as a `RequestError` carrying the message, which maps it to the S3 error (the
record is never logged, so backups never see a refused op).

The appliers find the instance's `BlobStore` through `register_blobstore` (keyed by the
store's database URL); a store with none registered (tools, tests) keeps only metadata.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

from sqlalchemy import BigInteger, Float, Integer, String, Text, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from euca_runtime.store import ApplyContext, ComponentSpec, StoreError, register_component
from euca_runtime.store.requests import RequestRowMixin, register_request_table
from euca_runtime.walrus.blobs import BlobStore


class WalrusBase(DeclarativeBase):
    """Declarative base of the walrus component (Alembic branch `walrus`)."""


class Bucket(WalrusBase):
    __tablename__ = "buckets"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), nullable=False)
    created: Mapped[float] = mapped_column(Float, nullable=False)


class Object(WalrusBase):
    __tablename__ = "objects"

    bucket: Mapped[str] = mapped_column(String(63), primary_key=True)
    key: Mapped[str] = mapped_column(String(1024), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    last_modified: Mapped[float] = mapped_column(Float, nullable=False)
    content_type: Mapped[str | None] = mapped_column(String(255), nullable=True)
    meta: Mapped[str] = mapped_column(Text, nullable=False)
    headers: Mapped[str] = mapped_column(Text, nullable=False)
    segments: Mapped[str] = mapped_column(Text, nullable=False)


class Blob(WalrusBase):
    __tablename__ = "blobs"

    blob_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    md5: Mapped[str] = mapped_column(String(32), nullable=False)
    refs: Mapped[int] = mapped_column(Integer, nullable=False)


class Upload(WalrusBase):
    __tablename__ = "uploads"

    upload_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[str] = mapped_column(String(63), nullable=False, index=True)
    key: Mapped[str] = mapped_column(String(1024), nullable=False)
    initiated: Mapped[float] = mapped_column(Float, nullable=False)
    owner: Mapped[str] = mapped_column(String(128), nullable=False)
    content_type: Mapped[str | None] = mapped_column(String(255), nullable=True)
    meta: Mapped[str] = mapped_column(Text, nullable=False)
    headers: Mapped[str] = mapped_column(Text, nullable=False)


class Part(WalrusBase):
    __tablename__ = "parts"

    upload_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    part_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_id: Mapped[str] = mapped_column(String(32), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    etag: Mapped[str] = mapped_column(String(64), nullable=False)
    last_modified: Mapped[float] = mapped_column(Float, nullable=False)


class WalrusRequest(RequestRowMixin, WalrusBase):
    """A request that took effect (DeleteBucket, AbortMultipartUpload, CompleteMultipartUpload
    with its ETag as ``result``), by its request id (Alembic ``walrus_0002``, ``result`` in
    ``walrus_0003``; `euca_runtime.store.requests`)."""

    __tablename__ = "walrus_request"


WALRUS = register_component(ComponentSpec("walrus", WalrusBase.metadata, lazy_tables=("objects", "blobs")))
"""Objects and blobs can be many: filled on demand; buckets, uploads and parts are warm."""
WALRUS_REQUESTS = register_request_table(WALRUS, WalrusRequest)

_OBJ_FIELDS = ("size", "etag", "last_modified", "content_type", "meta", "headers", "segments")
_UPLOAD_FIELDS = ("bucket", "key", "initiated", "owner", "content_type", "meta", "headers")
_PART_FIELDS = ("blob_id", "size", "etag", "last_modified")

_BLOBSTORES: dict[str, BlobStore] = {}
_BS_LOCK = threading.Lock()


def _url_key(url: Any) -> str:
    return url.render_as_string(hide_password=True) if hasattr(url, "render_as_string") else str(url)


def register_blobstore(url: Any, bs: BlobStore) -> None:
    """Let the appliers of the store at `url` (its engine URL) install bytes into `bs`."""
    with _BS_LOCK:
        _BLOBSTORES[_url_key(url)] = bs


def unregister_blobstore(url: Any) -> None:
    with _BS_LOCK:
        _BLOBSTORES.pop(_url_key(url), None)


def _blobstore(ctx: ApplyContext) -> BlobStore | None:
    bind = ctx.session.get_bind()
    with _BS_LOCK:
        return _BLOBSTORES.get(_url_key(bind.engine.url))


def refused(code: str, message: str) -> StoreError:
    """An applier's refusal carrying an S3 error code."""
    return StoreError(f"{code}: {message}")


def _str(op: Mapping[str, Any], name: str) -> str:
    v = op.get(name)
    if not isinstance(v, str) or not v:
        raise StoreError(f"walrus op {op.get('table')}.{op.get('op')} needs a string {name}, got {v!r}")
    return v


def segments_of(doc: str) -> list[tuple[str, int]]:
    return [(str(b), int(n)) for b, n in json.loads(doc)]


# --------------------------------------------------------------------------- blobs


def _incref(ctx: ApplyContext, blob_id: str) -> None:
    row = ctx.session.get(Blob, blob_id)
    if row is None:
        raise refused("InternalError", f"blob {blob_id} is not registered")
    row.refs += 1


def _decref(ctx: ApplyContext, blob_id: str) -> list[dict[str, Any]]:
    """Drop one reference; returns the undo needed to re-create a deleted blob row."""
    row = ctx.session.get(Blob, blob_id)
    if row is None:
        return []
    row.refs -= 1
    if row.refs > 0:
        return []
    undo = [blob_put_op(row.blob_id, row.size, row.sha256, row.md5)]
    ctx.session.delete(row)
    bs = _blobstore(ctx)
    if bs is not None:
        bs.schedule_removal(ctx.seq, blob_id)
    return undo


def blob_put_op(blob_id: str, size: int, sha256: str, md5: str) -> dict[str, Any]:
    return {"op": "put", "table": "blobs", "blob_id": blob_id, "size": size, "sha256": sha256, "md5": md5}


@WALRUS.applier("blobs", "put")
def _blob_put(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    blob_id = _str(op, "blob_id")
    size, sha = int(op["size"]), _str(op, "sha256")
    if ctx.session.get(Blob, blob_id) is None:
        ctx.session.add(Blob(blob_id=blob_id, size=size, sha256=sha, md5=str(op.get("md5") or ""), refs=0))
    bs = _blobstore(ctx)
    if bs is not None:
        bs.install(blob_id, size, sha)
    return [{"op": "drop", "table": "blobs", "blob_id": blob_id}]


@WALRUS.applier("blobs", "drop")
def _blob_drop(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    row = ctx.session.get(Blob, _str(op, "blob_id"))
    if row is None or row.refs > 0:
        return []
    undo = [blob_put_op(row.blob_id, row.size, row.sha256, row.md5)]
    ctx.session.delete(row)
    bs = _blobstore(ctx)
    if bs is not None:
        bs.schedule_removal(ctx.seq, row.blob_id)
    return undo


# --------------------------------------------------------------------------- buckets


@WALRUS.applier("buckets", "put")
def _bucket_put(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    name, owner = _str(op, "name"), _str(op, "owner")
    row = ctx.session.get(Bucket, name)
    if row is not None:
        if row.owner == owner:
            raise refused("BucketAlreadyOwnedByYou", f"you already own bucket {name}")
        raise refused("BucketAlreadyExists", f"bucket {name} exists and is owned by another account")
    ctx.session.add(Bucket(name=name, owner=owner, created=float(op["created"])))
    return [{"op": "delete", "table": "buckets", "name": name}]


@WALRUS.applier("buckets", "delete")
def _bucket_delete(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    name = _str(op, "name")
    row = ctx.session.get(Bucket, name)
    if row is None:
        raise refused("NoSuchBucket", f"bucket {name} does not exist")
    if ctx.session.execute(select(Object.key).where(Object.bucket == name).limit(1)).first() is not None:
        raise refused("BucketNotEmpty", f"bucket {name} is not empty")
    if ctx.session.execute(select(Upload.upload_id).where(Upload.bucket == name).limit(1)).first():
        raise refused("BucketNotEmpty", f"bucket {name} has multipart uploads in progress")
    undo = [{"op": "put", "table": "buckets", "name": name, "owner": row.owner, "created": row.created}]
    ctx.session.delete(row)
    return undo


# --------------------------------------------------------------------------- objects


def object_put_op(bucket: str, key: str, **fields: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"op": "put", "table": "objects", "bucket": bucket, "key": key}
    for f in _OBJ_FIELDS:
        op[f] = fields.get(f)
    return op


def _object_undo(row: Object | None, bucket: str, key: str) -> list[dict[str, Any]]:
    if row is None:
        return [{"op": "delete", "table": "objects", "bucket": bucket, "key": key}]
    return [object_put_op(bucket, key, **{f: getattr(row, f) for f in _OBJ_FIELDS})]


def _blob_undos(rows: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [u for r in rows for u in r]


@WALRUS.applier("objects", "put")
def _object_put(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    bucket, key = _str(op, "bucket"), _str(op, "key")
    if ctx.session.get(Bucket, bucket) is None:
        raise refused("NoSuchBucket", f"bucket {bucket} does not exist")
    segments = op.get("segments")
    if not isinstance(segments, str):
        raise StoreError("objects put needs segments (a JSON list)")
    for blob_id, _ in segments_of(segments):
        _incref(ctx, blob_id)
    row = ctx.session.get(Object, (bucket, key))
    undo = _object_undo(row, bucket, key)
    values: dict[str, Any] = {f: op.get(f) for f in _OBJ_FIELDS}
    values["size"] = int(values["size"])
    values["last_modified"] = float(values["last_modified"])
    values["meta"] = values["meta"] or "{}"
    values["headers"] = values["headers"] or "{}"
    recreate: list[list[dict[str, Any]]] = []
    if row is None:
        ctx.session.add(Object(bucket=bucket, key=key, **values))
    else:
        old = segments_of(row.segments)
        for f, v in values.items():
            setattr(row, f, v)
        ctx.session.flush()
        recreate = [_decref(ctx, b) for b, _ in old]
    return _blob_undos(recreate) + undo


@WALRUS.applier("objects", "delete")
def _object_delete(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    bucket, key = _str(op, "bucket"), _str(op, "key")
    row = ctx.session.get(Object, (bucket, key))
    if row is None:
        return []
    undo = _object_undo(row, bucket, key)
    old = segments_of(row.segments)
    ctx.session.delete(row)
    ctx.session.flush()
    recreate = [_decref(ctx, b) for b, _ in old]
    return _blob_undos(recreate) + undo


# --------------------------------------------------------------------------- multipart


@WALRUS.applier("uploads", "put")
def _upload_put(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    upload_id = _str(op, "upload_id")
    bucket = _str(op, "bucket")
    if ctx.session.get(Bucket, bucket) is None:
        raise refused("NoSuchBucket", f"bucket {bucket} does not exist")
    if ctx.session.get(Upload, upload_id) is not None:
        raise StoreError(f"upload {upload_id} exists")
    values: dict[str, Any] = {f: op.get(f) for f in _UPLOAD_FIELDS}
    values["initiated"] = float(values["initiated"])
    values["meta"] = values["meta"] or "{}"
    values["headers"] = values["headers"] or "{}"
    ctx.session.add(Upload(upload_id=upload_id, **values))
    return [{"op": "delete", "table": "uploads", "upload_id": upload_id}]


@WALRUS.applier("uploads", "delete")
def _upload_delete(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    upload_id = _str(op, "upload_id")
    row = ctx.session.get(Upload, upload_id)
    if row is None:
        raise refused("NoSuchUpload", f"upload {upload_id} does not exist")
    undo: list[dict[str, Any]] = []
    parts = ctx.session.execute(select(Part).where(Part.upload_id == upload_id)).scalars().all()
    recreate = []
    for p in parts:
        undo.append(_part_put_op(upload_id, p.part_number, {f: getattr(p, f) for f in _PART_FIELDS}))
        ctx.session.delete(p)
    ctx.session.flush()
    for p in parts:
        recreate.append(_decref(ctx, p.blob_id))
    head = {"op": "put", "table": "uploads", "upload_id": upload_id}
    head.update({f: getattr(row, f) for f in _UPLOAD_FIELDS})
    ctx.session.delete(row)
    return [*_blob_undos(recreate), head, *undo]


def _part_put_op(upload_id: str, number: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"op": "put", "table": "parts", "upload_id": upload_id, "part_number": number}
    for f in _PART_FIELDS:
        op[f] = fields.get(f)
    return op


@WALRUS.applier("parts", "put")
def _part_put(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    upload_id = _str(op, "upload_id")
    number = int(op["part_number"])
    if ctx.session.get(Upload, upload_id) is None:
        raise refused("NoSuchUpload", f"upload {upload_id} does not exist")
    blob_id = _str(op, "blob_id")
    _incref(ctx, blob_id)
    row = ctx.session.get(Part, (upload_id, number))
    values: dict[str, Any] = {f: op.get(f) for f in _PART_FIELDS}
    values["size"] = int(values["size"])
    values["last_modified"] = float(values["last_modified"])
    if row is None:
        ctx.session.add(Part(upload_id=upload_id, part_number=number, **values))
        return [{"op": "delete", "table": "parts", "upload_id": upload_id, "part_number": number}]
    undo = [_part_put_op(upload_id, number, {f: getattr(row, f) for f in _PART_FIELDS})]
    old = row.blob_id
    for f, v in values.items():
        setattr(row, f, v)
    ctx.session.flush()
    return _decref(ctx, old) + undo


@WALRUS.applier("parts", "delete")
def _part_delete(ctx: ApplyContext, op: Mapping[str, Any]) -> list[dict[str, Any]]:
    upload_id = _str(op, "upload_id")
    number = int(op["part_number"])
    row = ctx.session.get(Part, (upload_id, number))
    if row is None:
        return []
    undo = [_part_put_op(upload_id, number, {f: getattr(row, f) for f in _PART_FIELDS})]
    blob_id = row.blob_id
    ctx.session.delete(row)
    ctx.session.flush()
    return _decref(ctx, blob_id) + undo


def count_objects(session: Any, bucket: str) -> int:
    return int(
        session.execute(select(func.count()).select_from(Object).where(Object.bucket == bucket)).scalar()
    )


__all__ = [
    "WALRUS",
    "Blob",
    "Bucket",
    "Object",
    "Part",
    "Upload",
    "WalrusBase",
    "blob_put_op",
    "object_put_op",
    "refused",
    "register_blobstore",
    "segments_of",
    "unregister_blobstore",
]
