"""The CC's pure parts: placement and the view rebuilt from one poll's answers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from euca_runtime.cluster.instance_types import INSTANCE_TYPES
from euca_runtime.cluster.scheduler import LOST, UP, ClusterView, InsufficientCapacity, place, rebuild


def nc(
    cores: int, mem: int = 8192, disk: int = 100, instances: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {"cores": cores, "memory_mib": mem, "disk_gib": disk, "instances": instances or []}


def inst(iid: str, itype: str = "m1.small", state: str = "running") -> dict[str, Any]:
    t = INSTANCE_TYPES[itype]
    return {
        "instance_id": iid,
        "instance_type": itype,
        "state": state,
        "cores": t.cores,
        "memory_mib": t.memory_mib,
        "disk_gib": t.disk_gib,
    }


def need(itype: str = "m1.small") -> dict[str, int]:
    t = INSTANCE_TYPES[itype]
    return {"cores": t.cores, "memory_mib": t.memory_mib, "disk_gib": t.disk_gib}


def test_place_most_free_cores_then_name() -> None:
    view = rebuild(None, ["b", "a", "c"], {"a": nc(4), "b": nc(4), "c": nc(2)})
    # a and b tie on free cores: the name decides; then room is taken as it is given.
    assert place(view, [need(), need(), need(), need()]) == ["a", "b", "a", "b"]
    # Deterministic: the same view and request give the same answer.
    assert place(view, [need()] * 4) == place(view, [need()] * 4)


def test_place_counts_running_instances_not_terminated() -> None:
    view = rebuild(
        None,
        ["a", "b"],
        {"a": nc(4, instances=[inst("i-1"), inst("i-2"), inst("i-3", state="terminated")]), "b": nc(3)},
    )
    assert view.nodes["a"].free()["cores"] == 2
    assert place(view, [need()]) == ["b"]


def test_place_refuses_the_whole_call_when_something_does_not_fit() -> None:
    view = rebuild(None, ["a", "b"], {"a": nc(2), "b": nc(1)})
    assert place(view, [need("c1.medium"), need()]) == ["a", "b"]
    with pytest.raises(InsufficientCapacity, match="instance 4 of 4"):
        place(view, [need()] * 4)
    with pytest.raises(InsufficientCapacity):
        place(rebuild(None, ["a"], {"a": nc(8, mem=256)}), [need("m1.small")])  # memory, not cores


def test_lost_nodes_get_nothing() -> None:
    view = rebuild(None, ["a", "b"], {"a": nc(8), "b": ConnectionRefusedError("refused")})
    assert view.nodes["b"].state == LOST
    assert place(view, [need()] * 3) == ["a", "a", "a"]
    with pytest.raises(InsufficientCapacity):
        place(rebuild(None, ["b"], {"b": TimeoutError()}), [need()])


def test_rebuild_keeps_instances_of_a_silent_node_as_lost() -> None:
    first = rebuild(
        None, ["a", "b"], {"a": nc(4, instances=[inst("i-1")]), "b": nc(4, instances=[inst("i-2")])}
    )
    assert first.instances()["i-2"]["state"] == "running"
    second = rebuild(first, ["a", "b"], {"a": nc(4, instances=[inst("i-1")]), "b": "did not answer"})
    assert second.nodes["b"].state == LOST and second.nodes["b"].reason == "did not answer"
    got = second.instances()
    assert got["i-2"]["state"] == LOST and got["i-2"]["node"] == "b"
    assert got["i-1"]["state"] == "running"
    # It answers again: the view is its answer (nothing of the old one is kept).
    third = rebuild(second, ["a", "b"], {"a": nc(4, instances=[inst("i-1")]), "b": nc(4)})
    assert third.nodes["b"].state == UP and "i-2" not in third.instances()
    assert third.generation == 3


def test_rebuild_forgets_nodes_that_left_and_never_invents_instances() -> None:
    first = rebuild(None, ["a", "b"], {"a": nc(4, instances=[inst("i-1")]), "b": nc(4)})
    second = rebuild(first, ["a"], {"a": nc(4)})
    assert set(second.nodes) == {"a"} and second.instances() == {}
    fresh = rebuild(None, ["x"], {"x": OSError("down")})  # never heard of: lost, no instances
    assert fresh.nodes["x"].state == LOST and fresh.instances() == {}


def test_an_id_on_two_nodes_resolves_deterministically() -> None:
    view = rebuild(
        None,
        ["a", "b"],
        {"a": nc(4, instances=[inst("i-1", state="terminated")]), "b": nc(4, instances=[inst("i-1")])},
    )
    assert view.instances()["i-1"]["node"] == "b"


def test_with_instance_replaces_the_entry() -> None:
    view = rebuild(None, ["a"], {"a": nc(4, instances=[inst("i-1")])})
    view = view.with_instance("a", inst("i-1", state="terminated"))
    view = view.with_instance("a", inst("i-2"))
    assert {k: v["state"] for k, v in view.instances().items()} == {"i-1": "terminated", "i-2": "running"}
    assert view.with_instance("nope", inst("i-3")) is view
    assert ClusterView().instances() == {}


@settings(max_examples=150, deadline=None)
@given(
    caps=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=6),
    types=st.lists(st.sampled_from(sorted(INSTANCE_TYPES)), min_size=1, max_size=20),
)
def test_placement_never_overcommits(caps: list[int], types: list[str]) -> None:
    names = [f"nc-{i}" for i in range(len(caps))]
    view = rebuild(None, names, {n: nc(c, mem=4096, disk=60) for n, c in zip(names, caps, strict=True)})
    reqs = [need(t) for t in types]
    try:
        plan = place(view, reqs)
    except InsufficientCapacity:
        # Then even the whole cluster's free cores, memory or disk could not hold some prefix.
        return
    for n in names:
        mine = [r for r, p in zip(reqs, plan, strict=True) if p == n]
        cap = view.nodes[n]
        assert sum(r["cores"] for r in mine) <= cap.cores
        assert sum(r["memory_mib"] for r in mine) <= cap.memory_mib
        assert sum(r["disk_gib"] for r in mine) <= cap.disk_gib
