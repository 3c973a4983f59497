"""Garbage collection: drop blobs nothing references and uploads nobody finished.

The caller (the orchestrator) supplies the set of referenced blob keys from its job store. Fresh
uploads get a grace period because a device may still be writing or about to report them.
A blob promoted after the caller took its snapshot of references is not yet referenced either:
pass `blob_grace_s` to spare blobs younger than the snapshot can be stale.
"""

from __future__ import annotations

import time

from adapters_store.base import BlobStore
from adapters_store.keys import BLOBS_PREFIX, UPLOADS_PREFIX


def collect_garbage(
    store: BlobStore,
    referenced_keys: set[str],
    *,
    dry_run: bool = True,
    upload_grace_s: float = 3600,
    now: float | None = None,
    blob_grace_s: float = 0.0,
) -> list[str]:
    """Return (and unless dry_run, delete) unreferenced blobs and uploads older than the grace."""
    now = time.time() if now is None else now
    candidates: list[str] = []
    for key in store.list_keys("blobs/"):
        if key in referenced_keys or not key.startswith(BLOBS_PREFIX):
            # Only content-addressed blobs are ours to judge; anything else under blobs/ stays.
            continue
        if blob_grace_s > 0 and _younger_than(store, key, now, blob_grace_s):
            continue
        candidates.append(key)
    for key in store.list_keys(UPLOADS_PREFIX):
        if key in referenced_keys or _younger_than(store, key, now, upload_grace_s):
            continue
        candidates.append(key)
    if not dry_run:
        for key in candidates:
            store.delete(key)
    return candidates


def _younger_than(store: BlobStore, key: str, now: float, grace_s: float) -> bool:
    modified = store.last_modified(key)
    # None: deleted since listing; keeping it in the "young" set skips it safely.
    return modified is None or now - modified < grace_s
