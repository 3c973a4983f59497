"""Tampered uploads through `orchestrator serve` (a real process, verification as a Ray task):
each fails its attempt as INTEGRITY, and neither the reply nor the job's last error carries a
traceback, ANSI colour codes, a PID or a server path."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapters_store import upload_to_url
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ENROLL_TOKEN, dev_md, fake_adapter_blob, op_md
from tests.support.serve import ServeProcess

pytestmark = pytest.mark.slow

SPEC = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")
CAPS = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)
# What leaked before: Ray's traceback header, colour codes, "pid=1234", and file paths.
LEAKS = re.compile(r"Traceback|\x1b\[|pid=|\.py\b|/tmp/|/root/|/home/|ray::|RayTaskError")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("serve")
    srv = ServeProcess(tmp, f"sqlite:///{tmp / 'state.db'}", "integrity")
    try:
        srv.wait_ready()
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.kill9()


def _tamper(kind: str, blob: Path, good_sha: str, good_size: int) -> tuple[Path, str, int]:
    """What the device uploads and what it announces."""
    data = blob.read_bytes()
    if kind == "wrong-digest":  # same size, one byte changed
        tampered = blob.with_suffix(".digest")
        tampered.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        return tampered, good_sha, good_size
    if kind == "wrong-size":  # the real bytes, a size that is not theirs
        return blob, good_sha, good_size + 7
    truncated = blob.with_suffix(".short")  # half the bytes, the full blob's digest and size
    truncated.write_bytes(data[: len(data) // 2])
    return truncated, good_sha, good_size


@pytest.mark.parametrize("kind", ["wrong-digest", "wrong-size", "truncated"])
def test_tampered_upload_fails_the_attempt_as_integrity_with_a_clean_message(
    served: ServeProcess, tmp_path: Path, kind: str
) -> None:
    device = f"rogue-{kind}"
    reply = served.agent.Enroll(
        apb.EnrollRequest(device_id=device, capabilities=CAPS), metadata=op_md(ENROLL_TOKEN), timeout=30
    )
    md = dev_md(device, reply.device_credential)
    job_id = served.operator.SubmitJob(
        opb.SubmitJobRequest(device_id=device, training=SPEC), metadata=op_md(), timeout=30
    ).job.job_id
    a = served.agent.LeaseJob(apb.LeaseJobRequest(device_id=device), metadata=md, timeout=30).assignment
    assert a.job_id == job_id
    blob, info = fake_adapter_blob(tmp_path, device_id=device, job_id=a.job_id, attempt=a.attempt)
    sent, sha, size = _tamper(kind, blob, info.sha256, info.size)
    upload_to_url(a.upload_url, sent, fields=dict(a.upload_fields))

    with pytest.raises(grpc.RpcError) as err:
        served.agent.CompleteJob(
            apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=sha, size_bytes=size),
            metadata=md,
            timeout=120,
        )

    details = err.value.details()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, details
    assert details.startswith("uploaded adapter rejected: integrity check failed"), details
    assert "size_mismatch" in details or "sha256_mismatch" in details
    assert not LEAKS.search(details), details
    job: Any = served.operator.GetJob(opb.GetJobRequest(job_id=job_id), metadata=op_md(), timeout=30).job
    assert job.last_error_class == tpb.ERROR_CLASS_INTEGRITY
    assert job.state == tpb.JOB_STATE_QUEUED and job.attempt == 1  # requeued for another attempt
    assert job.last_error == details
    assert not LEAKS.search(job.last_error), job.last_error
