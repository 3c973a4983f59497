"""Device-side transfers through presigned URLs: stdlib only, no credentials, no torch.

Uploads go where an UploadTarget says: a PUT to the file store's embedded server, or a
multipart form POST to S3 carrying a presigned POST policy (which pins the key and caps the
size). Only Content-Length and Content-Type are sent with a PUT: S3 presigned URLs sign just
the host, and SeaweedFS/MinIO accept these two unsigned headers. Downloads are capped in size
whatever the server announces. Error messages show the URL without its query string: the query
holds the signature. https URLs are verified against the system's roots, or against
`ssl_context` when the store uses a private CA (hostnames are always checked).
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
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from adapters_store.blob import BlobInfo
from adapters_store.errors import IntegrityError, TransferError
from adapters_store.keys import normalize_sha256
from adapters_store.limits import MAX_BLOB_BYTES

_CHUNK = 1 << 20
_S3_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
_S3_MESSAGE = re.compile(rb"<Message>([^<]{1,200})</Message>")
_FIELD_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


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


class _FormBody:
    """A multipart/form-data body read in chunks: the fields, then the file, then the closing line."""

    def __init__(self, fields: Mapping[str, str], f: BinaryIO, size: int) -> None:
        for name, value in fields.items():
            if not _FIELD_NAME.fullmatch(name) or "\r" in value or "\n" in value:
                raise TransferError(0, f"upload form field {name[:40]!r} is malformed")
        self.boundary = "pocketlora-" + secrets.token_hex(16)
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            for name, value in fields.items()
        )
        head += (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; filename="adapter.safetensors"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._parts: list[BinaryIO | bytes] = [head, f, tail]
        self.length = len(head) + size + len(tail)

    def read(self, n: int = -1) -> bytes:
        while self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                chunk, rest = (part, b"") if n < 0 else (part[:n], part[n:])
                if rest:
                    self._parts[0] = rest
                else:
                    self._parts.pop(0)
            else:
                chunk = part.read(n)
                if not chunk:
                    self._parts.pop(0)
                    continue
            if chunk:
                return chunk
        return b""


def upload_to_url(
    url: str,
    path: Path,
    timeout_s: float = 60,
    fields: Mapping[str, str] | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Upload a file, streaming it; TransferError on any non-2xx answer.

    With `fields` (an S3 presigned POST policy) it is a multipart form POST to url, the fields
    first; without, a PUT of the raw bytes.
    """
    _check_scheme(url)
    path = Path(path)
    size = path.stat().st_size
    method = "POST" if fields else "PUT"
    with open(path, "rb") as f:
        data: BinaryIO | _FormBody = f
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        if fields:
            data = _FormBody(fields, f, size)
            headers = {
                "Content-Length": str(data.length),
                "Content-Type": f"multipart/form-data; boundary={data.boundary}",
            }
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with _opener(url, ssl_context).open(request, timeout=timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise _http_error(method, url, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise _failure(method, redact(url), exc) from None


def download_from_url(
    url: str,
    dest: Path,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    timeout_s: float = 60,
    max_bytes: int = MAX_BLOB_BYTES,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> BlobInfo:
    """GET a presigned URL into dest (atomically), checking size/sha256 when given.

    Never reads more than max_bytes (or one byte past expected_size): whoever names the URL
    cannot fill the device's storage. Past the cap: IntegrityError with reason "too_large".
    """
    _check_scheme(url)
    dest = Path(dest)
    shown = redact(url)
    want_sha = normalize_sha256(expected_sha256) if expected_sha256 is not None else None
    if expected_size is not None and expected_size > max_bytes:
        raise IntegrityError(shown, "too_large", f"announced {expected_size} bytes, the limit is {max_bytes}")
    # Stop reading one byte past what may arrive: enough to know it is wrong.
    limit = (max_bytes if expected_size is None else expected_size) + 1
    tmp = dest.with_name(f".{dest.name}.part-{secrets.token_hex(4)}")
    h = hashlib.sha256()
    size = 0
    try:
        try:
            with _opener(url, ssl_context).open(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
                announced = response.headers.get("Content-Length", "")
                if announced.isdigit() and int(announced) > max_bytes:
                    raise IntegrityError(shown, "too_large", f"{announced} bytes, the limit is {max_bytes}")
                while size < limit:
                    chunk = response.read(min(_CHUNK, limit - size))
                    if not chunk:
                        break
                    f.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
        except urllib.error.HTTPError as exc:
            raise _http_error("GET", url, exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise _failure("GET", shown, exc) from None
        if size > max_bytes:
            raise IntegrityError(shown, "too_large", f"more than {max_bytes} bytes")
        if expected_size is not None and size != expected_size:
            raise IntegrityError(shown, "size_mismatch", f"expected {expected_size} bytes")
        digest = h.hexdigest()
        if want_sha is not None and digest != want_sha:
            raise IntegrityError(shown, "sha256_mismatch", f"expected {want_sha}, got {digest}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return BlobInfo(sha256=digest, size=size)
