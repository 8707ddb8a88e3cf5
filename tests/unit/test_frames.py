"""The frame codec: roundtrips, arbitrary stream splitting, and garbage that must only ever
produce FrameError."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from euca_runtime.frames import (
    DEFAULT_MAX_FRAME,
    HEADER,
    FrameDecoder,
    FrameError,
    decode_body,
    encode,
    validate,
)

# --- strategies -------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-100, 100), inner, max_size=4)
    ),
    max_leaves=15,
)
ids = st.integers(min_value=0, max_value=2**64 - 1)
opt_str = st.none() | st.text(max_size=30)

requests = st.fixed_dictionaries(
    {
        "kind": st.just("req"),
        "id": ids,
        "target": st.text(max_size=12),
        "partition": opt_str,
        "method": st.text(max_size=12),
        "deadline": st.floats(min_value=0, max_value=1e6) | st.integers(0, 10**6),
        "idem": opt_str,
        "body": values,
    }
)
ok_responses = st.fixed_dictionaries(
    {"kind": st.just("resp"), "id": ids, "ok": st.just(True), "body": values}
)
error_responses = st.fixed_dictionaries(
    {
        "kind": st.just("resp"),
        "id": ids,
        "ok": st.just(False),
        "body": st.none(),
        "error": st.fixed_dictionaries({"type": st.text(max_size=10), "message": st.text(max_size=30)}),
    }
)
heartbeats = st.fixed_dictionaries({"kind": st.just("hb"), "id": ids})
hellos = st.fixed_dictionaries({"kind": st.just("hello"), "id": ids, "node": st.text(max_size=12)})
envelopes = requests | ok_responses | error_responses | heartbeats | hellos


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


# --- roundtrips -------------------------------------------------------------------------


@given(envelopes)
def test_roundtrip_single(msg: dict[str, Any]) -> None:
    frame = encode(msg)
    (length,) = HEADER.unpack_from(frame)
    assert length == len(frame) - HEADER.size
    assert FrameDecoder().feed(frame) == [msg]


@given(st.lists(envelopes, max_size=8), st.lists(st.integers(min_value=0), max_size=20))
def test_roundtrip_arbitrary_split(msgs: list[dict[str, Any]], cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in msgs)
    decoder = FrameDecoder()
    got: list[dict[str, Any]] = []
    for chunk in split(stream, cuts):
        got.extend(decoder.feed(chunk))
    assert got == msgs
    assert decoder.buffered == 0


def test_byte_at_a_time() -> None:
    msgs = [{"kind": "hb", "id": i} for i in range(3)]
    decoder = FrameDecoder()
    got = []
    for b in b"".join(encode(m) for m in msgs):
        got.extend(decoder.feed(bytes([b])))
    assert got == msgs


def test_extra_fields_pass_through() -> None:
    msg = {"kind": "hb", "id": 1, "future": [1, 2]}
    assert FrameDecoder().feed(encode(msg)) == [msg]


# --- garbage ----------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=10))
def test_garbage_only_raises_frame_error(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_size=1024)
    try:
        for chunk in split(data, cuts):
            decoder.feed(chunk)
    except FrameError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_body_with_valid_header_only_raises_frame_error(body: bytes) -> None:
    try:
        FrameDecoder().feed(HEADER.pack(len(body)) + body)
    except FrameError:
        pass


@given(values)
def test_any_msgpack_value_decodes_or_raises_frame_error(value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    try:
        decode_body(body)
    except FrameError:
        pass


@pytest.mark.parametrize(
    "body",
    [
        b"",  # empty
        b"\x91" * 100_000,  # nesting deeper than the unpacker's stack
        b"\xdb\xff\xff\xff\xff",  # str32 announcing 4 GiB
        b"\xdd\x7f\xff\xff\xff",  # array32 announcing 2**31 entries
        b"\x81\x91\x01\x01",  # map with an (unhashable) array key
        b"\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\xc1",  # reserved byte
        msgpack.packb({"kind": "hb", "id": 1}) + b"\x00",  # trailing bytes
    ],
)
def test_nasty_bodies(body: bytes) -> None:
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(HEADER.pack(len(body)) + body)
    assert info.value.reason in {"malformed", "not_a_map", "missing_field"}


# --- specific errors ----------------------------------------------------------------------


def test_oversized_header_rejected_before_body() -> None:
    decoder = FrameDecoder(max_size=1024)
    assert decoder.feed(HEADER.pack(1024)[:2]) == []
    with pytest.raises(FrameError) as info:
        decoder.feed(HEADER.pack(1025)[2:])  # header only: no body byte has arrived
    assert info.value.reason == "oversized"
    assert "1025" in str(info.value)
    assert decoder.buffered == 0


def test_huge_header_rejected_with_default_limit() -> None:
    with pytest.raises(FrameError, match="oversized"):
        FrameDecoder().feed(HEADER.pack(DEFAULT_MAX_FRAME + 1))


def test_frame_exactly_at_limit_is_accepted() -> None:
    msg = {"kind": "resp", "id": 1, "ok": True, "body": b""}
    base = len(encode(msg)) - HEADER.size
    msg["body"] = b"x" * 100
    size = len(encode(msg)) - HEADER.size
    assert size > base
    assert FrameDecoder(max_size=size).feed(encode(msg)) == [msg]
    with pytest.raises(FrameError, match="oversized"):
        encode(msg, max_size=size - 1)


def test_decoder_is_poisoned_after_error() -> None:
    decoder = FrameDecoder()
    body = msgpack.packb([1, 2])
    with pytest.raises(FrameError, match="not_a_map"):
        decoder.feed(HEADER.pack(len(body)) + body)
    with pytest.raises(FrameError, match="poisoned"):
        decoder.feed(encode({"kind": "hb", "id": 1}))


def test_messages_before_a_bad_frame_are_lost_with_the_error() -> None:
    # A good frame followed by a bad one in a single chunk: the error wins; the
    # connection is closed anyway, so nothing depends on the good one being seen.
    bad = msgpack.packb("nope")
    with pytest.raises(FrameError):
        FrameDecoder().feed(encode({"kind": "hb", "id": 1}) + HEADER.pack(len(bad)) + bad)


REQ = {
    "kind": "req",
    "id": 7,
    "target": "kv",
    "partition": None,
    "method": "get",
    "deadline": 1.5,
    "idem": "k1",
    "body": {"key": "a"},
}


@pytest.mark.parametrize(
    ("change", "reason", "field"),
    [
        ({"kind": "nope"}, "bad_field", "kind"),
        ({"kind": ["req"]}, "bad_field", "kind"),
        ({"id": -1}, "bad_field", "id"),
        ({"id": 2**64}, "bad_field", "id"),
        ({"id": True}, "bad_field", "id"),
        ({"id": "7"}, "bad_field", "id"),
        ({"target": 3}, "bad_field", "target"),
        ({"partition": 3}, "bad_field", "partition"),
        ({"method": None}, "bad_field", "method"),
        ({"deadline": -0.1}, "bad_field", "deadline"),
        ({"deadline": float("inf")}, "bad_field", "deadline"),
        ({"deadline": float("nan")}, "bad_field", "deadline"),
        ({"deadline": "1"}, "bad_field", "deadline"),
        ({"idem": 5}, "bad_field", "idem"),
    ],
)
def test_bad_request_fields(change: dict[str, Any], reason: str, field: str) -> None:
    msg = {**REQ, **change}
    with pytest.raises(FrameError) as info:
        validate(msg)
    assert info.value.reason == reason
    assert repr(field) in str(info.value)
    if change.get("id") == 2**64:
        return  # msgpack cannot even carry it
    # the same error comes out of the decoder for a frame carrying it
    body = msgpack.packb(msg, use_bin_type=True)
    with pytest.raises(FrameError, match=reason):
        FrameDecoder().feed(HEADER.pack(len(body)) + body)


@pytest.mark.parametrize("field", ["kind", "id", "target", "partition", "method", "deadline", "idem", "body"])
def test_missing_request_fields(field: str) -> None:
    msg = {k: v for k, v in REQ.items() if k != field}
    with pytest.raises(FrameError) as info:
        validate(msg)
    assert info.value.reason == "missing_field"
    assert repr(field) in str(info.value)


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        ({"kind": "resp", "id": 1, "body": None}, "missing_field"),
        ({"kind": "resp", "id": 1, "ok": 1, "body": None}, "bad_field"),
        ({"kind": "resp", "id": 1, "ok": False, "body": None}, "missing_field"),
        ({"kind": "resp", "id": 1, "ok": False, "body": None, "error": "x"}, "bad_field"),
        ({"kind": "resp", "id": 1, "ok": False, "body": None, "error": {"type": "X"}}, "bad_field"),
        ({"kind": "hello", "id": 0}, "missing_field"),
        ({"kind": "hello", "id": 0, "node": b"node-a"}, "bad_field"),
        ([], "not_a_map"),
        ("req", "not_a_map"),
    ],
)
def test_bad_other_messages(msg: Any, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        validate(msg)
    assert info.value.reason == reason


def test_encode_rejects_unserialisable_and_invalid() -> None:
    with pytest.raises(FrameError, match="unencodable"):
        encode({"kind": "resp", "id": 1, "ok": True, "body": object()})
    with pytest.raises(FrameError, match="missing_field"):
        encode({"kind": "hb"})


def test_decoder_rejects_nonpositive_limit() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_size=0)
