"""The agent's inference runtime: which one, its model files, and its child process.

`--runtime onnx` runs onnxruntime-genai on the runtime bundle the orchestrator exported for this
device's base (downloaded once through a presigned URL, checked against its sha256, unpacked
under WORK_DIR/runtimes/onnx/<sha256>/; one copy per base), and loads adapters in their
.onnx_adapter form. `--runtime torch` runs transformers + peft on the base folder and loads the
safetensors blobs. `auto` picks onnx when onnxruntime-genai is installed and the orchestrator
has a bundle for this base, else torch.

Either way the runtime lives in a child process (agent.inference.RuntimeHost) that also serves
DeviceInferenceService to apps when an address is configured; agent.adapters keeps it on the
desired adapter. The child loads its model while the agent's loop goes on (a thread waits for
it), so heartbeats and a stop are never held up by a slow load. Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from adapters_store import download_from_url
from adapters_store.errors import StoreError, TransferError
from adapters_store.runtime_bundle import unpack_bundle
from agent.client import CallError, DeviceClient
from agent.inference import RuntimeHost, RuntimeHostError
from protos import wire
from protos.wire import InferenceRuntime

log = logging.getLogger("pocketlora.agent")
RUNTIME_CHOICES = ("auto", "onnx", "torch")
RETRY_S = 10.0


@dataclass(frozen=True)
class Outcome:
    """Whether the runtime (or an adapter) is ready: kind is "active", "refused" or "later"
    (not yet: a bundle being exported, a form being converted, a failed download)."""

    kind: str
    reason: str = ""


def installed(runtime: str) -> bool:
    """Whether this machine can run the runtime (its packages are importable)."""
    module = "onnxruntime_genai" if runtime == "onnx" else "torch"
    return importlib.util.find_spec(module) is not None


class Serving:
    """Chooses the runtime, fetches its model files and starts its child."""

    def __init__(
        self,
        client: DeviceClient,
        *,
        runtime: str,
        work_dir: Path,
        base_model_dir: Path,
        base_fingerprint: str,
        threads: int = 0,
        listen: str = "",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if runtime not in RUNTIME_CHOICES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {runtime!r}")
        if runtime == "onnx" and not installed("onnx"):
            raise ValueError("--runtime onnx needs onnxruntime-genai (pip install 'pocketlora[onnx]')")
        self.client = client
        self.choice = runtime
        self.work_dir = work_dir
        self.base_model_dir = base_model_dir
        self.base_fingerprint = base_fingerprint
        self.threads = threads
        self.listen = listen
        self.ssl_context = ssl_context  # for an https presigned bundle URL (None: the system's roots)
        self.host: RuntimeHost | None = None
        self.backend = "" if runtime == "auto" else runtime  # decided at the first start in auto
        self._retry_at = 0.0  # after a failed start, wait before asking the orchestrator again
        # A child loading its model, waited for on a thread so the agent's loop never blocks on it.
        self._loading: RuntimeHost | None = None
        self._waiter: threading.Thread | None = None
        self._load_error = ""

    @property
    def loading(self) -> bool:
        """Whether a runtime child is loading its model now."""
        return self._loading is not None

    def advertised(self) -> list[int]:
        """The runtimes to report at enrollment, preferred first."""
        kinds = [] if self.choice == "torch" else [InferenceRuntime.ONNX] if installed("onnx") else []
        if self.choice != "onnx":
            kinds.append(InferenceRuntime.TORCH)
        return [wire.to_pb(k) for k in kinds]

    def start(self) -> Outcome:
        """Start the runtime child if it is not running: "later" when its model is not here yet or
        is still loading, "refused" when the child did not start (a broken base or bundle)."""
        if self.host is not None:
            return Outcome("active")
        if self._loading is not None:
            outcome = self._loaded()
        elif time.monotonic() < self._retry_at:
            return Outcome("later", "waiting before starting the runtime again")
        else:
            outcome = self._start()
        if outcome.kind == "refused" or (outcome.kind == "later" and self._loading is None):
            self._retry_at = time.monotonic() + RETRY_S
        return outcome

    def _loaded(self) -> Outcome:
        """Where the loading child stands."""
        assert self._loading is not None and self._waiter is not None
        if self._waiter.is_alive():
            return Outcome("later", "waiting for the runtime to load its model")
        child, self._loading = self._loading, None
        if self._load_error:
            return Outcome("refused", f"the inference runtime did not start: {self._load_error}")
        self.host = child
        return Outcome("active")

    def _start(self) -> Outcome:
        if self.backend in ("", "onnx") and (self.choice == "onnx" or installed("onnx")):
            try:
                bundle = self._ensure_bundle()
            except CallError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND and self.choice == "auto" and installed("torch"):
                    log.info("no runtime bundle for this base (%s); using the torch runtime", exc.details)
                    self.backend = "torch"
                    return self._start()
                return Outcome("later", f"runtime bundle: {exc.code.name}: {exc.details}")
            except (TransferError, StoreError) as exc:
                return Outcome("later", f"runtime bundle download: {exc}")
            self.backend, model = "onnx", bundle
        else:
            self.backend, model = "torch", self.base_model_dir
        try:
            child = RuntimeHost(model, backend=self.backend, threads=self.threads, serve=self.listen, wait=False)
        except OSError as exc:
            return Outcome("refused", f"the inference runtime did not start: {exc}")
        self._loading, self._load_error = child, ""
        self._waiter = threading.Thread(target=self._wait_for, args=(child,), name="runtime-load", daemon=True)
        self._waiter.start()
        return self._loaded()

    def _wait_for(self, child: RuntimeHost) -> None:
        try:
            child.wait_ready()
        except RuntimeHostError as exc:
            self._load_error = str(exc)

    def _ensure_bundle(self) -> Path:
        """The unpacked bundle for this base: downloaded and checked once, older copies removed."""
        got = self.client.runtime_bundle_url(self.base_fingerprint)
        root = self.work_dir / "runtimes" / "onnx"
        target = root / got.sha256
        if not target.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            tar = root / f"{got.sha256}.tar.part"
            try:
                download_from_url(
                    got.url, tar, expected_sha256=got.sha256, expected_size=got.size_bytes, ssl_context=self.ssl_context
                )
                unpack_bundle(tar, target)
            finally:
                tar.unlink(missing_ok=True)
        for other in root.iterdir():  # one copy per base: a new bundle replaces the old one
            if other.name != got.sha256:
                shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
        return target

    def close(self) -> None:
        """Stop the runtime child (at once if it is still loading its model)."""
        if self._loading is not None:
            self._loading.kill()
            self._loading = None
        if self.host is not None:
            self.host.close()
            self.host = None
