"""Domain records and the job state machine, free of SQL, gRPC and Ray.

Records are plain dataclasses; times are UNIX seconds (float). The training spec is kept as the
JSON dict of the proto `TrainingSpec` (the orchestrator reads only a few of its fields).
"""

from __future__ import annotations

import enum
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any


class JobState(enum.StrEnum):
    """Lifecycle of a job; values match the proto enum names without the JOB_STATE_ prefix."""

    QUEUED = "QUEUED"
    LEASED = "LEASED"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    UPLOADING = "UPLOADING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True for states a job never leaves."""
        return self in _TERMINAL

    @property
    def leased(self) -> bool:
        """True while a device holds the job under a lease."""
        return self in _HELD


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
_HELD = frozenset({JobState.LEASED, JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING})

# Transitions a device may report while it holds the lease (the orchestrator itself also moves
# jobs to QUEUED on expiry/retry, to FAILED, SUCCEEDED and CANCELLED).
DEVICE_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.LEASED: frozenset({JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING}),
    JobState.RUNNING: frozenset({JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING}),
    JobState.PAUSED: frozenset({JobState.PAUSED, JobState.RUNNING, JobState.UPLOADING}),
    JobState.UPLOADING: frozenset({JobState.UPLOADING}),
}


class ErrorClass(enum.StrEnum):
    """Why an attempt failed; values match the proto enum names without the ERROR_CLASS_ prefix."""

    TRANSIENT = "TRANSIENT"
    CRASHED = "CRASHED"
    DATASET_INVALID = "DATASET_INVALID"
    DOES_NOT_FIT = "DOES_NOT_FIT"
    UNSUPPORTED = "UNSUPPORTED"
    INVALID_SPEC = "INVALID_SPEC"
    INCOMPATIBLE_BASE = "INCOMPATIBLE_BASE"
    UPLOAD_FAILED = "UPLOAD_FAILED"
    INTEGRITY = "INTEGRITY"
    LEASE_EXPIRED = "LEASE_EXPIRED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"

    @property
    def retryable(self) -> bool:
        """Whether another attempt could succeed: bad data or a device that cannot fit never will."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorClass.TRANSIENT,
        ErrorClass.CRASHED,
        ErrorClass.UPLOAD_FAILED,
        ErrorClass.INTEGRITY,
        ErrorClass.LEASE_EXPIRED,
    }
)

# Kubernetes Jobs retry 6 times by default (backoffLimit); so do we.
DEFAULT_MAX_ATTEMPTS = 6


_id_lock = threading.Lock()
_id_last = [0, 0]  # last millisecond, sequence within it


def new_id(prefix: str) -> str:
    """A time-ordered unique id: prefix, 48-bit ms, 16-bit sequence, 48 random bits, in hex.

    Ids sort in creation order within a process (list pages and "newest first" rely on it), and
    hex sorts the same under every database collation.
    """
    with _id_lock:
        ms = int(time.time() * 1000)
        if ms <= _id_last[0]:
            ms, seq = _id_last[0], _id_last[1] + 1
        else:
            seq = 0
        _id_last[:] = [ms, seq]
    return f"{prefix}-{ms:012x}{seq & 0xFFFF:04x}{os.urandom(6).hex()}"


@dataclass
class Progress:
    """How far an attempt has got."""

    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float = 0.0
    tokens_seen: int = 0


@dataclass
class JobRecord:
    """One job as stored."""

    job_id: str
    device_id: str
    training: dict[str, Any]
    state: JobState = JobState.QUEUED
    campaign_id: str = ""
    attempt: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    lease_epoch: int = 0
    lease_expires_at: float = 0.0
    progress: Progress = field(default_factory=Progress)
    last_error_class: str = ""
    last_error: str = ""
    status_message: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    deadline: float = 0.0
    adapter_id: str = ""
    not_before: float = 0.0
    paused_s: float = 0.0
    paused_since: float = 0.0
    request_id: str = ""
    memory_estimate_bytes: int = 0
    change_seq: int = 0


@dataclass
class DeviceRecord:
    """One enrolled device as stored."""

    device_id: str
    credential_hash: str
    capabilities: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    power: dict[str, Any] = field(default_factory=dict)
    eligible: bool = False
    eligibility_reason: str = ""
    eligibility_detail: str = ""
    active_adapter_id: str = ""
    desired_adapter_id: str = ""
    adapter_history: list[str] = field(default_factory=list)
    last_seen: float = 0.0
    enrolled_at: float = 0.0
    running_job_id: str = ""


@dataclass
class AdapterRecord:
    """One registered adapter version."""

    adapter_id: str
    name: str
    version: int
    device_id: str
    job_id: str
    attempt: int
    sha256: str
    size_bytes: int
    base_model_id: str
    base_fingerprint: str
    manifest: dict[str, Any]
    created_at: float
    blob_key: str


@dataclass
class CampaignRecord:
    """A group of jobs created from one spec for every device matching a selector."""

    campaign_id: str
    name: str
    selector: dict[str, Any]
    request_id: str
    created_at: float
    job_count: int = 0


@dataclass
class JobFilter:
    """Filters for listing and watching jobs; empty fields match everything."""

    states: tuple[JobState, ...] = ()
    device_id: str = ""
    campaign_id: str = ""
    created_after: float = 0.0
    created_before: float = 0.0

    def matches(self, job: JobRecord) -> bool:
        """True when the job passes every set filter."""
        return (
            (not self.states or job.state in self.states)
            and (not self.device_id or job.device_id == self.device_id)
            and (not self.campaign_id or job.campaign_id == self.campaign_id)
            and (not self.created_after or job.created_at >= self.created_after)
            and (not self.created_before or job.created_at < self.created_before)
        )


@dataclass
class DeviceSelector:
    """Which devices a campaign or fleet activation applies to; empty fields match every device."""

    labels: dict[str, str] = field(default_factory=dict)
    min_ram_bytes: int = 0
    requires_4bit: bool = False
    base_model_id: str = ""
    device_ids: tuple[str, ...] = ()

    def matches(self, device: DeviceRecord) -> bool:
        """True when the device satisfies every set condition."""
        caps = device.capabilities
        return (
            all(device.labels.get(k) == v for k, v in self.labels.items())
            and int(caps.get("ram_bytes", 0)) >= self.min_ram_bytes
            and (not self.requires_4bit or bool(caps.get("supports_4bit")))
            and (not self.base_model_id or caps.get("base_model_id") == self.base_model_id)
            and (not self.device_ids or device.device_id in self.device_ids)
        )
