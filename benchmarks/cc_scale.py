"""The CC at scale: 1,000 instances on 50 NCs; how fast a newly ENABLED CC reports them all, and
CC failover as an EC2 user sees it (boto3 ``describe_instances``).

The cloud: processes ``cc-a`` (CC primary), ``cc-b`` (CC backup), ``wit`` (the clc, so the EC2
API, and an arbitrator: the third voter) and ``ncs-1`` .. ``ncs-5``, each hosting 10 NCs with
the ``record`` driver (an instance is a record in the NC's state file, not a process: 1,000
placeholder processes would measure the machine, not the CC). Every NC is a real NC component
answering ``nc.describe`` over the bus, so a poll is 50 bus round trips through the proxy's
gateway, as in a real cluster. The clc lives apart from the CCs, so a trial fails over the CC
only (in ``euca-runtime up --ha`` one process holds both primaries and both fail over at once).
The 1,000 instances are launched through the EC2 API (50 ``RunInstances`` of 20, boto3 signed
with the eucarc credentials that ``euca-runtime up`` wrote), so the clc has their records.

Where an EC2 answer comes from: the clc's DescribeInstances asks the ENABLED CC for the live
state of every instance and, when no CC answers within ``DESCRIBE_TIMEOUT`` (3 s), answers from
its own records (the state recorded at launch, here ``running`` too: such an answer looks
complete but says nothing about the cluster). So every DescribeInstances during a trial is
bracketed by two reads of the new CC's node ``/metrics``
(``euca_requests_total{group="cc/cluster01",method="cc.describe_instances",outcome="ok"}``):
an answer counts as the new CC's only when that node served a ``cc.describe_instances`` while
it was in flight (the benchmark is the only DescribeInstances client), else as a fallback.

Before the trials the benchmark checks that classification on its cloud: with both CCs STOPPED
(``eucactl modify-service``), a DescribeInstances must come back, after the timeout, from the
clc's records and be classified as such (``fallback_check_s``: how long that answer took).

Cases (each trial restarts what it killed and waits for an ENABLED CC and a DISABLED one, i.e. a
backup whose service has completed a poll, first):

- ``warm``: ``kill -9`` of the runtime process holding the CC lease. Time from the signal to the
  end of the first boto3 ``describe_instances`` (through the clc's EC2 endpoint, which
  survives) answered from the new CC and listing all 1,000 instances ``running``. The backup's
  service has been polling all along, so its view is warm: this is the CC failover as a user
  sees it. Also recorded: when the new CC's instance became ENABLED (its state-change event),
  the slowest DescribeInstances during the failover and how many answers were fallbacks.
- ``cold``: ``kill -9`` of the *backup's* CC service, then at once ``kill -9`` of the primary's
  runtime: the backup's proxy restarts its service, which starts with an empty view (a process
  start plus a first poll) before it can take the lease. The worst case of "a newly enabled CC
  reports the cluster", measured as ``warm``.
- ``bus``: as ``warm``, but polling the internal ``cc.describe_instances`` bus call (the one the
  clc's DescribeInstances makes) through the surviving CC process's admin API, without the clc
  and EC2 on the path.
- ``steady``: latency of boto3 ``describe_instances`` and of ``cc.describe_instances`` (1,000
  instances) when nothing fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from benchmarks._cloud import cli, ctl, summary
from benchmarks._cloud import stop as stop_cloud
from euca_runtime import local
from euca_runtime.config import load_config
from euca_runtime.credentials import make_credential_key
from euca_runtime.services.ec2 import DESCRIBE_TIMEOUT
from euca_runtime.tls import ensure_dev_pki, write_private

CLUSTER = "cluster01"
NC_PROCESSES = 5
NCS_PER_PROCESS = 10
INSTANCES = 1000
PER_RUN_INSTANCES = 20  # the EC2 API's MaxCount limit per RunInstances
IMAGE = "emi-00000001"
TRIALS = {"warm": 10, "cold": 5, "bus": 5}
TRIAL_TIMEOUT = 90.0
NC_OPTIONS = {"cores": 24, "memory_mib": 65536, "disk_gib": 1000, "driver": "record"}
SERVED = re.compile(
    r'^euca_requests_total\{group="cc/' + CLUSTER + r'",method="cc\.describe_instances",outcome="ok"\} (\d+)',
    re.M,
)


def _layout(root: Path) -> local.Layout:
    nodes: dict[str, dict[str, Any]] = {
        "cc-a": {"ip": "127.0.0.31", "components": [{"type": "cc", "partition": CLUSTER, "role": "primary"}]},
        "cc-b": {"ip": "127.0.0.32", "components": [{"type": "cc", "partition": CLUSTER, "role": "backup"}]},
        "wit": {"ip": "127.0.0.33", "components": [{"type": "clc"}, {"type": "arbitrator"}]},
    }
    for p in range(1, NC_PROCESSES + 1):
        nodes[f"ncs-{p}"] = {
            "ip": f"127.0.0.{33 + p}",
            "components": [
                {"type": "nc", "partition": CLUSTER, "name": f"nc-{p:02d}-{i:02d}", "options": NC_OPTIONS}
                for i in range(1, NCS_PER_PROCESS + 1)
            ],
        }
    root.mkdir(mode=0o700, parents=True)
    pki = ensure_dev_pki(root / "pki", list(nodes), {n: [s["ip"]] for n, s in nodes.items()})
    token = os.urandom(24).hex()
    write_private(root / local.TOKEN, (token + "\n").encode())
    make_credential_key(root / local.CREDENTIAL_KEY)
    ports = {
        n: dict(zip(local.PORT_KINDS, local._free_ports(s["ip"], len(local.PORT_KINDS)), strict=True))
        for n, s in nodes.items()
    }
    tls = {n: {k: str(getattr(pki[n], k).relative_to(root)) for k in ("ca", "cert", "key")} for n in nodes}
    configs = local.node_configs(nodes, ports, tls, credential_key=local.CREDENTIAL_KEY)
    voters = ["cc-a", "cc-b", "wit"]
    doc_nodes = {}
    for name, cfg in configs.items():
        cfg["voters"] = voters
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        load_config(path)
        (root / name).mkdir(mode=0o700)
        write_private(root / name / local.TOKEN, (token + "\n").encode())
        doc_nodes[name] = {
            "host": nodes[name]["ip"],
            "config": path.name,
            "admin": f"http://{cfg['admin']}",
            "api": {k: f"http://{v}" for k, v in cfg.get("api", {}).items()},
            "voter": name in voters,
            "components": nodes[name]["components"],
        }
    doc = {"version": 1, "mode": "ha", "nodes": doc_nodes}
    (root / local.LAYOUT).write_text(json.dumps(doc, indent=2) + "\n")
    return local.Layout(root, doc)


@dataclass
class Poll:
    """One DescribeInstances (or bus call) made during a trial."""

    sent: float
    done: float
    running: int
    live: bool  # answered by the new CC (not the clc's fallback to its records)
    error: str = ""


class Bench:
    def __init__(self, layout: local.Layout) -> None:
        self.layout = layout
        self.token = layout.token()
        env = local.read_eucarc(layout.root / "eucarc")
        self.ec2 = boto3.session.Session().client(
            "ec2",
            endpoint_url=env["EC2_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
            config=Config(
                retries={"max_attempts": 1, "mode": "standard"}, read_timeout=60, connect_timeout=5
            ),
        )

    # ------------------------------------------------------------------ plumbing

    def call(self, via: str, method: str, body: Any = None, timeout: float = 30.0) -> Any:
        doc = {"type": "cc", "partition": CLUSTER, "method": method, "body": body or {}, "timeout": timeout}
        return local._http_json(
            f"{self.layout.nodes[via].admin}/v1/call",
            self.token,
            method="POST",
            body=doc,
            timeout=timeout + 5,
        )["result"]

    def services(self, via: str, events: bool = False) -> dict[str, Any]:
        url = f"{self.layout.nodes[via].admin}/v1/services" + ("?events=1" if events else "")
        return dict(local._http_json(url, self.token, timeout=5.0))

    def served(self, node: str) -> int:
        """How many ``cc.describe_instances`` the CC instance on `node` answered (its /metrics)."""
        req = urllib.request.Request(f"{self.layout.nodes[node].admin}/metrics")
        req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            m = SERVED.search(resp.read().decode())
        return int(m.group(1)) if m else 0

    def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = cond()
                if value:
                    return value
            except (OSError, ValueError, KeyError, BotoCoreError, ClientError) as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what} ({last})")

    def cc_states(self, via: str) -> dict[str, str]:
        return {s["node"]: s["state"] for s in self.services(via)["services"] if s["type"] == "cc"}

    def settled(self) -> tuple[str, str]:
        """(primary node, backup node) once one CC is ENABLED and the other DISABLED (a DISABLED
        CC's service has completed a poll: its view is warm)."""

        def ok() -> tuple[str, str] | None:
            st = self.cc_states("wit")
            on = [n for n, s in st.items() if s == "ENABLED"]
            off = [n for n, s in st.items() if s == "DISABLED"]
            return (on[0], off[0]) if len(on) == 1 and len(off) == 1 else None

        result: tuple[str, str] = self.wait(ok, 60.0, "an ENABLED and a DISABLED cc")
        return result

    def service_pid(self, node: str) -> int:
        path = self.layout.data_dir(node) / "cc" / f"{node}.cc.{CLUSTER}" / "service.json"
        return int(json.loads(path.read_text())["pid"])

    def enabled_at(self, node: str, since: float) -> float | None:
        """Wall-clock time `node`'s CC instance became ENABLED after `since` (its event)."""
        name = f"{node}.cc.{CLUSTER}"
        evs = self.services(node, events=True).get("events", [])
        times = [
            float(e["ts"])
            for e in evs
            if e.get("service") == name
            and e.get("new") == "ENABLED"
            and e.get("old") != "ENABLED"
            and float(e["ts"]) >= since
        ]
        return min(times) if times else None

    # ------------------------------------------------------------------ the two views

    def ec2_running(self) -> int:
        """Instances boto3 ``describe_instances`` lists as running (one page: the API does not page)."""
        res = self.ec2.describe_instances()
        return sum(1 for r in res["Reservations"] for i in r["Instances"] if i["State"]["Name"] == "running")

    def bus_running(self, via: str) -> int:
        insts = self.call(via, "cc.describe_instances", {"instance_ids": None})["instances"]
        return sum(1 for i in insts if i["state"] == "running")

    def poll_ec2(self, new_cc: str) -> Poll:
        before = self.served(new_cc)
        sent = time.monotonic()
        try:
            running, error = self.ec2_running(), ""
        except (BotoCoreError, ClientError) as exc:
            running, error = 0, f"{type(exc).__name__}: {exc}"
        done = time.monotonic()
        live = self.served(new_cc) > before
        return Poll(sent, done, running, live and not error, error)

    def poll_bus(self, via: str) -> Poll:
        sent = time.monotonic()
        try:
            running, error = self.bus_running(via), ""
        except (OSError, ValueError, KeyError) as exc:
            running, error = 0, f"{type(exc).__name__}: {exc}"
        return Poll(sent, time.monotonic(), running, not error, error)

    def check_fallback(self) -> float:
        """With both CCs STOPPED (`eucactl modify-service`), one DescribeInstances must come back
        from the clc's records and be classified so; returns how long it took. Both CCs are
        set DISABLED again afterwards (one then takes the lease)."""
        names = [f"{n}.cc.{CLUSTER}" for n in ("cc-a", "cc-b")]
        try:
            for name in names:
                proc = ctl(self.layout.root, "modify-service", name, "--state", "STOPPED")
                if proc.returncode != 0:
                    raise RuntimeError(f"modify-service {name} STOPPED: {proc.stderr or proc.stdout}")
            p = self.poll_ec2("cc-a")
            if p.live or p.error or p.running != INSTANCES:
                raise RuntimeError(f"with no CC, DescribeInstances was not classified as a fallback: {p}")
            return p.done - p.sent
        finally:
            for name in names:
                ctl(self.layout.root, "modify-service", name, "--state", "DISABLED")

    # ------------------------------------------------------------------ a trial

    def trial(self, case: str) -> dict[str, Any]:
        started = time.monotonic()
        primary, backup = self.settled()
        if case == "bus":
            self.wait(lambda: self.bus_running(backup) == INSTANCES, 30.0, "all instances running (bus)")
        else:
            self.wait(lambda: self.poll_ec2(primary).live, 30.0, "a DescribeInstances answered by the CC")
            self.wait(lambda: self.ec2_running() == INSTANCES, 30.0, "all instances running (EC2)")
        pid = local.read_pid(self.layout.pid_file(primary))
        assert pid is not None
        if case == "cold":
            os.kill(self.service_pid(backup), signal.SIGKILL)
        t0_wall = time.time()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        polls: list[Poll] = []
        while True:
            p = self.poll_bus(backup) if case == "bus" else self.poll_ec2(backup)
            polls.append(p)
            if p.live and p.running == INSTANCES:
                break
            if time.monotonic() - t0 > TRIAL_TIMEOUT:
                raise RuntimeError(
                    f"{case}: the new CC did not report every instance within {TRIAL_TIMEOUT} s"
                )
        enabled = self.enabled_at(backup, t0_wall - 1.0)
        cli("up", "--dir", str(self.layout.root), "--node", primary)
        return {
            "full_report": p.done - t0,
            "cc_enabled": None if enabled is None else enabled - t0_wall,
            "longest_call": max(q.done - q.sent for q in polls),
            "fallbacks": sum(1 for q in polls if not q.live and not q.error),
            "errors": sum(1 for q in polls if q.error),
            "first_errors": [q.error for q in polls if q.error][:2],
            "polls": len(polls),
            "trial_seconds": time.monotonic() - started,
        }


def _case(res: list[dict[str, Any]]) -> dict[str, Any]:
    enabled = [r["cc_enabled"] for r in res if r["cc_enabled"] is not None]
    return {
        "trials": len(res),
        "full_report_s": summary([r["full_report"] for r in res]),
        "cc_enabled_s": summary(enabled),
        "longest_call_s": summary([r["longest_call"] for r in res]),
        "polls": [r["polls"] for r in res],
        "fallback_answers": [r["fallbacks"] for r in res],
        "errors": sum(r["errors"] for r in res),
        "first_errors": [e for r in res for e in r["first_errors"]][:3],
        "trial_seconds": summary([r["trial_seconds"] for r in res], 1),
    }


def run(warm: int = TRIALS["warm"], cold: int = TRIALS["cold"], bus: int = TRIALS["bus"]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="euca-bench-cc-"))
    root = tmp / "cloud"
    try:
        t_setup = time.monotonic()
        layout = _layout(root)
        cli("up", "--dir", str(root), timeout=240)
        b = Bench(layout)
        primary, _ = b.settled()
        b.wait(
            lambda: len(b.call(primary, "cc.describe_nodes")["nodes"]) == NC_PROCESSES * NCS_PER_PROCESS,
            30.0,
            "50 NCs",
        )
        t0 = time.monotonic()
        for _ in range(INSTANCES // PER_RUN_INSTANCES):
            b.ec2.run_instances(
                ImageId=IMAGE, MinCount=PER_RUN_INSTANCES, MaxCount=PER_RUN_INSTANCES, InstanceType="t1.micro"
            )
        run_s = time.monotonic() - t0
        b.wait(lambda: b.ec2_running() == INSTANCES, 60.0, "1,000 instances running")
        nodes = b.call(primary, "cc.describe_nodes")["nodes"]
        per_nc = sorted(n["instances"] for n in nodes)
        steady_bus, steady_ec2 = [], []
        for _ in range(20):
            t1 = time.monotonic()
            b.call(primary, "cc.describe_instances", {"instance_ids": None})
            steady_bus.append(time.monotonic() - t1)
            t1 = time.monotonic()
            b.ec2_running()
            steady_ec2.append(time.monotonic() - t1)
        fallback_s = b.check_fallback()
        out: dict[str, Any] = {
            "ncs": len(nodes),
            "nc_processes": NC_PROCESSES,
            "instances": INSTANCES,
            "driver": "record",
            "run_instances_calls": INSTANCES // PER_RUN_INSTANCES,
            "run_instances_total_s": round(run_s, 3),
            "instances_per_nc": {"min": per_nc[0], "max": per_nc[-1]},
            "describe_instances_s": summary(steady_bus),
            "ec2_describe_instances_s": summary(steady_ec2),
            "setup_seconds": round(time.monotonic() - t_setup, 1),
            "poll_interval_s": 1.0,
            "describe_timeout_s": DESCRIBE_TIMEOUT,
            "fallback_check_s": round(fallback_s, 3),
        }
        for case, n in (("warm", warm), ("cold", cold), ("bus", bus)):
            if n:
                out[case] = _case([b.trial(case) for _ in range(n)])
        return out
    finally:
        stop_cloud(root)
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
