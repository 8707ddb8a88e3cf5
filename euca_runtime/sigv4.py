"""AWS Signature Version 4 verification, pure and deterministic (no I/O, injectable clock).

Two forms are accepted, as AWS services accept them:

- **header form**: ``Authorization: AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/iam/aws4_request,
  SignedHeaders=host;x-amz-date, Signature=<hex>`` with ``X-Amz-Date`` (or ``Date``) and, for S3,
  ``X-Amz-Content-Sha256`` (a hex SHA-256 of the body, ``UNSIGNED-PAYLOAD``, or one of the
  ``STREAMING-...`` literals);
- **presigned URL** (query form): ``X-Amz-Algorithm``, ``X-Amz-Credential``, ``X-Amz-Date``,
  ``X-Amz-Expires`` (1 s .. 7 days), ``X-Amz-SignedHeaders``, ``X-Amz-Signature``.

Use::

    parsed = parse_request(method, raw_path, raw_query, headers, now)   # AuthError if malformed/skewed
    secret = ...look up parsed.access_key...                            # AuthError("unknown_key") if none
    check_signature(parsed, secret, payload_sha256)                     # AuthError("signature_mismatch")

`raw_path` and `raw_query` are exactly as they came on the request line (still percent-encoded).
Canonicalisation follows the AWS spec and botocore (which signs every boto3/AWS CLI request):
the query string is decoded and re-encoded (RFC 3986 unreserved characters kept), parameters
sorted; the path is used once-encoded for S3 (``service == "s3"``, no dot-segment removal) and
encoded twice after removing dot segments for every other service.

``payload_sha256`` is the hex SHA-256 of the body the server received. When the request declared
``X-Amz-Content-Sha256`` (`ParsedAuth.content_sha256`), the declared value is what was signed: a
hex declaration must equal `payload_sha256` (else ``AuthError("payload_mismatch")``); a service
that streams the body (S3 PUT) may pass ``parsed.content_sha256`` itself to check the signature
before reading the body and compare the digest at the end. ``UNSIGNED-PAYLOAD`` and
``STREAMING-UNSIGNED-PAYLOAD-TRAILER`` sign no body. ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``
(aws-chunked with per-chunk signatures) is verified chunk by chunk with `ChunkSigner`.

Clock skew: a header-signed request dated more than `max_skew` (15 minutes) from ``now`` is
refused (``skewed``); a presigned URL is refused after ``X-Amz-Date + X-Amz-Expires``
(``expired``) or when dated more than `max_skew` in the future (``skewed``).

`s3_error` and `query_error` map an `AuthError` to the (HTTP status, AWS error code, message) that
S3 clients and Query-API (IAM, EC2) clients expect.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_PAYLOAD = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_PAYLOAD_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
DEFAULT_MAX_SKEW = timedelta(minutes=15)
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600

_LITERAL_PAYLOADS = frozenset(
    {UNSIGNED_PAYLOAD, STREAMING_PAYLOAD, STREAMING_PAYLOAD_TRAILER, STREAMING_UNSIGNED_TRAILER}
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_ACCESS_KEY = re.compile(r"[A-Za-z0-9_+=,.@-]{1,128}")

KINDS = (
    "missing",
    "malformed",
    "unknown_key",
    "inactive_key",
    "signature_mismatch",
    "expired",
    "skewed",
    "payload_mismatch",
    "unsupported",
)


class AuthError(Exception):
    """A request that does not authenticate. `kind` is one of `KINDS`; `presigned` its form."""

    def __init__(self, kind: str, message: str, *, presigned: bool = False) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown AuthError kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.presigned = presigned


@dataclass(frozen=True)
class ParsedAuth:
    """Everything needed to check one request's signature (no secret in here)."""

    access_key: str
    date: str
    """The credential scope's date, ``YYYYMMDD``."""
    region: str
    service: str
    timestamp: str
    """The request time as signed, ``YYYYMMDDTHHMMSSZ``."""
    signed_headers: tuple[str, ...]
    signature: str
    presigned: bool
    method: str
    canonical_uri: str
    canonical_query: str
    canonical_headers: str
    content_sha256: str | None
    """The declared ``X-Amz-Content-Sha256`` (``UNSIGNED-PAYLOAD`` for S3 presigned URLs), or None."""
    expires: int | None = None
    """Presigned URLs: ``X-Amz-Expires`` in seconds."""

    @property
    def scope(self) -> str:
        """The credential scope ``date/region/service/aws4_request``."""
        return f"{self.date}/{self.region}/{self.service}/aws4_request"

    @property
    def streaming(self) -> bool:
        """True for aws-chunked bodies with per-chunk signatures (see `ChunkSigner`)."""
        return self.content_sha256 in (STREAMING_PAYLOAD, STREAMING_PAYLOAD_TRAILER)

    def canonical_request(self, payload_sha256: str) -> str:
        """The canonical request, with `payload_sha256` as its last line."""
        return "\n".join(
            [
                self.method,
                self.canonical_uri,
                self.canonical_query,
                self.canonical_headers + "\n",
                ";".join(self.signed_headers),
                payload_sha256,
            ]
        )

    def string_to_sign(self, payload_sha256: str) -> str:
        """The string to sign for `payload_sha256` (see `canonical_request`)."""
        digest = hashlib.sha256(self.canonical_request(payload_sha256).encode()).hexdigest()
        return f"{ALGORITHM}\n{self.timestamp}\n{self.scope}\n{digest}"


# --------------------------------------------------------------------------- encoding


def uri_encode(value: str, *, keep_slash: bool = False) -> str:
    """AWS URI encoding: every byte but ``A-Za-z0-9-_.~`` (and ``/`` if asked) as ``%XX``."""
    return quote(value, safe="/~" if keep_slash else "~")


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 section 5.2.4, as botocore.utils.remove_dot_segments does (empty segments dropped).
    if not path:
        return ""
    output: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if output:
                output.pop()
        else:
            output.append(segment)
    first = "/" if path[0] == "/" else ""
    last = "/" if path[-1] == "/" and output else ""
    return first + "/".join(output) + last


def canonical_uri(raw_path: str, service: str) -> str:
    """The canonical URI of `raw_path` (percent-encoded, as sent) for `service`."""
    path = raw_path or "/"
    if service == "s3":
        # Segment by segment, so that an encoded slash (%2F) inside a key stays encoded.
        return "/".join(uri_encode(unquote(segment)) for segment in path.split("/"))
    normalized = _remove_dot_segments(path) or "/"
    return uri_encode(normalized, keep_slash=True)


def _query_pairs(raw_query: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    if not raw_query:
        return pairs
    for part in raw_query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        pairs.append((unquote(key), unquote(value)))
    return pairs


def canonical_query(pairs: list[tuple[str, str]], *, exclude: str | None = None) -> str:
    """Sorted ``key=value`` pairs, both URI-encoded, joined with ``&``."""
    encoded = sorted((uri_encode(k), uri_encode(v)) for k, v in pairs if k != exclude)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _header_values(headers: Mapping[str, str], name: str) -> list[str] | None:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values = list(getall(name, []))
        return values or None
    for k, v in headers.items():
        if k.lower() == name:
            return [v]
    return None


def _trim(value: str) -> str:
    return " ".join(value.split())


# --------------------------------------------------------------------------- parsing


def _parse_credential(value: str, presigned: bool) -> tuple[str, str, str, str]:
    parts = value.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise AuthError(
            "malformed",
            f"credential must be AKID/YYYYMMDD/region/service/aws4_request, got {value!r}",
            presigned=presigned,
        )
    access_key, date, region, service, _ = parts
    if not _ACCESS_KEY.fullmatch(access_key):
        raise AuthError("malformed", "credential has no valid access key id", presigned=presigned)
    if not re.fullmatch(r"\d{8}", date):
        raise AuthError("malformed", f"credential date must be YYYYMMDD, got {date!r}", presigned=presigned)
    if not region or not service:
        raise AuthError("malformed", "credential scope needs a region and a service", presigned=presigned)
    return access_key, date, region, service


def _parse_authorization(value: str) -> dict[str, str]:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        if algorithm == "AWS":
            raise AuthError("unsupported", "AWS signature version 2 is not supported; sign with SigV4")
        raise AuthError("malformed", f"unsupported authorization algorithm {algorithm!r}")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        key, sep, val = item.strip().partition("=")
        if not sep:
            raise AuthError("malformed", f"authorization header component {item.strip()!r} is not key=value")
        fields[key.strip()] = val.strip()
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if not fields.get(k)]
    if missing:
        raise AuthError("malformed", f"authorization header lacks {', '.join(missing)}")
    return fields


def _parse_time(value: str, presigned: bool) -> datetime:
    try:
        return datetime.strptime(value, _AMZ_DATE).replace(tzinfo=UTC)
    except ValueError:
        raise AuthError(
            "malformed", f"X-Amz-Date must be YYYYMMDDTHHMMSSZ, got {value!r}", presigned=presigned
        ) from None


def _aware(now: datetime) -> datetime:
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def parse_request(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    now: datetime,
    *,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
) -> ParsedAuth:
    """Parse and canonicalise a signed request; raises `AuthError` (missing, malformed, expired, skewed).

    Nothing secret is needed here: the caller then finds the secret of `ParsedAuth.access_key`
    and calls `check_signature`.
    """
    now = _aware(now)
    pairs = _query_pairs(raw_query)
    query = {k: v for k, v in pairs}
    auth_header = _header_values(headers, "authorization")
    presigned = "X-Amz-Signature" in query or "X-Amz-Credential" in query or "X-Amz-Algorithm" in query
    if auth_header and presigned:
        raise AuthError(
            "malformed", "a request must not carry both an Authorization header and X-Amz-Signature"
        )
    expires: int | None = None
    if presigned:
        missing = [
            k
            for k in (
                "X-Amz-Algorithm",
                "X-Amz-Credential",
                "X-Amz-Date",
                "X-Amz-Expires",
                "X-Amz-SignedHeaders",
                "X-Amz-Signature",
            )
            if not query.get(k)
        ]
        if missing:
            raise AuthError("malformed", f"presigned URL lacks {', '.join(missing)}", presigned=True)
        if query["X-Amz-Algorithm"] != ALGORITHM:
            raise AuthError(
                "malformed",
                f"X-Amz-Algorithm must be {ALGORITHM}, got {query['X-Amz-Algorithm']!r}",
                presigned=True,
            )
        credential = query["X-Amz-Credential"]
        signed = query["X-Amz-SignedHeaders"]
        signature = query["X-Amz-Signature"]
        timestamp = query["X-Amz-Date"]
        try:
            expires = int(query["X-Amz-Expires"])
        except ValueError:
            raise AuthError(
                "malformed", "X-Amz-Expires must be a number of seconds", presigned=True
            ) from None
        if not 0 < expires <= MAX_PRESIGN_EXPIRES:
            raise AuthError(
                "malformed",
                f"X-Amz-Expires must be between 1 and {MAX_PRESIGN_EXPIRES} seconds",
                presigned=True,
            )
    else:
        if not auth_header:
            raise AuthError(
                "missing", "the request is not signed (no Authorization header, no X-Amz-Signature)"
            )
        fields = _parse_authorization(auth_header[0])
        credential, signed, signature = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
        amz_date = _header_values(headers, "x-amz-date")
        if amz_date:
            timestamp = amz_date[0].strip()
        else:
            date_header = _header_values(headers, "date")
            if not date_header:
                raise AuthError("malformed", "a signed request needs an X-Amz-Date or Date header")
            try:
                timestamp = _aware(parsedate_to_datetime(date_header[0])).astimezone(UTC).strftime(_AMZ_DATE)
            except (TypeError, ValueError):
                raise AuthError("malformed", f"unreadable Date header {date_header[0]!r}") from None
    access_key, date, region, service = _parse_credential(credential, presigned)
    when = _parse_time(timestamp, presigned)
    if timestamp[:8] != date:
        raise AuthError(
            "malformed",
            f"credential date {date} does not match the request date {timestamp[:8]}",
            presigned=presigned,
        )
    if not re.fullmatch(r"[0-9a-f]{64}", signature):
        raise AuthError("malformed", "the signature must be 64 lowercase hex digits", presigned=presigned)
    signed_headers = tuple(signed.split(";"))
    if list(signed_headers) != sorted(set(signed_headers)) or any(
        not h or h != h.lower() for h in signed_headers
    ):
        raise AuthError(
            "malformed", "SignedHeaders must be sorted, unique, lowercase names", presigned=presigned
        )
    if "host" not in signed_headers:
        raise AuthError("malformed", "the host header must be signed", presigned=presigned)
    lines = []
    for name in signed_headers:
        values = _header_values(headers, name)
        if values is None:
            raise AuthError("malformed", f"signed header {name!r} is not in the request", presigned=presigned)
        lines.append(f"{name}:{','.join(_trim(v) for v in values)}")
    # Time checks come after the syntax checks: a malformed request is reported as malformed.
    if presigned:
        assert expires is not None
        if when - now > max_skew:
            raise AuthError("skewed", "the presigned URL is dated in the future", presigned=True)
        if now > when + timedelta(seconds=expires):
            raise AuthError("expired", "Request has expired", presigned=True)
    elif abs(now - when) > max_skew:
        raise AuthError(
            "skewed",
            f"the request time {timestamp} differs from the server time "
            f"{now.strftime(_AMZ_DATE)} by more than {int(max_skew.total_seconds())} s",
        )
    content: str | None
    declared = _header_values(headers, "x-amz-content-sha256")
    content = declared[0].strip() if declared else None
    if presigned and service == "s3":
        content = UNSIGNED_PAYLOAD  # S3 presigned URLs never sign the body
    elif content is not None and content not in _LITERAL_PAYLOADS and not _HEX64.fullmatch(content):
        raise AuthError(
            "malformed",
            f"X-Amz-Content-Sha256 {content!r} is not a SHA-256 or a known literal",
            presigned=presigned,
        )
    return ParsedAuth(
        access_key=access_key,
        date=date,
        region=region,
        service=service,
        timestamp=timestamp,
        signed_headers=signed_headers,
        signature=signature,
        presigned=presigned,
        method=method.upper(),
        canonical_uri=canonical_uri(raw_path, service),
        canonical_query=canonical_query(pairs, exclude="X-Amz-Signature" if presigned else None),
        canonical_headers="\n".join(lines),
        content_sha256=content,
        expires=expires,
    )


# --------------------------------------------------------------------------- signing


@lru_cache(maxsize=256)
def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """The derived SigV4 signing key for one scope."""
    k = hmac.new(f"AWS4{secret_key}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return k


def sign(key: bytes, string_to_sign: str) -> str:
    """HMAC-SHA256 of `string_to_sign` under `key`, as hex."""
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def expected_signature(parsed: ParsedAuth, secret_key: str, payload_sha256: str) -> str:
    """The signature `parsed` should carry (the signed payload hash chosen as `check_signature` does)."""
    signed_payload = _signed_payload(parsed, payload_sha256)
    key = signing_key(secret_key, parsed.date, parsed.region, parsed.service)
    return sign(key, parsed.string_to_sign(signed_payload))


def _signed_payload(parsed: ParsedAuth, payload_sha256: str) -> str:
    declared = parsed.content_sha256
    if declared is None:
        return payload_sha256
    if declared in _LITERAL_PAYLOADS:
        return declared
    if payload_sha256 != declared:
        raise AuthError(
            "payload_mismatch",
            "the X-Amz-Content-Sha256 header does not match the body received",
            presigned=parsed.presigned,
        )
    return declared


def check_signature(parsed: ParsedAuth, secret_key: str, payload_sha256: str) -> None:
    """Raise `AuthError("signature_mismatch")` unless the request was signed with `secret_key`.

    `payload_sha256`: the hex SHA-256 of the body received (or ``parsed.content_sha256`` to
    trust the declared value while the caller checks the body itself as it streams).
    """
    expected = expected_signature(parsed, secret_key, payload_sha256)
    if not hmac.compare_digest(expected, parsed.signature):
        raise AuthError(
            "signature_mismatch",
            "The request signature we calculated does not match the signature you provided. "
            "Check your key and signing method.",
            presigned=parsed.presigned,
        )


class ChunkSigner:
    """Verifies the per-chunk signatures of an aws-chunked body (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``).

    Create it after `check_signature` succeeded; call `check(chunk_signature, data)` for each
    chunk in order (the last one is empty); with a trailer, `check_trailer(signature, text)`.
    """

    def __init__(self, parsed: ParsedAuth, secret_key: str) -> None:
        if not parsed.streaming:
            raise ValueError("not a streaming (aws-chunked, signed) request")
        self._parsed = parsed
        self._key = signing_key(secret_key, parsed.date, parsed.region, parsed.service)
        self.previous = parsed.signature

    def check(self, chunk_signature: str, data: bytes) -> None:
        """Check one chunk's signature; raises `AuthError("signature_mismatch")`."""
        p = self._parsed
        sts = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                p.timestamp,
                p.scope,
                self.previous,
                EMPTY_SHA256,
                hashlib.sha256(data).hexdigest(),
            ]
        )
        self._compare(chunk_signature, sign(self._key, sts))

    def check_trailer(self, trailer_signature: str, trailer: bytes) -> None:
        """Check the trailing-headers signature (``...-PAYLOAD-TRAILER``)."""
        p = self._parsed
        sts = "\n".join(
            [
                "AWS4-HMAC-SHA256-TRAILER",
                p.timestamp,
                p.scope,
                self.previous,
                hashlib.sha256(trailer).hexdigest(),
            ]
        )
        self._compare(trailer_signature, sign(self._key, sts))

    def _compare(self, given: str, expected: str) -> None:
        if not hmac.compare_digest(given, expected):
            raise AuthError("signature_mismatch", "a chunk signature does not match")
        self.previous = expected


# --------------------------------------------------------------------------- error mapping

_SIG_MESSAGE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)


def s3_error(err: AuthError) -> tuple[int, str, str]:
    """(HTTP status, S3 error code, message) for `err`, as S3 answers."""
    kind = err.kind
    if kind == "missing":
        return 403, "AccessDenied", "Access Denied"
    if kind == "malformed":
        if err.presigned:
            return 400, "AuthorizationQueryParametersError", err.message
        return 400, "AuthorizationHeaderMalformed", err.message
    if kind in ("unknown_key", "inactive_key"):
        return 403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
    if kind == "signature_mismatch":
        return 403, "SignatureDoesNotMatch", _SIG_MESSAGE
    if kind == "expired":
        return 403, "AccessDenied", "Request has expired"
    if kind == "skewed":
        return (
            403,
            "RequestTimeTooSkewed",
            "The difference between the request time and the current time is too large.",
        )
    if kind == "payload_mismatch":
        return (
            400,
            "XAmzContentSHA256Mismatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        )
    return 501, "NotImplemented", err.message


def query_error(err: AuthError) -> tuple[int, str, str]:
    """(HTTP status, error code, message) for `err`, as the Query APIs (IAM, EC2) answer."""
    kind = err.kind
    if kind == "missing":
        return 403, "MissingAuthenticationToken", "Request is missing Authentication Token"
    if kind == "malformed":
        return 400, "IncompleteSignature", err.message
    if kind in ("unknown_key", "inactive_key"):
        return 403, "InvalidClientTokenId", "The security token included in the request is invalid."
    if kind == "signature_mismatch":
        return 403, "SignatureDoesNotMatch", _SIG_MESSAGE
    if kind in ("expired", "skewed"):
        return 400, "RequestExpired", err.message
    if kind == "payload_mismatch":
        return 400, "IncompleteSignature", err.message
    return 400, "InvalidAction", err.message


def payload_hash(body: bytes) -> str:
    """Hex SHA-256 of `body`."""
    return hashlib.sha256(body).hexdigest()


def describe(parsed: ParsedAuth) -> dict[str, Any]:
    """A log-safe summary of `parsed` (no signature)."""
    return {
        "access_key": parsed.access_key,
        "region": parsed.region,
        "service": parsed.service,
        "presigned": parsed.presigned,
    }


__all__ = [
    "ALGORITHM",
    "DEFAULT_MAX_SKEW",
    "EMPTY_SHA256",
    "KINDS",
    "STREAMING_PAYLOAD",
    "STREAMING_PAYLOAD_TRAILER",
    "STREAMING_UNSIGNED_TRAILER",
    "UNSIGNED_PAYLOAD",
    "AuthError",
    "ChunkSigner",
    "ParsedAuth",
    "canonical_query",
    "canonical_uri",
    "check_signature",
    "describe",
    "expected_signature",
    "parse_request",
    "payload_hash",
    "query_error",
    "s3_error",
    "sign",
    "signing_key",
    "uri_encode",
]
