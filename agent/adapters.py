"""The device's adapters: bring the inference runtime to the adapter the orchestrator wants.

The orchestrator names the desired adapter in every heartbeat reply. When it differs from the
active one, the switcher downloads it through a presigned URL, checks its sha256 and size,
unpacks it (safetensors only), asks the runtime child to load it and then activates it; the base
model stays resident, and the adapter that was active before is unloaded once requests pinned
to it finish. An adapter that cannot be used here (another base, bad bytes, a load or activation
failure, a runtime child that will not start) is refused and remembered with its reason, so it
is not fetched again on every heartbeat; the agent reports its most recent refusals in every
heartbeat, for operators and for rollouts, which halt on them. So is an adapter whose id is not
a well-formed id: it never becomes a file name here, and the download is capped at the store's
blob limit whatever size the reply announces.
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
from agent.client import DeviceClient
from agent.jobs import id_path
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
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.client = client
        self.ssl_context = ssl_context  # for https presigned URLs (None: the system's roots)
        self.dir = work_dir / "adapters"
        self.base_model_dir = base_model_dir
        self.base_fingerprint = base_fingerprint
        self.torch_threads = torch_threads
        self.emit = emit
        self.runtime: Any = None  # agent.inference.RuntimeHost, started on first use
        self.active_adapter_id = ""
        self.refused: dict[str, str] = {}  # adapter id -> why this device will not run it

    def want(self, ref: pb.AdapterRef | None) -> None:
        """Act on the desired adapter a heartbeat reply named (None: the base model)."""
        desired = ref.adapter_id if ref is not None else ""
        if desired == self.active_adapter_id or desired in self.refused:
            return
        if desired and not is_id(desired):
            self._refuse(desired, "not a valid adapter id")
            return
        if self.runtime is None:
            from agent.inference import RuntimeHost, RuntimeHostError

            if ref is None:  # nothing was loaded: the base is what runs
                return
            try:
                self.runtime = RuntimeHost(self.base_model_dir, torch_threads=self.torch_threads)
            except (RuntimeHostError, OSError) as exc:
                self._refuse(ref.adapter_id, f"the inference runtime did not start: {exc}")
                return
        if ref is None:
            self._activate("")
        elif ref.base_fingerprint and ref.base_fingerprint != self.base_fingerprint:
            self._refuse(ref.adapter_id, "base fingerprint differs from this device's base model")
        elif self.runtime.has(ref.adapter_id) or self._fetch_and_load(ref):
            self._activate(ref.adapter_id, name=ref.name, version=ref.version)

    def _fetch_and_load(self, ref: pb.AdapterRef) -> bool:
        """Download, verify, unpack and load; False when it did not (refused, or retried later)."""
        from adapters_store import unpack_adapter
        from agent.inference import RuntimeHostError

        folder = id_path(self.dir, ref.adapter_id, "adapter id")
        got = self.client.adapter_download_url(ref.adapter_id)
        blob = folder.with_name(f"{ref.adapter_id}.safetensors")
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            download_from_url(
                got.url, blob, expected_sha256=ref.sha256, expected_size=ref.size_bytes, ssl_context=self.ssl_context
            )
            unpack_adapter(blob, folder)
        except TransferError as exc:
            self.emit("adapter_download_failed", adapter_id=ref.adapter_id, reason=str(exc))  # retried
            return False
        except StoreError as exc:  # bad bytes or not an adapter: never load it
            self._refuse(ref.adapter_id, str(exc))
            return False
        finally:
            blob.unlink(missing_ok=True)
        try:
            self.runtime.load(ref.adapter_id, folder)
        except RuntimeHostError as exc:
            self._refuse(ref.adapter_id, f"load failed: {exc}")
            return False
        return True

    def _activate(self, adapter_id: str, **about: Any) -> None:
        from agent.inference import RuntimeHostError

        try:
            self.runtime.activate(adapter_id or None)
        except RuntimeHostError as exc:
            if not adapter_id:
                raise  # the base always activates; a runtime that cannot is a bug to see
            self._refuse(adapter_id, f"activation failed: {exc}")
            return
        previous, self.active_adapter_id = self.active_adapter_id, adapter_id
        self.emit("adapter_active", adapter_id=adapter_id, **about)
        self._unload(previous)

    def _unload(self, adapter_id: str) -> None:
        """Free the adapter that was active before (requests pinned to it finish first)."""
        from agent.inference import RuntimeHostError

        if not adapter_id:
            return
        try:
            self.runtime.unload(adapter_id)
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
        if self.runtime is not None:
            self.runtime.close()
