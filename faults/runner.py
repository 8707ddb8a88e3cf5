"""One run of the fault suite: workloads and samplers against a deployed cloud, a nemesis
schedule (each step healed and waited for), a final heal, the final state read from every
endpoint and every instance store, the checkers, and a result file.

`run_schedule` works on a cloud that is already up (the quick set in tests/faults shares one);
`run` deploys a fresh cloud, runs one schedule and always removes the bed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from faults import checkers as chk
from faults import cloud as cloud_mod
from faults.cloud import GROUPS, Cloud
from faults.history import History, counts
from faults.nemesis import Ctx, Fault, heal_all, run_step
from faults.observe import (
    Hosts,
    Sampler,
    final_ec2,
    final_fences,
    final_iam,
    final_s3,
    save_json,
    wait_recovered,
)
from faults.workloads import Mix, bucket_name, prepare, user_prefix

log = logging.getLogger("faults.runner")

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Plan:
    seed: int
    steps: list[list[Fault]]
    mix: Mix = field(default_factory=Mix)
    settle: float = 3.0  # workload alone before the first fault, and after the last recovery
    recovery_timeout: float = 300.0  # generous: a loaded machine re-syncs slowly


def _steps_doc(steps: list[list[Fault]]) -> list[list[dict[str, Any]]]:
    return [[f.describe() for f in step] for step in steps]


def run_schedule(cloud: Cloud, plan: Plan, out: Path, label: str) -> dict[str, Any]:
    """Run `plan` against `cloud`; write `<out>/<label>.json` and `<label>.history.jsonl`."""
    history = History(out / f"{label}.history.jsonl")
    ctx = Ctx(cloud.bed, cloud.hosts, cloud.names, history, random.Random(plan.seed))
    tag = secrets.token_hex(3)  # this run's bucket and user names
    prepare(cloud.endpoints, tag)
    ec2_before = set(final_ec2(cloud.endpoints))
    budget = sum(max(f.duration for f in s) for s in plan.steps) + plan.recovery_timeout * (
        len(plan.steps) + 1
    )
    clients = plan.mix.clients(history, cloud.endpoints, plan.seed, history.now() + budget + 60, tag)
    samplers = [Sampler(Hosts(cloud.bed), h, history) for h in cloud.names]
    steps: list[dict[str, Any]] = []
    pause = threading.Event()
    for t in [*clients, *samplers]:
        t.start()
    try:
        pause.wait(plan.settle)
        for step in plan.steps:
            info = run_step(ctx, step)
            at, bad = wait_recovered(cloud.hosts, cloud.names, history, GROUPS, plan.recovery_timeout)
            info["recovered_at"] = at
            info["recovery_s"] = None if at is None else round(at - info["healed_at"], 3)
            info["unhealthy_after"] = bad
            steps.append(info)
            log.info("step done", extra={"faults": info["started"], "recovery_s": info["recovery_s"]})
            if at is None:
                # A cloud that did not recover fails the run already; more faults would only
                # pile up on it. The rest of the schedule is skipped (and says so).
                log.warning("step did not recover; the rest is skipped", extra={"unhealthy": bad})
                break
    finally:
        t_heal = history.now()
        healed = heal_all(ctx)
        final_at, final_bad = wait_recovered(cloud.hosts, cloud.names, history, GROUPS, plan.recovery_timeout)
        pause.wait(plan.settle)
        for t in clients:
            t.stop()
        for t in clients:
            t.join(timeout=60)
        for s in samplers:
            s.stop()
        for s in samplers:
            s.join(timeout=60)
    ops = history.snapshot()
    with open(out / f"{label}.samples.jsonl", "w", encoding="utf-8") as f:
        for sample in sorted((x for s in samplers for x in [*s.services, *s.groups]), key=lambda x: x["t0"]):
            f.write(json.dumps(sample, sort_keys=True) + "\n")
    result = _check(cloud, ops, samplers, steps, tag, ec2_before)
    result.update(
        {
            "seed": plan.seed,
            "label": label,
            "tag": tag,
            "bed": cloud.bed,
            "started": dt.datetime.fromtimestamp(history.wall0, dt.UTC).isoformat(timespec="seconds"),
            "duration_s": round(history.now(), 1),
            "schedule": _steps_doc(plan.steps),
            "steps": steps,
            "steps_skipped": len(plan.steps) - len(steps),
            "op_counts": counts(ops),
            "final_heal": {"did": healed, "at": t_heal},
            "final_recovery_s": None if final_at is None else round(final_at - t_heal, 3),
            "final_unhealthy": final_bad,
            "client_crashes": {c.process: c.crashed for c in clients if c.crashed},
            "history": str(out / f"{label}.history.jsonl"),
            "samples_file": str(out / f"{label}.samples.jsonl"),
        }
    )
    result["cleanup"] = _terminate_leftovers(cloud, ops)
    recovered_everywhere = final_at is not None and all(s["recovery_s"] is not None for s in steps)
    result["recovered"] = recovered_everywhere
    result["valid"] = bool(result["checks_valid"] and recovered_everywhere and not result["client_crashes"])
    history.close()
    save_json(out / f"{label}.json", result)
    return result


def _check(
    cloud: Cloud,
    ops: list[Any],
    samplers: list[Sampler],
    steps: list[dict[str, Any]],
    tag: str,
    ec2_before: set[str],
) -> dict[str, Any]:
    services = [x for s in samplers for x in s.services]
    groups = [x for s in samplers for x in s.groups]
    checks: dict[str, Any] = {}
    errors: dict[str, str] = {}
    reads = {
        "s3": lambda: final_s3(cloud.endpoints, bucket_name(tag)),
        "iam": lambda: final_iam(cloud.endpoints, user_prefix(tag)),
        "ec2": lambda: final_ec2(cloud.endpoints),
    }
    finals: dict[str, Any] = {}
    for name, fn in reads.items():
        try:
            finals[name] = fn()
        except (TimeoutError, ClientError, BotoCoreError, OSError) as exc:
            errors[name] = f"final read failed: {exc}"
    if "s3" in finals:
        checks["s3"] = chk.s3_checker(ops, finals["s3"])
    if "iam" in finals:
        checks["iam"] = chk.iam_checker(ops, finals["iam"], user_prefix(tag))
    if "ec2" in finals:
        checks["ec2"] = chk.ec2_checker(ops, finals["ec2"], ec2_before)
    checks["dual_writer"] = chk.dual_writer_checker(services, groups)
    checks["fence"] = chk.fence_checker(final_fences(cloud.hosts, cloud.names))
    for i, info in enumerate(steps):
        end = info["recovered_at"] if info["recovered_at"] is not None else info["healed_at"]
        next_at = steps[i + 1]["at"] if i + 1 < len(steps) else None
        info["failover_s"] = {
            f"{f['kind']}:{f['group']}": chk.failover_time(
                groups, f["group"], info["at"], int(f.get("epoch_before", 0)), next_at
            )
            for f in info["faults"]
            if "epoch_before" in f
        }
        info["longest_gap_s"] = {
            api: chk.longest_gap(ops, f"{api}.", info["at"], end) for api in ("s3", "iam", "ec2")
        }
    anomalies = {name: c for name, c in checks.items() if not c["valid"]}
    return {
        "checks": checks,
        "read_errors": errors,
        "checks_valid": not anomalies and not errors,
        "anomalies": sorted(anomalies) + sorted(errors),
        "samples": {"services": len(services), "groups": len(groups)},
    }


def _terminate_leftovers(cloud: Cloud, ops: list[Any]) -> dict[str, Any]:
    """After the checks: terminate the run's instances (the NC's capacity is small; the next run
    on the same cloud needs it). Not part of the history."""
    ids = sorted({str(o.value) for o in ops if o.f == chk.EC2_RUN and o.result == "ok" and o.value})
    errors: list[str] = []
    for url in cloud.endpoints.ec2:
        if not ids:
            break
        try:
            cloud.endpoints.client("ec2", url, read_timeout=30).terminate_instances(InstanceIds=ids)
            return {"terminated": ids}
        except (ClientError, BotoCoreError, OSError) as exc:
            errors.append(f"{url}: {exc}")
    return {"terminated": [], "errors": errors}


def run(plan: Plan, bed: str = "flt", out: Path = RESULTS) -> dict[str, Any]:
    """Deploy a fresh cloud on bed `bed`, run `plan`, remove the bed (always)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    label = f"{stamp}-{plan.seed}"
    workdir = Path(tempfile.mkdtemp(prefix=f"faults-{bed}-"))  # topology, eucarc, the cloud's CA
    try:
        cloud = cloud_mod.deploy(bed, workdir)
        result = run_schedule(cloud, plan, out, label)
        result["deploy_s"] = round(cloud.deploy_seconds, 1)
        save_json(out / f"{label}.json", result)
        cloud.hosts.close()
        return result
    finally:
        try:
            cloud_mod.remove(bed, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
