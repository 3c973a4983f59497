"""Adapter activation through the real gRPC API: per device, by name across a selector, canary
shares, rollback and base compatibility."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from adapters_store import upload_to_url
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.api import SPEC, code_of, enroll, lease, submit, train
from tests.support.orch import ServerThread, fake_adapter_blob, op_md


def test_activation_rollback_and_heartbeat(srv: ServerThread, tmp_path: Path) -> None:
    md = enroll(srv, "phone-1")
    adapters = []
    for i in range(2):
        submit(srv, "phone-1")
        a = lease(srv, "phone-1", md)
        assert a is not None
        blob, info = fake_adapter_blob(tmp_path, device_id="phone-1", job_id=a.job_id, attempt=a.attempt, seed=i)
        upload_to_url(a.upload_url, blob)
        adapters.append(
            srv.agent.CompleteJob(
                apb.CompleteJobRequest(
                    job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size
                ),
                metadata=md,
            ).adapter
        )
    assert [x.version for x in adapters] == [1, 2]
    for adapter in adapters:
        srv.operator.ActivateAdapter(opb.ActivateAdapterRequest(adapter_id=adapter.adapter_id), metadata=op_md())
    hb = srv.agent.Heartbeat(apb.HeartbeatRequest(device_id="phone-1"), metadata=md)
    assert hb.desired_adapter.adapter_id == adapters[1].adapter_id
    back = srv.operator.RollbackAdapter(opb.RollbackAdapterRequest(device_id="phone-1"), metadata=op_md())
    assert back.desired_adapter_id == adapters[0].adapter_id
    srv.operator.DeactivateAdapter(opb.DeactivateAdapterRequest(device_id="phone-1"), metadata=op_md())
    hb = srv.agent.Heartbeat(
        apb.HeartbeatRequest(device_id="phone-1", active_adapter_id=adapters[0].adapter_id), metadata=md
    )
    assert not hb.HasField("desired_adapter")
    dev = srv.operator.GetDevice(opb.GetDeviceRequest(device_id="phone-1"), metadata=op_md()).device
    assert dev.active_adapter_id == adapters[0].adapter_id and dev.desired_adapter_id == ""
    summary = srv.operator.GetFleetSummary(opb.GetFleetSummaryRequest(), metadata=op_md())
    assert (
        summary.jobs_by_state["JOB_STATE_SUCCEEDED"] == 2 and summary.device_count == 1 and summary.adapter_count == 2
    )


def test_fleet_activation_by_name_and_selector(srv: ServerThread, tmp_path: Path) -> None:
    mds = {f"d{i}": enroll(srv, f"d{i}", labels={"tier": "beta" if i < 3 else "ga"}) for i in range(4)}
    latest = {}
    for device, md in mds.items():
        for round_ in range(2 if device == "d0" else 1):
            submit(srv, device)
            latest[device] = train(srv, tmp_path, device, md, seed=round_).adapter
    assert latest["d0"].version == 2
    req = opb.ActivateAdapterRequest(adapter_name="persona", selector=tpb.DeviceSelector(labels={"tier": "beta"}))
    changed = srv.operator.ActivateAdapter(req, metadata=op_md()).device_ids
    assert sorted(changed) == ["d0", "d1", "d2"]
    for device in ("d0", "d1", "d2"):
        hb = srv.agent.Heartbeat(apb.HeartbeatRequest(device_id=device), metadata=mds[device])
        assert hb.desired_adapter.adapter_id == latest[device].adapter_id  # each its own, latest version
    assert not srv.agent.Heartbeat(apb.HeartbeatRequest(device_id="d3"), metadata=mds["d3"]).HasField("desired_adapter")
    off = srv.operator.DeactivateAdapter(
        opb.DeactivateAdapterRequest(selector=tpb.DeviceSelector(device_ids=["d0", "d1"])), metadata=op_md()
    )
    assert sorted(off.device_ids) == ["d0", "d1"]
    back = srv.operator.RollbackAdapter(opb.RollbackAdapterRequest(device_id="d0"), metadata=op_md())
    assert back.desired_adapter_id == latest["d0"].adapter_id


def test_canary_share_is_stable_and_grows(srv: ServerThread, tmp_path: Path) -> None:
    mds = {f"c{i}": enroll(srv, f"c{i}") for i in range(10)}
    camp = srv.operator.SubmitCampaign(
        opb.SubmitCampaignRequest(name="all", selector=tpb.DeviceSelector(), training=SPEC), metadata=op_md()
    ).campaign
    for i, (device, md) in enumerate(mds.items()):
        train(srv, tmp_path, device, md, seed=i)
    first = srv.operator.ActivateAdapter(
        opb.ActivateAdapterRequest(campaign_id=camp.campaign_id, canary_percent=20), metadata=op_md()
    ).device_ids
    assert len(first) == 2
    more = srv.operator.ActivateAdapter(
        opb.ActivateAdapterRequest(campaign_id=camp.campaign_id, canary_percent=50), metadata=op_md()
    ).device_ids
    assert len(more) == 3 and not set(first) & set(more)  # the first two stay in, three join
    for bad, field in (
        (opb.ActivateAdapterRequest(campaign_id=camp.campaign_id, canary_percent=0), "canary_percent"),
        (opb.ActivateAdapterRequest(), "adapter_id"),
        (opb.ActivateAdapterRequest(adapter_id="ad-1", adapter_name="x"), "adapter_id"),
        (opb.ActivateAdapterRequest(adapter_name="bad name!"), "adapter_name"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            srv.operator.ActivateAdapter(bad, metadata=op_md())
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(field)


def test_activation_refuses_an_incompatible_base(srv: ServerThread, tmp_path: Path) -> None:
    md = enroll(srv, "other-base", base_fingerprint="sha256:" + "ee" * 32)
    submit(srv, "other-base")
    adapter = train(srv, tmp_path, "other-base", md, seed=0).adapter  # its manifest says "ab..."
    req = opb.ActivateAdapterRequest(adapter_id=adapter.adapter_id)
    assert code_of(srv.operator.ActivateAdapter, req, metadata=op_md()) == grpc.StatusCode.FAILED_PRECONDITION
