"""Device-side transfers through presigned URLs: stdlib only, no credentials, no torch.

Works against both the file store's embedded server and S3 presigned URLs. Only
Content-Length and Content-Type are sent with a PUT: S3 presigned URLs sign just the host, and
SeaweedFS/MinIO accept these two unsigned headers (other x-amz-* headers would need signing).
Error messages show the URL without its query string: the query holds the signature.
https URLs are verified against the system's roots, or against `ssl_context` when the store
uses a private CA (hostnames are always checked).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from adapters_store.blob import BlobInfo
from adapters_store.errors import IntegrityError, TransferError
from adapters_store.keys import normalize_sha256

_CHUNK = 1 << 20
_S3_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
_S3_MESSAGE = re.compile(rb"<Message>([^<]{1,200})</Message>")


def redact(url: str) -> str:
    """Return url without its query string and fragment (where presigned signatures live)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _opener(url: str, ssl_context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    handlers: list[urllib.request.BaseHandler] = []
    if ssl_context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
    # Loopback traffic must never be sent to an HTTP(S)_PROXY from the environment.
    if loopback:
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def _failure(method: str, shown: str, exc: urllib.error.URLError | OSError) -> TransferError:
    """One line for a transfer that never got an answer; a certificate problem says so."""
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return TransferError(
            0, f"{method} {shown} failed: the server's certificate is not trusted ({reason.verify_message})"
        )
    return TransferError(0, f"{method} {shown} failed: {type(reason).__name__}")


def _check_scheme(url: str) -> None:
    if urlsplit(url).scheme not in ("http", "https"):
        raise TransferError(0, f"not an http(s) URL: {redact(url)}")


def _http_error(method: str, url: str, exc: urllib.error.HTTPError) -> TransferError:
    try:
        body = exc.read(4096)
    except OSError:
        body = b""
    detail = exc.reason if isinstance(exc.reason, str) else ""
    code, message = _S3_CODE.search(body), _S3_MESSAGE.search(body)
    if code:
        # Only Code and Message: S3 error bodies may echo the string-to-sign.
        detail = code.group(1).decode()
        if message:
            detail += ": " + message.group(1).decode(errors="replace")
    return TransferError(exc.code, f"{method} {redact(url)} refused: {detail}")


def upload_to_url(url: str, path: Path, timeout_s: float = 60, *, ssl_context: ssl.SSLContext | None = None) -> None:
    """PUT a file to a presigned URL, streaming it; TransferError on any non-2xx answer."""
    _check_scheme(url)
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        request = urllib.request.Request(
            url,
            data=f,
            method="PUT",
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        try:
            with _opener(url, ssl_context).open(request, timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise _http_error("PUT", url, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise _failure("PUT", redact(url), exc) from None


def download_from_url(
    url: str,
    dest: Path,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    timeout_s: float = 60,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> BlobInfo:
    """GET a presigned URL into dest (atomically), checking size/sha256 when given."""
    _check_scheme(url)
    dest = Path(dest)
    want_sha = normalize_sha256(expected_sha256) if expected_sha256 is not None else None
    tmp = dest.with_name(f".{dest.name}.part-{secrets.token_hex(4)}")
    h = hashlib.sha256()
    size = 0
    # Stop reading one byte past the expected size: enough to know it is wrong.
    limit = None if expected_size is None else expected_size + 1
    shown = redact(url)
    try:
        try:
            with _opener(url, ssl_context).open(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
                while limit is None or size < limit:
                    want = _CHUNK if limit is None else min(_CHUNK, limit - size)
                    chunk = response.read(want)
                    if not chunk:
                        break
                    f.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
        except urllib.error.HTTPError as exc:
            raise _http_error("GET", url, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise _failure("GET", shown, exc) from None
        if expected_size is not None and size != expected_size:
            raise IntegrityError(shown, "size_mismatch", f"expected {expected_size} bytes")
        digest = h.hexdigest()
        if want_sha is not None and digest != want_sha:
            raise IntegrityError(shown, "sha256_mismatch", f"expected {want_sha}, got {digest}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return BlobInfo(sha256=digest, size=size)
