"""A userspace stand-in for `tc ... netem delay MS loss PCT%`, for kernels without sch_netem.

An iptables rule sends the packets a host emits to an NFQUEUE; this process, run inside the
host's network namespace, reads that queue over netlink. Each packet is lost with probability
`loss`; the others leave `delay` after they arrived, first in first out (the delay is
constant, so the order they were sent in is kept, as with netem). Two ways to hold a packet:

* IPv4 TCP segments are *detached*: their verdict is DROP at once and a copy is sent again,
  after the delay, through a raw socket whose packets carry --mark (the rule lets marked
  packets by). A segment held in the kernel would still count against its socket's
  memory, and TCP Small Queues then lets a sender have only ~1 ms worth of data below the
  socket: 50 ms of delay would cap a stream near 2 segments per round trip (measured:
  0.06 MB/s). netem frees the socket the same way (skb_orphan_partial on enqueue).
* everything else is held in the kernel's queue and given ACCEPT after the delay.

    python -m testbed.delayer --queue N --delay MS --loss PCT [--leader PID] [--mark M]

Only the Python standard library is used: the nfnetlink_queue protocol is a handful of
fixed structs (see linux/netfilter/nfnetlink_queue.h), packed and parsed below. The queue
copies whole packets (NFQNL_COPY_PACKET) and leaves GSO off, so the kernel hands over
MTU-sized segments with their checksums completed, ready to be sent again as they are.

The rule that feeds the queue carries --queue-bypass: if this process dies, the kernel lets
traffic through undelayed rather than dropping it. With --leader, the process exits by itself
when that pid (the container's init) exits, so it never outlives the host it impairs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# --------------------------------------------------------------------------- protocol constants

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # not exported by every Python
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

NFNETLINK_V0 = 0
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2

# Attributes of a NFQNL_MSG_PACKET / NFQNL_MSG_VERDICT message.
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10

# Attributes of a NFQNL_MSG_CONFIG message.
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5

NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_GSO = 1 << 2
ETH_P_IP = 0x0800

NF_DROP = 0
NF_ACCEPT = 1

NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host byte order)
NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the queue number, big endian)
NLATTR = struct.Struct("=HH")  # len, type
PACKET_HDR = struct.Struct("!IHB")  # packet_id, hw_protocol, hook
VERDICT_HDR = struct.Struct("!II")  # verdict, packet_id
CONFIG_CMD = struct.Struct("!BxH")  # command, pad, pf
CONFIG_PARAMS = struct.Struct("!IB")  # copy_range, copy_mode

# Packets held at most (beyond: dropped, as netem's `limit`). netem counts a 64 KiB GSO packet
# as one; here each segment counts, hence more than netem's default 1000.
DEFAULT_LIMIT = 10000
MAX_PACKET = 0xFFFF
SOCKBUF = 16 << 20
# What reinjected copies carry (SO_MARK), so that the queue rule lets them by: "EUCA".
DEFAULT_MARK = 0x45554341


class NfqueueError(Exception):
    """The kernel refused a request, or sent something we cannot read."""


# --------------------------------------------------------------------------- packing


def _align4(n: int) -> int:
    return (n + 3) & ~3


def pack_attr(attr_type: int, data: bytes) -> bytes:
    """One netlink attribute, padded to a 4-byte boundary."""
    length = NLATTR.size + len(data)
    return NLATTR.pack(length, attr_type) + data + b"\0" * (_align4(length) - length)


def pack_message(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    """One netlink message: header then payload (the header's length excludes trailing pad)."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), msg_type, flags, seq, 0) + payload


def _nfq_type(msg: int) -> int:
    return (NFNL_SUBSYS_QUEUE << 8) | msg


def config_message(
    queue: int,
    seq: int,
    *,
    command: int | None = None,
    copy_mode: int | None = None,
    copy_range: int = 0,
    maxlen: int | None = None,
    flags: tuple[int, int] | None = None,
) -> bytes:
    """A NFQNL_MSG_CONFIG request for `queue` that asks for an acknowledgement.

    The kernel applies the command first, then the other attributes, in one call: binding and
    setting the copy mode in one message means no packet ever meets a half-configured queue.
    `flags` is (flags, mask).
    """
    attrs = b""
    if command is not None:
        attrs += pack_attr(NFQA_CFG_CMD, CONFIG_CMD.pack(command, socket.AF_UNSPEC))
    if copy_mode is not None:
        attrs += pack_attr(NFQA_CFG_PARAMS, CONFIG_PARAMS.pack(copy_range, copy_mode))
    if maxlen is not None:
        attrs += pack_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
    if flags is not None:
        attrs += pack_attr(NFQA_CFG_FLAGS, struct.pack("!I", flags[0]))
        attrs += pack_attr(NFQA_CFG_MASK, struct.pack("!I", flags[1]))
    payload = NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue) + attrs
    return pack_message(_nfq_type(NFQNL_MSG_CONFIG), NLM_F_REQUEST | NLM_F_ACK, seq, payload)


def verdict_message(queue: int, seq: int, packet_id: int, verdict: int) -> bytes:
    """A NFQNL_MSG_VERDICT for one packet. No ACK asked: the kernel answers only on error."""
    payload = NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue)
    payload += pack_attr(NFQA_VERDICT_HDR, VERDICT_HDR.pack(verdict, packet_id))
    return pack_message(_nfq_type(NFQNL_MSG_VERDICT), NLM_F_REQUEST, seq, payload)


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Message:
    """One netlink message: its header fields and the payload after the 16-byte header."""

    msg_type: int
    flags: int
    seq: int
    portid: int
    payload: bytes


@dataclass(frozen=True)
class Packet:
    """What a NFQNL_MSG_PACKET tells us: its id (for the verdict) and its bytes."""

    queue: int
    packet_id: int
    hw_protocol: int
    hook: int
    payload: bytes = b""


def parse_messages(buf: bytes) -> Iterator[Message]:
    """Split a datagram read from the netlink socket into messages. Raises on truncation."""
    offset = 0
    while offset < len(buf):
        if len(buf) - offset < NLMSGHDR.size:
            raise NfqueueError(f"truncated netlink header at offset {offset}")
        length, msg_type, flags, seq, portid = NLMSGHDR.unpack_from(buf, offset)
        if length < NLMSGHDR.size or offset + length > len(buf):
            raise NfqueueError(f"bad netlink message length {length} at offset {offset}")
        yield Message(msg_type, flags, seq, portid, bytes(buf[offset + NLMSGHDR.size : offset + length]))
        offset += _align4(length)


def parse_attrs(buf: bytes) -> dict[int, bytes]:
    """Netlink attributes by type (flag bits stripped). The last of a repeated type wins."""
    attrs: dict[int, bytes] = {}
    offset = 0
    while len(buf) - offset >= NLATTR.size:
        length, attr_type = NLATTR.unpack_from(buf, offset)
        if length < NLATTR.size or offset + length > len(buf):
            raise NfqueueError(f"bad netlink attribute length {length} at offset {offset}")
        attrs[attr_type & NLA_TYPE_MASK] = bytes(buf[offset + NLATTR.size : offset + length])
        offset += _align4(length)
    return attrs


def parse_error(msg: Message) -> int:
    """The errno of a NLMSG_ERROR (positive), or 0 for an acknowledgement."""
    if len(msg.payload) < 4:
        raise NfqueueError("truncated NLMSG_ERROR")
    (code,) = struct.unpack_from("=i", msg.payload)
    return -code


def parse_packet(msg: Message) -> Packet:
    """The packet id (and a little more) from a NFQNL_MSG_PACKET message."""
    if msg.msg_type != _nfq_type(NFQNL_MSG_PACKET):
        raise NfqueueError(f"not a queued packet: message type {msg.msg_type:#x}")
    if len(msg.payload) < NFGENMSG.size:
        raise NfqueueError("truncated nfgenmsg")
    _family, _version, queue = NFGENMSG.unpack_from(msg.payload)
    attrs = parse_attrs(msg.payload[NFGENMSG.size :])
    hdr = attrs.get(NFQA_PACKET_HDR)
    if hdr is None or len(hdr) < PACKET_HDR.size:
        raise NfqueueError("queued packet without NFQA_PACKET_HDR")
    packet_id, hw_protocol, hook = PACKET_HDR.unpack_from(hdr)
    return Packet(queue, packet_id, hw_protocol, hook, attrs.get(NFQA_PAYLOAD, b""))


def detachable(packet: Packet) -> str | None:
    """The destination address of an IPv4 TCP segment, which is sent again from a raw socket;
    None for anything else, which is held in the kernel. A TCP segment never needs
    fragmenting here: with GSO off, the kernel segments to the MSS before queueing."""
    data = packet.payload
    if packet.hw_protocol != ETH_P_IP or len(data) < 20 or data[0] >> 4 != 4 or data[9] != socket.IPPROTO_TCP:
        return None
    if (data[0] & 0xF) * 4 > len(data) or int.from_bytes(data[2:4], "big") != len(data):
        return None  # truncated copy (larger than copy_range): let the kernel keep the original
    return socket.inet_ntoa(data[16:20])


# --------------------------------------------------------------------------- the delay line


class DelayLine(Generic[T]):
    """netem's behaviour for one constant delay: lose with probability `loss`, else release
    `delay` seconds after arrival, first in first out; hold `limit` items at most (tail drop).
    Pure: the caller passes the clock, and the items are whatever it needs to send them."""

    def __init__(
        self,
        delay: float,
        loss: float,
        limit: int = DEFAULT_LIMIT,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if delay < 0 or not 0 <= loss <= 1 or limit < 1:
            raise ValueError("delay must be >= 0 seconds, loss a probability in [0, 1], limit >= 1")
        self.delay = delay
        self.loss = loss
        self.limit = limit
        self._rng = rng
        self._fifo: collections.deque[tuple[float, T]] = collections.deque()

    def admit(self, item: T, now: float) -> bool:
        """Take an item in; False means it is lost (random loss, or the line is full)."""
        if self.loss and self._rng() < self.loss:
            return False
        if len(self._fifo) >= self.limit:
            return False
        self._fifo.append((now + self.delay, item))
        return True

    def next_due(self) -> float | None:
        """When the oldest held item is due, or None when none is held."""
        return self._fifo[0][0] if self._fifo else None

    def release(self, now: float) -> list[T]:
        """The items due by `now`, oldest first."""
        out = []
        while self._fifo and self._fifo[0][0] <= now:
            out.append(self._fifo.popleft()[1])
        return out

    def drain(self) -> list[T]:
        """Every held item, oldest first (to let them all go at exit)."""
        out = [item for _, item in self._fifo]
        self._fifo.clear()
        return out

    def __len__(self) -> int:
        return len(self._fifo)


# --------------------------------------------------------------------------- the sockets


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    """A large socket buffer: past the sysctl limit when root (the *BUFFORCE options)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


class NfqueueSocket:
    """A netlink socket bound to one NFQUEUE queue number, in the caller's network namespace."""

    def __init__(self, queue: int, limit: int = DEFAULT_LIMIT) -> None:
        self.queue = queue
        self._seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            _set_buffer(self.sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, SOCKBUF)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            self.sock.bind((0, 0))
            # Since Linux 3.8 the per-family PF_BIND/PF_UNBIND commands are no-ops: binding
            # the queue number is all it takes. GSO off: segments, checksummed (see above).
            self.request(
                command=NFQNL_CFG_CMD_BIND,
                copy_mode=NFQNL_COPY_PACKET,
                copy_range=MAX_PACKET,
                maxlen=limit,
                flags=(0, NFQA_CFG_F_GSO),
            )
        except BaseException:
            self.sock.close()
            raise

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def request(self, **config: object) -> None:
        """Send a config request and wait for its acknowledgement (no packet can be queued
        before the first one, which binds the queue, is acknowledged)."""
        seq = self._next_seq()
        self.sock.send(config_message(self.queue, seq, **config))  # type: ignore[arg-type]
        while True:
            for msg in parse_messages(self.sock.recv(MAX_PACKET + 4096)):
                if msg.msg_type == NLMSG_ERROR and msg.seq == seq:
                    code = parse_error(msg)
                    if code:
                        raise NfqueueError(f"queue {self.queue}: config refused: {os.strerror(code)}")
                    return

    def verdict(self, packet_id: int, verdict: int) -> None:
        self.sock.send(verdict_message(self.queue, self._next_seq(), packet_id, verdict))

    def read(self) -> tuple[list[Packet], list[int]]:
        """Everything readable now, without blocking: (queued packets, errnos the kernel sent)."""
        packets: list[Packet] = []
        errors: list[int] = []
        while True:
            try:
                data = self.sock.recv(MAX_PACKET + 4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return packets, errors
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                errors.append(errno.ENOBUFS)
                continue
            for msg in parse_messages(data):
                if msg.msg_type == NLMSG_ERROR:
                    code = parse_error(msg)
                    if code:
                        errors.append(code)
                elif msg.msg_type == _nfq_type(NFQNL_MSG_PACKET):
                    packets.append(parse_packet(msg))

    def close(self) -> None:
        self.sock.close()


def raw_sender(mark: int) -> socket.socket:
    """A non-blocking raw IPv4 socket that sends whole packets (IPPROTO_RAW implies
    IP_HDRINCL) marked `mark`. The kernel routes each one by its destination and fills in
    the header checksum."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, SOCKBUF)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------- the process


@dataclass(frozen=True)
class Held:
    """A packet on the delay line: a kernel-held one (verdict due) or a detached copy."""

    packet_id: int
    payload: bytes | None = None  # the copy to send, for a detached TCP segment
    dst: str = ""


def _log(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} delayer[{os.getpid()}] {text}", file=sys.stderr, flush=True)


def _open_leader(leader: int | None) -> int | None:
    """A pidfd that becomes readable when `leader` exits; None when not watching one."""
    if leader is None:
        return None
    try:
        return os.pidfd_open(leader)
    except ProcessLookupError:
        _log(f"leader {leader} is gone: nothing to do")
        raise SystemExit(0) from None
    except OSError as e:  # a kernel before 5.3: the owner's clear/kill_all still stop us
        _log(f"cannot watch leader {leader} ({e}): running until told to stop")
        return None


class Delayer:
    """The queue, the raw socket and the delay line, and what passes between them."""

    def __init__(self, nfq: NfqueueSocket, raw: socket.socket | None, line: DelayLine[Held]) -> None:
        self.nfq = nfq
        self.raw = raw
        self.line = line
        self.counts = collections.Counter[str]()

    def take(self, packets: list[Packet], now: float) -> None:
        """Put arriving packets on the line (or drop them)."""
        for pkt in packets:
            self.counts["seen"] += 1
            dst = detachable(pkt) if self.raw is not None else None
            if dst is not None:
                # Free the original now (its socket's memory with it); the copy goes later.
                self.nfq.verdict(pkt.packet_id, NF_DROP)
                held = Held(pkt.packet_id, pkt.payload, dst)
            else:
                held = Held(pkt.packet_id)
            if not self.line.admit(held, now):
                self.counts["dropped"] += 1
                if held.payload is None:
                    self.nfq.verdict(pkt.packet_id, NF_DROP)

    def send(self, items: list[Held]) -> None:
        """Let released packets go, in order."""
        for held in items:
            if held.payload is None:
                self.nfq.verdict(held.packet_id, NF_ACCEPT)
                self.counts["accepted"] += 1
                continue
            assert self.raw is not None
            try:
                self.raw.sendto(held.payload, (held.dst, 0))
                self.counts["resent"] += 1
            except OSError as e:  # a full send buffer or an unreachable route: a lost packet
                self.counts[f"send-{errno.errorcode.get(e.errno or 0, e.errno)}"] += 1

    def serve(self, wake_fds: dict[int, str], stop: list[str]) -> None:
        """Until something is put in `stop`: wait for packets or the next due time, and act.
        A readable fd of `wake_fds` (a signal's wakeup pipe, the leader's pidfd) wakes us."""
        poller = select.epoll()
        poller.register(self.nfq.sock.fileno(), select.EPOLLIN)
        for fd in wake_fds:
            poller.register(fd, select.EPOLLIN)
        try:
            while not stop:
                due = self.line.next_due()
                timeout = -1.0 if due is None else max(0.0, due - time.monotonic())
                for fd, _mask in poller.poll(timeout):
                    if wake_fds.get(fd) == "leader":
                        stop.append("leader exited")
                    elif fd in wake_fds:
                        os.read(fd, 512)
                packets, errors = self.nfq.read()
                self.take(packets, time.monotonic())
                for err in errors:
                    self.counts["kernel-errors"] += 1
                    if self.counts["kernel-errors"] <= 10:
                        _log(f"kernel reported: {os.strerror(err)}")
                self.send(self.line.release(time.monotonic()))
        finally:
            poller.close()
            # Held packets go now rather than being dropped when the socket closes.
            with contextlib.suppress(OSError):
                self.send(self.line.drain())


def run(queue: int, delay_ms: float, loss_pct: float, leader: int | None, limit: int, mark: int) -> int:
    """Serve the queue until SIGTERM/SIGINT/SIGHUP or until the leader exits."""
    line: DelayLine[Held] = DelayLine(delay_ms / 1000.0, loss_pct / 100.0, limit)
    pidfd = _open_leader(leader)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stop: list[str] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: stop.append(signal.Signals(s).name))
    wake_fds = {wake_r: "signal"} | ({pidfd: "leader"} if pidfd is not None else {})
    raw = raw_sender(mark) if mark else None
    nfq = NfqueueSocket(queue, limit)
    delayer = Delayer(nfq, raw, line)
    detach = f"mark {mark:#x}" if mark else "off"
    _log(f"ready: queue {queue}, delay {delay_ms} ms, loss {loss_pct}%, leader {leader}, detach {detach}")
    try:
        delayer.serve(wake_fds, stop)
    finally:
        nfq.close()
        if raw is not None:
            raw.close()
    _log(f"stopping ({', '.join(stop)}): {dict(delayer.counts)}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m testbed.delayer", description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=int, required=True, help="NFQUEUE number to serve (0-65535)")
    p.add_argument("--delay", type=float, default=0.0, help="delay in milliseconds")
    p.add_argument("--loss", type=float, default=0.0, help="loss in percent")
    p.add_argument("--leader", type=int, default=None, help="exit when this pid exits")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="packets held at most (netem's limit)")
    p.add_argument(
        "--mark",
        type=lambda v: int(v, 0),
        default=DEFAULT_MARK,
        help="mark of resent TCP copies, which the queue rule must let by; 0: hold TCP in the kernel",
    )
    p.add_argument("--tag", default="", help="free text that names the owner (found in ps)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if (
        not 0 <= args.queue <= 0xFFFF
        or not args.delay >= 0
        or not 0 <= args.loss <= 100
        or args.limit < 1
        or not 0 <= args.mark <= 0xFFFFFFFF
    ):
        _log("bad arguments: --queue 0..65535, --delay >= 0, --loss 0..100, --limit >= 1, --mark u32")
        return 2
    try:
        return run(args.queue, args.delay, args.loss, args.leader, args.limit, args.mark)
    except (OSError, NfqueueError) as e:
        _log(f"failed: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
