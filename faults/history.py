"""The history of a run: every client operation and every nemesis action, one JSON line each.

An entry is an `Op`: the client (`process`), the function (`f`, e.g. ``s3.put``), the key it
is about, the value it wrote or read (for S3 the sha256 of the bytes), its invoke and
completion times (seconds on the run's monotonic clock) and its result:

- ``ok``: the operation took effect (or, for a read, returned what `value` says);
- ``failed``: a definite refusal (an AWS error code with a 4xx status): it did not take effect;
- ``unknown``: a timeout, a connection error or a 5xx answer: it may or may not have taken effect.

Nemesis actions are entries of process ``nemesis`` (``f`` = ``nemesis.<fault>``), so a history
alone says what happened when, as Jepsen's does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Result = Literal["ok", "failed", "unknown"]
OK: Result = "ok"
FAILED: Result = "failed"
UNKNOWN: Result = "unknown"


@dataclass
class Op:
    process: str
    f: str
    key: str | None
    value: str | None
    invoke: float
    complete: float
    result: Result
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Op:
        return cls(
            process=str(d["process"]),
            f=str(d["f"]),
            key=d.get("key"),
            value=d.get("value"),
            invoke=float(d["invoke"]),
            complete=float(d["complete"]),
            result=d["result"],
            error=d.get("error"),
            extra=dict(d.get("extra") or {}),
        )


class History:
    """A thread-safe, append-only history, mirrored line by line to a JSON-lines file."""

    def __init__(self, path: Path | None = None, t0: float | None = None) -> None:
        self.t0 = time.monotonic() if t0 is None else t0
        self.wall0 = time.time()
        self.ops: list[Op] = []
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")

    def now(self) -> float:
        """Seconds since the run started, on the monotonic clock."""
        return time.monotonic() - self.t0

    def add(self, op: Op) -> Op:
        with self._lock:
            self.ops.append(op)
            if self._file is not None:
                self._file.write(op.to_json() + "\n")
                self._file.flush()
        return op

    def record(
        self,
        process: str,
        f: str,
        key: str | None,
        value: str | None,
        invoke: float,
        result: Result,
        error: str | None = None,
        **extra: Any,
    ) -> Op:
        return self.add(Op(process, f, key, value, invoke, self.now(), result, error, dict(extra)))

    def snapshot(self) -> list[Op]:
        with self._lock:
            return list(self.ops)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __iter__(self) -> Iterator[Op]:
        return iter(self.snapshot())


def load(path: Path) -> list[Op]:
    """A history file back as a list of ops (in completion order)."""
    return [Op.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def counts(ops: list[Op]) -> dict[str, dict[str, int]]:
    """{f: {ok: n, failed: n, unknown: n}} over client ops (nemesis entries left out)."""
    out: dict[str, dict[str, int]] = {}
    for op in ops:
        if op.process == "nemesis":
            continue
        c = out.setdefault(op.f, {OK: 0, FAILED: 0, UNKNOWN: 0})
        c[op.result] += 1
    return dict(sorted(out.items()))
