"""TrainingSpec validation and JSON round trips."""

from __future__ import annotations

import pytest

from agent.training.errors import SpecError
from agent.training.spec import TrainingSpec

REQUIRED = {"base_model_dir": "/m", "dataset_path": "/d.jsonl", "output_dir": "/o"}


def test_defaults_round_trip_through_json_and_dict() -> None:
    spec = TrainingSpec(**REQUIRED, target_modules=["q_proj"], rank=4)

    assert TrainingSpec.from_json(spec.to_json()) == spec
    assert TrainingSpec.from_dict(spec.to_dict()) == spec
    assert spec.quantization == "nf4" and spec.double_quant and spec.effective_batch == 8


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", 0),
        ("rank", True),
        ("rank", 2.5),
        ("alpha", 0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("target_modules", []),
        ("target_modules", "q_proj"),
        ("quantization", "int8"),
        ("on_4bit_unsupported", "maybe"),
        ("learning_rate", float("nan")),
        ("effective_batch", 0),
        ("micro_batch", -1),
        ("micro_batch", 16),
        ("epochs", 0),
        ("max_steps", -3),
        ("max_seq_len", 1),
        ("gradient_checkpointing", "yes"),
        ("mixed_precision", "fp8"),
        ("checkpoint_every_s", -1),
        ("memory_budget_mb", -1),
        ("offload_optimizer", "sometimes"),
        ("double_quant", "true"),
        ("base_model_dir", ""),
    ],
)
def test_bad_values_name_the_field_and_the_value(field: str, value: object) -> None:
    with pytest.raises(SpecError) as info:
        TrainingSpec(**{**REQUIRED, field: value})  # type: ignore[arg-type]

    assert field in str(info.value)
    assert repr(value) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_and_missing_keys_are_named() -> None:
    with pytest.raises(SpecError, match=r"unknown.*bogus, lr"):
        TrainingSpec.from_dict({**REQUIRED, "lr": 1, "bogus": 2})
    with pytest.raises(SpecError, match="output_dir"):
        TrainingSpec.from_dict({"base_model_dir": "/m", "dataset_path": "/d"})
    with pytest.raises(SpecError, match="not valid JSON"):
        TrainingSpec.from_json("{nope")


def test_identity_ignores_resource_settings() -> None:
    a = TrainingSpec(**REQUIRED, micro_batch=2, torch_threads=2, memory_budget_mb=100)
    b = TrainingSpec(**REQUIRED, checkpoint_every_steps=3)

    assert a.identity() == b.identity()
    assert a.identity() != TrainingSpec(**REQUIRED, seed=1).identity()
