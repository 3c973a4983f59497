"""Request validation: every problem is an InvalidArgument naming the field."""

from __future__ import annotations

import re
from typing import Any

from orchestrator.errors import InvalidArgument
from protos.wire import ID_PATTERN as _ID_RE
from protos.wire import NAME_PATTERN as _NAME_RE
from protos.wire import is_name as is_name  # one grammar for both ends of the wire

_HEX64 = re.compile(r"[0-9a-f]{64}")
# C0/C1 control characters: never meaningful in a key or a name, and PostgreSQL refuses NUL in
# TEXT outright (so a NUL must be refused as a bad argument before it reaches SQL).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_PAGE = 1000
DEFAULT_PAGE = 100
MAX_LABELS = 64


def device_id(value: str, field: str = "device_id") -> str:
    """A device id: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not _ID_RE.fullmatch(value):
        raise InvalidArgument(field, f"{value[:64]!r} must be 1-128 characters of letters, digits, '.', '_', '-'")
    return value


def object_id(value: str, field: str) -> str:
    """A server-assigned id (job, adapter, campaign)."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not _ID_RE.fullmatch(value):
        raise InvalidArgument(field, f"{value[:64]!r} is not a valid id")
    return value


def optional_device_id(value: str, field: str) -> str:
    """A device id used as a filter or page token: empty means unset."""
    return device_id(value, field) if value else value


def optional_object_id(value: str, field: str) -> str:
    """A server-assigned id used as a filter or page token: empty means unset."""
    return object_id(value, field) if value else value


def text(value: str, field: str, max_len: int) -> str:
    """Operator-supplied text (names, descriptions, idempotency keys): bounded, no control characters.

    Refused rather than truncated: cutting an idempotency key would make two distinct keys equal.
    """
    if len(value) > max_len:
        raise InvalidArgument(field, f"is {len(value)} characters long, above {max_len}")
    if _CONTROL.search(value):
        raise InvalidArgument(field, "must not contain control characters")
    return value


def device_text(value: str, max_len: int) -> str:
    """Free text a device reports (error messages, gate details): kept, never refused.

    A failure report must not be lost over its wording, so control characters become U+FFFD
    and the text is cut to max_len.
    """
    return _CONTROL.sub("\ufffd", value[:max_len])


def labels(value: dict[str, str], field: str) -> dict[str, str]:
    """Device labels: at most MAX_LABELS, keys like names, values short text."""
    if len(value) > MAX_LABELS:
        raise InvalidArgument(field, f"{len(value)} labels, above {MAX_LABELS}")
    for key, item in value.items():
        if not _NAME_RE.fullmatch(key):
            raise InvalidArgument(field, f"key {key[:64]!r} must be 1-64 letters, digits, '.', '_', '-'")
        text(item, f"{field}[{key}]", 256)
    return value


def name(value: str, field: str) -> str:
    """An adapter or dataset name: 1-64 letters, digits, '.', '_' or '-'."""
    if not _NAME_RE.fullmatch(value):
        raise InvalidArgument(field, f"{value[:64]!r} must be 1-64 letters, digits, '.', '_', '-'")
    return value


def sha256_hex(value: str, field: str = "sha256") -> str:
    """Lowercase hex sha256."""
    if not _HEX64.fullmatch(value):
        raise InvalidArgument(field, "must be 64 lowercase hex characters")
    return value


def page_size(value: int, field: str = "page_size") -> int:
    """0 means the default; above MAX_PAGE is refused."""
    if value > MAX_PAGE:
        raise InvalidArgument(field, f"{value} is above the maximum {MAX_PAGE}")
    return value or DEFAULT_PAGE


def training_spec(spec: dict[str, Any], field: str = "training") -> dict[str, Any]:
    """Check a TrainingSpec (as the proto's JSON dict) and return it unchanged."""
    name = spec.get("adapter_name", "")
    if not name:
        raise InvalidArgument(f"{field}.adapter_name", "is required")
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgument(f"{field}.adapter_name", f"{name[:64]!r} must be 1-64 letters, digits, '.', '_', '-'")
    if not spec.get("base_model_id"):
        raise InvalidArgument(f"{field}.base_model_id", "is required")
    text(spec["base_model_id"], f"{field}.base_model_id", 200)
    dataset, shipped = spec.get("dataset", ""), spec.get("dataset_object", "")
    if bool(dataset) == bool(shipped):
        raise InvalidArgument(f"{field}.dataset", "set exactly one of dataset (on the device) and dataset_object")
    if dataset and (not _NAME_RE.fullmatch(dataset.removesuffix(".jsonl")) or "/" in dataset):
        raise InvalidArgument(f"{field}.dataset", f"{dataset[:64]!r} must be a plain dataset name (no paths)")
    if shipped:
        text(shipped, f"{field}.dataset_object", 1024)
        digest = sha256_hex(str(spec.get("dataset_sha256", "")).removeprefix("sha256:"), f"{field}.dataset_sha256")
        # Shipped datasets are content-addressed: a device is only ever handed a URL for one.
        if shipped != f"datasets/sha256/{digest}.jsonl":
            raise InvalidArgument(
                f"{field}.dataset_object", f"must be datasets/sha256/<dataset_sha256>.jsonl, got {shipped[:80]!r}"
            )
    lora = spec.get("lora", {})
    rank = int(lora.get("rank", 0))
    if not 0 <= rank <= 256:
        raise InvalidArgument(f"{field}.lora.rank", f"{rank} is outside 1-256")
    if float(lora.get("alpha", 0)) < 0:
        raise InvalidArgument(f"{field}.lora.alpha", "must not be negative")
    if float(lora.get("dropout", 0)) >= 1:
        raise InvalidArgument(f"{field}.lora.dropout", "must be below 1")
    for mod in lora.get("target_modules", []):
        if not _NAME_RE.fullmatch(mod):
            raise InvalidArgument(f"{field}.lora.target_modules", f"{mod[:64]!r} is not a module name")
    share = float(spec.get("eval_share", 0))
    if not 0 <= share <= 0.5:
        raise InvalidArgument(f"{field}.eval_share", f"{share} is outside 0-0.5")
    lr = float(spec.get("learning_rate", 0))
    if not 0 <= lr < 1:
        raise InvalidArgument(f"{field}.learning_rate", f"{lr} is outside [0, 1)")
    limits = {"effective_batch": 4096, "micro_batch": 4096, "epochs": 1000, "max_steps": 10**7, "max_seq_len": 65536}
    for key, limit in limits.items():
        value = int(spec.get(key, 0))
        if value > limit:
            raise InvalidArgument(f"{field}.{key}", f"{value} is above {limit}")
    return spec
