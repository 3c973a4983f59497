"""The device's adapters: bring the inference runtime to the adapter the orchestrator wants.

The orchestrator names the desired adapter in every heartbeat reply. When it differs from the
active one, the switcher downloads it in the form the runtime loads (agent.serving picks the
runtime: the .onnx_adapter for ONNX, the safetensors blob for torch) through a presigned URL,
checks its sha256 and size, asks the runtime child to load it and then activates it; the base
model stays resident, and the adapter that was active before is unloaded once requests pinned
to it finish. An adapter that cannot be used here (another base, bad bytes, a form that cannot
exist, a load failure) is refused and remembered with its reason, so it is not fetched again on
every heartbeat; one that is not ready yet (a bundle or form being made, a failed download) is
tried again on a later heartbeat.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters_store import download_from_url
from adapters_store.errors import StoreError, TransferError
from adapters_store.onnx_adapter import FORM_NAME
from agent.client import DeviceClient, Gone, Transient
from agent.inference import RuntimeHost, RuntimeHostError
from agent.serving import Outcome, Serving
from protos.pocketlora.v1 import agent_service_pb2 as pb

log = logging.getLogger("pocketlora.agent")

Emit = Callable[..., None]


class AdapterSwitcher:
    """Keeps the runtime child on the desired adapter."""

    def __init__(
        self,
        client: DeviceClient,
        work_dir: Path,
        base_model_dir: Path,
        base_fingerprint: str,
        emit: Emit,
        *,
        torch_threads: int = 0,
        runtime: str = "auto",
        listen: str = "",
    ) -> None:
        self.client = client
        self.dir = work_dir / "adapters"
        self.base_fingerprint = base_fingerprint
        self.emit = emit
        self.serving = Serving(
            client,
            runtime=runtime,
            work_dir=work_dir,
            base_model_dir=base_model_dir,
            base_fingerprint=base_fingerprint,
            threads=torch_threads,
            listen=listen,
        )
        self.active_adapter_id = ""
        self.refused: dict[str, str] = {}  # adapter id -> why this device will not run it
        self._pending = ""  # why the runtime could not start, last said

    @property
    def runtime(self) -> RuntimeHost | None:
        """The inference runtime child (None until it is first needed)."""
        return self.serving.host

    def want(self, ref: pb.AdapterRef | None) -> None:
        """Act on the desired adapter a heartbeat reply named (None: the base model)."""
        desired = ref.adapter_id if ref is not None else ""
        if desired == self.active_adapter_id or desired in self.refused:
            if self.serving.listen and self.serving.host is None:
                self._start()  # the inference API serves the base before any adapter arrives
            return
        if not self._start():
            return
        if ref is None:
            self._activate("")
        elif ref.base_fingerprint and ref.base_fingerprint != self.base_fingerprint:
            self._refuse(ref.adapter_id, "base fingerprint differs from this device's base model")
        elif self._host().has(ref.adapter_id) or self._fetch_and_load(ref):
            self._activate(ref.adapter_id, name=ref.name, version=ref.version)

    def _start(self) -> bool:
        """Start the runtime child if needed; False (said once per reason) when not possible yet."""
        was_running = self.serving.host is not None
        started = self.serving.start()
        if started.kind == "active":
            if not was_running and self.serving.host is not None:
                self.emit("runtime_started", runtime=self.serving.backend, api=self.serving.host.address)
            return True
        if started.reason != self._pending and not started.reason.startswith("waiting"):
            self.emit("runtime_pending", reason=started.reason)
            self._pending = started.reason
        return False

    def _host(self) -> RuntimeHost:
        assert self.serving.host is not None  # _start() returned True
        return self.serving.host

    def _fetch_and_load(self, ref: pb.AdapterRef) -> bool:
        """Download, verify and load; False when it did not (refused, or retried later)."""
        fetched = self._fetch(ref)
        if fetched.kind == "later":
            self.emit("adapter_pending", adapter_id=ref.adapter_id, reason=fetched.reason)  # retried
            return False
        if fetched.kind == "refused":
            self._refuse(ref.adapter_id, fetched.reason)
            return False
        try:
            self._host().load(ref.adapter_id, self.dir / ref.adapter_id)
        except RuntimeHostError as exc:
            shutil.rmtree(self.dir / ref.adapter_id, ignore_errors=True)
            self._refuse(ref.adapter_id, str(exc))
            return False
        return True

    def _fetch(self, ref: pb.AdapterRef) -> Outcome:
        """Put the adapter in the form this runtime loads under adapters/<id>/, checked."""
        onnx = self.serving.backend == "onnx"
        try:
            got = self.client.adapter_download_url(ref.adapter_id, onnx=onnx)
        except Transient as exc:
            return Outcome("later", f"{exc.code.name}: {exc.details}")
        except Gone as exc:  # the form cannot exist, or the adapter is not this device's
            return Outcome("refused", exc.details)
        folder = self.dir / ref.adapter_id
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            if onnx:
                form = got.runtime_form
                folder.mkdir(exist_ok=True)
                download_from_url(
                    got.url, folder / FORM_NAME, expected_sha256=form.sha256, expected_size=form.size_bytes
                )
                (folder / "manifest.json").write_text(form.manifest_json or "{}", encoding="utf-8")
            else:
                self._fetch_safetensors(got.url, ref, folder)
        except TransferError as exc:
            return Outcome("later", f"download failed: {exc}")
        except StoreError as exc:  # bad bytes or not an adapter: never load it
            return Outcome("refused", str(exc))
        return Outcome("active")

    def _fetch_safetensors(self, url: str, ref: pb.AdapterRef, folder: Path) -> None:
        from adapters_store import unpack_adapter

        blob = self.dir / f"{ref.adapter_id}.safetensors"
        try:
            download_from_url(url, blob, expected_sha256=ref.sha256, expected_size=ref.size_bytes)
            unpack_adapter(blob, folder)
        finally:
            blob.unlink(missing_ok=True)

    def _activate(self, adapter_id: str, **about: Any) -> None:
        self._host().activate(adapter_id or None)
        previous, self.active_adapter_id = self.active_adapter_id, adapter_id
        self.emit("adapter_active", adapter_id=adapter_id, runtime=self.serving.backend, **about)
        self._unload(previous)

    def _unload(self, adapter_id: str) -> None:
        """Free the adapter that was active before (requests pinned to it finish first)."""
        if not adapter_id:
            return
        try:
            self._host().unload(adapter_id)
        except RuntimeHostError as exc:  # already evicted by the runtime's byte cap
            log.info("unload of %s: %s", adapter_id, exc)
        shutil.rmtree(self.dir / adapter_id, ignore_errors=True)

    def _refuse(self, adapter_id: str, reason: str) -> None:
        self.refused[adapter_id] = reason
        self.emit("adapter_refused", adapter_id=adapter_id, reason=reason)

    def close(self) -> None:
        """Stop the runtime child."""
        self.serving.close()
