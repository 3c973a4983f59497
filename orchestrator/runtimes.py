"""Runtime downloads for devices: the bundle of their base and the .onnx_adapter of their adapters.

A role of the composed Orchestrator (service.py), over RuntimeForms (runtime_forms.py), which
decides when bundles and forms are made. Each method authenticates the device in a transaction,
checks what it asks for (its own adapter; a well-formed fingerprint) and returns a presigned URL,
or says why not: NotFound (no bundles for that base here), Unavailable (being made: ask again)
or FailedPrecondition (cannot exist, and why).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters_store.runtime_bundle import BundleRef
from orchestrator import validation
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import AdapterRecord
from orchestrator.errors import NotFound
from orchestrator.identity import DeviceCall, Identity
from orchestrator.lifecycle import JobLifecycle
from orchestrator.runtime_forms import RuntimeForms


class RuntimeDownloads:
    """Device-facing use cases of runtime bundles and adapter forms."""

    def __init__(
        self,
        jobs: JobLifecycle,
        identity: Identity,
        forms: RuntimeForms | None,
        config: OrchestratorConfig,
        clock: Callable[[], float],
    ) -> None:
        self.jobs = jobs
        self.identity = identity
        self.forms = forms
        self.config = config
        self.clock = clock

    def _forms(self) -> RuntimeForms:
        if self.forms is None:
            raise NotFound("this orchestrator exports no runtime bundles (see --runtime-base)")
        return self.forms

    def adapter_form(self, call: DeviceCall, adapter_id: str) -> tuple[AdapterRecord, dict[str, Any], str, float]:
        """A short-lived URL for the .onnx_adapter form of one of the device's own adapters."""
        adapter, _, expires = self.jobs.adapter_download(call, adapter_id)  # authenticates, checks ownership
        form, url = self._forms().adapter_form_url(adapter, int(self.config.download_url_s))
        return adapter, form, url, expires

    def bundle(self, call: DeviceCall, base_fingerprint: str) -> tuple[BundleRef, str, float]:
        """A short-lived URL for the runtime bundle of a base model."""
        self.identity.authenticate(call)
        validation.sha256_hex(base_fingerprint.removeprefix("sha256:"), "base_fingerprint")
        ttl = int(self.config.download_url_s)
        forms = self._forms()
        ref = forms.bundle_for(base_fingerprint)
        return ref, forms.store.presign_get(ref.key, ttl), self.clock() + ttl

    def close(self) -> None:
        """Stop background exports and conversions from taking new work."""
        if self.forms is not None:
            self.forms.close()
