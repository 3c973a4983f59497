"""The blob store contract every backend (filesystem, S3) implements and is tested against.

Contract:
- Keys are validated by `keys.validate_key` on every call; a bad key raises InvalidKey before
  any I/O. Prefixes given to `list_keys` are plain string prefixes ("" lists everything).
- Objects are immutable byte strings: `put_file` replaces an object whole (readers see the old
  or the new bytes, never a mix); there is no append or partial write.
- `get_file` writes to a temporary file next to `dest` and renames it into place, so `dest` is
  either absent or complete; it hashes while writing.
- Reading a missing key (`get_file`, `hash_object`, `copy` source) raises BlobNotFound;
  `stat` and `last_modified` return None instead; `delete` of a missing key is a no-op.
- Presigned URLs grant exactly one method (PUT or GET) on exactly one key until they expire;
  the holder needs no credentials, and any other use of the URL is refused with HTTP 403.
- `presign_upload` is what devices get: one key, until expiry, at most max_bytes (the store
  refuses a larger body; S3 through a POST policy's content-length-range, the file store's
  server through a signed limit).
- `get_file` and `hash_object` never read more than max_bytes when given one: IntegrityError
  "too_large" instead.
- An outage (unreachable endpoint, a 5xx, a store root that is gone) raises StoreUnavailable,
  never BlobNotFound: a caller must not take "cannot look" for "is not there".
- Backend failures surface as StoreError subclasses; messages never contain credentials or
  URL signatures.
"""

from __future__ import annotations

import abc
import hashlib
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from adapters_store.blob import BlobInfo
from adapters_store.errors import IntegrityError, StoreError
from adapters_store.keys import validate_key

_MAX_PRESIGN_S = 7 * 24 * 3600  # S3's limit for SigV4 presigned URLs


@dataclass(frozen=True)
class UploadTarget:
    """Where a device uploads one blob: a PUT of the bytes to url or, when fields are set, a
    multipart form POST to url with those fields before the file (an S3 presigned POST policy)."""

    url: str
    fields: Mapping[str, str] = field(default_factory=dict)


class BlobStore(abc.ABC):
    """A flat key -> bytes store with presigned single-key, single-method URLs."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> BlobInfo:
        """Upload a local file to key and return its sha256/size."""

    def get_file(self, key: str, dest: Path, max_bytes: int | None = None) -> BlobInfo:
        """Download key to dest (atomically) and return the sha256/size of what was written."""
        validate_key(key)
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.part-{secrets.token_hex(4)}")
        h = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in self._iter_chunks(key):
                    size += len(chunk)
                    _check_cap(key, size, max_bytes)
                    f.write(chunk)
                    h.update(chunk)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return BlobInfo(sha256=h.hexdigest(), size=size)

    def hash_object(self, key: str, max_bytes: int | None = None) -> BlobInfo:
        """Stream the stored object back and return its sha256/size; BlobNotFound if missing."""
        validate_key(key)
        h = hashlib.sha256()
        size = 0
        for chunk in self._iter_chunks(key):
            size += len(chunk)
            _check_cap(key, size, max_bytes)
            h.update(chunk)
        return BlobInfo(sha256=h.hexdigest(), size=size)

    @abc.abstractmethod
    def _iter_chunks(self, key: str) -> Iterator[bytes]:
        """Yield the object's bytes in chunks; raise BlobNotFound if it does not exist."""

    @abc.abstractmethod
    def stat(self, key: str) -> int | None:
        """Return the object's size in bytes, or None if there is none."""

    @abc.abstractmethod
    def last_modified(self, key: str) -> float | None:
        """Return the object's last-modified time (unix seconds), or None if there is none."""

    @abc.abstractmethod
    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy an object within the store; BlobNotFound if src_key is missing."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete key; deleting a missing key is not an error."""

    @abc.abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Return every key starting with prefix, sorted."""

    @abc.abstractmethod
    def presign_put(self, key: str, expires_s: int) -> str:
        """Return a URL that lets its holder PUT exactly this key for expires_s seconds."""

    @abc.abstractmethod
    def presign_upload(self, key: str, expires_s: int, max_bytes: int) -> UploadTarget:
        """Return how a device may upload 1..max_bytes bytes to exactly this key for expires_s seconds."""

    @abc.abstractmethod
    def presign_get(self, key: str, expires_s: int) -> str:
        """Return a URL that lets its holder GET exactly this key for expires_s seconds."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and servers; the store is unusable afterwards."""

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_cap(key: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise IntegrityError(key, "too_large", f"more than {max_bytes} bytes")


def check_max_bytes(max_bytes: int) -> int:
    """Return max_bytes if it is a positive int, else raise."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise StoreError(f"max_bytes must be a positive int, got {max_bytes!r}")
    return max_bytes


def check_expires(expires_s: int) -> int:
    """Return expires_s if it is a whole number of seconds in [1, 7 days], else raise."""
    if isinstance(expires_s, bool) or not isinstance(expires_s, int):
        raise StoreError(f"expires_s must be an int, got {expires_s!r}")
    if not 1 <= expires_s <= _MAX_PRESIGN_S:
        raise StoreError(f"expires_s must be between 1 and {_MAX_PRESIGN_S}, got {expires_s}")
    return expires_s


def check_prefix(prefix: str) -> str:
    """Return prefix if it could start a valid key ('' allowed), else raise InvalidKey."""
    if prefix:
        # "uploads/" and "blobs/sha256/ab" are fine prefixes; "../" and "/x" are not.
        validate_key(prefix.rstrip("/") if prefix.rstrip("/") else prefix)
    return prefix
