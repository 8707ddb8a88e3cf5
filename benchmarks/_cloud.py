"""Shared helpers of the fabric benchmarks: a local cloud (`euca-runtime up/down`), its topology,
kv HTTP clients and summary statistics.

Every cloud is started in a fresh temporary directory and stopped (``euca-runtime down``, then
SIGKILL of anything still running whose command line names the directory) on the way out,
also when the benchmark fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from euca_runtime import local

PY = sys.executable


def cli(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`euca-runtime ARGS` in a subprocess (its children are not ours)."""
    proc = subprocess.run(
        [PY, "-m", "euca_runtime.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"euca-runtime {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def ctl(root: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`eucactl --dir ROOT ARGS` in a subprocess."""
    return subprocess.run(
        [PY, "-m", "euca_runtime.ctl", "--dir", str(root), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _processes_under(root: Path) -> list[int]:
    found = []
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes() and local.pid_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@dataclass
class Cloud:
    root: Path
    ha: bool
    layout: local.Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = local.Layout.load(self.root)

    @property
    def token(self) -> str:
        return self.layout.token()

    def kv_url(self, node: str) -> str:
        return self.layout.nodes[node].api["kv"]

    def pid(self, node: str) -> int:
        pid = local.read_pid(self.layout.pid_file(node))
        if pid is None:
            raise RuntimeError(f"{node} has no pid file")
        return pid

    def services(self, via: str | None = None) -> list[dict[str, Any]]:
        """describe-services through `via`'s admin API first, then any other that answers."""
        last: Exception | None = None
        nodes = sorted(self.layout.nodes.values(), key=lambda n: n.name != via)
        for node in nodes:
            req = urllib.request.Request(f"{node.admin}/v1/services")
            req.add_header("Authorization", f"Bearer {self.token}")
            try:
                with urllib.request.urlopen(req, timeout=3) as resp:
                    return list(json.loads(resp.read())["services"])
            except (OSError, ValueError) as exc:
                last = exc
        raise RuntimeError(f"no admin API answered: {last}")

    def enabled(self, group: str, via: str | None = None) -> dict[str, Any] | None:
        found = [s for s in self.services(via) if s["group"] == group and s["state"] == "ENABLED"]
        return found[0] if len(found) == 1 else None

    def wait(self, cond: Any, timeout: float, what: str) -> Any:
        """Poll `cond()` until it returns something truthy (RuntimeError after `timeout`)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = cond()
                if value:
                    return value
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what} (last error: {last})")

    def wait_ha(self, groups: Sequence[str] = ("kv",), timeout: float = 60.0, via: str | None = None) -> None:
        """Every group has an ENABLED primary and (HA) an in-sync DISABLED backup."""

        def ok() -> bool:
            svcs = self.services(via)
            for g in groups:
                mine = [s for s in svcs if s["group"] == g]
                if sum(s["state"] == "ENABLED" for s in mine) != 1:
                    return False
                if self.ha and not any(s["state"] == "DISABLED" and s.get("in_sync") for s in mine):
                    return False
            return True

        self.wait(ok, timeout, f"{list(groups)} ENABLED with an in-sync backup")

    def primary_node(self, group: str = "kv", via: str | None = None) -> str:
        svc = self.wait(lambda: self.enabled(group, via), 30.0, f"an ENABLED {group}")
        return str(svc["node"])

    def switchover(self, group: str, to_node: str) -> None:
        """`eucactl switchover GROUP --to NODE.GROUP`, then wait until it is ENABLED there."""
        proc = ctl(self.root, "switchover", group, "--to", self.instance(group, to_node))
        if proc.returncode != 0:
            raise RuntimeError(f"switchover {group} to {to_node} failed: {proc.stderr or proc.stdout}")
        self.wait(lambda: self.primary_node(group) == to_node, 20.0, f"{group} ENABLED on {to_node}")

    def other_node(self, node: str, group: str = "kv") -> str:
        names = [s["node"] for s in self.services() if s["group"] == group and s["node"] != node]
        if not names:
            raise RuntimeError(f"no other instance of {group}")
        return str(names[0])

    def instance(self, group: str, node: str) -> str:
        return next(s["name"] for s in self.services() if s["group"] == group and s["node"] == node)


@contextlib.contextmanager
def cloud(ha: bool) -> Iterator[Cloud]:
    """A fresh local cloud in a temporary directory, always stopped afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="euca-bench-"))
    root = tmp / "cloud"
    try:
        cli("up", "--dir", str(root), *(["--ha"] if ha else []))
        c = Cloud(root, ha)
        c.wait_ha()
        yield c
    finally:
        stop(root)
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


def stop(root: Path) -> None:
    for pid in _processes_under(root):  # a SIGSTOPped process must run again to exit
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    if (root / local.LAYOUT).exists():
        with contextlib.suppress(subprocess.TimeoutExpired):
            cli("down", "--dir", str(root), check=False, timeout=60)
    for pid in _processes_under(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- kv clients


def http_req(method: str, url: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def load(
    url: str,
    clients: int,
    seconds: float,
    *,
    value: bytes = b"x" * 100,
    prefix: str = "k",
    timeout: float = 10.0,
) -> dict[str, Any]:
    """`clients` keep-alive connections PUTting unique keys for `seconds`: latencies and rate."""
    lat: list[float] = []
    errors: list[str] = []
    stop_at = time.monotonic() + seconds

    async def one(idx: int, session: aiohttp.ClientSession) -> None:
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            t0 = time.monotonic()
            try:
                async with session.put(f"{url}/kv/{prefix}-{idx}-{i}?timeout={timeout}", data=value) as r:
                    await r.read()
                    if r.status == 200:
                        lat.append(time.monotonic() - t0)
                    else:
                        errors.append(str(r.status))
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(type(exc).__name__)

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout + 5)) as s:
        t0 = time.monotonic()
        await asyncio.gather(*(one(i, s) for i in range(clients)))
        elapsed = time.monotonic() - t0
    return {
        "clients": clients,
        "ops": len(lat),
        "errors": len(errors),
        "rate": len(lat) / elapsed,
        "lat": lat,
    }


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`; nan when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def summary(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """n, median, p99, min, max (and the sample) of `values`."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0}
    return {
        "n": len(vals),
        "p50": round(statistics.median(vals), digits),
        "p99": round(pct(vals, 99), digits),
        "min": round(min(vals), digits),
        "max": round(max(vals), digits),
    }


class Writer:
    """Background threads PUTting unique keys over keep-alive HTTP; records every outcome.

    `acked` holds (sent, acked, epoch, node-url) per acknowledged write, `errors` (sent, when,
    what) per failed one. Requests carry a `timeout` deadline, so across a failover they are
    held and retried by the runtime rather than failed.
    """

    def __init__(self, urls: Sequence[str], prefix: str, timeout: float = 10.0) -> None:
        self.urls = list(urls)
        self.prefix = prefix
        self.timeout = timeout
        self.acked: list[tuple[float, float, int, str]] = []
        self.errors: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(u, i), daemon=True) for i, u in enumerate(urls)
        ]

    def _run(self, url: str, idx: int) -> None:
        parsed = urllib.parse.urlsplit(url)
        conn: http.client.HTTPConnection | None = None
        i = 0
        while not self._stop.is_set():
            i += 1
            path = f"{parsed.path}/kv/{self.prefix}-{idx}-{i}?timeout={self.timeout}"
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=self.timeout + 5)
                conn.request("PUT", path, body=b"v" * 100)
                resp = conn.getresponse()
                body = resp.read()
                now = time.monotonic()
                with self._lock:
                    if resp.status == 200:
                        self.acked.append((sent, now, int(json.loads(body)["epoch"]), url))
                    else:
                        self.errors.append((sent, now, f"{resp.status} {body[:200]!r}"))
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.errors.append((sent, time.monotonic(), f"{type(exc).__name__}: {exc}"))
                if conn is not None:
                    conn.close()
                conn = None
                self._stop.wait(0.01)  # connection refused: do not spin
        if conn is not None:
            conn.close()

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

    def snapshot(self) -> tuple[list[tuple[float, float, int, str]], list[tuple[float, float, str]]]:
        with self._lock:
            return list(self.acked), list(self.errors)

    def wait_acks(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.snapshot()[0])
        while len(self.snapshot()[0]) < start + n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"writes not flowing: fewer than {n} acks in {timeout} s")
            time.sleep(0.01)

    def first_ack_after(self, t: float, min_epoch: int, timeout: float = 30.0) -> float:
        """Time of the first write acknowledged after `t` with an epoch of at least `min_epoch`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [a for _, a, e, _ in self.snapshot()[0] if a > t and e >= min_epoch]
            if hits:
                return min(hits)
            time.sleep(0.005)
        acked, errors = self.snapshot()
        late = [e for _, a, e, _ in acked if a > t]
        raise RuntimeError(
            f"no write acknowledged under epoch >= {min_epoch} within {timeout} s: {len(late)} acked after "
            f"t under epochs {sorted(set(late))[:5]}, {len(errors)} errors (last: {errors[-1:]})"
        )
