"""The monitoring files in deploy/: Prometheus accepts its configuration and scrapes the ports the
front ends serve where they run, and every metric the Grafana dashboard queries is one the
orchestrator really serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from protos.pocketlora.v1 import agent_service_pb2 as apb
from tests.support.orch import ENROLL_TOKEN, ServerThread, op_md
from tests.support.promtool import promtool_check, scrape
from tests.test_deploy import _hostport, _reaches, _serve, compose_procs

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "pocketlora.json"


def test_prometheus_config_is_valid() -> None:
    promtool_check("")  # fails in CI, skips locally, when promtool is missing
    done = subprocess.run(
        [str(shutil.which("promtool")), "check", "config", str(PROMETHEUS)],
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


def test_prometheus_scrapes_every_replica_port_where_front_ends_run() -> None:
    procs = compose_procs()
    jobs = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    job = next(j for j in jobs if j["job_name"] == "pocketlora-orchestrator")
    targets = [t for s in job.get("static_configs", []) for t in s["targets"]]
    targets += [f"{n}:{d['port']}" for d in job.get("dns_sd_configs", []) for n in d["names"]]
    serve = _serve(procs)[1]
    http = _hostport(serve.params["http_listen"])[1]
    assert {_hostport(t)[1] for t in targets} == set(range(http, http + serve.params["replicas"]))
    prometheus = next(p for p in procs if p.where == "compose service prometheus")
    for target in targets:
        _reaches(procs, target, prometheus.where, prometheus)
