"""Bounds on everything the store reads from someone else: blob sizes, headers, JSON.

A device uploads the bytes the orchestrator verifies, and an orchestrator (or whoever sits
between it and the device) names the bytes a device downloads; neither side may make the other
read without limit. Every bound breached here is a verdict on the data (the caller reports it
as an integrity or format error), never a crash.
"""

from __future__ import annotations

import json
from typing import Any

# Largest adapter blob a device may upload, the orchestrator reads back, or a device downloads.
# A LoRA adapter is a few MB; this leaves room for high ranks on large bases.
MAX_BLOB_BYTES = 512 * 2**20
# Largest operator-shipped dataset a device downloads.
MAX_DATASET_BYTES = 1024 * 2**20
# Largest safetensors header of an adapter blob (tensor entries, peft config, manifest).
MAX_ADAPTER_HEADER_BYTES = 16 * 2**20
# Largest manifest and peft config inside a blob's metadata.
MAX_MANIFEST_BYTES = 4 * 2**20
MAX_CONFIG_BYTES = 1 * 2**20
# Deepest JSON nesting accepted anywhere: manifests nest 3-4 levels, safetensors headers 3.
MAX_JSON_DEPTH = 32


class JsonLimitError(ValueError):
    """Untrusted JSON is malformed, too large or nested too deeply (the message says which)."""


def load_json(raw: str | bytes, what: str, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON within size and depth bounds; JsonLimitError for anything else.

    json.loads recurses once per nesting level: thousands of '[' raise RecursionError, and a
    40,000-digit number raises a plain ValueError; both become JsonLimitError here.
    """
    if len(raw) > max_bytes:
        raise JsonLimitError(f"{what} is {len(raw)} bytes, above the limit of {max_bytes}")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise JsonLimitError(f"{what} is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise JsonLimitError(f"{what} is not valid JSON ({exc.msg} at char {exc.pos})") from None
    except ValueError as exc:  # bad UTF-8, or an integer too long to convert
        raise JsonLimitError(f"{what} is not valid JSON ({type(exc).__name__})") from None
    if json_depth(value, stop_after=max_depth) > max_depth:
        raise JsonLimitError(f"{what} is nested more than {max_depth} levels deep")
    return value


def json_depth(value: Any, stop_after: int | None = None) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, [] or {} is 1), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if stop_after is not None and deepest > stop_after:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest
