"""Verification and promotion of uploads, against every backend."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from adapters_store import (
    AdapterFormatError,
    BlobStore,
    FileBlobStore,
    IntegrityError,
    S3BlobStore,
    StoreUnavailable,
    blob_key,
    pack_adapter,
    upload_key,
    upload_to_url,
    verify_and_promote,
    verify_upload,
)
from adapters_store import verify as verify
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


def _all_blobs_are_their_content(store: BlobStore) -> None:
    """Every object under blobs/sha256/ hashes to the hex its key names."""
    for key in store.list_keys("blobs/"):
        assert store.hash_object(key).sha256 == key.rsplit("/", 1)[1], f"{key} holds other bytes"


def test_junk_put_between_verification_and_promotion_never_lands_under_the_sha(
    store: BlobStore, packed: tuple[Path, str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device's upload URL still works while the orchestrator verifies: bytes written
    through it after the read must not be what gets promoted under the verified sha."""
    blob, sha, size = packed
    key = upload_key("job-1", 0)
    target = store.presign_upload(key, 60, 10 * 2**20)  # what the device holds
    upload_to_url(target.url, blob, fields=target.fields)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * size)  # same size, other bytes
    real_promote = verify.promote_upload

    def race(*args: Any, **kwargs: Any) -> str:
        upload_to_url(target.url, junk, fields=target.fields)  # verification done, promotion next
        return real_promote(*args, **kwargs)

    monkeypatch.setattr(verify, "promote_upload", race)

    _info, promoted, _manifest = verify_and_promote(store, key, sha, size)

    assert promoted == blob_key(sha)
    assert store.hash_object(promoted).sha256 == sha
    _all_blobs_are_their_content(store)


def test_a_retry_after_promotion_finds_the_promoted_blob(store: BlobStore, packed: tuple[Path, str, int]) -> None:
    blob, sha, size = packed
    key = upload_key("job-1", 0)
    store.put_file(key, blob)
    first = verify_and_promote(store, key, sha, size)
    assert store.stat(key) is None  # the upload key is gone after promotion

    again = verify_and_promote(store, key, sha, size)

    assert again == first
    # Another job's attempt cannot claim those bytes: the manifest inside names job-1 attempt 0.
    with pytest.raises(AdapterFormatError, match="'attempt'"):
        verify_and_promote(store, upload_key("job-1", 1), sha, size)
    with pytest.raises(IntegrityError) as missing:
        verify_and_promote(store, key, "0" * 64, size)
    assert missing.value.reason == "missing"


def test_oversized_uploads_are_refused_before_any_download(
    store: BlobStore, packed: tuple[Path, str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    blob, sha, size = packed
    key = upload_key("job-1", 0)
    store.put_file(key, blob)

    def no_download(*_: Any, **__: Any) -> None:
        raise AssertionError("downloaded an upload that the stat already refused")

    monkeypatch.setattr(store, "get_file", no_download)
    with pytest.raises(IntegrityError) as announced:
        verify_and_promote(store, key, sha, size, max_bytes=size - 1)
    with pytest.raises(IntegrityError) as stored:
        verify_and_promote(store, key, sha, size - 1, max_bytes=size - 1)

    assert announced.value.reason == stored.value.reason == "too_large"
    assert store.list_keys("blobs/") == []


def test_a_store_outage_is_unavailable_not_missing(
    store: BlobStore, packed: tuple[Path, str, int], tmp_path: Path
) -> None:
    blob, sha, size = packed
    key = upload_key("job-1", 0)
    store.put_file(key, blob)
    if isinstance(store, FileBlobStore):
        parked = tmp_path / "parked"
        (store.root / "objects").rename(parked)  # the volume is unmounted
        broken: BlobStore = store
    else:
        assert isinstance(store, S3BlobStore)
        broken = S3BlobStore.__new__(S3BlobStore)
        broken.__dict__.update(store.__dict__)
        broken._client = Minio(  # the same bucket behind an endpoint nobody answers on
            f"127.0.0.1:{_closed_port()}",
            access_key="x",
            secret_key="y",
            secure=False,
            region=store.region,
            http_client=store._http,
        )

    with pytest.raises(StoreUnavailable):
        verify_and_promote(broken, key, sha, size)

    if isinstance(store, FileBlobStore):
        parked.rename(store.root / "objects")
    assert store.stat(key) == size  # nothing was decided: the upload is kept
    verify_and_promote(store, key, sha, size)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
