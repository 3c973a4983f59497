"""The orchestrator through its real gRPC API: leases, fencing, retries, identity, activation."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from adapters_store import upload_to_url
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.api import SPEC, code_of, enroll, lease, state_of, submit
from tests.support.orch import (
    FakeClock,
    ServerThread,
    dev_md,
    fake_adapter_blob,
    op_md,
)


def test_full_lifecycle_registers_a_verified_adapter(srv: ServerThread, tmp_path: Path) -> None:
    md = enroll(srv, "phone-1")
    job = submit(srv, "phone-1").job
    a = lease(srv, "phone-1", md)
    assert a is not None and a.job_id == job.job_id and a.attempt == 1 and a.upload_url
    for state in (tpb.JOB_STATE_RUNNING, tpb.JOB_STATE_PAUSED, tpb.JOB_STATE_RUNNING, tpb.JOB_STATE_UPLOADING):
        req = apb.ReportProgressRequest(
            job_id=a.job_id, lease_epoch=a.lease_epoch, state=state, pause_reason=tpb.ELIGIBILITY_REASON_TOO_HOT
        )
        srv.agent.ReportProgress(req, metadata=md)
        got = srv.operator.GetJob(opb.GetJobRequest(job_id=a.job_id), metadata=op_md()).job
        assert got.state == state
        assert ("TOO_HOT" in got.status_message) == (state == tpb.JOB_STATE_PAUSED)
    blob, info = fake_adapter_blob(tmp_path, device_id="phone-1", job_id=a.job_id, attempt=a.attempt)
    upload_to_url(a.upload_url, blob)
    done = srv.agent.CompleteJob(
        apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size),
        metadata=md,
    )
    assert done.adapter.sha256 == info.sha256 and done.adapter.version == 1
    assert state_of(srv, a.job_id) == tpb.JOB_STATE_SUCCEEDED
    # The blob now lives at its content address and the device may download it.
    url = srv.agent.GetAdapterDownloadUrl(
        apb.GetAdapterDownloadUrlRequest(adapter_id=done.adapter.adapter_id), metadata=md
    )
    assert url.adapter.sha256 == info.sha256 and url.url
    assert srv.store.hash_object(done.adapter.blob_key).sha256 == info.sha256
    # A retry of the same completion (its reply was lost) answers the same adapter; a completion
    # announcing other bytes is refused.
    again = srv.agent.CompleteJob(
        apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size),
        metadata=md,
    )
    assert again.adapter == done.adapter
    assert (
        code_of(
            srv.agent.CompleteJob,
            apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256="0" * 64, size_bytes=info.size),
            metadata=md,
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )


def test_tampered_upload_fails_the_attempt_and_retries(srv: ServerThread, tmp_path: Path) -> None:
    md = enroll(srv, "phone-1")
    job = submit(srv, "phone-1").job
    a = lease(srv, "phone-1", md)
    assert a is not None
    _blob, info = fake_adapter_blob(tmp_path, device_id="phone-1", job_id=a.job_id, attempt=a.attempt)
    other, _ = fake_adapter_blob(tmp_path, device_id="phone-1", job_id=a.job_id, attempt=a.attempt, seed=1)
    upload_to_url(a.upload_url, other)  # not the bytes the device reports
    req = apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size)
    assert code_of(srv.agent.CompleteJob, req, metadata=md) == grpc.StatusCode.FAILED_PRECONDITION
    got = srv.operator.GetJob(opb.GetJobRequest(job_id=job.job_id), metadata=op_md()).job
    assert got.state == tpb.JOB_STATE_QUEUED and got.last_error_class == tpb.ERROR_CLASS_INTEGRITY


def test_expired_lease_is_fenced(srv: ServerThread, clock: FakeClock, tmp_path: Path) -> None:
    md = enroll(srv, "phone-1")
    job = submit(srv, "phone-1").job
    old = lease(srv, "phone-1", md)
    assert old is not None
    srv.agent.ReportProgress(
        apb.ReportProgressRequest(job_id=old.job_id, lease_epoch=old.lease_epoch, state=tpb.JOB_STATE_RUNNING),
        metadata=md,
    )
    clock.advance(31)
    assert srv.orch.jobs.reap() == 1
    got = srv.operator.GetJob(opb.GetJobRequest(job_id=job.job_id), metadata=op_md()).job
    assert got.state == tpb.JOB_STATE_QUEUED and got.last_error_class == tpb.ERROR_CLASS_LEASE_EXPIRED
    assert lease(srv, "phone-1", md) is None  # backoff
    clock.advance(11)
    new = lease(srv, "phone-1", md)
    assert new is not None and new.lease_epoch == old.lease_epoch + 1 and new.attempt == 2
    # The old holder's reports and completion are refused.
    stale = apb.ReportProgressRequest(job_id=old.job_id, lease_epoch=old.lease_epoch, state=tpb.JOB_STATE_RUNNING)
    assert code_of(srv.agent.ReportProgress, stale, metadata=md) == grpc.StatusCode.FAILED_PRECONDITION
    blob, info = fake_adapter_blob(tmp_path, device_id="phone-1", job_id=old.job_id, attempt=old.attempt)
    upload_to_url(old.upload_url, blob)
    req = apb.CompleteJobRequest(
        job_id=old.job_id, lease_epoch=old.lease_epoch, sha256=info.sha256, size_bytes=info.size
    )
    assert code_of(srv.agent.CompleteJob, req, metadata=md) == grpc.StatusCode.FAILED_PRECONDITION
    # A heartbeat naming the stale lease is told to stop it, as stale (keep the checkpoint: the
    # job is this device's and comes back to it), not as cancelled (discard the work).
    hb = srv.agent.Heartbeat(
        apb.HeartbeatRequest(
            device_id="phone-1", running=apb.RunningJob(job_id=old.job_id, lease_epoch=old.lease_epoch)
        ),
        metadata=md,
    )
    assert list(hb.stale_job_ids) == [old.job_id] and list(hb.cancel_job_ids) == []


def test_error_classes_decide_retries(srv: ServerThread, clock: FakeClock) -> None:
    md = enroll(srv, "phone-1")
    retry = submit(srv, "phone-1", request_id="a").job
    a = lease(srv, "phone-1", md)
    assert a is not None and a.job_id == retry.job_id
    r = srv.agent.FailJob(
        apb.FailJobRequest(
            job_id=a.job_id, lease_epoch=a.lease_epoch, error_class=tpb.ERROR_CLASS_CRASHED, message="segfault"
        ),
        metadata=md,
    )
    assert r.will_retry and r.state == tpb.JOB_STATE_QUEUED
    clock.advance(11)
    b = lease(srv, "phone-1", md)
    assert b is not None
    r = srv.agent.FailJob(
        apb.FailJobRequest(
            job_id=b.job_id,
            lease_epoch=b.lease_epoch,
            error_class=tpb.ERROR_CLASS_DATASET_INVALID,
            message="line 3: not JSON",
        ),
        metadata=md,
    )
    assert not r.will_retry and r.state == tpb.JOB_STATE_FAILED


def test_attempts_are_bounded(srv: ServerThread, clock: FakeClock) -> None:
    md = enroll(srv, "phone-1")
    job = submit(srv, "phone-1", max_attempts=2).job
    for _ in range(2):
        clock.advance(1000)
        a = lease(srv, "phone-1", md)
        assert a is not None
        srv.agent.FailJob(
            apb.FailJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, error_class=tpb.ERROR_CLASS_TRANSIENT),
            metadata=md,
        )
    assert state_of(srv, job.job_id) == tpb.JOB_STATE_FAILED


def test_cancel_reaches_the_device_on_its_next_heartbeat(srv: ServerThread) -> None:
    md = enroll(srv, "phone-1")
    submit(srv, "phone-1")
    a = lease(srv, "phone-1", md)
    assert a is not None
    srv.operator.CancelJob(opb.CancelJobRequest(job_id=a.job_id), metadata=op_md())
    hb = srv.agent.Heartbeat(
        apb.HeartbeatRequest(
            device_id="phone-1",
            running=apb.RunningJob(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_RUNNING),
        ),
        metadata=md,
    )
    assert list(hb.cancel_job_ids) == [a.job_id] and list(hb.stale_job_ids) == []
    rep = srv.agent.ReportProgress(
        apb.ReportProgressRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_RUNNING), metadata=md
    )
    assert rep.cancel_requested
    assert (
        code_of(srv.operator.CancelJob, opb.CancelJobRequest(job_id=a.job_id), metadata=op_md())
        == grpc.StatusCode.FAILED_PRECONDITION
    )


def test_paused_time_does_not_eat_the_deadline(srv: ServerThread, clock: FakeClock) -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    md = enroll(srv, "phone-1")
    deadline = Timestamp(seconds=int(clock.now + 100))
    job = submit(srv, "phone-1", deadline=deadline).job
    a = lease(srv, "phone-1", md)
    assert a is not None
    srv.agent.ReportProgress(
        apb.ReportProgressRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_PAUSED), metadata=md
    )
    for _ in range(10):  # 200 s paused, the lease renewed by heartbeats
        clock.advance(20)
        srv.agent.Heartbeat(
            apb.HeartbeatRequest(
                device_id="phone-1",
                running=apb.RunningJob(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_PAUSED),
            ),
            metadata=md,
        )
        srv.orch.jobs.reap()
    srv.agent.ReportProgress(
        apb.ReportProgressRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_RUNNING), metadata=md
    )
    srv.orch.jobs.reap()
    assert state_of(srv, job.job_id) == tpb.JOB_STATE_RUNNING
    clock.advance(101)
    srv.agent.Heartbeat(apb.HeartbeatRequest(device_id="phone-1"), metadata=md)
    srv.orch.jobs.reap()
    got = srv.operator.GetJob(opb.GetJobRequest(job_id=job.job_id), metadata=op_md()).job
    assert got.state == tpb.JOB_STATE_FAILED and got.last_error_class == tpb.ERROR_CLASS_DEADLINE_EXCEEDED
    assert got.paused.seconds >= 199


def test_submit_is_idempotent(srv: ServerThread) -> None:
    enroll(srv, "phone-1")
    first = submit(srv, "phone-1", request_id="req-7")
    again = submit(srv, "phone-1", request_id="req-7")
    assert first.created and not again.created and first.job.job_id == again.job.job_id
    listed = srv.operator.ListJobs(opb.ListJobsRequest(), metadata=op_md())
    assert len(listed.jobs) == 1


def test_identity(srv: ServerThread) -> None:
    md1 = enroll(srv, "phone-1")
    md2 = enroll(srv, "phone-2")
    submit(srv, "phone-1")
    assert (
        code_of(srv.agent.Enroll, apb.EnrollRequest(device_id="x"), metadata=op_md("wrong"))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        code_of(srv.agent.LeaseJob, apb.LeaseJobRequest(device_id="phone-1"), metadata=dev_md("phone-1", "forged"))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        code_of(srv.agent.LeaseJob, apb.LeaseJobRequest(device_id="phone-1"), metadata=md2)
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        code_of(srv.operator.ListJobs, opb.ListJobsRequest(), metadata=op_md("nope")) == grpc.StatusCode.UNAUTHENTICATED
    )
    assert code_of(srv.operator.ListJobs, opb.ListJobsRequest()) == grpc.StatusCode.UNAUTHENTICATED
    a = lease(srv, "phone-1", md1)
    assert a is not None
    assert lease(srv, "phone-2", md2) is None  # never another device's job
    req = apb.ReportProgressRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_RUNNING)
    assert code_of(srv.agent.ReportProgress, req, metadata=md2) == grpc.StatusCode.PERMISSION_DENIED


def test_errors_name_the_field(srv: ServerThread) -> None:
    enroll(srv, "phone-1")
    cases = [
        (
            opb.SubmitJobRequest(device_id="phone-1", training=tpb.TrainingSpec(base_model_id="tiny", dataset="d")),
            "training.adapter_name",
        ),
        (
            opb.SubmitJobRequest(
                device_id="phone-1", training=tpb.TrainingSpec(adapter_name="a", base_model_id="tiny")
            ),
            "training.dataset",
        ),
        (opb.SubmitJobRequest(device_id="bad id!", training=SPEC), "device_id"),
        (
            opb.SubmitJobRequest(
                device_id="phone-1",
                training=tpb.TrainingSpec(adapter_name="a", base_model_id="t", dataset="../etc/passwd"),
            ),
            "training.dataset",
        ),
    ]
    for req, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            srv.operator.SubmitJob(req, metadata=op_md())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field)
    assert (
        code_of(srv.operator.GetJob, opb.GetJobRequest(job_id="job-0000"), metadata=op_md())
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(srv.operator.SubmitJob, opb.SubmitJobRequest(device_id="ghost", training=SPEC), metadata=op_md())
        == grpc.StatusCode.NOT_FOUND
    )


def test_placement_says_why_a_job_waits(srv: ServerThread) -> None:
    md = enroll(srv, "tiny-phone", supports_4bit=False)
    spec = tpb.TrainingSpec(
        adapter_name="a", base_model_id="tiny", dataset="d", on_4bit_unsupported=tpb.FOUR_BIT_FALLBACK_FAIL
    )
    job = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="tiny-phone", training=spec), metadata=op_md()).job
    assert lease(srv, "tiny-phone", md) is None
    got = srv.operator.GetJob(opb.GetJobRequest(job_id=job.job_id), metadata=op_md()).job
    assert got.state == tpb.JOB_STATE_QUEUED and "4-bit" in got.status_message


def test_campaign_fans_out_to_matching_devices(srv: ServerThread) -> None:
    for i in range(5):
        enroll(srv, f"d{i}", labels={"tier": "beta" if i % 2 else "ga"})
    req = opb.SubmitCampaignRequest(
        request_id="c1", name="beta", selector=tpb.DeviceSelector(labels={"tier": "beta"}), training=SPEC
    )
    camp = srv.operator.SubmitCampaign(req, metadata=op_md())
    assert camp.created and camp.campaign.job_count == 2
    assert camp.campaign.jobs_by_state["JOB_STATE_QUEUED"] == 2
    again = srv.operator.SubmitCampaign(req, metadata=op_md())
    assert not again.created and again.campaign.campaign_id == camp.campaign.campaign_id
    jobs = srv.operator.ListJobs(
        opb.ListJobsRequest(filter=tpb.JobFilter(campaign_id=camp.campaign.campaign_id)), metadata=op_md()
    ).jobs
    assert sorted(j.device_id for j in jobs) == ["d1", "d3"]


def test_watch_streams_changes(srv: ServerThread) -> None:
    md = enroll(srv, "phone-1")
    job = submit(srv, "phone-1").job
    stream = srv.operator.WatchJobs(opb.WatchJobsRequest(include_initial=True), metadata=op_md())
    first = next(stream)
    assert first.job.job_id == job.job_id and first.job.state == tpb.JOB_STATE_QUEUED
    lease(srv, "phone-1", md)
    nxt = next(stream)
    assert nxt.job.state == tpb.JOB_STATE_LEASED
    stream.cancel()


def test_a_job_too_big_for_the_device_waits_and_says_why(srv: ServerThread) -> None:
    md = enroll(srv, "small-phone", base_model_id="SmolLM2-135M-Instruct", ram_bytes=512 * 2**20)
    spec = tpb.TrainingSpec(adapter_name="a", base_model_id="SmolLM2-135M-Instruct", dataset="d")
    job = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="small-phone", training=spec), metadata=op_md()).job
    assert job.memory_estimate_bytes == 800 * 2**20
    assert lease(srv, "small-phone", md) is None
    got = srv.operator.GetJob(opb.GetJobRequest(job_id=job.job_id), metadata=op_md()).job
    assert (
        got.state == tpb.JOB_STATE_QUEUED and "needs ~800 MiB" in got.status_message and "512 MiB" in got.status_message
    )
    big = enroll(srv, "big-phone", base_model_id="SmolLM2-135M-Instruct", ram_bytes=8 * 2**30)
    srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="big-phone", training=spec), metadata=op_md())
    assert lease(srv, "big-phone", big) is not None


def test_lease_skips_an_oldest_job_that_does_not_fit_for_the_next_that_does(srv: ServerThread) -> None:
    md = enroll(srv, "skip-phone", supports_4bit=False)
    strict = tpb.TrainingSpec(
        adapter_name="a", base_model_id="tiny", dataset="d", on_4bit_unsupported=tpb.FOUR_BIT_FALLBACK_FAIL
    )
    loose = tpb.TrainingSpec(adapter_name="b", base_model_id="tiny", dataset="d")
    first = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="skip-phone", training=strict), metadata=op_md()).job
    second = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="skip-phone", training=loose), metadata=op_md()).job
    got = lease(srv, "skip-phone", md)
    assert got is not None and got.job_id == second.job_id
    waiting = srv.operator.GetJob(opb.GetJobRequest(job_id=first.job_id), metadata=op_md()).job
    assert waiting.state == tpb.JOB_STATE_QUEUED and "4-bit" in waiting.status_message
