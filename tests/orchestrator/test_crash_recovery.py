"""A killed orchestrator loses nothing it acknowledged: `orchestrator serve` as a real process,
killed with -9 in the middle of traffic and restarted, on SQLite and PostgreSQL.

No timed assertions: every wait polls for a condition with a generous ceiling, so a busy
2-core CI machine only makes these slower, never wrong.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adapters_store import upload_to_url
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ENROLL_TOKEN, dev_md, fake_adapter_blob, op_md
from tests.support.serve import ServeProcess
from tests.support.waiting import wait_for

SPEC = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")
CAPS = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)


def enroll(agent: Any, device_id: str) -> str:
    reply = agent.Enroll(
        apb.EnrollRequest(device_id=device_id, capabilities=CAPS), metadata=op_md(ENROLL_TOKEN), timeout=30
    )
    return str(reply.device_credential)


# ------------------------------------------------------------------------------------------
# (b) the orchestrator killed with -9 and restarted loses nothing it acknowledged
# ------------------------------------------------------------------------------------------


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
            60,
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
