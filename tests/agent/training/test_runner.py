"""The parent side: torch-free imports, crash mapping, pause files, and PDEATHSIG."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.training.runner import TrainingProcess, write_spec
from agent.training.spec import TrainingSpec

ROOT = Path(__file__).resolve().parents[3]


def test_agent_side_modules_do_not_import_torch() -> None:
    code = (
        "import sys, agent.training.runner, agent.training.spec, agent.training.memory, "
        "agent.training.datasets, agent.training.errors, agent.models; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"


def _fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def test_a_segfault_is_a_crash_with_the_last_stderr_lines(tmp_path: Path) -> None:
    python = _fake_python(tmp_path, 'echo "loading weights" >&2\necho "about to fail" >&2\nkill -SEGV $$')
    proc = TrainingProcess(tmp_path / "job", python=python)

    proc.start()
    outcome = proc.wait(timeout=30)

    assert (outcome.kind, outcome.error_class) == ("failed", "CRASHED")
    assert outcome.exit_code < 0
    assert "SIGSEGV" in (outcome.message or "") and "about to fail" in (outcome.message or "")


def test_events_are_parsed_and_a_silent_exit_is_a_crash(tmp_path: Path) -> None:
    lines = [
        json.dumps({"event": "progress", "step": 1}),
        "not json",
        json.dumps({"event": "checkpoint", "step": 1}),
    ]
    body = "\n".join(f"echo '{line}'" for line in lines) + "\nexit 0"
    seen: list[dict[str, object]] = []
    proc = TrainingProcess(tmp_path / "job", python=_fake_python(tmp_path, body), on_event=seen.append)

    proc.start()
    outcome = proc.wait(timeout=30)

    assert [e["event"] for e in seen] == ["progress", "checkpoint"]
    assert (outcome.kind, outcome.error_class) == ("failed", "CRASHED")
    assert "without a final event" in (outcome.message or "")


def test_pause_file_is_created_and_cleared(tmp_path: Path) -> None:
    proc = TrainingProcess(tmp_path / "job")

    proc.request_pause()
    assert (tmp_path / "job" / "control" / "pause").is_file()
    proc.clear_pause()
    assert not (tmp_path / "job" / "control" / "pause").exists()
    assert proc.poll() is None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has already exited


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_worker_checkpoints_and_stops_when_the_agent_dies(
    tmp_path: Path, sharp_llama: Path, memorise_data: Path
) -> None:
    spec = TrainingSpec(
        base_model_dir=str(sharp_llama),
        dataset_path=str(memorise_data),
        output_dir=str(tmp_path / "adapter"),
        effective_batch=1,
        epochs=50,
        checkpoint_every_steps=0,
        checkpoint_every_s=0,
    )
    job = write_spec(tmp_path / "job", spec).parent
    agent = textwrap.dedent(
        f"""
        import os, sys, threading
        from agent.training.runner import TrainingProcess
        started = threading.Event()
        def on_event(e):
            if e["event"] == "progress" and e["step"] >= 2:
                started.set()
        p = TrainingProcess({str(job)!r}, on_event=on_event)
        p.start()
        print(p.pid, flush=True)
        started.wait(120)
        os._exit(0)  # the agent dies without a word to its child
        """
    )
    out = subprocess.run([sys.executable, "-c", agent], cwd=ROOT, capture_output=True, text=True, timeout=180)
    worker = int(out.stdout.split()[0])

    deadline = time.monotonic() + 60
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)

    assert not _alive(worker), "the orphaned worker kept training"
    state = json.loads((job / "checkpoint" / "state.json").read_text())
    assert 2 <= state["state"]["step"] < 400
    assert not (tmp_path / "adapter").exists()
