"""The CC at scale: 1,000 instances on 50 NCs; how fast a newly ENABLED CC reports them all, and
CC failover as seen by ``cc.describe_instances`` (the call the CLC's DescribeInstances makes).

The cluster: processes ``cc-a`` (CC primary), ``cc-b`` (CC backup), ``wit`` (arbitrator, third
voter) and ``ncs-1`` .. ``ncs-5``, each hosting 10 NCs with the ``record`` driver (an instance is
a record in the NC's state file, not a process: 1,000 placeholder processes would measure the
machine, not the CC). Every NC is a real NC component answering ``nc.describe`` over the bus,
so a poll is 50 bus round trips through the proxy's gateway, as in a real cluster.

Cases (each trial restarts what it killed and waits for an in-sync backup CC first):

- ``warm``: ``kill -9`` of the runtime process holding the CC lease. Time from the signal to
  the first ``cc.describe_instances`` (sent through the surviving process, held by the bus
  across the failover) that lists all 1,000 instances ``running``. The backup's service has
  been polling all along, so its view is warm; this is the CC failover time.
- ``cold``: ``kill -9`` of the *backup's* CC service, then at once ``kill -9`` of the primary's
  runtime: the backup's proxy restarts its service, which starts with an empty view (a process
  start plus a first poll). The worst case of "a newly enabled CC reports the cluster".
- ``steady``: latency of ``cc.describe_instances`` (1,000 instances) and of a whole poll when
  nothing fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks._cloud import cli, stop, summary
from euca_runtime import local
from euca_runtime.config import load_config
from euca_runtime.tls import ensure_dev_pki, write_private

CLUSTER = "cluster01"
NC_PROCESSES = 5
NCS_PER_PROCESS = 10
INSTANCES = 1000
TRIALS = {"warm": 3, "cold": 2}
NC_OPTIONS = {"cores": 24, "memory_mib": 65536, "disk_gib": 1000, "driver": "record"}


def _layout(root: Path) -> local.Layout:
    nodes: dict[str, dict[str, Any]] = {
        "cc-a": {"ip": "127.0.0.31", "components": [{"type": "cc", "partition": CLUSTER, "role": "primary"}]},
        "cc-b": {"ip": "127.0.0.32", "components": [{"type": "cc", "partition": CLUSTER, "role": "backup"}]},
        "wit": {"ip": "127.0.0.33", "components": [{"type": "arbitrator"}]},
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
    ports = {
        n: {"bus": local._free_port(s["ip"]), "admin": local._free_port(s["ip"])} for n, s in nodes.items()
    }
    tls = {n: {k: str(getattr(pki[n], k).relative_to(root)) for k in ("ca", "cert", "key")} for n in nodes}
    configs = local.node_configs(nodes, ports, tls)
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
            "api": {},
            "voter": name in voters,
            "components": nodes[name]["components"],
        }
    doc = {"version": 1, "mode": "ha", "nodes": doc_nodes}
    (root / local.LAYOUT).write_text(json.dumps(doc, indent=2) + "\n")
    return local.Layout(root, doc)


class Bench:
    def __init__(self, layout: local.Layout) -> None:
        self.layout = layout
        self.token = layout.token()

    def call(self, via: str, method: str, body: Any = None, timeout: float = 30.0) -> Any:
        doc = {"type": "cc", "partition": CLUSTER, "method": method, "body": body or {}, "timeout": timeout}
        return local._http_json(
            f"{self.layout.nodes[via].admin}/v1/call",
            self.token,
            method="POST",
            body=doc,
            timeout=timeout + 5,
        )["result"]

    def services(self, via: str) -> list[dict[str, Any]]:
        return list(local._http_json(f"{self.layout.nodes[via].admin}/v1/services", self.token)["services"])

    def wait(self, cond: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = cond()
                if value:
                    return value
            except (OSError, ValueError, KeyError) as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what} ({last})")

    def cc_states(self, via: str) -> dict[str, str]:
        return {s["node"]: s["state"] for s in self.services(via) if s["type"] == "cc"}

    def settled(self) -> tuple[str, str]:
        """(primary node, backup node) once one CC is ENABLED and the other DISABLED."""

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

    def all_running(self, via: str) -> bool:
        insts = self.call(via, "cc.describe_instances", {"instance_ids": None})["instances"]
        return len(insts) == INSTANCES and all(i["state"] == "running" for i in insts)

    def trial(self, cold: bool) -> float:
        primary, backup = self.settled()
        self.wait(lambda: self.all_running(backup), 30.0, "all instances running")
        pid = local.read_pid(self.layout.pid_file(primary))
        assert pid is not None
        if cold:
            os.kill(self.service_pid(backup), signal.SIGKILL)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while True:
            try:
                if self.all_running(backup):
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > 60.0:
                raise RuntimeError("the new CC did not report every instance within 60 s")
        took = time.monotonic() - t0
        cli("up", "--dir", str(self.layout.root), "--node", primary)
        return took


def run() -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="euca-bench-cc-"))
    root = tmp / "cloud"
    try:
        layout = _layout(root)
        cli("up", "--dir", str(root), timeout=180)
        b = Bench(layout)
        primary, _ = b.settled()
        b.wait(
            lambda: len(b.call(primary, "cc.describe_nodes")["nodes"]) == NC_PROCESSES * NCS_PER_PROCESS,
            30.0,
            "50 NCs",
        )
        t0 = time.monotonic()
        for start in range(0, INSTANCES, 100):
            batch = [
                {"instance_id": f"i-{n:08x}", "instance_type": "t1.micro", "image_id": "emi-00000001"}
                for n in range(start + 1, start + 101)
            ]
            b.call(primary, "cc.run_instances", {"instances": batch})
        run_s = time.monotonic() - t0
        nodes = b.call(primary, "cc.describe_nodes")["nodes"]
        per_nc = sorted(n["instances"] for n in nodes)
        steady = []
        for _ in range(20):
            t1 = time.monotonic()
            b.call(primary, "cc.describe_instances", {"instance_ids": None})
            steady.append(time.monotonic() - t1)
        out: dict[str, Any] = {
            "ncs": len(nodes),
            "nc_processes": NC_PROCESSES,
            "instances": INSTANCES,
            "driver": "record",
            "run_instances_total_s": round(run_s, 3),
            "instances_per_nc": {"min": per_nc[0], "max": per_nc[-1]},
            "describe_instances_s": summary(steady),
        }
        for case, n in TRIALS.items():
            out[f"{case}_failover_to_full_report_s"] = summary([b.trial(case == "cold") for _ in range(n)])
        out["poll_interval_s"] = 1.0
        return out
    finally:
        stop(root)
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
