"""Testinfra checks of real host state after site.yml converged on two clc hosts + an arbitrator."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

VENV = "/opt/euca-ha/venv"
WHEELHOUSE = "/opt/euca-ha/wheelhouse"
CONFIG = "/etc/eucalyptus/runtime.yml"
PKI = "/etc/eucalyptus/pki"
BUS_PORT = 7100
NODES = ["h1", "h2", "h3"]


def hostvars(host):
    return host.ansible.get_variables()


def load_config(host) -> dict:
    """The config as the runtime itself reads it, loaded as the service user."""
    script = (
        "import json, sys; from euca_runtime.config import load_config, config_to_dict; "
        "print(json.dumps(config_to_dict(load_config(sys.argv[1]))))"
    )
    out = host.run(f"runuser -u eucalyptus -- {VENV}/bin/python -c '{script}' {CONFIG}")
    assert out.rc == 0, out.stderr
    return json.loads(out.stdout)


def test_venv_installed_from_the_wheelhouse_only(host):
    assert host.file(f"{VENV}/bin/euca-runtime").is_file
    # The installed build is the one in the wheelhouse.
    assert (
        host.file(f"{VENV}/.euca-ha-fingerprint").content == host.file(f"{WHEELHOUSE}/.fingerprint").content
    )
    # Everything installed came from the wheelhouse: with no index and no pip config at all,
    # resolving euca-ha again finds every requirement there.
    out = host.run(
        f"PIP_CONFIG_FILE=/dev/null {VENV}/bin/pip install --dry-run --no-index "
        f"--find-links {WHEELHOUSE} --report - --quiet euca-ha"
    )
    assert out.rc == 0, out.stderr
    listed = host.run(f"PIP_CONFIG_FILE=/dev/null {VENV}/bin/pip list --format json")
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"euca-ha", "cryptography", "msgpack", "pyyaml", "sqlalchemy"} <= installed
    wheels = host.run(f"ls {WHEELHOUSE}").stdout.split()
    for name in installed - {"pip", "setuptools"}:
        normalized = name.replace("-", "_")
        assert any(w.lower().startswith(normalized + "-") for w in wheels), f"{name} has no wheel"


def test_config_file_mode_and_validity(host):
    f = host.file(CONFIG)
    assert f.is_file
    assert (f.user, f.group, f.mode) == ("root", "eucalyptus", 0o640)
    cfg = load_config(host)
    me = hostvars(host)["inventory_hostname"]
    assert cfg["node"] == me
    assert cfg["voters"] == NODES
    assert sorted(cfg["peers"]) == sorted(set(NODES) - {me})
    address = hostvars(host)["ansible_host"]
    assert cfg["listen"] == f"{address}:{BUS_PORT}"
    assert cfg["admin"].startswith("127.0.0.1:")
    types = sorted(c["type"] for c in cfg["components"])
    if me == "h3":
        assert types == ["arbitrator"]
        assert cfg["routes"][0]["name"] == "users"
        assert cfg["routes"][0]["targets"] == [{"icmp": address.rsplit(".", 1)[0] + ".254"}]
    else:
        assert types == ["clc", "kv"]
        roles = {c["role"] for c in cfg["components"]}
        assert roles == ({"primary"} if me == "h1" else {"backup"})


@pytest.mark.parametrize(
    ("name", "owner", "group", "mode"),
    [
        ("", "root", "eucalyptus", 0o750),
        ("/node.key", "root", "eucalyptus", 0o640),
        ("/node.crt", "root", "root", 0o644),
        ("/ca.crt", "root", "root", 0o644),
    ],
)
def test_tls_material_modes(host, name, owner, group, mode):
    f = host.file(PKI + name)
    assert f.exists
    assert (f.user, f.group, f.mode) == (owner, group, mode)


def test_certificate_is_signed_by_the_cluster_ca_for_this_node(host):
    me = hostvars(host)["inventory_hostname"]
    address = hostvars(host)["ansible_host"]
    assert host.run(f"openssl verify -CAfile {PKI}/ca.crt {PKI}/node.crt").rc == 0
    text = host.run(f"openssl x509 -in {PKI}/node.crt -noout -subject -ext subjectAltName").stdout
    assert f"CN = {me}" in text
    assert f"IP Address:{address}" in text
    # The key goes with the certificate.
    pub_cert = host.run(f"openssl x509 -in {PKI}/node.crt -noout -pubkey").stdout
    pub_key = host.run(f"openssl pkey -in {PKI}/node.key -pubout").stdout
    assert pub_cert and pub_cert == pub_key
    # The service user can read its key; nobody else can.
    assert host.run(f"runuser -u eucalyptus -- cat {PKI}/node.key").rc == 0
    assert host.run(f"runuser -u nobody -- cat {PKI}/node.key").rc != 0
    # No CA key ever reaches a host.
    assert host.run("grep -rl 'PRIVATE KEY' /etc/eucalyptus").stdout.split() == [f"{PKI}/node.key"]


def test_ca_is_the_controllers_cluster_ca(host):
    """Every host has the CA made on the controller (whose key stayed there)."""
    controller_ca = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "pki" / "ca.crt"
    assert host.file(f"{PKI}/ca.crt").content_string.strip() == controller_ca.read_text().strip()
    assert (controller_ca.parent / "ca.key").stat().st_mode & 0o777 == 0o600


def test_unit_installed_enabled_and_hardened(host):
    svc = host.service("euca-runtime")
    assert svc.is_enabled
    unit = host.file("/etc/systemd/system/euca-runtime.service").content_string
    assert "User=eucalyptus" in unit
    assert f"ExecStart={VENV}/bin/euca-runtime serve --config {CONFIG}" in unit
    assert "NoNewPrivileges=yes" in unit and "ProtectSystem=strict" in unit
    if hostvars(host)["euca_runtime_service_start"]:
        assert svc.is_running


def test_bus_port_listens_only_where_expected(host):
    address = hostvars(host)["ansible_host"]
    listeners = host.run("ss -Htln").stdout
    if hostvars(host)["euca_runtime_service_start"]:
        assert host.socket(f"tcp://{address}:{BUS_PORT}").is_listening
        assert not host.socket(f"tcp://0.0.0.0:{BUS_PORT}").is_listening
    else:
        # Not started: nothing of the runtime listens anywhere.
        assert f":{BUS_PORT} " not in listeners
    assert not host.socket("tcp://0.0.0.0:7180").is_listening


def test_the_clc_group_has_one_enabled_primary_and_an_in_sync_backup(host):
    if not hostvars(host)["euca_runtime_service_start"]:
        pytest.skip("euca_runtime_service_start is false: the runtime is not running")
    cmd = f"runuser -u eucalyptus -- {VENV}/bin/eucactl --config {CONFIG} describe-services -o json"
    deadline = time.monotonic() + 30
    while True:
        out = host.run(cmd)
        services = json.loads(out.stdout) if out.rc == 0 else []
        clc = {s["node"]: s for s in services if s["type"] == "clc"}
        states = sorted(s["state"] for s in clc.values())
        if states == ["DISABLED", "ENABLED"] and all(s["in_sync"] for s in clc.values()):
            break
        assert time.monotonic() < deadline, f"clc group not settled: {out.stdout or out.stderr}"
        time.sleep(1)
    arbitrators = [s for s in services if s["type"] == "arbitrator"]
    assert [s["node"] for s in arbitrators] == ["h3"]
