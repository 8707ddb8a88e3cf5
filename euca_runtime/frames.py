"""The bus wire format: length-prefixed msgpack frames carrying message envelopes.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of msgpack.
The body must decode to a map (the *envelope*) whose fields depend on its ``kind``:

=========  =================================================================================
kind       required fields (besides ``kind`` and ``id``)
=========  =================================================================================
``req``    ``target`` (str, service type), ``partition`` (str or None), ``method`` (str),
           ``deadline`` (finite number >= 0: seconds *remaining*, because monotonic clocks
           differ between hosts), ``idem`` (str or None: idempotency key), ``body`` (any)
``resp``   ``ok`` (bool), ``body`` (any); when ``ok`` is false, ``error``: a map with
           ``type`` (str) and ``message`` (str)
``hb``     nothing more (heartbeat; ``id`` is a sequence number)
``hello``  ``node`` (str, the sender's node name; checked against its certificate CN)
=========  =================================================================================

``id`` is an unsigned 64-bit integer: the correlation id (a response carries the id of its
request). Extra fields are allowed and passed through, so the format can grow.

Any violation raises :class:`FrameError`, whose ``reason`` is a short machine-readable code
and whose message names the problem. A stream decoder that raised is poisoned: framing is
lost, and the only sane reaction is to close the connection.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import msgpack

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
"""Default largest accepted frame body, in bytes (16 MiB)."""

HEADER = struct.Struct(">I")
KINDS = frozenset({"req", "resp", "hb", "hello"})
MAX_ID = 2**64 - 1

_UNPACK_ERRORS = (
    msgpack.UnpackException,
    ValueError,  # includes msgpack's ExtraData, FormatError, StackError and UnicodeDecodeError
    TypeError,  # unhashable map keys
    OverflowError,
    RecursionError,
)


class FrameError(Exception):
    """A frame or envelope that violates the wire format.

    ``reason`` is one of: ``oversized``, ``malformed``, ``not_a_map``, ``bad_field``,
    ``missing_field``, ``unencodable``, ``poisoned``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _require(msg: Mapping[Any, Any], key: str) -> Any:
    if key not in msg:
        raise FrameError("missing_field", f"{msg.get('kind', '?')!s} message lacks field {key!r}")
    return msg[key]


def _bad(key: str, want: str, got: Any) -> FrameError:
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return FrameError("bad_field", f"field {key!r} must be {want}, got {shown}")


def _check_str(msg: Mapping[Any, Any], key: str, *, optional: bool = False) -> None:
    value = _require(msg, key)
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise _bad(key, "a string or None" if optional else "a string", value)


def validate(msg: Any) -> dict[str, Any]:
    """Check that ``msg`` is a well-formed envelope and return it (as a dict).

    Raises :class:`FrameError` naming the first problem found.
    """
    if not isinstance(msg, Mapping):
        raise FrameError("not_a_map", f"message must be a map, got {type(msg).__name__}")
    kind = _require(msg, "kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise _bad("kind", "one of " + "|".join(sorted(KINDS)), kind)
    ident = _require(msg, "id")
    if isinstance(ident, bool) or not isinstance(ident, int) or not 0 <= ident <= MAX_ID:
        raise _bad("id", "an unsigned 64-bit integer", ident)
    if kind == "req":
        _check_str(msg, "target")
        _check_str(msg, "partition", optional=True)
        _check_str(msg, "method")
        deadline = _require(msg, "deadline")
        if (
            isinstance(deadline, bool)
            or not isinstance(deadline, int | float)
            or not math.isfinite(deadline)
            or deadline < 0
        ):
            raise _bad("deadline", "a finite number of seconds >= 0", deadline)
        _check_str(msg, "idem", optional=True)
        _require(msg, "body")
    elif kind == "resp":
        ok = _require(msg, "ok")
        if not isinstance(ok, bool):
            raise _bad("ok", "a boolean", ok)
        _require(msg, "body")
        if not ok:
            error = _require(msg, "error")
            if (
                not isinstance(error, Mapping)
                or not isinstance(error.get("type"), str)
                or not isinstance(error.get("message"), str)
            ):
                raise _bad("error", "a map with string 'type' and 'message'", error)
    elif kind == "hello":
        _check_str(msg, "node")
    return dict(msg)


def encode(msg: Mapping[str, Any], max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Validate ``msg`` and return it as one frame (header + msgpack body).

    Raises :class:`FrameError` if the envelope is invalid, a value cannot be serialised
    (``unencodable``) or the body exceeds ``max_size`` (``oversized``).
    """
    validate(msg)
    try:
        body = msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise FrameError("unencodable", f"cannot serialise message: {exc}") from None
    if len(body) > max_size:
        raise FrameError("oversized", f"body of {len(body)} bytes exceeds the maximum of {max_size}")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body (without its header) into a validated envelope."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False, timestamp=0)
    except _UNPACK_ERRORS as exc:
        raise FrameError("malformed", f"undecodable msgpack body: {exc}") from None
    return validate(msg)


class FrameDecoder:
    """Incremental decoder: ``feed`` it bytes as they arrive, get back whole messages.

    An oversized length is rejected as soon as the 4-byte header is in, before any of the
    body is buffered, so a peer cannot make us hold more than ``max_size + 4`` bytes.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.max_size = max_size
        self._buf = bytearray()
        self._need: int | None = None  # body length once the header is parsed
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Consume ``data`` and return the messages it completes (possibly none).

        Raises :class:`FrameError` on the first bad frame; the decoder then refuses
        further input (``poisoned``), because the stream can no longer be framed.
        """
        if self._error is not None:
            raise FrameError("poisoned", f"decoder already failed ({self._error})")
        try:
            return self._feed(data)
        except FrameError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while True:
            if self._need is None:
                if len(self._buf) < HEADER.size:
                    return out
                (length,) = HEADER.unpack_from(self._buf)
                if length > self.max_size:
                    raise FrameError(
                        "oversized", f"frame header announces {length} bytes, maximum is {self.max_size}"
                    )
                del self._buf[: HEADER.size]
                self._need = length
            if len(self._buf) < self._need:
                return out
            body = bytes(self._buf[: self._need])
            del self._buf[: self._need]
            self._need = None
            out.append(decode_body(body))
