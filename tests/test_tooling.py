"""Repository checks that CI must run: generated code is fresh, the compose file is valid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_protos_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stale_generated_code_is_detected(tmp_path: Path) -> None:
    """The freshness check fails when a proto changes without regenerating."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    proto = copy / "protos" / "pocketlora" / "v1" / "types.proto"
    proto.write_text(
        proto.read_text()
        + "\n// A new message nobody regenerated.\nmessage Stale {\n  // A field.\n  string x = 1;\n}\n"
    )
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=copy, capture_output=True, text=True
    )
    assert result.returncode == 1 and "stale" in result.stdout


def test_docker_compose_file_is_valid() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is required in CI (scripts/test.sh installs it)")
        pytest.skip("docker-compose not installed")
    result = subprocess.run([exe, "-f", "docker-compose.yml", "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
