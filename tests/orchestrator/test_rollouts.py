"""Staged rollouts, eval gates and fleet gate policies through the real gRPC API. Devices are
simulated by their calls (heartbeats report what is active and what was refused); the control
loop's pass is driven by hand on a fake clock."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from adapters_store import upload_to_url
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.api import SPEC, enroll, lease
from tests.support.orch import FakeClock, ServerThread, fake_adapter_blob, op_md

Md = tuple[tuple[str, str], ...]
GOOD = {"eval_loss_base": 2.0, "eval_loss_adapter": 1.5, "eval_examples": 6}
POOR = {"eval_loss_base": 2.0, "eval_loss_adapter": 2.1, "eval_examples": 6}


def train(srv: ServerThread, tmp: Path, device: str, md: Md, metrics: dict[str, float]) -> str:
    a = lease(srv, device, md)
    assert a is not None
    blob, info = fake_adapter_blob(tmp, device_id=device, job_id=a.job_id, attempt=a.attempt, metrics=metrics)
    upload_to_url(a.upload_url, blob)
    done = srv.agent.CompleteJob(
        apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size),
        metadata=md,
    )
    return str(done.adapter.adapter_id)


@pytest.fixture
def fleet(srv: ServerThread, tmp_path: Path) -> tuple[str, dict[str, Md], dict[str, str]]:
    """A campaign over six devices, all trained: five adapters beat their base, one does not."""
    mds = {f"d{i}": enroll(srv, f"d{i}") for i in range(6)}
    c = srv.operator.SubmitCampaign(opb.SubmitCampaignRequest(name="c", training=SPEC), metadata=op_md()).campaign
    adapters = {d: train(srv, tmp_path, d, md, POOR if d == "d5" else GOOD) for d, md in mds.items()}
    return c.campaign_id, mds, adapters


def beat(srv: ServerThread, device: str, md: Md, *, active: str = "", refused: str = "") -> apb.HeartbeatResponse:
    refusals = [tpb.AdapterRefusal(adapter_id=refused, reason="load failed: bad shapes")] if refused else []
    req = apb.HeartbeatRequest(device_id=device, active_adapter_id=active, adapter_refusals=refusals)
    return srv.agent.Heartbeat(req, metadata=md)


def start(srv: ServerThread, campaign_id: str, **kw: object) -> opb.Rollout:
    req = opb.StartRolloutRequest(campaign_id=campaign_id, **kw)  # type: ignore[arg-type]
    return srv.operator.StartRollout(req, metadata=op_md()).rollout


def status(srv: ServerThread, rollout_id: str) -> opb.GetRolloutResponse:
    return srv.operator.GetRollout(opb.GetRolloutRequest(rollout_id=rollout_id, include_devices=True), metadata=op_md())


def desired(srv: ServerThread, device: str, md: Md) -> str:
    hb = beat(srv, device, md)
    return hb.desired_adapter.adapter_id if hb.HasField("desired_adapter") else ""


def new_devices(srv: ServerThread, rollout_id: str, step: int) -> list[str]:
    return sorted(d.device_id for d in status(srv, rollout_id).devices if d.step == step)


def report_all_active(
    srv: ServerThread, rollout_id: str, step: int, mds: dict[str, Md], adapters: dict[str, str]
) -> None:
    for d in new_devices(srv, rollout_id, step):
        beat(srv, d, mds[d], active=adapters[d])


GATE = opb.EvalGate(min_improvement=0.05)


def test_a_rollout_goes_step_by_step_only_over_devices_whose_adapter_passed(
    srv: ServerThread, fleet: tuple[str, dict[str, Md], dict[str, str]]
) -> None:
    campaign_id, mds, adapters = fleet
    r = start(srv, campaign_id, steps=[20, 60, 100], eval_gate=GATE)
    assert r.state == tpb.ROLLOUT_STATE_RUNNING and [s.percent for s in r.steps] == [20, 60, 100]
    assert srv.orch.control_tick().rollout_changes == 1  # step 1: 20% of the 5 eligible devices
    got = status(srv, r.rollout_id)
    assert got.rollout.eligible_devices == 5 and got.rollout.gate_refused_devices == 1
    first = new_devices(srv, r.rollout_id, 0)
    assert len(first) == 1 and "d5" not in first
    assert desired(srv, first[0], mds[first[0]]) == adapters[first[0]]
    srv.orch.control_tick()
    assert status(srv, r.rollout_id).rollout.current_step == 0  # held: nobody reported it active
    report_all_active(srv, r.rollout_id, 0, mds, adapters)
    srv.orch.control_tick()  # step 1 healthy
    srv.orch.control_tick()  # step 2 starts: 60% of 5 = 3 devices, 2 of them new
    assert len(new_devices(srv, r.rollout_id, 1)) == 2
    report_all_active(srv, r.rollout_id, 1, mds, adapters)
    for _ in range(3):
        srv.orch.control_tick()
    report_all_active(srv, r.rollout_id, 2, mds, adapters)
    srv.orch.control_tick()
    done = status(srv, r.rollout_id)
    assert done.rollout.state == tpb.ROLLOUT_STATE_COMPLETED, done.rollout.message
    assert [(s.devices, s.active) for s in done.rollout.steps] == [(1, 1), (2, 2), (2, 2)]
    assert desired(srv, "d5", mds["d5"]) == ""  # the adapter that did not beat its base stays out
    # Undo sends every device it changed back to the base.
    undone = srv.operator.UndoRollout(opb.UndoRolloutRequest(rollout_id=r.rollout_id), metadata=op_md())
    assert undone.rollout.state == tpb.ROLLOUT_STATE_UNDONE and len(undone.rolled_back_device_ids) == 5
    assert all(desired(srv, d, mds[d]) == "" for d in mds)


def test_a_step_whose_devices_refuse_the_adapter_halts_and_rolls_back_that_step_only(
    srv: ServerThread, fleet: tuple[str, dict[str, Md], dict[str, str]]
) -> None:
    campaign_id, mds, adapters = fleet
    r = start(srv, campaign_id, steps=[20, 60, 100], eval_gate=GATE, max_failure_share=0.25)
    srv.orch.control_tick()
    report_all_active(srv, r.rollout_id, 0, mds, adapters)
    srv.orch.control_tick()
    srv.orch.control_tick()
    step2 = new_devices(srv, r.rollout_id, 1)
    beat(srv, step2[0], mds[step2[0]], active=adapters[step2[0]])
    beat(srv, step2[1], mds[step2[1]], refused=adapters[step2[1]])  # 1 of 2 > 25%
    assert srv.orch.control_tick().rollout_changes == 2
    got = status(srv, r.rollout_id)
    assert got.rollout.state == tpb.ROLLOUT_STATE_HALTED
    assert "1 of 2" in got.rollout.message and "load failed: bad shapes" in got.rollout.message
    # The device's refusal is on the record operators read.
    device = srv.operator.GetDevice(opb.GetDeviceRequest(device_id=step2[1]), metadata=op_md()).device
    assert [(x.adapter_id, x.reason) for x in device.adapter_refusals] == [
        (adapters[step2[1]], "load failed: bad shapes")
    ]
    outcomes = {d.device_id: (d.outcome, d.desired_adapter_id) for d in got.devices}
    first = new_devices(srv, r.rollout_id, 0)[0]
    assert outcomes[first] == (tpb.TARGET_OUTCOME_ACTIVE, adapters[first])  # the healthy step keeps it
    for d in step2:
        assert outcomes[d] == (tpb.TARGET_OUTCOME_ROLLED_BACK, "")
        assert desired(srv, d, mds[d]) == ""
    refused = next(d for d in got.devices if d.device_id == step2[1])
    assert "load failed: bad shapes" in refused.reason
    for _ in range(2):  # a halted rollout stays put
        srv.orch.control_tick()
    assert len(status(srv, r.rollout_id).devices) == 3


def test_pause_holds_a_rollout_and_bake_time_holds_each_step(
    srv: ServerThread, clock: FakeClock, fleet: tuple[str, dict[str, Md], dict[str, str]]
) -> None:
    campaign_id, mds, adapters = fleet
    r = start(srv, campaign_id, steps=[50, 100], bake=Duration(seconds=60), request_id="ro-1")
    assert start(srv, campaign_id, request_id="ro-1").rollout_id == r.rollout_id  # idempotent
    paused = srv.operator.PauseRollout(opb.PauseRolloutRequest(rollout_id=r.rollout_id), metadata=op_md()).rollout
    assert paused.state == tpb.ROLLOUT_STATE_PAUSED
    srv.orch.control_tick()
    assert status(srv, r.rollout_id).devices == []
    srv.operator.ResumeRollout(opb.ResumeRolloutRequest(rollout_id=r.rollout_id), metadata=op_md())
    srv.orch.control_tick()
    assert len(new_devices(srv, r.rollout_id, 0)) == 3  # 50% of 6 (no gate): 3
    report_all_active(srv, r.rollout_id, 0, mds, adapters)
    srv.orch.control_tick()
    assert status(srv, r.rollout_id).rollout.current_step == 0  # healthy, but baking
    clock.advance(61)
    srv.orch.control_tick()
    assert status(srv, r.rollout_id).rollout.current_step == 1
    with pytest.raises(grpc.RpcError) as info:
        start(srv, campaign_id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and r.rollout_id in info.value.details()
    by_campaign = srv.operator.GetRollout(opb.GetRolloutRequest(campaign_id=campaign_id), metadata=op_md())
    assert by_campaign.rollout.rollout_id == r.rollout_id
    listed = srv.operator.ListRollouts(opb.ListRolloutsRequest(states=[tpb.ROLLOUT_STATE_RUNNING]), metadata=op_md())
    assert [x.rollout_id for x in listed.rollouts] == [r.rollout_id]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"steps": [10, 50]}, "steps"),
        ({"steps": [50, 10, 100]}, "steps"),
        ({"steps": [0, 100]}, "steps"),
        ({"min_healthy_share": 0.0}, "min_healthy_share"),
        ({"max_failure_share": 1.0}, "max_failure_share"),
        ({"eval_gate": opb.EvalGate(min_improvement=2.0)}, "eval_gate.min_improvement"),
    ],
)
def test_bad_rollouts_are_refused_naming_the_field(
    srv: ServerThread, fleet: tuple[str, dict[str, Md], dict[str, str]], kw: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        start(srv, fleet[0], **kw)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(field)


def test_an_eval_gate_refuses_adapters_that_do_not_beat_their_base_with_the_figures(
    srv: ServerThread, tmp_path: Path, fleet: tuple[str, dict[str, Md], dict[str, str]]
) -> None:
    campaign_id, _, adapters = fleet
    with pytest.raises(grpc.RpcError) as info:
        srv.operator.ActivateAdapter(
            opb.ActivateAdapterRequest(adapter_id=adapters["d5"], eval_gate=GATE), metadata=op_md()
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "eval loss 2.1000 vs base 2.0000" in info.value.details() and "-5.0%" in info.value.details()
    ok = srv.operator.ActivateAdapter(
        opb.ActivateAdapterRequest(adapter_id=adapters["d0"], eval_gate=GATE), metadata=op_md()
    )
    assert list(ok.device_ids) == ["d0"]
    canary = srv.operator.ActivateAdapter(
        opb.ActivateAdapterRequest(campaign_id=campaign_id, canary_percent=100, eval_gate=GATE), metadata=op_md()
    )
    assert sorted(canary.device_ids) == ["d1", "d2", "d3", "d4"]  # d0 had it already
    assert [(x.device_id, "does not beat" in x.reason) for x in canary.refused] == [("d5", True)]
    # An adapter trained without a held-out share has no figures: a gate never passes it.
    md = enroll(srv, "no-eval")
    srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="no-eval", training=SPEC), metadata=op_md())
    bare = train(srv, tmp_path, "no-eval", md, {})
    with pytest.raises(grpc.RpcError) as info:
        srv.operator.ActivateAdapter(opb.ActivateAdapterRequest(adapter_id=bare, eval_gate=GATE), metadata=op_md())
    assert "no held-out evaluation" in info.value.details()


def test_gate_policies_reach_matching_devices_merged_by_priority(srv: ServerThread) -> None:
    beta, ga = enroll(srv, "beta-1", labels={"tier": "beta"}), enroll(srv, "ga-1", labels={"tier": "ga"})

    def set_policy(name: str, labels: dict[str, str], priority: int, **fields: object) -> None:
        policy = opb.FleetGatePolicy(
            name=name,
            selector=tpb.DeviceSelector(labels=labels),
            policy=tpb.GatePolicy(**fields),  # type: ignore[arg-type]
            priority=priority,
        )
        srv.operator.SetGatePolicy(opb.SetGatePolicyRequest(policy=policy), metadata=op_md())

    assert not beat(srv, "beta-1", beta).HasField("gate_policy")
    set_policy("fleet", {}, 0, min_battery_pct=60, require_charging=True)
    set_policy("beta-night", {"tier": "beta"}, 10, min_battery_pct=80, start_hour=1, end_hour=5)
    hb = beat(srv, "beta-1", beta)
    assert list(hb.gate_policy_names) == ["fleet", "beta-night"]
    assert (hb.gate_policy.min_battery_pct, hb.gate_policy.require_charging) == (80, True)
    assert (hb.gate_policy.start_hour, hb.gate_policy.end_hour) == (1, 5)
    hb = beat(srv, "ga-1", ga)
    assert list(hb.gate_policy_names) == ["fleet"] and hb.gate_policy.min_battery_pct == 60
    assert not hb.gate_policy.HasField("start_hour")
    listed = srv.operator.ListGatePolicies(opb.ListGatePoliciesRequest(), metadata=op_md()).policies
    assert [p.name for p in listed] == ["fleet", "beta-night"]
    gone = srv.operator.DeleteGatePolicy(opb.DeleteGatePolicyRequest(name="beta-night"), metadata=op_md())
    assert gone.deleted
    assert list(beat(srv, "beta-1", beta).gate_policy_names) == ["fleet"]
    for fields, named in (
        ({"temp_high_c": 40, "temp_low_c": 41}, "policy.policy.temp_low_c"),
        ({"start_hour": 3}, "policy.policy.start_hour"),
        ({"min_battery_pct": 120}, "policy.policy.min_battery_pct"),
        ({}, "policy.policy"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            set_policy("bad", {}, 0, **fields)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(named + ":")
