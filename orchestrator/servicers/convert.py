"""Proto <-> domain conversions (Flower's serde.py role)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from orchestrator.domain import (
    AdapterRecord,
    CampaignRecord,
    DeviceRecord,
    DeviceSelector,
    JobFilter,
    JobRecord,
    JobState,
    Progress,
)
from orchestrator.errors import InvalidArgument
from protos.pocketlora.v1 import agent_service_pb2 as agent_pb
from protos.pocketlora.v1 import types_pb2 as pb

_MAX_TS = dt.datetime(9999, 1, 1, tzinfo=dt.UTC).timestamp()


def ts(seconds: float) -> Timestamp | None:
    """A Timestamp for UNIX seconds, or None for 0 (unset)."""
    if not seconds:
        return None
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


def from_ts(value: Timestamp, field: str) -> float:
    """UNIX seconds from a Timestamp (0 when unset)."""
    secs = value.seconds + value.nanos / 1e9
    if secs < 0 or secs > _MAX_TS:
        raise InvalidArgument(field, "timestamp out of range")
    return secs


def duration(seconds: float) -> Duration:
    """A Duration for seconds."""
    out = Duration()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


# Enum lookups built once: EnumTypeWrapper.values() builds a new list on every call, and these
# run on every poll.
_JOB_STATES: dict[int, JobState] = {
    number: JobState(name.removeprefix("JOB_STATE_"))
    for name, number in pb.JobState.items()
    if number != pb.JOB_STATE_UNSPECIFIED
}
_REASONS: dict[int, str] = {
    number: name.removeprefix("ELIGIBILITY_REASON_") for name, number in pb.EligibilityReason.items() if number
}


def job_state(value: int, field: str = "state") -> JobState:
    """Domain state from the proto enum (UNSPECIFIED is refused)."""
    state = _JOB_STATES.get(value)
    if state is None:
        raise InvalidArgument(field, f"{value} is not a valid job state")
    return state


def job_state_pb(state: JobState) -> int:
    """Proto enum for a domain state."""
    return int(pb.JobState.Value("JOB_STATE_" + state.value))


def training_dict(spec: pb.TrainingSpec) -> dict[str, Any]:
    """The TrainingSpec as the JSON dict the domain stores."""
    return json_format.MessageToDict(spec, preserving_proto_field_name=True)


# Stored spec (canonical JSON) -> serialized TrainingSpec. json_format.ParseDict walks the
# descriptors in Python on every call and was the costliest step of building a lease reply;
# jobs of one campaign share their spec, so most leases hit this cache.
_TRAINING_CACHE: dict[str, bytes] = {}
_TRAINING_CACHE_MAX = 4096


def training_pb(spec: dict[str, Any]) -> pb.TrainingSpec:
    """The stored dict back as a TrainingSpec."""
    key = json.dumps(spec, sort_keys=True)
    data = _TRAINING_CACHE.get(key)
    if data is not None:
        return pb.TrainingSpec.FromString(data)
    message = json_format.ParseDict(spec, pb.TrainingSpec(), ignore_unknown_fields=True)
    if len(_TRAINING_CACHE) >= _TRAINING_CACHE_MAX:
        _TRAINING_CACHE.clear()
    _TRAINING_CACHE[key] = message.SerializeToString()
    return message


def progress(p: pb.JobProgress) -> Progress:
    """Domain progress."""
    return Progress(p.step, p.total_steps, p.epoch, p.loss, p.tokens_seen)


def progress_pb(p: Progress) -> pb.JobProgress:
    """Proto progress."""
    return pb.JobProgress(step=p.step, total_steps=p.total_steps, epoch=p.epoch, loss=p.loss, tokens_seen=p.tokens_seen)


def job_pb(job: JobRecord) -> pb.Job:
    """A stored job as the API shows it."""
    paused = job.paused_s
    return pb.Job(
        job_id=job.job_id,
        device_id=job.device_id,
        campaign_id=job.campaign_id,
        state=job_state_pb(job.state),  # type: ignore[arg-type]
        training=training_pb(job.training),
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        lease_epoch=job.lease_epoch,
        lease_expires_at=ts(job.lease_expires_at),
        progress=progress_pb(job.progress),
        last_error_class=pb.ErrorClass.Value("ERROR_CLASS_" + job.last_error_class) if job.last_error_class else 0,  # type: ignore[arg-type]
        last_error=job.last_error,
        status_message=job.status_message,
        created_at=ts(job.created_at),
        updated_at=ts(job.updated_at),
        deadline=ts(job.deadline),
        adapter_id=job.adapter_id,
        not_before=ts(job.not_before),
        paused=duration(paused),
        request_id=job.request_id,
        memory_estimate_bytes=job.memory_estimate_bytes,
    )


def capabilities_dict(caps: pb.Capabilities) -> dict[str, Any]:
    """Capabilities as stored (labels included; the service splits them off)."""
    return {
        "ram_bytes": caps.ram_bytes,
        "free_storage_bytes": caps.free_storage_bytes,
        "cpu": caps.cpu[:200],
        "cpu_count": caps.cpu_count,
        "accelerator": caps.accelerator[:200],
        "supports_4bit": caps.supports_4bit,
        "platform": caps.platform[:100],
        "base_model_id": caps.base_model_id[:200],
        "base_fingerprint": caps.base_fingerprint[:100],
        "memory_budget_bytes": caps.memory_budget_bytes,
        "labels": dict(caps.labels),
    }


def power_dict(power: pb.PowerState) -> dict[str, Any]:
    """Power state as stored; unknown readings stay absent."""
    out: dict[str, Any] = {"has_battery": power.has_battery}
    for name in ("charging", "battery_pct", "temperature_c"):
        if power.HasField(name):
            out[name] = getattr(power, name)
    return out


def reason_name(value: int) -> str:
    """EligibilityReason name without the prefix ("" for unspecified or unknown values)."""
    return _REASONS.get(value, "")


def device_pb(device: DeviceRecord) -> pb.Device:
    """A stored device as the API shows it."""
    caps = {k: v for k, v in device.capabilities.items() if k != "labels"}
    cap_pb = pb.Capabilities(labels=device.labels, **caps)
    power = pb.PowerState(has_battery=bool(device.power.get("has_battery")))
    for name in ("charging", "battery_pct", "temperature_c"):
        if name in device.power:
            setattr(power, name, device.power[name])
    reason = device.eligibility_reason
    return pb.Device(
        device_id=device.device_id,
        capabilities=cap_pb,
        power=power,
        eligible=device.eligible,
        eligibility_reason=pb.EligibilityReason.Value("ELIGIBILITY_REASON_" + reason) if reason else 0,  # type: ignore[arg-type]
        eligibility_detail=device.eligibility_detail,
        active_adapter_id=device.active_adapter_id,
        desired_adapter_id=device.desired_adapter_id,
        last_seen=ts(device.last_seen),
        enrolled_at=ts(device.enrolled_at),
        running_job_id=device.running_job_id,
    )


def adapter_pb(a: AdapterRecord) -> pb.Adapter:
    """A stored adapter version as the API shows it."""
    import json

    return pb.Adapter(
        adapter_id=a.adapter_id,
        name=a.name,
        version=a.version,
        device_id=a.device_id,
        job_id=a.job_id,
        attempt=a.attempt,
        sha256=a.sha256,
        size_bytes=a.size_bytes,
        base_model_id=a.base_model_id,
        base_fingerprint=a.base_fingerprint,
        manifest_json=json.dumps(a.manifest, sort_keys=True),
        created_at=ts(a.created_at),
        blob_key=a.blob_key,
    )


def adapter_ref(a: AdapterRecord) -> agent_pb.AdapterRef:
    """What a device needs to fetch and check an adapter."""
    return agent_pb.AdapterRef(
        adapter_id=a.adapter_id,
        sha256=a.sha256,
        size_bytes=a.size_bytes,
        base_fingerprint=a.base_fingerprint,
        name=a.name,
        version=a.version,
    )


def campaign_pb(c: CampaignRecord, counts: dict[str, int]) -> Any:
    """A campaign with its jobs counted by state."""
    from protos.pocketlora.v1 import operator_service_pb2 as op_pb

    return op_pb.Campaign(
        campaign_id=c.campaign_id,
        name=c.name,
        job_count=c.job_count,
        jobs_by_state={"JOB_STATE_" + k: v for k, v in counts.items()},
        created_at=ts(c.created_at),
        selector=selector_pb(c.selector),
    )


def selector(sel: pb.DeviceSelector) -> DeviceSelector:
    """Domain selector."""
    return DeviceSelector(
        labels=dict(sel.labels),
        min_ram_bytes=sel.min_ram_bytes,
        requires_4bit=sel.requires_4bit,
        base_model_id=sel.base_model_id,
        device_ids=tuple(sel.device_ids),
    )


def selector_pb(d: dict[str, Any]) -> pb.DeviceSelector:
    """A stored selector dict as the proto."""
    return pb.DeviceSelector(
        labels=d.get("labels", {}),
        min_ram_bytes=d.get("min_ram_bytes", 0),
        requires_4bit=d.get("requires_4bit", False),
        base_model_id=d.get("base_model_id", ""),
        device_ids=d.get("device_ids", []),
    )


def job_filter(f: pb.JobFilter) -> JobFilter:
    """Domain job filter."""
    return JobFilter(
        states=tuple(job_state(s, "filter.states") for s in f.states),
        device_id=f.device_id,
        campaign_id=f.campaign_id,
        created_after=from_ts(f.created_after, "filter.created_after"),
        created_before=from_ts(f.created_before, "filter.created_before"),
    )
