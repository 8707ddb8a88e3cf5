"""The quick fault set (part of `make test`): one HA cloud deployed by site.yml on a fresh
testbed bed, shared by a few short schedules. Each schedule runs the S3, IAM (with the
create/delete race) and EC2 workloads under real faults, heals, and must show no anomaly in any
checker, a failover where the fault takes the primary away, and every group back to ENABLED +
in-sync DISABLED. The bed is always removed (module fixture), also when a check fails.

The long randomized set is `make faults` (`python -m faults`), see docs/reliability.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faults.cloud import Cloud
from faults.nemesis import named_schedule
from faults.runner import Plan, run_schedule
from faults.workloads import Mix

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture
def cloud(demo_cloud: Cloud) -> Cloud:
    """The session's deployed cloud (tests/faults/conftest.py)."""
    return demo_cloud


def summary(result: dict) -> str:
    keys = ("anomalies", "read_errors", "steps", "final_unhealthy", "client_crashes", "op_counts")
    bad = {k: v for k, v in result["checks"].items() if not v["valid"]}
    return json.dumps({**{k: result[k] for k in keys}, "failed_checks": bad}, indent=1, default=str)[:8000]


@pytest.mark.parametrize(
    ("kinds", "fails_over"),
    [(["kill9"], True), (["sigstop"], True), (["user-route"], True), (["partition-backup"], False)],
    ids=["kill9", "sigstop-past-lease", "user-route-cut", "partition-primary-backup"],
)
def test_quick_schedule(cloud: Cloud, tmp_path: Path, kinds: list[str], fails_over: bool) -> None:
    plan = Plan(seed=7, steps=named_schedule(kinds, 7, duration=5.0), mix=Mix(limit=150), settle=2.0)
    result = run_schedule(cloud, plan, tmp_path, "-".join(kinds))
    assert result["valid"], summary(result)
    counts = result["op_counts"]
    for f in ("s3.put", "iam.create_user", "ec2.run"):
        assert counts.get(f, {}).get("ok", 0) > 0, f"no acknowledged {f}: {counts}"
    step = result["steps"][0]
    assert step["started"] == kinds, step
    if fails_over:
        assert any(v is not None for v in step["failover_s"].values()), step
    if kinds == ["user-route"]:
        # The primary's users lost it: its route watcher saw the route DOWN, so the target group's
        # primary moved to the backup (whose route works) and stays there (failback: manual).
        fault = step["faults"][0]
        assert step["failover_s"].get(f"user-route:{fault['group']}") is not None, step
        groups = {g["group"]: g for g in cloud.hosts.groups("h3") or []}
        assert groups[fault["group"]]["enabled"][0].split(".", 1)[0] == fault["backup"], groups
