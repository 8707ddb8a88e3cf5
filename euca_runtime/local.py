"""``euca-runtime up`` / ``down``: a whole local cloud on loopback, without root or machines.

Layout under DIR (mode 0700)::

    cloud.json            the layout: nodes, their addresses, configs, URLs (read by eucactl)
    admin.token           the admin token (0600); each node's data dir holds a copy
    eucarc                shell ``export`` lines (0600): EUARE_URL(S), EC2_URL(S), S3_URL(S),
                          AWS_ENDPOINT_URL_IAM/_EC2/_S3 (the shared addresses), AWS_ACCESS_KEY_ID,
                          AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, KV_URL(S), EUCA_ADMIN_URL(S), ...
    pki/                  the development cluster CA and one certificate per node, and
                          credentials.key (0600): the cloud's key for access-key secrets at rest
    <node>.yaml           the node's `euca-runtime serve` configuration
    <node>/               its data dir: core database, one database per instance, held.json
    <node>.log            its JSON log lines (and its supervisor's)
    <node>.pid            the pid of its runtime process (what ``kill -9`` targets)
    <node>.supervisor.pid the pid of its local supervisor

``up`` (no ``--ha``): one process ``node-a`` hosting every component, the only voter.
``up --ha`` on a DIR that holds a non-HA cloud turns it into an HA one *online* (I3): it adds
``node-b`` (backup of clc, kv, walrus, sc and cc, started with ``join: true``) and ``node-c``
(arbitrator), rewrites ``node-a.yaml`` with the new peers and voters and reloads it (``POST /v1/reload``:
node-a is never restarted), waits until every group's voters are {node-a, node-b, node-c}
and node-b's instances are DISABLED and in sync, then rewrites cloud.json and eucarc.
User routes (``up --ha``; docs/arbitrator.md): node-c's arbitrator watches one route per
node that hosts user-facing groups (``users-a`` stands for node-a, ``users-b`` for node-b),
each with two TCP targets on their own loopback addresses (127.0.0.21, .22 for users-a;
.23, .24 for users-b). A small process (`euca_runtime.route_targets`, DIR/targets.pid) plays
the users' end: it listens on every target, and a test takes targets down and up again
(``python -m euca_runtime.route_targets --dir DIR down users-a``). Every ``up`` starts it
when it is not running; ``down`` of the whole cloud stops it.
``up --ha``: ``node-a`` and ``node-b`` each host the ``clc``, ``kv``, ``walrus``, ``sc/cluster01``
and ``cc/cluster01`` groups (node-a is the preferred primary), ``node-c`` hosts an arbitrator and
the NC of ``cluster01``; voters are node-a, node-b and node-c. Each process has its own loopback
address (127.0.0.11, .12, .13), its own free ports and its own databases. Every clc host serves
the IAM API (``api.iam``) and the EC2 API (``api.ec2``). ``up`` returns once every
replicated group has an ENABLED instance and the clc has made the ``eucalyptus`` admin
account; it then fetches the admin user's access key through the admin API
(``/v1/iam/admin-credentials``) and writes it into eucarc (the key is made by the cloud,
never by ``up``). Run on an
existing DIR, it starts whichever nodes are not running, so it is also how a stopped or killed
node is restarted; ``--node NAME`` restricts it to one node and returns once that node answers.

Every runtime process runs under a tiny *supervisor* (its parent, in a new session). When the
runtime process dies without being asked to (a crash, ``kill -9``), the supervisor sends a
*death certificate* for every lease the process held (from ``<node>/held.json``) to every
voter's admin API, so failover does not wait for the lease to expire (DESIGN.md section 6).
A frozen process (``SIGSTOP``) is not dead, so nobody certifies anything and its lease expires.

``down`` sends SIGTERM to every supervisor and runtime process (a runtime process releases its
leases on the way out), waits, then SIGKILLs whatever is left in each node's process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from euca_runtime.config import load_config
from euca_runtime.credentials import make_credential_key
from euca_runtime.tls import ensure_dev_pki, write_private

LAYOUT = "cloud.json"
REGION = "eucalyptus"
CREDENTIAL_KEY = "pki/credentials.key"
TOKEN = "admin.token"
UP_TIMEOUT = 60.0
SHARED_IP = "127.0.0.10"
"""Where a local cloud's shared API addresses live (every process serving an API listens there)."""
API_TYPES = {"kv": "kv", "iam": "clc", "ec2": "clc", "s3": "walrus"}
"""Each user API and the component type that serves it."""
LEASED = ("clc", "kv", "walrus", "sc", "cc")
"""Component types whose groups `up` waits to see ENABLED."""
DOWN_GRACE = 8.0
ROUTE_SETTINGS: dict[str, Any] = {"interval": 0.5, "threshold": 3, "recover": 3, "timeout": 0.4}
"""Probe settings of the local cloud's user routes (detection in about 1.5 s)."""
TARGETS_CONTROL_IP = "127.0.0.20"
ROUTE_TARGET_IPS = ("127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24", "127.0.0.25", "127.0.0.26")
USER_FACING = frozenset({"clc", "walrus", "kv", "sc", "cc"})

CLUSTER = "cluster01"
"""The one cluster (availability zone) of a local cloud."""
LOCAL_NC_OPTIONS: dict[str, Any] = {"cores": 8, "memory_mib": 8192, "disk_gib": 100, "driver": "process"}
"""The capacity a local cloud's NC offers (placeholder processes cost next to nothing)."""

HA_NODES: dict[str, dict[str, Any]] = {
    "node-a": {
        "ip": "127.0.0.11",
        "components": [
            {"type": "clc", "role": "primary"},
            {"type": "kv", "role": "primary"},
            {"type": "walrus", "role": "primary"},
            {"type": "sc", "partition": CLUSTER, "role": "primary"},
            {"type": "cc", "partition": CLUSTER, "role": "primary"},
        ],
    },
    "node-b": {
        "ip": "127.0.0.12",
        "components": [
            {"type": "clc", "role": "backup"},
            {"type": "kv", "role": "backup"},
            {"type": "walrus", "role": "backup"},
            {"type": "sc", "partition": CLUSTER, "role": "backup"},
            {"type": "cc", "partition": CLUSTER, "role": "backup"},
        ],
    },
    "node-c": {
        "ip": "127.0.0.13",
        "components": [
            {"type": "arbitrator"},
            {"type": "nc", "partition": CLUSTER, "options": LOCAL_NC_OPTIONS},
        ],
    },
}
SINGLE_NODES: dict[str, dict[str, Any]] = {
    "node-a": {
        "ip": "127.0.0.11",
        "components": [
            {"type": "clc"},
            {"type": "kv"},
            {"type": "walrus"},
            {"type": "sc", "partition": CLUSTER},
            {"type": "cc", "partition": CLUSTER},
            {"type": "nc", "partition": CLUSTER, "options": LOCAL_NC_OPTIONS},
        ],
    },
}


class UpError(RuntimeError):
    """`up` or `down` could not do what was asked; the message says why."""


@dataclass(frozen=True)
class NodeInfo:
    """One node of a local cloud, as recorded in cloud.json."""

    name: str
    host: str
    config: Path
    admin: str
    api: Mapping[str, str]
    voter: bool
    components: Sequence[Mapping[str, Any]]


class Layout:
    """A local cloud's layout (DIR/cloud.json)."""

    def __init__(self, root: Path, doc: Mapping[str, Any]) -> None:
        self.root = root
        self.doc = dict(doc)
        self.mode: str = doc["mode"]
        self.nodes: dict[str, NodeInfo] = {
            name: NodeInfo(
                name=name,
                host=n["host"],
                config=root / n["config"],
                admin=n["admin"],
                api=dict(n.get("api", {})),
                voter=bool(n.get("voter")),
                components=list(n.get("components", [])),
            )
            for name, n in doc["nodes"].items()
        }

    @classmethod
    def load(cls, root: Path | str) -> Layout:
        root = Path(root).resolve()
        path = root / LAYOUT
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise UpError(
                f"{root} holds no local cloud ({LAYOUT} missing): run `euca-runtime up --dir {root}`"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise UpError(f"{path}: unreadable: {exc}") from None
        return cls(root, doc)

    @property
    def token_file(self) -> Path:
        return self.root / TOKEN

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def admin_urls(self) -> list[str]:
        return [n.admin for n in self.nodes.values()]

    def shared_url(self, api: str) -> str | None:
        """The API's shared address (every serving process listens on it), if the cloud has one."""
        addr = (self.doc.get("shared_api") or {}).get(api)
        return f"http://{addr}" if addr else None

    def api_urls(self, api: str) -> list[str]:
        return [n.api[api] for n in self.nodes.values() if api in n.api]

    def groups(self) -> set[str]:
        """The leased groups this layout hosts (what `up` waits for), e.g. ``sc/cluster01``."""
        return {
            f"{c['type']}/{c['partition']}" if c.get("partition") else c["type"]
            for n in self.nodes.values()
            for c in n.components
            if c["type"] in LEASED
        }

    def pid_file(self, node: str) -> Path:
        return self.root / f"{node}.pid"

    def supervisor_pid_file(self, node: str) -> Path:
        return self.root / f"{node}.supervisor.pid"

    def log_file(self, node: str) -> Path:
        return self.root / f"{node}.log"

    def data_dir(self, node: str) -> Path:
        return self.root / node


# --------------------------------------------------------------------------- processes


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    """True if `pid` is a live process (not a zombie)."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # ours (in-process callers): reap it
        return False
    return True


def _free_port(host: str) -> int:
    return _free_ports(host, 1)[0]


def _free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct free ports on ``host``: every socket stays bound until all are
    chosen, so the kernel cannot hand the same port out twice (two ``_free_port`` calls in a
    row can, and a config with one address twice is refused)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


PORT_KINDS = ("bus", "admin", "kv", "iam", "ec2", "s3")


def _node_ports(host: str) -> dict[str, int]:
    return dict(zip(PORT_KINDS, _free_ports(host, len(PORT_KINDS)), strict=True))


def _http_json(
    url: str, token: str | None, *, method: str = "GET", body: Any = None, timeout: float = 2.0
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


# --------------------------------------------------------------------------- creating a layout


def _types(spec: Mapping[str, Any]) -> set[str]:
    return {str(c["type"]) for c in spec["components"]}


def node_configs(
    nodes: Mapping[str, Mapping[str, Any]],
    ports: Mapping[str, Mapping[str, int]],
    tls: Mapping[str, Mapping[str, str]],
    *,
    data_dirs: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    credential_key: str | None = None,
    shared_api: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The `euca-runtime serve` configuration of every node of a cloud, as plain dicts.

    `nodes` maps a node name to ``{"ip", "components"}`` (like `HA_NODES`); `ports` gives each
    node's ``{"bus", "admin", "kv", "iam", "s3"}`` ports (those its components serve); `tls`
    its ``{"ca", "cert", "key"}`` paths (as they should appear in the file). Every node is a
    voter and a peer of every other. `data_dirs` overrides the data dir (default: the node
    name, relative to the config file); `extra` is merged into every configuration (e.g.
    ``{"timing": {...}}``); `credential_key` is the path of the cloud's secret-key file, given
    to every clc and walrus node; `shared_api` maps an API to the address every node serving it
    listens on together (``SO_REUSEPORT``). `up` uses it on loopback; the lossy-link test uses it
    for testbed hosts.
    """
    voters = list(nodes)
    out: dict[str, dict[str, Any]] = {}
    for name, spec in nodes.items():
        ip = spec["ip"]
        p = ports[name]
        cfg: dict[str, Any] = {
            "node": name,
            "listen": f"{ip}:{p['bus']}",
            "admin": f"{ip}:{p['admin']}",
            "data_dir": (data_dirs or {}).get(name, name),
            "tls": dict(tls[name]),
            "peers": {
                other: f"{ospec['ip']}:{ports[other]['bus']}"
                for other, ospec in nodes.items()
                if other != name
            },
            "voters": voters,
            "components": [dict(c) for c in spec["components"]],
            "log_level": "info",
        }
        types = _types(spec)
        api = {k: f"{ip}:{p[k]}" for k, t in API_TYPES.items() if t in types and k in p}
        if api:
            cfg["api"] = api
        shared = {k: v for k, v in (shared_api or {}).items() if k in api}
        if shared:
            cfg["shared_api"] = shared
        if credential_key is not None and types & {"clc", "walrus"}:
            cfg["credential_key"] = credential_key
        cfg.update(extra or {})
        out[name] = cfg
    return out


def plan_routes(nodes: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One route per node hosting user-facing groups (``users-a`` for node-a, ...), two TCP
    targets each on their own loopback address and a free port."""
    routes: list[dict[str, Any]] = []
    ips = iter(ROUTE_TARGET_IPS)
    for name, spec in nodes.items():
        if not {c["type"] for c in spec["components"]} & USER_FACING:
            continue
        addrs = [next(ips), next(ips)]
        suffix = name.removeprefix("node-")
        routes.append(
            {
                "name": f"users-{suffix}",
                "nodes": [name],
                "targets": [f"{ip}:{_free_port(ip)}" for ip in addrs],
            }
        )
    return routes


def arbitrator_routes(routes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`plan_routes` as the ``routes`` section of an arbitrator's configuration."""
    return [
        {"name": r["name"], "nodes": list(r["nodes"]), "targets": [{"tcp": t} for t in r["targets"]]}
        | ROUTE_SETTINGS
        for r in routes
    ]


def _add_routes(doc: dict[str, Any], configs: Mapping[str, dict[str, Any]], nodes: Mapping[str, Any]) -> None:
    """Plan the user routes of an HA layout: into cloud.json (`doc`) and the arbitrators' configs."""
    routes = plan_routes(nodes)
    doc["routes"] = routes
    doc["route_targets"] = {"control": f"http://{TARGETS_CONTROL_IP}:{_free_port(TARGETS_CONTROL_IP)}"}
    for name, spec in nodes.items():
        if name in configs and any(c["type"] == "arbitrator" for c in spec["components"]):
            configs[name]["routes"] = arbitrator_routes(routes)


def _create(root: Path, ha: bool) -> Layout:
    nodes = HA_NODES if ha else SINGLE_NODES
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    pki = ensure_dev_pki(root / "pki", list(nodes), {n: [spec["ip"]] for n, spec in nodes.items()})
    token = secrets.token_urlsafe(32)
    write_private(root / TOKEN, (token + "\n").encode())
    make_credential_key(root / CREDENTIAL_KEY)
    ports = {n: _node_ports(spec["ip"]) for n, spec in nodes.items()}
    tls = {
        n: {
            "ca": str(pki[n].ca.relative_to(root)),
            "cert": str(pki[n].cert.relative_to(root)),
            "key": str(pki[n].key.relative_to(root)),
        }
        for n in nodes
    }
    served = {k for spec in nodes.values() for k, t in API_TYPES.items() if t in _types(spec)}
    shared_ports = _free_ports(SHARED_IP, len(served))
    shared_api = {k: f"{SHARED_IP}:{port}" for k, port in zip(sorted(served), shared_ports, strict=True)}
    configs = node_configs(nodes, ports, tls, credential_key=CREDENTIAL_KEY, shared_api=shared_api)
    doc: dict[str, Any] = {"version": 1, "mode": "ha" if ha else "single"}
    if ha:
        _add_routes(doc, configs, nodes)
    layout_nodes: dict[str, Any] = {}
    for name, spec in nodes.items():
        ip = spec["ip"]
        p = ports[name]
        cfg = configs[name]
        cfg_path = root / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        load_config(cfg_path)  # validate what we wrote
        data_dir = root / name
        data_dir.mkdir(mode=0o700, exist_ok=True)
        write_private(data_dir / TOKEN, (token + "\n").encode())
        layout_nodes[name] = {
            "host": ip,
            "config": cfg_path.name,
            "admin": f"http://{ip}:{p['admin']}",
            "api": {k: f"http://{v}" for k, v in cfg.get("api", {}).items()},
            "voter": True,
            "components": spec["components"],
        }
    doc.update(nodes=layout_nodes, shared_api=shared_api)
    (root / LAYOUT).write_text(json.dumps(doc, indent=2) + "\n")
    return Layout(root, doc)


def fetch_admin_credentials(layout: Layout, timeout: float = UP_TIMEOUT) -> dict[str, Any]:
    """The ``eucalyptus/admin`` access key, from the ENABLED clc (through any node's admin API)."""
    token = layout.token()
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        for info in layout.nodes.values():
            try:
                doc = _http_json(f"{info.admin}/v1/iam/admin-credentials?timeout=2", token, timeout=5.0)
            except urllib.error.HTTPError as exc:
                last = f"{info.name}: HTTP {exc.code}"
                continue
            except (OSError, ValueError) as exc:
                last = f"{info.name}: {exc}"
                continue
            if isinstance(doc, dict) and doc.get("access_key") and doc.get("secret_key"):
                return doc
        if time.monotonic() > deadline:
            raise UpError(f"the clc did not hand out the admin credentials within {timeout:g} s ({last})")
        time.sleep(0.1)


def write_eucarc(layout: Layout, credentials: Mapping[str, Any] | None = None) -> Path:
    """DIR/eucarc (0600): ``source`` it to point clients and eucactl at this cloud."""
    kv = layout.api_urls("kv")
    iam = layout.api_urls("iam")
    ec2 = layout.api_urls("ec2")
    s3 = layout.api_urls("s3")
    admin = layout.admin_urls()
    creds = credentials or {}
    lines = [
        "# euca-ha local cloud made by `euca-runtime up`; use: source eucarc",
        f"export EUCA_DIR={layout.root}",
        f"export EUCA_ADMIN_URL={admin[0]}",
        f'export EUCA_ADMIN_URLS="{" ".join(admin)}"',
        f"export EUCA_ADMIN_TOKEN_FILE={layout.token_file}",
        "# kv: the internal replicated key-value service (tests, benchmarks); any URL forwards",
        f"export KV_URL={kv[0] if kv else ''}",
        f'export KV_URLS="{" ".join(kv)}"',
        "# IAM (euare): any URL serves (it forwards to the ENABLED clc)",
        f"export EUARE_URL={iam[0] if iam else ''}",
        f'export EUARE_URLS="{" ".join(iam)}"',
        "# EC2: any URL serves (it forwards to the ENABLED clc)",
        f"export EC2_URL={ec2[0] if ec2 else ''}",
        f'export EC2_URLS="{" ".join(ec2)}"',
        "# S3 (walrus): any URL serves (it forwards to the ENABLED walrus)",
        f"export S3_URL={s3[0] if s3 else ''}",
        f'export S3_URLS="{" ".join(s3)}"',
        "# AWS clients: each API's shared address, served by every process that serves the API",
        "# (the kernel hands a connection to a live one), so one URL keeps working after a failover",
        f"export AWS_ENDPOINT_URL_S3={layout.shared_url('s3') or '$S3_URL'}",
        f"export AWS_ENDPOINT_URL_IAM={layout.shared_url('iam') or '$EUARE_URL'}",
        f"export AWS_ENDPOINT_URL_EC2={layout.shared_url('ec2') or '$EC2_URL'}",
        f"# credentials of user {creds.get('user', 'admin')} of account {creds.get('account', 'eucalyptus')}",
        f"export AWS_ACCESS_KEY_ID={creds.get('access_key', '')}",
        f"export AWS_SECRET_ACCESS_KEY={creds.get('secret_key', '')}",
        f"export AWS_DEFAULT_REGION={REGION}",
    ]
    path = layout.root / "eucarc"
    write_private(path, ("\n".join(lines) + "\n").encode())
    return path


def read_eucarc(path: Path) -> dict[str, str]:
    """The variables an eucarc sets (this module's, or the eucarc runbook's), as ``source`` would:
    quotes dropped, and a ``$NAME`` value resolved to the variable set before it."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            name, _, value = line[len("export ") :].partition("=")
            value = value.strip('"')
            env[name] = env.get(value[1:], value) if value.startswith("$") else value
    return env


# --------------------------------------------------------------------------- up / down


def _spawn_supervisor(layout: Layout, node: str) -> None:
    log = open(layout.log_file(node), "ab")  # handed to the child, closed here after
    try:
        env = dict(os.environ)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "euca_runtime.cli",
                "_supervise",
                "--dir",
                str(layout.root),
                "--node",
                node,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            cwd=str(layout.root),
            env=env,
        )
    finally:
        log.close()
    layout.supervisor_pid_file(node).write_text(f"{proc.pid}\n")


def node_running(layout: Layout, node: str) -> bool:
    return pid_alive(read_pid(layout.pid_file(node))) or pid_alive(read_pid(layout.supervisor_pid_file(node)))


def route_targets_running(layout: Layout) -> bool:
    return pid_alive(read_pid(layout.root / "targets.pid"))


def ensure_route_targets(layout: Layout, timeout: float = UP_TIMEOUT) -> None:
    """Start the route-target stand-ins (`euca_runtime.route_targets`) unless they run; wait
    until they listen, so that the arbitrator's first rounds find the routes UP."""
    if not layout.doc.get("routes") or route_targets_running(layout):
        return
    from euca_runtime import route_targets

    log = open(layout.root / route_targets.LOG_FILE, "ab")  # handed to the child, closed here after
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "euca_runtime.route_targets", "--dir", str(layout.root), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            cwd=str(layout.root),
        )
    finally:
        log.close()
    (layout.root / route_targets.PID_FILE).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = route_targets.control(layout.root, None, None, timeout=1.0)
            if all(state.values()):
                return
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            raise UpError(f"the route targets exited:\n{_tail(layout.root / route_targets.LOG_FILE)}")
        if time.monotonic() > deadline:
            raise UpError(f"the route targets did not listen within {timeout:g} s")
        time.sleep(0.05)


def stop_route_targets(layout: Layout, grace: float = DOWN_GRACE) -> None:
    path = layout.root / "targets.pid"
    pid = read_pid(path)
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _unregistered(admin: str, token: str, names: set[str]) -> set[str]:
    """Which of `names` the clc's service registry does not list yet (all of them on an error)."""
    try:
        rows = _http_json(
            f"{admin}/v1/call",
            token,
            method="POST",
            body={"type": "clc", "partition": None, "method": "list_registry", "body": {}, "timeout": 2.0},
            timeout=5.0,
        )
    except (OSError, ValueError):
        return set(names)  # the clc is not answering bus calls yet
    result = rows.get("result") if isinstance(rows, dict) and "result" in rows else rows
    listed = {str(r.get("name")) for r in (result or []) if isinstance(r, dict) and r.get("registered")}
    return names - listed


def wait_ready(
    layout: Layout, nodes: Iterable[str], timeout: float = UP_TIMEOUT, *, enabled: bool = True
) -> list[dict[str, Any]]:
    """Wait until `nodes` answer and (with `enabled`) every replicated group has an ENABLED instance."""
    token = layout.token()
    deadline = time.monotonic() + timeout
    want = layout.groups()
    pending = set(nodes)
    last = "no answer yet"
    while True:
        for node in sorted(pending):
            info = layout.nodes[node]
            with contextlib.suppress(OSError, ValueError):
                _http_json(f"{info.admin}/v1/ping", None, timeout=1.0)
                pending.discard(node)
        if not pending and not enabled:
            return []
        if not pending:
            for info in layout.nodes.values():
                try:
                    services = _http_json(f"{info.admin}/v1/services", token, timeout=2.0)["services"]
                except (OSError, ValueError, KeyError) as exc:
                    last = f"{info.name}: {exc}"
                    continue
                groups_enabled = {s["group"] for s in services if s["state"] == "ENABLED"}
                if not want <= groups_enabled:
                    last = f"waiting for ENABLED: {sorted(want - groups_enabled)}"
                    break
                # Booted (I4): and every instance has registered itself with the clc, so the
                # registry (availability zones, service map) is complete when `up` returns.
                unregistered = _unregistered(info.admin, token, {s["name"] for s in services})
                if not unregistered:
                    return services
                last = f"waiting for {sorted(unregistered)} to register with the clc"
                break
        else:
            last = f"waiting for {sorted(pending)} to answer"
            for node in pending:
                if not node_running(layout, node):
                    raise UpError(f"{node} exited during startup:\n{_tail(layout.log_file(node))}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}.log\n{_tail(layout.log_file(n))}" for n in layout.nodes)
            raise UpError(f"the cloud did not come up within {timeout:g} s ({last})\n{logs}")
        time.sleep(0.05)


def up(root: Path | str, ha: bool = False, node: str | None = None, timeout: float = UP_TIMEOUT) -> Layout:
    """Create (or reuse) a local cloud under `root`, start what is not running, wait, write eucarc.

    `ha` on a non-HA cloud converts it online (see the module doc)."""
    root = Path(root).resolve()
    if (root / LAYOUT).exists():
        layout = Layout.load(root)
        if ha and layout.mode != "ha":
            if node is not None:
                raise UpError("--node cannot be combined with turning a non-HA cloud into an HA one")
            return convert_to_ha(layout, timeout)
    else:
        layout = _create(root, ha)
    names = [node] if node else list(layout.nodes)
    for n in names:
        if n not in layout.nodes:
            raise UpError(f"no node {n!r} in {root} (nodes: {', '.join(layout.nodes)})")
    ensure_route_targets(layout, timeout)
    for n in names:
        if not node_running(layout, n):
            _spawn_supervisor(layout, n)
    # A whole cloud waits for every group to be ENABLED; restarting one node waits for it to
    # answer (its groups may rightly have no primary, e.g. before a force-promote).
    wait_ready(layout, names, timeout, enabled=node is None)
    if node is not None and (layout.root / "eucarc").exists():
        return layout  # one node restarted: the cloud's eucarc stays as it is
    creds = fetch_admin_credentials(layout, timeout) if node is None and layout.api_urls("iam") else None
    write_eucarc(layout, creds)
    return layout


def _node_config(
    root: Path, name: str, ip: str, ports: Mapping[str, int], peers: Mapping[str, str], voters: list[str]
) -> dict[str, Any]:
    pki = ensure_dev_pki(root / "pki", [name], {name: [ip]})[name]
    return {
        "node": name,
        "listen": f"{ip}:{ports['bus']}",
        "admin": f"{ip}:{ports['admin']}",
        "data_dir": name,
        "tls": {
            "ca": str(pki.ca.relative_to(root)),
            "cert": str(pki.cert.relative_to(root)),
            "key": str(pki.key.relative_to(root)),
        },
        "peers": dict(peers),
        "voters": voters,
    }


def convert_to_ha(layout: Layout, timeout: float = UP_TIMEOUT) -> Layout:
    """Turn a running non-HA local cloud into an HA one without restarting node-a (I3)."""
    if "node-a" not in layout.nodes or set(layout.nodes) - set(HA_NODES):
        raise UpError(f"{layout.root}: not a cloud made by `euca-runtime up` (nodes {sorted(layout.nodes)})")
    if not node_running(layout, "node-a"):
        _spawn_supervisor(layout, "node-a")
    wait_ready(layout, ["node-a"], timeout)
    new = [n for n in HA_NODES if n not in layout.nodes]
    layout = add_ha_nodes(layout)
    ensure_route_targets(layout, timeout)
    for name in new:
        if not node_running(layout, name):
            _spawn_supervisor(layout, name)
    wait_ready(layout, new, timeout, enabled=False)
    try:
        _http_json(
            f"{layout.nodes['node-a'].admin}/v1/reload", layout.token(), method="POST", body={}, timeout=10.0
        )
    except (OSError, ValueError) as exc:
        raise UpError(f"node-a did not reload its configuration: {exc}") from None
    wait_ha(layout, timeout)
    write_eucarc(layout)
    return layout


def add_ha_nodes(layout: Layout) -> Layout:
    """Lay out node-b and node-c (``join: true``) next to node-a and rewrite node-a's config
    (new peers, voters); cloud.json says ``ha`` afterwards. Starts nothing."""
    root = layout.root
    token = layout.token()
    a_path = layout.nodes["node-a"].config
    a_cfg = yaml.safe_load(a_path.read_text())
    a_bus = a_cfg["listen"]
    new = {n: spec for n, spec in HA_NODES.items() if n not in layout.nodes}
    voters = list(HA_NODES)
    ports = {n: _node_ports(spec["ip"]) for n, spec in new.items()}
    bus = {"node-a": a_bus} | {n: f"{spec['ip']}:{ports[n]['bus']}" for n, spec in new.items()}
    doc = dict(layout.doc)
    nodes_doc = dict(doc["nodes"])
    new_configs: dict[str, dict[str, Any]] = {name: {} for name in new}
    _add_routes(doc, new_configs, HA_NODES)
    for name, spec in new.items():
        cfg = _node_config(
            root, name, spec["ip"], ports[name], {o: a for o, a in bus.items() if o != name}, voters
        )
        cfg["join"] = True  # added to a running cloud: learn each group's voters from the voters
        cfg["components"] = spec["components"]
        cfg["log_level"] = "info"
        types = _types(spec)
        api = {k: f"{spec['ip']}:{ports[name][k]}" for k, t in API_TYPES.items() if t in types}
        if api:
            cfg["api"] = api
        shared = {k: v for k, v in (layout.doc.get("shared_api") or {}).items() if k in api}
        if shared:
            cfg["shared_api"] = shared
        if types & {"clc", "walrus"}:
            cfg["credential_key"] = CREDENTIAL_KEY
        cfg.update(new_configs[name])  # an arbitrator's routes
        cfg_path = root / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        load_config(cfg_path)
        data_dir = root / name
        data_dir.mkdir(mode=0o700, exist_ok=True)
        write_private(data_dir / TOKEN, (token + "\n").encode())
        nodes_doc[name] = {
            "host": spec["ip"],
            "config": cfg_path.name,
            "admin": f"http://{spec['ip']}:{ports[name]['admin']}",
            "api": {k: f"http://{v}" for k, v in api.items()},
            "voter": True,
            "components": spec["components"],
        }
    # node-a: the new peers and voters, written atomically, then reloaded (never restarted).
    a_cfg["peers"] = {**(a_cfg.get("peers") or {}), **{n: bus[n] for n in new}}
    a_cfg["voters"] = voters
    tmp = a_path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(a_cfg, sort_keys=False))
    load_config(tmp)
    os.replace(tmp, a_path)
    nodes_doc["node-a"] = {**nodes_doc["node-a"], "voter": True}
    doc.update(mode="ha", nodes=nodes_doc)
    (root / LAYOUT).write_text(json.dumps(doc, indent=2) + "\n")
    return Layout(root, doc)


def wait_ha(layout: Layout, timeout: float = UP_TIMEOUT) -> None:
    """Wait until every group's voters are every node and node-b's instances are in sync."""
    token = layout.token()
    want = set(layout.nodes)
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            doc = _http_json(f"{layout.nodes['node-a'].admin}/v1/voters", token, timeout=2.0)
            services = _http_json(f"{layout.nodes['node-a'].admin}/v1/services", token, timeout=2.0)[
                "services"
            ]
        except (OSError, ValueError, KeyError) as exc:
            last = str(exc)
            time.sleep(0.05)
            continue
        groups = {g["group"]: g for g in doc["groups"]}
        moved = all(
            g["config"] is not None and not g["config"]["joint"] and set(g["config"]["sets"][0]) == want
            for g in groups.values()
        )
        backups = [s for s in services if s["node"] == "node-b" and s["group"] in layout.groups()]
        synced = len(backups) == len(layout.groups()) and all(
            s["state"] == "DISABLED" and s["in_sync"] for s in backups
        )
        joined = not any(v["joining"] for v in doc["voters"])
        if moved and synced and joined and groups.keys() >= layout.groups():
            return
        states = ", ".join(f"{b['name']} {b['state']}" for b in backups)
        last = f"voters moved: {moved}, node-b in sync: {synced}, join mode over: {joined} ({states})"
        time.sleep(0.05)
    logs = "\n".join(f"--- {n}.log\n{_tail(layout.log_file(n))}" for n in layout.nodes)
    raise UpError(f"the cloud did not become HA within {timeout:g} s ({last})\n{logs}")


def _signal(pid: int | None, sig: int) -> None:
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)  # type: ignore[arg-type]


def _killpg(pgid: int | None, sig: int) -> None:
    if pgid is not None and pgid > 1:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def _group_alive(pgid: int | None) -> bool:
    if pgid is None or pgid <= 1:
        return False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


def down(root: Path | str, node: str | None = None, grace: float = DOWN_GRACE) -> list[str]:
    """Stop the local cloud's processes (or one node's); returns the nodes stopped."""
    layout = Layout.load(root)
    names = [node] if node else list(layout.nodes)
    targets: dict[str, tuple[int | None, int | None]] = {}
    for n in names:
        if n not in layout.nodes:
            raise UpError(f"no node {n!r} in {layout.root}")
        targets[n] = (read_pid(layout.supervisor_pid_file(n)), read_pid(layout.pid_file(n)))
    for sup, child in targets.values():
        _signal(sup, signal.SIGTERM)  # first: so it does not take the exit for a crash
        _signal(child, signal.SIGTERM)
    deadline = time.monotonic() + grace

    def alive(sup: int | None, child: int | None) -> bool:
        return pid_alive(sup) or pid_alive(child) or _group_alive(sup)

    while time.monotonic() < deadline and any(alive(*t) for t in targets.values()):
        time.sleep(0.05)
    for sup, child in targets.values():
        if alive(sup, child):
            _signal(child, signal.SIGKILL)
            _signal(sup, signal.SIGKILL)
            _killpg(sup, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(alive(*t) for t in targets.values()):
        time.sleep(0.05)
    left = [n for n, t in targets.items() if alive(*t)]
    if node is None:
        stop_route_targets(layout)
    if left:
        raise UpError(f"processes of {', '.join(left)} are still running")
    if node is None:  # the whole cloud: its instances (NC placeholder processes) go too
        from euca_runtime.cluster.driver import kill_placeholders

        for n in layout.nodes:
            for state_dir in sorted((layout.data_dir(n) / "nc").glob("*")):
                kill_placeholders(state_dir)
    for n in names:
        for path in (layout.pid_file(n), layout.supervisor_pid_file(n)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return names


def destroy(root: Path | str) -> None:
    """`down` then remove DIR (tests)."""
    root = Path(root)
    if (root / LAYOUT).exists():
        down(root)
    shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- supervisor


def _log(node: str, msg: str, **extra: Any) -> None:
    doc = {"ts": round(time.time(), 6), "level": "info", "logger": "euca_runtime.supervisor", "msg": msg}
    doc.update(node=node, **extra)
    sys.stderr.write(json.dumps(doc) + "\n")
    sys.stderr.flush()


def send_death_certificates(layout: Layout, node: str, pid: int) -> int:
    """Tell every voter that `node`'s process `pid` died holding the leases in its held.json."""
    try:
        held = json.loads((layout.data_dir(node) / "held.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    if held.get("pid") != pid:
        return 0
    with contextlib.suppress(UpError):
        layout = Layout.load(layout.root)  # the cloud may have grown since we started (up --ha)
    leases = held.get("leases") or []
    if not leases:
        return 0
    token = layout.token()
    voters = [n for n in layout.nodes.values() if n.voter and n.name != node]

    def certify(voter: NodeInfo, lease: Mapping[str, Any]) -> bool:
        body = {**lease, "issuer": f"supervisor@{node}"}
        try:
            res = _http_json(
                f"{voter.admin}/v1/death-certificate", token, method="POST", body=body, timeout=0.5
            )
            return bool(res.get("released"))
        except (OSError, ValueError, AttributeError):
            return False

    jobs = [(v, lease) for v in voters for lease in leases]
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        released = sum(pool.map(lambda j: certify(*j), jobs))
    _log(node, "death certificates sent", pid=pid, leases=leases, released=released)
    return released


def supervise(root: Path | str, node: str) -> int:
    """Run `node`'s runtime process and certify its death if it dies unasked."""
    layout = Layout.load(root)
    stopping = False
    child = subprocess.Popen(
        [sys.executable, "-m", "euca_runtime.cli", "serve", "--config", str(layout.nodes[node].config)],
        stdin=subprocess.DEVNULL,
        cwd=str(layout.root),
    )
    layout.pid_file(node).write_text(f"{child.pid}\n")
    layout.supervisor_pid_file(node).write_text(f"{os.getpid()}\n")

    def on_term(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while True:
        try:
            rc = child.wait()
            break
        except InterruptedError:
            continue
    if not stopping and rc != 0:
        _log(node, "runtime process died", pid=child.pid, returncode=rc)
        send_death_certificates(layout, node, child.pid)
    return 0
