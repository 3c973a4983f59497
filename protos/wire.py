"""What both ends of the wire share beyond the generated code.

- The metadata key that names the calling device.
- The id and name grammar: the orchestrator refuses requests that break it, and the agent
  refuses replies that do, because ids become file names on the device (a job's folder, an
  adapter's download) and a server or a man in the middle must not steer those outside the
  agent's work directory.
- The enums domain code works with (job states, error classes, eligibility reasons, operator
  roles, inference runtimes, campaign, rollout and rollout-device states). Each is a
  StrEnum whose values are the proto enum's names without the enum's prefix
  (`JobState.QUEUED` <-> `JOB_STATE_QUEUED` = 1), so they read well in logs, JSON and SQL.
- One pair of helpers between those enums and the proto numbers (`to_pb` / `from_pb`) and one
  between them and the proto names (`pb_name` / `from_pb_name`), each built once from the
  generated descriptors: no caller builds an enum name by string prefixing.

The orchestrator, the agent and the CLI all import these; nothing here imports torch or gRPC.
"""

from __future__ import annotations

import enum
import re
from typing import TypeVar

from protos.pocketlora.v1 import admin_service_pb2 as admin_pb
from protos.pocketlora.v1 import types_pb2 as tpb

# Every device call carries this metadata next to `authorization: Bearer <credential>`.
DEVICE_HEADER = "x-pocketlora-device"

# Ids (devices, jobs, adapters, campaigns): 1-128 letters, digits, '.', '_', '-', starting with a
# letter or digit, so '.', '..', '/', NUL and an empty string can never be one. Use fullmatch:
# "$" also matches before a trailing newline.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Names (adapters, datasets, label keys, modules): the same alphabet, 1-64 characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_id(value: object) -> bool:
    """True for a well-formed id (safe as one path segment)."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def is_name(value: object) -> bool:
    """True for a well-formed name (safe as one path segment)."""
    return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None


class JobState(enum.StrEnum):
    """Lifecycle of a job."""

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
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def leased(self) -> bool:
        """True while a device holds the job under a lease."""
        return self in (JobState.LEASED, JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING)


class ErrorClass(enum.StrEnum):
    """Why an attempt failed."""

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
        return self in (
            ErrorClass.TRANSIENT,
            ErrorClass.CRASHED,
            ErrorClass.UPLOAD_FAILED,
            ErrorClass.INTEGRITY,
            ErrorClass.LEASE_EXPIRED,
        )


class EligibilityReason(enum.StrEnum):
    """Why a device's gate allows or refuses training."""

    ELIGIBLE = "ELIGIBLE"
    NOT_CHARGING = "NOT_CHARGING"
    BATTERY_LOW = "BATTERY_LOW"
    TOO_HOT = "TOO_HOT"
    STORAGE_LOW = "STORAGE_LOW"
    CPU_BUSY = "CPU_BUSY"
    SENSOR_UNKNOWN = "SENSOR_UNKNOWN"
    OUTSIDE_HOURS = "OUTSIDE_HOURS"


class CampaignState(enum.StrEnum):
    """Life of a campaign: ACTIVE <-> PAUSED, ACTIVE -> CLOSED, any -> CANCELLED."""

    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    CLOSED = "CLOSED"
    CANCELLED = "CANCELLED"


class RolloutState(enum.StrEnum):
    """Life of a rollout: RUNNING <-> PAUSED, then HALTED, COMPLETED or UNDONE."""

    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    HALTED = "HALTED"
    COMPLETED = "COMPLETED"
    UNDONE = "UNDONE"

    @property
    def live(self) -> bool:
        """True while the rollout may still change devices on its own."""
        return self in (RolloutState.RUNNING, RolloutState.PAUSED)


class TargetOutcome(enum.StrEnum):
    """How one device of a rollout is doing with the adapter it was given."""

    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"


class Role(enum.StrEnum):
    """What an operator may do; each role includes the ones before it."""

    VIEWER = "VIEWER"  # read and watch
    OPERATOR = "OPERATOR"  # submit, cancel, activate, roll back, campaigns
    ADMIN = "ADMIN"  # tokens, devices, operators, the audit log

    def allows(self, needed: Role) -> bool:
        """True when this role includes `needed`."""
        order = list(Role)
        return order.index(self) >= order.index(needed)


class InferenceRuntime(enum.StrEnum):
    """An engine a device answers prompts with."""

    ONNX = "ONNX"
    TORCH = "TORCH"


E = TypeVar("E", bound=enum.StrEnum)

# Domain enum -> (its proto enum wrapper, the proto names' prefix).
_PROTO = {
    JobState: (tpb.JobState, "JOB_STATE_"),
    ErrorClass: (tpb.ErrorClass, "ERROR_CLASS_"),
    EligibilityReason: (tpb.EligibilityReason, "ELIGIBILITY_REASON_"),
    Role: (admin_pb.Role, "ROLE_"),
    InferenceRuntime: (tpb.InferenceRuntime, "INFERENCE_RUNTIME_"),
    CampaignState: (tpb.CampaignState, "CAMPAIGN_STATE_"),
    RolloutState: (tpb.RolloutState, "ROLLOUT_STATE_"),
    TargetOutcome: (tpb.TargetOutcome, "TARGET_OUTCOME_"),
}
# Keyed by (class, member): members of different enums with the same name (JobState.RUNNING,
# RolloutState.RUNNING) are equal strings and would share a plain key.
_TO_PB: dict[tuple[type[enum.StrEnum], enum.StrEnum], int] = {}
_FROM_PB: dict[tuple[type[enum.StrEnum], int], enum.StrEnum] = {}
_FROM_NAME: dict[tuple[type[enum.StrEnum], str], enum.StrEnum] = {}
for _cls, (_wrapper, _prefix) in _PROTO.items():
    for _member in _cls:
        _number = _wrapper.Value(_prefix + _member.value)
        _TO_PB[(_cls, _member)] = _number
        _FROM_PB[(_cls, _number)] = _member
        _FROM_NAME[(_cls, _prefix + _member.value)] = _member
        _FROM_NAME[(_cls, _member.value)] = _member
    # Every proto value but UNSPECIFIED must have a domain member (tests/test_wire.py checks it).


def to_pb(member: enum.StrEnum | None) -> int:
    """The proto number of a domain enum member (0, UNSPECIFIED, for None)."""
    return 0 if member is None else _TO_PB[(type(member), member)]


def from_pb(cls: type[E], number: int) -> E | None:
    """The domain member for a proto number; None for UNSPECIFIED or a number this build does
    not know (callers decide whether that is an error and name the field)."""
    return _FROM_PB.get((cls, number))  # type: ignore[return-value]


def pb_name(member: enum.StrEnum) -> str:
    """The proto name of a member, as map keys in replies use it (`JOB_STATE_QUEUED`)."""
    return _PROTO[type(member)][1] + member.value


def from_pb_name(cls: type[E], name: str) -> E | None:
    """The member for a proto name or its short form (`JOB_STATE_QUEUED` or `queued`); None when
    neither names one."""
    return _FROM_NAME.get((cls, name.strip().upper()))  # type: ignore[return-value]
