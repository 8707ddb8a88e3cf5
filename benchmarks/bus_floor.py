"""The floor under a replicated write on this machine: what one bus round trip and one durable
write cost by themselves, with none of the runtime's logic around them.

Two processes, each an `euca_runtime.transport.Endpoint` with mutual TLS on loopback (the bus the
runtime uses), A calling B back to back with a 100-byte body. Four measurements, alternated:

- ``noop``: B answers at once (the bus round trip);
- ``local``: no request; A writes 4 KiB and fdatasyncs it in its thread pool (an unreplicated
  write's durable step, without SQLite);
- ``remote``: B does that write in its thread pool before answering;
- ``send_first``: A sends the request, does its own durable write meanwhile, then waits for the
  answer (the replicated write's shape, DESIGN.md section 7 with the primary sending first).

``send_first - local`` is the least a synchronous backup can add to a write here: the
replication cost of a write whose own work were free. `benchmarks.replication_cost` runs this in
the same run and reports it beside its ratios.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from euca_runtime.tls import client_context, ensure_dev_pki, server_context
from euca_runtime.transport import Endpoint

HOST = "127.0.0.1"
BLOCK = 4096
KINDS = ("noop", "local", "remote", "send_first")


def _endpoint(name: str, pki_dir: Path, peers: dict[str, tuple[str, int]] | None = None) -> Endpoint:
    p = ensure_dev_pki(pki_dir, ["a", "b"], [HOST])[name]
    return Endpoint(
        name, HOST, 0, server_context(p.ca, p.cert, p.key), client_context(p.ca, p.cert, p.key), peers=peers
    )


def _durable(fd: int, i: int) -> None:
    os.pwrite(fd, b"y" * BLOCK, (i % 64) * BLOCK)
    os.fdatasync(fd)


def _serve(pki_dir: str, ports: Any, stop: Any) -> None:
    """Process B: answer ``noop`` at once and ``remote`` after a durable write."""
    fd = os.open(Path(pki_dir) / "b.dat", os.O_WRONLY | os.O_CREAT, 0o600)

    async def main() -> None:
        b = _endpoint("b", Path(pki_dir))
        loop = asyncio.get_running_loop()
        count = 0

        async def handler(req: dict[str, Any]) -> Any:
            nonlocal count
            if req["method"] == "remote":
                count += 1
                await loop.run_in_executor(None, _durable, fd, count)
            return {}

        b.set_handler(handler)
        await b.start()
        ports.put(b.port)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await b.stop()

    asyncio.run(main())


async def _measure(a: Endpoint, fd: int, rounds: int, requests: int) -> dict[str, list[float]]:
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + 10.0
    while not a.connected("b"):
        if time.monotonic() > deadline:
            raise RuntimeError("bus_floor: A never connected to B")
        await asyncio.sleep(0.01)
    medians: dict[str, list[float]] = {k: [] for k in KINDS}
    body = {"value": "v" * 100}
    for _ in range(rounds):
        for kind in KINDS:
            lat = []
            for i in range(requests):
                t0 = time.perf_counter()
                if kind == "local":
                    await loop.run_in_executor(None, _durable, fd, i)
                elif kind == "send_first":
                    answer = a.send_request("b", "x", "remote", body, timeout=5.0)
                    await loop.run_in_executor(None, _durable, fd, i)
                    await answer
                else:
                    await a.request("b", "x", kind, body, timeout=5.0)
                lat.append(time.perf_counter() - t0)
            medians[kind].append(statistics.median(lat) * 1e6)
    return medians


def run(rounds: int = 3, requests: int = 1500) -> dict[str, Any]:
    """Median latency (us) of each kind: the median and range over `rounds` alternated rounds."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="euca-busfloor-") as tmp:
        pki_dir = Path(tmp)
        ensure_dev_pki(pki_dir, ["a", "b"], [HOST])
        ports, stop = ctx.Queue(), ctx.Event()
        server = ctx.Process(target=_serve, args=(str(pki_dir), ports, stop), daemon=True)
        server.start()
        fd = os.open(pki_dir / "a.dat", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            port = ports.get(timeout=30)

            async def main() -> dict[str, list[float]]:
                a = _endpoint("a", pki_dir, {"b": (HOST, port)})
                await a.start()
                try:
                    return await _measure(a, fd, rounds, requests)
                finally:
                    await a.stop()

            medians = asyncio.run(main())
        finally:
            os.close(fd)
            stop.set()
            server.join(10)
            if server.is_alive():
                server.kill()
    out: dict[str, Any] = {"rounds": rounds, "requests": requests, "block_bytes": BLOCK}
    for kind, values in medians.items():
        out[f"{kind}_us"] = {
            "p50": round(statistics.median(values), 1),
            "min": round(min(values), 1),
            "max": round(max(values), 1),
        }
    out["added_by_backup_us"] = round(out["send_first_us"]["p50"] - out["local_us"]["p50"], 1)
    return out
