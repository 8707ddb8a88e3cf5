"""Death certificate from the host's supervisor: ``python -m euca_runtime.death --config FILE``.

DESIGN.md section 6: when the runtime process dies without releasing its leases (``kill -9``,
a crash, the systemd watchdog), the supervisor that watched it die tells the voters, which then
release those leases at once instead of waiting for them to expire. Locally the supervisor of
``euca-runtime up`` does this (`euca_runtime.local.send_death_certificates`); on hosts it is this
command, run by systemd as the unit's last ``ExecStopPost=`` (as root, after
``python -m euca_runtime.vip release`` has removed the service VIPs: systemd runs the next
``ExecStopPost=`` line only when the previous one succeeded, so no backup is granted a lease
early while this host may still hold its address).

What it does: reads ``<data_dir>/held.json`` (which the runtime keeps up to date: its pid and the
``{group, holder, epoch}`` of every lease it holds; a graceful stop leaves it empty). It certifies
nothing unless that pid is gone (a live process is never certified dead; a frozen one is alive).
Then it connects to every peer of the config over the bus with the node's own TLS identity (the
voters accept protocol messages only from a peer whose certificate names it) and sends one
``DeathCertificate(group, holder, epoch)`` per lease. A voter releases the lease only if that
holder holds exactly that epoch from it (a stale certificate is ignored), and a node that is not
a voter ignores it. Every failure is logged and ends with status 0: without certificates the
leases simply expire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from euca_runtime.local import pid_alive
from euca_runtime.log import configure, get_logger

log = get_logger("death")

TIMEOUT = 2.0
"""Seconds for the whole round of certificates (each peer in parallel)."""


def held_leases(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The well-formed ``{group, holder, epoch}`` entries of a held.json document."""
    out = []
    for lease in doc.get("leases") or ():
        if isinstance(lease, Mapping):
            try:
                out.append(
                    {
                        "group": str(lease["group"]),
                        "holder": str(lease["holder"]),
                        "epoch": int(lease["epoch"]),
                    }
                )
            except (KeyError, TypeError, ValueError):
                continue
    return out


async def send(cfg: Any, leases: list[dict[str, Any]], timeout: float = TIMEOUT) -> dict[str, str]:
    """Send the certificates to every peer of `cfg`; per peer "sent" or why not."""
    from euca_runtime.lease import DeathCertificate, encode
    from euca_runtime.tls import client_context, server_context
    from euca_runtime.transport import DeadlineExceeded, Endpoint, PeerUnavailable, RemoteError

    issuer = f"systemd@{cfg.node}"
    body = {"msgs": [encode(DeathCertificate(issuer=issuer, **lease)) for lease in leases]}
    # An endpoint that only dials out (never listens): the node's identity, the node's peers.
    ep = Endpoint(
        cfg.node,
        cfg.listen.host,
        0,
        server_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key),
        client_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key),
        peers=cfg.peer_table(),
        options=cfg.transport_options(),
    )
    result: dict[str, str] = {}

    async def one(peer: str) -> None:
        try:
            await ep.request(peer, "_proto", "m", body, timeout=timeout)
            result[peer] = "sent"
        except (PeerUnavailable, DeadlineExceeded, RemoteError, OSError) as exc:
            result[peer] = f"{type(exc).__name__}: {exc}"

    try:
        await asyncio.gather(*(one(p) for p in cfg.peer_table() if p != cfg.node))
    finally:
        await ep.stop()
    return result


def certify(config_file: str, timeout: float = TIMEOUT) -> int:
    """Certify the death of `config_file`'s runtime process (see the module docstring)."""
    from euca_runtime.config import ConfigError, load_config

    try:
        cfg = load_config(config_file)
    except ConfigError as exc:
        print(f"death certificate: {exc}", file=sys.stderr)
        return 0
    configure(cfg.log_level, node=cfg.node)
    held_file = cfg.data_dir / "held.json"
    try:
        doc = json.loads(held_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.info("no death certificate: nothing recorded", extra={"file": str(held_file), "reason": str(exc)})
        return 0
    leases = held_leases(doc) if isinstance(doc, Mapping) else []
    pid = doc.get("pid") if isinstance(doc, Mapping) else None
    if not leases:
        log.info("no death certificate: the process held no lease", extra={"pid": pid})
        return 0
    if not isinstance(pid, int) or pid_alive(pid):
        log.warning("no death certificate: the process is still alive", extra={"pid": pid})
        return 0
    result = asyncio.run(send(cfg, leases, timeout))
    log.info(
        "death certificates sent",
        extra={
            "pid": pid,
            "leases": leases,
            "peers": result,
            "service_result": os.environ.get("SERVICE_RESULT"),
        },
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m euca_runtime.death", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the runtime's configuration file")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds for the whole round")
    args = parser.parse_args(argv)
    return certify(args.config, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
