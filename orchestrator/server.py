"""Build the orchestrator and its gRPC server (a factory separate from main, so tests use it)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapters_store import open_store
from orchestrator.config import OrchestratorConfig
from orchestrator.lifecycle import Verifier, local_verifier
from orchestrator.polls import PollRunner, open_poll_runner
from orchestrator.service import Orchestrator
from orchestrator.servicers.agent import AgentServicer
from orchestrator.servicers.operator import OperatorServicer
from orchestrator.state import open_state
from protos.pocketlora.v1 import agent_service_pb2, operator_service_pb2
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
    # all of them. 2,000 agents enrolling at once lost ~170 calls that way (fleet_sim). A fleet
    # burst should queue and drain, so the limits are raised.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
]


def build_orchestrator(
    db_url: str, store_url: str, config: OrchestratorConfig, *, verifier: Verifier = local_verifier
) -> Orchestrator:
    """Open the state and blob stores a deployment names and wire the domain service."""
    return Orchestrator(open_state(db_url), open_store(store_url), config, verifier=verifier)


@dataclass
class RunningServer:
    """A started gRPC server and what it owns."""

    server: grpc.aio.Server
    port: int
    orch: Orchestrator
    polls: PollRunner
    executor: ThreadPoolExecutor

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving, then release the poll runner and the executor."""
        await self.server.stop(grace)
        await self.polls.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def start_server(
    orch: Orchestrator,
    listen: str = "127.0.0.1:0",
    *,
    threads: int = 0,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Start AgentService, OperatorService, health and reflection on `listen`; returns the bound
    port. `interceptors` wrap every call (metrics, tracing, load shedding)."""
    host = listen.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]") and not os.environ.get(ALLOW_NON_LOOPBACK_ENV):
        log.warning("listening on %s: the orchestrator is reachable beyond this machine", listen)
    executor = ThreadPoolExecutor(max_workers=threads or orch.state.worker_threads, thread_name_prefix="orch")
    polls = open_poll_runner(orch.state, orch.jobs, executor)
    server = grpc.aio.server(options=_OPTIONS, interceptors=list(interceptors))
    agent_grpc.add_AgentServiceServicer_to_server(AgentServicer(orch, polls, executor), server)
    operator_grpc.add_OperatorServiceServicer_to_server(OperatorServicer(orch, polls, executor), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
        operator_service_pb2.DESCRIPTOR.services_by_name["OperatorService"].full_name,
        reflection.SERVICE_NAME,
        health.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    for name in ("", *names[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, orch, polls, executor)


def new_secret() -> str:
    """A random token for operator or enrollment use."""
    return secrets.token_urlsafe(32)
