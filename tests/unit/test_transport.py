"""The bus transport over real sockets on 127.0.0.1 with mutual TLS.

Every wait is on a condition with a deadline (``wait_until``); nothing sleeps to
synchronise and nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from euca_runtime.clock import ManualClock
from euca_runtime.frames import HEADER, FrameDecoder, FrameError, encode
from euca_runtime.tls import (
    NodePki,
    client_context,
    create_ca,
    ensure_dev_pki,
    issue_node_cert,
    server_context,
)
from euca_runtime.transport import (
    DeadlineExceeded,
    Endpoint,
    IdempotencyCache,
    PeerUnavailable,
    RemoteError,
    TransportOptions,
)

HOST = "127.0.0.1"
FAST = TransportOptions(heartbeat_interval=0.02, suspect_after=0.3, backoff_initial=0.01, backoff_max=0.1)


def arun(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop, with an overall safety deadline."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            async with asyncio.timeout(30):
                await fn(*args, **kwargs)

        asyncio.run(main())

    return wrapper


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until it holds; fail the test if it does not within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


# --- PKI fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodePki]:
    return ensure_dev_pki(tmp_path_factory.mktemp("pki"), ["a", "b", "c"], ["127.0.0.1"])


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Certificates for node 'b' that the cluster must not accept: other CA, self-signed."""
    d = tmp_path_factory.mktemp("rogue")
    create_ca(d / "other-ca.crt", d / "other-ca.key")
    issue_node_cert(d / "other-ca.crt", d / "other-ca.key", "b", d / "b.crt", d / "b.key", ips=[HOST])
    # self-signed: a "CA" whose own certificate is used as a leaf, CN=b
    create_ca(d / "self.crt", d / "self.key", common_name="b")
    return {"other_ca": (d / "b.crt", d / "b.key"), "self_signed": (d / "self.crt", d / "self.key")}


def endpoint(
    name: str, pki: dict[str, NodePki], peers: dict[str, tuple[str, int]] | None = None, **kw: Any
) -> Endpoint:
    p = pki[name]
    return Endpoint(
        name,
        HOST,
        kw.pop("port", 0),
        server_context(p.ca, p.cert, p.key),
        client_context(p.ca, p.cert, p.key),
        peers=peers,
        options=kw.pop("options", FAST),
        **kw,
    )


@contextlib.asynccontextmanager
async def running(*eps: Endpoint) -> AsyncIterator[None]:
    try:
        for ep in eps:
            await ep.start()
        yield
    finally:
        for ep in eps:
            await ep.stop()


async def pair(pki: dict[str, NodePki], handler: Any = None) -> tuple[Endpoint, Endpoint]:
    """Endpoints a and b, each in the other's peer table, b serving ``handler``."""
    b = endpoint("b", pki)
    b.set_handler(handler)
    await b.start()
    a = endpoint("a", pki, {"b": (HOST, b.port)})
    await a.start()
    b.set_peer("a", HOST, a.port)
    await wait_until(lambda: a.connected("b") and b.connected("a"), what="a<->b connected")
    return a, b


async def echo(req: dict[str, Any]) -> Any:
    return {"peer": req["peer"], "target": req["target"], "partition": req["partition"], "body": req["body"]}


async def refused(reader: asyncio.StreamReader) -> bool:
    """True once the server has closed the connection (EOF or a TLS/connection error)."""
    try:
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass
    except (OSError, ssl.SSLError):
        return True
    return True


async def raw_client(
    port: int, ca: Path, cert: Path | None, key: Path | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return await asyncio.open_connection(HOST, port, ssl=ctx)


async def hello_as(node: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
    writer.write(encode({"kind": "hello", "id": 0, "node": node}))
    await writer.drain()
    decoder = FrameDecoder()
    while True:
        data = await reader.read(65536)
        assert data, "server closed the connection during hello"
        msgs = decoder.feed(data)
        if msgs:
            return msgs[0]


# --- request / response ---------------------------------------------------------------------


@arun
async def test_request_response(pki: dict[str, NodePki]) -> None:
    a, b = await pair(pki, echo)
    try:
        got = await a.request("b", "kv", "get", {"key": "x", "raw": b"\x00"}, partition="p1", timeout=5)
        assert got == {"peer": "a", "target": "kv", "partition": "p1", "body": {"key": "x", "raw": b"\x00"}}
        # and the other way round, over b's own outbound link
        b.set_handler(None)
        a.set_handler(echo)
        assert (await b.request("a", "clc", "ping", None, timeout=5))["peer"] == "b"
        # many concurrent requests are all correlated correctly
        results = await asyncio.gather(*(b.request("a", "kv", "n", i, timeout=5) for i in range(200)))
        assert [r["body"] for r in results] == list(range(200))
    finally:
        await a.stop()
        await b.stop()


@arun
async def test_frames_keep_their_order_whether_written_directly_or_queued(pki: dict[str, NodePki]) -> None:
    """A frame is written straight away only while nothing is queued or buffered before it: a
    burst mixing big frames (which back the transport up) and small ones arrives in order."""
    arrived: list[int] = []

    async def record(req: dict[str, Any]) -> Any:
        arrived.append(req["body"]["i"])  # first step of the handler: runs in arrival order
        return req["body"]["i"]

    a, b = await pair(pki, record)
    try:
        direct = a.stats["frames_direct"]
        assert await a.request("b", "kv", "one", {"i": -1, "pad": b""}, timeout=5) == -1
        assert a.stats["frames_direct"] > direct  # an idle connection writes at once
        arrived.clear()
        bodies = [{"i": i, "pad": b"x" * (300_000 if i % 7 == 0 else 10)} for i in range(60)]
        results = await asyncio.gather(*(a.request("b", "kv", "n", body, timeout=20) for body in bodies))
        assert results == list(range(60))
        assert arrived == list(range(60))
    finally:
        await a.stop()
        await b.stop()


@arun
async def test_send_request_writes_its_frame_before_returning(pki: dict[str, NodePki]) -> None:
    """`send_request` puts the frame on the wire without a loop turn when the link is up (and
    in order with everything sent before it), and falls back to `request` otherwise."""
    arrived: list[int] = []

    async def record(req: dict[str, Any]) -> Any:
        arrived.append(req["body"])
        if req["body"] == 3:
            raise RemoteError("Nope", "refused")
        return req["body"] * 10

    a, b = await pair(pki, record)
    try:
        direct = a.stats["frames_direct"]
        first = a.send_request("b", "kv", "n", 1, timeout=5)
        assert a.stats["frames_direct"] == direct + 1  # written before anything was awaited
        queued = [asyncio.ensure_future(a.request("b", "kv", "n", 2, timeout=5))]
        await asyncio.sleep(0)  # that request's first step writes or queues its frame
        second = a.send_request("b", "kv", "n", 4, timeout=5)
        third = a.send_request("b", "kv", "n", 3, timeout=5)
        assert await first == 10 and await queued[0] == 20 and await second == 40
        with pytest.raises(RemoteError, match="Nope"):
            await third
        assert arrived == [1, 2, 4, 3]
        a.remove_peer("b")  # no link: the awaitable is `request`, which fails fast
        with pytest.raises(PeerUnavailable):
            await a.send_request("b", "kv", "n", 5, timeout=1)
    finally:
        await a.stop()
        await b.stop()


@arun
async def test_remote_errors(pki: dict[str, NodePki]) -> None:
    async def handler(req: dict[str, Any]) -> Any:
        if req["method"] == "typed":
            raise RemoteError("NotPrimary", "ask node-a")
        if req["method"] == "bug":
            raise ValueError("boom")
        return object()  # not serialisable

    a, b = await pair(pki, handler)
    try:
        with pytest.raises(RemoteError) as info:
            await a.request("b", "kv", "typed", timeout=5)
        assert (info.value.type, info.value.message, info.value.peer) == ("NotPrimary", "ask node-a", "b")
        with pytest.raises(RemoteError) as info:
            await a.request("b", "kv", "bug", timeout=5)
        assert info.value.type == "ValueError"
        with pytest.raises(RemoteError) as info:
            await a.request("b", "kv", "unserialisable", timeout=5)
        assert info.value.type == "BadResponse"
        with pytest.raises(FrameError):
            await a.request("b", "kv", "x", object(), timeout=5)
        b.set_handler(None)
        with pytest.raises(RemoteError, match="NoHandler"):
            await a.request("b", "kv", "x", timeout=5)
        assert a.connected("b")  # none of this hurt the connection
    finally:
        await a.stop()
        await b.stop()


@arun
async def test_unknown_peer_and_self(pki: dict[str, NodePki]) -> None:
    a = endpoint("a", pki)
    a.set_handler(echo)
    async with running(a):
        with pytest.raises(PeerUnavailable, match="unknown peer"):
            await a.request("zz", "kv", "get", timeout=5)
        got = await a.request("a", "kv", "get", 1, timeout=5)  # local delivery
        assert got["peer"] == "a"


@arun
async def test_deadline_exceeded(pki: dict[str, NodePki]) -> None:
    release = asyncio.Event()
    seen: list[float] = []

    async def slow(req: dict[str, Any]) -> Any:
        seen.append(req["deadline"])
        await release.wait()
        return "late"

    a, b = await pair(pki, slow)
    try:
        with pytest.raises(DeadlineExceeded, match="no response within"):
            await a.request("b", "kv", "slow", timeout=0.2)
        assert len(seen) == 1 and 0 < seen[0] <= 0.2  # the remote saw what was left of the budget
        release.set()
        with pytest.raises(DeadlineExceeded):
            await a.request("b", "kv", "slow", timeout=0)
        assert await a.request("b", "kv", "slow", timeout=5) == "late"  # connection still fine
    finally:
        await a.stop()
        await b.stop()


@arun
async def test_oversized_request_and_response(pki: dict[str, NodePki]) -> None:
    opts = TransportOptions(heartbeat_interval=0.02, max_frame=4096)

    async def big(req: dict[str, Any]) -> Any:
        return b"x" * 10_000

    b = endpoint("b", pki, options=opts)
    b.set_handler(big)
    await b.start()
    a = endpoint("a", pki, {"b": (HOST, b.port)}, options=opts)
    async with running(a):
        try:
            with pytest.raises(FrameError, match="oversized"):
                await a.request("b", "kv", "put", b"y" * 10_000, timeout=5)
            with pytest.raises(RemoteError) as info:
                await a.request("b", "kv", "get", timeout=5)
            assert info.value.type == "BadResponse"
        finally:
            await b.stop()


@arun
async def test_back_pressure_when_the_peer_stops_reading(pki: dict[str, NodePki]) -> None:
    """Senders await queue space (bounded by their deadline); nothing grows without bound."""
    release = asyncio.Event()

    async def stalled_b(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        while not decoder.feed(await reader.read(65536)):
            pass
        writer.write(encode({"kind": "hello", "id": 0, "node": "b"}))
        await writer.drain()
        await release.wait()  # never read again
        writer.close()

    p = pki["b"]
    server = await asyncio.start_server(stalled_b, HOST, 0, ssl=server_context(p.ca, p.cert, p.key))
    port = server.sockets[0].getsockname()[1]
    opts = TransportOptions(heartbeat_interval=0.02, queue_size=2, idle_timeout=60)
    a = endpoint("a", pki, {"b": (HOST, port)}, options=opts)
    try:
        async with running(a):
            await wait_until(lambda: a.connected("b"), what="connected to the stalled peer")
            big = b"x" * (1 << 20)
            senders = [asyncio.create_task(a.request("b", "kv", "put", big, timeout=25)) for _ in range(64)]
            await wait_until(lambda: a.stats["send_waits"] > 0, what="a sender blocked on the full queue")
            conn = a._links["b"].conn
            assert conn is not None and len(conn._out) <= opts.queue_size
            with pytest.raises(DeadlineExceeded):
                await a.request("b", "kv", "small", timeout=0.2)
            assert a.stats["frames_dropped"] > 0  # heartbeats are dropped, never queued beyond the bound
            release.set()  # the peer hangs up: every waiting sender fails over to PeerUnavailable
            results = await asyncio.gather(*senders, return_exceptions=True)
            assert results and all(isinstance(r, PeerUnavailable) for r in results), results
    finally:
        server.close()
        await server.wait_closed()


# --- idempotency ----------------------------------------------------------------------------


@arun
async def test_idempotent_retry_executes_once(pki: dict[str, NodePki]) -> None:
    calls: list[Any] = []
    gate = asyncio.Event()

    async def handler(req: dict[str, Any]) -> Any:
        calls.append(req["body"])
        if req["method"] == "gated":
            await gate.wait()
        if req["method"] == "flaky" and len(calls) == 1:
            raise RemoteError("Unavailable", "try again")
        return len(calls)

    a, b = await pair(pki, handler)
    try:
        # retry after completion: answered from the cache
        assert await a.request("b", "kv", "put", "v", timeout=5, idempotency_key="k1") == 1
        assert await a.request("b", "kv", "put", "v", timeout=5, idempotency_key="k1") == 1
        assert calls == ["v"]
        # retry while the first execution is still running: waits for it
        calls.clear()
        with pytest.raises(DeadlineExceeded):
            await a.request("b", "kv", "gated", "w", timeout=0.1, idempotency_key="k2")
        retry = asyncio.create_task(a.request("b", "kv", "gated", "w", timeout=5, idempotency_key="k2"))
        await wait_until(lambda: b.stats["idempotent_hits"] >= 2, what="retry to reach the cache")
        gate.set()
        assert await retry == 1
        assert calls == ["w"]
        # a failed execution is not cached: the retry runs again
        calls.clear()
        with pytest.raises(RemoteError):
            await a.request("b", "kv", "flaky", 0, timeout=5, idempotency_key="k3")
        assert await a.request("b", "kv", "flaky", 0, timeout=5, idempotency_key="k3") == 2
        # without a key, every request runs
        calls.clear()
        await a.request("b", "kv", "put", 1, timeout=5)
        await a.request("b", "kv", "put", 1, timeout=5)
        assert len(calls) == 2
    finally:
        await a.stop()
        await b.stop()


@arun
async def test_idempotency_cache_bounds_and_ttl() -> None:
    clock = ManualClock()
    cache = IdempotencyCache(clock, ttl=10.0, max_entries=3)
    fut, owner = cache.claim("a")
    assert owner
    fut.set_result({"ok": True, "body": 1})
    assert cache.claim("a") == (fut, False)
    for key in "bcd":
        cache.claim(key)
    assert len(cache) == 3
    assert cache.claim("a")[1]  # "a" was evicted as the oldest, so it executes again
    clock.advance(10.5)
    assert cache.claim("b")[1]  # expired
    assert len(cache) == 1
    f2, _ = cache.claim("z")
    cache.forget("z", f2)
    assert cache.claim("z")[1]


# --- heartbeats, suspicion, reconnect -------------------------------------------------------


@arun
async def test_heartbeats_update_last_heard_and_stop_with_the_peer(pki: dict[str, NodePki]) -> None:
    b = endpoint("b", pki)
    c = endpoint("c", pki)
    async with running(b, c):
        a = endpoint("a", pki, {"b": (HOST, b.port), "c": (HOST, c.port)})
        async with running(a):
            await wait_until(lambda: a.last_heard("b") is not None, what="first frame from b")
            first = a.last_heard("b")
            # b never talks to a on its own: only heartbeats on a's connection can advance this
            await wait_until(lambda: a.last_heard("b") != first, what="a heartbeat from b")
            assert b.last_heard("a") is not None and not a.suspected("b")
            age = a.heartbeat_age("b")
            assert age is not None and age >= 0

            await b.stop()
            await wait_until(lambda: not a.connected("b"), what="a to notice b is gone")
            stopped_at = a.last_heard("b")
            # let several heartbeat rounds pass, measured by c's heartbeats rather than a sleep
            for _ in range(5):
                before = a.last_heard("c")
                await wait_until(lambda: a.last_heard("c") != before, what="a heartbeat from c")  # noqa: B023
            assert a.last_heard("b") == stopped_at
            await wait_until(lambda: a.suspected("b"), what="b to become suspected")
            assert not a.suspected("c")
            status = a.peer_status()
            assert status["b"]["link"] in {"down", "connecting"} and status["b"]["suspected"]
            assert status["c"]["link"] == "up" and not status["c"]["suspected"]
            with pytest.raises(PeerUnavailable):
                await a.request("b", "kv", "x", timeout=5)


@arun
async def test_reconnect_after_peer_restart(pki: dict[str, NodePki]) -> None:
    b = endpoint("b", pki)
    b.set_handler(echo)
    await b.start()
    port = b.port
    a = endpoint("a", pki, {"b": (HOST, port)})
    async with running(a):
        await wait_until(lambda: a.connected("b"), what="first connection")
        assert (await a.request("b", "kv", "x", 1, timeout=5))["body"] == 1
        await b.stop()
        await wait_until(lambda: not a.connected("b"), what="disconnect")
        b2 = endpoint("b", pki, port=port)
        b2.set_handler(echo)
        async with running(b2):
            await wait_until(lambda: a.connected("b"), what="reconnect")
            assert (await a.request("b", "kv", "x", 2, timeout=5))["body"] == 2
            heard = a.last_heard("b")
            await wait_until(lambda: a.last_heard("b") != heard, what="heartbeats after reconnect")


@arun
async def test_peer_table_moves(pki: dict[str, NodePki]) -> None:
    b1 = endpoint("b", pki)
    b1.set_handler(echo)
    b2 = endpoint("b", pki)

    async def other(req: dict[str, Any]) -> Any:
        return "second"

    b2.set_handler(other)
    async with running(b1, b2):
        a = endpoint("a", pki, {"b": (HOST, b1.port)})
        async with running(a):
            await wait_until(lambda: a.connected("b"), what="connect to b1")
            assert a.peer_status()["b"]["address"] == f"{HOST}:{b1.port}"
            a.set_peer("b", HOST, b2.port)
            await wait_until(
                lambda: a.peer_status()["b"]["address"] == f"{HOST}:{b2.port}" and a.connected("b"),
                what="move to b2",
            )
            assert await a.request("b", "kv", "x", timeout=5) == "second"
            a.remove_peer("b")
            with pytest.raises(PeerUnavailable, match="unknown peer"):
                await a.request("b", "kv", "x", timeout=5)


# --- hostile input --------------------------------------------------------------------------


def bad_frame_logged(caplog: pytest.LogCaptureFixture, peer: str, text: str) -> bool:
    return any(
        r.name == "euca_runtime.bus" and getattr(r, "peer", None) == peer and text in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(HEADER.pack(0xFFFFFFFF), id="oversized-header"),
        pytest.param(HEADER.pack(5) + b"\xc1\xc1\xc1\xc1\xc1", id="malformed-body"),
        pytest.param(encode({"kind": "hb", "id": 1})[:3] + b"\x00" * 3 + b"\x92\x01\x02", id="not-a-map"),
        pytest.param(encode({"kind": "hello", "id": 1, "node": "c"}), id="second-hello"),
    ],
)
def test_bad_frames_close_only_that_connection(
    pki: dict[str, NodePki], caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    @arun
    async def scenario() -> None:
        a, b = await pair(pki, None)
        a.set_handler(echo)
        try:
            reader, writer = await raw_client(a.port, pki["c"].ca, pki["c"].cert, pki["c"].key)
            assert (await hello_as("c", reader, writer))["node"] == "a"
            writer.write(payload)
            await writer.drain()
            assert await refused(reader)
            writer.close()
            await wait_until(lambda: bad_frame_logged(caplog, "c", "closing connection"), what="log line")
            # the endpoint keeps serving its good peer, on the connection it already had
            assert (await b.request("a", "kv", "x", 1, timeout=5))["body"] == 1
            assert a.connected("b") and b.connected("a")
        finally:
            await a.stop()
            await b.stop()

    with caplog.at_level(logging.INFO, logger="euca_runtime"):
        scenario()


def test_garbage_before_hello_is_refused(pki: dict[str, NodePki], caplog: pytest.LogCaptureFixture) -> None:
    @arun
    async def scenario() -> None:
        a, b = await pair(pki, None)
        a.set_handler(echo)
        try:
            reader, writer = await raw_client(a.port, pki["c"].ca, pki["c"].cert, pki["c"].key)
            writer.write(b"GET / HTTP/1.1\r\n\r\n" * 100)
            await writer.drain()
            assert await refused(reader)
            writer.close()
            await wait_until(lambda: bad_frame_logged(caplog, "c", "refused connection"), what="log line")
            assert (await b.request("a", "kv", "x", 1, timeout=5))["body"] == 1
        finally:
            await a.stop()
            await b.stop()

    with caplog.at_level(logging.INFO, logger="euca_runtime"):
        scenario()


@pytest.mark.parametrize("kind", ["self_signed", "other_ca", "no_cert"])
def test_untrusted_client_refused_in_tls_handshake(
    pki: dict[str, NodePki],
    rogue: dict[str, tuple[Path, Path]],
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    calls: list[Any] = []

    async def handler(req: dict[str, Any]) -> Any:
        calls.append(req)
        return "ok"

    @arun
    async def scenario() -> None:
        a, b = await pair(pki, None)
        a.set_handler(handler)
        try:
            cert, key = rogue[kind] if kind != "no_cert" else (None, None)
            # it trusts the real CA, so only *its own* certificate is at fault
            reader, writer = await raw_client(a.port, pki["a"].ca, cert, key)
            # send a valid hello and request anyway: none of it may ever be read
            writer.write(encode({"kind": "hello", "id": 0, "node": "b"}))
            req = {"kind": "req", "id": 1, "target": "kv", "partition": None, "method": "x"}
            writer.write(encode({**req, "deadline": 5.0, "idem": None, "body": None}))
            with contextlib.suppress(OSError):
                await writer.drain()
            assert await refused(reader)
            writer.close()
            await wait_until(
                lambda: any(r.getMessage() == "refused TLS peer" for r in caplog.records), what="log line"
            )
            assert calls == []
            assert a.stats["refused"] == 0  # never reached the hello stage
            assert (await b.request("a", "kv", "x", timeout=5)) == "ok"
            assert len(calls) == 1
        finally:
            await a.stop()
            await b.stop()

    with caplog.at_level(logging.INFO, logger="euca_runtime"):
        scenario()


@arun
async def test_untrusted_endpoint_cannot_join(
    pki: dict[str, NodePki], rogue: dict[str, tuple[Path, Path]]
) -> None:
    """A whole endpoint named 'b' with an other-CA certificate: neither direction works."""
    a = endpoint("a", pki)
    a.set_handler(echo)
    cert, key = rogue["other_ca"]
    evil = Endpoint(
        "b",
        HOST,
        0,
        server_context(pki["a"].ca, cert, key),
        client_context(pki["a"].ca, cert, key),
        peers={},
        options=FAST,
    )
    async with running(a, evil):
        evil.set_peer("a", HOST, a.port)
        a.set_peer("b", HOST, evil.port)
        await wait_until(lambda: evil._links["a"].state == "down", what="evil's dial to fail")
        await wait_until(lambda: a._links["b"].state == "down", what="a's dial to fail")
        with pytest.raises(PeerUnavailable):
            await evil.request("a", "kv", "x", timeout=5)
        with pytest.raises(PeerUnavailable):
            await a.request("b", "kv", "x", timeout=5)
        assert a.last_heard("b") is None and evil.last_heard("a") is None


def test_cn_mismatch_refused(pki: dict[str, NodePki], caplog: pytest.LogCaptureFixture) -> None:
    @arun
    async def scenario() -> None:
        a, b = await pair(pki, None)
        a.set_handler(echo)
        try:
            # inbound: a valid certificate for c, claiming to be b
            reader, writer = await raw_client(a.port, pki["c"].ca, pki["c"].cert, pki["c"].key)
            writer.write(encode({"kind": "hello", "id": 0, "node": "b"}))
            await writer.drain()
            assert await refused(reader)
            writer.close()
            await wait_until(lambda: a.stats["refused"] == 1, what="refusal")
            assert any("certificate CN is 'c'" in str(getattr(r, "reason", "")) for r in caplog.records)
            # outbound: the table says "c" lives where b listens; b's certificate says otherwise
            a.set_peer("c", HOST, b.port)
            await wait_until(lambda: a._links["c"].state == "down", what="dial to fail")
            assert "CN is 'b', expected 'c'" in a._links["c"].last_error
            with pytest.raises(PeerUnavailable):
                await a.request("c", "kv", "x", timeout=5)
            assert (await b.request("a", "kv", "x", 1, timeout=5))["body"] == 1
        finally:
            await a.stop()
            await b.stop()

    with caplog.at_level(logging.INFO, logger="euca_runtime"):
        scenario()
