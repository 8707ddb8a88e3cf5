"""``euca-runtime up`` / ``down``: a whole local cloud on loopback, without root or machines.

Layout under DIR (mode 0700)::

    cloud.json            the layout: nodes, their addresses, configs, URLs (read by eucactl)
    admin.token           the admin token (0600); each node's data dir holds a copy
    eucarc                shell ``export`` lines (0600): EUARE_URL(S), AWS_ACCESS_KEY_ID,
                          AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, KV_URL(S), EUCA_ADMIN_URL(S), ...
    pki/                  the development cluster CA and one certificate per node, and
                          credentials.key (0600): the cloud's key for access-key secrets at rest
    <node>.yaml           the node's `euca-runtime serve` configuration
    <node>/               its data dir: core database, one database per instance, held.json
    <node>.log            its JSON log lines (and its supervisor's)
    <node>.pid            the pid of its runtime process (what ``kill -9`` targets)
    <node>.supervisor.pid the pid of its local supervisor

``up`` (no ``--ha``): one process ``node-a`` hosting every component, the only voter.
``up --ha``: ``node-a`` and ``node-b`` each host the ``clc`` and ``kv`` groups (node-a is the
preferred primary), ``node-c`` hosts an arbitrator; voters are node-a, node-b and node-c. Each
process has its own loopback address (127.0.0.11, .12, .13), its own free ports and its own
databases. Every clc host serves the IAM API (``api.iam``). ``up`` returns once every
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
DOWN_GRACE = 8.0

HA_NODES: dict[str, dict[str, Any]] = {
    "node-a": {
        "ip": "127.0.0.11",
        "components": [{"type": "clc", "role": "primary"}, {"type": "kv", "role": "primary"}],
    },
    "node-b": {
        "ip": "127.0.0.12",
        "components": [{"type": "clc", "role": "backup"}, {"type": "kv", "role": "backup"}],
    },
    "node-c": {"ip": "127.0.0.13", "components": [{"type": "arbitrator"}]},
}
SINGLE_NODES: dict[str, dict[str, Any]] = {
    "node-a": {"ip": "127.0.0.11", "components": [{"type": "clc"}, {"type": "kv"}]},
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

    def api_urls(self, api: str) -> list[str]:
        return [n.api[api] for n in self.nodes.values() if api in n.api]

    def groups(self) -> set[str]:
        """The replicated groups this layout hosts (what `up` waits for)."""
        return {c["type"] for n in self.nodes.values() for c in n.components if c["type"] in ("clc", "kv")}

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
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


def _create(root: Path, ha: bool) -> Layout:
    nodes = HA_NODES if ha else SINGLE_NODES
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    pki = ensure_dev_pki(root / "pki", list(nodes), {n: [spec["ip"]] for n, spec in nodes.items()})
    token = secrets.token_urlsafe(32)
    write_private(root / TOKEN, (token + "\n").encode())
    make_credential_key(root / CREDENTIAL_KEY)
    ports = {
        n: {
            "bus": _free_port(spec["ip"]),
            "admin": _free_port(spec["ip"]),
            "kv": _free_port(spec["ip"]),
            "iam": _free_port(spec["ip"]),
        }
        for n, spec in nodes.items()
    }
    voters = list(nodes)
    layout_nodes: dict[str, Any] = {}
    for name, spec in nodes.items():
        ip = spec["ip"]
        p = ports[name]
        has_kv = any(c["type"] == "kv" for c in spec["components"])
        has_clc = any(c["type"] == "clc" for c in spec["components"])
        cfg: dict[str, Any] = {
            "node": name,
            "listen": f"{ip}:{p['bus']}",
            "admin": f"{ip}:{p['admin']}",
            "data_dir": name,
            "tls": {
                "ca": str(pki[name].ca.relative_to(root)),
                "cert": str(pki[name].cert.relative_to(root)),
                "key": str(pki[name].key.relative_to(root)),
            },
            "peers": {
                other: f"{ospec['ip']}:{ports[other]['bus']}"
                for other, ospec in nodes.items()
                if other != name
            },
            "voters": voters,
            "components": spec["components"],
            "log_level": "info",
        }
        api: dict[str, str] = {}
        if has_kv:
            api["kv"] = f"{ip}:{p['kv']}"
        if has_clc:
            api["iam"] = f"{ip}:{p['iam']}"
            cfg["credential_key"] = CREDENTIAL_KEY
        if api:
            cfg["api"] = api
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
            "api": {k: f"http://{v}" for k, v in api.items()},
            "voter": name in voters,
            "components": spec["components"],
        }
    doc = {"version": 1, "mode": "ha" if ha else "single", "nodes": layout_nodes}
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
        "export AWS_ENDPOINT_URL_IAM=$EUARE_URL",
        f"# credentials of user {creds.get('user', 'admin')} of account {creds.get('account', 'eucalyptus')}",
        f"export AWS_ACCESS_KEY_ID={creds.get('access_key', '')}",
        f"export AWS_SECRET_ACCESS_KEY={creds.get('secret_key', '')}",
        f"export AWS_DEFAULT_REGION={REGION}",
        "# EC2_URL(S) and S3_URL(S) are added here when the EC2 (clc) and S3 (walrus) APIs land.",
    ]
    path = layout.root / "eucarc"
    write_private(path, ("\n".join(lines) + "\n").encode())
    return path


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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


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
                if want <= groups_enabled:
                    return services
                last = f"waiting for ENABLED: {sorted(want - groups_enabled)}"
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
    """Create (or reuse) a local cloud under `root`, start what is not running, wait, write eucarc."""
    root = Path(root).resolve()
    if (root / LAYOUT).exists():
        layout = Layout.load(root)
        if ha and layout.mode != "ha":
            raise UpError(f"{root} holds a non-HA cloud; `down` it and use another --dir for --ha")
    else:
        layout = _create(root, ha)
    names = [node] if node else list(layout.nodes)
    for n in names:
        if n not in layout.nodes:
            raise UpError(f"no node {n!r} in {root} (nodes: {', '.join(layout.nodes)})")
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
    if left:
        raise UpError(f"processes of {', '.join(left)} are still running")
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
