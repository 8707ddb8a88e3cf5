"""One seeded, deterministic simulation schedule: topology, faults, workload, checks.

Everything random comes from one `random.Random(seed)` (each process gets its own stream
drawn from it), every process has a `ManualClock` whose rate is off by at most the configured
drift bound, and nothing iterates over an unordered set, so a seed replays exactly, in any
Python process (`PYTHONHASHSEED` does not matter).

A schedule runs a fault phase (partitions full and partial, one-way link cuts, loss bursts,
process pauses, crashes with or without a supervisor's death certificate, restarts, a slow
machine that handles every message and timer late) with
clients writing throughout, then heals everything and lets the group settle. The checkers
run after every step; see `euca_runtime.sim.checkers`.
"""

from __future__ import annotations

import heapq
import math
import random
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from typing import Any

from euca_runtime.clock import ManualClock
from euca_runtime.lease import DeathCertificate, LeaseConfig
from euca_runtime.replication import ReplicationConfig, SnapshotChunk
from euca_runtime.sim.checkers import SafetyChecker, Violation
from euca_runtime.sim.network import NetworkParams, SimNetwork
from euca_runtime.sim.node import ClientWrite, Factories, Host, NodeTiming, SimNode
from euca_runtime.sim.variants import VARIANTS

GROUP = "kv"

TOPOLOGIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (voters, data members). Two data nodes plus an arbitrator is the default HA cloud.
    "3v-2d": (("node-a", "node-b", "arb-1"), ("node-a", "node-b")),
    "3v-3d": (("node-a", "node-b", "node-c"), ("node-a", "node-b", "node-c")),
    "5v-2d": (("node-a", "node-b", "arb-1", "arb-2", "arb-3"), ("node-a", "node-b")),
    "5v-3d": (("node-a", "node-b", "node-c", "arb-1", "arb-2"), ("node-a", "node-b", "node-c")),
    # Voter-set changes (I3), during the faults: the bootstrap voters, then the operator's target.
    # Nodes only in the target join the running cloud (joining voter, no known configuration).
    "1v>3v-2d": (("node-a",), ("node-a", "node-b")),
    "3v>5v-2d": (("node-a", "node-b", "arb-1"), ("node-a", "node-b")),
    "3v>1v-3d": (("node-a", "node-b", "node-c"), ("node-a", "node-b", "node-c")),
    "5v>3v-2d": (("node-a", "node-b", "arb-1", "arb-2", "arb-3"), ("node-a", "node-b")),
    "3v>3v'-2d": (("node-a", "node-b", "arb-1"), ("node-a", "node-b")),
}
RECONFIGS: dict[str, tuple[str, ...]] = {
    # name: the voter set the operator moves the group to.
    "1v>3v-2d": ("node-a", "node-b", "arb-1"),
    "3v>5v-2d": ("node-a", "node-b", "arb-1", "arb-2", "arb-3"),
    "3v>1v-3d": ("node-c",),
    "5v>3v-2d": ("node-a", "node-b", "arb-3"),
    "3v>3v'-2d": ("node-a", "node-b", "arb-2"),
}


@dataclass(frozen=True)
class SimConfig:
    variant: str = "correct"
    topology: str | None = None
    """None: chosen by the seed."""
    fault_time: float = 10.0
    settle_time: float = 15.0
    lease: LeaseConfig = field(default_factory=lambda: LeaseConfig(duration=1.0, max_drift=0.02))
    replication: ReplicationConfig = field(
        default_factory=lambda: ReplicationConfig(batch=16, join_lag=16, drop_after=0.5, catch_up_retry=0.3)
    )
    timing: NodeTiming = field(default_factory=NodeTiming)
    log_retention: int = 40
    write_rate: float | None = None
    """Client writes per simulated second; None: chosen by the seed (3 to 15)."""
    fault_rate: float | None = None
    """Faults per simulated second during the fault phase; None: chosen by the seed (0.5 to 2.5)."""
    death_certificates: bool = True
    faults: bool = True
    """False: no random faults (a scenario such as `slow_machine` alone)."""
    slow_machine: tuple[float, float] | None = None
    """(start, end) in simulated seconds of a "slow machine" phase: every process handles each
    message and each timer late by a random `slow_delay` (a host at load 30-40). None: the
    random fault phase may still start one (fault kind ``slow``)."""
    slow_delay: tuple[float, float] = (0.5, 5.0)
    """How late a slow machine handles each message (seconds, uniform)."""
    slow_timer_delay: tuple[float, float] = (0.0, 1.0)
    """How late a slow machine's timers (the HA tick) fire (seconds, uniform)."""
    slow_kill_holder: bool = False
    """Power off the writer as the slow phase starts (no death certificate; it restarts when
    the phase ends): a failover that must complete while every process is slow."""


@dataclass
class ScheduleResult:
    seed: int
    variant: str
    topology: str
    violations: list[Violation]
    failovers: int
    elections: int
    acked: int
    events: int
    sim_time: float
    converged: bool
    faults: list[str]
    digest: int
    stats: dict[str, int] = field(default_factory=dict)
    """Messages sent by type, faults by kind, and divergent suffixes discarded."""
    recovery: float | None = None
    """With `SimConfig.slow_machine`: simulated seconds from the end of the slow phase (from its
    start with `slow_kill_holder`) until a process is the writer (None: never)."""
    slow_epochs: int = 0
    """With `SimConfig.slow_machine`: how far the highest epoch any process campaigned for or
    held rose from the start of the slow phase until that writer."""

    @property
    def ok(self) -> bool:
        return not self.violations

    def describe(self) -> str:
        lines = [
            f"seed {self.seed} ({self.variant}, {self.topology}): "
            f"{'ok' if self.ok else 'FAILED'}; {self.failovers} failovers, {self.acked} acked writes, "
            f"{self.events} events, {self.sim_time:.2f}s simulated, converged={self.converged}",
            *[f"  {v}" for v in self.violations],
            f"  replay: .venv/bin/python -m euca_runtime.sim --seed {self.seed} "
            f"--variant {self.variant} --trace  (or EUCA_SIM_SEED={self.seed} "
            f"EUCA_SIM_VARIANT={self.variant} EUCA_SIM_TRACE=1 "
            ".venv/bin/pytest tests/sim -k replay_env_seed -s)",
        ]
        return "\n".join(lines)


# Event kinds, in heap entries (time, order, kind, payload).
_DELIVER, _TICK, _ACTION = 0, 1, 2


class World(Host):
    def __init__(
        self, seed: int, config: SimConfig | None = None, trace: Callable[[str], None] | None = None
    ):
        self.seed = seed
        self.config = cfg = config or SimConfig()
        self.rng = random.Random(seed)
        self.trace = trace
        self.topology = cfg.topology or self.rng.choice(sorted(TOPOLOGIES))
        voters, members = TOPOLOGIES[self.topology]
        self.bootstrap = voters
        self.target: tuple[str, ...] = RECONFIGS.get(self.topology, voters)
        """The voter set the group must end up with."""
        self.breaks, self.factories = VARIANTS[cfg.variant]
        self.fault_rate = cfg.fault_rate or self.rng.choice([0.5, 0.8, 0.8, 1.5, 2.5])
        self.write_rate = cfg.write_rate or self.rng.choice([3.0, 6.0, 6.0, 15.0])
        self.network = SimNetwork(random.Random(self.rng.getrandbits(64)), NetworkParams.random(self.rng))
        self.checker = SafetyChecker()
        self.time = 0.0
        self._heap: list[tuple[float, int, int, Any]] = []
        self._order = 0
        self.nodes: dict[str, SimNode] = {}
        self._backlog: dict[str, list[tuple[str, Any]]] = {}
        self._tick_token: dict[str, int] = {}
        self.events = 0
        self.elections = 0
        self.ready_primaries: list[tuple[float, str, int]] = []
        self.faults: list[str] = []
        self._digest = 0
        self._next_write = 0
        self.stats: Counter[str] = Counter()
        self.slow_until = -1.0
        """Until then every process handles messages and timers late (a slow machine)."""
        self._slow_rng = random.Random(self.rng.getrandbits(64))
        self._slow_epoch = 0
        self._slow_mark = math.inf
        self.recovery: float | None = None
        self.slow_epochs = 0
        names = sorted(set(voters) | set(members) | set(self.target))
        for name in names:
            self.nodes[name] = self._make_node(name, voters, members, self.factories)
            self._backlog[name] = []
            self._tick_token[name] = 0

    # -- construction

    def _new_clock(self) -> ManualClock:
        drift = self.config.lease.max_drift
        return ManualClock(
            start=self.rng.uniform(100.0, 100_000.0), rate=self.rng.uniform(1 - drift, 1 + drift)
        )

    def _make_node(
        self, name: str, voters: tuple[str, ...], members: tuple[str, ...], factories: Factories
    ) -> SimNode:
        cfg = self.config
        return SimNode(
            name,
            self,
            group=GROUP,
            voters=voters,
            members=members,
            joining=name not in voters,
            all_voters=self.target,
            lease=cfg.lease,
            replication=cfg.replication,
            timing=cfg.timing,
            rng=random.Random(self.rng.getrandbits(64)),
            clock=self._new_clock(),
            factories=factories,
            log_retention=cfg.log_retention,
        )

    # -- scheduling

    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._order += 1
        heapq.heappush(self._heap, (at, self._order, kind, payload))

    def _advance(self, to: float) -> None:
        dt = to - self.time
        if dt > 0:
            for n in self.nodes.values():
                n.clock.advance(dt)
            self.time = to

    def _mix(self, *parts: object) -> None:
        self._digest = zlib.crc32(repr(parts).encode(), self._digest)

    def _log(self, text: str) -> None:
        if self.trace is not None:
            self.trace(f"{self.time:9.4f} {text}")

    def _schedule_tick(self, node: SimNode, local_delay: float) -> None:
        token = self._tick_token[node.name]
        self._push(self.time + local_delay / node.clock.rate, _TICK, (node.name, token, False))

    def _jittered_tick(self, node: SimNode) -> float:
        t = self.config.timing.tick
        return t * node.rng.uniform(0.8, 1.2)

    # -- Host interface

    def send(self, src: str, dst: str, msg: Any) -> None:
        if dst not in self.nodes:
            return
        self.stats[type(msg).__name__] += 1
        for delay in self.network.delays(src, dst):
            self._push(self.time + delay, _DELIVER, (dst, src, msg, False))

    def acknowledged(self, node: SimNode, write: ClientWrite, epoch: int) -> None:
        self.checker.on_acknowledged(write)
        self._mix("ack", write.write_id, node.name, epoch)
        self._log(f"{node.name} acknowledged write {write.write_id} (epoch {epoch})")

    def elected(self, node: SimNode, epoch: int) -> None:
        self.elections += 1
        self.checker.on_elected(node, epoch, self.time)
        self._mix("elected", node.name, epoch, round(self.time, 9))
        self._log(f"{node.name} elected at epoch {epoch}")

    def note(self, node: SimNode, text: str) -> None:
        self._log(f"{node.name} {text}")

    def primary_ready(self, node: SimNode, epoch: int) -> None:
        self.ready_primaries.append((self.time, node.name, epoch))
        self.checker.check_new_primary(node, epoch, self.time)
        self._log(f"{node.name} ready as primary at epoch {epoch} (seq {node.store.last_seq})")

    # -- faults

    def _pick(self, prefer_primary: bool = True) -> SimNode:
        serving = [n for n in self.nodes.values() if n.serving()]
        if prefer_primary and serving and self.rng.random() < 0.6:
            return serving[0]
        return self.nodes[self.rng.choice(sorted(self.nodes))]

    def _fault(self) -> None:
        rng = self.rng
        names = sorted(self.nodes)
        kind = rng.choices(
            ["partition", "one_way", "isolate", "pause", "crash", "loss", "heal", "switchover", "slow"],
            weights=[3, 3, 2, 3, 3, 1, 1, 2, 1],
        )[0]
        duration = rng.uniform(0.2, 3.0)
        if kind == "partition":
            side = {n for n in names if rng.random() < 0.5}
            if not side or len(side) == len(names):
                side = {rng.choice(names)}
            links = [(a, b) for a in names for b in names if (a in side) != (b in side)]
            desc = f"partition {sorted(side)} | rest for {duration:.2f}s"
            self._cut_for(links, duration)
        elif kind == "one_way":
            a, b = rng.sample(names, 2)
            desc = f"cut {a} -> {b} for {duration:.2f}s"
            self._cut_for([(a, b)], duration)
        elif kind == "isolate":
            target = self._pick().name
            inbound = rng.random() < 0.5
            links = [(o, target) if inbound else (target, o) for o in names if o != target]
            desc = f"cut all {'into' if inbound else 'out of'} {target} for {duration:.2f}s"
            self._cut_for(links, duration)
        elif kind == "pause":
            node = self._pick()
            if not node.up or node.paused:
                return
            node.paused = True
            self._tick_token[node.name] += 1
            desc = f"pause {node.name} for {duration:.2f}s"
            self._push(self.time + duration, _ACTION, partial(self._resume, node))
        elif kind == "crash":
            node = self._pick()
            if not node.up:
                return
            epoch = node.holder_epoch()
            certify = self.config.death_certificates and epoch is not None and rng.random() < 0.6
            self._crash(node)
            if certify and epoch is not None:
                for v in node.all_voters:
                    self.send(
                        node.name, v, DeathCertificate(GROUP, node.name, epoch, f"supervisor@{node.name}")
                    )
            desc = f"crash {node.name}{' (death certificate)' if certify else ''}, restart in {duration:.2f}s"
            self._push(self.time + duration, _ACTION, partial(self._restart, node))
        elif kind == "loss":
            self.network.extra_loss = rng.uniform(0.2, 0.6)
            desc = f"loss burst {self.network.extra_loss:.2f} for {duration:.2f}s"
            self._push(self.time + duration, _ACTION, self._end_loss)
        elif kind == "switchover":
            serving = [n for n in self.nodes.values() if n.serving()]
            others = sorted(n.name for n in self.nodes.values() if n.is_data and n not in serving)
            if len(serving) != 1 or not others:
                return
            target = rng.choice(others)
            if not serving[0].start_handover(target):
                return
            desc = f"switchover {serving[0].name} -> {target}"
        elif kind == "slow":
            self.slow_until = max(self.slow_until, self.time + duration)
            desc = f"slow machine for {duration:.2f}s"
        else:
            self.network.heal_all()
            desc = "heal network"
        self.stats[f"fault:{kind}"] += 1
        self.faults.append(f"{self.time:.3f} {desc}")
        self._log(f"FAULT {desc}")

    def _reconfigure(self, voters: tuple[str, ...]) -> None:
        """The operator rewrites every node's voter list and reloads it (no restart)."""
        self.target = voters
        for node in self.nodes.values():
            node.set_target(voters)
        self.stats["reconfigure"] += 1
        self.faults.append(f"{self.time:.3f} reconfigure voters -> {list(voters)}")
        self._log(f"RECONFIGURE voters -> {list(voters)}")

    def _max_epoch(self) -> int:
        return max((n.candidate.epoch for n in self.nodes.values() if n.candidate is not None), default=0)

    def _slow_start(self, end: float) -> None:
        self.slow_until = end
        self._slow_epoch = self._max_epoch()
        self._slow_mark = end
        self.stats["fault:slow"] += 1
        self.faults.append(f"{self.time:.3f} slow machine until {end:.3f}")
        self._log(f"FAULT slow machine until {end:.3f}")
        if self.config.slow_kill_holder:
            self._slow_mark = self.time
            for node in [n for n in self.nodes.values() if n.is_writer()]:
                self._crash(node)
                self.faults.append(f"{self.time:.3f} power off {node.name}, restart at {end:.3f}")
                self._log(f"FAULT power off {node.name}")
                self._push(end, _ACTION, partial(self._restart, node))

    def _slow_late(self, kind: int, payload: tuple[Any, ...]) -> bool:
        """A slow machine handles this message or timer later: queue it again, once."""
        if kind not in (_DELIVER, _TICK) or self.time >= self.slow_until or payload[-1]:
            return False
        late = self.config.slow_delay if kind == _DELIVER else self.config.slow_timer_delay
        self._push(self.time + self._slow_rng.uniform(*late), kind, (*payload[:-1], True))
        return True

    def _end_loss(self) -> None:
        self.network.extra_loss = 0.0

    def _cut_for(self, links: list[tuple[str, str]], duration: float) -> None:
        done = self.network.cut(links)
        self._push(self.time + duration, _ACTION, partial(self.network.heal, done))

    def _crash(self, node: SimNode) -> None:
        node.crash()
        node.paused = False
        self._backlog[node.name].clear()
        self._tick_token[node.name] += 1

    def _restart(self, node: SimNode) -> None:
        if node.up:
            return
        node.clock = self._new_clock()  # a reboot starts a new monotonic clock
        node.start()
        self._tick_token[node.name] += 1
        self._schedule_tick(node, self._jittered_tick(node))
        self._log(f"restart {node.name}")

    def _resume(self, node: SimNode) -> None:
        if not node.up or not node.paused:
            return
        node.paused = False
        self._log(f"resume {node.name} ({len(self._backlog[node.name])} queued)")
        backlog, self._backlog[node.name] = self._backlog[node.name], []
        for src, msg in backlog:
            node.deliver(src, msg)
            self._check()
        self._tick_token[node.name] += 1
        node.tick()
        self._schedule_tick(node, self._jittered_tick(node))

    def _heal_everything(self) -> None:
        self.network.heal_all()
        if self.config.slow_machine is None:
            self.slow_until = min(self.slow_until, self.time)
        for node in self.nodes.values():
            if not node.up:
                self._restart(node)
            elif node.paused:
                self._resume(node)
        self._log("HEAL everything")

    def _client_write(self) -> None:
        self._next_write += 1
        write = ClientWrite(self._next_write, f"w{self._next_write}", self._next_write)
        data = [n for n in self.nodes.values() if n.is_data]
        serving = [n for n in data if n.serving()]
        node = serving[0] if serving and self.rng.random() < 0.85 else self.rng.choice(data)
        self._deliver(node, "client", write)

    # -- the loop

    def _deliver(self, node: SimNode, src: str, msg: Any) -> None:
        if not node.up:
            return
        if node.paused:
            self._backlog[node.name].append((src, msg))
            return
        if isinstance(msg, SnapshotChunk) and msg.last:
            self._note_transfer(node, src, msg)
        node.deliver(src, msg)

    def _note_transfer(self, node: SimNode, src: str, msg: SnapshotChunk) -> None:
        """Count state transfers that will discard a divergent suffix (for coverage stats)."""
        if node.store.fence_epoch > msg.epoch or (node.store.last_seq, node.store.last_epoch) != (
            msg.for_seq,
            msg.for_epoch,
        ):
            return
        self.stats["state_transfer_installed"] += 1
        if msg.for_seq > msg.seq or self.nodes[src].store.epoch_at(msg.for_seq) not in (
            None,
            msg.for_epoch,
        ):
            self.stats["divergent_suffix_discarded"] += 1

    def _check(self) -> None:
        self.checker.check_single_writer(self.nodes.values(), self.time)
        slow = self.config.slow_machine
        if slow is not None and self.recovery is None and self.time >= self._slow_mark:
            if any(n.is_writer() for n in self.nodes.values()):
                self.recovery = self.time - self._slow_mark
                self.slow_epochs = self._max_epoch() - self._slow_epoch

    def _settled(self) -> SimNode | None:
        serving = [n for n in self.nodes.values() if n.serving()]
        if len(serving) != 1:
            return None
        p = serving[0].primary
        assert p is not None
        members = {n.name for n in self.nodes.values() if n.is_data}
        if p.recorded != members or p.proposed is not None or serving[0].pending:
            return None
        if any(p.lag(m) != 0 for m in sorted(members - {serving[0].name})):
            return None
        cand = serving[0].candidate
        assert cand is not None
        cfg = cand.voter_config
        if cfg is None or cfg.joint or cfg.sets[0] != frozenset(self.target) or cand.config_pending:
            return None  # the voter-set change has not completed
        return serving[0]

    def run(self) -> ScheduleResult:
        cfg = self.config
        for node in self.nodes.values():
            node.start()
            self._schedule_tick(node, node.rng.uniform(0.0, cfg.timing.tick))
        t = 0.0 if cfg.faults else cfg.fault_time
        while cfg.faults:
            t += self.rng.expovariate(self.fault_rate)
            if t >= cfg.fault_time:
                break
            self._push(t, _ACTION, self._fault)
        if self.topology in RECONFIGS:
            final, first = self.target, self.bootstrap
            self.target = first
            at = self.rng.uniform(0.3, cfg.fault_time * 0.6)
            self._push(at, _ACTION, partial(self._reconfigure, final))
            if self.rng.random() < 0.25:  # the operator changes their mind, maybe mid-change
                self._push(self.rng.uniform(at, cfg.fault_time), _ACTION, partial(self._reconfigure, first))
        t = 0.0
        write_until = cfg.fault_time + cfg.settle_time / 3
        while True:
            t += self.rng.expovariate(self.write_rate)
            if t >= write_until:
                break
            self._push(t, _ACTION, self._client_write)
        self._push(cfg.fault_time, _ACTION, self._heal_everything)
        if cfg.slow_machine is not None:
            self._push(cfg.slow_machine[0], _ACTION, partial(self._slow_start, cfg.slow_machine[1]))
        end = cfg.fault_time + cfg.settle_time
        settled: SimNode | None = None
        while self._heap:
            at, _, kind, payload = heapq.heappop(self._heap)
            if at > end:
                break
            self._advance(at)
            if self._slow_late(kind, payload):
                continue
            self.events += 1
            if kind == _DELIVER:
                dst, src, msg, _ = payload
                self._deliver(self.nodes[dst], src, msg)
            elif kind == _TICK:
                name, token, _ = payload
                node = self.nodes[name]
                if token != self._tick_token[name] or not node.up or node.paused:
                    continue
                node.tick()
                self._schedule_tick(node, self._jittered_tick(node))
            else:
                payload()
            self._check()
            if kind == _TICK and at > write_until:
                settled = self._settled()
                if settled is not None:
                    break
        converged = settled is not None
        if settled is None:
            serving = [n for n in self.nodes.values() if n.serving()]
            settled = serving[0] if len(serving) == 1 else None
        in_sync: list[SimNode] = []
        if settled is not None and settled.primary is not None and settled.primary.recorded is not None:
            in_sync = [self.nodes[m] for m in sorted(settled.primary.recorded) if m != settled.name]
        self.checker.check_final(settled, in_sync, self.time)
        if not converged and self.checker.ok and settled is not None:
            self.checker.fail("liveness", self.time, "group did not settle with every member in sync")
        for n in sorted(self.nodes):
            self._mix("final", n, self.nodes[n].store.last_seq, self.nodes[n].store.last_epoch)
        primaries = [name for _, name, _ in self.ready_primaries]
        failovers = sum(1 for a, b in pairwise(primaries) if a != b)
        return ScheduleResult(
            seed=self.seed,
            variant=cfg.variant,
            topology=self.topology,
            violations=list(self.checker.violations),
            failovers=failovers,
            elections=self.elections,
            acked=len(self.checker.acked),
            events=self.events,
            sim_time=self.time,
            converged=converged,
            faults=list(self.faults),
            digest=self._digest,
            stats=dict(sorted(self.stats.items())),
            recovery=self.recovery,
            slow_epochs=self.slow_epochs,
        )


def run_schedule(
    seed: int, config: SimConfig | None = None, trace: Callable[[str], None] | None = None
) -> ScheduleResult:
    """Run one schedule and return what the checkers found."""
    return World(seed, config, trace).run()
