"""Filling a deployed cloud through its user APIs, as any client would: IAM CreateUser and S3
PutObject with boto3 from parallel threads (each with its own client), and the store size
actually reached, read back with ListUsers and ListObjectsV2.

Used by the benchmarks that need a store of a given size on testbed hosts (add_backup,
recovery). Every loop is bounded by its count; clients retry (boto3 standard mode, 5 attempts),
and a retried create that finds its user already there counts as created.

`Traffic` is the load that runs while the benchmark measures: the fault suite's S3 and IAM
clients (faults/workloads.py: retries off, every request one entry in a history), bounded by an
operation count and a deadline.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from faults.history import OK, History, Op
from faults.workloads import Client, Endpoints, IAMClient, S3Client, prepare

MiB = 1024 * 1024
GiB = 1024 * MiB


def client(endpoints: Endpoints, service: str, url: str, read_timeout: float = 120.0) -> Any:
    """A boto3 client for one URL with the eucarc's keys: standard retries (6 attempts), a
    generous read timeout (a loaded machine, large objects)."""
    return endpoints.client(service, url, read_timeout=read_timeout, attempts=6, connect_timeout=5)


def object_bytes(index: int, size: int) -> bytes:
    """The bytes of object `index`: deterministic, incompressible."""
    return random.Random(index).randbytes(size)


class _Errors:
    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []
        self._lock = threading.Lock()

    def add(self, what: str) -> None:
        with self._lock:
            self.count += 1
            if len(self.first) < 5:
                self.first.append(what[:300])


def _parallel(count: int, threads: int, make: Callable[[int], Any], one: Callable[[Any, int], None]) -> None:
    """Items 0..count-1 shared by `threads` workers; worker w uses the client `make(w)`."""
    lock = threading.Lock()
    items = iter(range(count))

    def worker(w: int) -> None:
        c = make(w)
        while True:
            with lock:
                i = next(items, None)
            if i is None:
                return
            one(c, i)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for f in [pool.submit(worker, w) for w in range(threads)]:
            f.result()


def fill_users(endpoints: Endpoints, prefix: str, count: int, threads: int = 8) -> dict[str, Any]:
    """IAM CreateUser of `prefix`00000.. (count of them), spread over the IAM URLs."""
    errors = _Errors()
    urls = endpoints.iam

    def one(iam: Any, i: int) -> None:
        name = f"{prefix}{i:05d}"
        try:
            iam.create_user(UserName=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "EntityAlreadyExists":  # a retried create
                errors.add(f"{name}: {exc}")
        except (BotoCoreError, OSError) as exc:
            errors.add(f"{name}: {type(exc).__name__}: {exc}")

    t0 = time.monotonic()
    _parallel(count, threads, lambda w: client(endpoints, "iam", urls[w % len(urls)]), one)
    return {"seconds": round(time.monotonic() - t0, 1), "errors": errors.count, "first_errors": errors.first}


def create_bucket(endpoints: Endpoints, bucket: str, timeout: float = 120.0) -> None:
    s3 = client(endpoints, "s3", endpoints.s3[0])
    deadline = time.monotonic() + timeout
    while True:
        try:
            s3.create_bucket(Bucket=bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("BucketAlreadyOwnedByYou",):
                return
            if time.monotonic() > deadline:
                raise
        except (BotoCoreError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def fill_objects(
    endpoints: Endpoints, bucket: str, count: int, size: int, threads: int = 4
) -> dict[str, Any]:
    """`count` objects of `size` bytes (obj00000..) into `bucket` (created first), spread over the
    S3 URLs."""
    create_bucket(endpoints, bucket)
    errors = _Errors()
    urls = endpoints.s3

    def one(s3: Any, i: int) -> None:
        key = f"obj{i:05d}"
        try:
            s3.put_object(Bucket=bucket, Key=key, Body=object_bytes(i, size))
        except (ClientError, BotoCoreError, OSError) as exc:
            errors.add(f"{key}: {type(exc).__name__}: {exc}")

    t0 = time.monotonic()
    _parallel(count, threads, lambda w: client(endpoints, "s3", urls[w % len(urls)]), one)
    took = time.monotonic() - t0
    return {
        "seconds": round(took, 1),
        "mib_per_s": round(count * size / MiB / took, 1) if took > 0 else None,
        "errors": errors.count,
        "first_errors": errors.first,
    }


def store_size(endpoints: Endpoints, prefix: str, bucket: str) -> dict[str, int]:
    """What the cloud holds: users named `prefix`..., objects and bytes in `bucket`."""
    iam = client(endpoints, "iam", endpoints.iam[0])
    users = 0
    for page in iam.get_paginator("list_users").paginate():
        users += sum(1 for u in page.get("Users", []) if str(u["UserName"]).startswith(prefix))
    s3 = client(endpoints, "s3", endpoints.s3[0])
    objects = size = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            objects += 1
            size += int(o["Size"])
    return {"users": users, "objects": objects, "bytes": size}


def fill(
    endpoints: Endpoints, prefix: str, bucket: str, users: int, objects: int, object_size: int
) -> dict[str, Any]:
    """Users, then objects; the time and errors of each and the size read back."""
    u = fill_users(endpoints, prefix, users)
    o = fill_objects(endpoints, bucket, objects, object_size)
    return {
        "target": {
            "users": users,
            "objects": objects,
            "object_bytes": object_size,
            "bytes": objects * object_size,
        },
        "users": u,
        "objects": o,
        "reached": store_size(endpoints, prefix, bucket),
    }


class Traffic:
    """One S3 client (puts, reads, deletes of its own objects) and one IAM client (creates and
    deletes its own users) of the fault suite, writing through every URL of the eucarc until
    stopped, `seconds` have passed or each made `limit` requests."""

    def __init__(self, endpoints: Endpoints, tag: str, seconds: float, limit: int = 100_000) -> None:
        self.history = History()
        prepare(endpoints, tag)  # the S3 client's bucket
        deadline = self.history.now() + seconds
        self.clients: list[Client] = [
            cls(0, self.history, endpoints, 1, deadline, limit, tag) for cls in (S3Client, IAMClient)
        ]

    def start(self) -> None:
        for c in self.clients:
            c.start()

    def __enter__(self) -> Traffic:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for c in self.clients:
            c.stop()
        for c in self.clients:
            c.join(timeout=60)

    def ops(self, start: float = 0.0, end: float = float("inf")) -> list[Op]:
        """Client requests invoked in [start, end) on the history clock (not the nemesis entries
        a benchmark may add to the same history)."""
        mine = {c.process for c in self.clients}
        return [o for o in self.history.snapshot() if o.process in mine and start <= o.invoke < end]

    def summary(self, start: float = 0.0, end: float = float("inf")) -> dict[str, Any]:
        """Requests made in the window: how many succeeded, how many did not (the first few)."""
        ops = self.ops(start, end)
        bad = [o for o in ops if o.result != OK]
        crashed = [f"{c.process}: {c.crashed}" for c in self.clients if c.crashed]
        return {
            "ok": len(ops) - len(bad),
            "errors": len(bad),
            "first_errors": [f"{o.f} {o.key} at {o.invoke:.1f} s: {o.result} {o.error}" for o in bad[:5]],
            **({"crashed": crashed} if crashed else {}),
        }
