"""Checkers: pure functions over a history (and the final state read after the heal).

Each returns a dict with ``valid`` (bool) and the anomalies it found, JSON-ready. None of them
talks to the cloud; the runner gathers the inputs (`faults.observe`) and calls them.

- `set_checker`: Jepsen's set checker. Acknowledged adds missing from the final read are
  *lost*; values read that no add ever attempted (or that a definite failure refused) are
  *unexpected*; an add whose outcome is unknown may or may not be present (*recovered* if it is).
- `s3_checker`: the set checker per S3 key with deletes, plus bytes (sha256) checks of every
  read and of the final objects, and stale reads (a key acknowledged, not deleted, then read
  as missing).
- `iam_checker`: per user name, the final state (and every definite answer) must be explained
  by some linearization of the operations on that name, unknown ones taking effect or not.
  This covers the seed's create/delete race on one name (DESIGN.md, issue 4 item 5).
- `ec2_checker`: acknowledged instances are present and not terminated unless a terminate
  was sent; acknowledged terminations stay terminated; no instance nobody asked for.
- `dual_writer_checker`: from sampled self-reports (`describe-services -o json` of each host,
  its own instances only) and `describe-groups -o json`: never two instances ENABLED in one
  epoch, never an instance ENABLED at an older epoch after a newer epoch was seen ENABLED,
  never two ENABLED in one describe-groups answer.
- `fence_checker`: every instance's fence table and change log: the log's epochs never go down
  with seq, the fence is at least the log's newest epoch, and two instances of a group agree on
  the epoch of every seq both hold (a seq written in two epochs means two writers).
- `recovered`: every group back to one ENABLED instance and in-sync DISABLED backups.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from faults.history import FAILED, OK, UNKNOWN, Op

S3_PUT, S3_GET, S3_DELETE = "s3.put", "s3.get", "s3.delete"
IAM_CREATE, IAM_DELETE = "iam.create_user", "iam.delete_user"
EC2_RUN, EC2_TERMINATE = "ec2.run", "ec2.terminate"
DEAD_STATES = frozenset({"terminated", "shutting-down"})
MAX_OPS_PER_NAME = 22  # the linearization search is exponential in the ops on one name


# --------------------------------------------------------------------------- sets


def set_checker(adds: Iterable[Op], final: Iterable[str]) -> dict[str, Any]:
    """Jepsen's set checker over add operations (their `value`) and one final read."""
    ok: set[str] = set()
    unknown: set[str] = set()
    failed: set[str] = set()
    for op in adds:
        if op.value is None:
            continue
        {OK: ok, UNKNOWN: unknown, FAILED: failed}[op.result].add(op.value)
    seen = set(final)
    attempted = ok | unknown
    lost = sorted(ok - seen)
    unexpected = sorted(seen - attempted)
    return {
        "valid": not lost and not unexpected,
        "ok_count": len(ok),
        "unknown_count": len(unknown),
        "failed_count": len(failed),
        "read_count": len(seen),
        "lost": lost,
        "unexpected": unexpected,
        "recovered": sorted(seen & (unknown - ok)),
    }


# --------------------------------------------------------------------------- S3


def _by_key(ops: Iterable[Op], fs: set[str]) -> dict[str, list[Op]]:
    out: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.f in fs and op.key is not None:
            out[op.key].append(op)
    return out


def s3_checker(ops: Sequence[Op], finals: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """`finals`: per endpoint that answered the final listing, {key: sha256 of its bytes}.

    A put's `value` is the sha256 of the bytes it sent (known before it is invoked); a get's is
    the sha256 of what it read, None for NoSuchKey.
    """
    by_key = _by_key(ops, {S3_PUT, S3_GET, S3_DELETE})
    anomalies: dict[str, list[dict[str, Any]]] = {
        "lost": [],
        "unexpected": [],
        "wrong_bytes": [],
        "resurrected": [],
        "stale_read": [],
        "divergent_final": [],
    }
    for key, kops in by_key.items():
        puts = [o for o in kops if o.f == S3_PUT]
        deletes = [o for o in kops if o.f == S3_DELETE and o.result != FAILED]
        expected = {o.value for o in puts if o.result != FAILED}
        for get in (o for o in kops if o.f == S3_GET and o.result == OK):
            if get.value is None:
                done = [p for p in puts if p.result == OK and p.complete < get.invoke]
                if done and not any(d.invoke < get.complete for d in deletes):
                    anomalies["stale_read"].append({"key": key, "get_at": get.invoke, "process": get.process})
            elif get.value not in expected:
                kind = "wrong_bytes" if puts else "unexpected"
                anomalies[kind].append({"key": key, "read": get.value, "by": get.process, "at": get.invoke})
    for endpoint, final in finals.items():
        keys = set(by_key) | set(final)
        for key in sorted(keys):
            kops = by_key.get(key, [])
            puts = [o for o in kops if o.f == S3_PUT]
            attempted = [o for o in puts if o.result != FAILED]
            acked = [o for o in puts if o.result == OK]
            deletes = [o for o in kops if o.f == S3_DELETE]
            sha = final.get(key)
            if sha is not None:
                if not attempted:
                    anomalies["unexpected"].append({"key": key, "endpoint": endpoint})
                elif sha not in {o.value for o in attempted}:
                    anomalies["wrong_bytes"].append({"key": key, "endpoint": endpoint, "read": sha})
                last_put = max((o.complete for o in attempted), default=-math.inf)
                if any(d.result == OK and d.invoke > last_put for d in deletes):
                    anomalies["resurrected"].append({"key": key, "endpoint": endpoint})
            elif acked and not any(d.result in (OK, UNKNOWN) for d in deletes):
                anomalies["lost"].append({"key": key, "endpoint": endpoint})
    views = list(finals.items())
    for (ea, fa), (eb, fb) in itertools.pairwise(views):
        differ = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
        if differ:
            anomalies["divergent_final"].append({"a": ea, "b": eb, "keys": differ[:20], "count": len(differ)})
    return {
        "valid": not any(anomalies.values()),
        "keys": len(by_key),
        "endpoints": sorted(finals),
        **anomalies,
    }


# --------------------------------------------------------------------------- IAM


@dataclass(frozen=True)
class _RegOp:
    """One operation on a present/absent register: `pre` required state (None: any), `post`."""

    invoke: float
    complete: float  # +inf for an unknown outcome
    pre: bool | None
    post: bool | None  # None: leaves the state as it is
    optional: bool


def _iam_reg_op(op: Op) -> _RegOp | None:
    code = str(op.extra.get("code") or "")
    create = op.f == IAM_CREATE
    if op.result == OK:
        return _RegOp(op.invoke, op.complete, not create, create, False)
    if op.result == UNKNOWN:
        return _RegOp(op.invoke, math.inf, not create, create, True)
    if create and code == "EntityAlreadyExists":
        return _RegOp(op.invoke, op.complete, True, None, False)
    if not create and code == "NoSuchEntity":
        return _RegOp(op.invoke, op.complete, False, None, False)
    return None  # another definite refusal: no effect, and it says nothing about the state


def linearizable(ops: Sequence[_RegOp], final: bool, initial: bool = False) -> bool | None:
    """Is there an order of `ops` (respecting real time; optional ones may be left out) that
    starts at `initial`, satisfies every op's precondition and ends at `final`?
    None when there are too many ops to search."""
    if len(ops) > MAX_OPS_PER_NAME:
        return None
    n = len(ops)
    required = sum(1 << i for i, o in enumerate(ops) if not o.optional)
    seen: set[tuple[int, bool]] = set()

    def search(done: int, state: bool) -> bool:
        if (done, state) in seen:
            return False
        seen.add((done, state))
        pending = [i for i in range(n) if not done >> i & 1]
        if done & required == required:
            if state == final or any(ops[i].pre == state and ops[i].post == final for i in pending):
                return True
        horizon = min((ops[i].complete for i in pending), default=math.inf)
        for i in pending:
            o = ops[i]
            if o.invoke > horizon or (o.pre is not None and o.pre != state):
                continue
            nxt = state if o.post is None else o.post
            if search(done | 1 << i, nxt):
                return True
        return False

    return search(0, initial)


def iam_checker(
    ops: Sequence[Op], finals: Mapping[str, Iterable[str]], prefix: str = "flt"
) -> dict[str, Any]:
    """`finals`: per IAM endpoint that answered, the user names ListUsers returned. A name with
    `prefix` (the run's) that no operation touched is unexpected."""
    by_name = _by_key(ops, {IAM_CREATE, IAM_DELETE})
    sets = {e: set(names) for e, names in finals.items()}
    anomalies: list[dict[str, Any]] = []
    unchecked: list[str] = []
    divergent: list[dict[str, Any]] = []
    views = list(sets.items())
    for (ea, fa), (eb, fb) in itertools.pairwise(views):
        differ = sorted((fa ^ fb) & set(by_name))
        if differ:
            divergent.append({"a": ea, "b": eb, "names": differ[:20], "count": len(differ)})
    for name, nops in sorted(by_name.items()):
        reg = [r for r in (_iam_reg_op(o) for o in nops) if r is not None]
        for endpoint, present in sets.items():
            verdict = linearizable(reg, name in present)
            if verdict is None:
                unchecked.append(name)
                break
            if not verdict:
                anomalies.append(
                    {
                        "name": name,
                        "endpoint": endpoint,
                        "final_present": name in present,
                        "ops": [
                            {"f": o.f, "process": o.process, "result": o.result, "code": o.extra.get("code")}
                            for o in sorted(nops, key=lambda o: o.invoke)
                        ],
                    }
                )
    for endpoint, present in sets.items():
        extra = sorted(n for n in present if n not in by_name and n.startswith(prefix))
        if extra:
            anomalies.append({"unexpected": extra, "endpoint": endpoint})
    return {
        "valid": not anomalies and not divergent,
        "names": len(by_name),
        "race_names": sum(1 for n in by_name if "race" in n),
        "endpoints": sorted(sets),
        "not_linearizable": anomalies,
        "divergent_final": divergent,
        "unchecked": unchecked,
    }


# --------------------------------------------------------------------------- EC2


def ec2_checker(ops: Sequence[Op], final: Mapping[str, str], before: Iterable[str] = ()) -> dict[str, Any]:
    """`final`: {instance id: state} from DescribeInstances after the heal; `before`: the ids
    that existed before the run (not this run's)."""
    old = set(before)
    final = {i: s for i, s in final.items() if i not in old}
    runs = [o for o in ops if o.f == EC2_RUN]
    terms = _by_key(ops, {EC2_TERMINATE})
    acked = {o.value for o in runs if o.result == OK and o.value}
    unknown_runs = sum(1 for o in runs if o.result == UNKNOWN)
    lost, resurrected, killed = [], [], []
    for iid in sorted(acked):
        sent = [t for t in terms.get(iid, []) if t.result != FAILED]
        state = final.get(iid)
        if state is None and not sent:
            lost.append(iid)
        elif state in DEAD_STATES and not sent:
            killed.append({"id": iid, "state": state})
        elif state not in DEAD_STATES and state is not None and any(t.result == OK for t in sent):
            resurrected.append({"id": iid, "state": state})
    unexplained = sorted(i for i, s in final.items() if i not in acked and s not in DEAD_STATES)
    too_many = len(unexplained) > unknown_runs
    return {
        "valid": not lost and not resurrected and not killed and not too_many,
        "acked_runs": len(acked),
        "unknown_runs": unknown_runs,
        "final_instances": len(final),
        "lost": lost,
        "resurrected": resurrected,
        "terminated_unasked": killed,
        "unexpected": unexplained if too_many else [],
        "unknown_launched": len(unexplained),
    }


# --------------------------------------------------------------------------- single writer


def dual_writer_checker(
    service_samples: Sequence[Mapping[str, Any]], group_samples: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """`service_samples`: {"t0", "t1", "node", "rows"}: one host's `describe-services -o json`
    taken between t0 and t1; only the rows of that host's own instances (`node`) are used (they
    are its self-report, not gossip). `group_samples`: {"t0", "t1", "node", "groups"} with
    `describe-groups -o json`."""
    holders: dict[tuple[str, int], set[str]] = defaultdict(set)
    enabled: list[tuple[float, float, str, str, int]] = []  # t0, t1, group, name, epoch
    for s in service_samples:
        for r in s.get("rows") or []:
            if r.get("node") != s["node"] or r.get("state") != "ENABLED":
                continue
            if r.get("type") in ("nc", "arbitrator"):
                continue  # independent instances: every one is ENABLED by design
            group, epoch = str(r.get("group") or r.get("type")), int(r.get("epoch") or 0)
            holders[(group, epoch)].add(str(r["name"]))
            enabled.append((float(s["t0"]), float(s["t1"]), group, str(r["name"]), epoch))
    same_epoch = [
        {"group": g, "epoch": e, "instances": sorted(names)}
        for (g, e), names in sorted(holders.items())
        if len(names) > 1
    ]
    stale: list[dict[str, Any]] = []
    first_seen: dict[str, dict[int, tuple[float, str]]] = defaultdict(dict)  # group -> epoch -> (t1, name)
    for t0, t1, group, name, epoch in sorted(enabled):
        proof = [(e, t, n) for e, (t, n) in first_seen[group].items() if e > epoch and t < t0]
        if proof:
            e, _t, n = max(proof)
            stale.append(
                {"group": group, "instance": name, "epoch": epoch, "at": t0, "newer": n, "newer_epoch": e}
            )
        if epoch not in first_seen[group] or t1 < first_seen[group][epoch][0]:
            first_seen[group][epoch] = (t1, name)
    doubles = [
        {"node": s["node"], "at": s["t0"], "group": g["group"], "enabled": g["enabled"]}
        for s in group_samples
        for g in s.get("groups") or []
        if len(g.get("enabled") or []) > 1 and str(g["group"]).split("/")[0] not in ("nc", "arbitrator")
    ]
    return {
        "valid": not same_epoch and not stale and not doubles,
        "samples": len(service_samples) + len(group_samples),
        "epochs_seen": {
            g: sorted(e for (gg, e) in holders if gg == g) for g in sorted({g for g, _ in holders})
        },
        "same_epoch": same_epoch,
        "stale_enabled": stale,
        "two_enabled_in_one_answer": doubles,
    }


def fence_checker(tables: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """`tables`: {group: {instance: {"fence": epoch, "log": [[seq, epoch], ...]}}} read from every
    instance's store after the heal."""
    anomalies: list[dict[str, Any]] = []
    for group, instances in sorted(tables.items()):
        at_seq: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        for name, t in sorted(instances.items()):
            log = sorted((int(s), int(e)) for s, e in t.get("log") or [])
            fence = int(t.get("fence") or 0)
            for (s1, e1), (s2, e2) in itertools.pairwise(log):
                if e2 < e1:
                    anomalies.append({"group": group, "instance": name, "epoch_went_down": [s1, e1, s2, e2]})
            if log and fence < log[-1][1]:
                anomalies.append({"group": group, "instance": name, "fence_below_log": [fence, log[-1][1]]})
            for s, e in log:
                at_seq[s][e].append(name)
        for seq, epochs in sorted(at_seq.items()):
            if len(epochs) > 1:
                anomalies.append(
                    {"group": group, "seq": seq, "epochs": {str(e): n for e, n in epochs.items()}}
                )
    return {
        "valid": not anomalies,
        "groups": sorted(tables),
        "anomalies": anomalies[:50],
        "count": len(anomalies),
    }


# --------------------------------------------------------------------------- recovery


def unhealthy_groups(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """Groups of a `describe-groups -o json` answer that are not fully redundant: not exactly one
    ENABLED instance with every other one DISABLED and in sync (independent groups such as nc
    and arbitrator: every instance ENABLED)."""
    bad = []
    for g in groups:
        insts = g.get("instances") or []
        kind = str(g.get("group", "")).split("/")[0]
        if kind in ("nc", "arbitrator"):
            ok = bool(insts) and all(i.get("state") == "ENABLED" for i in insts)
        else:
            states = sorted(str(i.get("state")) for i in insts)
            ok = (
                len(g.get("enabled") or []) == 1
                and states.count("ENABLED") == 1
                and all(s in ("ENABLED", "DISABLED") for s in states)
                and all(i.get("in_sync") for i in insts)
            )
        if not ok:
            bad.append(str(g.get("group")))
    return bad


def recovered(groups: Sequence[Mapping[str, Any]], expected: Iterable[str] = ()) -> bool:
    """Every group (and every `expected` group name) is present and fully redundant."""
    names = {str(g.get("group")) for g in groups}
    return bool(groups) and set(expected) <= names and not unhealthy_groups(groups)


# --------------------------------------------------------------------------- timings


def failover_time(
    group_samples: Sequence[Mapping[str, Any]],
    group: str,
    start: float,
    epoch_before: int,
    end: float | None = None,
) -> float | None:
    """Seconds from `start` (the fault) to the first describe-groups sample that shows `group`
    with one ENABLED instance at an epoch above `epoch_before` (None: no failover was seen).
    Only samples taken before `end` (the next step's start) count: a failover that the next
    fault caused is not this step's."""
    seen = [
        float(s["t1"])
        for s in group_samples
        if float(s["t0"]) >= start and (end is None or float(s["t1"]) <= end)
        for g in s.get("groups") or []
        if g.get("group") == group
        and len(g.get("enabled") or []) == 1
        and int(g.get("epoch") or 0) > epoch_before
    ]
    return round(min(seen) - start, 3) if seen else None


def longest_gap(ops: Sequence[Op], prefix: str, start: float, end: float) -> float | None:
    """The longest time in [start, end] without a successful completion of an op whose f starts
    with `prefix` (what a client of that API saw as unavailability); None without any op."""
    mine = [o for o in ops if o.f.startswith(prefix)]
    done = sorted(o.complete for o in mine if o.result == OK and start <= o.complete <= end)
    if not mine:
        return None
    points = [start, *done, end]
    return round(max(b - a for a, b in itertools.pairwise(points)), 3)
