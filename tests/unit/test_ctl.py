"""eucactl's per-group summary (describe-groups, the status runbook)."""

from __future__ import annotations

from typing import Any

from euca_runtime.ctl import group_summary, groups_table


def row(name: str, state: str, in_sync: bool, cause: str = "", replicated: bool = True) -> dict[str, Any]:
    node, _, typ = name.partition(".")
    return {
        "name": name,
        "type": typ,
        "partition": None,
        "group": typ,
        "node": node,
        "state": state,
        "cause": cause,
        "epoch": 3,
        "in_sync": in_sync,
        "lag": 0,
        "replicated": replicated,
    }


def test_a_group_is_healthy_with_one_primary_and_every_backup_in_sync() -> None:
    [g] = group_summary([row("h1.kv", "ENABLED", True), row("h2.kv", "DISABLED", True)])
    assert g["healthy"] and g["enabled"] == ["h1.kv"] and (g["in_sync"], g["size"]) == (2, 2)
    [g] = group_summary([row("h1.kv", "ENABLED", True), row("h2.kv", "NOTREADY", False)])
    assert not g["healthy"]
    [g] = group_summary([row("h1.kv", "NOTREADY", False), row("h2.kv", "NOTREADY", False)])
    assert not g["healthy"] and g["enabled"] == []


def test_a_deregistered_tombstone_does_not_count() -> None:
    rows = [
        row("h1.kv", "ENABLED", True),
        row("h2.kv", "STOPPED", False, cause="deregistered"),
        row("h4.kv", "DISABLED", True),
    ]
    [g] = group_summary(rows)
    assert g["healthy"] and g["names"] == ["h1.kv", "h4.kv"]
    # An operator's STOPPED backup (not deregistered) does leave the group short of redundancy.
    [g] = group_summary([row("h1.kv", "ENABLED", True), row("h2.kv", "STOPPED", False, cause="operator")])
    assert not g["healthy"]


def test_independent_instances_are_healthy_when_all_enabled() -> None:
    rows = [row("h1.nc", "ENABLED", True, replicated=False), row("h3.nc", "ENABLED", True, replicated=False)]
    [g] = group_summary(rows)
    assert g["healthy"] and len(g["enabled"]) == 2
    rows[1]["state"] = "NOTREADY"
    [g] = group_summary(rows)
    assert not g["healthy"]


def test_the_table_names_every_group() -> None:
    text = groups_table(group_summary([row("h1.kv", "ENABLED", True), row("h1.clc", "ENABLED", True)]))
    assert text.splitlines()[0].split()[:3] == ["GROUP", "ENABLED", "EPOCH"]
    assert {line.split()[0] for line in text.splitlines()[1:]} == {"kv", "clc"}
