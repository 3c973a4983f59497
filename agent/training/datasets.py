"""JSONL training data: parse and validate records, then tokenize with loss masks.

Three record shapes, one per line:
    {"text": "..."}                                 loss on every token
    {"prompt": "...", "completion": "..."}          loss on the completion only
    {"messages": [{"role": "...", "content": "..."}, ...]}
                                                    rendered with the tokenizer's chat template,
                                                    loss on the assistant turns only
Labels are -100 wherever no loss is wanted. Parsing is torch-free so the agent can validate a
dataset before it spends memory on a child process; every error names the file and 1-based line.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.training.errors import DatasetError

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One validated dataset line: its kind ("text", "prompt", "messages") and its payload."""

    line: int
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Example:
    """One tokenized training example; labels are -100 where the loss is masked."""

    input_ids: list[int]
    labels: list[int]

    @property
    def label_tokens(self) -> int:
        """Number of tokens that carry loss."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def dataset_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of the dataset file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_records(path: str | Path) -> list[Record]:
    """Parse and validate every line of a JSONL dataset (blank lines are skipped)."""
    path = Path(path)
    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise DatasetError(f"{path}:1: cannot read dataset: {exc.strerror or exc}") from exc
    records: list[Record] = []
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not UTF-8 ({exc.reason})") from exc
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: malformed JSON: {exc.msg}") from exc
        records.append(_validate(obj, f"{path}:{lineno}", lineno))
    if not records:
        raise DatasetError(f"{path}:1: dataset is empty (no JSON lines)")
    return records


def _validate(obj: Any, where: str, lineno: int) -> Record:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    shapes = [k for k in ("text", "prompt", "messages") if k in obj]
    if "completion" in obj and "prompt" not in obj:
        raise DatasetError(f"{where}: missing field 'prompt' next to 'completion'")
    if len(shapes) != 1:
        what = "none" if not shapes else ", ".join(shapes)
        raise DatasetError(f"{where}: expected exactly one of 'text', 'prompt'+'completion', 'messages'; found {what}")
    kind = shapes[0]
    if kind == "text":
        _expect_str(obj, "text", where)
        return Record(lineno, "text", {"text": obj["text"]})
    if kind == "prompt":
        if "completion" not in obj:
            raise DatasetError(f"{where}: missing field 'completion' next to 'prompt'")
        _expect_str(obj, "prompt", where, allow_empty=True)
        _expect_str(obj, "completion", where)
        return Record(lineno, "prompt", {"prompt": obj["prompt"], "completion": obj["completion"]})
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list")
    clean: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DatasetError(f"{where}: messages[{i}] must be an object")
        for key in ("role", "content"):
            if key not in m:
                raise DatasetError(f"{where}: messages[{i}] is missing field '{key}'")
            if not isinstance(m[key], str):
                raise DatasetError(f"{where}: messages[{i}].{key} must be a string, got {type(m[key]).__name__}")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise DatasetError(f"{where}: 'messages' has no assistant turn to learn from")
    return Record(lineno, "messages", {"messages": clean})


def _expect_str(obj: dict[str, Any], key: str, where: str, *, allow_empty: bool = False) -> None:
    value = obj[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise DatasetError(f"{where}: field '{key}' is empty")


def tokenize_record(record: Record, tokenizer: Any, max_seq_len: int, where: str) -> Example:
    """Tokenize one record with its loss mask, truncated to max_seq_len tokens."""
    eos = tokenizer.eos_token_id
    if record.kind == "text":
        ids = list(tokenizer(record.data["text"], add_special_tokens=True)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = list(ids)
    elif record.kind == "prompt":
        # Tokenized apart so the mask boundary is exact; the prompt gets the model's BOS.
        p = list(tokenizer(record.data["prompt"], add_special_tokens=True)["input_ids"])
        c = list(tokenizer(record.data["completion"], add_special_tokens=False)["input_ids"])
        if eos is not None:
            c.append(eos)
        ids = p + c
        labels = [IGNORE_INDEX] * len(p) + c
    else:
        ids, labels = _tokenize_chat(record.data["messages"], tokenizer, where)
    return Example(ids[:max_seq_len], labels[:max_seq_len])


def _tokenize_chat(messages: list[dict[str, str]], tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(f"{where}: 'messages' needs a chat template and the base model has none")

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return str(out)

    full = render(messages, False)
    # Character spans of each assistant reply (including its end-of-turn marker, so the model
    # learns to stop): from the generation prompt before it to the end of its rendering.
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = render(messages[:i], True) if i else ""
        end_text = render(messages[: i + 1], False)
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise DatasetError(f"{where}: the chat template does not render turns as prefixes")
        spans.append((len(start_text), len(end_text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for t, (a, _b) in enumerate(enc["offset_mapping"]):
        if any(s <= a < e for s, e in spans):
            labels[t] = ids[t]
    return ids, labels


def load_examples(path: str | Path, tokenizer: Any, max_seq_len: int) -> list[Example]:
    """Read, validate and tokenize a dataset; examples left without loss tokens are dropped."""
    return examples_from_records(read_records(path), tokenizer, max_seq_len, path)


def examples_from_records(records: list[Record], tokenizer: Any, max_seq_len: int, path: str | Path) -> list[Example]:
    """Tokenize validated records; examples left without loss tokens are dropped."""
    examples: list[Example] = []
    dropped = 0
    for rec in records:
        ex = tokenize_record(rec, tokenizer, max_seq_len, f"{path}:{rec.line}")
        # Shifted labels: a token at position 0 is never predicted, so it does not count.
        if any(x != IGNORE_INDEX for x in ex.labels[1:]):
            examples.append(ex)
        else:
            dropped += 1
    if dropped:
        log.warning(
            "%s: %d example(s) have no loss tokens within %d tokens; dropped",
            path,
            dropped,
            max_seq_len,
        )
    if not examples:
        raise DatasetError(f"{path}:1: no example has a loss token within max_seq_len={max_seq_len}")
    return examples
