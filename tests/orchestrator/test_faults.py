"""Faults with real processes: a frozen device loses its lease, and two replicas over one
PostgreSQL never lease a job twice (a killed orchestrator: test_crash_recovery.py).

No timed assertions: every wait polls for a condition with a generous ceiling, so a busy
2-core CI machine only makes these slower, never wrong.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import (
    ENROLL_TOKEN,
    ServerThread,
    dev_md,
    op_md,
)
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
SPEC = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")
CAPS = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def enroll(agent: Any, device_id: str) -> str:
    reply = agent.Enroll(
        apb.EnrollRequest(device_id=device_id, capabilities=CAPS), metadata=op_md(ENROLL_TOKEN), timeout=30
    )
    return str(reply.device_credential)


# ------------------------------------------------------------------------------------------
# (a) a device frozen with SIGSTOP past its lease loses the job
# ------------------------------------------------------------------------------------------

# A minimal device: "hold" leases a job and reports RUNNING until refused, then tries to
# complete with its stale lease; "finish" leases, uploads a real adapter blob and completes.
CLIENT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import grpc
from pathlib import Path
from adapters_store import upload_to_url
from protos.pocketlora.v1 import agent_service_pb2 as apb, agent_service_pb2_grpc, types_pb2 as tpb
from tests.support.orch import dev_md, fake_adapter_blob

_, root, address, device_id, credential, mode, tmp = sys.argv
md = dev_md(device_id, credential)
stub = agent_service_pb2_grpc.AgentServiceStub(grpc.insecure_channel(address))

def say(**kw):
    print(json.dumps(kw), flush=True)

# "finish" polls until the job is requeued to it (its first holder's lease must expire first).
give_up = time.monotonic() + (60 if mode == "finish" else 0)
while True:
    reply = stub.LeaseJob(apb.LeaseJobRequest(device_id=device_id), metadata=md, timeout=60)
    if reply.HasField("assignment") or time.monotonic() > give_up:
        break
    time.sleep(0.3)
a = reply.assignment
say(event="leased", job_id=a.job_id, attempt=a.attempt, epoch=a.lease_epoch)
if mode == "hold":
    while True:
        try:
            stub.ReportProgress(apb.ReportProgressRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_RUNNING), metadata=md, timeout=30)
            say(event="report", code="OK")
        except grpc.RpcError as exc:
            say(event="report", code=exc.code().name)
            break
        time.sleep(0.2)
    req = apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256="0" * 64, size_bytes=1)
    try:
        stub.CompleteJob(req, metadata=md, timeout=30)
        say(event="complete", code="OK")
    except grpc.RpcError as exc:
        say(event="complete", code=exc.code().name)
else:
    stub.ReportProgress(apb.ReportProgressRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, state=tpb.JOB_STATE_RUNNING), metadata=md, timeout=30)
    blob, info = fake_adapter_blob(Path(tmp), device_id=device_id, job_id=a.job_id, attempt=a.attempt)
    upload_to_url(a.upload_url, blob)
    done = stub.CompleteJob(apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size), metadata=md, timeout=30)
    say(event="complete", code="OK", adapter_attempt=done.adapter.attempt)
"""


class Client:
    """A device client in its own process; its JSON lines are collected by a reader thread."""

    def __init__(self, script: Path, address: str, device_id: str, credential: str, mode: str, tmp: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(ROOT), address, device_id, credential, mode, str(tmp)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e["event"] == event]

    def finish(self, timeout_s: float = 60) -> None:
        self.proc.wait(timeout_s)
        self._reader.join(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.slow
def test_a_device_frozen_past_its_lease_loses_the_job(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    with ServerThread(tmp_path, lease_s=4.0, retry_base_s=0.5) as srv:
        credential = enroll(srv.agent, "phone-1")
        job_id = srv.operator.SubmitJob(
            opb.SubmitJobRequest(device_id="phone-1", training=SPEC), metadata=op_md()
        ).job.job_id
        holder = Client(script, srv.address, "phone-1", credential, "hold", tmp_path)
        second: Client | None = None
        try:
            wait_for(lambda: len(holder.of("report")) >= 2, 60, "the holder to report progress")
            assert all(e["code"] == "OK" for e in holder.of("report"))
            first = holder.of("leased")[0]
            assert first["job_id"] == job_id and first["attempt"] == 1

            holder.proc.send_signal(signal.SIGSTOP)

            def requeued() -> bool:
                srv.orch.jobs.reap()  # the control loop's job, driven here so the test needs no Ray
                job = srv.operator.GetJob(opb.GetJobRequest(job_id=job_id), metadata=op_md()).job
                return bool(job.state == tpb.JOB_STATE_QUEUED and job.last_error_class == tpb.ERROR_CLASS_LEASE_EXPIRED)

            wait_for(requeued, 60, "the frozen holder's lease to expire and the job to be requeued", every_s=0.25)
            # The device's id and credential in a new process (a restarted agent) get the job back.
            second = Client(script, srv.address, "phone-1", credential, "finish", tmp_path)
            second.finish()
            assert second.proc.returncode == 0
            leased = second.of("leased")[0]
            assert leased["job_id"] == job_id and leased["attempt"] == 2 and leased["epoch"] == first["epoch"] + 1
            assert second.of("complete")[0]["adapter_attempt"] == 2

            # The frozen process wakes up: its report and its completion are refused.
            holder.proc.send_signal(signal.SIGCONT)
            holder.finish()
            assert holder.of("report")[-1]["code"] == "FAILED_PRECONDITION"
            assert holder.of("complete")[0]["code"] == "FAILED_PRECONDITION"
            job = srv.operator.GetJob(opb.GetJobRequest(job_id=job_id), metadata=op_md()).job
            assert job.state == tpb.JOB_STATE_SUCCEEDED and job.attempt == 2
            adapters = srv.operator.ListAdapters(
                opb.ListAdaptersRequest(device_id="phone-1"), metadata=op_md()
            ).adapters
            assert [(a.job_id, a.attempt) for a in adapters] == [(job_id, 2)]
        finally:
            holder.kill()
            if second is not None:
                second.kill()


# ------------------------------------------------------------------------------------------
# (c) two replicas over one PostgreSQL never lease a job twice
# ------------------------------------------------------------------------------------------


@pytest.fixture
def two_replicas(tmp_path: Path, postgres_url: str) -> Iterator[tuple[ServerThread, ServerThread]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with ServerThread(tmp_path / "a", db_url=postgres_url) as a, ServerThread(tmp_path / "b", db_url=postgres_url) as b:
        yield a, b


@pytest.mark.slow
@pytest.mark.postgres
def test_two_replicas_never_double_lease(two_replicas: tuple[ServerThread, ServerThread]) -> None:
    a, b = two_replicas
    devices = [f"phone-{i}" for i in range(16)]
    jobs_per_device = 12
    creds = {d: enroll(a.agent, d) for d in devices}
    submitted: set[str] = set()
    for i, d in enumerate(devices):
        srv = (a, b)[i % 2]
        for _ in range(jobs_per_device):
            submitted.add(
                srv.operator.SubmitJob(opb.SubmitJobRequest(device_id=d, training=SPEC), metadata=op_md()).job.job_id
            )

    # Each device polls both replicas from four clients at once until its queue is empty.
    leases: list[tuple[str, int, int, str]] = []
    lock = threading.Lock()

    def poller(device_id: str, srv: ServerThread) -> None:
        md = dev_md(device_id, creds[device_id])
        empty = 0
        while empty < 2:
            reply = srv.agent.LeaseJob(apb.LeaseJobRequest(device_id=device_id), metadata=md, timeout=60)
            if not reply.HasField("assignment"):
                empty += 1
                continue
            x = reply.assignment
            with lock:
                leases.append((x.job_id, x.attempt, x.lease_epoch, srv.address))

    with ThreadPoolExecutor(max_workers=64) as pool:
        futures = [pool.submit(poller, d, srv) for d in devices for srv in (a, b, a, b)]
        for f in futures:
            f.result()

    keys = [(job_id, attempt) for job_id, attempt, _, _ in leases]
    assert len(keys) == len(set(keys)), "a job was leased twice under the same attempt"
    assert sorted(job_id for job_id, _, _, _ in leases) == sorted(submitted), "every job is leased exactly once"
    assert all(attempt == 1 and epoch == 1 for _, attempt, epoch, _ in leases)
    assert {addr for *_, addr in leases} == {a.address, b.address}, "both replicas handed out jobs"
