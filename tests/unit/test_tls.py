"""The development PKI and the mutual-TLS contexts."""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from euca_runtime.tls import (
    client_context,
    common_name,
    contexts,
    create_ca,
    ensure_dev_pki,
    issue_node_cert,
    server_context,
    write_private,
)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask() -> object:
    """A umask that would leave files world-readable if keys relied on it."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_dev_pki_layout_modes_and_fields(tmp_path: Path, open_umask: object) -> None:
    pki = ensure_dev_pki(tmp_path / "pki", ["node-a", "node-b"], {"node-a": ["127.0.0.2", "::1"]})
    root = tmp_path / "pki"
    assert mode(root) == 0o700
    assert mode(root / "ca.key") == 0o600
    for node in ("node-a", "node-b"):
        assert pki[node].ca == root / "ca.crt"
        assert pki[node].cert == root / f"{node}.crt"
        assert mode(pki[node].key) == 0o600
    ca = load(root / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert = load(pki["node-a"].cert)
    assert common_name(cert) == "node-a"
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"node-a", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.2"),
        ipaddress.ip_address("::1"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # node-b had no entry in the mapping: loopback by default
    san_b = load(pki["node-b"].cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san_b.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_dev_pki_is_idempotent(tmp_path: Path) -> None:
    ensure_dev_pki(tmp_path, ["a", "b"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    ensure_dev_pki(tmp_path, ["a", "b"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # a new node or a new address issues only what is missing, under the same CA
    ensure_dev_pki(tmp_path, ["a", "b", "c"], {"b": ["127.0.0.9"], "a": ["127.0.0.1"]})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after["ca.crt"] == before["ca.crt"] and after["ca.key"] == before["ca.key"]
    assert after["a.crt"] == before["a.crt"] and after["a.key"] == before["a.key"]
    assert after["b.crt"] != before["b.crt"]
    assert "c.crt" in after
    load(tmp_path / "c.crt").verify_directly_issued_by(load(tmp_path / "ca.crt"))


def test_dev_pki_reissues_certs_of_a_replaced_ca(tmp_path: Path) -> None:
    ensure_dev_pki(tmp_path, ["a"])
    (tmp_path / "ca.crt").unlink()
    ensure_dev_pki(tmp_path, ["a"])
    load(tmp_path / "a.crt").verify_directly_issued_by(load(tmp_path / "ca.crt"))


def test_rejects_unsafe_node_names(tmp_path: Path) -> None:
    for bad in ["", "../x", ".hidden"]:
        with pytest.raises(ValueError):
            ensure_dev_pki(tmp_path, [bad])


def test_keys_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="euca_runtime"):
        ensure_dev_pki(tmp_path, ["a"])
    assert caplog.records  # it does log what it creates...
    key_text = (tmp_path / "a.key").read_text() + (tmp_path / "ca.key").read_text()
    for record in caplog.records:  # ...but never key material
        text = record.getMessage() + repr(vars(record))
        assert "PRIVATE KEY" not in text
        assert not any(line in text for line in key_text.splitlines() if "-----" not in line)


def test_write_private_is_0600_from_creation(tmp_path: Path, open_umask: object) -> None:
    target = tmp_path / "secret"
    write_private(target, b"one")
    assert mode(target) == 0o600 and target.read_bytes() == b"one"
    write_private(target, b"two")  # replaced atomically, still 0600
    assert mode(target) == 0o600 and target.read_bytes() == b"two"


def test_contexts_require_mutual_tls(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path, ["a"])["a"]
    server, client = contexts(pki)
    for ctx in (server, client):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert not ctx.check_hostname
        # only the cluster CA is trusted, no system store
        assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "euca-ha cluster CA"),),)]
    assert server_context(pki.ca, pki.cert, pki.key).verify_mode == ssl.CERT_REQUIRED
    assert client_context(pki.ca, pki.cert, pki.key).verify_mode == ssl.CERT_REQUIRED


def test_issue_from_explicit_ca(tmp_path: Path) -> None:
    create_ca(tmp_path / "ca.crt", tmp_path / "ca.key", common_name="site CA")
    cert = issue_node_cert(
        tmp_path / "ca.crt",
        tmp_path / "ca.key",
        "clc-1",
        tmp_path / "clc-1.crt",
        tmp_path / "clc-1.key",
        dns_names=["clc-1.example.org"],
        ips=["10.0.0.5"],
    )
    assert common_name(cert) == "clc-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "clc-1.example.org" in san.get_values_for_type(x509.DNSName)
    cert.verify_directly_issued_by(load(tmp_path / "ca.crt"))


def test_common_name_from_getpeercert_dict() -> None:
    assert common_name({"subject": ((("organizationName", "x"),), (("commonName", "node-a"),))}) == "node-a"
    assert common_name({"subject": ()}) is None
    assert common_name(None) is None
