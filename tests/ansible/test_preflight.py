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


VAULT_PASSWORD = Path(__file__).resolve().parent / "vault-password"


def site(inventory: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    env.pop("ANSIBLE_VAULT_PASSWORD_FILE", None)
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(INVENTORIES / inventory), "playbooks/site.yml", *extra],
        stdin=subprocess.DEVNULL,
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
        (
            "route_unknown_node.yml",
            r"h-c: euca_arbitrator_routes\[0\] \(users\)\.nodes: h-z is not a host of the inventory",
        ),
        ("no_witness.yml", r"arbitrator: every arbitrator host \(h-a, h-b\) also runs one of clc, walrus"),
        ("nc_two_clusters.yml", r"h-c: is in nc_c1 and nc_c2; a nc belongs to one cluster"),
        (
            "unreachable.yml",
            r"h-a: not reachable over SSH within 3 s \(ansible_host=127\.0\.0\.1, "
            r"euca_preflight_connect_timeout\)",
        ),
        (
            "vault_locked.yml",
            r"h-a: cannot read euca_pki_credential_key_content \(vault-encrypted, and no vault password "
            r"was given or it is the wrong one\): pass --ask-vault-pass or --vault-password-file",
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


VIP_PROBLEMS = {
    "bad_vips.yml": [
        r"euca_vips.s3: the service's group walrus has no host",
        r"h-a: its address 192\.0\.2\.1 \(euca_address/ansible_host\) is euca_vips\.iam",
        r"h-a: its address 192\.0\.2\.1 \(euca_address/ansible_host\) is outside euca_vips\.ec2",
        r"h-b: its address 192\.0\.2\.2 \(euca_address/ansible_host\) is outside euca_vips\.ec2",
        r"euca_vips.s3: 192\.0\.2\.100 is also the VIP of euca_vips\.kv",
        r"euca_vips.foo: unknown service 'foo'",
    ],
    "bad_vip_address.yml": [
        r"euca_vips.s3: not an IPv4 address/prefix, got '192\.0\.2\.300/24'",
        r"euca_vips.iam: must be an IPv4 address with a prefix length \(A\.B\.C\.D/N\), got '192\.0\.2\.101'",
    ],
}


@pytest.mark.parametrize("inventory", sorted(VIP_PROBLEMS))
def test_bad_vips_fail_early_naming_each_problem(inventory: str) -> None:
    proc = site(inventory)
    out = re.sub(r"\s+", " ", proc.stdout)
    assert proc.returncode != 0, proc.stdout[-3000:]
    for message in VIP_PROBLEMS[inventory]:
        assert re.search(message, out), (message, proc.stdout[-3000:])
    assert "Prepare every euca-ha host" not in proc.stdout
    assert "not reachable" not in proc.stdout  # stopped at the inventory checks, no host tried
    assert not re.search(r"changed=[1-9]", proc.stdout)


def test_vault_password_unlocks_the_vaulted_variable() -> None:
    """The same inventory with the vault password gets past the vault check (to the unreachable hosts)."""
    proc = site("vault_locked.yml", "--vault-password-file", str(VAULT_PASSWORD))
    out = re.sub(r"\s+", " ", proc.stdout)
    assert proc.returncode != 0
    assert "cannot read" not in out, proc.stdout[-3000:]
    assert re.search(r"h-a: not reachable over SSH within 3 s", out), proc.stdout[-3000:]
    assert "0123456789abcdef" not in proc.stdout + proc.stderr  # the secret is never printed


def test_encrypted_vars_file_without_password_stops_before_any_play() -> None:
    """A whole vaulted group_vars file cannot even be loaded: Ansible stops before the first play."""
    proc = site("vault_file_locked")
    assert proc.returncode != 0
    assert "no vault secrets found" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PLAY [" not in proc.stdout or "TASK [" not in proc.stdout
    assert not re.search(r"changed=[1-9]", proc.stdout)
