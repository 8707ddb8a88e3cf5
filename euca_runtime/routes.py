"""User-route state, pure and deterministic (DESIGN.md section 10; docs/arbitrator.md).

Two halves, both free of I/O and of clocks (every method takes ``now``):

* `RouteMonitor` runs on an arbitrator, one per configured route. It is fed one probe
  *round* at a time (every target probed once: reachable or not, with the error) and keeps
  the route's state:

  - ``UNKNOWN`` until it has evidence: ``recover`` good rounds in a row make it ``UP``,
    ``threshold`` failed rounds in a row make it ``DOWN``;
  - ``UP`` -> ``DOWN`` when ``threshold`` consecutive rounds had *no* target answering
    (the route is fatal: the nodes behind it give up their leases);
  - ``DOWN`` -> ``UP`` only after ``recover`` consecutive good rounds (a round in which at
    least one target answered): hysteresis, so a flapping target cannot flap the route;
  - a target that failed ``threshold`` rounds in a row while another answers is *lost*: an
    ADVISORY event (recorded, counted, no failover; Eucalyptus RT #5307). It is restored
    after ``recover`` good rounds of its own.

* `RouteView` runs on every node. It holds the latest report of every arbitrator about the
  routes that name this node and combines them (see `RouteView.evaluate`): a route is DOWN
  for the node when every arbitrator heard recently says DOWN; an arbitrator that is not
  heard from changes nothing (losing contact with an arbitrator is a partition, handled by
  the lease machinery, never a route failure).

`Failback` is the policy for moving the primary back once a route that caused a failover is
UP again: ``manual`` (the default: only ``eucactl switchover`` moves it) or ``after`` N
seconds of the route being continuously UP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class RouteState(StrEnum):
    UNKNOWN = "UNKNOWN"
    UP = "UP"
    DOWN = "DOWN"


@dataclass(frozen=True)
class ProbeResult:
    """One probe of one target: reachable or not, and why not."""

    ok: bool
    error: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Failback:
    """When a route-evicted primary moves back: ``after`` None = manual (operator only)."""

    after: float | None = None

    @property
    def manual(self) -> bool:
        return self.after is None

    def due(self, up_since: float | None, now: float) -> bool:
        """True when the route has been UP without a break since `up_since` for long enough."""
        return self.after is not None and up_since is not None and now - up_since >= self.after

    def describe(self) -> str:
        return "manual" if self.after is None else f"after {self.after:g} s up"

    def to_doc(self) -> str | dict[str, float]:
        return "manual" if self.after is None else {"after": self.after}

    @classmethod
    def from_doc(cls, doc: Any) -> Failback:
        """Inverse of `to_doc`; anything unreadable is the safe default, manual."""
        if isinstance(doc, Mapping):
            after = doc.get("after")
            if isinstance(after, int | float) and not isinstance(after, bool) and after >= 0:
                return cls(float(after))
        return cls(None)

    @staticmethod
    def strictest(policies: Iterable[Failback]) -> Failback:
        """Several arbitrators' policies: manual if any says manual, else the longest wait."""
        afters = []
        for p in policies:
            if p.after is None:
                return Failback(None)
            afters.append(p.after)
        return Failback(max(afters)) if afters else Failback(None)


@dataclass(frozen=True)
class RouteEvent:
    """A change worth recording: ``down``, ``up``, ``advisory``, ``advisory_cleared``."""

    route: str
    kind: str
    state: RouteState
    message: str
    round: int
    at: float
    advisory: bool = False
    """True for the non-fatal events (a target lost or restored while the route is usable)."""


@dataclass
class _Target:
    fails: int = 0
    goods: int = 0
    lost: bool = False
    last_error: str = ""
    last_ok: bool | None = None


class RouteMonitor:
    """The state of one route on one arbitrator (see the module docstring)."""

    def __init__(
        self,
        name: str,
        targets: Sequence[str],
        *,
        threshold: int,
        recover: int,
        nodes: Sequence[str] = (),
        failback: Failback | None = None,
    ) -> None:
        if not targets:
            raise ValueError(f"route {name}: needs at least one target")
        if threshold < 1 or recover < 1:
            raise ValueError(f"route {name}: threshold and recover must be >= 1")
        self.name = name
        self.targets = tuple(targets)
        self.threshold = threshold
        self.recover = recover
        self.nodes = tuple(nodes)
        self.failback = failback or Failback()
        self.state = RouteState.UNKNOWN
        self.since: float | None = None
        """When the current state began (the caller's clock)."""
        self.rounds = 0
        self.failed_rounds = 0
        """Consecutive rounds with no target answering."""
        self.good_rounds = 0
        """Consecutive rounds with at least one target answering."""
        self.transitions = 0
        self.advisories = 0
        self._t = {t: _Target() for t in self.targets}

    # ------------------------------------------------------------------ queries

    @property
    def lost(self) -> tuple[str, ...]:
        """Targets lost for `threshold` rounds (all of them when the route is DOWN)."""
        return tuple(t for t in self.targets if self._t[t].lost)

    @property
    def advisory(self) -> bool:
        """Some, not all, targets lost while the route works: worth a look, no failover."""
        return self.state is not RouteState.DOWN and bool(self.lost) and len(self.lost) < len(self.targets)

    def status(self) -> str:
        """UP, DEGRADED (advisory), DOWN or UNKNOWN."""
        if self.state is RouteState.UP and self.advisory:
            return "DEGRADED"
        return self.state.value

    def cause(self) -> str:
        """Why the route is in its state, naming the targets and their last errors."""

        def err(t: str) -> str:
            e = self._t[t].last_error
            return f"{t} ({e})" if e else t

        if self.state is RouteState.DOWN:
            return f"all {len(self.targets)} targets unreachable for {self.threshold} rounds: " + ", ".join(
                err(t) for t in self.targets
            )
        if self.advisory:
            return f"{len(self.lost)} of {len(self.targets)} targets unreachable: " + ", ".join(
                err(t) for t in self.lost
            )
        if self.state is RouteState.UNKNOWN:
            return f"probing ({self.rounds} rounds so far)"
        return f"{len(self.targets)} targets reachable"

    def report(self) -> dict[str, Any]:
        """What the arbitrator tells the nodes about this route (msgpack/JSON-able)."""
        return {
            "name": self.name,
            "state": self.state.value,
            "status": self.status(),
            "cause": self.cause(),
            "nodes": list(self.nodes),
            "failback": self.failback.to_doc(),
            "rounds": self.rounds,
            "transitions": self.transitions,
            "advisories": self.advisories,
            "lost": list(self.lost),
            "targets": {
                t: {"ok": s.last_ok, "error": s.last_error, "fails": s.fails} for t, s in self._t.items()
            },
        }

    # ------------------------------------------------------------------ the round

    def observe(self, results: Mapping[str, ProbeResult | bool], now: float) -> list[RouteEvent]:
        """Feed one round (a result per target; a missing target counts as failed)."""
        self.rounds += 1
        events: list[RouteEvent] = []
        any_ok = False
        lost_before = set(self.lost)
        for t in self.targets:
            r = results.get(t, ProbeResult(False, "not probed"))
            if isinstance(r, bool):
                r = ProbeResult(r, "" if r else "unreachable")
            s = self._t[t]
            s.last_ok = r.ok
            if r.ok:
                any_ok = True
                s.fails, s.goods = 0, s.goods + 1
                if s.lost and s.goods >= self.recover:
                    s.lost = False
            else:
                s.goods, s.fails = 0, s.fails + 1
                s.last_error = r.error or "unreachable"
                if s.fails >= self.threshold:
                    s.lost = True
        if any_ok:
            self.failed_rounds, self.good_rounds = 0, self.good_rounds + 1
        else:
            self.good_rounds, self.failed_rounds = 0, self.failed_rounds + 1

        old = self.state
        advisory_before = old is not RouteState.DOWN and 0 < len(lost_before) < len(self.targets)
        if self.state is not RouteState.DOWN and self.failed_rounds >= self.threshold:
            self.state = RouteState.DOWN
        elif self.state is not RouteState.UP and self.good_rounds >= self.recover:
            self.state = RouteState.UP
        if self.state is not old:
            self.since = now
            self.transitions += 1
            kind = "down" if self.state is RouteState.DOWN else "up"
            events.append(RouteEvent(self.name, kind, self.state, self._message(kind, old), self.rounds, now))
        if self.advisory and (not advisory_before or set(self.lost) - lost_before):
            self.advisories += 1
            events.append(
                RouteEvent(
                    self.name, "advisory", self.state, f"ADVISORY: {self.cause()}", self.rounds, now, True
                )
            )
        elif advisory_before and not self.lost and self.state is not RouteState.DOWN:
            events.append(
                RouteEvent(
                    self.name,
                    "advisory_cleared",
                    self.state,
                    f"advisory cleared: all {len(self.targets)} targets reachable again",
                    self.rounds,
                    now,
                    True,
                )
            )
        return events

    def _message(self, kind: str, old: RouteState) -> str:
        if kind == "down":
            return f"DOWN: {self.cause()}"
        if old is RouteState.UNKNOWN:
            return f"UP: {self.recover} good rounds in a row"
        return f"UP again after {self.recover} good rounds in a row (failback: {self.failback.describe()})"


# --------------------------------------------------------------------------- the node side


@dataclass
class _Report:
    arbitrator: str
    received: float
    doc: Mapping[str, Any]


@dataclass
class RouteVerdict:
    """A route as one node sees it, after combining every arbitrator's reports."""

    name: str
    down: bool
    since: float
    """When the report that changed the verdict reached this node (its own clock)."""
    cause: str = ""
    arbitrators: tuple[str, ...] = ()
    failback: Failback = field(default_factory=Failback)


class RouteView:
    """Every arbitrator's reports about the routes that stand for `node` (see `evaluate`).

    Reports are replaced wholesale per arbitrator (`on_reports`); a route an arbitrator no
    longer lists is forgotten for that arbitrator. A report is *fresh* for `stale_after`
    seconds after it was received.
    """

    def __init__(self, node: str, stale_after: float) -> None:
        self.node = node
        self.stale_after = stale_after
        self._reports: dict[tuple[str, str], _Report] = {}  # (route, arbitrator) -> report
        self._verdicts: dict[str, RouteVerdict] = {}

    def on_reports(self, arbitrator: str, reports: Iterable[Mapping[str, Any]], now: float) -> None:
        """The full current list of `arbitrator`'s route reports, received at `now`."""
        seen: set[str] = set()
        for doc in reports:
            if not isinstance(doc, Mapping):
                continue
            name, nodes = doc.get("name"), doc.get("nodes")
            if not isinstance(name, str) or not isinstance(nodes, list | tuple) or self.node not in nodes:
                continue
            seen.add(name)
            self._reports[(name, arbitrator)] = _Report(arbitrator, now, doc)
        for key in [k for k in self._reports if k[1] == arbitrator and k[0] not in seen]:
            del self._reports[key]

    def evaluate(self, now: float) -> dict[str, RouteVerdict]:
        """Combine the reports; returns every route that names this node.

        Per route, the arbitrators with a fresh report that says UP or DOWN vote:

        * some voted and all of them say DOWN: the route is DOWN for this node;
        * some voted and one of them says UP: the route is UP;
        * nobody voted (every report is stale or UNKNOWN): no news, the verdict stays what
          it was (a route never goes DOWN, nor comes back UP, because an arbitrator went quiet).
        """
        by_route: dict[str, list[_Report]] = {}
        for (name, _), rep in self._reports.items():
            by_route.setdefault(name, []).append(rep)
        for name in [n for n in self._verdicts if n not in by_route]:
            del self._verdicts[name]  # no arbitrator watches it any more
        for name, reps in by_route.items():
            voters = [
                r
                for r in reps
                if now - r.received <= self.stale_after and r.doc.get("state") in ("UP", "DOWN")
            ]
            prev = self._verdicts.get(name)
            if not voters:
                if prev is None:
                    self._verdicts[name] = RouteVerdict(name, False, now, "no arbitrator has a verdict yet")
                continue
            down = all(r.doc.get("state") == "DOWN" for r in voters)
            arbs = tuple(sorted(r.arbitrator for r in voters))
            if down:
                cause = "; ".join(f"{r.arbitrator}: {r.doc.get('cause', '')}" for r in voters)
            else:
                ups = sorted(r.arbitrator for r in voters if r.doc.get("state") == "UP")
                cause = "UP (reported by " + ", ".join(ups) + ")"
            policy = Failback.strictest(Failback.from_doc(r.doc.get("failback")) for r in voters)
            changed_at = max(r.received for r in voters)  # the news arrived then
            since = changed_at if prev is None or prev.down != down else prev.since
            self._verdicts[name] = RouteVerdict(name, down, since, cause, arbs, policy)
        return dict(self._verdicts)

    def down(self, now: float) -> list[RouteVerdict]:
        """The routes that are DOWN for this node (sorted by name)."""
        return sorted((v for v in self.evaluate(now).values() if v.down), key=lambda v: v.name)


__all__ = [
    "Failback",
    "ProbeResult",
    "RouteEvent",
    "RouteMonitor",
    "RouteState",
    "RouteVerdict",
    "RouteView",
]
