"""The adapter store goes down between a device's upload and its CompleteJob (SeaweedFS stopped,
then restarted on the same data): the orchestrator answers UNAVAILABLE and keeps the upload,
the agent retries with backoff while its heartbeats keep the lease, and the job SUCCEEDS on its
first attempt once the store is back. The upload itself goes through the S3 POST policy."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_store import S3BlobStore
from agent.agent import Agent, AgentConfig
from agent.gate import Gate, GatePolicy
from agent.sensors import TraceSensors
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ENROLL_TOKEN, ServerThread, op_md
from tests.support.seaweed import SeaweedServer, find_weed
from tests.support.tiny_models import make_tiny_llama
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.s3]

SPEC = tpb.TrainingSpec(
    adapter_name="codes", base_model_id="tiny", dataset="codes", max_steps=4, max_seq_len=32, seed=3
)


@pytest.fixture
def weed() -> Iterator[SeaweedServer]:
    """A SeaweedFS of this test's own: it is stopped and restarted."""
    if find_weed() is None:
        pytest.skip("weed binary not found")
    with SeaweedServer() as server:
        yield server


def test_a_store_outage_at_completion_ends_succeeded_once_the_store_is_back(
    weed: SeaweedServer, tmp_path: Path
) -> None:
    store = S3BlobStore(f"t-{uuid.uuid4().hex[:20]}", weed.endpoint, weed.access_key, weed.secret_key)
    base = make_tiny_llama(tmp_path / "base", hidden=64, layers=2)
    work = tmp_path / "device"
    (work / "datasets").mkdir(parents=True)
    rows = [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(8)]
    (work / "datasets" / "codes.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (work / "trace.jsonl").write_text(json.dumps({"t": 0, "charging": True, "battery": 90, "temp_c": 30}) + "\n")
    events: list[tuple[str, dict[str, Any]]] = []

    def listen(kind: str, data: dict[str, Any]) -> None:
        events.append((kind, dict(data)))
        if kind == "uploaded":  # the blob is in; the store fails before CompleteJob is asked
            weed.outage()

    with ServerThread(tmp_path / "orch", store=store, lease_s=8.0, reap_every_s=0.5) as srv:
        cfg = AgentConfig(
            orchestrator=srv.address,
            device_id="outage-phone",
            work_dir=work,
            base_model_dir=base,
            base_model_id="tiny",
            datasets_dir=work / "datasets",
            enrollment_token=ENROLL_TOKEN,
            tick_s=0.05,
            serve_adapters=False,
        )
        agent = Agent(cfg, TraceSensors(work / "trace.jsonl"), Gate(GatePolicy()), listener=listen)
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        try:
            wait_for(lambda: _enrolled(srv), 30, "enrollment")
            job_id = srv.operator.SubmitJob(
                opb.SubmitJobRequest(device_id="outage-phone", training=SPEC), metadata=op_md()
            ).job.job_id
            wait_for(lambda: sum(k == "complete_retry" for k, _ in events) >= 3, 400, "three refused completions")
            job = _job(srv, job_id)
            assert job.state == tpb.JOB_STATE_UPLOADING and job.attempt == 1  # not failed, not requeued
            retries = [d for k, d in events if k == "complete_retry"]
            assert [r["retry_in_s"] for r in retries[:3]] == [1.0, 2.0, 4.0]  # backing off
            assert all("unavailable" in r["reason"] for r in retries)

            weed.recover()
            done = wait_for(
                lambda: (j := _job(srv, job_id)).state == tpb.JOB_STATE_SUCCEEDED and j, 120, "the job to succeed"
            )
            adapter = srv.operator.GetAdapter(opb.GetAdapterRequest(adapter_id=done.adapter_id), metadata=op_md())
        finally:
            stop.set()
            thread.join(60)
    assert done.attempt == 1 and not done.last_error_class
    uploaded = next(d for k, d in events if k == "uploaded")
    completed = wait_for(lambda: [d for k, d in events if k == "completed"], 10, "the agent to hear it")
    assert completed[0]["adapter_id"] == done.adapter_id
    assert adapter.adapter.sha256 == uploaded["sha256"]


def _enrolled(srv: ServerThread) -> bool:
    devices = srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices
    return any(d.device_id == "outage-phone" for d in devices)


def _job(srv: ServerThread, job_id: str) -> Any:
    return srv.operator.GetJob(opb.GetJobRequest(job_id=job_id), metadata=op_md()).job
