"""Workload generators: boto3 clients against the deployed cloud's endpoints (from its eucarc).

Every client is a thread with its own boto3 client(s), retries off (each attempt is one entry in
the history, its outcome classified here), short timeouts, and two bounds: a deadline and a
maximum number of operations. Clients spread their requests over every URL the eucarc lists for
the API (any of them serves: it forwards to the ENABLED instance).

Classification (`classify`): a ClientError with a 4xx status is a definite refusal (``failed``,
its AWS code kept); a 5xx answer, a timeout or a connection error is ``unknown``.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from euca_runtime.local import read_eucarc
from faults.checkers import EC2_RUN, EC2_TERMINATE, IAM_CREATE, IAM_DELETE, S3_DELETE, S3_GET, S3_PUT
from faults.history import FAILED, OK, UNKNOWN, History, Result

log = logging.getLogger("faults.workloads")

IMAGE_ID = "emi-00000001"  # the image every cloud registers at first boot (services/ec2.py)
USER_PREFIX = "flt"  # every IAM user the suite makes starts with this (then the run's tag)


def bucket_name(tag: str) -> str:
    """The S3 bucket of the run tagged `tag` (each run has its own bucket and user names, so runs
    that share one cloud do not see each other's data)."""
    return f"faults-{tag}"


def user_prefix(tag: str) -> str:
    return f"{USER_PREFIX}{tag}"


@dataclass(frozen=True)
class Endpoints:
    """How to reach the cloud: URLs per API and the admin's keys (from an eucarc)."""

    iam: list[str]
    s3: list[str]
    ec2: list[str]
    access_key: str
    secret_key: str
    region: str

    @classmethod
    def from_eucarc(cls, path: Path, ec2: list[str] | None = None) -> Endpoints:
        """`ec2`: the EC2 URLs (a deployed cloud's eucarc names none; EC2 is served on every clc
        host's own address, not on the IAM VIP). Default: the eucarc's EC2_URLS, or else the
        IAM URLs with port 8774."""
        env = read_eucarc(path)
        iam = env["EUARE_URLS"].split()
        if ec2 is None:
            ec2 = env.get("EC2_URLS", "").split() or [re.sub(r":\d+$", ":8774", u) for u in iam]
        return cls(
            iam=iam,
            s3=env["S3_URLS"].split(),
            ec2=ec2,
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            region=env.get("AWS_DEFAULT_REGION", "eucalyptus"),
        )

    def client(
        self,
        service: str,
        url: str,
        read_timeout: float = 10.0,
        attempts: int = 1,
        connect_timeout: float = 2.0,
    ) -> Any:
        """A boto3 client for one URL with the eucarc's keys, path-style S3. The fault suite's
        default is one attempt (every try is one history entry); a filler may retry."""
        cfg = Config(
            retries={"total_max_attempts": attempts, "mode": "standard"},  # type: ignore[typeddict-unknown-key]
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": "path"},
        )
        return boto3.session.Session().client(
            service,  # type: ignore[call-overload]
            endpoint_url=url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=cfg,
        )


def classify(exc: BaseException) -> tuple[Result, str | None, str]:
    """(result, AWS error code or None, message) for an exception a boto3 call raised."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(err.get("Code") or status)
        result: Result = FAILED if 400 <= status < 500 else UNKNOWN
        return result, code, str(err.get("Message") or exc)[:200]
    return UNKNOWN, None, f"{type(exc).__name__}: {exc}"[:200]


def known_bytes(key: str, seed: int) -> bytes:
    """The bytes put under `key`: deterministic, 64 B to 8 KiB."""
    rnd = random.Random(f"{seed}/{key}")
    return rnd.randbytes(rnd.randint(64, 8192))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Client(threading.Thread):
    """A bounded loop of operations; subclasses implement `step`."""

    kind = "client"

    def __init__(
        self,
        idx: int,
        history: History,
        endpoints: Endpoints,
        seed: int,
        deadline: float,
        limit: int,
        tag: str,
    ) -> None:
        super().__init__(daemon=True, name=f"{self.kind}-{idx}")
        self.tag, self.bucket, self.prefix = tag, bucket_name(tag), user_prefix(tag)
        self.process = f"{self.kind}-{idx}"
        self.history, self.endpoints = history, endpoints
        self.rnd = random.Random(f"{seed}/{self.process}")
        self.seed = seed
        self.deadline, self.limit = deadline, limit
        self.stop_event = threading.Event()
        self.n = 0
        self.crashed: str | None = None

    def step(self) -> None:
        raise NotImplementedError

    def call(self, f: str, key: str | None, value: str | None, fn: Callable[[], Any], **extra: Any) -> Any:
        """Run one request; record it. Returns fn's result, or None when it did not succeed."""
        t0 = self.history.now()
        try:
            out = fn()
        except (ClientError, BotoCoreError, OSError) as exc:
            result, code, msg = classify(exc)
            self.history.record(self.process, f, key, value, t0, result, msg, code=code, **extra)
            return None
        self.history.record(self.process, f, key, value, t0, OK, **extra)
        return out

    def run(self) -> None:
        try:
            while not self.stop_event.is_set() and self.n < self.limit and self.history.now() < self.deadline:
                self.step()
                self.n += 1
                self.stop_event.wait(self.rnd.uniform(0.0, 0.05))
        except Exception as exc:
            self.crashed = f"{type(exc).__name__}: {exc}"
            log.exception("client crashed", extra={"process": self.process})

    def stop(self) -> None:
        self.stop_event.set()


class S3Client(Client):
    """Puts objects of known bytes under unique keys, reads and deletes some of its own."""

    kind = "s3"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.clients = {u: self.endpoints.client("s3", u) for u in self.endpoints.s3}
        self.mine: list[str] = []

    def pick(self) -> Any:
        return self.clients[self.rnd.choice(sorted(self.clients))]

    def step(self) -> None:
        roll = self.rnd.random()
        s3 = self.pick()
        if roll < 0.25 and self.mine:
            key = self.rnd.choice(self.mine)
            self.read(s3, key)
        elif roll < 0.35 and self.mine:
            key = self.mine.pop(self.rnd.randrange(len(self.mine)))
            self.call(S3_DELETE, key, None, lambda: s3.delete_object(Bucket=self.bucket, Key=key))
        else:
            key = f"{self.process}-{self.n:05d}"
            data = known_bytes(key, self.seed)
            if self.call(
                S3_PUT, key, sha(data), lambda: s3.put_object(Bucket=self.bucket, Key=key, Body=data)
            ):
                self.mine.append(key)

    def read(self, s3: Any, key: str) -> None:
        t0 = self.history.now()
        try:
            body = s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            result, code, msg = classify(exc)
            if code == "NoSuchKey":  # a definite answer: the key is not there
                self.history.record(self.process, S3_GET, key, None, t0, OK, code=code)
            else:
                self.history.record(self.process, S3_GET, key, None, t0, result, msg, code=code)
            return
        except (BotoCoreError, OSError) as exc:
            result, code, msg = classify(exc)
            self.history.record(self.process, S3_GET, key, None, t0, result, msg, code=code)
            return
        self.history.record(self.process, S3_GET, key, sha(body), t0, OK)


class IAMClient(Client):
    """Creates users with unique names and deletes some of them again."""

    kind = "iam"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.clients = {u: self.endpoints.client("iam", u) for u in self.endpoints.iam}
        self.mine: list[str] = []

    def pick(self) -> Any:
        return self.clients[self.rnd.choice(sorted(self.clients))]

    def step(self) -> None:
        iam = self.pick()
        if self.mine and self.rnd.random() < 0.3:
            name = self.mine.pop(self.rnd.randrange(len(self.mine)))
            self.call(IAM_DELETE, name, None, lambda: iam.delete_user(UserName=name))
            return
        name = f"{self.prefix}{self.process.replace('-', '')}x{self.n:05d}"
        if self.call(IAM_CREATE, name, None, lambda: iam.create_user(UserName=name)):
            self.mine.append(name)


class IAMRaceClient(Client):
    """The seed's split-brain example: several of these create and delete the same names.

    Client i alternates create and delete of ``flt<tag>race<r>`` and moves to the next name every
    `per_name` operations, so each name sees a few concurrent creates and deletes from every
    race client (the checker searches their linearizations: keep it small)."""

    kind = "race"
    per_name = 6

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.clients = {u: self.endpoints.client("iam", u) for u in self.endpoints.iam}

    def step(self) -> None:
        iam = self.clients[self.rnd.choice(sorted(self.clients))]
        name = f"{self.prefix}race{self.n // self.per_name:04d}"
        if self.rnd.random() < 0.5:
            self.call(IAM_CREATE, name, None, lambda: iam.create_user(UserName=name))
        else:
            self.call(IAM_DELETE, name, None, lambda: iam.delete_user(UserName=name))


class EC2Client(Client):
    """Runs instances one at a time and terminates them again (keeps at most two running)."""

    kind = "ec2"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.clients = {u: self.endpoints.client("ec2", u, read_timeout=20) for u in self.endpoints.ec2}
        self.mine: list[str] = []

    def step(self) -> None:
        ec2 = self.clients[self.rnd.choice(sorted(self.clients))]
        if len(self.mine) >= 2 or (self.mine and self.rnd.random() < 0.4):
            iid = self.mine.pop(0)
            self.call(EC2_TERMINATE, iid, None, lambda: ec2.terminate_instances(InstanceIds=[iid]))
            return
        t0 = self.history.now()
        try:
            out = ec2.run_instances(ImageId=IMAGE_ID, MinCount=1, MaxCount=1, InstanceType="t1.micro")
        except (ClientError, BotoCoreError, OSError) as exc:
            result, code, msg = classify(exc)
            self.history.record(self.process, EC2_RUN, None, None, t0, result, msg, code=code)
            self.stop_event.wait(1.0)  # e.g. InsufficientInstanceCapacity: the NC is full for now
            return
        iid = str(out["Instances"][0]["InstanceId"])
        self.history.record(self.process, EC2_RUN, iid, iid, t0, OK)
        self.mine.append(iid)
        # Slow down: each instance is a process on the NC host.
        self.stop_event.wait(0.5)


@dataclass
class Mix:
    """How many clients of each kind, and each one's operation limit."""

    s3: int = 2
    iam: int = 1
    race: int = 2
    ec2: int = 1
    limit: int = 400

    def clients(
        self, history: History, endpoints: Endpoints, seed: int, deadline: float, tag: str
    ) -> list[Client]:
        out: list[Client] = []
        kinds: Iterable[tuple[type[Client], int]] = (
            (S3Client, self.s3),
            (IAMClient, self.iam),
            (IAMRaceClient, self.race),
            (EC2Client, self.ec2),
        )
        for cls, count in kinds:
            out += [cls(i, history, endpoints, seed, deadline, self.limit, tag) for i in range(count)]
        return out


def prepare(endpoints: Endpoints, tag: str, deadline_s: float = 120.0) -> None:
    """Create the run's bucket (retrying until the cloud answers, before any fault)."""
    s3 = endpoints.client("s3", endpoints.s3[0])
    end = time.monotonic() + deadline_s
    while True:
        try:
            s3.create_bucket(Bucket=bucket_name(tag))
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                return
            if time.monotonic() > end:
                raise
        except (BotoCoreError, OSError):
            if time.monotonic() > end:
                raise
        time.sleep(1)
