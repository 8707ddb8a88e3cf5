"""A fresh HA cloud on a fresh testbed bed, deployed as `make demo` does: three hosts, the demo's
topology (h1, h2: clc, walrus, cc, sc primary/backup, service VIPs; h3: arbitrator and NC),
`site.yml`, then the eucarc runbook for the clients' endpoints and keys. `remove` takes it all
down again (the bed, and the cloud's CA under the work directory)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from faults.history import History
from faults.observe import Hosts, wait_recovered
from faults.workloads import Endpoints
from testbed import bed as tb
from testbed.model import STATE_ROOT, TestbedError

log = logging.getLogger("faults.cloud")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEMO_TOPOLOGY = ROOT / "inventories" / "demo" / "topology.yml"
HOSTS = ["h1", "h2", "h3"]
EC2_PORT = 8774
GROUPS = ["clc", "walrus", "kv", "cc/cluster01", "sc/cluster01"]  # replicated: must end redundant


@dataclass
class Cloud:
    bed: str
    workdir: Path
    endpoints: Endpoints
    hosts: Hosts
    deploy_seconds: float
    names: list[str]


def topology(bed: str, workdir: Path, extra_vars: Mapping[str, Any] | None = None) -> dict[str, Any]:
    doc = yaml.safe_load(DEMO_TOPOLOGY.read_text())
    doc["all"]["vars"]["euca_cloud_name"] = bed
    doc["all"]["vars"]["euca_pki_controller_dir"] = str(workdir / "pki")
    doc["all"]["vars"].update(extra_vars or {})
    return dict(doc)


def playbook(bed: str, topo: Path, path: str, *extra: str, timeout: float = 1800) -> str:
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    cmd = [str(BIN / "ansible-playbook"), "-i", str(STATE_ROOT / bed / "inventory.yml"), "-i", str(topo)]
    proc = subprocess.run(
        [*cmd, str(ROOT / path), *extra],
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise TestbedError(
            f"{path} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}{proc.stderr[-1000:]}"
        )
    return proc.stdout


def deploy(
    bed: str, workdir: Path, timeout: float = 300, extra_vars: Mapping[str, Any] | None = None
) -> Cloud:
    """Boot the bed, deploy (the demo's topology, plus `extra_vars` for every host), wait until
    every group is redundant, write the eucarc. The caller removes the bed (`remove`) whatever
    happens."""
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    tb.up(bed, len(HOSTS), timeout=600)  # a loaded machine boots slowly
    topo = workdir / "topology.yml"
    topo.write_text(yaml.safe_dump(topology(bed, workdir, extra_vars)))
    playbook(bed, topo, "playbooks/site.yml")
    hosts = Hosts(bed)
    at, bad = wait_recovered(hosts, HOSTS, History(), GROUPS, timeout)
    if at is None:
        raise TestbedError(f"the deployed cloud did not become redundant in {timeout:.0f} s: {bad}")
    eucarc = workdir / "eucarc"
    playbook(bed, topo, "playbooks/runbooks/eucarc.yml", "-e", f"euca_eucarc={eucarc}")
    endpoints = Endpoints.from_eucarc(eucarc, ec2=ec2_urls(bed))
    return Cloud(bed, workdir, endpoints, hosts, time.monotonic() - t0, list(HOSTS))


def ec2_urls(bed: str) -> list[str]:
    """EC2 is served on every clc host's own address (h1, h2)."""
    return [f"http://{h.address}:{EC2_PORT}" for h in tb.load(bed).hosts if h.name in ("h1", "h2")]


def remove(bed: str, workdir: Path | None = None) -> None:
    """Remove the bed (safe when it is not up) and the cloud's CA."""
    try:
        tb.down(bed)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir / "pki", ignore_errors=True)
