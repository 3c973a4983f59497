"""Living campaigns through the real gRPC API: late enrollees, one job per device, target counts,
deadlines, pause, resume and cancel. The control loop's pass is driven by hand on a fake clock."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from protos.pocketlora.v1 import admin_service_pb2 as adpb
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.api import SPEC, enroll, lease
from tests.support.orch import FakeClock, ServerThread, op_md

BETA = tpb.DeviceSelector(labels={"tier": "beta"})


def create(srv: ServerThread, **kw: object) -> opb.Campaign:
    req = opb.SubmitCampaignRequest(name="spring", selector=BETA, training=SPEC, **kw)  # type: ignore[arg-type]
    return srv.operator.SubmitCampaign(req, metadata=op_md()).campaign


def get(srv: ServerThread, campaign_id: str) -> opb.Campaign:
    return srv.operator.GetCampaign(opb.GetCampaignRequest(campaign_id=campaign_id), metadata=op_md()).campaign


def relabel(srv: ServerThread, device_id: str, labels: dict[str, str]) -> None:
    srv.admin.SetDeviceLabels(adpb.SetDeviceLabelsRequest(device_id=device_id, labels=labels), metadata=op_md())


def jobs_of(srv: ServerThread, campaign_id: str) -> list[tpb.Job]:
    flt = tpb.JobFilter(campaign_id=campaign_id)
    return list(srv.operator.ListJobs(opb.ListJobsRequest(filter=flt, page_size=1000), metadata=op_md()).jobs)


def test_devices_that_enroll_or_start_matching_later_get_one_job_each(srv: ServerThread, clock: FakeClock) -> None:
    for i in range(3):
        enroll(srv, f"early-{i}", labels={"tier": "beta"})
    enroll(srv, "ga-phone", labels={"tier": "ga"})
    c = create(srv)
    assert c.job_count == 3 and c.state == tpb.CAMPAIGN_STATE_ACTIVE and c.enrolling
    assert c.training.adapter_name == "persona"
    clock.advance(5)
    late = {f"late-{i}": enroll(srv, f"late-{i}", labels={"tier": "beta"}) for i in range(2)}
    relabel(srv, "ga-phone", {"tier": "beta"})  # an admin's label makes it match now
    assert srv.orch.control_tick().campaign_jobs == 3
    for _ in range(3):  # later passes and relabelling create nothing twice
        clock.advance(3)
        relabel(srv, "late-0", {"tier": "beta", "again": "yes"})
        assert srv.orch.control_tick().campaign_jobs == 0
    jobs = jobs_of(srv, c.campaign_id)
    assert sorted(j.device_id for j in jobs) == ["early-0", "early-1", "early-2", "ga-phone", "late-0", "late-1"]
    got = get(srv, c.campaign_id)
    assert got.job_count == 6 and got.jobs_by_state == {"JOB_STATE_QUEUED": 6}
    # The late device leases its job like any other.
    a = lease(srv, "late-1", late["late-1"])
    assert a is not None and a.job_id in {j.job_id for j in jobs}


def test_target_count_and_deadline_close_the_campaign(srv: ServerThread, clock: FakeClock) -> None:
    for i in range(3):
        enroll(srv, f"d{i}", labels={"tier": "beta"})
    capped = create(srv, target_count=4)
    assert capped.job_count == 3 and capped.enrolling
    dated = create(srv, deadline=Timestamp(seconds=int(clock.now) + 60))
    assert dated.job_count == 3
    clock.advance(10)
    for i in range(3, 6):
        enroll(srv, f"d{i}", labels={"tier": "beta"})
    srv.orch.control_tick()
    capped, dated = get(srv, capped.campaign_id), get(srv, dated.campaign_id)
    assert capped.job_count == 4 and capped.state == tpb.CAMPAIGN_STATE_CLOSED and not capped.enrolling
    assert dated.job_count == 6 and dated.state == tpb.CAMPAIGN_STATE_ACTIVE
    clock.advance(60)  # past the deadline: no more jobs, the campaign closes
    enroll(srv, "d9", labels={"tier": "beta"})
    srv.orch.control_tick()
    dated = get(srv, dated.campaign_id)
    assert dated.job_count == 6 and dated.state == tpb.CAMPAIGN_STATE_CLOSED
    # A target below the matching devices picks that many of them.
    few = create(srv, target_count=2)
    assert few.job_count == 2 and few.state == tpb.CAMPAIGN_STATE_CLOSED


def test_pause_stops_leases_and_fan_out_and_resume_catches_up(srv: ServerThread, clock: FakeClock) -> None:
    md = enroll(srv, "p1", labels={"tier": "beta"})
    c = create(srv)
    paused = srv.operator.PauseCampaign(opb.PauseCampaignRequest(campaign_id=c.campaign_id), metadata=op_md())
    assert paused.campaign.state == tpb.CAMPAIGN_STATE_PAUSED and not paused.campaign.enrolling
    assert lease(srv, "p1", md) is None  # its job stays QUEUED
    single = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="p1", training=SPEC), metadata=op_md()).job
    got = lease(srv, "p1", md)
    assert got is not None and got.job_id == single.job_id  # other work is not held up
    clock.advance(5)
    md2 = enroll(srv, "p2", labels={"tier": "beta"})
    srv.orch.control_tick()
    assert get(srv, c.campaign_id).job_count == 1  # nothing new while paused
    resumed = srv.operator.ResumeCampaign(opb.ResumeCampaignRequest(campaign_id=c.campaign_id), metadata=op_md())
    assert resumed.campaign.state == tpb.CAMPAIGN_STATE_ACTIVE
    srv.orch.control_tick()
    assert get(srv, c.campaign_id).job_count == 2  # the device that enrolled while paused
    assert lease(srv, "p2", md2) is not None


def test_cancel_stops_queued_and_running_jobs(srv: ServerThread) -> None:
    mds = {d: enroll(srv, d, labels={"tier": "beta"}) for d in ("r1", "q1")}
    c = create(srv)
    a = lease(srv, "r1", mds["r1"])
    assert a is not None
    srv.agent.ReportProgress(
        apb.ReportProgressRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_RUNNING),
        metadata=mds["r1"],
    )
    reply = srv.operator.CancelCampaign(opb.CancelCampaignRequest(campaign_id=c.campaign_id), metadata=op_md())
    assert reply.cancelled_jobs == 2 and reply.campaign.state == tpb.CAMPAIGN_STATE_CANCELLED
    assert reply.campaign.jobs_by_state == {"JOB_STATE_CANCELLED": 2}
    running = apb.RunningJob(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_RUNNING)
    hb = srv.agent.Heartbeat(apb.HeartbeatRequest(device_id="r1", running=running), metadata=mds["r1"])
    assert list(hb.cancel_job_ids) == [a.job_id]  # the device stops at its next heartbeat
    assert lease(srv, "q1", mds["q1"]) is None
    again = srv.operator.CancelCampaign(opb.CancelCampaignRequest(campaign_id=c.campaign_id), metadata=op_md())
    assert again.cancelled_jobs == 0
    with pytest.raises(grpc.RpcError) as info:
        srv.operator.ResumeCampaign(opb.ResumeCampaignRequest(campaign_id=c.campaign_id), metadata=op_md())
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_get_counts_failures_by_class_and_list_filters_by_state(srv: ServerThread) -> None:
    md = enroll(srv, "f1", labels={"tier": "beta"})
    c = create(srv, max_attempts=1)
    a = lease(srv, "f1", md)
    assert a is not None
    srv.agent.FailJob(
        apb.FailJobRequest(
            job_id=a.job_id, lease_epoch=a.lease_epoch, error_class=tpb.ERROR_CLASS_DATASET_INVALID, message="x"
        ),
        metadata=md,
    )
    got = get(srv, c.campaign_id)
    assert dict(got.failures_by_error_class) == {"ERROR_CLASS_DATASET_INVALID": 1} and got.progress == 0.0
    other = create(srv, request_id="second")
    assert create(srv, request_id="second").campaign_id == other.campaign_id  # idempotent
    srv.operator.PauseCampaign(opb.PauseCampaignRequest(campaign_id=other.campaign_id), metadata=op_md())
    every = srv.operator.ListCampaigns(opb.ListCampaignsRequest(page_size=1), metadata=op_md())
    assert [x.campaign_id for x in every.campaigns] == [other.campaign_id] and every.next_page_token
    rest = srv.operator.ListCampaigns(opb.ListCampaignsRequest(page_token=every.next_page_token), metadata=op_md())
    assert [x.campaign_id for x in rest.campaigns] == [c.campaign_id]
    paused = srv.operator.ListCampaigns(
        opb.ListCampaignsRequest(states=[tpb.CAMPAIGN_STATE_PAUSED]), metadata=op_md()
    ).campaigns
    assert [x.campaign_id for x in paused] == [other.campaign_id]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (opb.SubmitCampaignRequest(name="x", training=SPEC, target_count=20_000_000), "target_count"),
        (opb.SubmitCampaignRequest(name="x", training=tpb.TrainingSpec(adapter_name="a")), "training.base_model_id"),
        (
            opb.SubmitCampaignRequest(
                name="x", training=tpb.TrainingSpec(adapter_name="a", base_model_id="b", dataset="d", eval_share=0.9)
            ),
            "training.eval_share",
        ),
    ],
)
def test_bad_campaigns_are_refused_naming_the_field(
    srv: ServerThread, request_: opb.SubmitCampaignRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        srv.operator.SubmitCampaign(request_, metadata=op_md())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(field)
