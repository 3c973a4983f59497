"""Capability-aware placement: can this device run this job? Pure functions."""

from __future__ import annotations

from orchestrator.domain import DeviceRecord, JobRecord


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
    budget = int(caps.get("memory_budget_bytes") or 0) or int(caps.get("ram_bytes") or 0)
    if job.memory_estimate_bytes and budget and job.memory_estimate_bytes > budget:
        return f"job needs ~{job.memory_estimate_bytes / 2**20:.0f} MiB, device budget is {budget / 2**20:.0f} MiB"
    return ""
