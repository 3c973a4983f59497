"""Evaluation before use: a held-out split fixed by the seed, and the base and adapter losses on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.training.evaluation import split_holdout
from agent.training.spec import TrainingSpec
from tests.agent.training.conftest import write_jsonl


def test_the_split_is_fixed_by_seed_and_share_and_never_takes_everything() -> None:
    rows = list(range(20))
    train, held = split_holdout(rows, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == rows and not set(train) & set(held)
    assert split_holdout(rows, 0.25, seed=3) == (train, held)  # a resumed job holds out the same
    assert split_holdout(rows, 0.25, seed=4)[1] != held
    assert split_holdout(rows, 0.0, seed=3) == (rows, [])
    assert split_holdout([1], 0.5, seed=3) == ([1], [])  # one record: nothing to hold out
    assert split_holdout([1, 2], 0.5, seed=3)[1] in ([1], [2])
    assert len(split_holdout(list(range(3)), 0.01, seed=0)[1]) == 1  # a share rounds up to one record


def test_eval_share_is_validated_and_only_then_part_of_the_checkpoint_identity(tmp_path: Path) -> None:
    base = {"base_model_dir": "b", "dataset_path": "d", "output_dir": "o"}
    assert "eval_share" not in TrainingSpec(**base).identity()  # type: ignore[arg-type]
    assert TrainingSpec(**base, eval_share=0.2).identity()["eval_share"] == 0.2  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eval_share"):
        TrainingSpec(**base, eval_share=0.6)  # type: ignore[arg-type]


def test_a_job_reports_base_and_adapter_loss_on_its_held_out_records(tmp_path: Path, sharp_llama: Path) -> None:
    pytest.importorskip("torch")
    from agent.training.job import run_job

    rows = [{"prompt": f"Q{i}: what is the code?", "completion": f" The code is {i * 7 % 10}."} for i in range(24)]
    data = write_jsonl(tmp_path / "codes.jsonl", rows)
    spec = TrainingSpec(
        base_model_dir=str(sharp_llama),
        dataset_path=str(data),
        output_dir=str(tmp_path / "out"),
        learning_rate=1e-2,
        effective_batch=4,
        max_steps=12,
        checkpoint_every_steps=0,
        eval_share=0.25,
        quantization="none",
    )
    job = tmp_path / "job"
    job.mkdir()
    (job / "spec.json").write_text(spec.to_json())
    events: list[dict[str, Any]] = []
    assert run_job(job, emit=events.append, should_pause=lambda: False) == "done"
    evaluated = next(e for e in events if e["event"] == "evaluated")
    done = next(e for e in events if e["event"] == "done")
    assert evaluated["eval_examples"] == 6 and done["metrics"]["examples"] == 18  # 24 records, 6 held out
    # Trained on the same pattern, the adapter beats the untouched base on records it never saw.
    assert evaluated["eval_loss_adapter"] < 0.9 * evaluated["eval_loss_base"], evaluated
    manifest = json.loads((tmp_path / "out" / "training_manifest.json").read_text())
    assert manifest["eval"] == {k: v for k, v in evaluated.items() if k.startswith("eval_")}
    assert done["metrics"]["eval_loss_base"] == evaluated["eval_loss_base"]
