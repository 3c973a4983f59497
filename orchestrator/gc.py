"""Garbage collection of adapter blobs: what no adapter version references, and superseded
versions past a retention count (never one a device wants, runs, or could roll back to).

Blobs are content-addressed, so two versions can share one blob; a blob goes only when no kept
version references it. Uploads of failed or abandoned attempts go after a grace period.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from adapters_store import BlobStore, collect_garbage
from orchestrator.domain import AdapterRecord
from orchestrator.state.base import StateStore

# A blob promoted after the referenced set was read, but before its adapter row committed, must
# not be taken for garbage: only blobs older than this are candidates.
BLOB_GRACE_S = 600.0


@dataclass
class GcReport:
    """What a collection removed (or, in a dry run, would remove)."""

    dry_run: bool
    pruned_adapters: list[str] = field(default_factory=list)
    deleted_keys: list[str] = field(default_factory=list)


def _pinned(state: StateStore) -> set[str]:
    """Adapter ids a device wants, runs, or keeps in its rollback history."""
    pinned: set[str] = set()
    for d in state.iter_all_devices():
        pinned.update({d.desired_adapter_id, d.active_adapter_id, *d.adapter_history})
    return pinned - {""}


def prunable_versions(state: StateStore, keep_versions: int) -> list[AdapterRecord]:
    """Versions beyond the newest `keep_versions` of each (device, name), unless pinned."""
    if keep_versions <= 0:
        return []
    groups: dict[tuple[str, str], list[AdapterRecord]] = defaultdict(list)
    for a in state.iter_all_adapters():
        groups[(a.device_id, a.name)].append(a)
    pinned = _pinned(state)
    out = []
    for versions in groups.values():
        versions.sort(key=lambda a: -a.version)
        out += [a for a in versions[keep_versions:] if a.adapter_id not in pinned]
    return out


def run_gc(
    state: StateStore,
    store: BlobStore,
    *,
    keep_versions: int = 0,
    dry_run: bool = True,
    upload_grace_s: float = 3600.0,
    blob_grace_s: float = BLOB_GRACE_S,
) -> GcReport:
    """Prune superseded versions past the retention count, then delete unreferenced blobs."""
    report = GcReport(dry_run=dry_run)
    prunable = prunable_versions(state, keep_versions)
    report.pruned_adapters = [a.adapter_id for a in prunable]
    with state.transaction() as tx:
        referenced = tx.referenced_blob_keys()
        if not dry_run:
            for a in prunable:
                tx.delete_adapter(a.adapter_id)
            referenced = tx.referenced_blob_keys()
    if dry_run:
        # What the rows would reference once the prunable versions were gone.
        gone = {a.adapter_id for a in prunable}
        referenced = {a.blob_key for a in state.iter_all_adapters() if a.adapter_id not in gone}
    report.deleted_keys = collect_garbage(
        store, referenced, dry_run=dry_run, upload_grace_s=upload_grace_s, blob_grace_s=blob_grace_s
    )
    return report
