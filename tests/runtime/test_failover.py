"""Failures of real runtime processes on loopback: kill -9, SIGSTOP, switchover, restarts.

Invariants checked: one ENABLED instance per group at any time in what describe-services
shows (I1 as the operator sees it), every acknowledged write readable after the failover (I2),
a frozen primary's late writes refused.
"""

from __future__ import annotations

import json
import os
import signal
import time

from runtime_harness import Cloud, Writer, http, run_cli, wait_until


def _settled(cloud: Cloud, primary: str = "node-a", backup: str = "node-b") -> bool:
    rows = {s["name"]: s for s in cloud.services()}
    return all(
        rows[f"{primary}.{g}"]["state"] == "ENABLED"
        and rows[f"{backup}.{g}"]["state"] == "DISABLED"
        and rows[f"{backup}.{g}"]["in_sync"]
        for g in ("clc", "kv")
    )


def test_kill9_of_the_primary_fails_over_without_losing_acknowledged_writes(ha_cloud: Cloud) -> None:
    wait_until(lambda: _settled(ha_cloud), what="HA settled")
    with Writer(ha_cloud, ["node-b", "node-b", "node-a"], "k9") as writer:
        wait_until(lambda: writer.count() >= 30, what="writes flowing")
        victim = ha_cloud.pid("node-a")
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: ha_cloud.enabled("kv", via="node-b") == "node-b.kv", what="node-b.kv ENABLED")
        wait_until(lambda: ha_cloud.enabled("clc", via="node-b") == "node-b.clc", what="node-b.clc ENABLED")
        wait_until(
            lambda: any(a[1] > killed_at for a in writer.acked),
            what="a write sent after the kill acknowledged",
        )
    after = [acked - killed_at for _, sent, acked, _ in writer.acked if sent > killed_at]
    print(f"kill -9 -> first acknowledged write sent after the kill: {min(after):.3f} s")
    rows = {s["name"]: s for s in ha_cloud.services(via="node-b")}
    assert rows["node-a.kv"]["state"] == "NOTREADY" and rows["node-b.kv"]["state"] == "ENABLED"
    assert rows["node-b.kv"]["epoch"] > 1
    # Writes through node-b never failed: requests were held and retried across the failover.
    assert not [e for e in writer.errors if e[0].startswith("k9-0") or e[0].startswith("k9-1")], writer.errors
    assert writer.missing(via="node-b") == []
    events = json.loads(ha_cloud.ctl("describe-services", "-o", "json", "--events").stdout)["events"]
    assert any("death certificate" in e["cause"] for e in events)
    assert any(e["service"] == "node-b.kv" and e["new"] == "ENABLED" for e in events)


def test_sigstop_past_the_lease_then_sigcont_steps_down_and_loses_nothing(ha_cloud: Cloud) -> None:
    wait_until(lambda: _settled(ha_cloud), what="HA settled")
    pid = ha_cloud.pid("node-a")
    try:
        with Writer(ha_cloud, ["node-b", "node-b"], "st") as writer:
            wait_until(lambda: writer.count() >= 20, what="writes flowing")
            old_epoch = ha_cloud.service("node-a.kv")["epoch"]
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            wait_until(
                lambda: ha_cloud.enabled("kv", via="node-b") == "node-b.kv", what="node-b.kv takes over"
            )
            wait_until(lambda: any(a[1] > stopped_at for a in writer.acked), what="writes resume at node-b")
            os.kill(pid, signal.SIGCONT)
            wait_until(
                lambda: ha_cloud.service("node-a.kv", via="node-a")["state"] in ("DISABLED", "NOTREADY"),
                what="the resumed primary to step down",
            )
            n = writer.count()
            wait_until(lambda: writer.count() >= n + 20, what="writes continue after SIGCONT")
    finally:
        os.kill(pid, signal.SIGCONT)
    # No write sent after the freeze was acknowledged under the old epoch: the frozen primary's
    # late writes were refused (fenced by the new epoch, or its lease had run out).
    late = [k for k, sent, _, resp in writer.acked if sent > stopped_at and resp["epoch"] <= old_epoch]
    assert late == []
    assert writer.missing(via="node-a") == []
    assert ha_cloud.enabled("kv", via="node-a") == "node-b.kv"
    wait_until(lambda: ha_cloud.service("node-a.kv")["state"] == "DISABLED", what="node-a.kv back in sync")
    events = json.loads(ha_cloud.ctl("describe-services", "-o", "json", "--events").stdout)["events"]
    assert any(e["service"] == "node-a.kv" and "stepped down" in e["cause"] for e in events), events


def test_switchover_under_load_loses_nothing_and_fails_no_request(ha_cloud: Cloud) -> None:
    wait_until(lambda: _settled(ha_cloud), what="HA settled")
    with Writer(ha_cloud, ["node-a", "node-b"], "sw", per_thread_rate=100) as writer:
        wait_until(lambda: writer.count() >= 20, what="writes flowing")
        proc = ha_cloud.ctl("switchover", "kv", "--to", "node-b.kv")
        assert proc.returncode == 0, proc.stderr
        assert ha_cloud.enabled("kv") == "node-b.kv"
        n = writer.count()
        wait_until(lambda: writer.count() >= n + 20, what="writes after the switchover")
        proc = ha_cloud.ctl("modify-service", "node-b.kv", "--state", "DISABLED")  # and back again
        assert proc.returncode == 0, proc.stderr
        assert ha_cloud.enabled("kv") == "node-a.kv"
        n = writer.count()
        wait_until(lambda: writer.count() >= n + 20, what="writes after the second switchover")
    assert writer.errors == []
    assert writer.missing(via="node-b") == []
    wait_until(lambda: _settled(ha_cloud), what="node-b.kv back in sync as the backup")


def test_restarted_backup_catches_up(ha_cloud: Cloud) -> None:
    wait_until(lambda: _settled(ha_cloud), what="HA settled")
    run_cli("down", "--dir", str(ha_cloud.root), "--node", "node-b")
    wait_until(
        lambda: ha_cloud.service("node-b.kv", via="node-a")["state"] == "NOTREADY", what="node-b seen down"
    )
    for i in range(150):
        ha_cloud.put("node-a", f"r{i}", f"v{i}".encode())
    run_cli("up", "--dir", str(ha_cloud.root), "--node", "node-b")
    wait_until(
        lambda: (s := ha_cloud.service("node-b.kv", via="node-a"))["state"] == "DISABLED" and s["lag"] == 0,
        what="the restarted backup DISABLED, in sync, lag 0",
    )
    # Prove it has the data: make it the primary and read everything back.
    proc = ha_cloud.ctl("switchover", "kv", "--to", "node-b.kv")
    assert proc.returncode == 0, proc.stderr
    assert all(ha_cloud.get("node-b", f"r{i}") == f"v{i}".encode() for i in range(150))


def test_operator_stopped_survives_a_restart_and_modify_never_silently_fails(ha_cloud: Cloud) -> None:
    wait_until(lambda: _settled(ha_cloud), what="HA settled")
    proc = ha_cloud.ctl("modify-service", "node-b.kv", "--state", "STOPPED")
    assert proc.returncode == 0, proc.stderr
    assert ha_cloud.service("node-b.kv")["state"] == "STOPPED"
    # With the only backup stopped, disabling the primary cannot take effect: it says why.
    proc = ha_cloud.ctl("modify-service", "node-a.kv", "--state", "DISABLED")
    assert proc.returncode == 1 and "no in-sync backup" in proc.stderr, proc.stderr
    assert ha_cloud.enabled("kv") == "node-a.kv"
    # kill -9 and restart the process: the operator's STOPPED holds.
    os.kill(ha_cloud.pid("node-b"), signal.SIGKILL)
    wait_until(
        lambda: ha_cloud.service("node-b.clc", via="node-a")["state"] == "NOTREADY", what="node-b seen down"
    )
    run_cli("up", "--dir", str(ha_cloud.root), "--node", "node-b")
    wait_until(
        lambda: ha_cloud.service("node-b.clc", via="node-b")["state"] == "DISABLED", what="node-b back"
    )
    assert ha_cloud.service("node-b.kv", via="node-b")["state"] == "STOPPED"
    ha_cloud.put("node-b", "while-stopped", b"1")  # node-b still forwards kv requests
    proc = ha_cloud.ctl("modify-service", "node-b.kv", "--state", "DISABLED")
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: ha_cloud.service("node-b.kv")["in_sync"], what="node-b.kv in sync again")
    proc = ha_cloud.ctl("modify-service", "node-b.kv", "--state", "ENABLED")
    assert proc.returncode == 0, proc.stderr
    assert ha_cloud.enabled("kv") == "node-b.kv"
    assert ha_cloud.get("node-a", "while-stopped") == b"1"
    bad = ha_cloud.ctl("modify-service", "node-z.kv", "--state", "STOPPED")
    assert bad.returncode == 1 and "node-z.kv" in bad.stderr


def test_whole_cloud_killed_and_restarted_comes_back_with_its_data(ha_cloud: Cloud) -> None:
    """EUCA-4354: nothing may stay stuck after every process dies at once and comes back."""
    wait_until(lambda: _settled(ha_cloud), what="HA settled")
    for i in range(10):
        ha_cloud.put("node-b", f"keep{i}", b"1")
    for node in ("node-a", "node-b", "node-c"):
        os.kill(ha_cloud.pid(node), signal.SIGKILL)
    wait_until(lambda: all(not os.path.exists(f"/proc/{p}") for p in ha_cloud.all_pids()), what="all dead")
    run_cli("up", "--dir", str(ha_cloud.root))
    wait_until(
        lambda: all(
            sum(1 for s in ha_cloud.services() if s["group"] == g and s["state"] == st) == 1
            for g in ("clc", "kv")
            for st in ("ENABLED", "DISABLED")
        ),
        what="one ENABLED and one DISABLED per group again",
    )
    assert all(ha_cloud.get("node-a", f"keep{i}") == b"1" for i in range(10))


def test_the_shared_api_address_keeps_answering_after_the_primary_dies(ha_cloud: Cloud) -> None:
    """Every process serving kv also listens on the cloud's shared kv address (SO_REUSEPORT):
    a client that only knows that one URL carries on after `kill -9` of node-a."""
    wait_until(lambda: _settled(ha_cloud), what="HA settled")
    shared = json.loads((ha_cloud.root / "cloud.json").read_text())["shared_api"]["kv"]
    url = f"http://{shared}/kv"
    for i in range(20):  # new connections land on either process; both forward to the primary
        status, body = http("PUT", f"{url}/before-{i}", b"v", timeout=10)
        assert status == 200, body
    os.kill(ha_cloud.pid("node-a"), signal.SIGKILL)
    for i in range(20):  # node-a's listener died with it: every connection reaches node-b now
        # A connection the kernel queued on node-a's socket in its last instant is reset; a
        # client retries that (as botocore does), and nothing else may fail.
        status, body = wait_until(
            lambda i=i: http("PUT", f"{url}/after-{i}?timeout=10", b"w", timeout=20),
            timeout=30,
            what=f"PUT after-{i} through the shared address",
        )
        assert status == 200, body
    assert ha_cloud.enabled("kv", via="node-b") == "node-b.kv"
    for key in [f"before-{i}" for i in range(20)] + [f"after-{i}" for i in range(20)]:
        status, _ = http("GET", f"{url}/{key}", timeout=10)
        assert status == 200, key
    eucarc = (ha_cloud.root / "eucarc").read_text()
    s3_shared = json.loads((ha_cloud.root / "cloud.json").read_text())["shared_api"]["s3"]
    assert f"export AWS_ENDPOINT_URL_S3=http://{s3_shared}" in eucarc
