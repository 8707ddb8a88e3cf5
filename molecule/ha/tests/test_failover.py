"""Machine failure of the primary clc host (testbed `kill`: every process of the host dies at
once), then the cloud answers through the service VIPs as a user reaches it, with the eucarc's
first URLs: IAM (create a user and an access key, the user made before the failure is still
there) and S3 (the object put before the failure reads back, a new round trip works).
Runs after test_deploy.py; the scenario's destroy removes the bed (also when this fails)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from conftest import BED, bed_ssh, services_on

from testbed import demo

ARBITRATOR = "h3"  # survives; it sees the groups from outside h1 and h2
FAILOVER_DEADLINE = 180.0  # seconds; generous: the machine is loaded (lease + VIP take ~3 s idle)
T = TypeVar("T")


def until_it_answers(what: str, attempt: Callable[[int], T]) -> T:
    """Retry `attempt(n)` as a user would, until it succeeds or the deadline passes; each try
    gets its own number so a retried create never collides with one that got through."""
    deadline = time.monotonic() + FAILOVER_DEADLINE
    errors: list[str] = []
    n = 0
    while True:
        try:
            return attempt(n)
        except (BotoCoreError, ClientError, OSError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        n += 1
        assert time.monotonic() < deadline, f"{what}: no answer in {FAILOVER_DEADLINE} s: {errors[-5:]}"
        time.sleep(1)


def enabled(group: str) -> dict:
    found = [s for s in services_on(ARBITRATOR) if s["group"] == group and s["state"] == "ENABLED"]
    if len(found) != 1:
        raise OSError(f"{group}: not exactly one ENABLED instance as {ARBITRATOR} sees it: {found}")
    return found[0]


def test_the_cloud_answers_through_the_vips_after_the_primary_clc_host_dies(eucarc):
    iam_vip, s3_vip = eucarc["EUARE_URL"], eucarc["S3_URL"]
    primary = enabled("clc")["node"]
    survivor = next(n for n in ("h1", "h2") if n != primary)
    stamp = time.strftime("%H%M%S")

    # What a user stored before the failure, through the VIPs.
    demo.iam_user_with_key(eucarc, iam_vip, f"molha-before-{stamp}")
    before = f"molha-before-{stamp}"
    body = f"stored before {primary} died\n".encode()
    demo.s3_round_trip(eucarc, s3_vip, [s3_vip], before, body)

    kill = subprocess.run(
        [sys.executable, "-m", "testbed", "kill", "--name", BED, primary],
        capture_output=True,
        text=True,
        check=False,
    )
    assert kill.returncode == 0, kill.stderr

    key = until_it_answers(
        f"IAM through the VIP {iam_vip}",
        lambda n: demo.iam_user_with_key(eucarc, iam_vip, f"molha-after-{stamp}-{n}"),
    )
    assert key.startswith("AKIA")
    iam = demo.client(eucarc, "iam", iam_vip)
    users = {u["UserName"] for u in iam.list_users()["Users"]}
    assert before in users, f"the user made before the failure is gone: {sorted(users)}"

    s3 = demo.client(eucarc, "s3", s3_vip)
    got = until_it_answers(
        f"S3 through the VIP {s3_vip}", lambda n: s3.get_object(Bucket=before, Key="hello.txt")["Body"].read()
    )
    assert got == body
    until_it_answers(
        f"S3 put through the VIP {s3_vip}",
        lambda n: demo.s3_round_trip(eucarc, s3_vip, [s3_vip], f"molha-after-{stamp}-{n}", b"after\n"),
    )

    # The survivor serves both groups and holds both VIPs (as the arbitrator sees it).
    def survivor_holds(n: int) -> bool:
        held = [(enabled(g)["node"], enabled(g)["vip_holder"]) for g in ("clc", "walrus")]
        if held != [(survivor, survivor)] * 2:
            raise OSError(f"clc and walrus (ENABLED node, VIP holder): {held}")
        return True

    until_it_answers(f"{survivor} to hold the clc and walrus leases and VIPs", survivor_holds)
    addrs = bed_ssh(survivor, "ip -4 -o addr show").stdout
    for url in (iam_vip, s3_vip):
        vip = url.split("//", 1)[1].rsplit(":", 1)[0]
        assert f" {vip}/24 " in addrs, f"{survivor} does not hold {vip}: {addrs}"
