"""The adapter manifest: what an adapter is, what it was trained on, and by whom.

It travels inside the blob (safetensors `__metadata__["pocketlora.manifest"]`) so an adapter and
its provenance can never be separated. Validation names the field and the bad value, as peft's
LoraConfig does, because a manifest is written on one machine and read on another.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

from adapters_store.errors import AdapterFormatError
from adapters_store.limits import MAX_MANIFEST_BYTES, JsonLimitError, load_json

FORMAT_VERSION = 1
_SHA256 = re.compile(r"(sha256:)?[0-9a-f]{64}")


def utc_now_iso() -> str:
    """Return the current time as an ISO-8601 UTC string, the form `created_at` expects."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fail(name: str, value: Any, why: str) -> AdapterFormatError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return AdapterFormatError(f"manifest field {name!r}: {why}, got {shown}")


@dataclass(kw_only=True)
class AdapterManifest:
    """Provenance of one trained LoRA adapter; round-trips through JSON (keyword-only fields)."""

    format_version: int = FORMAT_VERSION
    adapter_name: str
    base_model_id: str
    base_fingerprint: str
    rank: int
    alpha: float
    target_modules: list[str]
    dataset_sha256: str
    metrics: dict[str, Any]
    training: dict[str, Any]  # the training spec, as JSON
    device_id: str
    job_id: str
    attempt: int
    created_at: str  # ISO-8601, UTC

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise _fail("format_version", self.format_version, f"supported: {FORMAT_VERSION}")
        for name in ("adapter_name", "base_model_id", "device_id", "job_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise _fail(name, value, "must be a non-empty string")
        for name in ("base_fingerprint", "dataset_sha256"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _SHA256.fullmatch(value):
                raise _fail(name, value, "must be 64 lowercase hex digits, optionally 'sha256:'-prefixed")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise _fail("rank", self.rank, "must be an int > 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise _fail("alpha", self.alpha, "must be a number")
        try:
            self.alpha = float(self.alpha)  # an int too large for a float overflows here
        except OverflowError:
            raise _fail("alpha", self.alpha, "must be finite and > 0") from None
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise _fail("alpha", self.alpha, "must be finite and > 0")
        if (
            not isinstance(self.target_modules, list)
            or not self.target_modules
            or not all(isinstance(m, str) and m for m in self.target_modules)
        ):
            raise _fail("target_modules", self.target_modules, "must be a non-empty list of names")
        if isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 0:
            raise _fail("attempt", self.attempt, "must be an int >= 0")
        for name in ("metrics", "training"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise _fail(name, value, "must be a JSON object with string keys")
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise _fail(name, value, f"must be JSON-serialisable ({exc})") from None
        self._check_created_at()

    def _check_created_at(self) -> None:
        value = self.created_at
        if not isinstance(value, str):
            raise _fail("created_at", value, "must be an ISO-8601 UTC string")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise _fail("created_at", value, "must be an ISO-8601 UTC string") from None
        offset = parsed.utcoffset()
        if offset is None or offset.total_seconds() != 0:
            raise _fail("created_at", value, "must carry a UTC offset ('Z' or '+00:00')")

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterManifest:
        """Build a manifest from a dict, refusing unknown format versions and fields."""
        if not isinstance(d, dict):
            raise AdapterFormatError(f"manifest must be a JSON object, got {type(d).__name__}")
        version = d.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise _fail("format_version", version, f"unknown format version (supported: {FORMAT_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterFormatError(f"manifest has unknown fields: {', '.join(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.name in _REQUIRED)
        if missing:
            raise AdapterFormatError(f"manifest is missing fields: {', '.join(missing)}")
        return cls(**d)

    def to_json(self) -> str:
        """Return the manifest as compact, key-sorted JSON."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, s: str | bytes) -> AdapterManifest:
        """Parse a manifest from JSON text (bounded in size and depth: it comes from a device)."""
        try:
            d = load_json(s, "manifest", max_bytes=MAX_MANIFEST_BYTES)
        except JsonLimitError as exc:
            raise AdapterFormatError(str(exc)) from None
        return cls.from_dict(d)


_REQUIRED = frozenset(f.name for f in fields(AdapterManifest) if f.name != "format_version")
