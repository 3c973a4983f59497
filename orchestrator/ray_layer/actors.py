"""The orchestrator's Ray actors and tasks: plain classes here, made remote by deployment.py.

- FrontendActor: one gRPC front end (async actor) on a node that offers the ingress resource;
  it binds the listen address on its own node and reports the endpoint clients reach.
- ControlLoopActor: the lease reaper and deadline timer; it holds no state of its own
  (everything is in the state store), so Ray may restart it anywhere.
- verify_blob: adapter verification as a Ray task (reading a blob back never blocks a front end),
  with a CPU request and retries when its worker or node dies or the store read fails.

Each actor first checks that it runs the driver's code (probe.fingerprint): a node added after
start-up with another installation fails the actor with one line, not a stack trace later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.config import OrchestratorConfig
from orchestrator.pace import PacePolicy
from orchestrator.ray_layer import probe
from orchestrator.ray_layer.runtime import ForwardedEnv

if TYPE_CHECKING:
    from orchestrator.lifecycle import Verifier

log = logging.getLogger("pocketlora.orchestrator")
CONTROL_ACTOR_NAME = "pocketlora-control"
# Resource requests. The control loop asks for a sliver of CPU so it never lands on a head
# configured with no CPUs (the usual production head); front ends ask for the ingress resource.
CONTROL_CPUS = 0.1
# One CPU per verification: a few workers per node that stay up and take verifications in turn
# (each takes milliseconds), rather than a new worker process (seconds to start) per concurrent one.
VERIFY_CPUS = 1.0
VERIFY_RETRIES = 3
# A front end's threads for blocking calls: CompleteJob holds one while its verification task
# runs elsewhere, so there are more than a local store needs.
FRONTEND_THREADS = 32


class CodeMismatch(RuntimeError):
    """This worker does not run the driver's code or dependencies."""


@dataclass(frozen=True)
class Endpoint:
    """Where one front end serves: the address clients dial, and the node it runs on."""

    replica: int
    host: str
    port: int
    node_id: str

    @property
    def address(self) -> str:
        """host:port."""
        return f"{self.host}:{self.port}"


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
    return OrchestratorConfig(**d)


def verify_blob(
    store_url: str, env: ForwardedEnv, key: str, sha256: str, size: int
) -> tuple[str, int, str, dict[str, Any]]:
    """Read an upload back, check size and sha256, promote it (lifecycle.local_verifier)."""
    from adapters_store import open_store
    from orchestrator.lifecycle import local_verifier

    store = open_store(store_url, env=env.values)
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


def ray_verifier(store_url: str, env: ForwardedEnv) -> Verifier:
    """A lifecycle verifier that runs verify_blob as a Ray task and waits for it."""
    import ray

    from adapters_store.errors import StoreError

    verify = ray.remote(**_verify_options())(verify_blob)

    def run(_store: Any, key: str, sha256: str, size: int) -> tuple[str, int, str, dict[str, Any]]:
        # Called on an executor thread of the front end; ray.get blocks only that thread.
        try:
            result: tuple[str, int, str, dict[str, Any]] = ray.get(verify.remote(store_url, env, key, sha256, size))
        except ray.exceptions.RayTaskError as exc:
            # The store's own errors (integrity, format) keep their type for the lifecycle.
            if isinstance(exc.cause, StoreError):
                raise exc.cause from None
            raise
        return result

    return run


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
    ) -> None:
        _check_code(expected)
        env.apply()
        self.replica, self.db_url, self.store_url, self.config, self.listen = replica, db_url, store_url, config, listen
        self.env = env
        self.running: Any = None

    async def start(self) -> Endpoint:
        """Open the stores and serve on this node; returns the endpoint clients reach."""
        import ray

        from orchestrator.server import build_orchestrator, start_server

        await ray.remote(**_verify_options())(warm_up).remote()
        verifier = ray_verifier(self.store_url, self.env)
        orch = build_orchestrator(self.db_url, self.store_url, config_from_dict(self.config), verifier=verifier)
        self.running = await start_server(orch, self.listen, threads=FRONTEND_THREADS)
        host = self.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        return Endpoint(self.replica, host, int(self.running.port), ray.get_runtime_context().get_node_id())

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
        from orchestrator.server import build_orchestrator

        self.orch = build_orchestrator(db_url, store_url, config_from_dict(config))
        self.interval = self.orch.config.reap_interval_s
        self.reaped = 0
        self.ticks = 0
        self._stopping: asyncio.Event | None = None

    async def run(self) -> None:
        """Reap expired leases and deadlines until stop() is called."""
        loop = asyncio.get_running_loop()
        self._stopping = self._stopping or asyncio.Event()
        while not self._stopping.is_set():
            try:
                self.reaped += await loop.run_in_executor(None, self.orch.jobs.reap)
            except Exception:  # keep the loop alive through a passing store error
                log.exception("reaper tick failed")
            self.ticks += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)

    async def stop(self) -> None:
        """End run() after its current tick (so shutdown is not mistaken for a crash to retry)."""
        self._stopping = self._stopping or asyncio.Event()
        self._stopping.set()

    async def stats(self) -> dict[str, Any]:
        """How much the loop has done since it (re)started, and on which node."""
        import ray

        return {"ticks": self.ticks, "reaped": self.reaped, "node_id": ray.get_runtime_context().get_node_id()}
