"""A simulated runtime process: the glue the real network node also has to write.

It wires one group's `Candidate`, `ReplicationPrimary`/`ReplicationBackup` and (on voter
hosts) a `Voter` together, the same way the asyncio node does: lease events create and
discard the primary, the primary's in-sync proposals go to the voters through the candidate,
a higher epoch seen anywhere deposes us, and a write is accepted only while
`Candidate.is_writer(now)` and acknowledged only at `commit_seq`.

Durable state (the voter's `VoterStorage` and the replica's `ReplicaStore`) lives on the
`SimNode` and survives `crash()`; everything else is rebuilt by `start()`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from euca_runtime.clock import ManualClock
from euca_runtime.lease import (
    Candidate,
    ConfigRecorded,
    ConfigReply,
    ConfigUpdate,
    DeathCertificate,
    Elected,
    InSyncRecorded,
    InSyncReply,
    InSyncUpdate,
    LeaseConfig,
    LeaseRelease,
    LeaseReply,
    LeaseRequest,
    MemoryVoterStorage,
    Role,
    SteppedDown,
    Voter,
    VoterStorage,
)
from euca_runtime.replication import (
    CatchUpRequest,
    Fenced,
    FencedError,
    MemoryReplicaStore,
    Replicate,
    ReplicateAck,
    ReplicationBackup,
    ReplicationConfig,
    ReplicationPrimary,
    Send,
    SnapshotChunk,
    SnapshotPull,
    kv_put,
)

VOTER_MESSAGES = (LeaseRequest, LeaseRelease, DeathCertificate, InSyncUpdate, ConfigUpdate)


@dataclass(frozen=True, slots=True)
class ClientWrite:
    """A client's write of a unique key (the simulation's workload)."""

    write_id: int
    key: str
    value: int


@dataclass(frozen=True, slots=True)
class Takeover:
    """Planned switchover: the old holder released the lease for the target (the real node's
    ``_node/takeover`` request), telling it its epoch and the voter configuration it pinned."""

    epoch: int
    config_version: tuple[int, int] | None
    config_sets: tuple[tuple[str, ...], ...]


HANDOVER_TIMEOUT = 1.0
"""A planned switchover whose target has not caught up by then is abandoned (the holder keeps
the lease), like `eucactl switchover`'s timeout."""


@dataclass
class Factories:
    """How a node builds its protocol objects; broken variants substitute their own."""

    voter: Callable[..., Voter] = Voter
    candidate: Callable[..., Candidate] = Candidate
    primary: Callable[..., ReplicationPrimary] = ReplicationPrimary
    backup: Callable[..., ReplicationBackup] = ReplicationBackup
    voter_storage: Callable[[], VoterStorage] = MemoryVoterStorage
    forget_promises_on_restart: bool = False


class Host:
    """What a node needs from the world around it."""

    def send(self, src: str, dst: str, msg: Any) -> None:
        raise NotImplementedError

    def acknowledged(self, node: SimNode, write: ClientWrite, epoch: int) -> None:
        raise NotImplementedError

    def primary_ready(self, node: SimNode, epoch: int) -> None:
        raise NotImplementedError

    def elected(self, node: SimNode, epoch: int) -> None:
        raise NotImplementedError

    def note(self, node: SimNode, text: str) -> None:
        """Trace a protocol event (no effect unless tracing)."""


@dataclass(frozen=True)
class NodeTiming:
    tick: float = 0.1
    suspect_after: float = 0.35


class SimNode:
    """One runtime process hosting (part of) one service group."""

    def __init__(
        self,
        name: str,
        host: Host,
        *,
        group: str,
        voters: tuple[str, ...],
        members: tuple[str, ...],
        joining: bool = False,
        all_voters: tuple[str, ...] = (),
        lease: LeaseConfig,
        replication: ReplicationConfig,
        timing: NodeTiming,
        rng: random.Random,
        clock: ManualClock,
        factories: Factories,
        log_retention: int,
    ) -> None:
        self.name = name
        self.host = host
        self.group = group
        self.voters = voters
        """The bootstrap voter set (what a brand-new group starts with)."""
        self.members = members
        self.joining = joining
        """Added to the running cloud: a joining voter, and a candidate without a known config."""
        self.all_voters = tuple(sorted(set(voters) | set(all_voters)))
        self.target: tuple[str, ...] | None = None
        """The voter set the operator asked for (None: the bootstrap set)."""
        self.is_voter = name in self.all_voters
        self.is_data = name in members
        self.lease_config = lease
        self.repl_config = replication
        self.timing = timing
        self.rng = rng
        self.clock = clock
        self.factories = factories
        # Durable.
        self.voter_storage: VoterStorage = factories.voter_storage()
        self.store = MemoryReplicaStore(retention=log_retention, chunk_items=4)
        # Volatile.
        self.up = False
        self.paused = False
        self.incarnation = 0
        self.voter: Voter | None = None
        self.candidate: Candidate | None = None
        self.primary: ReplicationPrimary | None = None
        self.backup: ReplicationBackup | None = None
        self.pending: dict[int, ClientWrite] = {}
        self.next_campaign_at = 0.0
        self._noted_retry = 0.0
        self.announced_ready = False
        self.handing_over: tuple[str, float] | None = None
        """(target, deadline) of a planned switchover in progress: no new writes meanwhile."""

    # -- lifecycle

    def now(self) -> float:
        return self.clock.monotonic()

    def start(self) -> None:
        """(Re)start the process: durable state kept, volatile state rebuilt."""
        self.up, self.paused = True, False
        self.incarnation += 1
        now = self.now()
        if self.is_voter:
            if self.factories.forget_promises_on_restart and self.incarnation > 1:
                self.voter_storage = self.factories.voter_storage()
            self.voter = self.factories.voter(
                self.name, self.voter_storage, self.lease_config, now, joining=self.joining
            )
        if self.is_data:
            self.candidate = self.factories.candidate(
                self.name,
                self.group,
                None if self.joining else self.voters,
                self.lease_config,
                min_epoch=self.store.fence_epoch,
                probe_voters=self.all_voters,
                rng=self.rng,
            )
            if self.target is not None:
                self.candidate.set_target(self.target)
            self.primary = None
            self.backup = self.factories.backup(self.name, self.group, self.store, self.repl_config)
            self.pending = {}
            self.announced_ready = False
            self.next_campaign_at = now + self.rng.uniform(0.0, self.timing.suspect_after)

    def set_target(self, voters: tuple[str, ...]) -> None:
        """The operator changed the voter set (a configuration reload)."""
        self.target = voters
        if self.candidate is not None:
            self.candidate.set_target(voters)

    def crash(self) -> None:
        self.up = False
        self.handing_over = None
        self.voter = self.candidate = None
        self.primary = self.backup = None
        self.pending = {}

    def holder_epoch(self) -> int | None:
        """The epoch this process holds as lease holder (for a supervisor's death certificate)."""
        c = self.candidate
        return c.epoch if c is not None and c.role is Role.HOLDER else None

    def is_writer(self) -> bool:
        return self.up and self.candidate is not None and self.candidate.is_writer(self.now())

    def serving(self) -> bool:
        return self.is_writer() and self.primary is not None and self.primary.ready

    def start_handover(self, target: str) -> bool:
        """Planned switchover to `target` (DESIGN.md section 6): stop taking writes, wait until
        `target` has everything (see `_drive_handover`), release, tell it to campaign."""
        p = self.primary
        if not self.serving() or self.handing_over is not None or p is None or target == self.name:
            return False
        if p.recorded is None or target not in p.recorded:
            return False  # the real node refuses a target outside the in-sync set
        self.handing_over = (target, self.now() + HANDOVER_TIMEOUT)
        self._drive_handover(self.now())
        return True

    def _drive_handover(self, now: float) -> None:
        if self.handing_over is None:
            return
        target, deadline = self.handing_over
        p, cand = self.primary, self.candidate
        if p is None or cand is None or not cand.is_writer(now) or now > deadline:
            self.handing_over = None  # lost the lease meanwhile, or timed out: keep serving
            return
        peer = p.peers.get(target)
        if peer is None or peer.acked < self.store.last_seq or p.commit_seq < self.store.last_seq:
            return
        cfg = cand.voter_config
        hint = Takeover(
            cand.epoch,
            None if cfg is None else cfg.version,
            () if cfg is None else tuple(tuple(sorted(x)) for x in cfg.sets),
        )
        self.handing_over = None
        self.host.note(self, f"hands over to {target} (epoch {cand.epoch})")
        self._emit(cand.release(now))
        self.next_campaign_at = now + 4 * self.lease_config.duration  # let the target win
        self.host.send(self.name, target, hint)

    def _on_takeover(self, msg: Takeover, now: float) -> None:
        cand = self.candidate
        if cand is None or cand.role is not Role.FOLLOWER:
            return
        cand.max_seen = max(cand.max_seen, msg.epoch)
        if msg.config_version is not None:
            self._emit(cand._hear_config(msg.config_version, msg.config_sets, now))
        self.host.note(self, "takes over (planned switchover)")
        self._emit(cand.campaign(now, floor=self.store.fence_epoch))

    # -- plumbing

    def _emit(self, sends: list[Send]) -> None:
        for s in sends:
            self.host.send(self.name, s.to, s.msg)

    def _after_lease(self, now: float) -> None:
        """Turn lease events into replication roles; relay in-sync proposals and commits."""
        cand = self.candidate
        if cand is None:
            return
        lost = cand.role is Role.FOLLOWER and cand.failures and cand.retry_at > now
        if lost and cand.retry_at != self._noted_retry:
            self._noted_retry = cand.retry_at
            refusals = ", ".join(f"{r.voter}: {r.reason} {r.holder or ''}".strip() for r in cand.refusals())
            self.host.note(
                self,
                f"lost epoch {cand.epoch} ({cand.last_step_down}; {refusals or 'no refusal'}), "
                f"retry in {cand.retry_at - now:.3f}s",
            )
        for _ in range(4):
            events = cand.drain_events()
            if not events:
                break
            for ev in events:
                if isinstance(ev, Elected):
                    self._become_primary(ev.epoch, now)
                elif isinstance(ev, SteppedDown):
                    self.host.note(self, f"stepped down from epoch {ev.epoch}: {ev.reason}")
                    self._become_backup(now)
                elif isinstance(ev, ConfigRecorded):
                    cfg = ev.config
                    self.host.note(
                        self, f"voter config v{cfg.version} recorded: {[sorted(x) for x in cfg.sets]}"
                    )
                elif isinstance(ev, InSyncRecorded) and self.primary is not None:
                    self.host.note(self, f"in-sync set recorded: {sorted(ev.members)} (v{ev.version})")
                    if ev.epoch == self.primary.epoch:
                        self.primary.on_in_sync_recorded(ev.members)
        self._relay(now)

    def _become_primary(self, epoch: int, now: float) -> None:
        assert self.candidate is not None
        self.host.elected(self, epoch)
        try:
            self.primary = self.factories.primary(
                self.name, self.group, epoch, self.store, self.members, self.repl_config, now
            )
        except FencedError as exc:
            self._emit(self.candidate.observe_epoch(exc.fence, now))
            self.primary = None
            return
        self.backup = None
        self.pending = {}
        self.announced_ready = False

    def _become_backup(self, now: float) -> None:
        self.primary = None
        self.pending = {}
        if self.backup is None:
            self.backup = self.factories.backup(self.name, self.group, self.store, self.repl_config)
        self.next_campaign_at = max(self.next_campaign_at, now + self.rng.uniform(0.1, 0.3))

    def _relay(self, now: float) -> None:
        """Send the primary's in-sync proposal to the voters and report commits."""
        p, cand = self.primary, self.candidate
        if p is None or cand is None or cand.role is not Role.HOLDER:
            return
        proposal = p.next_in_sync_proposal(now)
        if proposal is not None:
            self.host.note(self, f"proposes in-sync set {sorted(proposal)}")
            self._emit(cand.propose_in_sync(proposal, now))
        if p.ready and not self.announced_ready:
            self.announced_ready = True
            self.host.primary_ready(self, p.epoch)
        if self.pending:
            for seq in sorted(s for s in self.pending if s <= p.commit_seq):
                self.host.acknowledged(self, self.pending.pop(seq), p.epoch)

    # -- events

    def tick(self) -> None:
        now = self.now()
        if self.candidate is None:
            return
        cand = self.candidate
        self._emit(cand.tick(now))
        self._after_lease(now)
        if self.primary is not None:
            self._emit(self.primary.tick(now))
            self._relay(now)
            self._drive_handover(now)
        elif cand.role is Role.FOLLOWER:
            b = self.backup
            quiet = b is None or now - b.last_heard > self.timing.suspect_after
            if not quiet and b is not None:
                cand.holder_seen(b.primary)
            if quiet and now >= self.next_campaign_at and cand.may_campaign(now):
                self._emit(cand.campaign(now, floor=self.store.fence_epoch))
                if cand.voter_config is None:
                    self.host.note(self, "probes the voters for the group's configuration")
                    wait = self.lease_config.campaign_deadline + self.rng.uniform(0.02, 0.1)
                    self.next_campaign_at = now + wait
                else:
                    self.host.note(self, f"campaigns for epoch {cand.epoch}")

    def deliver(self, src: str, msg: Any) -> None:
        now = self.now()
        if isinstance(msg, VOTER_MESSAGES):
            if self.voter is not None:
                reply = self.voter.handle(msg, now)
                if reply is not None:
                    self.host.send(self.name, src, reply)
            return
        cand = self.candidate
        if cand is None:
            return
        if isinstance(msg, LeaseReply | InSyncReply | ConfigReply):
            self._emit(cand.handle(msg, now))
        elif isinstance(msg, Replicate | SnapshotChunk):
            self._on_replication(src, msg, now)
        elif isinstance(msg, ReplicateAck):
            if self.primary is not None:
                self._emit(self.primary.on_ack(msg, now))
                self._drive_handover(now)
        elif isinstance(msg, CatchUpRequest):
            if self.primary is not None:
                self._emit(self.primary.on_catch_up(msg, now))
        elif isinstance(msg, SnapshotPull):
            if self.primary is not None:
                self._emit(self.primary.on_pull(msg, now))
        elif isinstance(msg, Fenced):
            self._emit(cand.observe_epoch(msg.epoch, now))
        elif isinstance(msg, ClientWrite):
            self._on_client_write(msg, now)
        elif isinstance(msg, Takeover):
            self._on_takeover(msg, now)
        else:
            raise TypeError(f"unexpected message {type(msg).__name__}")
        self._after_lease(now)

    def _on_replication(self, src: str, msg: Replicate | SnapshotChunk, now: float) -> None:
        assert self.candidate is not None
        p = self.primary
        if p is not None:
            if msg.epoch < p.epoch:
                self.host.send(self.name, src, Fenced(self.group, self.name, p.epoch))
                return
            if msg.epoch == p.epoch:
                return
            self._emit(self.candidate.observe_epoch(msg.epoch, now))
            self._after_lease(now)
        if self.candidate.role is Role.CANDIDATE and msg.epoch > self.candidate.epoch:
            self._emit(self.candidate.observe_epoch(msg.epoch, now))
        if self.backup is None:
            self.backup = self.factories.backup(self.name, self.group, self.store, self.repl_config)
        self._emit(self.backup.handle(msg, now))

    def _on_client_write(self, msg: ClientWrite, now: float) -> None:
        p, cand = self.primary, self.candidate
        if p is None or cand is None or not p.ready or not cand.is_writer(now) or self.handing_over:
            return
        ops = [kv_put(msg.key, msg.value)]
        if msg.write_id % 2:  # the runtime's two write paths: send first, or apply first
            rec, sends = p.prepare(ops, now)
            self._emit(sends)
            p.commit_prepared(rec)
        else:
            rec, sends = p.append(ops, now)
            self._emit(sends)
        self.pending[rec.seq] = msg
        self._relay(now)
