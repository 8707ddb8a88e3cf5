"""Generate docs/performance.md from a results file and the template benchmarks/performance.md.tmpl.

    python -m benchmarks.report [benchmarks/results/DATE.json]   (default: the newest file)

The template is hand-written prose with these markers: ``{{table:NAME}}`` becomes the table of
benchmark NAME, ``{{plot:FIGURE}}`` a PNG drawn by benchmarks/plots.py into docs/img/ and linked
(with a caption that gives the machine load of its run), ``{{runs}}`` the table of every result
with its date, duration and the machine's load average at its start and end, ``{{anchors}}`` the
published failover defaults of other systems beside our measured failover times, and
``{{a.b.c}}`` the value at that path in the results (``n/a`` when the benchmark was not run).
Nothing in the generated file is typed by hand.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATE = ROOT / "benchmarks" / "performance.md.tmpl"
OUT = ROOT / "docs" / "performance.md"
IMG = ROOT / "docs" / "img"


def _f(x: Any, nd: int = 3) -> str:
    if isinstance(x, bool):
        return "met" if x else "NOT met"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _s(d: dict[str, Any] | None, unit: str = "", nd: int = 3) -> str:
    """'p50 (min-max)' of a summary."""
    if not d or not d.get("n"):
        return "n/a"
    return f"{_f(d['p50'], nd)}{unit} ({_f(d['min'], nd)}-{_f(d['max'], nd)})"


def loaded(r: dict[str, Any]) -> bool:
    """The 1-minute load average at the start (or end) of the run exceeded the CPU count."""
    m = r.get("_run", {}).get("machine", {})
    cpus = m.get("cpus") or 1
    return any((m.get(k) or [0])[0] > cpus for k in ("loadavg_at_start", "loadavg_at_end"))


def _run_line(r: dict[str, Any]) -> str:
    run = r.get("_run", {})
    m = run.get("machine", {})
    end = f", at end {m['loadavg_at_end']}" if "loadavg_at_end" in m else ""
    args = run.get("arguments")
    line = (
        f"_Run {run.get('date', '?')}, {run.get('seconds', '?')} s, {m.get('cpus', '?')} CPUs, "
        f"load average (1/5/15 min) at start {m.get('loadavg_at_start', '?')}{end}"
        + (f"; arguments {', '.join(f'{k}={v}' for k, v in args.items())} (not the defaults)" if args else "")
        + "._"
    )
    if loaded(r):
        line += " **Loaded machine (load above the CPU count): these figures are noisy.**"
    return line


def t_replication_cost(r: dict[str, Any]) -> str:
    lines = [
        f"{r['trials']} alternating trials of {r['seconds_per_trial']} s per cell; "
        "cells show the median over trials (min-max).",
        "",
        "| clients | setup | writes/s | p50 latency | p99 latency | errors |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for key in sorted((k for k in r if k.startswith("clients_")), key=lambda k: int(k.split("_")[1])):
        row = r[key]
        n = key.split("_")[1]
        for mode in ("unreplicated", "replicated"):
            m = row[mode]
            lines.append(
                f"| {n} | {mode} | {_s(m['rate'], '', 0)} | {_s(m['p50_ms'], ' ms', 2)} | "
                f"{_s(m['p99_ms'], ' ms', 2)} | {m['errors']} |"
            )
        c = row["cost_ratio"]
        ratios.append(
            f"| {n} | {c['p50_latency']}x | {c['p99_latency']}x | {c['throughput']}x | "
            f"<= {r['target_ratio']}x | {_f(row['met'])} |"
        )
    lines += [
        "",
        "Cost of replication (replicated / unreplicated latency; unreplicated / replicated throughput):",
        "",
        "| clients | p50 latency | p99 latency | throughput | target | |",
        "|---|---|---|---|---|---|",
        *ratios,
    ]
    floor = r.get("floor")
    if floor:
        lines += [
            "",
            f"The floor on this machine (`bus_floor`, same run; median of {floor['rounds']} rounds of "
            f"{floor['requests']} calls, in us):",
            "",
            "| bus round trip | local durable write | remote durable write | send first (both) | "
            "added by the backup | 1-client ratio at the floor |",
            "|---|---|---|---|---|---|",
            f"| {floor['noop_us']['p50']} | {floor['local_us']['p50']} | {floor['remote_us']['p50']} | "
            f"{floor['send_first_us']['p50']} | {floor['added_by_backup_us']} | {floor['ratio_1_client']}x |",
        ]
    return "\n".join(lines)


def t_failover(r: dict[str, Any]) -> str:
    names = {
        "kill9": "`kill -9` of the primary process (kv and clc fail over together)",
        "kill9_one_group": "`kill -9`, clc primary elsewhere (kv alone fails over)",
        "sigstop": "`SIGSTOP` of the primary process (no death certificate; lease expiry)",
    }
    lines = [
        "Seconds from the signal to the first write acknowledged by the new primary; median (min-max).",
        "",
        "| failure | trials | kv p50 (min-max) | kv p99 | clc ENABLED elsewhere | client errors |",
        "|---|---|---|---|---|---|",
    ]
    for case, label in names.items():
        e = r.get(case)
        if not e:
            continue
        kv = e["kv_seconds"]
        lines.append(
            f"| {label} | {kv.get('n', 0)} | {_s(kv, ' s')} | {_f(kv.get('p99', 'n/a'))} s | "
            f"{_s(e.get('clc_seconds'), ' s')} | {e['client_errors']} |"
        )
    t = r["targets"]
    lines += [
        "",
        f"Target (kill -9): p50 < {t['kill9_p50_s']} s and p99 < {t['kill9_p99_s']} s: "
        f"**{_f(r['kill9'].get('met'))}**.",
    ]
    return "\n".join(lines)


def t_switchover(r: dict[str, Any]) -> str:
    rows = [
        ("longest gap between acknowledged writes around the switchover", r["write_gap_seconds"]),
        ("the same over a steady 1 s window just before (noise floor)", r["steady_gap_seconds"]),
        ("slowest write sent during the switchover", r["max_write_latency_seconds"]),
        ("`eucactl switchover` run time (includes Python start-up)", r["eucactl_seconds"]),
    ]
    return "\n".join(
        [
            f"{r['trials']} switchovers under {r['clients']} writing clients; median (min-max).",
            "",
            "| measure | value |",
            "|---|---|",
            *(f"| {label} | {_s(v, ' s')} |" for label, v in rows),
            f"| client errors | {r['client_errors']} |",
            "",
            f"Target: gap < {int(r['target_gap_s'] * 1000)} ms in every trial and zero errors: "
            f"**{_f(r['met'])}**.",
        ]
    )


def t_read_after_failover(r: dict[str, Any]) -> str:
    lines = [
        f"{r['keys']} keys, {r['trials']} trials per case; median over trials (min-max).",
        "",
        "| case | window | read p50 | read p99 | reads in window |",
        "|---|---|---|---|---|",
    ]
    for case, label in (
        ("after_failover", "new primary after kill -9"),
        ("after_failover_kv_only", "kill -9, kv the only primary there"),
        ("cold_start", "cold-started process"),
    ):
        if case not in r:
            continue  # results from before the kv-only case existed
        e = r[case]
        for w in ("first_second", "steady"):
            x = e[w]
            lines.append(
                f"| {label} | {w.replace('_', ' ')} | {_s(x['p50_ms'], ' ms')} | {_s(x['p99_ms'], ' ms')} | "
                f"{_s(x['reads_per_window'], '', 0)} |"
            )
    a, c = r["after_failover"], r["cold_start"]
    lines += [
        "",
        "| ratio first second / steady | p50 | p99 |",
        "|---|---|---|",
        f"| after failover | {_s(a['ratio_p50'], 'x', 2)} | {_s(a['ratio_p99'], 'x', 2)} |",
        *(
            [f"| after failover, kv only | {_s(k['ratio_p50'], 'x', 2)} | {_s(k['ratio_p99'], 'x', 2)} |"]
            if (k := r.get("after_failover_kv_only"))
            else []
        ),
        f"| cold start (baseline) | {_s(c['ratio_p50'], 'x', 2)} | {_s(c['ratio_p99'], 'x', 2)} |",
        "",
        f"Target: after failover within {r['target_ratio']}x of steady state (median of trials, p50 and "
        f"p99): **{_f(r['met'])}**.",
    ]
    return "\n".join(lines)


def t_testbed_boot(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| measure | value |",
            "|---|---|",
            f"| `testbed up --hosts {r['hosts']}` | {_s(r['up_seconds'], ' s', 1)} |",
            f"| idle memory, all hosts (PSS) | {_s(r['idle_pss_mib_total'], ' MiB', 1)} |",
        ]
    )


S3_IAM_OPS = {
    "put_4KiB": "PutObject 4 KiB",
    "put_1MiB": "PutObject 1 MiB",
    "get_4KiB": "GetObject 4 KiB",
    "get_1MiB": "GetObject 1 MiB",
    "create_user": "IAM CreateUser",
}
S3_IAM_TARGETS = {
    "single": "euca `up`",
    "ha": "euca `up --ha`",
    "moto": "moto server",
    "nginx": "nginx (static)",
}


def _cell(c: dict[str, Any] | None) -> str:
    """'rate/s (min-max), p50 / p99 ms' of one s3_iam cell (medians over rounds)."""
    if not c or not c.get("n"):
        return "n/a"
    err = f", **{c['errors']} errors**" if c.get("errors") else ""
    rate = c["rate"]
    return (
        f"{rate['p50']:.0f}/s ({rate['min']:.0f}-{rate['max']:.0f}), "
        f"{c['p50_ms']:.1f} / {c['p99_ms']:.1f} ms{err}"
    )


def t_s3_iam(r: dict[str, Any]) -> str:
    targets = [t for t in S3_IAM_TARGETS if t in r.get("targets", [])]
    lines = []
    for threads in r["threads"]:
        lines += [
            f"**{threads} client thread{'s' if threads > 1 else ''}**: requests/s, p50 / p99 latency.",
            "",
            "| operation | " + " | ".join(S3_IAM_TARGETS[t] for t in targets) + " |",
            "|---|" + "---|" * len(targets),
        ]
        for op, label in S3_IAM_OPS.items():
            cells = r["ops"].get(op, {})
            row = [_cell(cells.get(t, {}).get(f"t{threads}")) if t in cells else "-" for t in targets]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    per = r["requests_per_round"]
    lines.append(
        f"Cells: requests per second, median over {r['rounds']} rounds (min-max), then the medians "
        "of the rounds' p50 / p99 latency. Measured requests per round "
        f"({' / '.join(map(str, r['threads']))} threads): "
        + ", ".join(f"{S3_IAM_OPS[op]} {' / '.join(map(str, v.values()))}" for op, v in per.items())
        + f"; each cell capped at {r['cell_seconds_cap']:g} s, after {r['warmup_per_thread']} "
        "warm-up requests per thread."
    )
    fo = r.get("failover")
    if fo:
        lines += [
            "",
            "| S3 failover (`kill -9` of the walrus primary's process) | value |",
            "|---|---|",
            f"| trials | {fo['trials']} |",
            f"| longest gap between successful puts, median (min-max) | {_s(fo['gap_seconds'], ' s')} |",
            f"| first success after the kill, median (min-max) | "
            f"{_s(fo['first_success_after_kill_seconds'], ' s')} |",
            f"| errors seen by the clients (boto3 standard retries) | {fo['client_errors']} |",
        ]
    big = r.get("large")
    if big:
        rss = big["rss_mib"]
        lines += [
            "",
            f"| {big['size_mib']} MiB object through `up --ha` | value |",
            "|---|---|",
            f"| PutObject (replicated, fsynced) | {big['put_mib_s']} MiB/s |",
            f"| GetObject | {big['get_mib_s']} MiB/s |",
            *(f"| RSS of {n}: before, peak | {v['before']} MiB, {v['peak']} MiB |" for n, v in rss.items()),
            f"| largest peak RSS growth | {big['peak_growth_mib']} MiB |",
        ]
    return "\n".join(lines)


def t_failover_timeline(r: dict[str, Any]) -> str:
    changes = sum(1 for run in r["runs"] for e in run["events"] if e.get("old") != e.get("new"))
    return "\n".join(
        [
            f"{r['trials']} trials, {r['clients']} writing clients through the surviving process, "
            f"{r['before_seconds']:g} s of load before the kill and {r['after_seconds']:g} s after, "
            f"{int(r['bucket_seconds'] * 1000)} ms buckets.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| failover (kill to first write under the new epoch), median (min-max) | "
            f"{_s(r['failover_seconds'], ' s')} |",
            f"| writes acknowledged, all trials | {sum(run['acked'] for run in r['runs'])} |",
            f"| client errors, all trials | {r['client_errors']} |",
            f"| service state changes seen in the windows | {changes} |",
        ]
    )


def t_machine_kill(r: dict[str, Any]) -> str:
    e = r["machine_kill"]
    kv = e["kv_seconds"]
    return "\n".join(
        [
            f"{r['trials']} trials on {r['hosts']} testbed hosts (deployed by site.yml in "
            f"{r['deploy_seconds']} s).",
            "",
            "| failure | trials | kv p50 (min-max) | kv p99 | client errors |",
            "|---|---|---|---|---|",
            f"| machine kill of the kv primary's host | {kv.get('n', 0)} | {_s(kv, ' s')} | "
            f"{_f(kv.get('p99', 'n/a'))} s | {e['client_errors']} |",
            "",
            f"Target: p50 < {r['targets']['machine_kill_p50_s']} s: **{_f(e['met'])}**.",
        ]
    )


def _size(n: Any) -> str:
    """Bytes as KiB below a MiB, else MiB."""
    if not isinstance(n, int):
        return "n/a"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def _store_rows(store: dict[str, Any]) -> list[str]:
    """Rows of the store a benchmark filled: the target, what the cloud held, the fill's speed."""
    t, got, u, o = store["target"], store["reached"], store["users"], store["objects"]
    errors = u["errors"] + o["errors"]
    return [
        f"| IAM users (CreateUser): asked, held | {t['users']}, {got['users']} "
        f"(filled in {u['seconds']} s) |",
        f"| S3 objects: asked, held | {t['objects']} x {_size(t['object_bytes'])}, {got['objects']} objects, "
        f"{_size(got['bytes'])} (filled in {o['seconds']} s, {o.get('mib_per_s')} MiB/s) |",
        *([f"| requests that failed while filling | **{errors}** |"] if errors else []),
    ]


def _writer(w: dict[str, Any] | None) -> str:
    """'N of M requests (target 0: met)' of a benchmark's background writer."""
    if not w:
        return "no writer in this run"
    text = f"{w['errors']} of {w['ok'] + w['errors']} requests"
    if not w["errors"]:
        return text + " (target 0: **met**)"
    return text + f" (target 0: **NOT met**; first: {'; '.join(w['first_errors'][:2])})"


def _failed(w: dict[str, Any] | None) -> str:
    """'N of M requests' of a background writer, with the first failure when there was one."""
    if not w:
        return "n/a"
    first = f" (first: {w['first_errors'][0]})" if w["errors"] and w.get("first_errors") else ""
    return f"{w['errors']} of {w['ok'] + w['errors']} requests{first}"


def t_add_backup(r: dict[str, Any]) -> str:
    per_group = ", ".join(f"{g} {s} s" for g, s in sorted(r["in_sync_seconds_per_group"].items()))
    registered = ", ".join(f"{g} {s} s" for g, s in sorted(r["registered_seconds"].items()))
    poll = r["poll_seconds"]
    return "\n".join(
        [
            f"{r['hosts']} testbed hosts; the non-HA cloud deployed by site.yml in {r['deploy_seconds']} s.",
            "",
            "| measure | value |",
            "|---|---|",
            *_store_rows(r["store"]),
            f"| site.yml run that adds h2 (inventory edit) | {r['site_yml_seconds']} s |",
            f"| h2's instances registered, from the start of that run | {registered or 'n/a'} |",
            f"| h2 DISABLED and in sync, per group | {per_group or 'n/a'} |",
            "| **every group in sync on h2, from the start of site.yml** | "
            f"**{_f(r['in_sync_seconds'], 1)} s** |",
            "| resolution: one describe-groups poll over SSH, median (max) | "
            f"{_f(poll.get('p50', 'n/a'), 2)} s ({_f(poll.get('max', 'n/a'), 2)} s) |",
            f"| writer (S3 + IAM through h1) requests that failed meanwhile | {_writer(r.get('writer'))} |",
            f"| load average at the edit, at in sync | {r['loadavg_at_edit']}, {r['loadavg_at_sync']} |",
        ]
    )


def t_recovery(r: dict[str, Any]) -> str:
    rec = r["recovery"]
    s = rec["seconds"]
    poll = r["poll_round_seconds"]
    samples = ", ".join("not recovered" if x is None else f"{x}" for x in rec["samples"])
    writes = ", ".join(map(str, r["writes_during_partition"]))
    missed = (
        f" ({rec['not_recovered']} trial(s) did not recover within the timeout)"
        if rec["not_recovered"]
        else ""
    )
    return "\n".join(
        [
            f"{r['trials_run']} of {r['trials']} trials on {r['hosts']} testbed hosts (deployed by "
            f"site.yml in {r['deploy_seconds']} s); each a {r['partition_seconds']:g} s partition of "
            "the walrus primary's host from the other data host under writes, then the heal.",
            "",
            "| measure | value |",
            "|---|---|",
            *_store_rows(r["store"]),
            f"| recovery, heal to every group redundant: p50 (min-max) | {_s(s, ' s', 2)} |",
            f"| recovery p99 / max | {_f(s.get('p99', 'n/a'), 2)} s / {_f(s.get('max', 'n/a'), 2)} s |",
            f"| every trial (s) | {samples} |",
            "| resolution: one describe-groups round over the 3 hosts, median (max) | "
            f"{_f(poll.get('p50', 'n/a'), 2)} s ({_f(poll.get('max', 'n/a'), 2)} s) |",
            f"| writes acknowledged during each partition | {writes} |",
            f"| writer requests that failed, partition to recovery, all trials | {r['client_errors']} |",
            f"| writer requests that failed, whole run | {_failed(r.get('writer'))} |",
            "",
            f"Target: every trial back to full redundancy within {r['targets']['recovery_max_s']:g} s of "
            f"the heal: **{_f(rec['met'])}**{missed}.",
        ]
    )


def t_cc_scale(r: dict[str, Any]) -> str:
    poll = r["poll_interval_s"]
    n = r["instances"]
    per_call = n // r["run_instances_calls"]
    lines = [
        f"{r['instances']:,} instances on {r['ncs']} NCs ({r['nc_processes']} runtime processes, "
        f"`{r['driver']}` driver), CC poll interval {poll:g} s, the clc (EC2 API) in a process of its "
        "own; seconds, median (min-max).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| launch: {r['run_instances_calls']} boto3 `run_instances` of {per_call}, one after the other | "
        f"{_f(r['run_instances_total_s'], 1)} s |",
        f"| placement: instances per NC | {r['instances_per_nc']['min']}-{r['instances_per_nc']['max']} |",
        f"| boto3 `describe_instances` of all {n:,}, steady | {_s(r['ec2_describe_instances_s'], ' s')} |",
        f"| bus `cc.describe_instances` of all {n:,}, steady | {_s(r['describe_instances_s'], ' s')} |",
        *(
            [
                "| check: with both CCs STOPPED, boto3 `describe_instances` answered from the clc's "
                f"records (and counted so) after | {_f(r['fallback_check_s'])} s |"
            ]
            if "fallback_check_s" in r
            else []
        ),
        "",
        "| failure | trials | new CC ENABLED | first answer from the new CC, all running | "
        "slowest answer meanwhile | answers from the clc's records | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    cases = {
        "warm": "warm: `kill -9` of the CC primary's process; boto3 `describe_instances`",
        "cold": "cold: `kill -9` of the backup's CC service, then of the primary's process; boto3",
        "bus": "warm, internal: `kill -9` of the CC primary's process; bus `cc.describe_instances`",
    }
    for case, label in cases.items():
        e = r.get(case)
        if not e:
            continue
        fallbacks = "-" if case == "bus" else str(sum(e["fallback_answers"]))
        lines.append(
            f"| {label} | {e['trials']} | {_s(e['cc_enabled_s'], ' s')} | "
            f"**{_s(e['full_report_s'], ' s')}** | {_s(e['longest_call_s'], ' s')} | {fallbacks} | "
            f"{e['errors']} |"
        )
    warm = r.get("warm", {}).get("full_report_s", {})
    if warm.get("n"):
        lines += [
            "",
            f"Target (issue 5): the new CC reports every running instance within one poll interval "
            f"({poll:g} s) of the failure, as DescribeInstances shows it (warm, every trial): "
            f"**{_f(warm['max'] <= poll)}**.",
        ]
    cost = [f"{c} {_s(r[c]['trial_seconds'], ' s', 1)}" for c in cases if c in r and "trial_seconds" in r[c]]
    if cost:
        lines += [
            "",
            f"Cost: the cloud, its {n:,} instances and the steady figures {r['setup_seconds']} s; one trial, "
            f"restart of the killed process included: {', '.join(cost)}.",
        ]
    return "\n".join(lines)


def _bounds(s: dict[str, Any]) -> tuple[float, float] | None:
    """The detection window of an arbitrator setting: (threshold - 1) x interval, threshold x
    interval + one probe's timeout (None for results that did not record the timeout)."""
    if "probe_timeout_s" not in s:
        return None
    lo = (s["threshold"] - 1) * s["interval_s"]
    return lo, s["threshold"] * s["interval_s"] + s["probe_timeout_s"]


def t_arbitrator(r: dict[str, Any]) -> str:
    lines = [
        f"{r['trials_per_setting']} trials per setting, recover {r['recover']}, TCP targets (a cut "
        "target refuses at once); seconds from the cut, median (min-max).",
        "",
        "| interval | threshold | interval x threshold | route DOWN (detect) | backup kv ENABLED | "
        "hand-over (enabled - detect) | detect in its window |",
        "|---|---|---|---|---|---|---|",
    ]
    inside = []
    for s in r["settings"]:
        b = _bounds(s)
        d = s["detect_seconds"]
        if b is None or not d.get("n"):
            window = "n/a"
        else:
            ok = b[0] <= d["min"] and d["max"] <= b[1]
            inside.append(ok)
            window = f"{_f(b[0], 2)}-{_f(b[1], 2)} s: {_f(ok)}"
        lines.append(
            f"| {s['interval_s']:g} s | {s['threshold']} | {s['interval_x_threshold_s']:g} s | "
            f"{_s(d, ' s')} | {_s(s['backup_enabled_seconds'], ' s')} | {_s(s['handover_seconds'], ' s')} | "
            f"{window} |"
        )
    if inside:
        lines += [
            "",
            "Expected: every detection between (threshold - 1) x interval and threshold x interval "
            f"+ one probe's timeout: **{_f(all(inside))}**.",
        ]
    return "\n".join(lines)


SITE_SETTINGS = {
    "default": "ansible.cfg as committed (pipelining, ControlPersist 120 s, forks 20)",
    "no_pipelining": "pipelining off",
    "no_controlpersist": "ControlPersist off (new SSH connection per task)",
    "forks_5": "forks 5",
}


def t_site_yml(r: dict[str, Any]) -> str:
    lines = [
        f"Median (min-max) over {r['reruns']} rerun(s) per setting, settings interleaved; the "
        "ratio is against the committed ansible.cfg in the same run; `changed` per rerun (an "
        "idempotent rerun changes nothing).",
        "",
    ]
    for n in r["sizes"]:
        e = r[f"hosts_{n}"]
        base = e["rerun_seconds"]["default"].get("p50")
        wheelhouse = "already built" if e["wheelhouse_warm"] else "built in this run"
        lines += [
            f"| {n} testbed hosts | seconds | vs default | changed |",
            "|---|---|---|---|",
            f"| `testbed up --hosts {n}` | {e['testbed_up_seconds']} | | |",
            f"| site.yml from scratch (wheelhouse {wheelhouse}) | {e['scratch_seconds']} | | "
            f"{e['scratch_changed']} |",
        ]
        for key, label in SITE_SETTINGS.items():
            v = e["rerun_seconds"].get(key)
            if not v:
                continue
            ratio = f"{v['p50'] / base:.2f}x" if base and v.get("n") else "n/a"
            counts = e.get("rerun_changed", {}).get(key, [])
            lines.append(f"| rerun, {label} | {_s(v, '', 1)} | {ratio} | {', '.join(map(str, counts))} |")
        if e.get("not_idempotent"):
            tasks = "; ".join(f"`{t}`" for t in e["not_idempotent"][:10])
            lines += [
                "",
                f"**Not idempotent on {n} hosts**: the first rerun that changed something changed {tasks}.",
            ]
        lines.append("")
    return "\n".join(lines).rstrip()


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "replication_cost": t_replication_cost,
    "failover": t_failover,
    "switchover": t_switchover,
    "read_after_failover": t_read_after_failover,
    "testbed_boot": t_testbed_boot,
    "s3_iam": t_s3_iam,
    "failover_timeline": t_failover_timeline,
    "site_yml": t_site_yml,
    "machine_kill": t_machine_kill,
    "add_backup": t_add_backup,
    "recovery": t_recovery,
    "cc_scale": t_cc_scale,
    "arbitrator": t_arbitrator,
}


# Published defaults of other systems: how long each waits before it acts on a silent leader
# (a timeout, not a measured failover; the failover of each takes at least this long).
ANCHORS = [
    ("keepalived (VRRP)", "master down interval: 3 x advert_int (1 s) + skew", 3.5),
    ("etcd (Raft)", "election timeout (heartbeat 100 ms)", 1.0),
    ("MongoDB replica set", "electionTimeoutMillis 10 s + election, typical failover", 12.0),
    ("Patroni", "leader key ttl", 30.0),
    ("Redis Sentinel", "down-after-milliseconds (example sentinel.conf)", 30.0),
]


def anchors(results: dict[str, Any]) -> str:
    """Our measured failover medians beside the published defaults, and where we are slower."""
    ours: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    fo = results.get("failover", {})
    for case, label in (
        ("kill9", "`kill -9` of the primary process (death certificate)"),
        ("sigstop", "`SIGSTOP` past the 1 s lease (a silent primary: the comparable case)"),
    ):
        if fo.get(case, {}).get("kv_seconds", {}).get("n"):
            ours.append((label, fo[case]["kv_seconds"], fo))
    mk = results.get("machine_kill", {})
    if mk.get("machine_kill", {}).get("kv_seconds", {}).get("n"):
        ours.append(("machine kill of the primary's testbed host", mk["machine_kill"]["kv_seconds"], mk))
    tl = results.get("failover_timeline", {})
    if tl.get("failover_seconds", {}).get("n"):
        ours.append(("`kill -9` under load (failover_timeline)", tl["failover_seconds"], tl))
    lines = [
        "| system | published default | seconds |",
        "|---|---|---|",
        *(f"| {name} | {what} | about {secs:g} |" for name, what, secs in ANCHORS),
        "",
        "| euca-ha (measured, this report) | p50 | p99 | load average at start |",
        "|---|---|---|---|",
    ]
    for label, s, r in ours:
        load = r.get("_run", {}).get("machine", {}).get("loadavg_at_start", "?")
        lines.append(f"| {label} | {_f(s['p50'])} s | {_f(s['p99'])} s | {load} |")
    if not ours:
        return "\n".join([*lines, "", "_No failover results: run `make bench BENCH=failover`._"])
    slower = []
    for label, s, _ in ours:
        beaten = [f"{name} ({secs:g} s)" for name, _, secs in ANCHORS if secs < s["p50"]]
        beaten_p99 = [
            f"{name} ({secs:g} s)" for name, _, secs in ANCHORS if secs < s["p99"] and secs >= s["p50"]
        ]
        if beaten:
            slower.append(f"{label}: the median ({_f(s['p50'])} s) is slower than {', '.join(beaten)}")
        if beaten_p99:
            slower.append(f"{label}: the p99 ({_f(s['p99'])} s) is slower than {', '.join(beaten_p99)}")
    lines.append("")
    if slower:
        lines.append("**Where we are slower:** " + "; ".join(slower) + ".")
    else:
        lines.append(
            "**Where we are slower:** nowhere in this run: every median and p99 above is below every default."
        )
    return "\n".join(lines)


def _lookup(results: dict[str, Any], path: str) -> str:
    cur: Any = results
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return "n/a"
        cur = cur[part]
    return _f(cur)


def runs(results: dict[str, Any]) -> str:
    """Every result with its date, duration and the machine load around it."""
    lines = [
        "| benchmark | run (UTC) | seconds | CPUs | load average at start (1/5/15 min) | at end | |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(k for k, v in results.items() if isinstance(v, dict) and "_run" in v):
        run = results[name]["_run"]
        m = run.get("machine", {})
        lines.append(
            f"| {name} | {run.get('date', '?')} | {run.get('seconds', '?')} | {m.get('cpus', '?')} | "
            f"{m.get('loadavg_at_start', '?')} | {m.get('loadavg_at_end', 'not recorded')} | "
            f"{'**loaded: noisy**' if loaded(results[name]) else 'quiet'} |"
        )
    return "\n".join(lines)


def render(results: dict[str, Any], template: str, source: str, img_dir: Path | None = None) -> str:
    """The page. With `img_dir`, `{{plot:...}}` figures are drawn there and linked as img/NAME.png
    (the page lives in docs/, the figures in docs/img/); without, they are left out."""

    def table(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in results:
            return f"_Not in {source}: run `make bench BENCH={name}`._"
        return _run_line(results[name]) + "\n\n" + TABLES[name](results[name])

    def plot(m: re.Match[str]) -> str:
        from benchmarks import plots

        figure = m.group(1)
        bench, draw = plots.PLOTS[figure]
        if bench not in results:
            return f"_Figure {figure}: no {bench} result in {source}: run `make bench BENCH={bench}`._"
        if img_dir is None:
            return f"_Figure {figure}: not drawn._"
        try:
            caption = draw(results, img_dir / f"{figure}.png")
        except (KeyError, ValueError) as exc:
            why = f"the {bench} result cannot be drawn ({exc})"
            return f"_Figure {figure}: {why}: rerun `make bench BENCH={bench}`._"
        return f"![{figure}](img/{figure}.png)\n\n_{caption}_"

    text = re.sub(r"\{\{table:(\w+)\}\}", table, template)
    text = re.sub(r"\{\{plot:(\w+)\}\}", plot, text)
    text = text.replace("{{runs}}", runs(results)).replace("{{anchors}}", anchors(results))
    text = re.sub(r"\{\{([\w.]+)\}\}", lambda m: _lookup(results, m.group(1)), text)
    header = (
        f"<!-- GENERATED by `python -m benchmarks.report` from {source} and "
        "benchmarks/performance.md.tmpl: edit the template, not this file. -->\n"
    )
    return header + text


def newest_results(files: list[Path]) -> dict[str, Any]:
    """Every benchmark's newest result across result files (oldest first): a partial run
    (``make bench BENCH=name``) on a later day replaces that benchmark's figures only."""
    merged: dict[str, Any] = {}
    for path in files:
        merged.update(json.loads(path.read_text()))
    return merged


def main(argv: list[str]) -> int:
    if argv:
        path = Path(argv[0])
        results = json.loads(path.read_text())
        try:
            source = str(path.resolve().relative_to(ROOT))
        except ValueError:
            source = str(path)
    else:
        files = sorted(RESULTS.glob("*.json"))
        if not files:
            print("report: no results in benchmarks/results; run `make bench` first", file=sys.stderr)
            return 2
        results = newest_results(files)
        source = ", ".join(str(f.relative_to(ROOT)) for f in files) + " (newest result of each benchmark)"
    OUT.write_text(render(results, TEMPLATE.read_text(), source, IMG))
    print(f"report: wrote {OUT.relative_to(ROOT)} from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
