"""The monitoring files in deploy/: Prometheus accepts its configuration, and every metric the
Grafana dashboard queries is one the orchestrator really serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from protos.pocketlora.v1 import agent_service_pb2 as apb
from tests.support.orch import ENROLL_TOKEN, ServerThread, op_md
from tests.support.promtool import promtool_check, scrape

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "pocketlora.json"


def test_prometheus_config_is_valid() -> None:
    promtool_check("")  # fails in CI, skips locally, when promtool is missing
    done = subprocess.run(
        [str(shutil.which("promtool")), "check", "config", "deploy/prometheus/prometheus.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_dashboard_query_names_a_served_metric(tmp_path: Path) -> None:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    wanted = {family(m) for e in exprs for m in re.findall(r"\bpocketlora_[a-z0-9_]+", e)}
    assert len(wanted) >= 15
    with ServerThread(tmp_path, http=True) as srv:
        srv.agent.Enroll(apb.EnrollRequest(device_id="phone-a"), metadata=op_md(ENROLL_TOKEN))
        text = scrape(f"{srv.http_url}/metrics")
    served = {family(m) for m in re.findall(r"^# TYPE (pocketlora_[a-z0-9_]+)", text, re.MULTILINE)}
    assert not wanted - served, f"the dashboard queries metrics nobody serves: {sorted(wanted - served)}"


def family(name: str) -> str:
    """A sample or family name without the suffixes Prometheus adds (_total, _bucket...)."""
    return re.sub(r"_(total|bucket|sum|count)$", "", name)


@pytest.mark.parametrize(
    "path",
    ["deploy/grafana/provisioning/datasources/prometheus.yml", "deploy/grafana/provisioning/dashboards/pocketlora.yml"],
)
def test_grafana_provisioning_files_exist(path: str) -> None:
    assert "apiVersion: 1" in (ROOT / path).read_text()
