"""Pause/resume and kill/resume reproduce an uninterrupted run; failures map to error classes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from agent.training.errors import EXIT_CRASH, EXIT_NON_RETRYABLE, EXIT_PAUSED  # noqa: E402
from agent.training.job import run_job  # noqa: E402
from agent.training.runner import TrainingProcess, write_spec  # noqa: E402
from agent.training.spec import TrainingSpec  # noqa: E402
from tests.agent.training.conftest import write_jsonl  # noqa: E402

TOTAL_STEPS = 40


def make_job(tmp_path: Path, base: Path, data: Path, name: str, **kw: Any) -> Path:
    """Write a job folder; jobs of one test share the training identity, not the folders."""
    spec = TrainingSpec(
        base_model_dir=str(base),
        dataset_path=str(data),
        output_dir=str(tmp_path / name / "adapter"),
        learning_rate=1e-2,
        effective_batch=2,
        epochs=10,  # 8 examples / 2 per step x 10 epochs = 40 optimizer steps
        checkpoint_every_steps=kw.pop("checkpoint_every_steps", 0),
        checkpoint_every_s=0,
        **kw,
    )
    return write_spec(tmp_path / name / "job", spec).parent


def adapter(job: Path) -> dict[str, Any]:
    return load_file(str(job.parent / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture
def reference(tmp_path: Path, sharp_llama: Path, memorise_data: Path) -> dict[str, Any]:
    """The uninterrupted run, in-process through the same job code the worker runs."""
    job = make_job(tmp_path, sharp_llama, memorise_data, "reference")
    assert run_job(job, emit=lambda e: None, should_pause=lambda: False) == "done"
    return adapter(job)


def test_in_process_pause_and_resume_matches_uninterrupted(
    tmp_path: Path, sharp_llama: Path, memorise_data: Path, reference: dict[str, Any]
) -> None:
    job = make_job(tmp_path, sharp_llama, memorise_data, "paused")
    events: list[dict[str, Any]] = []
    steps = lambda: sum(e["event"] == "progress" for e in events)  # noqa: E731

    assert run_job(job, emit=events.append, should_pause=lambda: steps() >= 7) == "paused"
    assert events[-1] == {"event": "paused", "step": 7}
    assert run_job(job, emit=events.append, should_pause=lambda: False) == "done"

    assert {"event": "resumed", "step": 7} in events
    assert_same_adapter(adapter(job), reference)
    manifest = json.loads((job.parent / "adapter" / "training_manifest.json").read_text())
    assert manifest["steps"] == TOTAL_STEPS and len(manifest["loss_curve"]) == TOTAL_STEPS
    assert manifest["base_fingerprint"].startswith("sha256:") and len(manifest["dataset_sha256"]) == 64
    assert manifest["plan"]["micro_batch"] >= 1 and manifest["peak_rss_bytes"] > 0
    assert manifest["spec"]["effective_batch"] == 2


def test_offloaded_optimizer_state_trains_the_same_adapter(
    tmp_path: Path, sharp_llama: Path, memorise_data: Path, reference: dict[str, Any]
) -> None:
    job = make_job(tmp_path, sharp_llama, memorise_data, "offload", offload_optimizer="on")
    events: list[dict[str, Any]] = []

    assert run_job(job, emit=events.append, should_pause=lambda: False) == "done"

    assert events[0]["event"] == "plan" and events[0]["offload_optimizer"] is True
    assert (job / "offload" / "optimizer.safetensors").is_file()
    assert_same_adapter(adapter(job), reference)


@pytest.mark.slow
def test_worker_pauses_on_request_and_resumes_to_the_same_adapter(
    tmp_path: Path, sharp_llama: Path, memorise_data: Path, reference: dict[str, Any]
) -> None:
    job = make_job(tmp_path, sharp_llama, memorise_data, "worker")
    proc: TrainingProcess

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "progress" and event["step"] == 2:
            proc.request_pause()  # control file + SIGUSR1, as the agent does

    proc = TrainingProcess(job, on_event=on_event)
    proc.start()
    first = proc.wait(timeout=120)

    assert first.kind == "paused" and first.exit_code == EXIT_PAUSED, proc.stderr_tail()
    paused_at = first.metrics["step"]
    assert 2 <= paused_at < TOTAL_STEPS
    assert (job / "checkpoint" / "adapter.safetensors").is_file()
    kinds = [e["event"] for e in proc.events]
    assert kinds[0] == "plan" and kinds[-2:] == ["checkpoint", "paused"]

    proc = TrainingProcess(job)
    proc.clear_pause()
    proc.start()
    second = proc.wait(timeout=120)

    assert second.kind == "done", proc.stderr_tail()
    # Worker events also carry the monotonic clock ("t"): match on event and step only.
    assert any(e["event"] == "resumed" and e["step"] == paused_at for e in proc.events)
    assert next(e["step"] for e in proc.events if e["event"] == "progress") == paused_at + 1
    assert second.metrics["steps"] == TOTAL_STEPS
    assert Path(second.adapter_dir or "").joinpath("adapter_config.json").is_file()
    assert_same_adapter(adapter(job), reference)


@pytest.mark.slow
def test_sigkilled_worker_resumes_from_its_last_checkpoint(
    tmp_path: Path, sharp_llama: Path, memorise_data: Path, reference: dict[str, Any]
) -> None:
    job = make_job(tmp_path, sharp_llama, memorise_data, "killed", checkpoint_every_steps=3)
    proc: TrainingProcess

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "checkpoint" and event["step"] >= 6:
            os.kill(proc.pid or 0, signal.SIGKILL)  # no chance to checkpoint on the way out

    proc = TrainingProcess(job, on_event=on_event)
    proc.start()
    killed = proc.wait(timeout=120)

    assert killed.kind == "failed" and killed.error_class == "CRASHED"
    assert "SIGKILL" in (killed.message or "")
    last_ckpt = max(e["step"] for e in proc.events if e["event"] == "checkpoint")

    proc = TrainingProcess(job)
    proc.start()
    done = proc.wait(timeout=120)

    assert done.kind == "done", proc.stderr_tail()
    resumed = [e["step"] for e in proc.events if e["event"] == "resumed"]
    assert resumed == [last_ckpt] and last_ckpt >= 6
    assert_same_adapter(adapter(job), reference)


@pytest.mark.slow
def test_corrupt_base_weights_are_a_crash(tmp_path: Path, tiny_llama: Path, memorise_data: Path) -> None:
    import shutil

    base = Path(shutil.copytree(tiny_llama, tmp_path / "corrupt"))
    weights = base / "model.safetensors"
    # Keep the header (so the fingerprint reads) and cut the tensor data short.
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    job = make_job(tmp_path, base, memorise_data, "corrupt")

    proc = TrainingProcess(job)
    proc.start()
    outcome = proc.wait(timeout=120)

    assert (outcome.kind, outcome.error_class, outcome.exit_code) == (
        "failed",
        "CRASHED",
        EXIT_CRASH,
    )
    assert outcome.message


def test_bad_dataset_is_non_retryable_with_its_line(tmp_path: Path, tiny_llama: Path) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, '{"prompt": "no completion"}'])
    job = make_job(tmp_path, tiny_llama, data, "bad")

    proc = TrainingProcess(job)
    proc.start()
    outcome = proc.wait(timeout=60)

    assert (outcome.kind, outcome.error_class, outcome.exit_code) == (
        "failed",
        "DATASET_INVALID",
        EXIT_NON_RETRYABLE,
    )
    assert f"{data}:2:" in (outcome.message or "")


def test_invalid_spec_and_too_small_budget(tmp_path: Path, tiny_llama: Path, memorise_data: Path) -> None:
    job = tmp_path / "invalid"
    job.mkdir()
    (job / "spec.json").write_text(
        json.dumps({"base_model_dir": "x", "dataset_path": "y", "output_dir": "z", "rank": -1})
    )
    events: list[dict[str, Any]] = []
    proc = TrainingProcess(job, on_event=events.append)
    proc.start()
    outcome = proc.wait(timeout=60)
    assert (outcome.error_class, outcome.exit_code) == ("INVALID_SPEC", EXIT_NON_RETRYABLE)
    assert "rank" in (outcome.message or "") and events[-1]["event"] == "error"

    tight = make_job(tmp_path, tiny_llama, memorise_data, "tight", memory_budget_mb=64)
    proc = TrainingProcess(tight)
    proc.start()
    outcome = proc.wait(timeout=120)
    assert (outcome.error_class, outcome.exit_code) == ("DOES_NOT_FIT", EXIT_NON_RETRYABLE)
    assert "64 MiB" in (outcome.message or "")
