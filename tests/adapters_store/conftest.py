"""Fixtures: one SeaweedFS server per session, and a fresh store per test for each backend."""

from __future__ import annotations

import json
import secrets
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters_store import AdapterManifest, BlobStore, FileBlobStore, S3BlobStore
from tests.support.seaweed import SeaweedServer


def new_bucket() -> str:
    """Return a fresh, valid bucket name."""
    return f"t-{uuid.uuid4().hex[:20]}"


@pytest.fixture(params=["fs", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    """A fresh, empty store: a new root for fs, a new bucket for s3."""
    s: BlobStore
    if request.param == "fs":
        s = FileBlobStore(tmp_path / "store", url_secret=secrets.token_bytes(32))
    else:
        server: SeaweedServer = request.getfixturevalue("seaweed")
        s = S3BlobStore(new_bucket(), server.endpoint, server.access_key, server.secret_key)
    try:
        yield s
    finally:
        s.close()


def make_manifest(**overrides: Any) -> AdapterManifest:
    """A valid manifest; override any field."""
    fields: dict[str, Any] = {
        "adapter_name": "support-tone",
        "base_model_id": "tiny-llama",
        "base_fingerprint": "sha256:" + "ab" * 32,
        "rank": 4,
        "alpha": 8.0,
        "target_modules": ["q_proj", "v_proj"],
        "dataset_sha256": "cd" * 32,
        "metrics": {"train_loss": 1.25, "steps": 10},
        "training": {"lr": 2e-4, "epochs": 1, "seq_len": 128},
        "device_id": "dev-1",
        "job_id": "job-1",
        "attempt": 0,
        "created_at": "2026-11-29T05:00:00+00:00",
    }
    fields.update(overrides)
    return AdapterManifest(**fields)


def write_fake_adapter(adapter_dir: Path, rank: int = 4, alpha: float = 8.0) -> Path:
    """Write a peft-shaped adapter folder (safetensors + config) by hand, without torch."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    a = struct.pack("<8f", *range(8))
    b = struct.pack("<8f", *(x / 2 for x in range(8)))
    header = {
        "__metadata__": {"format": "pt"},
        "base_model.model.layers.0.q_proj.lora_A.weight": {
            "dtype": "F32",
            "shape": [rank, 2],
            "data_offsets": [0, 32],
        },
        "base_model.model.layers.0.q_proj.lora_B.weight": {
            "dtype": "F32",
            "shape": [2, rank],
            "data_offsets": [32, 64],
        },
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (adapter_dir / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + a + b)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj"]}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    return adapter_dir
