"""Service VIPs on testbed hosts: the address follows the ENABLED instance, announced by ARP.

A bed of three hosts (h1, h2: clc + walrus; h3: arbitrator) deployed by site.yml with
`euca_vips: {s3: .100, iam: .101}` of the bed's /24. The S3 VIP answers at the walrus primary's
host (an S3 request from the upstream namespace, the users' side); after `kill -9` of that host's
runtime the address moves to the other host, the upstream reaches it there (its neighbour entry
now points at the new host's MAC: the gratuitous ARP), and at no sampled moment do two hosts hold
it. `describe-services -o json` names the holder (`vip_holder`).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_harness import Cloud, topology, wait_until

from testbed import bed as tb

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    name = f"dpvip{os.getpid() % 100}"
    try:
        tb.up(name, 3)
        yield Cloud(name, tmp_path)
    finally:
        tb.down(name)


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


def test_vip_follows_the_primary_after_kill_9(cloud: Cloud) -> None:
    vip, iam_vip = cloud.subnet_address(100), cloud.subnet_address(101)
    doc = topology(
        cloud.name,
        cloud.workdir,
        {"clc": ["h1", "h2"], "walrus": ["h1", "h2"], "arbitrator": ["h3"]},
        euca_vips={"s3": f"{vip}/24", "iam": f"{iam_vip}/24"},
    )
    cloud.write_topology(doc)
    cloud.site()
    primary = wait_until(
        lambda: (cloud.groups("h1").get("walrus", {}).get("enabled") or [None])[0], 120, "walrus"
    )
    first = primary.split(".")[0]
    other = "h2" if first == "h1" else "h1"
    wait_until(lambda: holders(cloud, vip) == [first], 30, f"the S3 VIP on {first}")
    wait_until(lambda: s3_status(cloud, vip) is not None, 30, "S3 answering at the VIP")
    rows = cloud.eucactl_json("h1", "describe-services")
    assert {r["vip_holder"] for r in rows if r["group"] == "walrus"} == {first, None}, rows
    groups = cloud.groups("h1")
    assert groups["walrus"]["vip_holder"] == first

    # kill -9 of the primary's runtime: systemd's ExecStopPost drops the address, the backup
    # takes the lease and the address, and announces it.
    pid = cloud.main_pid(first)
    assert cloud.ssh(first, f"kill -9 {pid}").returncode == 0
    seen: list[list[str]] = []

    def moved() -> bool:
        now = holders(cloud, vip)
        seen.append(now)
        return now == [other]

    wait_until(moved, 60, f"the S3 VIP on {other}", every=0.2)
    assert all(len(h) <= 1 for h in seen), seen  # never two holders
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
