"""Blob key layout: uploads land under a per-attempt key, verified blobs are content-addressed.

    uploads/<job_id>/<attempt>/adapter.safetensors   written by one device through a presigned PUT
    blobs/sha256/<hex>                               immutable, written only by the orchestrator

Keys are validated before every store call: a presigned URL is scoped to one key, so a key that
could be read two ways ('..', '//', '/x') would let a URL reach further than it was issued for.
"""

from __future__ import annotations

import re

from adapters_store.errors import InvalidKey

UPLOADS_PREFIX = "uploads/"
BLOBS_PREFIX = "blobs/sha256/"

_KEY_CHARS = re.compile(r"[A-Za-z0-9._/-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_KEY_LEN = 1024


def validate_key(key: str) -> str:
    """Return key unchanged if it is a well-formed store key, else raise InvalidKey."""
    if not isinstance(key, str) or not key:
        raise InvalidKey(str(key), "empty key")
    if len(key) > _MAX_KEY_LEN:
        raise InvalidKey(key[:64] + "...", f"longer than {_MAX_KEY_LEN} characters")
    if key.startswith("/"):
        raise InvalidKey(key, "leading '/'")
    if not _KEY_CHARS.fullmatch(key):
        raise InvalidKey(key, "allowed characters are A-Z a-z 0-9 . _ / -")
    for segment in key.split("/"):
        if segment == "":
            raise InvalidKey(key, "empty path segment")
        if segment in (".", ".."):
            raise InvalidKey(key, f"'{segment}' segment")
    return key


def _check_segment(name: str, value: str) -> None:
    if not value or "/" in value or value in (".", "..") or not _KEY_CHARS.fullmatch(value):
        raise InvalidKey(str(value), f"{name} must be one segment of [A-Za-z0-9._-]")


def upload_key(job_id: str, attempt: int) -> str:
    """Return the key a device uploads attempt `attempt` of job `job_id` to."""
    _check_segment("job_id", job_id)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise InvalidKey(f"uploads/{job_id}/{attempt}", f"attempt must be an int >= 0, got {attempt!r}")
    return validate_key(f"{UPLOADS_PREFIX}{job_id}/{attempt}/adapter.safetensors")


def normalize_sha256(sha256_hex: str) -> str:
    """Return the lowercase 64-hex digest, accepting an optional 'sha256:' prefix."""
    digest = sha256_hex.removeprefix("sha256:").lower()
    if not _HEX64.fullmatch(digest):
        raise InvalidKey(sha256_hex, "sha256 must be 64 hex digits, optionally 'sha256:'-prefixed")
    return digest


DATASETS_PREFIX = "datasets/sha256/"


def dataset_key(sha256_hex: str) -> str:
    """Return the content-addressed key of an operator-shipped dataset ('sha256:' accepted)."""
    return f"{DATASETS_PREFIX}{normalize_sha256(sha256_hex)}.jsonl"


def blob_key(sha256_hex: str) -> str:
    """Return the content-addressed key of a verified blob ('sha256:' prefix accepted)."""
    return f"{BLOBS_PREFIX}{normalize_sha256(sha256_hex)}"
