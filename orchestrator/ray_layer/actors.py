"""The orchestrator's Ray actors and tasks: plain classes here, made remote by deployment.py.

- FrontendActor: one gRPC front end (async actor) on a node that offers the ingress resource;
  it binds the listen address on its own node and reports the endpoint clients reach.
  With an HTTP listener it serves /metrics, the JSON API and the console there too; replica 0's
  /metrics adds the control loop's counters (lease expiries...).
- ControlLoopActor: the control loop's passes (lease reaper, deadlines, campaign fan-out, rollout
  steps: Orchestrator.control_tick); it holds no state of its own (everything is in the state
  store), so Ray may restart it anywhere.
- verify_blob: adapter verification as a Ray task (reading a blob back never blocks a front end),
  with a CPU request and retries when its worker or node dies or the store read fails; its errors
  come back as the domain errors they were (`unwrap_ray_errors`), never as Ray's wrappers.

Each actor first checks that it runs the driver's code (probe.fingerprint): a node added after
start-up with another installation fails the actor with one line, not a stack trace later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.config import Limits, OrchestratorConfig
from orchestrator.errors import Unavailable
from orchestrator.pace import PacePolicy
from orchestrator.ray_layer import probe
from orchestrator.ray_layer.runtime import NAMESPACE, ForwardedEnv
from pocketlora.tls import TlsConfig

if TYPE_CHECKING:
    from orchestrator.lifecycle import Verifier

log = logging.getLogger("pocketlora.orchestrator")
T = TypeVar("T")
CONTROL_ACTOR_NAME = "pocketlora-control"
# Resource requests. The control loop asks for a sliver of CPU so it never lands on a head
# configured with no CPUs (the usual production head); front ends ask for the ingress resource.
CONTROL_CPUS = 0.1
# Just under half a CPU per verification: a few workers per node that stay up and take
# verifications in turn (each takes milliseconds), rather than a new worker process (seconds to
# start) per concurrent one; and two of them still fit on a one-CPU node that also holds the
# control loop (a whole CPU would never be free there again).
VERIFY_CPUS = 0.45
# How long a front end waits for its warm-up task before serving anyway (it only saves the first
# verification a worker start).
WARM_UP_S = 30.0
VERIFY_RETRIES = 3
# A front end's threads for blocking calls: CompleteJob holds one while its verification task
# runs elsewhere, so there are more than a local store needs.
FRONTEND_THREADS = 32


class CodeMismatch(RuntimeError):
    """This worker does not run the driver's code or dependencies."""


@dataclass(frozen=True)
class Endpoint:
    """Where one front end serves: the address clients dial, the node it runs on, and its HTTP
    listener's port (0 without one)."""

    replica: int
    host: str
    port: int
    node_id: str
    http_port: int = 0

    @property
    def address(self) -> str:
        """host:port."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class FrontendServing:
    """How a front end serves: TLS material (PEM bytes, so a replica on another node needs no
    files there), plaintext beyond loopback allowed, and its HTTP listener (HOST:PORT, "" for none)."""

    tls: TlsConfig | None = None
    insecure: bool = False
    http_listen: str = ""

    def __repr__(self) -> str:  # never the key's bytes in a log line
        return f"FrontendServing(tls={self.tls is not None}, insecure={self.insecure}, http={self.http_listen!r})"


def _check_code(expected: dict[str, str]) -> None:
    diff = probe.differences(expected, probe.fingerprint())
    if diff:
        raise CodeMismatch("this Ray worker does not run the driver's PocketLoRA: " + "; ".join(diff))


def config_to_dict(config: OrchestratorConfig) -> dict[str, Any]:
    """The config as plain data (actors get it as an argument)."""
    from dataclasses import asdict

    return asdict(config)


def config_from_dict(d: dict[str, Any]) -> OrchestratorConfig:
    """Rebuild an OrchestratorConfig from config_to_dict's output."""
    d = dict(d)
    d["pace"] = PacePolicy(**d.get("pace", {}))
    d["limits"] = Limits(**d.get("limits", {}))
    return OrchestratorConfig(**d)


def verify_blob(
    store_url: str, env: ForwardedEnv, key: str, sha256: str, size: int
) -> tuple[str, int, str, dict[str, Any]]:
    """Read an upload back, check size and sha256, promote it (lifecycle.local_verifier)."""
    from adapters_store import open_store
    from orchestrator.lifecycle import local_verifier

    # The front end created the store; one that is not there now is an outage, not an empty store.
    store = open_store(store_url, env=env.values, create=False)
    try:
        return local_verifier(store, key, sha256, size)
    finally:
        store.close()


def _verify_options() -> dict[str, Any]:
    # Retried when its worker or node dies, and on OSError (a store read that failed midway).
    return {"num_cpus": VERIFY_CPUS, "max_retries": VERIFY_RETRIES, "retry_exceptions": [OSError]}


def warm_up() -> int:
    """A no-op task with verify_blob's options: its worker (a new process, seconds to start) is
    then idle and takes the first verification at once."""
    import os

    return os.getpid()


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


def ray_verifier(store_url: str, env: ForwardedEnv) -> Verifier:
    """A lifecycle verifier that runs verify_blob as a Ray task and waits for it."""
    import ray

    verify = ray.remote(**_verify_options())(verify_blob)

    def run(_store: Any, key: str, sha256: str, size: int) -> tuple[str, int, str, dict[str, Any]]:
        # Called on an executor thread of the front end; ray.get blocks only that thread.
        return unwrap_ray_errors(lambda: ray.get(verify.remote(store_url, env, key, sha256, size)), "verification")

    return run


def control_loop_metrics() -> list[Any]:
    """The control loop's domain metrics; none when it cannot be reached now (a scrape must not fail)."""
    import ray

    try:
        control = ray.get_actor(CONTROL_ACTOR_NAME, namespace=NAMESPACE)
        return list(ray.get(control.metrics_snapshot.remote(), timeout=2.0))
    except Exception:
        log.warning("control loop metrics unavailable for this scrape")
        return []


class FrontendActor:
    """One gRPC front end; becomes a Ray actor in deployment.py."""

    def __init__(
        self,
        replica: int,
        db_url: str,
        store_url: str,
        config: dict[str, Any],
        listen: str,
        env: ForwardedEnv,
        expected: dict[str, str],
        serving: FrontendServing | None = None,
    ) -> None:
        _check_code(expected)
        env.apply()
        self.replica, self.db_url, self.store_url, self.config, self.listen = replica, db_url, store_url, config, listen
        self.env = env
        self.serving = serving or FrontendServing()
        self.running: Any = None

    async def start(self) -> Endpoint:
        """Open the stores and serve on this node; returns the endpoint clients reach."""
        import ray

        from orchestrator.server import build_orchestrator, start_server

        warming = ray.remote(**_verify_options())(warm_up).remote()
        try:
            await asyncio.wait_for(asyncio.wrap_future(warming.future()), WARM_UP_S)
        except TimeoutError:
            log.warning("no verification worker free within %.0f s; serving without a warm one", WARM_UP_S)
            ray.cancel(warming)
        verifier = ray_verifier(self.store_url, self.env)
        from orchestrator.ray_layer.forms import ray_forms

        orch = build_orchestrator(
            self.db_url,
            self.store_url,
            config_from_dict(self.config),
            verifier=verifier,
            forms=ray_forms(self.store_url, self.env, exports=False),
        )
        serving = self.serving
        self.running = await start_server(
            orch,
            self.listen,
            threads=FRONTEND_THREADS,
            tls=serving.tls,
            insecure=serving.insecure,
            http_listen=serving.http_listen,
            remote_metrics=control_loop_metrics if self.replica == 0 else None,
        )
        host = self.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        node_id = ray.get_runtime_context().get_node_id()
        return Endpoint(self.replica, host, int(self.running.port), node_id, int(self.running.http_port))

    async def ping(self) -> str:
        """Liveness: the node this front end runs on."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    async def stop(self) -> None:
        """Stop serving."""
        if self.running is not None:
            await self.running.stop()
            self.running.orch.state.close()
            self.running = None


class ControlLoopActor:
    """The control loop; becomes a named, restartable Ray actor in deployment.py."""

    def __init__(
        self, db_url: str, store_url: str, config: dict[str, Any], env: ForwardedEnv, expected: dict[str, str]
    ) -> None:
        _check_code(expected)
        env.apply()
        from orchestrator.ray_layer.forms import ray_forms
        from orchestrator.server import build_orchestrator

        self.orch = build_orchestrator(
            db_url, store_url, config_from_dict(config), forms=ray_forms(store_url, env, exports=True)
        )
        self.interval = self.orch.config.reap_interval_s
        self.done = {"ticks": 0, "reaped": 0, "campaign_jobs": 0, "rollout_changes": 0}
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
                tick = await loop.run_in_executor(None, self.orch.control_tick)
                self.done["reaped"] += tick.reaped
                self.done["campaign_jobs"] += tick.campaign_jobs
                self.done["rollout_changes"] += tick.rollout_changes
            except Exception:  # keep the loop alive through a passing store error
                log.exception("control loop tick failed")
            self.done["ticks"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    async def stop(self) -> None:
        """End run() after its current tick (so shutdown is not mistaken for a crash to retry)."""
        self._stopping = self._stopping or asyncio.Event()
        self._stopping.set()

    async def stats(self) -> dict[str, Any]:
        """How much the loop has done since it (re)started, and on which node."""
        import ray

        return {**self.done, "node_id": ray.get_runtime_context().get_node_id()}

    async def metrics_snapshot(self) -> list[Any]:
        """This process's domain metrics (lease expiries, deadlines...), for a front end's /metrics."""
        from orchestrator import metrics

        return metrics.snapshot()
