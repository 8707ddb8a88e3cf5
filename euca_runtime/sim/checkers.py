"""Invariant checkers, run by the world after every simulation step.

* I1 (`check_single_writer`): at every simulated instant at most one process of the group has
  ``Candidate.is_writer(its own clock)``. Writer status only turns on while handling an event
  and only turns off as time passes, so checking right after every event covers every instant.
  Also: no epoch is ever held by two different processes.
* I2 (`check_new_primary`, `check_final`): a primary that becomes ready holds every write
  acknowledged so far; after healing, every acknowledged write is in the state of the current
  primary and of every member of the recorded in-sync set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from euca_runtime.sim.node import ClientWrite, SimNode


@dataclass
class Violation:
    invariant: str
    time: float
    detail: str

    def __str__(self) -> str:
        return f"[{self.invariant} @ {self.time:.4f}s] {self.detail}"


@dataclass
class SafetyChecker:
    violations: list[Violation] = field(default_factory=list)
    acked: dict[int, ClientWrite] = field(default_factory=dict)
    epoch_holders: dict[int, str] = field(default_factory=dict)
    max_violations: int = 5
    _seen: set[str] = field(default_factory=set)

    def _fail(self, invariant: str, time: float, detail: str) -> None:
        if len(self.violations) < self.max_violations and detail not in self._seen:
            self._seen.add(detail)
            self.violations.append(Violation(invariant, time, detail))

    def fail(self, invariant: str, time: float, detail: str) -> None:
        """Record a violation found outside the built-in checks."""
        self._fail(invariant, time, detail)

    def check_single_writer(self, nodes: Iterable[SimNode], time: float) -> None:
        writers = [n for n in nodes if n.is_writer()]
        if len(writers) > 1:
            desc = ", ".join(
                f"{n.name}(epoch {n.candidate.epoch if n.candidate else '?'}{', paused' if n.paused else ''})"
                for n in writers
            )
            self._fail("I1", time, f"two writers at once: {desc}")

    def on_elected(self, node: SimNode, epoch: int, time: float) -> None:
        other = self.epoch_holders.setdefault(epoch, node.name)
        if other != node.name:
            self._fail("I1", time, f"epoch {epoch} granted to both {other} and {node.name}")

    def on_acknowledged(self, write: ClientWrite) -> None:
        self.acked[write.write_id] = write

    def _missing(self, node: SimNode) -> list[int]:
        state = node.store.state or {}
        return sorted(w.write_id for w in self.acked.values() if state.get(w.key) != w.value)

    def check_new_primary(self, node: SimNode, epoch: int, time: float) -> None:
        missing = self._missing(node)
        if missing:
            self._fail(
                "I2",
                time,
                f"{node.name} became primary at epoch {epoch} without acknowledged writes {missing[:10]}",
            )

    def check_final(self, primary: SimNode | None, in_sync: Iterable[SimNode], time: float) -> None:
        if primary is None:
            self._fail("liveness", time, "no primary after healing")
            return
        for node in [primary, *in_sync]:
            missing = self._missing(node)
            if missing:
                role = "primary" if node is primary else "in-sync backup"
                self._fail("I2", time, f"{role} {node.name} lacks acknowledged writes {missing[:10]}")

    @property
    def ok(self) -> bool:
        return not self.violations
