"""Shared by the `ha` scenario's tests: the bed, the cloud's eucarc (written by the eucarc
runbook, as a user gets it), and each service's view from a host's own eucactl."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from testbed import bed as tb
from testbed import demo

BED = os.environ.get("MOLECULE_TESTBED_NAME", "molha")
EUCACTL = "runuser -u eucalyptus -- /opt/euca-ha/venv/bin/eucactl --config /etc/eucalyptus/runtime.yml"


def inventory() -> Path:
    """The scenario's inventory directory (Molecule's hosts + the demo topology + group_vars)."""
    return Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent


def services(host: Any) -> list[dict[str, Any]]:
    """describe-services as a testinfra host's runtime sees the cloud ([] while it does not answer)."""
    out = host.run(f"{EUCACTL} describe-services -o json")
    return list(json.loads(out.stdout)) if out.rc == 0 and out.stdout.strip() else []


def bed_ssh(node: str, cmd: str) -> subprocess.CompletedProcess[str]:
    """Run `cmd` on a host of the bed over the testbed's own SSH config."""
    bed = tb.load(BED)
    return tb.ssh(bed, bed.host(node), cmd, timeout=30)


def services_on(node: str) -> list[dict[str, Any]]:
    """describe-services as `node`'s runtime sees the cloud ([] while it does not answer)."""
    out = bed_ssh(node, f"{EUCACTL} describe-services -o json")
    return list(json.loads(out.stdout)) if out.returncode == 0 and out.stdout.strip() else []


@pytest.fixture(scope="session")
def eucarc() -> dict[str, str]:
    """The cloud's eucarc, written by playbooks/runbooks/eucarc.yml into the scenario's
    ephemeral directory (destroy removes it)."""
    path = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "eucarc"
    demo.run_playbook([inventory()], "playbooks/runbooks/eucarc.yml", "-e", f"euca_eucarc={path}")
    return demo.read_eucarc(path)
