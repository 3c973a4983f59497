"""Device identity and operator access through the real gRPC API: no takeover of an enrolled id,
crash-safe credential rotation, labels devices cannot spoof, enrollment tokens that can be
limited and revoked, revocation seen by every replica, and an audit record of every change."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from protos import wire
from protos.pocketlora.v1 import admin_service_pb2 as adpb
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from protos.wire import Role
from tests.support.api import SPEC, code_of, enroll, lease, submit
from tests.support.orch import ENROLL_TOKEN, OPERATOR_TOKEN, ServerThread, dev_md, op_md
from tests.support.waiting import wait_for


def audit(srv: ServerThread, **flt: str) -> list[adpb.AuditEvent]:
    reply = srv.admin.ListAuditEvents(adpb.ListAuditEventsRequest(filter=adpb.AuditFilter(**flt)), metadata=op_md())
    return list(reply.events)


def raw_enroll(srv: ServerThread, device_id: str, token: str = ENROLL_TOKEN, **caps: object) -> apb.EnrollResponse:
    capabilities = tpb.Capabilities(base_model_id="tiny", **caps)  # type: ignore[arg-type]
    return srv.agent.Enroll(apb.EnrollRequest(device_id=device_id, capabilities=capabilities), metadata=op_md(token))


def test_an_enrolled_id_cannot_be_taken_over(srv: ServerThread) -> None:
    victim = enroll(srv, "phone-b", labels={"tier": "beta"})
    submit(srv, "phone-b")

    code = code_of(raw_enroll, srv, "phone-b")

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert lease(srv, "phone-b", victim) is not None  # the victim's credential still works
    device = srv.operator.GetDevice(opb.GetDeviceRequest(device_id="phone-b"), metadata=op_md()).device
    assert dict(device.labels) == {"tier": "beta"}
    refused = audit(srv, action="Enroll", target="phone-b")
    assert [e.result for e in refused] == ["PermissionDenied", "OK"]


def test_an_admin_reset_lets_the_device_enroll_again(srv: ServerThread) -> None:
    old = enroll(srv, "phone-1")
    srv.admin.ResetDevice(adpb.ResetDeviceRequest(device_id="phone-1"), metadata=op_md())

    assert code_of(srv.agent.LeaseJob, apb.LeaseJobRequest(device_id="phone-1"), metadata=old) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    fresh = raw_enroll(srv, "phone-1")
    assert lease(srv, "phone-1", dev_md("phone-1", fresh.device_credential)) is None


def test_rotation_keeps_the_old_credential_until_the_new_one_is_used(srv: ServerThread) -> None:
    old = enroll(srv, "phone-1")

    new = srv.agent.RotateCredential(apb.RotateCredentialRequest(), metadata=old).device_credential
    still = lease(srv, "phone-1", old)  # a device that crashed before saving the new one
    first_use = lease(srv, "phone-1", dev_md("phone-1", new))

    assert still is None and first_use is None
    assert code_of(srv.agent.LeaseJob, apb.LeaseJobRequest(device_id="phone-1"), metadata=old) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert [e.action for e in audit(srv, target="phone-1")] == ["RotateCredential", "Enroll"]


def test_selectors_ignore_labels_a_device_reports_about_itself(srv: ServerThread) -> None:
    raw_enroll(srv, "spoofer", labels={"tier": "beta"})
    labelled = adpb.SetDeviceLabelsRequest(device_id="trusted", labels={"tier": "beta"})
    raw_enroll(srv, "trusted")
    srv.admin.SetDeviceLabels(labelled, metadata=op_md())
    selector = tpb.DeviceSelector(labels={"tier": "beta"})

    camp = srv.operator.SubmitCampaign(
        opb.SubmitCampaignRequest(name="beta", selector=selector, training=SPEC), metadata=op_md()
    ).campaign
    listed = srv.operator.ListDevices(opb.ListDevicesRequest(selector=selector), metadata=op_md())
    spoofer = srv.operator.GetDevice(opb.GetDeviceRequest(device_id="spoofer"), metadata=op_md()).device

    assert camp.job_count == 1 and [d.device_id for d in listed.devices] == ["trusted"]
    assert dict(spoofer.reported_labels) == {"tier": "beta"} and dict(spoofer.labels) == {}


def test_enrollment_tokens_fix_labels_limit_devices_and_can_be_revoked(srv: ServerThread) -> None:
    created = srv.operator.CreateEnrollmentToken(
        opb.CreateEnrollmentTokenRequest(ttl=Duration(seconds=3600), max_devices=1, labels={"site": "lab"}),
        metadata=op_md(),
    )
    other = srv.operator.CreateEnrollmentToken(opb.CreateEnrollmentTokenRequest(), metadata=op_md())

    raw_enroll(srv, "lab-1", token=created.token)
    used_up = code_of(raw_enroll, srv, "lab-2", token=created.token)
    srv.admin.RevokeEnrollmentToken(adpb.RevokeEnrollmentTokenRequest(token_id=other.token_id), metadata=op_md())
    revoked = code_of(raw_enroll, srv, "lab-3", token=other.token)

    assert used_up == revoked == grpc.StatusCode.UNAUTHENTICATED
    device = srv.operator.GetDevice(opb.GetDeviceRequest(device_id="lab-1"), metadata=op_md()).device
    assert dict(device.labels) == {"site": "lab"}
    tokens = {
        t.token_id: t
        for t in srv.admin.ListEnrollmentTokens(adpb.ListEnrollmentTokensRequest(), metadata=op_md()).tokens
    }
    assert tokens[created.token_id].uses == 1 and tokens[other.token_id].HasField("revoked_at")
    assert not any(t.token_id == "" for t in tokens.values())


def test_operator_tokens_are_scoped_and_revocable(srv: ServerThread) -> None:
    srv.admin.CreateOperator(adpb.CreateOperatorRequest(name="alice", role=wire.to_pb(Role.OPERATOR)), metadata=op_md())  # type: ignore[arg-type]
    mine = srv.admin.CreateOperatorToken(adpb.CreateOperatorTokenRequest(operator="alice"), metadata=op_md())
    read_only = srv.admin.CreateOperatorToken(
        adpb.CreateOperatorTokenRequest(operator="alice", role=wire.to_pb(Role.VIEWER)),
        metadata=op_md(),  # type: ignore[arg-type]
    )
    too_high = code_of(
        srv.admin.CreateOperatorToken,
        adpb.CreateOperatorTokenRequest(operator="alice", role=wire.to_pb(Role.ADMIN)),  # type: ignore[arg-type]
        metadata=op_md(),
    )
    enroll(srv, "phone-1")

    assert too_high == grpc.StatusCode.FAILED_PRECONDITION
    assert srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="phone-1", training=SPEC), metadata=op_md(mine.token))
    assert code_of(
        srv.operator.SubmitJob,
        opb.SubmitJobRequest(device_id="phone-1", training=SPEC),
        metadata=op_md(read_only.token),
    ) == (grpc.StatusCode.PERMISSION_DENIED)
    assert code_of(srv.admin.ListOperators, adpb.ListOperatorsRequest(), metadata=op_md(mine.token)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    srv.admin.RevokeOperatorToken(adpb.RevokeOperatorTokenRequest(token_id=mine.info.token_id), metadata=op_md())
    assert code_of(srv.operator.ListJobs, opb.ListJobsRequest(), metadata=op_md(mine.token)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    refusals = audit(srv, actor="alice")
    assert [(e.action, e.result) for e in refusals] == [
        ("ListOperators", "PermissionDenied"),
        ("SubmitJob", "PermissionDenied"),
        ("SubmitJob", "OK"),
    ]


def test_the_bootstrap_token_only_creates_the_first_admin(tmp_path: Path) -> None:
    with ServerThread(tmp_path) as first:
        admins = first.admin.ListOperators(adpb.ListOperatorsRequest(), metadata=op_md()).operators
    with ServerThread(tmp_path, bootstrap_token="a-later-bootstrap-token") as again:
        later = code_of(again.operator.ListJobs, opb.ListJobsRequest(), metadata=op_md("a-later-bootstrap-token"))
        kept = again.operator.ListJobs(opb.ListJobsRequest(), metadata=op_md(OPERATOR_TOKEN))

    assert [(o.name, o.created_by) for o in admins] == [("admin", "bootstrap")]
    assert later == grpc.StatusCode.UNAUTHENTICATED and kept is not None


def test_every_change_is_audited_with_its_result(srv: ServerThread, tmp_path: Path) -> None:
    enroll(srv, "phone-1")
    job = submit(srv, "phone-1").job
    srv.operator.CancelJob(opb.CancelJobRequest(job_id=job.job_id), metadata=op_md())
    code_of(srv.operator.CancelJob, opb.CancelJobRequest(job_id=job.job_id), metadata=op_md())
    srv.operator.CreateEnrollmentToken(opb.CreateEnrollmentTokenRequest(description="lab"), metadata=op_md())
    srv.admin.SetDeviceLabels(adpb.SetDeviceLabelsRequest(device_id="phone-1", labels={"a": "b"}), metadata=op_md())
    srv.admin.RevokeDevice(adpb.RevokeDeviceRequest(device_id="phone-1"), metadata=op_md())
    srv.admin.DeleteDevice(adpb.DeleteDeviceRequest(device_id="phone-1"), metadata=op_md())

    events = [(e.actor, e.action, e.result) for e in reversed(audit(srv))]

    assert events == [
        ("bootstrap", "CreateOperator", "OK"),  # the bootstrap token registering the first admin
        ("phone-1", "Enroll", "OK"),
        ("admin", "SubmitJob", "OK"),
        ("admin", "CancelJob", "OK"),
        ("admin", "CancelJob", "FailedPrecondition"),
        ("admin", "CreateEnrollmentToken", "OK"),
        ("admin", "SetDeviceLabels", "OK"),
        ("admin", "RevokeDevice", "OK"),
        ("admin", "DeleteDevice", "OK"),
    ]


@pytest.fixture
def two_replicas(tmp_path: Path, postgres_url: str) -> Iterator[tuple[ServerThread, ServerThread]]:
    kw = {"db_url": postgres_url, "credential_cache_s": 0.5}
    with ServerThread(tmp_path / "a", **kw) as a, ServerThread(tmp_path / "b", **kw) as b:  # type: ignore[arg-type]
        yield a, b


@pytest.mark.postgres
def test_revocations_reach_every_replica_within_the_cache_time(two_replicas: tuple[ServerThread, ServerThread]) -> None:
    a, b = two_replicas
    md = enroll(a, "phone-1")
    viewer = a.admin.CreateOperatorToken(
        adpb.CreateOperatorTokenRequest(operator="admin", role=wire.to_pb(Role.VIEWER)), metadata=op_md()
    )  # type: ignore[arg-type]
    assert lease(b, "phone-1", md) is None  # both replicas know (and cache) the device and the token
    assert b.operator.ListJobs(opb.ListJobsRequest(), metadata=op_md(viewer.token)) is not None

    a.admin.RevokeDevice(adpb.RevokeDeviceRequest(device_id="phone-1"), metadata=op_md())
    a.admin.RevokeOperatorToken(adpb.RevokeOperatorTokenRequest(token_id=viewer.info.token_id), metadata=op_md())
    revoked_at = time.monotonic()

    def refused(call: Any, request: object, metadata: object) -> bool:
        try:
            call(request, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[no-any-return]
        return False

    wait_for(
        lambda: refused(b.agent.LeaseJob, apb.LeaseJobRequest(device_id="phone-1"), md), 10, "B to refuse the device"
    )
    wait_for(
        lambda: refused(b.operator.ListJobs, opb.ListJobsRequest(), op_md(viewer.token)), 10, "B to refuse the token"
    )
    assert time.monotonic() - revoked_at < 5  # the cache time is 0.5 s; generous for a busy machine
    assert refused(a.agent.Heartbeat, apb.HeartbeatRequest(device_id="phone-1"), md)
