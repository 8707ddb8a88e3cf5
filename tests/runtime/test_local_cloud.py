"""`euca-runtime up/down` and the describe-services contract, with real processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from runtime_harness import Cloud, http, processes_under, run_cli, run_ctl, wait_until

CONTRACT = {
    "name",
    "type",
    "partition",
    "host",
    "node",
    "state",
    "epoch",
    "in_sync",
    "lag",
    "heartbeat_age_ms",
}


def test_up_down_single_process_leaves_nothing_behind(tmp_path: Path) -> None:
    root = tmp_path / "single"
    try:
        run_cli("up", "--dir", str(root))
        cloud = Cloud(root)
        assert list(cloud.layout.nodes) == ["node-a"]
        assert cloud.put("node-a", "hello", b"world")["seq"] >= 1
        assert cloud.get("node-a", "hello") == b"world"
        assert {s["name"]: s["state"] for s in cloud.services()} == {
            "node-a.clc": "ENABLED",
            "node-a.kv": "ENABLED",
            "node-a.walrus": "ENABLED",
            "node-a.sc.cluster01": "ENABLED",
            "node-a.cc.cluster01": "ENABLED",
            "node-a.nc.cluster01": "ENABLED",
        }
        eucarc = (root / "eucarc").read_text()
        assert f"export EC2_URL={cloud.layout.nodes['node-a'].api['ec2']}" in eucarc
        assert f"export KV_URL={cloud.kv_url('node-a')}" in eucarc
        assert f"export S3_URL={cloud.layout.nodes['node-a'].api['s3']}" in eucarc
        assert "export EUCA_ADMIN_TOKEN_FILE=" in eucarc
        for secret in (root / "admin.token", root / "node-a" / "admin.token", root / "pki" / "ca.key"):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
        pids = cloud.all_pids()
        assert pids and processes_under(root)
    finally:
        run_cli("down", "--dir", str(root))
    assert not processes_under(root)
    assert all(
        not os.path.exists(f"/proc/{pid}") or b"Z" in open(f"/proc/{pid}/stat", "rb").read() for pid in pids
    )


def test_ha_boot_one_enabled_one_in_sync_backup_per_group(ha_cloud: Cloud) -> None:
    def settled() -> bool:
        rows = {s["name"]: s for s in ha_cloud.services()}
        return all(
            rows[f"node-a.{g}"]["state"] == "ENABLED"
            and rows[f"node-b.{g}"]["state"] == "DISABLED"
            and rows[f"node-b.{g}"]["in_sync"]
            and rows[f"node-b.{g}"]["lag"] == 0
            for g in ("clc", "kv")
        )

    wait_until(settled, what="node-a ENABLED and node-b DISABLED in sync for clc and kv")
    proc = ha_cloud.ctl("describe-services", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert isinstance(rows, list) and rows
    for row in rows:
        assert CONTRACT <= set(row), row
    by_name = {r["name"]: r for r in rows}
    assert by_name["node-c.arbitrator"]["state"] == "ENABLED"
    assert by_name["node-a.kv"]["host"] == "127.0.0.11" and by_name["node-b.kv"]["node"] == "node-b"
    for group in ("clc", "kv"):
        assert sum(1 for r in rows if r["group"] == group and r["state"] == "ENABLED") == 1
    table = ha_cloud.ctl("describe-services")
    assert table.returncode == 0 and "node-b.kv" in table.stdout and "DISABLED" in table.stdout
    # The other ways eucactl finds a cloud: a runtime config file, or what eucarc exports.
    by_config = run_ctl("--config", str(ha_cloud.root / "node-b.yaml"), "describe-services", "-o", "json")
    assert by_config.returncode == 0 and {r["name"] for r in json.loads(by_config.stdout)} == set(by_name)
    env = {
        **os.environ,
        "EUCA_ADMIN_URLS": f"http://127.0.0.1:1 {ha_cloud.admin_url('node-c')}",  # the first is dead
        "EUCA_ADMIN_TOKEN_FILE": str(ha_cloud.root / "admin.token"),
    }
    by_env = subprocess.run(
        [sys.executable, "-m", "euca_runtime.ctl", "describe-services", "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert by_env.returncode == 0, by_env.stderr
    assert {r["name"] for r in json.loads(by_env.stdout)} == set(by_name)
    no_token = subprocess.run(
        [
            sys.executable,
            "-m",
            "euca_runtime.ctl",
            "--admin-url",
            ha_cloud.admin_url("node-a"),
            "describe-services",
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("EUCA_")},
        timeout=60,
    )
    assert no_token.returncode == 1 and "no admin token" in no_token.stderr


def test_kv_writes_through_any_node(ha_cloud: Cloud) -> None:
    for i, node in enumerate(["node-a", "node-b", "node-a", "node-b"]):
        ha_cloud.put(node, f"key{i}", f"value{i}".encode())
    for node in ("node-a", "node-b"):
        for i in range(4):
            assert ha_cloud.get(node, f"key{i}") == f"value{i}".encode()
    assert ha_cloud.get("node-b", "absent") is None
    status, body = http("GET", f"{ha_cloud.kv_url('node-b')}/kv/?prefix=key")
    assert status == 200 and json.loads(body)["keys"] == ["key0", "key1", "key2", "key3"]
    # The backup has every write in its own database and warm cache: lag 0, same seq.
    wait_until(lambda: ha_cloud.service("node-b.kv")["lag"] == 0, what="backup caught up")


def test_admin_api_needs_the_token_and_serves_metrics(ha_cloud: Cloud) -> None:
    wait_until(lambda: ha_cloud.service("node-b.kv")["in_sync"], what="backup in sync")
    admin = ha_cloud.admin_url("node-b")
    assert http("GET", f"{admin}/v1/services")[0] == 401
    assert http("GET", f"{admin}/v1/services", token="wrong")[0] == 401
    assert http("GET", f"{admin}/v1/ping")[0] == 200
    status, body = http("GET", f"{admin}/metrics", token=ha_cloud.token)
    text = body.decode()
    assert status == 200
    assert 'euca_service_state{name="node-b.kv",type="kv",partition="",state="DISABLED"}' in text or (
        'state="NOTREADY"' in text
    )
    for family in ("euca_service_epoch", "euca_lease_remaining_seconds", "euca_failovers_total"):
        assert f"# TYPE {family}" in text
    ha_cloud.put("node-a", "m", b"1")
    status, body = http("GET", f"{ha_cloud.admin_url('node-a')}/metrics", token=ha_cloud.token)
    assert 'euca_request_latency_seconds_count{group="kv",method="put"}' in body.decode()
    assert 'euca_replication_lag_records{group="kv",member="node-b.kv"}' in body.decode()
    # The process froze what it had after start-up (euca_runtime/gc_tuning.py) and counts its
    # collections.
    gauges = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if line.startswith("euca_gc_"))
    assert int(gauges["euca_gc_frozen_objects"]) > 10_000, gauges
    assert {f'euca_gc_collections_total{{generation="{g}"}}' for g in range(3)} <= gauges.keys()
    assert ha_cloud.token not in "".join(p.read_text() for p in ha_cloud.root.glob("*.log"))


def test_incremental_boot_with_a_subset_of_peers(tmp_path: Path) -> None:
    """I4: node-b and the arbitrator alone boot the cloud; node-a joins later and catches up."""
    root = tmp_path / "incremental"
    try:
        run_cli("up", "--ha", "--dir", str(root), "--node", "node-b")  # creates the layout, starts node-b
        cloud = Cloud(root)
        run_cli("up", "--dir", str(root), "--node", "node-c")
        wait_until(lambda: cloud.enabled("kv", via="node-b") == "node-b.kv", what="node-b.kv ENABLED alone")
        wait_until(
            lambda: cloud.enabled("clc", via="node-b") == "node-b.clc", what="node-b.clc ENABLED alone"
        )
        for i in range(20):
            cloud.put("node-b", f"early{i}", b"x")
        run_cli("up", "--dir", str(root), "--node", "node-a")
        wait_until(
            lambda: all(cloud.service(f"node-a.{g}")["state"] == "DISABLED" for g in ("kv", "clc")),
            what="the late node in sync",
        )
        assert cloud.get("node-a", "early19") == b"x"
        registry = {s["name"] for s in cloud.services(via="node-c")}
        assert {"node-a.kv", "node-b.kv", "node-a.clc", "node-b.clc", "node-c.arbitrator"} <= registry
    finally:
        run_cli("down", "--dir", str(root))
    assert not processes_under(root)


def test_an_instance_whose_database_is_unusable_is_broken_and_the_process_lives_on(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    try:
        run_cli("up", "--dir", str(root))
        run_cli("down", "--dir", str(root))
        db = root / "node-a" / "node-a.kv.db"
        for extra in (root / "node-a" / "node-a.kv.db-wal", root / "node-a" / "node-a.kv.db-shm"):
            extra.unlink(missing_ok=True)
        db.write_bytes(b"this is not a SQLite database" * 100)
        run_cli("up", "--dir", str(root), "--node", "node-a")
        cloud = Cloud(root)
        row = wait_until(
            lambda: (s := cloud.service("node-a.kv"))["state"] == "BROKEN" and s, what="kv BROKEN"
        )
        assert "cannot open" in row["cause"]
        wait_until(lambda: cloud.service("node-a.clc")["state"] == "ENABLED", what="clc unaffected")
        status, body = http("GET", f"{cloud.kv_url('node-a')}/kv/x?timeout=0.5", timeout=10)
        assert status == 503, body
        proc = cloud.ctl("modify-service", "node-a.kv", "--state", "ENABLED")
        assert proc.returncode == 1 and "BROKEN" in proc.stderr
    finally:
        run_cli("down", "--dir", str(root))
    assert not processes_under(root)
