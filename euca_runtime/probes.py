"""Arbitrator probes: a TCP connect to ``host:port`` or an ICMP echo to ``host`` (thin I/O).

ICMP needs one of two kernel permissions, tried in this order:

1. an unprivileged ICMP *datagram* socket (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``),
   allowed when the process's group is inside ``net.ipv4.ping_group_range`` (the kernel
   default ``1 0`` allows nobody; many distributions set ``0 2147483647``);
2. a raw socket, which needs ``CAP_NET_RAW`` (the Ansible unit grants it to arbitrators).

With neither, `IcmpPinger.open` raises `IcmpUnavailable` whose message says what to change.
The arbitrator then does not probe at all (it goes NOTREADY with that message) rather than
report a route it cannot see as DOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import struct
import time

from euca_runtime.config import ProbeTarget
from euca_runtime.routes import ProbeResult

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129


class IcmpUnavailable(OSError):
    """Neither an ICMP datagram socket nor a raw socket could be opened."""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes, v6: bool = False) -> bytes:
    """An ICMP (or ICMPv6) echo request; the v6 checksum is left to the kernel."""
    kind = ICMP6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST
    header = struct.pack("!BBHHH", kind, 0, 0, ident & 0xFFFF, seq & 0xFFFF)
    if v6:
        return header + payload
    csum = _checksum(header + payload)
    return struct.pack("!BBHHH", kind, 0, csum, ident & 0xFFFF, seq & 0xFFFF) + payload


def _family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class IcmpPinger:
    """One ICMP socket per address family, opened once, shared by every ICMP target."""

    def __init__(self, sock: socket.socket, mode: str, family: int) -> None:
        self.sock = sock
        self.mode = mode  # "dgram" | "raw"
        self.family = family
        self._ident = os.getpid() & 0xFFFF
        self._seq = itertools.count(1)
        self._waiters: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(
        cls, family: int = socket.AF_INET, *, allow_dgram: bool = True, allow_raw: bool = True
    ) -> IcmpPinger:
        """Open the best ICMP socket the process may have (see the module docstring)."""
        proto = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
        errors = []
        if allow_dgram:
            try:
                s = socket.socket(family, socket.SOCK_DGRAM, proto)
                s.setblocking(False)
                return cls(s, "dgram", family)
            except OSError as exc:
                errors.append(f"ICMP datagram socket: {exc.strerror or exc}")
        if allow_raw:
            try:
                s = socket.socket(family, socket.SOCK_RAW, proto)
                s.setblocking(False)
                return cls(s, "raw", family)
            except OSError as exc:
                errors.append(f"raw socket: {exc.strerror or exc}")
        sysctl = "net.ipv4.ping_group_range"  # the same sysctl governs ICMPv6 datagram sockets
        raise IcmpUnavailable(
            errno.EPERM,
            "ICMP probes are not possible for this process ("
            + "; ".join(errors)
            + f"): allow its group (gid {os.getgid()}) in {sysctl}, e.g. "
            f"`sysctl -w {sysctl}='0 2147483647'`, or give it CAP_NET_RAW "
            "(systemd: AmbientCapabilities=CAP_NET_RAW), or use tcp targets",
        )

    def close(self) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _on_readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._dispatch(data, str(addr[0]))

    def _dispatch(self, data: bytes, source: str) -> None:
        if self.mode == "raw" and self.family == socket.AF_INET:
            if len(data) < 20:
                return
            data = data[(data[0] & 0x0F) * 4 :]  # strip the IPv4 header
        if len(data) < 8:
            return
        kind, _code, _csum, ident, seq = struct.unpack("!BBHHH", data[:8])
        if kind not in (ICMP_ECHO_REPLY, ICMP6_ECHO_REPLY):
            return
        # A datagram socket's kernel rewrites the identifier (to the socket's "port") and
        # delivers only this socket's replies; a raw socket sees every reply, so check it.
        if self.mode == "raw" and ident != self._ident:
            return
        fut = self._waiters.get((source, seq))
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def ping(self, host: str, timeout: float) -> ProbeResult:
        """One echo request to `host`; reachable if the reply comes back within `timeout`."""
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, family=self.family, type=socket.SOCK_DGRAM), timeout
            )
        except (OSError, TimeoutError) as exc:
            return ProbeResult(False, f"cannot resolve: {exc}", time.monotonic() - t0)
        addr = str(infos[0][4][0])
        if self._loop is not loop:
            loop.add_reader(self.sock.fileno(), self._on_readable)
            self._loop = loop
        seq = next(self._seq) & 0xFFFF
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters[(addr, seq)] = fut
        try:
            packet = echo_request(self._ident, seq, b"euca-arbitrator", self.family == socket.AF_INET6)
            try:
                self.sock.sendto(packet, (addr, 0))
            except OSError as exc:
                return ProbeResult(False, f"send failed: {exc.strerror or exc}", time.monotonic() - t0)
            try:
                await asyncio.wait_for(fut, max(0.0, timeout - (time.monotonic() - t0)))
            except TimeoutError:
                return ProbeResult(False, f"no echo reply within {timeout:g} s", time.monotonic() - t0)
            return ProbeResult(True, "", time.monotonic() - t0)
        finally:
            self._waiters.pop((addr, seq), None)


async def tcp_probe(host: str, port: int, timeout: float) -> ProbeResult:
    """A TCP connect to host:port, closed at once; reachable if it is accepted in time."""
    t0 = time.monotonic()
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return ProbeResult(False, f"connect timed out after {timeout:g} s", time.monotonic() - t0)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        return ProbeResult(False, why, time.monotonic() - t0)
    elapsed = time.monotonic() - t0
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 0.2)
    return ProbeResult(True, "", elapsed)


class Prober:
    """Probes any `ProbeTarget`; opens the ICMP sockets it needs up front (`open`)."""

    def __init__(self) -> None:
        self._icmp: dict[int, IcmpPinger] = {}

    def open(self, targets: list[ProbeTarget]) -> None:
        """Open an ICMP socket per family the targets need; raises `IcmpUnavailable`."""
        for t in targets:
            if t.kind == "icmp":
                fam = _family_of(t.host)
                if fam not in self._icmp:
                    self._icmp[fam] = IcmpPinger.open(fam)

    @property
    def icmp_modes(self) -> dict[str, str]:
        return {("ipv6" if f == socket.AF_INET6 else "ipv4"): p.mode for f, p in self._icmp.items()}

    async def probe(self, target: ProbeTarget, timeout: float) -> ProbeResult:
        if target.kind == "tcp":
            assert target.port is not None
            return await tcp_probe(target.host, target.port, timeout)
        pinger = self._icmp.get(_family_of(target.host))
        if pinger is None:
            return ProbeResult(False, "no ICMP socket open (call Prober.open)")
        return await pinger.ping(target.host, timeout)

    async def round(self, targets: list[ProbeTarget], timeout: float) -> dict[str, ProbeResult]:
        """Every target probed once, concurrently; keyed by ``str(target)``."""
        results = await asyncio.gather(*(self.probe(t, timeout) for t in targets))
        return {str(t): r for t, r in zip(targets, results, strict=True)}

    def close(self) -> None:
        for p in self._icmp.values():
            p.close()
        self._icmp.clear()


__all__ = ["IcmpPinger", "IcmpUnavailable", "Prober", "echo_request", "tcp_probe"]
