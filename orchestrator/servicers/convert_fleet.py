"""Proto <-> domain conversions of campaigns, rollouts, eval gates and gate policies."""

from __future__ import annotations

from typing import Any, TypeVar

from orchestrator.activation import Activation
from orchestrator.campaigns import CampaignView
from orchestrator.domain import CampaignState, DeviceRecord, ErrorClass, GatePolicyRecord, RolloutState, RolloutTarget
from orchestrator.errors import InvalidArgument
from orchestrator.evaluation import EvalGate
from orchestrator.gate_policies import POLICY_FIELDS
from orchestrator.rollouts import RolloutView
from orchestrator.servicers.convert import counts_by_state, duration, selector_pb, training_pb, ts
from protos import wire
from protos.pocketlora.v1 import operator_service_pb2 as op_pb
from protos.pocketlora.v1 import types_pb2 as pb

E = TypeVar("E", CampaignState, RolloutState)


def campaign_pb(view: CampaignView) -> op_pb.Campaign:
    """A campaign with its jobs by state, its failures by error class and its progress."""
    c = view.campaign
    failures = {
        wire.pb_name(ErrorClass(k)) if k in ErrorClass.__members__ else "ERROR_CLASS_UNSPECIFIED": v
        for k, v in view.failures_by_class.items()
    }
    return op_pb.Campaign(
        campaign_id=c.campaign_id,
        name=c.name,
        job_count=c.job_count,
        jobs_by_state=counts_by_state(view.jobs_by_state),
        created_at=ts(c.created_at),
        selector=selector_pb(c.selector),
        state=wire.to_pb(c.state),  # type: ignore[arg-type]
        target_count=c.target_count,
        deadline=ts(c.deadline),
        training=training_pb(c.training) if c.training else None,
        max_attempts=c.max_attempts,
        failures_by_error_class=failures,
        enrolling=view.enrolling,
        updated_at=ts(c.updated_at),
        progress=view.progress,
    )


def states(cls: type[E], values: Any) -> tuple[E, ...]:
    """Domain states from a repeated proto enum field (UNSPECIFIED and unknown numbers refused)."""
    out = []
    for value in values:
        state = wire.from_pb(cls, value)
        if state is None:
            raise InvalidArgument("states", f"{value} is not a {cls.__name__} value")
        out.append(state)
    return tuple(out)


def eval_gate(message: Any, present: bool) -> EvalGate | None:
    """The domain gate, or None when the request carries none."""
    return EvalGate(float(message.min_improvement)) if present else None


def rollout_pb(view: RolloutView) -> op_pb.Rollout:
    """A rollout with its steps."""
    r = view.rollout
    out = op_pb.Rollout(
        rollout_id=r.rollout_id,
        campaign_id=r.campaign_id,
        state=wire.to_pb(r.state),  # type: ignore[arg-type]
        steps=[
            op_pb.RolloutStep(
                percent=s.percent,
                devices=s.devices,
                active=s.active,
                failed=s.failed,
                pending=s.pending,
                rolled_back=s.rolled_back,
            )
            for s in view.steps
        ],
        current_step=r.current_step,
        min_healthy_share=r.min_healthy_share,
        max_failure_share=r.max_failure_share,
        bake=duration(r.bake_s),
        message=r.message,
        created_at=ts(r.created_at),
        updated_at=ts(r.updated_at),
        step_started_at=ts(r.step_started_at),
        eligible_devices=r.eligible_devices,
        gate_refused_devices=r.gate_refused_devices,
        request_id=r.request_id,
    )
    if r.eval_gate:
        out.eval_gate.CopyFrom(op_pb.EvalGate(min_improvement=float(r.eval_gate["min_improvement"])))
    return out


def rollout_device_pb(target: RolloutTarget, device: DeviceRecord | None) -> op_pb.RolloutDevice:
    """One device of a rollout: what it was given, what it wants and runs now."""
    return op_pb.RolloutDevice(
        device_id=target.device_id,
        step=target.step,
        adapter_id=target.adapter_id,
        desired_adapter_id=device.desired_adapter_id if device else "",
        active_adapter_id=device.active_adapter_id if device else "",
        outcome=wire.to_pb(target.outcome),  # type: ignore[arg-type]
        reason=target.reason,
    )


def activation_pb(done: Activation) -> op_pb.ActivateAdapterResponse:
    """Which devices changed and which were left out."""
    return op_pb.ActivateAdapterResponse(
        device_ids=done.changed,
        refused=[op_pb.ActivationRefusal(device_id=d, adapter_id=a, reason=r) for d, a, r in done.refused],
    )


def policy_fields(policy: pb.GatePolicy) -> dict[str, Any]:
    """The fields a GatePolicy message sets, as the domain stores them."""
    # float fields travel as 32-bit floats: 37.2 arrives as 37.200000762..., so round them.
    return {
        name: round(getattr(policy, name), 3) if kind is float else kind(getattr(policy, name))
        for name, kind in POLICY_FIELDS.items()
        if policy.HasField(name)  # type: ignore[arg-type]
    }


def policy_pb(fields: dict[str, Any]) -> pb.GatePolicy:
    """A GatePolicy message with exactly these fields set."""
    return pb.GatePolicy(**{k: v for k, v in fields.items() if k in POLICY_FIELDS})


def fleet_policy_pb(record: GatePolicyRecord) -> op_pb.FleetGatePolicy:
    """A stored gate policy as the API shows it."""
    return op_pb.FleetGatePolicy(
        name=record.name,
        selector=selector_pb(record.selector),
        policy=policy_pb(record.policy),
        priority=record.priority,
        updated_at=ts(record.updated_at),
    )
