"""Turn a device's upload into a verified, content-addressed blob.

A device announces (sha256, size) when it reports a finished job. The orchestrator reads the
upload once into a private temporary file (a stat first: a wrong or oversized size costs no
download; a hard cap while reading), hashes and parses THAT file, and promotes THAT file to
blobs/sha256/<hex> (immutable, deduplicated, written only by the orchestrator). The device's
upload URL may still work while this runs, but nothing it writes after the read can reach the
content address: the promoted bytes are the verified bytes.

Retries are safe: when the upload key is gone because an earlier call promoted it (and then
failed to record it, or its reply was lost), the promoted blob is read back and checked the same
way, including that its manifest names this very job and attempt.

Plain functions, no Ray: the orchestrator runs `verify_and_promote` as a Ray task.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from adapters_store.base import BlobStore
from adapters_store.blob import BlobInfo, read_blob_manifest
from adapters_store.errors import AdapterFormatError, BlobNotFound, IntegrityError
from adapters_store.keys import blob_key, normalize_sha256, validate_key
from adapters_store.limits import MAX_BLOB_BYTES
from adapters_store.manifest import AdapterManifest

_UPLOAD_KEY = re.compile(r"uploads/([^/]+)/([0-9]+)/[^/]+")


def _check_size(store: BlobStore, key: str, expected_size: int, max_bytes: int) -> None:
    """Stat the object: a missing, oversized or wrongly sized object needs no download."""
    size = store.stat(key)
    if size is None:
        raise IntegrityError(key, "missing")
    if size > max_bytes:
        raise IntegrityError(key, "too_large", f"{size} bytes, the limit is {max_bytes}")
    if size != expected_size:
        raise IntegrityError(key, "size_mismatch", f"expected {expected_size} bytes, found {size}")


def _check_digest(key: str, info: BlobInfo, expected_sha256: str, expected_size: int) -> None:
    if info.size != expected_size:  # replaced between the stat and the read
        raise IntegrityError(key, "size_mismatch", f"expected {expected_size} bytes, read {info.size}")
    want = normalize_sha256(expected_sha256)
    if info.sha256 != want:
        raise IntegrityError(key, "sha256_mismatch", f"expected {want}, found {info.sha256}")


def _check_announced(key: str, expected_size: int, max_bytes: int) -> None:
    if expected_size > max_bytes:
        raise IntegrityError(key, "too_large", f"announced {expected_size} bytes, the limit is {max_bytes}")


def verify_upload(
    store: BlobStore, key: str, expected_sha256: str, expected_size: int, max_bytes: int = MAX_BLOB_BYTES
) -> BlobInfo:
    """Hash the stored object and check it against the announced sha256/size."""
    validate_key(key)
    _check_announced(key, expected_size, max_bytes)
    _check_size(store, key, expected_size, max_bytes)
    try:
        info = store.hash_object(key, max_bytes=expected_size)
    except BlobNotFound:
        raise IntegrityError(key, "missing") from None
    except IntegrityError:  # grew past the announced size since the stat
        raise IntegrityError(key, "size_mismatch", f"expected {expected_size} bytes, read more") from None
    _check_digest(key, info, expected_sha256, expected_size)
    return info


def _fetch_verified(store: BlobStore, key: str, dest: Path, expected_sha256: str, expected_size: int) -> BlobInfo:
    """Read key once into dest (at most expected_size + 1 bytes) and check what was read."""
    try:
        info = store.get_file(key, dest, max_bytes=expected_size)
    except BlobNotFound:
        raise IntegrityError(key, "missing") from None
    except IntegrityError:
        raise IntegrityError(key, "size_mismatch", f"expected {expected_size} bytes, read more") from None
    _check_digest(key, info, expected_sha256, expected_size)
    return info


def promote_upload(store: BlobStore, upload_key: str, local: Path, info: BlobInfo) -> str:
    """Put the verified local copy at its content address (unless there), then drop the upload."""
    dst = blob_key(info.sha256)
    # Only the orchestrator writes blobs/, always after verifying: a blob of the right size
    # there is these bytes already.
    if store.stat(dst) != info.size:
        store.put_file(dst, local)
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


def _read_manifest(local: Path, upload_key: str) -> AdapterManifest:
    manifest = read_blob_manifest(local)
    _check_manifest_matches_key(upload_key, manifest)
    return manifest


def verify_and_promote(
    store: BlobStore,
    upload_key: str,
    expected_sha256: str,
    expected_size: int,
    work_dir: Path | None = None,
    max_bytes: int = MAX_BLOB_BYTES,
) -> tuple[BlobInfo, str, AdapterManifest]:
    """Verify an upload, read its manifest, promote it; return (info, blob key, manifest).

    IntegrityError or AdapterFormatError: the bytes are not the announced, well-formed adapter
    of this job and attempt (a verdict). StoreUnavailable: the store could not be read or
    written (no verdict; the upload is kept and the same call can be retried).
    """
    validate_key(upload_key)
    _check_announced(upload_key, expected_size, max_bytes)
    with tempfile.TemporaryDirectory(prefix="pocketlora-verify-", dir=work_dir) as tmp:
        local = Path(tmp) / "adapter.safetensors"
        try:
            _check_size(store, upload_key, expected_size, max_bytes)
        except IntegrityError as exc:
            if exc.reason != "missing":
                raise
            return _already_promoted(store, upload_key, expected_sha256, expected_size, local, exc)
        info = _fetch_verified(store, upload_key, local, expected_sha256, expected_size)
        manifest = _read_manifest(local, upload_key)
        return info, promote_upload(store, upload_key, local, info), manifest


def _already_promoted(
    store: BlobStore, upload_key: str, sha256: str, size: int, local: Path, missing: IntegrityError
) -> tuple[BlobInfo, str, AdapterManifest]:
    """A retry after promotion: the content-addressed blob stands in for the upload it replaced."""
    dst = blob_key(sha256)
    if store.stat(dst) != size:
        raise missing
    info = _fetch_verified(store, dst, local, sha256, size)
    return info, dst, _read_manifest(local, upload_key)
