"""Repository checks that CI must run: generated code is fresh (deployment files: test_deploy.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
