"""The runtime process: one bus endpoint, a lease voter if configured, and per hosted
instance an HA loop (DESIGN.md sections 5, 6, 8 and 9).

Structure
---------
* `Node` owns the `Endpoint` (mutual-TLS bus), the process's core-only store (voter promises,
  operator-set states), the `Voter` when this node is one of the configured voters, the
  topology view, the event log and the router. It gossips a status document (its instances,
  their states, epochs, in-sync sets and lags, its API URLs) to every peer every
  `GOSSIP_INTERVAL` and at once on any state change; the union of those is the topology view
  that `describe-services` shows and that routing uses.
* `Instance` is one hosted component instance. For a replicated type it runs an HA loop in
  the spirit of Patroni's ``ha.py``: health probe with a timeout (a hung component goes
  NOTREADY and gives up its lease while the process lives on), catch-up / state transfer
  through `ReplicationBackup` until in sync, a campaign (`Candidate.campaign`) when the
  primary has gone quiet, renewals while holding, step-down on expiry or a higher epoch, and
  the primary side (`ReplicationPrimary`) while it holds the lease.

Protocol plumbing
-----------------
The pure cores (`euca_runtime.lease`, `euca_runtime.replication`) return `Send(to, msg)`
pairs. `to` is a node name (voters) or an instance name (replication peers); the node maps
instance names to nodes through the topology view. Messages travel as bus requests
``_proto/m {"msgs": [...]}``; the answer carries the receiver's replies to the sender (lease
grants, acks, fencing rejects), so a round trip is one request. Messages for this node itself
are delivered in-process.

Threads: the cores are not thread-safe and the store is blocking. Lease logic (`Candidate`)
runs on the event loop and never blocks; everything that touches a replica store (primary,
backup) runs on the instance's single replication thread, in submission order; the voter has
its own thread (it persists promises before answering). One exception keeps two thread
handoffs off every replicated write: a backup's ack that only moves the primary's in-memory
counters (`ReplicationPrimary.ack_is_light`) is handled on the loop when the replication
thread is idle (no job submitted and not yet handled), which is the same as a job in order.
Likewise a send-first write (`ReplicationPrimary.prepare`, for ops the component declares unable
to fail) makes its record on the loop when the thread is idle, reading only the store's cached
position and fence, writes it to the backups, and queues its apply and commit as the next job.

Routing (`Node.call`): a request for (type, partition) goes to the ENABLED instance with the
highest epoch in the topology view, in-process when it is local. `NotPrimary` answers, lost
connections and timeouts are retried, re-resolving each time, until the request's deadline:
requests are held across a failover instead of failing fast. One idempotency key is used for
every attempt.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib
import json
import math
import os
import random
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from euca_runtime import lease as lease_mod
from euca_runtime import reconfig
from euca_runtime import replication as repl_mod
from euca_runtime.clock import Clock, RealClock
from euca_runtime.component import (
    Component,
    ComponentType,
    RequestError,
    RequestInfo,
    ServiceUnavailable,
    SqlReplicaStore,
    SqlVoterStorage,
    WriteResult,
    get_type,
    group_key,
)
from euca_runtime.config import ComponentSpec as ConfigComponent
from euca_runtime.config import RuntimeConfig
from euca_runtime.lease import (
    Candidate,
    ConfigRecorded,
    ConfigReply,
    DeathCertificate,
    Elected,
    InSyncRecorded,
    InSyncReply,
    LeaseConfig,
    LeaseReply,
    Role,
    Send,
    SteppedDown,
    Voter,
)
from euca_runtime.log import get_logger
from euca_runtime.replication import (
    CatchUpRequest,
    Fenced,
    FencedError,
    Replicate,
    ReplicateAck,
    ReplicationBackup,
    ReplicationConfig,
    ReplicationPrimary,
    SnapshotChunk,
    SnapshotPull,
)
from euca_runtime.routes import RouteVerdict, RouteView
from euca_runtime.store import ObjectCache, Store, StoreError, sqlite_url
from euca_runtime.tls import client_context, server_context, write_private
from euca_runtime.transport import DeadlineExceeded, Endpoint, PeerUnavailable, RemoteError
from euca_runtime.vip import VipManager

log = get_logger("node")

GOSSIP_INTERVAL = 0.25
"""Seconds between topology status pushes to every peer (also pushed at once on a change)."""
TICK = 0.05
"""HA loop period: lease ticks, campaign decisions, state evaluation."""
PROBE_INTERVAL = 0.5
API_APPS = (
    ("kv", "kv", "euca_runtime.services.kv", "make_api_app"),
    ("iam", "clc", "euca_runtime.services.iam", "make_api_app"),
    ("ec2", "clc", "euca_runtime.services.ec2", "make_api_app"),
    ("s3", "walrus", "euca_runtime.walrus.http", "make_s3_app"),
)
"""(API listener, component type that serves it, module, app factory): an API is served by a
process hosting an instance of that type (imported only then)."""
BOOT_GRACE = 10.0
"""For this long after it starts, a backup (role hint ``backup``) that has not followed any
primary yet leaves the first campaign to the group's preferred primary (the first host of a
group): it waits while some peer has not been heard from yet or one is heard with that
preferred primary still starting. A dead preferred primary therefore delays a cold boot by
this much at most; once a primary was followed it delays nothing."""
PROBE_TIMEOUT = 1.0
"""A health probe that has not answered by then makes the instance NOTREADY."""
PROTO_TIMEOUT = 1.0
"""Deadline of one protocol message round trip."""
REGISTER_INTERVAL = 1.0
RETRYABLE = frozenset({"NotPrimary", "Unavailable", "Cancelled", "DeadlineExceeded", "NoHandler", "NotReady"})
"""Remote error types that `Node.call` retries (elsewhere) until the deadline."""
EVENTS_KEPT = 2000
MAX_BATCH_OPS = 256
"""Most ops one group-committed change record carries."""
EARLY_SEND_WAIT = 0.002
"""How long the replication thread yields to the event loop so that a new record is on the wire
to the backups before the primary goes on with its own commit (both hold the GIL otherwise)."""
MAX_INFLIGHT_RECORDS = 2
"""Uncommitted change records the primary lets in flight; more writes wait and batch up."""
MAX_BATCH_BYTES = 4 * 1024 * 1024
"""Most bytes (of op values, roughly) one group-committed change record carries, so a record
stays well inside one bus frame (`bus.max_frame_bytes`, 16 MiB); a single bigger write goes
alone."""


def _ops_bytes(ops: Sequence[Mapping[str, Any]]) -> int:
    """Rough encoded size of `ops`: their str/bytes values plus a little per field."""
    size = 0
    for op in ops:
        for v in op.values():
            size += len(v) + 8 if isinstance(v, bytes | str) else 16
    return size


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


_OPEN_LOCK = threading.Lock()

VOTER_MESSAGES = (
    lease_mod.LeaseRequest,
    lease_mod.LeaseRelease,
    DeathCertificate,
    lease_mod.InSyncUpdate,
    lease_mod.ConfigUpdate,
)


def _describe_config(cfg: lease_mod.VoterConfig | None) -> dict[str, Any] | None:
    return None if cfg is None else cfg.describe()


def encode_msg(msg: Any) -> dict[str, Any]:
    """A lease or replication message as a plain, tagged dict."""
    if type(msg) in lease_mod.LEASE_MESSAGES:
        return lease_mod.encode(msg)
    return repl_mod.encode(msg)


def msg_sender(msg: Any) -> str | None:
    """The name (instance or node) a protocol message came from; replies go back to it."""
    for attr in ("candidate", "sender", "voter", "holder"):
        value = getattr(msg, attr, None)
        if isinstance(value, str):
            return value
    return None


def decode_msg(doc: Mapping[str, Any]) -> Any:
    """Inverse of `encode_msg`; ValueError on anything unknown or malformed."""
    name = str(doc.get("type"))
    if name in {c.__name__ for c in lease_mod.LEASE_MESSAGES}:
        return lease_mod.decode(doc)
    return repl_mod.decode(doc)


@dataclass(frozen=True)
class ServiceEvent:
    """One service state transition (or notable HA event) and its cause."""

    ts: float
    node: str
    service: str
    old: str
    new: str
    cause: str
    epoch: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _JobResult:
    """What a replication-thread job hands back to the event loop."""

    sends: list[Send] = field(default_factory=list)
    commit: int | None = None
    epoch: int = 0
    proposal: frozenset[str] | None = None
    observe: int | None = None
    seq: int = 0
    value: Any = None


@dataclass
class _View:
    """The last status document received from one peer."""

    doc: dict[str, Any]
    received: float
    died: str = ""
    """Set when a supervisor certified the process that sent `doc` dead: the document no longer
    speaks for its node (its leases and VIPs are gone), even while the node's next process, or
    the certificate's own connection, keeps the node's heartbeat fresh."""


class Metrics:
    """Counters and latency histograms for the Prometheus endpoint."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.failovers: collections.Counter[str] = collections.Counter()
        self.elections: collections.Counter[str] = collections.Counter()
        self.step_downs: collections.Counter[tuple[str, str]] = collections.Counter()
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.latency: dict[tuple[str, str], list[float]] = {}
        self.latency_sum: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.latency_count: collections.Counter[tuple[str, str]] = collections.Counter()

    def observe(self, group: str, method: str, seconds: float, outcome: str) -> None:
        key = (group, method)
        self.requests[(group, method, outcome)] += 1
        buckets = self.latency.setdefault(key, [0.0] * len(self.BUCKETS))
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
        self.latency_sum[key] += seconds
        self.latency_count[key] += 1


def _db_url(cfg: RuntimeConfig, name: str | None) -> str:
    """The database URL of one instance (or of the node's core store when `name` is None).

    SQLite (the default): ``<dir of database_url>/<name>.db`` next to the core database.
    PostgreSQL: the configured database name with ``_<name>`` appended (``-``/``.`` -> ``_``);
    the deployment creates those databases.
    """
    url = make_url(cfg.database_url)
    if name is None:
        return cfg.database_url
    if url.get_backend_name() == "sqlite":
        base = Path(url.database or cfg.data_dir / "euca.db")
        return sqlite_url(base.parent / f"{name}.db")
    safe = "".join(c if c.isalnum() else "_" for c in name)
    return url.set(database=f"{url.database}_{safe}").render_as_string(hide_password=False)


# --------------------------------------------------------------------------- instance


class Instance:
    """One hosted component instance and its HA loop."""

    def __init__(self, node: Node, spec: ConfigComponent, ctype: ComponentType) -> None:
        self.node = node
        self.name = spec.name
        self.type = spec.type
        self.partition = spec.partition
        self.group = group_key(spec.type, spec.partition)
        self.node_name = node.name
        self.role_hint = spec.role
        self.options: dict[str, Any] = dict(spec.options)
        """Type-specific settings from the configuration (``components[].options``)."""
        self.ctype = ctype
        self.replicated = ctype.replicated
        """A leased primary/backup group (one ENABLED instance at a time, epochs, voters)."""
        self.has_store = ctype.replicated and ctype.store_component is not None
        """Leased *and* backed by a replicated store. A leased type without a store (the CC
        proxy) is "leased, stateless": lease core and voters as usual, no replication; every
        live, healthy instance is trivially in sync (DISABLED), and the lease holder is ready
        to serve as soon as it is elected."""
        self.state = "NOTREADY"
        self.cause = "starting"
        self.since = time.time()
        self.broken: str | None = None
        self.started = False
        self.started_at = 0.0
        self.ever_followed = False
        """Has followed, or seen, a primary of its group since it started (then the boot grace no
        longer applies)."""
        self.stopped = False
        self.stop_reason = ""
        self.healthy = False
        self.health_cause = "not probed yet"
        self.component: Component | None = None
        self._store: Store | None = None
        self._cache: ObjectCache | None = None
        self._rstore: SqlReplicaStore | None = None
        self.candidate: Candidate | None = None
        self._primary: ReplicationPrimary | None = None  # replication thread only
        self._backup: ReplicationBackup | None = None  # replication thread only
        self._exec = ThreadPoolExecutor(1, thread_name_prefix=f"repl-{self.name}")
        self._jobs = 0
        """Replication-thread jobs submitted whose result the loop has not handled yet; while it
        is 0 the thread is idle and the loop may run a light job itself (`on_message`)."""
        # Mirrors of replication-thread state, for the loop (plain attribute reads).
        self.primary_ready = False
        self.primary_epoch = 0
        self.fence = 0
        self.last_seq = 0
        self.last_epoch = 0
        self.backup_heard = -math.inf
        self.synced_epoch = 0
        self.following: str | None = None
        self.receiving: tuple[int, int] | None = None  # state transfer: (chunks applied, snapshot seq)
        self.recorded: frozenset[str] | None = None
        self.lags: dict[str, int | None] = {}
        self.known_in_sync = False
        self.group_in_sync: list[str] = []
        # Writes waiting for their commit.
        self.pending: dict[int, tuple[int, asyncio.Future[None]]] = {}
        self.commit_seen: tuple[int, int] = (0, 0)  # (epoch, commit_seq)
        self.next_campaign_at = 0.0
        self.hold_off_until = 0.0
        self.force_next = False
        self.handing_over: str | None = None
        self.refusals: dict[str, str] = {}
        self._recorded_changed = False
        self._write_queue: collections.deque[
            tuple[list[dict[str, Any]], asyncio.Future[WriteResult], int]
        ] = collections.deque()
        self._writer_busy = False
        self._commit_progress = asyncio.Event()
        self.step_down_cause = ""
        self._next_primary_tick = 0.0
        self._members: frozenset[str] = frozenset()
        self._tasks: list[asyncio.Task[Any]] = []
        self._state_changed = asyncio.Event()
        self.route_evicted = False
        """This instance gave up the lease because its route went DOWN (failback candidate)."""
        self._failback_task: asyncio.Task[Any] | None = None
        self._failback_next = 0.0

    # ------------------------------------------------------------------ context for the component

    @property
    def store(self) -> Store | None:
        return self._store

    @property
    def cache(self) -> ObjectCache | None:
        return self._cache

    async def call(
        self,
        type_: str,
        partition: str | None,
        method: str,
        body: Any = None,
        *,
        timeout: float = 5.0,
        dedupe: bool = True,
    ) -> Any:
        return await self.node.call(type_, partition, method, body, timeout=timeout, dedupe=dedupe)

    @property
    def data_dir(self) -> Path:
        """The process's data directory (components keep local files under it)."""
        return self.node.cfg.data_dir

    def peer_instances(self) -> list[str]:
        """The other members of this instance's group (replication peers)."""
        return sorted(self.node.members(self.group) - {self.name})

    async def call_peer(self, instance: str, method: str, body: dict[str, Any], *, timeout: float) -> Any:
        """Call `method` of the component's `peer_handlers` on another instance of the group,
        whatever its state (e.g. the primary streaming object bytes to its backups)."""
        return await self.node.call_instance(instance, method, body, timeout=timeout)

    # ------------------------------------------------------------------ lifecycle

    def _mono(self) -> float:
        return self.node.clock.monotonic()

    async def _run(self, fn: Callable[[], Any]) -> Any:
        self._jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._exec, fn)
        finally:
            self._jobs -= 1

    async def open(self) -> None:
        """Open the store and build the component; BROKEN on failure (the process lives on)."""
        target = self.node.targets.get(self.name)
        if target is not None and target.get("state") == "STOPPED":
            self.stopped = True
            self.stop_reason = target.get("reason") or "operator"
        try:
            if self.has_store:
                url = _db_url(self.node.cfg, self.name)

                def open_store() -> Store:
                    with _OPEN_LOCK:  # Alembic's migration context is process-global
                        return Store.open(url, component=self.ctype.store_component, group=self.group)

                self._store = await self._run(open_store)
                self._cache = await self._run(lambda: ObjectCache(self._store, warm=True))  # type: ignore[arg-type]
                self._rstore = await self._run(lambda: SqlReplicaStore(self._store))  # type: ignore[arg-type]
                self.fence = self._rstore.fence_epoch
                self.last_seq, self.last_epoch = self._rstore.last_seq, self._rstore.last_epoch
                # A joining node learns each group's voters from the voters (lease.py, reconfig.py).
                self.candidate = Candidate(
                    self.name,
                    self.group,
                    None if self.node.cfg.join else self.node.bootstrap_voters,
                    self.node.lease_config,
                    min_epoch=self.fence,
                    probe_voters=self.node.cfg.voters,
                )
                self.candidate.set_target(self.node.cfg.voters)
                self._backup = ReplicationBackup(self.name, self.group, self._rstore, self.node.repl_config)
            elif self.replicated:  # leased, stateless: a lease and nothing to replicate
                self.candidate = Candidate(
                    self.name,
                    self.group,
                    None if self.node.cfg.join else self.node.bootstrap_voters,
                    self.node.lease_config,
                    min_epoch=0,
                    probe_voters=self.node.cfg.voters,
                )
                self.candidate.set_target(self.node.cfg.voters)
                self.known_in_sync = True
            self.component = self.ctype.factory(self)
        except (StoreError, SQLAlchemyError, OSError, ValueError) as exc:
            self.broken = f"cannot open: {exc}"
            log.error("instance broken", extra={"service": self.name, "reason": str(exc)})
        now = self._mono()
        delay = {"primary": (0.0, 0.05), "backup": (0.6, 0.9)}.get(self.role_hint, (0.15, 0.45))
        self.next_campaign_at = now + random.uniform(*delay)
        self.started_at = now
        self.started = True
        self.update_state()

    def start_loops(self) -> None:
        if self.broken:
            return
        self._tasks.append(asyncio.create_task(self._tick_loop(), name=f"tick-{self.name}"))
        self._tasks.append(asyncio.create_task(self._health_loop(), name=f"health-{self.name}"))

    async def shutdown(self) -> None:
        """Give up the lease (voters told, so failover is immediate) and stop the loops."""
        cand = self.candidate
        if cand is not None and cand.role is not Role.FOLLOWER:
            sends = cand.release(self._mono())
            cand.drain_events()
            self._fail_pending("shutting down")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.node.send_and_wait(sends), 0.5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.component is not None:
            try:
                await asyncio.wait_for(self.component.close(), 10.0)
            except Exception:
                log.exception("component close failed", extra={"service": self.name})
        with contextlib.suppress(Exception):
            await self._run(self._drop_replication)  # close open snapshots / staged installs
        self._exec.shutdown(wait=True, cancel_futures=True)
        if self._cache is not None:
            self._cache.close()
        if self._store is not None:
            self._store.close()

    # ------------------------------------------------------------------ state

    def is_writer(self, now: float | None = None) -> bool:
        cand = self.candidate
        return cand is not None and cand.is_writer(self._mono() if now is None else now)

    def can_serve(self, now: float | None = None) -> bool:
        """The ENABLED test, evaluated freshly (lease on our own clock) before serving."""
        if self.broken or self.stopped or not self.started or not self.healthy or self.component is None:
            return False
        if self.route_block() is not None:
            return False
        if not self.replicated:
            return True
        return self.is_writer(now) and self.primary_ready and self.handing_over is None

    def compute_state(self) -> tuple[str, str]:
        now = self._mono()
        if self.broken:
            return "BROKEN", self.broken
        if self.stopped:
            return "STOPPED", self.stop_reason or "operator"
        if not self.started:
            return "NOTREADY", "starting"
        if not self.healthy:
            return "NOTREADY", self.health_cause
        blocked = self.route_block()
        if blocked is not None:
            return "NOTREADY", blocked
        if not self.replicated:
            note = getattr(self.component, "state_note", None)
            return "ENABLED", "running" + (f"; {note()}" if callable(note) else "")
        cand = self.candidate
        assert cand is not None
        if cand.is_writer(now):
            if self.primary_ready:
                if self.handing_over:
                    return "ENABLED", f"handing over to {self.handing_over}"
                return "ENABLED", f"lease holder, epoch {cand.epoch}"
            return "NOTREADY", f"elected (epoch {cand.epoch}); recording the in-sync set"
        if self.known_in_sync:
            return "DISABLED", "in sync" + (f" with {self.following}" if self.following else "")
        if self.following and self.receiving is not None:
            chunks, seq = self.receiving
            return (
                "NOTREADY",
                f"receiving a state transfer (seq {seq}) from {self.following}: {chunks} chunks",
            )
        if cand.voter_config is None and not self.following:
            why = "; ".join(f"{v}: {r}" for v, r in sorted(self.refusals.items())) or "no answer yet"
            return "NOTREADY", f"joining: voter configuration not known yet (voters: {why})"
        if self.following:
            return "NOTREADY", f"catching up with {self.following}"
        return "NOTREADY", self.step_down_cause or "waiting for a primary"

    def update_state(self) -> None:
        state, cause = self.compute_state()
        if state != self.state:
            old = self.state
            self.state, self.cause, self.since = state, cause, time.time()
            self.node.record_event(self.name, old, state, cause, self.epoch)
            self._state_changed.set()
            self._state_changed = asyncio.Event()
            self.node.gossip_soon()
            self.node.routes_changed()
            comp = self.component
            if comp is not None and (old == "ENABLED") != (state == "ENABLED"):
                hook = comp.on_enabled(self.epoch) if state == "ENABLED" else comp.on_disabled()
                self.node.spawn(hook)
            if self.node.vips is not None and (old == "ENABLED") != (state == "ENABLED"):
                self.node.vips.kick()  # take or drop the group's VIP now (euca_runtime.vip)
        else:
            self.cause = cause

    async def wait_state(self, pred: Callable[[Instance], bool], timeout: float) -> bool:
        """Wait until `pred(self)` holds (re-evaluated on every state change or tick)."""
        deadline = self._mono() + timeout
        while not pred(self):
            remaining = deadline - self._mono()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), min(remaining, 0.05))
        return True

    @property
    def epoch(self) -> int:
        cand = self.candidate
        if cand is not None and cand.role is Role.HOLDER:
            return cand.epoch
        return self.fence

    def status(self) -> dict[str, Any]:
        """This instance's entry in the node's gossiped status document."""
        cand = self.candidate
        lease_remaining = None
        if cand is not None and cand.role is Role.HOLDER:
            lease_remaining = max(0.0, cand.lease_end() - self._mono())
        return {
            "name": self.name,
            "type": self.type,
            "partition": self.partition,
            "group": self.group,
            "state": self.state,
            "cause": self.cause,
            "since": self.since,
            "epoch": self.epoch,
            "replicated": self.replicated,
            "role": (cand.role.value if cand is not None else None),
            "role_hint": self.role_hint,
            "in_sync": self.state == "ENABLED" or (self.known_in_sync and self.state == "DISABLED"),
            "in_sync_set": sorted(self.recorded)
            if self.recorded is not None and self.primary_ready
            else None,
            "lags": dict(self.lags) if self.primary_ready else {},
            "seq": self.last_seq,
            "following": self.following,
            "lease_remaining": lease_remaining,
            "stopped_reason": self.stop_reason if self.stopped else None,
            "voter_config": _describe_config(cand.voter_config if cand is not None else None),
            "voter_config_pending": _describe_config(cand.config_pending if cand is not None else None),
        }

    # ------------------------------------------------------------------ replication-thread jobs

    def _mirror(self) -> None:
        rs = self._rstore
        if rs is not None:
            self.fence, self.last_seq, self.last_epoch = rs.fence_epoch, rs.last_seq, rs.last_epoch
        p, b = self._primary, self._backup
        if p is not None:
            self.primary_ready = p.ready
            self.primary_epoch = p.epoch
            if p.recorded != self.recorded:
                self._recorded_changed = True
                if p.recorded is not None:
                    self.group_in_sync = sorted(p.recorded)
            self.recorded = p.recorded
            self.lags = {m: p.lag(m) for m in sorted(p.peers)}
        elif self.has_store:
            self.primary_ready = False
            self.recorded = None
            self.lags = {}
        if b is not None:
            self.backup_heard = b.last_heard
            self.synced_epoch = b.synced_epoch
            self.following = b.primary
            self.ever_followed = self.ever_followed or b.primary is not None
            self.receiving = b.transfer
        else:
            self.following = None
            self.receiving = None

    def _set_primary(self, p: ReplicationPrimary | None) -> None:
        """Replace the primary core, closing the snapshots of the old one's state transfers."""
        old, self._primary = self._primary, p
        if old is not None and old is not p:
            old.close()

    def _set_backup(self, b: ReplicationBackup | None, why: str) -> None:
        """Replace the backup core, aborting a state transfer the old one was receiving."""
        old, self._backup = self._backup, b
        if old is not None and old is not b:
            old.abort_transfer(why)

    def _drop_replication(self) -> None:
        self._set_primary(None)
        self._set_backup(None, "shutting down")

    def _post_primary(self, p: ReplicationPrimary, now: float, sends: list[Send]) -> _JobResult:
        proposal = p.next_in_sync_proposal(now)
        self._mirror()
        return _JobResult(sends=sends, commit=p.commit_seq, epoch=p.epoch, proposal=proposal)

    def _job_become_primary(self, epoch: int, members: frozenset[str]) -> _JobResult:
        assert self._rstore is not None
        now = self._mono()
        try:
            p = ReplicationPrimary(
                self.name, self.group, epoch, self._rstore, members, self.node.repl_config, now
            )
        except FencedError as exc:
            self._mirror()
            return _JobResult(observe=exc.fence)
        self._set_primary(p)
        self._set_backup(None, "became the primary")
        return self._post_primary(p, now, [])

    def _job_become_backup(self, reset: bool = False) -> _JobResult:
        self._set_primary(None)
        if (self._backup is None or reset) and self._rstore is not None:
            self._set_backup(
                ReplicationBackup(self.name, self.group, self._rstore, self.node.repl_config), "reset"
            )
        self._mirror()
        return _JobResult()

    def _job_in_sync_recorded(self, epoch: int, members: frozenset[str]) -> _JobResult:
        p = self._primary
        if p is None or p.epoch != epoch:
            return _JobResult()
        p.on_in_sync_recorded(members)
        return self._post_primary(p, self._mono(), [])

    def _job_tick(self) -> _JobResult:
        p = self._primary
        if p is None:
            return _JobResult()
        now = self._mono()
        return self._post_primary(p, now, p.tick(now))

    def _job_members(self, members: frozenset[str]) -> _JobResult:
        p = self._primary
        if p is None:
            return _JobResult()
        now = self._mono()
        p.set_members(members, now)
        return self._post_primary(p, now, [])

    def _job_append(self, ops: Sequence[Mapping[str, Any]], loop: asyncio.AbstractEventLoop) -> _JobResult:
        p = self._primary
        if p is None or not p.ready:
            raise ServiceUnavailable(f"{self.name} is not the ready primary")
        now = self._mono()

        def early(sends: list[Send]) -> None:
            # Out to the backups before our own commit: their apply overlaps ours. Wait (in
            # Event.wait, without the GIL) until the loop has run the send: `node.send` spawns
            # the bus request, whose first step (queued before `sent.set`) writes the frame;
            # else the loop waits for the GIL until our fsync.
            sent = threading.Event()

            def go() -> None:
                self.node.send(sends)
                loop.call_soon(sent.set)

            loop.call_soon_threadsafe(go)
            sent.wait(EARLY_SEND_WAIT)

        try:
            rec, sends = p.append(ops, now, early=early)
        except Exception:
            if p.failed:
                loop.call_soon_threadsafe(self._give_up, "local commit failed after replicating")
            raise
        res = self._post_primary(p, now, sends)
        res.seq = rec.seq
        return res

    def _send_first_ok(self, ops: Sequence[Mapping[str, Any]]) -> bool:
        """Whether a record of `ops` may go to the backups before the local apply: the
        replication thread is idle (so the loop may use the primary core, as for a light ack),
        the primary is ready with someone to send to, and the component declares every op one
        that cannot fail to apply (`ComponentSpec.send_first_ok`)."""
        p, rs = self._primary, self._rstore
        if self._jobs or p is None or rs is None or not p.ready or not p.peers:
            return False
        spec = rs.store.component
        return spec is not None and spec.send_first_ok(ops)

    def _submit_send_first(
        self, ops: Sequence[Mapping[str, Any]], loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[_JobResult]:
        """Send first (`ReplicationPrimary.prepare`): the record goes to the backups from the
        loop now, and the replication thread applies and commits it here meanwhile, so the
        primary's apply and commit overlap the backups' instead of preceding them."""
        p = self._primary
        assert p is not None
        try:
            rec, sends = p.prepare(ops, self._mono())
        except (repl_mod.NotReadyError, FencedError, repl_mod.ChainError):
            return self._submit(lambda: self._job_append(ops, loop), sends=True)
        # The frames are written here (`Node.send`), before the replication thread wakes up to
        # apply the record, so they do not wait for the GIL while it runs; the job is queued
        # right after (FIFO: nothing else runs on the core between prepare and commit).
        self.node.send(sends)
        return self._submit(functools.partial(self._job_commit_prepared, p, rec, loop), sends=True)

    def _job_commit_prepared(
        self, p: ReplicationPrimary, rec: repl_mod.ChangeRecord, loop: asyncio.AbstractEventLoop
    ) -> _JobResult:
        if self._primary is not p:  # the next job after `prepare`: cannot happen, but never guess
            raise ServiceUnavailable(f"{self.name} stopped being the primary before its commit")
        now = self._mono()
        try:
            p.commit_prepared(rec)
        except Exception:
            if p.failed:
                loop.call_soon_threadsafe(self._give_up, "local commit failed after replicating")
            raise
        res = self._post_primary(p, now, [])
        res.seq = rec.seq
        return res

    def _job_caught_up(self, target: str) -> bool:
        p, rs = self._primary, self._rstore
        if p is None or rs is None:
            return False
        peer = p.peers.get(target)
        return peer is not None and peer.acked >= rs.last_seq and p.commit_seq >= rs.last_seq

    def _job_message(self, msg: Any) -> _JobResult:
        now = self._mono()
        p = self._primary
        if isinstance(msg, Replicate | SnapshotChunk):
            observe = None
            if p is not None:
                if msg.epoch < p.epoch:
                    return _JobResult(sends=[Send(msg.sender, Fenced(self.group, self.name, p.epoch))])
                if msg.epoch == p.epoch:
                    return _JobResult()
                self._set_primary(None)  # deposed: a newer primary exists
                observe = msg.epoch
            if self.stopped or self._rstore is None:
                self._mirror()
                return _JobResult(observe=observe)
            if self._backup is None:
                self._backup = ReplicationBackup(self.name, self.group, self._rstore, self.node.repl_config)
            sends = self._backup.handle(msg, now)
            comp = self.component
            if comp is not None and comp.sync_blocked():
                # The component lacks data the log refers to (e.g. object bytes it must still
                # fetch): it must not count towards commits or be recorded in sync yet.
                sends = [s for s in sends if not isinstance(s.msg, ReplicateAck)]
            self._mirror()
            return _JobResult(sends=sends, observe=observe if observe is not None else msg.epoch)
        if isinstance(msg, ReplicateAck):
            if p is None:
                return _JobResult()
            return self._post_primary(p, now, p.on_ack(msg, now))
        if isinstance(msg, CatchUpRequest):
            if p is None:
                return _JobResult()
            return self._post_primary(p, now, p.on_catch_up(msg, now))
        if isinstance(msg, SnapshotPull):
            if p is None:
                return _JobResult()
            return self._post_primary(p, now, p.on_pull(msg, now))
        return _JobResult()

    # ------------------------------------------------------------------ loop-side handling

    def _handle_result(self, r: _JobResult, *, sends: bool = True) -> None:
        now = self._mono()
        cand = self.candidate
        if r.observe is not None and cand is not None:
            if cand.role is Role.HOLDER and r.observe > cand.epoch:
                self.step_down_cause = f"a newer primary (epoch {r.observe}) exists"
            if cand.role is not Role.FOLLOWER and r.observe > cand.epoch:
                self.node.send(cand.observe_epoch(r.observe, now))
            else:
                cand.max_seen = max(cand.max_seen, r.observe)
        if sends and r.sends:
            self.node.send(r.sends)
        if r.proposal is not None and cand is not None:
            if cand.role is Role.HOLDER and cand.epoch == r.epoch:
                self.node.send(cand.propose_in_sync(r.proposal, now))
        if r.commit is not None:
            self._resolve(r.epoch, r.commit)
        if self._recorded_changed:
            self._recorded_changed = False
            self.node.gossip_soon()
        self._after_lease()
        self.update_state()

    def _submit(self, fn: Callable[[], _JobResult], *, sends: bool = True) -> asyncio.Future[_JobResult]:
        """Queue a replication job now (FIFO); its result is handled on the loop when done."""
        fut = asyncio.get_running_loop().run_in_executor(self._exec, fn)
        self._jobs += 1

        def done(f: asyncio.Future[_JobResult]) -> None:
            self._jobs -= 1
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                if not isinstance(exc, ServiceUnavailable):
                    log.error(
                        "replication job failed",
                        exc_info=exc,
                        extra={"service": self.name, "group": self.group},
                    )
                return
            self._handle_result(f.result(), sends=sends)

        fut.add_done_callback(done)
        return fut

    def _resolve(self, epoch: int, commit: int) -> None:
        if self.pending and not self.is_writer():
            # Never acknowledge once our lease may have run out (a pause between append and
            # commit): the records are safe or fenced either way, the client retries.
            self._fail_pending("lease lost")
            return
        if (epoch, commit) > self.commit_seen:
            self.commit_seen = (epoch, commit)
        for seq in sorted(s for s, (e, _) in self.pending.items() if e == epoch and s <= commit):
            _, fut = self.pending.pop(seq)
            if not fut.done():
                fut.set_result(None)
        self._commit_progress.set()

    def _fail_pending(self, why: str) -> None:
        while self._write_queue:
            _, fut, _ = self._write_queue.popleft()
            _fail(fut, ServiceUnavailable(f"{self.name}: {why} before the write was appended"))
        pending, self.pending = self.pending, {}
        self._commit_progress.set()
        for _, committed in pending.values():
            _fail(committed, ServiceUnavailable(f"{self.name}: {why} before the write committed"))

    def _after_lease(self) -> None:
        cand = self.candidate
        if cand is None:
            return
        for ev in cand.drain_events():
            if isinstance(ev, Elected):
                self.route_evicted = False
                self.node.metrics.elections[self.group] += 1
                if self.last_seq > 0 or self.fence > 0:
                    self.node.metrics.failovers[self.group] += 1
                self.step_down_cause = ""
                self.refusals.clear()
                self.node.note(self.name, f"elected, epoch {ev.epoch}", ev.epoch)
                members = self.node.members(self.group)
                if self.has_store:
                    self._submit(functools.partial(self._job_become_primary, ev.epoch, members))
                else:  # leased, stateless: nothing to replicate, serve at once
                    self.fence = max(self.fence, ev.epoch)
                    self.primary_epoch = ev.epoch
                    self._set_stateless_in_sync(members)
                    self.primary_ready = True
                self.node.held_changed()
            elif isinstance(ev, SteppedDown):
                self.node.metrics.step_downs[(self.group, ev.reason)] += 1
                if not self.step_down_cause:
                    self.step_down_cause = f"stepped down: {ev.reason}"
                self.node.note(self.name, f"stepped down from epoch {ev.epoch}: {ev.reason}", ev.epoch)
                self._fail_pending(f"stepped down ({ev.reason})")
                self.primary_ready = False
                self._submit(self._job_become_backup)
                self.next_campaign_at = max(self.next_campaign_at, self._mono() + random.uniform(0.1, 0.3))
                self.node.held_changed()
            elif isinstance(ev, InSyncRecorded):
                self._submit(functools.partial(self._job_in_sync_recorded, ev.epoch, ev.members))
            elif isinstance(ev, ConfigRecorded):
                sets = " + ".join("{" + ",".join(sorted(x)) + "}" for x in ev.config.sets)
                self.node.note(self.name, f"voter configuration {sets} recorded", ev.epoch)
                self.node.gossip_soon()

    async def on_message(self, msg: Any) -> list[Send]:
        """A protocol message for this instance; returns the sends (the caller routes them)."""
        cand = self.candidate
        if cand is None:
            return []
        now = self._mono()
        if isinstance(msg, LeaseReply):
            if not msg.granted:
                self.refusals[msg.voter] = msg.reason + (f" (holder {msg.holder})" if msg.holder else "")
            # The candidate gives up a campaign that cannot win (or that a rival sorting first
            # is running) by itself and sets its randomized, growing backoff (`retry_at`).
            out = cand.on_lease_reply(msg, now)
            self._after_lease()
            self.update_state()
            return out
        if isinstance(msg, InSyncReply | ConfigReply):
            out = cand.handle(msg, now)
            self._after_lease()
            self.update_state()
            return out
        if isinstance(msg, Fenced):
            if msg.epoch > cand.epoch and cand.role is Role.HOLDER:
                self.step_down_cause = f"fenced by {msg.sender} (epoch {msg.epoch})"
            out = cand.observe_epoch(msg.epoch, now)
            self._after_lease()
            self.update_state()
            return out
        if isinstance(msg, Replicate | SnapshotChunk):
            if cand.role is Role.HOLDER and msg.epoch < cand.epoch:
                return [Send(msg.sender, Fenced(self.group, self.name, cand.epoch))]
            if cand.role is not Role.FOLLOWER and msg.epoch > cand.epoch:
                self.node.send(cand.observe_epoch(msg.epoch, now))
                self._after_lease()
        if isinstance(msg, ReplicateAck) and self._jobs == 0:
            p = self._primary
            if p is None or p.ack_is_light(msg):
                # The replication thread is idle (every job submitted so far has been handled
                # here) and this ack only moves in-memory counters: run it on the loop, saving
                # the two thread handoffs on every replicated write's path to its answer.
                r = self._job_message(msg)
                self._handle_result(r, sends=False)
                return r.sends
        if isinstance(msg, Replicate | SnapshotChunk | ReplicateAck | CatchUpRequest | SnapshotPull):
            try:
                r = await self._submit(lambda: self._job_message(msg), sends=False)
            except ServiceUnavailable:
                return []
            return r.sends
        return []

    # ------------------------------------------------------------------ loops

    async def _tick_loop(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:
                log.exception("HA tick failed", extra={"service": self.name})
            await asyncio.sleep(TICK)

    def _tick(self) -> None:
        now = self._mono()
        cand = self.candidate
        if cand is not None:
            blocked = self.route_block()
            if blocked is not None and cand.role is not Role.FOLLOWER:
                self._route_give_up(blocked)
            self.node.send(cand.tick(now))
            self._after_lease()
            if cand.role is Role.HOLDER:
                if now >= self._next_primary_tick:
                    self._next_primary_tick = now + self.node.cfg.timing.heartbeat_interval
                    self._submit(self._job_tick)
                members = self.node.members(self.group)
                if members != self._members:
                    self._members = members
                    if self.has_store:
                        self._submit(functools.partial(self._job_members, members))
                    elif self.primary_ready:
                        self._set_stateless_in_sync(members)
            elif cand.role is Role.FOLLOWER:
                self._maybe_campaign(now)
                self._maybe_failback(now)
        self.update_state()

    def _set_stateless_in_sync(self, members: frozenset[str]) -> None:
        """Leased, stateless group: every member is in sync. The set is still recorded with
        the voters (as for a replicated group) because voter configuration changes build on
        it (`Candidate.next_config`); a member that joins later is added the same way."""
        cand = self.candidate
        assert cand is not None
        self.recorded = members
        self.group_in_sync = sorted(members)
        if cand.role is Role.HOLDER:
            self.node.send(cand.propose_in_sync(members, self._mono()))

    def _maybe_campaign(self, now: float) -> None:
        cand = self.candidate
        assert cand is not None
        if self.broken or self.stopped or not self.healthy or self.component is None:
            return
        if self.route_block() is not None:
            return  # our users cannot reach us: never campaign while our route is DOWN
        if now < self.next_campaign_at or now < self.hold_off_until:
            return
        if not self.force_next and not cand.may_campaign(now):
            return  # backing off after a lost campaign (`Candidate.campaign_lost`)
        if not self.force_next:
            # A campaign is not free: a grant from a voter that missed the current holder's
            # election raises that voter's promise, and the holder steps down when it sees
            # it. So campaign only when there is reason to believe nobody holds the lease.
            if not self.node.settled:
                return  # we have not heard the topology yet (just started)
            quiet_after = self.node.quiet_after
            if now - self.backup_heard < quiet_after and not self._primary_gone():
                cand.holder_seen(self.following)
                return
            live = self.node.live_primary(self.group, exclude=self.name)
            if live is not None:
                self.ever_followed = True  # a primary exists: the boot grace is over for good
                cand.holder_seen(live)
                return
            if (
                self.role_hint == "backup"
                and not self.ever_followed
                and now < self.started_at + BOOT_GRACE
                and (
                    not self.node.heard_every_peer()
                    or self.node.preferred_primary_starting(self.group, exclude=self.name)
                )
            ):
                return  # at boot the preferred primary (first host of the group) goes first
            if self.group_in_sync and self.name not in self.group_in_sync:
                return  # the voters would refuse: we are known to be out of the in-sync set
        force, self.force_next = self.force_next, False
        self.refusals.clear()
        self.node.send(cand.campaign(now, force=force, floor=self.fence))
        self._after_lease()
        if cand.role is Role.FOLLOWER:  # only probed the voters for the configuration
            self.next_campaign_at = now + self.node.lease_config.campaign_deadline + random.uniform(0.02, 0.1)

    def _primary_gone(self) -> bool:
        """The primary we follow is on a node whose connection is down (e.g. it was killed)."""
        node = self.node.node_of(self.following) if self.following else None
        ep = self.node.endpoint
        return node is not None and node != self.node.name and ep is not None and not ep.connected(node)

    # ------------------------------------------------------------------ user routes (arbitrator)

    def route_block(self) -> str | None:
        """Why this instance may not serve nor campaign: a route that stands for this node is
        DOWN (user-facing, i.e. replicated, types only). None otherwise."""
        if not self.ctype.replicated:
            return None
        return self.node.route_block()

    def _route_give_up(self, cause: str) -> None:
        """Our users cannot reach us: release the lease and ask a hot standby to take it."""
        cand = self.candidate
        assert cand is not None
        target = None
        if cand.role is Role.HOLDER:
            self.route_evicted = True
            target = self.node.best_backup(self.group, exclude=self.name)
        log.warning(
            "route down: giving up the lease",
            extra={"service": self.name, "epoch": cand.epoch, "reason": cause, "peer": target},
        )
        if target is None:
            self._give_up(cause)
            return
        self.step_down_cause = cause
        sends = cand.release(self._mono())
        self._after_lease()
        self.node.spawn(self._hand_over_after_release(sends, target))

    async def _hand_over_after_release(self, sends: list[Send], target: str) -> None:
        """The voters first learn that the lease is free, then the standby campaigns: it wins
        its first campaign instead of being refused by voters that still see our lease."""
        await self.node.send_and_wait(sends, timeout=0.5)
        with contextlib.suppress(RequestError):
            await self.node.request_takeover(target, self.group, self._mono() + 2.0)

    def _maybe_failback(self, now: float) -> None:
        """The failback policy of our routes says the primary may move back here now."""
        if not self.route_evicted or self._failback_task is not None or now < self._failback_next:
            return
        if self.state != "DISABLED" or not self.node.failback_due(now):
            return
        self._failback_task = self.node.spawn(self._failback())

    async def _failback(self) -> None:
        try:
            res = await self.node.switchover(self.group, self.name, timeout=5.0)
            self.node.note(self.name, f"failback: the route is UP again, took over from {res.get('from')}", 0)
        except (RequestError, ServiceUnavailable) as exc:
            log.info("failback not done yet", extra={"service": self.name, "reason": str(exc)})
            self._failback_next = self._mono() + 2.0
        finally:
            self._failback_task = None

    async def _health_loop(self) -> None:
        while True:
            comp = self.component
            if comp is not None and not self.stopped:
                try:
                    await asyncio.wait_for(comp.health(), PROBE_TIMEOUT)
                    ok, cause = True, ""
                except TimeoutError:
                    ok, cause = False, f"health probe did not answer within {PROBE_TIMEOUT:g} s"
                except Exception as exc:  # noqa: BLE001 - any failure of the component means unhealthy
                    ok, cause = False, f"health probe failed: {type(exc).__name__}: {exc}"
                self.healthy = ok
                if not ok:
                    self.health_cause = cause
                    self._give_up(cause)
            self.update_state()
            await asyncio.sleep(PROBE_INTERVAL)

    def _give_up(self, cause: str) -> None:
        """Release the lease at once (unhealthy, stopped): a healthy backup takes over."""
        cand = self.candidate
        if cand is not None and cand.role is not Role.FOLLOWER:
            self.step_down_cause = cause
            self.node.send(cand.release(self._mono()))
            self._after_lease()

    # ------------------------------------------------------------------ serving

    async def serve(self, method: str, body: Any, info: RequestInfo) -> Any:
        """Run one bus method on this (ENABLED) instance."""
        if not self.can_serve():
            raise ServiceUnavailable(f"{self.name} is {self.state}, not ENABLED")
        assert self.component is not None
        handler = self.component.handlers().get(method)
        if handler is None:
            raise RequestError("UnknownMethod", f"{self.type} has no method {method!r}")
        t0 = self._mono()
        outcome = "error"
        try:
            result = await handler(body, info)
            outcome = "ok"
            return result
        except ServiceUnavailable:
            outcome = "unavailable"
            raise
        finally:
            self.node.metrics.observe(self.group, method, self._mono() - t0, outcome)

    async def write(self, ops: Sequence[Mapping[str, Any]], expires_at: float | None = None) -> WriteResult:
        """Replicate and apply `ops`; returns once every in-sync backup applied them (I2).

        Group commit: writes that arrive while an append is in flight are appended together
        as one change record (one transaction and fsync on the primary and on each backup),
        and each is acknowledged when that record commits.
        """
        if not self.can_serve():
            raise ServiceUnavailable(f"{self.name} is {self.state}, not ENABLED")
        done: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        item_ops = [dict(op) for op in ops]
        self._write_queue.append((item_ops, done, _ops_bytes(item_ops)))
        if not self._writer_busy:
            self._writer_busy = True
            self.node.spawn(self._drain_writes())
        if expires_at is None:
            expires_at = self._mono() + 10.0
        try:
            return await asyncio.wait_for(asyncio.shield(done), max(0.0, expires_at - self._mono()))
        except TimeoutError:
            raise ServiceUnavailable("write not committed before its deadline", "Unavailable") from None

    async def _drain_writes(self) -> None:
        """Append queued writes, a batch at a time; commits are awaited by the writers."""
        try:
            while self._write_queue:
                while len(self.pending) >= MAX_INFLIGHT_RECORDS:
                    self._commit_progress.clear()
                    await self._commit_progress.wait()
                if not self._write_queue:
                    break
                batch: list[tuple[list[dict[str, Any]], asyncio.Future[WriteResult]]] = []
                n_ops = n_bytes = 0
                while self._write_queue:
                    item_ops, fut, size = self._write_queue[0]
                    if batch and (n_ops + len(item_ops) > MAX_BATCH_OPS or n_bytes + size > MAX_BATCH_BYTES):
                        break  # the next record takes it
                    self._write_queue.popleft()
                    batch.append((item_ops, fut))
                    n_ops += len(item_ops)
                    n_bytes += size
                try:
                    await self._append_batch(batch)
                except (StoreError, SQLAlchemyError, ValueError, KeyError, TypeError) as exc:
                    if len(batch) == 1:
                        _fail(batch[0][1], RequestError("BadRequest", f"write refused: {exc}"))
                        continue
                    for item in batch:  # one bad op must not fail its neighbours: retry alone
                        try:
                            await self._append_batch([item])
                        except (StoreError, SQLAlchemyError, ValueError, KeyError, TypeError) as one:
                            _fail(item[1], RequestError("BadRequest", f"write refused: {one}"))
        finally:
            self._writer_busy = False

    async def _append_batch(
        self, batch: list[tuple[list[dict[str, Any]], asyncio.Future[WriteResult]]]
    ) -> None:
        ops = [op for item_ops, _ in batch for op in item_ops]
        loop = asyncio.get_running_loop()
        try:
            if self._send_first_ok(ops):
                r = await self._submit_send_first(ops, loop)
            else:
                r = await self._submit(lambda: self._job_append(ops, loop), sends=True)
        except ServiceUnavailable as exc:
            for _, fut in batch:
                _fail(fut, exc)
            return
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        result = WriteResult(r.epoch, r.seq)

        def distribute(f: asyncio.Future[None]) -> None:
            for _, fut in batch:
                if fut.done():
                    continue
                if f.cancelled():
                    fut.cancel()
                elif f.exception() is not None:
                    fut.set_exception(f.exception())  # type: ignore[arg-type]
                else:
                    fut.set_result(result)

        committed.add_done_callback(distribute)
        if self.commit_seen >= (r.epoch, r.seq) and self.commit_seen[0] == r.epoch:
            committed.set_result(None)
        else:
            self.pending[r.seq] = (r.epoch, committed)

    # ------------------------------------------------------------------ operator actions

    async def stop_service(self, reason: str) -> None:
        """Operator STOPPED (persisted first, so it survives a restart)."""
        await asyncio.to_thread(self.node.set_target, self.name, "STOPPED", reason)
        if self.candidate is not None and self.candidate.role is Role.HOLDER and self.can_serve():
            target = self.node.best_backup(self.group, exclude=self.name)
            if target is not None:
                with contextlib.suppress(RequestError, ServiceUnavailable):
                    await self.handover(target, timeout=3.0)
        self.stopped, self.stop_reason = True, reason
        self._give_up(f"stopped: {reason}")
        self.update_state()

    async def start_service(self) -> None:
        """Leave STOPPED: catch up from scratch (volatile replication state reset)."""
        await asyncio.to_thread(self.node.clear_target, self.name)
        if not self.stopped:
            return
        self.stopped, self.stop_reason = False, ""
        self.known_in_sync = not self.has_store and self.replicated
        if self.has_store:
            await self._submit(lambda: self._job_become_backup(reset=True))
        self.update_state()

    async def handover(self, target: str, timeout: float) -> None:
        """Planned switchover from this primary to `target` (an in-sync member)."""
        cand = self.candidate
        if cand is None or not self.can_serve():
            raise RequestError("NotPrimary", f"{self.name} is {self.state}, not the ENABLED instance")
        if target == self.name:
            return
        if self.recorded is None or target not in self.recorded:
            raise RequestError(
                "NotInSync",
                f"{target} is not in the in-sync set of {self.group} ({sorted(self.recorded or [])})",
            )
        standby = self.node.standby_state(target)
        if standby != "DISABLED":
            raise RequestError("NotReady", f"{target} is {standby}, not a DISABLED hot standby")
        deadline = self._mono() + timeout
        self.handing_over = target
        self.update_state()
        try:
            while (
                not (not self.has_store or await self._run(lambda: self._job_caught_up(target)))
                or self.pending
                or self._write_queue
                or self._writer_busy
            ):
                if self._mono() > deadline:
                    raise RequestError("Timeout", f"{target} did not catch up within {timeout:g} s")
                if not self.is_writer():
                    raise RequestError("NotPrimary", f"{self.name} lost its lease during the switchover")
                await asyncio.sleep(0.002)
            self.hold_off_until = self._mono() + 4 * self.node.lease_config.duration
            self.step_down_cause = f"switched over to {target}"
            # What the target needs to campaign right away: our epoch and the voter
            # configuration we pinned (else its first round is refused as "config").
            cfg = cand.voter_config
            hint: dict[str, Any] = {"epoch": cand.epoch}
            if cfg is not None:
                hint["config"] = {"version": list(cfg.version), "sets": [sorted(x) for x in cfg.sets]}
            sends = cand.release(self._mono())
            self._after_lease()
            self.update_state()
            await self.node.send_and_wait(sends, timeout=max(0.1, min(1.0, deadline - self._mono())))
        finally:
            self.handing_over = None
        try:
            await self.node.request_takeover(target, self.group, deadline, hint)
        except RequestError:
            # The target cannot take over after all: take the lease back at once rather than
            # leave the group without a primary for the hold-off.
            self.hold_off_until = 0.0
            self.next_campaign_at = 0.0
            self.backup_heard = -math.inf
            raise

    def takeover(self, hint: Mapping[str, Any] | None = None) -> None:
        """The primary released the lease for us: campaign now.

        `hint` (from the releasing primary): its epoch and voter configuration, so that our
        first round asks for the next epoch under the configuration the voters recorded."""
        if self.stopped or not self.healthy or self.candidate is None:
            raise RequestError("NotReady", f"{self.name} is {self.state} ({self.cause})")
        blocked = self.route_block()
        if blocked is not None:
            raise RequestError("RouteDown", f"{self.name} cannot take over: {blocked}")
        self.hold_off_until = 0.0
        self.next_campaign_at = 0.0
        self.backup_heard = -math.inf
        self.force_next = False
        cand = self.candidate
        if cand.role is Role.FOLLOWER:
            now = self._mono()
            if hint:
                with contextlib.suppress(TypeError, ValueError):
                    cand.max_seen = max(cand.max_seen, int(hint.get("epoch") or 0))
                cfg = hint.get("config")
                if isinstance(cfg, Mapping):
                    with contextlib.suppress(KeyError, TypeError, ValueError):
                        cand._hear_config(tuple(cfg["version"]), cfg["sets"], now)
            self.node.send(cand.campaign(now, floor=self.fence))
            self._after_lease()

    def force_promote(self) -> None:
        """Campaign without the voters' in-sync check (operator accepted data loss)."""
        if self.candidate is None:
            raise RequestError("NotReplicated", f"{self.name} has no lease to take")
        if self.stopped:
            raise RequestError("Stopped", f"{self.name} is STOPPED; set it DISABLED first")
        self.hold_off_until = 0.0
        self.force_next = True
        self.next_campaign_at = 0.0
        self.backup_heard = -math.inf


# --------------------------------------------------------------------------- node


class Node:
    """One runtime process (see the module docstring)."""

    def __init__(
        self,
        cfg: RuntimeConfig,
        *,
        clock: Clock | None = None,
        admin_token: str | None = None,
        faults_enabled: bool = False,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.node
        self.config_path: Path | None = None
        """The configuration file (`reconfig.reload` re-reads it on SIGHUP or POST /v1/reload)."""
        self.bootstrap_voters: tuple[str, ...] = cfg.voters
        self.clock: Clock = clock or RealClock()
        self.boot = uuid.uuid4().hex
        self.started_at = time.time()
        self.admin_token = admin_token
        self.faults_enabled = faults_enabled
        t = cfg.timing
        self.lease_config = LeaseConfig(
            duration=t.lease_duration,
            max_drift=min(0.01, t.drift_margin / (2.0 * t.lease_duration)),
            drift_margin=t.drift_margin,
            renew_interval=t.renew_interval,
        )
        self.repl_config = ReplicationConfig(drop_after=max(0.5, t.lease_duration))
        self.metrics = Metrics()
        self.events: collections.deque[ServiceEvent] = collections.deque(maxlen=EVENTS_KEPT)
        self.instances: dict[str, Instance] = {}
        self.by_group: dict[str, Instance] = {}
        self.views: dict[str, _View] = {}
        self.registry: dict[str, dict[str, Any]] | None = None
        self.targets: dict[str, dict[str, Any]] = {}
        self.voter: Voter | None = None
        self.core: Store | None = None
        self.endpoint: Endpoint | None = None
        self.api_urls: dict[str, str] = {}
        self.vips: VipManager | None = None
        self.admin_url = f"http://{cfg.admin}"
        self._voter_exec = ThreadPoolExecutor(1, thread_name_prefix="voter")
        self._gossip_seq = 0
        self._gossip_wake = asyncio.Event()
        self._gossip_inflight: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._runners: list[web.AppRunner] = []
        self._stopped = asyncio.Event()
        self._held_dirty = True
        self._routes_changed = asyncio.Event()
        self.settled = not cfg.peers
        """True once the first gossip round has been answered (or failed) by every peer."""
        self.quiet_after = max(3 * cfg.timing.heartbeat_interval, 0.3)
        """A peer silent this long is not a live primary (for campaign decisions)."""
        self.routes = RouteView(self.name, stale_after=max(2.0, 2 * cfg.timing.suspect_after))
        """The arbitrators' reports about the user routes that stand for this node."""
        self._route_cache: tuple[float, str | None] = (-math.inf, None)
        self._route_down: dict[str, bool] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open stores, start the endpoint, the instances' HA loops, gossip and HTTP APIs."""
        cfg = self.cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)

        def open_core() -> Store:
            with _OPEN_LOCK:
                return Store.open(_db_url(cfg, None))

        self.core = await asyncio.to_thread(open_core)
        states = await asyncio.to_thread(self.core.service_states)
        self.targets = {k: {"state": v.state, "reason": v.reason} for k, v in states.items()}
        self.bootstrap_voters = await asyncio.to_thread(reconfig.load_bootstrap, cfg)
        if self.name in cfg.voters:
            storage = SqlVoterStorage(self.core)
            self.voter = await asyncio.to_thread(
                functools.partial(Voter, joining=cfg.join),
                self.name,
                storage,
                self.lease_config,
                self.clock.monotonic(),
            )
        for spec in cfg.components:
            ctype = get_type(spec.type)
            inst = Instance(self, spec, ctype)
            self.instances[inst.name] = inst
            self.by_group[inst.group] = inst
        await asyncio.gather(*(inst.open() for inst in self.instances.values()))
        server_ssl = server_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
        client_ssl = client_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
        self.endpoint = Endpoint(
            self.name,
            cfg.listen.host,
            cfg.listen.port,
            server_ssl,
            client_ssl,
            self.clock,
            peers=cfg.peer_table(),
            options=cfg.transport_options(),
        )
        self.endpoint.set_handler(self._on_request)
        await self.endpoint.start()
        await self._start_http()
        if cfg.vips:
            self.vips = VipManager(self, cfg.vips)
            self._loops.append(asyncio.create_task(self.vips.run(), name="vips"))
        for inst in self.instances.values():
            inst.start_loops()
        self._loops.append(asyncio.create_task(self._settle(), name="settle"))
        self._loops.append(asyncio.create_task(self._gossip_loop(), name="gossip"))
        self._loops.append(asyncio.create_task(self._register_loop(), name="register"))
        self._loops.append(asyncio.create_task(self._held_loop(), name="held"))
        self._loops.append(asyncio.create_task(reconfig.cloud_config_loop(self), name="cloud-config"))
        log.info(
            "node started",
            extra={
                "node": self.name,
                "voter": self.voter is not None,
                "instances": sorted(self.instances),
                "admin": self.admin_url,
                "api": self.api_urls,
            },
        )

    async def _start_http(self) -> None:
        from euca_runtime.admin import make_admin_app

        apps: list[tuple[web.Application, str, int, str | None]] = [
            (make_admin_app(self), self.cfg.admin.host, self.cfg.admin.port, None)
        ]
        hosted = {i.type for i in self.instances.values()}
        for name, ctype, module, factory in API_APPS:
            addr = getattr(self.cfg.api, name)
            if addr is None or ctype not in hosted:
                continue
            make_app = getattr(importlib.import_module(module), factory)
            apps.append((make_app(self), addr.host, addr.port, name))
            self.api_urls[name] = f"http://{addr}"
        for app, host, port, api_name in apps:
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            shared = getattr(self.cfg.shared_api, api_name) if api_name is not None else None
            if shared is not None:
                # The same app on the API's shared address, with every other process serving it:
                # the kernel hands each new connection to one of the live listeners.
                both = web.TCPSite(runner, shared.host, shared.port, reuse_address=True, reuse_port=True)
                await both.start()
            self._runners.append(runner)

    async def stop(self) -> None:
        """Graceful stop: leases released (failover at once), everything closed."""
        log.info("node stopping", extra={"node": self.name})
        if self.vips is not None:
            await self.vips.release_all()  # before the leases are released (a backup takes over)
        await asyncio.gather(*(inst.shutdown() for inst in self.instances.values()), return_exceptions=True)
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for runner in self._runners:
            await runner.cleanup()
        if self.endpoint is not None:
            await self.endpoint.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._voter_exec.shutdown(wait=True, cancel_futures=True)
        if self.core is not None:
            self.core.close()
        self._write_held(final=True)
        self._stopped.set()
        log.info("node stopped", extra={"node": self.name})

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run `coro` in the background, keeping a reference; errors are logged."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                if not isinstance(exc, PeerUnavailable | DeadlineExceeded | RemoteError | ServiceUnavailable):
                    log.error("background task failed", exc_info=exc, extra={"node": self.name})

        task.add_done_callback(done)
        return task

    # ------------------------------------------------------------------ events and local state

    def record_event(self, service: str, old: str, new: str, cause: str, epoch: int) -> None:
        ev = ServiceEvent(time.time(), self.name, service, old, new, cause, epoch)
        self.events.append(ev)
        log.info(
            "service state",
            extra={"service": service, "old": old, "new": new, "cause": cause, "epoch": epoch},
        )

    def note(self, service: str, what: str, epoch: int) -> None:
        """A notable HA event that is not a state change (elected, stepped down, ...)."""
        st = self.instances[service].state if service in self.instances else ""
        self.events.append(ServiceEvent(time.time(), self.name, service, st, st, what, epoch))
        log.info(what, extra={"service": service, "epoch": epoch})

    def set_target(self, name: str, state: str, reason: str | None) -> None:
        assert self.core is not None
        self.core.set_service_state(name, state, reason)
        self.targets[name] = {"state": state, "reason": reason}

    def clear_target(self, name: str) -> None:
        assert self.core is not None
        self.core.clear_service_state(name)
        self.targets.pop(name, None)

    def held_changed(self) -> None:
        self._held_dirty = True

    def held_leases(self) -> list[dict[str, Any]]:
        out = []
        for inst in self.instances.values():
            cand = inst.candidate
            if cand is not None and cand.role is Role.HOLDER:
                out.append({"group": inst.group, "holder": inst.name, "epoch": cand.epoch})
        return out

    def _write_held(self, final: bool = False) -> None:
        """DIR/held.json: what a local supervisor needs for a death certificate."""
        doc = {"node": self.name, "pid": os.getpid(), "leases": [] if final else self.held_leases()}
        with contextlib.suppress(OSError):
            tmp = self.cfg.data_dir / f".held.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.cfg.data_dir / "held.json")

    async def _held_loop(self) -> None:
        while True:
            if self._held_dirty:
                self._held_dirty = False
                await asyncio.to_thread(self._write_held)
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ protocol messaging

    def node_of(self, name: str) -> str | None:
        """The node of a node or instance name (None if unknown)."""
        if name == self.name or name in self.cfg.peers or (self.endpoint and name in self.endpoint.peers):
            return name
        if name in self.instances:
            return self.name
        for node, view in self.views.items():
            for i in view.doc.get("instances", ()):
                if i.get("name") == name:
                    return node
        if self.registry is not None and name in self.registry:
            return self.registry[name].get("node")
        return None

    def send(self, sends: Iterable[Send]) -> None:
        """Deliver protocol messages: in-process for this node, else one bus request per node,
        written before this returns when the link is up (`Endpoint.send_request`)."""
        by_node: dict[str, list[Any]] = {}
        for s in sends:
            node = self.node_of(s.to)
            if node is None:
                log.debug("no route for message", extra={"peer": s.to, "msg": type(s.msg).__name__})
                continue
            by_node.setdefault(node, []).append(s.msg)
        for node, msgs in by_node.items():
            if node == self.name:
                for msg in msgs:
                    self.spawn(self._deliver_local(msg))
            else:
                self.spawn(self._await_remote(node, self._start_remote(node, msgs, PROTO_TIMEOUT)))

    async def send_and_wait(self, sends: Iterable[Send], timeout: float = 0.5) -> None:
        """Like `send`, but wait (bounded) until every receiving node has processed them."""
        by_node: dict[str, list[Any]] = {}
        for s in sends:
            node = self.node_of(s.to)
            if node is not None:
                by_node.setdefault(node, []).append(s.msg)
        jobs = []
        for node, msgs in by_node.items():
            if node == self.name:
                jobs += [self._deliver_local(m) for m in msgs]
            else:
                jobs.append(self._send_remote(node, msgs, timeout=timeout))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*jobs, return_exceptions=True)

    async def _send_remote(self, node: str, msgs: list[Any], timeout: float = PROTO_TIMEOUT) -> None:
        await self._await_remote(node, self._start_remote(node, msgs, timeout))

    def _start_remote(self, node: str, msgs: list[Any], timeout: float) -> Awaitable[Any]:
        assert self.endpoint is not None
        body = {"msgs": [encode_msg(m) for m in msgs]}
        return self.endpoint.send_request(node, "_proto", "m", body, timeout=timeout)

    async def _await_remote(self, node: str, response: Awaitable[Any]) -> None:
        try:
            resp = await response
        except (PeerUnavailable, DeadlineExceeded, RemoteError) as exc:
            log.debug("protocol message not delivered", extra={"peer": node, "reason": str(exc)})
            return
        for doc in resp.get("msgs", ()) if isinstance(resp, Mapping) else ():
            try:
                msg = decode_msg(doc)
            except ValueError as exc:
                log.warning("bad protocol reply", extra={"peer": node, "reason": str(exc)})
                continue
            self.send(await self._dispatch(msg))

    async def _deliver_local(self, msg: Any) -> None:
        self.send(await self._dispatch(msg))

    async def _dispatch(self, msg: Any) -> list[Send]:
        """Hand one protocol message to the voter or the instance of its group."""
        if isinstance(msg, DeathCertificate):  # from a host's supervisor (euca_runtime.death)
            await self.death_certificate(msg.group, msg.holder, msg.epoch, msg.issuer)
            return []
        if isinstance(msg, VOTER_MESSAGES):
            voter = self.voter
            if voter is None:
                return []
            sender = msg.candidate if isinstance(msg, lease_mod.LeaseRequest) else getattr(msg, "holder", "")
            reply = await asyncio.get_running_loop().run_in_executor(
                self._voter_exec, lambda: voter.handle(msg, self.clock.monotonic())
            )
            return [Send(sender, reply)] if reply is not None else []
        inst = self.by_group.get(getattr(msg, "group", ""))
        if inst is None:
            return []
        return await inst.on_message(msg)

    async def _on_proto(self, peer: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, Mapping) or not isinstance(body.get("msgs"), list):
            raise RemoteError("BadRequest", "expected {msgs: [...]}")
        replies: list[dict[str, Any]] = []
        for doc in body["msgs"]:
            try:
                msg = decode_msg(doc)
            except (ValueError, TypeError, AttributeError) as exc:
                log.warning("bad protocol message", extra={"peer": peer, "reason": str(exc)})
                continue
            others = []
            sender = msg_sender(msg)
            for s in await self._dispatch(msg):
                if s.to == sender or self.node_of(s.to) == peer:
                    replies.append(encode_msg(s.msg))
                else:
                    others.append(s)
            self.send(others)
        return {"msgs": replies}

    # ------------------------------------------------------------------ bus requests

    async def _on_request(self, req: dict[str, Any]) -> Any:
        target, method, body, peer = req["target"], req["method"], req["body"], req["peer"]
        if target == "_proto":
            return await self._on_proto(peer, body)
        if target == "_node":
            return await self._on_node(method, body, peer)
        if target == "_peer":
            return await self.serve_peer(method, body, peer, req["expires_at"])
        inst = self.by_group.get(group_key(target, req.get("partition")))
        if inst is None:
            raise RemoteError("NotPrimary", f"{self.name} hosts no {group_key(target, req.get('partition'))}")
        try:
            return await inst.serve(method, body, RequestInfo(method, peer, req["expires_at"]))
        except ServiceUnavailable as exc:
            raise RemoteError(exc.kind, str(exc)) from None
        except RequestError as exc:
            raise RemoteError(exc.kind, exc.message) from None

    async def serve_peer(self, method: str, body: Any, peer: str, expires_at: float) -> Any:
        """A request for one named instance's `peer_handlers` (any state, no routing)."""
        name = body.get("instance") if isinstance(body, Mapping) else None
        inst = self.instances.get(str(name))
        if inst is None or inst.component is None or inst.broken:
            raise RemoteError("NoSuchInstance", f"{self.name} hosts no usable instance {name!r}")
        handler = inst.component.peer_handlers().get(method)
        if handler is None:
            raise RemoteError("UnknownMethod", f"{inst.type} has no peer method {method!r}")
        try:
            return await handler(body, RequestInfo(method, peer, expires_at))
        except RequestError as exc:
            raise RemoteError(exc.kind, exc.message) from None
        except ServiceUnavailable as exc:
            raise RemoteError(exc.kind, str(exc)) from None

    async def _on_node(self, method: str, body: Any, peer: str) -> Any:
        body = body if isinstance(body, Mapping) else {}
        try:
            if method == "status":
                self._on_status(peer, body)
                return self.status_doc()
            if method == "events":
                return [e.to_dict() for e in self.events]
            if method == "modify":
                return await self.modify_local(str(body.get("name")), str(body.get("state")))
            if method == "switchover":
                return await self.switchover_local(
                    str(body.get("group")), str(body.get("to")), float(body.get("timeout", 5.0))
                )
            if method == "takeover":
                inst = self.instances.get(str(body.get("name")))
                if inst is None:
                    raise RequestError("NotFound", f"{self.name} does not host {body.get('name')}")
                hint = body.get("hint")
                inst.takeover(hint if isinstance(hint, Mapping) else None)
                return {"ok": True}
            if method == "force_promote":
                return await self.force_promote_local(str(body.get("name")))
            if method == "registration":
                return await self.registration_local(str(body.get("name")), bool(body.get("registered")))
            if method == "fault":
                return self.fault_local(str(body.get("name")), body.get("fault"))
        except RequestError as exc:
            raise RemoteError(exc.kind, exc.message) from None
        raise RemoteError("UnknownMethod", f"_node has no method {method!r}")

    # ------------------------------------------------------------------ routing

    def _fresh(self, node: str) -> bool:
        if node == self.name:
            return True
        view = self.views.get(node)
        if view is not None and view.died:
            return False
        ep = self.endpoint
        age = ep.heartbeat_age(node) if ep is not None else None
        return age is not None and age <= self.cfg.timing.suspect_after

    def resolve(self, group: str) -> tuple[str, str] | None:
        """(node, instance) of the group's ENABLED instance (highest epoch, fresh view)."""
        local = self.by_group.get(group)
        if local is not None and local.state == "ENABLED":
            return self.name, local.name
        best: tuple[int, str, str] | None = None
        for node, view in self.views.items():
            if not self._fresh(node):
                continue
            for i in view.doc.get("instances", ()):
                if i.get("group") == group and i.get("state") == "ENABLED":
                    cand = (int(i.get("epoch") or 0), node, str(i.get("name")))
                    if best is None or cand > best:
                        best = cand
        if best is None:
            return None
        if local is not None and local.epoch > best[0] and local.replicated:
            return None  # what we know is newer than that claim: wait for fresher news
        return best[1], best[2]

    async def call(
        self,
        type_: str,
        partition: str | None,
        method: str,
        body: Any = None,
        *,
        timeout: float = 10.0,
        dedupe: bool = True,
    ) -> Any:
        """Call the ENABLED instance of (type, partition), wherever it runs (I5).

        Held and retried across a failover until `timeout`; raises `ServiceUnavailable` when
        the deadline passes, `RequestError` when the component refuses the request. With
        `dedupe` (the default) every attempt carries one idempotency key, so the receiver runs
        the request at most once and keeps its answer for a while; pass False for reads that
        are safe to repeat and whose answers are large (e.g. object bytes).
        """
        group = group_key(type_, partition)
        loop_time = self.clock.monotonic
        deadline = loop_time() + timeout
        idem = uuid.uuid4().hex if dedupe else None
        last = "no ENABLED instance known"
        attempt_cap = max(1.0, self.lease_config.duration)
        while True:
            remaining = deadline - loop_time()
            if remaining <= 0:
                raise ServiceUnavailable(f"{group}: {last}", "Unavailable")
            target = self.resolve(group)
            if target is None:
                await self._route_wait(min(0.01, remaining))
                continue
            node, name = target
            try:
                if node == self.name:
                    inst = self.instances[name]
                    info = RequestInfo(method, self.name, deadline)
                    return await asyncio.wait_for(inst.serve(method, body, info), remaining)
                assert self.endpoint is not None
                return await self.endpoint.request(
                    node,
                    type_,
                    method,
                    body,
                    partition=partition,
                    timeout=min(remaining, attempt_cap),
                    idempotency_key=idem,
                )
            except ServiceUnavailable as exc:
                last = str(exc)
            except TimeoutError:
                last = f"{name} did not answer in time"
            except RemoteError as exc:
                if exc.type not in RETRYABLE:
                    raise RequestError(exc.type, exc.message) from None
                last = str(exc)
            except (PeerUnavailable, DeadlineExceeded) as exc:
                last = str(exc)
            await self._route_wait(min(0.01, max(0.0, deadline - loop_time())))

    async def call_instance(self, instance: str, method: str, body: dict[str, Any], *, timeout: float) -> Any:
        """Call `method` of the `peer_handlers` of one named instance, whatever its group and
        state (no (type, partition) routing, no retry): a primary streaming bytes to a backup,
        the CC calling each NC of its cluster. `RequestError` when the component refuses,
        `ServiceUnavailable` when the instance or its node cannot be reached in time."""
        node = self.node_of(instance)
        if node is None:
            raise ServiceUnavailable(f"no route to {instance}", "Unavailable")
        body = {**body, "instance": instance}
        if node == self.name:
            try:
                return await asyncio.wait_for(
                    self.serve_peer(method, body, self.name, self.clock.monotonic() + timeout), timeout
                )
            except RemoteError as exc:
                if exc.type == "NoSuchInstance":
                    raise ServiceUnavailable(f"{instance}: {exc.message}", "Unavailable") from None
                raise RequestError(exc.type, exc.message) from None
            except TimeoutError:
                raise ServiceUnavailable(
                    f"{instance} did not answer within {timeout:g} s", "Unavailable"
                ) from None
        assert self.endpoint is not None
        try:
            return await self.endpoint.request(node, "_peer", method, body, timeout=timeout)
        except RemoteError as exc:
            if exc.type == "NoSuchInstance":
                raise ServiceUnavailable(f"{instance}: {exc.message}", "Unavailable") from None
            raise RequestError(exc.type, exc.message) from None
        except (PeerUnavailable, DeadlineExceeded) as exc:
            raise ServiceUnavailable(f"{instance}: {exc}", "Unavailable") from None

    # ------------------------------------------------------------------ topology

    def status_doc(self) -> dict[str, Any]:
        self._gossip_seq += 1
        doc: dict[str, Any] = {
            "node": self.name,
            "boot": self.boot,
            "seq": self._gossip_seq,
            "host": self.cfg.listen.host,
            "listen": [self.cfg.listen.host, self.cfg.listen.port],
            "pid": os.getpid(),
            "admin": self.admin_url,
            "api": dict(self.api_urls),
            "vips": self.vips.held() if self.vips is not None else [],
            "voter": self.voter is not None,
            "voter_joining": self.voter is not None and self.voter.joining,
            "started": self.started_at,
            "instances": [i.status() for i in self.instances.values()],
        }
        reports = self.local_route_reports()
        if reports is not None:
            doc["routes"] = reports
        clc = self.by_group.get("clc")
        if clc is not None and clc.state == "ENABLED" and clc.component is not None:
            doc["registry"] = clc.component.registry()  # type: ignore[attr-defined]
            doc["registry_epoch"] = clc.epoch
        return doc

    def _on_status(self, peer: str, doc: Mapping[str, Any]) -> None:
        node = doc.get("node")
        if node != peer:
            return  # a node speaks only for itself (its certificate says who it is)
        old = self.views.get(peer)
        if (
            old is not None
            and old.doc.get("boot") == doc.get("boot")
            and old.doc.get("seq", 0) >= doc.get("seq", 0)
        ):
            return
        self.views[peer] = _View(dict(doc), self.clock.monotonic())
        self.routes_changed()
        if isinstance(doc.get("routes"), list):
            self.routes.on_reports(peer, doc["routes"], self.clock.monotonic())
            self._route_cache = (-math.inf, None)
        listen = doc.get("listen")
        ep = self.endpoint
        if ep is not None and isinstance(listen, list) and len(listen) == 2 and peer not in ep.peers:
            # A peer that is not in our configuration dialled us (its certificate is from the
            # cluster CA and names it): learn where it listens, so we can reach it too.
            with contextlib.suppress(TypeError, ValueError):
                ep.set_peer(peer, str(listen[0]), int(listen[1]))
                log.info("learned a peer", extra={"peer": peer, "address": f"{listen[0]}:{listen[1]}"})
        if "registry" in doc and isinstance(doc["registry"], list):
            self.registry = {
                r["name"]: dict(r) for r in doc["registry"] if isinstance(r, Mapping) and "name" in r
            }
        self._observe_groups()

    def _observe_groups(self) -> None:
        """Tell local backups what the group's primary reports (its in-sync set)."""
        for inst in self.instances.values():
            if not inst.has_store or inst.state == "ENABLED":
                continue
            best: dict[str, Any] | None = None
            for node, view in self.views.items():
                if not self._fresh(node):
                    continue
                for i in view.doc.get("instances", ()):
                    if i.get("group") == inst.group and i.get("state") == "ENABLED":
                        if best is None or int(i.get("epoch") or 0) > int(best.get("epoch") or 0):
                            best = i
            if best is not None and best.get("in_sync_set") is not None:
                members = best["in_sync_set"]
                inst.group_in_sync = list(members)
                inst.known_in_sync = inst.name in members and inst.synced_epoch == int(best.get("epoch") or 0)
                inst.update_state()

    async def _settle(self) -> None:
        """First gossip round: learn who holds what before any instance may campaign."""
        doc = self.status_doc()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(1.0, 2 * self.cfg.timing.suspect_after)):
                await asyncio.gather(*(self._push_status(p, doc) for p in self.cfg.peers))
        self._observe_groups()
        self.settled = True

    # ------------------------------------------------------------------ user routes (arbitrator)

    def local_route_reports(self) -> list[dict[str, Any]] | None:
        """The route reports of the arbitrator hosted here (None: none, or not probing)."""
        out: list[dict[str, Any]] | None = None
        for inst in self.instances.values():
            fn = getattr(inst.component, "route_reports", None)
            reports = fn() if callable(fn) and inst.state == "ENABLED" else None
            if reports is not None:
                out = (out or []) + list(reports)
        return out

    def route_verdicts(self) -> dict[str, RouteVerdict]:
        """Every route that stands for this node, as the arbitrators' reports combine."""
        now = self.clock.monotonic()
        local = self.local_route_reports()
        if local is not None:
            self.routes.on_reports(self.name, local, now)
        verdicts = self.routes.evaluate(now)
        for name, v in verdicts.items():
            if self._route_down.get(name, False) != v.down:
                old, new = ("UP", "DOWN") if v.down else ("DOWN", "UP")
                self.events.append(
                    ServiceEvent(time.time(), self.name, f"route:{name}", old, new, v.cause, 0)
                )
                (log.warning if v.down else log.info)(
                    f"route {name} {new} for this node", extra={"route": name, "reason": v.cause}
                )
            self._route_down[name] = v.down
        return verdicts

    def route_block(self) -> str | None:
        """Why this node's user-facing instances must not serve: its DOWN routes (None: none).
        Evaluated at most once per `TICK` and whenever a report arrives."""
        now = self.clock.monotonic()
        at, cause = self._route_cache
        if now - at < TICK:
            return cause
        down = [v for v in self.route_verdicts().values() if v.down]
        cause = None
        if down:
            cause = "; ".join(
                f"route {v.name} is DOWN ({v.cause})" for v in sorted(down, key=lambda v: v.name)
            )
        self._route_cache = (now, cause)
        return cause

    def failback_due(self, now: float) -> bool:
        """Every route of this node is UP and its failback policy says move back now."""
        verdicts = self.route_verdicts()
        return bool(verdicts) and all(not v.down and v.failback.due(v.since, now) for v in verdicts.values())

    def heard_every_peer(self) -> bool:
        """Every configured peer has told us its topology at least once since we started."""
        return all(peer in self.views for peer in self.cfg.peers)

    def preferred_primary_starting(self, group: str, exclude: str) -> bool:
        """A peer we hear hosts `group`'s preferred primary (role hint ``primary``), still starting."""
        ep = self.endpoint
        if ep is None:
            return False
        for node, view in self.views.items():
            age = ep.heartbeat_age(node)
            if not ep.connected(node) or age is None or age > self.quiet_after:
                continue
            for i in view.doc.get("instances", ()):
                if (
                    i.get("group") == group
                    and i.get("role_hint") == "primary"
                    and i.get("name") != exclude
                    and i.get("state") in ("NOTREADY", "DISABLED")
                ):
                    return True
        return False

    def live_primary(self, group: str, exclude: str) -> str | None:
        """An ENABLED instance of `group` on a peer we are connected to and heard just now."""
        ep = self.endpoint
        if ep is None:
            return None
        for node, view in self.views.items():
            age = ep.heartbeat_age(node)
            if not ep.connected(node) or age is None or age > self.quiet_after:
                continue
            for i in view.doc.get("instances", ()):
                if i.get("group") == group and i.get("state") == "ENABLED" and i.get("name") != exclude:
                    return str(i.get("name"))
        return None

    def gossip_soon(self) -> None:
        self._gossip_wake.set()

    def routes_changed(self) -> None:
        """Wake the requests held in `call` (a state changed here or a peer's status arrived):
        they retry at once instead of on their next poll."""
        self._routes_changed.set()
        self._routes_changed = asyncio.Event()

    async def _route_wait(self, timeout: float) -> None:
        """Sleep until the topology view changes, at most `timeout` seconds."""
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._routes_changed.wait(), timeout)

    async def _gossip_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gossip_wake.wait(), GOSSIP_INTERVAL)
            self._gossip_wake.clear()
            self._observe_groups()
            doc = self.status_doc()
            peers = list(self.endpoint.peers) if self.endpoint is not None else list(self.cfg.peers)
            for peer in peers:
                if peer not in self._gossip_inflight:
                    self._gossip_inflight.add(peer)
                    self.spawn(self._push_status(peer, doc))

    async def _push_status(self, peer: str, doc: dict[str, Any]) -> None:
        assert self.endpoint is not None
        try:
            resp = await self.endpoint.request(peer, "_node", "status", doc, timeout=1.0)
            if isinstance(resp, Mapping):
                self._on_status(peer, resp)
        except (PeerUnavailable, DeadlineExceeded, RemoteError):
            pass
        finally:
            self._gossip_inflight.discard(peer)

    def members(self, group: str) -> frozenset[str]:
        """The group's replication members: every known instance not deregistered."""
        names: set[str] = {i.name for i in self.instances.values() if i.group == group}
        for view in self.views.values():
            for i in view.doc.get("instances", ()):
                if i.get("group") == group and not i.get("stopped_reason") == "deregistered":
                    names.add(str(i.get("name")))
        if self.registry is not None:
            for name, row in self.registry.items():
                if group_key(row.get("type", ""), row.get("partition")) == group:
                    if row.get("registered"):
                        names.add(name)
                    else:
                        names.discard(name)
        return frozenset(names)

    def best_backup(self, group: str, exclude: str) -> str | None:
        """An in-sync, DISABLED (hot standby) member of `group` other than `exclude`."""
        inst = self.by_group.get(group)
        recorded = inst.recorded if inst is not None else None
        if not recorded:
            return None
        ready = {r["name"] for r in self.describe() if r["state"] == "DISABLED"}
        choices = sorted(m for m in recorded if m != exclude and m in ready)
        return choices[0] if choices else None

    def standby_state(self, name: str) -> str | None:
        """`name`'s state as the topology view shows it (None if unknown)."""
        row = self._instance_doc(name)
        return None if row is None else str(row["state"])

    async def _register_loop(self) -> None:
        """Incremental boot: register our instances with the clc once it is ENABLED."""
        while True:
            await asyncio.sleep(REGISTER_INTERVAL)
            if self.registry is None and "clc" not in self.by_group:
                continue
            clc = self.by_group.get("clc")
            if clc is not None and clc.state == "ENABLED" and clc.component is not None:
                self.registry = {r["name"]: r for r in clc.component.registry()}  # type: ignore[attr-defined]
            if self.registry is None:
                continue
            missing = [i for i in self.instances.values() if i.name not in self.registry]
            if not missing:
                continue
            entries = [
                {
                    "name": i.name,
                    "type": i.type,
                    "partition": i.partition,
                    "node": self.name,
                    "host": self.cfg.listen.host,
                    "registered": not (i.stopped and i.stop_reason == "deregistered"),
                }
                for i in missing
            ]
            with contextlib.suppress(ServiceUnavailable, RequestError):
                res = await self.call(
                    "clc", None, "register", {"entries": entries, "only_new": True}, timeout=2.0
                )
                if isinstance(res, Mapping) and isinstance(res.get("registry"), list):
                    self.registry = {r["name"]: r for r in res["registry"]}

    # ------------------------------------------------------------------ describe

    def describe(self) -> list[dict[str, Any]]:
        """Every known instance, as `eucactl describe-services -o json` prints it."""
        rows: dict[str, dict[str, Any]] = {}
        ep = self.endpoint

        def row(
            node: str, host: str, i: Mapping[str, Any], hb: float | None, fresh: bool, died: str
        ) -> dict[str, Any]:
            state, cause = str(i.get("state")), str(i.get("cause") or "")
            if died and state in ("ENABLED", "DISABLED", "NOTREADY"):
                cause = f"process died ({died}; last reported {state}: {cause})"
                state = "NOTREADY"
            elif not fresh and state in ("ENABLED", "DISABLED", "NOTREADY"):
                cause = f"unreachable (last reported {state}: {cause})"
                state = "NOTREADY"
            return {
                "name": i.get("name"),
                "type": i.get("type"),
                "partition": i.get("partition"),
                "group": i.get("group"),
                "host": host,
                "node": node,
                "state": state,
                "cause": cause,
                "epoch": int(i.get("epoch") or 0),
                "in_sync": bool(i.get("in_sync")) and state in ("ENABLED", "DISABLED"),
                "lag": None,
                "seq": i.get("seq"),
                "heartbeat_age_ms": None if hb is None else round(hb * 1000.0, 1),
                "since": i.get("since"),
                "voter_config": i.get("voter_config"),
                "_lags": i.get("lags") or {},
                "_in_sync_set": i.get("in_sync_set"),
                "_replicated": bool(i.get("replicated", True)),
            }

        for inst in self.instances.values():
            rows[inst.name] = row(self.name, self.cfg.listen.host, inst.status(), 0.0, True, "")
        for node, view in self.views.items():
            hb = ep.heartbeat_age(node) if ep is not None else None
            fresh = self._fresh(node)
            for i in view.doc.get("instances", ()):
                rows[str(i.get("name"))] = row(node, str(view.doc.get("host")), i, hb, fresh, view.died)
        for name, reg in (self.registry or {}).items():
            if name in rows:
                if not reg.get("registered") and rows[name]["state"] != "STOPPED":
                    if rows[name]["cause"].startswith("unreachable"):
                        # Deregistered while its node was gone (eucactl deregister of a dead host's
                        # instance): a tombstone, not a member that went missing.
                        rows[name].update(state="STOPPED", in_sync=False)
                    rows[name]["cause"] = "deregistered; " + rows[name]["cause"]
                continue
            node = str(reg.get("node"))
            hb = ep.heartbeat_age(node) if ep is not None and node != self.name else None
            rows[name] = {
                "name": name,
                "type": reg.get("type"),
                "partition": reg.get("partition"),
                "group": group_key(str(reg.get("type")), reg.get("partition")),
                "host": reg.get("host"),
                "node": node,
                "state": "NOTREADY" if reg.get("registered") else "STOPPED",
                "cause": "registered, never heard from" if reg.get("registered") else "deregistered",
                "epoch": 0,
                "in_sync": False,
                "lag": None,
                "seq": None,
                "heartbeat_age_ms": None if hb is None else round(hb * 1000.0, 1),
                "since": reg.get("updated_ts"),
                "_lags": {},
                "_in_sync_set": None,
                "_replicated": True,
            }
        # At most one ENABLED per group (the highest epoch): never show two (EUCA-4846).
        by_group: dict[str, list[dict[str, Any]]] = {}
        for r in rows.values():
            by_group.setdefault(str(r["group"]), []).append(r)
        for members in by_group.values():
            enabled = [r for r in members if r["state"] == "ENABLED" and r["_replicated"]]
            if len(enabled) > 1:
                enabled.sort(key=lambda r: r["epoch"], reverse=True)
                for r in enabled[1:]:
                    r["cause"] = f"superseded by {enabled[0]['name']} (epoch {enabled[0]['epoch']})"
                    r["state"] = "NOTREADY"
                    r["in_sync"] = False
            primary = next((r for r in enabled if r["state"] == "ENABLED"), None)
            for r in members:
                # The in-sync set the voters recorded for the group (I2), as its primary knows it.
                r["recorded_in_sync"] = None if primary is None else primary["_in_sync_set"]
                if not r["_replicated"]:
                    r["lag"] = None
                elif r is primary:
                    r["lag"] = 0
                elif primary is not None and r["name"] in primary["_lags"]:
                    r["lag"] = primary["_lags"][r["name"]]
                    if primary["_in_sync_set"] is not None:
                        r["in_sync"] = r["name"] in primary["_in_sync_set"] and r["state"] == "DISABLED"
                elif primary is not None and r["seq"] is not None and primary["seq"] is not None:
                    r["lag"] = max(0, int(primary["seq"]) - int(r["seq"]))
        # Service VIPs: the node that holds the group's address, as each node (fresh) reports it.
        held = {(self.name, v["group"]) for v in (self.vips.held() if self.vips is not None else [])}
        for node, view in self.views.items():
            if self._fresh(node):
                held |= {(node, str(v.get("group"))) for v in view.doc.get("vips", ())}
        out = []
        for r in sorted(rows.values(), key=lambda r: (str(r["group"]), str(r["name"]))):
            r["vip_holder"] = r["node"] if (r["node"], r["group"]) in held else None
            r["replicated"] = r["_replicated"]  # primary/backup group (else: independent instances)
            out.append({k: v for k, v in r.items() if not k.startswith("_")})
        return out

    async def cluster_events(self) -> list[dict[str, Any]]:
        """Events of every reachable node, oldest first."""
        events = [e.to_dict() for e in self.events]
        assert self.endpoint is not None

        async def fetch(peer: str) -> list[dict[str, Any]]:
            try:
                res = await self.endpoint.request(peer, "_node", "events", None, timeout=1.0)  # type: ignore[union-attr]
                return list(res) if isinstance(res, list) else []
            except (PeerUnavailable, DeadlineExceeded, RemoteError):
                return []

        for part in await asyncio.gather(*(fetch(p) for p in list(self.endpoint.peers))):
            events += part
        return sorted(events, key=lambda e: e.get("ts", 0.0))

    # ------------------------------------------------------------------ operator actions

    def locate(self, name: str) -> str | None:
        """The node hosting instance `name`."""
        if name in self.instances:
            return self.name
        for node, view in self.views.items():
            if any(i.get("name") == name for i in view.doc.get("instances", ())):
                return node
        if self.registry is not None and name in self.registry:
            return str(self.registry[name].get("node"))
        return None

    def _instance_doc(self, name: str) -> dict[str, Any] | None:
        for r in self.describe():
            if r["name"] == name:
                return r
        return None

    async def _on_node_of(self, name: str, method: str, body: dict[str, Any], timeout: float) -> Any:
        node = self.locate(name)
        if node is None:
            raise RequestError("NotFound", f"no service instance named {name!r}")
        if node == self.name:
            return await self._on_node_local(method, body)
        assert self.endpoint is not None
        try:
            return await self.endpoint.request(node, "_node", method, body, timeout=timeout)
        except RemoteError as exc:
            raise RequestError(exc.type, exc.message) from None
        except (PeerUnavailable, DeadlineExceeded) as exc:
            raise RequestError("Unreachable", f"{name}'s node {node} did not answer: {exc}") from None

    async def _on_node_local(self, method: str, body: dict[str, Any]) -> Any:
        try:
            return await self._on_node(method, body, self.name)
        except RemoteError as exc:
            raise RequestError(exc.type, exc.message) from None

    async def modify(self, name: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
        """``eucactl modify-service``: routed to the hosting node; takes effect or fails."""
        state = state.upper()
        if state not in ("ENABLED", "DISABLED", "STOPPED"):
            raise RequestError("BadState", f"state must be ENABLED, DISABLED or STOPPED, not {state!r}")
        return await self._on_node_of(name, "modify", {"name": name, "state": state}, timeout)

    async def modify_local(self, name: str, state: str) -> dict[str, Any]:
        inst = self.instances.get(name)
        if inst is None:
            raise RequestError("NotFound", f"{self.name} does not host {name!r}")
        timeout = 10.0
        before = inst.state
        if inst.broken:
            raise RequestError("Broken", f"{name} is BROKEN: {inst.broken}")
        if state == "DISABLED" and not inst.replicated:
            # No lease, no standby role: DISABLED would silently stay ENABLED (EUCA-6389).
            raise RequestError(
                "NotSupported",
                f"{name} has no primary/backup role, so it cannot be DISABLED; use STOPPED or ENABLED",
            )
        if state == "STOPPED":
            if not inst.stopped:
                await inst.stop_service("operator")
            return {"name": name, "state": inst.state, "previous": before}
        if inst.stopped:
            if inst.stop_reason == "deregistered":
                raise RequestError("Deregistered", f"{name} is deregistered; register it first")
            await inst.start_service()
        if not inst.replicated:
            ok = await inst.wait_state(lambda i: i.state == "ENABLED", timeout)
            if not ok:
                raise RequestError("NotReady", f"{name} is {inst.state}: {inst.cause}")
            return {"name": name, "state": inst.state, "previous": before}
        if state == "DISABLED":
            if inst.state == "ENABLED":
                target = self.best_backup(inst.group, exclude=name)
                if target is None:
                    raise RequestError(
                        "NoBackup", f"{name} is ENABLED and {inst.group} has no in-sync backup to take over"
                    )
                await self.switchover_local(inst.group, target, timeout=5.0)  # waits for the new primary
            ok = await inst.wait_state(lambda i: i.state == "DISABLED", timeout)
            if not ok:
                raise RequestError("NotReady", f"{name} is {inst.state} ({inst.cause}), not DISABLED")
            return {"name": name, "state": inst.state, "previous": before}
        # ENABLED
        if inst.state == "ENABLED":
            return {"name": name, "state": "ENABLED", "previous": before}
        ok = await inst.wait_state(lambda i: i.state in ("DISABLED", "ENABLED"), timeout)
        if not ok:
            raise RequestError("NotReady", f"{name} is {inst.state} ({inst.cause}); it must be in sync first")
        if inst.state != "ENABLED":
            await self.switchover(inst.group, name, timeout=timeout)
        ok = await inst.wait_state(lambda i: i.state == "ENABLED", timeout)
        if not ok:
            raise RequestError("NotEnabled", f"{name} is {inst.state} ({inst.cause})")
        return {"name": name, "state": inst.state, "previous": before}

    async def switchover(self, group: str, to: str, timeout: float = 10.0) -> dict[str, Any]:
        """Planned switchover of `group` to instance `to`, from its current ENABLED instance."""
        target = self.resolve(group)
        if target is None:
            raise RequestError("NoPrimary", f"{group} has no ENABLED instance to switch over from")
        node, current = target
        if current == to:
            return {"group": group, "from": current, "to": to, "state": "ENABLED"}
        body = {"group": group, "to": to, "timeout": timeout}
        if node == self.name:
            return await self._on_node_local("switchover", body)
        assert self.endpoint is not None
        try:
            return await self.endpoint.request(node, "_node", "switchover", body, timeout=timeout + 2.0)
        except RemoteError as exc:
            raise RequestError(exc.type, exc.message) from None
        except (PeerUnavailable, DeadlineExceeded) as exc:
            raise RequestError("Unreachable", f"primary node {node}: {exc}") from None

    async def switchover_local(self, group: str, to: str, timeout: float) -> dict[str, Any]:
        inst = self.by_group.get(group)
        if inst is None or inst.state != "ENABLED":
            raise RequestError("NotPrimary", f"{self.name} is not the primary of {group}; retry")
        current = inst.name
        await inst.handover(to, timeout=timeout)
        deadline = self.clock.monotonic() + timeout
        while self.clock.monotonic() < deadline:
            res = self.resolve(group)
            if res is not None and res[1] == to:
                return {"group": group, "from": current, "to": to, "state": "ENABLED"}
            await asyncio.sleep(0.01)
        raise RequestError("Timeout", f"{to} did not become ENABLED within {timeout:g} s")

    async def request_takeover(
        self, target: str, group: str, deadline: float, hint: Mapping[str, Any] | None = None
    ) -> None:
        node = self.node_of(target)
        if node is None:
            raise RequestError("NotFound", f"no route to {target}")
        body: dict[str, Any] = {"name": target, "group": group}
        if hint:
            body["hint"] = dict(hint)
        if node == self.name:
            await self._on_node_local("takeover", body)
            return
        assert self.endpoint is not None
        remaining = max(0.2, deadline - self.clock.monotonic())
        try:
            await self.endpoint.request(node, "_node", "takeover", body, timeout=remaining)
        except RemoteError as exc:
            raise RequestError(exc.type, exc.message) from None
        except (PeerUnavailable, DeadlineExceeded) as exc:
            raise RequestError("Unreachable", f"{target}: {exc}") from None

    async def force_promote(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        return await self._on_node_of(name, "force_promote", {"name": name}, timeout)

    async def force_promote_local(self, name: str) -> dict[str, Any]:
        inst = self.instances.get(name)
        if inst is None:
            raise RequestError("NotFound", f"{self.name} does not host {name!r}")
        if inst.state == "ENABLED":
            return {"name": name, "state": "ENABLED"}
        ok = False
        for _ in range(3):
            inst.force_promote()
            ok = await inst.wait_state(lambda i: i.state == "ENABLED", 2 * self.lease_config.duration + 2.0)
            # A voter that refused with `config` taught the candidate the group's newer voter
            # configuration (e.g. right after a restart): the next forced campaign uses it.
            if ok or not any(str(r).startswith("config") for r in inst.refusals.values()):
                break
        if not ok:
            why = "; ".join(f"{v}: {r}" for v, r in sorted(inst.refusals.items())) or inst.cause
            raise RequestError("NotPromoted", f"{name} is {inst.state}; voters answered: {why}")
        log.warning("force-promoted", extra={"service": name, "epoch": inst.epoch})
        self.note(name, "force-promoted (operator accepted data loss)", inst.epoch)
        return {"name": name, "state": inst.state, "epoch": inst.epoch}

    async def register(self, entry: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """``eucactl register``: a registry row (and start it if its node stopped it)."""
        name = str(entry.get("name") or "")
        known = self._instance_doc(name)
        doc = {
            "name": name,
            "type": entry.get("type") or (known or {}).get("type"),
            "partition": entry.get("partition") if entry.get("partition") else (known or {}).get("partition"),
            "node": entry.get("node") or (known or {}).get("node"),
            "host": entry.get("host") or (known or {}).get("host"),
            "registered": True,
        }
        if not doc["name"] or not doc["type"] or not doc["node"]:
            raise RequestError(
                "BadRequest", "register needs name, type and node (unless the instance is running)"
            )
        res = await self.call("clc", None, "register", {"entries": [doc]}, timeout=timeout)
        if isinstance(res, Mapping) and isinstance(res.get("registry"), list):
            self.registry = {r["name"]: r for r in res["registry"]}
        started = None
        if self.locate(name) is not None and known is not None:
            with contextlib.suppress(RequestError):
                started = await self._on_node_of(
                    name, "registration", {"name": name, "registered": True}, timeout
                )
        return {"name": name, "registered": True, "instance": started}

    def last_reported(self, name: str) -> str | None:
        """`name`'s state as its node last reported it (fresh or not; None: never heard of it)."""
        inst = self.instances.get(name)
        if inst is not None:
            return str(inst.state)
        for view in self.views.values():
            for i in view.doc.get("instances", ()):
                if i.get("name") == name:
                    return str(i.get("state"))
        return None

    def gone_instance_refusal(self, name: str, known: Mapping[str, Any]) -> str:
        """Why `name`, whose node does not answer, may still be its group's lease holder ("" if not).

        Safe to tombstone without its node: another instance of the group is ENABLED now (fresh),
        so the gone one holds no current lease; or the group is not primary/backup (nc,
        arbitrator); or its node last reported it as not ENABLED.
        """
        group = known.get("group")
        others = [
            r["name"]
            for r in self.describe()
            if r["group"] == group and r["name"] != name and r["state"] == "ENABLED"
        ]
        if others or not known.get("replicated", True):
            return ""
        last = self.last_reported(name)
        if last == "ENABLED":
            return (
                f"{name} was its group's primary (ENABLED) when its node was last heard from and no other "
                f"instance of {group} is ENABLED: it may still hold the lease"
            )
        return ""

    async def deregister(self, name: str, timeout: float = 10.0, force: bool = False) -> dict[str, Any]:
        """``eucactl deregister``: stop the instance (persisted) and tombstone its registry row.

        When the instance's node does not answer (a dead host), the row is tombstoned without it,
        unless the instance may still be its group's lease holder (`gone_instance_refusal`);
        `force` tombstones it anyway.
        """
        known = self._instance_doc(name)
        reg = (self.registry or {}).get(name)
        if known is None and reg is None:
            raise RequestError("NotFound", f"no service instance named {name!r}")
        stopped: Any = None
        if known is not None:
            try:
                stopped = await self._on_node_of(
                    name, "registration", {"name": name, "registered": False}, timeout
                )
            except RequestError as exc:
                if exc.kind != "Unreachable":
                    raise
                refusal = self.gone_instance_refusal(name, known)
                if refusal and not force:
                    raise RequestError(
                        "MayHoldLease",
                        f"{exc.message}; {refusal}. Deregister it once another instance is ENABLED "
                        "(switchover or force-promote), or pass force if its host is certainly down",
                    ) from None
                log.warning(
                    "deregistered without its node",
                    extra={"instance": name, "reason": exc.message, "forced": bool(refusal)},
                )
                stopped = {
                    "name": name,
                    "state": "unreachable",
                    "without_node": True,
                    "forced": bool(refusal),
                }
        doc = {
            "name": name,
            "type": (known or reg or {}).get("type"),
            "partition": (known or reg or {}).get("partition"),
            "node": (known or reg or {}).get("node"),
            "host": (known or reg or {}).get("host"),
            "registered": False,
        }
        res = await self.call("clc", None, "register", {"entries": [doc]}, timeout=timeout)
        if isinstance(res, Mapping) and isinstance(res.get("registry"), list):
            self.registry = {r["name"]: r for r in res["registry"]}
        return {"name": name, "registered": False, "instance": stopped}

    async def registration_local(self, name: str, registered: bool) -> dict[str, Any]:
        inst = self.instances.get(name)
        if inst is None:
            raise RequestError("NotFound", f"{self.name} does not host {name!r}")
        if registered:
            if inst.stopped and inst.stop_reason == "deregistered":
                await inst.start_service()
        else:
            await inst.stop_service("deregistered")
        return {"name": name, "state": inst.state}

    def fault_local(self, name: str, fault: Any) -> dict[str, Any]:
        """Test hook (only with EUCA_RUNTIME_FAULTS=1): make a component hang or fail."""
        if not self.faults_enabled:
            raise RequestError("Forbidden", "fault injection is off (set EUCA_RUNTIME_FAULTS=1)")
        inst = self.instances.get(name)
        if inst is None or inst.component is None:
            raise RequestError("NotFound", f"{self.name} does not host {name!r}")
        inst.component.fault = str(fault) if fault else None
        return {"name": name, "fault": inst.component.fault}

    async def fault(self, name: str, fault: str | None) -> dict[str, Any]:
        return await self._on_node_of(name, "fault", {"name": name, "fault": fault}, 5.0)

    async def death_certificate(self, group: str, holder: str, epoch: int, issuer: str) -> bool:
        """A supervisor certifies `holder`'s process died: release its lease here (if a voter).

        Every node, voter or not, also stops believing the status document of that process (the
        one that still shows `holder` ENABLED at `epoch`): describe-services and the VIP holder
        column would otherwise show the dead primary for up to `suspect_after`, since the
        certificate's own connection counts as hearing from its node."""
        for node, view in self.views.items():
            if not view.died and any(
                i.get("name") == holder and i.get("state") == "ENABLED" and int(i.get("epoch") or 0) == epoch
                for i in view.doc.get("instances", ())
            ):
                view.died = f"death certificate from {issuer}"
                log.info(
                    "peer process certified dead", extra={"peer": node, "instance": holder, "epoch": epoch}
                )
                self.routes_changed()
        voter = self.voter
        if voter is None:
            return False
        released = await asyncio.get_running_loop().run_in_executor(
            self._voter_exec,
            lambda: voter.on_release(group, holder, epoch, self.clock.monotonic(), "death_certificate"),
        )
        if released:
            self.events.append(
                ServiceEvent(
                    time.time(), self.name, holder, "", "", f"death certificate from {issuer}", epoch
                )
            )
        return released


def load_admin_token(data_dir: Path) -> str:
    """The admin token of this node (``<data_dir>/admin.token``, created 0600 when missing)."""
    path = data_dir / "admin.token"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            write_private(path, (secrets.token_urlsafe(32) + "\n").encode())
    return path.read_text().strip()
