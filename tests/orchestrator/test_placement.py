"""Placement: can this device run this job, and if not, why (a pure function)."""

from __future__ import annotations

import pytest

from orchestrator.domain import DeviceRecord, JobRecord
from orchestrator.placement import placement_problem

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
        "job needs ~3072 MiB, device budget is 1024 MiB"
    )
    assert "device budget is 2048 MiB" in placement_problem(big, device(ram_bytes=2 * 2**30))


def test_a_job_without_an_estimate_is_not_refused_for_memory() -> None:
    assert placement_problem(job(estimate=0), device(ram_bytes=1)) == ""
