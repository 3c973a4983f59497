"""SQL for access control and its record: enrollment tokens, operators and their tokens, the
audit log (part of the one SQL implementation of the store contract, sql.SqlTx)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from orchestrator.access_records import (
    AuditEvent,
    AuditFilter,
    EnrollmentTokenRecord,
    OperatorRecord,
    OperatorTokenRecord,
)
from orchestrator.domain import Role
from orchestrator.state.sql_base import SqlBase


class AccessSql(SqlBase):
    """The access-control part of the store contract."""

    # --- enrollment tokens ---
    def insert_enrollment_token(self, token: EnrollmentTokenRecord) -> None:
        row = asdict(token)
        row["labels"] = json.dumps(token.labels, sort_keys=True)
        self._insert("enrollment_tokens", row, f"enrollment token {token.token_id}")

    def get_enrollment_token(self, token_hash: str, *, for_update: bool = False) -> EnrollmentTokenRecord | None:
        rows = self._q(f"SELECT * FROM enrollment_tokens WHERE token_hash = ?{self._lock(for_update)}", [token_hash])
        return _row_to_enrollment_token(rows[0]) if rows else None

    def list_enrollment_tokens(self, limit: int, after_token_id: str = "") -> list[EnrollmentTokenRecord]:
        rows = self._q(
            "SELECT * FROM enrollment_tokens WHERE token_id > ? ORDER BY token_id LIMIT ?", [after_token_id, limit]
        )
        return [_row_to_enrollment_token(r) for r in rows]

    def update_enrollment_token(self, token_id: str, values: dict[str, Any]) -> bool:
        unknown = set(values) - {"uses", "revoked_at"}
        if unknown:
            raise ValueError(f"cannot update enrollment token fields {sorted(unknown)}")
        sets = ", ".join(f"{c} = ?" for c in values)
        self._q(f"UPDATE enrollment_tokens SET {sets} WHERE token_id = ?", [*values.values(), token_id])
        return bool(self.cur.rowcount)

    # --- operators ---
    def insert_operator(self, operator: OperatorRecord) -> None:
        row = asdict(operator)
        row["role"] = operator.role.value
        self._insert("operators", row, f"operator {operator.name}")

    def get_operator(self, name: str) -> OperatorRecord | None:
        rows = self._q("SELECT * FROM operators WHERE name = ?", [name])
        return _row_to_operator(rows[0]) if rows else None

    def list_operators(self) -> list[OperatorRecord]:
        return [_row_to_operator(r) for r in self._q("SELECT * FROM operators ORDER BY name")]

    def insert_operator_token(self, token: OperatorTokenRecord) -> None:
        row = asdict(token)
        row["role"] = token.role.value
        self._insert("operator_tokens", row, f"operator token {token.token_id}")

    def get_operator_token(self, token_hash: str) -> OperatorTokenRecord | None:
        rows = self._q("SELECT * FROM operator_tokens WHERE token_hash = ?", [token_hash])
        return _row_to_operator_token(rows[0]) if rows else None

    def list_operator_tokens(self, operator: str, limit: int, after_token_id: str = "") -> list[OperatorTokenRecord]:
        where, params = ("operator = ? AND ", [operator]) if operator else ("", [])
        rows = self._q(
            f"SELECT * FROM operator_tokens WHERE {where}token_id > ? ORDER BY token_id LIMIT ?",
            [*params, after_token_id, limit],
        )
        return [_row_to_operator_token(r) for r in rows]

    def revoke_operator_token(self, token_id: str, at: float) -> bool:
        self._q("UPDATE operator_tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at = 0", [at, token_id])
        return bool(self.cur.rowcount) or bool(
            self._q("SELECT 1 AS one FROM operator_tokens WHERE token_id = ?", [token_id])
        )

    # --- audit ---
    def append_audit(self, event: AuditEvent) -> None:
        self._insert("audit_events", asdict(event), f"audit event {event.event_id}")

    def list_audit(self, flt: AuditFilter, limit: int, before_event_id: str = "") -> list[AuditEvent]:
        where: list[str] = []
        params: list[Any] = []
        for col, value in (("actor", flt.actor), ("action", flt.action), ("target", flt.target)):
            if value:
                where.append(f"{col} = ?")
                params.append(value)
        if flt.since:
            where.append("at >= ?")
            params.append(flt.since)
        if flt.until:
            where.append("at < ?")
            params.append(flt.until)
        if before_event_id:
            where.append("event_id < ?")
            params.append(before_event_id)
        rows = self._q(
            f"SELECT * FROM audit_events WHERE {' AND '.join(where) or '1 = 1'} ORDER BY event_id DESC LIMIT ?",
            [*params, limit],
        )
        return [AuditEvent(**r) for r in rows]


def _row_to_enrollment_token(row: dict[str, Any]) -> EnrollmentTokenRecord:
    row = dict(row)
    row["labels"] = json.loads(row["labels"])
    return EnrollmentTokenRecord(**row)


def _row_to_operator(row: dict[str, Any]) -> OperatorRecord:
    row = dict(row)
    row["role"] = Role(row["role"])
    return OperatorRecord(**row)


def _row_to_operator_token(row: dict[str, Any]) -> OperatorTokenRecord:
    row = dict(row)
    row["role"] = Role(row["role"])
    return OperatorTokenRecord(**row)
