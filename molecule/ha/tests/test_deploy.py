"""The HA cloud of `make demo` after site.yml converged on h1, h2 (clc, walrus, cc, sc) and h3
(arbitrator, nc): testinfra on each host, then boto3 against the deployed endpoints.
test_failover.py runs after this file (pytest collects files in name order)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import bed_ssh, services, services_on

from testbed import demo

VENV = "/opt/euca-ha/venv"
CONFIG = "/etc/eucalyptus/runtime.yml"
PKI = "/etc/eucalyptus/pki"
DATA = "/var/lib/eucalyptus"
BUS, ADMIN, IAM, EC2, S3 = 7100, 7180, 8773, 8774, 8775
CC_GATEWAY, CC_SERVICE = 7190, 7191  # cluster01's CC: the runtime's gateway, the euca-cc@ unit
CC_UNIT = "euca-cc@cluster01.service"
# What each host runs, from inventories/demo/topology.yml (the first host of a group is primary).
COMPONENTS = {
    "h1": {("clc", None, "primary"), ("kv", None, "primary"), ("walrus", None, "primary")}
    | {("cc", "cluster01", "primary"), ("sc", "cluster01", "primary"), ("arbitrator", None, "backup")},
    "h2": {("clc", None, "backup"), ("kv", None, "backup"), ("walrus", None, "backup")}
    | {("cc", "cluster01", "backup"), ("sc", "cluster01", "backup"), ("arbitrator", None, "backup")},
    "h3": {("arbitrator", None, "primary"), ("nc", "cluster01", "primary")},
}
REPLICATED = {"clc", "kv", "walrus", "cc/cluster01", "sc/cluster01"}


def me(host) -> str:
    return str(host.ansible.get_variables()["inventory_hostname"])


def address(host) -> str:
    return str(host.ansible.get_variables()["ansible_host"])


def subnet_address(host, last: int) -> str:
    return address(host).rsplit(".", 1)[0] + f".{last}"


def load_config(host) -> dict:
    """The config as the runtime itself reads it, loaded as the service user."""
    script = (
        "import json, sys; from euca_runtime.config import load_config, config_to_dict; "
        "print(json.dumps(config_to_dict(load_config(sys.argv[1]))))"
    )
    out = host.run(f"runuser -u eucalyptus -- {VENV}/bin/python -c '{script}' {CONFIG}")
    assert out.rc == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_runtime_active_and_enabled(host):
    svc = host.service("euca-runtime")
    assert svc.is_enabled
    assert svc.is_running


def test_ports_listen_only_where_expected(host):
    """Every TCP listener off loopback is one this host should have; the admin API is on
    loopback only. APIs with a VIP listen on every address (the VIP comes and goes)."""
    ip = address(host)
    expected = {"0.0.0.0:22", "[::]:22", f"{ip}:{BUS}"}
    if me(host) in ("h1", "h2"):
        expected |= {f"0.0.0.0:{IAM}", f"{ip}:{EC2}", f"0.0.0.0:{S3}"}
    listeners = set(host.run("ss -Htln | awk '{print $4}'").stdout.split())
    off_loopback = {s for s in listeners if not s.startswith(("127.", "[::1]"))}
    assert off_loopback == expected
    assert f"127.0.0.1:{ADMIN}" in listeners


def listeners_of(host, pid: int) -> set[str]:
    """The local addresses process `pid` listens on (TCP)."""
    out = host.run("ss -Htlnp").stdout.splitlines()
    return {line.split()[3] for line in out if f"pid={pid}," in line}


def test_cc_unit_runs_on_cc_hosts_and_listens_only_on_loopback(host):
    """The CC service of cluster01 is its own unit on h1 and h2 (not on h3): enabled, active,
    as eucalyptus, listening on loopback only; the runtime serves its gateway on loopback;
    the token they share is the service account's, 0600."""
    unit = host.service(CC_UNIT)
    if me(host) == "h3":
        assert not host.file(f"/etc/systemd/system/{CC_UNIT}.d").exists
        assert host.run(f"systemctl is-active {CC_UNIT}").stdout.strip() != "active"
        return
    assert unit.is_enabled
    assert unit.is_running
    pid = int(host.run(f"systemctl show -p MainPID --value {CC_UNIT}").stdout)
    assert host.process.get(pid=pid).user == "eucalyptus"
    assert listeners_of(host, pid) == {f"127.0.0.1:{CC_SERVICE}"}
    runtime = int(host.run("systemctl show -p MainPID --value euca-runtime.service").stdout)
    assert f"127.0.0.1:{CC_GATEWAY}" in listeners_of(host, runtime)
    token = host.file("/etc/eucalyptus/cc/cluster01.token")
    assert (token.user, token.group, token.mode) == ("eucalyptus", "eucalyptus", 0o600)
    cc = next(c for c in load_config(host)["components"] if c["type"] == "cc")
    assert cc["options"] == {
        "service": "external",
        "gateway": f"127.0.0.1:{CC_GATEWAY}",
        "service_address": f"127.0.0.1:{CC_SERVICE}",
        "token_file": "/etc/eucalyptus/cc/cluster01.token",
    }


@pytest.mark.parametrize(
    ("path", "owner", "group", "mode"),
    [
        (PKI, "root", "eucalyptus", 0o750),
        (f"{PKI}/node.key", "root", "eucalyptus", 0o640),
        (f"{PKI}/node.crt", "root", "root", 0o644),
        (f"{PKI}/ca.crt", "root", "root", 0o644),
        (CONFIG, "root", "eucalyptus", 0o640),
        (DATA, "eucalyptus", "eucalyptus", 0o700),
        (f"{DATA}/admin.token", "eucalyptus", "eucalyptus", 0o600),
    ],
)
def test_file_modes(host, path, owner, group, mode):
    f = host.file(path)
    assert f.exists
    assert (f.user, f.group, f.mode) == (owner, group, mode)


def test_credential_key_only_on_clc_and_walrus_hosts(host):
    f = host.file(f"{PKI}/credentials.key")
    if me(host) == "h3":
        assert not f.exists
        return
    assert (f.user, f.group, f.mode) == ("eucalyptus", "eucalyptus", 0o600)
    # Every clc/walrus host has the same key (the cloud's credentials decrypt anywhere).
    assert f.size > 0
    # No CA key ever reaches a host: the private keys under /etc/eucalyptus are these two.
    keys = host.run("grep -rl 'PRIVATE KEY' /etc/eucalyptus").stdout.split()
    assert keys == [f"{PKI}/node.key"]


def test_config_follows_the_topology(host):
    cfg = load_config(host)
    name, ip = me(host), address(host)
    assert cfg["node"] == name
    assert cfg["voters"] == ["h1", "h2", "h3"]
    assert cfg["listen"] == f"{ip}:{BUS}"
    assert cfg["admin"] == f"127.0.0.1:{ADMIN}"
    got = {(c["type"], c.get("partition"), c["role"]) for c in cfg["components"]}
    assert got == COMPONENTS[name]
    assert [r["targets"] for r in cfg["routes"]] == [[{"icmp": subnet_address(host, 254)}]]
    if name == "h3":
        assert [(r["name"], r["nodes"]) for r in cfg["routes"]] == [("users", [])]  # the witness
        assert not cfg.get("vips")
    else:
        # h1 and h2 watch their own route to the users: a DOWN route moves their primaries.
        assert [(r["name"], r["nodes"]) for r in cfg["routes"]] == [(f"users-{name}", [name])]
        vips = {v["group"]: v["address"] for v in cfg["vips"]}
        assert vips == {"walrus": f"{subnet_address(host, 100)}/24", "clc": f"{subnet_address(host, 101)}/24"}


def test_every_group_has_one_enabled_instance_and_in_sync_backups(host):
    """Each host's runtime sees the same cloud: per replicated group one ENABLED instance on h1
    or h2 and the other DISABLED and in sync (h1 is preferred at boot, but which host wins an
    election is not part of the contract); the host of the ENABLED clc and walrus holds their
    VIPs."""
    deadline = time.monotonic() + 60
    while True:
        seen = services(host)
        groups: dict[str, list[dict]] = {}
        for s in seen:
            groups.setdefault(s["group"], []).append(s)
        settled = REPLICATED <= set(groups) and all(
            sorted(s["state"] for s in groups[g]) == ["DISABLED", "ENABLED"]
            and {s["node"] for s in groups[g]} == {"h1", "h2"}
            and all(s["in_sync"] for s in groups[g])
            for g in REPLICATED
        )
        if settled:
            enabled = {g: next(s["node"] for s in groups[g] if s["state"] == "ENABLED") for g in REPLICATED}
            holders = {s["group"]: s["vip_holder"] for s in seen if s["vip_holder"]}
            if holders == {"clc": enabled["clc"], "walrus": enabled["walrus"]}:
                break
        assert time.monotonic() < deadline, f"groups not settled as seen from {me(host)}: {seen}"
        time.sleep(1)
    addrs = host.run("ip -4 -o addr show").stdout
    for group, last in (("walrus", 100), ("clc", 101)):
        held = f" {subnet_address(host, last)}/24 " in addrs
        where = f"{group} VIP held by {me(host)}: {held}; ENABLED on {enabled[group]}"
        assert held == (enabled[group] == me(host)), where


def test_eucarc_points_at_the_vips_first(eucarc):
    vip_iam, vip_s3 = eucarc["EUARE_URL"], eucarc["S3_URL"]
    assert vip_iam.endswith(f".101:{IAM}") and vip_s3.endswith(f".100:{S3}")
    assert len(eucarc["EUARE_URLS"].split()) == 3 and len(eucarc["S3_URLS"].split()) == 3
    assert len(eucarc["EC2_URLS"].split()) == 2


def test_iam_user_and_access_key_through_every_iam_url(eucarc):
    for i, url in enumerate(eucarc["EUARE_URLS"].split()):
        assert demo.iam_user_with_key(eucarc, url, f"molha-deploy-{i}").startswith("AKIA")


def test_s3_round_trip_through_every_s3_url(eucarc):
    urls = eucarc["S3_URLS"].split()
    for i, url in enumerate(urls):
        demo.s3_round_trip(eucarc, url, urls, f"molha-deploy-{i}", f"object {i} put through {url}\n".encode())


def test_ec2_describe_availability_zones_through_every_ec2_url(eucarc):
    zones = [demo.ec2_zones(eucarc, url) for url in eucarc["EC2_URLS"].split()]
    assert zones[0] == {"cluster01": "available"}
    assert all(z == zones[0] for z in zones)


def cc_instances() -> dict[str, dict]:
    """node -> the cc/cluster01 instance on it, as the arbitrator (h3) sees the cloud."""
    return {s["node"]: s for s in services_on("h3") if s["group"] == "cc/cluster01"}


def wait_for(what: str, check, deadline: float = 120.0) -> dict[str, dict]:
    """Poll the cc instances until `check(instances)` holds; generous deadline (loaded machine)."""
    end = time.monotonic() + deadline
    while True:
        seen = cc_instances()
        if check(seen):
            return seen
        assert time.monotonic() < end, f"{what}: not within {deadline} s; cc instances: {seen}"
        time.sleep(0.5)


def test_stopping_the_enabled_cc_unit_moves_the_cc_lease_and_start_brings_it_back_disabled():
    """`systemctl stop` of the CC unit on the host of the ENABLED cc: that proxy's probe fails,
    it goes NOTREADY and gives up the lease, the other host's CC is ENABLED; `systemctl start`:
    the stopped host's CC comes back as the in-sync DISABLED backup (the lease stays)."""
    seen = wait_for(
        "one ENABLED and one DISABLED cc",
        lambda s: sorted(i["state"] for i in s.values()) == ["DISABLED", "ENABLED"],
    )
    first = next(n for n, i in seen.items() if i["state"] == "ENABLED")
    other = next(n for n in seen if n != first)
    stop = bed_ssh(first, f"systemctl stop {CC_UNIT}")
    try:
        assert stop.returncode == 0, stop.stderr
        seen = wait_for(
            f"the cc lease on {other} after stopping {CC_UNIT} on {first}",
            lambda s: (
                s.get(other, {}).get("state") == "ENABLED" and s.get(first, {}).get("state") == "NOTREADY"
            ),
        )
        epoch = seen[other]["epoch"]
        start = bed_ssh(first, f"systemctl start {CC_UNIT}")
        assert start.returncode == 0, start.stderr
        seen = wait_for(
            f"{first}'s cc DISABLED and in sync after starting {CC_UNIT}",
            lambda s: (
                s.get(first, {}).get("state") == "DISABLED"
                and s[first].get("in_sync")
                and s.get(other, {}).get("state") == "ENABLED"
            ),
        )
        assert seen[other]["epoch"] == epoch, f"the lease moved again: {seen}"
    finally:
        bed_ssh(first, f"systemctl start {CC_UNIT}")
