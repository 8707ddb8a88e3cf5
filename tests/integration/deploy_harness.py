"""Shared by tests/integration/test_deploy_*.py: a testbed bed with a topology file that the test
edits, site.yml and runbooks run as an operator runs them, and a kv writer that counts errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from testbed import bed as tb
from testbed.model import STATE_ROOT

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UPSTREAM = "{{ testbed_upstream_address }}"  # the bed's users' side, from its inventory
KV_PORT = 8779
EUCACTL = "/opt/euca-ha/venv/bin/eucactl --config /etc/eucalyptus/runtime.yml"


def wait_until(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def topology(name: str, workdir: Path, groups: dict[str, list[str]], **extra: Any) -> dict[str, Any]:
    """An inventory over the bed's hosts: `groups` maps clc/walrus/arbitrator to host names."""
    routes = [{"name": "users", "targets": [{"icmp": UPSTREAM}]}]
    children: dict[str, Any] = {}
    for group, hosts in groups.items():
        host_vars = {"euca_arbitrator_routes": routes} if group == "arbitrator" else None
        children[group] = {"hosts": {h: host_vars for h in hosts}}
    return {
        "all": {
            "vars": {
                "euca_cloud_name": name,
                "euca_pki_controller_dir": str(workdir / "pki"),
                "euca_runtime_kv_api_port": KV_PORT,
                **extra,
            },
            "children": children,
        }
    }


class Cloud:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.topology = workdir / "topology.yml"

    def write_topology(self, doc: dict[str, Any]) -> None:
        self.topology.write_text(yaml.safe_dump(doc))

    def playbook(self, playbook: str, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "ANSIBLE_NOCOLOR": "1",
        }
        inventory = STATE_ROOT / self.name / "inventory.yml"
        cmd = [str(BIN / "ansible-playbook"), "-i", str(inventory), "-i", str(self.topology)]
        cmd += [str(ROOT / playbook), *extra]
        # stdin from /dev/null: ansible refuses a non-blocking stdin (a caller run in the background)
        return subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
        )

    def site(self, *extra: str) -> subprocess.CompletedProcess[str]:
        proc = self.playbook("playbooks/site.yml", *extra)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
        return proc

    def address(self, host: str) -> str:
        state = json.loads((STATE_ROOT / self.name / "state.json").read_text())
        return str(next(h["address"] for h in state["hosts"] if h["name"] == host))

    def subnet_address(self, last: int) -> str:
        """`.last` of the bed's /24 (e.g. for a VIP)."""
        return self.address("h1").rsplit(".", 1)[0] + f".{last}"

    def ssh(self, host: str, cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", str(STATE_ROOT / self.name / "ssh_config"), "-o", "BatchMode=yes", host, cmd],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def eucactl_json(self, host: str, *args: str) -> Any:
        out = self.ssh(host, f"{EUCACTL} {' '.join(args)} -o json")
        if out.returncode != 0:
            return None
        return json.loads(out.stdout or "null")

    def groups(self, host: str) -> dict[str, Any]:
        return {g["group"]: g for g in self.eucactl_json(host, "describe-groups") or []}

    def main_pid(self, host: str) -> str:
        return self.ssh(host, "systemctl show -p MainPID --value euca-runtime").stdout.strip()

    def put(self, host: str, key: str, value: bytes) -> dict[str, Any]:
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


class Writer(threading.Thread):
    """Writes kv keys at a steady pace through a host's kv API; records acks and errors.

    `host` may be a list: like a client with every endpoint of eucarc, the writer moves on to
    the next host when one refuses the connection (its runtime is restarting: the request never
    reached it, so trying another endpoint is safe). Anything else is an error.
    """

    def __init__(self, cloud: Cloud, host: str | list[str], prefix: str, pause: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.cloud, self.prefix, self.pause = cloud, prefix, pause
        self.hosts = [host] if isinstance(host, str) else list(host)
        self.host = self.hosts[0]
        self.acked: list[str] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def _put(self, key: str) -> None:
        refused: list[str] = []
        for host in self.hosts:
            try:
                self.cloud.put(host, key, key.encode())
                return
            except ConnectionRefusedError as exc:
                refused.append(f"{host}: {exc}")
            except urllib.error.URLError as exc:
                if not isinstance(exc.reason, ConnectionRefusedError):
                    raise
                refused.append(f"{host}: {exc}")
        raise OSError("every endpoint refused the connection: " + "; ".join(refused))

    def run(self) -> None:
        i = 0
        while not self._stop_event.is_set():
            key = f"{self.prefix}-{i:06d}"
            try:
                self._put(key)
                self.acked.append(key)
            except (OSError, ValueError) as exc:
                self.errors.append(f"{key}: {exc}")
            i += 1
            self._stop_event.wait(self.pause)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=60)


def down(name: str) -> None:
    tb.down(name)
