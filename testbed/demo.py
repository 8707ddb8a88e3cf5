"""`make demo`: testbed hosts, site.yml onto them (twice: the second run must change nothing,
then `--check --diff`), the status runbook, the eucarc runbook (how to reach the cloud), and a
smoke check with boto3 from the controller against the testbed hosts: IAM CreateUser, S3
put/get through every walrus host. Grows with the project."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from euca_runtime.ctl import groups_table
from testbed import bed as tb
from testbed.model import STATE_ROOT, TestbedError

NAME = os.environ.get("EUCA_DEMO_BED", "demo")  # the testbed bed's name
HOSTS = 3
ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = ROOT / "inventories" / "demo" / "topology.yml"


EUCARC = Path.home() / ".euca-ha" / NAME / "eucarc"


def site(inventory: Path, *extra: str, playbook: str = "playbooks/site.yml") -> tuple[int, str]:
    """Run a playbook; return the total `changed=` of the play recap and the output."""
    bindir = Path(sys.executable).parent
    cmd = [str(bindir / "ansible-playbook"), "-i", str(inventory), "-i", str(TOPOLOGY), *extra]
    cmd.append(playbook)
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:])
        raise TestbedError(f"{playbook} failed (exit {proc.returncode})")
    recap = proc.stdout[proc.stdout.rfind("PLAY RECAP") :]
    return sum(int(n) for n in re.findall(r"changed=(\d+)", recap)), proc.stdout


def read_eucarc(path: Path) -> dict[str, str]:
    """The `export NAME=value` lines of an eucarc."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r'export ([A-Z0-9_]+)="?([^"$]*)"?', line.strip())
        if m:
            env[m.group(1)] = m.group(2)
    return env


def smoke(env: dict[str, str]) -> str:
    """IAM CreateUser through EUARE_URL; an S3 bucket, a put through the first walrus host and a
    get through every one (each forwards to the ENABLED walrus). Returns a one-line summary."""
    import boto3
    from botocore.config import Config

    common = {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }
    retries = {"max_attempts": 5, "mode": "standard"}
    cfg = Config(s3={"addressing_style": "path"}, retries=retries, connect_timeout=5)  # type: ignore[arg-type]
    stamp = time.strftime("%Y%m%d%H%M%S")
    iam = boto3.client("iam", endpoint_url=env["EUARE_URL"], config=cfg, **common)
    user = iam.create_user(UserName=f"demo-{stamp}")["User"]["UserName"]
    s3_urls = env["S3_URLS"].split()
    bucket, key, body = f"demo-{stamp}", "hello.txt", f"hello from the demo cloud, {stamp}\n".encode()
    first = boto3.client("s3", endpoint_url=s3_urls[0], config=cfg, **common)
    first.create_bucket(Bucket=bucket)
    first.put_object(Bucket=bucket, Key=key, Body=body)
    for url in s3_urls:
        got = boto3.client("s3", endpoint_url=url, config=cfg, **common).get_object(Bucket=bucket, Key=key)
        if got["Body"].read() != body:
            raise TestbedError(f"S3 get through {url} returned other bytes than were put")
    return f"IAM user {user} created; s3://{bucket}/{key} put and read back through {len(s3_urls)} S3 URL(s)"


def main() -> int:
    try:
        if (STATE_ROOT / NAME / "state.json").exists():
            print(f"demo: testbed {NAME!r} is already up; reusing it")
        else:
            t0 = time.monotonic()
            tb.up(NAME, HOSTS)
            print(f"demo: {HOSTS} testbed hosts up in {time.monotonic() - t0:.1f}s")
        inventory = STATE_ROOT / NAME / "inventory.yml"
        first, recap = site(inventory)
        print(f"demo: site.yml first run: changed={first}")
        second, recap = site(inventory)
        print(f"demo: site.yml second run: changed={second}\n{recap.strip()}")
        if second != 0:
            raise TestbedError(f"site.yml is not idempotent: the second run changed {second} things")
        checked, _ = site(inventory, "--check", "--diff")
        print(f"demo: site.yml --check --diff: changed={checked}")
        if checked != 0:
            raise TestbedError(f"site.yml --check --diff would change {checked} things on a converged cloud")
        bed = tb.load(NAME)
        for host in bed.hosts:
            check = "id -u eucalyptus && stat -c %a /var/lib/eucalyptus && systemctl is-active euca-runtime"
            probe = tb.ssh(bed, host, check)
            if probe.returncode != 0 or probe.stdout.split() != ["970", "700", "active"]:
                raise TestbedError(f"smoke check failed on {host.name}: {probe.stdout or probe.stderr}")
        print("demo: the runtime is active on every host")
        status_json = STATE_ROOT / NAME / "status.json"
        strict = ["-e", "euca_status_strict=true", "-e", f"euca_status_json={status_json}"]
        deadline = time.monotonic() + 90
        while True:
            try:
                site(inventory, *strict, playbook="playbooks/runbooks/status.yml")
                break
            except TestbedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)
        table = groups_table(json.loads(status_json.read_text())).splitlines()
        print("demo: status runbook:\n  " + "\n  ".join(table))
        site(inventory, "-e", f"euca_eucarc={EUCARC}", playbook="playbooks/runbooks/eucarc.yml")
        print(f"demo: smoke check: {smoke(read_eucarc(EUCARC))}")
    except TestbedError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    status = tb.status(NAME)[0]
    print(
        f"\nThe demo cloud's hosts are up on {status['subnet']}:\n"
        + "".join(f"  {h['name']}  {h['address']}  {h['state']}\n" for h in status["hosts"])
        + f"\nReach them:   ssh -F {status['ssh_config']} h1\n"
        f"Clients:      source {EUCARC}   (AWS CLI / boto3: IAM, S3, EC2 through the hosts)\n"
        f"Ansible:      .venv/bin/ansible-playbook -i {status['inventory']} -i {TOPOLOGY.relative_to(ROOT)} "
        "playbooks/site.yml\n"
        "Status:       .venv/bin/ansible-playbook -i ... playbooks/runbooks/status.yml\n"
        "Faults:       .venv/bin/python -m testbed --help   (use --name demo)\n"
        "Tear down:    make down\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
