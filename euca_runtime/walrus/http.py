"""The S3 REST front end: one aiohttp app per process that hosts walrus (config ``api.s3``).

Served at the root of its port, path-style (``/bucket/key``) and virtual-hosted-style
(``Host: bucket.<endpoint host>``, where the endpoint hosts are the listener's address, the
node name, ``localhost`` and whatever ``EUCA_S3_DOMAINS`` lists). Every request is
authenticated with AWS Signature V4 (header or presigned form, `euca_runtime.sigv4`) against
the access keys of the clc (`euca_runtime.credentials.KeyCache`), then forwarded over the bus
to the ENABLED walrus instance (`euca_runtime.services.walrus`), wherever it runs; a request
is held and retried across a failover until its deadline (`TIMEOUT`).

Bodies stream: a PutObject/UploadPart body is read in chunks of at most 1 MiB and each chunk
is sent on at once (``put_begin``/``put_data``/``put_commit``; a body of at most 1 MiB goes in
one ``put_small`` call, which is retried whole across a failover); GetObject answers are
written chunk by chunk as they are read from the primary. A streamed upload that a failover
interrupts is answered ``503 SlowDown`` (clients retry it). Bodies sent ``aws-chunked``
(``STREAMING-AWS4-HMAC-SHA256-PAYLOAD`` with chunk signatures, or
``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` with a checksum trailer) are decoded and verified.

Integrity: ``x-amz-content-sha256`` (when a hex digest), ``Content-MD5`` and
``x-amz-checksum-crc32`` are checked against what arrived before the object is committed
(``XAmzContentSHA256Mismatch``, ``BadDigest``, ``InvalidDigest``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from euca_runtime.component import RequestError, ServiceUnavailable
from euca_runtime.credentials import KeyInfo, key_cache
from euca_runtime.log import get_logger
from euca_runtime.sigv4 import (
    EMPTY_SHA256,
    STREAMING_UNSIGNED_TRAILER,
    UNSIGNED_PAYLOAD,
    AuthError,
    ChunkSigner,
    ParsedAuth,
    check_signature,
    parse_request,
    s3_error,
)
from euca_runtime.walrus import s3
from euca_runtime.walrus.s3 import S3Error

if TYPE_CHECKING:
    from euca_runtime.node import Node

log = get_logger("walrus.http")

CHUNK = 1 << 20
TIMEOUT = 30.0
"""Deadline of one bus call made for an S3 request (held across a failover meanwhile)."""
MAX_XML_BODY = 1 << 20
REGION = "eucalyptus"
_STD_HEADERS = ("Cache-Control", "Content-Disposition", "Content-Encoding", "Content-Language", "Expires")
_SUBRESOURCES_UNSUPPORTED = (
    "acl",
    "policy",
    "cors",
    "lifecycle",
    "versioning",
    "tagging",
    "website",
    "logging",
    "notification",
    "replication",
    "encryption",
    "object-lock",
    "retention",
    "legal-hold",
    "torrent",
    "restore",
    "select",
    "versions",
    "accelerate",
    "requestPayment",
    "analytics",
    "inventory",
    "metrics",
    "ownershipControls",
    "publicAccessBlock",
    "intelligent-tiering",
    "attributes",
)


class _Ctx:
    """One S3 request being served."""

    def __init__(self, request: web.Request, rid: str) -> None:
        self.request = request
        self.rid = rid
        self.bucket = ""
        self.key = ""
        self.query: dict[str, str] = {}
        self.parsed: ParsedAuth | None = None
        self.key_info: KeyInfo | None = None
        self.secret = ""

    @property
    def account(self) -> str:
        info = self.key_info
        assert info is not None
        return info.account_id or info.account

    @property
    def resource(self) -> str:
        return "/" + self.bucket + ("/" + self.key if self.key else "")


def _xml(body: bytes, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/xml", headers=headers)


def _error_response(err: S3Error, ctx: _Ctx, head: bool) -> web.Response:
    headers = {"x-amz-request-id": ctx.rid}
    if head:
        return web.Response(status=err.status, headers=headers)
    return _xml(s3.error_xml(err, ctx.resource, ctx.rid), err.status, headers)


def _from_request_error(exc: RequestError) -> S3Error:
    if exc.kind in s3.ERROR_STATUS:
        return S3Error(exc.kind, exc.message)
    if exc.kind == "NoSuchUploadSession":
        return S3Error("SlowDown", "the upload was interrupted by a failover; please retry", 503)
    return s3.error_from_text(exc.message)


def endpoint_hosts(node: Node) -> list[str]:
    hosts = ["localhost", node.name]
    addr = node.cfg.api.s3
    if addr is not None:
        hosts.append(addr.host)
    extra = os.environ.get("EUCA_S3_DOMAINS", "")
    hosts += [h.strip() for h in extra.split(",") if h.strip()]
    return hosts


def route(host: str, raw_path: str, hosts: list[str]) -> tuple[str, str]:
    """(bucket, key) of a request: virtual-hosted-style from Host, else path-style."""
    path = unquote(raw_path.split("?", 1)[0])
    vbucket = s3.virtual_host_bucket(host, hosts)
    if vbucket is not None:
        return vbucket, path[1:] if path.startswith("/") else path
    path = path[1:] if path.startswith("/") else path
    bucket, _, key = path.partition("/")
    return bucket, key


def _meta(request: web.Request) -> dict[str, str]:
    meta: dict[str, str] = {}
    size = 0
    for name, value in request.headers.items():
        low = name.lower()
        if low.startswith("x-amz-meta-"):
            k = low[len("x-amz-meta-") :]
            meta[k] = value
            size += len(k) + len(value.encode())
    if size > s3.MAX_META_BYTES:
        raise S3Error(
            "MetadataTooLarge",
            f"Your metadata headers exceed the maximum allowed metadata size ({s3.MAX_META_BYTES} bytes)",
        )
    return meta


def _std_headers(request: web.Request) -> dict[str, str]:
    return {h: request.headers[h] for h in _STD_HEADERS if h in request.headers}


def _object_headers(doc: Mapping[str, Any]) -> dict[str, str]:
    h = {
        "ETag": s3.quote_etag(str(doc["etag"])),
        "Last-Modified": s3.http_date(float(doc["last_modified"])),
        "Accept-Ranges": "bytes",
        "Content-Type": str(doc.get("content_type") or "binary/octet-stream"),
    }
    for k, v in (doc.get("headers") or {}).items():
        h[str(k)] = str(v)
    for k, v in (doc.get("meta") or {}).items():
        h[f"x-amz-meta-{k}"] = str(v)
    return h


class S3Frontend:
    """The request handler (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.keys = key_cache(node)
        self.hosts = endpoint_hosts(node)

    async def call(self, method: str, body: dict[str, Any], timeout: float = TIMEOUT) -> Any:
        # Reads are safe to repeat and carry object bytes: not kept by the receiver's
        # idempotency cache (which would hold every chunk read for its whole TTL).
        dedupe = method not in ("read", "get_object", "head_object", "list_objects", "list_parts")
        return await self.node.call("walrus", None, method, body, timeout=timeout, dedupe=dedupe)

    # ------------------------------------------------------------------ entry

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = uuid.uuid4().hex[:16].upper()
        ctx = _Ctx(request, rid)
        head = request.method == "HEAD"
        try:
            ctx.bucket, ctx.key = route(request.host, request.raw_path, self.hosts)
            raw_path, _, raw_query = request.raw_path.partition("?")
            ctx.query = dict(parse_qsl(raw_query, keep_blank_values=True))
            await self._authenticate(ctx, raw_path, raw_query)
            resp = await self._dispatch(ctx)
        except S3Error as exc:
            if exc.status >= 500:
                log.warning(
                    "s3 request failed",
                    extra={"code": exc.code, "reason": exc.message, "node": self.node.name},
                )
            return _error_response(exc, ctx, head)
        except RequestError as exc:
            return _error_response(_from_request_error(exc), ctx, head)
        except ServiceUnavailable as exc:
            log.warning("s3 request not served", extra={"reason": str(exc), "node": self.node.name})
            return _error_response(
                S3Error("ServiceUnavailable", f"Please reduce your request rate. ({exc})", 503), ctx, head
            )
        resp.headers.setdefault("x-amz-request-id", rid)
        return resp

    async def _authenticate(self, ctx: _Ctx, raw_path: str, raw_query: str) -> None:
        r = ctx.request
        try:
            parsed = parse_request(r.method, raw_path, raw_query, r.headers, datetime.now(UTC))
            if parsed.service != "s3":
                raise AuthError("signature_mismatch", "Credential should be scoped to correct service: 's3'.")
            info = await self.keys.resolve(parsed.access_key)
            declared = parsed.content_sha256
            check_signature(parsed, info.secret_key, declared if declared is not None else EMPTY_SHA256)
        except AuthError as exc:
            status, code, message = s3_error(exc)
            log.info("s3 request refused", extra={"reason": exc.kind, "node": self.node.name})
            raise S3Error(code, message, status) from None
        ctx.parsed, ctx.key_info, ctx.secret = parsed, info, info.secret_key

    # ------------------------------------------------------------------ dispatch

    async def _dispatch(self, ctx: _Ctx) -> web.StreamResponse:
        m = ctx.request.method
        q = ctx.query
        for sub in _SUBRESOURCES_UNSUPPORTED:
            if sub in q:
                raise S3Error("NotImplemented", f"the ?{sub} subresource is not implemented")
        if not ctx.bucket:
            if m == "GET":
                return await self.list_buckets(ctx)
            raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.")
        if not ctx.key:
            if m == "PUT":
                return await self.create_bucket(ctx)
            if m == "HEAD":
                await self.call("head_bucket", {"bucket": ctx.bucket, "account": ctx.account})
                return web.Response(headers={"x-amz-bucket-region": REGION})
            if m == "DELETE":
                body = {"bucket": ctx.bucket, "account": ctx.account, "request_id": ctx.rid}
                await self.call("delete_bucket", body)
                return web.Response(status=204)
            if m == "GET" and "location" in q:
                await self.call("head_bucket", {"bucket": ctx.bucket, "account": ctx.account})
                return _xml(s3.location_xml(REGION))
            if m == "GET" and "uploads" in q:
                raise S3Error("NotImplemented", "ListMultipartUploads is not implemented")
            if m == "GET":
                return await self.list_objects(ctx)
            if m == "POST" and "delete" in q:
                return await self.delete_objects(ctx)
            raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.")
        if m == "PUT":
            if "x-amz-copy-source" in ctx.request.headers:
                if "uploadId" in q:
                    raise S3Error("NotImplemented", "UploadPartCopy is not implemented")
                return await self.copy_object(ctx)
            return await self.put_object(ctx)
        if m in ("GET", "HEAD"):
            if "uploadId" in q and m == "GET":
                return await self.list_parts(ctx)
            return await self.get_object(ctx, head=m == "HEAD")
        if m == "DELETE":
            if "uploadId" in q:
                await self.call(
                    "abort_multipart",
                    {
                        "bucket": ctx.bucket,
                        "key": ctx.key,
                        "upload_id": q["uploadId"],
                        "account": ctx.account,
                        "request_id": ctx.rid,
                    },
                )
            else:
                await self.call(
                    "delete_object", {"bucket": ctx.bucket, "key": ctx.key, "account": ctx.account}
                )
            return web.Response(status=204)
        if m == "POST" and "uploads" in q:
            return await self.create_multipart(ctx)
        if m == "POST" and "uploadId" in q:
            return await self.complete_multipart(ctx)
        raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.")

    # ------------------------------------------------------------------ small bodies

    async def _small_body(self, ctx: _Ctx) -> bytes:
        """A request body that is an XML document (bounded), checked against the signed hash."""
        r = ctx.request
        if r.content_length is not None and r.content_length > MAX_XML_BODY:
            raise S3Error("MalformedXML", f"the request body is larger than {MAX_XML_BODY} bytes")
        parts = []
        async for piece in self._body(ctx):
            parts.append(piece)
            if sum(len(p) for p in parts) > MAX_XML_BODY:
                raise S3Error("MalformedXML", f"the request body is larger than {MAX_XML_BODY} bytes")
        body = b"".join(parts)
        declared = ctx.parsed.content_sha256 if ctx.parsed else None
        if declared is not None and len(declared) == 64 and hashlib.sha256(body).hexdigest() != declared:
            raise S3Error(
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )
        md5 = r.headers.get("Content-MD5")
        if md5 is not None and hashlib.md5(body).hexdigest() != s3.content_md5(md5):
            raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.")
        return body

    # ------------------------------------------------------------------ bodies (plain or aws-chunked)

    def _streaming(self, ctx: _Ctx) -> bool:
        p = ctx.parsed
        enc = ctx.request.headers.get("Content-Encoding", "")
        return (p is not None and (p.streaming or p.content_sha256 == STREAMING_UNSIGNED_TRAILER)) or (
            "aws-chunked" in enc
        )

    async def _body(self, ctx: _Ctx, trailer: dict[str, str] | None = None) -> AsyncIterator[bytes]:
        """The request body in pieces (aws-chunked decoded and verified)."""
        content = ctx.request.content
        if not self._streaming(ctx):
            while True:
                piece = await content.read(CHUNK)
                if not piece:
                    return
                yield piece
        signer = None
        p = ctx.parsed
        if p is not None and p.streaming:
            signer = ChunkSigner(p, ctx.secret)
        while True:
            line = (await content.readline()).decode("latin-1").strip()
            if not line:
                raise S3Error("IncompleteBody", "the aws-chunked body ended early")
            size_s, _, ext = line.partition(";")
            try:
                size = int(size_s, 16)
            except ValueError:
                raise S3Error("InvalidRequest", "bad aws-chunked chunk header") from None
            data = await content.readexactly(size) if size else b""
            if signer is not None:
                sig = ext.partition("chunk-signature=")[2].strip()
                try:
                    signer.check(sig, data)
                except AuthError:
                    raise S3Error("SignatureDoesNotMatch", "a chunk signature does not match", 403) from None
            if size == 0:
                break
            await content.readexactly(2)  # CRLF after the data
            yield data
        # trailers (if any), then an empty line
        trailer_lines = []
        while True:
            raw = await content.readline()
            line = raw.decode("latin-1").strip()
            if not line:
                break
            trailer_lines.append(raw)
            name, _, value = line.partition(":")
            if trailer is not None and name.lower() != "x-amz-trailer-signature":
                trailer[name.strip().lower()] = value.strip()
            if signer is not None and name.lower() == "x-amz-trailer-signature":
                body = b"".join(trailer_lines[:-1]).replace(b"\r\n", b"\n")
                try:
                    signer.check_trailer(value.strip(), body)
                except AuthError:
                    raise S3Error(
                        "SignatureDoesNotMatch", "the trailer signature does not match", 403
                    ) from None

    # ------------------------------------------------------------------ buckets

    async def list_buckets(self, ctx: _Ctx) -> web.Response:
        rows = await self.call("list_buckets", {"account": ctx.account})
        return _xml(s3.list_buckets_xml(ctx.account, rows))

    async def create_bucket(self, ctx: _Ctx) -> web.Response:
        s3.check_bucket_name(ctx.bucket)
        body = await self._small_body(ctx)
        region = s3.parse_create_bucket(body)
        if region is not None and region != REGION:
            raise S3Error(
                "InvalidLocationConstraint" if False else "InvalidArgument",
                f"this cloud's region is {REGION!r}, not {region!r}",
            )
        await self.call("create_bucket", {"bucket": ctx.bucket, "account": ctx.account})
        return web.Response(headers={"Location": f"/{ctx.bucket}"})

    async def list_objects(self, ctx: _Ctx) -> web.Response:
        q = ctx.query
        v2 = q.get("list-type") == "2"
        try:
            max_keys = int(q.get("max-keys", s3.MAX_LIST_KEYS))
        except ValueError:
            raise S3Error("InvalidArgument", "max-keys must be an integer") from None
        if max_keys < 0:
            raise S3Error("InvalidArgument", "max-keys must be >= 0")
        encoding = q.get("encoding-type") or None
        if encoding not in (None, "url"):
            raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request")
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        token = q.get("continuation-token") if v2 else None
        start_after = q.get("start-after", "") if v2 else ""
        marker = q.get("marker", "") if not v2 else ""
        after = s3.decode_token(token) if token else (start_after if v2 else marker)
        page_doc = await self.call(
            "list_objects",
            {
                "bucket": ctx.bucket,
                "account": ctx.account,
                "prefix": prefix,
                "delimiter": delimiter,
                "max_keys": min(max_keys, s3.MAX_LIST_KEYS),
                "after": after,
            },
        )
        page = s3.Listing(
            contents=page_doc["contents"],
            prefixes=page_doc["prefixes"],
            truncated=page_doc["truncated"],
            last=page_doc["last"],
        )
        if not v2 and page.truncated and not delimiter and page.contents:
            page.last = str(page.contents[-1]["key"])
        return _xml(
            s3.list_objects_xml(
                ctx.bucket,
                page,
                v2=v2,
                prefix=prefix,
                delimiter=delimiter,
                max_keys=max_keys,
                encoding=encoding,
                owner=ctx.account,
                start_after=start_after,
                token=token,
                marker=marker,
                fetch_owner=q.get("fetch-owner") == "true",
            )
        )

    async def delete_objects(self, ctx: _Ctx) -> web.Response:
        body = await self._small_body(ctx)
        if "Content-MD5" not in ctx.request.headers and not any(
            h.lower().startswith("x-amz-checksum-") for h in ctx.request.headers
        ):
            raise S3Error("InvalidRequest", "Missing required header for this request: Content-MD5")
        keys, quiet = s3.parse_delete(body)
        res = await self.call("delete_objects", {"bucket": ctx.bucket, "account": ctx.account, "keys": keys})
        return _xml(s3.delete_result_xml(res["deleted"], [tuple(e) for e in res["errors"]], quiet))

    # ------------------------------------------------------------------ objects: writes

    def _put_fields(self, ctx: _Ctx) -> dict[str, Any]:
        r = ctx.request
        fields: dict[str, Any] = {"bucket": ctx.bucket, "key": ctx.key, "account": ctx.account}
        s3.check_key(ctx.key)
        if "Content-MD5" in r.headers:
            fields["md5"] = s3.content_md5(r.headers["Content-MD5"])
        declared = ctx.parsed.content_sha256 if ctx.parsed else None
        if declared is not None and len(declared) == 64 and declared not in (UNSIGNED_PAYLOAD,):
            fields["sha256"] = declared.lower()
        if "x-amz-checksum-crc32" in r.headers:
            fields["crc32"] = s3.crc32_header(r.headers["x-amz-checksum-crc32"])
        fields["content_type"] = r.headers.get("Content-Type")
        fields["meta"] = _meta(r)
        fields["headers"] = _std_headers(r)
        if "uploadId" in ctx.query:
            try:
                number = int(ctx.query.get("partNumber", ""))
            except ValueError:
                raise S3Error(
                    "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive"
                ) from None
            if not 1 <= number <= s3.MAX_PART_NUMBER:
                raise S3Error(
                    "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive"
                )
            fields["upload_id"] = ctx.query["uploadId"]
            fields["part_number"] = number
        return fields

    def _declared_length(self, ctx: _Ctx) -> int | None:
        r = ctx.request
        if self._streaming(ctx):
            dec = r.headers.get("x-amz-decoded-content-length")
            if dec is None:
                raise S3Error(
                    "MissingContentLength", "You must provide the x-amz-decoded-content-length HTTP header."
                )
            try:
                return int(dec)
            except ValueError:
                raise S3Error("InvalidArgument", "x-amz-decoded-content-length must be an integer") from None
        if r.content_length is None and "chunked" not in r.headers.get("Transfer-Encoding", "").lower():
            raise S3Error("MissingContentLength", "You must provide the Content-Length HTTP header.")
        return r.content_length

    async def put_object(self, ctx: _Ctx) -> web.Response:
        fields = self._put_fields(ctx)
        length = self._declared_length(ctx)
        if length is not None:
            fields["size"] = length
        trailer: dict[str, str] = {}
        pieces = self._body(ctx, trailer)
        buf = bytearray()
        session: str | None = None
        offset = 0
        try:
            async for piece in pieces:
                buf += piece
                while len(buf) >= CHUNK and (session is not None or length is None or length > CHUNK):
                    if session is None:
                        session = (await self.call("put_begin", fields))["session"]
                    chunk, buf = bytes(buf[:CHUNK]), buf[CHUNK:]
                    await self.call("put_data", {"session": session, "offset": offset, "data": chunk})
                    offset += len(chunk)
            if "x-amz-checksum-crc32" in trailer:
                fields["crc32"] = s3.crc32_header(trailer["x-amz-checksum-crc32"])
            if session is None:
                res = await self.call("put_small", {**fields, "data": bytes(buf)})
            else:
                if buf:
                    await self.call("put_data", {"session": session, "offset": offset, "data": bytes(buf)})
                res = await self.call("put_commit", {**fields, "session": session})
                session = None
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise S3Error(
                "IncompleteBody",
                f"You did not provide the number of bytes the Content-Length HTTP header said ({exc})",
            ) from None
        finally:
            if session is not None:
                self.node.spawn(self._abort(session))
        headers = {"ETag": s3.quote_etag(str(res["etag"]))}
        if "crc32" in fields and res.get("crc32") is not None:
            headers["x-amz-checksum-crc32"] = s3.crc32_b64(int(res["crc32"]))
        return web.Response(headers=headers)

    async def _abort(self, session: str) -> None:
        try:
            await self.call("put_abort", {"session": session}, timeout=5.0)
        except (RequestError, ServiceUnavailable):
            pass

    async def copy_object(self, ctx: _Ctx) -> web.Response:
        r = ctx.request
        src = unquote(r.headers["x-amz-copy-source"].split("?", 1)[0])
        src = src[1:] if src.startswith("/") else src
        src_bucket, _, src_key = src.partition("/")
        if not src_bucket or not src_key:
            raise S3Error(
                "InvalidArgument",
                "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            )
        directive = r.headers.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "Unknown metadata directive.")
        s3.check_key(ctx.key)
        res = await self.call(
            "copy_object",
            {
                "bucket": ctx.bucket,
                "key": ctx.key,
                "account": ctx.account,
                "src_bucket": src_bucket,
                "src_key": src_key,
                "directive": directive,
                "content_type": r.headers.get("Content-Type"),
                "meta": _meta(r),
                "headers": _std_headers(r),
            },
        )
        return _xml(s3.copy_result_xml(str(res["etag"]), float(res["last_modified"])))

    async def create_multipart(self, ctx: _Ctx) -> web.Response:
        r = ctx.request
        s3.check_key(ctx.key)
        res = await self.call(
            "create_multipart",
            {
                "bucket": ctx.bucket,
                "key": ctx.key,
                "account": ctx.account,
                "content_type": r.headers.get("Content-Type"),
                "meta": _meta(r),
                "headers": _std_headers(r),
            },
        )
        return _xml(s3.initiate_multipart_xml(ctx.bucket, ctx.key, str(res["upload_id"])))

    async def complete_multipart(self, ctx: _Ctx) -> web.Response:
        parts = s3.parse_complete(await self._small_body(ctx))
        res = await self.call(
            "complete_multipart",
            {
                "bucket": ctx.bucket,
                "key": ctx.key,
                "account": ctx.account,
                "upload_id": ctx.query["uploadId"],
                "parts": [list(p) for p in parts],
                "request_id": ctx.rid,
            },
        )
        location = f"http://{ctx.request.host}/{ctx.bucket}/{ctx.key}"
        return _xml(s3.complete_multipart_xml(location, ctx.bucket, ctx.key, str(res["etag"])))

    async def list_parts(self, ctx: _Ctx) -> web.Response:
        q = ctx.query
        try:
            marker = int(q.get("part-number-marker", "0") or 0)
            max_parts = int(q.get("max-parts", "1000") or 1000)
        except ValueError:
            raise S3Error("InvalidArgument", "part-number-marker and max-parts must be integers") from None
        res = await self.call(
            "list_parts",
            {
                "bucket": ctx.bucket,
                "key": ctx.key,
                "account": ctx.account,
                "upload_id": q["uploadId"],
                "marker": marker,
                "max_parts": max_parts,
            },
        )
        return _xml(
            s3.list_parts_xml(
                ctx.bucket,
                ctx.key,
                q["uploadId"],
                res["parts"],
                marker=marker,
                max_parts=max_parts,
                truncated=bool(res["truncated"]),
                owner=str(res["owner"]),
            )
        )

    # ------------------------------------------------------------------ objects: reads

    async def get_object(self, ctx: _Ctx, *, head: bool) -> web.StreamResponse:
        r = ctx.request
        if "partNumber" in ctx.query:
            raise S3Error("NotImplemented", "GetObject with partNumber is not implemented")
        body = {"bucket": ctx.bucket, "key": ctx.key, "account": ctx.account, "range": r.headers.get("Range")}
        doc = await self.call("head_object" if head else "get_object", body)
        etag = str(doc["etag"])
        if_match = r.headers.get("If-Match")
        if if_match is not None and s3.unquote_etag(if_match) not in (etag, "*"):
            raise S3Error(
                "PreconditionFailed",
                "At least one of the pre-conditions you specified did not hold",
                Condition="If-Match",
            )
        if_none = r.headers.get("If-None-Match")
        headers = _object_headers(doc)
        if if_none is not None and s3.unquote_etag(if_none) in (etag, "*"):
            return web.Response(
                status=304, headers={"ETag": headers["ETag"], "Last-Modified": headers["Last-Modified"]}
            )
        size = int(doc["size"])
        rng = doc.get("range")
        status = 200
        first, last = 0, size - 1
        if rng is not None:
            first, last = int(rng[0]), int(rng[1])
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        length = max(0, last - first + 1)
        headers["Content-Length"] = str(length)
        if head:
            return web.Response(status=status, headers=headers)
        ctype = headers.pop("Content-Type")
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = ctype
        resp.content_length = length
        await resp.prepare(r)
        if length == 0:
            await resp.write_eof()
            return resp
        if doc.get("data") is not None:
            await resp.write(doc["data"])
        else:
            segments = [(str(b), int(n)) for b, n in doc["segments"]]
            for blob_id, off, n in s3.plan_reads(segments, first, last, CHUNK):
                try:
                    data = await self.call("read", {"blob_id": blob_id, "offset": off, "length": n})
                except (RequestError, ServiceUnavailable) as exc:
                    log.error("read from walrus failed", extra={"blob": blob_id, "reason": str(exc)})
                    raise ConnectionResetError("object bytes unavailable mid-response") from None
                if not isinstance(data, bytes) or len(data) != n:
                    log.error(
                        "short read from walrus",
                        extra={"blob": blob_id, "offset": off, "node": self.node.name},
                    )
                    raise ConnectionResetError("object bytes unavailable mid-response")
                await resp.write(data)
        await resp.write_eof()
        return resp


def make_s3_app(node: Node) -> web.Application:
    """The S3 REST API of one process (mounted by the node on ``api.s3``)."""
    front = S3Frontend(node)
    app = web.Application(client_max_size=MAX_XML_BODY)
    app.router.add_route("*", "/{path:.*}", front.handle)
    return app


__all__ = ["S3Frontend", "endpoint_hosts", "make_s3_app", "route"]
