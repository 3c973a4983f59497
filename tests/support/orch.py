"""Run a real orchestrator gRPC server (in a background event loop) for tests, and talk to it."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from adapters_store import AdapterManifest, BlobInfo, BlobStore, FileBlobStore, pack_adapter
from adapters_store.runtime_bundle import BundleSettings
from orchestrator.config import OrchestratorConfig
from orchestrator.runtime_forms import RuntimeForms
from orchestrator.server import RunningServer, start_server
from orchestrator.service import Orchestrator
from orchestrator.state import open_state
from pocketlora.tls import TlsConfig, open_channel
from protos.pocketlora.v1 import admin_service_pb2_grpc, agent_service_pb2_grpc, operator_service_pb2_grpc

OPERATOR_TOKEN = "operator-test-token"
ENROLL_TOKEN = "enroll-test-token"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ServerThread:
    """An Orchestrator over SQLite (or a given URL) and a file store, served on 127.0.0.1:<free>."""

    def __init__(
        self,
        tmp: Path,
        *,
        db_url: str = "",
        clock: Any = None,
        reap_every_s: float = 0.0,
        interceptors: Any = (),
        store: BlobStore | None = None,
        tls: TlsConfig | None = None,
        client_tls: TlsConfig | None = None,
        http: bool = False,
        **config: Any,
    ) -> None:
        self.store = store or FileBlobStore(tmp / "blobs", url_secret=secrets.token_bytes(32))
        cfg = OrchestratorConfig(**{"bootstrap_token": OPERATOR_TOKEN, "enrollment_token": ENROLL_TOKEN, **config})
        kw: dict[str, Any] = {"clock": clock} if clock else {}
        if cfg.runtime_bases:  # exports and conversions in this process, as without Ray
            settings = BundleSettings(precision=cfg.bundle_precision)
            kw["runtime_forms"] = RuntimeForms(self.store, cfg.runtime_bases, settings)
        self.orch = Orchestrator(open_state(db_url or f"sqlite:///{tmp / 'state.db'}"), self.store, cfg, **kw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.running: RunningServer | None = None
        self.interceptors = list(interceptors)
        # The server's TLS, and what the test's own channel (self.agent, self.operator) presents.
        self.tls, self.client_tls = tls, client_tls
        self.http = http
        self.http_url = ""
        # The control loop's passes (ControlLoopActor under Ray): leases expire, campaigns fan out,
        # rollouts move on.
        self.reap_every_s = reap_every_s
        self._stop_reaper = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True)

    def _reap_loop(self) -> None:
        while not self._stop_reaper.wait(self.reap_every_s):
            self.orch.control_tick()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.running = asyncio.run_coroutine_threadsafe(
            start_server(
                self.orch,
                interceptors=self.interceptors,
                tls=self.tls,
                http_listen="127.0.0.1:0" if self.http else "",
            ),
            self.loop,
        ).result(30)
        self.address = f"127.0.0.1:{self.running.port}"
        if self.http:
            self.http_url = f"http://127.0.0.1:{self.running.http_port}"
        self.channel = open_channel(self.address, self.client_tls)
        self.agent = agent_service_pb2_grpc.AgentServiceStub(self.channel)
        self.operator = operator_service_pb2_grpc.OperatorServiceStub(self.channel)
        self.admin = admin_service_pb2_grpc.AdminServiceStub(self.channel)
        if self.reap_every_s:
            self._reaper.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop_reaper.set()
        if self._reaper.is_alive():
            self._reaper.join(10)
        self.channel.close()
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if self.orch.runtimes.forms is not None:
            self.orch.runtimes.forms.close(wait=True)  # an export or conversion still running
        self.orch.state.close()
        self.store.close()


def op_md(token: str = OPERATOR_TOKEN) -> tuple[tuple[str, str], ...]:
    """Operator metadata."""
    return (("authorization", f"Bearer {token}"),)


def dev_md(device_id: str, credential: str) -> tuple[tuple[str, str], ...]:
    """Device metadata."""
    return (("authorization", f"Bearer {credential}"), ("x-pocketlora-device", device_id))


def fake_adapter_blob(
    tmp: Path, *, device_id: str, job_id: str, attempt: int, seed: int = 0, metrics: dict[str, Any] | None = None
) -> tuple[Path, BlobInfo]:
    """A small but well-formed adapter blob (random LoRA tensors, a peft config, a manifest with
    these metrics, e.g. held-out eval figures)."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    folder = tmp / f"adapter-{job_id}-{attempt}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 32)).astype("float32"),
            "base_model.model.layers.0.q_proj.lora_B.weight": rng.standard_normal((32, 4)).astype("float32"),
        },
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    manifest = AdapterManifest(
        adapter_name="persona",
        base_model_id="tiny",
        base_fingerprint="sha256:" + "ab" * 32,
        rank=4,
        alpha=8.0,
        target_modules=["q_proj"],
        dataset_sha256="cd" * 32,
        metrics={"final_loss": 1.0, **(metrics or {})},
        training={},
        device_id=device_id,
        job_id=job_id,
        attempt=attempt,
        created_at="2026-11-29T00:00:00+00:00",
    )
    blob = tmp / f"blob-{job_id}-{attempt}-{seed}.safetensors"
    return blob, pack_adapter(folder, manifest, blob)
