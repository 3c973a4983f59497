"""Domain records and the job state machine, free of SQL, gRPC and Ray.

Records are plain dataclasses; times are UNIX seconds (float). The training spec is kept as the
JSON dict of the proto `TrainingSpec` (the orchestrator reads only a few of its fields).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import FailedPrecondition
from protos.wire import CampaignState as CampaignState
from protos.wire import ErrorClass as ErrorClass
from protos.wire import JobState as JobState
from protos.wire import Role as Role
from protos.wire import RolloutState as RolloutState
from protos.wire import TargetOutcome as TargetOutcome

# Transitions a device may report while it holds the lease (the orchestrator itself also moves
# jobs to QUEUED on expiry/retry, to FAILED, SUCCEEDED and CANCELLED).
DEVICE_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.LEASED: frozenset({JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING}),
    JobState.RUNNING: frozenset({JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING}),
    JobState.PAUSED: frozenset({JobState.PAUSED, JobState.RUNNING, JobState.UPLOADING}),
    JobState.UPLOADING: frozenset({JobState.UPLOADING}),
}


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

    # State-change bookkeeping. Each method changes this record only; the caller saves it in
    # the transaction that read it.
    def lease(self, now: float, lease_s: float) -> None:
        """Hand the job out under a new attempt and fencing epoch."""
        self.state = JobState.LEASED
        self.attempt += 1
        self.lease_epoch += 1
        self.lease_expires_at = now + lease_s
        self.status_message = ""
        self.progress = Progress()
        self.updated_at = now

    def renew(self, now: float, lease_s: float) -> None:
        """Extend the lease from now."""
        self.lease_expires_at = now + lease_s
        self.updated_at = now

    def move(self, new: JobState, now: float, pause_reason: str = "") -> None:
        """Apply a transition the device reports; paused time never eats the deadline."""
        if new not in DEVICE_TRANSITIONS.get(self.state, frozenset()):
            raise FailedPrecondition(f"job {self.job_id}: cannot go from {self.state.value} to {new.value}")
        if new == JobState.PAUSED and self.state != JobState.PAUSED:
            self.paused_since = now
            self.status_message = f"paused by the device's gate ({pause_reason or 'reason not given'})"
        elif new != JobState.PAUSED and self.state == JobState.PAUSED:
            self.end_pause(now)
            self.status_message = ""
        self.state = new
        self.updated_at = now

    def end_pause(self, now: float) -> None:
        """Add the time since the job paused to paused_s (a no-op unless it is paused)."""
        if self.state == JobState.PAUSED and self.paused_since:
            self.paused_s += now - self.paused_since
            self.paused_since = 0.0

    def fail_attempt(self, error: ErrorClass, message: str, now: float, retry: RetryPolicy) -> None:
        """End the attempt: back to QUEUED with backoff while retryable and attempts remain,
        else FAILED."""
        self._end(now)
        self.last_error_class = error.value
        self.last_error = message
        if error.retryable and self.attempt < self.max_attempts:
            delay = retry.delay(self.attempt)
            self.state = JobState.QUEUED
            self.not_before = now + delay
            self.status_message = (
                f"retry {self.attempt + 1}/{self.max_attempts} after {error.value}, not before +{delay:.0f}s"
            )
        else:
            self.state = JobState.FAILED
            self.status_message = (
                f"{error.value} is not retryable" if not error.retryable else f"gave up after {self.attempt} attempts"
            )

    def past_deadline(self, now: float) -> bool:
        """True when the deadline, extended by the time spent paused, has passed (a paused job
        waits: its pause has no end yet)."""
        return bool(self.deadline) and self.deadline + self.paused_s < now and self.state != JobState.PAUSED

    def miss_deadline(self, now: float) -> None:
        """FAILED for good: the deadline passed."""
        self._end(now)
        self.last_error_class = ErrorClass.DEADLINE_EXCEEDED.value
        self.last_error = self.status_message = "deadline passed"
        self.state = JobState.FAILED

    def succeed(self, adapter_id: str, now: float) -> None:
        """SUCCEEDED with the adapter it produced."""
        self._end(now)
        self.state = JobState.SUCCEEDED
        self.adapter_id = adapter_id

    def cancel(self, now: float) -> None:
        """CANCELLED by an operator; its device learns it on the next report."""
        self._end(now)
        self.state = JobState.CANCELLED
        self.status_message = "cancelled by an operator"

    def _end(self, now: float) -> None:
        self.end_pause(now)
        self.lease_expires_at = 0.0
        self.updated_at = now


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between attempts: base * 2^(attempt-1), capped."""

    base_s: float = 5.0
    max_s: float = 600.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after `attempt`."""
        return float(min(self.base_s * 2 ** max(attempt - 1, 0), self.max_s))


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
    # What the device says about itself at enrollment; kept apart from `labels`, which operators
    # (or the enrollment token) set and selectors target.
    reported_labels: dict[str, str] = field(default_factory=dict)
    # A rotated credential not used yet: both it and credential_hash are accepted until the
    # device's first call with it, so a device that crashed mid-rotation keeps its old one.
    next_credential_hash: str = ""
    revoked_at: float = 0.0
    # When labels or capabilities were last written (enrollment): campaigns look at devices
    # changed since their last fan-out.
    profile_at: float = 0.0
    # adapter id -> why the device refuses to run it, as its heartbeats report.
    adapter_refusals: dict[str, str] = field(default_factory=dict)


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


@dataclass(frozen=True)
class JobEvent:
    """One recorded state change of a job."""

    at: float
    state: JobState
    attempt: int
    message: str = ""
    error_class: str = ""


@dataclass(frozen=True)
class ProgressPoint:
    """One recorded progress report of an attempt (the loss curve's points)."""

    at: float
    attempt: int
    step: int
    total_steps: int
    loss: float | None
    tokens_seen: int


@dataclass
class CampaignRecord:
    """One spec trained on every device matching a selector, including devices that enroll or
    start matching while the campaign is open (until its deadline or target count)."""

    campaign_id: str
    name: str
    selector: dict[str, Any]
    request_id: str
    created_at: float
    job_count: int = 0
    state: CampaignState = CampaignState.ACTIVE
    training: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 0
    deadline: float = 0.0  # no job is created after it; each job fails if unfinished by then
    target_count: int = 0  # most jobs it creates; 0 for no limit
    scanned_until: float = 0.0  # devices changed before this were looked at by the fan-out
    updated_at: float = 0.0

    def room(self, now: float) -> int:
        """How many more jobs it may create now (0 once closed; -1 for no limit)."""
        if self.state != CampaignState.ACTIVE or not self.training or (self.deadline and now >= self.deadline):
            return 0
        return max(self.target_count - self.job_count, 0) if self.target_count else -1

    def move(self, state: CampaignState, now: float) -> None:
        """Change state; a cancelled campaign stays cancelled."""
        if self.state == CampaignState.CANCELLED:
            raise FailedPrecondition(f"campaign {self.campaign_id} was cancelled")
        self.state = state
        self.updated_at = now


@dataclass
class RolloutRecord:
    """A staged activation of one campaign's adapters: step k gives the adapter to steps[k]% of
    the devices whose adapter passed the gate, once the devices of step k-1 are healthy."""

    rollout_id: str
    campaign_id: str
    steps: list[int]
    state: RolloutState = RolloutState.RUNNING
    current_step: int = 0
    assigned_step: int = -1  # the last step whose devices were given the adapter
    eval_gate: dict[str, Any] = field(default_factory=dict)  # EvalGate fields; empty for none
    min_healthy_share: float = 0.9
    max_failure_share: float = 0.1
    bake_s: float = 0.0
    message: str = ""
    request_id: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    step_started_at: float = 0.0
    eligible_devices: int = 0
    gate_refused_devices: int = 0


@dataclass
class RolloutTarget:
    """One device of a rollout: the adapter it was given at which step, and how that went."""

    rollout_id: str
    device_id: str
    adapter_id: str
    step: int
    previous_adapter_id: str  # what the device wanted before; a rollback goes back to it
    outcome: TargetOutcome = TargetOutcome.PENDING
    reason: str = ""
    changed_at: float = 0.0


@dataclass
class GatePolicyRecord:
    """An operator's gate thresholds for the devices a selector matches (only the set fields)."""

    name: str
    selector: dict[str, Any]
    policy: dict[str, Any]
    priority: int = 0
    updated_at: float = 0.0


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceSelector:
        """A selector stored as its dataclass dict (JSON lists become tuples again)."""
        return cls(
            labels={str(k): str(v) for k, v in data.get("labels", {}).items()},
            min_ram_bytes=int(data.get("min_ram_bytes", 0)),
            requires_4bit=bool(data.get("requires_4bit", False)),
            base_model_id=str(data.get("base_model_id", "")),
            device_ids=tuple(data.get("device_ids", ())),
        )

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
