"""Issue 4's "done when", with the AWS CLI only: what the README shows, step by step.

A user with `source DIR/eucarc` (here: the eucarc's variables as the environment of each `aws`
subprocess, nothing else) creates a user and its access key, then *as that user* makes a
bucket and uploads a file, kills the primary (`kill -9 $(cat DIR/node-a.pid)`), points the CLI
at the other endpoint of `S3_URLS` / `EUARE_URLS`, and carries on: lists, downloads and lists
the users. Non-admin users of the `eucalyptus` account may use S3 (buckets belong to the
account; no policies yet, see docs/api.md), so every S3 call runs with the new user's key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from runtime_harness import Cloud, wait_until

AWS = str(Path(sys.executable).parent / "aws")


def _eucarc(cloud: Cloud) -> dict[str, str]:
    """What `source DIR/eucarc` exports (variables referring to others are resolved)."""
    proc = subprocess.run(
        ["bash", "-c", f"set -a; source {cloud.root / 'eucarc'}; env -0"],
        capture_output=True,
        check=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    env = dict(item.split("=", 1) for item in proc.stdout.decode().split("\0") if "=" in item)
    return {k: v for k, v in env.items() if k.startswith(("AWS_", "S3_", "EUARE_", "EC2_", "EUCA_"))}


def test_aws_cli_users_keys_buckets_objects_survive_kill9(ha_cloud: Cloud, tmp_path: Path) -> None:
    rc = _eucarc(ha_cloud)
    s3_urls, iam_urls = rc["S3_URLS"].split(), rc["EUARE_URLS"].split()
    assert len(s3_urls) == 2 and len(iam_urls) == 2, (s3_urls, iam_urls)
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),  # no ~/.aws of whoever runs the tests
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        **rc,
    }

    def aws(env: dict[str, str], *args: str) -> str:
        proc = subprocess.run([AWS, *args], env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"aws {' '.join(args)}: {proc.returncode}\n{proc.stderr}"
        return proc.stdout

    # 1. As the admin of eucarc: a user and its access key.
    aws(base, "iam", "create-user", "--user-name", "alice")
    key = json.loads(aws(base, "iam", "create-access-key", "--user-name", "alice"))["AccessKey"]
    assert key["UserName"] == "alice" and key["Status"] == "Active"
    alice = {**base, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    # 2. As alice: a bucket and an object (above the CLI's multipart threshold, 8 MiB).
    src = tmp_path / "report.bin"
    src.write_bytes(os.urandom(9 * 1024 * 1024 + 3))
    aws(alice, "s3", "mb", "s3://alice-bucket")
    aws(alice, "s3", "cp", str(src), "s3://alice-bucket/2024/report.bin")

    # 3. kill -9 of the primary (node-a hosts every primary after `up --ha`).
    primary = ha_cloud.enabled("walrus")
    assert primary == "node-a.walrus", primary
    os.kill(int((ha_cloud.root / "node-a.pid").read_text()), signal.SIGKILL)

    # 4. Carry on through the surviving endpoints (the second URL of S3_URLS / EUARE_URLS).
    survivor = {**base, "AWS_ENDPOINT_URL_S3": s3_urls[1], "AWS_ENDPOINT_URL_IAM": iam_urls[1]}
    alice2 = {**alice, "AWS_ENDPOINT_URL_S3": s3_urls[1], "AWS_ENDPOINT_URL_IAM": iam_urls[1]}
    listing = aws(alice2, "s3", "ls", "s3://alice-bucket", "--recursive")
    assert "2024/report.bin" in listing and str(src.stat().st_size) in listing, listing
    back = tmp_path / "back.bin"
    aws(alice2, "s3", "cp", "s3://alice-bucket/2024/report.bin", str(back))
    assert back.read_bytes() == src.read_bytes()
    users = {u["UserName"] for u in json.loads(aws(survivor, "iam", "list-users"))["Users"]}
    assert {"admin", "alice"} <= users, users
    # And new writes keep working on the new primary.
    aws(alice2, "s3", "cp", str(src), "s3://alice-bucket/after-failover.bin")
    aws(survivor, "iam", "create-user", "--user-name", "bob")
    wait_until(lambda: ha_cloud.enabled("walrus", via="node-b") == "node-b.walrus", what="walrus on node-b")
    assert ha_cloud.enabled("clc", via="node-b") == "node-b.clc"
