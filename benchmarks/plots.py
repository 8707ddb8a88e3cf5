"""PNG figures of docs/performance.md, drawn from benchmark results with matplotlib (Agg backend,
no display needed). Each function takes the results (every benchmark's entry) and a path, writes
the PNG and returns a one-line caption; every figure says the machine's load average when its benchmark
ran, because on a shared machine that decides how far the figures can be trusted.

- ``failover_timeline``: writes/s, errors and latency percentiles per 100 ms around a `kill -9`,
  the kill and the service state changes marked (result of benchmarks/failover_timeline.py);
- ``failover_distribution``: failover time per fault type over the trials, box and points,
  median and p99 marked, the targets drawn (benchmarks/failover.py);
- ``read_latency``: read latency in the first second after a failover and in steady state,
  against the same two windows after a cold start (benchmarks/read_after_failover.py).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on CI or testbed controllers

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

DPI = 110
MARKED_GROUPS = ("kv", "clc")  # whose state changes the timeline marks (the clients write kv)
STATE_COLOURS = {
    "ENABLED": "tab:green",
    "DISABLED": "tab:blue",
    "NOTREADY": "tab:orange",
    "STOPPED": "tab:red",
}


def load_note(result: dict[str, Any]) -> str:
    """'load average 9.1 / 7.2 / 5.0 on 2 CPUs at start' of a result's `_run` (or '')."""
    m = result.get("_run", {}).get("machine", {})
    load = m.get("loadavg_at_start")
    if not load:
        return "load average not recorded"
    avg = " / ".join(f"{x:.1f}" for x in load)
    return f"load average {avg} (1/5/15 min) on {m.get('cpus', '?')} CPUs at start"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def failover_timeline(results: dict[str, Any], path: Path) -> str:
    result = results["failover_timeline"]
    run = result["runs"][result["median_trial"]]
    b = run["buckets"]
    t = [x + result["bucket_seconds"] / 2 for x in b["t"]]  # plot at the bucket's middle
    width = result["bucket_seconds"]
    fig, (ax_rate, ax_err, ax_lat) = plt.subplots(
        3, 1, sharex=True, figsize=(10, 7.5), gridspec_kw={"height_ratios": [3, 1, 3]}
    )
    ax_rate.bar(t, b["ok_per_s"], width=width * 0.95, color="tab:blue", label="acknowledged writes/s")
    ax_rate.set_ylabel("writes/s")
    ax_err.bar(t, b["errors"], width=width * 0.95, color="tab:red", label="errors")
    ax_err.set_ylabel("errors\nper 100 ms")
    ax_err.set_ylim(bottom=0, top=max(1.0, max(b["errors"], default=0) * 1.2))
    for key, style in (("p50_ms", "-"), ("p99_ms", "--"), ("max_ms", ":")):
        ax_lat.plot(t, _nan(b[key]), style, marker=".", label=key.replace("_ms", ""))
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms) of writes\ncompleting in the bucket")
    ax_lat.set_xlabel("seconds from kill -9 of the primary process (100 ms buckets)")
    # The written group's (kv) and the clc's state changes; the first death certificate for kv.
    mine = [ev for ev in run["events"] if str(ev.get("service", "")).split(".", 1)[-1] in MARKED_GROUPS]
    changes = [ev for ev in mine if ev.get("old") != ev.get("new") and ev.get("new")]
    certs = [ev for ev in mine if "death certificate" in str(ev.get("cause", ""))][:1]
    for ax in (ax_rate, ax_err, ax_lat):
        ax.axvline(0.0, color="black", linewidth=1.5)
        ax.axvline(run["failover_seconds"], color="tab:green", linewidth=1.2, linestyle="--")
        for ev in changes:
            ax.axvline(ev["t"], color=STATE_COLOURS.get(ev["new"], "grey"), linewidth=0.8, alpha=0.7)
        for ev in certs:
            ax.axvline(ev["t"], color="grey", linewidth=0.8, linestyle=":")
    top = ax_rate.get_ylim()[1]
    ax_rate.text(0.0, top, " kill -9", va="top", ha="left", fontsize=8)
    ax_rate.text(
        run["failover_seconds"], top * 0.9, " first write, new epoch", va="top", fontsize=8, color="green"
    )
    for ev in certs:
        ax_rate.text(ev["t"], top * 0.8, " death certificate", va="top", fontsize=7, color="grey")
    for i, ev in enumerate(changes[:8]):  # label the first few; the lines show all
        label = f" {ev.get('service', '?')}@{ev.get('node', '?')}: {ev.get('old')}->{ev.get('new')}"
        ax_lat.text(
            ev["t"], 0.97 - 0.09 * i, label, transform=ax_lat.get_xaxis_transform(), fontsize=7, va="top"
        )
    ax_rate.legend(loc="lower left", fontsize=8)
    ax_lat.legend(loc="upper right", fontsize=8)
    fig.suptitle(
        f"Failover under load ({result['clients']} writing clients, trial with the median failover time "
        f"of {result['trials']})\n{load_note(result)}",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path)
    return (
        f"Writes/s, errors and latency per 100 ms around `kill -9` of the primary (trial "
        f"{result['median_trial'] + 1} of {result['trials']}: failover {run['failover_seconds']:.3f} s); "
        f"black: the kill, dashed green: first write acknowledged under the new epoch, dotted grey: the "
        f"first death certificate, thin lines: kv and clc state changes (describe-services events). "
        f"{_sentence(load_note(result))}"
    )


FAULTS = {
    "kill9": "kill -9\n(kv + clc fail over)",
    "kill9_one_group": "kill -9\n(kv alone)",
    "sigstop": "SIGSTOP past the lease\n(no death certificate)",
    "machine_kill": "machine kill\n(testbed host)",
}


def failover_distribution(results: dict[str, Any], path: Path) -> str:
    result = results["failover"]
    # machine kill: its own benchmark (a cloud on testbed hosts), drawn beside the local cases
    by_case = {**result, **{k: v for k, v in results.get("machine_kill", {}).items() if k == "machine_kill"}}
    cases = [(k, label) for k, label in FAULTS.items() if by_case.get(k, {}).get("kv_samples")]
    if not any(k in result for k, _ in cases):
        raise ValueError(
            "the failover result has no per-trial samples (kv_samples): rerun `make bench BENCH=failover`"
        )
    data = [by_case[k]["kv_samples"] for k, _ in cases]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.boxplot(data, whis=(0, 100), widths=0.5, medianprops={"color": "black"})
    rng = random.Random(0)  # fixed jitter: the same result gives the same picture
    for i, values in enumerate(data, start=1):
        ax.scatter([i + rng.uniform(-0.12, 0.12) for _ in values], values, s=14, alpha=0.7, zorder=3)
        s = by_case[cases[i - 1][0]]["kv_seconds"]
        if s["p99"] == s["p50"]:
            ax.text(i + 0.28, s["p50"], f"p50 = p99 {s['p50']:.3f} s", fontsize=8, va="center")
            continue
        ax.text(i + 0.28, s["p50"], f"p50 {s['p50']:.3f} s", fontsize=8, va="center")
        ax.text(i + 0.28, s["p99"], f"p99 {s['p99']:.3f} s", fontsize=8, va="center", color="tab:red")
    targets = result.get("targets", {})
    for key, style, label in (
        ("kill9_p50_s", ":", "target p50 (kill -9)"),
        ("kill9_p99_s", "--", "target p99"),
    ):
        if key in targets:
            ax.axhline(
                targets[key], color="grey", linestyle=style, linewidth=1, label=f"{label}: {targets[key]} s"
            )
    ax.set_xticks(range(1, len(cases) + 1), [label for _, label in cases], fontsize=8)
    ax.set_ylabel("seconds from the fault to the first write\nacknowledged by the new kv primary")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left")
    ns = ", ".join(f"{len(v)}" for v in data)
    title = f"Failover time per fault type (trials: {ns}; box: min-max and quartiles)\n"
    if "machine_kill" in dict(cases):
        testbed = load_note(results["machine_kill"])
        title += f"local runtime: {load_note(result)}\nmachine kill (testbed run): {testbed}"
    else:
        title += load_note(result)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    note = f"Local runtime: {load_note(result)}."
    if "machine_kill" in results and any(k == "machine_kill" for k, _ in cases):
        note += (
            f" Machine kill: a separate run on testbed hosts (benchmarks/machine_kill.py), "
            f"{load_note(results['machine_kill'])}."
        )
    return (
        "Failover time per fault type, every trial a point, whiskers at min and max, median and p99 "
        f"written beside each box. {note}"
    )


def read_latency(results: dict[str, Any], path: Path) -> str:
    result = results["read_after_failover"]
    cases = (
        ("after_failover", "new primary after kill -9"),
        ("cold_start", "cold-started process (baseline)"),
    )
    windows = (("first_second", "first second"), ("steady", "steady (2 s later)"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, (metric, title) in zip(axes, (("p50_ms", "read p50"), ("p99_ms", "read p99")), strict=True):
        x = 0.0
        ticks, labels = [], []
        for case, case_label in cases:
            for j, (window, window_label) in enumerate(windows):
                s = result[case][window][metric]
                colour = "tab:orange" if window == "first_second" else "tab:blue"
                err = [[s["p50"] - s["min"]], [s["max"] - s["p50"]]]
                ax.bar(
                    x,
                    s["p50"],
                    yerr=err,
                    capsize=4,
                    color=colour,
                    label=window_label if case == cases[0][0] else None,
                )
                ax.text(x, s["max"], f"{s['p50']:.2f}", ha="center", va="bottom", fontsize=8)
                if j == 0:
                    ticks.append(x + 0.5)
                    labels.append(case_label)
                x += 1.0
            x += 0.8
        ax.set_xticks(ticks, labels, fontsize=8)
        ax.set_title(f"{title} (ms): median of trials, bars min-max", fontsize=9)
    axes[0].set_ylabel("ms")
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        f"Reads after a failover vs a cold start ({result['keys']} keys, {result['trials']} trials each, "
        f"same run)\n{load_note(result)}",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, path)
    return (
        "Read latency in the first second and in steady state, after a failover and after a cold "
        f"start, taken in the same run. {_sentence(load_note(result))}"
    )


# figure name -> (benchmark whose result it draws, function)
PLOTS = {
    "failover_timeline": ("failover_timeline", failover_timeline),
    "failover_distribution": ("failover", failover_distribution),
    "read_latency": ("read_after_failover", read_latency),
}
