"""Capability-aware placement: can this device run this job? Pure functions.

Memory is planned with the device's own planner (adapters_store.memory_plan) over the base
model shape the device reported at enrollment, so the orchestrator and the device agree on
what fits. A job's `memory_estimate_bytes` is its smallest plan on its device (micro-batch 1,
checkpointing and optimizer offload where the spec leaves them open, the longest sequence the
spec allows: the orchestrator never sees the data, the device, which does, may plan less),
computed at submit from the capabilities the device enrolled with. A job whose estimate exceeds
the device's budget is not leased; the PostgreSQL poll function compares the same two numbers.
A device that reported no shape gets no estimate and no check here: its own planner refuses
such a job with DOES_NOT_FIT.
"""

from __future__ import annotations

from typing import Any

from adapters_store.memory_plan import MB, BaseShape, PlanInputs, plan_inputs_from_api, smallest_plan
from orchestrator.domain import DeviceRecord, JobRecord


def memory_budget_bytes(caps: dict[str, Any]) -> int:
    """The memory a device lets training use: its declared budget, else its RAM (0: unknown)."""
    return int(caps.get("memory_budget_bytes") or 0) or int(caps.get("ram_bytes") or 0)


def _shape(caps: dict[str, Any]) -> BaseShape | None:
    raw = caps.get("base_shape")
    if not isinstance(raw, dict):
        return None
    try:
        return BaseShape.from_dict(raw)
    except ValueError:  # checked at enrollment; a row written by an older version is not planned
        return None


def _inputs(training: dict[str, Any], caps: dict[str, Any]) -> PlanInputs:
    return plan_inputs_from_api(
        training, native_bf16=bool(caps.get("native_bf16")), supports_4bit=bool(caps.get("supports_4bit"))
    )


def planned_peak_bytes(training: dict[str, Any], caps: dict[str, Any]) -> int:
    """The smallest planned peak of a job on a device, or 0 when the device reported no base shape."""
    shape = _shape(caps)
    return 0 if shape is None else smallest_plan(shape, _inputs(training, caps))[0]


def memory_problem(job: JobRecord, caps: dict[str, Any]) -> str:
    """Why the job's planned peak does not fit the device's budget, or "" when it fits or is unknown."""
    need, budget = job.memory_estimate_bytes, memory_budget_bytes(caps)
    if not need or not budget or need <= budget:
        return ""
    shape = _shape(caps)
    plan = f" (smallest plan: {smallest_plan(shape, _inputs(job.training, caps))[1]})" if shape else ""
    return (
        f"does not fit: planned peak {need / MB:.0f} MiB exceeds the device's memory budget of "
        f"{budget / MB:.0f} MiB by {(need - budget) / MB:.0f} MiB{plan}"
    )


def placement_problem(job: JobRecord, device: DeviceRecord) -> str:
    """Why the device cannot run the job, or "" when it can."""
    caps = device.capabilities
    spec = job.training
    base = spec.get("base_model_id", "")
    if base and caps.get("base_model_id") and caps["base_model_id"] != base:
        return f"device has base model {caps['base_model_id']!r}, job needs {base!r}"
    wants_4bit = spec.get("quantization", "QUANTIZATION_NF4") in ("QUANTIZATION_NF4", "QUANTIZATION_UNSPECIFIED")
    no_fallback = spec.get("on_4bit_unsupported") == "FOUR_BIT_FALLBACK_FAIL"
    if wants_4bit and no_fallback and not caps.get("supports_4bit", False):
        return "device lacks 4-bit support and the job forbids falling back"
    return memory_problem(job, caps)
