"""Service VIPs: the pure hold/announce/drop decision, config parsing and the ARP frames."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from euca_runtime.config import ConfigError, dump_config, loads_config
from euca_runtime.vip import VipConfigError, VipState, arp_frames, parse_vips

BASE = """
node: a
listen: 10.0.0.1:7100
admin: 127.0.0.1:7180
data_dir: /tmp/x
tls: {ca: ca.crt, cert: a.crt, key: a.key}
voters: [a]
"""


def test_takes_announces_and_drops_with_the_lease() -> None:
    s = VipState(guard=0.1, announce_after=(0.5, 1.0), reannounce=2.0)
    assert s.step(0.0, None) == []
    assert s.step(1.0, 2.0) == ["add", "announce"] and s.held
    assert s.step(1.2, 2.2) == []
    assert s.step(1.5, 2.4) == ["announce"]
    assert s.step(2.0, 2.9) == ["announce"]
    assert s.step(3.0, 3.9) == []
    assert s.step(4.0, 4.9) == ["announce"]  # every reannounce seconds from now on
    # No renewal: dropped at lease_end - guard, on the holder's own clock.
    assert s.step(4.79, 4.9) == []
    assert s.step(4.81, 4.9) == ["remove"] and not s.held
    assert s.step(4.85, 4.9) == []


def test_drops_at_once_when_the_instance_leaves_enabled() -> None:
    s = VipState(guard=0.1)
    assert s.step(0.0, 1.0) == ["add", "announce"]
    assert s.step(0.01, None) == ["remove"]
    assert s.step(0.02, 1.0) == ["add", "announce"]  # taken again: announced again
    s.closed = True
    assert s.step(0.03, 1.0) == ["remove"]
    assert s.step(0.04, 5.0) == []  # closed: never again


def test_next_deadline_is_the_guard_or_the_next_announcement() -> None:
    s = VipState(guard=0.1, announce_after=(0.5,), reannounce=2.0)
    assert s.next_deadline(5.0) == float("inf")
    s.step(0.0, 1.0)
    assert s.next_deadline(1.0) == pytest.approx(0.5)
    assert s.next_deadline(0.3) == pytest.approx(0.2)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0.001, 0.5), st.one_of(st.none(), st.floats(-0.5, 2.0))), max_size=60))
def test_never_held_past_the_holder_side_lease_end_minus_the_guard(
    steps: list[tuple[float, float | None]],
) -> None:
    """Whatever the sequence of ticks and leases: after every step, held implies the lease (as
    the holder sees it) has more than `guard` left, and add/remove alternate."""
    s = VipState(guard=0.1)
    now, held = 0.0, False
    for dt, rel in steps:
        now += dt
        lease_end = None if rel is None else now + rel
        actions = s.step(now, lease_end)
        if "add" in actions:
            assert not held
            held = True
        if "remove" in actions:
            assert held
            held = False
        assert held == s.held
        if s.held:
            assert lease_end is not None and now < lease_end - 0.1


def test_parse_vips_names_the_bad_key() -> None:
    assert parse_vips(None) == ()
    (v,) = parse_vips([{"group": "walrus", "address": "10.0.0.100/24"}])
    assert v.ip == "10.0.0.100" and v.interface is None
    bad = [
        (
            [{"group": "walrus", "address": "10.0.0.100"}],
            "vips[0].address: must be an IPv4 address",
        ),
        ([{"group": "walrus", "address": "10.0.0.300/24"}], "vips[0].address: not an IPv4 address"),
        ([{"address": "10.0.0.1/24"}], "vips[0].group"),
        ([{"group": "clc", "address": "10.0.0.1/24", "ifc": "x"}], "vips[0].ifc: unknown key"),
        (
            [{"group": "clc", "address": "10.0.0.1/24"}, {"group": "walrus", "address": "10.0.0.1/24"}],
            "vips[1].address: 10.0.0.1 is listed twice",
        ),
        ({"group": "clc"}, "vips: must be a list"),
    ]
    for value, message in bad:
        with pytest.raises(VipConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_vips(value)


def test_config_carries_vips_and_dumps_them_back() -> None:
    cfg = loads_config(BASE + "vips: [{group: walrus, address: 10.0.0.100/24, interface: eth0}]\n")
    assert [(v.group, str(v.address), v.interface) for v in cfg.vips] == [("walrus", "10.0.0.100/24", "eth0")]
    assert loads_config(dump_config(cfg)) == cfg
    with pytest.raises(ConfigError, match="vips"):
        loads_config(BASE + "vips: [{group: walrus, address: nope}]\n")


def test_gratuitous_arp_frames() -> None:
    mac = bytes.fromhex("0a0b0c0d0e0f")
    request, reply = arp_frames(mac, "10.0.0.100")
    for frame, op in ((request, 1), (reply, 2)):
        assert len(frame) == 42
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac
        assert struct.unpack("!H", frame[12:14])[0] == 0x0806
        htype, ptype, hlen, plen, got_op = struct.unpack("!HHBBH", frame[14:22])
        assert (htype, ptype, hlen, plen, got_op) == (1, 0x0800, 6, 4, op)
        assert frame[22:28] == mac  # sender MAC
        assert frame[28:32] == frame[38:42] == socket.inet_aton("10.0.0.100")  # sender IP = target IP
