"""`python -m faults.summary RESULT.json [RESULT.json ...]`: what several fault runs showed, as
Markdown for docs/reliability.md.

Per run: seed, steps, anomalies, recovered. Over all runs, per fault kind of the single-fault
steps, and one row for the steps of two faults at once (each of their faulted groups counted):
how many steps, failover time (fault start to the first sample of the group
ENABLED at a newer epoch, before the next step started; recomputed from the run's samples file
when it is there, so results written before that bound existed read the same) and recovery
time (heal to every group back to one ENABLED and in-sync DISABLED), each as p50 / p90 / max.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from faults.checkers import failover_time


def _groups_samples(result_file: Path, result: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The describe-groups samples of a run (None when its samples file is gone)."""
    path = result_file.with_name(f"{result['label']}.samples.jsonl")
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return [s for s in map(json.loads, f) if "groups" in s]


def _label(fault: dict[str, Any]) -> str:
    if fault["kind"] == "degrade":
        return f"degrade {fault.get('delay_ms')} ms / {fault.get('loss_pct')} %"
    return str(fault["kind"])


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _dist(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {_pct(values, 0.9):.2f} / {max(values):.2f}"


def summarize(files: Sequence[Path]) -> str:
    runs: list[str] = []
    steps_by_kind: dict[str, int] = defaultdict(int)
    failover: dict[str, list[float]] = defaultdict(list)
    no_failover: dict[str, int] = defaultdict(int)
    recovery: dict[str, list[float]] = defaultdict(list)
    total = 0
    for path in files:
        result = json.loads(path.read_text())
        steps = result["steps"]
        total += len(steps)
        samples = _groups_samples(path, result)
        runs.append(
            f"| {result['seed']} | {len(steps)} | {', '.join(result['anomalies']) or 'none'} | "
            f"{'yes' if result['recovered'] else 'NO'} | {'yes' if result['valid'] else 'NO'} | "
            f"`{path.name}` |"
        )
        for i, step in enumerate(steps):
            next_at = steps[i + 1]["at"] if i + 1 < len(steps) else None
            kinds = [_label(f) for f in step["faults"]]
            kind = kinds[0] if len(kinds) == 1 else "two faults at once (any pair)"
            steps_by_kind[kind] += 1
            if step.get("recovery_s") is not None:
                recovery[kind].append(float(step["recovery_s"]))
            for fault in step["faults"]:
                if "epoch_before" not in fault:
                    continue
                if samples is not None:
                    took = failover_time(
                        samples, fault["group"], step["at"], int(fault["epoch_before"]), next_at
                    )
                else:
                    took = (step.get("failover_s") or {}).get(f"{fault['kind']}:{fault['group']}")
                if took is None:
                    no_failover[kind] += 1
                else:
                    failover[kind].append(float(took))
    out = [
        f"{len(files)} run(s), {total} fault schedules (steps).",
        "",
        "| seed | steps | anomalies | recovered | valid | result |",
        "|---|---|---|---|---|---|",
        *runs,
        "",
        "| fault | steps | failovers seen | none seen | failover s p50 / p90 / max "
        "| recovery after heal s p50 / p90 / max |",
        "|---|---|---|---|---|---|",
    ]
    for kind in sorted(steps_by_kind):
        out.append(
            f"| {kind} | {steps_by_kind[kind]} | {len(failover[kind])} | {no_failover[kind]} | "
            f"{_dist(failover[kind])} | {_dist(recovery[kind])} |"
        )
    every = [v for vs in recovery.values() for v in vs]
    out += ["", f"Recovery after heal over all steps: p50 / p90 / max {_dist(every)} s."]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write("usage: python -m faults.summary RESULT.json [RESULT.json ...]\n")
        return 2
    missing = [a for a in args if not Path(a).is_file()]
    if missing:
        sys.stderr.write(f"faults.summary: no such result file: {', '.join(missing)}\n")
        return 2
    sys.stdout.write(summarize([Path(a) for a in args]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
