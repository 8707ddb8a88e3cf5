"""The EC2 API against real runtime processes (`up` and `up --ha`), with unmodified boto3 and
the AWS CLI: instances on the real CC and NC, volumes and snapshots on the real SC, error cases,
and a kill -9 of the process hosting the SC primary (and the clc and CC primaries) while volumes
are created, snapshotted, attached and detached in a loop."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from runtime_harness import Cloud, cc_service_pid, eucarc, placeholders, run_cli, wait_until

from euca_runtime.cluster.driver import proc_start_ticks

AWS = str(Path(sys.executable).parent / "aws")
ZONE = "cluster01"
IMAGE = "emi-00000001"


def client(cloud: Cloud, node: str | None = None, *, secret: str | None = None) -> Any:
    env = eucarc(cloud)
    url = cloud.layout.nodes[node].api["ec2"] if node else env["EC2_URL"]
    return boto3.client(
        "ec2",
        endpoint_url=url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret or env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, read_timeout=60, connect_timeout=5),
    )


def code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def state_of(ec2: Any, iid: str) -> str:
    res = ec2.describe_instances(InstanceIds=[iid])["Reservations"]
    return str(res[0]["Instances"][0]["State"]["Name"])


def run_one(ec2: Any, itype: str = "t1.micro") -> str:
    res = ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType=itype)
    iid = str(res["Instances"][0]["InstanceId"])
    wait_until(lambda: state_of(ec2, iid) == "running", timeout=30, what=f"{iid} running")
    return iid


def lifecycle(ec2: Any) -> None:
    """Zones, images, instances, volumes, snapshots and the error cases, through one client."""
    [zone] = ec2.describe_availability_zones()["AvailabilityZones"]
    assert (zone["ZoneName"], zone["State"], zone["RegionName"]) == (ZONE, "available", "eucalyptus")
    images = ec2.describe_images()["Images"]
    assert IMAGE in [i["ImageId"] for i in images]
    mine = ec2.register_image(Name="test-image", ImageLocation="bucket/test.manifest.xml")["ImageId"]
    assert ec2.describe_images(ImageIds=[mine])["Images"][0]["Name"] == "test-image"

    res = ec2.run_instances(ImageId=IMAGE, MinCount=2, MaxCount=2, InstanceType="t1.micro")
    ids = sorted(i["InstanceId"] for i in res["Instances"])
    assert len(ids) == 2 and res["ReservationId"].startswith("r-")
    for iid in ids:
        wait_until(lambda iid=iid: state_of(ec2, iid) == "running", timeout=30, what=f"{iid} running")
    desc = ec2.describe_instances(InstanceIds=ids)["Reservations"]
    assert [sorted(i["InstanceId"] for i in r["Instances"]) for r in desc] == [ids]
    assert desc[0]["Instances"][0]["Placement"]["AvailabilityZone"] == ZONE

    vol = ec2.create_volume(AvailabilityZone=ZONE, Size=1)
    vid = vol["VolumeId"]
    assert vol["State"] == "available"
    att = ec2.attach_volume(VolumeId=vid, InstanceId=ids[0], Device="/dev/sdf")
    assert att["State"] == "attached"
    [v] = ec2.describe_volumes(VolumeIds=[vid])["Volumes"]
    assert v["State"] == "in-use" and v["Attachments"][0]["InstanceId"] == ids[0]
    with pytest.raises(ClientError) as e:
        ec2.delete_volume(VolumeId=vid)
    assert code(e) == "VolumeInUse"
    with pytest.raises(ClientError) as e:
        ec2.attach_volume(VolumeId=vid, InstanceId=ids[1], Device="/dev/sdg")
    assert code(e) == "VolumeInUse"
    snap = ec2.create_snapshot(VolumeId=vid, Description="while in use")
    assert snap["State"] == "completed"
    ec2.detach_volume(VolumeId=vid)
    assert ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["State"] == "available"
    from_snap = ec2.create_volume(AvailabilityZone=ZONE, SnapshotId=snap["SnapshotId"])
    assert from_snap["Size"] == 1 and from_snap["SnapshotId"] == snap["SnapshotId"]
    assert [s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]] == [
        snap["SnapshotId"]
    ]
    ec2.delete_snapshot(SnapshotId=snap["SnapshotId"])
    assert ec2.describe_snapshots()["Snapshots"] == []
    for v_id in (vid, from_snap["VolumeId"]):
        ec2.delete_volume(VolumeId=v_id)
    assert ec2.describe_volumes()["Volumes"] == []

    errors = [
        (lambda: ec2.describe_instances(InstanceIds=["i-0badbad0"]), "InvalidInstanceID.NotFound"),
        (lambda: ec2.describe_instances(InstanceIds=["bogus"]), "InvalidInstanceID.Malformed"),
        (lambda: ec2.terminate_instances(InstanceIds=["i-0badbad0"]), "InvalidInstanceID.NotFound"),
        (lambda: ec2.run_instances(ImageId="emi-0badbad0", MinCount=1, MaxCount=1), "InvalidAMIID.NotFound"),
        (
            lambda: ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType="x9.huge"),
            "InvalidParameterValue",
        ),
        (lambda: ec2.run_instances(ImageId=IMAGE, MinCount=3, MaxCount=1), "InvalidParameterValue"),
        (lambda: ec2.create_volume(AvailabilityZone="nowhere", Size=1), "InvalidParameterValue"),
        (lambda: ec2.create_volume(AvailabilityZone=ZONE, Size=0), "InvalidParameterValue"),
        (lambda: ec2.delete_volume(VolumeId="vol-0badbad0"), "InvalidVolume.NotFound"),
        (lambda: ec2.detach_volume(VolumeId="vol-0badbad0"), "InvalidVolume.NotFound"),
        (lambda: ec2.create_snapshot(VolumeId="vol-0badbad0"), "InvalidVolume.NotFound"),
        (lambda: ec2.delete_snapshot(SnapshotId="snap-0badbad0"), "InvalidSnapshot.NotFound"),
        (lambda: ec2.describe_availability_zones(ZoneNames=["nowhere"]), "InvalidParameterValue"),
    ]
    for call, want in errors:
        with pytest.raises(ClientError) as e:
            call()
        assert code(e) == want

    term = ec2.terminate_instances(InstanceIds=ids)["TerminatingInstances"]
    assert sorted(t["InstanceId"] for t in term) == ids
    assert {t["PreviousState"]["Name"] for t in term} == {"running"}
    for iid in ids:
        wait_until(lambda iid=iid: state_of(ec2, iid) == "terminated", timeout=30, what=f"{iid} terminated")


# --------------------------------------------------------------------------- single cloud


def test_ec2_lifecycle_and_errors(single_cloud: Cloud) -> None:
    lifecycle(client(single_cloud))


def test_ec2_authentication(single_cloud: Cloud) -> None:
    with pytest.raises(ClientError) as e:
        client(single_cloud, secret="wrong" * 8).describe_instances()
    assert code(e) in ("SignatureDoesNotMatch", "AuthFailure")
    env = eucarc(single_cloud)
    bad = boto3.client(
        "ec2",
        endpoint_url=env["EC2_URL"],
        aws_access_key_id="AKIANOSUCHKEY0000000",
        aws_secret_access_key="x" * 40,
        region_name=env["AWS_DEFAULT_REGION"],
    )
    with pytest.raises(ClientError) as e:
        bad.describe_instances()
    assert code(e) == "AuthFailure"


@pytest.mark.parametrize("cloud_fixture", ["single_cloud", "ha_cloud"])
def test_aws_cli_run_and_describe(cloud_fixture: str, request: pytest.FixtureRequest) -> None:
    """What a user types: ``source DIR/eucarc; aws ec2 ...``, against `up` and `up --ha` (whose
    eucarc points the CLI at the EC2 address every clc process serves)."""
    cloud: Cloud = request.getfixturevalue(cloud_fixture)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    rc = cloud.root / "eucarc"

    def aws(*args: str) -> Any:
        cmd = f"source {shlex.quote(str(rc))} && {shlex.quote(AWS)} ec2 {shlex.join(args)} --output json"
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, f"aws ec2 {' '.join(args)}: {proc.stderr}"
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    ran = aws("run-instances", "--image-id", IMAGE, "--count", "1", "--instance-type", "m1.small")
    iid = ran["Instances"][0]["InstanceId"]
    desc = aws("describe-instances", "--instance-ids", iid)
    assert desc["Reservations"][0]["Instances"][0]["InstanceId"] == iid
    assert desc["Reservations"][0]["Instances"][0]["InstanceType"] == "m1.small"
    vol = aws("create-volume", "--availability-zone", ZONE, "--size", "1")
    assert aws("describe-volumes", "--volume-ids", vol["VolumeId"])["Volumes"][0]["State"] == "available"
    aws("delete-volume", "--volume-id", vol["VolumeId"])
    term = aws("terminate-instances", "--instance-ids", iid)
    assert term["TerminatingInstances"][0]["InstanceId"] == iid


# --------------------------------------------------------------------------- HA cloud


def listed(ec2: Any) -> dict[str, list[tuple[int, str]]]:
    """instance id -> every (state code, state name) DescribeInstances lists for it: one entry
    each, unless an instance is listed twice."""
    out: dict[str, list[tuple[int, str]]] = {}
    for r in ec2.describe_instances()["Reservations"]:
        for i in r["Instances"]:
            out.setdefault(i["InstanceId"], []).append((i["State"]["Code"], i["State"]["Name"]))
    return out


def cc_view(cloud: Cloud, via: str) -> dict[str, Any]:
    """``cc.describe_instances`` of the ENABLED CC, called over the bus through `via`."""
    status, out = cloud.bus_call(via, "cc", "cc.describe_instances", {"instance_ids": None}, partition=ZONE)
    assert status == 200, out
    return dict(out["result"])


def test_ec2_lifecycle_on_ha_cloud_through_the_backup(ha_cloud: Cloud) -> None:
    """Every call enters at node-b (the backups' process) and is forwarded to the primaries."""
    assert ha_cloud.enabled(f"sc/{ZONE}") == f"node-a.sc.{ZONE}"
    lifecycle(client(ha_cloud, "node-b"))


class VolumeLoop:
    """A client creating, snapshotting, attaching and detaching volumes in a loop; records every
    acknowledged volume and snapshot and every error."""

    def __init__(self, ec2: Any, instance: str) -> None:
        self.ec2, self.instance = ec2, instance
        self.volumes: list[tuple[str, float]] = []  # volume id, acknowledged at
        self.snapshots: list[tuple[str, str]] = []  # snapshot id, volume id
        self.attempts = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                with self._lock:
                    self.attempts += 1
                vid = self.ec2.create_volume(AvailabilityZone=ZONE, Size=1)["VolumeId"]
                with self._lock:
                    self.volumes.append((vid, time.monotonic()))
                sid = self.ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
                with self._lock:
                    self.snapshots.append((sid, vid))
                if n % 2:
                    self.ec2.attach_volume(VolumeId=vid, InstanceId=self.instance, Device="/dev/sdf")
                    self.ec2.detach_volume(VolumeId=vid)
            except (ClientError, BotoCoreError) as exc:
                with self._lock:
                    self.errors.append(str(exc))

    def acked_after(self, t: float, n: int = 1) -> bool:
        with self._lock:
            return sum(1 for _, at in self.volumes if at > t) >= n

    def __enter__(self) -> VolumeLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def test_kill9_of_the_sc_primary_loses_no_volume(ha_cloud: Cloud) -> None:
    """kill -9 of node-a (SC, clc and CC primaries) while volumes are made, snapshotted,
    attached and detached through node-b: node-b's SC becomes ENABLED with every acknowledged
    volume and snapshot (rows and files), none duplicated, no attachment left half-way."""
    ec2 = client(ha_cloud, "node-b")
    iid = run_one(ec2)
    with VolumeLoop(ec2, iid) as loop:
        wait_until(lambda: len(loop.volumes) >= 3, timeout=60, what="volumes made before the kill")
        os.kill(ha_cloud.pid("node-a"), signal.SIGKILL)
        killed = time.monotonic()
        wait_until(
            lambda: ha_cloud.enabled(f"sc/{ZONE}", via="node-b") == f"node-b.sc.{ZONE}",
            timeout=30,
            what="the backup SC ENABLED",
        )
        wait_until(lambda: loop.acked_after(killed, 3), timeout=90, what="volumes made after the kill")
    after = sum(1 for _, at in loop.volumes if at > killed)
    print(
        f"volumes acknowledged: {len(loop.volumes)} ({after} after the kill), "
        f"snapshots: {len(loop.snapshots)}"
    )
    assert loop.errors == [], loop.errors
    volumes = {v["VolumeId"]: v for v in ec2.describe_volumes()["Volumes"]}
    acked = [v for v, _ in loop.volumes]
    assert len(set(acked)) == len(acked)
    assert set(acked) <= set(volumes), f"lost: {set(acked) - set(volumes)}"
    assert len(volumes) <= loop.attempts, "a create made two volumes"
    snaps = {s["SnapshotId"]: s for s in ec2.describe_snapshots()["Snapshots"]}
    assert {s for s, _ in loop.snapshots} <= set(snaps)
    assert all(snaps[s]["VolumeId"] == v and snaps[s]["State"] == "completed" for s, v in loop.snapshots)
    files = ha_cloud.root / "node-b" / "sc" / f"node-b.sc.{ZONE}"
    assert {v for v in volumes} <= {p.name for p in (files / "volumes").iterdir()}
    assert set(snaps) <= {p.name for p in (files / "snapshots").iterdir()}

    def settled() -> bool:
        vols = ec2.describe_volumes()["Volumes"]
        return all(a["State"] == "attached" for v in vols for a in v["Attachments"])

    wait_until(settled, timeout=30, what="no attachment left attaching or detaching")
    assert state_of(ec2, iid) == "running"


def test_kill9_of_an_sc_primary_alone_then_its_return(ha_cloud: Cloud) -> None:
    """The SC primary alone on node-b (switched over), the clc staying on node-a: kill -9 of
    node-b under the volume loop; node-a's SC takes over with every acknowledged volume. node-b,
    restarted, catches up and holds the same volume and snapshot files as the primary."""
    proc = ha_cloud.ctl("switchover", f"sc/{ZONE}", "--to", f"node-b.sc.{ZONE}")
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: ha_cloud.enabled(f"sc/{ZONE}") == f"node-b.sc.{ZONE}", what="sc primary on node-b")
    assert ha_cloud.enabled("clc") == "node-a.clc"
    ec2 = client(ha_cloud, "node-a")
    iid = run_one(ec2)
    with VolumeLoop(ec2, iid) as loop:
        wait_until(lambda: len(loop.volumes) >= 2, timeout=60, what="volumes made before the kill")
        os.kill(ha_cloud.pid("node-b"), signal.SIGKILL)
        killed = time.monotonic()
        wait_until(
            lambda: ha_cloud.enabled(f"sc/{ZONE}", via="node-a") == f"node-a.sc.{ZONE}",
            timeout=30,
            what="node-a's SC ENABLED",
        )
        wait_until(lambda: loop.acked_after(killed, 2), timeout=90, what="volumes made after the kill")
    assert loop.errors == [], loop.errors
    volumes = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    assert {v for v, _ in loop.volumes} <= volumes
    assert len(volumes) <= loop.attempts
    snaps = {s["SnapshotId"] for s in ec2.describe_snapshots()["Snapshots"]}
    assert {s for s, _ in loop.snapshots} <= snaps

    run_cli("up", "--dir", str(ha_cloud.root), "--node", "node-b")
    wait_until(
        lambda: ha_cloud.service(f"node-b.sc.{ZONE}", via="node-a")["in_sync"],
        timeout=60,
        what="node-b's SC back in sync",
    )

    def files(node: str) -> tuple[set[str], set[str]]:
        root = ha_cloud.root / node / "sc" / f"{node}.sc.{ZONE}"
        vols = {p.name for p in (root / "volumes").iterdir()}
        return vols, {p.name for p in (root / "snapshots").iterdir()}

    wait_until(lambda: files("node-b") == files("node-a") == (volumes, snaps), timeout=30, what="same files")


def test_deletes_retried_after_a_failover_get_the_first_answer(ha_cloud: Cloud) -> None:
    """DeleteSnapshot, DeleteVolume and TerminateInstances that took effect on the old clc
    primary, retried with the same request id at the new one (what the EC2 front end's bus call
    does when the answer is lost with the primary), answer success, not
    InvalidSnapshot.NotFound / InvalidVolume.NotFound. A new request for the same snapshot or
    volume still gets the EC2 error; terminating a terminated instance succeeds anyway (EC2).
    The retried TerminateInstances answers the previous state its first attempt saw."""

    def settled() -> bool:
        s = {x["name"]: x for x in ha_cloud.services()}
        return s["node-a.clc"]["state"] == "ENABLED" and bool(s["node-b.clc"]["in_sync"])

    wait_until(settled, timeout=30, what="clc HA settled")
    ec2 = client(ha_cloud, "node-a")
    iid = run_one(ec2)
    vid = ec2.create_volume(AvailabilityZone=ZONE, Size=1)["VolumeId"]
    wait_until(
        lambda: ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["State"] == "available",
        timeout=30,
        what=f"{vid} available",
    )
    sid = ec2.create_snapshot(VolumeId=vid)["SnapshotId"]
    wait_until(
        lambda: ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["State"] == "completed",
        timeout=30,
        what=f"{sid} completed",
    )

    def action(via: str, name: str, params: dict[str, str], rid: str) -> tuple[int, Any]:
        caller = {"account": "eucalyptus", "user": "admin"}
        body = {"action": name, "params": params, "caller": caller, "request_id": rid}
        return ha_cloud.bus_call(via, "clc", "ec2.action", body)

    deletes = [
        ("DeleteSnapshot", {"SnapshotId": sid}, "InvalidSnapshot.NotFound"),
        ("DeleteVolume", {"VolumeId": vid}, "InvalidVolume.NotFound"),
        ("TerminateInstances", {"InstanceId.1": iid}, None),
    ]
    first = {}
    for name, params, _ in deletes:
        status, out = action("node-a", name, params, f"rq-{name}")
        assert status == 200, (name, out)
        first[name] = out["result"]
    assert first["TerminateInstances"]["instancesSet"][0]["previousState"]["name"] == "running"
    os.kill(ha_cloud.pid("node-a"), signal.SIGKILL)
    wait_until(
        lambda: ha_cloud.enabled("clc", via="node-b") == "node-b.clc", timeout=30, what="node-b.clc ENABLED"
    )
    for name, params, error in deletes:
        status, out = action("node-b", name, params, f"rq-{name}")
        assert status == 200, (name, out)
        if name == "TerminateInstances":  # the retry answers the previous state the first saw
            assert (
                out["result"]["instancesSet"][0]["previousState"]
                == first[name]["instancesSet"][0]["previousState"]
            ), out
        status, out = action("node-b", name, params, f"rq-{name}-new")
        if error is None:
            assert status == 200, (name, out)
            state = out["result"]["instancesSet"][0]["currentState"]["name"]
            assert state in ("shutting-down", "terminated"), out
        else:
            assert out.get("error") == error, (name, out)


def test_cc_failover_seen_through_describe_instances(ha_cloud: Cloud) -> None:
    """kill -9 of the ENABLED CC's service, then of the runtime hosting the new ENABLED CC, with
    six instances running: every DescribeInstances answer (boto3, through a surviving node) lists
    each instance exactly once, none lost, and the new CC is ENABLED. That the answers come from
    the new CC, not from the clc's records (DescribeInstances shows those when the CC does not
    answer within 3 s): right after each kill an instance's process is killed too; only a live
    CC can report it ``terminated`` (the clc recorded it ``running``)."""
    group = f"cc/{ZONE}"
    ec2 = client(ha_cloud, "node-a")
    ids: list[str] = []
    for _ in range(2):
        res = ec2.run_instances(ImageId=IMAGE, MinCount=3, MaxCount=3, InstanceType="t1.micro")
        ids += [i["InstanceId"] for i in res["Instances"]]
    running = {i: [(16, "running")] for i in ids}
    wait_until(lambda: listed(ec2) == running, timeout=30, what="six instances running")
    before = placeholders(ha_cloud.root)
    assert sorted(before) == sorted(ids)
    answers: list[dict[str, list[tuple[int, str]]]] = []

    def shows(ec2: Any, want: dict[str, list[tuple[int, str]]]) -> bool:
        answers.append(listed(ec2))
        return answers[-1] == want

    def check_answers(victims: set[str]) -> None:
        """Every answer seen: each instance once; running, or (a killed one) terminated."""
        for seen in answers:
            assert sorted(seen) == sorted(ids), seen
            for iid, states in seen.items():
                ok = [(16, "running")] + ([(48, "terminated")] if iid in victims else [])
                assert len(states) == 1 and states[0] in ok, (iid, states)
        answers.clear()

    # 1. kill -9 of the ENABLED CC's service process; the other CC takes over.
    first = wait_until(lambda: ha_cloud.enabled(group), what="an ENABLED cc")
    first_node = first.split(".")[0]
    other = "node-b" if first_node == "node-a" else "node-a"
    os.kill(wait_until(lambda: cc_service_pid(ha_cloud, first_node), what="the cc service"), signal.SIGKILL)
    os.kill(before[ids[0]], signal.SIGKILL)
    via = client(ha_cloud, other)
    want = {**running, ids[0]: [(48, "terminated")]}
    wait_until(lambda: shows(via, want), timeout=30, what=f"{ids[0]} terminated, the rest running")
    check_answers({ids[0]})
    wait_until(lambda: ha_cloud.enabled(group) == f"{other}.cc.{ZONE}", what=f"{other}'s cc ENABLED")
    view = cc_view(ha_cloud, other)
    assert {i["instance_id"]: i["state"] for i in view["instances"]} == {i: s[0][1] for i, s in want.items()}

    # 2. kill -9 of the runtime now hosting the ENABLED CC (with the clc primary, if node-a).
    wait_until(
        lambda: ha_cloud.service(first, via=other)["state"] == "DISABLED", timeout=30, what="old cc DISABLED"
    )
    os.kill(ha_cloud.pid(other), signal.SIGKILL)
    os.kill(before[ids[1]], signal.SIGKILL)
    via = client(ha_cloud, first_node)
    want = {**want, ids[1]: [(48, "terminated")]}
    wait_until(lambda: shows(via, want), timeout=60, what=f"{ids[1]} terminated, the rest running")
    check_answers({ids[0], ids[1]})
    wait_until(lambda: ha_cloud.enabled(group, via=first_node) == first, what=f"{first} ENABLED again")
    view = cc_view(ha_cloud, first_node)
    assert {i["instance_id"]: i["state"] for i in view["instances"]} == {i: s[0][1] for i, s in want.items()}
    assert placeholders(ha_cloud.root) == {i: before[i] for i in ids[2:]}  # none started twice


def test_instances_of_a_dead_nc_are_lost_also_for_a_cold_cc(ha_cloud: Cloud) -> None:
    """The NC's runtime dies (its instances live on): DescribeInstances shows them ``lost``
    (code 96), EC2 goes on. Both CC services killed, the CC enabled next starts cold and never
    sees those instances: still ``lost``, not the clc's ``running``. TerminateInstances of a
    lost instance (through the CC that knows it lost, and through the cold one) answers
    ``shutting-down`` (32) and stays so, its volume still attached. The NC back: the
    placeholders of the terminated instances are stopped, they show ``terminated``, the volume
    is ``available`` and their capacity free; the other instance is ``running``."""
    ec2 = client(ha_cloud, "node-a")
    ids = sorted(
        i["InstanceId"]
        for i in ec2.run_instances(ImageId=IMAGE, MinCount=3, MaxCount=3, InstanceType="t1.micro")[
            "Instances"
        ]
    )
    wait_until(lambda: listed(ec2) == {i: [(16, "running")] for i in ids}, timeout=30, what="running")
    kept = ec2.create_volume(AvailabilityZone=ZONE, Size=1)["VolumeId"]
    assert ec2.attach_volume(VolumeId=kept, InstanceId=ids[0], Device="/dev/sdf")["State"] == "attached"
    pids = placeholders(ha_cloud.root)
    ticks = {i: proc_start_ticks(pids[i]) for i in ids}
    lost = {i: [(96, "lost")] for i in ids}

    def volume() -> tuple[str, list[tuple[str, str]]]:
        [v] = ec2.describe_volumes(VolumeIds=[kept])["Volumes"]
        return v["State"], [(a["InstanceId"], a["State"]) for a in v["Attachments"]]

    def terminate(iid: str) -> list[tuple[int, str, int, str]]:
        term = ec2.terminate_instances(InstanceIds=[iid])["TerminatingInstances"]
        return [
            (
                t["PreviousState"]["Code"],
                t["PreviousState"]["Name"],
                t["CurrentState"]["Code"],
                t["CurrentState"]["Name"],
            )
            for t in term
        ]

    os.kill(ha_cloud.pid("node-c"), signal.SIGKILL)
    wait_until(lambda: listed(ec2) == lost, timeout=30, what="instances lost")
    found = ec2.describe_instances(Filters=[{"Name": "instance-state-name", "Values": ["lost"]}])
    assert sorted(i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]) == ids
    with pytest.raises(ClientError) as e:  # nowhere to place it; everything else answers
        ec2.run_instances(ImageId=IMAGE, MinCount=1, MaxCount=1, InstanceType="t1.micro")
    assert code(e) == "InsufficientInstanceCapacity"
    vid = ec2.create_volume(AvailabilityZone=ZONE, Size=1)["VolumeId"]
    ec2.delete_volume(VolumeId=vid)
    assert terminate(ids[0]) == [(96, "lost", 32, "shutting-down")]  # the CC cannot reach its NC
    assert listed(ec2) == {**lost, ids[0]: [(32, "shutting-down")]}
    assert volume() == ("in-use", [(ids[0], "attached")])  # the NC may still use it

    old = {
        n: wait_until(lambda n=n: cc_service_pid(ha_cloud, n), what=f"{n}'s cc") for n in ("node-a", "node-b")
    }
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)

    def cold() -> bool:
        view = cc_view(ha_cloud, "node-a")
        return view["instances"] == [] and view["nodes"] == {f"node-c.nc.{ZONE}": "lost"}

    wait_until(cold, timeout=60, what="a cold CC ENABLED")
    assert listed(ec2) == {**lost, ids[0]: [(32, "shutting-down")]}
    # This CC never saw ids[1]: it answers "terminated", which no NC said.
    assert terminate(ids[1]) == [(96, "lost", 32, "shutting-down")]
    assert listed(ec2) == {
        ids[0]: [(32, "shutting-down")],
        ids[1]: [(32, "shutting-down")],
        ids[2]: [(96, "lost")],
    }
    assert volume() == ("in-use", [(ids[0], "attached")])
    # A detach cannot reach the NC either: "detaching", the volume is not freed behind the NC.
    assert ec2.detach_volume(VolumeId=kept)["State"] == "detaching"
    assert volume() == ("in-use", [(ids[0], "detaching")])
    with pytest.raises(ClientError) as e:
        ec2.delete_volume(VolumeId=kept)
    assert code(e) == "VolumeInUse"
    assert {i: proc_start_ticks(pids[i]) for i in ids} == ticks  # every placeholder lives on

    run_cli("up", "--dir", str(ha_cloud.root), "--node", "node-c")
    after = {ids[0]: [(48, "terminated")], ids[1]: [(48, "terminated")], ids[2]: [(16, "running")]}
    wait_until(
        lambda: listed(ec2) == after, timeout=60, what="terminated by the reconciler, the rest running"
    )
    assert {i: proc_start_ticks(pids[i]) == ticks[i] for i in ids} == {
        ids[0]: False,
        ids[1]: False,
        ids[2]: True,
    }
    assert placeholders(ha_cloud.root) == {ids[2]: pids[ids[2]]}
    assert volume() == ("available", [])
    # 8 cores on the NC: 7 t1.micro fit only if the two terminated ones gave theirs back.
    more = ec2.run_instances(ImageId=IMAGE, MinCount=7, MaxCount=7, InstanceType="t1.micro")["Instances"]
    assert len(more) == 7
