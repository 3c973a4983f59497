"""Faults with real processes: a frozen device loses its lease, a killed orchestrator loses
nothing it acknowledged, and two replicas over one PostgreSQL never lease a job twice.

No timed assertions: every wait polls for a condition with a generous ceiling, so a busy
2-core CI machine only makes these slower, never wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapters_store import upload_to_url
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import agent_service_pb2_grpc, operator_service_pb2_grpc
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import (
    ENROLL_TOKEN,
    OPERATOR_TOKEN,
    ServerThread,
    dev_md,
    fake_adapter_blob,
    op_md,
)

ROOT = Path(__file__).resolve().parents[2]
SPEC = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")
CAPS = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 60.0, every_s: float = 0.1) -> Any:
    """Poll until condition() is truthy; fail naming what never happened."""
    give_up = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


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
            wait_for(lambda: len(holder.of("report")) >= 2, "the holder to report progress")
            assert all(e["code"] == "OK" for e in holder.of("report"))
            first = holder.of("leased")[0]
            assert first["job_id"] == job_id and first["attempt"] == 1

            holder.proc.send_signal(signal.SIGSTOP)

            def requeued() -> bool:
                srv.orch.jobs.reap()  # the control loop's job, driven here so the test needs no Ray
                job = srv.operator.GetJob(opb.GetJobRequest(job_id=job_id), metadata=op_md()).job
                return bool(job.state == tpb.JOB_STATE_QUEUED and job.last_error_class == tpb.ERROR_CLASS_LEASE_EXPIRED)

            wait_for(requeued, "the frozen holder's lease to expire and the job to be requeued", every_s=0.25)
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
# (b) the orchestrator killed with -9 and restarted loses nothing it acknowledged
# ------------------------------------------------------------------------------------------


class ServeProcess:
    """`python -m pocketlora orchestrator serve` in its own session (so Ray's processes are killable)."""

    def __init__(self, tmp: Path, db_url: str, name: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray_tmp = tmp / "ray"
        ray_tmp.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "POCKETLORA_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "POCKETLORA_ENROLLMENT_TOKEN": ENROLL_TOKEN,
            # Presigned URLs must stay valid across the restart, like a real deployment's secret.
            "POCKETLORA_URL_SECRET": "b" * 64,
            "RAY_TMPDIR": str(ray_tmp),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(ROOT),
        }
        self.log = open(tmp / f"serve-{name}.log", "w")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pocketlora",
                "orchestrator",
                "serve",
                "--listen",
                self.address,
                "--db",
                db_url,
                "--store",
                f"file://{tmp / 'blobs'}",
                "--state-dir",
                str(tmp / "state"),
                "--lease-s",
                "600",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.channel = grpc.insecure_channel(self.address)
        self.agent = agent_service_pb2_grpc.AgentServiceStub(self.channel)
        self.operator = operator_service_pb2_grpc.OperatorServiceStub(self.channel)

    def wait_ready(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)

        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"orchestrator exited with {self.proc.returncode}; see {self.log.name}")
            try:
                return bool(
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
            except grpc.RpcError:
                return False

        wait_for(serving, "the orchestrator to serve", timeout_s=120, every_s=0.25)

    def kill9(self) -> None:
        """SIGKILL the whole session: the CLI, Ray's GCS, raylet, workers and actors."""
        self.channel.close()
        sid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, signal.SIGKILL)
        self.proc.wait(30)

        # Ray puts each worker (the actors) in a process group of its own, within our session:
        # kill those by pid too, so no front end outlives the "crash".
        def all_dead() -> bool:
            for pid in _session_pids(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not _session_pids(sid)

        wait_for(all_dead, "every process of the killed session to exit", timeout_s=30, every_s=0.2)
        self.log.close()


def _session_pids(sid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[3] the session id; zombies wait only for their reaper.
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


@dataclass
class Ledger:
    """Every reply the orchestrator acknowledged, and the one call in flight at the kill."""

    submitted: dict[str, str] = field(default_factory=dict)  # request_id -> job_id
    states: dict[str, int] = field(default_factory=dict)  # job_id -> last acknowledged state
    in_flight: dict[str, int] = field(default_factory=dict)  # job_id -> state of an unacknowledged call
    epochs: dict[str, int] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)  # job_id -> adapter_id
    credentials: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def _drive(srv: ServeProcess, ledger: Ledger, tmp: Path, device_id: str) -> None:
    """Submit jobs and walk them through their states, recording each acknowledgement."""
    md = dev_md(device_id, ledger.credentials[device_id])
    n = 0
    try:
        while not ledger.stop.is_set():
            n += 1
            # Every other job goes to a device that never polls, so it stays queued.
            target = device_id if n % 2 == 0 else f"{device_id}-idle"
            request_id = f"{target}-req-{n}"
            job_id = srv.operator.SubmitJob(
                opb.SubmitJobRequest(request_id=request_id, device_id=target, training=SPEC),
                metadata=op_md(),
                timeout=30,
            ).job.job_id
            ledger.submitted[request_id] = job_id
            ledger.states[job_id] = tpb.JOB_STATE_QUEUED
            if target != device_id:
                continue
            ledger.in_flight[job_id] = tpb.JOB_STATE_LEASED
            a = srv.agent.LeaseJob(apb.LeaseJobRequest(device_id=device_id), metadata=md, timeout=30).assignment
            assert a.job_id == job_id
            ledger.states[job_id], ledger.epochs[job_id] = tpb.JOB_STATE_LEASED, a.lease_epoch
            for state in (tpb.JOB_STATE_RUNNING, tpb.JOB_STATE_UPLOADING):
                ledger.in_flight[job_id] = state
                srv.agent.ReportProgress(
                    apb.ReportProgressRequest(job_id=job_id, lease_epoch=a.lease_epoch, state=state),
                    metadata=md,
                    timeout=30,
                )
                ledger.states[job_id] = state
            if n % 4 == 0:
                blob, info = fake_adapter_blob(tmp, device_id=device_id, job_id=job_id, attempt=a.attempt)
                upload_to_url(a.upload_url, blob)
                ledger.in_flight[job_id] = tpb.JOB_STATE_SUCCEEDED
                done = srv.agent.CompleteJob(
                    apb.CompleteJobRequest(
                        job_id=job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size
                    ),
                    metadata=md,
                    timeout=30,
                )
                ledger.states[job_id] = tpb.JOB_STATE_SUCCEEDED
                ledger.adapters[job_id] = done.adapter.adapter_id
            ledger.in_flight.pop(job_id, None)
    except Exception as exc:
        if not ledger.stop.is_set():  # only the kill may stop a driver
            ledger.errors.append(f"{device_id}: {exc!r}")
            ledger.stop.set()


def _verify(srv: ServeProcess, ledger: Ledger) -> None:
    assert ledger.submitted, "nothing was acknowledged before the kill"
    for request_id, job_id in ledger.submitted.items():
        device_id = request_id.rsplit("-req-", 1)[0]
        again = srv.operator.SubmitJob(
            opb.SubmitJobRequest(request_id=request_id, device_id=device_id, training=SPEC),
            metadata=op_md(),
            timeout=30,
        )
        assert not again.created and again.job.job_id == job_id, f"acknowledged submit {request_id} was lost"
    for job_id, state in ledger.states.items():
        job = srv.operator.GetJob(opb.GetJobRequest(job_id=job_id), metadata=op_md(), timeout=30).job
        allowed = {state, ledger.in_flight.get(job_id, state)}
        assert job.state in allowed, f"job {job_id}: acknowledged state {state}, found {job.state}"
        if job_id in ledger.epochs:
            assert job.lease_epoch == ledger.epochs[job_id]
    for job_id, adapter_id in ledger.adapters.items():
        adapter = srv.operator.GetAdapter(
            opb.GetAdapterRequest(adapter_id=adapter_id), metadata=op_md(), timeout=30
        ).adapter
        assert adapter.job_id == job_id
    # Credentials survived too: a device whose job is RUNNING can still report on its lease.
    for job_id, epoch in ledger.epochs.items():
        if ledger.states[job_id] == tpb.JOB_STATE_UPLOADING and job_id not in ledger.in_flight:
            device_id = srv.operator.GetJob(opb.GetJobRequest(job_id=job_id), metadata=op_md()).job.device_id
            md = dev_md(device_id, ledger.credentials[device_id])
            srv.agent.ReportProgress(
                apb.ReportProgressRequest(job_id=job_id, lease_epoch=epoch, state=tpb.JOB_STATE_UPLOADING),
                metadata=md,
                timeout=30,
            )
            break


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_kill_9_loses_nothing_acknowledged(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    db_url = (
        f"sqlite:///{tmp_path / 'state.db'}" if backend == "sqlite" else str(request.getfixturevalue("postgres_url"))
    )
    first = ServeProcess(tmp_path, db_url, "first")
    second: ServeProcess | None = None
    try:
        first.wait_ready()
        ledger = Ledger()
        devices = ["phone-1", "phone-2", "phone-3"]
        for device_id in devices:
            ledger.credentials[device_id] = enroll(first.agent, device_id)
            enroll(first.agent, f"{device_id}-idle")
        drivers = [threading.Thread(target=_drive, args=(first, ledger, tmp_path, d), daemon=True) for d in devices]
        for t in drivers:
            t.start()
        # Kill in the middle of the traffic, once a fair amount was acknowledged.
        wait_for(
            lambda: ledger.errors or (len(ledger.adapters) >= 3 and len(ledger.submitted) >= 20),
            "traffic to be acknowledged",
        )
        assert not ledger.errors, ledger.errors
        ledger.stop.set()
        first.kill9()
        for t in drivers:
            t.join(30)

        second = ServeProcess(tmp_path, db_url, "second")
        second.wait_ready()
        _verify(second, ledger)
    finally:
        for proc in (first, second):
            if proc is not None and proc.proc.poll() is None:
                proc.kill9()


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
