"""The whole PocketLoRA loop with real parts: Ray, gRPC, SQLite, S3 on SeaweedFS, NF4 training,
all of it over TLS as a deployment beyond one machine runs it.

A tiny Llama built from a config stands in for SmolLM2. The device agent runs here (it imports
no torch); it trains in its child process, uploads through a presigned URL, the orchestrator
verifies the blob, an operator activates it and the device's runtime hot-swaps it in. A CA made
for the test signs every certificate: the Ray front end requires client certificates (mutual
TLS; the device's names its id), and S3 speaks https only, so the store, the device's upload and
its adapter download all verify against the same CA.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_store import S3BlobStore
from orchestrator.config import OrchestratorConfig
from pocketlora.client import OperatorClient
from pocketlora.tls import load_server_tls, load_tls
from protos.pocketlora.v1 import operator_service_pb2 as op
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.certs import TestCA
from tests.support.seaweed import SeaweedServer, find_weed
from tests.support.tiny_agent import codes_spec, start, tiny_agent
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

OPERATOR, ENROLL = "op-e2e-token", "enroll-e2e-token"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def https_seaweed(ca: TestCA) -> Iterator[SeaweedServer]:
    """SeaweedFS whose S3 port speaks https only, with a certificate from the test's CA."""
    if find_weed() is None:
        pytest.skip("weed binary not found")
    issued = ca.issue("s3", cn="s3", server=True)
    with SeaweedServer(tls=(issued.cert, issued.key, ca.cert_path)) as server:
        yield server


@pytest.fixture
def cluster(
    tmp_path: Path, ca: TestCA, https_seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str]]:
    """Orchestrator on in-process Ray serving mutual TLS, SQLite state, S3 store on SeaweedFS
    over https; yields (address, store URL)."""
    import ray

    from orchestrator.ray_layer import Deployment, init_ray

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", https_seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", https_seaweed.secret_key)
    store_url = f"s3://e2e-adapters?endpoint={https_seaweed.endpoint}&ca={ca.cert_path}"
    server = ca.issue("orchestrator", cn="orchestrator", server=True)
    tls = load_server_tls(server.cert, server.key, ca.cert_path)
    # Short: Ray's unix socket paths must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="plray-"))
    init_ray(num_cpus=2, tmp_root=ray_tmp)
    config = OrchestratorConfig(lease_s=20.0, bootstrap_token=OPERATOR, enrollment_token=ENROLL, reap_interval_s=0.5)
    deployment = Deployment(f"sqlite:///{tmp_path / 'state.db'}", store_url, config, tls=tls)
    try:
        yield deployment.start()[0].address, store_url
    finally:
        deployment.stop()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_whole_loop_trains_verifies_activates_and_changes_outputs(
    cluster: tuple[str, str], tmp_path: Path, https_seaweed: SeaweedServer, ca: TestCA
) -> None:
    address, _ = cluster
    phone = ca.issue("e2e-phone", cn="e2e-phone", device_uri="e2e-phone")
    ops = ca.issue("ops", cn="e2e-operator")
    events: list[tuple[str, dict[str, Any]]] = []
    agent, cfg = tiny_agent(
        address,
        tmp_path,
        "e2e-phone",
        ENROLL,
        listener=lambda k, d: events.append((k, d)),
        tls=load_tls(ca=ca.cert_path, cert=phone.cert, key=phone.key),
        store_tls=load_tls(ca=ca.cert_path),
    )
    device_dir = cfg.work_dir
    stop, thread = start(agent)
    client = OperatorClient(address, OPERATOR, tls=load_tls(ca=ca.cert_path, cert=ops.cert, key=ops.key))
    try:
        wait_for(lambda: client.call("ListDevices", op.ListDevicesRequest()).devices, 60, "enrollment")
        spec = codes_spec()
        job = client.call(
            "SubmitJob", op.SubmitJobRequest(request_id="e2e-1", device_id="e2e-phone", training=spec)
        ).job

        def finished() -> Any:
            j = client.call("GetJob", op.GetJobRequest(job_id=job.job_id)).job
            return j if j.state in (tpb.JOB_STATE_SUCCEEDED, tpb.JOB_STATE_FAILED, tpb.JOB_STATE_CANCELLED) else None

        final = wait_for(finished, 240, "the job to end")
        assert final.state == tpb.JOB_STATE_SUCCEEDED, (final.last_error, [e for e in events if e[0] == "failed"])
        adapter = client.call("GetAdapter", op.GetAdapterRequest(adapter_id=final.adapter_id)).adapter
        manifest = json.loads(adapter.manifest_json)
        assert manifest["rank"] == 8 and manifest["device_id"] == "e2e-phone" and manifest["job_id"] == job.job_id

        # The stored blob is the one the device reported, byte for byte.
        store = S3BlobStore(
            "e2e-adapters",
            https_seaweed.endpoint,
            https_seaweed.access_key,
            https_seaweed.secret_key,
            secure=True,
            ca_file=ca.cert_path,
        )
        assert store.hash_object(adapter.blob_key).sha256 == adapter.sha256
        assert store.list_keys("uploads/") == []  # promoted to its content address

        client.call("ActivateAdapter", op.ActivateAdapterRequest(adapter_id=adapter.adapter_id))
        wait_for(
            lambda: (
                client.call("GetDevice", op.GetDeviceRequest(device_id="e2e-phone")).device.active_adapter_id
                == adapter.adapter_id
            ),
            120,
            "the device to activate the adapter",
        )
        runtime = agent.adapters.runtime
        assert runtime is not None
        runtime_pid = runtime.proc.pid
        prompt = "Say the code 3."
        adapted = runtime.generate(prompt, max_new_tokens=12)
        plain = runtime.generate(prompt, max_new_tokens=12, adapter=None, use_active=False)
        assert adapted["adapter"] == adapter.adapter_id and plain["adapter"] is None
        assert adapted["text"] != plain["text"]

        # Roll back: the previous desire was the base model; the device returns to it without reloading.
        back = client.call("RollbackAdapter", op.RollbackAdapterRequest(device_id="e2e-phone"))
        assert back.desired_adapter_id == ""
        wait_for(
            lambda: client.call("GetDevice", op.GetDeviceRequest(device_id="e2e-phone")).device.active_adapter_id == "",
            60,
            "the rollback",
        )
        assert runtime.generate(prompt, max_new_tokens=12)["text"] == plain["text"]
        assert not runtime.has(adapter.adapter_id)  # the old adapter was unloaded after the swap
        assert agent.adapters.runtime is runtime and runtime.proc.pid == runtime_pid
        kinds = [k for k, _ in events]
        assert kinds.index("leased") < kinds.index("uploaded") < kinds.index("completed")
    finally:
        stop.set()
        thread.join(60)
        client.close()
    assert not thread.is_alive()
    assert (
        os.path.exists(device_dir / "credential.json")
        and (os.stat(device_dir / "credential.json").st_mode & 0o077) == 0
    )
