"""A failover as clients see it, per 100 ms: requests per second, errors and latency percentiles
around a `kill -9` of the primary process of the local HA cloud (`euca-runtime up --ha`), with
the fault and the service state changes (describe-services events) on the same time axis.

Per trial: `clients` keep-alive connections PUT unique 100-byte keys back to back through the
*surviving* process's kv API (requests arriving during the failover are held and retried by the
runtime until their 10 s deadline); after `before` seconds of steady load the process holding
the kv primary is killed with SIGKILL; the load runs on until `after` seconds past the kill.
Every request is recorded (sent, completed, ok or error) and put in the 100 ms bucket of its
completion, relative to the kill: acknowledged writes per second, errors, and the p50, p99 and
max latency of the requests completing in the bucket. The events of every reachable node
(`GET /v1/services?events=1`, wall-clock stamped) are read before the killed process is
restarted (`euca-runtime up --node`); the next trial starts once both groups have an in-sync
backup again (bounded: 300 s).

The result keeps every trial's buckets and events; the report plots the trial with the median
failover time (first write acknowledged under a higher epoch, minus the kill).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
import urllib.request
from typing import Any

from benchmarks._cloud import Cloud, Writer, cli, cloud, pct, summary

BUCKET = 0.1  # seconds
GROUPS = ("kv", "clc")


def events(c: Cloud, via: str) -> list[dict[str, Any]]:
    """describe-services events of every reachable node, through `via`'s admin API."""
    node = c.layout.nodes[via]
    req = urllib.request.Request(f"{node.admin}/v1/services?events=1")
    req.add_header("Authorization", f"Bearer {c.token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return list(json.loads(resp.read()).get("events", []))


Span = tuple[float, float]  # (sent, completed), monotonic clock


def buckets(
    acked: list[Span], errors: list[Span], t0: float, before: float, after: float
) -> dict[str, list[Any]]:
    """Per BUCKET of completion time relative to `t0`: ok/s, errors, latency p50/p99/max (ms).

    `acked` and `errors` are (sent, completed) pairs on the monotonic clock. A bucket with no
    completed request has no latency (NaN is not JSON: None)."""
    n = round((before + after) / BUCKET)
    start = t0 - before
    lat: list[list[float]] = [[] for _ in range(n)]
    errs = [0] * n
    for sent, done in acked:
        i = int((done - start) // BUCKET)
        if 0 <= i < n:
            lat[i].append((done - sent) * 1000)
    for _, done in errors:
        i = int((done - start) // BUCKET)
        if 0 <= i < n:
            errs[i] += 1

    def stat(values: list[float], p: float) -> float | None:
        return round(pct(values, p), 2) if values else None

    return {
        "t": [round(-before + i * BUCKET, 2) for i in range(n)],
        "ok_per_s": [len(v) / BUCKET for v in lat],
        "errors": [float(e) for e in errs],
        "p50_ms": [stat(v, 50) for v in lat],
        "p99_ms": [stat(v, 99) for v in lat],
        "max_ms": [round(max(v), 2) if v else None for v in lat],
    }


def settle(c: Cloud, timeout: float = 300.0) -> None:
    """Both groups ENABLED with an in-sync backup; the error names what describe-services showed."""
    try:
        c.wait_ha(GROUPS, timeout=timeout)
    except RuntimeError as exc:
        seen = [(s["name"], s["state"], s.get("in_sync")) for s in c.services() if s["group"] in GROUPS]
        raise RuntimeError(f"{exc}; describe-services: {seen}") from exc


def _trial(c: Cloud, clients: int, before: float, after: float) -> dict[str, Any]:
    settle(c)  # the previous trial's killed process rejoined and caught up
    victim = c.primary_node("kv")
    survivor = c.other_node(victim)
    old_epoch = int(c.enabled("kv")["epoch"])  # type: ignore[index]
    pid = c.pid(victim)
    with Writer([c.kv_url(survivor)] * clients, f"tl{time.monotonic_ns()}") as w:
        w.wait_acks(20)
        time.sleep(before)  # steady load before the fault (what the plot shows left of 0)
        wall0, t0 = time.time(), time.monotonic()
        os.kill(pid, signal.SIGKILL)
        failover = w.first_ack_after(t0, old_epoch + 1) - t0
        time.sleep(max(0.0, t0 + after - time.monotonic()))
    acked, errors = w.snapshot()
    evs = [
        {**e, "t": round(float(e["ts"]) - wall0, 3)}
        for e in events(c, survivor)
        if -before <= float(e["ts"]) - wall0 <= after
    ]
    cli("up", "--dir", str(c.root), "--node", victim)  # the next trial waits until it is in sync
    return {
        "victim": victim,
        "failover_seconds": round(failover, 4),
        "acked": len(acked),
        "errors": len(errors),
        "buckets": buckets(
            [(sent, done) for sent, done, _, _ in acked],
            [(sent, done) for sent, done, _ in errors],
            t0,
            before,
            after,
        ),
        "events": evs,
    }


def run(trials: int = 3, clients: int = 4, before: float = 2.0, after: float = 4.0) -> dict[str, Any]:
    with cloud(ha=True) as c:
        res = [_trial(c, clients, before, after) for _ in range(trials)]
    times = [t["failover_seconds"] for t in res]
    median = statistics.median_low(times)
    return {
        "trials": trials,
        "clients": clients,
        "bucket_seconds": BUCKET,
        "before_seconds": before,
        "after_seconds": after,
        "failover_seconds": summary(times),
        "client_errors": sum(t["errors"] for t in res),
        "median_trial": times.index(median),
        "runs": res,
    }
