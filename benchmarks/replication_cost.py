"""Replicated (`up --ha`) vs unreplicated (`up`) kv write latency and throughput, in one run.

Both clouds run side by side for the whole benchmark and the measurements alternate between
them (unreplicated, replicated, unreplicated, ...), so drift in the machine's load hits both
alike. Each measurement is `clients` keep-alive HTTP connections PUTting unique 100-byte keys
to the kv API of the ENABLED instance's process for `seconds`. Target: replication costs at
most 1.5x (latency p50/p99 and throughput), DESIGN.md section 7.

The same run then measures the floor (`benchmarks.bus_floor`): what one bus round trip plus a
backup's durable write add by themselves on this machine, and the one-client ratio a write
would have if replication added only that (`floor.ratio_1_client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from typing import Any

from benchmarks import bus_floor
from benchmarks._cloud import cloud, load, summary

TARGET = 1.5


def run(trials: int = 5, seconds: float = 4.0, clients: tuple[int, ...] = (1, 32)) -> dict[str, Any]:
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {
        m: {c: [] for c in clients} for m in ("unreplicated", "replicated")
    }
    with contextlib.ExitStack() as stack:
        clouds = {
            "unreplicated": stack.enter_context(cloud(ha=False)),
            "replicated": stack.enter_context(cloud(ha=True)),
        }
        urls = {m: c.kv_url(c.primary_node("kv")) for m, c in clouds.items()}
        for url in urls.values():  # warm-up: connections, caches, SQLite files
            asyncio.run(load(url, 4, 1.0, prefix="warm"))
        for t in range(trials):
            for n in clients:
                for mode in ("unreplicated", "replicated"):
                    r = asyncio.run(load(urls[mode], n, seconds, prefix=f"t{t}c{n}"))
                    lat = r.pop("lat")
                    r["p50"] = statistics.median(lat) if lat else float("nan")
                    r["p99"] = sorted(lat)[int(0.99 * (len(lat) - 1))] if lat else float("nan")
                    raw[mode][n].append(r)
    out: dict[str, Any] = {"trials": trials, "seconds_per_trial": seconds, "target_ratio": TARGET}
    for n in clients:
        row: dict[str, Any] = {}
        for mode in ("unreplicated", "replicated"):
            rs = raw[mode][n]
            row[mode] = {
                "rate": summary([r["rate"] for r in rs], 1),
                "p50_ms": summary([r["p50"] * 1000 for r in rs], 2),
                "p99_ms": summary([r["p99"] * 1000 for r in rs], 2),
                "errors": sum(r["errors"] for r in rs),
            }
        u, r_ = row["unreplicated"], row["replicated"]
        ratios = {
            "p50_latency": round(r_["p50_ms"]["p50"] / u["p50_ms"]["p50"], 2),
            "p99_latency": round(r_["p99_ms"]["p50"] / u["p99_ms"]["p50"], 2),
            "throughput": round(u["rate"]["p50"] / r_["rate"]["p50"], 2),
        }
        row["cost_ratio"] = ratios
        row["met"] = all(v <= TARGET for v in ratios.values()) and r_["errors"] == 0
        out[f"clients_{n}"] = row
    if 1 in clients:
        floor = bus_floor.run()
        base_us = out["clients_1"]["unreplicated"]["p50_ms"]["p50"] * 1000
        floor["ratio_1_client"] = round((base_us + floor["added_by_backup_us"]) / base_us, 2)
        out["floor"] = floor
    return out
