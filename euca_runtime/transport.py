"""The bus transport: one asyncio TCP + mutual-TLS endpoint per runtime process.

Model
-----
* Peers are named by node name; ``Endpoint.peers`` maps a name to ``(host, port)`` and may
  change at run time (:meth:`Endpoint.set_peer`, :meth:`Endpoint.remove_peer`).
* For every peer in the table the endpoint keeps one *outbound link*: it dials, runs the
  TLS handshake (the peer's certificate must come from the cluster CA and its CN must be
  the peer's name), exchanges ``hello`` frames, and redials with exponential backoff and
  jitter whenever the connection is lost. Its own requests go out on that link.
* Peers dial us too. An *inbound* connection is accepted only after the TLS handshake
  (a client without a certificate from the cluster CA never gets that far) and a
  ``hello`` whose node name equals the client certificate's CN. Requests arriving on any
  connection are answered on the same connection.
* Every established connection, in either direction, carries a heartbeat every
  ``heartbeat_interval``; any frame from a peer refreshes its ``last_heard`` (monotonic),
  from which the layer above reads :meth:`Endpoint.heartbeat_age` and
  :meth:`Endpoint.suspected`. A connection silent for ``idle_timeout`` is closed (and, if
  outbound, redialled), which catches half-open TCP connections.
* A malformed or oversized frame (or a protocol violation) closes that one connection with
  a warning naming the peer; everything else keeps running.

Sending: a frame goes straight into the connection's transport when nothing is queued before
it and the transport has nothing buffered (the common case: a request or an answer leaves in
the same loop turn it was made, which is most of the bus's share of a replicated write's
latency); otherwise it joins the queue, which the connection's writer drains in order.

Back-pressure: each connection has a bounded queue of outgoing frames. :meth:`request`
*awaits* free space (bounded by the request's own deadline, then ``DeadlineExceeded``);
heartbeats are dropped instead when the queue is full, since a full queue already means
the link is stalled.

Failing fast: :meth:`request` raises :class:`PeerUnavailable` at once when the peer is not
in the table, when its link is down (the last dial failed; the link keeps redialling in
the background), or when the connection is lost while the request is in flight. It waits
(up to the deadline) only while a dial is in progress. Retrying, possibly against
another instance, is the caller's business; the idempotency key makes that safe.

Idempotency: a request with an idempotency key (``idem``) runs the handler at most once
per key while the key is cached (bounded entries, TTL): a retry of a running request waits
for the first execution, and a retry of a finished one gets the cached response.
Failed executions are not cached, so a retry after an error runs again. Keys are global
to the endpoint, not per peer, so a request retried through another forwarder is still
recognised: callers must make them unique (e.g. ``uuid4().hex``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from euca_runtime.clock import Clock, RealClock
from euca_runtime.frames import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, encode
from euca_runtime.log import get_logger
from euca_runtime.tls import common_name

log = get_logger("bus")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
"""``async def handler(request) -> body``.

``request`` is the decoded ``req`` envelope (``target``, ``partition``, ``method``, ``idem``,
``body``, ``deadline``, ``id``) plus two local fields: ``peer`` (the sender's node name,
authenticated by its certificate) and ``expires_at`` (the request's deadline on this
process's monotonic clock). Return any msgpack-serialisable body; raise
:class:`RemoteError` to send a typed error, any other exception is sent as an error named
after its class (and logged).
"""


class BusError(Exception):
    """Base class of transport errors."""


class PeerUnavailable(BusError):
    """The peer is unknown, unreachable, or the connection was lost with the request in flight."""


class DeadlineExceeded(BusError):
    """No response arrived before the request's deadline."""


class RemoteError(BusError):
    """The peer's handler answered with an error. Raise it in a handler to choose ``type``."""

    def __init__(self, type_: str, message: str, peer: str | None = None) -> None:
        super().__init__(f"{type_}: {message}" + (f" (from {peer})" if peer else ""))
        self.type = type_
        self.message = message
        self.peer = peer


class HandshakeError(BusError):
    """The peer failed the hello exchange or its certificate does not match its name."""


@dataclass(frozen=True)
class TransportOptions:
    """Tunables of an :class:`Endpoint` (seconds unless stated)."""

    heartbeat_interval: float = 0.1
    suspect_after: float = 1.0
    idle_timeout: float = 5.0
    connect_timeout: float = 2.0  # TCP connect + TLS handshake + hello
    backoff_initial: float = 0.05
    backoff_max: float = 2.0
    max_frame: int = DEFAULT_MAX_FRAME  # bytes
    queue_size: int = 1024  # frames per connection
    idem_ttl: float = 120.0
    idem_max_entries: int = 10_000

    def backoff(self, attempt: int) -> float:
        """Delay before redial number ``attempt`` (0-based): exponential, capped, jittered."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(attempt, 30))
        return random.uniform(ceiling / 2, ceiling)


def _error(type_: str, message: str) -> dict[str, Any]:
    return {"ok": False, "body": None, "error": {"type": type_, "message": message}}


class IdempotencyCache:
    """Responses by idempotency key: bounded, with a TTL counted from the first execution.

    An entry holds a future: pending while the first execution runs, then its response.
    When full, the oldest entry is evicted (even a pending one).
    """

    def __init__(self, clock: Clock, ttl: float, max_entries: int) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max_entries
        self._entries: collections.OrderedDict[str, tuple[float, asyncio.Future[dict[str, Any]]]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, key: str) -> tuple[asyncio.Future[dict[str, Any]], bool]:
        """Return ``(future, owner)``; ``owner`` is True if the caller must execute and resolve it."""
        now = self._clock.monotonic()
        while self._entries:  # insertion order is expiry order: prune from the front
            oldest = next(iter(self._entries.values()))
            if oldest[0] > now:
                break
            self._entries.popitem(last=False)
        hit = self._entries.get(key)
        if hit is not None:
            return hit[1], False
        while len(self._entries) >= self._max:
            self._entries.popitem(last=False)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._entries[key] = (now + self._ttl, fut)
        return fut, True

    def forget(self, key: str, fut: asyncio.Future[dict[str, Any]]) -> None:
        """Drop ``key`` if it still maps to ``fut`` (so a retry executes again)."""
        hit = self._entries.get(key)
        if hit is not None and hit[1] is fut:
            del self._entries[key]


@dataclass
class _Out:
    """One queued outgoing message. Requests carry their absolute expiry and response future."""

    env: dict[str, Any]
    expires_at: float | None = None
    fut: asyncio.Future[dict[str, Any]] | None = None


class _FrameStream:
    """Whole messages from a StreamReader, through the incremental decoder."""

    def __init__(self, reader: asyncio.StreamReader, max_frame: int) -> None:
        self._reader = reader
        self._decoder = FrameDecoder(max_frame)
        self._ready: collections.deque[dict[str, Any]] = collections.deque()

    async def next(self) -> dict[str, Any] | None:
        """The next message, or None at end of stream. Raises FrameError on a bad frame."""
        while not self._ready:
            data = await self._reader.read(65536)
            if not data:
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.popleft()


class _Connection:
    """One authenticated connection (either direction): reader, writer and heartbeat tasks."""

    def __init__(
        self, ep: Endpoint, stream: _FrameStream, writer: asyncio.StreamWriter, peer: str, outbound: bool
    ) -> None:
        self.ep = ep
        peername = writer.get_extra_info("peername")
        self.address = f"{peername[0]}:{peername[1]}" if peername else "?"  # the remote end
        self.stream = stream
        self.writer = writer
        self.peer = peer
        self.outbound = outbound
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.closed = asyncio.Event()
        self.close_reason = ""
        self._out: collections.deque[_Out] = collections.deque()
        self._has_data = asyncio.Event()
        self._has_space = asyncio.Event()
        self._hb_seq = itertools.count()

    def _extra(self, **more: Any) -> dict[str, Any]:
        return {"node": self.ep.node, "peer": self.peer, "outbound": self.outbound, **more}

    # -- sending --

    async def send(self, item: _Out) -> None:
        """Queue ``item``, awaiting space while the queue is full (back-pressure)."""
        while len(self._out) >= self.ep.options.queue_size and not self.closed.is_set():
            self.ep.stats["send_waits"] += 1
            self._has_space.clear()
            await self._has_space.wait()
        if self.closed.is_set():
            raise PeerUnavailable(f"connection to {self.peer} closed: {self.close_reason}")
        self._push(item)

    def send_nowait(self, item: _Out) -> bool:
        """Queue ``item`` unless the queue is full or closed; return whether it was queued."""
        if self.closed.is_set() or len(self._out) >= self.ep.options.queue_size:
            self.ep.stats["frames_dropped"] += 1
            return False
        self._push(item)
        return True

    def _push(self, item: _Out) -> None:
        """Write ``item`` now if nothing is queued before it and the transport is not backed
        up (saves a loop turn per frame); else queue it for the writer (order is kept: a
        frame is written directly only while the queue is empty)."""
        if not self._out and self.writer.transport.get_write_buffer_size() == 0:
            frame = self._frame(item)
            if frame is not None:
                self.writer.write(frame)
                self.ep.stats["frames_direct"] += 1
            return
        self._out.append(item)
        self._has_data.set()

    def _frame(self, item: _Out) -> bytes | None:
        env = item.env
        if env["kind"] == "req":
            assert item.expires_at is not None
            remaining = item.expires_at - self.ep.clock.monotonic()
            if remaining <= 0 or (item.fut is not None and item.fut.done()):
                return None  # the caller has given up; don't make the peer work for nothing
            env["deadline"] = remaining
        try:
            return encode(env, self.ep.options.max_frame)
        except FrameError as exc:
            if env["kind"] == "resp":
                log.warning("response not sendable", extra=self._extra(reason=str(exc)))
                return encode({"kind": "resp", "id": env["id"], **_error("BadResponse", str(exc))})
            if item.fut is not None and not item.fut.done():
                item.fut.set_exception(exc)
                return None
            raise

    async def _write_loop(self) -> str:
        while True:
            while not self._out:
                self._has_data.clear()
                await self._has_data.wait()
            batch = list(self._out)
            self._out.clear()
            self._has_space.set()
            for item in batch:
                frame = self._frame(item)
                if frame is not None:
                    self.writer.write(frame)
            try:
                await self.writer.drain()
            except OSError as exc:
                return f"write failed: {exc}"

    async def _heartbeat_loop(self) -> str:
        while True:
            self.send_nowait(_Out({"kind": "hb", "id": next(self._hb_seq)}))
            await asyncio.sleep(self.ep.options.heartbeat_interval)

    # -- receiving --

    async def _read_loop(self) -> str:
        idle = self.ep.options.idle_timeout
        while True:
            try:
                async with asyncio.timeout(idle):
                    msg = await self.stream.next()
            except TimeoutError:
                return f"nothing heard for {idle} s"
            except FrameError as exc:
                self.ep.stats["frame_errors"] += 1
                log.warning("closing connection: bad frame", extra=self._extra(reason=str(exc)))
                return f"bad frame: {exc}"
            except OSError as exc:  # includes ssl.SSLError, ConnectionResetError
                return f"read failed: {exc}"
            if msg is None:
                return "closed by peer"
            self.ep._heard(self.peer)
            kind = msg["kind"]
            if kind == "req":
                self.ep._spawn(self._serve(msg))
            elif kind == "resp":
                fut = self.pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif kind == "hello":
                self.ep.stats["frame_errors"] += 1
                log.warning("closing connection: unexpected hello", extra=self._extra())
                return "protocol violation: hello after handshake"
            # "hb": nothing to do beyond _heard

    async def _serve(self, msg: dict[str, Any]) -> None:
        result = await self.ep._execute(msg, self.peer)
        with contextlib.suppress(PeerUnavailable):  # the connection is gone: nobody to answer
            await self.send(_Out({"kind": "resp", "id": msg["id"], **result}))

    # -- lifecycle --

    async def run(self) -> str:
        """Serve the connection until it ends; return why it ended."""
        self.ep._heard(self.peer)
        self.ep._conns.add(self)
        tasks = [
            asyncio.create_task(self._read_loop()),
            asyncio.create_task(self._write_loop()),
            asyncio.create_task(self._heartbeat_loop()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            try:
                self.close_reason = next(iter(done)).result()
            except Exception as exc:  # a bug here must cost one connection, not the link
                log.exception("connection task failed", extra=self._extra())
                self.close_reason = f"internal error: {exc!r}"
        finally:
            if not self.close_reason:
                self.close_reason = "endpoint stopped"
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._teardown()
        return self.close_reason

    async def _teardown(self) -> None:
        self.closed.set()
        self._has_space.set()  # wake senders blocked on a full queue; they see `closed`
        self.ep._conns.discard(self)
        error = PeerUnavailable(f"connection to {self.peer} lost: {self.close_reason}")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(error)
        self.pending.clear()
        log.info("connection closed", extra=self._extra(reason=self.close_reason))
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


class _Link:
    """The outbound side towards one peer: dial, serve, redial with backoff."""

    def __init__(self, ep: Endpoint, peer: str) -> None:
        self.ep = ep
        self.peer = peer
        self.state = "connecting"  # connecting | up | down
        self.conn: _Connection | None = None
        self.last_error = ""
        self.changed = asyncio.Condition()
        self._kick = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"link {ep.node}->{peer}")

    async def _set(self, state: str, conn: _Connection | None = None) -> None:
        async with self.changed:
            self.state, self.conn = state, conn
            self.changed.notify_all()

    def kick(self) -> None:
        """Cut the current backoff short (e.g. the peer just dialled us, so it is back)."""
        self._kick.set()

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._kick.wait()

    async def _run(self) -> None:
        attempt = 0
        extra = {"node": self.ep.node, "peer": self.peer}
        while True:
            address = self.ep.peers.get(self.peer)
            if address is None:
                return
            self._kick.clear()  # kicks from here on cut the next pause short
            await self._set("connecting")
            try:
                conn = await self.ep._dial(self.peer, address)
            except (OSError, FrameError, HandshakeError) as exc:  # OSError covers SSL and timeouts
                self.last_error = f"{type(exc).__name__}: {exc}"
                level = logging.WARNING if isinstance(exc, HandshakeError) else logging.INFO
                log.log(
                    level if attempt == 0 else logging.DEBUG,
                    "cannot connect",
                    extra={**extra, "reason": self.last_error, "attempt": attempt},
                )
                await self._set("down")
                await self._pause(self.ep.options.backoff(attempt))
                attempt += 1
                continue
            attempt = 0
            log.info("connected", extra={**extra, "address": f"{address[0]}:{address[1]}"})
            await self._set("up", conn)
            reason = await conn.run()
            self.last_error = reason
            await self._set("down")
            await self._pause(self.ep.options.backoff(0))

    async def connection(self) -> _Connection:
        """The live connection; waits while a dial is in progress, fails fast when down."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.state != "connecting")
            if self.state == "up" and self.conn is not None:
                return self.conn
        raise PeerUnavailable(f"{self.peer} unreachable: {self.last_error or self.state}")


class Endpoint:
    """One runtime process's bus endpoint. See the module docstring for the model.

    Usage::

        ep = Endpoint("node-a", "127.0.0.1", 7100, server_ctx, client_ctx,
                      peers={"node-b": ("127.0.0.2", 7100)})
        ep.set_handler(handler)
        await ep.start()
        body = await ep.request("node-b", "kv", "get", {"key": "x"}, timeout=2.0,
                                idempotency_key=uuid.uuid4().hex)
        await ep.stop()
    """

    def __init__(
        self,
        node: str,
        host: str,
        port: int,
        server_ssl: ssl.SSLContext,
        client_ssl: ssl.SSLContext,
        clock: Clock | None = None,
        *,
        peers: dict[str, tuple[str, int]] | None = None,
        options: TransportOptions | None = None,
    ) -> None:
        self.node = node
        self.host = host
        self.port = port  # 0 picks an ephemeral port; the real one is here after start()
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.clock: Clock = clock or RealClock()
        self.options = options or TransportOptions()
        self.peers: dict[str, tuple[str, int]] = dict(peers or {})
        self.stats: collections.Counter[str] = collections.Counter()
        self._handler: Handler | None = None
        self._server: asyncio.Server | None = None
        self._links: dict[str, _Link] = {}
        self._conns: set[_Connection] = set()
        self._accept_tasks: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_heard: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._idem = IdempotencyCache(self.clock, self.options.idem_ttl, self.options.idem_max_entries)
        self._log_extra = {"node": node}

    # -- lifecycle --

    def set_handler(self, handler: Handler | None) -> None:
        """Install the one callback that serves incoming requests (None: answer ``NoHandler``)."""
        self._handler = handler

    async def start(self) -> None:
        """Listen, and start a link to every peer in the table."""
        self._server = await asyncio.start_server(
            self._on_accept,
            self.host,
            self.port,
            ssl=self.server_ssl,
            ssl_handshake_timeout=self.options.connect_timeout,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening", extra={**self._log_extra, "address": f"{self.host}:{self.port}"})
        for peer in self.peers:
            self._ensure_link(peer)

    async def stop(self) -> None:
        """Stop listening, close every connection, cancel running handlers."""
        if self._server is not None:
            self._server.close()
        tasks = [link.task for link in self._links.values()]
        tasks += [*self._accept_tasks, *self._tasks]
        self._links.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        log.info("stopped", extra=self._log_extra)

    # -- peer table --

    def set_peer(self, name: str, host: str, port: int) -> None:
        """Add or move a peer. A moved peer's connection is closed and redialled."""
        old = self.peers.get(name)
        self.peers[name] = (host, port)
        link = self._links.get(name)
        if link is not None and old != (host, port):
            if link.conn is not None:
                link.conn.writer.close()  # its read loop ends; the link redials the new address
            link.kick()
        elif self._server is not None:
            self._ensure_link(name)

    def remove_peer(self, name: str) -> None:
        """Forget a peer and drop our link to it (its inbound connections, if any, stay)."""
        self.peers.pop(name, None)
        link = self._links.pop(name, None)
        if link is not None:
            link.task.cancel()

    def _ensure_link(self, peer: str) -> _Link:
        link = self._links.get(peer)
        if link is None:
            if peer not in self.peers:
                raise PeerUnavailable(f"unknown peer {peer!r}")
            link = self._links[peer] = _Link(self, peer)
        return link

    # -- liveness --

    def _heard(self, peer: str) -> None:
        self._last_heard[peer] = self.clock.monotonic()

    def last_heard(self, peer: str) -> float | None:
        """Monotonic time of the last frame received from ``peer`` on any connection."""
        return self._last_heard.get(peer)

    def heartbeat_age(self, peer: str) -> float | None:
        """Seconds since anything was heard from ``peer`` (None: never)."""
        heard = self._last_heard.get(peer)
        return None if heard is None else self.clock.monotonic() - heard

    def suspected(self, peer: str) -> bool:
        """True if ``peer`` was never heard or has been silent longer than ``suspect_after``."""
        age = self.heartbeat_age(peer)
        return age is None or age > self.options.suspect_after

    def connected(self, peer: str) -> bool:
        """True if our outbound link to ``peer`` is up."""
        link = self._links.get(peer)
        return link is not None and link.state == "up"

    def peer_status(self) -> dict[str, dict[str, Any]]:
        """Per known peer: link state, connected address, last error, heartbeat age (s), suspicion."""
        names = set(self.peers) | set(self._last_heard)
        out = {}
        for name in sorted(names):
            link = self._links.get(name)
            conn = link.conn if link else None
            out[name] = {
                "link": link.state if link else None,
                "address": conn.address if conn else None,
                "last_error": link.last_error if link else "",
                "heartbeat_age": self.heartbeat_age(name),
                "suspected": self.suspected(name),
            }
        return out

    # -- requests --

    async def request(
        self,
        peer: str,
        target: str,
        method: str,
        body: Any = None,
        *,
        partition: str | None = None,
        timeout: float,
        idempotency_key: str | None = None,
    ) -> Any:
        """Send a request to ``peer`` and return the response body.

        ``timeout`` is the whole budget (queueing, sending, remote execution); the remote
        side sees what is left of it. ``peer == self.node`` calls the local handler
        directly (no serialisation) with the same idempotency rules.

        Raises :class:`DeadlineExceeded`, :class:`PeerUnavailable`, :class:`RemoteError`,
        or :class:`~euca_runtime.frames.FrameError` if the request cannot be encoded.
        """
        if timeout <= 0:
            raise DeadlineExceeded(f"{peer} {target}.{method}: no time left")
        expires_at = self.clock.monotonic() + timeout
        env = self._envelope(target, partition, method, timeout, idempotency_key, body)
        try:
            async with asyncio.timeout(timeout):
                if peer == self.node:
                    resp = await asyncio.shield(self._spawn(self._execute(env, self.node)))
                    return self._answer(resp, peer, target, method)
                conn = await self._ensure_link(peer).connection()
                fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                await conn.send(_Out(env, expires_at, fut))
                # send() returned without yielding after queueing: nothing was written or
                # torn down in between, so registering the future now is race-free.
                conn.pending[env["id"]] = fut
        except TimeoutError:
            raise DeadlineExceeded(f"{peer} {target}.{method}: no response within {timeout} s") from None
        return await self._response(conn, env["id"], fut, expires_at, timeout, peer, target, method)

    def send_request(
        self,
        peer: str,
        target: str,
        method: str,
        body: Any = None,
        *,
        partition: str | None = None,
        timeout: float,
        idempotency_key: str | None = None,
    ) -> Awaitable[Any]:
        """`request`, with the request's frame written (or queued in order) before this returns
        when the link to `peer` is up and its queue has room; await the result for the
        response, as with `request`. Otherwise (the peer is this node, the link is down or
        dialling, the queue is full) the awaitable is `request` itself, which waits for those.

        For a caller that must have the frame on its way before it goes on (the primary's
        send-first write path): no loop turn, no task in between.
        """
        link = self._links.get(peer)
        conn = link.conn if link is not None and link.state == "up" else None
        if (
            timeout <= 0
            or peer == self.node
            or conn is None
            or conn.closed.is_set()
            or len(conn._out) >= self.options.queue_size
        ):
            return self.request(
                peer,
                target,
                method,
                body,
                partition=partition,
                timeout=timeout,
                idempotency_key=idempotency_key,
            )
        env = self._envelope(target, partition, method, timeout, idempotency_key, body)
        expires_at = self.clock.monotonic() + timeout
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        conn._push(_Out(env, expires_at, fut))
        conn.pending[env["id"]] = fut
        return self._response(conn, env["id"], fut, expires_at, timeout, peer, target, method)

    async def _response(
        self,
        conn: _Connection,
        rid: int,
        fut: asyncio.Future[dict[str, Any]],
        expires_at: float,
        timeout: float,
        peer: str,
        target: str,
        method: str,
    ) -> Any:
        """Wait until `expires_at` for the response to request `rid` sent on `conn` (`timeout`
        is the request's whole budget, for the error message)."""
        try:
            async with asyncio.timeout(max(0.0, expires_at - self.clock.monotonic())):
                resp = await fut
        except TimeoutError:
            raise DeadlineExceeded(f"{peer} {target}.{method}: no response within {timeout} s") from None
        finally:
            conn.pending.pop(rid, None)
        return self._answer(resp, peer, target, method)

    def _envelope(
        self,
        target: str,
        partition: str | None,
        method: str,
        timeout: float,
        idempotency_key: str | None,
        body: Any,
    ) -> dict[str, Any]:
        self.stats["requests_sent"] += 1
        return {
            "kind": "req",
            "id": next(self._ids),
            "target": target,
            "partition": partition,
            "method": method,
            "deadline": timeout,
            "idem": idempotency_key,
            "body": body,
        }

    @staticmethod
    def _answer(resp: dict[str, Any], peer: str, target: str, method: str) -> Any:
        if resp["ok"]:
            return resp["body"]
        error = resp["error"]
        if error["type"] == "DeadlineExceeded":
            raise DeadlineExceeded(f"{peer} {target}.{method}: {error['message']}")
        raise RemoteError(error["type"], error["message"], peer)

    # -- internals --

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _execute(self, msg: dict[str, Any], peer: str) -> dict[str, Any]:
        """Serve one request (at most once per idempotency key); return the response fields."""
        self.stats["requests_served"] += 1
        if msg["deadline"] <= 0:
            return _error("DeadlineExceeded", "request arrived after its deadline")
        request = {**msg, "peer": peer, "expires_at": self.clock.monotonic() + msg["deadline"]}
        key = msg.get("idem")
        if key is None:
            return await self._call_handler(request)
        fut, owner = self._idem.claim(key)
        if not owner:
            self.stats["idempotent_hits"] += 1
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                if fut.cancelled():  # the first execution was cancelled, not us
                    return _error("Cancelled", "the first execution of this request was cancelled")
                raise
        try:
            result = await self._call_handler(request)
        except BaseException:
            self._idem.forget(key, fut)
            fut.cancel()
            raise
        if not result["ok"]:
            self._idem.forget(key, fut)  # failures are not cached: a retry executes again
        fut.set_result(result)
        return result

    async def _call_handler(self, request: dict[str, Any]) -> dict[str, Any]:
        handler = self._handler
        if handler is None:
            return _error("NoHandler", f"{self.node} has no request handler")
        try:
            body = await handler(request)
        except RemoteError as exc:
            return _error(exc.type, exc.message)
        except Exception as exc:
            log.error(
                "request handler raised",
                exc_info=True,
                extra={**self._log_extra, "peer": request["peer"], "target": request["target"]},
            )
            return _error(type(exc).__name__, str(exc))
        return {"ok": True, "body": body}

    async def _dial(self, peer: str, address: tuple[str, int]) -> _Connection:
        """Connect, check the server's CN, exchange hellos."""
        async with asyncio.timeout(self.options.connect_timeout):
            reader, writer = await asyncio.open_connection(address[0], address[1], ssl=self.client_ssl)
            try:
                cn = common_name(writer.get_extra_info("peercert"))
                if cn != peer:
                    raise HandshakeError(f"certificate CN is {cn!r}, expected {peer!r}")
                writer.write(encode({"kind": "hello", "id": 0, "node": self.node}))
                stream = _FrameStream(reader, self.options.max_frame)
                hello = await stream.next()
                if hello is None:
                    raise HandshakeError("peer closed the connection during hello")
                if hello["kind"] != "hello" or hello["node"] != peer:
                    raise HandshakeError(f"expected hello from {peer!r}, got {hello.get('kind')!r}")
            except BaseException:
                writer.close()
                raise
        return _Connection(self, stream, writer, peer, outbound=True)

    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one inbound connection (TLS already verified): hello first, then frames."""
        task = asyncio.current_task()
        assert task is not None
        self._accept_tasks.add(task)
        try:
            conn = await self._accept_hello(reader, writer)
            if conn is None:
                return
            link = self._links.get(conn.peer)
            if link is not None and link.state == "down":
                link.kick()  # it dialled us, so it is probably back: stop backing off
            await conn.run()
        except asyncio.CancelledError:
            # Only stop() cancels these. Python 3.11's stream server reports a cancelled
            # client task as an error, so end quietly (teardown has run in conn.run()).
            return
        finally:
            self._accept_tasks.discard(task)

    async def _accept_hello(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Connection | None:
        address = writer.get_extra_info("peername")
        cn = common_name(writer.get_extra_info("peercert"))
        who = cn or str(address)
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                stream = _FrameStream(reader, self.options.max_frame)
                hello = await stream.next()
                if hello is None:
                    raise HandshakeError("closed before hello")
                if hello["kind"] != "hello":
                    raise HandshakeError(f"first message is {hello['kind']!r}, not hello")
                if hello["node"] != cn:
                    raise HandshakeError(f"claims to be {hello['node']!r} but its certificate CN is {cn!r}")
                writer.write(encode({"kind": "hello", "id": 0, "node": self.node}))
        except (HandshakeError, FrameError, OSError) as exc:  # OSError covers SSL and timeouts
            self.stats["refused"] += 1
            log.warning(
                "refused connection",
                extra={**self._log_extra, "peer": who, "address": str(address), "reason": str(exc)},
            )
            writer.close()
            return None
        return _Connection(self, stream, writer, hello["node"], outbound=False)
