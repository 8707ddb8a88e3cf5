"""Looking at the cloud: commands inside testbed hosts over SSH (Fabric), samplers of
`eucactl describe-services/describe-groups -o json` on every host while the workload runs, each
store's fence table, and the final state read through every endpoint after the heal."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paramiko
from botocore.exceptions import BotoCoreError, ClientError
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut

from faults.checkers import unhealthy_groups
from faults.history import History
from faults.workloads import Endpoints, sha
from testbed.model import STATE_ROOT

log = logging.getLogger("faults.observe")

EUCACTL = "/opt/euca-ha/venv/bin/eucactl --config /etc/eucalyptus/runtime.yml"
RUNTIME_PY = "/opt/euca-ha/venv/bin/python"
DATA_DIR = "/var/lib/eucalyptus"
SSH_ERRORS = (OSError, EOFError, paramiko.SSHException, CommandTimedOut)

# Run on a host: every instance store's fence row and change log (seq, epoch), read-only.
FENCE_SCRIPT = r"""
import json, pathlib, sqlite3, sys
out = {}
for db in sorted(pathlib.Path(sys.argv[1]).glob("*.db")):
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        fences = con.execute("SELECT group_name, epoch FROM fence").fetchall()
        if len(fences) != 1:
            continue
        log = con.execute("SELECT seq, epoch FROM changelog ORDER BY seq").fetchall()
    except sqlite3.Error as exc:
        out[db.stem] = {"error": str(exc)}
        continue
    out[db.stem] = {"group": fences[0][0], "fence": fences[0][1], "log": log}
print(json.dumps(out))
"""


class Hosts:
    """SSH into a bed's hosts with Fabric, through the bed's ssh_config and known_hosts."""

    def __init__(self, bed: str) -> None:
        self.bed = bed
        self.dir = STATE_ROOT / bed
        self._local = threading.local()

    def conn(self, host: str) -> Connection:
        conns: dict[str, Connection] = self._local.__dict__.setdefault("conns", {})
        c = conns.get(host)
        if c is None:
            c = Connection(
                host, config=Config(runtime_ssh_path=str(self.dir / "ssh_config")), connect_timeout=5
            )
            c.client.load_host_keys(str(self.dir / "known_hosts"))
            c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
            conns[host] = c
        return c

    def run(self, host: str, cmd: str, timeout: float = 30) -> tuple[int, str]:
        """(exit status, stdout) of `cmd` on `host`; (255, error) when SSH itself failed."""
        try:
            res = self.conn(host).run(cmd, hide=True, warn=True, timeout=timeout, in_stream=False)
        except SSH_ERRORS as exc:
            self.drop(host)
            return 255, f"{type(exc).__name__}: {exc}"
        return int(res.exited), str(res.stdout)

    def drop(self, host: str) -> None:
        conns: dict[str, Connection] = self._local.__dict__.setdefault("conns", {})
        c = conns.pop(host, None)
        if c is not None:
            c.close()

    def close(self) -> None:
        for host in list(self._local.__dict__.get("conns", {})):
            self.drop(host)

    def json(self, host: str, cmd: str, timeout: float = 30) -> Any:
        rc, out = self.run(host, cmd, timeout)
        if rc != 0:
            return None
        try:
            return json.loads(out or "null")
        except json.JSONDecodeError:
            return None

    def services(self, host: str) -> list[dict[str, Any]] | None:
        return self.json(host, f"{EUCACTL} describe-services -o json", 20)

    def groups(self, host: str) -> list[dict[str, Any]] | None:
        return self.json(host, f"{EUCACTL} describe-groups -o json", 20)

    def runtime_pid(self, host: str) -> int | None:
        rc, out = self.run(host, "systemctl show -p MainPID --value euca-runtime", 15)
        pid = out.strip()
        return int(pid) if rc == 0 and pid.isdigit() and int(pid) > 0 else None

    def fence_tables(self, host: str) -> dict[str, Any] | None:
        script = FENCE_SCRIPT.replace("'", "'\"'\"'")
        return self.json(host, f"{RUNTIME_PY} -c '{script}' {DATA_DIR}", 60)


class Sampler(threading.Thread):
    """Samples one host's describe-services and describe-groups until stopped (bounded)."""

    def __init__(self, hosts: Hosts, host: str, history: History, every: float = 0.5, limit: int = 5000):
        super().__init__(daemon=True, name=f"sampler-{host}")
        self.hosts, self.host, self.history, self.every, self.limit = hosts, host, history, every, limit
        self.services: list[dict[str, Any]] = []
        self.groups: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            for _ in range(self.limit):
                if self.stop_event.is_set():
                    break
                t0 = self.history.now()
                rows = self.hosts.services(self.host)
                t1 = self.history.now()
                if rows is not None:
                    self.services.append({"t0": t0, "t1": t1, "node": self.host, "rows": rows})
                t0 = self.history.now()
                groups = self.hosts.groups(self.host)
                t1 = self.history.now()
                if groups is not None:
                    self.groups.append({"t0": t0, "t1": t1, "node": self.host, "groups": groups})
                self.stop_event.wait(self.every)
        finally:
            self.hosts.close()

    def stop(self) -> None:
        self.stop_event.set()


def wait_until(cond: Callable[[], Any], timeout: float, what: str, every: float = 1.0) -> Any:
    """Poll `cond` until it returns something truthy; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def any_groups(hosts: Hosts, names: list[str]) -> list[dict[str, Any]] | None:
    for h in names:
        g = hosts.groups(h)
        if g:
            return g
    return None


def primary_host(hosts: Hosts, names: list[str], group: str) -> str | None:
    """The node of `group`'s ENABLED instance, as the first host that answers sees it."""
    for g in any_groups(hosts, names) or []:
        if g.get("group") == group and len(g.get("enabled") or []) == 1:
            name = g["enabled"][0]
            return next((str(i["node"]) for i in g["instances"] if i["name"] == name), None)
    return None


def wait_recovered(
    hosts: Hosts, names: list[str], history: History, expected: list[str], timeout: float
) -> tuple[float | None, list[str]]:
    """Poll every host's describe-groups until each of them shows every group fully redundant.
    Returns (seconds on the history clock when that was first seen, or None; last unhealthy)."""
    deadline = time.monotonic() + timeout
    last: list[str] = ["no answer yet"]
    while time.monotonic() < deadline:
        views = [hosts.groups(h) for h in names]
        last = sorted({b for v in views for b in (unhealthy_groups(v) if v else ["no answer"])})
        names_seen = [{str(g.get("group")) for g in v} if v else set() for v in views]
        if not last and all(set(expected) <= seen for seen in names_seen):
            return history.now(), []
        time.sleep(0.5)
    return None, last


def _retry(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (ClientError, BotoCoreError, OSError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {exc}") from exc
            time.sleep(1)


def final_s3(endpoints: Endpoints, bucket: str, timeout: float = 120) -> dict[str, dict[str, str]]:
    """{S3 URL: {key: sha256}}: every object of `bucket`, read through every S3 URL (one thread
    per URL)."""

    def read_all(url: str) -> dict[str, str]:
        s3 = endpoints.client("s3", url, read_timeout=30)

        def listing() -> list[str]:
            keys: list[str] = []
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                keys += [o["Key"] for o in page.get("Contents", [])]
            return keys

        objects: dict[str, str] = {}
        for key in _retry(listing, timeout, f"list s3://{bucket} through {url}"):

            def get(key: str = key) -> bytes:
                return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

            objects[key] = sha(_retry(get, timeout, f"get {key} through {url}"))
        return objects

    with ThreadPoolExecutor(max_workers=len(endpoints.s3)) as pool:
        futures = {url: pool.submit(read_all, url) for url in endpoints.s3}
        return {url: f.result() for url, f in futures.items()}


def final_iam(endpoints: Endpoints, prefix: str, timeout: float = 120) -> dict[str, list[str]]:
    """{IAM URL: the user names that start with `prefix`} through every IAM URL."""
    out: dict[str, list[str]] = {}
    for url in endpoints.iam:
        iam = endpoints.client("iam", url, read_timeout=30)

        def users(iam: Any = iam) -> list[str]:
            names: list[str] = []
            for page in iam.get_paginator("list_users").paginate():
                names += [u["UserName"] for u in page.get("Users", [])]
            return names

        out[url] = sorted(
            n for n in _retry(users, timeout, f"list users through {url}") if n.startswith(prefix)
        )
    return out


def final_ec2(endpoints: Endpoints, timeout: float = 120) -> dict[str, str]:
    """{instance id: state name} from DescribeInstances, through every EC2 URL in turn until one
    answers (the CLC serves EC2: every URL forwards to the same ENABLED instance)."""
    clients = [endpoints.client("ec2", url, read_timeout=30) for url in endpoints.ec2]

    def describe() -> dict[str, str]:
        errors: list[str] = []
        for ec2 in clients:
            found: dict[str, str] = {}
            try:
                for page in ec2.get_paginator("describe_instances").paginate():
                    for res in page.get("Reservations", []):
                        for i in res.get("Instances", []):
                            found[str(i["InstanceId"])] = str(i.get("State", {}).get("Name"))
            except (ClientError, BotoCoreError, OSError) as exc:
                errors.append(str(exc))
                continue
            return found
        raise OSError("; ".join(errors))

    return dict(_retry(describe, timeout, "describe instances"))


def final_fences(hosts: Hosts, names: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """{group: {instance: {"fence", "log"}}} from every host's instance stores."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for h in names:
        for inst, t in (hosts.fence_tables(h) or {}).items():
            if "group" in t:
                out.setdefault(str(t["group"]), {})[inst] = {"fence": t["fence"], "log": t["log"]}
    return out


def save_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
