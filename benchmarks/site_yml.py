"""How long `playbooks/site.yml` takes on testbed hosts, and what the Ansible settings do to it.

For each bed size (5 and 10 hosts by default) a fresh testbed bed is booted and the demo
topology (inventories/demo/topology.yml: clc, walrus, cc and sc on h1 and h2, the arbitrator
on h3) is spread over it, every further host an NC of cluster01, so every host gets the
runtime. Then, with the project's ansible.cfg (pipelining on, ControlPersist 120 s, forks 20):

- ``scratch``: site.yml on the fresh hosts (the controller's wheelhouse is built by the first
  size if it is not there yet; ``wheelhouse_warm`` says which);
- the idempotent rerun, ``reruns`` times per setting (each run's ``changed=`` is kept, and the
  tasks of the first rerun that changed anything: a rerun should change nothing), the settings
  interleaved in each round so they see the same machine, each run starting with no SSH master
  connection: ``default``, ``no_pipelining`` (``ANSIBLE_PIPELINING=False``),
  ``no_controlpersist`` (``-o ControlMaster=no``, a new SSH connection per task) and
  ``forks_5`` (``ANSIBLE_FORKS=5``).

Playbooks run through the deploy harness (tests/integration/deploy_harness.py) exactly as an
operator runs them; each has a 30-minute bound, and the bed is removed afterwards, also on
failure. Needs root and the testbed (``python -m testbed --help``).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks._cloud import summary
from testbed import bed as tb

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
DEMO_TOPOLOGY = ROOT / "inventories" / "demo" / "topology.yml"
PLAYBOOK_TIMEOUT = 1800.0
BED_PREFIX = "br"  # bed names br1, br2, ... (one per size)

# Ansible settings compared on the idempotent rerun, as environment overrides of ansible.cfg.
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "no_pipelining": {"ANSIBLE_PIPELINING": "False"},
    "no_controlpersist": {"ANSIBLE_SSH_ARGS": "-o ControlMaster=no -o ServerAliveInterval=15"},
    "forks_5": {"ANSIBLE_FORKS": "5"},
}


def harness() -> Any:
    """tests/integration/deploy_harness.py (a test helper module, not a package)."""
    import importlib.util

    path = ROOT / "tests" / "integration" / "deploy_harness.py"
    spec = importlib.util.spec_from_file_location("deploy_harness", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def topology_for(name: str, hosts: int, workdir: Path, kv_port: int = 0) -> dict[str, Any]:
    """The demo topology over hosts h1..hN: h4.. join h3 as NCs of cluster01 (`kv_port`: the
    kv API's port, 0 = off as in the demo)."""
    if hosts < 3:
        raise ValueError("the demo topology needs at least 3 hosts")
    doc = copy.deepcopy(yaml.safe_load(DEMO_TOPOLOGY.read_text()))
    doc["all"]["vars"]["euca_cloud_name"] = name
    doc["all"]["vars"]["euca_pki_controller_dir"] = str(workdir / "pki")  # not the demo's CA
    if kv_port:
        doc["all"]["vars"]["euca_runtime_kv_api_port"] = kv_port
    ncs = doc["all"]["children"]["cluster_cluster01"]["children"]["nc_cluster01"]
    ncs["hosts"] = {f"h{i}": None for i in range(3, hosts + 1)}
    return dict(doc)


def changed(stdout: str) -> int:
    """The total `changed=` of the play recap."""
    recap = stdout[stdout.rfind("PLAY RECAP") :]
    return sum(int(n) for n in re.findall(r"changed=(\d+)", recap))


def changed_tasks(stdout: str) -> list[str]:
    """'TASK name: host' of every task result reported as changed (to say why a rerun was not
    idempotent)."""
    found: list[str] = []
    task = "?"
    for line in stdout.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line[line.index("[") + 1 : line.rindex("]")] if "]" in line else line
        elif m := re.match(r"changed: \[([^\]]+)\]", line):
            found.append(f"{task}: {m.group(1)}")
    return found


def timed_site(cloud: Any, env: dict[str, str]) -> tuple[float, int, list[str]]:
    """One site.yml run with `env` overriding ansible.cfg: (seconds, changed, changed tasks).

    Every run gets its own SSH control directory, so it starts without the master connections
    an earlier run left (as an operator's rerun minutes later does: ControlPersist is 120 s)."""
    control = Path(tempfile.mkdtemp(prefix="cp-", dir=cloud.workdir))
    env = {**env, "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the harness passes os.environ to ansible-playbook
    try:
        t0 = time.monotonic()
        proc = cloud.playbook("playbooks/site.yml", timeout=PLAYBOOK_TIMEOUT)
        took = time.monotonic() - t0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if proc.returncode != 0:
        raise RuntimeError(f"site.yml failed ({proc.returncode}): {proc.stdout[-4000:]}{proc.stderr[-1000:]}")
    return took, changed(proc.stdout), changed_tasks(proc.stdout)


def one_size(name: str, hosts: int, reruns: int) -> dict[str, Any]:
    h = harness()
    workdir = Path(tempfile.mkdtemp(prefix=f"euca-bench-{name}-"))
    wheelhouse_warm = any((ROOT / "wheelhouse").glob("*.whl"))
    try:
        t0 = time.monotonic()
        tb.up(name, hosts)
        boot = time.monotonic() - t0
        cloud = h.Cloud(name, workdir)
        cloud.write_topology(topology_for(name, hosts, workdir))
        scratch, scratch_changed, _ = timed_site(cloud, {})
        times: dict[str, list[float]] = {k: [] for k in SETTINGS}
        changes: dict[str, list[int]] = {k: [] for k in SETTINGS}
        not_idempotent: list[str] = []  # what the first rerun that changed something changed
        for _ in range(reruns):
            for setting, env in SETTINGS.items():
                took, n, tasks = timed_site(cloud, env)
                times[setting].append(took)
                changes[setting].append(n)
                if n and not not_idempotent:
                    log.warning("site.yml rerun (%s) changed %d things: %s", setting, n, tasks)
                    not_idempotent = [f"{setting}: {t}" for t in tasks]
        return {
            "hosts": hosts,
            "testbed_up_seconds": round(boot, 1),
            "wheelhouse_warm": wheelhouse_warm,
            "scratch_seconds": round(scratch, 1),
            "scratch_changed": scratch_changed,
            "rerun_seconds": {k: summary(v, 1) for k, v in times.items()},
            "rerun_changed": changes,
            "not_idempotent": not_idempotent,
        }
    finally:
        tb.down(name)
        shutil.rmtree(workdir, ignore_errors=True)


def run(sizes: tuple[int, ...] = (5, 10), reruns: int = 2) -> dict[str, Any]:
    out: dict[str, Any] = {
        "sizes": list(sizes),
        "reruns": reruns,
        "settings": {k: v or "ansible.cfg as committed" for k, v in SETTINGS.items()},
    }
    for i, hosts in enumerate(sizes, start=1):
        out[f"hosts_{hosts}"] = one_size(f"{BED_PREFIX}{i}", hosts, reruns)
    return out
