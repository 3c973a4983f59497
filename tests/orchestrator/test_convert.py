"""Proto <-> domain conversions on the poll path: cached and table-driven, same answers."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from orchestrator.domain import JobState
from orchestrator.errors import InvalidArgument
from orchestrator.servicers import convert
from protos.pocketlora.v1 import types_pb2 as pb


def test_training_pb_cache_returns_equal_independent_messages() -> None:
    spec = {"adapter_name": "persona", "base_model_id": "tiny", "dataset": "captain", "max_steps": 3}
    expected = json_format.ParseDict(spec, pb.TrainingSpec(), ignore_unknown_fields=True)
    first = convert.training_pb(spec)
    first.adapter_name = "changed by the caller"
    second = convert.training_pb(dict(spec))
    assert second == expected
    assert convert.training_pb({**spec, "adapter_name": "other"}).adapter_name == "other"


def test_enum_conversions() -> None:
    assert convert.job_state(pb.JOB_STATE_RUNNING) == JobState.RUNNING
    with pytest.raises(InvalidArgument):
        convert.job_state(pb.JOB_STATE_UNSPECIFIED)
    with pytest.raises(InvalidArgument):
        convert.job_state(999)
    assert convert.reason_name(pb.ELIGIBILITY_REASON_TOO_HOT) == "TOO_HOT"
    assert convert.reason_name(0) == "" and convert.reason_name(999) == ""


def test_a_heartbeat_claiming_more_free_storage_than_a_bigint_holds_is_clamped() -> None:
    from orchestrator.servicers.agent import heartbeat_input
    from protos.pocketlora.v1 import agent_service_pb2 as apb

    # PostgreSQL's poll function takes BIGINT: 2^64 - 1 would reach it as NUMERIC and fail.
    assert heartbeat_input(apb.HeartbeatRequest(free_storage_bytes=2**64 - 1)).free_storage_bytes == 2**63 - 1
    assert heartbeat_input(apb.HeartbeatRequest(free_storage_bytes=5)).free_storage_bytes == 5
