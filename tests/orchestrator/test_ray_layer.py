"""The Ray layer's pieces on in-process Ray: what actors receive, the version probe, supervision.

The multi-node behaviour (shipping, node loss) is in test_cluster.py.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import pocketlora
from orchestrator.config import OrchestratorConfig
from orchestrator.ray_layer import Deployment, DeploymentError, ForwardedEnv, health_check, init_ray, probe
from orchestrator.ray_layer.runtime import shipped_modules
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_forwarded_env_takes_what_the_server_reads_and_never_shows_values() -> None:
    env = ForwardedEnv.from_environ(
        {
            "PGPASSWORD": "pg-secret",
            "AWS_SECRET_ACCESS_KEY": "s3-secret",
            "POCKETLORA_URL_SECRET": "ab" * 32,
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin",
            "RAY_ADDRESS": "auto",
            "pg_lower": "x",
        }
    )
    assert set(env.values) == {"PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "POCKETLORA_URL_SECRET", "HF_HUB_OFFLINE"}
    shown = repr(env) + str(env)
    assert "PGPASSWORD" in shown and "pg-secret" not in shown and "s3-secret" not in shown


def test_the_probe_reports_the_pinned_versions_and_the_project() -> None:
    found = probe.fingerprint()
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = dict(re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)", p).groups() for p in pins)  # type: ignore[union-attr]
    for dist in probe.SERVER_DISTRIBUTIONS:
        assert found[dist] == pinned[dist], f"{dist} installed {found[dist]}, pinned {pinned.get(dist)}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert found["pocketlora"] == pocketlora.__version__ == project
    assert re.fullmatch(r"[0-9a-f]{64}", found["code"]) and found["code"] == probe.code_digest()
    assert {Path(p).name for p in shipped_modules()} == set(probe.SERVER_PACKAGES)


def test_probe_differences_name_each_mismatch() -> None:
    mine = {"python": "3.11", "ray": "2.60.0", "pocketlora": "0.1.0", "code": "a" * 64}
    assert probe.differences(mine, dict(mine)) == []
    theirs = {"python": "3.11", "ray": "2.59.0", "pocketlora": "0.1.0", "code": "b" * 64}
    assert probe.differences(mine, theirs) == [
        "ray 2.59.0 (driver 2.60.0)",
        "code differs (sha256 bbbbbbbbbbbb, driver aaaaaaaaaaaa)",
    ]
    missing = {"python": "3.11", "ray": "2.60.0", "pocketlora": probe.MISSING, "code": ""}
    assert probe.differences(mine, missing) == ["pocketlora missing (driver 0.1.0)"]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="plrl-"))  # short: Ray's socket paths must fit 107 bytes
    init_ray(num_cpus=2, tmp_root=tmp)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_lost_front_end_is_replaced_and_serves_again(local_ray: None, tmp_path: Path) -> None:
    import ray

    config = OrchestratorConfig(bootstrap_token="op-token", reap_interval_s=0.5)
    deployment = Deployment(f"sqlite:///{tmp_path / 'state.db'}", f"file://{tmp_path / 'blobs'}", config, replicas=2)
    try:
        endpoints = deployment.start()
        assert len(endpoints) == 2 and all(health_check(e.address) for e in endpoints)
        assert deployment.supervise() == []
        ray.kill(deployment.replicas[1].actor, no_restart=True)

        events: list[str] = []

        def replaced() -> bool:
            events.extend(deployment.supervise())
            return any("(replacement)" in e for e in events)

        wait_for(replaced, 180, "the lost front end to be replaced", every_s=1.0)
        assert any(e.startswith("front end 1 on node") and "is gone" in e for e in events), events
        new = deployment.endpoints()[1]
        assert new.address != endpoints[1].address and health_check(new.address)
    finally:
        deployment.stop()


def test_an_actor_running_other_code_stops_start_up_with_one_line(local_ray: None, tmp_path: Path) -> None:
    config = OrchestratorConfig(bootstrap_token="op-token")
    deployment = Deployment(f"sqlite:///{tmp_path / 'state.db'}", f"file://{tmp_path / 'blobs'}", config)
    deployment.expected = {**deployment.expected, "code": "0" * 64}  # as if the driver ran other code
    with pytest.raises(DeploymentError) as info:
        deployment.start(timeout_s=120)
    message = str(info.value)
    assert "code differs" in message and "\n" not in message, message
