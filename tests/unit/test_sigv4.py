"""SigV4 verification against requests signed by botocore (what boto3 and the AWS CLI send)."""

from __future__ import annotations

import asyncio
import hashlib
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth, SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from euca_runtime.credentials import (
    CredentialKeyError,
    KeyCache,
    SecretBox,
    load_credential_key,
    make_credential_key,
)
from euca_runtime.sigv4 import (
    STREAMING_PAYLOAD,
    UNSIGNED_PAYLOAD,
    AuthError,
    ChunkSigner,
    ParsedAuth,
    check_signature,
    parse_request,
    payload_hash,
    query_error,
    s3_error,
)

AKID = "AKIAEUCATESTKEY00001"
SECRET = "s3cr3t/KEY+with=odd/chars0123456789abcd"
CREDS = Credentials(AKID, SECRET)


def _sign(
    signer_cls: type,
    url: str,
    method: str = "GET",
    body: bytes = b"",
    service: str = "iam",
    headers: dict[str, str] | None = None,
    **kw: object,
) -> AWSRequest:
    req = AWSRequest(method=method, url=url, data=body, headers=headers or {})
    signer_cls(CREDS, service, "eucalyptus", **kw).add_auth(req)
    return req


def _parse(req: AWSRequest, now: datetime | None = None, **kw: object) -> ParsedAuth:
    parts = urlsplit(req.url)
    headers = dict(req.headers.items())
    headers.setdefault("Host", parts.netloc)
    return parse_request(req.method, parts.path, parts.query, headers, now or datetime.now(UTC), **kw)  # type: ignore[arg-type]


def _body(req: AWSRequest) -> bytes:
    body = req.body
    if body is None:
        return b""
    return body if isinstance(body, bytes) else str(body).encode()


def _verify(req: AWSRequest, secret: str = SECRET, now: datetime | None = None) -> ParsedAuth:
    parsed = _parse(req, now)
    check_signature(parsed, secret, payload_hash(_body(req)))
    return parsed


def test_aws_test_suite_get_vanilla() -> None:
    # The AWS SigV4 test suite's "get-vanilla" case (published signature).
    headers = {
        "Host": "example.amazonaws.com",
        "X-Amz-Date": "20150830T123600Z",
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    }
    now = datetime(2015, 8, 30, 12, 36, tzinfo=UTC)
    parsed = parse_request("GET", "/", "", headers, now)
    assert (parsed.access_key, parsed.region, parsed.service) == ("AKIDEXAMPLE", "us-east-1", "service")
    check_signature(parsed, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", payload_hash(b""))
    with pytest.raises(AuthError) as exc:
        check_signature(parsed, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEX", payload_hash(b""))
    assert exc.value.kind == "signature_mismatch"


def test_query_api_post_form_signed_by_botocore() -> None:
    body = b"Action=CreateUser&UserName=alice&Version=2010-05-08"
    req = _sign(
        SigV4Auth,
        "http://127.0.0.11:8773/",
        "POST",
        body,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
    )
    parsed = _verify(req)
    assert parsed.access_key == AKID and parsed.service == "iam" and not parsed.presigned
    with pytest.raises(AuthError) as exc:
        check_signature(parsed, SECRET, payload_hash(body + b"&X=1"))  # body changed in flight
    assert exc.value.kind == "signature_mismatch"
    with pytest.raises(AuthError) as exc:
        check_signature(parsed, SECRET + "x", payload_hash(body))
    assert exc.value.kind == "signature_mismatch"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/bucket/key",
        "/bucket/a%20b/c%2Bd",
        "/b/%E2%9C%93/x~y",
        "/b/key%2Fwith%2Fslashes",
        "/b/a%3Db%26c",
    ],
)
def test_s3_paths_are_not_double_encoded(path: str) -> None:
    req = _sign(S3SigV4Auth, f"http://127.0.0.11:8775{path}", "PUT", b"data", service="s3")
    parsed = _verify(req)
    assert parsed.content_sha256 == hashlib.sha256(b"data").hexdigest()


@pytest.mark.parametrize("path", ["/", "/a/b", "/a%20b/c", "/x/%E2%9C%93"])
def test_other_services_double_encode_the_path(path: str) -> None:
    req = _sign(SigV4Auth, f"http://127.0.0.11:8774{path}?b=2&a=1&a=0&empty=", service="ec2")
    _verify(req)


def test_query_string_canonicalisation() -> None:
    url = "http://h:1/b?list-type=2&prefix=a%20b%2Fc&continuation-token=x%2By%3D&delimiter=%2F&max-keys=5"
    _verify(_sign(S3SigV4Auth, url, service="s3"))


def test_unsigned_payload_header() -> None:
    req = AWSRequest(method="PUT", url="http://h:1/b/k", data=b"whatever")
    req.context["payload_signing_enabled"] = False
    req.headers["X-Amz-Content-SHA256"] = UNSIGNED_PAYLOAD
    SigV4Auth(CREDS, "s3", "eucalyptus").add_auth(req)
    parsed = _parse(req)
    assert parsed.content_sha256 == UNSIGNED_PAYLOAD
    check_signature(parsed, SECRET, payload_hash(b"anything else"))  # the body is not signed


def test_declared_payload_hash_must_match_body() -> None:
    req = _sign(S3SigV4Auth, "http://h:1/b/k", "PUT", b"data", service="s3")
    parsed = _parse(req)
    check_signature(parsed, SECRET, parsed.content_sha256 or "")  # trust the declaration (streaming)
    with pytest.raises(AuthError) as exc:
        check_signature(parsed, SECRET, payload_hash(b"other"))
    assert exc.value.kind == "payload_mismatch"
    assert s3_error(exc.value)[:2] == (400, "XAmzContentSHA256Mismatch")


def test_presigned_s3_url() -> None:
    req = _sign(S3SigV4QueryAuth, "http://127.0.0.11:8775/bucket/my%20key", service="s3", expires=60)
    now = datetime.now(UTC)
    parsed = _verify(req, now=now)
    assert parsed.presigned and parsed.expires == 60 and parsed.content_sha256 == UNSIGNED_PAYLOAD
    with pytest.raises(AuthError) as exc:
        _verify(req, now=now + timedelta(seconds=120))
    assert exc.value.kind == "expired" and exc.value.presigned
    assert s3_error(exc.value) == (403, "AccessDenied", "Request has expired")
    tampered = AWSRequest(method="GET", url=req.url.replace("my%20key", "other"), headers=dict(req.headers))
    with pytest.raises(AuthError) as exc:
        _verify(tampered, now=now)
    assert exc.value.kind == "signature_mismatch"


def test_presigned_query_api_url() -> None:
    req = _sign(SigV4QueryAuth, "http://127.0.0.11:8773/?Action=ListUsers&Version=2010-05-08", expires=30)
    parsed = _verify(req)
    assert parsed.presigned and parsed.content_sha256 is None
    with pytest.raises(AuthError) as exc:
        _verify(req, now=datetime.now(UTC) + timedelta(minutes=1))
    assert query_error(exc.value)[:2] == (400, "RequestExpired")


def test_clock_skew_beyond_15_minutes() -> None:
    req = _sign(SigV4Auth, "http://h:1/")
    now = datetime.now(UTC)
    _verify(req, now=now + timedelta(minutes=14))
    for delta in (timedelta(minutes=16), -timedelta(minutes=16)):
        with pytest.raises(AuthError) as exc:
            _parse(req, now + delta)
        assert exc.value.kind == "skewed"
        assert s3_error(exc.value)[:2] == (403, "RequestTimeTooSkewed")
        assert query_error(exc.value)[:2] == (400, "RequestExpired")


def test_missing_and_malformed() -> None:
    now = datetime.now(UTC)
    with pytest.raises(AuthError) as exc:
        parse_request("GET", "/", "", {"Host": "h"}, now)
    assert exc.value.kind == "missing"
    assert query_error(exc.value)[:2] == (403, "MissingAuthenticationToken")
    assert s3_error(exc.value)[:2] == (403, "AccessDenied")
    good = _sign(SigV4Auth, "http://h:1/")
    headers = dict(good.headers.items())
    headers["Host"] = "h:1"
    auth = headers["Authorization"]
    cases = {
        "AWS4-HMAC-SHA256 Credential=x": "lacks",
        auth.replace("aws4_request", "aws5_request"): "credential",
        auth.replace("SignedHeaders=host;x-amz-date", "SignedHeaders=x-amz-date;host"): "sorted",
        auth.replace(
            "SignedHeaders=host;x-amz-date", "SignedHeaders=x-amz-date"
        ): "host header must be signed",
        auth.replace("SignedHeaders=host;x-amz-date", "SignedHeaders=host;x-amz-date;x-custom"): "x-custom",
        auth[: auth.index("Signature=") + 10] + "zz": "hex",
        "Bearer abc": "algorithm",
    }
    for value, needle in cases.items():
        with pytest.raises(AuthError) as exc:
            parse_request("GET", "/", "", {**headers, "Authorization": value}, now)
        assert exc.value.kind == "malformed", value
        assert needle in exc.value.message, (needle, exc.value.message)
        assert query_error(exc.value)[:2] == (400, "IncompleteSignature")
    with pytest.raises(AuthError) as exc:
        parse_request("GET", "/", "", {**headers, "Authorization": "AWS AKID:sig"}, now)
    assert exc.value.kind == "unsupported"
    with pytest.raises(AuthError) as exc:
        parse_request("GET", "/", "", {**headers, "X-Amz-Date": "yesterday"}, now)
    assert exc.value.kind == "malformed"
    presigned = _sign(S3SigV4QueryAuth, "http://h:1/b/k", service="s3")
    query = urlsplit(presigned.url).query
    for drop in ("X-Amz-Credential", "X-Amz-Expires"):
        q = "&".join(p for p in query.split("&") if not p.startswith(drop))
        with pytest.raises(AuthError) as exc:
            parse_request("GET", "/b/k", q, {"Host": "h:1"}, now)
        assert exc.value.kind == "malformed" and drop in exc.value.message
        assert s3_error(exc.value)[:2] == (400, "AuthorizationQueryParametersError")


def test_error_maps_for_keys() -> None:
    for kind in ("unknown_key", "inactive_key"):
        err = AuthError(kind, "x")
        assert s3_error(err)[:2] == (403, "InvalidAccessKeyId")
        assert query_error(err)[:2] == (403, "InvalidClientTokenId")
    assert s3_error(AuthError("signature_mismatch", "x"))[:2] == (403, "SignatureDoesNotMatch")
    assert query_error(AuthError("signature_mismatch", "x"))[:2] == (403, "SignatureDoesNotMatch")
    with pytest.raises(ValueError):
        AuthError("nonsense", "x")


def test_streaming_chunk_signatures_aws_example() -> None:
    # The worked example of AWS's "Signature Calculations for the Authorization Header:
    # Transferring Payload in Multiple Chunks" (S3 docs): 66560 bytes of 'a', 64 KiB chunks.
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    seed = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
    headers = {
        "Host": "s3.amazonaws.com",
        "x-amz-date": "20130524T000000Z",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "x-amz-content-sha256": STREAMING_PAYLOAD,
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": "66560",
        "Content-Length": "66824",
        "Authorization": "AWS4-HMAC-SHA256 "
        "Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
        "SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
        f"x-amz-decoded-content-length;x-amz-storage-class,Signature={seed}",
    }
    now = datetime(2013, 5, 24, 0, 1, tzinfo=UTC)
    parsed = parse_request("PUT", "/examplebucket/chunkObject.txt", "", headers, now)
    assert parsed.streaming
    check_signature(parsed, secret, STREAMING_PAYLOAD)
    chunks = ChunkSigner(parsed, secret)
    chunks.check("ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648", b"a" * 65536)
    chunks.check("0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497", b"a" * 1024)
    with pytest.raises(AuthError):
        ChunkSigner(parsed, secret).check("0" * 64, b"a" * 65536)
    chunks.check("b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9", b"")


@settings(max_examples=60, deadline=None)
@given(
    key=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40),
    params=st.dictionaries(
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8),
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
        max_size=4,
    ),
    service=st.sampled_from(["s3", "iam", "ec2"]),
    presign=st.booleans(),
)
def test_any_key_and_query_signed_by_botocore_verifies(
    key: str, params: dict[str, str], service: str, presign: bool
) -> None:
    from botocore.utils import percent_encode, percent_encode_sequence

    path = "/bucket/" + percent_encode(key, safe="/~")
    query = percent_encode_sequence(params) if params else ""
    url = f"http://127.0.0.11:8775{path}" + (f"?{query}" if query else "")
    if service == "s3":
        cls = S3SigV4QueryAuth if presign else S3SigV4Auth
    else:
        cls = SigV4QueryAuth if presign else SigV4Auth
    _verify(_sign(cls, url, service=service))


# --------------------------------------------------------------------------- credentials


def test_secret_box_and_key_file(tmp_path: Path) -> None:
    path = make_credential_key(tmp_path / "credentials.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    box = SecretBox(load_credential_key(path))
    sealed = box.seal("AKIAONE", SECRET)
    assert SECRET.encode() not in sealed
    assert box.open("AKIAONE", sealed) == SECRET
    with pytest.raises(CredentialKeyError):
        box.open("AKIATWO", sealed)  # bound to its access key id
    with pytest.raises(CredentialKeyError):
        SecretBox(bytes(32)).open("AKIAONE", sealed)  # another cloud's key
    path.chmod(0o644)
    with pytest.raises(CredentialKeyError, match="chmod 600"):
        load_credential_key(path)
    with pytest.raises(CredentialKeyError, match="no credential_key"):
        load_credential_key(None)
    (tmp_path / "bad.key").write_text("zz\n")
    (tmp_path / "bad.key").chmod(0o600)
    with pytest.raises(CredentialKeyError, match="hex"):
        load_credential_key(tmp_path / "bad.key")


def test_key_cache_bounds_revocation_by_its_ttl() -> None:
    now = [0.0]
    table: dict[str, dict[str, object] | None] = {
        "AKIAONE": {"secret_key": SECRET, "user": "alice", "account": "eucalyptus", "active": True}
    }
    calls: list[str] = []

    async def fetch(key: str) -> dict[str, object] | None:
        calls.append(key)
        await asyncio.sleep(0)
        return table.get(key)

    async def scenario() -> None:
        cache = KeyCache(None, ttl=5.0, negative_ttl=0.5, fetch=fetch, clock=lambda: now[0])
        infos = await asyncio.gather(*(cache.resolve("AKIAONE") for _ in range(5)))
        assert {i.user for i in infos} == {"alice"} and calls == ["AKIAONE"]  # one shared lookup
        assert SECRET not in repr(infos[0])
        table["AKIAONE"] = None  # deleted on the clc
        now[0] = 4.9
        assert (await cache.resolve("AKIAONE")).user == "alice"  # still cached: within the bound
        now[0] = 5.1
        with pytest.raises(AuthError) as exc:
            await cache.resolve("AKIAONE")
        assert exc.value.kind == "unknown_key"
        table["AKIAONE"] = {"secret_key": SECRET, "user": "alice", "account": "eucalyptus", "active": False}
        now[0] = 5.5
        with pytest.raises(AuthError):
            await cache.resolve("AKIAONE")  # negative answer cached for 0.5 s
        now[0] = 5.7
        with pytest.raises(AuthError) as exc:
            await cache.resolve("AKIAONE")
        assert exc.value.kind == "inactive_key"

    asyncio.run(scenario())
