"""Turn a device's upload into a verified, content-addressed blob.

A device announces (sha256, size) when it reports a finished job; the orchestrator trusts the
bytes only after hashing what actually landed in the store, then copies them to
blobs/sha256/<hex> (immutable, deduplicated) and drops the upload key. Plain functions, no Ray:
the orchestrator runs `verify_and_promote` as a Ray task.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from adapters_store.base import BlobStore
from adapters_store.blob import BlobInfo, read_blob_manifest
from adapters_store.errors import AdapterFormatError, BlobNotFound, IntegrityError
from adapters_store.keys import blob_key, normalize_sha256, validate_key
from adapters_store.manifest import AdapterManifest

_UPLOAD_KEY = re.compile(r"uploads/([^/]+)/([0-9]+)/[^/]+")


def _check_size(store: BlobStore, key: str, expected_size: int) -> None:
    size = store.stat(key)
    if size is None:
        raise IntegrityError(key, "missing")
    if size != expected_size:
        raise IntegrityError(key, "size_mismatch", f"expected {expected_size} bytes, found {size}")


def _check_digest(key: str, info: BlobInfo, expected_sha256: str) -> None:
    want = normalize_sha256(expected_sha256)
    if info.sha256 != want:
        raise IntegrityError(key, "sha256_mismatch", f"expected {want}, found {info.sha256}")


def verify_upload(store: BlobStore, key: str, expected_sha256: str, expected_size: int) -> BlobInfo:
    """Hash the stored object and check it against the announced sha256/size."""
    validate_key(key)
    _check_size(store, key, expected_size)  # cheap HEAD first: no download for a wrong size
    try:
        info = store.hash_object(key)
    except BlobNotFound:
        raise IntegrityError(key, "missing") from None
    if info.size != expected_size:  # replaced between the HEAD and the read
        raise IntegrityError(key, "size_mismatch", f"expected {expected_size} bytes, read {info.size}")
    _check_digest(key, info, expected_sha256)
    return info


def promote_upload(store: BlobStore, upload_key: str, info: BlobInfo) -> str:
    """Copy a verified upload to its content-addressed key (unless present), delete the upload."""
    dst = blob_key(info.sha256)
    # Same content, same key: an existing blob of the right size is that content already.
    if store.stat(dst) != info.size:
        store.copy(upload_key, dst)
    store.delete(upload_key)
    return dst


def _check_manifest_matches_key(upload_key: str, manifest: AdapterManifest) -> None:
    """Refuse a manifest that claims a different job/attempt than the key it was uploaded to."""
    m = _UPLOAD_KEY.fullmatch(upload_key)
    if m is None:
        return
    job_id, attempt = m.group(1), int(m.group(2))
    if manifest.job_id != job_id:
        raise AdapterFormatError(f"manifest field 'job_id' is {manifest.job_id!r} but {upload_key!r} is job {job_id!r}")
    if manifest.attempt != attempt:
        raise AdapterFormatError(
            f"manifest field 'attempt' is {manifest.attempt} but {upload_key!r} is attempt {attempt}"
        )


def verify_and_promote(
    store: BlobStore,
    upload_key: str,
    expected_sha256: str,
    expected_size: int,
    work_dir: Path | None = None,
) -> tuple[BlobInfo, str, AdapterManifest]:
    """Verify an upload, read its manifest, promote it; return (info, blob key, manifest)."""
    validate_key(upload_key)
    _check_size(store, upload_key, expected_size)
    with tempfile.TemporaryDirectory(prefix="pocketlora-verify-", dir=work_dir) as tmp:
        local = Path(tmp) / "adapter.safetensors"
        try:
            info = store.get_file(upload_key, local)  # hashes while downloading
        except BlobNotFound:
            raise IntegrityError(upload_key, "missing") from None
        if info.size != expected_size:
            raise IntegrityError(upload_key, "size_mismatch", f"expected {expected_size} bytes, read {info.size}")
        _check_digest(upload_key, info, expected_sha256)
        manifest = read_blob_manifest(local)
    _check_manifest_matches_key(upload_key, manifest)
    return info, promote_upload(store, upload_key, info), manifest
