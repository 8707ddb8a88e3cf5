"""The operator runbooks (playbooks/runbooks/) against a cloud that site.yml deployed on testbed hosts.

One bed of three hosts (two clc hosts and an arbitrator: three voters), deployed once for the
module with the runtime running; every test runs the runbooks as an operator would
(`ansible-playbook -i INVENTORY playbooks/runbooks/X.yml -e ...`) and reads the outcome from the
status runbook's JSON. The prose twins are in docs/runbooks/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed import bed as tb
from testbed.model import STATE_ROOT

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UPSTREAM = "{{ testbed_upstream_address }}"  # the bed's users' side, from its inventory
KV_PORT = 8779


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Cloud:
    def __init__(self, name: str, topology: Path, workdir: Path) -> None:
        self.name = name
        self.topology = topology
        self.workdir = workdir

    def playbook(self, playbook: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "ANSIBLE_NOCOLOR": "1",
        }
        cmd = [
            str(BIN / "ansible-playbook"),
            "-i",
            str(STATE_ROOT / self.name / "inventory.yml"),
            "-i",
            str(self.topology),
            str(ROOT / playbook),
            *extra,
        ]
        return subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
        )

    def status(self, strict: bool = False) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        out = self.workdir / "status.json"
        out.unlink(missing_ok=True)
        extra = ["-e", f"euca_status_json={out}"]
        if strict:
            extra += ["-e", "euca_status_strict=true"]
        proc = self.playbook("playbooks/runbooks/status.yml", *extra)
        groups = {g["group"]: g for g in json.loads(out.read_text())} if out.exists() else {}
        return proc, groups

    def enabled(self, group: str) -> list[str]:
        proc, groups = self.status()
        assert proc.returncode == 0, proc.stdout[-3000:]
        return list(groups[group]["enabled"])

    def address(self, host: str) -> str:
        state = json.loads((STATE_ROOT / self.name / "state.json").read_text())
        return next(h["address"] for h in state["hosts"] if h["name"] == host)

    def put(self, host: str, key: str, value: bytes) -> dict[str, Any]:
        """A kv write through `host`'s kv API: acknowledged once every in-sync backup has it."""
        url = f"http://{self.address(host)}:{KV_PORT}/kv/{key}?timeout=10"
        req = urllib.request.Request(url, data=value, method="PUT")
        with urllib.request.urlopen(req, timeout=20) as resp:
            return dict(json.loads(resp.read()))

    def get(self, host: str, key: str) -> bytes | None:
        url = f"http://{self.address(host)}:{KV_PORT}/kv/{key}?timeout=10"
        try:
            with urllib.request.urlopen(url, timeout=20) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def ssh(self, host: str, cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", str(STATE_ROOT / self.name / "ssh_config"), "-o", "BatchMode=yes", host, cmd],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def deploy(name: str, workdir: Path) -> Cloud:
    """A bed of three hosts (h1, h2: clc; h3: arbitrator) with site.yml applied, runtime running."""
    topology = workdir / "topology.yml"
    routes = [{"name": "users", "targets": [{"icmp": UPSTREAM}]}]
    inventory = {
        "all": {
            "vars": {
                "euca_cloud_name": name,
                "euca_pki_controller_dir": str(workdir / "pki"),
                "euca_runtime_service_start": True,
                "euca_runtime_kv_api_port": KV_PORT,
            },
            "children": {
                "clc": {"hosts": {"h1": None, "h2": None}},
                "arbitrator": {"hosts": {"h3": {"euca_arbitrator_routes": routes}}},
            },
        }
    }
    topology.write_text(yaml.safe_dump(inventory))
    tb.up(name, 3)
    c = Cloud(name, topology, workdir)
    proc = c.playbook("playbooks/site.yml", timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    wait_until(lambda: c.status(strict=True)[0].returncode == 0, 60, "a healthy cloud after site.yml")
    return c


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    name = f"rb{os.getpid() % 100000}"
    try:
        yield deploy(name, tmp_path_factory.mktemp("runbooks"))
    finally:
        tb.down(name)


def test_status_shows_every_group_with_one_primary_and_in_sync_backups(cloud: Cloud) -> None:
    proc, groups = cloud.status(strict=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert {"clc", "kv", "arbitrator"} <= set(groups)
    for group in ("clc", "kv"):
        g = groups[group]
        assert len(g["enabled"]) == 1 and g["in_sync"] == 2 and g["healthy"], g
        assert {i["node"] for i in g["instances"]} == {"h1", "h2"}
    assert "GROUP" in proc.stdout and "VIP_HOLDER" in proc.stdout  # the table is printed


def test_switchover_moves_the_primary_and_back(cloud: Cloud) -> None:
    before = cloud.enabled("kv")[0]
    target = "h2.kv" if before == "h1.kv" else "h1.kv"
    proc = cloud.playbook("playbooks/runbooks/switchover.yml", "-e", "group=kv", "-e", f"to={target}")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "TASK [Hand the primary role over]" in proc.stdout and "changed: [" in proc.stdout
    assert cloud.enabled("kv") == [target]
    proc = cloud.playbook("playbooks/runbooks/switchover.yml", "-e", "group=kv", "-e", f"to={before}")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert cloud.enabled("kv") == [before]


def test_switchover_refuses_a_target_that_is_not_a_backup_of_the_group(cloud: Cloud) -> None:
    proc = cloud.playbook("playbooks/runbooks/switchover.yml", "-e", "group=kv", "-e", "to=h3.arbitrator")
    assert proc.returncode != 0
    assert "is not a DISABLED (in-sync) instance of group kv" in proc.stdout
    proc = cloud.playbook("playbooks/runbooks/switchover.yml")
    assert proc.returncode != 0 and "pass -e group=GROUP" in proc.stdout


def test_recover_partition_after_the_primary_was_cut_off(cloud: Cloud) -> None:
    primary = cloud.enabled("kv")[0].split(".")[0]
    others = [h for h in ("h1", "h2", "h3") if h != primary]
    tb.partition(cloud.name, [primary], others)
    try:
        # The majority side takes over by itself: the cut-off primary's lease runs out.
        other_clc = next(h for h in others if h != "h3")

        def majority_took_over() -> bool:
            out = cloud.ssh(
                other_clc,
                "/opt/euca-ha/venv/bin/eucactl --config /etc/eucalyptus/runtime.yml describe-groups -o json",
            ).stdout
            groups = {g["group"]: g for g in json.loads(out or "[]")}
            return f"{other_clc}.kv" in groups.get("kv", {}).get("enabled", [])

        wait_until(majority_took_over, 30, "the majority side's backup taking over")
    finally:
        tb.heal(cloud.name)
    proc = cloud.playbook("playbooks/runbooks/recover-partition.yml", "-e", "euca_recover_wait=60")
    assert proc.returncode == 0, proc.stdout[-3000:]
    proc, groups = cloud.status(strict=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert all(groups[g]["healthy"] for g in ("clc", "kv"))


def test_force_promote_needs_the_confirmation_and_refuses_while_a_primary_lives(cloud: Cloud) -> None:
    proc = cloud.playbook("playbooks/runbooks/force-promote.yml", "-e", "name=h2.kv")
    assert proc.returncode != 0 and "accept_data_loss=true" in proc.stdout
    proc = cloud.playbook(
        "playbooks/runbooks/force-promote.yml", "-e", "name=h2.kv", "-e", "accept_data_loss=true"
    )
    assert proc.returncode != 0 and "use the switchover runbook instead" in proc.stdout


def test_force_promote_after_losing_the_primary_and_its_only_in_sync_copy(cloud: Cloud) -> None:
    if cloud.enabled("kv") != ["h1.kv"]:
        proc = cloud.playbook("playbooks/runbooks/switchover.yml", "-e", "group=kv", "-e", "to=h1.kv")
        assert proc.returncode == 0, proc.stdout[-3000:]
    cloud.put("h1", "before", b"both")
    # The backup's runtime stops; writes go on without it, acknowledged only once the voters
    # recorded h1 alone as in sync (I2).
    assert cloud.ssh("h2", "systemctl stop euca-runtime").returncode == 0
    cloud.put("h1", "only-on-h1", b"lost")
    wait_until(
        lambda: cloud.status()[1]["kv"]["recorded_in_sync"] == ["h1.kv"],
        30,
        "the voters recording h1.kv alone",
    )
    tb.kill(cloud.name, "h1")  # the machine dies: nobody can certify anything
    try:
        assert cloud.ssh("h2", "systemctl start euca-runtime").returncode == 0
        # h2.kv is not in the recorded in-sync set: kv is unavailable, not wrong (I2). (clc had
        # no write meanwhile, so h2.clc is still in its in-sync set and may take over by itself.)
        wait_until(lambda: cloud.status()[1].get("kv"), 60, "h2's runtime answering")
        proc = cloud.playbook("playbooks/runbooks/status.yml", "-e", "euca_status_strict=true")
        assert proc.returncode != 0 and "unhealthy groups: " in proc.stdout and "kv" in proc.stdout
        assert cloud.status()[1]["kv"]["enabled"] == []
        confirm = ["-e", "name=h2.kv", "-e", "accept_data_loss=true"]
        proc = cloud.playbook("playbooks/runbooks/force-promote.yml", *confirm)
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert cloud.enabled("kv") == ["h2.kv"]
        assert cloud.get("h2", "before") == b"both"
        assert cloud.get("h2", "only-on-h1") is None  # the loss the operator accepted
    finally:
        tb.start(cloud.name, "h1")
    # The old primary comes back as a backup (its divergent suffix discarded) and syncs up.
    wait_until(lambda: cloud.status(strict=True)[0].returncode == 0, 90, "h1 back in sync")
    assert cloud.get("h1", "only-on-h1") is None
