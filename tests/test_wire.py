"""The shared enums and their one pair of proto helpers."""

from __future__ import annotations

import enum

import pytest

from protos import wire
from protos.pocketlora.v1 import types_pb2 as tpb

ENUMS = [
    (wire.JobState, tpb.JobState),
    (wire.ErrorClass, tpb.ErrorClass),
    (wire.EligibilityReason, tpb.EligibilityReason),
]


@pytest.mark.parametrize(("domain", "proto"), ENUMS)
def test_every_proto_value_has_a_domain_member_and_round_trips(domain: type[enum.StrEnum], proto: object) -> None:
    numbers = [n for n in proto.values() if n != 0]  # type: ignore[attr-defined]

    members = [wire.from_pb(domain, n) for n in numbers]

    assert None not in members and set(members) == set(domain)
    assert [wire.to_pb(m) for m in members] == numbers  # type: ignore[arg-type]
    assert all(wire.pb_name(m) == proto.Name(wire.to_pb(m)) for m in members)  # type: ignore[arg-type,attr-defined]


def test_unspecified_and_unknown_numbers_are_none() -> None:
    assert wire.from_pb(wire.JobState, 0) is None
    assert wire.from_pb(wire.JobState, 999) is None
    assert wire.to_pb(None) == 0


def test_names_parse_in_long_and_short_form_in_any_case() -> None:
    assert wire.from_pb_name(wire.JobState, "JOB_STATE_QUEUED") is wire.JobState.QUEUED
    assert wire.from_pb_name(wire.JobState, " running ") is wire.JobState.RUNNING
    assert wire.from_pb_name(wire.ErrorClass, "lease_expired") is wire.ErrorClass.LEASE_EXPIRED
    assert wire.from_pb_name(wire.JobState, "JOB_STATE_UNSPECIFIED") is None
    assert wire.from_pb_name(wire.JobState, "TOO_HOT") is None


def test_state_and_error_properties() -> None:
    assert {s for s in wire.JobState if s.terminal} == {"SUCCEEDED", "FAILED", "CANCELLED"}
    assert {s for s in wire.JobState if s.leased} == {"LEASED", "RUNNING", "PAUSED", "UPLOADING"}
    assert not wire.ErrorClass.DATASET_INVALID.retryable and wire.ErrorClass.LEASE_EXPIRED.retryable
