"""Shared fixtures: tiny Llama and GPT-2 bases, datasets, and job folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.tiny_models import sharpen_head

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A dataset a tiny model can memorise: eight short prompt/completion pairs.
MEMORISE = [{"prompt": f"Q{i}:", "completion": f" answer {i} is blue"} for i in range(8)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write rows (objects, or raw strings for malformed lines) as JSON lines."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_models import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tokenizer(tiny_llama: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture
def memorise_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "memorise.jsonl", MEMORISE)


@pytest.fixture(scope="session")
def sharp_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharpen_head(tiny_llama, tmp_path_factory.mktemp("sharp") / "llama")


@pytest.fixture(scope="session")
def sharp_gpt2(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharpen_head(tiny_gpt2, tmp_path_factory.mktemp("sharp") / "gpt2")
