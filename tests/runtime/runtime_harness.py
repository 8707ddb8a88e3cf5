"""Helpers for real runtime processes on 127.0.0.x (fixtures live in conftest.py).

Every wait polls a condition with a deadline (`wait_until`); nothing sleeps to synchronise
and nothing asserts on elapsed time. Every cloud a test starts is stopped in the fixture's
finalizer, even when the test fails, and the finalizer checks that no process is left.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from euca_runtime import local
from euca_runtime.cluster.driver import proc_start_ticks

PY = sys.executable

KEY_REVOCATION_BOUND = 5.0
"""docs/api.md, "Lookups and the revocation bound": a deleted or deactivated access key stops
working on every process within 5 s (the key cache's TTL)."""
REVOCATION_DEADLINE = KEY_REVOCATION_BOUND + 3.0
"""How long a test waits for a revoked key to be refused: the bound plus slack for the refused
request's own round trip on a loaded machine. Not refused by then: the documented bound is broken."""


def run_cli(*args: str, timeout: float = 90.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `euca-runtime ...` in a subprocess (so its children are not ours)."""
    env = {**os.environ, "EUCA_RUNTIME_FAULTS": "1"}
    proc = subprocess.run(
        [PY, "-m", "euca_runtime.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"euca-runtime {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def run_ctl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "euca_runtime.ctl", *args], capture_output=True, text=True, timeout=timeout
    )


def wait_until(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except (OSError, ValueError, KeyError, AssertionError) as exc:
            last_exc = exc
        time.sleep(0.02)
    pytest.fail(
        f"timed out after {timeout} s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else "")
    )


def http(
    method: str, url: str, body: bytes | None = None, token: str | None = None, timeout: float = 15.0
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Cloud:
    """A running local cloud and helpers to poke it."""

    root: Path
    layout: local.Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = local.Layout.load(self.root)

    @property
    def token(self) -> str:
        return self.layout.token()

    def kv_url(self, node: str) -> str:
        return self.layout.nodes[node].api["kv"]

    def admin_url(self, node: str) -> str:
        return self.layout.nodes[node].admin

    def pid(self, node: str) -> int:
        pid = local.read_pid(self.layout.pid_file(node))
        assert pid is not None
        return pid

    def services(self, via: str | None = None) -> list[dict[str, Any]]:
        """describe-services through one node's admin API (the first that answers)."""
        nodes = [via] if via else list(self.layout.nodes)
        for node in nodes:
            with contextlib.suppress(OSError):
                status, body = http("GET", f"{self.admin_url(node)}/v1/services", token=self.token, timeout=5)
                if status == 200:
                    return json.loads(body)["services"]
        raise OSError("no admin API answered")

    def service(self, name: str, via: str | None = None) -> dict[str, Any]:
        return next(s for s in self.services(via) if s["name"] == name)

    def enabled(self, group: str, via: str | None = None) -> str | None:
        found = [s["name"] for s in self.services(via) if s["group"] == group and s["state"] == "ENABLED"]
        assert len(found) <= 1, f"two ENABLED instances of {group}: {found}"
        return found[0] if found else None

    def put(self, node: str, key: str, value: bytes, timeout: float = 10.0) -> dict[str, Any]:
        status, body = http(
            "PUT", f"{self.kv_url(node)}/kv/{key}?timeout={timeout}", value, timeout=timeout + 5
        )
        assert status == 200, f"PUT {key} via {node}: {status} {body!r}"
        return json.loads(body)

    def get(self, node: str, key: str, timeout: float = 10.0) -> bytes | None:
        status, body = http("GET", f"{self.kv_url(node)}/kv/{key}?timeout={timeout}", timeout=timeout + 5)
        if status == 404:
            return None
        assert status == 200, f"GET {key} via {node}: {status} {body!r}"
        return body

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_ctl("--dir", str(self.root), *args)

    def bus_call(
        self, via: str, type_: str, method: str, body: dict[str, Any], partition: str | None = None
    ) -> tuple[int, Any]:
        """One bus call through `via`'s admin API (``POST /v1/call``), as a front end makes it:
        held and retried across a failover; (HTTP status, ``{result}`` or ``{error, message}``)."""
        doc = {"type": type_, "partition": partition, "method": method, "body": body, "timeout": 20}
        status, raw = http("POST", f"{self.admin_url(via)}/v1/call", json.dumps(doc).encode(), self.token, 30)
        return status, json.loads(raw)

    def all_pids(self) -> list[int]:
        pids = []
        for node in self.layout.nodes:
            for path in (self.layout.pid_file(node), self.layout.supervisor_pid_file(node)):
                pid = local.read_pid(path)
                if pid is not None:
                    pids.append(pid)
        return pids


def placeholders(root: Path) -> dict[str, int]:
    """instance id -> pid of every live placeholder process (instance) the cloud's NCs recorded."""
    out = {}
    for path in root.glob("*/nc/*/instances.json"):
        for rec in json.loads(path.read_text())["instances"]:
            pid = rec.get("pid")
            if pid and rec.get("state") == "running" and proc_start_ticks(pid) == rec.get("start_ticks"):
                out[rec["instance_id"]] = pid
    return out


def cc_service_pid(cloud: Cloud, node: str, cluster: str = "cluster01") -> int | None:
    """The pid of `node`'s live CC service process of `cluster` (None: none running)."""
    path = cloud.root / node / "cc" / f"{node}.cc.{cluster}" / "service.json"
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None
    return pid if proc_start_ticks(pid) is not None else None


def processes_under(root: Path) -> list[int]:
    """Pids of live processes whose command line mentions `root` (leftover check)."""
    found = []
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes() and local.pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def start_cloud(root: Path, ha: bool) -> Cloud:
    args = ["up", "--dir", str(root)] + (["--ha"] if ha else [])
    run_cli(*args)
    return Cloud(root)


def stop_cloud(root: Path) -> None:
    if (root / local.LAYOUT).exists():
        proc = run_cli("down", "--dir", str(root), check=False)
        if proc.returncode != 0:
            sys.stderr.write(f"down failed: {proc.stderr}\n")
    for pid in processes_under(root):  # belt and braces: never leave a process behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
    # A SIGKILLed process can take a moment to go (in a syscall such as a big fsync, or a zombie
    # until it is reaped): wait for that, with a deadline, before calling anything left behind.
    deadline = time.monotonic() + 15.0
    left = processes_under(root)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = processes_under(root)
    assert not left, f"processes left behind: {left}"


class Writer:
    """Background clients writing unique keys; records what was acknowledged and when."""

    def __init__(
        self, cloud: Cloud, nodes: list[str], prefix: str, per_thread_rate: float | None = None
    ) -> None:
        self.cloud = cloud
        self.nodes = nodes
        self.prefix = prefix
        self.rate = per_thread_rate
        self.acked: list[tuple[str, float, float, dict[str, Any]]] = []  # key, sent, acked, response
        self.errors: list[tuple[str, float, str]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n, i), daemon=True) for i, n in enumerate(nodes)
        ]
        self._lock = threading.Lock()

    def _run(self, node: str, idx: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            key = f"{self.prefix}-{idx}-{i}"
            sent = time.monotonic()
            try:
                status, body = http(
                    "PUT", f"{self.cloud.kv_url(node)}/kv/{key}?timeout=10", key.encode(), timeout=15
                )
            except OSError as exc:
                status, body = 0, str(exc).encode()
            with self._lock:
                if status == 200:
                    self.acked.append((key, sent, time.monotonic(), json.loads(body)))
                else:
                    self.errors.append((key, sent, f"{status} {body[:200]!r}"))
            if self.rate:
                time.sleep(1.0 / self.rate)  # pacing the load, not synchronisation

    def __enter__(self) -> Writer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def missing(self, via: str) -> list[str]:
        """Acknowledged keys that cannot be read back (with their value) through `via`."""
        lost = []
        for key, _, _, _ in list(self.acked):
            if self.cloud.get(via, key) != key.encode():
                lost.append(key)
        return lost


@pytest.fixture
def ha_cloud(tmp_path: Path) -> Iterator[Cloud]:
    """A fresh `up --ha` cloud, stopped afterwards whatever happens (import the fixture into a
    conftest or test module to use it)."""
    root = tmp_path / "cloud"
    try:
        yield start_cloud(root, ha=True)
    finally:
        stop_cloud(root)


@pytest.fixture
def single_cloud(tmp_path: Path) -> Iterator[Cloud]:
    """A fresh one-process `up` cloud, stopped afterwards whatever happens."""
    root = tmp_path / "cloud"
    try:
        yield start_cloud(root, ha=False)
    finally:
        stop_cloud(root)


@pytest.fixture(scope="module")
def shared_ha_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """One `up --ha` cloud for a whole test module, for tests that inject no fault and leave
    node-a the primary of every group (each uses its own bucket and user names); stopped after
    the module's last test whatever happens."""
    root = tmp_path_factory.mktemp("shared-ha") / "cloud"
    try:
        yield start_cloud(root, ha=True)
    finally:
        stop_cloud(root)


@dataclass
class ApiTarget:
    """A cloud and the node whose API endpoints a test's clients use."""

    cloud: Cloud
    node: str
    ha: bool


@pytest.fixture(params=["single", "ha"])
def api_target(request: pytest.FixtureRequest) -> ApiTarget:
    """The single-process cloud (a fresh one) through node-a, and the module's shared HA cloud
    through node-b, the backup: every request there is forwarded over the bus to the primary."""
    if request.param == "single":
        return ApiTarget(request.getfixturevalue("single_cloud"), "node-a", ha=False)
    cloud: Cloud = request.getfixturevalue("shared_ha_cloud")
    for group in ("clc", "walrus"):
        assert cloud.enabled(group, via="node-b") == f"node-a.{group}", "the shared cloud failed over"
    return ApiTarget(cloud, "node-b", ha=True)


def eucarc(cloud: Cloud) -> dict[str, str]:
    """The variables the cloud's eucarc sets (`local.read_eucarc`)."""
    return local.read_eucarc(cloud.root / "eucarc")


class _SkewedClock:
    """Sign as a client whose clock is `skew` off (mixed into a botocore SigV4 signer)."""

    skew: dt.timedelta

    def add_auth(self, request: AWSRequest) -> None:
        when = dt.datetime.now(dt.UTC) + self.skew
        request.context["timestamp"] = when.strftime(botocore.auth.SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        sig = self.signature(self.string_to_sign(request, self.canonical_request(request)), request)
        self._inject_signature_to_request(request, sig)


class SkewedSigV4(_SkewedClock, botocore.auth.SigV4Auth):
    """A Query API (IAM, EC2) SigV4 signer whose clock is `skew` off."""

    def __init__(self, creds: Credentials, skew: dt.timedelta, service: str = "iam") -> None:
        super().__init__(creds, service, local.REGION)
        self.skew = skew


class SkewedS3SigV4(_SkewedClock, botocore.auth.S3SigV4Auth):
    """An S3 SigV4 signer whose clock is `skew` off."""

    def __init__(self, creds: Credentials, skew: dt.timedelta) -> None:
        super().__init__(creds, "s3", local.REGION)
        self.skew = skew
