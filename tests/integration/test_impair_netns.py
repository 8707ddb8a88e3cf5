"""Link impairment for real: two network namespaces of this test's own joined by a veth pair
(10.231.250.1 in -a, .2 in -b), a `sleep infinity` in -a standing for a container's init,
and ping between them. Needs root; traffic never leaves the two namespaces.

Each test runs with the delayer, and again with netem where the kernel has it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed import impair
from testbed.model import TestbedError

NS_A, NS_B = "eucatest-imp-a", "eucatest-imp-b"
ADDR_A, ADDR_B = "10.231.250.1", "10.231.250.2"
HOST = "h1"
# Held while the namespaces exist: runs on one machine (several checkouts) take turns.
LOCK = Path("/run/lock/eucatest-imp.lock")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and iptables rules"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("ip", "ping", "nsenter", "unshare")),
        reason="needs ip (iproute2), ping (iputils-ping), nsenter and unshare (util-linux)",
    ),
]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Ping:
    sent: int
    received: int
    rtt_min: float | None
    rtt_avg: float | None
    rtt_max: float | None


def ping(src_ns: str, dst: str, count: int = 5, wait_s: int = 1) -> Ping:
    """`count` echo requests 50 ms apart; the summary of what came back."""
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-W", str(wait_s), dst]
    out = sh("ip", "netns", "exec", src_ns, *argv, check=False).stdout
    counts = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert counts, out
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", out)
    mn, avg, mx = (float(x) for x in rtt.groups()) if rtt else (None, None, None)
    return Ping(int(counts[1]), int(counts[2]), mn, avg, mx)


# A TCP receiver and sender, each run in its own namespace: the receiver prints its port, then
# the byte count and sha256 of what it got; the sender prints how long connect() took.
RECEIVER = """
import hashlib, socket, sys
srv = socket.socket()
srv.bind((sys.argv[1], 0))
srv.listen(1)
srv.settimeout(float(sys.argv[2]))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(float(sys.argv[2]))
h, n = hashlib.sha256(), 0
while data := conn.recv(1 << 20):
    h.update(data)
    n += len(data)
print(n, h.hexdigest(), flush=True)
"""
SENDER = """
import random, socket, sys, time
data = random.Random(int(sys.argv[3])).randbytes(int(sys.argv[4]))
t0 = time.monotonic()
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[5]))
print(f"{(time.monotonic() - t0) * 1000:.3f}", flush=True)
conn.sendall(data)
conn.close()
"""


@dataclass
class Transfer:
    connect_ms: float
    received: int
    sha256: str
    seconds: float


def tcp_transfer(
    src_ns: str, dst_ns: str, dst: str, size: int, timeout: float = 60.0, connect_timeout: float = 5.0
) -> Transfer:
    """Send `size` seeded random bytes over one TCP connection from src_ns to dst (in dst_ns)."""
    rx = subprocess.Popen(
        ["ip", "netns", "exec", dst_ns, sys.executable, "-c", RECEIVER, dst, str(timeout)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert rx.stdout is not None
        port = rx.stdout.readline().strip()
        t0 = time.monotonic()
        args = [dst, port, "7", str(size), str(connect_timeout)]
        tx = sh("ip", "netns", "exec", src_ns, sys.executable, "-c", SENDER, *args)
        count, digest = rx.stdout.readline().split()
        seconds = time.monotonic() - t0
        assert rx.wait(timeout=timeout) == 0
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
    return Transfer(float(tx.stdout.strip()), int(count), digest, seconds)


def digest(size: int) -> str:
    """The sha256 of what SENDER sends."""
    return hashlib.sha256(random.Random(7).randbytes(size)).hexdigest()


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def in_netns_of(pid: int, name: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == f"net:[{netns_inode(name)}]"
    except OSError:
        return False


def remove_namespaces() -> None:
    for ns in (NS_A, NS_B):
        sh("ip", "netns", "del", ns, check=False)


@dataclass
class Pair:
    leader: subprocess.Popen[bytes]
    state: Path

    @property
    def pid(self) -> int:
        return self.leader.pid


@pytest.fixture(params=["delayer", "netem"])
def pair(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    how = request.param
    if how == "netem" and not impair.netem_available():
        pytest.skip("this kernel has no sch_netem (CONFIG_NET_SCH_NETEM)")
    if how == "delayer":
        try:
            impair.iptables_backend()
        except TestbedError as e:
            pytest.skip(f"no working iptables NFQUEUE target: {e}")
    monkeypatch.setenv(impair.MODE_ENV, how)
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = LOCK.open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    remove_namespaces()  # left by an earlier run that was killed
    leader: subprocess.Popen[bytes] | None = None
    try:
        sh("ip", "netns", "add", NS_A)
        sh("ip", "netns", "add", NS_B)
        # One veth pair, called host0 at both ends as in a testbed container.
        peer = ["peer", "name", "host0", "netns", NS_B]
        sh("ip", "link", "add", "host0", "netns", NS_A, "type", "veth", *peer)
        for ns, addr in ((NS_A, ADDR_A), (NS_B, ADDR_B)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "host0")
            sh("ip", "-n", ns, "link", "set", "host0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        leader = subprocess.Popen(["ip", "netns", "exec", NS_A, "sleep", "infinity"], start_new_session=True)
        pid = leader.pid  # `ip netns exec` execs sleep in place: this is the namespace's "init"
        wait_for("the leader to enter its namespace", lambda: in_netns_of(pid, NS_A))
        wait_for("the link to pass pings", lambda: ping(NS_B, ADDR_A, count=1).received == 1)
        yield Pair(leader, tmp_path)
    finally:
        impair.kill_all(tmp_path)
        if leader is not None:
            leader.kill()
            leader.wait(timeout=10)
        remove_namespaces()
        lock.close()
        assert not impair.delayers(str(tmp_path.resolve())), "a delayer outlived its test"


def test_delay_raises_rtt_by_at_least_the_delay(pair: Pair) -> None:
    for delay in (50.0, 100.0):
        info = impair.apply(pair.state, HOST, pair.pid, delay, 0.0)
        assert info["delay_ms"] == delay
        # From b to a (a's replies are late) and from a to b (a's requests are late).
        for src, dst in ((NS_B, ADDR_A), (NS_A, ADDR_B)):
            p = ping(src, dst)
            rtt = f"{p.rtt_min}/{p.rtt_avg}/{p.rtt_max}"
            print(f"{impair.mode()} {delay:.0f} ms {src}->{dst}: rtt min/avg/max {rtt} ms")
            assert p.received == p.sent
            assert p.rtt_min is not None and p.rtt_min >= delay


def test_tcp_is_delayed_intact_and_not_throttled(pair: Pair) -> None:
    """TCP from the impaired side: segments arrive intact, and in bulk. A delayer holding
    segments in the kernel would leave their socket's memory in use, and TCP Small Queues
    would then cap the stream near two segments per round trip (about 60 kB/s at 50 ms):
    8 MiB would take minutes rather than the second or so netem (or our resend) takes."""
    size = 8 << 20
    impair.apply(pair.state, HOST, pair.pid, 50.0, 0.0)
    out = tcp_transfer(NS_A, NS_B, ADDR_B, size)  # data leaves a: delayed
    print(f"{impair.mode()} 50 ms: 8 MiB a->b in {out.seconds:.2f}s, connect {out.connect_ms} ms")
    assert (out.received, out.sha256) == (size, digest(size))
    assert out.seconds < 60.0
    back = tcp_transfer(NS_B, NS_A, ADDR_A, 1 << 20)  # SYN-ACK leaves a: delayed
    assert back.connect_ms >= 50.0
    assert (back.received, back.sha256) == (1 << 20, digest(1 << 20))


def test_full_loss_blocks_and_clear_restores(pair: Pair) -> None:
    impair.apply(pair.state, HOST, pair.pid, 0.0, 100.0)
    assert ping(NS_B, ADDR_A).received == 0
    assert ping(NS_A, ADDR_B).received == 0
    with pytest.raises(subprocess.CalledProcessError):  # no SYN-ACK ever leaves a
        tcp_transfer(NS_B, NS_A, ADDR_A, 1000, timeout=5.0, connect_timeout=2.0)
    impair.clear(pair.state, HOST, pair.pid)
    p = ping(NS_B, ADDR_A)
    assert p.received == p.sent
    assert p.rtt_min is not None and p.rtt_min < 20.0
    impair.clear(pair.state, HOST, pair.pid)  # twice is fine
    assert sh("ip", "netns", "exec", NS_A, "tc", "qdisc", "show", "dev", "host0").stdout.find("netem") < 0


def test_zero_delay_and_loss_clears(pair: Pair) -> None:
    impair.apply(pair.state, HOST, pair.pid, 100.0, 0.0)
    assert impair.apply(pair.state, HOST, pair.pid, 0.0, 0.0) == {"mode": "none"}
    assert not impair.delayers(str(pair.state.resolve()))
    p = ping(NS_B, ADDR_A)
    assert p.received == p.sent and p.rtt_min is not None and p.rtt_min < 20.0


def test_apply_is_idempotent_and_changes_in_place(pair: Pair) -> None:
    first = impair.apply(pair.state, HOST, pair.pid, 50.0, 0.0)
    assert impair.apply(pair.state, HOST, pair.pid, 50.0, 0.0) == first
    second = impair.apply(pair.state, HOST, pair.pid, 100.0, 0.0)
    p = ping(NS_B, ADDR_A)
    assert p.received == p.sent and p.rtt_min is not None and p.rtt_min >= 100.0
    if first["mode"] == "delayer":
        assert second["pid"] != first["pid"] and second["queue"] != first["queue"]
        assert not impair.delayers(str(pair.state.resolve())).keys() - {second["pid"]}
        rules = sh("ip", "netns", "exec", NS_A, second["backend"][0], "-S", impair.CHAIN).stdout
        assert rules.count("NFQUEUE") == 1 and f"--queue-num {second['queue']}" in rules
        jumps = sh("ip", "netns", "exec", NS_A, second["backend"][0], "-S", "OUTPUT").stdout
        assert jumps.count(impair.CHAIN) == 1


def test_dead_delayer_lets_traffic_through(pair: Pair) -> None:
    info = impair.apply(pair.state, HOST, pair.pid, 100.0, 0.0)
    if info["mode"] != "delayer":
        pytest.skip("only the delayer has a process to die")
    os.kill(info["pid"], signal.SIGKILL)
    wait_for("the delayer to die", lambda: not impair.delayers(str(pair.state.resolve())))
    p = ping(NS_B, ADDR_A)  # --queue-bypass: undelayed, not blackholed
    assert p.received == p.sent and p.rtt_min is not None and p.rtt_min < 20.0
    again = impair.apply(pair.state, HOST, pair.pid, 100.0, 0.0)  # a dead delayer is replaced
    assert again["pid"] != info["pid"]
    p = ping(NS_B, ADDR_A)
    assert p.rtt_min is not None and p.rtt_min >= 100.0


def test_delayer_exits_with_its_leader_and_clear_after_death(pair: Pair) -> None:
    info = impair.apply(pair.state, HOST, pair.pid, 100.0, 5.0)
    pair.leader.kill()
    pair.leader.wait(timeout=10)
    if info["mode"] == "delayer":
        wait_for("the delayer to follow its leader", lambda: not impair.delayers(str(pair.state.resolve())))
    impair.clear(pair.state, HOST, pair.pid)
    impair.clear(pair.state, HOST, None)
    assert not (pair.state / "impair" / f"{HOST}.json").exists()


def test_kill_all_stops_every_delayer(pair: Pair) -> None:
    info = impair.apply(pair.state, HOST, pair.pid, 100.0, 0.0)
    if info["mode"] != "delayer":
        pytest.skip("netem has no process")
    assert impair.kill_all(pair.state) == [info["pid"]]
    assert not impair.delayers(str(pair.state.resolve()))
    assert not list((pair.state / "impair").glob("*.json"))
    assert impair.kill_all(pair.state) == []
