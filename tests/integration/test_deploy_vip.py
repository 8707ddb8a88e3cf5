"""Service VIPs, the death certificate and the vaulted CA on testbed hosts (one bed, one deploy).

A bed of three hosts (h1, h2: clc + walrus; h3: arbitrator) deployed once by site.yml with
`euca_vips: {s3: .100, iam: .101}` of the bed's /24, a lease of 20 s (so a takeover before that
can only come from a death certificate), and the cluster CA and the credential key given only
as ansible-vault variables (a vaulted inventory file and `--vault-password-file`).

- The vault: the run needs the password (preflight stops without it, before any change); the CA
  key is never written to the controller's PKI directory, never printed by the run, and found
  nowhere on the hosts (files where a deploy writes, or the journal); the credential key only in
  its 0600 file.
- The VIP: the S3 VIP answers at the walrus primary's host (an S3 request from the upstream
  namespace, the users' side); after `kill -9` of that host's runtime the unit's ExecStopPost
  drops the address, then certifies the death (the journal shows that order), the voters release
  the lease at once and the backup takes the lease and the address well before the 20 s lease
  could have expired; the upstream reaches it there (its neighbour entry now points at the new
  host's MAC: the gratuitous ARP), and at no sampled moment do two hosts hold it.
  `describe-services -o json` names the holder (`vip_holder`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from deploy_harness import BIN, Cloud, topology, wait_until

from testbed import bed as tb

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.timeout(2400)]


# Where a deploy writes. Testbed hosts also see parts of the machine they run on: /root and /home
# (searched only as root's .ansible) and /var/lib/euca-testbed, every bed's hosts (skipped).
PLACES = "/etc /var/lib /var/log /var/tmp /root/.ansible /tmp /run /srv"
LEASE = 20.0  # seconds: a takeover sooner than this after a kill -9 is the death certificate's


def make_ca(workdir: Path) -> tuple[str, str]:
    """A throwaway cluster CA (EC P-256): (key PEM, certificate PEM)."""
    key, crt = workdir / "ca-src.key", workdir / "ca-src.crt"
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    cmd += ["-keyout", str(key), "-out", str(crt), "-days", "30", "-subj", "/CN=euca-ha vault test CA"]
    cmd += [
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]
    subprocess.run(
        cmd,
        check=True,
        capture_output=True,
        timeout=60,
    )
    out = key.read_text(), crt.read_text()
    key.unlink()
    return out


def vault_inventory(workdir: Path, password_file: Path, secrets: dict[str, str]) -> Path:
    """An inventory file with `secrets` as `!vault` variables of all (ansible-vault encrypt_string)."""
    lines = ["all:", "  vars:"]
    for name, value in secrets.items():
        enc = subprocess.run(
            [
                str(BIN / "ansible-vault"),
                "encrypt_string",
                "--vault-password-file",
                str(password_file),
                "--stdin-name",
                name,
            ],
            input=value,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        lines += ["    " + line for line in enc.splitlines()]
    path = workdir / "vault.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Deployed:
    """The bed, deployed once with VIPs and the vaulted CA and credential key."""

    cloud: Cloud
    ca_key: str
    cred_key: str
    vault_args: list[str] = field(default_factory=list)
    site_output: str = ""


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    name = os.environ.get("EUCA_TEST_BED_DPVIP", f"dpvip{os.getpid() % 100}")
    workdir = tmp_path_factory.mktemp("dpvip")
    try:
        tb.up(name, 3)
        cloud = Cloud(name, workdir)
        vip, iam_vip = cloud.subnet_address(100), cloud.subnet_address(101)
        doc = topology(
            cloud.name,
            cloud.workdir,
            {"clc": ["h1", "h2"], "walrus": ["h1", "h2"], "arbitrator": ["h3"]},
            euca_vips={"s3": f"{vip}/24", "iam": f"{iam_vip}/24"},
            euca_runtime_timing={"lease_duration": LEASE, "drift_margin": 0.5},
        )
        cloud.write_topology(doc)
        ca_key, ca_crt = make_ca(workdir)
        cred_key = os.urandom(32).hex()
        password = workdir / "vault-password"
        password.write_text("euca-ha vault e2e\n")
        password.chmod(0o600)
        vault = vault_inventory(
            workdir,
            password,
            {
                "euca_pki_ca_key_content": ca_key,
                "euca_pki_ca_cert_content": ca_crt,
                "euca_pki_credential_key_content": cred_key,
            },
        )
        vault_args = ["-i", str(vault), "--vault-password-file", str(password)]
        locked = cloud.playbook("playbooks/site.yml", "-i", str(vault))
        assert locked.returncode != 0
        assert "euca_pki_ca_key_content" in locked.stdout and "vault-encrypted" in locked.stdout, (
            locked.stdout[-3000:]
        )
        assert "Prepare every euca-ha host" not in locked.stdout  # stopped before anything changed
        proc = cloud.site(*vault_args)
        yield Deployed(cloud, ca_key, cred_key, vault_args, proc.stdout + proc.stderr)
    finally:
        tb.down(name)


def test_vaulted_ca_key_never_lands_in_the_clear(deployed: Deployed) -> None:
    cloud, ca_key, cred_key = deployed.cloud, deployed.ca_key, deployed.cred_key
    # A line of the key's body: enough to find it anywhere, never a false match.
    needle = next(line for line in ca_key.splitlines() if len(line) >= 40 and "-----" not in line)
    assert needle not in deployed.site_output
    assert cred_key not in deployed.site_output
    pki = cloud.workdir / "pki"
    assert not (pki / "ca.key").exists() and not (pki / "credentials.key").exists(), list(pki.glob("*"))
    for host in ("h1", "h2", "h3"):
        # Everywhere a deploy writes (the venv under /opt is built from wheels, never from vars).
        found = cloud.ssh(
            host,
            f"grep -rlsF --exclude-dir=euca-testbed -e '{needle}' {PLACES};"
            f" journalctl -q -o cat --no-pager | grep -cF -e '{needle}'",
            timeout=600,
        )
        assert found.stdout.strip() == "0", (host, found.stdout, found.stderr)
        # The node certificate is signed by the vaulted CA.
        issuer = cloud.ssh(host, "openssl x509 -noout -issuer -in /etc/eucalyptus/pki/node.crt").stdout
        assert "euca-ha vault test CA" in issuer, (host, issuer)
    for host in ("h1", "h2"):
        # The credential key is where it belongs (0600, the runtime's account) and nowhere else.
        stat = cloud.ssh(host, "stat -c '%a %U' /etc/eucalyptus/pki/credentials.key").stdout.split()
        assert stat == ["600", "eucalyptus"], (host, stat)
        where = cloud.ssh(
            host, f"grep -rlsF --exclude-dir=euca-testbed -e '{cred_key}' {PLACES}", timeout=600
        )
        assert where.stdout.split() == ["/etc/eucalyptus/pki/credentials.key"], (host, where.stdout)


def holders(cloud: Cloud, vip: str) -> list[str]:
    out = []
    for host in ("h1", "h2"):
        res = cloud.ssh(host, f"ip -o -4 address show to {vip}/32")
        if res.returncode == 0 and vip in res.stdout:
            out.append(host)
    return out


def mac_of(cloud: Cloud, host: str) -> str:
    return cloud.ssh(host, "cat /sys/class/net/host0/address").stdout.strip()


def upstream(cloud: Cloud, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """A command in the bed's upstream namespace (the users' side)."""
    return subprocess.run(
        ["ip", "netns", "exec", f"eucatb-{cloud.name}-up", *cmd], capture_output=True, text=True, timeout=30
    )


def s3_status(cloud: Cloud, vip: str) -> int | None:
    """HTTP status of an unsigned S3 request to the VIP from the upstream side (403 = S3 answered)."""
    res = upstream(
        cloud, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "3", f"http://{vip}:8775/"]
    )
    return int(res.stdout) if res.stdout.strip().isdigit() and res.stdout.strip() != "000" else None


def test_vip_follows_the_primary_after_kill_9(deployed: Deployed) -> None:
    cloud = deployed.cloud
    vip = cloud.subnet_address(100)
    unit = cloud.ssh("h1", "systemctl cat euca-runtime").stdout
    assert "Type=notify" in unit and "WatchdogSec=10" in unit, unit
    stop_post = [line for line in unit.splitlines() if line.startswith("ExecStopPost=")]
    assert [("euca_runtime.vip" in x, "euca_runtime.death" in x) for x in stop_post] == [
        (True, False),
        (False, True),
    ]
    primary = wait_until(
        lambda: (cloud.groups("h1").get("walrus", {}).get("enabled") or [None])[0], 120, "walrus"
    )
    first = primary.split(".")[0]
    other = "h2" if first == "h1" else "h1"
    # The runtime told systemd it is ready, and pings the watchdog.
    props = cloud.ssh(
        first, "systemctl show -p WatchdogUSec -p StatusErrno -p ActiveState euca-runtime"
    ).stdout
    assert "WatchdogUSec=10s" in props and "ActiveState=active" in props, props
    wait_until(lambda: holders(cloud, vip) == [first], 30, f"the S3 VIP on {first}")
    wait_until(lambda: s3_status(cloud, vip) is not None, 30, "S3 answering at the VIP")
    rows = cloud.eucactl_json("h1", "describe-services")
    assert {r["vip_holder"] for r in rows if r["group"] == "walrus"} == {first, None}, rows
    groups = cloud.groups("h1")
    assert groups["walrus"]["vip_holder"] == first

    # kill -9 of the primary's runtime: systemd's ExecStopPost drops the address, the backup
    # takes the lease and the address, and announces it.
    pid = cloud.main_pid(first)
    since = cloud.ssh(first, "date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    killed = time.monotonic()
    assert cloud.ssh(first, f"kill -9 {pid}").returncode == 0
    seen: list[list[str]] = []

    def moved() -> bool:
        now = holders(cloud, vip)
        seen.append(now)
        return now == [other]

    wait_until(moved, 60, f"the S3 VIP on {other}", every=0.2)
    taken = time.monotonic() - killed
    assert all(len(h) <= 1 for h in seen), seen  # never two holders
    # The voters released the lease on the certificate: the backup held it (and the address)
    # before a 20 s lease granted just before the kill could have run out.
    assert taken < LEASE, f"the VIP moved {taken:.1f} s after the kill: no death certificate?"
    journal = cloud.ssh(
        first,
        f"journalctl -u euca-runtime -o cat --no-pager --since '{since}'"
        " | grep -E 'vip release|death certificate'",
    ).stdout
    lines = journal.splitlines()
    released = next(i for i, line in enumerate(lines) if "vip release: removed" in line)
    certified = next(i for i, line in enumerate(lines) if "death certificates sent" in line)
    assert released < certified, journal
    assert f'"pid": {pid}' in lines[certified], lines[certified]
    events = cloud.eucactl_json(other, "describe-services", "--events") or {}
    assert f"death certificate from systemd@{first}" in json.dumps(events.get("events", [])), events
    wait_until(lambda: s3_status(cloud, vip) is not None, 30, "S3 answering at the VIP after the failover")
    neigh = upstream(cloud, ["ip", "neigh", "show", vip]).stdout.lower()
    assert mac_of(cloud, other).lower() in neigh, (neigh, mac_of(cloud, other))
    # The killed runtime comes back (Restart=on-failure) as a backup and does not take the VIP.
    wait_until(
        lambda: cloud.groups(other).get("walrus", {}).get("healthy"),
        120,
        "the old primary back in sync",
        every=1,
    )
    assert holders(cloud, vip) == [other]
    rows = cloud.eucactl_json(other, "describe-services")
    assert json.dumps(sorted({str(r["vip_holder"]) for r in rows if r["group"] == "walrus"})) == json.dumps(
        sorted({other, "None"})
    )
