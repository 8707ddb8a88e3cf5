"""The arbitrator's route logic (pure: `euca_runtime.routes`), its configuration, and the probes
against real sockets (TCP listeners, ICMP datagram and raw sockets)."""

from __future__ import annotations

import asyncio
import itertools
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from euca_runtime.config import ConfigError, ProbeTarget, Route, loads_config, parse_config
from euca_runtime.probes import IcmpPinger, IcmpUnavailable, Prober, tcp_probe
from euca_runtime.routes import Failback, ProbeResult, RouteMonitor, RouteState, RouteView

A, B = "tcp 192.0.2.1:443", "icmp 192.0.2.2"


def monitor(threshold: int = 3, recover: int = 3, targets: Sequence[str] = (A, B), **kw: Any) -> RouteMonitor:
    return RouteMonitor("users", list(targets), threshold=threshold, recover=recover, nodes=["node-a"], **kw)


def feed(m: RouteMonitor, rounds: Sequence[dict[str, bool]], t0: float = 0.0) -> list[Any]:
    events = []
    for i, r in enumerate(rounds):
        events += m.observe(r, t0 + i)
    return events


UP2 = {A: True, B: True}
DOWN2 = {A: False, B: False}
HALF = {A: False, B: True}


# --------------------------------------------------------------------------- the monitor


def test_unknown_until_evidence_then_up() -> None:
    m = monitor()
    assert feed(m, [UP2, UP2]) == [] and m.state is RouteState.UNKNOWN
    (ev,) = m.observe(UP2, 2.0)
    assert (ev.kind, m.state, m.since) == ("up", RouteState.UP, 2.0)
    assert m.report()["state"] == "UP" and m.report()["nodes"] == ["node-a"]


def test_down_exactly_after_threshold_failed_rounds() -> None:
    m = monitor(threshold=3)
    feed(m, [UP2] * 3)
    assert feed(m, [DOWN2, DOWN2]) == [] and m.state is RouteState.UP
    (ev,) = m.observe(DOWN2, 10.0)
    assert ev.kind == "down" and not ev.advisory and m.state is RouteState.DOWN
    assert m.status() == "DOWN" and m.since == 10.0
    assert A in ev.message and B in ev.message and "3 rounds" in ev.message


def test_a_good_round_resets_the_failure_count() -> None:
    m = monitor(threshold=3)
    feed(m, [UP2] * 3)
    feed(m, [DOWN2, DOWN2, HALF, DOWN2, DOWN2, UP2, DOWN2, DOWN2])
    assert m.state is RouteState.UP and m.transitions == 1  # only UNKNOWN -> UP


def test_one_target_of_two_lost_is_an_advisory_not_a_failure() -> None:
    m = monitor(threshold=3)
    feed(m, [UP2] * 3)
    events = feed(m, [HALF] * 10, t0=3)
    assert [e.kind for e in events] == ["advisory"]
    assert events[0].advisory and "1 of 2 targets unreachable" in events[0].message and A in events[0].message
    assert m.state is RouteState.UP and m.status() == "DEGRADED" and m.lost == (A,) and m.advisories == 1
    # the target comes back: restored after `recover` good rounds of its own
    events = feed(m, [UP2] * 3, t0=13)
    assert [e.kind for e in events] == ["advisory_cleared"] and m.lost == () and m.status() == "UP"


def test_advisory_needs_threshold_rounds_of_the_target() -> None:
    m = monitor(threshold=3)
    feed(m, [UP2] * 3)
    assert feed(m, [HALF, HALF, UP2, HALF, HALF]) == [] and m.lost == ()


def test_hysteresis_down_comes_back_only_after_recover_good_rounds() -> None:
    m = monitor(threshold=2, recover=4)
    feed(m, [UP2] * 4 + [DOWN2] * 2)
    assert m.state is RouteState.DOWN
    feed(m, [UP2, UP2, UP2, DOWN2, UP2, UP2, UP2])
    assert m.state is RouteState.DOWN  # never 4 good rounds in a row
    (ev,) = m.observe(UP2, 100.0)
    assert ev.kind == "up" and m.state is RouteState.UP and m.since == 100.0


def test_coming_back_with_one_target_still_dead_is_an_advisory() -> None:
    m = monitor(threshold=2, recover=2)
    feed(m, [UP2] * 2 + [DOWN2] * 2)
    events = feed(m, [HALF] * 2)
    assert [e.kind for e in events] == ["up", "advisory"] and m.status() == "DEGRADED"


def test_a_missing_result_counts_as_a_failure() -> None:
    m = monitor(threshold=1, recover=1)
    m.observe({A: True}, 0.0)
    assert m.state is RouteState.UP
    m.observe({}, 1.0)
    assert m.state is RouteState.DOWN and m.report()["targets"][B]["error"] == "not probed"


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one target"):
        RouteMonitor("r", [], threshold=1, recover=1)
    with pytest.raises(ValueError, match="threshold and recover"):
        RouteMonitor("r", [A], threshold=0, recover=1)


def _reference_transitions(rounds: list[bool], threshold: int, recover: int) -> list[tuple[int, str]]:
    """An independent statement of the rules: DOWN after `threshold` failed rounds in a row,
    UP after `recover` good rounds in a row, from UNKNOWN either way."""
    state, out = "UNKNOWN", []
    for i in range(len(rounds)):
        window_bad = i + 1 >= threshold and not any(rounds[i + 1 - threshold : i + 1])
        window_good = i + 1 >= recover and all(rounds[i + 1 - recover : i + 1])
        if state != "DOWN" and window_bad:
            state = "DOWN"
            out.append((i, state))
        elif state != "UP" and window_good:
            state = "UP"
            out.append((i, state))
    return out


@settings(max_examples=300, deadline=None)
@given(
    threshold=st.integers(1, 6),
    recover=st.integers(1, 6),
    rounds=st.lists(st.lists(st.booleans(), min_size=2, max_size=2), max_size=120),
)
def test_transitions_match_the_rules(threshold: int, recover: int, rounds: list[list[bool]]) -> None:
    m = monitor(threshold, recover)
    seen = []
    for i, (a, b) in enumerate(rounds):
        for ev in m.observe({A: a, B: b}, float(i)):
            if ev.kind in ("up", "down"):
                seen.append((i, ev.state.value))
    assert seen == _reference_transitions([a or b for a, b in rounds], threshold, recover)
    # every advisory is about a usable route with some, not all, targets lost
    assert m.state is not RouteState.DOWN or set(m.lost) == {A, B}


@pytest.mark.parametrize("seed", range(20))
def test_seeded_random_flapping_is_bounded_by_the_hysteresis(seed: int) -> None:
    """A target that flaps at random (p of being down per round) never makes the route change
    state more often than threshold/recover allow: between a DOWN and the next UP there are at
    least `recover` rounds, between an UP and the next DOWN at least `threshold`."""
    rng = random.Random(seed)
    threshold, recover = rng.randint(2, 4), rng.randint(2, 5)
    p_down = rng.uniform(0.2, 0.8)
    m = monitor(threshold, recover, targets=[A])
    changes: list[tuple[int, RouteState]] = []
    n = 2000
    for i in range(n):
        for ev in m.observe({A: rng.random() >= p_down}, float(i)):
            if ev.kind in ("up", "down"):
                changes.append((i, ev.state))
    for (i, s), (j, t) in itertools.pairwise(changes):
        assert s != t
        assert j - i >= (recover if t is RouteState.UP else threshold)
    assert len(changes) <= 1 + n // min(threshold, recover)
    assert m.transitions == len(changes)


# --------------------------------------------------------------------------- leadership


class _Group:
    """Two nodes a (preferred) and b, each behind its own route, as the runtime moves the
    primary: away when the primary's route is DOWN (to a node whose route is not), back only
    when the failback policy says so."""

    def __init__(self, policy: Failback, threshold: int, recover: int) -> None:
        self.policy = policy
        self.routes = {n: monitor(threshold, recover, targets=[A]) for n in "ab"}
        self.primary = "a"
        self.evicted: str | None = None
        self.moves = 0

    def round(self, ok: dict[str, bool], now: float) -> None:
        for n, m in self.routes.items():
            m.observe({A: ok[n]}, now)
        down = {n for n, m in self.routes.items() if m.state is RouteState.DOWN}
        other = "b" if self.primary == "a" else "a"
        if self.primary in down and other not in down:
            self.evicted, self.primary = self.primary, other
            self.moves += 1
        elif self.evicted is not None and self.evicted not in down and other not in down:
            back = self.routes[self.evicted]
            if back.state is RouteState.UP and self.policy.due(back.since, now):
                self.primary, self.evicted = self.evicted, None
                self.moves += 1


@pytest.mark.parametrize("seed", range(10))
def test_flapping_never_moves_the_primary_back_under_manual_failback(seed: int) -> None:
    rng = random.Random(seed)
    g = _Group(Failback(None), threshold=3, recover=3)
    for i in range(3000):
        g.round({"a": rng.random() < 0.5, "b": True}, float(i))
    assert g.moves <= 1 and g.primary in "ab"


@pytest.mark.parametrize("seed", range(10))
def test_flapping_moves_the_primary_back_only_after_a_quiet_spell(seed: int) -> None:
    """`failback: after S`: every move back needs S rounds of UP without a break, and every
    move away needs `threshold` failed rounds; so moves are bounded by the flaps' length."""
    rng = random.Random(seed)
    after = 20.0
    g = _Group(Failback(after), threshold=3, recover=3)
    n = 3000
    calm = False
    for i in range(n):
        if i % 300 == 0:
            calm = rng.random() < 0.5  # alternate calm spells and flapping spells
        ok_a = True if calm else rng.random() < 0.4
        g.round({"a": ok_a, "b": True}, float(i))
    # each round trip (away and back) needs >= threshold + recover + after rounds
    assert g.moves <= 2 * (n // (3 + 3 + int(after))) + 1
    # and with a steady flap (never `after` rounds of UP), the primary never comes back
    g2 = _Group(Failback(after), threshold=3, recover=3)
    for i in range(n):
        g2.round({"a": (i % 7) < 4, "b": True}, float(i))  # 4 up, 3 down: DOWN once, UP for < 20
    assert g2.moves == 1 and g2.primary == "b"


def test_failback_policy() -> None:
    assert Failback().manual and not Failback().due(0.0, 1e9)
    p = Failback(30.0)
    assert not p.due(None, 100.0) and not p.due(80.0, 100.0) and p.due(70.0, 100.0)
    assert Failback.from_doc(p.to_doc()) == p and Failback.from_doc("manual") == Failback()
    assert Failback.from_doc({"after": "x"}) == Failback()  # unreadable: the safe default
    assert Failback.strictest([Failback(5.0), Failback(9.0)]) == Failback(9.0)
    assert Failback.strictest([Failback(5.0), Failback()]).manual
    assert Failback.strictest([]).manual


# --------------------------------------------------------------------------- the node's view


def report(state: str, nodes: Sequence[str] = ("node-a",), name: str = "users", **kw: Any) -> dict[str, Any]:
    return {"name": name, "state": state, "nodes": list(nodes), "cause": f"it is {state}"} | kw


def test_view_only_routes_naming_this_node() -> None:
    v = RouteView("node-a", stale_after=2.0)
    v.on_reports("arb1", [report("DOWN", nodes=["node-b"]), report("DOWN", name="mine")], 0.0)
    assert [x.name for x in v.down(0.0)] == ["mine"]
    assert "arb1: it is DOWN" in v.down(0.0)[0].cause


def test_view_all_fresh_arbitrators_must_agree_on_down() -> None:
    v = RouteView("node-a", stale_after=2.0)
    v.on_reports("arb1", [report("DOWN")], 0.0)
    v.on_reports("arb2", [report("UP")], 0.0)
    assert v.down(0.5) == []
    v.on_reports("arb2", [report("DOWN")], 1.0)
    (d,) = v.down(1.0)
    assert d.arbitrators == ("arb1", "arb2") and d.since == 1.0


def test_view_a_silent_arbitrator_changes_nothing() -> None:
    v = RouteView("node-a", stale_after=2.0)
    v.on_reports("arb1", [report("UP")], 0.0)
    assert v.down(100.0) == []  # stale UP: still UP (silence is never a route failure)
    v.on_reports("arb1", [report("DOWN")], 100.0)
    assert [x.name for x in v.down(100.0)] == ["users"]
    assert [x.name for x in v.down(500.0)] == ["users"]  # stale DOWN: no news, still DOWN
    v.on_reports("arb1", [report("UNKNOWN")], 501.0)  # restarted, no verdict yet: no news
    assert [x.name for x in v.down(501.0)] == ["users"]
    v.on_reports("arb1", [report("UP")], 502.0)
    assert v.down(502.0) == []


def test_view_stale_up_does_not_outvote_a_fresh_down() -> None:
    v = RouteView("node-a", stale_after=2.0)
    v.on_reports("arb1", [report("UP")], 0.0)
    v.on_reports("arb2", [report("DOWN")], 5.0)
    assert [x.name for x in v.down(5.0)] == ["users"]


def test_view_forgets_a_route_nobody_watches_and_tracks_since() -> None:
    v = RouteView("node-a", stale_after=2.0)
    v.on_reports("arb1", [report("DOWN", failback={"after": 3})], 0.0)
    assert v.evaluate(0.0)["users"].down
    v.on_reports("arb1", [report("UP", failback={"after": 3})], 10.0)
    verdict = v.evaluate(11.0)["users"]
    assert not verdict.down and verdict.since == 10.0 and verdict.failback == Failback(3.0)
    assert verdict.failback.due(verdict.since, 13.0)
    v.on_reports("arb1", [], 12.0)
    assert v.evaluate(12.0) == {}
    v.on_reports("arb1", ["junk", {"name": 3}], 13.0)  # malformed entries are ignored
    assert v.evaluate(13.0) == {}


# --------------------------------------------------------------------------- configuration

BASE = """
node: arb
listen: 127.0.0.1:7100
admin: 127.0.0.1:7180
data_dir: /tmp/x
tls: {ca: a, cert: b, key: c}
peers: {node-a: "127.0.0.2:7100", node-b: "127.0.0.3:7100"}
voters: [arb, node-a, node-b]
"""


def cfg(routes: str) -> Any:
    return loads_config(BASE + "routes:\n" + routes)


def test_route_config_full() -> None:
    c = cfg(
        """
  - name: users-a
    targets: [{tcp: "192.0.2.1:443"}, {icmp: 192.0.2.2}]
    nodes: [node-a]
    threshold: 4
    recover: 5
    interval: 0.5
    timeout: 0.25
    failback: {after: 30}
"""
    )
    (r,) = c.routes
    assert r == Route(
        "users-a",
        (ProbeTarget("tcp", "192.0.2.1", 443), ProbeTarget("icmp", "192.0.2.2")),
        threshold=4,
        interval=0.5,
        nodes=("node-a",),
        recover=5,
        timeout=0.25,
        failback_after=30.0,
    )
    assert r.probe_timeout == 0.25 and [str(t) for t in r.targets] == ["tcp 192.0.2.1:443", "icmp 192.0.2.2"]
    from euca_runtime.config import config_to_dict, dump_config

    assert loads_config(dump_config(c)) == c and parse_config(config_to_dict(c)) == c


def test_route_config_defaults() -> None:
    (r,) = cfg("  - {name: u, targets: [{icmp: 192.0.2.1}]}\n").routes
    assert (r.nodes, r.recover, r.timeout, r.failback_after) == ((), 3, None, None)
    assert r.probe_timeout == 1.0


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            "{name: u, targets: [{icmp: h}], nodes: [node-z]}",
            "routes[0].nodes[0]: must be this node or one of peers",
        ),
        ("{name: u, targets: [{icmp: h}], nodes: [node-a, node-a]}", "routes[0].nodes[1]: duplicate node"),
        ("{name: u, targets: [{icmp: h}], nodes: node-a}", "routes[0].nodes: must be a list"),
        (
            "{name: u, targets: [{icmp: h}], failback: auto}",
            "routes[0].failback: must be 'manual' or {after: SECONDS}",
        ),
        (
            "{name: u, targets: [{icmp: h}], failback: {after: -1}}",
            "routes[0].failback.after: must be a number",
        ),
        ("{name: u, targets: [{icmp: h}], failback: {in: 3}}", "routes[0].failback.in: unknown key"),
        ("{name: u, targets: [{icmp: h}], recover: 0}", "routes[0].recover: must be an integer from 1"),
        (
            "{name: u, targets: [{icmp: h}], interval: 1, timeout: 2}",
            "routes[0].timeout: must be at most interval",
        ),
    ],
)
def test_route_config_errors_name_the_key(route: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(f"  - {route}\n")
    assert message in str(exc.value)


# --------------------------------------------------------------------------- probes (real sockets)


def test_tcp_probe_against_a_listener_and_a_closed_port() -> None:
    async def go() -> tuple[ProbeResult, ProbeResult]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ok = await tcp_probe("127.0.0.1", port, 1.0)
        server.close()
        await server.wait_closed()
        bad = await tcp_probe("127.0.0.1", port, 1.0)
        return ok, bad

    ok, bad = asyncio.run(go())
    assert ok.ok and not bad.ok and bad.error == "Connection refused"


def test_prober_round_keys_results_by_target() -> None:
    async def go() -> dict[str, ProbeResult]:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        p = Prober()
        targets = [ProbeTarget("tcp", "127.0.0.1", port), ProbeTarget("tcp", "127.0.0.1", closed)]
        p.open(targets)
        try:
            return await p.round(targets, 1.0)
        finally:
            p.close()
            server.close()

    res = asyncio.run(go())
    assert [r.ok for r in res.values()] == [True, False] and all(k.startswith("tcp 127.0.0.1:") for k in res)


_PING = """
import asyncio, socket, sys
from euca_runtime.probes import IcmpPinger
async def main():
    p = IcmpPinger.open(socket.AF_INET, allow_dgram=sys.argv[1] == "dgram", allow_raw=sys.argv[1] == "raw")
    ok = await p.ping("127.0.0.1", 1.0)
    bad = await p.ping(sys.argv[2], 0.5)
    print(p.mode, ok.ok, bad.ok, bad.error)
    p.close()
asyncio.run(main())
"""


def _netns(script: str, *args: str, sysctl: str | None = None) -> str:
    """Run `script` in a fresh network namespace (only lo, up): nothing leaves the machine."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip")
    setup = "ip link set lo up"
    if sysctl:
        setup += f" && echo '{sysctl}' > /proc/sys/net/ipv4/ping_group_range"
    cmd = f'{setup} && exec "$0" -c "$1" "${{@:2}}"'
    proc = subprocess.run(
        ["unshare", "-n", "bash", "-c", cmd, sys.executable, script, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"cannot make a network namespace: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_icmp_datagram_socket_when_ping_group_range_allows_it() -> None:
    out = _netns(_PING, "dgram", "192.0.2.1", sysctl="0 2147483647")
    mode, ok, bad, *why = out.split()
    assert (mode, ok, bad) == ("dgram", "True", "False"), out
    assert "unreachable" in " ".join(why).lower()


def test_icmp_raw_socket_with_cap_net_raw() -> None:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    except PermissionError:
        pytest.skip("no CAP_NET_RAW here")
    out = _netns(_PING, "raw", "192.0.2.1")
    assert out.split()[:3] == ["raw", "True", "False"], out


def test_icmp_without_permission_fails_with_a_clear_error() -> None:
    """Neither ping_group_range nor CAP_NET_RAW: a real unprivileged process gets the message."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    script = (
        "from euca_runtime.probes import IcmpPinger, IcmpUnavailable\n"
        "try:\n    IcmpPinger.open()\nexcept IcmpUnavailable as exc:\n    print(exc.strerror)\n"
    )
    try:
        out = _netns_as_nobody(script)
    except PermissionError:
        pytest.skip("cannot switch user here")
    assert "ping_group_range" in out and "CAP_NET_RAW" in out and "tcp targets" in out, out


def _netns_as_nobody(script: str) -> str:
    cmd = [
        "unshare",
        "-n",
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-net_raw",
        sys.executable,
        "-c",
        script,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        if "Operation not permitted" in proc.stderr or "unshare failed" in proc.stderr:
            raise PermissionError(proc.stderr)
        raise AssertionError(proc.stderr)
    return proc.stdout.strip()


def test_icmp_open_refuses_when_both_ways_are_off() -> None:
    with pytest.raises(IcmpUnavailable, match="ICMP probes are not possible"):
        IcmpPinger.open(allow_dgram=False, allow_raw=False)
