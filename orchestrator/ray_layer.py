"""All Ray API calls live here: the orchestrator as a Ray application.

Plain classes hold the logic (orchestrator.service.Orchestrator); this module turns them into
actors with one factory each (Ray Serve's controller pattern):

- FrontendActor: one gRPC front end (async actor); `--replicas N` starts N of them on one port
  (SO_REUSEPORT lets the kernel spread connections) or on consecutive ports. With an HTTP
  listener, replica i serves it on the HTTP port + i (each replica is its own Prometheus
  target), and replica 0's /metrics adds the control loop's counters (lease expiries...).
- ControlLoopActor: the named control loop (lease reaper, retry timers, deadlines, campaign
  fan-out, rollout steps: Orchestrator.control_tick); Ray restarts it after a crash, and it holds
  no state of its own (everything is in the state store).
- verify_blob: adapter verification as a Ray task, so reading a blob back never blocks a front end;
  its errors come back as the domain errors they were (`unwrap_ray_errors`), never as Ray's
  traceback-carrying wrappers.
- export_bundle / convert_adapter: runtime bundles (exported once per base, started by the
  control loop) and adapters' .onnx_adapter forms (after verification, from a front end) as
  Ray tasks (orchestrator.runtime_forms decides when), their errors unwrapped the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from adapters_store.runtime_bundle import BundleRef, BundleSettings
from orchestrator.config import Limits, OrchestratorConfig
from orchestrator.errors import Unavailable
from orchestrator.pace import PacePolicy
from pocketlora.tls import TlsConfig

log = logging.getLogger("pocketlora.orchestrator")
T = TypeVar("T")
CONTROL_ACTOR_NAME = "pocketlora-control"
NAMESPACE = "pocketlora"


def ray_env(tmp_root: Path | None = None) -> dict[str, str]:
    """Environment that keeps every Ray server on 127.0.0.1, quiet, and telemetry off."""
    tmp = tmp_root or Path(tempfile.gettempdir()) / f"pocketlora-ray-{os.getuid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        # The only setting seen to make every Ray server bind 127.0.0.1 (_node_ip_address is ignored).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(tmp),
        "RAY_DEDUP_LOGS": "0",
    }


def init_ray(address: str | None = None, *, num_cpus: int | None = None, tmp_root: Path | None = None) -> None:
    """Start an in-process Ray cluster, or attach to `address` (e.g. ray://host:10001 or auto)."""
    os.environ.update(ray_env(tmp_root))
    import ray

    if ray.is_initialized():
        return
    # env_vars reach actors and tasks (they are separate processes started by Ray's workers).
    runtime_env = {
        "env_vars": {
            k: v for k, v in os.environ.items() if k.startswith(("POCKETLORA_", "AWS_", "HF_", "TRANSFORMERS_"))
        }
    }
    if address:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env=runtime_env,
        )
        return
    # address="local": a bare ray.init() would attach to any leftover cluster in RAY_TMPDIR.
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=num_cpus or max(os.cpu_count() or 2, 2),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        object_store_memory=200 * 2**20,
        runtime_env=runtime_env,
    )


def _config_from(d: dict[str, Any]) -> OrchestratorConfig:
    d = dict(d)
    d["pace"] = PacePolicy(**d.get("pace", {}))
    d["limits"] = Limits(**d.get("limits", {}))
    return OrchestratorConfig(**d)


def _verify_blob(store_url: str, key: str, sha256: str, size: int) -> tuple[str, int, str, dict[str, Any]]:
    from adapters_store import open_store
    from orchestrator.lifecycle import local_verifier

    # The front end created the store; one that is not there now is an outage, not an empty store.
    store = open_store(store_url, create=False)
    try:
        return local_verifier(store, key, sha256, size)
    finally:
        store.close()


def unwrap_ray_errors(fn: Callable[[], T], what: str) -> T:
    """Run fn (a ray.get) and raise what the task raised, not Ray's wrapper of it.

    Ray wraps a task's exception in a RayTaskError whose text is a coloured traceback with the
    worker's PID and file paths; callers match on the domain error, and replies must never
    carry that text. The wrapped error (every domain error pickles intact) is re-raised as it
    was; a task that could not run at all (its worker died, the cluster is gone) is Unavailable.
    """
    import ray.exceptions

    try:
        return fn()
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
            raise cause from None
        log.warning("%s task failed inside Ray: %s", what, type(cause).__name__)
        raise Unavailable(f"{what} could not run; retry") from None
    except ray.exceptions.RayError as exc:
        log.warning("%s task could not run: %s", what, type(exc).__name__)
        raise Unavailable(f"{what} could not run; retry") from None


def _export_bundle(store_url: str, base_model_id: str, base_dir: str, settings: dict[str, Any]) -> str:
    from adapters_store import open_store
    from orchestrator.runtime_forms import local_exporter

    store = open_store(store_url)
    try:
        bundle = BundleSettings(settings["precision"], tuple(settings["targets"]), settings["max_rank"])
        return local_exporter(store, base_model_id, base_dir, bundle).to_json()
    finally:
        store.close()


def _convert_adapter(store_url: str, sha256: str, key: str, bundle_json: str) -> dict[str, Any]:
    from adapters_store import open_store
    from orchestrator.runtime_forms import local_converter

    store = open_store(store_url)
    try:
        return local_converter(store, sha256, key, BundleRef.from_json(bundle_json))
    finally:
        store.close()


def _ray_forms(store_url: str, *, exports: bool) -> dict[str, Any]:
    """RuntimeForms options that run exports and conversions as Ray tasks."""
    import ray

    # An export runs the model builder (a CPU-heavy child process): one CPU of the cluster.
    export = ray.remote(num_cpus=1, max_retries=1)(_export_bundle)
    convert = ray.remote(num_cpus=0, max_retries=2)(_convert_adapter)

    def exporter(_store: Any, base_model_id: str, base_dir: str, settings: BundleSettings) -> BundleRef:
        body = {"precision": settings.precision, "targets": list(settings.targets), "max_rank": settings.max_rank}
        got = unwrap_ray_errors(lambda: ray.get(export.remote(store_url, base_model_id, base_dir, body)), "export")
        return BundleRef.from_json(got)

    def converter(_store: Any, sha256: str, key: str, bundle: BundleRef) -> dict[str, Any]:
        result: dict[str, Any] = unwrap_ray_errors(
            lambda: ray.get(convert.remote(store_url, sha256, key, bundle.to_json())), "conversion"
        )
        return result

    return {"exporter": exporter, "converter": converter, "exports": exports}


class FrontendActor:
    """One gRPC front end; becomes a Ray actor through `frontend_actor()`."""

    def __init__(
        self,
        db_url: str,
        store_url: str,
        config: dict[str, Any],
        listen: str,
        tls: TlsConfig | None = None,
        insecure: bool = False,
        http_listen: str = "",
        replica: int = 0,
    ) -> None:
        self.db_url, self.store_url, self.config, self.listen = db_url, store_url, config, listen
        # PEM bytes read once by the caller: a replica on another node needs no files there.
        self.tls, self.insecure = tls, insecure
        self.http_listen, self.replica = http_listen, replica
        self.running: Any = None

    async def start(self) -> int:
        """Open the stores and serve; returns the bound port."""
        import ray

        from orchestrator.server import build_orchestrator, start_server

        verify = ray.remote(num_cpus=0, max_retries=2)(_verify_blob)
        store_url = self.store_url

        def ray_verifier(_store: Any, key: str, sha256: str, size: int) -> tuple[str, int, str, dict[str, Any]]:
            # Runs on an executor thread of this actor; ray.get blocks only that thread.
            return unwrap_ray_errors(lambda: ray.get(verify.remote(store_url, key, sha256, size)), "verification")

        orch = build_orchestrator(
            self.db_url,
            self.store_url,
            _config_from(self.config),
            verifier=ray_verifier,
            forms=_ray_forms(store_url, exports=False),
        )
        remote = _control_loop_metrics if self.replica == 0 else None
        self.running = await start_server(
            orch, self.listen, tls=self.tls, insecure=self.insecure, http_listen=self.http_listen, remote_metrics=remote
        )
        return int(self.running.port)

    async def http_port(self) -> int:
        """The HTTP listener's port (0 without one)."""
        return int(self.running.http_port) if self.running is not None else 0

    async def stop(self) -> None:
        """Stop serving."""
        if self.running is not None:
            await self.running.stop()
            self.running.orch.state.close()
            self.running = None


class ControlLoopActor:
    """The control loop; becomes a named, restartable Ray actor through `control_actor()`."""

    def __init__(self, db_url: str, store_url: str, config: dict[str, Any]) -> None:
        from orchestrator.server import build_orchestrator

        self.orch = build_orchestrator(
            db_url, store_url, _config_from(config), forms=_ray_forms(store_url, exports=True)
        )
        self.interval = self.orch.config.reap_interval_s
        self.reaped = 0
        self.campaign_jobs = 0
        self.rollout_changes = 0
        self.ticks = 0
        self._stopping: asyncio.Event | None = None

    async def run(self) -> None:
        """Run the control loop's passes until stop() is called."""
        loop = asyncio.get_running_loop()
        self._stopping = self._stopping or asyncio.Event()
        forms = self.orch.runtimes.forms
        if forms is not None:
            # Bases without a bundle are exported once, in the background (Ray tasks).
            await loop.run_in_executor(None, forms.ensure_bundles)
        while not self._stopping.is_set():
            try:
                done = await loop.run_in_executor(None, self.orch.control_tick)
                self.reaped += done.reaped
                self.campaign_jobs += done.campaign_jobs
                self.rollout_changes += done.rollout_changes
            except Exception:  # keep the loop alive through a passing store error
                log.exception("control loop tick failed")
            self.ticks += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    async def stop(self) -> None:
        """End run() after its current tick (so shutdown is not mistaken for a crash to retry)."""
        self._stopping = self._stopping or asyncio.Event()
        self._stopping.set()

    async def stats(self) -> dict[str, int]:
        """How much the loop has done."""
        return {
            "ticks": self.ticks,
            "reaped": self.reaped,
            "campaign_jobs": self.campaign_jobs,
            "rollout_changes": self.rollout_changes,
        }

    async def metrics_snapshot(self) -> list[Any]:
        """This process's domain metrics (lease expiries, deadlines...), for a front end's /metrics."""
        from orchestrator import metrics

        return metrics.snapshot()


def _control_loop_metrics() -> list[Any]:
    """The control loop's domain metrics; none when it cannot be reached now (a scrape must not fail)."""
    import ray

    try:
        control = ray.get_actor(CONTROL_ACTOR_NAME, namespace=NAMESPACE)
        return list(ray.get(control.metrics_snapshot.remote(), timeout=2.0))
    except Exception:
        log.warning("control loop metrics unavailable for this scrape")
        return []


def start_orchestrator(
    db_url: str,
    store_url: str,
    config: OrchestratorConfig,
    *,
    listen: str = "127.0.0.1:0",
    replicas: int = 1,
    tls: TlsConfig | None = None,
    insecure: bool = False,
    http_listen: str = "",
) -> tuple[list[Any], Any, list[int]]:
    """Start the control loop and `replicas` front ends (each serving TLS when `tls` is given);
    returns (front ends, control actor, ports). With `http_listen`, replica i serves HTTP on its
    port + i (port 0: each picks a free one)."""
    import ray

    cfg = asdict(config)
    # Ray's stubs omit max_concurrency, a documented actor option.
    control_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4)(ControlLoopActor)  # type: ignore[call-overload]
    control = control_cls.options(name=CONTROL_ACTOR_NAME, get_if_exists=True).remote(db_url, store_url, cfg)
    control.run.remote()
    frontend_cls = ray.remote(num_cpus=0, max_restarts=3, max_concurrency=64)(FrontendActor)  # type: ignore[call-overload]
    host, port = listen.rsplit(":", 1)
    frontends, ports = [], []
    for i in range(replicas):
        # Port 0 gives each replica its own port; a fixed port is shared through SO_REUSEPORT.
        http = ""
        if http_listen:
            http_host, http_port = http_listen.rsplit(":", 1)
            http = f"{http_host}:{int(http_port) + i if int(http_port) else 0}"
        actor = frontend_cls.remote(db_url, store_url, cfg, f"{host}:{port}", tls, insecure, http, i)
        bound = ray.get(actor.start.remote())
        frontends.append(actor)
        ports.append(bound)
        log.info("front end %d serving on %s:%d", i, host, bound)
    return frontends, control, ports


def http_ports(frontends: list[Any]) -> list[int]:
    """Each front end's HTTP port (0 for one without a listener)."""
    import ray

    return [int(p) for p in ray.get([actor.http_port.remote() for actor in frontends])]


def stop_orchestrator(frontends: list[Any], control: Any) -> None:
    """Stop the front ends and the control loop."""
    import ray

    for actor in frontends:
        with contextlib.suppress(Exception):  # already gone
            ray.get(actor.stop.remote(), timeout=10)
        ray.kill(actor)
    with contextlib.suppress(Exception):
        ray.get(control.stop.remote(), timeout=10)
    ray.kill(control, no_restart=True)
