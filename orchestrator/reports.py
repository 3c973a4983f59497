"""What a device sends and gets back on its polls: the heartbeat's report and the replies to a
heartbeat, a lease and a progress report, plus the checks a heartbeat's report passes before any
runner (Python or a PostgreSQL function) acts on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator import validation
from orchestrator.domain import AdapterRecord, JobRecord, JobState, Progress
from orchestrator.errors import InvalidArgument

# Refusals a heartbeat may carry (the agent reports its most recent ones).
MAX_REFUSALS = 32
_INT64_MAX = 2**63 - 1


@dataclass
class HeartbeatInput:
    """What a device reports in a heartbeat."""

    power: dict[str, Any] = field(default_factory=dict)
    eligible: bool = False
    eligibility_reason: str = ""
    eligibility_detail: str = ""
    running_job_id: str = ""
    running_epoch: int = 0
    running_state: JobState | None = None
    progress: Progress | None = None
    active_adapter_id: str = ""
    free_storage_bytes: int = 0
    adapter_refusals: dict[str, str] = field(default_factory=dict)  # adapter id -> why


@dataclass
class HeartbeatResult:
    """What the device should do next."""

    cancel_job_ids: list[str]  # cancelled by an operator: discard the work
    desired_adapter: AdapterRecord | None
    lease_expires_at: float
    next_poll_s: float
    stale_job_ids: list[str] = field(default_factory=list)  # lease lost: stop, keep checkpoints
    gate_policy: dict[str, Any] = field(default_factory=dict)  # the fleet's thresholds for it
    gate_policy_names: list[str] = field(default_factory=list)


@dataclass
class LeaseResult:
    """At most one leased job, with its presigned URLs."""

    job: JobRecord | None
    upload_url: str
    upload_url_expires_at: float
    dataset_url: str
    next_poll_s: float
    upload_fields: Mapping[str, str] = field(default_factory=dict)  # a POST form when set


@dataclass
class ProgressResult:
    """The renewed lease and, with UPLOADING, a fresh upload URL."""

    lease_expires_at: float
    cancel_requested: bool
    upload_url: str = ""
    upload_url_expires_at: float = 0.0
    upload_fields: Mapping[str, str] = field(default_factory=dict)


def validate_heartbeat(hb: HeartbeatInput) -> None:
    """Refuse malformed ids in a heartbeat; free text is kept, cleaned (validation.device_text)."""
    if hb.running_job_id:
        validation.object_id(hb.running_job_id, "running.job_id")
    validation.optional_object_id(hb.active_adapter_id, "active_adapter_id")
    hb.eligibility_detail = validation.device_text(hb.eligibility_detail, 200)
    # Reports are kept, not refused: a uint64 past what the store's signed 64-bit columns hold
    # is no real storage size or epoch, and means the same capped (an epoch that never matches).
    hb.free_storage_bytes = min(hb.free_storage_bytes, _INT64_MAX)
    hb.running_epoch = min(hb.running_epoch, _INT64_MAX)
    if len(hb.adapter_refusals) > MAX_REFUSALS:
        raise InvalidArgument("adapter_refusals", f"{len(hb.adapter_refusals)} entries, above {MAX_REFUSALS}")
    for adapter_id in hb.adapter_refusals:
        validation.object_id(adapter_id, "adapter_refusals.adapter_id")
    hb.adapter_refusals = {k: validation.device_text(v, 300) for k, v in hb.adapter_refusals.items()}
