"""Deliberately broken protocol variants. The simulation must catch every one of them: a
checker that never fails proves nothing."""

from __future__ import annotations

from euca_runtime.lease import Candidate, Role, Voter, VoterConfig, VoterRecord
from euca_runtime.replication import ReplicationPrimary
from euca_runtime.sim.node import Factories


class ReceiveTimeCandidate(Candidate):
    """Measures its lease from when the grant *arrived*, with no drift margin (I1 bug)."""

    def grant_valid_until(self, sent_at: float, received_at: float, duration: float) -> float:
        return received_at + duration


class NoTimeCheckCandidate(Candidate):
    """Believes it is the writer for as long as it has not noticed losing the lease (I1 bug):
    exactly the process that resumes from a pause still thinking it is primary."""

    def is_writer(self, now: float) -> bool:
        return self.role is Role.HOLDER


class NoJointCandidate(Candidate):
    """Moves the voter set in one step, skipping joint consensus (I1 bug): a majority of the old
    set that has not heard of the change and a majority of the new one can both elect."""

    def next_config(self) -> VoterConfig | None:
        cfg, target = self.voter_config, self.target
        if cfg is None or self.in_sync_recorded is None or target is None or cfg.sets[-1] == target:
            return None
        return VoterConfig.normal(target)


class InSyncBlindVoter(Voter):
    """Grants a new epoch to anyone, in sync or not (I2 bug)."""

    def eligible(self, rec: VoterRecord, candidate: str, force: bool) -> bool:
        return True


class EagerPrimary(ReplicationPrimary):
    """Acknowledges a write as soon as it is logged locally, before the backups have it (I2 bug)."""

    def _advance_commit(self) -> list[int]:
        if not self.ready or self.store.last_seq <= self.commit_seq:
            return []
        done = list(range(self.commit_seq + 1, self.store.last_seq + 1))
        self.commit_seq = self.store.last_seq
        return done


def _factories(**kwargs: object) -> Factories:
    return Factories(**kwargs)  # type: ignore[arg-type]


VARIANTS: dict[str, tuple[frozenset[str], Factories]] = {
    "correct": (frozenset(), Factories()),
    "holder_from_receive": (frozenset({"I1"}), _factories(candidate=ReceiveTimeCandidate)),
    "no_time_check": (frozenset({"I1"}), _factories(candidate=NoTimeCheckCandidate)),
    # Forgetting promises breaks both: a second holder, or a promotion outside the in-sync set.
    "voter_forgets": (frozenset({"I1", "I2"}), Factories(forget_promises_on_restart=True)),
    "voter_ignores_in_sync": (frozenset({"I2"}), _factories(voter=InSyncBlindVoter)),
    "eager_ack": (frozenset({"I2"}), _factories(primary=EagerPrimary)),
    "skip_joint": (frozenset({"I1", "I2"}), _factories(candidate=NoJointCandidate)),
}
"""name -> (invariants it is expected to break, how nodes are built)."""
