"""The agent trusts nothing it is sent: a hostile orchestrator (a real grpc.aio AgentService on
loopback) hands out `../` job ids, adapter ids and dataset names, in lease assignments, in
heartbeat cancel and stale lists and as the desired adapter; a sentinel folder next to the work
dir survives, nothing is written outside the work dir, and no failure report carries a path."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.duration_pb2 import Duration
from safetensors.numpy import save_file

from agent.agent import Agent, AgentConfig
from agent.gate import Gate, GatePolicy
from agent.jobs import LocalJob
from agent.sensors import TraceSensors
from protos.pocketlora.v1 import agent_service_pb2 as pb
from protos.pocketlora.v1 import agent_service_pb2_grpc as pb_grpc
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.waiting import wait_for

HOSTILE_JOB = "../../sentinel"  # work/jobs/../../sentinel is the sentinel folder
HOSTILE_ADAPTER = "../../sentinel/keep"  # work/adapters/../../sentinel/keep(.safetensors)
POLL = Duration(nanos=50_000_000)


class HostileOrchestrator(pb_grpc.AgentServiceServicer):
    """Answers every call, each answer naming paths outside the device's work dir."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.failures: list[pb.FailJobRequest] = []
        self.leases = 0

    async def Enroll(self, request: pb.EnrollRequest, context: Any) -> pb.EnrollResponse:
        self.calls.append("Enroll")
        return pb.EnrollResponse(device_credential="hostile-credential", next_poll_after=POLL)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        self.calls.append("Heartbeat")
        return pb.HeartbeatResponse(
            cancel_job_ids=[HOSTILE_JOB, "..", "/etc"],
            stale_job_ids=[HOSTILE_JOB, "../jobs"],
            desired_adapter=pb.AdapterRef(
                adapter_id=HOSTILE_ADAPTER, name="evil", version=1, sha256="0" * 64, size_bytes=10
            ),
            next_poll_after=POLL,
        )

    async def LeaseJob(self, request: pb.LeaseJobRequest, context: Any) -> pb.LeaseJobResponse:
        self.calls.append("LeaseJob")
        self.leases += 1
        if self.leases == 1:  # a job id that walks out of work/jobs (rmtree'd on failure)
            spec = tpb.TrainingSpec(adapter_name="evil", base_model_id="another-base", dataset="codes")
            job_id = HOSTILE_JOB
        elif self.leases == 2:  # a well-formed job whose dataset name walks out of the datasets dir
            spec = tpb.TrainingSpec(adapter_name="evil", base_model_id="tiny", dataset="../sentinel/keep")
            job_id = "job-ok"
        else:
            return pb.LeaseJobResponse(next_poll_after=POLL)
        assignment = pb.Assignment(
            job_id=job_id, attempt=1, lease_epoch=1, training=spec, upload_url="http://127.0.0.1:9/none"
        )
        return pb.LeaseJobResponse(assignment=assignment, next_poll_after=POLL)

    async def ReportProgress(self, request: pb.ReportProgressRequest, context: Any) -> pb.ReportProgressResponse:
        self.calls.append("ReportProgress")
        return pb.ReportProgressResponse()

    async def FailJob(self, request: pb.FailJobRequest, context: Any) -> pb.FailJobResponse:
        self.calls.append("FailJob")
        self.failures.append(request)
        return pb.FailJobResponse(will_retry=False, state=tpb.JOB_STATE_FAILED)

    async def GetAdapterDownloadUrl(
        self, request: pb.GetAdapterDownloadUrlRequest, context: Any
    ) -> pb.GetAdapterDownloadUrlResponse:
        self.calls.append("GetAdapterDownloadUrl")
        return pb.GetAdapterDownloadUrlResponse(url="http://127.0.0.1:9/none")


@pytest.fixture
def hostile() -> Iterator[tuple[HostileOrchestrator, str]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = HostileOrchestrator()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_AgentServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_hostile_orchestrator_cannot_reach_outside_the_work_dir(
    hostile: tuple[HostileOrchestrator, str], tmp_path: Path
) -> None:
    servicer, address = hostile
    device = tmp_path / "device"
    sentinel = device / "sentinel"
    (sentinel / "keep").mkdir(parents=True)
    (sentinel / "keep.safetensors").write_bytes(b"precious")
    (sentinel / "keep" / "notes.txt").write_text("precious too")
    (sentinel / "keep.jsonl").write_text(json.dumps({"text": "private"}) + "\n")
    before = _snapshot(sentinel)
    base = device / "base"
    base.mkdir()
    save_file({"w": np.zeros((2, 2), np.float32)}, str(base / "model.safetensors"))  # enough to fingerprint
    trace = device / "trace.jsonl"
    trace.write_text(json.dumps({"t": 0, "charging": True, "battery": 90, "temp_c": 30}) + "\n")
    events: list[tuple[str, dict[str, Any]]] = []
    cfg = AgentConfig(
        orchestrator=address,
        device_id="victim",
        work_dir=device / "work",
        base_model_dir=base,
        base_model_id="tiny",
        datasets_dir=device / "work" / "datasets",
        enrollment_token="t",
        tick_s=0.05,
        serve_adapters=True,
    )
    agent = Agent(cfg, TraceSensors(trace), Gate(GatePolicy()), listener=lambda k, d: events.append((k, dict(d))))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: servicer.leases >= 3 and servicer.calls.count("Heartbeat") >= 5, 60, "hostile replies")
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(30)

    assert _snapshot(sentinel) == before
    assert sorted(p.name for p in device.iterdir()) == ["base", "sentinel", "trace.jsonl", "work"]
    refused = [d for k, d in events if k == "assignment_refused"]
    assert refused and "not a valid id" in refused[0]["reason"]
    assert any(k == "adapter_refused" and d["adapter_id"] == HOSTILE_ADAPTER for k, d in events)
    assert "GetAdapterDownloadUrl" not in servicer.calls  # refused before asking for a URL
    assert agent.adapters.runtime is None  # nor was the inference runtime started for it
    # The well-formed job failed on its dataset name; the report names no path of the device.
    assert [f.job_id for f in servicer.failures] == ["job-ok"]
    assert servicer.failures[0].error_class == tpb.ERROR_CLASS_DATASET_INVALID
    assert str(device) not in servicer.failures[0].message


def test_a_persisted_job_with_a_malformed_id_is_never_used(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "sentinel").mkdir()
    (work / "current_job.json").write_text(
        json.dumps({"job_id": "../sentinel", "lease_epoch": 1, "attempt": 1, "training": {}})
    )

    assert LocalJob.load(work) is None
    LocalJob.forget(work, "../../sentinel")
    with pytest.raises(ValueError, match="not a valid id"):
        LocalJob.folder(work, "..")
    assert (tmp_path / "sentinel").is_dir()
