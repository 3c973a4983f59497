"""One error mapping for unary and streaming RPCs: domain errors keep their code and message,
anything else (a bug) is INTERNAL with an error id and nothing internal in the reply."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from orchestrator import errors
from orchestrator.servicers.errors import CODES, status_for
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ServerThread, op_md

EXPECTED = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *all_subclasses(sub)}
    return out


def test_every_domain_error_class_maps_to_its_code() -> None:
    domain = {c for c in all_subclasses(errors.OrchestratorError) if c.__module__ == "orchestrator.errors"}

    assert domain == set(EXPECTED), "a domain error class was added without a status code"
    assert CODES == EXPECTED
    for cls, code in EXPECTED.items():
        exc = cls("field", "problem") if cls is errors.InvalidArgument else cls("problem")
        assert status_for(exc) == code


def test_a_subclass_takes_its_nearest_mapped_ancestors_code() -> None:
    class AdapterGone(errors.NotFound):
        pass

    assert status_for(AdapterGone("x")) == grpc.StatusCode.NOT_FOUND


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path) as s:
        yield s


def _bug(*_: object, **__: object) -> None:
    raise ValueError("bad row in /srv/pocketlora/orchestrator/state/sql.py: secret-detail")


def test_a_value_error_from_a_bug_is_internal_with_an_id_and_no_internals(
    srv: ServerThread, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(srv.orch.queries, "get_job", _bug)
    caplog.set_level(logging.ERROR, logger="pocketlora.orchestrator")

    with pytest.raises(grpc.RpcError) as info:
        srv.operator.GetJob(opb.GetJobRequest(job_id="job-1"), metadata=op_md())

    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details()
    assert "secret-detail" not in details and "/srv" not in details and "ValueError" not in details
    error_id = details.split("(id ", 1)[1].split(")", 1)[0]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
    assert srv.operator.GetFleetSummary(opb.GetFleetSummaryRequest(), metadata=op_md()).device_count == 0


def test_streaming_calls_use_the_same_mapping(srv: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    bad_filter = opb.WatchJobsRequest(filter=tpb.JobFilter(device_id="not an id!"))
    with pytest.raises(grpc.RpcError) as info:
        list(srv.operator.WatchJobs(bad_filter, metadata=op_md(), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("filter.device_id")

    with pytest.raises(grpc.RpcError) as info:
        list(srv.operator.WatchJobs(opb.WatchJobsRequest(), metadata=op_md("wrong"), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    monkeypatch.setattr(srv.orch.queries, "watch_cursor", _bug)
    with pytest.raises(grpc.RpcError) as info:
        list(srv.operator.WatchJobs(opb.WatchJobsRequest(), metadata=op_md(), timeout=10))
    assert info.value.code() == grpc.StatusCode.INTERNAL and "secret-detail" not in info.value.details()
