"""/metrics under Ray: each front-end replica has its own HTTP listener (its own Prometheus
target), and replica 0 adds the control loop's counters, which live in another process."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.config import OrchestratorConfig
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import agent_service_pb2_grpc as agrpc
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import operator_service_pb2_grpc as ogrpc
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import dev_md, op_md
from tests.support.promtool import promtool_check, scrape
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow
OPERATOR, ENROLL = "op-ray-metrics", "enroll-ray-metrics"


def expiries(text: str) -> float:
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "pocketlora_lease_expiries_total"
    )


def test_replicas_serve_http_and_replica_0_reports_the_control_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from orchestrator.ray_layer import http_ports, init_ray, start_orchestrator, stop_orchestrator

    monkeypatch.setenv("POCKETLORA_URL_SECRET", secrets.token_hex(32))
    ray_tmp = Path(tempfile.mkdtemp(prefix="plrm-"))
    init_ray(num_cpus=2, tmp_root=ray_tmp)
    config = OrchestratorConfig(lease_s=2.0, operator_token=OPERATOR, enrollment_token=ENROLL, reap_interval_s=0.3)
    db, store = f"sqlite:///{tmp_path / 'state.db'}", f"file://{tmp_path / 'blobs'}"
    frontends, control, ports = start_orchestrator(db, store, config, replicas=2, http_listen="127.0.0.1:0")
    try:
        first, second = http_ports(frontends)
        assert first and second and first != second
        channel = grpc.insecure_channel(f"127.0.0.1:{ports[0]}")
        agent, operator = agrpc.AgentServiceStub(channel), ogrpc.OperatorServiceStub(channel)
        caps = tpb.Capabilities(base_model_id="tiny", ram_bytes=2**33)
        cred = agent.Enroll(
            apb.EnrollRequest(device_id="p1", capabilities=caps), metadata=op_md(ENROLL)
        ).device_credential
        spec = tpb.TrainingSpec(adapter_name="a", base_model_id="tiny", dataset="d")
        operator.SubmitJob(opb.SubmitJobRequest(device_id="p1", training=spec), metadata=op_md(OPERATOR))
        agent.LeaseJob(apb.LeaseJobRequest(device_id="p1"), metadata=dev_md("p1", cred))
        # Nobody renews the lease: the control loop (its own process) requeues it.
        url = f"http://127.0.0.1:{first}/metrics"
        wait_for(lambda: expiries(scrape(url)) >= 1, 60, "the control loop's lease expiry on replica 0's /metrics")
        text = scrape(url)
        promtool_check(text)
        assert expiries(scrape(f"http://127.0.0.1:{second}/metrics")) == 0  # counted once, on replica 0
        with urllib.request.urlopen(f"http://127.0.0.1:{second}/", timeout=10) as page:
            assert b"PocketLoRA console" in page.read()
        channel.close()
    finally:
        stop_orchestrator(frontends, control)
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
