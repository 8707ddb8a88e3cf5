"""Voter-set changes in the lease core (I3): versioned configurations, joint consensus, joining
voters, probes. The seeded simulation (tests/sim) checks the same under faults."""

from __future__ import annotations

from typing import Any

import pytest

from euca_runtime import lease
from euca_runtime.lease import (
    CLOUD,
    Candidate,
    ConfigRecorded,
    ConfigReply,
    ConfigUpdate,
    LeaseConfig,
    LeaseReply,
    LeaseRequest,
    MemoryVoterStorage,
    Role,
    Send,
    SteppedDown,
    Voter,
    VoterConfig,
    VoterRecord,
)

CFG = LeaseConfig(duration=2.0, max_drift=0.01)
G = "kv"


class Net:
    """Real voters; every send is delivered at once unless its destination is cut off."""

    def __init__(self, voters: list[str], joining: tuple[str, ...] = ()) -> None:
        self.storage = {v: MemoryVoterStorage() for v in voters}
        self.voters = {v: Voter(v, self.storage[v], CFG, 0.0, joining=v in joining) for v in voters}
        self.down: set[str] = set()
        self.log: list[Any] = []

    def run(self, cand: Candidate, sends: list[Send], now: float) -> None:
        queue = list(sends)
        while queue:
            s = queue.pop(0)
            self.log.append(s.msg)
            voter = self.voters.get(s.to)
            if voter is None or s.to in self.down:
                continue
            reply = voter.handle(s.msg, now)
            if reply is not None:
                self.log.append(reply)
                queue += cand.handle(reply, now)


def holder(net: Net, voters: list[str], now: float = 1.0) -> Candidate:
    c = Candidate("a", G, voters, CFG)
    net.run(c, c.campaign(now), now)
    assert c.role is Role.HOLDER
    net.run(c, c.propose_in_sync({"a"}, now), now)
    assert c.in_sync_recorded is not None
    return c


def test_election_pins_the_configuration_at_the_holders_epoch() -> None:
    net = Net(["v1", "v2", "v3"])
    c = holder(net, ["v1", "v2", "v3"])
    assert c.voter_config == VoterConfig((1, 1), (frozenset({"v1", "v2", "v3"}),))
    for v in net.voters.values():
        assert v.view(G, 1.0).config == c.voter_config


def test_one_to_three_voters_through_joint_consensus_without_losing_the_lease() -> None:
    net = Net(["a", "b", "c"], joining=("b", "c"))
    c = holder(net, ["a"])
    c.set_target(["a", "b", "c"])
    now = 1.0
    seen: list[VoterConfig] = []
    for _ in range(40):
        now += 0.05
        net.run(c, c.tick(now), now)
        assert c.is_writer(now), "the holder must keep writing through the change"
        seen += [e.config for e in c.drain_events() if isinstance(e, ConfigRecorded)]
        if c.voter_config == VoterConfig(c.voter_config.version, (frozenset("abc"),)):
            break
    assert [x.sets for x in seen[-2:]] == [
        (frozenset("a"), frozenset("abc")),
        (frozenset("abc"),),
    ], "joint {a},{a,b,c} first, then {a,b,c}"
    # The new voters learned the configuration and the in-sync set (I2) with it.
    for name in "bc":
        view = net.voters[name].view(G, now)
        assert view.config is not None and view.config.sets == (frozenset("abc"),)
        assert view.in_sync == frozenset({"a"})
        assert view.promised == c.epoch and view.holder == "a"


def test_a_change_waits_for_the_in_sync_set_to_be_recorded() -> None:
    net = Net(["a", "b", "c"])
    c = Candidate("a", G, ["a"], CFG)
    net.run(c, c.campaign(1.0), 1.0)
    c.set_target(["a", "b", "c"])
    net.run(c, c.tick(1.1), 1.1)
    assert c.config_pending is None and not any(
        isinstance(m, ConfigUpdate) and len(m.sets) == 2 for m in net.log
    )


def test_joint_configuration_needs_a_majority_of_both_sets() -> None:
    c = Candidate("a", G, ["v1", "v2", "v3"], CFG)
    c.voter_config = VoterConfig((1, 2), (frozenset({"v1", "v2", "v3"}), frozenset({"v3", "v4", "v5"})))
    sends = c.campaign(10.0)
    assert sorted(s.to for s in sends) == ["v1", "v2", "v3", "v4", "v5"]
    r = sends[0].msg

    def grant(v: str) -> LeaseReply:
        return LeaseReply(G, v, "a", r.epoch, r.request_id, True, CFG.duration, r.epoch)

    c.on_lease_reply(grant("v1"), 10.01)
    c.on_lease_reply(grant("v2"), 10.01)
    assert c.role is Role.CANDIDATE, "a majority of the old set alone is not enough"
    c.on_lease_reply(grant("v4"), 10.01)
    assert c.role is Role.CANDIDATE, "nor one of the new set"
    c.on_lease_reply(grant("v5"), 10.01)
    assert c.role is Role.HOLDER
    assert c.cannot_win({"v4", "v5"}) and not c.cannot_win({"v1", "v4"})


def test_voter_refuses_an_older_configuration_and_tells_the_candidate() -> None:
    net = Net(["v1", "v2", "v3"])
    holder(net, ["v1", "v2", "v3"])  # pins (1, 1) at every voter
    stale = Candidate("b", G, ["v1", "v2", "v3"], CFG, min_epoch=5)
    sends = stale.campaign(10.0)
    assert sends[0].msg.config_version == (0, 0)
    reply = net.voters["v1"].handle(sends[0].msg, 10.0)
    assert isinstance(reply, LeaseReply) and not reply.granted and reply.reason == "config"
    assert reply.config_version == (1, 1)
    again = stale.on_lease_reply(reply, 10.0)
    assert stale.voter_config is not None and stale.voter_config.version == (1, 1)
    assert again and all(s.msg.config_version == (1, 1) for s in again), "asks again with the new version"


def test_renewal_ignores_the_configuration_version() -> None:
    v = Voter("v1", MemoryVoterStorage(), CFG, 0.0)
    assert v.handle(LeaseRequest(G, "a", 3, 1, False, (0, 0)), 1.0).granted  # type: ignore[union-attr]
    v.handle(ConfigUpdate(G, "a", 3, (3, 1), (("v1",),)), 1.0)
    assert v.handle(LeaseRequest(G, "a", 3, 2, False, (0, 0)), 1.5).granted  # type: ignore[union-attr]


def test_configuration_updates_are_fenced_by_epoch_and_versioned() -> None:
    v = Voter("v1", MemoryVoterStorage(), CFG, 0.0)
    v.handle(LeaseRequest(G, "b", 5, 1), 1.0)
    low = v.handle(ConfigUpdate(G, "a", 4, (4, 1), (("v1",),)), 1.0)
    assert isinstance(low, ConfigReply) and not low.ok and low.reason == "lower_epoch"
    other = v.handle(ConfigUpdate(G, "a", 5, (5, 1), (("v1",),)), 1.0)
    assert isinstance(other, ConfigReply) and not other.ok and other.reason == "not_holder"
    ok = v.handle(ConfigUpdate(G, "b", 5, (5, 2), (("v1",), ("v1", "v2", "v3")), ("b",), (5, 1)), 1.0)
    assert isinstance(ok, ConfigReply) and ok.ok
    older = v.handle(ConfigUpdate(G, "b", 5, (5, 1), (("v9",),)), 1.0)
    assert isinstance(older, ConfigReply) and older.ok  # acknowledged, but nothing goes backwards
    view = v.view(G, 1.0)
    assert view.config is not None and view.config.version == (5, 2) and view.config.joint
    assert view.in_sync == frozenset({"b"}) and view.in_sync_version == (5, 1)


def test_joining_voter_refuses_bootstrap_configurations_until_it_joined() -> None:
    storage = MemoryVoterStorage()
    v = Voter("v2", storage, CFG, 0.0, joining=True)
    boot = v.handle(LeaseRequest(G, "x", 1, 1, False, (0, 0)), 1.0)
    assert isinstance(boot, LeaseReply) and not boot.granted and boot.reason == "joining"
    # A configuration some holder made is safe to grant (its other quorums still count).
    real = v.handle(LeaseRequest(G, "x", 1, 2, False, (3, 2)), 1.0)
    assert isinstance(real, LeaseReply) and real.granted
    other = v.handle(LeaseRequest("sc/c1", "y", 1, 1, False, (0, 0)), 1.0)
    assert isinstance(other, LeaseReply) and other.reason == "joining"
    # The cloud-level configuration naming us ends join mode, durably.
    v.handle(ConfigUpdate(CLOUD, "a", 0, (7, 1), (("v1", "v2", "v3"),)), 1.0)
    assert not v.joining
    again = Voter("v2", storage, CFG, 2.0, joining=True)
    assert not again.joining and CLOUD not in again.groups()
    fresh = again.handle(LeaseRequest("sc/c2", "y", 1, 1, False, (0, 0)), 2.0)
    assert isinstance(fresh, LeaseReply) and fresh.granted


def test_candidate_without_a_configuration_only_probes() -> None:
    net = Net(["v1", "v2", "v3"])
    holder(net, ["v1", "v2", "v3"])
    joiner = Candidate("b", G, None, CFG, probe_voters=["v1", "v2", "v3"])
    sends = joiner.campaign(10.0)
    assert sends and all(s.msg.epoch == 0 for s in sends)
    assert joiner.role is Role.FOLLOWER
    before = {n: v.view(G, 10.0).promised for n, v in net.voters.items()}
    net.run(joiner, sends, 10.0)
    assert {n: v.view(G, 10.0).promised for n, v in net.voters.items()} == before, "a probe changes nothing"
    assert joiner.role is Role.FOLLOWER
    assert joiner.voter_config is not None and joiner.voter_config.version == (1, 1)


def test_holder_that_hears_of_a_newer_holders_configuration_steps_down() -> None:
    net = Net(["v1", "v2", "v3"])
    c = holder(net, ["v1", "v2", "v3"])
    reply = LeaseReply(G, "v3", "a", c.epoch, 99, False, 0.0, c.epoch, "", None, (c.epoch + 1, 1), (("v3",),))
    c.on_lease_reply(reply, 1.2)
    assert c.role is Role.FOLLOWER
    assert any(isinstance(e, SteppedDown) for e in c.drain_events())


def test_a_split_epoch_that_blocks_the_change_makes_the_holder_step_down() -> None:
    net = Net(["a", "b", "c"])
    # Two campaigns for epoch 1: voter c promised it to z, a and b to us. c will never take
    # our updates at this epoch, and the new set {c} has no majority without it.
    z = net.voters["c"].handle(LeaseRequest(G, "z", 1, 1), 0.5)
    assert isinstance(z, LeaseReply) and z.granted
    c = holder(net, ["a", "b", "c"])
    assert c.epoch == 1
    c.set_target(["c"])
    now = 1.0
    for _ in range(10):
        now += 0.1
        net.run(c, c.tick(now), now)
        if c.role is not Role.HOLDER:
            break
    assert c.last_step_down == "epoch_taken"


def test_old_voter_records_load_and_new_ones_roundtrip() -> None:
    old = VoterRecord.from_dict(
        {"promised": 3, "holder": "a", "released": False, "in_sync": ["a"], "in_sync_version": [3, 1]}
    )
    assert old.config is None and old.config_version == (0, 0)
    rec = VoterRecord(
        4, "a", False, frozenset({"a"}), (4, 1), VoterConfig((4, 2), (frozenset("ab"), frozenset("bc")))
    )
    assert VoterRecord.from_dict(rec.to_dict()) == rec


@pytest.mark.parametrize(
    "msg",
    [
        ConfigUpdate(G, "a", 3, (3, 2), (("a",), ("a", "b", "c")), ("a", "b"), (3, 1)),
        ConfigUpdate(CLOUD, "a", 0, (1, 1), (("a", "b", "c"),)),
        ConfigReply(G, "v1", 3, (3, 2), True, 3),
        LeaseRequest(G, "a", 3, 9, False, (2, 1), ("a",), (2, 4)),
        LeaseReply(G, "v1", "a", 3, 9, False, 0.0, 4, "config", "b", (3, 2), (("a",), ("a", "b", "c"))),
    ],
    ids=lambda m: type(m).__name__,
)
def test_codec_roundtrip_of_configuration_messages(msg: Any) -> None:
    assert lease.decode(lease.encode(msg)) == msg
