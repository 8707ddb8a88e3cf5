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

* **Lost campaigns** (`Candidate.campaign_lost`): a campaign ends when a majority refused, when
  a rival that sorts first by name is seen, or at its deadline (which doubles after each
  timeout, up to what a grant can be worth). The next one waits a random, doubling time (reset
  by an election or by following a holder), and waits out a previous holder's lease that the
  voters reported still running. This only decides when to ask; safety never depends on it.

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

* **Voter configuration (I3: a non-HA cloud becomes HA online).** Each group's voter set is a
  versioned `VoterConfig` recorded by the voters, like the in-sync set: one set (normal) or two
  (joint: old and new). Versions are ``(epoch, n)``, made only by the holder of ``epoch``; the
  static ``voters`` list of a node's configuration is only the bootstrap of a brand-new group
  (version ``(0, 0)``) and, afterwards, the *target* its holders move the group to.

  - A lease, an in-sync update or a configuration change needs a majority of *every* set of
    the configuration. Every `LeaseRequest` carries the candidate's configuration version; a
    voter refuses a new epoch (reason ``config``) to a candidate whose version is older than
    the one it recorded, and every reply carries the voter's recorded configuration, which a
    candidate adopts when it is newer than its own. A holder never adopts: every config it
    could hear of is older than its own (see the pin below) unless a higher epoch exists, and
    then it steps down.
  - On election the holder *pins* the configuration it was elected with at version
    ``(E, 1)`` (like Raft's no-op entry): this overrides any newer-looking but uncommitted
    configuration of a deposed holder that a minority recorded, and makes sure voters of a group
    that predates this feature record one.
  - Change from ``{Old}`` to ``{New}`` (holder-driven joint consensus, `Candidate.target`):
    (1) propose joint ``{Old, New}`` (a `ConfigUpdate` that also carries the recorded in-sync set
    and its version, so new voters learn I2's set) while sending lease rounds to ``Old | New``;
    (2) once a majority of both sets recorded it and a majority of each set granted our epoch,
    it becomes the holder's configuration and it proposes ``{New}``; (3) committed once a
    majority of ``New`` recorded it. The holder's writer test uses the sets of its *current*
    configuration (``Old`` in (1), both in (2), ``New`` after (3)); its in-sync updates need
    the sets of the current and of the pending configuration.

    Why that is safe (I1). Two writers need majorities of a common set. Every candidate uses a
    configuration someone proposed; consecutive configurations share a set; a candidate with an
    older one than the joint's predecessor cannot collect a majority, because the joint was
    recorded by a majority of ``Old`` before ``{New}`` was proposed and those voters refuse it
    (``config``); a voter that promised epoch E' refuses configuration updates from lower epochs,
    so a deposed holder cannot complete a change behind a newer holder's back. In phase (1) only
    configurations containing ``Old`` can be in use (``{New}`` is not proposed yet), so the
    holder's ``Old`` majority is enough. I2: a configuration without ``Old`` is only proposed after a
    majority of ``New`` recorded the joint *with* the in-sync set, and later in-sync changes
    need a majority of ``New`` too, so an election by ``New`` alone still intersects it.
  - Joining (fresh voters must not enable split brain). A voter started with ``joining=True``
    (a node added to an existing cloud) refuses lease requests made with a *bootstrap*
    configuration (version (0, 0): the static list of some node's file, which is not what the
    running group uses) for a group whose configuration it has not recorded from a holder
    (reason ``joining``). A request carrying a version some holder made is safe to grant: that
    configuration's other quorums still count (refusing it too would deadlock a group whose
    holder died after only the old voters recorded the joint configuration: the simulation
    found that). It leaves join mode for good once it records the *cloud* configuration (group
    `CLOUD`, sent when every group has moved) that names it. A candidate built without a known
    configuration (``voters=None`` in `Candidate`) never campaigns: it only probes (epoch-0
    requests that no voter can grant) and campaigns once a voter's reply told it the group's
    configuration.
  - A holder whose pending change cannot reach a majority because voters promised its epoch to
    another candidate (two campaigns for one epoch) steps down (``epoch_taken``): only a new
    epoch can complete the change.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from euca_runtime.codec import Codec
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
    campaign_timeout_max: float | None = None
    """Cap of the campaign deadline, which doubles after each campaign that ended without enough
    answers (a slow voter round trip is not a refusal); defaults to ``duration - margin``: a
    grant arriving later than that is worthless anyway."""
    retry_min: float | None = None
    """Wait before retrying after a first failed campaign is random in ``[retry_min,
    2 * retry_min]``; it doubles with each further failure (Raft's randomized election timeouts:
    two candidates that keep defeating each other soon stop colliding). Defaults to
    ``duration / 32``."""
    retry_max: float | None = None
    """Cap of the retry wait; defaults to the duration."""

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
    def campaign_deadline_max(self) -> float:
        if self.campaign_timeout_max is not None:
            return max(self.campaign_timeout_max, self.campaign_deadline)
        return max(self.duration - self.margin, self.campaign_deadline)

    @property
    def retry_base(self) -> float:
        return self.retry_min if self.retry_min is not None else self.duration / 32.0

    @property
    def retry_cap(self) -> float:
        return self.retry_max if self.retry_max is not None else self.duration

    @property
    def in_sync_resend(self) -> float:
        return self.in_sync_retry if self.in_sync_retry is not None else self.renew_every / 2.0


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """Candidate -> voter: acquire `epoch` (higher than promised) or renew it (same epoch).

    `force` is the operator's force-promote (``--accept-data-loss``): it skips the in-sync
    check, never the single-holder or epoch checks. `config_version` is the version of the
    voter configuration the candidate uses (a voter with a newer one refuses a new epoch).
    Epoch 0 is a probe: always refused, answered with the voter's configuration.
    `in_sync` / `in_sync_version`: the newest in-sync set the candidate heard of from voters; a
    voter with an older one records it first (a relayed holder update: versions are ordered).
    """

    group: str
    candidate: str
    epoch: int
    request_id: int
    force: bool = False
    config_version: tuple[int, int] = (0, 0)
    in_sync: tuple[str, ...] | None = None
    in_sync_version: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class LeaseReply:
    """Voter -> candidate. `promised_epoch` is the voter's highest promise after handling.

    `reason` when refused: ``lower_epoch`` (a promise at or above it exists), ``held`` (another
    holder's lease is unexpired here), ``not_in_sync`` (not in the recorded in-sync set),
    ``released`` (renewal of a lease that was released or death-certified), ``config`` (the
    voter recorded a newer voter configuration, in `config`), ``joining`` (a joining voter that
    has not recorded this group's configuration yet). `config_version` / `config` are the
    voter's recorded configuration (``()`` when it has none).
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
    config_version: tuple[int, int] = (0, 0)
    config: tuple[tuple[str, ...], ...] = ()
    in_sync: tuple[str, ...] | None = None
    in_sync_version: tuple[int, int] = (0, 0)
    lease_remaining: float = 0.0
    """With reason ``held``: how much longer the holder's lease runs here (voter's clock)."""


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


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    """Holder -> voters: record `sets` as the group's voter configuration at `version`.

    It also carries the holder's recorded in-sync set (`in_sync`, None when it has none yet)
    and its version, so that a new voter learns it with the configuration (I2). For group
    `CLOUD` it is the cloud-level configuration that ends the voters' join mode.
    """

    group: str
    holder: str
    epoch: int
    version: tuple[int, int]
    sets: tuple[tuple[str, ...], ...]
    in_sync: tuple[str, ...] | None = None
    in_sync_version: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class ConfigReply:
    """Voter -> holder. ``ok`` means the voter now holds configuration `version` or newer."""

    group: str
    voter: str
    epoch: int
    version: tuple[int, int]
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
    ConfigUpdate,
    ConfigReply,
)
_CODEC = Codec("lease", LEASE_MESSAGES, omit_default=("lease_remaining",))


def encode(msg: Any) -> dict[str, Any]:
    """A plain dict (msgpack/JSON-able) for a lease message, tagged with its type."""
    return _CODEC.encode(msg)


def decode(doc: Mapping[str, Any]) -> Any:
    """Inverse of `encode`; raises ValueError on an unknown type or missing fields."""
    return _CODEC.decode(doc)


# --------------------------------------------------------------------------- voter configuration

CLOUD = "*"
"""Pseudo-group of the cloud-level voter configuration (ends join mode; see the module doc)."""
BOOTSTRAP_VERSION = (0, 0)
PROBE_VERSION = (-1, -1)


def majority(n: int) -> int:
    """Quorum size for `n` voters."""
    return n // 2 + 1


@dataclass(frozen=True)
class VoterConfig:
    """A versioned voter configuration: one set (normal) or two (joint: old, new)."""

    version: tuple[int, int]
    sets: tuple[frozenset[str], ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.sets) <= 2 or any(not s for s in self.sets):
            raise ValueError(f"a voter configuration is one or two non-empty sets, got {self.sets}")

    @classmethod
    def normal(cls, voters: Iterable[str], version: tuple[int, int] = BOOTSTRAP_VERSION) -> VoterConfig:
        return cls(version, (frozenset(voters),))

    @classmethod
    def from_wire(cls, version: Iterable[int], sets: Iterable[Iterable[str]]) -> VoterConfig:
        v = tuple(int(x) for x in version)
        return cls((v[0], v[1]), tuple(frozenset(x) for x in sets))

    @property
    def joint(self) -> bool:
        return len(self.sets) == 2

    @property
    def voters(self) -> frozenset[str]:
        return frozenset().union(*self.sets)

    def quorum(self, names: Iterable[str]) -> bool:
        """True when `names` hold a majority of every set."""
        have = set(names)
        return all(len(have & s) >= majority(len(s)) for s in self.sets)

    def wire(self) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(sorted(s)) for s in self.sets)

    def describe(self) -> dict[str, Any]:
        """Plain data for status documents and ``eucactl``."""
        return {"version": list(self.version), "sets": [sorted(s) for s in self.sets], "joint": self.joint}


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
    """What a voter persists for one group (records written before voter configurations
    existed load with `config` None and version (0, 0))."""

    promised: int = 0
    holder: str | None = None
    released: bool = True
    in_sync: frozenset[str] | None = None
    in_sync_version: tuple[int, int] = (0, 0)
    config: VoterConfig | None = None

    @property
    def config_version(self) -> tuple[int, int]:
        return self.config.version if self.config is not None else BOOTSTRAP_VERSION

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "promised": self.promised,
            "holder": self.holder,
            "released": self.released,
            "in_sync": None if self.in_sync is None else sorted(self.in_sync),
            "in_sync_version": list(self.in_sync_version),
        }
        if self.config is not None:
            doc["config"] = [sorted(x) for x in self.config.sets]
            doc["config_version"] = list(self.config.version)
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> VoterRecord:
        in_sync = doc.get("in_sync")
        version = doc.get("in_sync_version") or (0, 0)
        sets = doc.get("config")
        return cls(
            promised=int(doc.get("promised", 0)),
            holder=doc.get("holder"),
            released=bool(doc.get("released", True)),
            in_sync=None if in_sync is None else frozenset(in_sync),
            in_sync_version=(int(version[0]), int(version[1])),
            config=None if not sets else VoterConfig.from_wire(doc.get("config_version") or (0, 0), sets),
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
    config: VoterConfig | None = None


class Voter:
    """One process's voter, for every group. Call `handle(msg, now)`; send back what it returns.

    `joining`: this voter was added to an existing cloud. Until it records the cloud-level
    configuration naming it (group `CLOUD`), it grants nothing for a group whose configuration
    it has not recorded from a holder.
    """

    def __init__(
        self, name: str, storage: VoterStorage, config: LeaseConfig, now: float, *, joining: bool = False
    ) -> None:
        self.name = name
        self.storage = storage
        self.config = config
        self._records: dict[str, VoterRecord] = {}
        self._expiry: dict[str, float] = {}
        self.cloud: VoterConfig | None = None
        for group, doc in sorted(storage.load().items()):
            rec = VoterRecord.from_dict(doc)
            if group == CLOUD:
                self.cloud = rec.config
                continue
            self._records[group] = rec
            # We cannot know how long we were down: a recorded holder keeps a full lease.
            self._expiry[group] = now + config.duration if rec.holder and not rec.released else NEVER
        self.joining = joining and not (self.cloud is not None and name in self.cloud.voters)

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

    def config_current(self, rec: VoterRecord, version: tuple[int, int]) -> bool:
        """A candidate using configuration `version` is not behind what we recorded."""
        return version >= rec.config_version

    def view(self, group: str, now: float) -> VoterView:
        rec = self._record(group)
        remaining = max(0.0, self._expiry[group] - now) if rec.holder and not rec.released else 0.0
        return VoterView(
            group, rec.promised, rec.holder, remaining, rec.in_sync, rec.in_sync_version, rec.config
        )

    def groups(self) -> list[str]:
        return sorted(self._records)

    # -- dispatch

    def handle(self, msg: Any, now: float) -> LeaseReply | InSyncReply | ConfigReply | None:
        """Handle one message; returns the reply to send to its sender, if any."""
        if isinstance(msg, LeaseRequest):
            return self.on_lease_request(msg, now)
        if isinstance(msg, InSyncUpdate):
            return self.on_in_sync_update(msg, now)
        if isinstance(msg, ConfigUpdate):
            return self.on_config_update(msg, now)
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

        def reply(granted: bool, reason: str = "", remaining: float = 0.0) -> LeaseReply:
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
                config_version=rec.config_version,
                config=rec.config.wire() if rec.config is not None else (),
                in_sync=None if rec.in_sync is None else tuple(sorted(rec.in_sync)),
                in_sync_version=rec.in_sync_version,
                lease_remaining=remaining,
            )

        if self.joining and rec.config is None and req.config_version <= BOOTSTRAP_VERSION:
            # Only a bootstrap configuration is dangerous here (fresh voters could form a
            # majority of their own); a version made by a holder is one the group really had.
            return reply(False, "joining")
        if req.epoch <= 0 or req.epoch < rec.promised:
            return reply(False, "lower_epoch")
        if req.epoch == rec.promised:
            if rec.holder != req.candidate:
                return reply(False, "lower_epoch")
            if rec.released:
                return reply(False, "released")
            # Renewal: the configuration does not matter (a newer one would need a higher epoch
            # to be used by anyone else); nothing new to persist.
            self._expiry[req.group] = now + self.config.duration
            return reply(True)
        # A new, higher epoch.
        if req.in_sync is not None and tuple(req.in_sync_version) > rec.in_sync_version:
            # A newer in-sync set, relayed from another voter: exactly a late holder update.
            rec.in_sync = frozenset(req.in_sync)
            rec.in_sync_version = (int(req.in_sync_version[0]), int(req.in_sync_version[1]))
            self._persist(req.group, rec)
        if rec.holder is not None and rec.holder != req.candidate and not rec.released and now < expiry:
            return reply(False, "held", expiry - now)
        if not self.config_current(rec, req.config_version):
            return reply(False, "config")
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

    def _holder_refusal(self, rec: VoterRecord, epoch: int, holder: str) -> str:
        """Why an update from `holder` at `epoch` is refused ("" when it is not)."""
        if epoch < rec.promised:
            return "lower_epoch"
        if epoch == rec.promised and rec.holder not in (None, holder):
            return "not_holder"
        return ""

    def on_in_sync_update(self, msg: InSyncUpdate, now: float) -> InSyncReply:
        rec = self._record(msg.group)

        def reply(ok: bool, reason: str = "") -> InSyncReply:
            return InSyncReply(msg.group, self.name, msg.epoch, msg.version, ok, rec.promised, reason)

        refused = self._holder_refusal(rec, msg.epoch, msg.holder)
        if refused:
            return reply(False, refused)
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

    def on_config_update(self, msg: ConfigUpdate, now: float) -> ConfigReply:
        if msg.group == CLOUD:
            return self._on_cloud_config(msg)
        rec = self._record(msg.group)

        def reply(ok: bool, reason: str = "") -> ConfigReply:
            return ConfigReply(msg.group, self.name, msg.epoch, msg.version, ok, rec.promised, reason)

        refused = self._holder_refusal(rec, msg.epoch, msg.holder)
        if refused:
            return reply(False, refused)
        try:
            cfg = VoterConfig.from_wire(msg.version, msg.sets)
        except (ValueError, IndexError, TypeError):
            return reply(False, "bad_config")
        changed = False
        if cfg.version > rec.config_version:
            rec.config = cfg
            changed = True
        if msg.in_sync is not None and tuple(msg.in_sync_version) > rec.in_sync_version:
            rec.in_sync = frozenset(msg.in_sync)
            rec.in_sync_version = (int(msg.in_sync_version[0]), int(msg.in_sync_version[1]))
            changed = True
        if changed:
            self._persist(msg.group, rec)
            log.info(
                "voter configuration recorded",
                extra={
                    "group": msg.group,
                    "epoch": msg.epoch,
                    "peer": msg.holder,
                    "version": list(rec.config_version),
                    "voters": [sorted(x) for x in (rec.config.sets if rec.config else ())],
                },
            )
        return reply(True)

    def _on_cloud_config(self, msg: ConfigUpdate) -> ConfigReply:
        try:
            cfg = VoterConfig.from_wire(msg.version, msg.sets)
        except (ValueError, IndexError, TypeError):
            return ConfigReply(CLOUD, self.name, msg.epoch, msg.version, False, 0, "bad_config")
        if self.cloud is None or cfg.version > self.cloud.version:
            self.storage.save(CLOUD, VoterRecord(config=cfg).to_dict())
            self.cloud = cfg
            if self.joining and self.name in cfg.voters:
                self.joining = False
                log.info("join mode ended", extra={"peer": msg.holder, "voters": sorted(cfg.voters)})
        return ConfigReply(CLOUD, self.name, msg.epoch, msg.version, True, 0)


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


class NotHolderError(RuntimeError):
    """An operation that needs the lease was attempted without it."""


@dataclass
class _Proposal:
    version: int
    members: frozenset[str]
    acks: set[str] = field(default_factory=set)
    sent_at: float = NEVER


@dataclass
class _ConfigProposal:
    config: VoterConfig
    acks: set[str] = field(default_factory=set)
    sent_at: float = NEVER
    recorded: bool = False


@dataclass(frozen=True)
class ConfigRecorded:
    """The holder's configuration changed: `config` is now what its quorums are counted in."""

    epoch: int
    config: VoterConfig


LeaseEvent = Elected | SteppedDown | InSyncRecorded | ConfigRecorded


class Candidate:
    """One process's lease client for one group: campaigns, holds, renews, steps down, and
    (as holder) moves the group's voter configuration to `target`.

    Drive it with `campaign`, `tick` (at least by `next_deadline()`), `on_lease_reply`,
    `on_in_sync_reply`, `on_config_reply` and `observe_epoch`; each returns the `Send`s to
    deliver. What happened (elected, stepped down, in-sync set or configuration recorded) is
    queued for `drain_events()`. `is_writer(now)` is the single-writer test: call it with a fresh
    `now` before every write.

    `voters` is the bootstrap configuration (version (0, 0)) and the initial `target`; None means
    the configuration is unknown (a node joining an existing cloud): `campaign` then only probes
    `probe_voters` until a voter's reply tells it the configuration.
    """

    def __init__(
        self,
        name: str,
        group: str,
        voters: Iterable[str] | None,
        config: LeaseConfig,
        *,
        min_epoch: int = 0,
        probe_voters: Iterable[str] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.group = group
        self.voter_config: VoterConfig | None = None
        self.target: frozenset[str] | None = None
        if voters is not None:
            unique = frozenset(voters)
            if not unique or len(unique) % 2 == 0:
                raise ValueError(f"the voter set must have an odd size, got {len(unique)}")
            self.voter_config = VoterConfig.normal(unique)
            self.target = unique
        self.probe_voters = frozenset(probe_voters) or (self.target or frozenset())
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
        self._cfg_prop: _ConfigProposal | None = None
        self._cfg_version = 0
        self._taken: set[str] = set()
        """Voters that promised our epoch to another candidate: they never take our updates."""
        self.known_in_sync: tuple[tuple[int, int], tuple[str, ...]] | None = None
        """The newest (version, members) in-sync set heard of from voters (relayed in requests)."""
        self.in_sync_recorded: InSyncRecorded | None = None
        self._events: list[LeaseEvent] = []
        self._rng = rng if rng is not None else random.Random()
        self.failures = 0
        """Campaigns lost in a row (reset by an election or by seeing a holder)."""
        self.timeouts = 0
        """Campaigns in a row that ran out of time without enough answers (reset by an election)."""
        self.retry_at = NEVER
        """Do not start another campaign before this (our clock); see `campaign_lost`."""
        self.last_holder: str | None = None
        """The holder we last followed (`holder_seen`): its lease in a refusal is no rival's."""
        self._refused: dict[str, LeaseReply] = {}
        self._base = 0
        """The highest epoch we knew of when the running campaign started."""

    # -- queries

    @property
    def voters(self) -> tuple[str, ...]:
        """Every voter we talk to: those of the configuration and of a pending change."""
        names: set[str] = set()
        if self.voter_config is not None:
            names |= self.voter_config.voters
        if self._cfg_prop is not None:
            names |= self._cfg_prop.config.voters
        return tuple(sorted(names))

    @property
    def quorum(self) -> int:
        """Majority of the largest set (kept for callers that count grants by hand)."""
        sets = self.voter_config.sets if self.voter_config is not None else (self.probe_voters,)
        return max(majority(len(x)) for x in sets)

    @property
    def config_version(self) -> tuple[int, int]:
        """The version our requests carry: the newest configuration we use or proposed."""
        if self.voter_config is None:
            return PROBE_VERSION
        if self._cfg_prop is not None:
            return max(self._cfg_prop.config.version, self.voter_config.version)
        return self.voter_config.version

    @property
    def config_pending(self) -> VoterConfig | None:
        return None if self._cfg_prop is None else self._cfg_prop.config

    def cannot_win(self, refused: Iterable[str]) -> bool:
        """True when these voters' refusals leave some set without a possible majority."""
        cfg = self.voter_config
        if cfg is None:
            return True
        no = set(refused)
        return any(len(x - no) < majority(len(x)) for x in cfg.sets)

    def _lease_end(self, cfg: VoterConfig | None) -> float:
        if cfg is None:
            return NEVER
        ends = []
        for voters in cfg.sets:
            q = majority(len(voters))
            valid = sorted((self._valid[v] for v in voters if v in self._valid), reverse=True)
            if len(valid) < q:
                return NEVER
            ends.append(valid[q - 1])
        return min(ends)

    def lease_end(self) -> float:
        """Holder-side end of the lease: the majority-th latest validity, in every set."""
        return self._lease_end(self.voter_config)

    def is_writer(self, now: float) -> bool:
        """True while this process holds a majority lease that has not run out on its clock."""
        return self.role is Role.HOLDER and now < self.lease_end()

    def renew_at(self) -> float:
        return self._next_renew if self.role is Role.HOLDER else math.inf

    def next_deadline(self) -> float:
        """The latest time by which `tick` must be called again."""
        if self.role is Role.HOLDER:
            times = [self._next_renew, self.lease_end()]
            for prop in (self._proposal, self._cfg_prop):
                if prop is not None:
                    times.append(prop.sent_at + self.config.in_sync_resend)
            return min(times)
        if self.role is Role.CANDIDATE:
            return self._campaign_deadline
        return math.inf

    def campaign_timeout(self) -> float:
        """How long the next campaign waits for a majority: the configured deadline, doubled
        for each campaign in a row that timed out (on a slow machine a voter's round trip can
        take longer than the deadline; giving up then only burns an epoch), capped."""
        cfg = self.config
        return min(cfg.campaign_deadline * 2.0 ** min(self.timeouts, 16), cfg.campaign_deadline_max)

    def may_campaign(self, now: float) -> bool:
        """False while the backoff after a lost campaign runs (`retry_at`)."""
        return now >= self.retry_at

    def refusals(self) -> list[LeaseReply]:
        """The refusals of the running (or last lost) campaign, by voter name."""
        return [self._refused[v] for v in sorted(self._refused)]

    def holder_seen(self, holder: str | None) -> None:
        """Someone holds the lease (we follow a live primary): the next loss is a first one."""
        self.failures = 0
        if holder is not None and holder != self.name:
            self.last_holder = holder

    def _rival(self, reply: LeaseReply) -> bool:
        """The holder a refusal names is another candidate: not us, not the holder we followed.
        Before we followed anyone (just started), also only one holding an epoch above any we
        knew of when our campaign started (a dead holder's lease is older)."""
        h = reply.holder
        if h is None or h in (self.name, self.last_holder):
            return False
        return self.last_holder is not None or reply.promised_epoch > self._base

    def drain_events(self) -> list[LeaseEvent]:
        events, self._events = self._events, []
        return events

    def handle(self, msg: Any, now: float) -> list[Send]:
        """Dispatch a voter's reply (lease, in-sync or configuration)."""
        if isinstance(msg, LeaseReply):
            return self.on_lease_reply(msg, now)
        if isinstance(msg, InSyncReply):
            return self.on_in_sync_reply(msg, now)
        if isinstance(msg, ConfigReply):
            return self.on_config_reply(msg, now)
        raise TypeError(f"candidate cannot handle {type(msg).__name__}")

    # -- transitions

    def campaign(self, now: float, *, force: bool = False, floor: int = 0) -> list[Send]:
        """Ask every voter for the lease at epoch ``max(max_seen, floor) + 1``.

        Pass the local store's fence as `floor`: it is an epoch we know exists. `force` is the
        operator's force-promote (skips the voters' in-sync check; data may be lost). Without a
        known configuration this only probes the voters for it.
        """
        if self.role is Role.HOLDER:
            return []
        if self.voter_config is None:
            return self.probe()
        out: list[Send] = []
        if self.role is Role.CANDIDATE:
            out += self._step_down(now, "campaign_failed")
        self._base = max(self.max_seen, self.epoch, floor)
        self.epoch = self._base + 1
        self.max_seen = self.epoch
        self.role = Role.CANDIDATE
        self.force = force
        self._valid.clear()
        self._rounds.clear()
        self._refused = {}
        self._campaign_deadline = now + self.campaign_timeout()
        return out + self._round(now)

    def probe(self) -> list[Send]:
        """Ask the voters for the group's configuration (an epoch-0 request nobody grants)."""
        req = LeaseRequest(self.group, self.name, 0, 0, False, PROBE_VERSION)
        return [Send(v, req) for v in sorted(self.probe_voters | set(self.voters))]

    def _round(self, now: float) -> list[Send]:
        rid = self._next_id
        self._next_id += 1
        self._rounds[rid] = now
        for old in [r for r in self._rounds if r < rid - 8]:
            del self._rounds[old]
        known = self.known_in_sync
        req = LeaseRequest(
            self.group,
            self.name,
            self.epoch,
            rid,
            self.force,
            self.config_version,
            None if known is None else known[1],
            (0, 0) if known is None else known[0],
        )
        return [Send(v, req) for v in self.voters]

    def _hear_in_sync(self, version: tuple[int, int], members: tuple[str, ...] | None) -> None:
        if members is None:
            return
        v = (int(version[0]), int(version[1]))
        if self.known_in_sync is None or v > self.known_in_sync[0]:
            self.known_in_sync = (v, tuple(sorted(members)))

    def grant_valid_until(self, sent_at: float, received_at: float, duration: float) -> float:
        """How long one grant lets us write: from the request's *send* time, minus the margin."""
        return sent_at + min(duration, self.config.duration) - self.config.margin

    def _hear_config(self, version: tuple[int, int], sets: Any, now: float) -> list[Send]:
        """A voter told us its recorded configuration: adopt it if newer (not as holder)."""
        if not sets or tuple(version) <= self.config_version:
            return []
        try:
            cfg = VoterConfig.from_wire(version, sets)
        except (ValueError, IndexError, TypeError):
            return []
        if self.role is Role.HOLDER:
            # Our own proposals (the pin at election) are newer than anything of a lower
            # epoch, so this one comes from a newer holder.
            return self._step_down(now, "higher_epoch") if cfg.version[0] >= self.epoch else []
        self.voter_config = cfg
        log.info(
            "voter configuration adopted",
            extra={
                "group": self.group,
                "version": list(cfg.version),
                "voters": [sorted(x) for x in cfg.sets],
            },
        )
        if self.role is Role.CANDIDATE:
            return self._round(now)  # ask again, with the right version and the right voters
        return []

    def on_lease_reply(self, reply: LeaseReply, now: float) -> list[Send]:
        if reply.group != self.group or reply.candidate != self.name:
            return []
        self.max_seen = max(self.max_seen, reply.promised_epoch)
        self._hear_in_sync(reply.in_sync_version, reply.in_sync)
        out = self._hear_config(reply.config_version, reply.config, now)
        if self.role is Role.FOLLOWER or reply.epoch != self.epoch:
            return out
        sent_at = self._rounds.get(reply.request_id)
        if sent_at is None:
            return out
        if not reply.granted:
            if reply.promised_epoch > self.epoch:
                if self.role is Role.CANDIDATE:
                    self._refused[reply.voter] = reply
                    return out + self.campaign_lost(now, "higher_epoch")
                return out + self._step_down(now, "higher_epoch")
            if reply.promised_epoch == self.epoch and reply.holder not in (None, self.name):
                self._taken.add(reply.voter)
            if self.role is Role.CANDIDATE and reply.reason != "config":
                # ("config" is not a no: we adopted the newer configuration and asked again.)
                self._refused[reply.voter] = reply
                if self.cannot_win(self._refused):
                    return out + self.campaign_lost(now, "refused")
                if self._rival(reply) and str(reply.holder) < self.name:
                    # Two campaigns at once: the one whose name sorts first goes on, we give way
                    # now (releasing our grants at once rather than holding them until timeout).
                    return out + self.campaign_lost(now, "yield")
            return out
        until = self.grant_valid_until(sent_at, now, reply.duration)
        if until > self._valid.get(reply.voter, NEVER):
            self._valid[reply.voter] = until
        if self.role is Role.CANDIDATE and now < self.lease_end():
            assert self.voter_config is not None
            self.role = Role.HOLDER
            self._next_renew = sent_at + self.config.renew_every
            self._in_sync_version = 0
            self._proposal = None
            self.in_sync_recorded = None
            self._cfg_version = 0
            self._taken = set()
            self.failures = self.timeouts = 0
            self.retry_at = NEVER
            self._events.append(Elected(self.epoch))
            log.info("lease acquired", extra={"group": self.group, "epoch": self.epoch})
            # Pin the configuration we were elected with at our epoch (see the module doc).
            out += self._propose_config(VoterConfig(self.voter_config.version, self.voter_config.sets), now)
        return out

    def tick(self, now: float) -> list[Send]:
        """Renew when due, give up an expired lease or a stalled campaign, resend updates,
        and move the voter configuration towards `target`."""
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
            out += self._drive_config(now)
            return out
        if self.role is Role.CANDIDATE and now >= self._campaign_deadline:
            return self.campaign_lost(now, "timeout")
        return []

    def campaign_lost(self, now: float, why: str) -> list[Send]:
        """End the running campaign (``timeout``, ``refused`` by enough voters that it cannot
        win, or ``higher_epoch``) and set `retry_at`.

        The wait is random in ``[b, 2b]`` with ``b = retry_min * 2**(failures - 1)`` (capped at
        half of `retry_max`): the first retry is as quick as before, and candidates that keep
        defeating each other (each campaign's higher epoch spoils the other's) spread out until
        one wins. When voters refused because the previous holder's lease still runs there
        (``held``, after a quick first retry that covers a death certificate still in flight),
        it waits until that lease has run out: an earlier campaign cannot win and only uses up
        an epoch. Tie-break (``yield``): a refusal that names a rival candidate (a holder other
        than us and the holder we last followed) whose name sorts before ours ends our campaign
        at once, and we wait one maximal campaign deadline more, so of two candidates that
        spoil each other's campaigns the first by name gets a clear run (random waits alone
        separate them only after several doublings on a slow machine). Safety does not depend
        on any of this; only how many campaigns are wasted.
        """
        if self.role is not Role.CANDIDATE:
            return []
        cfg = self.config
        self.failures += 1
        if why == "timeout":
            self.timeouts += 1
        span = min(cfg.retry_cap / 2.0, cfg.retry_base * 2.0 ** min(self.failures - 1, 30))
        wait = span * (1.0 + self._rng.random())
        refused = self._refused.values()
        held = [r.lease_remaining for r in refused if r.reason == "held" and not self._rival(r)]
        if why == "refused" and held and self.failures >= 2:
            wait = max(wait, min(max(held), cfg.duration) + cfg.retry_base * self._rng.random())
        rivals = sorted(str(r.holder) for r in refused if self._rival(r))
        if rivals and rivals[0] < self.name:
            wait += cfg.campaign_deadline_max
        self.retry_at = now + wait
        log.info(
            "campaign lost",
            extra={
                "group": self.group,
                "epoch": self.epoch,
                "reason": why,
                "failures": self.failures,
                "retry_in": round(wait, 3),
            },
        )
        return self._step_down(now, f"campaign_{why}")

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
        voters = self.voters
        self.role = Role.FOLLOWER
        self._valid.clear()
        self._rounds.clear()
        self._next_renew = math.inf
        self._proposal = None
        self._cfg_prop = None
        self.in_sync_recorded = None
        self.last_step_down = reason
        if was_holder:
            self._events.append(SteppedDown(self.epoch, reason))
            log.info("lease given up", extra={"group": self.group, "epoch": self.epoch, "reason": reason})
        # Tell voters we are gone so nobody waits for expiry; harmless if they moved on.
        rel = LeaseRelease(self.group, self.name, self.epoch)
        return [Send(v, rel) for v in voters]

    # -- in-sync set

    def _in_sync_msg(self, prop: _Proposal) -> InSyncUpdate:
        return InSyncUpdate(self.group, self.name, self.epoch, prop.version, tuple(sorted(prop.members)))

    @property
    def in_sync_pending(self) -> frozenset[str] | None:
        return None if self._proposal is None else self._proposal.members

    def _update_quorum(self, acks: Iterable[str]) -> bool:
        """An in-sync update needs the sets of the configuration and of a pending change."""
        have = set(acks)
        for cfg in (self.voter_config, self.config_pending):
            if cfg is not None and not cfg.quorum(have):
                return False
        return True

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
            if reply.reason == "not_holder":
                self._taken.add(reply.voter)
            return []
        prop = self._proposal
        if prop is None or reply.version != prop.version:
            return []
        prop.acks.add(reply.voter)
        self._check_in_sync()
        return []

    def _check_in_sync(self) -> None:
        prop = self._proposal
        if prop is not None and self._update_quorum(prop.acks):
            self._proposal = None
            self.in_sync_recorded = InSyncRecorded(self.epoch, prop.version, prop.members)
            self._hear_in_sync((self.epoch, prop.version), tuple(prop.members))
            self._events.append(self.in_sync_recorded)

    # -- voter configuration

    def set_target(self, voters: Iterable[str]) -> None:
        """The voter set this group should end up with (from the node's configuration)."""
        unique = frozenset(voters)
        if not unique or len(unique) % 2 == 0:
            raise ValueError(f"the voter set must have an odd size, got {len(unique)}")
        self.target = unique
        if self.voter_config is None:
            self.probe_voters = self.probe_voters | unique

    def _config_msg(self, prop: _ConfigProposal) -> ConfigUpdate:
        rec = self.in_sync_recorded
        return ConfigUpdate(
            self.group,
            self.name,
            self.epoch,
            prop.config.version,
            prop.config.wire(),
            None if rec is None else tuple(sorted(rec.members)),
            (0, 0) if rec is None else (rec.epoch, rec.version),
        )

    def _propose_config(self, cfg: VoterConfig, now: float) -> list[Send]:
        self._cfg_version += 1
        prop = _ConfigProposal(VoterConfig((self.epoch, self._cfg_version), cfg.sets), sent_at=now)
        self._cfg_prop = prop
        log.info(
            "voter configuration proposed",
            extra={
                "group": self.group,
                "epoch": self.epoch,
                "version": list(prop.config.version),
                "voters": [sorted(x) for x in prop.config.sets],
            },
        )
        msg = self._config_msg(prop)
        return [Send(v, msg) for v in self.voters]

    def next_config(self) -> VoterConfig | None:
        """The next step towards `target` from our configuration (None: nothing to do)."""
        cfg, target = self.voter_config, self.target
        # Every step needs our in-sync set recorded first, under the quorums of the
        # configuration we hold (so new voters learn it: I2).
        if cfg is None or self.in_sync_recorded is None:
            return None
        if cfg.joint:
            old, new = cfg.sets
            return VoterConfig.normal(old if target == old else new)
        if target is None or cfg.sets[0] == target:
            return None
        return VoterConfig(cfg.version, (cfg.sets[0], target))

    def _drive_config(self, now: float) -> list[Send]:
        prop = self._cfg_prop
        out: list[Send] = []
        if prop is not None and any(len(x - self._taken) < majority(len(x)) for x in prop.config.sets):
            # Voters that promised our epoch to someone else (two simultaneous campaigns for
            # one epoch) leave this change without a possible majority: only a new epoch helps.
            return self._step_down(now, "epoch_taken")
        if prop is not None and not prop.recorded:
            if now >= prop.sent_at + self.config.in_sync_resend:
                prop.sent_at = now
                msg = self._config_msg(prop)
                out += [Send(v, msg) for v in sorted(prop.config.voters) if v not in prop.acks]
            return out
        if prop is not None and prop.recorded:
            # A joint configuration becomes ours once each of its sets granted our epoch too.
            if now >= self._lease_end(prop.config):
                return out
            self._adopt_own(prop.config)
        nxt = self.next_config()
        if nxt is not None and self.is_writer(now):
            out += self._propose_config(nxt, now)
        return out

    def _adopt_own(self, cfg: VoterConfig) -> None:
        self.voter_config = cfg
        self._cfg_prop = None
        self._events.append(ConfigRecorded(self.epoch, cfg))
        log.info(
            "voter configuration recorded",
            extra={
                "group": self.group,
                "epoch": self.epoch,
                "version": list(cfg.version),
                "joint": cfg.joint,
            },
        )
        self._check_in_sync()

    def on_config_reply(self, reply: ConfigReply, now: float) -> list[Send]:
        if reply.group != self.group:
            return []
        self.max_seen = max(self.max_seen, reply.promised_epoch)
        if self.role is not Role.HOLDER or reply.epoch != self.epoch:
            return []
        if not reply.ok:
            if reply.promised_epoch > self.epoch:
                return self._step_down(now, "higher_epoch")
            if reply.reason == "not_holder":
                self._taken.add(reply.voter)
            return []
        prop = self._cfg_prop
        if prop is None or tuple(reply.version) != prop.config.version or prop.recorded:
            return []
        prop.acks.add(reply.voter)
        if not prop.config.quorum(prop.acks):
            return []
        if prop.config.joint:
            prop.recorded = True  # becomes ours in `tick` once every set granted our epoch
            return self._drive_config(now)
        self._adopt_own(prop.config)
        return self._drive_config(now)
