"""Verification and promotion of uploads, against every backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store import (
    AdapterFormatError,
    BlobStore,
    IntegrityError,
    blob_key,
    pack_adapter,
    upload_key,
    upload_to_url,
    verify_and_promote,
    verify_upload,
)
from tests.adapters_store.conftest import make_manifest, write_fake_adapter


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, str, int]:
    """A packed blob for job-1 attempt 0: (path, sha256, size)."""
    blob = tmp_path / "blob.safetensors"
    info = pack_adapter(write_fake_adapter(tmp_path / "adapter"), make_manifest(), blob)
    return blob, info.sha256, info.size


def test_verify_and_promote(store: BlobStore, packed: tuple[Path, str, int], tmp_path: Path) -> None:
    blob, sha, size = packed
    key = upload_key("job-1", 0)
    upload_to_url(store.presign_put(key, 60), blob)

    info, promoted, manifest = verify_and_promote(store, key, sha, size, work_dir=tmp_path)

    assert (info.sha256, info.size) == (sha, size)
    assert promoted == blob_key(sha)
    assert store.hash_object(promoted) == info
    assert store.stat(key) is None  # the upload key is gone
    assert manifest == make_manifest()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("pocketlora-verify")] == []


def test_promote_twice_dedups(store: BlobStore, packed: tuple[Path, str, int]) -> None:
    blob, sha, size = packed
    store.put_file(upload_key("job-1", 0), blob)
    _, first, _ = verify_and_promote(store, upload_key("job-1", 0), "sha256:" + sha, size)
    store.put_file(upload_key("job-1", 0), blob)

    _, second, _ = verify_and_promote(store, upload_key("job-1", 0), sha, size)

    assert first == second
    assert store.list_keys("") == [first]


def test_tampered_upload(store: BlobStore, packed: tuple[Path, str, int], tmp_path: Path) -> None:
    blob, sha, size = packed
    key = upload_key("job-1", 0)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    store.put_file(key, blob)
    (tmp_path / "tampered").write_bytes(bytes(data))
    store.put_file(key, tmp_path / "tampered")

    with pytest.raises(IntegrityError) as plain:
        verify_upload(store, key, sha, size)
    with pytest.raises(IntegrityError) as full:
        verify_and_promote(store, key, sha, size)

    assert plain.value.reason == full.value.reason == "sha256_mismatch"
    assert store.list_keys("blobs/") == []


def test_truncated_upload(store: BlobStore, packed: tuple[Path, str, int], tmp_path: Path) -> None:
    blob, sha, size = packed
    key = upload_key("job-1", 0)
    (tmp_path / "short").write_bytes(blob.read_bytes()[: size // 2])
    store.put_file(key, tmp_path / "short")

    with pytest.raises(IntegrityError) as plain:
        verify_upload(store, key, sha, size)
    with pytest.raises(IntegrityError) as full:
        verify_and_promote(store, key, sha, size)

    assert plain.value.reason == full.value.reason == "size_mismatch"


def test_missing_upload(store: BlobStore) -> None:
    key = upload_key("job-1", 0)

    with pytest.raises(IntegrityError) as plain:
        verify_upload(store, key, "0" * 64, 10)
    with pytest.raises(IntegrityError) as full:
        verify_and_promote(store, key, "0" * 64, 10)

    assert plain.value.reason == full.value.reason == "missing"
    assert key in str(full.value)


def test_manifest_must_match_upload_key(store: BlobStore, packed: tuple[Path, str, int]) -> None:
    blob, sha, size = packed  # manifest says job-1 attempt 0
    store.put_file(upload_key("job-2", 0), blob)

    with pytest.raises(AdapterFormatError, match="'job_id'"):
        verify_and_promote(store, upload_key("job-2", 0), sha, size)

    assert store.list_keys("blobs/") == []
