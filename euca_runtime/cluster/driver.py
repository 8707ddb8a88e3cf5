"""Hypervisor drivers of the NC: how an instance is actually started, stopped and found again.

The NC (`euca_runtime.cluster.nc`) owns the policy (capacity, fencing, idempotency); a driver
owns the mechanism. The interface (`HypervisorDriver`) is small and blocking (the NC calls it
from a worker thread, one call at a time):

- ``run(spec)``: start the instance; idempotent (an instance it already runs is returned as is);
- ``terminate(instance_id)``: stop it; idempotent; ``None`` for an id it never ran;
- ``list()``: its instances *as they are now* (a placeholder process that died shows up as
  ``terminated`` with a reason), never a cached answer;
- ``attach(instance_id, volume_id, device, path)`` / ``detach(instance_id, volume_id)``.

Bundled drivers (both keep their records in ``<state_dir>/instances.json``, rewritten
atomically on every change, so a restarted NC finds its instances again):

- `ProcessDriver` (``process``): every instance is a supervised placeholder process
  (``python -S -c 'signal.pause()' euca-instance <id> <state_dir>``, in its own session so it
  outlives an NC restart, as a VM outlives a restart of its management agent). Its pid and the
  kernel's start time of that pid are recorded; ``list()`` checks both against ``/proc`` (a
  reused pid is not mistaken for the instance). Attach records the volume.
- `RecordDriver` (``record``): records instances without running anything (benchmarks and
  simulations of large clusters: 1,000 instances need no 1,000 processes).

A libvirt driver would implement the same five calls over ``virDomainCreateXML`` /
``virDomainDestroy`` / ``virConnectListAllDomains`` / ``virDomainAttachDevice``; the domain
name carries the instance id, so ``list()`` needs no state file of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from euca_runtime.log import get_logger

log = get_logger("nc.driver")

STATE_FILE = "instances.json"
TERMINATED_KEPT = 3600.0
"""Seconds a terminated instance stays in the records (describe shows it as ``terminated``)."""
PLACEHOLDER = "import signal\nwhile True: signal.pause()"


class DriverError(Exception):
    """The driver could not do what was asked (the message says why)."""


@dataclass(frozen=True)
class InstanceSpec:
    """What the NC asks a driver to start."""

    instance_id: str
    instance_type: str
    image_id: str
    cores: int
    memory_mib: int
    disk_gib: int


@dataclass
class InstanceRecord:
    """One instance as a driver records it."""

    instance_id: str
    instance_type: str
    image_id: str
    cores: int
    memory_mib: int
    disk_gib: int
    launch_time: float
    state: str = "running"
    volumes: list[dict[str, str]] = field(default_factory=list)
    pid: int | None = None
    start_ticks: int | None = None
    reason: str | None = None
    terminated_at: float | None = None

    def public(self) -> dict[str, Any]:
        """The instance as ``nc.describe`` reports it (docs/cluster-api.md)."""
        return {
            "instance_id": self.instance_id,
            "state": self.state,
            "instance_type": self.instance_type,
            "image_id": self.image_id,
            "launch_time": self.launch_time,
            "volumes": [dict(v) for v in self.volumes],
            "cores": self.cores,
            "memory_mib": self.memory_mib,
            "disk_gib": self.disk_gib,
            "reason": self.reason,
        }

    @property
    def live(self) -> bool:
        """Counts against capacity (not terminated)."""
        return self.state != "terminated"

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> InstanceRecord:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


class HypervisorDriver(Protocol):
    """See the module docstring. Blocking; called from one worker thread at a time."""

    name: str

    def run(self, spec: InstanceSpec) -> InstanceRecord: ...

    def terminate(self, instance_id: str) -> InstanceRecord | None: ...

    def list(self) -> list[InstanceRecord]: ...

    def attach(self, instance_id: str, volume_id: str, device: str, path: str) -> InstanceRecord: ...

    def detach(self, instance_id: str, volume_id: str) -> InstanceRecord: ...

    def close(self) -> None: ...


class StateFileDriver:
    """The records and their state file; subclasses start, stop and check the real thing."""

    name = "base"

    def __init__(self, state_dir: Path, *, clock: Any = time.time, durable: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.durable = durable
        self.records: dict[str, InstanceRecord] = {}
        self._load()

    # -- state file

    @property
    def path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, json.JSONDecodeError) as exc:
            raise DriverError(f"{self.path}: unreadable state file: {exc}") from None
        for item in doc.get("instances", []):
            rec = InstanceRecord.from_doc(item)
            self.records[rec.instance_id] = rec

    def _save(self) -> None:
        doc = {"version": 1, "driver": self.name, "instances": [asdict(r) for r in self.records.values()]}
        tmp = self.path.with_suffix(f".tmp.{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(doc, f)
            if self.durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- the interface

    def run(self, spec: InstanceSpec) -> InstanceRecord:
        rec = self.records.get(spec.instance_id)
        if rec is not None and rec.live:
            return rec
        rec = InstanceRecord(
            instance_id=spec.instance_id,
            instance_type=spec.instance_type,
            image_id=spec.image_id,
            cores=spec.cores,
            memory_mib=spec.memory_mib,
            disk_gib=spec.disk_gib,
            launch_time=self.clock(),
            state="running",
        )
        self._start(rec)
        self.records[rec.instance_id] = rec
        self._save()
        return rec

    def terminate(self, instance_id: str) -> InstanceRecord | None:
        rec = self.records.get(instance_id)
        if rec is None:
            return None
        if rec.live:
            self._stop(rec)
            rec.state = "terminated"
            rec.terminated_at = self.clock()
            rec.reason = rec.reason or "terminated on request"
            rec.volumes = []
            self._save()
        return rec

    def list(self) -> list[InstanceRecord]:
        now = self.clock()
        changed = False
        for rec in list(self.records.values()):
            if rec.live and not self._alive(rec):
                rec.state = "terminated"
                rec.terminated_at = now
                rec.reason = "instance process exited unexpectedly"
                changed = True
                log.warning("instance died", extra={"instance": rec.instance_id, "pid": rec.pid})
            elif not rec.live and rec.terminated_at is not None and now - rec.terminated_at > TERMINATED_KEPT:
                del self.records[rec.instance_id]
                changed = True
        if changed:
            self._save()
        return list(self.records.values())

    def attach(self, instance_id: str, volume_id: str, device: str, path: str) -> InstanceRecord:
        rec = self._live(instance_id)
        if not any(v["volume_id"] == volume_id for v in rec.volumes):
            rec.volumes.append({"volume_id": volume_id, "device": device, "path": path})
            self._save()
        return rec

    def detach(self, instance_id: str, volume_id: str) -> InstanceRecord:
        rec = self._live(instance_id)
        before = len(rec.volumes)
        rec.volumes = [v for v in rec.volumes if v["volume_id"] != volume_id]
        if len(rec.volumes) != before:
            self._save()
        return rec

    def close(self) -> None:
        """Nothing to release: instances outlive the NC process on purpose."""

    def _live(self, instance_id: str) -> InstanceRecord:
        rec = self.records.get(instance_id)
        if rec is None:
            raise DriverError(f"no instance {instance_id}")
        if not rec.live:
            raise DriverError(f"instance {instance_id} is {rec.state}")
        return rec

    # -- mechanism

    def _start(self, rec: InstanceRecord) -> None:
        raise NotImplementedError

    def _stop(self, rec: InstanceRecord) -> None:
        raise NotImplementedError

    def _alive(self, rec: InstanceRecord) -> bool:
        raise NotImplementedError


class RecordDriver(StateFileDriver):
    """Instances recorded, nothing started (benchmarks, large simulated clusters)."""

    name = "record"

    def __init__(self, state_dir: Path, *, clock: Any = time.time) -> None:
        super().__init__(state_dir, clock=clock, durable=False)

    def _start(self, rec: InstanceRecord) -> None:
        pass

    def _stop(self, rec: InstanceRecord) -> None:
        pass

    def _alive(self, rec: InstanceRecord) -> bool:
        return True


def proc_start_ticks(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot); None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class ProcessDriver(StateFileDriver):
    """Every instance is a placeholder process (see the module docstring)."""

    name = "process"

    def __init__(self, state_dir: Path, *, clock: Any = time.time) -> None:
        super().__init__(state_dir, clock=clock, durable=True)
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def _start(self, rec: InstanceRecord) -> None:
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-S",
                    "-c",
                    PLACEHOLDER,
                    "euca-instance",
                    rec.instance_id,
                    str(self.state_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                env={"EUCA_INSTANCE_ID": rec.instance_id, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
        except OSError as exc:
            raise DriverError(f"cannot start the placeholder of {rec.instance_id}: {exc}") from None
        ticks = None
        for _ in range(100):  # /proc/<pid>/stat appears at once; be safe under load
            ticks = proc_start_ticks(proc.pid)
            if ticks is not None:
                break
            time.sleep(0.001)
        if ticks is None:
            raise DriverError(f"the placeholder of {rec.instance_id} exited at once")
        self._children[proc.pid] = proc
        rec.pid, rec.start_ticks = proc.pid, ticks
        log.info("instance started", extra={"instance": rec.instance_id, "pid": proc.pid})

    def _stop(self, rec: InstanceRecord) -> None:
        if rec.pid is None or not self._alive(rec):
            self._reap(rec.pid)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self._alive(rec):
            time.sleep(0.005)
        if self._alive(rec):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGKILL)
        self._reap(rec.pid)
        log.info("instance stopped", extra={"instance": rec.instance_id, "pid": rec.pid})

    def _reap(self, pid: int | None) -> None:
        proc = self._children.pop(pid, None) if pid is not None else None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)

    def _alive(self, rec: InstanceRecord) -> bool:
        if rec.pid is None:
            return False
        proc = self._children.get(rec.pid)
        if proc is not None and proc.poll() is not None:
            self._children.pop(rec.pid, None)
            return False
        return proc_start_ticks(rec.pid) == rec.start_ticks


DRIVERS = {"process": ProcessDriver, "record": RecordDriver}


def make_driver(name: str, state_dir: Path) -> HypervisorDriver:
    try:
        cls = DRIVERS[name]
    except KeyError:
        raise DriverError(f"unknown driver {name!r} (known: {', '.join(DRIVERS)})") from None
    return cls(state_dir)


def kill_placeholders(state_dir: Path) -> list[int]:
    """Kill every live placeholder recorded under `state_dir` (``euca-runtime down``)."""
    killed = []
    try:
        doc = json.loads((Path(state_dir) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    for item in doc.get("instances", []):
        pid, ticks = item.get("pid"), item.get("start_ticks")
        if isinstance(pid, int) and ticks is not None and proc_start_ticks(pid) == ticks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed
