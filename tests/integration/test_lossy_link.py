"""DESIGN.md section 9: the default timing holds on a slow, lossy link (50 ms delay, 1% loss
on every host's egress) without a false failover, and a real failure on that link still fails
over. Three testbed hosts (bed ``lossy``): node-a and node-b host clc + kv, node-c the
arbitrator; each runs ``euca-runtime serve`` under ``systemd-run`` inside its host, so the
processes go away with the bed. A kv writer runs from the controller throughout.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import statistics
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

import pytest
import yaml

from euca_runtime import local
from euca_runtime.config import load_config
from euca_runtime.tls import ensure_dev_pki
from testbed import bed as tb
from testbed.model import STATE_ROOT, Bed, Host

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

BED = "lossy"
REMOTE = "/var/lib/euca-lossy"
UNIT = "euca-runtime"
PORTS = {"bus": 7100, "admin": 7101, "kv": 7102, "iam": 7103, "s3": 7104}
HOSTS = {"node-a": "h1", "node-b": "h2", "node-c": "h3"}
DELAY_MS, LOSS_PCT = 50.0, 1.0
DEGRADED_FOR = 45.0
"""Seconds the whole bed runs degraded while we watch for a false failover."""
PY = Path(sys.executable)
LAYOUT: dict[str, list[dict[str, str]]] = {
    "node-a": [{"type": "clc", "role": "primary"}, {"type": "kv", "role": "primary"}],
    "node-b": [{"type": "clc", "role": "backup"}, {"type": "kv", "role": "backup"}],
    "node-c": [{"type": "arbitrator"}],
}
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LossyCloud:
    bed: Bed
    ips: dict[str, str]
    token: str

    def host(self, node: str) -> Host:
        return self.bed.host(HOSTS[node])

    def admin(self, node: str) -> str:
        return f"http://{self.ips[node]}:{PORTS['admin']}"

    def kv(self, node: str) -> str:
        return f"http://{self.ips[node]}:{PORTS['kv']}"

    def services(self, via: str, events: bool = False) -> dict[str, Any]:
        url = f"{self.admin(via)}/v1/services" + ("?events=1" if events else "")
        status, body = http("GET", url, token=self.token, timeout=10)
        if status != 200:
            raise OSError(f"{url}: {status} {body[:200]!r}")
        return json.loads(body)

    def rows(self, via: str) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.services(via)["services"]}

    def ssh(self, node: str, cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return tb.ssh(self.bed, self.host(node), cmd, timeout=timeout)


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


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(0.1)
    pytest.fail(
        f"timed out after {timeout} s waiting for {what}" + (f" (last error: {last})" if last else "")
    )


def _settled(cloud: LossyCloud, primary: str = "node-a", backup: str = "node-b") -> bool:
    rows = cloud.rows(via=primary)
    return all(
        rows[f"{primary}.{g}"]["state"] == "ENABLED"
        and rows[f"{backup}.{g}"]["state"] == "DISABLED"
        and rows[f"{backup}.{g}"]["in_sync"]
        for g in ("clc", "kv")
    )


def _write_files(cloud_dir: Path, ips: dict[str, str]) -> str:
    """PKI, token and configs for the three nodes under `cloud_dir` (copied to every host)."""
    # The fabric under test: clc and kv primary/backup on node-a/node-b, node-c the arbitrator
    # (the other components have their own failover tests on loopback).
    nodes = {name: {"ip": ips[name], "components": comps} for name, comps in LAYOUT.items()}
    pki = ensure_dev_pki(cloud_dir / "pki", list(nodes), {n: [ip] for n, ip in ips.items()})
    tls = {
        n: {
            "ca": f"{REMOTE}/pki/{pki[n].ca.name}",
            "cert": f"{REMOTE}/pki/{pki[n].cert.name}",
            "key": f"{REMOTE}/pki/{pki[n].key.name}",
        }
        for n in nodes
    }
    configs = local.node_configs(
        nodes, dict.fromkeys(nodes, PORTS), tls, data_dirs={n: f"{REMOTE}/{n}" for n in nodes}
    )
    token = secrets.token_urlsafe(32)
    for name, cfg in configs.items():
        path = cloud_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        (cloud_dir / name).mkdir(mode=0o700, exist_ok=True)
        (cloud_dir / name / "admin.token").write_text(token + "\n")
        (cloud_dir / name / "admin.token").chmod(0o600)
    # Validate the configs as the hosts will read them (paths rewritten to the local copy).
    for name in configs:
        text = (cloud_dir / f"{name}.yaml").read_text().replace(REMOTE, str(cloud_dir))
        check = cloud_dir / f".check-{name}.yaml"
        check.write_text(text)
        load_config(check)
        check.unlink()
    return token


def _binds() -> list[Path]:
    """This checkout and the venv running the tests (when it lives elsewhere)."""
    venv = Path(sys.prefix).resolve()
    return [ROOT] if venv.is_relative_to(ROOT) else [ROOT, venv]


def _start(cloud: LossyCloud, node: str) -> None:
    cmd = (
        f"systemd-run --unit={UNIT} --collect --property=KillMode=mixed "
        f"--setenv=PYTHONUNBUFFERED=1 {PY} -m euca_runtime.cli serve --config {REMOTE}/{node}.yaml"
    )
    out = cloud.ssh(node, cmd)
    assert out.returncode == 0, f"start {node}: {out.stderr}"


def _main_pid(cloud: LossyCloud, node: str) -> int:
    """The node's runtime process: the unit's main pid, else the `serve` process of its config."""
    out = cloud.ssh(node, f"systemctl show -p MainPID --value {UNIT}", timeout=8)
    if out.returncode != 0:  # wait_until reports the last one
        raise OSError(f"ssh {node} (exit {out.returncode}): {out.stderr.strip()[-300:]}")
    pid = int(out.stdout.strip() or 0)
    if pid > 0:
        return pid
    out = cloud.ssh(node, f"pgrep -o -f 'euca_runtime.cli serve --config {REMOTE}/{node}.yaml'", timeout=8)
    if out.returncode not in (0, 1):
        raise OSError(f"ssh {node} (exit {out.returncode}): {out.stderr.strip()[-300:]}")
    return int(out.stdout.split()[0]) if out.returncode == 0 and out.stdout.split() else 0


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LossyCloud]:
    try:
        # The hosts run this checkout's venv: bind it (a host's /tmp, where a CI clone may live, is its own).
        bed = tb.up(BED, len(HOSTS), binds=_binds())
        ips = {node: bed.host(h).address for node, h in HOSTS.items()}
        cloud_dir = tmp_path_factory.mktemp("lossy")
        token = _write_files(cloud_dir, ips)
        c = LossyCloud(bed, ips, token)
        for node in HOSTS:
            host = c.host(node)
            scp = subprocess.run(
                [
                    "scp",
                    "-F",
                    str(STATE_ROOT / BED / "ssh_config"),
                    "-o",
                    "BatchMode=yes",
                    "-q",
                    "-r",
                    str(cloud_dir),
                    f"{host.name}:{REMOTE}",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert scp.returncode == 0, f"copy to {host.name}: {scp.stderr}"
        for node in HOSTS:
            _start(c, node)
        wait_until(lambda: _settled(c), 90, "node-a ENABLED and node-b DISABLED in sync (clc and kv)")
        wait_until(
            lambda: c.rows(via="node-c")["node-c.arbitrator"]["state"] == "ENABLED", 30, "arbitrator ENABLED"
        )
        yield c
    finally:
        with contextlib.suppress(Exception):
            for node in HOSTS:
                out = tb.ssh(
                    tb.load(BED), tb.load(BED).host(HOSTS[node]), f"journalctl -u {UNIT} --no-pager -n 40"
                )
                sys.stderr.write(
                    f"--- {node} (exit {out.returncode}) {out.stderr[-500:]}\n{out.stdout[-4000:]}\n"
                )
        tb.down(BED)


@dataclass
class Writer:
    """Unique-key PUTs from the controller through both kv APIs; what was acked and when."""

    cloud: LossyCloud
    nodes: list[str]
    prefix: str
    acked: list[tuple[str, float, float]] = field(default_factory=list)
    errors: list[tuple[str, float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Writer:
        self._lock = threading.Lock()
        for i, node in enumerate(self.nodes):
            t = threading.Thread(target=self._run, args=(node, i), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, node: str, idx: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            key = f"{self.prefix}-{idx}-{i}"
            sent = time.monotonic()
            try:
                status, body = http(
                    "PUT", f"{self.cloud.kv(node)}/kv/{key}?timeout=10", key.encode(), timeout=15
                )
            except OSError as exc:
                status, body = 0, str(exc).encode()
            with self._lock:
                if status == 200:
                    self.acked.append((key, sent, time.monotonic()))
                else:
                    self.errors.append((key, sent, f"{node}: {status} {body[:200]!r}"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)


def _degrade_all(cloud: LossyCloud) -> None:
    for h in HOSTS.values():
        tb.degrade(BED, h, DELAY_MS, LOSS_PCT)


def _ping_rtt(cloud: LossyCloud) -> str:
    out = cloud.ssh("node-a", f"ping -c 20 -i 0.05 -q {cloud.ips['node-b']}")
    return " / ".join(out.stdout.strip().splitlines()[-2:])


def test_no_false_failover_on_a_slow_lossy_link(cloud: LossyCloud) -> None:
    assert _settled(cloud)
    before = cloud.rows(via="node-a")
    epochs = {g: before[f"node-a.{g}"]["epoch"] for g in ("clc", "kv")}
    wall_start = time.time()
    with Writer(cloud, ["node-a", "node-b"], "lossy") as writer:
        wait_until(lambda: writer.count() >= 20, 30, "writes flowing")
        _degrade_all(cloud)
        try:
            rtt = _ping_rtt(cloud)
            start, n0 = time.monotonic(), writer.count()
            seen: list[tuple[float, str, str, int]] = []
            hb_age_ms: list[float] = []
            # Watch for the whole window: every state and epoch, twice a second.
            while time.monotonic() - start < DEGRADED_FOR:
                with contextlib.suppress(OSError):
                    for name, row in cloud.rows(via="node-c").items():
                        if row.get("group") in ("clc", "kv"):
                            seen.append((time.monotonic() - start, name, row["state"], row["epoch"]))
                        if row.get("heartbeat_age_ms") is not None:
                            hb_age_ms.append(float(row["heartbeat_age_ms"]))
                time.sleep(0.5)  # sampling period of the observation, not synchronisation
            window = [a for a in writer.acked if a[1] >= start]
            during = writer.count() - n0
        finally:
            tb.heal(BED)
    after = cloud.services(via="node-a", events=True)
    rows = {s["name"]: s for s in after["services"]}
    new_events = [e for e in after["events"] if e.get("ts", 0) >= wall_start]
    latencies = sorted(acked - sent for _, sent, acked in window)
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
    print(
        f"\nlossy link ({DELAY_MS:g} ms + {LOSS_PCT:g}% on every host's egress; {rtt}): "
        f"{during} writes acknowledged in {DEGRADED_FOR:g} s, latency p50 "
        f"{statistics.median(latencies) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms; heartbeat age seen by node-c max "
        f"{max(hb_age_ms, default=0):.0f} ms; "
        f"errors {len(writer.errors)}; events {new_events}"
    )
    assert writer.errors == []
    assert during > 0
    for g in ("clc", "kv"):
        assert rows[f"node-a.{g}"]["state"] == "ENABLED" and rows[f"node-a.{g}"]["epoch"] == epochs[g]
        assert rows[f"node-b.{g}"]["state"] == "DISABLED"
    bad = [s for s in seen if s[2] not in ("ENABLED", "DISABLED") or s[3] not in epochs.values()]
    assert bad == [], f"state or epoch changes during the degraded window: {bad[:10]}"
    flips = [
        s
        for s in seen
        if (s[1].startswith("node-a") and s[2] != "ENABLED")
        or (s[1].startswith("node-b") and s[2] != "DISABLED")
    ]
    assert flips == []
    assert new_events == []


def test_kill9_of_the_primary_on_the_degraded_link_still_fails_over(cloud: LossyCloud) -> None:
    wait_until(lambda: _settled(cloud), 60, "settled")
    pid = wait_until(lambda: _main_pid(cloud, "node-a"), 30, "node-a's runtime pid")
    _degrade_all(cloud)
    try:
        with Writer(cloud, ["node-b", "node-b"], "kill") as writer:
            wait_until(lambda: writer.count() >= 20, 30, "writes flowing on the degraded link")
            out = cloud.ssh("node-a", f"kill -9 {pid}", timeout=30)
            killed = time.monotonic()
            assert out.returncode == 0, out.stderr
            enabled = wait_until(
                lambda: cloud.rows(via="node-b")["node-b.kv"]["state"] == "ENABLED" and time.monotonic(),
                30,
                "node-b.kv ENABLED after kill -9 of node-a",
            )
            wait_until(
                lambda: any(a[1] > killed for a in writer.acked), 30, "a write sent after the kill acked"
            )
            first_ack = min(acked for _, sent, acked in writer.acked if sent > killed)
        rows = cloud.rows(via="node-b")
        print(
            f"\nkill -9 on the degraded link: node-b.kv ENABLED (as seen by polling its admin API) "
            f"{enabled - killed:.2f} s after the kill; first write sent after the kill acknowledged "
            f"{first_ack - killed:.2f} s after it; writer errors {len(writer.errors)}"
        )
        assert rows["node-b.kv"]["state"] == "ENABLED" and rows["node-a.kv"]["state"] != "ENABLED"
        lost = []
        for key, _, _ in writer.acked:
            status, body = http("GET", f"{cloud.kv('node-b')}/kv/{key}?timeout=10", timeout=15)
            if status != 200 or body != key.encode():
                lost.append(key)
        assert lost == []
    finally:
        tb.heal(BED)
