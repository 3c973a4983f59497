"""The agent's optional metrics endpoint: loopback only, promtool-clean, and showing the gate,
training progress, pauses, checkpoints, memory and the adapter in use."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import AgentMetrics, check_loopback
from protos.pocketlora.v1 import operator_service_pb2 as opb
from tests.support.orch import ENROLL_TOKEN, ServerThread, op_md
from tests.support.promtool import promtool_check, scrape
from tests.support.waiting import wait_for


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.168.1.5:9464", "example.com:9464", "127.0.0.1", "[::]:1"])
def test_only_loopback_addresses_are_accepted(listen: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(listen)
    assert check_loopback("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert check_loopback("[::1]:9464") == ("::1", 9464)


def test_events_become_metrics_that_promtool_accepts() -> None:
    observed = AgentMetrics()
    server = observed.serve("127.0.0.1:0")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        for kind, data in [
            ("progress", {"job_id": "job-1", "step": 3, "total_steps": 10, "loss": 1.75, "tokens_seen": 3000}),
            ("checkpoint", {"step": 3}),
            ("pausing", {"job_id": "job-1", "reason": "TOO_HOT"}),
            ("paused", {"job_id": "job-1", "step": 3}),
            ("progress", {"job_id": "job-1", "step": 4, "total_steps": 10, "loss": 1.5, "tokens_seen": 4000}),
            ("adapter_active", {"adapter_id": "ad-1", "name": "captain", "version": 2}),
            ("adapter_refused", {"adapter_id": "ad-2", "reason": "bad base"}),
            ("completed", {"job_id": "job-1", "adapter_id": "ad-1", "version": 2}),
        ]:
            observed.on_event(kind, data)
        text = scrape(url)
        promtool_check(text)
        v = values(text)
        assert v[("pocketlora_agent_pauses_total", ())] == 1
        assert v[("pocketlora_agent_checkpoints_total", ())] == 1
        assert v[("pocketlora_agent_jobs_total", (("outcome", "completed"),))] == 1
        assert v[("pocketlora_agent_adapter_active_version", (("adapter", "captain"),))] == 2
        assert v[("pocketlora_agent_adapter_refusals_total", ())] == 1
        assert v[("pocketlora_agent_resident_memory_bytes", (("process", "agent"),))] > 10 * 2**20
        # A finished job leaves no stale progress behind.
        assert v[("pocketlora_agent_training_step", ())] == 0
        observed.on_event("progress", {"step": 5, "total_steps": 10, "loss": 1.25, "tokens_seen": 5000})
        v = values(scrape(url))
        assert v[("pocketlora_agent_training_step", ())] == 5
        assert v[("pocketlora_agent_training_loss", ())] == 1.25
        assert v[("pocketlora_agent_training_tokens", ())] == 5000
        assert v[("pocketlora_agent_training_steps_planned", ())] == 10
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("base") / "tiny", hidden=64, layers=2)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "orch") as s:
        yield s


@pytest.mark.slow
def test_a_running_agent_serves_its_gate_on_loopback(srv: ServerThread, base: Path, tmp_path: Path) -> None:
    """`agent run --metrics-listen`: a real agent process, scraped while it waits for a charger."""
    work = tmp_path / "agent"
    work.mkdir()
    (work / "trace.jsonl").write_text(json.dumps({"t": 0, "charging": False, "battery": 30, "temp_c": 30}) + "\n")
    port = free_port()
    cmd = [sys.executable, "-m", "pocketlora", "agent", "run", "--device-id", "metered", "--orchestrator", srv.address]
    cmd += ["--work-dir", str(work), "--base-model", str(base), "--base-model-id", "tiny"]
    cmd += ["--sensors", f"trace:{work / 'trace.jsonl'}", "--metrics-listen", f"127.0.0.1:{port}"]
    env = {**os.environ, "POCKETLORA_ENROLLMENT_TOKEN": ENROLL_TOKEN}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: any(
                d.device_id == "metered"
                for d in srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices
            ),
            60,
            "enrollment",
        )
        text = scrape(f"http://127.0.0.1:{port}/metrics")
        promtool_check(text)
        v = values(text)
        assert v[("pocketlora_agent_eligible", ())] == 0
        assert v[("pocketlora_agent_gate_reason", (("reason", "NOT_CHARGING"),))] == 1
        assert v[("pocketlora_agent_gate_reason", (("reason", "ELIGIBLE"),))] == 0
        assert v[("pocketlora_agent_resident_memory_bytes", (("process", "agent"),))] > 0
        # Only loopback: the port is not open on another address of this machine.
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.2", port)) != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
