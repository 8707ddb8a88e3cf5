"""Issue 4's "done when", with the AWS CLI only: the walkthrough of docs/api.md, run verbatim.

The shell block under "Walkthrough" in docs/api.md is extracted and run with bash against a
fresh `up --ha` cloud: `source $DIR/eucarc`, create a user and its access key, make a bucket
and upload a file *as that user*, `kill -9` the primary's process, then carry on through the
other endpoint of `S3_URLS` / `EUARE_URLS`: list, download, list the users. So the page (and
the README, which shows the same block) cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from runtime_harness import Cloud, wait_until

from euca_runtime import local

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
VENV_BIN = str(Path(sys.executable).parent)


def walkthrough() -> str:
    """The ```sh block of the "Walkthrough" section of docs/api.md."""
    text = DOC.read_text()
    section = text.split("## Walkthrough", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m, "docs/api.md: no ```sh block in the Walkthrough section"
    return m.group(1)


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
    env = {
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),  # no ~/.aws of whoever runs the tests
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        "DIR": str(ha_cloud.root),
    }
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
