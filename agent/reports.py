"""What the agent reports: the heartbeat request and a job's progress, as protos."""

from __future__ import annotations

from typing import Any

from agent.gate import Eligibility
from agent.jobs import LocalJob
from agent.sensors import SensorReading
from protos import wire
from protos.pocketlora.v1 import agent_service_pb2 as pb
from protos.pocketlora.v1 import types_pb2 as tpb


def progress_pb(progress: dict[str, Any]) -> tpb.JobProgress:
    """A job's progress (as the training child reports it) as the proto."""
    return tpb.JobProgress(
        step=int(progress.get("step", 0)),
        total_steps=int(progress.get("total_steps", 0)),
        epoch=int(progress.get("epoch", 0)),
        loss=float(progress.get("loss", 0.0) or 0.0),
        tokens_seen=int(progress.get("tokens_seen", 0)),
    )


def heartbeat_request(
    device_id: str,
    reading: SensorReading,
    eligibility: Eligibility,
    active_adapter_id: str,
    running: LocalJob | None,
    refused: dict[str, str] | None = None,
) -> pb.HeartbeatRequest:
    """The device's state as a heartbeat: power, gate, active adapter, the job it runs, and the
    adapters it refused with why."""
    power = tpb.PowerState(has_battery=bool(reading.has_battery))
    if reading.charging is not None:
        power.charging = reading.charging
    if reading.battery_pct is not None:
        power.battery_pct = reading.battery_pct
    if reading.temperature_c is not None:
        power.temperature_c = reading.temperature_c
    req = pb.HeartbeatRequest(
        device_id=device_id,
        power=power,
        eligible=eligibility.eligible,
        eligibility_reason=wire.to_pb(eligibility.reason),  # type: ignore[arg-type]
        eligibility_detail=eligibility.detail,
        active_adapter_id=active_adapter_id,
        free_storage_bytes=reading.free_storage_bytes or 0,
        adapter_refusals=[tpb.AdapterRefusal(adapter_id=k, reason=v) for k, v in (refused or {}).items()],
    )
    if running is not None:
        req.running.CopyFrom(
            pb.RunningJob(
                job_id=running.job_id,
                lease_epoch=running.lease_epoch,
                state=wire.to_pb(running.state),  # type: ignore[arg-type]
                progress=progress_pb(running.progress),
            )
        )
    return req
