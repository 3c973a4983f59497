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
    DeviceRecord,
    DeviceSelector,
    ErrorClass,
    JobEvent,
    JobFilter,
    JobRecord,
    JobState,
    Progress,
    ProgressPoint,
)
from orchestrator.errors import InvalidArgument
from protos import wire
from protos.pocketlora.v1 import agent_service_pb2 as agent_pb
from protos.pocketlora.v1 import operator_service_pb2 as op_pb
from protos.pocketlora.v1 import types_pb2 as pb
from protos.wire import EligibilityReason

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


def job_state(value: int, field: str = "state") -> JobState:
    """Domain state from the proto enum (UNSPECIFIED is refused)."""
    state = wire.from_pb(JobState, value)
    if state is None:
        raise InvalidArgument(field, f"{value} is not a valid job state")
    return state


def error_class(value: int, field: str = "error_class") -> ErrorClass:
    """Domain error class from the proto enum (UNSPECIFIED is refused)."""
    error = wire.from_pb(ErrorClass, value)
    if error is None:
        raise InvalidArgument(field, f"{value} is not a valid error class")
    return error


def reason_name(value: int) -> str:
    """The eligibility reason as stored ("" for unspecified or unknown values)."""
    reason = wire.from_pb(EligibilityReason, value)
    return reason.value if reason is not None else ""


def reason_pb(name: str) -> int:
    """The proto number of a stored eligibility reason (0 when unset)."""
    return wire.to_pb(EligibilityReason(name)) if name else 0


def counts_by_state(counts: dict[str, int]) -> dict[str, int]:
    """Stored job counts keyed by the proto's state names, as replies carry them."""
    return {wire.pb_name(JobState(k)): v for k, v in counts.items()}


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
        state=wire.to_pb(job.state),  # type: ignore[arg-type]
        training=training_pb(job.training),
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        lease_epoch=job.lease_epoch,
        lease_expires_at=ts(job.lease_expires_at),
        progress=progress_pb(job.progress),
        last_error_class=wire.to_pb(ErrorClass(job.last_error_class)) if job.last_error_class else 0,  # type: ignore[arg-type]
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


def base_shape_dict(shape: pb.BaseModelShape) -> dict[str, Any]:
    """A reported base model shape as a dict (checked at enrollment, after authentication)."""
    out = json_format.MessageToDict(shape, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for key in ("linear_params", "other_params", "file_bytes"):  # uint64 arrives as a string
        out[key] = int(out[key])
    out["lora_dims"] = {k: int(v) for k, v in out["lora_dims"].items()}
    return out


# Byte counts arrive as uint64 and are stored (and compared in SQL) as signed 64-bit integers.
_MAX_BYTES = 2**63 - 1


def byte_count(value: int) -> int:
    """A device-reported byte count as the stores hold it: at most 2**63 - 1 (8 EiB)."""
    return min(value, _MAX_BYTES)


def _runtime(number: int) -> wire.InferenceRuntime | None:
    return wire.from_pb(wire.InferenceRuntime, number)


def capabilities_dict(caps: pb.Capabilities) -> dict[str, Any]:
    """Capabilities as stored (labels included; the service splits them off)."""
    out = {
        "ram_bytes": byte_count(caps.ram_bytes),
        "free_storage_bytes": byte_count(caps.free_storage_bytes),
        "cpu": caps.cpu[:200],
        "cpu_count": caps.cpu_count,
        "accelerator": caps.accelerator[:200],
        "supports_4bit": caps.supports_4bit,
        "platform": caps.platform[:100],
        "base_model_id": caps.base_model_id[:200],
        "base_fingerprint": caps.base_fingerprint[:100],
        "memory_budget_bytes": byte_count(caps.memory_budget_bytes),
        "native_bf16": caps.native_bf16,
        "inference_runtimes": [str(r) for r in map(_runtime, caps.inference_runtimes) if r is not None],
        "labels": dict(caps.labels),
    }
    if caps.HasField("base_shape"):
        out["base_shape"] = base_shape_dict(caps.base_shape)
    return out


def runtime_form(form: dict[str, Any]) -> agent_pb.RuntimeForm:
    """An adapter's .onnx_adapter form as stored (adapters_store.onnx_adapter.form_manifest)."""
    return agent_pb.RuntimeForm(
        form=agent_pb.ADAPTER_FORM_ONNX_ADAPTER,
        sha256=str(form["sha256"]),
        size_bytes=int(form["size"]),
        bundle_sha256=str(form["bundle_sha256"]),
        manifest_json=json.dumps(form, sort_keys=True),
    )


def power_dict(power: pb.PowerState) -> dict[str, Any]:
    """Power state as stored; unknown readings stay absent."""
    out: dict[str, Any] = {"has_battery": power.has_battery}
    for name in ("charging", "battery_pct", "temperature_c"):
        if power.HasField(name):
            out[name] = getattr(power, name)
    return out


def device_pb(device: DeviceRecord) -> pb.Device:
    """A stored device as the API shows it."""
    caps = {k: v for k, v in device.capabilities.items() if k != "labels"}
    names = [wire.from_pb_name(wire.InferenceRuntime, n) for n in caps.get("inference_runtimes", [])]
    caps["inference_runtimes"] = [wire.to_pb(r) for r in names if r is not None]
    cap_pb = pb.Capabilities(labels=device.reported_labels, **caps)
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
        eligibility_reason=reason_pb(reason),  # type: ignore[arg-type]
        eligibility_detail=device.eligibility_detail,
        active_adapter_id=device.active_adapter_id,
        desired_adapter_id=device.desired_adapter_id,
        last_seen=ts(device.last_seen),
        enrolled_at=ts(device.enrolled_at),
        running_job_id=device.running_job_id,
        reported_labels=device.reported_labels,
        revoked_at=ts(device.revoked_at),
        labels=device.labels,
        adapter_refusals=[pb.AdapterRefusal(adapter_id=k, reason=v) for k, v in device.adapter_refusals.items()],
    )


def adapter_pb(a: AdapterRecord) -> pb.Adapter:
    """A stored adapter version as the API shows it."""
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


def history_pb(history: tuple[JobRecord, list[JobEvent], list[ProgressPoint]]) -> op_pb.GetJobHistoryResponse:
    """A job's recorded history; its creation is the first event."""
    job, events, points = history
    created = pb.JobEvent(at=ts(job.created_at), state=wire.to_pb(JobState.QUEUED), message="submitted")  # type: ignore[arg-type]
    return op_pb.GetJobHistoryResponse(
        events=[created, *(event_pb(e) for e in events)],
        points=[
            pb.ProgressPoint(
                at=ts(p.at),
                attempt=p.attempt,
                step=min(p.step, 2**32 - 1),
                total_steps=min(p.total_steps, 2**32 - 1),
                loss=p.loss if p.loss is not None else float("nan"),
                tokens_seen=p.tokens_seen,
            )
            for p in points
        ],
    )


def event_pb(e: JobEvent) -> pb.JobEvent:
    """One state change."""
    return pb.JobEvent(
        at=ts(e.at),
        state=wire.to_pb(e.state),  # type: ignore[arg-type]
        attempt=e.attempt,
        message=e.message,
        error_class=wire.to_pb(ErrorClass(e.error_class)) if e.error_class else 0,  # type: ignore[arg-type]
    )


def summary_pb(s: dict[str, Any]) -> op_pb.GetFleetSummaryResponse:
    """The fleet summary as the API shows it, counts keyed by the proto's enum names."""
    by_reason = {
        wire.pb_name(EligibilityReason(k))
        if k in EligibilityReason.__members__
        else "ELIGIBILITY_REASON_UNSPECIFIED": v
        for k, v in s["devices_by_eligibility"].items()
    }
    return op_pb.GetFleetSummaryResponse(
        jobs_by_state=counts_by_state(s["jobs_by_state"]),
        devices_by_eligibility=by_reason,
        device_count=s["device_count"],
        devices_online=s["devices_online"],
        adapter_count=s["adapter_count"],
        queued_by_base_model=s["queued_by_base_model"],
        devices_by_adapter_sync=s["devices_by_adapter_sync"],
        finished_per_minute=[
            op_pb.MinuteCount(minute=ts(minute), succeeded=ok, failed=bad)
            for minute, ok, bad in s["finished_per_minute"]
        ],
    )
