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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from euca_runtime.ctl import groups_table
from euca_runtime.local import read_eucarc
from testbed import bed as tb
from testbed.model import STATE_ROOT, TestbedError

NAME = os.environ.get("EUCA_DEMO_BED", "demo")  # the testbed bed's name
HOSTS = 3
ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = ROOT / "inventories" / "demo" / "topology.yml"


EUCARC = Path.home() / ".euca-ha" / NAME / "eucarc"


def run_playbook(inventories: Sequence[Path | str], playbook: str, *extra: str) -> tuple[int, str]:
    """Run a playbook of this repository over the given inventory sources, as an operator runs
    it; return the total `changed=` of the play recap and the output. Used by `make demo` and by
    the Molecule `ha` scenario's verifier."""
    bindir = Path(sys.executable).parent
    cmd = [str(bindir / "ansible-playbook")]
    for inventory in inventories:
        cmd += ["-i", str(inventory)]
    cmd += [*extra, playbook]
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_FORCE_COLOR": "0",
        "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:])
        raise TestbedError(f"{playbook} failed (exit {proc.returncode})")
    recap = proc.stdout[proc.stdout.rfind("PLAY RECAP") :]
    return sum(int(n) for n in re.findall(r"changed=(\d+)", recap)), proc.stdout


def site(inventory: Path, *extra: str, playbook: str = "playbooks/site.yml") -> tuple[int, str]:
    """Run a playbook over the bed's inventory and the demo's topology."""
    return run_playbook([inventory, TOPOLOGY], playbook, *extra)


def client(env: dict[str, str], service: str, url: str) -> Any:
    """A boto3 client for one endpoint with the eucarc's credentials (path-style S3)."""
    import boto3
    from botocore.config import Config

    retries = {"max_attempts": 5, "mode": "standard"}
    cfg = Config(s3={"addressing_style": "path"}, retries=retries, connect_timeout=5)  # type: ignore[arg-type]
    return boto3.client(
        service,  # type: ignore[call-overload]
        endpoint_url=url,
        config=cfg,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def iam_user_with_key(env: dict[str, str], url: str, name: str) -> str:
    """IAM CreateUser and CreateAccessKey through `url`; the key must then be listed. Returns
    the new access key id."""
    iam = client(env, "iam", url)
    user = iam.create_user(UserName=name)["User"]["UserName"]
    key_id = str(iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"])
    listed = [k["AccessKeyId"] for k in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]]
    if key_id not in listed:
        raise TestbedError(f"IAM through {url}: access key {key_id} of {user} is not listed ({listed})")
    return key_id


def s3_round_trip(
    env: dict[str, str], put_url: str, get_urls: Sequence[str], bucket: str, body: bytes
) -> None:
    """Create `bucket` and put an object through `put_url`, read it back through every one of
    `get_urls` (each walrus host forwards to the ENABLED walrus)."""
    first = client(env, "s3", put_url)
    first.create_bucket(Bucket=bucket)
    first.put_object(Bucket=bucket, Key="hello.txt", Body=body)
    for url in get_urls:
        got = client(env, "s3", url).get_object(Bucket=bucket, Key="hello.txt")
        if got["Body"].read() != body:
            raise TestbedError(f"S3 get through {url} returned other bytes than were put")


def ec2_zones(env: dict[str, str], url: str) -> dict[str, str]:
    """EC2 DescribeAvailabilityZones through `url`: each zone's name and state."""
    zones = client(env, "ec2", url).describe_availability_zones()["AvailabilityZones"]
    return {str(z["ZoneName"]): str(z["State"]) for z in zones}


def smoke(env: dict[str, str]) -> str:
    """IAM CreateUser + CreateAccessKey through EUARE_URL; an S3 bucket, a put through the first
    S3 URL and a get through every one; EC2 DescribeAvailabilityZones through every EC2 URL.
    Returns a one-line summary."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    key_id = iam_user_with_key(env, env["EUARE_URL"], f"demo-{stamp}")
    s3_urls = env["S3_URLS"].split()
    bucket = f"demo-{stamp}"
    s3_round_trip(env, s3_urls[0], s3_urls, bucket, f"hello from the demo cloud, {stamp}\n".encode())
    ec2_urls = env.get("EC2_URLS", "").split()
    zones = [ec2_zones(env, url) for url in ec2_urls]
    if any(not z or z != zones[0] for z in zones):
        raise TestbedError(f"EC2 DescribeAvailabilityZones differs between {ec2_urls}: {zones}")
    return (
        f"IAM user demo-{stamp} created with access key {key_id}; s3://{bucket}/hello.txt put and read "
        f"back through {len(s3_urls)} S3 URL(s); zones {zones[0] if zones else []} through "
        f"{len(ec2_urls)} EC2 URL(s)"
    )


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
