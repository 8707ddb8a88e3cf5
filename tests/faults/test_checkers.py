"""The checkers on hand-made and generated histories (pure: no cloud)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from faults import checkers as c
from faults.history import FAILED, OK, UNKNOWN, History, Op, counts, load


def op(
    f: str, key: str | None, value: str | None, t0: float, t1: float, result: str = OK, **extra: object
) -> Op:
    return Op("p", f, key, value, t0, t1, result, None, dict(extra))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- history


def test_history_round_trips_through_its_json_lines_file(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    h = History(path)
    t0 = h.now()
    h.record("s3-0", c.S3_PUT, "k", "abc", t0, OK)
    h.record("s3-0", c.S3_PUT, "k2", "def", t0, UNKNOWN, "ReadTimeoutError", code=None)
    h.close()
    back = load(path)
    assert [(o.key, o.result) for o in back] == [("k", OK), ("k2", UNKNOWN)]
    assert back[1].error == "ReadTimeoutError" and back[0].complete >= back[0].invoke
    assert counts(back) == {c.S3_PUT: {OK: 1, FAILED: 0, UNKNOWN: 1}}
    assert all(json.loads(line)["process"] == "s3-0" for line in path.read_text().splitlines())


# --------------------------------------------------------------------------- set checker


def test_set_checker_jepsen_semantics() -> None:
    adds = [
        op("add", None, "a", 0, 1),
        op("add", None, "b", 0, 1),
        op("add", None, "c", 0, 1, UNKNOWN),
        op("add", None, "d", 0, 1, FAILED),
        op("add", None, "e", 0, 1, UNKNOWN),
    ]
    out = c.set_checker(adds, {"a", "c", "d", "z"})
    assert out["lost"] == ["b"]
    assert out["unexpected"] == ["d", "z"]
    assert out["recovered"] == ["c"]
    assert not out["valid"]
    assert c.set_checker(adds, {"a", "b"})["valid"]


@given(st.lists(st.tuples(st.sampled_from([OK, FAILED, UNKNOWN]), st.booleans()), max_size=40))
def test_set_checker_flags_exactly_missing_acks_and_reads_of_refused_adds(
    spec: list[tuple[str, bool]],
) -> None:
    adds = [op("add", None, f"v{i}", i, i + 1, r) for i, (r, _) in enumerate(spec)]
    final = {f"v{i}" for i, (_, present) in enumerate(spec) if present}
    out = c.set_checker(adds, final)
    lost = {f"v{i}" for i, (r, p) in enumerate(spec) if r == OK and not p}
    unexpected = {f"v{i}" for i, (r, p) in enumerate(spec) if r == FAILED and p}
    assert set(out["lost"]) == lost and set(out["unexpected"]) == unexpected
    assert out["valid"] == (not lost and not unexpected)


# --------------------------------------------------------------------------- S3


def test_s3_checker_finds_lost_wrong_bytes_resurrected_and_stale_reads() -> None:
    ops = [
        op(c.S3_PUT, "a", "sa", 0, 1),
        op(c.S3_PUT, "b", "sb", 0, 1),
        op(c.S3_PUT, "c", "sc", 0, 1),
        op(c.S3_DELETE, "c", None, 2, 3),
        op(c.S3_PUT, "d", "sd", 0, 1, UNKNOWN),
        op(c.S3_GET, "a", None, 5, 6),  # a was acknowledged and never deleted: a stale read
        op(c.S3_GET, "b", "other", 5, 6),
    ]
    final = {"u1": {"b": "wrong", "c": "sc", "x": "sx"}}
    out = c.s3_checker(ops, final)
    assert [a["key"] for a in out["lost"]] == ["a"]
    assert {a["key"] for a in out["wrong_bytes"]} == {"b"}
    assert [a["key"] for a in out["resurrected"]] == ["c"]
    assert [a["key"] for a in out["unexpected"]] == ["x"]
    assert [a["key"] for a in out["stale_read"]] == ["a"]
    assert not out["valid"]


def test_s3_checker_accepts_a_clean_history_and_unknowns_either_way() -> None:
    ops = [
        op(c.S3_PUT, "a", "sa", 0, 1),
        op(c.S3_GET, "a", "sa", 2, 3),
        op(c.S3_PUT, "b", "sb", 0, 1, UNKNOWN),
        op(c.S3_PUT, "c", "sc", 0, 1, UNKNOWN),
        op(c.S3_PUT, "d", "sd", 0, 1),
        op(c.S3_DELETE, "d", None, 2, 3, UNKNOWN),
        op(c.S3_GET, "d", None, 2.5, 3.5),  # concurrent with the delete: fine
    ]
    final = {"u1": {"a": "sa", "b": "sb"}, "u2": {"a": "sa", "b": "sb"}}
    out = c.s3_checker(ops, final)
    assert out["valid"], out


def test_s3_checker_reports_endpoints_that_disagree() -> None:
    ops = [op(c.S3_PUT, "a", "sa", 0, 1, UNKNOWN)]
    out = c.s3_checker(ops, {"u1": {"a": "sa"}, "u2": {}})
    assert not out["valid"] and out["divergent_final"][0]["keys"] == ["a"]


# --------------------------------------------------------------------------- IAM


def create(t0: float, t1: float, result: str = OK, code: str | None = None) -> Op:
    return op(c.IAM_CREATE, "fltrace0000", None, t0, t1, result, code=code)


def delete(t0: float, t1: float, result: str = OK, code: str | None = None) -> Op:
    return op(c.IAM_DELETE, "fltrace0000", None, t0, t1, result, code=code)


def test_iam_race_sequential_histories() -> None:
    ops = [create(0, 1), delete(2, 3), create(4, 5)]
    assert c.iam_checker(ops, {"u": ["fltrace0000"]})["valid"]
    assert not c.iam_checker(ops, {"u": []})["valid"]  # the last acknowledged create is lost
    ops = [create(0, 1), delete(2, 3)]
    assert not c.iam_checker(ops, {"u": ["fltrace0000"]})["valid"]  # the delete did not stick


def test_iam_race_concurrent_create_and_delete() -> None:
    # The second create and the delete overlap; the second create needs the user absent, so the
    # only explanation is create, delete, create: the user must be there at the end.
    ops = [create(0, 1), create(2, 10), delete(3, 9)]
    assert c.iam_checker(ops, {"u": ["fltrace0000"]})["valid"]
    assert not c.iam_checker(ops, {"u": []})["valid"]


def test_iam_race_definite_errors_are_observations() -> None:
    # EntityAlreadyExists after an acknowledged delete, with nothing concurrent: contradiction.
    ops = [create(0, 1), delete(2, 3), create(4, 5, FAILED, "EntityAlreadyExists")]
    assert not c.iam_checker(ops, {"u": []})["valid"]
    assert not c.iam_checker(ops, {"u": ["fltrace0000"]})["valid"]
    # ... explained when a create of unknown outcome may have landed in between.
    maybe = [*ops[:2], create(3.5, 3.6, UNKNOWN), ops[2]]
    assert c.iam_checker(maybe, {"u": ["fltrace0000"]})["valid"]


def test_iam_unknown_ops_may_or_may_not_take_effect() -> None:
    ops = [create(0, 1, UNKNOWN)]
    assert c.iam_checker(ops, {"u": []})["valid"]
    assert c.iam_checker(ops, {"u": ["fltrace0000"]})["valid"]
    assert not c.iam_checker([create(0, 1, FAILED, "ServiceUnavailable")], {"u": ["fltrace0000"]})["valid"]


def test_iam_users_nobody_created_are_unexpected() -> None:
    out = c.iam_checker([], {"u": ["fltiam0x00001"]})
    assert not out["valid"]


@given(st.integers(0, 2**32), st.integers(1, 10))
def test_iam_any_serial_execution_is_explained(seed: int, n: int) -> None:
    """Generate a real sequential execution of a register with some outcomes hidden (unknown):
    the checker must always accept the true final state."""
    rnd = random.Random(seed)
    present, t, ops = False, 0.0, []
    for _ in range(n):
        is_create = rnd.random() < 0.5
        applies = present != is_create
        code = None if applies else ("EntityAlreadyExists" if is_create else "NoSuchEntity")
        result = OK if applies else FAILED
        if rnd.random() < 0.3:
            result, code = UNKNOWN, None
            if rnd.random() < 0.5:
                applies = False  # the request never got there
        if applies:
            present = is_create
        ops.append((create if is_create else delete)(t, t + 1, result, code))
        t += 2
    assert c.linearizable([r for r in map(c._iam_reg_op, ops) if r], present)
    assert c.iam_checker(ops, {"u": ["fltrace0000"] if present else []})["valid"]


# --------------------------------------------------------------------------- EC2


def test_ec2_checker() -> None:
    ops = [
        op(c.EC2_RUN, "i-1", "i-1", 0, 1),
        op(c.EC2_RUN, "i-2", "i-2", 0, 1),
        op(c.EC2_TERMINATE, "i-2", None, 2, 3),
        op(c.EC2_RUN, None, None, 0, 1, UNKNOWN),
    ]
    assert c.ec2_checker(ops, {"i-1": "running", "i-2": "terminated", "i-9": "running"})["valid"]
    out = c.ec2_checker(ops, {"i-2": "running", "i-8": "running", "i-9": "running"})
    assert out["lost"] == ["i-1"] and out["resurrected"][0]["id"] == "i-2" and out["unexpected"]


# --------------------------------------------------------------------------- single writer


def sample(t0: float, node: str, *rows: tuple[str, str, int]) -> dict[str, object]:
    return {
        "t0": t0,
        "t1": t0 + 0.1,
        "node": node,
        "rows": [
            {
                "name": n,
                "type": n.split(".")[1],
                "group": n.split(".")[1],
                "node": n.split(".")[0],
                "state": s,
                "epoch": e,
            }
            for n, s, e in rows
        ],
    }


def test_dual_writer_checker() -> None:
    ok = [
        sample(0, "h1", ("h1.clc", "ENABLED", 1), ("h2.clc", "DISABLED", 1)),
        sample(0, "h2", ("h2.clc", "DISABLED", 1)),
        sample(5, "h2", ("h2.clc", "ENABLED", 2), ("h1.clc", "ENABLED", 1)),  # gossip about h1: ignored
        sample(6, "h1", ("h1.clc", "NOTREADY", 1)),
    ]
    assert c.dual_writer_checker(ok)["valid"]
    same = [*ok, sample(7, "h1", ("h1.clc", "ENABLED", 2))]
    assert c.dual_writer_checker(same)["same_epoch"] == [
        {"group": "clc", "epoch": 2, "instances": ["h1.clc", "h2.clc"]}
    ]
    stale = [*ok, sample(7, "h1", ("h1.clc", "ENABLED", 1))]
    out = c.dual_writer_checker(stale)
    assert not out["valid"] and out["stale_enabled"][0]["instance"] == "h1.clc"
    # A newer epoch seen first, then an even newer one: a later report at the oldest is still stale.
    chain = [*ok, sample(8, "h1", ("h1.clc", "ENABLED", 3)), sample(9, "h2", ("h2.clc", "ENABLED", 1))]
    assert [a["epoch"] for a in c.dual_writer_checker(chain)["stale_enabled"]] == [1]
    doubles = [{"t0": 1, "t1": 2, "node": "h3", "groups": [{"group": "walrus", "enabled": ["a", "b"]}]}]
    assert not c.dual_writer_checker(ok, doubles)["valid"]


def test_fence_checker() -> None:
    good = {
        "clc": {
            "h1.clc": {"fence": 3, "log": [[1, 1], [2, 1], [3, 3]]},
            "h2.clc": {"fence": 3, "log": [[2, 1], [3, 3]]},
        }
    }
    assert c.fence_checker(good)["valid"]
    two_writers = {"clc": {"h1.clc": {"fence": 3, "log": [[3, 2]]}, "h2.clc": {"fence": 3, "log": [[3, 3]]}}}
    assert not c.fence_checker(two_writers)["valid"]
    down = {"clc": {"h1.clc": {"fence": 3, "log": [[1, 3], [2, 2]]}}}
    assert not c.fence_checker(down)["valid"]
    below = {"clc": {"h1.clc": {"fence": 1, "log": [[1, 3]]}}}
    assert not c.fence_checker(below)["valid"]


def test_recovered() -> None:
    healthy = [
        {
            "group": "clc",
            "enabled": ["h1.clc"],
            "instances": [
                {"name": "h1.clc", "state": "ENABLED", "in_sync": True},
                {"name": "h2.clc", "state": "DISABLED", "in_sync": True},
            ],
        },
        {"group": "nc/cluster01", "enabled": ["h3.nc"], "instances": [{"name": "h3.nc", "state": "ENABLED"}]},
    ]
    assert c.recovered(healthy, ["clc"])
    assert not c.recovered(healthy, ["walrus"])
    lagging = json.loads(json.dumps(healthy))
    lagging[0]["instances"][1]["in_sync"] = False
    assert c.unhealthy_groups(lagging) == ["clc"]


def _groups_sample(t: float, epoch: int) -> dict:
    return {"t0": t, "t1": t + 0.1, "groups": [{"group": "walrus", "enabled": ["h1.walrus"], "epoch": epoch}]}


def test_failover_time_is_the_first_sample_at_a_newer_epoch_within_the_step():
    samples = [_groups_sample(t, 16) for t in (51.0, 52.0, 55.0, 58.0)] + [_groups_sample(60.6, 19)]
    # the step started at 52; the next one at 59 (it caused the epoch 19): none is this step's
    assert c.failover_time(samples, "walrus", 52.0, 16, end=59.0) is None
    # without a next step, the new epoch counts
    assert c.failover_time(samples, "walrus", 52.0, 16) == 8.7
    # a sample from before the fault never counts, nor another group
    assert c.failover_time(samples, "walrus", 61.0, 16) is None
    assert c.failover_time(samples, "clc", 52.0, 0) is None


def test_summary_tables_runs_and_fault_kinds(tmp_path: Path):
    from faults import summary

    step = {
        "at": 10.0,
        "faults": [{"kind": "kill9", "group": "clc", "epoch_before": 3}],
        "failover_s": {"kill9:clc": 1.5},
        "recovery_s": 2.0,
    }
    degrade = {
        "at": 20.0,
        "faults": [{"kind": "degrade", "group": "clc", "epoch_before": 4, "delay_ms": 50, "loss_pct": 1}],
        "failover_s": {"degrade:clc": None},
        "recovery_s": 0.5,
    }
    doc = {
        "seed": 7,
        "label": "x-7",
        "steps": [step, degrade],
        "anomalies": [],
        "recovered": True,
        "valid": True,
    }
    path = tmp_path / "x-7.json"
    path.write_text(json.dumps(doc))
    text = summary.summarize([path])
    assert "| 7 | 2 | none | yes | yes |" in text
    assert "| kill9 | 1 | 1 | 0 | 1.50 / 1.50 / 1.50 | 2.00 / 2.00 / 2.00 |" in text
    assert "| degrade 50 ms / 1 % | 1 | 0 | 1 | - |" in text
    assert summary.main([str(tmp_path / "missing.json")]) == 2
