"""Arbitrator detection time against its settings (docs/arbitrator.md).

One local HA cloud (`euca-runtime up --ha`). For each setting (interval, threshold) node-c is
restarted with its routes set to it (``recover`` stays 3); then each trial takes every target
of the current primary's route down (`euca_runtime.route_targets`: the listeners close, a
connect is refused at once) and measures, from the events the nodes record (wall clock of
one machine):

- ``detect``: cut -> the arbitrator records the route DOWN (expected between
  (threshold - 1) x interval and threshold x interval, plus a probe);
- ``enabled``: cut -> the backup's kv instance ENABLED (what users see: detection, the report
  over the bus, lease release, the takeover and the in-sync set recorded);
- ``handover``: ``enabled`` - ``detect``.

The targets are then restored, the evicted node waits as an in-sync backup, and the next trial
cuts the route of the new primary (so the primary alternates between node-a and node-b).
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml

from benchmarks._cloud import Cloud, cli, cloud, ctl, summary
from euca_runtime import route_targets

SETTINGS = ((0.2, 2), (0.5, 3), (1.0, 3))
TRIALS = 10
GROUPS = ("kv", "clc", "walrus")


def probe_timeout(interval: float) -> float:
    """One probe's timeout under a setting (at most the interval)."""
    return min(interval, 0.4)


def _route_of(c: Cloud, node: str) -> str:
    return next(str(r["name"]) for r in c.layout.doc["routes"] if node in r["nodes"])


def _reports(c: Cloud) -> dict[str, dict[str, Any]]:
    import urllib.request

    req = urllib.request.Request(f"{c.layout.nodes['node-c'].admin}/v1/status")
    req.add_header("Authorization", f"Bearer {c.token}")
    with urllib.request.urlopen(req, timeout=3) as resp:
        return {r["name"]: r for r in json.loads(resp.read()).get("routes", [])}


def _events(c: Cloud) -> list[dict[str, Any]]:
    proc = ctl(c.root, "describe-services", "-o", "json", "--events")
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return list(json.loads(proc.stdout)["events"])


def _configure(c: Cloud, interval: float, threshold: int) -> None:
    """Restart node-c with every route probed every `interval` s, `threshold` rounds to DOWN."""
    path = c.layout.nodes["node-c"].config
    cfg = yaml.safe_load(path.read_text())
    for r in cfg["routes"]:
        r.update(interval=interval, threshold=threshold, recover=3, timeout=probe_timeout(interval))
    cli("down", "--dir", str(c.root), "--node", "node-c")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli("up", "--dir", str(c.root), "--node", "node-c")
    c.wait(lambda: all(r["state"] == "UP" for r in _reports(c).values()), 30.0, "routes UP")
    c.wait_ha(GROUPS)


def _trial(c: Cloud) -> dict[str, float]:
    c.wait_ha(GROUPS)
    primary = c.primary_node("kv")
    backup = c.other_node(primary)
    name = _route_of(c, primary)
    t0 = time.time()
    route_targets.control(c.root, [name], up=False)
    try:
        c.wait(lambda: all(c.primary_node(g, via=backup) == backup for g in GROUPS), 30.0, "failover")
        evs = [e for e in _events(c) if e["ts"] >= t0]
    finally:
        route_targets.control(c.root, [name], up=True)
    down = min(
        e["ts"] for e in evs if e["service"] == "node-c.arbitrator" and f"route {name} DOWN" in e["cause"]
    )
    enabled = min(
        e["ts"]
        for e in evs
        if e["service"] == f"{backup}.kv" and e["new"] == "ENABLED" and e["old"] != "ENABLED"
    )
    c.wait(lambda: _reports(c)[name]["state"] == "UP", 30.0, f"{name} UP again")
    return {"detect": down - t0, "enabled": enabled - t0, "handover": enabled - down}


def run(trials: int = TRIALS) -> dict[str, Any]:
    out: dict[str, Any] = {"trials_per_setting": trials, "recover": 3, "settings": []}
    with cloud(ha=True) as c:
        for interval, threshold in SETTINGS:
            _configure(c, interval, threshold)
            res = [_trial(c) for _ in range(trials)]
            out["settings"].append(
                {
                    "interval_s": interval,
                    "threshold": threshold,
                    "interval_x_threshold_s": round(interval * threshold, 3),
                    "probe_timeout_s": probe_timeout(interval),
                    "detect_seconds": summary([r["detect"] for r in res]),
                    "backup_enabled_seconds": summary([r["enabled"] for r in res]),
                    "handover_seconds": summary([r["handover"] for r in res]),
                }
            )
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
