"""Pure S3 semantics of walrus: names, digests, ranges, listings, XML."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from euca_runtime.walrus import s3
from euca_runtime.walrus.http import route
from euca_runtime.walrus.s3 import S3Error


@pytest.mark.parametrize("name", ["abc", "my-bucket", "a.b.c", "x" * 63, "1bucket"])
def test_valid_bucket_names(name: str) -> None:
    assert s3.check_bucket_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["ab", "x" * 64, "Upper", "under_score", "-start", "end-", "a..b", "a.-b", "10.0.0.1", "xn--abc", ""],
)
def test_invalid_bucket_names(name: str) -> None:
    with pytest.raises(S3Error) as e:
        s3.check_bucket_name(name)
    assert e.value.code == "InvalidBucketName" and e.value.status == 400


def test_keys() -> None:
    assert s3.check_key("a/b c/ü") == "a/b c/ü"
    with pytest.raises(S3Error) as e:
        s3.check_key("k" * 1025)
    assert e.value.code == "KeyTooLongError"
    with pytest.raises(S3Error):
        s3.check_key("")


def test_content_md5_and_crc32() -> None:
    digest = hashlib.md5(b"abc").digest()
    assert s3.content_md5(base64.b64encode(digest).decode()) == digest.hex()
    for bad in ("not base64", base64.b64encode(b"short").decode()):
        with pytest.raises(S3Error) as e:
            s3.content_md5(bad)
        assert e.value.code == "InvalidDigest"
    assert s3.crc32_header(s3.crc32_b64(0xDEADBEEF)) == 0xDEADBEEF


def test_multipart_etag_is_md5_of_part_md5s() -> None:
    parts = [b"a" * 10, b"b" * 3]
    md5s = [hashlib.md5(p).hexdigest() for p in parts]
    want = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-2"
    assert s3.multipart_etag(md5s) == want
    assert s3.unquote_etag('"abc"') == "abc" and s3.unquote_etag('W/"abc"') == "abc"


@pytest.mark.parametrize(
    ("header", "size", "want"),
    [
        (None, 10, None),
        ("bytes=0-4", 10, (0, 4)),
        ("bytes=5-", 10, (5, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("bytes=8-100", 10, (8, 9)),
        ("bytes=5-2", 10, None),  # invalid: ignored, as S3 does
        ("bytes=0-1,4-5", 10, None),  # several ranges: ignored
        ("items=0-1", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, want: tuple[int, int] | None) -> None:
    assert s3.parse_range(header, size) == want


@pytest.mark.parametrize(("header", "size"), [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=0-", 0)])
def test_unsatisfiable_range(header: str, size: int) -> None:
    with pytest.raises(S3Error) as e:
        s3.parse_range(header, size)
    assert e.value.code == "InvalidRange" and e.value.status == 416


@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6),
    data=st.data(),
    chunk=st.integers(1, 17),
)
def test_plan_reads_covers_exactly_the_range(sizes: list[int], data: Any, chunk: int) -> None:
    total = sum(sizes)
    first = data.draw(st.integers(0, total - 1))
    last = data.draw(st.integers(first, total - 1))
    blobs = {f"b{i}": bytes((i * 31 + j) % 256 for j in range(n)) for i, n in enumerate(sizes)}
    whole = b"".join(blobs.values())
    segments = [(b, len(v)) for b, v in blobs.items()]
    reads = s3.plan_reads(segments, first, last, chunk)
    assert all(0 < n <= chunk for _, _, n in reads)
    assert b"".join(blobs[b][o : o + n] for b, o, n in reads) == whole[first : last + 1]


def _reference(keys: list[str], prefix: str, delimiter: str, after: str) -> list[str]:
    """Every entry (key or common prefix) a full listing would return after `after`."""
    out: list[str] = []
    for k in sorted(keys):
        if not k.startswith(prefix):
            continue
        entry = k
        if delimiter:
            pos = k.find(delimiter, len(prefix))
            if pos >= 0:
                entry = k[: pos + len(delimiter)]
        if entry <= after or (out and out[-1] == entry):
            continue
        out.append(entry)
    return out


def _fetcher(keys: list[str]) -> Any:
    ordered = sorted(keys)

    def fetch(start: str, inclusive: bool, stop: str | None, limit: int) -> list[dict[str, Any]]:
        rows = [
            {"key": k}
            for k in ordered
            if (k >= start if inclusive else k > start) and (stop is None or k < stop)
        ]
        return rows[:limit]

    return fetch


@settings(max_examples=200)
@given(
    keys=st.lists(st.text(alphabet="ab/c.", min_size=1, max_size=6), max_size=40, unique=True),
    prefix=st.sampled_from(["", "a", "a/", "b/c", "/"]),
    delimiter=st.sampled_from(["", "/", "."]),
    max_keys=st.integers(1, 7),
    batch=st.integers(1, 5),
)
def test_paged_listing_equals_the_reference(
    keys: list[str], prefix: str, delimiter: str, max_keys: int, batch: int
) -> None:
    fetch = _fetcher(keys)
    got: list[str] = []
    after = ""
    for _ in range(100):
        page = s3.list_keys(
            fetch, prefix=prefix, delimiter=delimiter, after=after, max_keys=max_keys, batch=batch
        )
        entries = sorted([str(c["key"]) for c in page.contents] + page.prefixes)
        assert len(entries) <= max_keys
        got += entries
        if not page.truncated:
            break
        assert page.last is not None
        after = page.last
    assert got == _reference(keys, prefix, delimiter, "")


def test_listing_token_round_trip() -> None:
    assert s3.decode_token(s3.encode_token("a/ü/\x00")) == "a/ü/\x00"
    with pytest.raises(S3Error):
        s3.decode_token("!!!")


def test_routing_path_and_virtual_host() -> None:
    hosts = ["localhost", "s3.example.com", "127.0.0.11"]
    assert route("127.0.0.11:8775", "/bucket/a/b%20c", hosts) == ("bucket", "a/b c")
    assert route("127.0.0.11:8775", "/", hosts) == ("", "")
    assert route("photos.s3.example.com", "/a/b", hosts) == ("photos", "a/b")
    assert route("photos.localhost:8775", "/", hosts) == ("photos", "")
    assert route("s3.example.com", "/photos/k", hosts) == ("photos", "k")
    assert route("unknown.host", "/photos/k", hosts) == ("photos", "k")


def test_xml_documents() -> None:
    keys, quiet = s3.parse_delete(
        b'<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Quiet>true</Quiet>'
        b"<Object><Key>a</Key></Object><Object><Key>b/c</Key></Object></Delete>"
    )
    assert keys == ["a", "b/c"] and quiet
    parts = s3.parse_complete(
        b'<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>"e1"</ETag></Part>'
        b"<Part><ETag>e2</ETag><PartNumber>2</PartNumber></Part></CompleteMultipartUpload>"
    )
    assert parts == [(1, "e1"), (2, "e2")]
    for bad in (b"<nope", b"<Delete></Delete>", b'<!DOCTYPE x [<!ENTITY a "b">]><Delete/>'):
        with pytest.raises(S3Error) as e:
            s3.parse_delete(bad)
        assert e.value.code == "MalformedXML"
    err = s3.error_xml(S3Error("NoSuchKey", "gone"), "/b/k", "RID")
    assert b"<Code>NoSuchKey</Code>" in err and b"<Resource>/b/k</Resource>" in err
    assert S3Error("NoSuchKey", "x").status == 404
    assert s3.error_from_text("write refused: BucketNotEmpty: bucket b is not empty").code == "BucketNotEmpty"
    assert s3.error_from_text("something else").code == "InternalError"
