"""Process-level faults: hostile peers, a hung component, force-promote, (de)registration."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
from pathlib import Path

from runtime_harness import Cloud, Writer, http, run_cli, wait_until

from euca_runtime.frames import encode
from euca_runtime.tls import create_ca, issue_node_cert


def _bus_address(cloud: Cloud, node: str) -> tuple[str, int]:
    host, port = cloud.layout.nodes[node].config.read_text().split("listen: ")[1].split()[0].rsplit(":", 1)
    return host.strip("'\""), int(port.strip("'\""))


def _tls_client(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we are the attacker: we do not care who the server is
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _still_serving(cloud: Cloud, key: str) -> None:
    cloud.put("node-a", key, b"ok")
    assert cloud.get("node-b", key) == b"ok"
    assert cloud.service("node-a.kv", via="node-a")["state"] == "ENABLED"


def test_hostile_peers_are_refused_and_the_process_is_unharmed(ha_cloud: Cloud, tmp_path: Path) -> None:
    wait_until(lambda: ha_cloud.enabled("kv") == "node-a.kv", what="node-a.kv ENABLED")
    pid = ha_cloud.pid("node-a")
    addr = _bus_address(ha_cloud, "node-a")
    # 1. A peer whose certificate comes from another CA: refused in the TLS handshake.
    create_ca(tmp_path / "rogue-ca.crt", tmp_path / "rogue-ca.key")
    issue_node_cert(
        tmp_path / "rogue-ca.crt", tmp_path / "rogue-ca.key", "node-b", tmp_path / "b.crt", tmp_path / "b.key"
    )
    ctx = _tls_client(tmp_path / "rogue-ca.crt", tmp_path / "b.crt", tmp_path / "b.key")
    with socket.create_connection(addr, timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(encode({"kind": "hello", "id": 0, "node": "node-b"}))
                assert tls.recv(100) == b""  # TLS 1.3: the refusal arrives on the first read
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            pass
    # 2. Plain-text garbage instead of TLS.
    with socket.create_connection(addr, timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        try:
            raw.recv(100)
        except (ConnectionResetError, TimeoutError):
            pass
    # 3. A peer with a valid cluster certificate that sends a malformed, then an oversized frame.
    pki = ha_cloud.root / "pki"
    good = _tls_client(pki / "ca.crt", pki / "node-c.crt", pki / "node-c.key")
    for payload in (struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", struct.pack(">I", 2**31)):
        with socket.create_connection(addr, timeout=5) as raw, good.wrap_socket(raw) as tls:
            tls.sendall(encode({"kind": "hello", "id": 0, "node": "node-c"}))
            tls.recv(4096)  # the server's hello
            tls.sendall(payload)
            data = b"x"
            while data:  # the server closes this one connection
                data = tls.recv(4096)
    assert ha_cloud.pid("node-a") == pid and os.path.exists(f"/proc/{pid}")
    _still_serving(ha_cloud, "after-hostile")
    log = (ha_cloud.root / "node-a.log").read_text()
    assert "refused" in log and "bad frame" in log


def test_a_hung_component_goes_notready_while_its_process_lives_on(ha_cloud: Cloud) -> None:
    wait_until(lambda: ha_cloud.service("node-b.kv")["state"] == "DISABLED", what="backup in sync")
    admin = ha_cloud.admin_url("node-b")
    status, body = http(
        "POST",
        f"{admin}/v1/fault",
        json.dumps({"name": "node-a.kv", "fault": "hang"}).encode(),
        ha_cloud.token,
    )
    assert status == 200, body
    wait_until(
        lambda: ha_cloud.enabled("kv") == "node-b.kv", what="the backup takes over from the hung primary"
    )
    row = ha_cloud.service("node-a.kv", via="node-a")
    assert row["state"] == "NOTREADY" and "health probe" in row["cause"]
    assert ha_cloud.service("node-a.clc", via="node-a")["state"] == "ENABLED"  # same process, unharmed
    ha_cloud.put("node-a", "via-hung-node", b"1")  # node-a still forwards to the new primary
    assert ha_cloud.get("node-b", "via-hung-node") == b"1"
    status, _ = http(
        "POST", f"{admin}/v1/fault", json.dumps({"name": "node-a.kv", "fault": None}).encode(), ha_cloud.token
    )
    assert status == 200
    wait_until(lambda: ha_cloud.service("node-a.kv")["state"] == "DISABLED", what="recovered to hot standby")


def test_force_promote_after_losing_the_in_sync_backup_and_divergent_suffix_discarded(
    ha_cloud: Cloud,
) -> None:
    wait_until(lambda: ha_cloud.service("node-b.kv")["state"] == "DISABLED", what="backup in sync")
    ha_cloud.put("node-a", "before", b"1")
    wait_until(lambda: ha_cloud.service("node-b.kv")["lag"] == 0, what="backup has 'before'")
    run_cli("down", "--dir", str(ha_cloud.root), "--node", "node-b")
    for i in range(3):  # acknowledged once the voters recorded the smaller in-sync set
        ha_cloud.put("node-a", f"only-on-a{i}", b"1")
    os.kill(ha_cloud.pid("node-a"), signal.SIGKILL)
    run_cli("up", "--dir", str(ha_cloud.root), "--node", "node-b")
    # node-b.kv is not in the in-sync set: the group is unavailable, not wrong (I2).
    status, body = http("GET", f"{ha_cloud.kv_url('node-b')}/kv/before?timeout=1.5", timeout=10)
    assert status == 503, body
    assert ha_cloud.enabled("kv", via="node-b") is None
    proc = ha_cloud.ctl("force-promote", "node-b.kv", "--accept-data-loss")
    assert proc.returncode == 0, proc.stderr
    assert ha_cloud.enabled("kv", via="node-b") == "node-b.kv"
    assert ha_cloud.get("node-b", "before") == b"1"
    assert ha_cloud.get("node-b", "only-on-a0") is None  # the accepted loss
    ha_cloud.put("node-b", "after", b"2")
    # The deposed primary comes back: its divergent suffix is discarded by a state transfer.
    run_cli("up", "--dir", str(ha_cloud.root), "--node", "node-a")
    wait_until(
        lambda: ha_cloud.service("node-a.kv", via="node-b")["state"] == "DISABLED", what="node-a rejoined"
    )
    proc = ha_cloud.ctl("switchover", "kv", "--to", "node-a.kv")
    assert proc.returncode == 0, proc.stderr
    assert ha_cloud.get("node-a", "only-on-a1") is None
    assert ha_cloud.get("node-a", "after") == b"2" and ha_cloud.get("node-a", "before") == b"1"


def test_deregister_stops_an_instance_for_good_and_register_brings_it_back(ha_cloud: Cloud) -> None:
    wait_until(lambda: ha_cloud.service("node-b.kv")["state"] == "DISABLED", what="backup in sync")
    proc = ha_cloud.ctl("deregister", "node-b.kv")
    assert proc.returncode == 0, proc.stderr
    wait_until(
        lambda: ha_cloud.service("node-b.kv")["state"] == "STOPPED", what="deregistered instance STOPPED"
    )
    os.kill(ha_cloud.pid("node-b"), signal.SIGKILL)
    run_cli("up", "--dir", str(ha_cloud.root), "--node", "node-b")
    wait_until(
        lambda: ha_cloud.service("node-b.clc", via="node-b")["state"] == "DISABLED", what="node-b back"
    )
    assert ha_cloud.service("node-b.kv", via="node-b")["state"] == "STOPPED"
    ha_cloud.put("node-a", "solo", b"1")
    # Registering the backup again, online, under write load: it catches up and joins.
    with Writer(ha_cloud, ["node-a", "node-b"], "reg", per_thread_rate=100) as writer:
        wait_until(lambda: writer.count() >= 20, what="writes flowing")
        proc = ha_cloud.ctl("register", "node-b.kv")
        assert proc.returncode == 0, proc.stderr
        wait_until(
            lambda: ha_cloud.service("node-b.kv")["state"] == "DISABLED", what="registered backup in sync"
        )
        n = writer.count()
        wait_until(lambda: writer.count() >= n + 20, what="writes while the backup is in sync")
    assert writer.errors == []
    proc = ha_cloud.ctl("switchover", "kv", "--to", "node-b.kv")
    assert proc.returncode == 0, proc.stderr
    assert ha_cloud.get("node-b", "solo") == b"1"
    assert writer.missing(via="node-b") == []


def test_deregister_an_instance_whose_host_is_gone(ha_cloud: Cloud) -> None:
    """A frozen node (its host is gone as far as anyone can tell) cannot stop its instances itself.

    Its backup instances are tombstoned without it (another instance of their group is ENABLED);
    the instance that was its group's only primary is refused (it may still hold the lease)
    unless forced.
    """
    wait_until(lambda: ha_cloud.enabled("kv") == "node-a.kv", what="node-a.kv ENABLED")
    wait_until(lambda: ha_cloud.service("node-b.kv")["state"] == "DISABLED", what="node-b.kv in sync")
    wait_until(lambda: ha_cloud.enabled("walrus") == "node-a.walrus", what="node-a.walrus ENABLED")
    # kv: node-b.kv is the primary and the only instance that can be.
    assert ha_cloud.ctl("switchover", "kv", "--to", "node-b.kv").returncode == 0
    proc = ha_cloud.ctl("modify-service", "node-a.kv", "--state", "STOPPED")
    assert proc.returncode == 0, proc.stderr
    pid_b = ha_cloud.pid("node-b")
    os.kill(pid_b, signal.SIGSTOP)
    try:
        wait_until(
            lambda: ha_cloud.service("node-b.walrus", via="node-a")["cause"].startswith("unreachable"),
            what="node-b unreachable",
        )
        # The group's primary, last heard ENABLED, no other ENABLED: refused, nothing changed.
        proc = ha_cloud.ctl("deregister", "node-b.kv")
        assert proc.returncode != 0
        assert "MayHoldLease" in proc.stderr and "may still hold the lease" in proc.stderr, proc.stderr
        assert not ha_cloud.service("node-b.kv", via="node-a")["cause"].startswith("deregistered")
        # A backup of a group whose primary is alive: tombstoned without its node.
        proc = ha_cloud.ctl("deregister", "node-b.walrus")
        assert proc.returncode == 0, proc.stderr
        assert "tombstoned without it" in proc.stdout, proc.stdout
        row = ha_cloud.service("node-b.walrus", via="node-a")
        assert row["state"] == "STOPPED" and row["cause"].startswith("deregistered"), row
        groups = json.loads(ha_cloud.ctl("describe-groups", "-o", "json").stdout)
        walrus = next(g for g in groups if g["group"] == "walrus")
        assert "node-b.walrus" not in json.dumps(walrus), walrus  # not part of the group's health
        # The operator knows the host is down for good: --force.
        proc = ha_cloud.ctl("deregister", "node-b.kv", "--force")
        assert proc.returncode == 0, proc.stderr
        row = ha_cloud.service("node-b.kv", via="node-a")
        assert row["state"] == "STOPPED" and row["cause"].startswith("deregistered"), row
    finally:
        os.kill(pid_b, signal.SIGCONT)


def test_systemd_death_hook_certifies_over_the_bus(ha_cloud: Cloud) -> None:
    """`python -m euca_runtime.death` (the unit's ExecStopPost) releases a dead holder's leases.

    node-a's `up` supervisor is killed first, so only the hook can certify; it runs right after the
    `kill -9` (as systemd runs it) and the voters record the certificate from `systemd@node-a`.
    """
    from euca_runtime import death, local

    wait_until(lambda: ha_cloud.enabled("kv") == "node-a.kv", what="node-a.kv ENABLED")
    wait_until(lambda: ha_cloud.service("node-b.kv")["state"] == "DISABLED", what="node-b.kv in sync")
    supervisor = local.read_pid(ha_cloud.layout.supervisor_pid_file("node-a"))
    assert supervisor is not None
    os.kill(supervisor, signal.SIGKILL)
    pid_a = ha_cloud.pid("node-a")
    # While the process lives, the hook certifies nothing.
    assert death.certify(str(ha_cloud.layout.nodes["node-a"].config)) == 0
    os.kill(pid_a, signal.SIGKILL)
    wait_until(lambda: not death.pid_alive(pid_a), what="node-a's runtime gone")
    assert death.certify(str(ha_cloud.layout.nodes["node-a"].config)) == 0
    wait_until(lambda: ha_cloud.enabled("kv", via="node-b") == "node-b.kv", what="node-b.kv ENABLED")
    proc = ha_cloud.ctl("describe-services", "--events", "-o", "json")
    events = json.dumps(json.loads(proc.stdout)["events"])
    assert "death certificate from systemd@node-a" in events, events[-3000:]
    # The dead process's last report no longer counts, though the certificate's own connection
    # made node-a look fresh again: node-a.kv is not shown ENABLED (nor holding a VIP) beside
    # the new primary.
    row = ha_cloud.service("node-a.kv", via="node-b")
    assert row["state"] == "NOTREADY", row
    assert row["cause"].startswith("process died (death certificate from systemd@node-a"), row
