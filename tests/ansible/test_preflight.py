"""site.yml refuses broken inventories before it changes anything, naming host and variable.

Each inventory under inventories/ is broken in one way; its hosts are loopback addresses on
a port nothing listens on, so nothing is ever contacted except to prove it does not answer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INVENTORIES = Path(__file__).resolve().parent / "inventories"
BIN = Path(sys.executable).parent


def site(inventory: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(INVENTORIES / inventory), "playbooks/site.yml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("inventory", "message"),
    [
        (
            "even_voters.yml",
            r"euca_voters \(default: the clc hosts plus the arbitrator hosts\) has 2 voters \(h-a, h-b\)",
        ),
        ("forbidden_pair.yml", r"h-b: is both arbitrator and clc .*euca_preflight_forbidden_pairs"),
        ("cluster_without_sc.yml", r"cluster c1: needs at least one host in group cc_c1 .* sc_c1 \(has 0\)"),
        ("missing_routes.yml", r"h-c: euca_arbitrator_routes is missing or incomplete"),
        ("nc_two_clusters.yml", r"h-c: is in nc_c1 and nc_c2; a nc belongs to one cluster"),
        (
            "unreachable.yml",
            r"h-a: not reachable over SSH within 3 s \(ansible_host=127\.0\.0\.1, "
            r"euca_preflight_connect_timeout\)",
        ),
    ],
)
def test_broken_inventory_fails_early_with_a_clear_message(inventory: str, message: str) -> None:
    proc = site(inventory)
    out = re.sub(r"\s+", " ", proc.stdout)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert re.search(message, out), proc.stdout[-3000:]
    # Nothing changed and no later play started: the run stopped in the preflight play.
    assert "Prepare every euca-ha host" not in proc.stdout
    assert not re.search(r"changed=[1-9]", proc.stdout)
