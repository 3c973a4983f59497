"""CompleteJob against a real server: malformed uploads fail the attempt as INTEGRITY, oversized
ones never get in, a store outage answers UNAVAILABLE and loses nothing, and a retry after
promotion registers the adapter instead of failing the attempt."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapters_store import StoreUnavailable, TransferError, blob_key, sha256_file, upload_key, upload_to_url
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.api import code_of, enroll, lease, state_of, submit
from tests.support.orch import ServerThread, fake_adapter_blob, op_md

MAX_ADAPTER = 64 * 1024


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path, max_adapter_bytes=MAX_ADAPTER) as s:
        yield s


def _leased(srv: ServerThread) -> tuple[Any, tuple[tuple[str, str], ...]]:
    md = enroll(srv, "phone-1")
    submit(srv, "phone-1")
    a = lease(srv, "phone-1", md)
    assert a is not None
    return a, md


def _complete(srv: ServerThread, a: Any, md: Any, sha256: str, size: int) -> apb.CompleteJobResponse:
    request = apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=sha256, size_bytes=size)
    return srv.agent.CompleteJob(request, metadata=md, timeout=30)  # type: ignore[no-any-return]


def _job(srv: ServerThread, job_id: str) -> Any:
    return srv.operator.GetJob(opb.GetJobRequest(job_id=job_id), metadata=op_md()).job


def test_a_deeply_nested_header_fails_the_attempt_as_integrity(srv: ServerThread, tmp_path: Path) -> None:
    a, md = _leased(srv)
    nested = b"[" * 20_000 + b"]" * 20_000
    blob = tmp_path / "nested.safetensors"
    blob.write_bytes(struct.pack("<Q", len(nested)) + nested)
    upload_to_url(a.upload_url, blob, fields=dict(a.upload_fields))

    with pytest.raises(grpc.RpcError) as err:
        _complete(srv, a, md, sha256_file(blob), blob.stat().st_size)

    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nested too deeply" in err.value.details()
    job = _job(srv, a.job_id)
    assert job.last_error_class == tpb.ERROR_CLASS_INTEGRITY and job.state == tpb.JOB_STATE_QUEUED


def test_an_oversized_upload_is_refused_by_the_store_and_by_complete_job(srv: ServerThread, tmp_path: Path) -> None:
    a, md = _leased(srv)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_ADAPTER + 1))

    with pytest.raises(TransferError) as refused:
        upload_to_url(a.upload_url, big, fields=dict(a.upload_fields))
    code = code_of(srv.agent.CompleteJob, _request(a, sha256_file(big), MAX_ADAPTER + 1), metadata=md)

    assert refused.value.status == 413
    assert srv.store.stat(upload_key(a.job_id, a.attempt)) is None
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert state_of(srv, a.job_id) == tpb.JOB_STATE_LEASED  # a refused request changes nothing


def _request(a: Any, sha256: str, size: int) -> apb.CompleteJobRequest:
    return apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=sha256, size_bytes=size)


def test_a_store_outage_answers_unavailable_and_the_retry_succeeds(srv: ServerThread, tmp_path: Path) -> None:
    a, md = _leased(srv)
    blob, info = fake_adapter_blob(tmp_path, device_id="phone-1", job_id=a.job_id, attempt=a.attempt)
    upload_to_url(a.upload_url, blob, fields=dict(a.upload_fields))
    objects = srv.store.root / "objects"  # type: ignore[attr-defined]
    objects.rename(tmp_path / "unmounted")

    with pytest.raises(grpc.RpcError) as err:
        _complete(srv, a, md, info.sha256, info.size)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _job(srv, a.job_id).state == tpb.JOB_STATE_LEASED and _job(srv, a.job_id).attempt == 1

    (tmp_path / "unmounted").rename(objects)
    done = _complete(srv, a, md, info.sha256, info.size)

    assert done.adapter.sha256 == info.sha256
    assert state_of(srv, a.job_id) == tpb.JOB_STATE_SUCCEEDED and _job(srv, a.job_id).attempt == 1


def test_a_retry_after_promotion_registers_the_promoted_blob(
    srv: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first call verified and promoted the upload, then the store failed before the job was
    recorded: the upload key is gone, and the retry must find the promoted blob."""
    a, md = _leased(srv)
    blob, info = fake_adapter_blob(tmp_path, device_id="phone-1", job_id=a.job_id, attempt=a.attempt)
    upload_to_url(a.upload_url, blob, fields=dict(a.upload_fields))
    real = srv.orch.jobs.verifier
    calls: list[str] = []

    def promote_then_fail(*args: Any) -> Any:
        result = real(*args)
        calls.append("promoted")
        if len(calls) == 1:
            raise StoreUnavailable("the store went away after promotion")
        return result

    monkeypatch.setattr(srv.orch.jobs, "verifier", promote_then_fail)
    with pytest.raises(grpc.RpcError) as err:
        _complete(srv, a, md, info.sha256, info.size)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert srv.store.stat(upload_key(a.job_id, a.attempt)) is None  # promoted already

    done = _complete(srv, a, md, info.sha256, info.size)

    assert done.adapter.blob_key == blob_key(info.sha256) and done.adapter.version == 1
    assert state_of(srv, a.job_id) == tpb.JOB_STATE_SUCCEEDED
    assert _complete(srv, a, md, info.sha256, info.size).adapter == done.adapter  # and again
