"""The device agent against a real orchestrator: gating, pause/resume, crashes, kill -9, idle weight.

Sensors are the only fake: a trace replayed on a clock the test moves (this machine has no
battery). Everything else is real: the gRPC server, the file store with presigned URLs, the
training child process with NF4 bitsandbytes, the upload and the verification.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from adapters_store import unpack_adapter
from agent.agent import Agent, AgentConfig
from agent.gate import Gate, GatePolicy
from agent.sensors import TraceSensors
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import ENROLL_TOKEN, ServerThread, op_md
from tests.support.tiny_models import make_tiny_llama
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


class ManualClock:
    """Trace time the test moves."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("base") / "tiny", hidden=64, layers=2)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "orch", lease_s=6.0, retry_base_s=0.5, reap_every_s=0.5) as s:
        yield s


def write_dataset(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Q{i}: what is the code?", "completion": f" The code is {i * 7 % 10}."} for i in range(24)]
    (folder / "codes.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def write_trace(path: Path) -> None:
    rows = [
        {"t": 0, "charging": True, "battery": 90, "temp_c": 30},
        {"t": 100, "charging": True, "battery": 90, "temp_c": 50},  # above the 45 °C high mark
        {"t": 200, "charging": True, "battery": 90, "temp_c": 42},  # below high, above the 40 °C low mark
        {"t": 300, "charging": True, "battery": 90, "temp_c": 35},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


SPEC = tpb.TrainingSpec(
    adapter_name="codes",
    base_model_id="tiny",
    dataset="codes",
    learning_rate=5e-3,
    max_steps=10,
    max_seq_len=48,
    seed=11,
    checkpoint_every_steps=2,
    lora=tpb.LoraSettings(rank=8, alpha=16, dropout=0.0),
)


def run_agent(
    srv: ServerThread,
    base: Path,
    work: Path,
    clock: ManualClock,
    device: str,
    *,
    progress_every_s: float = 0.5,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> tuple[Agent, threading.Event, threading.Thread, list[tuple[str, dict[str, Any]]]]:
    write_dataset(work / "datasets")
    write_trace(work / "trace.jsonl")
    events: list[tuple[str, dict[str, Any]]] = []

    def listen(kind: str, data: dict[str, Any]) -> None:
        events.append((kind, dict(data)))
        if on_event is not None:
            on_event(kind, data)

    cfg = AgentConfig(
        orchestrator=srv.address,
        device_id=device,
        work_dir=work,
        base_model_dir=base,
        base_model_id="tiny",
        datasets_dir=work / "datasets",
        enrollment_token=ENROLL_TOKEN,
        tick_s=0.05,
        progress_every_s=progress_every_s,
        serve_adapters=False,
    )
    agent = Agent(
        cfg,
        TraceSensors(work / "trace.jsonl", clock=clock),
        Gate(GatePolicy()),
        listener=listen,
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    return agent, stop, thread, events


def job_of(srv: ServerThread, job_id: str) -> Any:
    return srv.operator.GetJob(opb.GetJobRequest(job_id=job_id), metadata=op_md()).job


def submit(srv: ServerThread, device: str, spec: tpb.TrainingSpec = SPEC) -> str:
    wait_for(
        lambda: any(
            d.device_id == device for d in srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices
        ),
        30,
        "enrollment",
    )
    return str(
        srv.operator.SubmitJob(opb.SubmitJobRequest(device_id=device, training=spec), metadata=op_md()).job.job_id
    )


# Long enough that, on a fast idle machine, the heat arrives while steps remain (a tiny model
# runs 10 steps faster than the agent's tick, and the job would end before it could pause).
LONG_SPEC = tpb.TrainingSpec()
LONG_SPEC.CopyFrom(SPEC)
LONG_SPEC.max_steps = 40


def adapter_tensors(srv: ServerThread, job: Any, tmp: Path) -> dict[str, np.ndarray]:
    adapter = srv.operator.GetAdapter(opb.GetAdapterRequest(adapter_id=job.adapter_id), metadata=op_md()).adapter
    blob = tmp / f"{adapter.adapter_id}.safetensors"
    srv.store.get_file(adapter.blob_key, blob)
    unpack_adapter(blob, tmp / adapter.adapter_id)
    return load_file(str(tmp / adapter.adapter_id / "adapter_model.safetensors"))


def test_hot_spell_pauses_within_one_step_and_resumes_to_the_same_adapter(
    srv: ServerThread, base: Path, tmp_path: Path
) -> None:
    # Reference: the same job with no hot spell.
    clock = ManualClock()
    _, stop, thread, _ = run_agent(srv, base, tmp_path / "ref", clock, "ref-phone")
    ref_id = submit(srv, "ref-phone", LONG_SPEC)
    ref = wait_for(lambda: (j := job_of(srv, ref_id)).state == tpb.JOB_STATE_SUCCEEDED and j, 180, "the reference job")
    stop.set()
    thread.join(60)

    clock = ManualClock()
    agent, stop, thread, events = run_agent(srv, base, tmp_path / "hot", clock, "hot-phone")
    try:
        job_id = submit(srv, "hot-phone", LONG_SPEC)
        wait_for(lambda: any(k == "progress" and d["step"] >= 2 for k, d in events), 120, "two optimizer steps")
        proc = agent.proc
        assert proc is not None
        clock.t = 150  # 50 °C: above the high mark
        paused = wait_for(lambda: [d for k, d in events if k == "paused"], 60, "the pause")
        # The agent asks on the first tick that sees the heat; the worker then finishes at most
        # the optimizer step in flight (its events carry the system-wide monotonic clock).
        gate_events = [d for k, d in events if k == "gate"]
        assert gate_events[-1]["reason"] == "TOO_HOT"
        asked = next(d for k, d in events if k == "pausing")["t"]
        steps_after = [e["step"] for e in proc.events if e["event"] == "progress" and e["t"] > asked]
        assert len(steps_after) <= 1, steps_after
        assert next(e for e in proc.events if e["event"] == "paused")["step"] == paused[0]["step"]
        wait_for(lambda: job_of(srv, job_id).state == tpb.JOB_STATE_PAUSED, 30, "PAUSED reported")
        assert job_of(srv, job_id).progress.step == paused[0]["step"]
        clock.t = 250  # 42 °C: cooler, but not below the 40 °C low mark (hysteresis)
        time.sleep(1.5)
        assert job_of(srv, job_id).state == tpb.JOB_STATE_PAUSED
        assert not any(k == "resuming" for k, _ in events)
        clock.t = 350  # 35 °C: resume
        done = wait_for(
            lambda: (j := job_of(srv, job_id)).state == tpb.JOB_STATE_SUCCEEDED and j, 180, "the resumed job"
        )
        assert any(k == "resumed" and d["step"] == paused[0]["step"] for k, d in events)
        device = srv.operator.GetDevice(opb.GetDeviceRequest(device_id="hot-phone"), metadata=op_md()).device
        assert device.eligible
    finally:
        stop.set()
        thread.join(60)
    assert done.attempt == 1  # pausing is not a failure
    a, b = adapter_tensors(srv, ref, tmp_path), adapter_tensors(srv, done, tmp_path)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=1e-4)
    assert any(not np.allclose(t, 0) for n, t in b.items() if "lora_B" in n)  # it trained


def test_child_crash_fails_the_attempt_while_the_agent_keeps_heartbeating(
    srv: ServerThread, base: Path, tmp_path: Path
) -> None:
    clock = ManualClock()
    agent, stop, thread, events = run_agent(srv, base, tmp_path / "crash", clock, "crash-phone")
    try:
        job_id = submit(srv, "crash-phone", LONG_SPEC)
        wait_for(lambda: any(k == "progress" for k, _ in events), 120, "training to start")
        proc = agent.proc
        assert proc is not None and proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)  # what the kernel's OOM killer does
        failed = wait_for(lambda: [d for k, d in events if k == "failed"], 60, "the failure report")
        assert failed[0]["error_class"] == "CRASHED" and failed[0]["will_retry"]
        job = job_of(srv, job_id)
        assert job.last_error_class == tpb.ERROR_CLASS_CRASHED
        assert thread.is_alive()
        seen = srv.operator.GetDevice(
            opb.GetDeviceRequest(device_id="crash-phone"), metadata=op_md()
        ).device.last_seen.seconds
        time.sleep(2.5)
        later = srv.operator.GetDevice(
            opb.GetDeviceRequest(device_id="crash-phone"), metadata=op_md()
        ).device.last_seen.seconds
        assert later > seen  # still heartbeating
        # The retry resumes from the crashed attempt's last checkpoint and succeeds.
        done = wait_for(
            lambda: (j := job_of(srv, job_id)).state == tpb.JOB_STATE_SUCCEEDED and j, 180, "the retried job"
        )
        assert done.attempt == 2
    finally:
        stop.set()
        thread.join(60)


def test_a_lease_lost_under_a_running_agent_stops_training_and_resumes_from_its_checkpoint(
    base: Path, tmp_path: Path
) -> None:
    """The orchestrator's clock jumps past the lease (as when an agent stalls): the reaper
    requeues the job, the agent's next heartbeat hears it is stale, stops training but keeps
    the checkpoints, and when the job comes back to it the second attempt resumes from them."""
    skew = [0.0]
    with ServerThread(
        # A lease long enough that a loaded machine's slow heartbeat never loses it before the jump.
        tmp_path / "orch",
        clock=lambda: time.time() + skew[0],
        lease_s=20.0,
        retry_base_s=0.5,
        reap_every_s=0.5,
    ) as srv:
        # Progress reports far apart, so the heartbeat (not a refused report) is what hears it.
        agent, stop, thread, events = run_agent(
            srv, base, tmp_path / "stale", ManualClock(), "stale-phone", progress_every_s=600
        )
        try:
            job_id = submit(srv, "stale-phone", LONG_SPEC)
            wait_for(lambda: agent.job is not None and agent.job.progress.get("step", 0) >= 4, 400, "four steps")
            skew[0] = 120.0
            dropped = wait_for(
                # The agent waits up to 60 s for its child to checkpoint, then up to 30 s to reap it.
                lambda: [d for k, d in events if k == "job_dropped"],
                150,
                "the agent to drop the stale lease",
            )
            # A heartbeat usually hears it first; a report racing it is refused as stale the same way.
            reason = dropped[0]["reason"]
            assert reason == "no longer leased to this device" or "stale lease" in reason, reason
            done = wait_for(
                lambda: (j := job_of(srv, job_id)).state == tpb.JOB_STATE_SUCCEEDED and j,
                240,
                "the job's second attempt",
            )
            assert done.attempt == 2 and done.last_error_class == tpb.ERROR_CLASS_LEASE_EXPIRED
            resumed = [d for k, d in events if k == "resumed"]
            assert resumed and resumed[0]["step"] >= 2  # from a checkpoint, not step 0
        finally:
            stop.set()
            thread.join(60)


def _agent_cmd(srv: ServerThread, base: Path, work: Path, device: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pocketlora",
        "agent",
        "run",
        "--device-id",
        device,
        "--orchestrator",
        srv.address,
        "--work-dir",
        str(work),
        "--base-model",
        str(base),
        "--base-model-id",
        "tiny",
        "--sensors",
        f"trace:{work / 'trace.jsonl'}",
    ]


def test_agent_killed_with_sigkill_resumes_from_its_last_checkpoint(
    srv: ServerThread, base: Path, tmp_path: Path
) -> None:
    work = tmp_path / "k9"
    write_dataset(work / "datasets")
    (work / "trace.jsonl").write_text(json.dumps({"t": 0, "charging": True, "battery": 90, "temp_c": 30}) + "\n")
    env = {**os.environ, "POCKETLORA_ENROLLMENT_TOKEN": ENROLL_TOKEN}
    log1 = (tmp_path / "agent1.log").open("w")
    first = subprocess.Popen(
        _agent_cmd(srv, base, work, "k9-phone"), env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True
    )
    second = None
    try:
        job_id = submit(srv, "k9-phone", LONG_SPEC)
        wait_for(lambda: job_of(srv, job_id).progress.step >= 5, 180, "five steps")
        os.killpg(first.pid, signal.SIGKILL)  # the agent and its training child, no goodbye
        first.wait(30)
        # The lease runs out while the device is gone; the job goes back to the queue.
        wait_for(lambda: job_of(srv, job_id).state == tpb.JOB_STATE_QUEUED, 60, "the lease to expire")
        log2 = (tmp_path / "agent2.log").open("w")
        second = subprocess.Popen(
            _agent_cmd(srv, base, work, "k9-phone"),
            env=env,
            stdout=log2,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        done = wait_for(
            lambda: (j := job_of(srv, job_id)).state == tpb.JOB_STATE_SUCCEEDED and j, 240, "the job after restart"
        )
        assert done.attempt == 2 and done.last_error_class == tpb.ERROR_CLASS_LEASE_EXPIRED
        text = (tmp_path / "agent2.log").read_text()
        resumed = [
            json.loads(line.split(" resumed ", 1)[1].replace("'", '"'))
            for line in text.splitlines()
            if " resumed {" in line
        ]
        assert resumed and resumed[0]["step"] >= 2, text[-2000:]  # from a checkpoint, not step 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def test_idle_agent_is_light_and_never_imports_torch(srv: ServerThread, base: Path, tmp_path: Path) -> None:
    work = tmp_path / "idle"
    work.mkdir()
    (work / "trace.jsonl").write_text(json.dumps({"t": 0, "charging": False, "battery": 30, "temp_c": 30}) + "\n")
    env = {**os.environ, "POCKETLORA_ENROLLMENT_TOKEN": ENROLL_TOKEN}
    proc = subprocess.Popen(
        _agent_cmd(srv, base, work, "idle-phone"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(
            lambda: any(
                d.device_id == "idle-phone"
                for d in srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices
            ),
            60,
            "enrollment",
        )
        time.sleep(3)  # a few heartbeats
        rss = psutil.Process(proc.pid).memory_info().rss
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps
        assert rss < 80 * 2**20, f"idle agent RSS {rss / 2**20:.1f} MiB"
        device = srv.operator.GetDevice(opb.GetDeviceRequest(device_id="idle-phone"), metadata=op_md()).device
        assert not device.eligible and device.eligibility_reason == tpb.ELIGIBILITY_REASON_NOT_CHARGING
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_operator_shipped_dataset_is_fetched_and_checked(srv: ServerThread, base: Path, tmp_path: Path) -> None:
    from adapters_store import dataset_key, sha256_file

    data = tmp_path / "shipped.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"shipped example {i}"}) for i in range(16)) + "\n")
    digest = sha256_file(data)
    srv.store.put_file(dataset_key(digest), data)
    tampered_digest = "0" * 64
    srv.store.put_file(dataset_key(tampered_digest), data)  # bytes that do not hash to the key

    clock = ManualClock()
    _, stop, thread, _ = run_agent(srv, base, tmp_path / "ship", clock, "ship-phone")
    try:
        wait_for(
            lambda: any(
                d.device_id == "ship-phone"
                for d in srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices
            ),
            30,
            "enrollment",
        )
        specs = {}
        for name, sha in (("good", digest), ("bad", tampered_digest)):
            spec = tpb.TrainingSpec()
            spec.CopyFrom(SPEC)
            spec.dataset = ""
            spec.dataset_object, spec.dataset_sha256, spec.max_steps = dataset_key(sha), sha, 2
            specs[name] = srv.operator.SubmitJob(
                opb.SubmitJobRequest(device_id="ship-phone", training=spec), metadata=op_md()
            ).job.job_id
        good = wait_for(
            lambda: (j := job_of(srv, specs["good"])).state == tpb.JOB_STATE_SUCCEEDED and j,
            180,
            "the shipped-dataset job",
        )
        manifest = json.loads(
            srv.operator.GetAdapter(
                opb.GetAdapterRequest(adapter_id=good.adapter_id), metadata=op_md()
            ).adapter.manifest_json
        )
        assert manifest["dataset_sha256"].removeprefix("sha256:") == digest
        bad = wait_for(
            lambda: (j := job_of(srv, specs["bad"])).state == tpb.JOB_STATE_FAILED and j,
            120,
            "the tampered-dataset job",
        )
        assert bad.last_error_class == tpb.ERROR_CLASS_DATASET_INVALID and bad.attempt == 1
    finally:
        stop.set()
        thread.join(60)
