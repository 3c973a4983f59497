"""Open a blob store from one URL, so every component is configured the same way.

    file:///abs/path                                     FileBlobStore (presigned URLs on loopback)
    s3://bucket?endpoint=host:port[&secure=true][&region=r][&ca=/abs/ca.pem]   S3BlobStore

`secure=true` speaks https to the endpoint, verified against the system's roots, or only against
the CA certificate `ca` names (a private CA; it implies secure=true).

Credentials never go in the URL: S3 keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(or POCKETLORA_S3_ACCESS_KEY / POCKETLORA_S3_SECRET_KEY); the file store's URL-signing secret
from POCKETLORA_URL_SECRET (hex), else a random one shared by every store of this process.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from adapters_store.base import BlobStore
from adapters_store.errors import StoreConfigError

_PROCESS_SECRET = secrets.token_bytes(32)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_ENDPOINT = re.compile(r"[A-Za-z0-9.-]+:[0-9]{1,5}|[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]:[0-9]{1,5}")
_S3_PARAMS = frozenset({"endpoint", "secure", "region", "ca"})


def open_store(url: str, *, env: Mapping[str, str] | None = None, create: bool = True) -> BlobStore:
    """Return the blob store a URL names; StoreConfigError (one line) if it is unusable.

    create=False opens a store that must exist already (its root or bucket): one that is not
    there raises StoreUnavailable instead of being made empty.
    """
    env = os.environ if env is None else env
    parts = urlsplit(url)
    if parts.scheme == "file":
        return _open_file(url, parts.netloc, parts.path, parts.query, env, create)
    if parts.scheme == "s3":
        return _open_s3(parts.netloc, parts.path, parts.query, env, create)
    shown = parts.scheme or "(none)"
    raise StoreConfigError(
        f"store URL: unknown scheme {shown!r} (use file:///abs/path or s3://bucket?endpoint=host:port)"
    )


def _open_file(url: str, netloc: str, path: str, query: str, env: Mapping[str, str], create: bool) -> BlobStore:
    from adapters_store.fs import FileBlobStore

    if netloc not in ("", "localhost") or not path.startswith("/"):
        raise StoreConfigError(f"store URL {url!r}: file URLs need an absolute path (file:///abs/path)")
    if query:
        raise StoreConfigError(f"store URL {url!r}: file URLs take no query parameters")
    secret_hex = env.get("POCKETLORA_URL_SECRET")
    if secret_hex:
        try:
            secret = bytes.fromhex(secret_hex)
        except ValueError:
            raise StoreConfigError("POCKETLORA_URL_SECRET must be hex") from None
        if len(secret) < 16:
            raise StoreConfigError("POCKETLORA_URL_SECRET must be at least 16 bytes (32 hex digits)")
    else:
        secret = _PROCESS_SECRET
    return FileBlobStore(Path(path), url_secret=secret, create=create)


def _open_s3(netloc: str, path: str, query: str, env: Mapping[str, str], create: bool) -> BlobStore:
    from adapters_store.s3 import S3BlobStore

    bucket = netloc
    if not bucket:
        raise StoreConfigError("store URL: s3:// needs a bucket (s3://bucket?endpoint=host:port)")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise StoreConfigError(f"store URL: bad S3 bucket name {bucket!r}")
    if path not in ("", "/"):
        raise StoreConfigError(f"store URL: s3://{bucket} takes no path, got {path!r}")
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise StoreConfigError(f"store URL: malformed query {query!r}") from None
    unknown = sorted(set(params) - _S3_PARAMS)
    if unknown:
        raise StoreConfigError(f"store URL: unknown S3 parameter(s) {', '.join(unknown)}")
    if any(len(v) != 1 for v in params.values()):
        raise StoreConfigError("store URL: each S3 parameter may appear once")
    endpoint = params.get("endpoint", [""])[0]
    if not endpoint:
        raise StoreConfigError("store URL: s3:// needs an endpoint (?endpoint=host:port)")
    if not _ENDPOINT.fullmatch(endpoint):
        raise StoreConfigError(f"store URL: endpoint must be host:port, got {endpoint!r}")
    ca = params.get("ca", [""])[0]
    if "ca" in params and not ca.startswith("/"):
        raise StoreConfigError(f"store URL: ca must be an absolute path to a PEM CA certificate, got {ca!r}")
    secure_s = params.get("secure", ["true" if ca else "false"])[0].lower()
    if secure_s not in ("true", "false", "1", "0"):
        raise StoreConfigError(f"store URL: secure must be true or false, got {secure_s!r}")
    if ca and secure_s in ("false", "0"):
        raise StoreConfigError("store URL: ca applies to https only; drop secure=false")
    region = params.get("region", ["us-east-1"])[0]
    if not region:
        raise StoreConfigError("store URL: region must not be empty")
    access = env.get("AWS_ACCESS_KEY_ID") or env.get("POCKETLORA_S3_ACCESS_KEY")
    secret = env.get("AWS_SECRET_ACCESS_KEY") or env.get("POCKETLORA_S3_SECRET_KEY")
    missing = [name for name, value in (("AWS_ACCESS_KEY_ID", access), ("AWS_SECRET_ACCESS_KEY", secret)) if not value]
    if missing:
        raise StoreConfigError(
            f"S3 store: missing credentials {', '.join(missing)} (or POCKETLORA_S3_ACCESS_KEY / POCKETLORA_S3_SECRET_KEY)"
        )
    assert access is not None and secret is not None
    return S3BlobStore(
        bucket,
        endpoint=endpoint,
        access_key=access,
        secret_key=secret,
        secure=secure_s in ("true", "1"),
        region=region,
        create=create,
        ca_file=Path(ca) if ca else None,
    )
