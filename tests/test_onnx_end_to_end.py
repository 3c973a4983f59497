"""A device on the ONNX runtime, end to end: the orchestrator (on Ray) exports the base's int4
bundle and converts the trained adapter as Ray tasks; the agent (--runtime onnx) downloads both,
activates the adapter, and apps get its answers through DeviceInferenceService on a unix socket."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.agent import Agent, AgentConfig
from agent.gate import Gate, GatePolicy
from agent.sensors import TraceSensors
from orchestrator.config import OrchestratorConfig
from pocketlora.client import OperatorClient
from protos.pocketlora.v1 import device_inference_service_pb2 as ipb
from protos.pocketlora.v1 import device_inference_service_pb2_grpc as ipb_grpc
from protos.pocketlora.v1 import operator_service_pb2 as op
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.onnx_models import TinyBundle
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

OPERATOR, ENROLL = "op-onnx-token", "enroll-onnx-token"


@pytest.fixture
def cluster(tmp_path: Path, tiny_bundle: TinyBundle, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Orchestrator on in-process Ray exporting the tiny base's bundle; yields its address."""
    import ray

    from orchestrator.ray_layer import Deployment, init_ray

    monkeypatch.setenv("POCKETLORA_URL_SECRET", "ab" * 32)
    ray_tmp = Path(tempfile.mkdtemp(prefix="plray-"))
    init_ray(num_cpus=2, tmp_root=ray_tmp)
    config = OrchestratorConfig(
        lease_s=20.0,
        bootstrap_token=OPERATOR,
        enrollment_token=ENROLL,
        reap_interval_s=0.5,
        runtime_bases={"tiny-llama": str(tiny_bundle.base)},
    )
    store_url = f"file://{tmp_path / 'blobs'}"
    deployment = Deployment(f"sqlite:///{tmp_path / 'state.db'}", store_url, config)
    try:
        yield deployment.start()[0].address
    finally:
        deployment.stop()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _ask(stub: ipb_grpc.DeviceInferenceServiceStub, **kw: Any) -> list[ipb.GenerateResponse]:
    return list(stub.Generate(ipb.GenerateRequest(prompt="Say the code 3.", max_new_tokens=12, **kw)))


def test_onnx_device_serves_its_activated_adapter_to_apps(
    cluster: str, tiny_bundle: TinyBundle, tmp_path: Path
) -> None:
    device_dir = tmp_path / "device"
    (device_dir / "datasets").mkdir(parents=True)
    rows = [{"prompt": f"Say the code {i}.", "completion": " The secret code is PocketLoRA."} for i in range(16)]
    (device_dir / "datasets" / "codes.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"t": 0, "charging": True, "battery": 90, "temp_c": 30}) + "\n")
    sock = tmp_path / "inference.sock"
    events: list[tuple[str, dict[str, Any]]] = []
    cfg = AgentConfig(
        orchestrator=cluster,
        device_id="onnx-phone",
        work_dir=device_dir,
        base_model_dir=tiny_bundle.base,
        base_model_id="tiny-llama",
        datasets_dir=device_dir / "datasets",
        enrollment_token=ENROLL,
        tick_s=0.2,
        progress_every_s=0.5,
        runtime="onnx",
        inference_listen=f"unix:{sock}",
    )
    agent = Agent(cfg, TraceSensors(trace), Gate(GatePolicy()), listener=lambda k, d: events.append((k, d)))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    client = OperatorClient(cluster, OPERATOR)
    try:
        wait_for(lambda: client.call("ListDevices", op.ListDevicesRequest()).devices, 60, "enrollment")
        device = client.call("GetDevice", op.GetDeviceRequest(device_id="onnx-phone")).device
        assert list(device.capabilities.inference_runtimes) == [tpb.INFERENCE_RUNTIME_ONNX]
        spec = tpb.TrainingSpec(
            adapter_name="codes",
            base_model_id="tiny-llama",
            dataset="codes",
            learning_rate=5e-3,
            max_steps=6,
            max_seq_len=64,
            seed=3,
            lora=tpb.LoraSettings(rank=8, alpha=16, dropout=0.0),
        )
        job = client.call("SubmitJob", op.SubmitJobRequest(request_id="onnx-1", device_id="onnx-phone", training=spec))

        # The API comes up once the bundle (exported by a Ray task) is on the device: the base answers.
        wait_for(lambda: agent.adapters.runtime is not None, 240, "the runtime bundle to reach the device")
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = ipb_grpc.DeviceInferenceServiceStub(channel)
            plain = _ask(stub)
            assert plain[-1].adapter == "" and plain[-1].stats.completion_tokens > 0

            def finished() -> Any:
                j = client.call("GetJob", op.GetJobRequest(job_id=job.job.job_id)).job
                return j if j.state in (tpb.JOB_STATE_SUCCEEDED, tpb.JOB_STATE_FAILED) else None

            final = wait_for(finished, 300, "the job to end")
            assert final.state == tpb.JOB_STATE_SUCCEEDED, final.last_error
            client.call("ActivateAdapter", op.ActivateAdapterRequest(adapter_id=final.adapter_id))
            wait_for(
                lambda: (
                    client.call("GetDevice", op.GetDeviceRequest(device_id="onnx-phone")).device.active_adapter_id
                    == final.adapter_id
                ),
                120,
                "the device to activate the adapter",
            )
            listed = stub.ListResidentAdapters(ipb.ListResidentAdaptersRequest())
            assert listed.runtime == tpb.INFERENCE_RUNTIME_ONNX and listed.active_adapter == final.adapter_id
            adapted = _ask(stub)
            assert adapted[-1].adapter == final.adapter_id
            assert adapted[-1].stats.token_ids != plain[-1].stats.token_ids
            assert _ask(stub, base_model=True)[-1].stats.token_ids == plain[-1].stats.token_ids

            # The device holds the int4 bundle and the adapter's .onnx_adapter form, not its safetensors.
            folder = device_dir / "adapters" / final.adapter_id
            assert sorted(p.name for p in folder.iterdir()) == ["adapter.onnx_adapter", "manifest.json"]
            bundles = list((device_dir / "runtimes" / "onnx").iterdir())
            assert (
                len(bundles) == 1
                and json.loads((bundles[0] / "pocketlora-bundle.json").read_text())["settings"]["precision"] == "int4"
            )
            runtime = agent.adapters.runtime
            assert runtime is not None and runtime.backend == "onnx"
            assert "libtorch" not in Path(f"/proc/{runtime.proc.pid}/maps").read_text()

            # Roll back: the base again, the adapter unloaded, the same runtime process.
            client.call("RollbackAdapter", op.RollbackAdapterRequest(device_id="onnx-phone"))
            wait_for(lambda: not stub.ListResidentAdapters(ipb.ListResidentAdaptersRequest()).adapters, 60, "rollback")
            assert _ask(stub)[-1].stats.token_ids == plain[-1].stats.token_ids
            assert agent.adapters.runtime is runtime
        kinds = [k for k, _ in events]
        assert "adapter_active" in kinds and "adapter_refused" not in kinds
    finally:
        stop.set()
        thread.join(60)
        client.close()
    assert not thread.is_alive()
