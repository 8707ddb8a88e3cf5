"""Link impairment without root: the nfnetlink_queue messages the delayer packs and parses,
its delay line, and the pure builders and parsers of testbed.impair."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed import delayer, impair
from testbed.delayer import (
    NF_ACCEPT,
    NF_DROP,
    NFQA_CFG_F_GSO,
    NFQNL_CFG_CMD_BIND,
    NFQNL_COPY_META,
    DelayLine,
    Message,
    NfqueueError,
    Packet,
    config_message,
    detachable,
    pack_attr,
    pack_message,
    parse_attrs,
    parse_error,
    parse_messages,
    parse_packet,
    verdict_message,
)
from testbed.model import TestbedError

QUEUE_PACKET = (3 << 8) | 0
QUEUE_VERDICT = (3 << 8) | 1
QUEUE_CONFIG = (3 << 8) | 2


def header(raw: bytes) -> tuple[int, int, int, int, int]:
    return struct.unpack_from("=IHHII", raw)


# --------------------------------------------------------------------------- packing


def test_attr_is_padded_to_four_bytes_and_length_excludes_pad() -> None:
    raw = pack_attr(2, b"\x01\x02\x03\x04\x05")
    assert len(raw) == 12
    assert struct.unpack_from("=HH", raw) == (9, 2)
    assert raw[4:9] == b"\x01\x02\x03\x04\x05" and raw[9:] == b"\0\0\0"
    assert pack_attr(1, b"abcd") == struct.pack("=HH", 8, 1) + b"abcd"


def test_message_header_counts_itself() -> None:
    raw = pack_message(0x302, 5, 77, b"xyz")
    assert header(raw) == (19, 0x302, 5, 77, 0)
    assert raw[16:] == b"xyz"


def test_bind_config_message_layout() -> None:
    raw = config_message(
        4231,
        9,
        command=NFQNL_CFG_CMD_BIND,
        copy_mode=NFQNL_COPY_META,
        maxlen=1000,
        flags=(NFQA_CFG_F_GSO, NFQA_CFG_F_GSO),
    )
    length, msg_type, flags, seq, portid = header(raw)
    assert (length, msg_type, flags, seq, portid) == (len(raw), QUEUE_CONFIG, 0x1 | 0x4, 9, 0)
    # nfgenmsg: AF_UNSPEC, version 0, queue number big endian
    assert raw[16:20] == bytes([socket.AF_UNSPEC, 0]) + (4231).to_bytes(2, "big")
    attrs = parse_attrs(raw[20:])
    assert attrs[1] == bytes([NFQNL_CFG_CMD_BIND, 0]) + socket.AF_UNSPEC.to_bytes(2, "big")
    assert attrs[2] == (0).to_bytes(4, "big") + bytes([NFQNL_COPY_META])  # copy_range, copy_mode
    assert attrs[3] == (1000).to_bytes(4, "big")
    assert attrs[5] == attrs[4] == NFQA_CFG_F_GSO.to_bytes(4, "big")


def test_config_message_carries_only_what_is_asked() -> None:
    raw = config_message(1, 1, command=2)
    assert set(parse_attrs(raw[20:])) == {1}


@pytest.mark.parametrize("verdict", [NF_ACCEPT, NF_DROP])
def test_verdict_message_layout(verdict: int) -> None:
    raw = verdict_message(7, 42, 0xDEADBEEF, verdict)
    assert header(raw) == (len(raw), QUEUE_VERDICT, 0x1, 42, 0)  # request, no ACK asked
    assert raw[16:20] == b"\x00\x00\x00\x07"
    assert parse_attrs(raw[20:]) == {2: struct.pack("!II", verdict, 0xDEADBEEF)}


# --------------------------------------------------------------------------- parsing


def kernel_packet(queue: int, packet_id: int, extra: bytes = b"") -> bytes:
    """A NFQNL_MSG_PACKET as the kernel sends it in COPY_META mode (ids and attrs)."""
    payload = struct.pack("!BBH", socket.AF_INET, 0, queue)
    payload += pack_attr(1, struct.pack("!IHB", packet_id, 0x0800, 3))  # NFQA_PACKET_HDR, 7 bytes
    payload += pack_attr(6 | 0x4000, struct.pack("!I", 2))  # NFQA_IFINDEX_OUTDEV, net byte order flag
    payload += extra
    return pack_message(QUEUE_PACKET, 0, 0, payload)


def ipv4(proto: int, payload: bytes = b"data", dst: str = "10.231.250.2", total: int | None = None) -> bytes:
    """A minimal IPv4 header (checksum left 0: the kernel fills it in) and a payload."""
    length = 20 + len(payload) if total is None else total
    return (
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, length, 1, 0x4000, 64, proto, 0, socket.inet_aton("10.0.0.1"),
                    socket.inet_aton(dst))
        + payload
    )  # fmt: skip


def test_parse_packet() -> None:
    (msg,) = parse_messages(kernel_packet(4231, 123456))
    pkt = parse_packet(msg)
    assert (pkt.queue, pkt.packet_id, pkt.hw_protocol, pkt.hook) == (4231, 123456, 0x0800, 3)
    assert pkt.payload == b""  # COPY_META: no payload attribute


def test_parse_packet_payload() -> None:
    data = ipv4(socket.IPPROTO_TCP, b"x" * 33)  # odd length: the attribute is padded
    (msg,) = parse_messages(kernel_packet(1, 9, extra=pack_attr(10, data)))
    assert parse_packet(msg).payload == data


def test_only_whole_ipv4_tcp_segments_are_detached() -> None:
    def pkt(data: bytes, proto: int = 0x0800) -> Packet:
        return Packet(1, 1, proto, 3, data)

    assert detachable(pkt(ipv4(socket.IPPROTO_TCP, dst="10.231.250.9"))) == "10.231.250.9"
    assert detachable(pkt(ipv4(socket.IPPROTO_UDP))) is None
    assert detachable(pkt(ipv4(socket.IPPROTO_ICMP))) is None
    assert detachable(pkt(ipv4(socket.IPPROTO_TCP), proto=0x86DD)) is None
    assert detachable(pkt(ipv4(socket.IPPROTO_TCP, total=5000))) is None  # a truncated copy
    assert detachable(pkt(b"\x60" + bytes(39))) is None  # IPv6 bytes
    assert detachable(pkt(b"")) is None


def test_attr_flag_bits_are_stripped() -> None:
    (msg,) = parse_messages(kernel_packet(1, 1))
    assert parse_attrs(msg.payload[4:])[6] == struct.pack("!I", 2)


def test_several_messages_in_one_datagram_with_padding() -> None:
    # The first message's length (29) is not a multiple of 4: the next one starts aligned.
    odd = pack_message(QUEUE_PACKET, 0, 1, b"x" * 13)
    data = odd + b"\0" * 3 + kernel_packet(5, 1) + kernel_packet(5, 2)
    msgs = list(parse_messages(data))
    assert [m.seq for m in msgs] == [1, 0, 0]
    assert [parse_packet(m).packet_id for m in msgs[1:]] == [1, 2]


def test_error_and_ack() -> None:
    ack = pack_message(2, 0, 9, struct.pack("=i", 0) + b"\0" * 16)
    err = pack_message(2, 0, 10, struct.pack("=i", -16) + b"\0" * 16)  # -EBUSY
    a, e = parse_messages(ack + err)
    assert (parse_error(a), parse_error(e)) == (0, 16)


@pytest.mark.parametrize(
    "data",
    [
        b"\x10\x00\x00",  # shorter than a header
        struct.pack("=IHHII", 8, 0, 0, 0, 0),  # length below the header's own
        struct.pack("=IHHII", 64, 0, 0, 0, 0),  # length past the datagram
    ],
)
def test_truncated_messages_raise(data: bytes) -> None:
    with pytest.raises(NfqueueError):
        list(parse_messages(data))


def test_packet_without_header_raises() -> None:
    msg = Message(QUEUE_PACKET, 0, 0, 0, struct.pack("!BBH", 2, 0, 1))
    with pytest.raises(NfqueueError):
        parse_packet(msg)
    with pytest.raises(NfqueueError):
        parse_packet(Message(QUEUE_CONFIG, 0, 0, 0, b""))
    with pytest.raises(NfqueueError):
        parse_error(Message(2, 0, 0, 0, b"\0"))


@given(st.binary(max_size=200))
def test_garbage_only_ever_raises_nfqueue_error(data: bytes) -> None:
    try:
        for msg in parse_messages(data):
            if msg.msg_type == QUEUE_PACKET:
                parse_packet(msg)
            parse_attrs(msg.payload)
    except NfqueueError:
        pass


# --------------------------------------------------------------------------- the delay line


def test_delay_line_releases_in_order_after_the_delay() -> None:
    line: DelayLine[int] = DelayLine(0.1, 0.0)
    assert line.next_due() is None
    assert line.admit(1, 10.0) and line.admit(2, 10.05) and line.admit(3, 10.05)
    assert line.next_due() == pytest.approx(10.1)
    assert line.release(10.099) == []
    assert line.release(10.1) == [1]
    assert line.release(10.2) == [2, 3]
    assert len(line) == 0 and line.next_due() is None


def test_delay_line_loss_uses_the_rng() -> None:
    draws = iter([0.05, 0.5, 0.09, 0.99])
    line: DelayLine[int] = DelayLine(0.0, 0.1, rng=lambda: next(draws))
    assert [line.admit(i, 0.0) for i in range(4)] == [False, True, False, True]
    assert line.release(0.0) == [1, 3]


def test_delay_line_edges() -> None:
    lossy: DelayLine[int] = DelayLine(0.0, 1.0)
    assert not lossy.admit(1, 0.0)  # 100 % loss
    line: DelayLine[str] = DelayLine(5.0, 0.0, rng=lambda: 0.0)  # zero loss never draws a drop
    assert line.admit("a", 0.0) and line.admit("b", 1.0)
    assert line.drain() == ["a", "b"] and len(line) == 0
    for bad in ((-1.0, 0.0, 1), (0.0, 1.5, 1), (0.0, 0.0, 0)):
        with pytest.raises(ValueError):
            DelayLine(*bad)


def test_delay_line_tail_drops_past_its_limit() -> None:
    line: DelayLine[int] = DelayLine(1.0, 0.0, limit=2)
    assert [line.admit(i, 0.0) for i in range(3)] == [True, True, False]
    assert line.release(1.0) == [0, 1]
    assert line.admit(3, 1.0)


def test_delayer_rejects_bad_arguments() -> None:
    assert delayer.main(["--queue", "70000"]) == 2
    assert delayer.main(["--queue", "1", "--loss", "101"]) == 2


# --------------------------------------------------------------------------- impair builders


def test_netem_from_config() -> None:
    assert impair.netem_from_config("CONFIG_X=y\nCONFIG_NET_SCH_NETEM=y\n") is True
    assert impair.netem_from_config("CONFIG_NET_SCH_NETEM=m\n") is None
    assert impair.netem_from_config("# CONFIG_NET_SCH_NETEM is not set\n") is False
    assert impair.netem_from_config("") is False


def test_rule_builders() -> None:
    assert impair.install_argvs("iptables", 4231, mark=0x10) == [
        ["iptables", "-w", "-N", "EUCA-IMPAIR"],
        ["iptables", "-w", "-A", "EUCA-IMPAIR", "-m", "mark", "--mark", "0x10", "-j", "RETURN"],
        ["iptables", "-w", "-A", "EUCA-IMPAIR", "-j", "NFQUEUE", "--queue-num", "4231", "--queue-bypass"],
    ]
    # The queue rule is the chain's second: retargeting replaces it and nothing else.
    assert impair.retarget_argv("ip6tables", 4232) == [
        *["ip6tables", "-w", "-R", "EUCA-IMPAIR", "2"],
        *["-j", "NFQUEUE", "--queue-num", "4232", "--queue-bypass"],
    ]
    assert impair.jump_spec("FORWARD", "host0") == ["FORWARD", "-o", "host0", "-j", "EUCA-IMPAIR"]


def test_jumps_in_listing() -> None:
    listing = (
        "-P OUTPUT ACCEPT\n"
        "-A OUTPUT -o host0 -j EUCA-IMPAIR\n"
        "-A OUTPUT -o eth1 -j EUCA-IMPAIR\n"
        "-A OUTPUT -o host0 -j ACCEPT\n"
        "-A OUTPUT -j EUCA-IMPAIR-OTHER\n"
    )
    assert impair.jumps_in(listing) == [
        ["OUTPUT", "-o", "host0", "-j", "EUCA-IMPAIR"],
        ["OUTPUT", "-o", "eth1", "-j", "EUCA-IMPAIR"],
    ]


def test_parse_queue_table() -> None:
    text = "    7  20228     0 1     0     0     0        6  1\n 4231 99 2 1 0 5 0 10 1\n"
    table = impair.parse_queue_table(text)
    assert table[7]["portid"] == 20228 and table[7]["copy_mode"] == 1 and table[7]["id_sequence"] == 6
    assert table[4231]["waiting"] == 2 and table[4231]["queue_dropped"] == 5
    assert impair.parse_queue_table("") == {}


def test_delayer_argv_roundtrips_through_its_parser_and_carries_the_tag() -> None:
    argv = impair.delayer_argv(4231, 100.0, 2.5, 1234, "/var/lib/x/impair/h1.json")
    assert argv[1:3] == ["-m", "testbed.delayer"]
    args = delayer.parser().parse_args(argv[3:])
    assert (args.queue, args.delay, args.loss, args.leader) == (4231, 100.0, 2.5, 1234)
    assert args.mark == delayer.DEFAULT_MARK  # the mark the chain's RETURN rule lets by
    assert impair.command_tag(argv) == "/var/lib/x/impair/h1.json"
    wrapped = ["nsenter", "-t", "1234", "-n", "--", *argv]
    assert impair.command_tag(wrapped) == "/var/lib/x/impair/h1.json"
    assert impair.command_tag(["python", "-m", "other", "--tag", "x"]) is None
    assert impair.command_tag(["python", "-m", "testbed.delayer", "--tag"]) is None


def test_bad_values_are_refused_before_anything_runs(tmp_path: Path) -> None:
    for delay, loss in ((-1.0, 0.0), (0.0, 100.5), (float("nan"), 0.0)):
        with pytest.raises(TestbedError):
            impair.apply(tmp_path, "h1", 1, delay, loss)


def test_mode_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(impair.MODE_ENV, "delayer")
    assert impair.mode() == "delayer"
    monkeypatch.setenv(impair.MODE_ENV, "netem")
    assert impair.mode() == "netem"
    monkeypatch.setenv(impair.MODE_ENV, "bogus")
    with pytest.raises(TestbedError):
        impair.mode()
