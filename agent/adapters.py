"""The device's adapters: bring the inference runtime to the adapter the orchestrator wants.

The orchestrator names the desired adapter in every heartbeat reply. When it differs from the
active one, the switcher downloads it in the form the runtime loads (agent.serving picks the
runtime: the .onnx_adapter for ONNX, the safetensors blob for torch) through a presigned URL,
checks its sha256 and size, asks the runtime child to load it and then activates it; the base
model stays resident, and the adapter that was active before is unloaded once requests pinned
to it finish. An adapter that cannot be used here (another base, bad bytes, a form that cannot
exist, a load or activation failure, a runtime child that will not start) is refused and
remembered with its reason, so it is not fetched again on every heartbeat; the agent reports its
most recent refusals in every heartbeat, for operators and for rollouts, which halt on them. So
is an adapter whose id is not a well-formed id: it never becomes a file name here, and the
download is capped at the store's blob limit whatever size the reply announces. One that is not
ready yet (a bundle or form being made, a failed download) is tried again on a later heartbeat.
"""

from __future__ import annotations

import logging
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters_store import download_from_url
from adapters_store.errors import StoreError, TransferError
from adapters_store.onnx_adapter import FORM_NAME
from agent.client import DeviceClient, Gone, Transient
from agent.inference import RuntimeHost, RuntimeHostError
from agent.jobs import id_path
from agent.serving import Outcome, Serving
from protos.pocketlora.v1 import agent_service_pb2 as pb
from protos.wire import is_id

log = logging.getLogger("pocketlora.agent")

Emit = Callable[..., None]
# Refusals kept (and reported in heartbeats): the most recent ones.
REFUSALS_KEPT = 16


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
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.client = client
        self.ssl_context = ssl_context  # for https presigned URLs (None: the system's roots)
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
            ssl_context=ssl_context,
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
        if desired and not is_id(desired):
            self._refuse(desired, "not a valid adapter id")
            return
        started = self._start()
        if started.kind == "refused" and ref is not None:  # the runtime cannot run it here
            self._refuse(ref.adapter_id, started.reason)
        if started.kind != "active":
            return
        if ref is None:
            self._activate("")
        elif ref.base_fingerprint and ref.base_fingerprint != self.base_fingerprint:
            self._refuse(ref.adapter_id, "base fingerprint differs from this device's base model")
        elif self._host().has(ref.adapter_id) or self._fetch_and_load(ref):
            self._activate(ref.adapter_id, name=ref.name, version=ref.version)

    def _start(self) -> Outcome:
        """Start the runtime child if needed; says why not (once per reason) when it did not."""
        was_running = self.serving.host is not None
        started = self.serving.start()
        if started.kind == "active":
            if not was_running and self.serving.host is not None:
                self.emit("runtime_started", runtime=self.serving.backend, api=self.serving.host.address)
        elif started.reason != self._pending and not started.reason.startswith("waiting"):
            self.emit("runtime_pending", reason=started.reason)
            self._pending = started.reason
        return started

    def _host(self) -> RuntimeHost:
        assert self.serving.host is not None  # _start() returned active
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
        folder = id_path(self.dir, ref.adapter_id, "adapter id")
        try:
            self._host().load(ref.adapter_id, folder)
        except RuntimeHostError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            self._refuse(ref.adapter_id, f"load failed: {exc}")
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
        folder = id_path(self.dir, ref.adapter_id, "adapter id")
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            if onnx:
                form = got.runtime_form
                folder.mkdir(exist_ok=True)
                download_from_url(
                    got.url,
                    folder / FORM_NAME,
                    expected_sha256=form.sha256,
                    expected_size=form.size_bytes,
                    ssl_context=self.ssl_context,
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

        blob = folder.with_name(f"{ref.adapter_id}.safetensors")
        try:
            download_from_url(
                url, blob, expected_sha256=ref.sha256, expected_size=ref.size_bytes, ssl_context=self.ssl_context
            )
            unpack_adapter(blob, folder)
        finally:
            blob.unlink(missing_ok=True)

    def _activate(self, adapter_id: str, **about: Any) -> None:
        try:
            self._host().activate(adapter_id or None)
        except RuntimeHostError as exc:
            if not adapter_id:
                raise  # the base always activates; a runtime that cannot is a bug to see
            self._refuse(adapter_id, f"activation failed: {exc}")
            return
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
        shutil.rmtree(id_path(self.dir, adapter_id, "adapter id"), ignore_errors=True)

    def _refuse(self, adapter_id: str, reason: str) -> None:
        self.refused[adapter_id] = reason[:300]
        while len(self.refused) > REFUSALS_KEPT:
            del self.refused[next(iter(self.refused))]
        self.emit("adapter_refused", adapter_id=adapter_id, reason=reason)

    def close(self) -> None:
        """Stop the runtime child."""
        self.serving.close()
