"""Runtime forms: each configured base's runtime bundle, and each verified adapter's .onnx_adapter.

What is stored where is adapters_store.runtime_bundle's layout; this module decides when to
produce it and answers devices asking for it:

- `ensure_bundles()` exports every configured base that has no bundle yet under the current
  settings (the Ray control loop calls it once at start; tests call it directly). A failed
  export leaves a `.failed.json` beside the link, so every replica can tell devices why.
- `adapter_verified(adapter)` is called once a completed job's blob is verified and registered
  (one call site, after the registering transaction): it converts the adapter for its base's
  bundle in the background. A device asking before the form exists triggers the same
  conversion, so a form missing after a restart is rebuilt on demand.
- `bundle_for(fingerprint)` and `adapter_form(adapter)` answer the device-facing RPCs with
  NotFound (no bundle for that base here), Unavailable (being made: ask again) or
  FailedPrecondition (it cannot exist, and why).

The heavy work is injected (Exporter, Converter): in this process by default, as Ray tasks
under Ray (orchestrator.ray_layer). Background work runs on one worker thread: exports and
conversions are CPU-bound and a small orchestrator host has few cores.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from adapters_store import BlobNotFound, BlobStore, model_fingerprint
from adapters_store.errors import IncompatibleForm
from adapters_store.runtime_bundle import (
    BundleRef,
    BundleSettings,
    adapter_form_key,
    adapter_form_manifest_key,
    bundle_key,
    bundle_link_key,
    pack_bundle,
)
from orchestrator.domain import AdapterRecord
from orchestrator.errors import FailedPrecondition, NotFound, Unavailable

log = logging.getLogger("pocketlora.orchestrator")

# (store, base model id, base folder, settings) -> the stored bundle's link.
Exporter = Callable[[BlobStore, str, str, BundleSettings], BundleRef]
# (store, adapter sha256, adapter blob key, bundle link) -> the form manifest (ok or refused).
Converter = Callable[[BlobStore, str, str, BundleRef], dict[str, Any]]


def _read_json(store: BlobStore, key: str, scratch: Path) -> dict[str, Any] | None:
    path = scratch / "obj.json"
    try:
        store.get_file(key, path)
    except BlobNotFound:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _put_text(store: BlobStore, key: str, text: str, scratch: Path) -> None:
    path = scratch / "put.json"
    path.write_text(text, encoding="utf-8")
    store.put_file(key, path)


def failure_key(base_fingerprint: str, settings: BundleSettings) -> str:
    """Where a failed export of this base under these settings says why."""
    return bundle_link_key(base_fingerprint, settings).removesuffix(".json") + ".failed.json"


def local_exporter(store: BlobStore, base_model_id: str, base_dir: str, settings: BundleSettings) -> BundleRef:
    """Export the base, store the bundle tar under its content address, then write its link."""
    from orchestrator.bundle_export import ExportError, export_bundle

    base = Path(base_dir)
    fingerprint = model_fingerprint(base)
    with tempfile.TemporaryDirectory(prefix="pocketlora-bundle-") as tmp:
        scratch = Path(tmp)
        try:
            manifest = export_bundle(
                base, scratch / "bundle", settings, base_model_id=base_model_id, progress=lambda m: log.info("%s", m)
            )
        except ExportError as exc:
            _put_text(store, failure_key(fingerprint, settings), json.dumps({"reason": str(exc)}), scratch)
            raise
        tar = scratch / "bundle.tar"
        sha = pack_bundle(scratch / "bundle", tar)
        shutil.rmtree(scratch / "bundle")
        info = store.put_file(bundle_key(sha), tar)
        ref = BundleRef(sha256=sha, size=info.size, key=bundle_key(sha), manifest=manifest)
        # The link is written last: a reader that finds it finds the tar too.
        _put_text(store, bundle_link_key(fingerprint, manifest.settings), ref.to_json(), scratch)
    return ref


def local_converter(store: BlobStore, adapter_sha256: str, adapter_key: str, bundle: BundleRef) -> dict[str, Any]:
    """Convert a verified adapter blob for a bundle; store the form and its manifest (or the refusal)."""
    from adapters_store.onnx_adapter import convert_adapter, form_manifest

    with tempfile.TemporaryDirectory(prefix="pocketlora-form-") as tmp:
        scratch = Path(tmp)
        blob, out = scratch / "adapter.safetensors", scratch / "adapter.onnx_adapter"
        store.get_file(adapter_key, blob)
        try:
            info = convert_adapter(blob, bundle.manifest, out)
        except IncompatibleForm as exc:
            text = form_manifest(adapter_sha256, bundle.sha256, None, refused=str(exc))
        else:
            store.put_file(adapter_form_key(adapter_sha256, bundle.sha256), out)
            text = form_manifest(adapter_sha256, bundle.sha256, info)
        # The manifest is written after the form: its presence means the form is complete.
        _put_text(store, adapter_form_manifest_key(adapter_sha256, bundle.sha256), text, scratch)
    result: dict[str, Any] = json.loads(text)
    return result


class RuntimeForms:
    """Bundles of the configured bases and the runtime forms of verified adapters."""

    def __init__(
        self,
        store: BlobStore,
        bases: dict[str, str],
        settings: BundleSettings,
        *,
        exporter: Exporter = local_exporter,
        converter: Converter = local_converter,
        exports: bool = True,
    ) -> None:
        self.store = store
        self.exports = exports  # False on Ray front ends: the control loop exports
        self.settings = settings
        self.exporter = exporter
        self.converter = converter
        self._bases = dict(bases)  # base model id -> folder
        self._fingerprints: dict[str, tuple[str, str]] | None = None  # fingerprint -> (id, folder)
        self._links: dict[str, BundleRef] = {}  # fingerprint -> link (immutable once written)
        self._settings: dict[str, BundleSettings] = {}  # folder -> settings with resolved targets
        self._lock = threading.Lock()
        self._pending: dict[str, Future[Any]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime-forms")

    def _configured(self) -> dict[str, tuple[str, str]]:
        if self._fingerprints is None:
            # Headers only: cheap, and it fails early on a folder that is not a model.
            self._fingerprints = {model_fingerprint(Path(d)): (i, d) for i, d in self._bases.items()}
        return self._fingerprints

    def _settings_for(self, base_dir: str) -> BundleSettings:
        from orchestrator.bundle_export import resolve_targets

        if base_dir not in self._settings:
            targets = resolve_targets(Path(base_dir), self.settings.targets)
            s = self.settings
            self._settings[base_dir] = BundleSettings(precision=s.precision, targets=targets, max_rank=s.max_rank)
        return self._settings[base_dir]

    def _submit(self, key: str, fn: Callable[[], Any]) -> Future[Any]:
        """Run fn in the background unless work under the same key is pending."""
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None and not pending.done():
                return pending
            future = self._pool.submit(fn)
            self._pending[key] = future
        future.add_done_callback(lambda f: _log_failure(key, f))
        return future

    def ensure_bundles(self) -> list[Future[Any]]:
        """Export every configured base that has no bundle under the current settings."""
        futures = []
        for fingerprint, (base_id, folder) in self._configured().items():
            settings = self._settings_for(folder)
            if self._link(fingerprint) is not None:
                continue

            def run(base_id: str = base_id, folder: str = folder, settings: BundleSettings = settings) -> BundleRef:
                return self.exporter(self.store, base_id, folder, settings)

            futures.append(self._submit(f"export:{fingerprint}", run))
        return futures

    def _link(self, fingerprint: str) -> BundleRef | None:
        if fingerprint in self._links:
            return self._links[fingerprint]
        configured = self._configured().get(fingerprint)
        if configured is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            data = _read_json(self.store, bundle_link_key(fingerprint, self._settings_for(configured[1])), Path(tmp))
        if data is None:
            return None
        ref = BundleRef.from_json(json.dumps(data))
        self._links[fingerprint] = ref
        return ref

    def bundle_for(self, fingerprint: str) -> BundleRef:
        """The bundle serving a base; NotFound, Unavailable or FailedPrecondition otherwise."""
        configured = self._configured().get(fingerprint)
        if configured is None:
            raise NotFound(f"no runtime bundle is exported for base {fingerprint}")
        ref = self._link(fingerprint)
        if ref is not None:
            return ref
        with tempfile.TemporaryDirectory() as tmp:
            failed = _read_json(self.store, failure_key(fingerprint, self._settings_for(configured[1])), Path(tmp))
        if failed is not None:
            raise FailedPrecondition(
                f"the runtime bundle of {configured[0]} cannot be exported: {failed.get('reason')}"
            )
        if self.exports:
            self.ensure_bundles()  # no-op while an export runs; restarts one that died
        raise Unavailable(f"the runtime bundle of {configured[0]} is being exported; ask again later")

    def adapter_verified(self, adapter: AdapterRecord) -> None:
        """Convert a newly registered adapter for its base's bundle, in the background."""
        try:
            bundle = self.bundle_for(adapter.base_fingerprint)
        except (NotFound, Unavailable, FailedPrecondition):
            return  # no bundle (yet): a device asking for the form triggers the conversion
        self._convert_soon(adapter, bundle)

    def _convert_soon(self, adapter: AdapterRecord, bundle: BundleRef) -> Future[Any]:
        def run() -> dict[str, Any]:
            return self.converter(self.store, adapter.sha256, adapter.blob_key, bundle)

        return self._submit(f"convert:{adapter.sha256}:{bundle.sha256}", run)

    def adapter_form(self, adapter: AdapterRecord) -> tuple[BundleRef, dict[str, Any]]:
        """The bundle and form manifest of an adapter's .onnx_adapter, or why there is none yet."""
        bundle = self.bundle_for(adapter.base_fingerprint)
        with tempfile.TemporaryDirectory() as tmp:
            form = _read_json(self.store, adapter_form_manifest_key(adapter.sha256, bundle.sha256), Path(tmp))
        if form is None:
            self._convert_soon(adapter, bundle)
            raise Unavailable(f"adapter {adapter.adapter_id} is being converted to its runtime form; ask again later")
        if form.get("status") != "ok":
            raise FailedPrecondition(f"adapter {adapter.adapter_id} has no runtime form: {form.get('reason')}")
        return bundle, form

    def adapter_form_url(self, adapter: AdapterRecord, ttl_s: int) -> tuple[dict[str, Any], str]:
        """The form manifest of an adapter's .onnx_adapter and a presigned URL to it."""
        bundle, form = self.adapter_form(adapter)
        return form, self.store.presign_get(adapter_form_key(adapter.sha256, bundle.sha256), ttl_s)

    def close(self, *, wait: bool = False) -> None:
        """Stop taking work; work already running finishes (waited for with wait=True)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)


def _log_failure(key: str, future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("%s failed: %s", key, future.exception())
