"""Placement: can this device run this job, and if not, why (pure functions); memory is planned
with the device's planner: same inputs, same numbers, no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapters_store.memory_plan import MB, BaseShape, PlanInputs, resolve_precision, smallest_estimate
from agent.jobs import LocalJob, training_spec
from agent.training.memory import base_shape, plan_inputs
from agent.training.spec import TrainingSpec
from orchestrator.domain import DeviceRecord, JobRecord
from orchestrator.placement import placement_problem, planned_peak_bytes
from tests.support.tiny_models import header_only_llama

ROOT = Path(__file__).resolve().parents[2]

CAPS = {"base_model_id": "tiny", "supports_4bit": True, "ram_bytes": 8 * 2**30}


def job(estimate: int = 0, **training: str) -> JobRecord:
    spec = {"adapter_name": "a", "base_model_id": "tiny", "dataset": "d", **training}
    return JobRecord("job-1", "phone-1", spec, memory_estimate_bytes=estimate)


def device(**caps: object) -> DeviceRecord:
    return DeviceRecord("phone-1", "h", capabilities={**CAPS, **caps})


def test_a_matching_device_fits() -> None:
    assert placement_problem(job(), device()) == ""


def test_another_base_model_does_not_fit() -> None:
    assert placement_problem(job(), device(base_model_id="other")) == (
        "device has base model 'other', job needs 'tiny'"
    )


def test_an_unknown_device_base_is_left_to_the_device() -> None:
    assert placement_problem(job(), device(base_model_id="")) == ""


@pytest.mark.parametrize(
    ("fallback", "quantization", "fits"),
    [
        ("FOUR_BIT_FALLBACK_FAIL", "QUANTIZATION_NF4", False),
        ("FOUR_BIT_FALLBACK_FAIL", "QUANTIZATION_UNSPECIFIED", False),
        ("FOUR_BIT_FALLBACK_FALLBACK", "QUANTIZATION_NF4", True),
        ("FOUR_BIT_FALLBACK_FAIL", "QUANTIZATION_NONE", True),
    ],
)
def test_4bit_is_required_only_when_the_job_forbids_falling_back(fallback: str, quantization: str, fits: bool) -> None:
    problem = placement_problem(
        job(on_4bit_unsupported=fallback, quantization=quantization), device(supports_4bit=False)
    )

    assert (problem == "") == fits
    if not fits:
        assert "4-bit" in problem


def test_memory_is_checked_against_the_budget_before_the_ram() -> None:
    big = job(estimate=3 * 2**30)

    assert placement_problem(big, device(ram_bytes=4 * 2**30)) == ""
    assert placement_problem(big, device(ram_bytes=4 * 2**30, memory_budget_bytes=2**30)) == (
        "does not fit: planned peak 3072 MiB exceeds the device's memory budget of 1024 MiB by 2048 MiB"
    )
    assert "memory budget of 2048 MiB by 1024 MiB" in placement_problem(big, device(ram_bytes=2 * 2**30))


def test_a_job_without_an_estimate_is_not_refused_for_memory() -> None:
    assert placement_problem(job(estimate=0), device(ram_bytes=1)) == ""


# API specs as the orchestrator stores them (the proto's JSON form), defaults and overrides.
API_SPECS: list[dict[str, Any]] = [
    {},
    {"lora": {"rank": 16, "target_modules": ["q_proj", "v_proj"]}},
    {"quantization": "QUANTIZATION_NONE"},
    {"double_quant": False},
    {"max_seq_len": 64, "effective_batch": 4},
    {"micro_batch": 2, "gradient_checkpointing": "GRADIENT_CHECKPOINTING_OFF"},
    {"mixed_precision": "MIXED_PRECISION_BF16"},
    {"mixed_precision": "MIXED_PRECISION_FP16", "gradient_checkpointing": "GRADIENT_CHECKPOINTING_ON"},
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return header_only_llama(tmp_path_factory.mktemp("smol"))


def caps_for(shape: BaseShape, **kw: Any) -> dict[str, Any]:
    return {"base_model_id": "smol", "supports_4bit": True, "ram_bytes": 8 * 2**30, "base_shape": shape.to_dict(), **kw}


def device_view(smol: Path, training: dict[str, Any], native_bf16: bool) -> PlanInputs:
    """What the agent plans for the same API spec: its own mapping to a TrainingSpec, then the planner's inputs."""
    job = LocalJob("job-1", 1, 1, {"adapter_name": "a", "base_model_id": "smol", "dataset": "d", **training})
    spec = training_spec(job, Path("/tmp/job"), smol, Path("/tmp/d.jsonl"), 0, 1)
    precision, _ = resolve_precision(spec.mixed_precision, native_bf16=native_bf16)
    return plan_inputs(dataclasses.replace(spec, mixed_precision=precision))


@pytest.mark.parametrize("training", API_SPECS)
@pytest.mark.parametrize("native_bf16", [False, True])
def test_the_orchestrator_plans_what_the_device_plans(smol: Path, training: dict[str, Any], native_bf16: bool) -> None:
    shape = base_shape(smol)
    caps = caps_for(shape, native_bf16=native_bf16)

    on_device = smallest_estimate(shape, device_view(smol, training, native_bf16))

    assert planned_peak_bytes(training, caps) == on_device


def test_the_planner_defaults_are_the_training_recipe() -> None:
    recipe = TrainingSpec(base_model_dir="b", dataset_path="d", output_dir="o")
    planner = PlanInputs()

    assert (planner.rank, planner.max_seq_len, planner.effective_batch) == (
        recipe.rank,
        recipe.max_seq_len,
        recipe.effective_batch,
    )
    assert (planner.nf4, planner.double_quant) == (recipe.quantization == "nf4", recipe.double_quant)
    assert recipe.epochs == 3 and recipe.mixed_precision == "auto"


def test_what_makes_a_job_bigger_or_smaller(smol: Path) -> None:
    caps = caps_for(base_shape(smol))
    default = planned_peak_bytes({}, caps)

    assert planned_peak_bytes({"quantization": "QUANTIZATION_NONE"}, caps) > default
    assert planned_peak_bytes({}, {**caps, "supports_4bit": False}) > default  # it falls back to fp32
    assert planned_peak_bytes({"double_quant": False}, caps) > default
    assert planned_peak_bytes({"mixed_precision": "MIXED_PRECISION_BF16"}, caps) > default
    assert planned_peak_bytes({"max_seq_len": 4096}, caps) > default
    assert planned_peak_bytes({}, {k: v for k, v in caps.items() if k != "base_shape"}) == 0


def test_refusal_says_by_how_much_with_the_smallest_plan(smol: Path) -> None:
    caps = caps_for(base_shape(smol))
    need = planned_peak_bytes({}, caps)  # what submit stores as the job's estimate
    planned = JobRecord("job-1", "d", {"base_model_id": "smol"}, memory_estimate_bytes=need)

    problem = placement_problem(planned, DeviceRecord("d", "h", {**caps, "memory_budget_bytes": need - 100 * MB}))

    assert f"planned peak {need / MB:.0f} MiB" in problem and "by 100 MiB" in problem
    assert "(smallest plan: micro-batch 1, checkpointing on, optimizer offload on, seq 256)" in problem
    assert placement_problem(planned, DeviceRecord("d", "h", {**caps, "memory_budget_bytes": need})) == ""


def test_placement_and_the_shared_planner_import_no_torch() -> None:
    code = (
        "import sys, orchestrator.placement, orchestrator.service, adapters_store.memory_plan, agent.training.memory; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"
