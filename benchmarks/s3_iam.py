"""S3 and IAM through unmodified boto3: euca-ha (`up` and `up --ha`) side by side with moto's
server mode and, for GETs, nginx serving the same bytes as static files; S3 failover as a client
sees it; a 1 GiB object through `up --ha` with the serving processes' peak RSS.

Targets (all on loopback, all started and stopped by this benchmark, in one run):

- ``single``: `euca-runtime up` (one process); requests go to its S3 / IAM listeners.
- ``ha``: `euca-runtime up --ha`; requests go to the listeners of the process holding the
  walrus and clc primaries (node-a), so every write is replicated to node-b before the answer.
- ``moto``: `python -m moto.server` (moto[server], in-memory S3 and IAM, one process).
- ``nginx``: nginx (one worker per CPU, sendfile) serving the objects as static files from a
  temporary directory: the ceiling for GETs. It ignores the signature; the client is the same
  boto3 ``get_object`` call, so client-side cost is identical across targets.

Operations: PutObject and GetObject of 4 KiB and 1 MiB, and IAM CreateUser, each with 1 and 16
client threads (one boto3 client per thread, keep-alive, no retries). Each thread makes a few
warm-up requests first (excluded); then the threads share a bounded number of measured
requests (and a time cap per cell). Rate = measured requests / wall time of the measured phase.
Targets are measured interleaved per (operation, threads) cell, so drifting machine load hits
them alike. The load generator runs on the same (2) cores as the servers.

Failover (``failover``): 2 client threads put 4 KiB objects back to back through the *surviving*
process's S3 endpoint (boto3 standard retries, as a user would have) while the walrus primary's
process is `kill -9`-ed; the figure is the longest gap between two successful requests around
the kill. After each trial the killed process is restarted and the benchmark waits until the
backup is in sync again.

Large object (``large``): one 1 GiB object put then got (streamed, digest checked) through the
walrus primary's endpoint of `up --ha`; peak RSS of node-a and node-b sampled every 50 ms.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from benchmarks._cloud import Cloud, cli, cloud, pct, summary
from euca_runtime import local

KiB = 1024
MiB = 1024 * KiB
SIZES = {"4KiB": 4 * KiB, "1MiB": MiB}
THREADS = (1, 16)
GET_KEYS = 16
"""Distinct objects per size that GETs cycle through."""
OPS = ("put_4KiB", "put_1MiB", "get_4KiB", "get_1MiB", "create_user")
BUCKET = "bench"


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    s3_url: str
    iam_url: str | None
    key: str
    secret: str
    region: str
    ops: tuple[str, ...] = OPS
    pids: list[int] = field(default_factory=list)

    def client(self, service: str, *, attempts: int = 1, read_timeout: float = 60.0) -> Any:
        url = self.s3_url if service == "s3" else self.iam_url
        return boto3.session.Session().client(
            service,
            endpoint_url=url,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": attempts, "mode": "standard"},
                read_timeout=read_timeout,
                connect_timeout=5,
                max_pool_connections=2,
            ),
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def euca_target(name: str, c: Cloud) -> Target:
    c.wait_ha(("walrus", "clc"), timeout=90.0)
    env = local.read_eucarc(c.root / "eucarc")
    node = c.primary_node("walrus")
    api = c.layout.nodes[node].api
    return Target(
        name,
        api["s3"],
        api["iam"],
        env["AWS_ACCESS_KEY_ID"],
        env["AWS_SECRET_ACCESS_KEY"],
        env["AWS_DEFAULT_REGION"],
        pids=[c.pid(n) for n in c.layout.nodes],
    )


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout} s")


def _stop_child(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a child started in its own session: `sig` to its group, then SIGKILL after 10 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (nginx workers)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def moto_server(tmp: Path) -> Iterator[Target]:
    """moto's server mode on a loopback port, as a child process (stopped on the way out)."""
    port = _free_port()
    log = (tmp / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/moto-api/", proc, "moto server")
        yield Target("moto", url, url, "testing", "testing", "us-east-1", pids=[proc.pid])
    finally:
        _stop_child(proc)
        log.close()


NGINX_CONF = """\
{user}worker_processes auto;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {tmp}/www;
    }}
}}
"""


@contextlib.contextmanager
def nginx_server(tmp: Path, files: dict[str, bytes]) -> Iterator[Target]:
    """A throwaway nginx serving `files` (path -> bytes) from `tmp`/www; stopped on the way out."""
    binary = next((p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if os.access(p, os.X_OK)), None)
    if binary is None:
        raise RuntimeError("nginx is not installed (scripts/install-deps.sh installs nginx-light)")
    ngx = tmp / "nginx"
    for rel, data in files.items():
        p = ngx / "www" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    port = _free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read a 0700 temp dir
    conf = ngx / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, tmp=ngx, port=port))
    proc = subprocess.Popen(
        [binary, "-p", str(ngx), "-e", str(ngx / "error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=(ngx / "stderr.log").open("wb"),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/", proc, "nginx")
        yield Target("nginx", url, None, "unused", "unused", "us-east-1", ops=("get_4KiB", "get_1MiB"))
    finally:
        _stop_child(proc, signal.SIGQUIT)


# --------------------------------------------------------------------------- load


def body(size: int, salt: str) -> bytes:
    seed = hashlib.sha256(salt.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def get_key(label: str, i: int) -> str:
    return f"get-{label}/{i:02d}"


def prepare(t: Target) -> None:
    """The bucket and the objects the GETs read (nginx gets them as files instead)."""
    s3 = t.client("s3", attempts=3)
    s3.create_bucket(Bucket=BUCKET)
    for label, size in SIZES.items():
        for i in range(GET_KEYS):
            s3.put_object(Bucket=BUCKET, Key=get_key(label, i), Body=body(size, get_key(label, i)))


def static_files() -> dict[str, bytes]:
    return {
        f"{BUCKET}/{get_key(label, i)}": body(size, get_key(label, i))
        for label, size in SIZES.items()
        for i in range(GET_KEYS)
    }


def op_fn(op: str, run_id: str) -> tuple[str, Callable[[Any, int, int], None]]:
    """(service, fn(client, thread, i)) doing one request of `op`."""
    kind, _, label = op.partition("_")
    if op == "create_user":

        def create(c: Any, t: int, i: int) -> None:
            c.create_user(UserName=f"b{run_id}-{t}-{i}")

        return "iam", create
    size = SIZES[label]
    data = body(size, label)
    if kind == "put":

        def put(c: Any, t: int, i: int) -> None:
            c.put_object(Bucket=BUCKET, Key=f"put-{label}/{t}/{i % 8}", Body=data)

        return "s3", put

    def get(c: Any, t: int, i: int) -> None:
        got = c.get_object(Bucket=BUCKET, Key=get_key(label, (t + i) % GET_KEYS))["Body"].read()
        if len(got) != size:
            raise RuntimeError(f"short read: {len(got)} of {size}")

    return "s3", get


def measure(
    t: Target, op: str, threads: int, total: int, *, warmup: int = 2, max_seconds: float = 20.0
) -> dict[str, Any]:
    """`threads` clients share `total` measured requests of `op` against `t` (after warm-up)."""
    run_id = f"{time.monotonic_ns() % 10**9}"
    service, fn = op_fn(op, run_id)
    clients = [t.client(service) for _ in range(threads)]
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    issued = 0
    start = threading.Barrier(threads + 1)
    deadline = [0.0]

    def worker(idx: int) -> None:
        nonlocal issued
        c = clients[idx]
        for w in range(warmup):
            with contextlib.suppress(Exception):
                fn(c, idx, 10**6 + w)
        start.wait()
        while True:
            with lock:
                if issued >= total or time.monotonic() > deadline[0]:
                    return
                issued += 1
                i = issued
            t0 = time.monotonic()
            try:
                fn(c, idx, i)
            except Exception as exc:  # noqa: BLE001 - any failure is counted, the load goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            dt = time.monotonic() - t0
            with lock:
                lat.append(dt)

    ths = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for th in ths:
        th.start()
    deadline[0] = time.monotonic() + max_seconds + 60.0  # warm-up is not capped by the cell
    start.wait(timeout=120)
    t0 = time.monotonic()
    deadline[0] = t0 + max_seconds
    for th in ths:
        th.join(timeout=max_seconds + 120)
    elapsed = time.monotonic() - t0
    for c in clients:
        c.close()
    return {
        "n": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "rate": round(len(lat) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(pct(lat, 50) * 1000, 2) if lat else None,
        "p99_ms": round(pct(lat, 99) * 1000, 2) if lat else None,
        "seconds": round(elapsed, 2),
    }


def requests_for(op: str, threads: int, scale: float) -> int:
    base = {"put_4KiB": 80, "get_4KiB": 150, "put_1MiB": 20, "get_1MiB": 40, "create_user": 60}[op]
    return max(threads * 2, int(base * (2 if threads > 1 else 1) * scale))


# --------------------------------------------------------------------------- failover


class S3Puts:
    """Threads putting 4 KiB objects back to back; records completion times of successes."""

    def __init__(self, t: Target, threads: int, prefix: str) -> None:
        self.done: list[float] = []
        self.errors: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._clients = [t.client("s3", attempts=3, read_timeout=40.0) for _ in range(threads)]
        self._threads = [
            threading.Thread(target=self._run, args=(i, prefix), daemon=True) for i in range(threads)
        ]

    def _run(self, idx: int, prefix: str) -> None:
        c = self._clients[idx]
        data = body(4 * KiB, prefix)
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                c.put_object(Bucket=BUCKET, Key=f"{prefix}/{idx}/{i % 16}", Body=data)
            except Exception as exc:  # noqa: BLE001 - a failure the client saw
                with self._lock:
                    self.errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:200]))
                self._stop.wait(0.01)
                continue
            with self._lock:
                self.done.append(time.monotonic())

    def __enter__(self) -> S3Puts:
        for th in self._threads:
            th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout=60)
        for c in self._clients:
            c.close()

    def count_after(self, t: float) -> int:
        with self._lock:
            return sum(1 for d in self.done if d > t)


def failover_trial(c: Cloud, n: int) -> dict[str, Any]:
    c.wait_ha(("walrus", "clc"), timeout=120.0)
    victim = c.primary_node("walrus")
    survivor = c.other_node(victim, "walrus")
    base = euca_target("ha", c)
    t = Target("ha", c.layout.nodes[survivor].api["s3"], None, base.key, base.secret, base.region)
    pid = c.pid(victim)
    with S3Puts(t, 2, f"fo{n}") as w:
        c.wait(lambda: w.count_after(0) >= 20, 30.0, "puts flowing")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        c.wait(lambda: c.primary_node("walrus", via=survivor) == survivor, 60.0, "walrus on the survivor")
        c.wait(lambda: w.count_after(killed) >= 20, 60.0, "puts flowing after the failover")
    done = sorted(w.done)
    before = [d for d in done if d <= killed]
    after = [d for d in done if d > killed]
    # Longest gap between successive successes spanning or following the kill.
    points = ([before[-1]] if before else []) + after
    gap = max((b - a for a, b in itertools.pairwise(points)), default=float("nan"))
    first_after = after[0] - killed if after else float("nan")
    cli("up", "--dir", str(c.root), "--node", victim)
    c.wait_ha(("walrus", "clc"), timeout=120.0, via=survivor)
    return {"gap": gap, "first_after": first_after, "errors": len(w.errors)}


# --------------------------------------------------------------------------- large object


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KiB
    return 0


class Pattern:
    """A seekable file-like object of `size` deterministic bytes, generated on the fly."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pos = 0
        self.block = hashlib.sha256(b"large").digest() * (MiB // 32)

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else min(n, self.size - self.pos)
        out = bytearray()
        while len(out) < n:
            off = (self.pos + len(out)) % len(self.block)
            out += self.block[off : off + n - len(out)]
        self.pos += n
        return bytes(out)

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.size + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __len__(self) -> int:
        return self.size


def large_object(c: Cloud, size: int) -> dict[str, Any]:
    c.wait_ha(("walrus", "clc"), timeout=120.0)
    t = euca_target("ha", c)
    pids = {n: c.pid(n) for n in ("node-a", "node-b")}
    s3 = t.client("s3", attempts=1, read_timeout=600.0)
    expect = hashlib.sha256()
    src = Pattern(size)
    while chunk := src.read(8 * MiB):
        expect.update(chunk)
    src.seek(0)
    before = {n: _rss(p) for n, p in pids.items()}
    peak = dict(before)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for n, p in pids.items():
                with contextlib.suppress(OSError):
                    peak[n] = max(peak[n], _rss(p))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t0 = time.monotonic()
        s3.put_object(Bucket=BUCKET, Key="large", Body=src, ContentLength=size)
        t_put = time.monotonic() - t0
        got, n = hashlib.sha256(), 0
        t0 = time.monotonic()
        for chunk in s3.get_object(Bucket=BUCKET, Key="large")["Body"].iter_chunks(MiB):
            got.update(chunk)
            n += len(chunk)
        t_get = time.monotonic() - t0
    finally:
        stop.set()
        sampler.join(timeout=5)
    if n != size or got.hexdigest() != expect.hexdigest():
        raise RuntimeError(f"the large object came back wrong ({n} bytes)")
    s3.delete_object(Bucket=BUCKET, Key="large")
    return {
        "size_mib": size // MiB,
        "endpoint": "walrus primary's process",
        "put_mib_s": round(size / MiB / t_put, 1),
        "get_mib_s": round(size / MiB / t_get, 1),
        "rss_mib": {n: {"before": round(before[n] / MiB, 1), "peak": round(peak[n] / MiB, 1)} for n in pids},
        "peak_growth_mib": round(max(peak[n] - before[n] for n in pids) / MiB, 1),
    }


# --------------------------------------------------------------------------- run


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell over its rounds: rate median (min-max), medians of p50/p99, totals."""
    ok = [r for r in rounds if r["n"]]
    errors = [r["first_error"] for r in rounds if r["first_error"]]
    return {
        "rounds": len(rounds),
        "n": sum(r["n"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "first_error": errors[0] if errors else None,
        "rate": summary([r["rate"] for r in ok], 1),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in ok), 2) if ok else None,
        "p99_ms": round(statistics.median(r["p99_ms"] for r in ok), 2) if ok else None,
    }


def run(
    scale: float = 1.0,
    rounds: int = 3,
    cell_seconds: float = 15.0,
    failover_trials: int = 5,
    large_mib: int = 1024,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "threads": list(THREADS),
        "rounds": rounds,
        "cell_seconds_cap": cell_seconds,
        "warmup_per_thread": 2,
        "requests_per_round": {op: {f"t{n}": requests_for(op, n, scale) for n in THREADS} for op in OPS},
        "ops": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="euca-bench-s3-"))
    try:
        with contextlib.ExitStack() as stack:
            single = stack.enter_context(cloud(ha=False))
            ha = stack.enter_context(cloud(ha=True))
            targets = [
                euca_target("single", single),
                euca_target("ha", ha),
                stack.enter_context(moto_server(tmp)),
            ]
            for t in targets:
                prepare(t)
            targets.append(stack.enter_context(nginx_server(tmp, static_files())))
            out["targets"] = [t.name for t in targets]
            raw: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
            for rnd in range(rounds):  # whole grid per round: drifting load hits every cell alike
                for op in OPS:
                    for threads in THREADS:
                        for t in targets:
                            if op not in t.ops:
                                continue
                            total = requests_for(op, threads, scale)
                            r = measure(t, op, threads, total, max_seconds=cell_seconds)
                            raw.setdefault((op, t.name, threads), []).append(r)
                            print(f"  round {rnd} {op} {t.name} x{threads}: {r}", flush=True)
            for (op, name, threads), rs in raw.items():
                out["ops"].setdefault(op, {}).setdefault(name, {})[f"t{threads}"] = combine(rs)
            if large_mib:
                out["large"] = large_object(ha, large_mib * MiB)
                print(f"  large: {out['large']}", flush=True)
            trials = [failover_trial(ha, i) for i in range(failover_trials)]
            out["failover"] = {
                "trials": len(trials),
                "clients": 2,
                "gap_seconds": summary([x["gap"] for x in trials]),
                "first_success_after_kill_seconds": summary([x["first_after"] for x in trials]),
                "client_errors": sum(x["errors"] for x in trials),
            }
            print(f"  failover: {out['failover']}", flush=True)
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return out
