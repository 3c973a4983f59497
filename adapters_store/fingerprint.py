"""Base-model fingerprints and safetensors headers, read without importing torch.

An adapter only makes sense on the exact base it was trained on. Two models match when their
weights have the same names, shapes and dtypes; hashing that list is cheap (headers only, no
tensor data) and works in the idle agent and the orchestrator, neither of which imports torch.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from adapters_store.limits import JsonLimitError, load_json

# A safetensors header is a little-endian u64 length followed by that many bytes of JSON.
_MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsHeaderError(ValueError):
    """The file is not a well-formed safetensors file."""


def read_safetensors_header(path: Path, max_header_bytes: int = _MAX_HEADER_BYTES) -> dict[str, Any]:
    """Return the parsed JSON header of a safetensors file (tensor entries and `__metadata__`).

    Headers longer than max_header_bytes, malformed or deeply nested raise SafetensorsHeaderError.
    """
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise SafetensorsHeaderError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw_len)
        if n <= 0 or n > max_header_bytes:
            raise SafetensorsHeaderError(f"{path}: implausible safetensors header length {n}")
        raw = f.read(n)
    if len(raw) != n:
        raise SafetensorsHeaderError(f"{path}: truncated safetensors header")
    try:
        header = load_json(raw, "safetensors header", max_bytes=max_header_bytes)
    except JsonLimitError as exc:
        raise SafetensorsHeaderError(f"{path}: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"{path}: safetensors header is not a JSON object")
    return header


def model_fingerprint(model_dir: Path) -> str:
    """Hash the (name, dtype, shape) list of every weight in a model folder's safetensors files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights to fingerprint")
    entries: list[tuple[str, str, list[int]]] = []
    for path in files:
        for name, info in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            entries.append((name, str(info["dtype"]), [int(d) for d in info["shape"]]))
    entries.sort()
    digest = hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode())
    return "sha256:" + digest.hexdigest()
