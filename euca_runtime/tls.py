"""The cluster PKI and the mutual-TLS contexts of the bus.

A cluster has one CA. Every runtime process holds a certificate whose subject CN is its
node name (the bus checks it against the name the peer claims in its hello) with SAN
entries for that name, ``localhost`` and the node's IP addresses, usable for both TLS
server and client authentication.

Deployments pass the CA, certificate and key paths; for local use (``euca-runtime up``)
:func:`ensure_dev_pki` creates them under one directory, idempotently. Private keys are
created with mode 0600 from the first byte (``os.open`` with ``O_CREAT | O_EXCL``, then an
atomic rename), and their contents never reach a log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import ssl
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from euca_runtime.log import get_logger

log = get_logger("tls")

CA_VALIDITY_DAYS = 3650
NODE_VALIDITY_DAYS = 825


@dataclass(frozen=True)
class NodePki:
    """Where one node's TLS material lives."""

    ca: Path
    cert: Path
    key: Path


# --- files --------------------------------------------------------------------------------


def write_private(path: Path, data: bytes) -> None:
    """Write a secret to ``path`` with mode 0600 from creation on.

    The data goes to a fresh temporary file opened with ``O_CREAT | O_EXCL`` and mode 0600
    (never chmod-ed after the fact), which is then renamed over ``path`` atomically.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key")
    return key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- issuing ------------------------------------------------------------------------------


def create_ca(cert_path: Path, key_path: Path, common_name: str = "euca-ha cluster CA") -> x509.Certificate:
    """Create a self-signed cluster CA (EC P-256): key at ``key_path`` (0600), cert at ``cert_path``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(Path(key_path), _key_pem(key))
    _write_public(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM))
    log.info("created cluster CA", extra={"cert": str(cert_path)})
    return cert


def issue_node_cert(
    ca_cert_path: Path,
    ca_key_path: Path,
    node: str,
    cert_path: Path,
    key_path: Path,
    *,
    dns_names: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> x509.Certificate:
    """Issue a certificate for ``node`` (CN = node, SAN = node, localhost, ``dns_names``, ``ips``).

    The key (EC P-256) is written to ``key_path`` with mode 0600. The certificate allows
    both server and client authentication, since every endpoint both dials and accepts.
    """
    ca_cert = x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes())
    ca_key = _load_key(Path(ca_key_path))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([node, "localhost", *dns_names])]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=NODE_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private(Path(key_path), _key_pem(key))
    _write_public(Path(cert_path), cert.public_bytes(serialization.Encoding.PEM))
    log.info("issued node certificate", extra={"peer": node, "cert": str(cert_path)})
    return cert


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _cert_ok(cert_path: Path, key_path: Path, ca: x509.Certificate, node: str, ips: Sequence[str]) -> bool:
    """True if the existing node cert is from ``ca``, names ``node`` and covers ``ips``."""
    if not (cert_path.exists() and key_path.exists()):
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = _load_key(key_path)
    if cert.issuer != ca.subject or cert.public_key() != key.public_key():
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if cert.not_valid_after_utc < _now() + dt.timedelta(days=30):
        return False
    if common_name(cert) != node:
        return False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    have = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return {str(ipaddress.ip_address(ip)) for ip in ips} <= have


def ensure_dev_pki(
    directory: Path | str,
    nodes: Iterable[str],
    ips: Mapping[str, Sequence[str]] | Sequence[str] = ("127.0.0.1",),
) -> dict[str, NodePki]:
    """Make (or reuse) a development CA and one certificate per node under ``directory``.

    Layout: ``ca.crt``, ``ca.key``, ``<node>.crt``, ``<node>.key``. ``ips`` is either one
    list of IP addresses for every node or a mapping node -> addresses. Calling it again
    reuses whatever is still valid (same CA, same names, addresses covered) and issues the
    rest; concurrent callers are serialised with a lock file. The directory is created
    with mode 0700.
    """
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = root / "ca.crt", root / "ca.key"
    out: dict[str, NodePki] = {}
    with _locked(root):
        if ca_cert_path.exists() and ca_key_path.exists():
            ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        else:
            ca = create_ca(ca_cert_path, ca_key_path)
        for node in nodes:
            if not node or "/" in node or node.startswith("."):
                raise ValueError(f"not a usable node name: {node!r}")
            node_ips = list(ips.get(node, ("127.0.0.1",))) if isinstance(ips, Mapping) else list(ips)
            cert_path, key_path = root / f"{node}.crt", root / f"{node}.key"
            if not _cert_ok(cert_path, key_path, ca, node, node_ips):
                issue_node_cert(ca_cert_path, ca_key_path, node, cert_path, key_path, ips=node_ips)
            out[node] = NodePki(ca=ca_cert_path, cert=cert_path, key=key_path)
    return out


# --- contexts -----------------------------------------------------------------------------


class _RefusalLoggingSSLObject(ssl.SSLObject):
    """Logs why a TLS handshake was refused (asyncio only logs it in debug mode)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            log.warning(
                "refused TLS peer",
                extra={"reason": getattr(exc, "verify_message", None) or exc.reason or str(exc)},
            )
            raise


def _context(purpose: int, ca: Path | str, cert: Path | str, key: Path | str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the bus checks the certificate CN against the node name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca))  # the cluster CA only: no system trust store
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_context(ca: Path | str, cert: Path | str, key: Path | str) -> ssl.SSLContext:
    """The accepting side's context: requires a client certificate signed by the cluster CA."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)
    ctx.sslobject_class = _RefusalLoggingSSLObject
    return ctx


def client_context(ca: Path | str, cert: Path | str, key: Path | str) -> ssl.SSLContext:
    """The dialling side's context: presents our certificate, verifies the server's against the CA.

    Hostname checking is off on purpose: peers are dialled by address, and the bus instead
    checks that the certificate CN equals the node name it meant to reach.
    """
    return _context(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key)


def contexts(pki: NodePki) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """``(server_context, client_context)`` for one node's material."""
    return server_context(pki.ca, pki.cert, pki.key), client_context(pki.ca, pki.cert, pki.key)


def common_name(cert: x509.Certificate | Mapping[str, Any] | None) -> str | None:
    """The subject CN of a certificate (a cryptography object or ``getpeercert()``'s dict)."""
    if cert is None:
        return None
    if isinstance(cert, x509.Certificate):
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = attrs[0].value if len(attrs) == 1 else None
        return value if isinstance(value, str) else None
    found = [v for rdn in cert.get("subject", ()) for (k, v) in rdn if k == "commonName"]
    return found[0] if len(found) == 1 else None
