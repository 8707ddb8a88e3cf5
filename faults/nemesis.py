"""Nemeses: real faults on testbed hosts, and seeded schedules of them.

Network and machine faults use the testbed's fault verbs (`testbed.bed`: kill/start, pause/
resume, partition, isolate, degrade, heal, cut-upstream/restore-upstream). Faults inside a host
go over SSH with Fabric (`faults.observe.Hosts`): find the runtime's main pid, `kill -9` it, or
`SIGSTOP` it for longer than the lease and `SIGCONT` it.

A `Fault` has `start` and `stop`; `stop` undoes exactly what `start` did (and `heal_all` undoes
everything, whatever state a failed step left). Every action is an entry in the history
(process ``nemesis``), with the target and what it found (the primary, its pid, the epoch).
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from faults.history import FAILED, OK, History
from faults.observe import Hosts, any_groups
from testbed import bed as tb
from testbed.model import TestbedError

log = logging.getLogger("faults.nemesis")

RUNTIME_PATTERN = r"euca-runtime serve"
TARGET_GROUPS = ("clc", "walrus")
# The topology the runner deploys: h1, h2 primary/backup of every group, h3 arbitrator + nc.
DATA_HOSTS = ("h1", "h2")
WITNESS = "h3"


@dataclass
class Ctx:
    bed: str
    hosts: Hosts
    names: list[str]
    history: History
    rnd: random.Random


@dataclass
class Fault:
    """One fault; `params` fixed by the schedule, `found` filled in by `start`."""

    kind: str
    duration: float
    group: str = "clc"
    params: dict[str, Any] = field(default_factory=dict)
    found: dict[str, Any] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _halt: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "duration": self.duration, "group": self.group, **self.params}

    # ------------------------------------------------------------------ primary

    def _primary(self, ctx: Ctx) -> tuple[str, int | None]:
        """(host of the group's ENABLED instance, its epoch); (h1, None) when no host names one
        (the group has no primary right now: the fault still hits h1)."""
        for g in any_groups(ctx.hosts, ctx.names) or []:
            if g.get("group") == self.group and len(g.get("enabled") or []) == 1:
                name = g["enabled"][0]
                node = next((str(i["node"]) for i in g["instances"] if i["name"] == name), None)
                if node:
                    return node, int(g.get("epoch") or 0)
        return DATA_HOSTS[0], None

    def start(self, ctx: Ctx) -> None:
        primary, epoch = self._primary(ctx)
        other = next(h for h in DATA_HOSTS if h != primary)
        self.found = {"primary": primary, "backup": other}
        if epoch is not None:
            self.found["epoch_before"] = epoch
        else:
            self.found["primary_unknown"] = True
        match self.kind:
            case "kill9" | "sigstop":
                pid = ctx.hosts.runtime_pid(primary)
                self.found["pid"] = pid
                if pid is None:
                    raise TestbedError(f"no euca-runtime main pid on {primary}")
                sig = "KILL" if self.kind == "kill9" else "STOP"
                rc, out = ctx.hosts.run(primary, f"kill -{sig} {pid}")
                if rc != 0:
                    raise TestbedError(f"kill -{sig} {pid} on {primary}: {out}")
            case "pause":
                self.found["pids"] = tb.pause(ctx.bed, primary, RUNTIME_PATTERN)
            case "machine-kill":
                tb.kill(ctx.bed, primary)
            case "partition-backup":
                tb.partition(ctx.bed, [primary], [other])
            case "partition-voters":
                tb.partition(ctx.bed, [primary], [WITNESS])  # the data path to the backup stays up
            case "isolate":
                target = str(self.params.get("host") or primary)
                self.found["host"] = target
                tb.isolate(ctx.bed, target)
            case "degrade":
                target = str(self.params.get("host") or primary)
                self.found["host"] = target
                tb.degrade(ctx.bed, target, float(self.params["delay_ms"]), float(self.params["loss_pct"]))
            case "user-route":
                # The primary's own link to the users' side: its route watcher (the demo
                # topology's users-h1 / users-h2, nodes: [itself]) sees the route DOWN and the
                # host's primaries hand over to the backup, whose route works.
                tb.cut_upstream(ctx.bed, primary)
            case "flap":
                self._thread = threading.Thread(target=self._flap, args=(ctx, primary, other), daemon=True)
                self._thread.start()
            case _:
                raise ValueError(f"unknown fault {self.kind!r}")

    def _flap(self, ctx: Ctx, a: str, b: str) -> None:
        period = float(self.params.get("period", 1.0))
        for i in range(int(self.duration / period) + 1):
            if self._halt.is_set():
                break
            try:
                if i % 2 == 0:
                    tb.partition(ctx.bed, [a], [b])
                else:
                    tb.heal(ctx.bed)
            except TestbedError as exc:
                log.warning("flap step failed", extra={"error": str(exc)})
            self._halt.wait(period)

    def stop(self, ctx: Ctx) -> None:
        primary = str(self.found.get("primary", DATA_HOSTS[0]))
        match self.kind:
            case "kill9":
                # systemd restarts it (Restart=on-failure); make sure it runs.
                ctx.hosts.run(primary, "systemctl start euca-runtime")
            case "sigstop":
                ctx.hosts.run(primary, f"kill -CONT {self.found.get('pid')}")
            case "pause":
                tb.resume(ctx.bed, primary)
            case "machine-kill":
                tb.start(ctx.bed, primary)
            case "user-route":
                tb.restore_upstream(ctx.bed, primary)
            case "flap":
                self._halt.set()
                if self._thread is not None:
                    self._thread.join(timeout=60)
                tb.heal(ctx.bed)
            case _:
                tb.heal(ctx.bed)


NETWORK = ("partition-backup", "partition-voters", "isolate", "degrade", "user-route")
PROCESS = ("kill9", "sigstop", "pause", "machine-kill")
ALL = (*PROCESS, *NETWORK, "flap")


def make_fault(kind: str, rnd: random.Random, duration: float | None = None) -> Fault:
    group = rnd.choice(TARGET_GROUPS)
    d = duration if duration is not None else round(rnd.uniform(4.0, 10.0), 1)
    params: dict[str, Any] = {}
    if kind == "degrade":
        params = rnd.choice([{"delay_ms": 50, "loss_pct": 1}, {"delay_ms": 200, "loss_pct": 5}])
    elif kind == "isolate":
        params = {"host": rnd.choice(["", *DATA_HOSTS, WITNESS]) or None}
    elif kind == "flap":
        params = {"period": rnd.choice([0.5, 1.0, 2.0])}
    elif kind == "sigstop":
        d = max(d, 3.0)  # longer than the lease (1 s by default)
    return Fault(kind, d, group, params)


def random_schedule(seed: int, duration: float, max_steps: int = 500) -> list[list[Fault]]:
    """Steps until their faults add up to `duration` seconds; each step is one fault, or a process
    fault and a network fault at once (30 %)."""
    rnd = random.Random(seed)
    out: list[list[Fault]] = []
    total = 0.0
    while total < duration and len(out) < max_steps:
        if rnd.random() < 0.3:
            d = round(rnd.uniform(4.0, 10.0), 1)
            out.append([make_fault(rnd.choice(PROCESS), rnd, d), make_fault(rnd.choice(NETWORK), rnd, d)])
        else:
            out.append([make_fault(rnd.choice(ALL), rnd)])
        total += max(f.duration for f in out[-1])
    return out


def named_schedule(kinds: list[str], seed: int, duration: float = 6.0) -> list[list[Fault]]:
    rnd = random.Random(seed)
    return [[make_fault(k, rnd, duration)] for k in kinds]


def _note(ctx: Ctx, f: Fault, t0: float, phase: str, error: str | None = None) -> None:
    extra = {**f.describe(), **f.found, "phase": phase}
    result = OK if error is None else FAILED
    ctx.history.record("nemesis", f"nemesis.{f.kind}", f.group, None, t0, result, error, **extra)


def run_step(ctx: Ctx, faults: list[Fault]) -> dict[str, Any]:
    """Start every fault of a step, hold them for the step's duration, stop them (always)."""
    started: list[Fault] = []
    duration = max(f.duration for f in faults)
    t_start = ctx.history.now()
    try:
        for f in faults:
            t0 = ctx.history.now()
            try:
                f.start(ctx)
            except TestbedError as exc:
                _note(ctx, f, t0, "start", str(exc))
                continue
            started.append(f)
            _note(ctx, f, t0, "start")
        threading.Event().wait(duration)  # the fault's duration is part of the schedule
    finally:
        for f in reversed(started):
            t0 = ctx.history.now()
            try:
                f.stop(ctx)
                _note(ctx, f, t0, "stop")
            except TestbedError as exc:
                _note(ctx, f, t0, "stop", str(exc))
    return {
        "faults": [{**f.describe(), **f.found} for f in faults],
        "started": [f.kind for f in started],
        "at": t_start,
        "healed_at": ctx.history.now(),
    }


def heal_all(ctx: Ctx) -> list[str]:
    """Undo every fault whatever state the run left: network faults, paused processes, stopped
    hosts, stopped or SIGSTOPped runtimes. Returns what it had to do."""
    did: list[str] = []
    t0 = ctx.history.now()
    try:
        status = tb.status(ctx.bed)[0]
    except TestbedError as exc:
        return [f"status: {exc}"]
    if status["faults"]:
        tb.heal(ctx.bed)
        did.append("heal " + ",".join(f["kind"] for f in status["faults"]))
    for h in status["hosts"]:
        if h["state"] == "stopped":
            tb.start(ctx.bed, h["name"])
            did.append(f"start {h['name']}")
        elif h["paused_pids"]:
            tb.resume(ctx.bed, h["name"])
            did.append(f"resume {h['name']}")
    for h in ctx.names:
        # SIGCONT the runtime's main process (a no-op unless a sigstop was left), start the unit.
        pid = ctx.hosts.runtime_pid(h)
        cont = f"kill -CONT {pid}; " if pid else ""
        rc, _ = ctx.hosts.run(h, cont + "systemctl start euca-runtime")
        if rc not in (0, 1):
            did.append(f"{h}: ssh failed ({rc})")
    ctx.history.record("nemesis", "nemesis.heal-all", None, None, t0, OK, did=did)
    return did
