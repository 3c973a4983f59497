"""The agent's inference runtime: which one, its model files, and its child process.

`--runtime onnx` runs onnxruntime-genai on the runtime bundle the orchestrator exported for this
device's base (downloaded once through a presigned URL, checked against its sha256, unpacked
under WORK_DIR/runtimes/onnx/<sha256>/; one copy per base), and loads adapters in their
.onnx_adapter form. `--runtime torch` runs transformers + peft on the base folder and loads the
safetensors blobs. `auto` picks onnx when onnxruntime-genai is installed and the orchestrator
has a bundle for this base, else torch.

Either way the runtime lives in a child process (agent.inference.RuntimeHost) that also serves
DeviceInferenceService to apps when an address is configured; agent.adapters keeps it on the
desired adapter. Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from adapters_store import download_from_url
from adapters_store.errors import StoreError, TransferError
from adapters_store.runtime_bundle import unpack_bundle
from agent.client import CallError, DeviceClient
from agent.inference import RuntimeHost
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
        self.host: RuntimeHost | None = None
        self.backend = "" if runtime == "auto" else runtime  # decided at the first start in auto
        self._retry_at = 0.0  # after a failed start, wait before asking the orchestrator again

    def advertised(self) -> list[int]:
        """The runtimes to report at enrollment, preferred first."""
        kinds = [] if self.choice == "torch" else [InferenceRuntime.ONNX] if installed("onnx") else []
        if self.choice != "onnx":
            kinds.append(InferenceRuntime.TORCH)
        return [wire.to_pb(k) for k in kinds]

    def start(self) -> Outcome:
        """Start the runtime child if it is not running; Later when its model is not here yet."""
        if self.host is not None:
            return Outcome("active")
        if time.monotonic() < self._retry_at:
            return Outcome("later", "waiting before asking for the runtime bundle again")
        outcome = self._start()
        if outcome.kind != "active":
            self._retry_at = time.monotonic() + RETRY_S
        return outcome

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
            self.backend = "onnx"
            self.host = RuntimeHost(bundle, backend="onnx", threads=self.threads, serve=self.listen)
        else:
            self.backend = "torch"
            self.host = RuntimeHost(self.base_model_dir, backend="torch", threads=self.threads, serve=self.listen)
        return Outcome("active")

    def _ensure_bundle(self) -> Path:
        """The unpacked bundle for this base: downloaded and checked once, older copies removed."""
        got = self.client.runtime_bundle_url(self.base_fingerprint)
        root = self.work_dir / "runtimes" / "onnx"
        target = root / got.sha256
        if not target.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            tar = root / f"{got.sha256}.tar.part"
            try:
                download_from_url(got.url, tar, expected_sha256=got.sha256, expected_size=got.size_bytes)
                unpack_bundle(tar, target)
            finally:
                tar.unlink(missing_ok=True)
        for other in root.iterdir():  # one copy per base: a new bundle replaces the old one
            if other.name != got.sha256:
                shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
        return target

    def close(self) -> None:
        """Stop the runtime child."""
        if self.host is not None:
            self.host.close()
            self.host = None
