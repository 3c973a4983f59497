"""The agent client's one mapping from status codes to its error tree, over a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.client import CallError, DeviceClient, Gone, Invalid, Refused, Transient, map_error
from protos.pocketlora.v1 import types_pb2 as tpb
from protos.wire import ErrorClass, JobState
from tests.support.orch import ENROLL_TOKEN, ServerThread


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "why"


@pytest.mark.parametrize(
    ("codes", "cls"),
    [
        (["UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"], Transient),
        (["FAILED_PRECONDITION", "NOT_FOUND", "PERMISSION_DENIED"], Gone),
        (["UNAUTHENTICATED"], Refused),
        (["INVALID_ARGUMENT", "INTERNAL", "UNKNOWN", "UNIMPLEMENTED", "DATA_LOSS", "OUT_OF_RANGE"], Invalid),
    ],
)
def test_every_status_code_maps_to_one_branch(codes: list[str], cls: type[CallError]) -> None:
    for name in codes:
        err = map_error("Heartbeat", FakeRpcError(grpc.StatusCode[name]))
        assert type(err) is cls and err.code.name == name and "why" in str(err)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[DeviceClient]:
    with ServerThread(tmp_path) as srv:
        c = DeviceClient(srv.address, "phone-1", tmp_path)
        yield c
        c.close()


def test_the_typed_methods_raise_the_tree_from_a_real_server(client: DeviceClient, tmp_path: Path) -> None:
    with pytest.raises(Refused):
        client.lease_job()  # not enrolled yet
    with pytest.raises(Refused):
        client.enroll("not-the-token", tpb.Capabilities(base_model_id="tiny"))

    client.enroll(ENROLL_TOKEN, tpb.Capabilities(base_model_id="tiny"))
    assert client.enrolled and DeviceClient(client.address, "phone-1", tmp_path).enrolled  # persisted

    assert not client.lease_job().HasField("assignment")
    with pytest.raises(Gone):
        client.report_progress("job-unknown", 1, JobState.RUNNING, tpb.JobProgress())
    with pytest.raises(Gone):
        client.fail_job("job-unknown", 1, ErrorClass.CRASHED, "boom")
    with pytest.raises(Invalid):
        client.complete_job("job-unknown", 1, "not-hex", 10, {})
    with pytest.raises(Gone):
        client.adapter_download_url("ad-unknown")
