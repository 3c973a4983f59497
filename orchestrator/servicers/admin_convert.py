"""Proto <-> domain conversions of the admin API."""

from __future__ import annotations

from orchestrator.access_records import AuditEvent, EnrollmentTokenRecord, OperatorRecord, OperatorTokenRecord
from orchestrator.errors import InvalidArgument
from orchestrator.servicers.convert import ts
from protos import wire
from protos.pocketlora.v1 import admin_service_pb2 as pb
from protos.wire import Role


def role(value: int, field: str) -> Role | None:
    """A role from the proto enum; None for unspecified (callers pick the default)."""
    if value == 0:
        return None
    parsed = wire.from_pb(Role, value)
    if parsed is None:
        raise InvalidArgument(field, f"{value} is not a valid role")
    return parsed


def operator_pb(o: OperatorRecord) -> pb.Operator:
    """An operator as the API shows it."""
    return pb.Operator(name=o.name, role=wire.to_pb(o.role), created_at=ts(o.created_at), created_by=o.created_by)  # type: ignore[arg-type]


def operator_token_pb(t: OperatorTokenRecord) -> pb.OperatorToken:
    """An operator token as the API shows it (never its hash)."""
    return pb.OperatorToken(
        token_id=t.token_id,
        operator=t.operator,
        role=wire.to_pb(t.role),  # type: ignore[arg-type]
        description=t.description,
        created_at=ts(t.created_at),
        expires_at=ts(t.expires_at),
        revoked_at=ts(t.revoked_at),
    )


def enrollment_token_pb(t: EnrollmentTokenRecord) -> pb.EnrollmentToken:
    """An enrollment token as the API shows it (never its hash)."""
    return pb.EnrollmentToken(
        token_id=t.token_id,
        description=t.description,
        created_at=ts(t.created_at),
        expires_at=ts(t.expires_at),
        max_devices=t.max_devices,
        uses=t.uses,
        revoked_at=ts(t.revoked_at),
        labels=t.labels,
        created_by=t.created_by,
    )


def audit_event_pb(e: AuditEvent) -> pb.AuditEvent:
    """An audit event as the API shows it."""
    return pb.AuditEvent(
        event_id=e.event_id,
        at=ts(e.at),
        actor=e.actor,
        actor_kind=e.actor_kind,
        action=e.action,
        target=e.target,
        result=e.result,
        detail=e.detail,
    )
