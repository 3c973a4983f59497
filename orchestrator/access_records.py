"""The records of access control: operators, their tokens, enrollment tokens, audit events.

Plain data like the rest of the domain (orchestrator/domain.py); operators.py, identity.py and
audit.py own the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.wire import Role


@dataclass
class OperatorRecord:
    """A named operator identity."""

    name: str
    role: Role
    created_at: float
    created_by: str = ""


@dataclass
class OperatorTokenRecord:
    """A bearer token of an operator, stored as its sha256; its role may be below the operator's."""

    token_id: str
    token_hash: str
    operator: str
    role: Role
    description: str
    created_at: float
    expires_at: float  # 0: never
    revoked_at: float = 0.0


@dataclass
class EnrollmentTokenRecord:
    """A token devices enroll with, stored as its sha256."""

    token_id: str
    token_hash: str
    description: str
    created_at: float
    expires_at: float
    max_devices: int = 0  # 0: any number; 1: single use
    uses: int = 0
    revoked_at: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)  # fixed on every device enrolled with it
    created_by: str = ""


@dataclass
class AuditEvent:
    """One mutating call: who, when, what, on what, and how it ended."""

    event_id: str
    at: float
    actor: str
    actor_kind: str  # operator | device | bootstrap
    action: str  # the RPC's name
    target: str
    result: str  # OK or the status code's name
    detail: str = ""


@dataclass
class AuditFilter:
    """Filters for listing audit events; empty fields match everything."""

    actor: str = ""
    action: str = ""
    target: str = ""
    since: float = 0.0
    until: float = 0.0
