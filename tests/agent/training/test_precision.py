"""Which precision the CPU trainer computes in: native bfloat16 detection and the resolution rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store.memory_plan import resolve_precision
from agent.training.precision import cpu_flags, cpu_has_native_bf16


@pytest.mark.parametrize(
    ("text", "native"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),  # Arm's BF16 extension
        ("processor\t: 0\nFeatures\t: fp asimd crc32\n", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, text: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)

    assert cpu_has_native_bf16(cpuinfo) is native


def test_no_cpuinfo_means_no_flags(tmp_path: Path) -> None:
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu_has_native_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize(
    ("requested", "native", "expected", "noted"),
    [
        ("auto", True, "bf16", False),
        ("auto", False, "fp32", False),
        ("bf16", False, "bf16", False),
        ("fp32", True, "fp32", False),
        ("fp16", True, "bf16", True),
        ("fp16", False, "fp32", True),
    ],
)
def test_resolution(requested: str, native: bool, expected: str, noted: bool) -> None:
    got, note = resolve_precision(requested, native_bf16=native)

    assert got == expected and (note is not None) is noted


def test_an_unknown_precision_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"mixed_precision.*'fp8'"):
        resolve_precision("fp8", native_bf16=True)
