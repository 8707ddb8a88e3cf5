"""The IAM API with real clients (boto3, the AWS CLI) against `euca-runtime up` and `up --ha`.

Real processes on loopback. HA: concurrent CreateUser/CreateAccessKey writers while the clc
primary is kill -9-ed, frozen past its lease, or switched over; and a partition (frozen
processes: SIGSTOP) with contradictory requests on its two sides.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError
from runtime_harness import (
    KEY_REVOCATION_BOUND,
    REVOCATION_DEADLINE,
    ApiTarget,
    Cloud,
    SkewedSigV4,
    eucarc,
    http,
    wait_until,
)

REGION = "eucalyptus"


def client(url: str, key: str, secret: str, attempts: int = 1, read_timeout: float = 30.0) -> Any:
    return boto3.client(
        "iam",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": attempts, "mode": "standard"}, read_timeout=read_timeout),
    )


def admin(cloud: Cloud, node: str | None = None, **kw: Any) -> Any:
    env = eucarc(cloud)
    url = cloud.layout.nodes[node].api["iam"] if node else env["EUARE_URL"]
    return client(url, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], **kw)


def code(exc: ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


def refused(fn: Any, **kw: Any) -> tuple[int, str]:
    with pytest.raises(ClientError) as info:
        fn(**kw)
    return code(info.value)


def all_users(iam: Any) -> set[str]:
    pages = iam.get_paginator("list_users").paginate(PaginationConfig={"PageSize": 50})
    return {u["UserName"] for page in pages for u in page["Users"]}


def raw_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_iam_operations_errors_cli_and_secrets(api_target: ApiTarget) -> None:
    cloud, node = api_target.cloud, api_target.node
    env = eucarc(cloud)
    assert stat.S_IMODE((cloud.root / "eucarc").stat().st_mode) == 0o600
    assert stat.S_IMODE((cloud.root / "pki" / "credentials.key").stat().st_mode) == 0o600
    assert env["AWS_DEFAULT_REGION"] == REGION and env["AWS_ACCESS_KEY_ID"].startswith("AKIA")
    urls = [cloud.layout.nodes[n].api["iam"] for n in ("node-a", "node-b") if n in cloud.layout.nodes]
    assert env["EUARE_URLS"].split() == urls and env["EUARE_URL"] == urls[0]
    url = cloud.layout.nodes[node].api["iam"]  # HA: node-b's, forwarded to the primary
    iam = admin(cloud, node)
    assert iam.get_user()["User"]["UserName"] == "admin"

    # CreateUser / GetUser / ListUsers with paging and path prefixes.
    alice = iam.create_user(UserName="alice")["User"]
    assert alice["Arn"].endswith(":user/alice") and alice["Path"] == "/"
    names = [f"user{i:02d}" for i in range(7)]
    for n in names:
        iam.create_user(UserName=n, Path="/team/")
    assert iam.get_user(UserName="user03")["User"]["Path"] == "/team/"
    page = iam.list_users(MaxItems=3)
    assert page["IsTruncated"] and len(page["Users"]) == 3 and page["Marker"]
    seen = [u["UserName"] for u in page["Users"]]
    while page["IsTruncated"]:
        page = iam.list_users(MaxItems=3, Marker=page["Marker"])
        seen += [u["UserName"] for u in page["Users"]]
    assert seen == sorted(["admin", "alice", *names])
    assert {u["UserName"] for u in iam.list_users(PathPrefix="/team/")["Users"]} == set(names)
    assert {u["UserName"] for u in iam.list_users(PathPrefix="/te")["Users"]} == set(names)  # as IAM
    assert iam.list_users(PathPrefix="/teams")["Users"] == []
    assert refused(iam.list_users, PathPrefix="team/") == (400, "ValidationError")
    assert refused(iam.list_users, Marker="%%%") == (400, "ValidationError")

    # Errors on names.
    assert refused(iam.create_user, UserName="alice") == (409, "EntityAlreadyExists")
    assert refused(iam.create_user, UserName="ALICE") == (409, "EntityAlreadyExists")
    assert refused(iam.create_user, UserName="bad name!") == (400, "ValidationError")
    assert refused(iam.create_user, UserName="x" * 65) == (400, "ValidationError")
    assert refused(iam.create_user, UserName="ok", Path="nopath") == (400, "ValidationError")
    assert refused(iam.get_user, UserName="nobody") == (404, "NoSuchEntity")
    assert refused(iam.delete_user, UserName="nobody") == (404, "NoSuchEntity")
    assert refused(iam.delete_user, UserName="admin") == (409, "DeleteConflict")

    # Access keys.
    k1 = iam.create_access_key(UserName="alice")["AccessKey"]
    k2 = iam.create_access_key(UserName="alice")["AccessKey"]
    assert k1["Status"] == "Active" and len(k1["SecretAccessKey"]) == 40
    assert refused(iam.create_access_key, UserName="alice") == (409, "LimitExceeded")
    listed = iam.list_access_keys(UserName="alice")["AccessKeyMetadata"]
    assert {k["AccessKeyId"] for k in listed} == {k1["AccessKeyId"], k2["AccessKeyId"]}
    assert all("SecretAccessKey" not in k for k in listed)
    first = iam.list_access_keys(UserName="alice", MaxItems=1)  # paging
    assert first["IsTruncated"] and len(first["AccessKeyMetadata"]) == 1 and first["Marker"]
    rest = iam.list_access_keys(UserName="alice", MaxItems=1, Marker=first["Marker"])
    assert not rest["IsTruncated"] and len(rest["AccessKeyMetadata"]) == 1
    paged = [k["AccessKeyId"] for k in first["AccessKeyMetadata"] + rest["AccessKeyMetadata"]]
    assert paged == sorted(k["AccessKeyId"] for k in listed)
    assert refused(iam.delete_user, UserName="alice") == (409, "DeleteConflict")
    as_alice = client(url, k1["AccessKeyId"], k1["SecretAccessKey"])
    assert as_alice.get_user()["User"]["UserName"] == "alice"
    assert len(as_alice.list_access_keys()["AccessKeyMetadata"]) == 2
    assert refused(as_alice.list_users) == (403, "AccessDenied")
    assert refused(as_alice.create_user, UserName="mallory") == (403, "AccessDenied")
    assert refused(as_alice.get_user, UserName="admin") == (403, "AccessDenied")
    assert refused(
        iam.update_access_key, UserName="alice", AccessKeyId="AKIANOSUCHKEY00000000", Status="Active"
    ) == (
        404,
        "NoSuchEntity",
    )
    assert refused(iam.delete_access_key, UserName="user00", AccessKeyId=k1["AccessKeyId"]) == (
        404,
        "NoSuchEntity",
    )

    # Authentication errors.
    wrong_secret = client(url, k1["AccessKeyId"], "x" * 40)
    assert refused(wrong_secret.get_user) == (403, "SignatureDoesNotMatch")
    unknown = client(url, "AKIAUNKNOWNKEY000000", "x" * 40)
    assert refused(unknown.get_user) == (403, "InvalidClientTokenId")
    status, body = raw_post(url, b"Action=ListUsers&Version=2010-05-08", {})
    assert (
        status == 403
        and b"<Code>MissingAuthenticationToken</Code>" in body
        and b"<Type>Sender</Type>" in body
    )
    for skew, ok in (
        (dt.timedelta(minutes=-20), False),
        (dt.timedelta(minutes=20), False),
        (dt.timedelta(0), True),
    ):
        req = AWSRequest(
            method="POST",
            url=url + "/",
            data=b"Action=GetUser&Version=2010-05-08",
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        )
        SkewedSigV4(Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]), skew).add_auth(req)
        status, body = raw_post(url + "/", req.body, dict(req.headers.items()))
        if ok:
            assert status == 200 and b"<UserName>admin</UserName>" in body, body
        else:
            assert status == 400 and b"<Code>RequestExpired</Code>" in body, body
    presigned = iam.generate_presigned_url("list_users", Params={}, ExpiresIn=2)
    status, body = raw_post(presigned, b"", {})
    assert status == 200 and b"<UserName>alice</UserName>" in body, body
    wait_until(
        lambda: b"<Code>RequestExpired</Code>" in raw_post(presigned, b"", {})[1],
        what="presigned URL to expire",
    )
    status, body = raw_post(url + "/", b"Action=Frobnicate&Version=2010-05-08", {})
    assert status == 403  # unsigned first

    assert refused(iam.create_user, UserName="x", Path="/a") == (400, "ValidationError")

    # Inactive and deleted keys stop working within the documented bound (5 s): a wait with a
    # deadline of the bound plus slack, failing if the key still works by then.
    text = " ".join((Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text().split())
    assert f"stops working everywhere within {KEY_REVOCATION_BOUND:g} seconds" in text
    iam.update_access_key(UserName="alice", AccessKeyId=k1["AccessKeyId"], Status="Inactive")
    statuses = {
        k["AccessKeyId"]: k["Status"] for k in iam.list_access_keys(UserName="alice")["AccessKeyMetadata"]
    }
    assert statuses == {k1["AccessKeyId"]: "Inactive", k2["AccessKeyId"]: "Active"}, statuses

    def denied(c: Any) -> bool:
        try:
            c.get_user()
        except ClientError as exc:
            return code(exc) == (403, "InvalidClientTokenId")
        return False

    def works(c: Any) -> bool:
        try:
            return bool(c.get_user()["User"]["UserName"])
        except ClientError as exc:
            assert code(exc) == (403, "InvalidClientTokenId"), exc
            return False

    wait_until(lambda: denied(as_alice), timeout=REVOCATION_DEADLINE, what="the inactive key to be refused")
    iam.update_access_key(UserName="alice", AccessKeyId=k1["AccessKeyId"], Status="Active")
    assert {k["Status"] for k in iam.list_access_keys(UserName="alice")["AccessKeyMetadata"]} == {"Active"}
    wait_until(lambda: works(as_alice), timeout=REVOCATION_DEADLINE, what="the reactivated key to work")
    as_alice2 = client(url, k2["AccessKeyId"], k2["SecretAccessKey"])
    assert works(as_alice2)
    as_alice.delete_access_key(AccessKeyId=k2["AccessKeyId"])  # a user manages its own keys
    wait_until(lambda: denied(as_alice2), timeout=REVOCATION_DEADLINE, what="the deleted key to be refused")
    iam.delete_access_key(UserName="alice", AccessKeyId=k1["AccessKeyId"])
    iam.delete_user(UserName="alice")
    assert refused(iam.get_user, UserName="alice") == (404, "NoSuchEntity")
    iam.create_user(UserName="alice")  # the name is free again

    # The AWS CLI, with nothing but eucarc's environment.
    aws = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")
    assert aws, "the AWS CLI is not installed in the venv"
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    cli_env.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    cli_env["AWS_ENDPOINT_URL_IAM"] = url
    cli_env["AWS_CONFIG_FILE"] = cli_env["AWS_SHARED_CREDENTIALS_FILE"] = "/dev/null"
    out = subprocess.run(
        [aws, "iam", "create-user", "--user-name", "clibob", "--output", "json"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["User"]["UserName"] == "clibob"
    out = subprocess.run(
        [aws, "iam", "create-user", "--user-name", "clibob"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "EntityAlreadyExists" in out.stderr
    assert "clibob" in all_users(iam)

    # Secrets: never in a log, never in plaintext in a database file (HA: every node's files).
    k3 = iam.create_access_key(UserName="clibob")["AccessKey"]
    secrets = [
        env["AWS_SECRET_ACCESS_KEY"],
        k1["SecretAccessKey"],
        k2["SecretAccessKey"],
        k3["SecretAccessKey"],
    ]
    files = [p for p in cloud.root.rglob("*") if p.is_file() and p.name != "eucarc"]
    assert any(p.suffix == ".log" for p in files) and any(p.suffix == ".db" for p in files)
    for n in cloud.layout.nodes:  # the scan covers each node's log and its clc database
        assert cloud.layout.log_file(n) in files, n
    clc_dbs = [p for p in files if p.name.endswith(".clc.db")]
    assert len(clc_dbs) == (2 if api_target.ha else 1), clc_dbs
    for p in files:
        data = p.read_bytes()
        for s in secrets:
            assert s.encode() not in data, f"a secret access key appears in {p}"
    for n in cloud.layout.nodes:
        status, body = http("GET", f"{cloud.admin_url(n)}/v1/services", token=cloud.token)
        assert status == 200 and all(s.encode() not in body for s in secrets)


# --------------------------------------------------------------------------- HA


def _settled(cloud: Cloud) -> bool:
    s = {x["name"]: x for x in cloud.services()}
    return s["node-a.clc"]["state"] == "ENABLED" and s["node-b.clc"]["state"] == "DISABLED"


class UserWriter:
    """Threads creating unique users (then one key each) through given nodes; records outcomes."""

    def __init__(self, cloud: Cloud, nodes: list[str], prefix: str) -> None:
        env = eucarc(cloud)
        self.clients = [
            client(cloud.layout.nodes[n].api["iam"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
            for n in nodes
        ]
        self.prefix = prefix
        self.users: list[tuple[str, float]] = []  # acknowledged CreateUser, with send time
        self.keys: list[tuple[str, str, str]] = []  # acknowledged CreateAccessKey: user, id, secret
        self.refused: list[tuple[str, int, str]] = []  # definite 4xx answers
        self.unknown: list[tuple[str, str]] = []  # 5xx or no answer: may or may not have happened
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(nodes))
        ]

    def _run(self, idx: int) -> None:
        iam = self.clients[idx]
        i = 0
        while not self._stop.is_set():
            i += 1
            name = f"{self.prefix}-{idx}-{i}"
            sent = time.monotonic()
            try:
                iam.create_user(UserName=name)
            except ClientError as exc:
                self._outcome(name, exc)
                continue
            except BotoCoreError as exc:
                with self._lock:
                    self.unknown.append((name, repr(exc)))
                time.sleep(0.05)  # pacing while an endpoint is down, not synchronisation
                continue
            with self._lock:
                self.users.append((name, sent))
            try:
                key = iam.create_access_key(UserName=name)["AccessKey"]
            except ClientError as exc:
                self._outcome(name + "/key", exc)
                continue
            except BotoCoreError as exc:
                with self._lock:
                    self.unknown.append((name + "/key", repr(exc)))
                continue
            with self._lock:
                self.keys.append((name, key["AccessKeyId"], key["SecretAccessKey"]))

    def _outcome(self, what: str, exc: ClientError) -> None:
        status, err = code(exc)
        with self._lock:
            if status >= 500:
                self.unknown.append((what, err))
            else:
                self.refused.append((what, status, err))

    def __enter__(self) -> UserWriter:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def count(self) -> int:
        with self._lock:
            return len(self.users)

    def acked_after(self, t: float) -> bool:
        with self._lock:
            return any(sent > t for _, sent in self.users)

    def check(self, cloud: Cloud, via: str) -> None:
        """Every acknowledged user and key is on the primary (keys usable); nothing was refused,
        and no user or key exists that its client was not told about (a refused or never-made
        CreateAccessKey left no key; one whose answer was lost left at most one)."""
        iam = admin(cloud, via, attempts=5)
        present = all_users(iam)
        missing = [u for u, _ in self.users if u not in present]
        assert missing == [], f"acknowledged users lost: {missing[:10]}"
        unknown_users = {w for w, _ in self.unknown if "/" not in w}
        created = {u for u, _ in self.users}
        mine = {u for u in present if u.startswith(f"{self.prefix}-")}
        stray = mine - created - unknown_users
        assert stray == set(), f"users nobody was told about: {sorted(stray)[:10]}"
        acked_key = {user: key_id for user, key_id, _ in self.keys}
        unknown_key = {w.removesuffix("/key") for w, _ in self.unknown if w.endswith("/key")}
        for user in sorted(mine):
            ids = {k["AccessKeyId"] for k in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]}
            want = {acked_key[user]} if user in acked_key else set()
            assert want <= ids, f"acknowledged key {acked_key[user]} of {user} lost"
            extra = ids - want
            assert len(extra) <= (1 if user in unknown_key else 0), f"stray keys of {user}: {extra}"
        assert self.refused == [], self.refused[:5]
        url = cloud.layout.nodes[via].api["iam"]
        for user, key_id, secret in self.keys[-5:]:  # the secrets decrypt on the new primary
            assert client(url, key_id, secret, attempts=5).get_user()["User"]["UserName"] == user


@pytest.mark.parametrize("fault", ["kill9", "sigstop", "switchover"])
def test_iam_writes_survive_primary_failures(ha_cloud: Cloud, fault: str) -> None:
    cloud = ha_cloud
    env = eucarc(cloud)
    assert len(env["EUARE_URLS"].split()) == 2
    wait_until(lambda: _settled(cloud), what="HA settled")
    # Through the backup's process: forwarded to the primary.
    via_b = admin(cloud, "node-b")
    via_b.create_user(UserName="forwarded")
    assert admin(cloud, "node-a").get_user(UserName="forwarded")["User"]["UserName"] == "forwarded"
    pid = cloud.pid("node-a")
    nodes = ["node-b", "node-b"] if fault == "kill9" else ["node-a", "node-b", "node-b"]
    try:
        with UserWriter(cloud, nodes, fault) as writer:
            wait_until(lambda: writer.count() >= 15, what="users being created")
            t0 = time.monotonic()
            if fault == "kill9":
                os.kill(pid, signal.SIGKILL)
            elif fault == "sigstop":
                os.kill(pid, signal.SIGSTOP)
            else:
                proc = cloud.ctl("switchover", "clc", "--to", "node-b.clc")
                assert proc.returncode == 0, proc.stderr
            wait_until(
                lambda: cloud.enabled("clc", via="node-b") == "node-b.clc",
                timeout=30,
                what="node-b.clc ENABLED",
            )
            wait_until(lambda: writer.acked_after(t0), timeout=30, what="users created after the fault")
            if fault == "sigstop":
                os.kill(pid, signal.SIGCONT)
                wait_until(
                    lambda: cloud.service("node-a.clc", via="node-a")["state"] in ("DISABLED", "NOTREADY"),
                    what="the resumed primary to step down",
                )
            n = writer.count()
            wait_until(lambda: writer.count() >= n + 10, timeout=30, what="users created afterwards")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    writer.check(cloud, "node-b")
    print(
        f"{fault}: {len(writer.users)} users and {len(writer.keys)} keys acknowledged, "
        f"{len(writer.unknown)} unknown"
    )
    if fault == "switchover":
        assert writer.unknown == [], writer.unknown[:5]  # held and retried, never failed
    if fault != "kill9":
        wait_until(
            lambda: cloud.service("node-a.clc")["state"] == "DISABLED", timeout=30, what="node-a back in sync"
        )
        writer.check(cloud, "node-a")  # the same answer through the other process


# --------------------------------------------------------------------------- partition


def test_split_brain_delete_and_create_on_two_sides(ha_cloud: Cloud) -> None:
    """The seed's split-brain example, with a partition made of frozen processes.

    alice exists, bob does not. First the old primary node-a is cut off from everyone else
    (node-b and the arbitrator node-c are SIGSTOP-ed) and gets DeleteUser alice and CreateUser
    bob; then the other side (node-b, node-c resumed, node-a frozen) gets CreateUser alice and
    DeleteUser bob. The side without a majority must refuse with a retryable error (503) and
    never acknowledge; the other side answers from the state it has; after healing both
    processes agree, and the refused requests, retried, take effect in order.
    """
    cloud = ha_cloud
    wait_until(lambda: _settled(cloud), what="HA settled")
    via_a = admin(cloud, "node-a", read_timeout=90)
    via_b = admin(cloud, "node-b", read_timeout=90)
    via_a.create_user(UserName="alice")
    results: dict[str, Any] = {}

    def call(name: str, fn: Any, **kw: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn(**kw)
                results[name] = "ok"
            except ClientError as exc:
                results[name] = code(exc)
            except BotoCoreError as exc:
                results[name] = repr(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    pids = {n: cloud.pid(n) for n in ("node-a", "node-b", "node-c")}
    try:
        os.kill(pids["node-b"], signal.SIGSTOP)
        os.kill(pids["node-c"], signal.SIGSTOP)
        side_a = [
            call("a-delete-alice", via_a.delete_user, UserName="alice"),
            call("a-create-bob", via_a.create_user, UserName="bob"),
        ]
        for t in side_a:
            t.join(timeout=60)
        assert results == {
            "a-delete-alice": (503, "ServiceUnavailable"),
            "a-create-bob": (503, "ServiceUnavailable"),
        }
        os.kill(pids["node-a"], signal.SIGSTOP)
        os.kill(pids["node-b"], signal.SIGCONT)
        os.kill(pids["node-c"], signal.SIGCONT)
        side_b = [
            call("b-create-alice", via_b.create_user, UserName="alice"),
            call("b-delete-bob", via_b.delete_user, UserName="bob"),
        ]
        for t in side_b:
            t.join(timeout=60)
        assert results["b-create-alice"] == (409, "EntityAlreadyExists"), results
        assert results["b-delete-bob"] == (404, "NoSuchEntity"), results
        assert cloud.enabled("clc", via="node-b") == "node-b.clc"
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    # 503 is what botocore retries on its own (standard and legacy modes).
    from botocore.retries.standard import TransientRetryableChecker

    assert 503 in TransientRetryableChecker._TRANSIENT_STATUS_CODES  # type: ignore[attr-defined]
    wait_until(
        lambda: cloud.service("node-a.clc")["state"] == "DISABLED", timeout=30, what="node-a back in sync"
    )
    for iam in (via_a, via_b):
        users = all_users(iam)
        assert "alice" in users and "bob" not in users, users
    # The refused requests were safe to retry: now they take effect, in order.
    via_a.delete_user(UserName="alice")
    via_a.create_user(UserName="bob")
    assert {"alice", "bob"} & all_users(via_b) == {"bob"}


# --------------------------------------------------------------------------- retried deletes


def _iam_call(
    cloud: Cloud, via: str, action: str, params: dict[str, str], request_id: str
) -> tuple[int, Any]:
    """One ``iam.action`` bus call through `via`'s admin API, as the IAM front end makes it (the
    front end and the bus retry a request across a failover with the same request id)."""
    body = {
        "action": action,
        "params": params,
        "caller": {"account": "eucalyptus", "user": "admin"},
        "request_id": request_id,
    }
    doc = {"type": "clc", "method": "iam.action", "body": body, "timeout": 20}
    status, raw = http(
        "POST", f"{cloud.admin_url(via)}/v1/call", json.dumps(doc).encode(), cloud.token, timeout=30
    )
    return status, json.loads(raw)


def test_a_delete_retried_after_a_failover_gets_the_first_answer(ha_cloud: Cloud) -> None:
    """A DeleteUser that took effect on the old primary, retried (same request id) at the new
    one, answers as the first attempt did, not NoSuchEntity: the fault suite found exactly that
    (a delete applied and replicated, its answer lost with the paused primary, the retry told
    the client the user did not exist). A new request for the same name is still refused."""
    cloud = ha_cloud
    wait_until(lambda: _settled(cloud), what="HA settled")
    admin(cloud, "node-a").create_user(UserName="ghost")
    status, out = _iam_call(cloud, "node-a", "DeleteUser", {"UserName": "ghost"}, "req-ghost-1")
    assert status == 200, out
    os.kill(cloud.pid("node-a"), signal.SIGKILL)
    wait_until(
        lambda: cloud.enabled("clc", via="node-b") == "node-b.clc", timeout=30, what="node-b.clc ENABLED"
    )
    status, out = _iam_call(cloud, "node-b", "DeleteUser", {"UserName": "ghost"}, "req-ghost-1")
    assert status == 200, out
    status, out = _iam_call(cloud, "node-b", "DeleteUser", {"UserName": "ghost"}, "req-ghost-2")
    assert status != 200 and out.get("error") == "NoSuchEntity", out


def test_a_create_access_key_retried_after_the_key_was_deleted_answers_the_first_key(
    ha_cloud: Cloud,
) -> None:
    """A CreateAccessKey that took effect on the old primary, retried (same request id) at the
    new one after another request deleted that key, answered with a second key. The retry now
    answers as the first attempt did (the same AccessKeyId and secret, Active) and creates
    nothing, while the key exists, after it was deleted and after its user was deleted; a new
    request creates a new key."""
    cloud = ha_cloud
    wait_until(lambda: _settled(cloud), what="HA settled")
    status, out = _iam_call(cloud, "node-a", "CreateUser", {"UserName": "keyed"}, "req-keyed-u")
    assert status == 200, out
    status, first = _iam_call(cloud, "node-a", "CreateAccessKey", {"UserName": "keyed"}, "req-keyed-k")
    assert status == 200, first
    key = first["result"]["AccessKey"]
    url = cloud.layout.nodes["node-b"].api["iam"]
    assert client(url, key["AccessKeyId"], key["SecretAccessKey"]).get_user()["User"]["UserName"] == "keyed"
    os.kill(cloud.pid("node-a"), signal.SIGKILL)
    wait_until(lambda: cloud.enabled("clc", via="node-b") == "node-b.clc", timeout=30, what="failover")

    def retry() -> None:
        status, again = _iam_call(cloud, "node-b", "CreateAccessKey", {"UserName": "keyed"}, "req-keyed-k")
        assert status == 200 and json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True), again

    def key_ids() -> list[str]:
        status, out = _iam_call(
            cloud, "node-b", "ListAccessKeys", {"UserName": "keyed"}, f"req-l-{time.time()}"
        )
        assert status == 200, out
        return [k["AccessKeyId"] for k in out["result"]["AccessKeyMetadata"]]

    retry()  # the key is there: the same answer, no second key
    assert key_ids() == [key["AccessKeyId"]]
    params = {"UserName": "keyed", "AccessKeyId": key["AccessKeyId"]}
    status, out = _iam_call(cloud, "node-b", "DeleteAccessKey", params, "req-keyed-dk")
    assert status == 200, out
    retry()  # deleted by another request: still the first answer, and nothing created
    assert key_ids() == []
    status, other = _iam_call(cloud, "node-b", "CreateAccessKey", {"UserName": "keyed"}, "req-keyed-k2")
    assert status == 200 and other["result"]["AccessKey"]["AccessKeyId"] != key["AccessKeyId"], other
    params = {"UserName": "keyed", "AccessKeyId": other["result"]["AccessKey"]["AccessKeyId"]}
    status, out = _iam_call(cloud, "node-b", "DeleteAccessKey", params, "req-keyed-dk2")
    assert status == 200, out
    status, out = _iam_call(cloud, "node-b", "DeleteUser", {"UserName": "keyed"}, "req-keyed-du")
    assert status == 200, out
    retry()  # the user is gone too: the first answer, no NoSuchEntity, no user made
    status, out = _iam_call(cloud, "node-b", "GetUser", {"UserName": "keyed"}, "req-keyed-g")
    assert status != 200 and out.get("error") == "NoSuchEntity", out


def test_a_create_retried_after_the_user_was_deleted_does_not_create_it_again(ha_cloud: Cloud) -> None:
    """The fault suite's create/delete race on one name: a CreateUser whose first attempt took
    effect (and was then deleted by another client) was retried by the bus with the same
    request id and created the user a second time, so two creates by other clients were told
    EntityAlreadyExists after the delete had succeeded. The retry now answers as the first
    attempt did, with the same UserId, and creates nothing; a new request creates the user."""
    cloud = ha_cloud
    wait_until(lambda: _settled(cloud), what="HA settled")
    status, first = _iam_call(cloud, "node-b", "CreateUser", {"UserName": "phoenix"}, "req-phoenix-c")
    assert status == 200, first
    status, out = _iam_call(cloud, "node-a", "DeleteUser", {"UserName": "phoenix"}, "req-phoenix-d")
    assert status == 200, out
    status, again = _iam_call(cloud, "node-b", "CreateUser", {"UserName": "phoenix"}, "req-phoenix-c")
    assert status == 200, again
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)
    status, out = _iam_call(cloud, "node-a", "GetUser", {"UserName": "phoenix"}, "req-phoenix-g")
    assert status != 200 and out.get("error") == "NoSuchEntity", out
    # Someone else creates the name now: the old request's retry still answers as it first did.
    status, other = _iam_call(cloud, "node-a", "CreateUser", {"UserName": "phoenix"}, "req-phoenix-c2")
    assert status == 200 and other != first, other
    status, again = _iam_call(cloud, "node-b", "CreateUser", {"UserName": "phoenix"}, "req-phoenix-c")
    assert status == 200 and json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True), again
    status, out = _iam_call(cloud, "node-a", "GetUser", {"UserName": "phoenix"}, "req-phoenix-g2")
    assert status == 200 and json.dumps(out, sort_keys=True) == json.dumps(other, sort_keys=True), out
    status, out = _iam_call(cloud, "node-a", "DeleteUser", {"UserName": "phoenix"}, "req-phoenix-d2")
    assert status == 200, out
