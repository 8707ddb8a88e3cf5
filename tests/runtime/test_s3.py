"""Walrus (S3) against real runtime processes, with unmodified boto3 and the AWS CLI.

`up` (single) and `up --ha`: every operation, the error cases a client expects, the AWS CLI,
a large object streamed in and out with the serving processes' memory measured, and HA:
concurrent writers while the primary is killed (-9), frozen past its lease and switched over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from runtime_harness import REVOCATION_DEADLINE, ApiTarget, Cloud, SkewedS3SigV4, eucarc, run_cli, wait_until

AWS = str(Path(sys.executable).parent / "aws")
MiB = 1024 * 1024


def client(
    cloud: Cloud,
    node: str | None = None,
    *,
    attempts: int = 3,
    secret: str | None = None,
    key: str | None = None,
) -> Any:
    env = eucarc(cloud)
    url = cloud.layout.nodes[node].api["s3"] if node else env["S3_URL"]
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=key or env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret or env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": attempts, "mode": "standard"},
            read_timeout=120,
            connect_timeout=5,
        ),
    )


def code(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def body_for(key: str, size: int) -> bytes:
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


# --------------------------------------------------------------------------- single cloud


def _blob_files(cloud: Cloud) -> set[Path]:
    """Every file under every node's walrus directory (blobs and staging files)."""
    return {p for p in cloud.root.glob("node-*/walrus/**/*") if p.is_file()}


def test_s3_operations_and_errors(api_target: ApiTarget) -> None:
    cloud = api_target.cloud
    s3 = client(cloud, api_target.node)
    files_before = _blob_files(cloud)
    buckets_before = [b["Name"] for b in s3.list_buckets()["Buckets"]]  # other tests' (shared cloud)
    assert "photos" not in buckets_before
    s3.create_bucket(Bucket="photos")
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket="photos")
    assert code(e.value) == "BucketAlreadyOwnedByYou"
    for bad in ("ab", "Upper", "has_underscore", "-dash", "a..b", "192.168.1.1"):
        with pytest.raises(ClientError) as e:
            s3.create_bucket(Bucket=bad)
        assert code(e.value) == "InvalidBucketName", bad
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == sorted([*buckets_before, "photos"])
    s3.head_bucket(Bucket="photos")
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket="missing-bucket")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    # Put / get / head, metadata, content type, ranges, ETag = MD5.
    data = os.urandom(3000)
    r = s3.put_object(
        Bucket="photos", Key="dir/a.bin", Body=data, Metadata={"Color": "red"}, ContentType="x/y"
    )
    assert r["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    got = s3.get_object(Bucket="photos", Key="dir/a.bin")
    assert got["Body"].read() == data
    assert got["Metadata"] == {"color": "red"} and got["ContentType"] == "x/y"
    assert s3.get_object(Bucket="photos", Key="dir/a.bin", Range="bytes=10-19")["Body"].read() == data[10:20]
    assert s3.get_object(Bucket="photos", Key="dir/a.bin", Range="bytes=-5")["Body"].read() == data[-5:]
    assert s3.get_object(Bucket="photos", Key="dir/a.bin", Range="bytes=2990-")["Body"].read() == data[2990:]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="photos", Key="dir/a.bin", Range="bytes=5000-6000")
    assert code(e.value) == "InvalidRange"
    head = s3.head_object(Bucket="photos", Key="dir/a.bin")
    assert head["ContentLength"] == 3000 and head["Metadata"] == {"color": "red"}

    # A streamed object (several bus chunks) with a range across chunk boundaries.
    big = os.urandom(3 * MiB + 123)
    r = s3.put_object(Bucket="photos", Key="big", Body=big)
    assert r["ETag"] == f'"{hashlib.md5(big).hexdigest()}"'
    assert s3.get_object(Bucket="photos", Key="big")["Body"].read() == big
    part = s3.get_object(Bucket="photos", Key="big", Range=f"bytes={MiB - 10}-{2 * MiB + 10}")["Body"].read()
    assert part == big[MiB - 10 : 2 * MiB + 11]

    # Content-MD5 checked.
    import base64

    good_md5 = base64.b64encode(hashlib.md5(b"abc").digest()).decode()
    s3.put_object(Bucket="photos", Key="md5ok", Body=b"abc", ContentMD5=good_md5)
    wrong = base64.b64encode(hashlib.md5(b"xyz").digest()).decode()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="photos", Key="md5bad", Body=b"abc", ContentMD5=wrong)
    assert code(e.value) == "BadDigest"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="photos", Key="md5bad", Body=b"abc", ContentMD5="not-base64!")
    assert code(e.value) == "InvalidDigest"
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket="photos", Key="md5bad")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

    # Missing bucket / object.
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="photos", Key="nope")
    assert code(e.value) == "NoSuchKey"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="no-such-bucket", Key="k", Body=b"x")
    assert code(e.value) == "NoSuchBucket"
    with pytest.raises(ClientError) as e:
        s3.list_objects_v2(Bucket="no-such-bucket")
    assert code(e.value) == "NoSuchBucket"

    # Copy (metadata copied or replaced); from a missing source: NoSuchKey.
    with pytest.raises(ClientError) as e:
        s3.copy_object(Bucket="photos", Key="copy", CopySource={"Bucket": "photos", "Key": "nope"})
    assert code(e.value) == "NoSuchKey" and e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    r = s3.copy_object(Bucket="photos", Key="copy", CopySource={"Bucket": "photos", "Key": "dir/a.bin"})
    assert r["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert s3.get_object(Bucket="photos", Key="copy")["Body"].read() == data
    assert s3.head_object(Bucket="photos", Key="copy")["Metadata"] == {"color": "red"}
    s3.copy_object(
        Bucket="photos",
        Key="copy2",
        CopySource="photos/dir/a.bin",
        Metadata={"k": "v"},
        MetadataDirective="REPLACE",
    )
    assert s3.head_object(Bucket="photos", Key="copy2")["Metadata"] == {"k": "v"}
    s3.delete_object(Bucket="photos", Key="dir/a.bin")  # the copies keep the shared bytes
    assert s3.get_object(Bucket="photos", Key="copy")["Body"].read() == data

    # Listing: prefix, delimiter, continuation tokens, max-keys.
    keys = [f"logs/2024/{i:03d}" for i in range(25)] + ["logs/2025/x", "logs/readme", "top"]
    for k in keys:
        s3.put_object(Bucket="photos", Key=k, Body=k.encode())
    page = s3.list_objects_v2(Bucket="photos", Prefix="logs/", Delimiter="/")
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == ["logs/2024/", "logs/2025/"]
    assert [c["Key"] for c in page["Contents"]] == ["logs/readme"]
    seen, token, pages = [], None, 0
    while True:
        kw: dict[str, Any] = {"Bucket": "photos", "Prefix": "logs/2024/", "MaxKeys": 7}
        if token:
            kw["ContinuationToken"] = token
        page = s3.list_objects_v2(**kw)
        pages += 1
        seen += [c["Key"] for c in page.get("Contents", [])]
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert seen == sorted(k for k in keys if k.startswith("logs/2024/")) and pages == 4
    after = s3.list_objects_v2(Bucket="photos", Prefix="logs/", StartAfter="logs/2024/021")
    assert [c["Key"] for c in after["Contents"]] == [
        "logs/2024/022",
        "logs/2024/023",
        "logs/2024/024",
        "logs/2025/x",
        "logs/readme",
    ]
    everything = [
        c["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="photos") for c in p["Contents"]
    ]
    assert everything == sorted(everything) and set(keys) <= set(everything)

    # DeleteObjects; DeleteBucket refuses a non-empty bucket.
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket="photos")
    assert code(e.value) == "BucketNotEmpty"
    quiet = [k for k in everything if k.startswith("logs/2024/")]
    res = s3.delete_objects(
        Bucket="photos", Delete={"Objects": [{"Key": k} for k in quiet] + [{"Key": "never"}], "Quiet": True}
    )
    assert "Deleted" not in res and "Errors" not in res, res  # Quiet: only errors are reported
    rest = [c["Key"] for c in s3.list_objects_v2(Bucket="photos")["Contents"]]
    assert rest == [k for k in everything if k not in quiet]
    res = s3.delete_objects(Bucket="photos", Delete={"Objects": [{"Key": k} for k in rest]})
    assert sorted(d["Key"] for d in res["Deleted"]) == sorted(rest)
    assert s3.list_objects_v2(Bucket="photos")["KeyCount"] == 0
    s3.delete_bucket(Bucket="photos")
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == buckets_before
    # Every blob file this test made (on every replica) is gone once nothing refers to it.
    wait_until(lambda: not _blob_files(cloud) - files_before, what="blob files removed")


def test_multipart_upload(api_target: ApiTarget, tmp_path: Path) -> None:
    s3 = client(api_target.cloud, api_target.node)
    s3.create_bucket(Bucket="mpu")
    up = s3.create_multipart_upload(Bucket="mpu", Key="movie", Metadata={"a": "b"}, ContentType="video/x")
    uid = up["UploadId"]
    p1, p2, p3 = os.urandom(5 * MiB), os.urandom(5 * MiB + 1), b"tail bytes"
    e1 = s3.upload_part(Bucket="mpu", Key="movie", UploadId=uid, PartNumber=1, Body=p1)["ETag"]
    s3.upload_part(Bucket="mpu", Key="movie", UploadId=uid, PartNumber=2, Body=b"replaced below")
    e2 = s3.upload_part(Bucket="mpu", Key="movie", UploadId=uid, PartNumber=2, Body=p2)["ETag"]
    e3 = s3.upload_part(Bucket="mpu", Key="movie", UploadId=uid, PartNumber=3, Body=p3)["ETag"]
    parts = s3.list_parts(Bucket="mpu", Key="movie", UploadId=uid)["Parts"]
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in parts] == [
        (1, e1, len(p1)),
        (2, e2, len(p2)),
        (3, e3, len(p3)),
    ]
    # ListParts paging: max-parts and part-number-marker.
    first = s3.list_parts(Bucket="mpu", Key="movie", UploadId=uid, MaxParts=2)
    assert [p["PartNumber"] for p in first["Parts"]] == [1, 2]
    assert first["IsTruncated"] and first["NextPartNumberMarker"] == 2 and first["MaxParts"] == 2
    marker = first["NextPartNumberMarker"]
    rest = s3.list_parts(Bucket="mpu", Key="movie", UploadId=uid, PartNumberMarker=marker)
    assert [p["PartNumber"] for p in rest["Parts"]] == [3] and not rest["IsTruncated"]
    assert rest["PartNumberMarker"] == 2
    with pytest.raises(ClientError) as e:  # out of order
        s3.complete_multipart_upload(
            Bucket="mpu",
            Key="movie",
            UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": e2}, {"PartNumber": 1, "ETag": e1}]},
        )
    assert code(e.value) == "InvalidPartOrder"
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket="mpu",
            Key="movie",
            UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e2}]},
        )
    assert code(e.value) == "InvalidPart"
    res = s3.complete_multipart_upload(
        Bucket="mpu",
        Key="movie",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": t} for n, t in ((1, e1), (2, e2), (3, e3))]},
    )
    md5s = b"".join(hashlib.md5(p).digest() for p in (p1, p2, p3))
    assert res["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-3"'
    got = s3.get_object(Bucket="mpu", Key="movie")
    assert got["Body"].read() == p1 + p2 + p3 and got["Metadata"] == {"a": "b"}
    start = 5 * MiB - 3
    ranged = s3.get_object(Bucket="mpu", Key="movie", Range=f"bytes={start}-{start + 9}")["Body"].read()
    assert ranged == (p1 + p2)[start : start + 10]
    with pytest.raises(ClientError) as e:
        s3.list_parts(Bucket="mpu", Key="movie", UploadId=uid)
    assert code(e.value) == "NoSuchUpload"
    # Too-small non-last parts are refused; an aborted upload is gone.
    uid2 = s3.create_multipart_upload(Bucket="mpu", Key="small")["UploadId"]
    t1 = s3.upload_part(Bucket="mpu", Key="small", UploadId=uid2, PartNumber=1, Body=b"x")["ETag"]
    t2 = s3.upload_part(Bucket="mpu", Key="small", UploadId=uid2, PartNumber=2, Body=b"y")["ETag"]
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket="mpu",
            Key="small",
            UploadId=uid2,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": t1}, {"PartNumber": 2, "ETag": t2}]},
        )
    assert code(e.value) == "EntityTooSmall"
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket="mpu")
    assert code(e.value) == "BucketNotEmpty"
    s3.abort_multipart_upload(Bucket="mpu", Key="small", UploadId=uid2)
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket="mpu", Key="small", UploadId=uid2, PartNumber=3, Body=b"z")
    assert code(e.value) == "NoSuchUpload"
    # boto3's managed transfer (multipart with 5 MiB parts, threads) round-trips.
    from boto3.s3.transfer import TransferConfig

    src = tmp_path / "upload.bin"
    src.write_bytes(os.urandom(12 * MiB + 5))
    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    s3.upload_file(str(src), "mpu", "managed", Config=cfg)
    dst = tmp_path / "download.bin"
    s3.download_file("mpu", "managed", str(dst), Config=cfg)
    assert dst.read_bytes() == src.read_bytes()


def test_authentication_errors(api_target: ApiTarget) -> None:
    cloud, node = api_target.cloud, api_target.node
    env = {**eucarc(cloud), "S3_URL": cloud.layout.nodes[node].api["s3"]}
    good = client(cloud, node)
    good.create_bucket(Bucket="auth-test")
    bad_secret = client(cloud, node, secret="x" * 40, attempts=1)
    with pytest.raises(ClientError) as e:
        bad_secret.list_buckets()
    assert code(e.value) == "SignatureDoesNotMatch"
    unknown = client(cloud, node, key="AKIAUNKNOWNUNKNOWN00", attempts=1)
    with pytest.raises(ClientError) as e:
        unknown.list_objects_v2(Bucket="auth-test")
    assert code(e.value) == "InvalidAccessKeyId"
    # An unsigned request is refused.
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(f"{env['S3_URL']}/auth-test", timeout=10)
    assert he.value.code == 403 and b"<Code>AccessDenied</Code>" in he.value.read()
    # A presigned URL works; a tampered one does not.
    good.put_object(Bucket="auth-test", Key="k", Body=b"presigned body")
    url = good.generate_presigned_url("get_object", Params={"Bucket": "auth-test", "Key": "k"}, ExpiresIn=60)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"presigned body"
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(url.replace("auth-test/k", "auth-test/K"), timeout=10)
    assert he.value.code == 403
    # A body that does not match the signed x-amz-content-sha256 is refused.
    req = AWSRequest(method="PUT", url=f"{env['S3_URL']}/auth-test/tampered", data=b"original")
    S3SigV4Auth(
        Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]), "s3", "eucalyptus"
    ).add_auth(req)
    prepared = req.prepare()
    r2 = urllib.request.Request(prepared.url, data=b"tampered", method="PUT", headers=dict(prepared.headers))
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(r2, timeout=10)
    assert b"XAmzContentSHA256Mismatch" in he.value.read()
    with pytest.raises(ClientError):
        good.head_object(Bucket="auth-test", Key="tampered")
    # Virtual-hosted-style addressing (Host: <bucket>.localhost).
    vreq = AWSRequest(
        method="GET",
        url=f"{env['S3_URL']}/k",
        headers={"Host": f"auth-test.localhost:{env['S3_URL'].rsplit(':', 1)[1]}"},
    )
    S3SigV4Auth(
        Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]), "s3", "eucalyptus"
    ).add_auth(vreq)
    p = vreq.prepare()
    with urllib.request.urlopen(urllib.request.Request(p.url, headers=dict(p.headers)), timeout=10) as resp:
        assert resp.read() == b"presigned body"

    # An expired presigned URL: 403 AccessDenied "Request has expired" (docs/api.md, Authentication).
    short = good.generate_presigned_url("get_object", Params={"Bucket": "auth-test", "Key": "k"}, ExpiresIn=1)

    def expired() -> bool:
        try:
            with urllib.request.urlopen(short, timeout=10) as resp:
                resp.read()
            return False
        except urllib.error.HTTPError as exc:
            body = exc.read()
            assert exc.code == 403 and b"<Code>AccessDenied</Code>" in body, body
            return b"Request has expired" in body

    wait_until(expired, timeout=15, what="the presigned URL to be refused as expired")

    # A clock more than 15 minutes off: 403 RequestTimeTooSkewed; within 15 minutes it works.
    creds = Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    for minutes, ok in ((-20, False), (20, False), (-10, True), (10, True)):
        sreq = AWSRequest(method="GET", url=f"{env['S3_URL']}/auth-test/k")
        SkewedS3SigV4(creds, dt.timedelta(minutes=minutes)).add_auth(sreq)
        sp = sreq.prepare()
        raw = urllib.request.Request(sp.url, headers=dict(sp.headers))
        try:
            with urllib.request.urlopen(raw, timeout=10) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        if ok:
            assert (status, body) == (200, b"presigned body"), (minutes, status, body)
        else:
            assert status == 403 and b"<Code>RequestTimeTooSkewed</Code>" in body, (minutes, status, body)

    # Keys deactivated or deleted through IAM are refused by S3 within the documented bound.
    iam = boto3.client(
        "iam",
        endpoint_url=cloud.layout.nodes[node].api["iam"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    iam.create_user(UserName="s3-revoked")
    k_inactive, k_deleted = (iam.create_access_key(UserName="s3-revoked")["AccessKey"] for _ in range(2))
    as_inactive, as_deleted = (
        client(cloud, node, key=k["AccessKeyId"], secret=k["SecretAccessKey"], attempts=1)
        for k in (k_inactive, k_deleted)
    )
    for c in (as_inactive, as_deleted):  # they work (and are now in the key caches)
        assert c.get_object(Bucket="auth-test", Key="k")["Body"].read() == b"presigned body"
    iam.update_access_key(UserName="s3-revoked", AccessKeyId=k_inactive["AccessKeyId"], Status="Inactive")
    iam.delete_access_key(UserName="s3-revoked", AccessKeyId=k_deleted["AccessKeyId"])

    def revoked(c: Any) -> bool:
        try:
            c.list_objects_v2(Bucket="auth-test")
        except ClientError as exc:
            status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
            assert (status, code(exc)) == (403, "InvalidAccessKeyId"), exc
            return True
        return False

    for c, what in ((as_inactive, "inactive"), (as_deleted, "deleted")):
        wait_until(lambda c=c: revoked(c), timeout=REVOCATION_DEADLINE, what=f"S3 to refuse the {what} key")
    iam.delete_access_key(UserName="s3-revoked", AccessKeyId=k_inactive["AccessKeyId"])
    iam.delete_user(UserName="s3-revoked")


def test_aws_cli_round_trip(single_cloud: Cloud, tmp_path: Path) -> None:
    env = {**os.environ, **eucarc(single_cloud)}
    env["AWS_ENDPOINT_URL_S3"] = env["S3_URL"]

    def aws(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [AWS, "--endpoint-url", env["S3_URL"], *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc

    aws("s3", "mb", "s3://cli-bucket")
    src = tmp_path / "file.bin"
    src.write_bytes(os.urandom(9 * MiB + 7))  # above the CLI's multipart threshold (8 MiB)
    aws("s3", "cp", str(src), "s3://cli-bucket/dir/file.bin")
    small = tmp_path / "small.txt"
    small.write_text("hello from the aws cli\n")
    aws("s3", "cp", str(small), "s3://cli-bucket/small.txt")
    listing = aws("s3", "ls", "s3://cli-bucket/", "--recursive").stdout
    assert "dir/file.bin" in listing and "small.txt" in listing
    back = tmp_path / "back.bin"
    aws("s3", "cp", "s3://cli-bucket/dir/file.bin", str(back))
    assert back.read_bytes() == src.read_bytes()
    aws("s3", "rm", "s3://cli-bucket/dir/file.bin")
    aws("s3", "rm", "s3://cli-bucket/small.txt")
    assert aws("s3", "ls", "s3://cli-bucket/").stdout.strip() == ""
    aws("s3", "rb", "s3://cli-bucket")


# --------------------------------------------------------------------------- large objects


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Peak RSS of some processes, sampled in the background."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.pids:
                try:
                    self.peak[p] = max(self.peak[p], _rss(p))
                except OSError:
                    pass
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


class _Pattern:
    """A file-like object of `size` deterministic bytes, generated on the fly (seekable)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pos = 0
        self.block = hashlib.sha256(b"pattern").digest() * (MiB // 32)

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.size - self.pos
        n = min(n, self.size - self.pos)
        off = self.pos % len(self.block)
        out = (self.block[off:] + self.block)[:n] if n <= len(self.block) else None
        if out is None:
            parts = []
            left = n
            while left:
                piece = self.block[off : off + left]
                parts.append(piece)
                left -= len(piece)
                off = 0
            out = b"".join(parts)
        self.pos += n
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.size + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def __len__(self) -> int:
        return self.size


def test_large_object_streams_with_flat_memory(ha_cloud: Cloud) -> None:
    size = int(os.environ.get("EUCA_S3_LARGE_MIB", "256")) * MiB
    s3 = client(ha_cloud, "node-b")  # forwarded to the primary unless it is node-b
    s3.create_bucket(Bucket="large")
    pids = [ha_cloud.pid("node-a"), ha_cloud.pid("node-b")]
    before = {p: _rss(p) for p in pids}
    expect = hashlib.sha256()
    src = _Pattern(size)
    while chunk := src.read(8 * MiB):
        expect.update(chunk)
    src.seek(0)
    with RssSampler(pids) as sampler:
        t0 = time.monotonic()
        s3.put_object(Bucket="large", Key="blob", Body=src, ContentLength=size)
        t_put = time.monotonic() - t0
        got = hashlib.sha256()
        n = 0
        t0 = time.monotonic()
        for chunk in s3.get_object(Bucket="large", Key="blob")["Body"].iter_chunks(MiB):
            got.update(chunk)
            n += len(chunk)
        t_get = time.monotonic() - t0
    assert n == size and got.hexdigest() == expect.hexdigest()
    growth = {p: sampler.peak[p] - before[p] for p in pids}
    rate = f"put {size / MiB / t_put:.0f} MiB/s, get {size / MiB / t_get:.0f} MiB/s"
    peak = [g // MiB for g in growth.values()]
    mem = f"RSS before {[b // MiB for b in before.values()]} MiB, peak growth {peak}"
    print(f"large object {size // MiB} MiB: {rate}; {mem} MiB")
    # Memory stays flat: far below the object's size (a generous bound; it is not a timing).
    for p in pids:
        assert growth[p] < 96 * MiB, (p, growth[p] // MiB)
    # The backup holds the bytes too (replicated before the answer).
    blobs = [
        f
        for f in (ha_cloud.root / "node-b" / "walrus").rglob("*")
        if f.is_file() and f.stat().st_size == size
    ]
    assert len(blobs) == 1


# --------------------------------------------------------------------------- HA


def _settled(cloud: Cloud, primary: str = "node-a", backup: str = "node-b") -> bool:
    rows = {s["name"]: s for s in cloud.services()}
    return all(
        rows[f"{primary}.{g}"]["state"] == "ENABLED"
        and rows[f"{backup}.{g}"]["state"] == "DISABLED"
        and rows[f"{backup}.{g}"]["in_sync"]
        for g in ("walrus",)
    )


def _roles(cloud: Cloud) -> tuple[str, str] | None:
    """(primary node, backup node) of walrus once it has an ENABLED and an in-sync DISABLED."""
    for p, b in (("node-a", "node-b"), ("node-b", "node-a")):
        if _settled(cloud, p, b):
            return p, b
    return None


class S3Writers:
    """Threads putting unique keys with known bytes; records what was acknowledged or refused."""

    def __init__(self, cloud: Cloud, nodes: list[str], prefix: str, attempts: int = 5) -> None:
        self.cloud = cloud
        self.prefix = prefix
        self.acked: dict[str, tuple[int, float]] = {}  # key -> (size, sent)
        self.refused: dict[str, tuple[int, str]] = {}  # key -> (size, why)
        self.rejected: set[str] = set()  # refused with a definite 4xx answer: must never show up
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(client(cloud, n, attempts=attempts), i), daemon=True)
            for i, n in enumerate(nodes)
        ]

    def _run(self, s3: Any, idx: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            key = f"{self.prefix}-{idx}-{i}"
            size = 1 + (i * 7919) % 20000 if i % 10 else MiB + 17 * i  # every 10th is streamed
            sent = time.monotonic()
            try:
                s3.put_object(Bucket="ha-bucket", Key=key, Body=body_for(key, size))
            except Exception as exc:  # noqa: BLE001 - any failure is a refusal to record
                with self._lock:
                    self.refused[key] = (size, f"{type(exc).__name__}: {exc}")
                    if (
                        isinstance(exc, ClientError)
                        and exc.response["ResponseMetadata"]["HTTPStatusCode"] < 500
                    ):
                        self.rejected.add(key)
                continue
            with self._lock:
                self.acked[key] = (size, sent)

    def __enter__(self) -> S3Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def acked_after(self, t: float) -> bool:
        with self._lock:
            return any(sent > t for _, sent in self.acked.values())


def _check_objects(cloud: Cloud, node: str, writers: S3Writers) -> None:
    """Every acknowledged object is there with its bytes; a refused one is absent or intact (and
    absent if the refusal was a definite 4xx answer)."""
    s3 = client(cloud, node)
    listed = {
        c["Key"]: c["Size"]
        for p in s3.get_paginator("list_objects_v2").paginate(Bucket="ha-bucket", Prefix=writers.prefix)
        for c in p.get("Contents", [])
    }
    for key, (size, _) in writers.acked.items():
        assert listed.get(key) == size, key
        assert s3.get_object(Bucket="ha-bucket", Key=key)["Body"].read() == body_for(key, size), key
    for key, (size, why) in writers.refused.items():
        if key in listed:  # the answer was lost, not the write: then it must be whole
            assert s3.get_object(Bucket="ha-bucket", Key=key)["Body"].read() == body_for(key, size), (
                key,
                why,
            )
    unknown = set(listed) - set(writers.acked) - set(writers.refused)
    assert not unknown, unknown
    assert not writers.rejected & set(listed), sorted(writers.rejected & set(listed))[:5]
    print(f"{writers.prefix} @{node}: {len(writers.acked)} acked intact, {len(writers.refused)} refused")


def _wait_settled_and_verify_backup(cloud: Cloud, writers: S3Writers, backup: str, primary: str) -> None:
    """The old primary rejoins in sync; switched over to, it serves every acknowledged object."""
    wait_until(lambda: _settled(cloud, primary, backup), timeout=60, what=f"{backup}.walrus back in sync")
    proc = cloud.ctl("switchover", "walrus", "--to", f"{backup}.walrus")
    assert proc.returncode == 0, proc.stderr
    _check_objects(cloud, backup, writers)


def test_kill9_of_the_walrus_primary_loses_no_acknowledged_object(ha_cloud: Cloud) -> None:
    p, b = wait_until(lambda: _roles(ha_cloud), what="HA settled")
    client(ha_cloud, b).create_bucket(Bucket="ha-bucket")
    with S3Writers(ha_cloud, [b, b, p], "k9") as w:
        wait_until(lambda: w.count() >= 30, what="puts flowing")
        os.kill(ha_cloud.pid(p), signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: ha_cloud.enabled("walrus", via=b) == f"{b}.walrus", what="failover")
        wait_until(lambda: w.acked_after(killed), what="a put sent after the kill acknowledged")
        n = w.count()
        wait_until(lambda: w.count() >= n + 10, what="puts continue")
    # Writers through the surviving node were never refused (held and retried across the failover).
    assert not [k for k in w.refused if not k.startswith("k9-2-")], w.refused
    _check_objects(ha_cloud, b, w)
    run_cli("up", "--dir", str(ha_cloud.root), "--node", p)
    _wait_settled_and_verify_backup(ha_cloud, w, p, b)


def test_sigstop_of_the_walrus_primary_past_its_lease(ha_cloud: Cloud) -> None:
    p, b = wait_until(lambda: _roles(ha_cloud), what="HA settled")
    client(ha_cloud, b).create_bucket(Bucket="ha-bucket")
    pid = ha_cloud.pid(p)
    try:
        with S3Writers(ha_cloud, [b, b], "st") as w:
            wait_until(lambda: w.count() >= 20, what="puts flowing")
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            wait_until(lambda: ha_cloud.enabled("walrus", via=b) == f"{b}.walrus", what="failover")
            wait_until(lambda: w.acked_after(stopped), what="puts resume at the backup")
            os.kill(pid, signal.SIGCONT)
            wait_until(
                lambda: ha_cloud.service(f"{p}.walrus", via=p)["state"] in ("DISABLED", "NOTREADY"),
                what="the resumed primary steps down",
            )
            n = w.count()
            wait_until(lambda: w.count() >= n + 10, what="puts continue after SIGCONT")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert w.refused == {}
    _check_objects(ha_cloud, b, w)
    _wait_settled_and_verify_backup(ha_cloud, w, p, b)


def test_switchover_under_s3_load_fails_no_request(ha_cloud: Cloud) -> None:
    p, b = wait_until(lambda: _roles(ha_cloud), what="HA settled")
    client(ha_cloud, p).create_bucket(Bucket="ha-bucket")
    with S3Writers(ha_cloud, [p, b], "sw") as w:
        wait_until(lambda: w.count() >= 20, what="puts flowing")
        proc = ha_cloud.ctl("switchover", "walrus", "--to", f"{b}.walrus")
        assert proc.returncode == 0, proc.stderr
        n = w.count()
        wait_until(lambda: w.count() >= n + 20, what="puts after the switchover")
    assert w.refused == {}
    _check_objects(ha_cloud, b, w)
    _wait_settled_and_verify_backup(ha_cloud, w, p, b)


# --------------------------------------------------------------------------- state transfer of bytes

LOG_KEEP = 10_000
"""`Store.open`'s default `log_keep`: change records a primary retains for catch-up."""


def _walrus_db(cloud: Cloud, node: str) -> Path:
    return cloud.layout.data_dir(node) / f"{node}.walrus.db"


def _blob_root(cloud: Cloud, node: str) -> Path:
    return cloud.layout.data_dir(node) / "walrus" / f"{node}.walrus"


def _replica_objects(cloud: Cloud, node: str) -> dict[tuple[str, str], tuple[int, str]]:
    """(bucket, key) -> (size, sha256 of the bytes), read from `node`'s own database and blob files.

    Fails (AssertionError) if a blob the metadata refers to is absent or damaged on disk.
    """
    out: dict[tuple[str, str], tuple[int, str]] = {}
    with contextlib.closing(sqlite3.connect(_walrus_db(cloud, node))) as conn:
        blobs = {b: (int(n), sha) for b, n, sha in conn.execute("select blob_id, size, sha256 from blobs")}
        rows = conn.execute("select bucket, key, size, segments from objects").fetchall()
    root = _blob_root(cloud, node) / "blobs"
    for bucket, key, size, segments in rows:
        h = hashlib.sha256()
        for blob_id, n in json.loads(segments):
            path = root / blob_id[:2] / blob_id
            assert path.is_file(), f"{node}: blob {blob_id} of {bucket}/{key} missing"
            data = path.read_bytes()
            assert len(data) == n == blobs[blob_id][0], (node, bucket, key, blob_id)
            assert hashlib.sha256(data).hexdigest() == blobs[blob_id][1], (node, bucket, key, blob_id)
            h.update(data)
        out[(bucket, key)] = (int(size), h.hexdigest())
    return out


def _caught_up(cloud: Cloud) -> bool:
    rows = {s["name"]: s for s in cloud.services("node-a")}
    b = rows["node-b.walrus"]
    return (
        rows["node-a.walrus"]["state"] == "ENABLED"
        and b["state"] == "DISABLED"
        and bool(b["in_sync"])
        and b.get("lag") == 0
    )


def _fill_log(cloud: Cloud, records: int) -> None:
    """Push walrus's change log `records` records further (one small put each, sequentially)."""
    s3 = client(cloud, "node-a")
    start = int(cloud.service("node-a.walrus", via="node-a")["seq"])
    i = 0
    while int(cloud.service("node-a.walrus", via="node-a")["seq"]) < start + records:
        for _ in range(200):
            i += 1
            key = f"fill/{i % 50:02d}"
            s3.put_object(Bucket="st-bucket", Key=key, Body=body_for(f"{key}#{i}", 1 + i % 300))


def test_wiped_backup_gets_every_objects_bytes_by_state_transfer_then_serves_them(
    ha_cloud: Cloud, tmp_path: Path
) -> None:
    cloud = ha_cloud
    wait_until(lambda: _caught_up(cloud), timeout=60, what="HA settled")
    s3 = client(cloud, "node-a")
    s3.create_bucket(Bucket="st-bucket")
    s3.create_bucket(Bucket="ha-bucket")
    expected: dict[str, bytes] = {}
    for i in range(30):  # small (one bus call) and streamed (several chunks) objects
        key = f"obj/{i:02d}"
        expected[key] = body_for(key, (3 * MiB + 11 * i) if i % 5 == 0 else 100 + 997 * i)
        s3.put_object(Bucket="st-bucket", Key=key, Body=expected[key])
    s3.copy_object(Bucket="st-bucket", Key="obj/copy", CopySource="st-bucket/obj/05")
    expected["obj/copy"] = expected["obj/05"]
    wait_until(lambda: _caught_up(cloud), timeout=60, what="node-b in sync after the load")

    # node-b loses everything: its walrus database and its blob files.
    run_cli("down", "--dir", str(cloud.root), "--node", "node-b")
    wait_until(
        lambda: cloud.service("node-b.walrus", via="node-a")["state"] == "NOTREADY", what="node-b seen down"
    )
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{_walrus_db(cloud, 'node-b')}{suffix}").unlink()
    shutil.rmtree(_blob_root(cloud, "node-b"))
    # Past the primary's retained log, so catching up needs a state transfer, not a replay.
    _fill_log(cloud, LOG_KEEP + 100)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="st-bucket")
    fills = {c["Key"] for p in pages for c in p["Contents"]}

    with S3Writers(cloud, ["node-a", "node-a"], "st") as w:
        wait_until(lambda: w.count() >= 10, what="puts flowing")
        run_cli("up", "--dir", str(cloud.root), "--node", "node-b")
        wait_until(lambda: _caught_up(cloud), timeout=180, what="rebuilt node-b DISABLED, in sync, lag 0")
        n = w.count()
        wait_until(lambda: w.count() >= n + 10, what="puts while node-b is in sync")
    assert w.refused == {}, w.refused
    log = (cloud.root / "node-b.log").read_text().splitlines()
    installed = [line for line in log if "state transfer installed" in line and "walrus" in line]
    assert installed, "node-b's walrus caught up without a state transfer"
    fetched = [line for line in log if "walrus blob fetched" in line]
    assert len(fetched) >= len(expected) - 1, len(fetched)  # the copy shares its source's blob
    print(f"{installed[-1]}; {len(fetched)} blobs fetched after the transfer")
    wait_until(lambda: _caught_up(cloud), timeout=60, what="node-b in sync after the writers")

    # Both replicas hold the same objects, every byte present and intact on node-b's disk.
    a_objs = _replica_objects(cloud, "node-a")
    b_objs = wait_until(
        lambda: (o := _replica_objects(cloud, "node-b")) == a_objs and o, timeout=30, what="replicas equal"
    )
    for key, data in expected.items():
        assert b_objs[("st-bucket", key)] == (len(data), hashlib.sha256(data).hexdigest()), key
    assert {k for b, k in b_objs if b == "st-bucket"} == fills

    # A failover to the rebuilt backup serves every object.
    os.kill(cloud.pid("node-a"), signal.SIGKILL)
    wait_until(lambda: cloud.enabled("walrus", via="node-b") == "node-b.walrus", timeout=30, what="failover")
    sb = client(cloud, "node-b")
    for key, data in expected.items():
        assert sb.get_object(Bucket="st-bucket", Key=key)["Body"].read() == data, key
    for (bucket, key), (size, digest) in a_objs.items():
        got = sb.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert len(got) == size and hashlib.sha256(got).hexdigest() == digest, (bucket, key)
    _check_objects(cloud, "node-b", w)


def test_backup_with_its_walrus_db_removed_catches_up_bytes_from_the_log_without_load(
    ha_cloud: Cloud,
) -> None:
    """The other way back: the primary still has the whole log (no state transfer), nothing is
    being written, and node-b must still fetch every blob and become in sync on its own."""
    cloud = ha_cloud
    wait_until(lambda: _caught_up(cloud), timeout=60, what="HA settled")
    s3 = client(cloud, "node-a")
    s3.create_bucket(Bucket="log-bucket")
    expected = {
        f"o{i:02d}": body_for(f"o{i:02d}", 2 * MiB + i if i % 4 == 0 else 500 + 37 * i) for i in range(12)
    }
    for key, data in expected.items():
        s3.put_object(Bucket="log-bucket", Key=key, Body=data)
    s3.delete_object(Bucket="log-bucket", Key="o11")
    del expected["o11"]
    wait_until(lambda: _caught_up(cloud), timeout=60, what="node-b in sync")
    run_cli("down", "--dir", str(cloud.root), "--node", "node-b")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{_walrus_db(cloud, 'node-b')}{suffix}").unlink()
    shutil.rmtree(_blob_root(cloud, "node-b"))
    run_cli("up", "--dir", str(cloud.root), "--node", "node-b")
    wait_until(lambda: _caught_up(cloud), timeout=120, what="node-b DISABLED, in sync, lag 0 (no load)")
    a_objs = _replica_objects(cloud, "node-a")
    wait_until(lambda: _replica_objects(cloud, "node-b") == a_objs, timeout=30, what="replicas equal")
    os.kill(cloud.pid("node-a"), signal.SIGKILL)
    wait_until(lambda: cloud.enabled("walrus", via="node-b") == "node-b.walrus", timeout=30, what="failover")
    sb = client(cloud, "node-b")
    listed = [c["Key"] for c in sb.list_objects_v2(Bucket="log-bucket")["Contents"]]
    assert listed == sorted(expected)
    for key, data in expected.items():
        assert sb.get_object(Bucket="log-bucket", Key=key)["Body"].read() == data, key


def test_aws_cli_cp_100mib_and_sync_through_s3_urls_after_kill9(ha_cloud: Cloud, tmp_path: Path) -> None:
    wait_until(lambda: _caught_up(ha_cloud), timeout=60, what="HA settled")
    env = {**os.environ, **eucarc(ha_cloud), "HOME": str(tmp_path)}
    urls = env["S3_URLS"].split()
    assert len(urls) == 2, urls

    def aws(url: str, *args: str) -> str:
        proc = subprocess.run(
            [AWS, "--endpoint-url", url, *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"aws {' '.join(args)} via {url}: {proc.stderr}"
        return proc.stdout

    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        src = _Pattern(100 * MiB)
        while chunk := src.read(8 * MiB):
            f.write(chunk)
    tree = tmp_path / "tree"
    for i in range(12):
        p = tree / f"d{i % 3}" / f"f{i:02d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body_for(str(p), 10 + 40_000 * i))
    aws(urls[0], "s3", "mb", "s3://cli-ha")
    aws(urls[0], "s3", "cp", str(big), "s3://cli-ha/big-before.bin")
    aws(urls[0], "s3", "sync", str(tree), "s3://cli-ha/tree")

    os.kill(ha_cloud.pid("node-a"), signal.SIGKILL)
    # Through the surviving endpoint of S3_URLS: the CLI carries on.
    aws(urls[1], "s3", "cp", str(big), "s3://cli-ha/big-after.bin")
    (tree / "d0" / "f00.txt").write_bytes(b"changed after the failover\n")
    (tree / "new.txt").write_bytes(b"new after the failover\n")
    out = aws(urls[1], "s3", "sync", str(tree), "s3://cli-ha/tree")
    assert "new.txt" in out and "f00.txt" in out, out
    for name in ("big-before.bin", "big-after.bin"):
        dst = tmp_path / f"back-{name}"
        aws(urls[1], "s3", "cp", f"s3://cli-ha/{name}", str(dst))
        assert dst.stat().st_size == big.stat().st_size
        assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest(), name
    back = tmp_path / "tree-back"
    aws(urls[1], "s3", "sync", "s3://cli-ha/tree", str(back))
    got = {p.relative_to(back): p.read_bytes() for p in back.rglob("*") if p.is_file()}
    want = {p.relative_to(tree): p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    assert got == want
    assert ha_cloud.enabled("walrus", via="node-b") == "node-b.walrus"


def test_deletes_retried_after_a_failover_get_the_first_answer(ha_cloud: Cloud) -> None:
    """A DeleteBucket and an AbortMultipartUpload that took effect on the old primary, retried
    with the same request id at the new one (what the S3 front end's bus call does when the
    answer is lost with the primary), answer success, not NoSuchBucket / NoSuchUpload. A new
    request for the same bucket or upload still gets the S3 error, through boto3 too."""
    p, b = wait_until(lambda: _roles(ha_cloud), what="HA settled")
    s3 = client(ha_cloud, p)
    s3.create_bucket(Bucket="gone")
    s3.create_bucket(Bucket="uploads")
    upload = s3.create_multipart_upload(Bucket="uploads", Key="k")["UploadId"]
    status, out = ha_cloud.bus_call(p, "walrus", "list_buckets", {})
    assert status == 200, out
    owner = next(r["owner"] for r in out["result"] if r["name"] == "gone")
    deletes = {
        "delete_bucket": ({"bucket": "gone", "account": owner}, "NoSuchBucket"),
        "abort_multipart": (
            {"bucket": "uploads", "key": "k", "upload_id": upload, "account": owner},
            "NoSuchUpload",
        ),
    }
    for method, (body, _) in deletes.items():
        status, out = ha_cloud.bus_call(p, "walrus", method, {**body, "request_id": f"rq-{method}"})
        assert status == 200, out
    os.kill(ha_cloud.pid(p), signal.SIGKILL)
    wait_until(lambda: ha_cloud.enabled("walrus", via=b) == f"{b}.walrus", timeout=30, what="failover")
    for method, (body, error) in deletes.items():
        status, out = ha_cloud.bus_call(b, "walrus", method, {**body, "request_id": f"rq-{method}"})
        assert status == 200, (method, out)
        status, out = ha_cloud.bus_call(b, "walrus", method, {**body, "request_id": f"rq-{method}-new"})
        assert out.get("error") == error, (method, out)
    s3b = client(ha_cloud, b, attempts=1)
    with pytest.raises(ClientError) as info:
        s3b.delete_bucket(Bucket="gone")
    assert code(info.value) == "NoSuchBucket"
    with pytest.raises(ClientError) as info:
        s3b.abort_multipart_upload(Bucket="uploads", Key="k", UploadId=upload)
    assert code(info.value) == "NoSuchUpload"
    s3b.delete_bucket(Bucket="uploads")


def test_a_complete_multipart_retried_after_a_failover_gets_the_first_answer(ha_cloud: Cloud) -> None:
    """A CompleteMultipartUpload that took effect on the old primary, retried with the same
    request id at the new one (the S3 front end's bus call, when the answer is lost with the
    primary), answers with the first ETag, not NoSuchUpload, even after the object was
    overwritten; a new request for the completed upload still gets NoSuchUpload. The front end
    records a boto3 request under its x-amz-request-id, on the backup too."""
    p, b = wait_until(lambda: _roles(ha_cloud), what="HA settled")
    s3 = client(ha_cloud, p)
    s3.create_bucket(Bucket="mpu")
    data = body_for("mpu/k", 70_000)
    upload = s3.create_multipart_upload(Bucket="mpu", Key="k")["UploadId"]
    etag = s3.upload_part(Bucket="mpu", Key="k", UploadId=upload, PartNumber=1, Body=data)["ETag"]
    status, out = ha_cloud.bus_call(p, "walrus", "list_buckets", {})
    assert status == 200, out
    owner = next(r["owner"] for r in out["result"] if r["name"] == "mpu")
    body = {"bucket": "mpu", "key": "k", "upload_id": upload, "account": owner, "parts": [[1, etag]]}
    status, first = ha_cloud.bus_call(
        p, "walrus", "complete_multipart", {**body, "request_id": "rq-complete"}
    )
    assert status == 200, first
    # Through boto3: the front end passes its request id, recorded with the commit on every copy.
    up2 = s3.create_multipart_upload(Bucket="mpu", Key="k2")["UploadId"]
    etag2 = s3.upload_part(Bucket="mpu", Key="k2", UploadId=up2, PartNumber=1, Body=data)["ETag"]
    done = s3.complete_multipart_upload(
        Bucket="mpu", Key="k2", UploadId=up2, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag2}]}
    )
    rid = done["ResponseMetadata"]["RequestId"]

    def recorded() -> list[tuple[str, str]]:
        with contextlib.closing(sqlite3.connect(_walrus_db(ha_cloud, b))) as conn:
            q = "select action, result from walrus_request where request_id = ?"
            return [(str(a), str(r)) for a, r in conn.execute(q, (rid,))]

    assert recorded() == [("CompleteMultipartUpload", done["ETag"].strip('"'))]
    os.kill(ha_cloud.pid(p), signal.SIGKILL)
    wait_until(lambda: ha_cloud.enabled("walrus", via=b) == f"{b}.walrus", timeout=30, what="failover")
    status, again = ha_cloud.bus_call(
        b, "walrus", "complete_multipart", {**body, "request_id": "rq-complete"}
    )
    assert status == 200 and again == first, again
    s3b = client(ha_cloud, b, attempts=1)
    head = s3b.head_object(Bucket="mpu", Key="k")
    assert head["ETag"] == f'"{first["result"]["etag"]}"' and head["ContentLength"] == len(data)
    assert s3b.get_object(Bucket="mpu", Key="k")["Body"].read() == data
    s3b.put_object(Bucket="mpu", Key="k", Body=b"newer")
    status, again = ha_cloud.bus_call(
        b, "walrus", "complete_multipart", {**body, "request_id": "rq-complete"}
    )
    assert status == 200 and again == first, again  # the first answer, the newer object untouched
    assert s3b.get_object(Bucket="mpu", Key="k")["Body"].read() == b"newer"
    status, out = ha_cloud.bus_call(
        b, "walrus", "complete_multipart", {**body, "request_id": "rq-complete-new"}
    )
    assert out.get("error") == "NoSuchUpload", out
    with pytest.raises(ClientError) as info:
        s3b.complete_multipart_upload(
            Bucket="mpu",
            Key="k",
            UploadId=upload,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
        )
    assert code(info.value) == "NoSuchUpload"
