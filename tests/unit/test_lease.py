"""Leases and epochs: voter rules, holder-side timing, in-sync set (I1, I2), message codec."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings, target
from hypothesis import strategies as st

from euca_runtime import lease
from euca_runtime.lease import (
    Candidate,
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
    NotHolderError,
    Role,
    Send,
    SteppedDown,
    Voter,
    required_drift_margin,
)

CFG = LeaseConfig(duration=2.0, max_drift=0.01)
G = "sc/cluster01"


def req(cand: str, epoch: int, rid: int = 1, *, force: bool = False, group: str = G) -> LeaseRequest:
    return LeaseRequest(group, cand, epoch, rid, force)


def voter(storage: MemoryVoterStorage | None = None, now: float = 100.0) -> Voter:
    return Voter("v1", storage or MemoryVoterStorage(), CFG, now)


# --------------------------------------------------------------------------- config


def test_required_margin_keeps_holder_inside_voter() -> None:
    d, rho = 2.0, 0.01
    m = required_drift_margin(d, rho)
    # Fastest-running holder clock vs slowest-running voter clock, in real seconds.
    assert (d - m) / (1 - rho) == pytest.approx(d / (1 + rho))
    assert LeaseConfig(duration=d, max_drift=rho).margin > m


def test_config_rejects_unsafe_margin_and_bad_renewal() -> None:
    with pytest.raises(ValueError, match="drift_margin"):
        LeaseConfig(duration=2.0, max_drift=0.05, drift_margin=0.01)
    with pytest.raises(ValueError, match="renew_interval"):
        LeaseConfig(duration=1.0, renew_interval=1.0)
    with pytest.raises(ValueError):
        LeaseConfig(duration=0)


def test_even_voter_set_is_rejected() -> None:
    with pytest.raises(ValueError, match="odd"):
        Candidate("a", G, ["v1", "v2"], CFG)


# --------------------------------------------------------------------------- voter


def test_voter_grants_and_persists_before_replying() -> None:
    class Recording(MemoryVoterStorage):
        def save(self, group: str, record: Mapping[str, Any]) -> None:
            super().save(group, record)
            events.append(("save", record["promised"]))

    events: list[tuple[str, int]] = []
    v = voter(Recording())
    reply = v.handle(req("a", 1), 100.0)
    assert isinstance(reply, LeaseReply) and reply.granted
    assert events == [("save", 1)]
    assert reply.duration == CFG.duration and reply.promised_epoch == 1


def test_voter_that_cannot_persist_does_not_grant() -> None:
    class Broken(MemoryVoterStorage):
        def save(self, group: str, record: Mapping[str, Any]) -> None:
            raise OSError("disk full")

    v = voter(Broken())
    with pytest.raises(OSError):
        v.handle(req("a", 1), 100.0)


def test_voter_refuses_lower_and_equal_epochs_from_others() -> None:
    v = voter()
    assert v.on_lease_request(req("a", 5), 100.0).granted
    assert v.on_lease_request(req("b", 4), 200.0).reason == "lower_epoch"
    assert v.on_lease_request(req("b", 5), 200.0).reason == "lower_epoch"
    assert v.on_lease_request(req("a", 0), 200.0).reason == "lower_epoch"


def test_voter_refuses_new_holder_while_lease_unexpired_then_grants() -> None:
    v = voter()
    assert v.on_lease_request(req("a", 1), 100.0).granted
    held = v.on_lease_request(req("b", 2), 101.9)
    assert not held.granted and held.reason == "held" and held.holder == "a"
    assert v.on_lease_request(req("b", 2), 102.0).granted  # expiry = receipt + duration
    assert v.view(G, 102.0).holder == "b"


def test_renewal_extends_from_receipt_without_a_write() -> None:
    storage = MemoryVoterStorage()
    v = voter(storage)
    v.on_lease_request(req("a", 1), 100.0)
    saves = storage.saves
    assert v.on_lease_request(req("a", 1, 2), 101.5).granted
    assert storage.saves == saves
    assert not v.on_lease_request(req("b", 2), 103.0).granted  # renewed until 103.5
    assert v.on_lease_request(req("b", 2), 103.5).granted


def test_same_candidate_may_take_a_higher_epoch_over_its_own_lease() -> None:
    v = voter()
    v.on_lease_request(req("a", 1), 100.0)
    assert v.on_lease_request(req("a", 3), 100.5).granted


def test_release_and_death_certificate_must_match_exactly() -> None:
    v = voter()
    v.on_lease_request(req("a", 3), 100.0)
    v.handle(DeathCertificate(G, "a", 2, "supervisor"), 100.1)  # wrong epoch
    v.handle(LeaseRelease(G, "b", 3), 100.1)  # wrong holder
    assert v.on_lease_request(req("b", 4), 100.2).reason == "held"
    v.handle(DeathCertificate(G, "a", 3, "supervisor"), 100.3)
    assert v.view(G, 100.3).lease_remaining == 0.0
    assert v.on_lease_request(req("b", 4), 100.3).granted


def test_voluntary_release_frees_at_once_and_blocks_late_renewals() -> None:
    v = voter()
    v.on_lease_request(req("a", 1), 100.0)
    v.handle(LeaseRelease(G, "a", 1), 100.5)
    late = v.on_lease_request(req("a", 1, 2), 100.6)
    assert not late.granted and late.reason == "released"
    assert v.on_lease_request(req("b", 2), 100.6).granted


def test_restarted_voter_keeps_promises_and_assumes_full_lease() -> None:
    storage = MemoryVoterStorage()
    v = voter(storage, now=100.0)
    v.on_lease_request(req("a", 7), 100.0)
    # The voter restarts with a new monotonic clock (reboot): it cannot tell how long it was down.
    v2 = Voter("v1", storage, CFG, now=5.0)
    assert v2.on_lease_request(req("b", 7), 5.0).reason == "lower_epoch"
    assert v2.on_lease_request(req("b", 8), 6.9).reason == "held"
    assert v2.on_lease_request(req("b", 8), 7.0).granted


def test_restarted_voter_after_release_is_free() -> None:
    storage = MemoryVoterStorage()
    v = voter(storage)
    v.on_lease_request(req("a", 1), 100.0)
    v.handle(LeaseRelease(G, "a", 1), 100.1)
    v2 = Voter("v1", storage, CFG, now=1.0)
    assert v2.on_lease_request(req("b", 2), 1.0).granted


def test_groups_are_independent() -> None:
    v = voter()
    assert v.on_lease_request(req("a", 1, group="clc"), 100.0).granted
    assert v.on_lease_request(req("b", 1, group="kv"), 100.0).granted
    assert v.groups() == ["clc", "kv"]


def test_in_sync_set_limits_who_may_take_the_next_epoch() -> None:
    v = voter()
    v.on_lease_request(req("a", 1), 100.0)
    ok = v.handle(InSyncUpdate(G, "a", 1, 1, ("a",)), 100.1)
    assert isinstance(ok, InSyncReply) and ok.ok
    v.handle(LeaseRelease(G, "a", 1), 100.2)
    refused = v.on_lease_request(req("b", 2), 100.3)
    assert not refused.granted and refused.reason == "not_in_sync"
    # The promise was not taken: the in-sync member can still get epoch 2.
    assert v.on_lease_request(req("a", 2), 100.3).granted


def test_force_promote_skips_only_the_in_sync_rule() -> None:
    v = voter()
    v.on_lease_request(req("a", 1), 100.0)
    v.handle(InSyncUpdate(G, "a", 1, 1, ("a",)), 100.1)
    assert v.on_lease_request(req("b", 2, force=True), 100.2).reason == "held"
    assert v.on_lease_request(req("b", 2, force=True), 102.1).granted


def test_in_sync_updates_are_fenced_and_versioned() -> None:
    v = voter()
    v.on_lease_request(req("a", 3), 100.0)
    assert v.on_in_sync_update(InSyncUpdate(G, "a", 3, 2, ("a", "b")), 100.0).ok
    # An older version (reordered) is acknowledged but does not overwrite the newer one.
    assert v.on_in_sync_update(InSyncUpdate(G, "a", 3, 1, ("a",)), 100.0).ok
    assert v.view(G, 100.0).in_sync == frozenset({"a", "b"})
    # A deposed holder's update (epoch below the promise) is refused.
    v.on_lease_request(req("b", 4), 102.5)
    stale = v.on_in_sync_update(InSyncUpdate(G, "a", 3, 3, ("a",)), 102.6)
    assert not stale.ok and stale.promised_epoch == 4
    # Someone else's update at the current promise is refused too.
    assert v.on_in_sync_update(InSyncUpdate(G, "c", 4, 1, ("c",)), 102.6).reason == "not_holder"
    # A newer epoch's version supersedes any older epoch's.
    assert v.on_in_sync_update(InSyncUpdate(G, "b", 4, 1, ("b",)), 102.7).ok
    assert v.view(G, 102.7).in_sync_version == (4, 1)


def test_voter_rejects_foreign_messages() -> None:
    with pytest.raises(TypeError):
        voter().handle(object(), 0.0)


# --------------------------------------------------------------------------- candidate


VOTERS = ["v1", "v2", "v3"]


def grant(r: LeaseRequest, voter_name: str, duration: float = CFG.duration) -> LeaseReply:
    return LeaseReply(r.group, voter_name, r.candidate, r.epoch, r.request_id, True, duration, r.epoch)


def refuse(r: LeaseRequest, voter_name: str, promised: int, reason: str = "lower_epoch") -> LeaseReply:
    return LeaseReply(r.group, voter_name, r.candidate, r.epoch, r.request_id, False, 0.0, promised, reason)


def elect(c: Candidate, sent: float = 10.0, received: float = 10.05) -> LeaseRequest:
    """Elect `c` with grants from the first two voters, which also record its pinned config."""
    sends = c.campaign(sent)
    r = sends[0].msg
    pins: list[Send] = []
    for s in sends[:2]:
        pins += c.on_lease_reply(grant(r, s.to), received)
    for s in pins:
        if isinstance(s.msg, ConfigUpdate) and s.to in {x.to for x in sends[:2]}:
            m = s.msg
            c.on_config_reply(ConfigReply(G, s.to, m.epoch, m.version, True, m.epoch), received)
    return r


def test_campaign_asks_every_voter_for_the_next_epoch() -> None:
    c = Candidate("a", G, VOTERS, CFG, min_epoch=4)
    sends = c.campaign(10.0)
    assert [s.to for s in sends] == VOTERS
    assert {s.msg.epoch for s in sends} == {5}
    assert c.role is Role.CANDIDATE and not c.is_writer(10.0)


def test_campaign_floor_from_the_store_fence() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    assert c.campaign(0.0, floor=9)[0].msg.epoch == 10


def test_majority_makes_a_writer_measured_from_send_time() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    r = c.campaign(10.0)[0].msg
    c.on_lease_reply(grant(r, "v1"), 10.3)
    assert not c.is_writer(10.3)
    c.on_lease_reply(grant(r, "v2"), 10.4)
    assert c.is_writer(10.4)
    assert c.drain_events() == [Elected(1)]
    # From the *send* time, minus the drift margin: never the receive time.
    assert c.lease_end() == pytest.approx(10.0 + CFG.duration - CFG.margin)
    assert c.is_writer(c.lease_end() - 1e-9)
    assert not c.is_writer(c.lease_end())


def test_late_grants_that_already_expired_do_not_elect() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    r = c.campaign(10.0)[0].msg
    c.on_lease_reply(grant(r, "v1"), 13.0)
    c.on_lease_reply(grant(r, "v2"), 13.0)
    assert c.role is Role.CANDIDATE and not c.is_writer(13.0)


def test_shorter_voter_duration_is_respected() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    r = c.campaign(10.0)[0].msg
    c.on_lease_reply(grant(r, "v1", duration=1.0), 10.1)
    c.on_lease_reply(grant(r, "v2", duration=1.0), 10.1)
    assert c.lease_end() == pytest.approx(11.0 - CFG.margin)


def test_failed_campaign_gives_up_and_releases() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    r = c.campaign(10.0)[0].msg
    c.on_lease_reply(grant(r, "v1"), 10.1)
    c.on_lease_reply(refuse(r, "v2", 0, "held"), 10.1)
    assert c.tick(10.1) == []
    out = c.tick(10.0 + CFG.campaign_deadline)
    assert c.role is Role.FOLLOWER
    assert {s.to for s in out} == set(VOTERS)
    assert all(isinstance(s.msg, LeaseRelease) and s.msg.epoch == 1 for s in out)
    assert c.campaign(11.0)[0].msg.epoch == 2


def test_refusal_with_higher_epoch_ends_a_campaign() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    r = c.campaign(10.0)[0].msg
    c.on_lease_reply(refuse(r, "v1", 6), 10.1)
    assert c.role is Role.FOLLOWER and c.max_seen == 6
    assert c.campaign(10.2)[0].msg.epoch == 7


def test_holder_renews_before_expiry_and_extends_from_renewal_send() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    elect(c)
    renew_at = c.renew_at()
    assert renew_at == pytest.approx(10.0 + CFG.renew_every)
    assert c.tick(renew_at - 0.01) == []
    sends = c.tick(renew_at)
    assert len(sends) == 3 and all(s.msg.epoch == 1 for s in sends)
    r = sends[0].msg
    for s in sends:
        c.on_lease_reply(grant(r, s.to), renew_at + 0.5)
    assert c.lease_end() == pytest.approx(renew_at + CFG.duration - CFG.margin)
    assert c.next_deadline() <= c.lease_end()


def test_holder_steps_down_when_lease_runs_out() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    elect(c)
    c.drain_events()
    end = c.lease_end()
    assert c.is_writer(end - 0.001)
    # A pause: nothing ran until after the end. The lease is already gone on resume.
    assert not c.is_writer(end + 5.0)
    out = c.tick(end + 5.0)
    assert c.role is Role.FOLLOWER
    assert c.drain_events() == [SteppedDown(1, "lease_expired")]
    assert all(isinstance(s.msg, LeaseRelease) for s in out)


def test_renewal_refused_with_higher_epoch_deposes_the_holder() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    elect(c)
    r = c.tick(c.renew_at())[0].msg
    c.on_lease_reply(refuse(r, "v3", 2), c.renew_at())
    assert c.role is Role.FOLLOWER and not c.is_writer(10.5)
    assert SteppedDown(1, "higher_epoch") in c.drain_events()


def test_stale_and_foreign_replies_are_ignored() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    r1 = c.campaign(10.0)[0].msg
    c.tick(10.0 + CFG.campaign_deadline)
    c.campaign(11.0)
    for v in ("v1", "v2"):
        c.on_lease_reply(grant(r1, v), 11.05)  # grants for the previous epoch
    assert c.role is Role.CANDIDATE
    other = LeaseReply(G, "v1", "b", 2, 1, True, 2.0, 2)
    c.on_lease_reply(other, 11.05)
    unknown = LeaseReply(G, "v1", "a", 2, 999, True, 2.0, 2)
    c.on_lease_reply(unknown, 11.05)
    assert not c.is_writer(11.05)


def test_observe_higher_epoch_and_voluntary_release() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    elect(c)
    assert c.observe_epoch(1, 10.1) == []
    assert c.is_writer(10.1)
    out = c.release(10.2)
    assert not c.is_writer(10.2) and len(out) == 3
    assert c.release(10.3) == []
    elect(c, 11.0, 11.0)
    c.observe_epoch(9, 11.1)
    assert c.role is Role.FOLLOWER and c.max_seen == 9


def test_in_sync_proposal_needs_a_majority() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    with pytest.raises(NotHolderError):
        c.propose_in_sync({"a"}, 10.0)
    elect(c)
    c.drain_events()
    sends = c.propose_in_sync({"a", "b"}, 10.1)
    up = sends[0].msg
    assert isinstance(up, InSyncUpdate) and up.members == ("a", "b") and up.version == 1
    c.on_in_sync_reply(InSyncReply(G, "v1", 1, 1, True, 1), 10.2)
    c.on_in_sync_reply(InSyncReply(G, "v1", 1, 1, True, 1), 10.2)  # duplicate
    assert c.in_sync_recorded is None and c.in_sync_pending == {"a", "b"}
    # Unacknowledged voters get the update again.
    resend = c.tick(10.1 + CFG.in_sync_resend)
    assert sorted(s.to for s in resend if isinstance(s.msg, InSyncUpdate)) == ["v2", "v3"]
    c.on_in_sync_reply(InSyncReply(G, "v3", 1, 1, True, 1), 10.3)
    assert c.drain_events() == [InSyncRecorded(1, 1, frozenset({"a", "b"}))]
    assert c.in_sync_pending is None


def test_in_sync_refusal_with_higher_epoch_deposes() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    elect(c)
    c.propose_in_sync({"a"}, 10.1)
    c.on_in_sync_reply(InSyncReply(G, "v2", 1, 1, False, 3, "lower_epoch"), 10.2)
    assert c.role is Role.FOLLOWER


def test_superseded_proposal_acks_do_not_count() -> None:
    c = Candidate("a", G, VOTERS, CFG)
    elect(c)
    c.propose_in_sync({"a", "b"}, 10.1)
    c.propose_in_sync({"a"}, 10.1)
    c.on_in_sync_reply(InSyncReply(G, "v1", 1, 1, True, 1), 10.2)
    c.on_in_sync_reply(InSyncReply(G, "v2", 1, 1, True, 1), 10.2)
    assert c.in_sync_recorded is None


# --------------------------------------------------------------------------- campaign backoff


def held(r: LeaseRequest, voter_name: str, holder: str, remaining: float, promised: int = 0) -> LeaseReply:
    return LeaseReply(
        r.group, voter_name, r.candidate, r.epoch, r.request_id, False, 0.0, promised, "held", holder,
        lease_remaining=remaining,
    )  # fmt: skip


def lose_by_timeout(c: Candidate, now: float) -> float:
    """Campaign at `now` with no answer at all; returns when the campaign gave up."""
    c.campaign(now)
    deadline = c.next_deadline()
    assert c.tick(deadline - 1e-6) == [] and c.role is Role.CANDIDATE
    c.tick(deadline)
    assert c.role is Role.FOLLOWER
    return deadline


def test_voter_tells_how_long_the_holder_lease_still_runs() -> None:
    v = voter()
    assert v.on_lease_request(req("a", 1), 100.0).granted
    r = v.on_lease_request(req("b", 2), 100.5)
    assert (r.granted, r.reason, r.holder) == (False, "held", "a")
    assert r.lease_remaining == pytest.approx(CFG.duration - 0.5)


def test_campaign_deadline_doubles_after_timeouts_up_to_the_lease_and_resets_on_election() -> None:
    c = Candidate("a", G, VOTERS, CFG, rng=random.Random(1))
    now, lengths = 10.0, []
    for _ in range(5):
        started = c.retry_at if c.retry_at > now else now
        now = lose_by_timeout(c, started)
        lengths.append(round(now - started, 6))
    base, cap = CFG.campaign_deadline, CFG.duration - CFG.margin
    assert lengths == pytest.approx([base, 2 * base, min(4 * base, cap), cap, cap])
    elect(c, sent=now + 5, received=now + 5.05)
    assert c.timeouts == 0 and c.campaign_timeout() == base


def test_retry_wait_is_random_grows_and_is_capped() -> None:
    cfg = LeaseConfig(duration=1.0, max_drift=0.01, retry_min=0.1, retry_max=1.0, campaign_timeout=0.2)
    waits: list[list[float]] = []
    for seed in range(20):
        c = Candidate("a", G, VOTERS, cfg, rng=random.Random(seed))
        now, mine = 0.0, []
        for _ in range(6):
            ended = lose_by_timeout(c, now)
            mine.append(c.retry_at - ended)
            assert not c.may_campaign(c.retry_at - 1e-6) and c.may_campaign(c.retry_at)
            now = c.retry_at
        waits.append(mine)
    for n, column in enumerate(zip(*waits, strict=True)):
        b = min(0.5, 0.1 * 2**n)
        assert all(b <= w <= 2 * b for w in column), (n, column)
        if b < 0.5:
            assert len({round(w, 9) for w in column}) > 10  # randomized, not one fixed value


def test_seeing_a_holder_makes_the_next_loss_a_first_one() -> None:
    c = Candidate("a", G, VOTERS, CFG, rng=random.Random(2))
    for _ in range(4):
        lose_by_timeout(c, max(c.retry_at, 0.0))
    assert c.failures == 4
    c.holder_seen("b")
    ended = lose_by_timeout(c, c.retry_at)
    assert c.failures == 1 and c.retry_at - ended <= 2 * CFG.retry_base


def test_majority_refusal_ends_the_campaign_at_once() -> None:
    c = Candidate("a", G, VOTERS, CFG, rng=random.Random(3))
    r = c.campaign(10.0)[0].msg
    assert c.on_lease_reply(refuse(r, "v1", 0, "not_in_sync"), 10.1) == []
    out = c.on_lease_reply(refuse(r, "v2", 0, "not_in_sync"), 10.1)
    assert c.role is Role.FOLLOWER and c.last_step_down == "campaign_refused"
    assert all(isinstance(s.msg, LeaseRelease) for s in out) and len(out) == 3
    assert 10.1 + CFG.retry_base <= c.retry_at <= 10.1 + 2 * CFG.retry_base
    # A "config" refusal is not a no (the candidate adopts the newer configuration and asks again).
    r = c.campaign(11.0)[0].msg
    c.on_lease_reply(refuse(r, "v1", 0, "config"), 11.1)
    c.on_lease_reply(refuse(r, "v2", 0, "config"), 11.1)
    assert c.role is Role.CANDIDATE


def test_refused_for_an_unexpired_lease_retries_once_quickly_then_waits_for_its_end() -> None:
    c = Candidate("b", G, VOTERS, CFG, rng=random.Random(4))
    c.holder_seen("a")
    r = c.campaign(10.0)[0].msg
    c.on_lease_reply(held(r, "v1", "a", 1.5), 10.1)
    c.on_lease_reply(held(r, "v2", "a", 1.5), 10.1)
    # First loss: a quick retry (a death certificate may be on its way to the voters).
    assert c.role is Role.FOLLOWER and c.retry_at <= 10.1 + 2 * CFG.retry_base
    r = c.campaign(c.retry_at)[0].msg
    assert r.epoch == 2
    c.on_lease_reply(held(r, "v1", "a", 1.3), 10.3)
    c.on_lease_reply(held(r, "v3", "a", 1.2), 10.3)
    # Second: no new epoch before the lease that the voters still see has run out.
    assert 10.3 + 1.3 <= c.retry_at <= 10.3 + 1.3 + CFG.retry_base


def test_a_rival_that_sorts_first_makes_us_give_way_at_once() -> None:
    b = Candidate("b", G, VOTERS, CFG, rng=random.Random(5))
    r = b.campaign(10.0)[0].msg
    b.on_lease_reply(grant(r, "v2"), 10.05)
    out = b.on_lease_reply(held(r, "v1", "a", 0.9, promised=1), 10.1)
    assert b.role is Role.FOLLOWER and b.last_step_down == "campaign_yield"
    assert {s.to for s in out} == set(VOTERS) and all(isinstance(s.msg, LeaseRelease) for s in out)
    assert b.retry_at >= 10.1 + CFG.campaign_deadline_max
    # The one that sorts first keeps campaigning when refused for b's lease.
    a = Candidate("a", G, VOTERS, CFG, rng=random.Random(6))
    r = a.campaign(10.0)[0].msg
    a.on_lease_reply(held(r, "v2", "b", 0.9, promised=1), 10.1)
    assert a.role is Role.CANDIDATE
    # The holder we followed is no rival: refused for its lease, we do not give way.
    c = Candidate("c", G, VOTERS, CFG, rng=random.Random(7), min_epoch=3)
    c.holder_seen("a")
    r = c.campaign(10.0)[0].msg
    c.on_lease_reply(held(r, "v1", "a", 0.9, promised=4), 10.1)
    assert c.role is Role.CANDIDATE
    # Before we followed anyone, nor is a holder whose epoch is older than our campaign (a dead
    # primary we never followed).
    d = Candidate("d", G, VOTERS, CFG, rng=random.Random(8), min_epoch=3)
    r = d.campaign(10.0)[0].msg
    d.on_lease_reply(held(r, "v1", "a", 0.9, promised=3), 10.1)
    assert d.role is Role.CANDIDATE


# --------------------------------------------------------------------------- codec


MESSAGES = [
    LeaseRequest(G, "a", 3, 9, True),
    LeaseReply(G, "v1", "a", 3, 9, False, 0.0, 4, "held", "b"),
    LeaseReply(G, "v1", "a", 3, 9, False, 0.0, 4, "held", "b", lease_remaining=0.75),
    LeaseRelease(G, "a", 3),
    DeathCertificate(G, "a", 3, "supervisor@host"),
    InSyncUpdate(G, "a", 3, 2, ("a", "b")),
    InSyncReply(G, "v1", 3, 2, True, 3),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_codec_roundtrip(msg: Any) -> None:
    doc = lease.encode(msg)
    assert doc["type"] == type(msg).__name__
    assert lease.decode(doc) == msg


def test_lease_remaining_travels_only_when_set() -> None:
    """A field added later is left out at its default: the previous version decodes the rest."""
    plain = LeaseReply(G, "v1", "a", 3, 9, True, 1.0, 3)
    assert "lease_remaining" not in lease.encode(plain)
    assert lease.encode(LeaseReply(G, "v1", "a", 3, 9, False, 0.0, 4, "held", "b", lease_remaining=0.5))[
        "lease_remaining"
    ] == pytest.approx(0.5)


def test_codec_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        lease.decode({"type": "Nope"})
    with pytest.raises(ValueError):
        lease.decode({"type": "LeaseRequest", "group": G})
    with pytest.raises(TypeError):
        lease.encode(object())


# --------------------------------------------------------------------------- properties

voter_ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "renew", "release", "death", "in_sync"]),
        st.sampled_from(["a", "b", "c"]),
        st.integers(min_value=0, max_value=6),
        st.floats(min_value=0.0, max_value=1.5),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(voter_ops, st.booleans())
def test_one_voter_never_backs_two_unexpired_holders(
    ops: list[tuple[str, str, int, float]], restart: bool
) -> None:
    """Whatever arrives in whatever order, a voter's grants to different holders never overlap
    in time, its promise never goes down, and what it replied is already on disk."""
    storage = MemoryVoterStorage()
    now = 0.0
    v = Voter("v", storage, CFG, now)
    backing: dict[str, float] = {}  # holder -> until when this voter backs it (voter clock)
    current: tuple[str, int] | None = None
    promised = 0
    for i, (kind, who, epoch, dt) in enumerate(ops):
        now += dt
        if restart and i == len(ops) // 2:
            # A restart loses the volatile expiry; what the old holder was promised still stands.
            v = Voter("v", storage, CFG, now)
        if kind in ("acquire", "renew"):
            r = v.handle(LeaseRequest(G, who, epoch, i), now)
            assert isinstance(r, LeaseReply)
            if r.granted:
                others = [h for h, until in backing.items() if h != who and until > now]
                assert not others, f"granted {who} while backing {others}"
                backing = {who: now + CFG.duration}
                current = (who, epoch)
                assert storage.records[G]["promised"] == epoch
                assert storage.records[G]["holder"] == who
        elif kind in ("release", "death"):
            msg = LeaseRelease(G, who, epoch) if kind == "release" else DeathCertificate(G, who, epoch)
            assert v.handle(msg, now) is None
            if current == (who, epoch):
                backing.pop(who, None)
        else:
            v.handle(InSyncUpdate(G, who, epoch, 1, (who,)), now)
        view = v.view(G, now)
        assert view.promised >= promised
        promised = view.promised


@st.composite
def lease_schedules(draw: st.DrawFn) -> tuple[list[float], list[tuple[str, int, float]]]:
    rates = [draw(st.floats(min_value=1 - CFG.max_drift, max_value=1 + CFG.max_drift)) for _ in range(5)]
    kinds = ["deliver"] * 6 + ["drop", "tick", "tick", "campaign", "wait"]
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(kinds),
                st.integers(min_value=0, max_value=1000),
                st.sampled_from([0.0, 0.001, 0.005, 0.02, 0.1, 0.3]),
            ),
            min_size=40,
            max_size=200,
        )
    )
    return rates, steps


@settings(max_examples=200, deadline=None)
@given(lease_schedules())
def test_two_candidates_three_voters_never_overlap(
    case: tuple[list[float], list[tuple[str, int, float]]],
) -> None:
    """Two candidates, three voters, drifting clocks, an adversarial network that delivers any
    pending message in any order (or drops it): never two writers at the same real instant."""
    rates, steps = case
    names = ["a", "b", "v1", "v2", "v3"]
    clocks = dict.fromkeys(names, 0.0)
    rate = dict(zip(names, rates, strict=True))
    voters = {n: Voter(n, MemoryVoterStorage(), CFG, 0.0) for n in ("v1", "v2", "v3")}
    cands = {n: Candidate(n, G, ["v1", "v2", "v3"], CFG) for n in ("a", "b")}
    inflight: list[tuple[str, str, Any]] = []

    def emit(src: str, sends: list[Send]) -> None:
        inflight.extend((src, s.to, s.msg) for s in sends)

    elections = 0
    for kind, pick, dt in steps:
        if kind == "wait":
            dt = 0.5 + pick / 500  # up to 2.5 s: leases run out, in-flight messages go stale
        for n in names:
            clocks[n] += dt * rate[n]
        if kind == "campaign":
            c = cands["ab"[pick % 2]]
            emit(c.name, c.campaign(clocks[c.name]))
        elif kind == "tick":
            c = cands["ab"[pick % 2]]
            emit(c.name, c.tick(clocks[c.name]))
        elif kind in ("deliver", "drop") and inflight:
            src, dst, msg = inflight.pop(pick % len(inflight))
            if kind == "deliver":
                if dst in voters:
                    reply = voters[dst].handle(msg, clocks[dst])
                    if reply is not None:
                        inflight.append((dst, src, reply))
                else:
                    emit(dst, cands[dst].handle(msg, clocks[dst]))
        for c in cands.values():
            elections += sum(isinstance(e, Elected) for e in c.drain_events())
        writers = [n for n, c in cands.items() if c.is_writer(clocks[n])]
        assert len(writers) <= 1, f"two writers: {writers}"
    target(float(elections))


def test_property_helper_sanity() -> None:
    """The adversarial harness above can elect someone at all (it is not vacuous)."""
    rng = random.Random(1)
    c = Candidate("a", G, VOTERS, CFG)
    vs = {n: Voter(n, MemoryVoterStorage(), CFG, 0.0) for n in VOTERS}
    for s in c.campaign(0.0):
        reply = vs[s.to].handle(s.msg, rng.uniform(0, 0.01))
        assert isinstance(reply, LeaseReply)
        c.on_lease_reply(reply, 0.02)
    assert c.is_writer(0.02)
