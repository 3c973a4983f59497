"""Build the orchestrator and its gRPC server (a factory separate from main, so tests use it)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters_store import open_store
from adapters_store.runtime_bundle import BundleSettings
from orchestrator.config import OrchestratorConfig
from orchestrator.feed import ChangeFeed
from orchestrator.http.server import HttpServer, start_http
from orchestrator.lifecycle import Verifier, local_verifier
from orchestrator.limits import Gatekeeper, LimitsInterceptor
from orchestrator.metrics import Sample
from orchestrator.operators import BOOTSTRAP_ADMIN
from orchestrator.polls import PollRunner, open_poll_runner
from orchestrator.runtime_forms import RuntimeForms
from orchestrator.service import Orchestrator
from orchestrator.servicers.admin import AdminServicer
from orchestrator.servicers.agent import AgentServicer
from orchestrator.servicers.interceptor import RpcMetrics
from orchestrator.servicers.operator import OperatorServicer
from orchestrator.state import open_state
from pocketlora.tls import TlsConfig, check_listen
from protos.pocketlora.v1 import admin_service_pb2, agent_service_pb2, operator_service_pb2
from protos.pocketlora.v1 import admin_service_pb2_grpc as admin_grpc
from protos.pocketlora.v1 import agent_service_pb2_grpc as agent_grpc
from protos.pocketlora.v1 import operator_service_pb2_grpc as operator_grpc

log = logging.getLogger("pocketlora.orchestrator")
# Set to listen beyond loopback without a warning (deployments whose front ends bind 0.0.0.0).
ALLOW_NON_LOOPBACK_ENV = "POCKETLORA_ALLOW_NON_LOOPBACK"

# Bounded messages: a device never needs more than this, and a bad client cannot balloon memory.
_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 2**20),
    ("grpc.max_send_message_length", 16 * 2**20),
    ("grpc.so_reuseport", 1),
    # grpc.aio asks the core for one call per method at a time, so a burst (a fleet enrolling
    # or reconnecting at once) waits in the core's backlog; past 1,000 pending calls the core
    # drops them at random (random early detection) and the devices see CANCELLED, past 3,000
    # all of them. A fleet burst should queue and drain, so the limits are raised.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    # Connections: ping idle ones so dead peers are noticed, close ones idle for long, and make
    # every client reconnect now and then so that load spreads over replicas added later.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_connection_idle_ms", 10 * 60_000),
    ("grpc.max_connection_age_ms", 30 * 60_000),
    ("grpc.max_connection_age_grace_ms", 60_000),
]


def build_orchestrator(
    db_url: str,
    store_url: str,
    config: OrchestratorConfig,
    *,
    verifier: Verifier = local_verifier,
    forms: dict[str, Any] | None = None,
) -> Orchestrator:
    """Open the state and blob stores a deployment names and wire the domain service.

    `forms` are keyword arguments of RuntimeForms (exporter, converter, exports) when the
    config names runtime bases.
    """
    store = open_store(store_url)
    runtime_forms = None
    if config.runtime_bases:
        settings = BundleSettings(precision=config.bundle_precision)
        runtime_forms = RuntimeForms(store, config.runtime_bases, settings, **(forms or {}))
    return Orchestrator(open_state(db_url), store, config, verifier=verifier, runtime_forms=runtime_forms)


@dataclass
class RunningServer:
    """A started gRPC server and what it owns."""

    server: grpc.aio.Server
    port: int
    orch: Orchestrator
    polls: PollRunner
    executor: ThreadPoolExecutor
    feed: ChangeFeed
    http: HttpServer | None = None

    @property
    def http_port(self) -> int:
        """The HTTP listener's port (0 when there is none)."""
        return self.http.port if self.http is not None else 0

    async def stop(self, grace: float = 1.0) -> None:
        """End the watches (their clients hear the server is stopping), stop serving HTTP, then
        gRPC, then release the poll runner and the executor."""
        await self.feed.close()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace)
        await self.polls.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def start_server(
    orch: Orchestrator,
    listen: str = "127.0.0.1:0",
    *,
    threads: int = 0,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    tls: TlsConfig | None = None,
    insecure: bool = False,
    http_listen: str = "",
    remote_metrics: Callable[[], Iterable[Sample]] | None = None,
) -> RunningServer:
    """Start AgentService, OperatorService, health and reflection on `listen`; returns the bound
    port. Every call is counted and timed (RpcMetrics); `interceptors` wrap calls after that
    (tracing, load shedding). With `tls` the port serves TLS only (and requires client
    certificates when `tls.ca` is set); plaintext beyond loopback is refused unless `insecure`
    (TlsConfigError). `http_listen` (HOST:PORT) also serves /metrics, the JSON API and the web
    console (orchestrator/http/); `remote_metrics` adds another process's domain metrics to
    /metrics (the Ray control loop's)."""
    check_listen(listen, tls, insecure)
    executor = ThreadPoolExecutor(max_workers=threads or orch.state.worker_threads, thread_name_prefix="orch")
    if orch.operators.ensure_bootstrap_admin():
        log.info("registered the bootstrap token as the first admin's (operator %r)", BOOTSTRAP_ADMIN)
    polls = open_poll_runner(orch.state, orch.jobs, executor)
    gate = Gatekeeper(orch.config.limits, orch.identity, orch.operators)
    loop = asyncio.get_running_loop()

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await loop.run_in_executor(executor, fn, *args)

    feed = ChangeFeed(orch.queries, run)
    server = grpc.aio.server(options=_OPTIONS, interceptors=[RpcMetrics(), LimitsInterceptor(gate), *interceptors])
    agent_grpc.add_AgentServiceServicer_to_server(AgentServicer(orch, polls, executor, gate), server)
    operator_grpc.add_OperatorServiceServicer_to_server(OperatorServicer(orch, polls, executor, gate, feed), server)
    admin_grpc.add_AdminServiceServicer_to_server(AdminServicer(orch, polls, executor, gate), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        operator_service_pb2.DESCRIPTOR.services_by_name["OperatorService"].full_name,
        admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
        reflection.SERVICE_NAME,
        health.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_secure_port(listen, tls.server_credentials()) if tls else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ("", *names[:3]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, port, orch, polls, executor, feed)
    if http_listen:
        _warn_if_exposed(http_listen)
        try:
            running.http = await start_http(orch, feed, run, http_listen, gate, remote_metrics=remote_metrics)
        except BaseException:
            await running.stop(0)
            raise
    return running


def _warn_if_exposed(listen: str) -> None:
    host = listen.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]") and not os.environ.get("POCKETLORA_ALLOW_NON_LOOPBACK"):
        log.warning("listening on %s: the orchestrator is reachable beyond this machine", listen)


def new_secret() -> str:
    """A random token for operator or enrollment use."""
    return secrets.token_urlsafe(32)
