"""``eucactl``: the operator's command line, over a runtime process's admin API.

Where the cloud is (first that applies):

- ``--dir DIR``: a local cloud made by ``euca-runtime up`` (DIR/cloud.json, DIR/admin.token);
- ``--config FILE``: a runtime configuration; its ``admin`` address, and the token in
  ``<data_dir>/admin.token``;
- ``EUCA_ADMIN_URL`` (or ``EUCA_ADMIN_URLS``, space-separated) and ``EUCA_ADMIN_TOKEN`` or
  ``EUCA_ADMIN_TOKEN_FILE`` (what ``source DIR/eucarc`` sets);
- ``--admin-url`` / ``--token-file`` override either.

Every admin URL is tried in turn until one answers, so the tool keeps working while a node
is down. Commands:

- ``describe-groups [-o table|json]``: one line per service group: its ENABLED instance,
  epoch, every instance with its state, how many are in sync, the largest lag, and the VIP
  holder where the group has a service address (``-`` otherwise); ``-o json`` adds
  ``healthy`` (exactly one ENABLED instance and every instance in sync; for groups of
  independent instances such as ``nc`` and ``arbitrator``: every instance ENABLED) and
  ``recorded_in_sync`` (the in-sync set the voters recorded, as the primary knows it).
  Deregistered instances (tombstones of removed hosts) are left out. The runbook
  ``playbooks/runbooks/status.yml`` prints this table.
- ``describe-services [-o table|json] [--events]``: every service instance; ``-o json`` is a
  JSON array of objects with at least name, type, partition, host, node, state, epoch,
  in_sync, lag, heartbeat_age_ms (a contract). ``--events`` adds the state transitions and
  their causes (``{"services": [...], "events": [...]}`` with ``-o json``).
- ``modify-service NAME --state ENABLED|DISABLED|STOPPED``: takes effect or fails with a reason
  (exit status 1); an operator's STOPPED survives restarts.
- ``switchover GROUP --to NAME``: planned hand-over of a group's primary role.
- ``register NAME [--type T] [--partition P] [--node N] [--host H]`` / ``deregister NAME [--force]``.
  Deregistering stops the instance on its node (persisted) and tombstones its registry row.
  When its node does not answer (a dead host) the row is tombstoned without it if the
  instance cannot hold its group's lease: another instance of the group is ENABLED, or its node
  last reported it as not ENABLED (or the group has no primary, e.g. nc). Otherwise it is
  refused (``MayHoldLease``) unless ``--force``.
- ``force-promote NAME --accept-data-loss``: promote an instance outside the in-sync set.
- ``describe-voters [-o table|json]``: every group's voter configuration (version, sets, joint
  or not, a pending change), the configured target and which voters are still joining.
  ``describe-services -o json`` also carries each instance's ``voter_config``.
- ``reload``: make the process(es) re-read their configuration file (peers, voters; what
  ``SIGHUP`` does); with ``--dir``, every node of the local cloud.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

EXIT_FAIL = 1
EXIT_USAGE = 2
COLUMNS = (
    "name",
    "type",
    "partition",
    "node",
    "host",
    "state",
    "epoch",
    "in_sync",
    "lag",
    "heartbeat_age_ms",
)


class CtlError(Exception):
    """A failed command; the message is printed and the exit status is 1."""


class Client:
    """The admin API of a cloud, through whichever of its admin URLs answers."""

    def __init__(self, urls: list[str], token: str) -> None:
        if not urls:
            raise CtlError("no admin URL: pass --dir, --config or set EUCA_ADMIN_URL")
        self.urls = urls
        self.token = token

    def call(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        errors = []
        for url in self.urls:
            data = None if body is None else json.dumps(body).encode()
            req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
            req.add_header("Authorization", f"Bearer {self.token}")
            if data is not None:
                req.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as exc:
                try:
                    doc = json.loads(exc.read() or b"{}")
                    reason = f"{doc.get('error', exc.code)}: {doc.get('message', exc.reason)}"
                except (json.JSONDecodeError, AttributeError):
                    reason = f"HTTP {exc.code} {exc.reason}"
                if exc.code in (502, 503, 504):
                    errors.append(f"{url}: {reason}")
                    continue
                raise CtlError(reason) from None
            except (OSError, json.JSONDecodeError) as exc:
                errors.append(f"{url}: {exc}")
        raise CtlError("no admin endpoint answered: " + "; ".join(errors))


def _client(args: argparse.Namespace) -> Client:
    urls: list[str] = []
    token: str | None = None
    if args.dir:
        root = Path(args.dir)
        try:
            layout = json.loads((root / "cloud.json").read_text())
            token = (root / "admin.token").read_text().strip()
        except OSError as exc:
            raise CtlError(f"{root}: not a local cloud directory ({exc})") from None
        urls = [n["admin"] for n in layout["nodes"].values()]
    elif args.config:
        from euca_runtime.config import ConfigError, load_config

        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            raise CtlError(str(exc)) from None
        urls = [f"http://{cfg.admin}"]
        try:
            token = (cfg.data_dir / "admin.token").read_text().strip()
        except OSError as exc:
            raise CtlError(f"cannot read the admin token: {exc}") from None
    else:
        env_urls = os.environ.get("EUCA_ADMIN_URLS") or os.environ.get("EUCA_ADMIN_URL") or ""
        urls = env_urls.split()
        token = os.environ.get("EUCA_ADMIN_TOKEN")
        token_file = os.environ.get("EUCA_ADMIN_TOKEN_FILE")
        if token is None and token_file:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise CtlError(f"cannot read the admin token: {exc}") from None
    if args.admin_url:
        urls = [args.admin_url]
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise CtlError(f"cannot read the admin token: {exc}") from None
    if not token:
        raise CtlError("no admin token: pass --dir, --config, --token-file or set EUCA_ADMIN_TOKEN_FILE")
    return Client(urls, token)


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [*COLUMNS, "cause"]
    header = [c.upper() for c in cols]

    def cell(r: dict[str, Any], c: str) -> str:
        v = r.get(c)
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.0f}"
        return str(v)

    body = [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    lines = [
        "  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]
    ]
    return "\n".join(lines)


def group_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per service group (type, partition) from describe-services rows."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = r.get("group") or (r["type"] if not r.get("partition") else f"{r['type']}/{r['partition']}")
        groups.setdefault(str(key), []).append(r)
    out = []
    for key in sorted(groups):
        # A deregistered instance (a removed host's tombstone) is not part of the group's health.
        members = [m for m in groups[key] if not str(m.get("cause") or "").startswith("deregistered")]
        if not members:
            continue
        enabled = [m["name"] for m in members if m.get("state") == "ENABLED"]
        lags = [m["lag"] for m in members if isinstance(m.get("lag"), int)]
        vips = sorted({str(m["vip_holder"]) for m in members if m.get("vip_holder")})
        out.append(
            {
                "group": key,
                "enabled": enabled,
                "epoch": max((int(m.get("epoch") or 0) for m in members), default=0),
                "instances": [
                    {
                        "name": m["name"],
                        "node": m.get("node"),
                        "state": m.get("state"),
                        "in_sync": m.get("in_sync"),
                    }
                    for m in members
                ],
                "names": [m["name"] for m in members],
                "in_sync": sum(1 for m in members if m.get("in_sync")),
                "size": len(members),
                "max_lag": max(lags) if lags else None,
                "vip_holder": vips[0] if len(vips) == 1 else (vips or None),
                "healthy": (
                    len(enabled) == 1 and all(m.get("in_sync") for m in members)
                    if any(m.get("replicated", True) for m in members)
                    else all(m.get("state") == "ENABLED" for m in members)  # independent: nc, arbitrator
                ),
                "recorded_in_sync": next(
                    (m["recorded_in_sync"] for m in members if m.get("recorded_in_sync") is not None), None
                ),
            }
        )
    return out


def groups_table(groups: list[dict[str, Any]]) -> str:
    header = ["GROUP", "ENABLED", "EPOCH", "IN_SYNC", "MAX_LAG", "VIP_HOLDER", "INSTANCES"]
    body = []
    for g in groups:
        vip = g["vip_holder"]
        body.append(
            [
                g["group"],
                ",".join(g["enabled"]) or "NONE",
                str(g["epoch"]),
                f"{g['in_sync']}/{g['size']}",
                "-" if g["max_lag"] is None else str(g["max_lag"]),
                "-" if not vip else (vip if isinstance(vip, str) else "CONFLICT:" + ",".join(vip)),
                " ".join(f"{i['name']}={i['state']}" for i in g["instances"]),
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    return "\n".join(
        "  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body]
    )


def _events_table(events: list[dict[str, Any]]) -> str:
    import time

    out = []
    for e in events:
        ts = (
            time.strftime("%H:%M:%S", time.localtime(e.get("ts", 0)))
            + f".{int((e.get('ts', 0) % 1) * 1000):03d}"
        )
        change = f"{e.get('old')} -> {e.get('new')}" if e.get("old") != e.get("new") else "event"
        out.append(
            f"{ts}  {e.get('node')}  {e.get('service')}  {change}  epoch={e.get('epoch')}  {e.get('cause')}"
        )
    return "\n".join(out)


def _voters_table(doc: dict[str, Any]) -> str:
    def sets(cfg: dict[str, Any] | None) -> str:
        if not cfg:
            return "-"
        return " + ".join("{" + ",".join(x) + "}" for x in cfg["sets"]) + f" v{tuple(cfg['version'])}"

    lines = [f"target voters: {' '.join(doc.get('target', []))}"]
    joining = [v["node"] for v in doc.get("voters", []) if v.get("joining")]
    lines.append(f"joining voters: {' '.join(joining) if joining else '-'}")
    rows = [("GROUP", "HOLDER", "EPOCH", "VOTERS", "PENDING")]
    for g in doc.get("groups", []):
        epoch = "-" if g.get("epoch") is None else str(g["epoch"])
        rows.append(
            (g["group"], g.get("holder") or "-", epoch, sets(g.get("config")), sets(g.get("pending")))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The ``eucactl`` entry point; a closed pipe (``eucactl ... | head``) ends it quietly."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Python flushes stdout at exit again; point it at /dev/null so that is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eucactl", description="Operate a euca-ha cloud.")
    parser.add_argument("--dir", help="a local cloud made by `euca-runtime up`")
    parser.add_argument("--config", help="a runtime configuration file (admin address and token)")
    parser.add_argument("--admin-url", help="an admin URL (overrides the rest)")
    parser.add_argument("--token-file", help="the admin token file (overrides the rest)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("describe-groups", help="one line per service group (primary, epoch, lag, VIP)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p = sub.add_parser("describe-services", help="list every service instance and its state")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("--events", action="store_true", help="also show state transitions and causes")
    p = sub.add_parser("modify-service", help="set an instance ENABLED, DISABLED or STOPPED")
    p.add_argument("name")
    p.add_argument("--state", required=True, type=str.upper, choices=("ENABLED", "DISABLED", "STOPPED"))
    p.add_argument("--timeout", type=float, default=15.0)
    p = sub.add_parser("switchover", help="hand a group's primary role to an in-sync instance")
    p.add_argument("group", help="e.g. kv, clc, sc/cluster01")
    p.add_argument("--to", required=True, help="the instance to make ENABLED")
    p.add_argument("--timeout", type=float, default=10.0)
    p = sub.add_parser("register", help="register a service instance")
    p.add_argument("name")
    p.add_argument("--type")
    p.add_argument("--partition")
    p.add_argument("--node")
    p.add_argument("--host")
    p = sub.add_parser("deregister", help="deregister (and stop) a service instance")
    p.add_argument("name")
    p.add_argument(
        "--force",
        action="store_true",
        help="also when its host does not answer and it may still hold its group's lease",
    )
    p = sub.add_parser("describe-voters", help="show every group's voter configuration")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sub.add_parser("reload", help="re-read the configuration file (peers, voters) without a restart")
    p = sub.add_parser("force-promote", help="promote an instance that may lack acknowledged writes")
    p.add_argument("name")
    p.add_argument("--accept-data-loss", action="store_true", required=True)
    args = parser.parse_args(argv)

    try:
        client = _client(args)
        if args.cmd == "describe-services":
            doc = client.call("GET", "/v1/services" + ("?events=1" if args.events else ""), timeout=10.0)
            rows = doc["services"]
            if args.output == "json":
                print(
                    json.dumps(
                        {"services": rows, "events": doc.get("events", [])} if args.events else rows, indent=2
                    )
                )
            else:
                print(_table(rows))
                if args.events:
                    print()
                    print(_events_table(doc.get("events", [])))
            return 0
        if args.cmd == "describe-groups":
            groups = group_summary(client.call("GET", "/v1/services", timeout=10.0)["services"])
            print(json.dumps(groups, indent=2) if args.output == "json" else groups_table(groups))
            return 0
        if args.cmd == "modify-service":
            res = client.call(
                "POST",
                f"/v1/services/{args.name}",
                {"state": args.state, "timeout": args.timeout},
                timeout=args.timeout + 10.0,
            )
            print(f"{res['name']}: {res.get('previous', '?')} -> {res['state']}")
            return 0
        if args.cmd == "switchover":
            res = client.call(
                "POST",
                "/v1/switchover",
                {"group": args.group, "to": args.to, "timeout": args.timeout},
                timeout=args.timeout + 10.0,
            )
            print(f"{res['group']}: {res['from']} -> {res['to']} ({res['state']})")
            return 0
        if args.cmd == "register":
            body = {
                k: getattr(args, k) for k in ("name", "type", "partition", "node", "host") if getattr(args, k)
            }
            res = client.call("POST", "/v1/register", body, timeout=20.0)
            print(f"{res['name']}: registered")
            return 0
        if args.cmd == "deregister":
            body = {"name": args.name, "force": True} if args.force else {"name": args.name}
            res = client.call("POST", "/v1/deregister", body, timeout=20.0)
            inst = res.get("instance") or {}
            how = " (its host did not answer; tombstoned without it)" if inst.get("without_node") else ""
            print(f"{res['name']}: deregistered{how}")
            return 0
        if args.cmd == "describe-voters":
            doc = client.call("GET", "/v1/voters")
            if args.output == "json":
                print(json.dumps(doc, indent=2))
            else:
                print(_voters_table(doc))
            return 0
        if args.cmd == "reload":
            for url in client.urls:
                res = Client([url], client.token).call("POST", "/v1/reload", {})
                changed = ", ".join(res.get("changed") or []) or "nothing"
                ignored = f"; needs a restart: {', '.join(res['ignored'])}" if res.get("ignored") else ""
                print(
                    f"{res['node']}: reloaded ({changed} changed{ignored}); voters {' '.join(res['voters'])}"
                )
            return 0
        if args.cmd == "force-promote":
            res = client.call(
                "POST", "/v1/force-promote", {"name": args.name, "accept_data_loss": True}, timeout=30.0
            )
            print(f"{res['name']}: {res['state']} (epoch {res.get('epoch', '?')})")
            return 0
    except CtlError as exc:
        print(f"eucactl {args.cmd}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
