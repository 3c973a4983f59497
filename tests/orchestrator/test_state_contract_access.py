"""The store contract's access-control part (enrollment tokens, operators and their tokens, the
audit log, device identity fields), run against every backend like test_state_contract.py."""

from __future__ import annotations

import pytest

from orchestrator.access_records import (
    AuditEvent,
    AuditFilter,
    EnrollmentTokenRecord,
    OperatorRecord,
    OperatorTokenRecord,
)
from orchestrator.domain import DeviceRecord, Role, new_id
from orchestrator.errors import AlreadyExists
from orchestrator.state import StateStore


def test_enrollment_tokens_round_trip_count_uses_and_revoke(state: StateStore) -> None:
    a = EnrollmentTokenRecord("enr-a", "hash-a", "lab phones", 1.0, 99.0, 2, 0, 0.0, {"tier": "beta"}, "alice")
    b = EnrollmentTokenRecord("enr-b", "hash-b", "", 2.0, 99.0)
    with state.transaction() as tx:
        tx.insert_enrollment_token(a)
        tx.insert_enrollment_token(b)
    with pytest.raises(AlreadyExists), state.transaction() as tx:
        tx.insert_enrollment_token(EnrollmentTokenRecord("enr-c", "hash-a", "", 3.0, 99.0))

    with state.transaction() as tx:
        assert tx.get_enrollment_token("hash-a") == a
        assert tx.get_enrollment_token("nope") is None
        assert tx.update_enrollment_token("enr-a", {"uses": 1}) and tx.update_enrollment_token(
            "enr-b", {"revoked_at": 5.0}
        )
        assert not tx.update_enrollment_token("enr-x", {"uses": 1})
        with pytest.raises(ValueError, match="cannot update"):
            tx.update_enrollment_token("enr-a", {"token_hash": "x"})
    with state.transaction() as tx:
        assert tx.get_enrollment_token("hash-a", for_update=True).uses == 1  # type: ignore[union-attr]
        assert [t.token_id for t in tx.list_enrollment_tokens(10)] == ["enr-a", "enr-b"]
        assert [t.token_id for t in tx.list_enrollment_tokens(10, "enr-a")] == ["enr-b"]
        assert tx.list_enrollment_tokens(10)[1].revoked_at == 5.0


def test_operators_and_their_tokens(state: StateStore) -> None:
    alice = OperatorRecord("alice", Role.ADMIN, 1.0, "bootstrap")
    token = OperatorTokenRecord("tok-1", "h1", "alice", Role.VIEWER, "dashboard", 2.0, 0.0)
    with state.transaction() as tx:
        tx.insert_operator(alice)
        tx.insert_operator(OperatorRecord("bob", Role.VIEWER, 1.5))
        tx.insert_operator_token(token)
        tx.insert_operator_token(OperatorTokenRecord("tok-2", "h2", "bob", Role.VIEWER, "", 3.0, 9.0))
    with pytest.raises(AlreadyExists), state.transaction() as tx:
        tx.insert_operator(OperatorRecord("alice", Role.VIEWER, 4.0))

    with state.transaction() as tx:
        assert tx.get_operator("alice") == alice and tx.get_operator("carol") is None
        assert [o.name for o in tx.list_operators()] == ["alice", "bob"]
        assert tx.get_operator_token("h1") == token
        assert [t.token_id for t in tx.list_operator_tokens("", 10)] == ["tok-1", "tok-2"]
        assert [t.token_id for t in tx.list_operator_tokens("bob", 10)] == ["tok-2"]
        assert tx.revoke_operator_token("tok-1", 7.0)
        assert tx.revoke_operator_token("tok-1", 8.0)  # already revoked: still known, time kept
        assert not tx.revoke_operator_token("tok-9", 7.0)
    with state.transaction() as tx:
        assert tx.get_operator_token("h1").revoked_at == 7.0  # type: ignore[union-attr]


def test_audit_events_filter_and_page_newest_first(state: StateStore) -> None:
    events = [
        AuditEvent(new_id("aud"), 10.0 + i, "alice" if i % 2 else "phone-1", "operator", f"Act{i % 3}", f"t{i}", "OK")
        for i in range(7)
    ]
    with state.transaction() as tx:
        for e in events:
            tx.append_audit(e)

    with state.transaction() as tx:
        newest = tx.list_audit(AuditFilter(), 3)
        older = tx.list_audit(AuditFilter(), 10, newest[-1].event_id)
        by_alice = tx.list_audit(AuditFilter(actor="alice"), 10)
        window = tx.list_audit(AuditFilter(action="Act0", since=11.0, until=16.0), 10)

    assert newest == events[::-1][:3] and older == events[::-1][3:]
    assert {e.actor for e in by_alice} == {"alice"} and len(by_alice) == 3
    assert [e.target for e in window] == ["t3"]


def test_device_identity_fields_round_trip_and_devices_can_be_deleted(state: StateStore) -> None:
    device = DeviceRecord(
        "phone-1",
        "h",
        labels={"tier": "beta"},
        reported_labels={"model": "x"},
        next_credential_hash="n",
        revoked_at=3.0,
    )
    with state.transaction() as tx:
        tx.upsert_device(device)
    with state.transaction() as tx:
        assert tx.get_device("phone-1") == device
        assert tx.update_device("phone-1", {"reported_labels": {"model": "y"}, "next_credential_hash": ""})
    with state.transaction() as tx:
        got = tx.get_device("phone-1")
        assert got is not None and got.reported_labels == {"model": "y"} and got.next_credential_hash == ""
        assert tx.delete_device("phone-1") and not tx.delete_device("phone-1")
        assert tx.get_device("phone-1") is None
