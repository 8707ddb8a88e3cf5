"""The EC2 logic of the clc against a fake CC at the bus boundary and a real SC component.

Requests are built by botocore's own EC2 serializer and answers read back by botocore's own
EC2 parser (the code boto3 and the AWS CLI run), so query parsing and the XML are checked
against the real client model, without a network."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.parsers import create_parser
from botocore.serialize import create_serializer
from cluster_fakes import REQ, Bus, FakeCC, LocalCtx

from euca_runtime.component import RequestError, ServiceUnavailable
from euca_runtime.services.clc import Clc, registry_put_op, row_put_op
from euca_runtime.services.ec2 import DEFAULT_IMAGE_ID, render_error, render_result
from euca_runtime.services.sc import Sc

MODEL = botocore.session.get_session().get_service_model("ec2")
SERIALIZER = create_serializer("ec2")
PARSER = create_parser("ec2")
CALLER = {"account": "eucalyptus", "account_id": "123456789012", "user": "admin"}
ZONE = "cluster01"


class Cloud:
    """A clc (real store, real Ec2 logic) wired to a fake CC and a real SC through `Bus`."""

    def __init__(self, root: Path, slots: int = 4) -> None:
        self.loop = asyncio.new_event_loop()
        (root / "clc").mkdir()
        (root / "sc").mkdir()
        self.clc_ctx = LocalCtx(root / "clc", "clc", None, "clc")
        self.sc_ctx = LocalCtx(root / "sc", "sc", ZONE, "sc")
        self.cc = FakeCC(slots)
        self.sc = Sc(self.sc_ctx)
        self.bus = Bus(ZONE, self.cc, self.sc)
        self.clc_ctx.bus = self.bus
        self.clc_ctx.node = self.bus
        self.clc = Clc(self.clc_ctx)
        self.run(
            self.clc_ctx.write(
                [
                    row_put_op(
                        "iam_account", {"name": "eucalyptus", "account_id": "123456789012", "created_ts": 1.0}
                    ),
                    row_put_op(
                        "iam_account", {"name": "other", "account_id": "210987654321", "created_ts": 1.0}
                    ),
                    *(
                        registry_put_op(
                            {
                                "name": f"node-a.{t}.{ZONE}",
                                "type": t,
                                "partition": ZONE,
                                "node": "node-a",
                                "host": None,
                                "registered": True,
                                "updated_ts": 1.0,
                            }
                        )
                        for t in ("sc", "cc")
                    ),
                ]
            )
        )
        self.run(self.clc.ec2._ensure_default_image())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def raw(
        self, action: str, params: dict[str, Any], caller: dict[str, Any] | None = None, rid: str = "r1"
    ) -> Any:
        body = {"action": action, "params": params, "caller": caller or CALLER, "request_id": rid}
        return self.run(self.clc.ec2.action(body, REQ))

    def raw_error(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            self.raw(action, params)
        except RequestError as exc:
            return {"Error": {"Code": exc.kind, "Message": exc.message}}
        return {}

    def api(
        self, action: str, caller: dict[str, Any] | None = None, rid: str | None = None, **kwargs: Any
    ) -> Any:
        """Serialize like botocore, run the action, render, parse like botocore."""
        op = MODEL.operation_model(action)
        req = SERIALIZER.serialize_to_request(kwargs, op)
        params = {k: v for k, v in req["body"].items() if k not in ("Action", "Version")}
        # A new request id per call, as the front end gives (id() of a dict is reused once it
        # is freed: a second DeleteSnapshot then looked like a retry of the first).
        rid = rid or f"rid-{action}-{uuid.uuid4().hex}"
        try:
            result = self.raw(action, params, caller, rid)
        except RequestError as exc:
            xml = render_error(exc.kind, exc.message, rid)
            parsed = PARSER.parse({"body": xml.encode(), "headers": {}, "status_code": 400}, op.output_shape)
            return parsed
        xml = render_result(action, result, rid)
        return PARSER.parse({"body": xml.encode(), "headers": {}, "status_code": 200}, op.output_shape)

    def close(self) -> None:
        self.clc.ec2.on_disabled()
        self.run(self.sc.close())
        self.clc_ctx.close()
        self.sc_ctx.close()
        self.loop.close()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    c = Cloud(tmp_path)
    try:
        yield c
    finally:
        c.close()


def code(resp: Any) -> str | None:
    return resp.get("Error", {}).get("Code")


def test_zones_and_images(cloud: Cloud) -> None:
    zones = cloud.api("DescribeAvailabilityZones")["AvailabilityZones"]
    assert [(z["ZoneName"], z["State"]) for z in zones] == [(ZONE, "available")]
    cloud.cc.down = True
    assert cloud.api("DescribeAvailabilityZones")["AvailabilityZones"][0]["State"] == "unavailable"
    assert code(cloud.api("DescribeAvailabilityZones", ZoneNames=["nope"])) == "InvalidParameterValue"
    images = cloud.api("DescribeImages")["Images"]
    assert [i["ImageId"] for i in images] == [DEFAULT_IMAGE_ID]
    assert images[0]["Public"] is True and images[0]["State"] == "available"
    new = cloud.api("RegisterImage", Name="my-image", ImageLocation="bucket/my.manifest.xml")["ImageId"]
    assert new.startswith("emi-")
    assert code(cloud.api("RegisterImage", Name="my-image")) == "InvalidAMIName.Duplicate"
    assert {i["ImageId"] for i in cloud.api("DescribeImages", Owners=["self"])["Images"]} == {
        DEFAULT_IMAGE_ID,
        new,
    }
    other = {"account": "other", "account_id": "210987654321", "user": "admin"}
    assert [i["ImageId"] for i in cloud.api("DescribeImages", caller=other)["Images"]] == [DEFAULT_IMAGE_ID]
    assert code(cloud.api("DescribeImages", caller=other, ImageIds=[new])) == "InvalidAMIID.NotFound"
    assert code(cloud.api("DescribeImages", ImageIds=["ami-zz"])) == "InvalidAMIID.Malformed"


def test_run_describe_terminate(cloud: Cloud) -> None:
    res = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=2, MaxCount=2, InstanceType="t1.micro")
    assert "Error" not in res, res
    ids = [i["InstanceId"] for i in res["Instances"]]
    assert len(ids) == 2 and all(i.startswith("i-") for i in ids)
    assert res["ReservationId"].startswith("r-") and res["OwnerId"] == "123456789012"
    assert {i["State"]["Name"] for i in res["Instances"]} == {"pending"}
    assert res["Instances"][0]["Placement"]["AvailabilityZone"] == ZONE
    desc = cloud.api("DescribeInstances", InstanceIds=[ids[0]])
    assert [[i["InstanceId"] for i in r["Instances"]] for r in desc["Reservations"]] == [[ids[0]]]
    assert desc["Reservations"][0]["Instances"][0]["State"] == {"Code": 16, "Name": "running"}
    running = cloud.api("DescribeInstances", Filters=[{"Name": "instance-state-name", "Values": ["running"]}])
    assert sorted(i["InstanceId"] for r in running["Reservations"] for i in r["Instances"]) == sorted(ids)
    term = cloud.api("TerminateInstances", InstanceIds=ids)
    assert [
        (t["PreviousState"]["Name"], t["CurrentState"]["Name"]) for t in term["TerminatingInstances"]
    ] == [("running", "terminated")] * 2
    desc = cloud.api("DescribeInstances")
    assert {i["State"]["Name"] for r in desc["Reservations"] for i in r["Instances"]} == {"terminated"}
    again = cloud.api("TerminateInstances", InstanceIds=ids)  # idempotent
    assert {t["PreviousState"]["Name"] for t in again["TerminatingInstances"]} == {"terminated"}


def test_run_errors(cloud: Cloud) -> None:
    assert (
        code(cloud.api("RunInstances", ImageId="emi-12345678", MinCount=1, MaxCount=1))
        == "InvalidAMIID.NotFound"
    )
    assert (
        code(cloud.api("RunInstances", ImageId="bogus", MinCount=1, MaxCount=1)) == "InvalidAMIID.Malformed"
    )
    bad_type = cloud.api(
        "RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=1, MaxCount=1, InstanceType="x9.huge"
    )
    assert code(bad_type) == "InvalidParameterValue"
    assert (
        code(cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=3, MaxCount=2))
        == "InvalidParameterValue"
    )
    assert (
        code(cloud.raw_error("RunInstances", {"ImageId": DEFAULT_IMAGE_ID, "MaxCount": "1"}))
        == "MissingParameter"
    )
    placed = cloud.api(
        "RunInstances",
        ImageId=DEFAULT_IMAGE_ID,
        MinCount=1,
        MaxCount=1,
        Placement={"AvailabilityZone": "elsewhere"},
    )
    assert code(placed) == "InvalidParameterValue"
    assert code(cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=5, MaxCount=5)) == (
        "InsufficientInstanceCapacity"
    )
    assert cloud.api("DescribeInstances")["Reservations"] == []  # the refused launch left nothing
    # MinCount < MaxCount: as many as fit.
    res = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=2, MaxCount=6)
    assert len(res["Instances"]) == 2
    assert code(cloud.api("DescribeInstances", InstanceIds=["i-0000dead"])) == "InvalidInstanceID.NotFound"
    assert code(cloud.api("DescribeInstances", InstanceIds=["x-1"])) == "InvalidInstanceID.Malformed"
    assert code(cloud.api("TerminateInstances", InstanceIds=["i-0000dead"])) == "InvalidInstanceID.NotFound"
    other = {"account": "other", "account_id": "210987654321", "user": "admin"}
    mine = res["Instances"][0]["InstanceId"]
    assert (
        code(cloud.api("DescribeInstances", caller=other, InstanceIds=[mine])) == "InvalidInstanceID.NotFound"
    )


def test_client_token_retry_never_launches_twice(cloud: Cloud) -> None:
    first = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=1, MaxCount=1, ClientToken="tok-1")
    second = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=1, MaxCount=1, ClientToken="tok-1")
    assert first["ReservationId"] == second["ReservationId"]
    assert first["Instances"][0]["InstanceId"] == second["Instances"][0]["InstanceId"]
    assert len(cloud.cc.instances) == 1
    # The same request id forwarded again (a clc failover) is recognised too.
    params = {"ImageId": DEFAULT_IMAGE_ID, "MinCount": "1", "MaxCount": "1"}
    a = cloud.raw("RunInstances", params, rid="same")
    b = cloud.raw("RunInstances", params, rid="same")
    assert a["reservationId"] == b["reservationId"] and len(cloud.cc.instances) == 2


def test_cc_unavailable_leaves_an_intent_the_reconciler_finishes(cloud: Cloud) -> None:
    cloud.cc.down = True
    with pytest.raises(ServiceUnavailable):
        cloud.raw("RunInstances", {"ImageId": DEFAULT_IMAGE_ID, "MinCount": "1", "MaxCount": "1"}, rid="x")
    desc = cloud.api("DescribeInstances")
    [inst] = [i for r in desc["Reservations"] for i in r["Instances"]]
    assert inst["State"]["Name"] == "pending" and not cloud.cc.instances
    cloud.cc.down = False
    assert cloud.run(cloud.clc.ec2.reconcile(grace=3600)) == 0  # young: left to its request
    assert not cloud.cc.instances
    assert cloud.run(cloud.clc.ec2.reconcile()) >= 1
    assert list(cloud.cc.instances) == [inst["InstanceId"]]
    # Same for a terminate cut short.
    cloud.cc.down = True  # TerminateInstances records the intent and answers shutting-down
    term = cloud.api("TerminateInstances", InstanceIds=[inst["InstanceId"]])
    assert term["TerminatingInstances"][0]["CurrentState"]["Name"] == "shutting-down"
    cloud.cc.down = False
    desc = cloud.api("DescribeInstances", InstanceIds=[inst["InstanceId"]])
    assert desc["Reservations"][0]["Instances"][0]["State"]["Name"] == "shutting-down"
    cloud.run(cloud.clc.ec2.reconcile())
    desc = cloud.api("DescribeInstances", InstanceIds=[inst["InstanceId"]])
    assert desc["Reservations"][0]["Instances"][0]["State"]["Name"] == "terminated"


def test_instances_of_a_lost_nc_are_lost_even_for_a_cc_that_never_saw_them(cloud: Cloud) -> None:
    """The NC stops answering: its instances are ``lost`` (code 96). A CC enabled after that
    (cold: it never saw them, `scheduler.rebuild` gives the lost NC no instances) answers without
    them: still ``lost``, not the clc's last known ``running``. A CC that does not answer at all
    leaves the clc's last known state; the NC back, they are ``running`` again."""
    res = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=2, MaxCount=2)
    ids = sorted(i["InstanceId"] for i in res["Instances"])

    def shown(**kwargs: Any) -> dict[str, tuple[int, str]]:
        desc = cloud.api("DescribeInstances", **kwargs)
        return {
            i["InstanceId"]: (i["State"]["Code"], i["State"]["Name"])
            for r in desc["Reservations"]
            for i in r["Instances"]
        }

    assert shown() == dict.fromkeys(ids, (16, "running"))
    cloud.cc.nc_lost = True
    assert shown() == dict.fromkeys(ids, (96, "lost"))
    cloud.cc.restart_cold()
    assert not cloud.cc.instances  # the new CC has no record of them
    assert shown() == dict.fromkeys(ids, (96, "lost"))
    assert shown(InstanceIds=[ids[0]]) == {ids[0]: (96, "lost")}
    lost = shown(Filters=[{"Name": "instance-state-name", "Values": ["lost"]}])
    assert sorted(lost) == ids
    cloud.cc.down = True  # no CC view at all: the clc's last known state (the launch's answer)
    assert shown() == dict.fromkeys(ids, (0, "pending"))
    cloud.cc.down = False
    cloud.cc.nc_back()  # the NC answers again with its instances (they lived on)
    assert shown() == dict.fromkeys(ids, (16, "running"))


def test_terminating_an_instance_of_a_lost_nc_waits_for_the_nc(cloud: Cloud) -> None:
    """TerminateInstances of a ``lost`` instance: the CC cannot reach its NC, so the clc keeps it
    ``shutting-down`` (code 32), its volume still attached, also with a CC enabled cold after the
    NC died (it answers ``terminated`` for an instance it never saw). The NC back, the reconciler
    terminates them: ``terminated``, the NC no longer runs them, the volume and the capacity are
    free. The request retried with its request id (a clc failover) answers as the first time."""
    res = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=2, MaxCount=2)
    ids = sorted(i["InstanceId"] for i in res["Instances"])
    vid = cloud.api("CreateVolume", AvailabilityZone=ZONE, Size=1)["VolumeId"]
    cloud.api("DescribeInstances")  # the fake NC boots them
    cloud.api("AttachVolume", VolumeId=vid, InstanceId=ids[0], Device="/dev/sdf")

    def shown() -> dict[str, tuple[int, str]]:
        desc = cloud.api("DescribeInstances")
        return {
            i["InstanceId"]: (i["State"]["Code"], i["State"]["Name"])
            for r in desc["Reservations"]
            for i in r["Instances"]
        }

    def states(term: Any) -> list[tuple[str, int, str, int, str]]:
        return [
            (
                t["InstanceId"],
                t["PreviousState"]["Code"],
                t["PreviousState"]["Name"],
                t["CurrentState"]["Code"],
                t["CurrentState"]["Name"],
            )
            for t in term["TerminatingInstances"]
        ]

    def volume() -> tuple[str, list[tuple[str, str]]]:
        [v] = cloud.api("DescribeVolumes", VolumeIds=[vid])["Volumes"]
        return v["State"], [(a["InstanceId"], a["State"]) for a in v["Attachments"]]

    cloud.cc.nc_lost = True
    term = cloud.api("TerminateInstances", rid="term-0", InstanceIds=[ids[0]])
    assert states(term) == [(ids[0], 96, "lost", 32, "shutting-down")]
    assert cloud.cc.instances[ids[0]]["state"] == "running"  # the NC still runs it
    assert shown() == {ids[0]: (32, "shutting-down"), ids[1]: (96, "lost")}
    assert volume() == ("in-use", [(ids[0], "attached")])  # the NC may still use it
    cloud.run(cloud.clc.ec2.reconcile())
    assert shown() == {ids[0]: (32, "shutting-down"), ids[1]: (96, "lost")}
    # The same request again (its retry after a clc failover): the same answer, nothing else.
    assert states(cloud.api("TerminateInstances", rid="term-0", InstanceIds=[ids[0]])) == states(term)

    cloud.cc.restart_cold()  # this CC never saw them: it answers "terminated" (no NC said so)
    term = cloud.api("TerminateInstances", rid="term-1", InstanceIds=ids)
    assert states(term) == [
        (ids[0], 32, "shutting-down", 32, "shutting-down"),
        (ids[1], 96, "lost", 32, "shutting-down"),
    ]
    cloud.run(cloud.clc.ec2.reconcile())
    assert shown() == dict.fromkeys(ids, (32, "shutting-down"))
    assert {i: cloud.cc.unseen[i]["state"] for i in ids} == dict.fromkeys(ids, "running")
    assert volume() == ("in-use", [(ids[0], "attached")])
    # Detaching it cannot reach the NC either: it stays "detaching", never freed behind the NC.
    assert cloud.api("DetachVolume", VolumeId=vid)["State"] == "detaching"
    cloud.run(cloud.clc.ec2.reconcile())
    assert volume() == ("in-use", [(ids[0], "detaching")])
    assert code(cloud.api("DeleteVolume", VolumeId=vid)) == "VolumeInUse"

    cloud.cc.nc_back()
    assert shown() == dict.fromkeys(ids, (32, "shutting-down"))  # running again at the NC
    assert code(cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=4, MaxCount=4)) == (
        "InsufficientInstanceCapacity"  # they still hold 2 of the 4 slots
    )
    cloud.run(cloud.clc.ec2.reconcile())
    assert {i: cloud.cc.instances[i]["state"] for i in ids} == dict.fromkeys(ids, "terminated")
    assert shown() == dict.fromkeys(ids, (48, "terminated"))
    assert volume() == ("available", [])
    retry = cloud.api("TerminateInstances", rid="term-1", InstanceIds=ids)  # its previous states
    assert states(retry) == [(i, c, n, 48, "terminated") for i, c, n, _, _ in states(term)]
    again = cloud.api("TerminateInstances", InstanceIds=ids)  # a new request: terminated already
    assert states(again) == [(i, 48, "terminated", 48, "terminated") for i in ids]
    more = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=4, MaxCount=4)
    assert len(more["Instances"]) == 4  # the capacity is free again


def test_a_lost_nc_deregistered_ends_the_terminate_of_its_instances(cloud: Cloud) -> None:
    """An NC that will never come back: once the operator deregisters it, the CC forgets it, and
    the reconciler takes the CC's ``terminated`` as final and frees the volume."""
    iid = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    vid = cloud.api("CreateVolume", AvailabilityZone=ZONE, Size=1)["VolumeId"]
    cloud.api("DescribeInstances")
    cloud.api("AttachVolume", VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
    cloud.cc.nc_lost = True

    def state() -> str:
        desc = cloud.api("DescribeInstances", InstanceIds=[iid])
        return str(desc["Reservations"][0]["Instances"][0]["State"]["Name"])

    term = cloud.api("TerminateInstances", InstanceIds=[iid])
    assert term["TerminatingInstances"][0]["CurrentState"]["Name"] == "shutting-down"
    cloud.run(cloud.clc.ec2.reconcile())
    assert state() == "shutting-down"
    assert cloud.api("DescribeVolumes", VolumeIds=[vid])["Volumes"][0]["State"] == "in-use"
    cloud.cc.deregister_nc()
    cloud.run(cloud.clc.ec2.reconcile())
    assert state() == "terminated"
    assert cloud.api("DescribeVolumes", VolumeIds=[vid])["Volumes"][0]["State"] == "available"


def test_an_instance_missing_from_an_up_nc_keeps_the_clcs_state(cloud: Cloud) -> None:
    """Only a lost NC makes a missing instance ``lost``: an NC that answers without it (a CC
    whose view is older than the launch) leaves the clc's last known state."""
    res = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=1, MaxCount=1)
    iid = res["Instances"][0]["InstanceId"]
    cloud.cc.instances.clear()
    desc = cloud.api("DescribeInstances", InstanceIds=[iid])
    assert desc["Reservations"][0]["Instances"][0]["State"]["Name"] == "pending"


def test_volume_lifecycle_with_attach(cloud: Cloud) -> None:
    iid = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    cloud.api("DescribeInstances")  # the fake NC boots it
    vol = cloud.api("CreateVolume", AvailabilityZone=ZONE, Size=1)
    vid = vol["VolumeId"]
    assert vol["State"] == "available" and vol["Size"] == 1 and vol["AvailabilityZone"] == ZONE
    att = cloud.api("AttachVolume", VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
    assert (att["State"], att["InstanceId"], att["Device"]) == ("attached", iid, "/dev/sdf")
    assert cloud.cc.instances[iid]["volumes"] == [{"volume_id": vid, "device": "/dev/sdf"}]
    again = cloud.api("AttachVolume", VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
    assert again["State"] == "attached"
    [v] = cloud.api("DescribeVolumes", VolumeIds=[vid])["Volumes"]
    assert v["State"] == "in-use" and v["Attachments"][0]["InstanceId"] == iid
    assert code(cloud.api("DeleteVolume", VolumeId=vid)) == "VolumeInUse"
    other = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    cloud.api("DescribeInstances")
    assert code(cloud.api("AttachVolume", VolumeId=vid, InstanceId=other, Device="/dev/sdg")) == "VolumeInUse"
    assert (
        code(cloud.api("AttachVolume", VolumeId=vid, InstanceId=iid, Device="sdf")) == "InvalidParameterValue"
    )
    assert code(cloud.api("DetachVolume", VolumeId=vid, InstanceId=other)) == "InvalidAttachment.NotFound"
    det = cloud.api("DetachVolume", VolumeId=vid)
    assert det["State"] == "detached" and cloud.cc.instances[iid]["volumes"] == []
    assert code(cloud.api("DetachVolume", VolumeId=vid)) == "IncorrectState"
    assert cloud.api("DescribeVolumes", VolumeIds=[vid])["Volumes"][0]["State"] == "available"
    cloud.api("DeleteVolume", VolumeId=vid)
    assert code(cloud.api("DescribeVolumes", VolumeIds=[vid])) == "InvalidVolume.NotFound"
    assert code(cloud.api("DeleteVolume", VolumeId=vid)) == "InvalidVolume.NotFound"
    assert code(cloud.api("CreateVolume", AvailabilityZone="nowhere", Size=1)) == "InvalidParameterValue"
    assert code(cloud.api("CreateVolume", AvailabilityZone=ZONE, Size=0)) == "InvalidParameterValue"
    assert code(cloud.api("CreateVolume", AvailabilityZone=ZONE)) == "MissingParameter"
    assert code(cloud.api("AttachVolume", VolumeId="vol-0000dead", InstanceId=iid, Device="/dev/sdf")) == (
        "InvalidVolume.NotFound"
    )


def test_terminate_frees_attached_volumes(cloud: Cloud) -> None:
    iid = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    cloud.api("DescribeInstances")
    vid = cloud.api("CreateVolume", AvailabilityZone=ZONE, Size=1)["VolumeId"]
    cloud.api("AttachVolume", VolumeId=vid, InstanceId=iid, Device="/dev/sdf")
    cloud.api("TerminateInstances", InstanceIds=[iid])
    [v] = cloud.api("DescribeVolumes", VolumeIds=[vid])["Volumes"]
    assert v["State"] == "available" and v["Attachments"] == []
    assert code(cloud.api("AttachVolume", VolumeId=vid, InstanceId=iid, Device="/dev/sdf")) == (
        "IncorrectInstanceState"
    )


def test_attach_interrupted_by_a_failover_is_finished(cloud: Cloud) -> None:
    iid = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=1, MaxCount=1)["Instances"][0][
        "InstanceId"
    ]
    cloud.api("DescribeInstances")
    vid = cloud.api("CreateVolume", AvailabilityZone=ZONE, Size=1)["VolumeId"]
    # The clc died after step 1 (the SC reserved the volume) and before the NC attached it.
    cloud.run(
        cloud.sc.mark_attached(
            {"volume_id": vid, "instance_id": iid, "device": "/dev/sdf", "status": "attaching"}, REQ
        )
    )
    [v] = cloud.api("DescribeVolumes", VolumeIds=[vid])["Volumes"]
    assert v["Attachments"][0]["State"] == "attaching"
    cloud.run(cloud.clc.ec2.reconcile())
    [v] = cloud.api("DescribeVolumes", VolumeIds=[vid])["Volumes"]
    assert v["Attachments"][0]["State"] == "attached"
    assert cloud.cc.instances[iid]["volumes"] == [{"volume_id": vid, "device": "/dev/sdf"}]
    # And a detach cut short after its first step.
    cloud.run(cloud.sc.mark_detached({"volume_id": vid, "status": "detaching"}, REQ))
    cloud.run(cloud.clc.ec2.reconcile())
    [v] = cloud.api("DescribeVolumes", VolumeIds=[vid])["Volumes"]
    assert v["State"] == "available" and cloud.cc.instances[iid]["volumes"] == []


def test_snapshot_lifecycle(cloud: Cloud) -> None:
    vid = cloud.api("CreateVolume", AvailabilityZone=ZONE, Size=2)["VolumeId"]
    snap = cloud.api("CreateSnapshot", VolumeId=vid, Description="first")
    sid = snap["SnapshotId"]
    assert sid.startswith("snap-") and snap["State"] == "completed" and snap["VolumeSize"] == 2
    [s] = cloud.api("DescribeSnapshots", OwnerIds=["self"])["Snapshots"]
    assert (s["SnapshotId"], s["VolumeId"], s["Description"], s["Progress"]) == (sid, vid, "first", "100%")
    from_snap = cloud.api("CreateVolume", AvailabilityZone=ZONE, SnapshotId=sid)
    assert from_snap["Size"] == 2 and from_snap["SnapshotId"] == sid
    assert (
        code(cloud.api("CreateVolume", AvailabilityZone=ZONE, SnapshotId=sid, Size=1))
        == "InvalidParameterValue"
    )
    cloud.api("DeleteSnapshot", SnapshotId=sid)
    assert cloud.api("DescribeSnapshots")["Snapshots"] == []
    assert code(cloud.api("DeleteSnapshot", SnapshotId=sid)) == "InvalidSnapshot.NotFound"
    assert code(cloud.api("CreateSnapshot", VolumeId="vol-0000dead")) == "InvalidVolume.NotFound"
    assert code(cloud.api("DescribeSnapshots", SnapshotIds=["snap-zz"])) == "InvalidSnapshotID.Malformed"


def test_sc_unavailable_then_reconciled(cloud: Cloud) -> None:
    cloud.bus.sc_down = True
    with pytest.raises(ServiceUnavailable):
        cloud.raw("CreateVolume", {"AvailabilityZone": ZONE, "Size": "1"}, rid="v1")
    cloud.bus.sc_down = False
    [v] = cloud.api("DescribeVolumes")["Volumes"]
    assert v["State"] == "creating"
    cloud.run(cloud.clc.ec2.reconcile())
    [v] = cloud.api("DescribeVolumes")["Volumes"]
    assert v["State"] == "available"
    again = cloud.raw("CreateVolume", {"AvailabilityZone": ZONE, "Size": "1"}, rid="v1")  # the client's retry
    assert again["volumeId"] == v["VolumeId"] and len(cloud.api("DescribeVolumes")["Volumes"]) == 1


def test_unknown_action_and_account(cloud: Cloud) -> None:
    with pytest.raises(RequestError) as info:
        cloud.raw("RebootInstances", {})
    assert info.value.kind == "InvalidAction"
    with pytest.raises(RequestError) as info:
        cloud.raw("DescribeImages", {}, caller={"account": "ghost", "user": "x"})
    assert info.value.kind == "AuthFailure"


def test_error_document_parses_as_ec2_error() -> None:
    xml = render_error("InvalidInstanceID.NotFound", "The instance ID 'i-1' does not exist", "rid-1")
    op = MODEL.operation_model("DescribeInstances")
    parsed = PARSER.parse({"body": xml.encode(), "headers": {}, "status_code": 400}, op.output_shape)
    assert parsed["Error"]["Code"] == "InvalidInstanceID.NotFound"
    assert parsed["ResponseMetadata"]["RequestId"] == "rid-1"


def test_run_without_a_registered_cc_is_refused_at_once(cloud: Cloud) -> None:
    cloud.run(cloud.clc_ctx.write([{"op": "delete", "table": "registry", "name": f"node-a.cc.{ZONE}"}]))
    res = cloud.api("RunInstances", ImageId=DEFAULT_IMAGE_ID, MinCount=1, MaxCount=1)
    assert code(res) == "InsufficientInstanceCapacity"
    assert cloud.api("DescribeInstances")["Reservations"] == [] and not cloud.cc.calls
    assert cloud.api("DescribeAvailabilityZones")["AvailabilityZones"][0]["ZoneName"] == ZONE  # the sc's zone
