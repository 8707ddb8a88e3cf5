"""Leases and epochs: the single-writer rule (DESIGN.md sections 4 and 6, invariants I1 and I2).

This module is the pure protocol core. It does no I/O, runs no tasks and never reads a clock:
every entry point takes the caller's monotonic `now` (seconds) and message objects, and returns
the messages to send as `Send(to, msg)` pairs. The asyncio network node and the deterministic
simulation (`euca_runtime.sim`) both drive it the same way.

The protocol, per service group (a string key such as ``"clc"`` or ``"sc/cluster01"``):

* **Voters** (an odd, configured set) each keep, persistently, the highest epoch they
  promised, the holder of that promise, and the group's *recorded in-sync set* with the
  version it was recorded at. A voter grants an acquire for epoch E when E is higher than
  anything it promised, no *other* holder has an unexpired lease from it, and the candidate is
  a member of the recorded in-sync set (unless the request is an operator's force-promote).
  It renews for the current holder at the same epoch. It saves the promise through its
  `VoterStorage` *before* it produces the reply. Voters measure a lease from when they
  *received* the request, and after a restart assume a recorded holder's lease runs for a
  full duration from the restart (they cannot know how long they were down).

* **A candidate** asks every voter for epoch ``max_seen + 1``. For every grant it counts the
  lease as valid until ``send_time + duration - drift_margin`` on its *own* clock, where
  `send_time` is when the request was *sent*; it is the writer while a majority of voters'
  grants are still valid by that reckoning. The drift margin covers clock-rate error
  (`LeaseConfig.max_drift`), so the holder's lease always ends, in real time, before any
  granting voter's does, and nobody else can gather a majority while it believes it writes.
  The holder renews every `renew_interval`, well before expiry; it steps down when its lease
  runs out (e.g. after a pause), when a reply or a fencing reject shows a higher epoch, or
  voluntarily (`release`).

* **In-sync set (I2).** A primary records changes to its group's in-sync set with the voters
  (`propose_in_sync`): it drops a lagging backup only after a majority recorded the smaller
  set, and it adds a caught-up backup only after that backup already acknowledges every write.
  Versions are ``(epoch, n)``; voters keep the highest. Since any granting majority intersects
  the majority that recorded the latest set, only members of that set can be granted the
  next epoch. A newly elected primary records ``{itself}`` (version ``(E, 1)``) before it
  acknowledges anything, then re-adds backups as they catch up.

* **Death certificate.** A host supervisor that watched a holder's process die sends
  `DeathCertificate(group, holder, epoch)`; a voter whose promise matches exactly releases the
  lease at once instead of waiting for expiry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from euca_runtime.log import get_logger

log = get_logger("lease")

NEVER = -math.inf


class Send(NamedTuple):
    """One outgoing message: deliver `msg` to the process named `to`."""

    to: str
    msg: Any


# --------------------------------------------------------------------------- configuration


def required_drift_margin(duration: float, max_drift: float) -> float:
    """The smallest margin that keeps the holder's lease inside every voter's.

    With clock rates within ``1 +- max_drift``, the holder's ``duration - margin`` lasts at most
    ``(duration - margin) / (1 - max_drift)`` real seconds after it sent the request; a voter's
    ``duration`` lasts at least ``duration / (1 + max_drift)`` after it received it, which is
    later. Solving for the first being no longer gives ``duration * 2d / (1 + d)``.
    """
    return duration * 2.0 * max_drift / (1.0 + max_drift)


@dataclass(frozen=True)
class LeaseConfig:
    """Timing shared by voters and candidates of a deployment (seconds, monotonic)."""

    duration: float = 2.0
    """Lease length a voter grants, measured on the voter's clock from receipt."""
    max_drift: float = 0.01
    """Bound on any clock's rate error (0.01 = 1 %). Monotonic offsets never matter."""
    drift_margin: float | None = None
    """Subtracted by the holder; defaults to 1.5x `required_drift_margin` (at least 1 ms)."""
    renew_interval: float | None = None
    """Holder renews this often; defaults to a third of the duration."""
    campaign_timeout: float | None = None
    """A campaign without a majority by then gives up; defaults to a quarter of the duration."""
    in_sync_retry: float | None = None
    """Resend an unconfirmed in-sync update this often; defaults to half the renew interval."""

    def __post_init__(self) -> None:
        if self.duration <= 0:
            raise ValueError("lease duration must be positive")
        if not 0 <= self.max_drift < 0.5:
            raise ValueError("max_drift must be in [0, 0.5)")
        if self.drift_margin is not None and self.drift_margin < required_drift_margin(
            self.duration, self.max_drift
        ):
            raise ValueError(
                f"drift_margin {self.drift_margin} is below the safe minimum "
                f"{required_drift_margin(self.duration, self.max_drift):.4f} for max_drift {self.max_drift}"
            )
        if self.renew_every >= self.duration - self.margin:
            raise ValueError("renew_interval must be shorter than duration - drift_margin")

    @property
    def margin(self) -> float:
        if self.drift_margin is not None:
            return self.drift_margin
        return max(1.5 * required_drift_margin(self.duration, self.max_drift), 0.001)

    @property
    def renew_every(self) -> float:
        return self.renew_interval if self.renew_interval is not None else self.duration / 3.0

    @property
    def campaign_deadline(self) -> float:
        return self.campaign_timeout if self.campaign_timeout is not None else self.duration / 4.0

    @property
    def in_sync_resend(self) -> float:
        return self.in_sync_retry if self.in_sync_retry is not None else self.renew_every / 2.0


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """Candidate -> voter: acquire `epoch` (higher than promised) or renew it (same epoch).

    `force` is the operator's force-promote (``--accept-data-loss``): it skips the in-sync
    check, never the single-holder or epoch checks.
    """

    group: str
    candidate: str
    epoch: int
    request_id: int
    force: bool = False


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """Voter -> candidate. `promised_epoch` is the voter's highest promise after handling.

    `reason` when refused: ``lower_epoch`` (a promise at or above it exists), ``held`` (another
    holder's lease is unexpired here), ``not_in_sync`` (not in the recorded in-sync set),
    ``released`` (renewal of a lease that was released or death-certified).
    """

    group: str
    voter: str
    candidate: str
    epoch: int
    request_id: int
    granted: bool
    duration: float
    promised_epoch: int
    reason: str = ""
    holder: str | None = None


@dataclass(frozen=True, slots=True)
class LeaseRelease:
    """Holder -> voters: voluntary step-down (no reply). Only a matching promise is released."""

    group: str
    holder: str
    epoch: int


@dataclass(frozen=True, slots=True)
class DeathCertificate:
    """Supervisor -> voters: `holder`'s process, which held `epoch`, is dead (no reply)."""

    group: str
    holder: str
    epoch: int
    issuer: str = ""


@dataclass(frozen=True, slots=True)
class InSyncUpdate:
    """Holder -> voters: record `members` as the group's in-sync set at version (epoch, version)."""

    group: str
    holder: str
    epoch: int
    version: int
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InSyncReply:
    """Voter -> holder. ``ok`` means the voter now holds version (epoch, version) or newer."""

    group: str
    voter: str
    epoch: int
    version: int
    ok: bool
    promised_epoch: int
    reason: str = ""


LEASE_MESSAGES: tuple[type, ...] = (
    LeaseRequest,
    LeaseReply,
    LeaseRelease,
    DeathCertificate,
    InSyncUpdate,
    InSyncReply,
)
_BY_NAME = {cls.__name__: cls for cls in LEASE_MESSAGES}


def encode(msg: Any) -> dict[str, Any]:
    """A plain dict (msgpack/JSON-able) for a lease message, tagged with its type."""
    if type(msg) not in LEASE_MESSAGES:
        raise TypeError(f"not a lease message: {type(msg).__name__}")
    doc: dict[str, Any] = {"type": type(msg).__name__}
    for name in msg.__dataclass_fields__:
        value = getattr(msg, name)
        doc[name] = list(value) if isinstance(value, tuple) else value
    return doc


def decode(doc: Mapping[str, Any]) -> Any:
    """Inverse of `encode`; raises ValueError on an unknown type or missing fields."""
    cls = _BY_NAME.get(str(doc.get("type")))
    if cls is None:
        raise ValueError(f"unknown lease message type {doc.get('type')!r}")
    kwargs = {k: v for k, v in doc.items() if k != "type"}
    if "members" in kwargs:
        kwargs["members"] = tuple(kwargs["members"])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad {cls.__name__}: {exc}") from exc


# --------------------------------------------------------------------------- voter side


class VoterStorage(Protocol):
    """Durable storage of a voter's promises: one plain dict per group.

    `save` must be durable when it returns (the voter replies right after). The SQLAlchemy
    store maps a group to one row; keys are those of `VoterRecord.to_dict`.
    """

    def load(self) -> Mapping[str, Mapping[str, Any]]: ...

    def save(self, group: str, record: Mapping[str, Any]) -> None: ...


class MemoryVoterStorage:
    """In-memory `VoterStorage` (tests, simulation). Survives a simulated crash if kept."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.saves = 0

    def load(self) -> Mapping[str, Mapping[str, Any]]:
        return {g: dict(r) for g, r in self.records.items()}

    def save(self, group: str, record: Mapping[str, Any]) -> None:
        self.records[group] = {k: (list(v) if isinstance(v, list | tuple) else v) for k, v in record.items()}
        self.saves += 1


@dataclass
class VoterRecord:
    """What a voter persists for one group."""

    promised: int = 0
    holder: str | None = None
    released: bool = True
    in_sync: frozenset[str] | None = None
    in_sync_version: tuple[int, int] = (0, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "promised": self.promised,
            "holder": self.holder,
            "released": self.released,
            "in_sync": None if self.in_sync is None else sorted(self.in_sync),
            "in_sync_version": list(self.in_sync_version),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> VoterRecord:
        in_sync = doc.get("in_sync")
        version = doc.get("in_sync_version") or (0, 0)
        return cls(
            promised=int(doc.get("promised", 0)),
            holder=doc.get("holder"),
            released=bool(doc.get("released", True)),
            in_sync=None if in_sync is None else frozenset(in_sync),
            in_sync_version=(int(version[0]), int(version[1])),
        )


@dataclass(frozen=True)
class VoterView:
    """A voter's view of one group, for describe-services and tests."""

    group: str
    promised: int
    holder: str | None
    lease_remaining: float
    in_sync: frozenset[str] | None
    in_sync_version: tuple[int, int]


class Voter:
    """One process's voter, for every group. Call `handle(msg, now)`; send back what it returns."""

    def __init__(self, name: str, storage: VoterStorage, config: LeaseConfig, now: float) -> None:
        self.name = name
        self.storage = storage
        self.config = config
        self._records: dict[str, VoterRecord] = {}
        self._expiry: dict[str, float] = {}
        for group, doc in sorted(storage.load().items()):
            rec = VoterRecord.from_dict(doc)
            self._records[group] = rec
            # We cannot know how long we were down: a recorded holder keeps a full lease.
            self._expiry[group] = now + config.duration if rec.holder and not rec.released else NEVER

    # -- helpers

    def _record(self, group: str) -> VoterRecord:
        rec = self._records.get(group)
        if rec is None:
            rec = self._records[group] = VoterRecord()
            self._expiry[group] = NEVER
        return rec

    def _persist(self, group: str, rec: VoterRecord) -> None:
        self.storage.save(group, rec.to_dict())

    def eligible(self, rec: VoterRecord, candidate: str, force: bool) -> bool:
        """I2: only a member of the recorded in-sync set may take a new epoch (unless forced)."""
        return force or rec.in_sync is None or candidate in rec.in_sync

    def view(self, group: str, now: float) -> VoterView:
        rec = self._record(group)
        remaining = max(0.0, self._expiry[group] - now) if rec.holder and not rec.released else 0.0
        return VoterView(group, rec.promised, rec.holder, remaining, rec.in_sync, rec.in_sync_version)

    def groups(self) -> list[str]:
        return sorted(self._records)

    # -- dispatch

    def handle(self, msg: Any, now: float) -> LeaseReply | InSyncReply | None:
        """Handle one message; returns the reply to send to its sender, if any."""
        if isinstance(msg, LeaseRequest):
            return self.on_lease_request(msg, now)
        if isinstance(msg, InSyncUpdate):
            return self.on_in_sync_update(msg, now)
        if isinstance(msg, LeaseRelease):
            self.on_release(msg.group, msg.holder, msg.epoch, now, "released")
            return None
        if isinstance(msg, DeathCertificate):
            self.on_release(msg.group, msg.holder, msg.epoch, now, "death_certificate")
            return None
        raise TypeError(f"voter cannot handle {type(msg).__name__}")

    def on_lease_request(self, req: LeaseRequest, now: float) -> LeaseReply:
        rec = self._record(req.group)
        expiry = self._expiry[req.group]

        def reply(granted: bool, reason: str = "") -> LeaseReply:
            return LeaseReply(
                group=req.group,
                voter=self.name,
                candidate=req.candidate,
                epoch=req.epoch,
                request_id=req.request_id,
                granted=granted,
                duration=self.config.duration if granted else 0.0,
                promised_epoch=rec.promised,
                reason=reason,
                holder=rec.holder,
            )

        if req.epoch <= 0 or req.epoch < rec.promised:
            return reply(False, "lower_epoch")
        if req.epoch == rec.promised:
            if rec.holder != req.candidate:
                return reply(False, "lower_epoch")
            if rec.released:
                return reply(False, "released")
            self._expiry[req.group] = now + self.config.duration  # renewal: nothing new to persist
            return reply(True)
        # A new, higher epoch.
        if rec.holder is not None and rec.holder != req.candidate and not rec.released and now < expiry:
            return reply(False, "held")
        if not self.eligible(rec, req.candidate, req.force):
            return reply(False, "not_in_sync")
        if req.force:
            log.warning(
                "force-promote grant outside the in-sync set",
                extra={"group": req.group, "epoch": req.epoch, "peer": req.candidate},
            )
        rec.promised, rec.holder, rec.released = req.epoch, req.candidate, False
        self._persist(req.group, rec)  # the promise is durable before anyone hears of it
        self._expiry[req.group] = now + self.config.duration
        log.debug("granted", extra={"group": req.group, "epoch": req.epoch, "peer": req.candidate})
        return reply(True)

    def on_release(self, group: str, holder: str, epoch: int, now: float, why: str) -> bool:
        """Release `holder`'s lease at `epoch` if it is exactly the current promise."""
        rec = self._record(group)
        if rec.holder != holder or rec.promised != epoch or rec.released:
            return False
        rec.released = True
        self._persist(group, rec)
        self._expiry[group] = now
        log.info(why, extra={"group": group, "epoch": epoch, "peer": holder})
        return True

    def on_in_sync_update(self, msg: InSyncUpdate, now: float) -> InSyncReply:
        rec = self._record(msg.group)

        def reply(ok: bool, reason: str = "") -> InSyncReply:
            return InSyncReply(msg.group, self.name, msg.epoch, msg.version, ok, rec.promised, reason)

        if msg.epoch < rec.promised:
            return reply(False, "lower_epoch")
        if msg.epoch == rec.promised and rec.holder not in (None, msg.holder):
            return reply(False, "not_holder")
        version = (msg.epoch, msg.version)
        if version > rec.in_sync_version:
            rec.in_sync = frozenset(msg.members)
            rec.in_sync_version = version
            self._persist(msg.group, rec)
            log.info(
                "in-sync set recorded",
                extra={
                    "group": msg.group,
                    "epoch": msg.epoch,
                    "peer": msg.holder,
                    "members": sorted(msg.members),
                },
            )
        return reply(True)


# --------------------------------------------------------------------------- candidate side


class Role(StrEnum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    HOLDER = "holder"


@dataclass(frozen=True)
class Elected:
    epoch: int


@dataclass(frozen=True)
class SteppedDown:
    epoch: int
    reason: str
    """``lease_expired``, ``higher_epoch`` or ``released``. Only a holder emits it; a failed
    campaign just returns the candidate to `Role.FOLLOWER`."""


@dataclass(frozen=True)
class InSyncRecorded:
    epoch: int
    version: int
    members: frozenset[str]


LeaseEvent = Elected | SteppedDown | InSyncRecorded


class NotHolderError(RuntimeError):
    """An operation that needs the lease was attempted without it."""


@dataclass
class _Proposal:
    version: int
    members: frozenset[str]
    acks: set[str] = field(default_factory=set)
    sent_at: float = NEVER


class Candidate:
    """One process's lease client for one group: campaigns, holds, renews, steps down.

    Drive it with `campaign`, `tick` (at least by `next_deadline()`), `on_lease_reply`,
    `on_in_sync_reply` and `observe_epoch`; each returns the `Send`s to deliver. What happened
    (elected, stepped down, in-sync set recorded) is queued for `drain_events()`.
    `is_writer(now)` is the single-writer test: call it with a fresh `now` before every write.
    """

    def __init__(
        self, name: str, group: str, voters: Iterable[str], config: LeaseConfig, *, min_epoch: int = 0
    ) -> None:
        unique = tuple(sorted(set(voters)))
        if not unique or len(unique) % 2 == 0:
            raise ValueError(f"the voter set must have an odd size, got {len(unique)}")
        self.name = name
        self.group = group
        self.voters: tuple[str, ...] = unique
        self.quorum = len(unique) // 2 + 1
        self.config = config
        self.role = Role.FOLLOWER
        self.epoch = 0
        self.max_seen = min_epoch
        self.force = False
        self.last_step_down = ""
        self._valid: dict[str, float] = {}
        self._rounds: dict[int, float] = {}
        self._next_id = 1
        self._campaign_deadline = NEVER
        self._next_renew = math.inf
        self._in_sync_version = 0
        self._proposal: _Proposal | None = None
        self.in_sync_recorded: InSyncRecorded | None = None
        self._events: list[LeaseEvent] = []

    # -- queries

    def lease_end(self) -> float:
        """Holder-side end of the lease: the majority-th latest per-voter validity."""
        if len(self._valid) < self.quorum:
            return NEVER
        return sorted(self._valid.values(), reverse=True)[self.quorum - 1]

    def is_writer(self, now: float) -> bool:
        """True while this process holds a majority lease that has not run out on its clock."""
        return self.role is Role.HOLDER and now < self.lease_end()

    def renew_at(self) -> float:
        return self._next_renew if self.role is Role.HOLDER else math.inf

    def next_deadline(self) -> float:
        """The latest time by which `tick` must be called again."""
        if self.role is Role.HOLDER:
            times = [self._next_renew, self.lease_end()]
            if self._proposal is not None:
                times.append(self._proposal.sent_at + self.config.in_sync_resend)
            return min(times)
        if self.role is Role.CANDIDATE:
            return self._campaign_deadline
        return math.inf

    def drain_events(self) -> list[LeaseEvent]:
        events, self._events = self._events, []
        return events

    # -- transitions

    def campaign(self, now: float, *, force: bool = False, floor: int = 0) -> list[Send]:
        """Ask every voter for the lease at epoch ``max(max_seen, floor) + 1``.

        Pass the local store's fence as `floor`: it is an epoch we know exists. `force` is the
        operator's force-promote (skips the voters' in-sync check; data may be lost).
        """
        if self.role is Role.HOLDER:
            return []
        out: list[Send] = []
        if self.role is Role.CANDIDATE:
            out += self._step_down(now, "campaign_failed")
        self.epoch = max(self.max_seen, self.epoch, floor) + 1
        self.max_seen = self.epoch
        self.role = Role.CANDIDATE
        self.force = force
        self._valid.clear()
        self._rounds.clear()
        self._campaign_deadline = now + self.config.campaign_deadline
        return out + self._round(now)

    def _round(self, now: float) -> list[Send]:
        rid = self._next_id
        self._next_id += 1
        self._rounds[rid] = now
        for old in [r for r in self._rounds if r < rid - 8]:
            del self._rounds[old]
        req = LeaseRequest(self.group, self.name, self.epoch, rid, self.force)
        return [Send(v, req) for v in self.voters]

    def grant_valid_until(self, sent_at: float, received_at: float, duration: float) -> float:
        """How long one grant lets us write: from the request's *send* time, minus the margin."""
        return sent_at + min(duration, self.config.duration) - self.config.margin

    def on_lease_reply(self, reply: LeaseReply, now: float) -> list[Send]:
        if reply.group != self.group or reply.candidate != self.name:
            return []
        self.max_seen = max(self.max_seen, reply.promised_epoch)
        if self.role is Role.FOLLOWER or reply.epoch != self.epoch:
            return []
        sent_at = self._rounds.get(reply.request_id)
        if sent_at is None:
            return []
        if not reply.granted:
            if reply.promised_epoch > self.epoch:
                return self._step_down(now, "higher_epoch")
            return []
        until = self.grant_valid_until(sent_at, now, reply.duration)
        if until > self._valid.get(reply.voter, NEVER):
            self._valid[reply.voter] = until
        if self.role is Role.CANDIDATE and now < self.lease_end():
            self.role = Role.HOLDER
            self._next_renew = sent_at + self.config.renew_every
            self._in_sync_version = 0
            self._proposal = None
            self.in_sync_recorded = None
            self._events.append(Elected(self.epoch))
            log.info("lease acquired", extra={"group": self.group, "epoch": self.epoch})
        return []

    def tick(self, now: float) -> list[Send]:
        """Renew when due, give up an expired lease or a stalled campaign, resend in-sync updates."""
        if self.role is Role.HOLDER:
            if now >= self.lease_end():
                return self._step_down(now, "lease_expired")
            out: list[Send] = []
            if now >= self._next_renew:
                out += self._round(now)
                self._next_renew = now + self.config.renew_every
            prop = self._proposal
            if prop is not None and now >= prop.sent_at + self.config.in_sync_resend:
                prop.sent_at = now
                out += [Send(v, self._in_sync_msg(prop)) for v in self.voters if v not in prop.acks]
            return out
        if self.role is Role.CANDIDATE and now >= self._campaign_deadline:
            return self._step_down(now, "campaign_failed")
        return []

    def observe_epoch(self, epoch: int, now: float) -> list[Send]:
        """Another message (e.g. a fencing reject) showed `epoch`; a higher one deposes us."""
        self.max_seen = max(self.max_seen, epoch)
        if self.role is not Role.FOLLOWER and epoch > self.epoch:
            return self._step_down(now, "higher_epoch")
        return []

    def release(self, now: float) -> list[Send]:
        """Voluntary step-down (switchover, route down, shutdown). Stops writing at once."""
        if self.role is Role.FOLLOWER:
            return []
        return self._step_down(now, "released")

    def _step_down(self, now: float, reason: str) -> list[Send]:
        was_holder = self.role is Role.HOLDER
        self.role = Role.FOLLOWER
        self._valid.clear()
        self._rounds.clear()
        self._next_renew = math.inf
        self._proposal = None
        self.in_sync_recorded = None
        self.last_step_down = reason
        if was_holder:
            self._events.append(SteppedDown(self.epoch, reason))
            log.info("lease given up", extra={"group": self.group, "epoch": self.epoch, "reason": reason})
        # Tell voters we are gone so nobody waits for expiry; harmless if they moved on.
        rel = LeaseRelease(self.group, self.name, self.epoch)
        return [Send(v, rel) for v in self.voters]

    # -- in-sync set

    def _in_sync_msg(self, prop: _Proposal) -> InSyncUpdate:
        return InSyncUpdate(self.group, self.name, self.epoch, prop.version, tuple(sorted(prop.members)))

    @property
    def in_sync_pending(self) -> frozenset[str] | None:
        return None if self._proposal is None else self._proposal.members

    def propose_in_sync(self, members: Iterable[str], now: float) -> list[Send]:
        """Ask the voters to record `members` as the in-sync set (supersedes any pending proposal)."""
        if self.role is not Role.HOLDER:
            raise NotHolderError(f"{self.name} does not hold the {self.group} lease")
        self._in_sync_version += 1
        prop = _Proposal(self._in_sync_version, frozenset(members), sent_at=now)
        self._proposal = prop
        return [Send(v, self._in_sync_msg(prop)) for v in self.voters]

    def on_in_sync_reply(self, reply: InSyncReply, now: float) -> list[Send]:
        if reply.group != self.group:
            return []
        self.max_seen = max(self.max_seen, reply.promised_epoch)
        if self.role is not Role.HOLDER or reply.epoch != self.epoch:
            return []
        if not reply.ok:
            if reply.promised_epoch > self.epoch:
                return self._step_down(now, "higher_epoch")
            return []
        prop = self._proposal
        if prop is None or reply.version != prop.version:
            return []
        prop.acks.add(reply.voter)
        if len(prop.acks) >= self.quorum:
            self._proposal = None
            self.in_sync_recorded = InSyncRecorded(self.epoch, prop.version, prop.members)
            self._events.append(self.in_sync_recorded)
        return []


def majority(n: int) -> int:
    """Quorum size for `n` voters."""
    return n // 2 + 1
