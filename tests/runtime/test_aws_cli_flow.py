"""Issue 4's "done when", with the AWS CLI only: the walkthroughs of docs/api.md and README.md,
run verbatim.

docs/api.md, "Walkthrough": the shell block is extracted and run with bash against a fresh
`up --ha` cloud: `source $DIR/eucarc`, create a user and its access key, make a bucket and
upload a file *as that user*, `kill -9` the primary's process, then carry on with the same
environment (eucarc's shared `AWS_ENDPOINT_URL_*` addresses): list, download, list the users.

README.md, "The runtime: a local HA cloud in one command": the first shell block, without its
`PATH`, `up --ha` and `down` lines (the fixture starts and stops the cloud) and with `/tmp/cloud`
replaced by the fixture's directory: the admin creates a user, a key, a bucket and an object,
`kill -9` of the primary, the same commands carry on, `eucactl` shows node-b ENABLED, and
node-a is restarted and comes back DISABLED in sync.

So neither page can drift from what works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from runtime_harness import Cloud, eucarc, wait_until

from euca_runtime import local

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
README = ROOT / "README.md"
README_DIR = "/tmp/cloud"  # the README's cloud directory, replaced by the fixture's
VENV_BIN = str(Path(sys.executable).parent)


def walkthrough() -> str:
    """The ```sh block of the "Walkthrough" section of docs/api.md."""
    text = DOC.read_text()
    section = text.split("## Walkthrough", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m, "docs/api.md: no ```sh block in the Walkthrough section"
    return m.group(1)


def readme_block() -> list[str]:
    """The commands of the first ```sh block of README.md's local-cloud section, one a line."""
    section = README.read_text().split("## The runtime: a local HA cloud in one command", 1)[1]
    m = re.search(r"```sh\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    assert m, "README.md: no ```sh block in the runtime section"
    lines = [line for line in m.group(1).splitlines() if line.strip()]
    assert all(not line.rstrip().endswith("\\") for line in lines), "one command a line, please"
    return lines


def _cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),  # no ~/.aws of whoever runs the tests
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }


def _groups(out: str) -> dict[str, str]:
    """`eucactl describe-groups` table -> {group: its ENABLED instance}."""
    rows = [line.split() for line in out.strip().splitlines()]
    assert rows and rows[0][:2] == ["GROUP", "ENABLED"], out
    return {row[0]: row[1] for row in rows[1:]}


def test_aws_cli_users_keys_buckets_objects_survive_kill9(ha_cloud: Cloud, tmp_path: Path) -> None:
    script = walkthrough()
    for needle in ("aws iam create-user", "create-access-key", "s3 mb", "s3 cp", "kill -9", "s3 ls"):
        assert needle in script, needle
    assert ha_cloud.enabled("walrus") == "node-a.walrus" and ha_cloud.enabled("clc") == "node-a.clc"
    node_a = ha_cloud.pid("node-a")
    work = tmp_path / "work"
    work.mkdir()
    report = os.urandom(9 * 1024 * 1024 + 3)  # above the CLI's multipart threshold (8 MiB)
    (work / "report.bin").write_bytes(report)
    env = {**_cli_env(tmp_path), "DIR": str(ha_cloud.root)}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"walkthrough failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    assert not local.pid_alive(node_a), "node-a was not killed"
    assert re.search(rf"\b{len(report)} 2024/report\.bin\b", out), out  # aws s3 ls after the kill
    assert (work / "report-back.bin").read_bytes() == report
    users = out.strip().splitlines()[-1].split()
    assert sorted(users) == ["admin", "alice"], out
    # The failover really happened: node-b holds both primaries now.
    wait_until(lambda: ha_cloud.enabled("walrus", via="node-b") == "node-b.walrus", what="walrus on node-b")
    assert ha_cloud.enabled("clc", via="node-b") == "node-b.clc"


def test_readme_users_keys_buckets_objects_survive_kill9(ha_cloud: Cloud, tmp_path: Path) -> None:
    lines = readme_block()
    commands = [
        line
        for line in lines
        if not line.startswith("export PATH=")
        and not re.match(r"euca-runtime (up --ha|down)\b", line)  # the fixture's job
    ]
    assert len(lines) - len(commands) == 3, lines  # PATH, up --ha, down
    joined = "\n".join(commands)
    for needle in ("source", "aws iam create-user", "create-access-key", "s3 mb", "s3 cp", "kill -9"):
        assert needle in joined, needle
    assert ha_cloud.enabled("walrus") == "node-a.walrus" and ha_cloud.enabled("clc") == "node-a.clc"
    node_a = ha_cloud.pid("node-a")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(README, work / "README.md")  # what `aws s3 cp ./README.md` uploads
    # Each command is preceded by a marker line, so its output can be told apart.
    script = "".join(
        f"echo '@@@ {i}'\n{cmd.replace(README_DIR, str(ha_cloud.root))}\n" for i, cmd in enumerate(commands)
    )
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=_cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    parts = re.split(r"^@@@ (\d+)\n", proc.stdout, flags=re.M)[1:]
    out = {commands[int(i)]: text for i, text in zip(parts[::2], parts[1::2], strict=True)}
    assert len(out) == len(commands), proc.stdout

    def output(prefix: str, nth: int = 0) -> str:
        return [text for cmd, text in out.items() if cmd.startswith(prefix)][nth]

    assert json.loads(output("aws iam create-user"))["User"]["UserName"] == "alice"
    key = json.loads(output("aws iam create-access-key"))["AccessKey"]
    assert key["UserName"] == "alice" and key["Status"] == "Active"
    assert "make_bucket: photos" in output("aws s3 mb") and "s3://photos/README.md" in output("aws s3 mb")
    before = _groups(output("eucactl describe-groups", 0))
    assert before["clc"] == "node-a.clc" and before["walrus"] == "node-a.walrus", before
    assert not local.pid_alive(node_a), "node-a was not killed"
    # After the kill, through the same environment: the object and the users are there.
    after = output("aws s3 ls s3://photos")
    size = (ROOT / "README.md").stat().st_size
    assert re.search(rf"\b{size} README\.md$", after, re.M), after
    users = {u["UserName"] for u in json.loads(after[after.index("{") :])["Users"]}
    assert users == {"admin", "alice"}, after
    failed_over = _groups(output("eucactl describe-groups", 1))
    assert failed_over["clc"] == "node-b.clc" and failed_over["walrus"] == "node-b.walrus", failed_over
    # The bytes are intact, and alice's new key signs S3 requests on the new primary.
    env = eucarc(ha_cloud)

    def s3_as(key_id: str, secret: str) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL_S3"],
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name=env["AWS_DEFAULT_REGION"],
            config=Config(s3={"addressing_style": "path"}),
        )

    admin_s3 = s3_as(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    assert admin_s3.get_object(Bucket="photos", Key="README.md")["Body"].read() == README.read_bytes()
    alice_s3 = s3_as(key["AccessKeyId"], key["SecretAccessKey"])
    alice_s3.create_bucket(Bucket="alice-after")
    alice_s3.put_object(Bucket="alice-after", Key="k", Body=b"after the failover")
    assert admin_s3.get_object(Bucket="alice-after", Key="k")["Body"].read() == b"after the failover"
    # `euca-runtime up --node node-a` brought node-a back: DISABLED and in sync again.
    assert local.pid_alive(ha_cloud.pid("node-a")) and ha_cloud.pid("node-a") != node_a

    def back_in_sync() -> bool:
        rows = {s["name"]: s for s in ha_cloud.services("node-b")}
        return all(
            rows[f"node-a.{g}"]["state"] == "DISABLED" and rows[f"node-a.{g}"]["in_sync"]
            for g in ("clc", "walrus")
        )

    wait_until(back_in_sync, timeout=60, what="node-a DISABLED in sync after its restart")
