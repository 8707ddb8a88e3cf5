"""S3 semantics without I/O: names, ETags, ranges, listings, errors and XML documents.

Everything here is pure (no clock, no disk, no network) and unit-tested on its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any
from xml.etree import ElementTree as ET

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_KEY_BYTES = 1024
MAX_META_BYTES = 2048
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_NUMBER = 10_000
MAX_LIST_KEYS = 1000
MAX_DELETE_KEYS = 1000

# code -> HTTP status (the codes S3 clients know; see the S3 API reference, "Error responses")
ERROR_STATUS: dict[str, int] = {
    "AccessDenied": 403,
    "BadDigest": 400,
    "BucketAlreadyExists": 409,
    "BucketAlreadyOwnedByYou": 409,
    "BucketNotEmpty": 409,
    "EntityTooLarge": 400,
    "EntityTooSmall": 400,
    "IncompleteBody": 400,
    "InternalError": 500,
    "InvalidAccessKeyId": 403,
    "InvalidArgument": 400,
    "InvalidBucketName": 400,
    "InvalidDigest": 400,
    "InvalidPart": 400,
    "InvalidPartOrder": 400,
    "InvalidRange": 416,
    "InvalidRequest": 400,
    "KeyTooLongError": 400,
    "MalformedXML": 400,
    "MetadataTooLarge": 400,
    "MethodNotAllowed": 405,
    "MissingContentLength": 411,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchUpload": 404,
    "NotImplemented": 501,
    "PreconditionFailed": 412,
    "RequestTimeTooSkewed": 403,
    "ServiceUnavailable": 503,
    "SignatureDoesNotMatch": 403,
    "SlowDown": 503,
    "XAmzContentSHA256Mismatch": 400,
    "AuthorizationHeaderMalformed": 400,
    "AuthorizationQueryParametersError": 400,
    "MissingSecurityHeader": 400,
    "ExpiredToken": 400,
}


class S3Error(Exception):
    """An S3 error response: code, message, HTTP status and extra XML fields."""

    def __init__(self, code: str, message: str, status: int | None = None, **extra: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else ERROR_STATUS.get(code, 400)
        self.extra = extra


def error_from_text(text: str, default: str = "InternalError") -> S3Error:
    """An S3Error from ``"Code: message"`` (what the appliers and handlers raise), else `default`."""
    for part in text.split(": "):
        if part in ERROR_STATUS:
            return S3Error(part, text.split(f"{part}: ", 1)[-1])
    return S3Error(default, text)


# --------------------------------------------------------------------------- names


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_bucket_name(name: str) -> str:
    """`name` if it is a valid bucket name (S3's rules for new buckets), else InvalidBucketName."""
    bad = S3Error("InvalidBucketName", f"The specified bucket is not valid: {name!r}", BucketName=name)
    if not _BUCKET_RE.fullmatch(name) or ".." in name or ".-" in name or "-." in name:
        raise bad
    with_dots = name.split(".")
    if len(with_dots) == 4 and all(p.isdigit() for p in with_dots):
        raise bad  # looks like an IP address
    if name.startswith("xn--") or name.endswith("-s3alias") or name.startswith("sthree-"):
        raise bad
    return name


def check_key(key: str) -> str:
    if not key:
        raise S3Error("InvalidArgument", "the object key must not be empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise S3Error("KeyTooLongError", f"the key is longer than {MAX_KEY_BYTES} bytes")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise S3Error("InvalidArgument", "the object key is not valid UTF-8") from None
    return key


def split_host(host: str) -> str:
    """The host name of a Host header, without the port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def virtual_host_bucket(host_header: str, endpoint_hosts: Iterable[str]) -> str | None:
    """The bucket of a virtual-hosted-style request, or None for a path-style one.

    ``Host: photos.s3.example.com`` with endpoint host ``s3.example.com`` names bucket
    ``photos``. A Host that is an endpoint host itself or an IP address is path-style.
    """
    host = split_host(host_header)
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    for ep in endpoint_hosts:
        ep = ep.lower()
        if host == ep:
            return None
        if host.endswith("." + ep):
            bucket = host[: -len(ep) - 1]
            return bucket or None
    return None


# --------------------------------------------------------------------------- digests


def content_md5(header: str) -> str:
    """The hex MD5 of a Content-MD5 header (base64 of 16 bytes), else InvalidDigest."""
    try:
        raw = base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise S3Error("InvalidDigest", "The Content-MD5 you specified is not valid.")
    return raw.hex()


def crc32_header(header: str) -> int:
    """The CRC32 of an x-amz-checksum-crc32 header (base64 of 4 big-endian bytes)."""
    try:
        raw = base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 4:
        raise S3Error("InvalidRequest", "Value for x-amz-checksum-crc32 header is invalid.")
    return int.from_bytes(raw, "big")


def crc32_b64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def multipart_etag(part_md5s: Sequence[str]) -> str:
    """S3's ETag of a multipart object: md5 of the concatenated part MD5s, then ``-N``."""
    h = hashlib.md5()
    for m in part_md5s:
        h.update(bytes.fromhex(m))
    return f"{h.hexdigest()}-{len(part_md5s)}"


def quote_etag(etag: str) -> str:
    return f'"{etag}"'


def unquote_etag(etag: str) -> str:
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"')


# --------------------------------------------------------------------------- ranges


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a ``Range: bytes=...`` header, None for the whole object.

    An unsatisfiable range raises InvalidRange; a malformed one (or several ranges) is
    ignored, as S3 does.
    """
    if not header:
        return None
    header = header.strip()
    if not header.startswith("bytes=") or "," in header:
        return None
    spec = header[6:].strip()
    first_s, sep, last_s = spec.partition("-")
    if not sep:
        return None
    try:
        if first_s == "":
            n = int(last_s)
            if n <= 0:
                raise S3Error(
                    "InvalidRange", "The requested range is not satisfiable", ActualObjectSize=str(size)
                )
            if size == 0:
                raise S3Error("InvalidRange", "The requested range is not satisfiable", ActualObjectSize="0")
            return max(0, size - n), size - 1
        first = int(first_s)
        last = int(last_s) if last_s else size - 1
    except ValueError:
        return None
    if first < 0 or (last_s and last < first):
        return None
    if first >= size:
        raise S3Error("InvalidRange", "The requested range is not satisfiable", ActualObjectSize=str(size))
    return first, min(last, size - 1)


def plan_reads(
    segments: Sequence[tuple[str, int]], first: int, last: int, chunk: int
) -> list[tuple[str, int, int]]:
    """The (blob_id, offset, length) reads, each at most `chunk` bytes, covering [first, last]."""
    out: list[tuple[str, int, int]] = []
    pos = 0
    for blob_id, size in segments:
        seg_first, seg_last = pos, pos + size - 1
        pos += size
        lo, hi = max(first, seg_first), min(last, seg_last)
        if lo > hi:
            continue
        off = lo - seg_first
        end = hi - seg_first + 1
        while off < end:
            n = min(chunk, end - off)
            out.append((blob_id, off, n))
            off += n
    return out


# --------------------------------------------------------------------------- listing


@dataclass
class Listing:
    contents: list[Mapping[str, Any]] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    truncated: bool = False
    last: str | None = None
    """The last key or common prefix returned (the continuation point)."""


def next_prefix(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (None: none)."""
    chars = list(prefix)
    while chars:
        c = ord(chars[-1])
        if c < 0x10FFFF:
            nxt = c + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            chars[-1] = chr(nxt)
            return "".join(chars)
        chars.pop()
    return None


def list_keys(
    fetch: Callable[[str, bool, str | None, int], Sequence[Mapping[str, Any]]],
    *,
    prefix: str = "",
    delimiter: str = "",
    after: str = "",
    max_keys: int = MAX_LIST_KEYS,
    batch: int = 1000,
) -> Listing:
    """A ListObjects page over keys in byte order.

    ``fetch(start, inclusive, stop, limit)`` returns up to `limit` rows (with "key") whose key
    is >= (or >) `start` and < `stop` (None: no bound), in key order. Keys not starting with
    `prefix` are never returned; with a `delimiter`, keys sharing the part of the key after
    the prefix up to the delimiter roll up into one common prefix (which counts as one key).
    Listing starts after the key or common prefix `after`.
    """
    out = Listing()
    if max_keys <= 0:
        return out
    stop = next_prefix(prefix) if prefix else None
    start, inclusive = (after, False) if after and after >= prefix else (prefix, True)
    if after and stop is not None and after >= stop:
        return out
    count = 0
    while True:
        rows = fetch(start, inclusive, stop, batch)
        if not rows:
            return out
        jumped = False
        for row in rows:
            key = str(row["key"])
            if not key.startswith(prefix):
                continue
            pos = key.find(delimiter, len(prefix)) if delimiter else -1
            if pos >= 0:
                cp = key[: pos + len(delimiter)]
                nxt = next_prefix(cp)
                if not (after and cp <= after):  # else: resumed inside a prefix already returned
                    if count >= max_keys:
                        out.truncated = True
                        return out
                    out.prefixes.append(cp)
                    out.last = cp
                    count += 1
                if nxt is None:
                    return out
                start, inclusive, jumped = nxt, True, True
                break
            if count >= max_keys:
                out.truncated = True
                return out
            out.contents.append(row)
            out.last = key
            count += 1
            start, inclusive = key, False
        if not jumped and len(rows) < batch:
            return out


def encode_token(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode("utf-8", "surrogatepass")).decode()


def decode_token(token: str) -> str:
    try:
        raw = base64.b64decode(token.encode(), altchars=b"-_", validate=True)
        return raw.decode("utf-8", "surrogatepass")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise S3Error("InvalidArgument", "The continuation token provided is incorrect") from None


# --------------------------------------------------------------------------- XML


def iso8601(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ts * 1000) % 1000:03d}Z"


def http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def _el(parent: ET.Element, tag: str, text: Any = None) -> ET.Element:
    e = ET.SubElement(parent, tag)
    if text is not None:
        e.text = str(text)
    return e


def to_xml(root: ET.Element) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


def error_xml(err: S3Error, resource: str, request_id: str) -> bytes:
    root = ET.Element("Error")
    _el(root, "Code", err.code)
    _el(root, "Message", err.message)
    for k, v in err.extra.items():
        _el(root, k, v)
    _el(root, "Resource", resource)
    _el(root, "RequestId", request_id)
    return to_xml(root)


def _owner(parent: ET.Element, owner: str) -> None:
    o = _el(parent, "Owner")
    _el(o, "ID", owner)
    _el(o, "DisplayName", owner)


def list_buckets_xml(owner: str, buckets: Iterable[Mapping[str, Any]]) -> bytes:
    root = ET.Element("ListAllMyBucketsResult", xmlns=S3_NS)
    _owner(root, owner)
    bs = _el(root, "Buckets")
    for b in buckets:
        e = _el(bs, "Bucket")
        _el(e, "Name", b["name"])
        _el(e, "CreationDate", iso8601(float(b["created"])))
    return to_xml(root)


def _enc(value: str, encoding: str | None) -> str:
    if encoding == "url":
        from urllib.parse import quote

        return quote(value, safe="/")
    return value


def list_objects_xml(
    bucket: str,
    page: Listing,
    *,
    v2: bool,
    prefix: str,
    delimiter: str,
    max_keys: int,
    encoding: str | None,
    owner: str,
    start_after: str = "",
    token: str | None = None,
    marker: str = "",
    fetch_owner: bool = False,
) -> bytes:
    root = ET.Element("ListBucketResult", xmlns=S3_NS)
    _el(root, "Name", bucket)
    _el(root, "Prefix", _enc(prefix, encoding))
    if v2:
        if start_after:
            _el(root, "StartAfter", _enc(start_after, encoding))
        if token is not None:
            _el(root, "ContinuationToken", token)
        _el(root, "KeyCount", len(page.contents) + len(page.prefixes))
    else:
        _el(root, "Marker", _enc(marker, encoding))
    _el(root, "MaxKeys", max_keys)
    if delimiter:
        _el(root, "Delimiter", _enc(delimiter, encoding))
    if encoding:
        _el(root, "EncodingType", encoding)
    _el(root, "IsTruncated", "true" if page.truncated else "false")
    if page.truncated and page.last is not None:
        if v2:
            _el(root, "NextContinuationToken", encode_token(page.last))
        elif delimiter:
            _el(root, "NextMarker", _enc(page.last, encoding))
    for row in page.contents:
        c = _el(root, "Contents")
        _el(c, "Key", _enc(str(row["key"]), encoding))
        _el(c, "LastModified", iso8601(float(row["last_modified"])))
        _el(c, "ETag", quote_etag(str(row["etag"])))
        _el(c, "Size", row["size"])
        _el(c, "StorageClass", "STANDARD")
        if not v2 or fetch_owner:
            _owner(c, owner)
    for p in page.prefixes:
        cp = _el(root, "CommonPrefixes")
        _el(cp, "Prefix", _enc(p, encoding))
    return to_xml(root)


def copy_result_xml(etag: str, last_modified: float, *, part: bool = False) -> bytes:
    root = ET.Element("CopyPartResult" if part else "CopyObjectResult", xmlns=S3_NS)
    _el(root, "LastModified", iso8601(last_modified))
    _el(root, "ETag", quote_etag(etag))
    return to_xml(root)


def initiate_multipart_xml(bucket: str, key: str, upload_id: str) -> bytes:
    root = ET.Element("InitiateMultipartUploadResult", xmlns=S3_NS)
    _el(root, "Bucket", bucket)
    _el(root, "Key", key)
    _el(root, "UploadId", upload_id)
    return to_xml(root)


def complete_multipart_xml(location: str, bucket: str, key: str, etag: str) -> bytes:
    root = ET.Element("CompleteMultipartUploadResult", xmlns=S3_NS)
    _el(root, "Location", location)
    _el(root, "Bucket", bucket)
    _el(root, "Key", key)
    _el(root, "ETag", quote_etag(etag))
    return to_xml(root)


def list_parts_xml(
    bucket: str,
    key: str,
    upload_id: str,
    parts: Sequence[Mapping[str, Any]],
    *,
    marker: int,
    max_parts: int,
    truncated: bool,
    owner: str,
) -> bytes:
    root = ET.Element("ListPartsResult", xmlns=S3_NS)
    _el(root, "Bucket", bucket)
    _el(root, "Key", key)
    _el(root, "UploadId", upload_id)
    _owner(root, owner)
    initiator = _el(root, "Initiator")
    _el(initiator, "ID", owner)
    _el(initiator, "DisplayName", owner)
    _el(root, "StorageClass", "STANDARD")
    _el(root, "PartNumberMarker", marker)
    if parts:
        _el(root, "NextPartNumberMarker", parts[-1]["part_number"])
    _el(root, "MaxParts", max_parts)
    _el(root, "IsTruncated", "true" if truncated else "false")
    for p in parts:
        e = _el(root, "Part")
        _el(e, "PartNumber", p["part_number"])
        _el(e, "LastModified", iso8601(float(p["last_modified"])))
        _el(e, "ETag", quote_etag(str(p["etag"])))
        _el(e, "Size", p["size"])
    return to_xml(root)


def delete_result_xml(deleted: Sequence[str], errors: Sequence[tuple[str, str, str]], quiet: bool) -> bytes:
    root = ET.Element("DeleteResult", xmlns=S3_NS)
    if not quiet:
        for key in deleted:
            d = _el(root, "Deleted")
            _el(d, "Key", key)
    for key, code, message in errors:
        e = _el(root, "Error")
        _el(e, "Key", key)
        _el(e, "Code", code)
        _el(e, "Message", message)
    return to_xml(root)


def location_xml(region: str) -> bytes:
    root = ET.Element("LocationConstraint", xmlns=S3_NS)
    if region != "us-east-1":
        root.text = region
    return to_xml(root)


def _strip_ns(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_xml(body: bytes) -> ET.Element:
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise S3Error("MalformedXML", "XML with a DTD is not accepted")
    try:
        return ET.fromstring(body)
    except ET.ParseError:
        raise S3Error(
            "MalformedXML",
            "The XML you provided was not well-formed or did not validate against our published schema",
        ) from None


def parse_delete(body: bytes) -> tuple[list[str], bool]:
    """(keys, quiet) of a DeleteObjects request body."""
    root = parse_xml(body)
    if _strip_ns(root.tag) != "Delete":
        raise S3Error("MalformedXML", "expected a <Delete> document")
    keys: list[str] = []
    quiet = False
    for child in root:
        tag = _strip_ns(child.tag)
        if tag == "Quiet":
            quiet = (child.text or "").strip().lower() == "true"
        elif tag == "Object":
            key = next((c.text or "" for c in child if _strip_ns(c.tag) == "Key"), None)
            if key is None:
                raise S3Error("MalformedXML", "an <Object> without a <Key>")
            keys.append(key)
    if not keys:
        raise S3Error("MalformedXML", "no objects to delete")
    if len(keys) > MAX_DELETE_KEYS:
        raise S3Error("MalformedXML", f"at most {MAX_DELETE_KEYS} keys per request")
    return keys, quiet


def parse_complete(body: bytes) -> list[tuple[int, str]]:
    """[(part_number, etag)] of a CompleteMultipartUpload body."""
    root = parse_xml(body)
    if _strip_ns(root.tag) != "CompleteMultipartUpload":
        raise S3Error("MalformedXML", "expected a <CompleteMultipartUpload> document")
    parts: list[tuple[int, str]] = []
    for child in root:
        if _strip_ns(child.tag) != "Part":
            continue
        number = etag = None
        for c in child:
            t = _strip_ns(c.tag)
            if t == "PartNumber":
                number = (c.text or "").strip()
            elif t == "ETag":
                etag = c.text or ""
        if number is None or etag is None or not number.isdigit():
            raise S3Error("MalformedXML", "each <Part> needs a <PartNumber> and an <ETag>")
        parts.append((int(number), unquote_etag(etag)))
    if not parts:
        raise S3Error("MalformedXML", "no parts listed")
    return parts


def parse_create_bucket(body: bytes) -> str | None:
    """The LocationConstraint of a CreateBucket body (None if absent or empty)."""
    if not body.strip():
        return None
    root = parse_xml(body)
    for child in root.iter():
        if _strip_ns(child.tag) == "LocationConstraint":
            return (child.text or "").strip() or None
    return None
