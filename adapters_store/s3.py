"""S3 blob store on the minio SDK (MinIO in production, SeaweedFS in tests).

The store holds the only credentials; devices get presigned URLs, and upload through presigned
POST policies that pin the key and cap the size (content-length-range), since a presigned PUT
cannot limit how much is sent. S3 errors are mapped to the store's error tree in one place
(`_map_error`): an unreachable endpoint or a 5xx is StoreUnavailable; messages never carry the
secret key.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.datatypes import PostPolicy
from minio.error import MinioException, S3Error, ServerError

from adapters_store.base import BlobStore, UploadTarget, check_expires, check_max_bytes, check_prefix
from adapters_store.blob import BlobInfo, sha256_file
from adapters_store.errors import BlobNotFound, StoreConfigError, StoreError, StoreUnavailable
from adapters_store.keys import validate_key

_CHUNK = 1 << 20
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
_AUTH = frozenset({"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"})
# The server's side failed or is overloaded: try again later.
_OUTAGE = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "ServerBusy"})


def _untrusted(exc: BaseException) -> bool:
    """True when urllib3 gave up because the endpoint's certificate did not verify."""
    reason = getattr(exc, "reason", None)  # MaxRetryError -> SSLError -> SSLCertVerificationError
    while reason is not None:
        if isinstance(reason, ssl.SSLCertVerificationError):
            return True
        reason = reason.args[0] if reason.args and isinstance(reason.args[0], BaseException) else None
    return False


def _map_error(exc: Exception, what: str, key: str | None = None) -> NoReturn:
    """Raise the store error for a minio/urllib3 failure during `what` (chained)."""
    if isinstance(exc, S3Error):
        if key is not None and exc.code in _NOT_FOUND:
            raise BlobNotFound(key) from exc
        if exc.code in _AUTH:
            raise StoreError(
                f"S3 refused {what}: {exc.code} (check the access key, secret key and bucket policy)"
            ) from exc
        if exc.code in _OUTAGE:
            raise StoreUnavailable(f"S3 failed during {what}: {exc.code}") from exc
        raise StoreError(f"S3 error during {what}: {exc.code}: {exc.message}") from exc
    if isinstance(exc, ServerError):  # a 5xx without an S3 error body
        raise StoreUnavailable(f"S3 failed during {what}: HTTP {exc.status_code}") from exc
    if _untrusted(exc):
        raise StoreError(
            f"S3 endpoint's certificate is not trusted during {what} (name its CA in the store URL: ca=/path/ca.pem)"
        ) from exc
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        raise StoreUnavailable(f"S3 endpoint unreachable during {what}: {type(exc).__name__}") from exc
    raise StoreError(f"S3 client error during {what}: {exc}") from exc


def ca_context(ca_file: Path) -> ssl.SSLContext:
    """An https client context that trusts only the CA in `ca_file` (read once), hostnames checked."""
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise StoreConfigError(f"S3 CA file {ca_file}: no such file") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise StoreConfigError(
            f"S3 CA file {ca_file}: not a usable PEM CA certificate ({type(exc).__name__})"
        ) from None


class S3BlobStore(BlobStore):
    """Blob store in one S3 bucket (created if missing, unless create is False: then a missing
    bucket is StoreUnavailable). With `secure`, https verified against the system's roots, or only
    against `ca_file` when the endpoint has a private CA."""

    def __init__(
        self,
        bucket: str,
        endpoint: str,
        access_key: str,
        secret_key: str,
        secure: bool = False,
        region: str = "us-east-1",
        create: bool = True,
        ca_file: Path | None = None,
    ) -> None:
        if not access_key or not secret_key:
            raise StoreConfigError("S3 access key and secret key are both required")
        if ca_file is not None and not secure:
            raise StoreConfigError("an S3 CA file applies to https only (set secure)")
        self.bucket = bucket
        self.endpoint = endpoint
        self.secure = secure
        self.region = region
        # Few retries and bounded timeouts: the SDK default retries a dead endpoint for minutes.
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            maxsize=8,
            ssl_context=ca_context(ca_file) if ca_file is not None else None,
        )
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,
                http_client=self._http,
            )
        except ValueError as exc:
            raise StoreConfigError(f"bad S3 endpoint {endpoint!r}: {exc}") from None
        self._ensure_bucket(create)

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, endpoint={self.endpoint!r}, secure={self.secure})"

    def _ensure_bucket(self, create: bool) -> None:
        try:
            if not self._client.bucket_exists(self.bucket):
                if not create:
                    raise StoreUnavailable(f"S3 bucket {self.bucket!r} is not there")
                self._client.make_bucket(self.bucket)
        except S3Error as exc:
            if exc.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return  # another process created it between our two calls
            # HEAD answers carry no error body, so a bad key or secret often reads "AccessDenied".
            _map_error(exc, f"opening bucket {self.bucket!r}")
        except ValueError as exc:
            raise StoreConfigError(f"bad S3 bucket name {self.bucket!r}: {exc}") from None
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"opening bucket {self.bucket!r}")

    def put_file(self, key: str, path: Path) -> BlobInfo:
        """Upload a local file to key and return its sha256/size."""
        validate_key(key)
        info = BlobInfo(sha256=sha256_file(path), size=Path(path).stat().st_size)
        try:
            self._client.fput_object(self.bucket, key, str(path), content_type="application/octet-stream")
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"put {key!r}", key)
        return info

    def _iter_chunks(self, key: str) -> Iterator[bytes]:
        try:
            response = self._client.get_object(self.bucket, key)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"get {key!r}", key)
        try:
            yield from response.stream(_CHUNK)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"reading {key!r}", key)
        finally:
            response.close()
            response.release_conn()

    def _stat(self, key: str) -> Any:
        validate_key(key)
        try:
            return self._client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _NOT_FOUND:
                return None
            _map_error(exc, f"stat {key!r}", key)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"stat {key!r}", key)

    def stat(self, key: str) -> int | None:
        """Return the object's size, or None."""
        obj = self._stat(key)
        return None if obj is None else int(obj.size)

    def last_modified(self, key: str) -> float | None:
        """Return the object's Last-Modified as unix seconds, or None."""
        obj = self._stat(key)
        if obj is None or obj.last_modified is None:
            return None
        return float(obj.last_modified.timestamp())

    def copy(self, src_key: str, dst_key: str) -> None:
        """Server-side copy of src_key to dst_key."""
        validate_key(src_key)
        validate_key(dst_key)
        try:
            self._client.copy_object(self.bucket, dst_key, CopySource(self.bucket, src_key))
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"copy {src_key!r} -> {dst_key!r}", src_key)

    def delete(self, key: str) -> None:
        """Delete key (S3 deletes are idempotent)."""
        validate_key(key)
        try:
            self._client.remove_object(self.bucket, key)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"delete {key!r}")

    def list_keys(self, prefix: str) -> list[str]:
        """Return every key starting with prefix, sorted."""
        check_prefix(prefix)
        try:
            objects = self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            return sorted(o.object_name for o in objects if o.object_name and not o.is_dir)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"list {prefix!r}")

    def presign_put(self, key: str, expires_s: int) -> str:
        """Return a SigV4 presigned PUT URL for key."""
        validate_key(key)
        expires = timedelta(seconds=check_expires(expires_s))
        try:
            return self._client.presigned_put_object(self.bucket, key, expires=expires)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"presign PUT {key!r}")

    def presign_upload(self, key: str, expires_s: int, max_bytes: int) -> UploadTarget:
        """Return a presigned POST policy for key: this key only, 1..max_bytes bytes, until expiry.

        The form goes to the bucket's path-style URL (MinIO, SeaweedFS and AWS all accept it).
        """
        validate_key(key)
        policy = PostPolicy(
            self.bucket, datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=check_expires(expires_s))
        )
        policy.add_equals_condition("key", key)
        policy.add_content_length_range_condition(1, check_max_bytes(max_bytes))
        try:
            fields = self._client.presigned_post_policy(policy)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"presign upload {key!r}")
        scheme = "https" if self.secure else "http"
        return UploadTarget(f"{scheme}://{self.endpoint}/{self.bucket}", {"key": key, **fields})

    def presign_get(self, key: str, expires_s: int) -> str:
        """Return a SigV4 presigned GET URL for key."""
        validate_key(key)
        expires = timedelta(seconds=check_expires(expires_s))
        try:
            return self._client.presigned_get_object(self.bucket, key, expires=expires)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            _map_error(exc, f"presign GET {key!r}")

    def close(self) -> None:
        """Close pooled connections."""
        self._http.clear()
