"""Manifest validation and key layout."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters_store import AdapterFormatError, AdapterManifest, InvalidKey
from adapters_store.keys import blob_key, upload_key, validate_key
from adapters_store.manifest import utc_now_iso
from tests.adapters_store.conftest import make_manifest


def test_manifest_json_round_trip() -> None:
    manifest = make_manifest(alpha=16)

    assert AdapterManifest.from_json(manifest.to_json()) == manifest
    assert AdapterManifest.from_dict(manifest.to_dict()) == manifest
    assert manifest.alpha == 16.0 and manifest.format_version == 1
    assert make_manifest(created_at=utc_now_iso()).created_at.endswith("+00:00")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("adapter_name", ""),
        ("base_model_id", 3),
        ("base_fingerprint", "sha256:xyz"),
        ("dataset_sha256", "AB" * 32),
        ("rank", 0),
        ("rank", True),
        ("alpha", float("nan")),
        ("alpha", -1.0),
        ("target_modules", []),
        ("target_modules", "q_proj"),
        ("metrics", {"loss": object()}),
        ("training", ["not", "a", "dict"]),
        ("device_id", " "),
        ("attempt", -1),
        ("created_at", "yesterday"),
        ("created_at", "2026-11-29T05:00:00"),  # naive: not UTC
        ("created_at", "2026-11-29T05:00:00+02:00"),
    ],
)
def test_manifest_validation_names_field(field: str, value: Any) -> None:
    with pytest.raises(AdapterFormatError, match=f"manifest field '{field}'"):
        make_manifest(**{field: value})


def test_unknown_format_version_refused() -> None:
    d = make_manifest().to_dict()
    d["format_version"] = 2

    with pytest.raises(AdapterFormatError, match=r"'format_version'.*unknown format version"):
        AdapterManifest.from_dict(d)


def test_from_dict_unknown_and_missing_fields() -> None:
    d = make_manifest().to_dict()

    with pytest.raises(AdapterFormatError, match="unknown fields: surprise"):
        AdapterManifest.from_dict({**d, "surprise": 1})
    del d["job_id"]
    with pytest.raises(AdapterFormatError, match="missing fields: job_id"):
        AdapterManifest.from_dict(d)
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        AdapterManifest.from_json("{nope")


def test_key_layout() -> None:
    digest = "0123456789abcdef" * 4

    assert upload_key("job-1", 3) == "uploads/job-1/3/adapter.safetensors"
    assert blob_key(digest) == blob_key("sha256:" + digest) == f"blobs/sha256/{digest}"
    with pytest.raises(InvalidKey):
        blob_key("sha256:1234")
    with pytest.raises(InvalidKey):
        upload_key("../etc", 0)
    with pytest.raises(InvalidKey):
        upload_key("job", -1)


@given(st.lists(st.sampled_from(["a", "b.c", "..", ".", "", "x-y_z"]), min_size=1, max_size=5))
def test_validate_key_refuses_dot_and_empty_segments(segments: list[str]) -> None:
    key = "/".join(segments)
    if any(s in ("", ".", "..") for s in segments):
        with pytest.raises(InvalidKey):
            validate_key(key)
    else:
        assert validate_key(key) == key
