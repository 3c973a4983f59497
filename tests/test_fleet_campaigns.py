"""Campaigns, rollouts, eval gates and fleet gate policies with real agents.

Everything is real but the sensors: a gRPC server on loopback over SQLite and a file store, the
control loop's passes on a timer, device agents that enroll, train tiny Llamas (sharpened heads,
so an adapter can beat its base) in their training child, evaluate on held-out data, upload,
and load adapters in their inference runtime child. Sensor traces are replayed on clocks the
tests move.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.agent import Agent, AgentConfig
from agent.gate import Gate, GatePolicy
from agent.sensors import TraceSensors
from orchestrator.activation import canary_rank
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ServerThread, op_md
from tests.support.tiny_models import make_tiny_llama, sharpen_head
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

SPEC = tpb.TrainingSpec(
    adapter_name="codes",
    base_model_id="tiny",
    dataset="codes",
    learning_rate=1e-2,
    effective_batch=4,
    max_steps=10,
    max_seq_len=48,
    seed=5,
    checkpoint_every_steps=5,
    eval_share=0.25,
    lora=tpb.LoraSettings(rank=8, alpha=16, dropout=0.0),
)
GATE = opb.EvalGate(min_improvement=0.02)
CHARGED = {"charging": True, "battery": 90, "temp_c": 30}


class Clock:
    """Trace time a test moves."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Device:
    """A real agent in a thread, with its own work folder, base model copy and event log."""

    def __init__(self, srv: ServerThread, base: Path, root: Path, device_id: str, token: str, trace: list[Any]) -> None:
        self.id = device_id
        work = root / device_id
        self.base = shutil.copytree(base, work / "base")
        (work / "datasets").mkdir(parents=True)
        rows = [{"prompt": f"Q{i}: what is the code?", "completion": f" The code is {i * 7 % 10}."} for i in range(24)]
        (work / "datasets" / "codes.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        (work / "trace.jsonl").write_text("\n".join(json.dumps({"t": t, **row}) for t, row in trace) + "\n")
        self.clock = Clock()
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        cfg = AgentConfig(
            orchestrator=srv.address,
            device_id=device_id,
            work_dir=work,
            base_model_dir=self.base,
            base_model_id="tiny",
            datasets_dir=work / "datasets",
            enrollment_token=token,
            tick_s=0.1,
            progress_every_s=1.0,
        )
        listener = lambda k, d: self.events.append((time.monotonic(), k, dict(d)))  # noqa: E731
        self.agent = Agent(
            cfg, TraceSensors(work / "trace.jsonl", clock=self.clock), Gate(GatePolicy()), listener=listener
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def seen(self, kind: str) -> list[dict[str, Any]]:
        return [d for _, k, d in self.events if k == kind]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


def labelled_token(srv: ServerThread, **labels: str) -> str:
    """An enrollment token that fixes these labels on every device enrolling with it (the labels
    selectors target: devices cannot choose them)."""
    req = opb.CreateEnrollmentTokenRequest(description="tests", labels=labels)
    return str(srv.operator.CreateEnrollmentToken(req, metadata=op_md()).token)


def jobs(srv: ServerThread, **flt: Any) -> list[tpb.Job]:
    req = opb.ListJobsRequest(filter=tpb.JobFilter(**flt), page_size=1000)
    return list(srv.operator.ListJobs(req, metadata=op_md()).jobs)


def enrolled(srv: ServerThread, *device_ids: str) -> None:
    def all_there() -> bool:
        listed = srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices
        return set(device_ids) <= {d.device_id for d in listed}

    wait_for(all_there, 60, f"{device_ids} to enroll")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet-base")
    return sharpen_head(make_tiny_llama(root / "tiny", hidden=64, layers=2), root / "sharp")


@pytest.fixture(scope="module")
def fleet(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, dict[str, Device], str]]:
    """A campaign over five devices, two of which enroll after it was created, run to the end."""
    root = tmp_path_factory.mktemp("fleet")
    trace = [(0, CHARGED)]
    with ServerThread(root / "orch", lease_s=10.0, retry_base_s=0.5, reap_every_s=0.3) as srv:
        devices: dict[str, Device] = {}
        token = labelled_token(srv, fleet="spring")
        try:
            for name in ("early-0", "early-1", "early-2"):
                devices[name] = Device(srv, base, root, name, token, trace)
            enrolled(srv, *devices)
            req = opb.SubmitCampaignRequest(
                name="spring", selector=tpb.DeviceSelector(labels={"fleet": "spring"}), training=SPEC
            )
            campaign = srv.operator.SubmitCampaign(req, metadata=op_md()).campaign
            assert campaign.job_count == 3
            for name in ("late-0", "late-1"):
                devices[name] = Device(srv, base, root, name, token, trace)
            wait_for(
                lambda: len(jobs(srv, campaign_id=campaign.campaign_id, states=[tpb.JOB_STATE_SUCCEEDED])) == 5,
                420,
                "all five campaign jobs to succeed",
            )
            yield srv, devices, campaign.campaign_id
        finally:
            for device in devices.values():
                device.close()


def test_a_campaign_serves_late_enrollees_and_every_device_succeeds_once(
    fleet: tuple[ServerThread, dict[str, Device], str],
) -> None:
    srv, devices, campaign_id = fleet
    got = jobs(srv, campaign_id=campaign_id)
    assert sorted(j.device_id for j in got) == sorted(devices)  # one job per device, the late ones too
    assert all(j.state == tpb.JOB_STATE_SUCCEEDED and j.attempt == 1 for j in got)
    campaign = srv.operator.GetCampaign(opb.GetCampaignRequest(campaign_id=campaign_id), metadata=op_md()).campaign
    assert campaign.job_count == 5 and campaign.progress == 1.0 and campaign.enrolling
    for job in got:  # each adapter carries its device's held-out figures, and beat its base
        adapter = srv.operator.GetAdapter(opb.GetAdapterRequest(adapter_id=job.adapter_id), metadata=op_md()).adapter
        metrics = json.loads(adapter.manifest_json)["metrics"]
        assert metrics["eval_examples"] == 6
        assert metrics["eval_loss_adapter"] < 0.98 * metrics["eval_loss_base"], (job.device_id, metrics)


def test_a_rollout_step_whose_devices_fail_to_load_halts_and_rolls_back_that_step_only(
    fleet: tuple[ServerThread, dict[str, Device], str],
) -> None:
    srv, devices, campaign_id = fleet
    order = sorted(devices, key=lambda d: canary_rank(campaign_id, d))
    healthy, broken = order[:2], order[2:]  # steps 20% and 40% of five: 1 device, then 1 more; 100%: 3 more
    for name in broken:  # their runtime cannot load the base any more: it will not start
        (devices[name].base / "model.safetensors").write_bytes(b"\0" * 64)
    req = opb.StartRolloutRequest(
        campaign_id=campaign_id, steps=[20, 40, 100], eval_gate=GATE, min_healthy_share=1.0, max_failure_share=0.5
    )
    rollout_id = srv.operator.StartRollout(req, metadata=op_md()).rollout.rollout_id

    def state() -> opb.GetRolloutResponse:
        return srv.operator.GetRollout(
            opb.GetRolloutRequest(rollout_id=rollout_id, include_devices=True), metadata=op_md()
        )

    wait_for(lambda: state().rollout.state == tpb.ROLLOUT_STATE_HALTED, 300, "the rollout to halt")
    got = state()
    assert [(s.devices, s.active, s.rolled_back) for s in got.rollout.steps] == [(1, 1, 0), (1, 1, 0), (3, 0, 3)]
    assert "runtime did not start" in got.rollout.message, got.rollout.message
    by_device = {d.device_id: d for d in got.devices}
    for name in healthy:  # the healthy steps keep their adapters, and run them
        d = by_device[name]
        assert d.outcome == tpb.TARGET_OUTCOME_ACTIVE and d.desired_adapter_id == d.adapter_id == d.active_adapter_id
        assert devices[name].agent.adapters.active_adapter_id == d.adapter_id
    for name in broken:  # the whole step goes back, whether or not each device had tried yet
        d = by_device[name]
        assert d.outcome == tpb.TARGET_OUTCOME_ROLLED_BACK and d.desired_adapter_id == "" and d.active_adapter_id == ""
    refusers = [name for name in broken if devices[name].seen("adapter_refused")]
    assert len(refusers) >= 2  # more than half of the step's three devices: the threshold was crossed
    for name in refusers:
        assert "runtime did not start" in devices[name].seen("adapter_refused")[0]["reason"]

        def refusals(name: str = name) -> list[str]:
            device = srv.operator.GetDevice(opb.GetDeviceRequest(device_id=name), metadata=op_md()).device
            return [r.adapter_id for r in device.adapter_refusals]

        # A device that refused after the halt reports it with its next heartbeat, not at once.
        wait_for(refusals, 30, f"{name}'s refusal on its device record")
        assert refusals() == [by_device[name].adapter_id]


def test_an_adapter_that_does_not_beat_its_base_is_refused_by_the_eval_gate(
    fleet: tuple[ServerThread, dict[str, Device], str], base: Path, tmp_path: Path
) -> None:
    srv, _, _ = fleet
    solo = Device(srv, base, tmp_path, "solo", labelled_token(srv, fleet="other"), [(0, CHARGED)])
    try:
        enrolled(srv, "solo")
        dull = tpb.TrainingSpec()
        dull.CopyFrom(SPEC)
        dull.adapter_name, dull.learning_rate = "dull", 1e-7  # barely moves: no better than the base
        job = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="solo", training=dull), metadata=op_md()).job
        done = wait_for(
            lambda: (j := jobs(srv, device_id="solo")[0]).state == tpb.JOB_STATE_SUCCEEDED and j, 240, "the dull job"
        )
        assert done.job_id == job.job_id
        with pytest.raises(grpc.RpcError) as info:
            srv.operator.ActivateAdapter(
                opb.ActivateAdapterRequest(adapter_id=done.adapter_id, eval_gate=GATE), metadata=op_md()
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not beat its base by 2.0%" in info.value.details() and "eval loss" in info.value.details()
        device = srv.operator.GetDevice(opb.GetDeviceRequest(device_id="solo"), metadata=op_md()).device
        assert device.desired_adapter_id == ""
    finally:
        solo.close()


LONG = tpb.TrainingSpec(adapter_name="long", base_model_id="tiny", dataset="codes", max_steps=400, max_seq_len=48)


@pytest.fixture
def one(base: Path, tmp_path: Path) -> Iterator[tuple[ServerThread, Device]]:
    """One device, unplugged until its clock reaches 100, on a server of its own."""
    with ServerThread(tmp_path / "orch", lease_s=6.0, retry_base_s=0.5, reap_every_s=0.3) as srv:
        trace = [(0, {**CHARGED, "charging": False}), (100, CHARGED)]
        device = Device(srv, base, tmp_path, "phone", labelled_token(srv, tier="beta"), trace)
        try:
            enrolled(srv, "phone")
            yield srv, device
        finally:
            device.close()


def test_pause_stops_new_leases_and_cancel_stops_a_running_job(one: tuple[ServerThread, Device]) -> None:
    srv, device = one
    req = opb.SubmitCampaignRequest(name="c", selector=tpb.DeviceSelector(labels={"tier": "beta"}), training=LONG)
    campaign_id = srv.operator.SubmitCampaign(req, metadata=op_md()).campaign.campaign_id
    srv.operator.PauseCampaign(opb.PauseCampaignRequest(campaign_id=campaign_id), metadata=op_md())
    device.clock.t = 150  # plugged in: the device asks for work
    wait_for(lambda: device.seen("gate") and device.seen("gate")[-1]["eligible"], 30, "the device to be eligible")
    time.sleep(4.0)  # several lease polls
    assert [j.state for j in jobs(srv, campaign_id=campaign_id)] == [tpb.JOB_STATE_QUEUED]
    assert not device.seen("leased")
    srv.operator.ResumeCampaign(opb.ResumeCampaignRequest(campaign_id=campaign_id), metadata=op_md())
    wait_for(lambda: jobs(srv, campaign_id=campaign_id)[0].progress.step >= 1, 120, "training to start")
    srv.operator.CancelCampaign(opb.CancelCampaignRequest(campaign_id=campaign_id), metadata=op_md())
    dropped = wait_for(lambda: device.seen("job_dropped"), 30, "the device to stop the job")
    assert dropped[0]["reason"] == "cancelled by an operator"
    assert jobs(srv, campaign_id=campaign_id)[0].state == tpb.JOB_STATE_CANCELLED
    wait_for(lambda: device.agent.proc is None, 30, "the training child to be gone")


def test_a_gate_policy_change_reaches_the_agent_within_one_heartbeat_and_pauses_its_job(
    one: tuple[ServerThread, Device],
) -> None:
    srv, device = one
    device.clock.t = 150
    job = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="phone", training=LONG), metadata=op_md()).job
    wait_for(lambda: jobs(srv)[0].progress.step >= 1, 120, "training to start")
    policy = opb.FleetGatePolicy(
        name="beta-battery",
        selector=tpb.DeviceSelector(labels={"tier": "beta"}),
        policy=tpb.GatePolicy(min_battery_pct=95),
    )
    set_at = time.monotonic()
    srv.operator.SetGatePolicy(opb.SetGatePolicyRequest(policy=policy), metadata=op_md())
    changed = wait_for(lambda: [t for t, k, _ in device.events if k == "gate_policy"], 30, "the policy to arrive")
    # A device holding a lease heartbeats every lease/3 (2 s here, +-20%): the first one after the
    # change carries it.
    assert changed[0] - set_at < 6.0 / 3 * 1.2 + 1.0, changed[0] - set_at
    wait_for(lambda: jobs(srv)[0].state == tpb.JOB_STATE_PAUSED, 60, "the job to pause")
    assert device.seen("gate")[-1]["reason"] == "BATTERY_LOW"
    srv.operator.DeleteGatePolicy(opb.DeleteGatePolicyRequest(name="beta-battery"), metadata=op_md())
    wait_for(lambda: jobs(srv)[0].state == tpb.JOB_STATE_RUNNING, 60, "the job to resume without the policy")
    srv.operator.CancelJob(opb.CancelJobRequest(job_id=job.job_id), metadata=op_md())
