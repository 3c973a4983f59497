"""Helpers for tests that talk to a real orchestrator server over gRPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from adapters_store import upload_to_url
from protos.pocketlora.v1 import admin_service_pb2 as adpb
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ENROLL_TOKEN, ServerThread, dev_md, fake_adapter_blob, op_md

SPEC = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")


def enroll(
    srv: ServerThread, device_id: str, labels: dict[str, str] | None = None, **caps: object
) -> tuple[tuple[str, str], ...]:
    """Enroll a device; `labels` are then set by the admin (the labels selectors target), while
    `caps` may carry the labels the device reports about itself."""
    fields: dict[str, object] = {"base_model_id": "tiny", "supports_4bit": True, "ram_bytes": 8 * 2**30, **caps}
    capabilities = tpb.Capabilities(**fields)  # type: ignore[arg-type]
    reply = srv.agent.Enroll(
        apb.EnrollRequest(device_id=device_id, capabilities=capabilities), metadata=op_md(ENROLL_TOKEN)
    )
    if labels:
        srv.admin.SetDeviceLabels(adpb.SetDeviceLabelsRequest(device_id=device_id, labels=labels), metadata=op_md())
    return dev_md(device_id, reply.device_credential)


def submit(srv: ServerThread, device_id: str, request_id: str = "", **kw: object) -> opb.SubmitJobResponse:
    return srv.operator.SubmitJob(
        opb.SubmitJobRequest(request_id=request_id, device_id=device_id, training=SPEC, **kw), metadata=op_md()
    )  # type: ignore[arg-type]


def lease(srv: ServerThread, device_id: str, md: tuple[tuple[str, str], ...]) -> apb.Assignment | None:
    reply = srv.agent.LeaseJob(apb.LeaseJobRequest(device_id=device_id), metadata=md)
    assert reply.next_poll_after.seconds + reply.next_poll_after.nanos > 0
    return reply.assignment if reply.HasField("assignment") else None


def code_of(call, *args, **kw) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value.code()  # type: ignore[no-any-return]


def state_of(srv: ServerThread, job_id: str) -> int:
    return srv.operator.GetJob(opb.GetJobRequest(job_id=job_id), metadata=op_md()).job.state  # type: ignore[no-any-return]


def train(
    srv: ServerThread, tmp_path: Path, device: str, md: tuple[tuple[str, str], ...], seed: int, campaign: str = ""
) -> apb.CompleteJobResponse:
    """Lease the device's next job, upload a small well-formed adapter and complete it."""
    a = lease(srv, device, md)
    assert a is not None
    blob, info = fake_adapter_blob(tmp_path, device_id=device, job_id=a.job_id, attempt=a.attempt, seed=seed)
    upload_to_url(a.upload_url, blob)
    return srv.agent.CompleteJob(
        apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size),
        metadata=md,
    )
