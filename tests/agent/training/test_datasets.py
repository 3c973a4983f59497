"""JSONL parsing, error locations, chat rendering and loss masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.training.datasets import (
    IGNORE_INDEX,
    dataset_sha256,
    load_examples,
    read_records,
)
from agent.training.errors import DatasetError
from tests.agent.training.conftest import write_jsonl


def test_three_shapes_are_read_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "hello"}\n\n{"prompt": "a", "completion": "b"}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    )

    records = read_records(path)

    assert [(r.line, r.kind) for r in records] == [(1, "text"), (3, "prompt"), (4, "messages")]


@pytest.mark.parametrize(
    ("rows", "line", "needle"),
    [
        ([{"text": "ok"}, "{not json"], 2, "malformed JSON"),
        ([{"text": "ok"}, {"text": "ok"}, {"prompt": "p"}], 3, "missing field 'completion'"),
        ([{"completion": "c"}], 1, "missing field 'prompt'"),
        ([{"text": 3}], 1, "'text' must be a string, got int"),
        ([{"prompt": "p", "completion": ["c"]}], 1, "'completion' must be a string"),
        ([["a list"]], 1, "must be a JSON object"),
        ([{"other": 1}], 1, "exactly one of"),
        ([{"text": "a", "prompt": "b", "completion": "c"}], 1, "exactly one of"),
        ([{"messages": []}], 1, "non-empty list"),
        ([{"messages": [{"role": "user"}]}], 1, "messages[0] is missing field 'content'"),
        (
            [{"messages": [{"role": "user", "content": 1}]}],
            1,
            "messages[0].content must be a string",
        ),
        ([{"messages": [{"role": "user", "content": "x"}]}], 1, "no assistant turn"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, rows: list[Any], line: int, needle: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)

    with pytest.raises(DatasetError) as info:
        read_records(path)

    assert f"{path}:{line}:" in str(info.value)
    assert needle in str(info.value)


def test_empty_file_and_bad_utf8(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"text": "a"}\n\xff\xfe\n')

    with pytest.raises(DatasetError, match=rf"{empty}:1: dataset is empty"):
        read_records(empty)
    with pytest.raises(DatasetError, match=rf"{binary}:2: not UTF-8"):
        read_records(binary)


def test_text_trains_on_every_token(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world adapter"}])

    (ex,) = load_examples(path, tokenizer, 64)

    assert ex.labels == ex.input_ids
    assert ex.input_ids[-1] == tokenizer.eos_token_id


def test_prompt_tokens_are_masked(tmp_path: Path, tokenizer: Any) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Question: hello", "completion": " Paris"}])

    (ex,) = load_examples(path, tokenizer, 64)

    n_prompt = len(tokenizer("Question: hello")["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tokenizer.decode(ex.input_ids[n_prompt:-1]) == " Paris"


def test_chat_loss_only_on_assistant_turns(tmp_path: Path, tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "the quick fox"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])

    (ex,) = load_examples(path, tokenizer, 256)

    learned = tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert "hello world" in learned and "the quick fox" in learned
    assert "be brief" not in learned and "again" not in learned and "user" not in learned
    assert learned.count("<|im_end|>") == 2  # the model learns where its turn ends


def test_truncation_and_drop_of_examples_without_loss(tmp_path: Path, tokenizer: Any) -> None:
    long_prompt = "hello world " * 40
    rows = [{"text": "hello world " * 40}, {"prompt": long_prompt, "completion": "x"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)

    examples = load_examples(path, tokenizer, 16)

    assert len(examples) == 1
    assert len(examples[0].input_ids) == 16
    only_masked = write_jsonl(tmp_path / "masked.jsonl", rows[1:])
    with pytest.raises(DatasetError, match=rf"{only_masked}:1: no example has a loss token"):
        load_examples(only_masked, tokenizer, 16)


def test_sha256_is_of_the_bytes(tmp_path: Path) -> None:
    import hashlib

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])

    assert dataset_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
