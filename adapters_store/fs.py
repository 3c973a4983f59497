"""Filesystem blob store with presigned URLs served by an embedded loopback HTTP server.

Used in development, single-machine deployments and tests. Presigned URLs mimic S3's: an
HMAC over (method, key, expiry and, for uploads, a byte limit) made with a secret only the
store holds, so a device can PUT or GET one key for a while without any credential. The server
refuses a PUT above the signed limit (and above max_upload_bytes) before reading its body.
Objects live under root/objects/<key>; uploads are streamed to root/tmp and renamed into place,
so readers never see a partial object. A root that disappeared (an unmounted volume) is an
outage (StoreUnavailable), not a store full of missing keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from adapters_store.base import BlobStore, UploadTarget, check_expires, check_max_bytes, check_prefix
from adapters_store.blob import BlobInfo, sha256_file
from adapters_store.errors import BlobNotFound, InvalidKey, StoreError, StoreUnavailable
from adapters_store.keys import validate_key
from adapters_store.limits import MAX_BLOB_BYTES

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = MAX_BLOB_BYTES
_CHUNK = 1 << 20
_DRAIN_LIMIT = 1 << 20  # bytes of a refused body read so a small client still sees the status


def sign(secret: bytes, method: str, key: str, expires: int, limit: str = "") -> str:
    """Return the hex HMAC-SHA256 that authorises `method` on `key` until `expires` (and, when
    given, for bodies of at most `limit` bytes)."""
    msg = f"{method}\n{key}\n{expires}" + (f"\n{limit}" if limit else "")
    return hmac.new(secret, msg.encode(), hashlib.sha256).hexdigest()


class FileBlobStore(BlobStore):
    """Blob store on a local directory; presigned URLs served on host:port (127.0.0.1 default)."""

    def __init__(
        self,
        root: Path,
        url_secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        create: bool = True,
    ) -> None:
        if len(url_secret) < 16:
            raise StoreError("url_secret must be at least 16 bytes")
        self.root = Path(root).resolve()
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        if create:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
        elif not (self._objects.is_dir() and self._tmp.is_dir()):
            # A store that was created before and is not there now is an unmounted volume: an
            # empty store made here would answer "missing" for every upload.
            raise StoreUnavailable(f"the file store under {self.root.name!r} is not there")
        self._secret = url_secret
        self._host = host
        self._port = port
        self.max_upload_bytes = max_upload_bytes
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FileBlobStore(root={str(self.root)!r}, host={self._host!r}, port={self._port})"

    # -- local paths ---------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        path = self._objects / validate_key(key)
        if not self._objects.is_dir():
            raise StoreUnavailable(f"the file store's objects directory under {self.root.name!r} is gone")
        return path

    def _tmp_path(self) -> Path:
        if not self._tmp.is_dir():
            raise StoreUnavailable(f"the file store's tmp directory under {self.root.name!r} is gone")
        return self._tmp / f"{secrets.token_hex(8)}.part"

    def _install(self, tmp: Path, key: str) -> None:
        """Atomically move a finished temp file to key's path."""
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            # S3 allows both "a/b" and "a/b/c"; a directory tree cannot.
            raise StoreError(f"key {key!r} collides with another key's path on disk") from exc

    # -- BlobStore -----------------------------------------------------------------------------

    def put_file(self, key: str, path: Path) -> BlobInfo:
        """Copy a local file to key and return its sha256/size."""
        validate_key(key)
        tmp = self._tmp_path()
        try:
            shutil.copyfile(path, tmp)
            info = BlobInfo(sha256=sha256_file(tmp), size=tmp.stat().st_size)
            self._install(tmp, key)
        finally:
            tmp.unlink(missing_ok=True)
        return info

    def _iter_chunks(self, key: str) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator below
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFound(key) from None
        with f:
            while chunk := f.read(_CHUNK):
                yield chunk

    def stat(self, key: str) -> int | None:
        """Return the object's size, or None."""
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def last_modified(self, key: str) -> float | None:
        """Return the object's mtime, or None."""
        path = self._path(key)
        return path.stat().st_mtime if path.is_file() else None

    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy src_key to dst_key through a temp file."""
        src = self._path(src_key)
        validate_key(dst_key)
        tmp = self._tmp_path()
        try:
            try:
                shutil.copyfile(src, tmp)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise BlobNotFound(src_key) from None
            self._install(tmp, dst_key)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        """Delete key if present (empty directories are left: a concurrent put may need them)."""
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)

    def list_keys(self, prefix: str) -> list[str]:
        """Return every key starting with prefix, sorted."""
        check_prefix(prefix)
        # Walk only the deepest directory the prefix names.
        start = self._objects / prefix.rpartition("/")[0] if "/" in prefix else self._objects
        keys: list[str] = []
        for dirpath, _dirs, files in os.walk(start):
            rel = Path(dirpath).relative_to(self._objects).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def presign_put(self, key: str, expires_s: int) -> str:
        """Return a URL for one PUT of key, valid expires_s seconds."""
        return self._presign("PUT", key, expires_s)

    def presign_upload(self, key: str, expires_s: int, max_bytes: int) -> UploadTarget:
        """Return a PUT URL for key whose body the server caps at max_bytes."""
        return UploadTarget(self._presign("PUT", key, expires_s, str(check_max_bytes(max_bytes))))

    def presign_get(self, key: str, expires_s: int) -> str:
        """Return a URL for GETs of key, valid expires_s seconds."""
        return self._presign("GET", key, expires_s)

    def _presign(self, method: str, key: str, expires_s: int, limit: str = "") -> str:
        validate_key(key)
        expires = int(time.time()) + check_expires(expires_s)
        sig = sign(self._secret, method, key, expires, limit)
        extra = f"&max={limit}" if limit else ""
        return f"{self.url_base}/{key}?method={method}&expires={expires}{extra}&sig={sig}"

    # -- embedded HTTP server ------------------------------------------------------------------

    @property
    def url_base(self) -> str:
        """Return http://host:port of the presigned-URL server, starting it if needed."""
        server = self.start()
        host, port = server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ThreadingHTTPServer:
        """Start the presigned-URL server (idempotent) and return it."""
        with self._lock:
            if self._server is None:
                server = _Server((self._host, self._port), _Handler)
                server.store = self
                self._thread = threading.Thread(
                    target=server.serve_forever,
                    kwargs={"poll_interval": 0.1},
                    name="pocketlora-fs-urls",
                    daemon=True,
                )
                self._thread.start()
                self._server = server
            return self._server

    def close(self) -> None:
        """Stop the presigned-URL server if it runs."""
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def authorise(self, method: str, key: str, query: str) -> int | None:
        """Return the byte limit a request's query string grants for `method` on `key` now
        (max_upload_bytes unless the URL signs a lower one), or None when it grants nothing."""
        try:
            params = parse_qs(query, strict_parsing=True, max_num_fields=8)
        except ValueError:
            return None
        values = {name: params.get(name, []) for name in ("method", "expires", "sig")}
        limits = params.get("max", [])
        if any(len(v) != 1 for v in values.values()) or len(limits) > 1:
            return None
        (granted,), (expires_s,), (sig,) = values.values()
        limit = limits[0] if limits else ""
        if granted != method or not expires_s.isdigit() or (limit and not limit.isdigit()):
            return None
        expires = int(expires_s)
        expected = sign(self._secret, method, key, expires, limit)
        # Compare first so timing does not tell an attacker how far a forgery got.
        valid = hmac.compare_digest(expected.encode(), sig.encode())
        if not valid or time.time() > expires:
            return None
        return min(int(limit), self.max_upload_bytes) if limit else self.max_upload_bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    store: FileBlobStore

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; keep the server quiet and free of request data.
        log.warning("presigned URL server: request from %s failed", client_address[0], exc_info=False)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle or stalled client must not hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:
        # The default logs the request line, query string (the signature) included.
        pass

    def _reply(self, status: int, body: bytes = b"", close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        log.debug("%s %s -> %d", self.command, urlsplit(self.path).path, status)

    def _authorised_key(self) -> tuple[str, int] | None:
        """The key a request may act on and its byte limit, or None."""
        parts = urlsplit(self.path)
        key = parts.path[1:]
        try:
            validate_key(key)  # raw path, never unquoted: '%2e%2e' stays harmless
        except InvalidKey:
            return None
        limit = self.server.store.authorise(self.command, key, parts.query)
        return None if limit is None else (key, limit)

    def do_GET(self) -> None:
        granted = self._authorised_key()
        if granted is None:
            self._reply(403, b"forbidden\n")
            return
        store = self.server.store
        try:
            f = open(store._path(granted[0]), "rb")  # noqa: SIM115 - closed below
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            self._reply(404, b"not found\n")
            return
        except StoreUnavailable:
            self._reply(503, b"store unavailable\n")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            shutil.copyfileobj(f, self.wfile, _CHUNK)

    def do_PUT(self) -> None:
        granted = self._authorised_key()
        length_s = self.headers.get("Content-Length")
        if granted is None:
            self._drain(length_s)
            self._reply(403, b"forbidden\n", close=True)
            return
        key, limit = granted
        if self.headers.get("Transfer-Encoding") or length_s is None or not length_s.isdigit():
            self._reply(411, b"Content-Length required\n", close=True)
            return
        length = int(length_s)
        store = self.server.store
        if length > limit:
            self._drain(length_s)
            self._reply(413, b"upload too large\n", close=True)
            return
        tmp = store._tmp_path()
        try:
            remaining = length
            with open(tmp, "wb") as f:
                while remaining:
                    chunk = self.rfile.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    f.write(chunk)
                    remaining -= len(chunk)
            if remaining:
                self._reply(400, b"body shorter than Content-Length\n", close=True)
                return
            store._install(tmp, key)
        except (StoreUnavailable, OSError):  # the root is gone, the disk full, or the client left
            self._reply(503, b"store unavailable\n", close=True)
            return
        except StoreError:
            self._reply(409, b"key collides with another key\n", close=True)
            return
        finally:
            tmp.unlink(missing_ok=True)
        self._reply(200)

    def _drain(self, length_s: str | None) -> None:
        """Read (a bounded part of) a refused body so the client gets our status, not a reset."""
        if length_s is None or not length_s.isdigit():
            return
        remaining = min(int(length_s), _DRAIN_LIMIT)
        while remaining:
            chunk = self.rfile.read(min(65536, remaining))
            if not chunk:
                return
            remaining -= len(chunk)

    def do_HEAD(self) -> None:
        # No URL is ever signed for these methods; refuse like S3 does (signature mismatch).
        self._reply(403, close=True)

    do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD
