"""Placing and supervising the orchestrator's actors (Ray Serve's controller pattern, small).

Where things run on a cluster:
- Front ends: `replicas` FrontendActors, each needing one unit of the ingress resource, spread
  over the nodes that offer it (SPREAD). Each binds the listen address on its own node, so
  clients reach them at that node's address (a load balancer, a Kubernetes Service or a DNS
  name over the ingress nodes). Two replicas on one node share a fixed port (SO_REUSEPORT).
- Control loop: one named actor anywhere with a little CPU; Ray restarts it on another node when
  its node dies (max_restarts=-1) and retries its run() call there (max_task_retries=-1).
- Verification: Ray tasks started by the front ends (actors.verify_blob).

`Deployment.supervise()` (the serve command calls it every few seconds) replaces a front end
whose actor died (its node was lost) with a new one placed the same way, and health-checks each
endpoint from the driver; one that keeps failing is killed and replaced. A plaintext endpoint
gets a gRPC health check; a TLS one (whose clients must present certificates the serve process
does not hold) a TCP connect, while the actor's own liveness is checked by ping either way.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import OrchestratorConfig
from orchestrator.ray_layer import probe
from orchestrator.ray_layer.actors import (
    CONTROL_ACTOR_NAME,
    CONTROL_CPUS,
    ControlLoopActor,
    Endpoint,
    FrontendActor,
    FrontendServing,
    config_to_dict,
)
from orchestrator.ray_layer.runtime import INGRESS_RESOURCE, DeploymentError, ForwardedEnv, ingress_capacity
from pocketlora.tls import TlsConfig, open_channel

log = logging.getLogger("pocketlora.orchestrator")
START_TIMEOUT_S = 300.0
CALL_TIMEOUT_S = 10.0
# gRPC health checks of live front ends: how often, how long one may take, and how many in a
# row a front end may fail before it is replaced. Generous, so a front end that is only busy
# (a burst of devices) is never killed: a minute of silence is a hang, not load.
HEALTH_EVERY_S = 10.0
HEALTH_TIMEOUT_S = 10.0
UNHEALTHY_LIMIT = 6


def health_check(address: str, timeout_s: float = 5.0, tls: TlsConfig | None = None) -> bool:
    """True when the gRPC health service at `address` answers SERVING (over TLS with `tls`, a
    client's material: the CA that signed the server, and a client certificate for mutual TLS)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with open_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def port_open(address: str, timeout_s: float = 5.0) -> bool:
    """True when a TCP connection to `address` (HOST:PORT) succeeds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass
class _Replica:
    index: int
    actor: Any = None
    starting: Any = None  # ObjectRef of start() while it runs
    endpoint: Endpoint | None = None
    failed_checks: int = 0
    checked_at: float = 0.0
    history: list[str] = field(default_factory=list)


class Deployment:
    """The control loop and `replicas` front ends of one orchestrator on the Ray this process joined."""

    def __init__(
        self,
        db_url: str,
        store_url: str,
        config: OrchestratorConfig,
        *,
        listen: str = "127.0.0.1:0",
        replicas: int = 1,
        env: ForwardedEnv | None = None,
        tls: TlsConfig | None = None,
        insecure: bool = False,
        http_listen: str = "",
    ) -> None:
        """Front ends serve TLS when `tls` is given (client certificates required when it has a
        CA); with `http_listen` (HOST:PORT) replica i also serves HTTP on PORT + i (port 0: each
        picks a free one)."""
        self.db_url, self.store_url, self.listen = db_url, store_url, listen
        self.tls, self.insecure, self.http_listen = tls, insecure, http_listen
        self.config = config_to_dict(config)
        self.env = env or ForwardedEnv.from_environ()
        self.expected = probe.fingerprint()
        self.replicas = [_Replica(i) for i in range(replicas)]
        self.control: Any = None
        self.control_node = ""

    # ------------------------------------------------------------------ start and stop
    def start(self, timeout_s: float = START_TIMEOUT_S) -> list[Endpoint]:
        """Start the control loop and every front end; returns the endpoints once all serve."""
        import ray

        if ingress_capacity() < len(self.replicas):
            raise DeploymentError(
                f"{len(self.replicas)} front end(s) need as many units of the {INGRESS_RESOURCE!r} resource; "
                f"the cluster offers {ingress_capacity():g}. Start the nodes that receive client traffic with "
                f"`ray start ... --resources '{{\"{INGRESS_RESOURCE}\": 2}}'`."
            )
        self._launch_control()
        for replica in self.replicas:
            self._launch(replica)
        try:
            for replica in self.replicas:
                replica.endpoint = ray.get(replica.starting, timeout=timeout_s)
                replica.starting = None
            self.control_node = self._control_stats(timeout_s).get("node_id", "")
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise DeploymentError(f"the front ends did not start within {timeout_s:.0f} s") from None
        except ray.exceptions.RayError as exc:
            self.stop()
            raise DeploymentError(f"the orchestrator's actors failed to start: {_last_line(exc)}") from None
        return self.endpoints()

    def _launch_control(self) -> None:
        import ray

        control_cls = ray.remote(  # type: ignore[call-overload]  # Ray's stubs omit max_concurrency
            num_cpus=CONTROL_CPUS, max_restarts=-1, max_task_retries=-1, max_concurrency=4
        )(ControlLoopActor)
        self.control = control_cls.options(name=CONTROL_ACTOR_NAME, get_if_exists=True).remote(
            self.db_url, self.store_url, self.config, self.env, self.expected
        )
        self.control.run.remote()

    def _launch(self, replica: _Replica) -> None:
        import ray

        frontend_cls = ray.remote(  # type: ignore[call-overload]
            num_cpus=0, resources={INGRESS_RESOURCE: 1}, max_restarts=0, max_concurrency=64
        )(FrontendActor)
        replica.actor = frontend_cls.options(scheduling_strategy="SPREAD").remote(
            replica.index,
            self.db_url,
            self.store_url,
            self.config,
            self.listen,
            self.env,
            self.expected,
            FrontendServing(self.tls, self.insecure, _http_for(self.http_listen, replica.index)),
        )
        replica.starting = replica.actor.start.remote()
        replica.endpoint = None
        replica.failed_checks = 0

    def stop(self) -> None:
        """Stop the front ends, then the control loop."""
        import ray

        for replica in self.replicas:
            if replica.actor is None:
                continue
            with contextlib.suppress(Exception):  # already gone
                ray.get(replica.actor.stop.remote(), timeout=CALL_TIMEOUT_S)
            with contextlib.suppress(Exception):
                ray.kill(replica.actor)
            replica.actor = None
        if self.control is not None:
            with contextlib.suppress(Exception):
                ray.get(self.control.stop.remote(), timeout=CALL_TIMEOUT_S)
            with contextlib.suppress(Exception):
                ray.kill(self.control, no_restart=True)
            self.control = None

    # ------------------------------------------------------------------ what runs where
    def endpoints(self) -> list[Endpoint]:
        """The endpoints of the front ends that serve now."""
        return [r.endpoint for r in self.replicas if r.endpoint is not None]

    @property
    def ports(self) -> list[int]:
        """Bound ports, one per serving front end."""
        return [e.port for e in self.endpoints()]

    def http_ports(self) -> list[int]:
        """Each serving front end's HTTP port (0 for one without a listener)."""
        return [e.http_port for e in self.endpoints()]

    def healthy(self, endpoint: Endpoint, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
        """The driver's check of one endpoint: gRPC health when plaintext, a TCP connect over TLS."""
        if self.tls is None:
            return health_check(endpoint.address, timeout_s)
        return port_open(endpoint.address, timeout_s)

    def _control_stats(self, timeout_s: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        import ray

        try:
            stats: dict[str, Any] = ray.get(self.control.stats.remote(), timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            return {}  # restarting: Ray brings it back on a live node
        return stats

    # ------------------------------------------------------------------ supervision
    def supervise(self) -> list[str]:
        """Replace lost or unhealthy front ends and notice the control loop moving; returns what
        happened, one line per event."""
        import ray

        events: list[str] = []
        for replica in self.replicas:
            events += self._supervise_replica(ray, replica)
        try:
            node = self._control_stats().get("node_id", "")
        except ray.exceptions.ActorDiedError:
            # Out of restarts, or an actor of an earlier serve process adopted by name that
            # ended with its owner: start a new one.
            self._launch_control()
            return [*events, "control loop was gone; started a new one"]
        if node and node != self.control_node:
            events.append(f"control loop now on node {node[:8]} (was {self.control_node[:8] or '?'})")
            self.control_node = node
        return events

    def _supervise_replica(self, ray: Any, replica: _Replica) -> list[str]:
        if replica.starting is not None:
            done, _ = ray.wait([replica.starting], timeout=0)
            if not done:
                return []
            try:
                replica.endpoint = ray.get(replica.starting)
            except ray.exceptions.RayError as exc:
                replica.starting = None
                self._launch(replica)
                return [f"front end {replica.index} failed to start ({type(exc).__name__}); retrying"]
            replica.starting = None
            assert replica.endpoint is not None
            return [f"front end {replica.index} serving on {_where(replica.endpoint)} (replacement)"]
        assert replica.endpoint is not None
        try:
            ray.get(replica.actor.ping.remote(), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.ActorDiedError:
            lost = replica.endpoint
            self._launch(replica)
            return [f"front end {replica.index} on node {lost.node_id[:8]} is gone; starting a replacement"]
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            return [f"front end {replica.index} on node {replica.endpoint.node_id[:8]} did not answer a ping"]
        if time.monotonic() - replica.checked_at < HEALTH_EVERY_S:
            return []
        replica.checked_at = time.monotonic()
        if self.healthy(replica.endpoint):
            replica.failed_checks = 0
            return []
        replica.failed_checks += 1
        if replica.failed_checks < UNHEALTHY_LIMIT:
            return [f"front end {replica.index} at {replica.endpoint.address} failed a health check"]
        with contextlib.suppress(Exception):
            ray.kill(replica.actor)
        self._launch(replica)
        return [f"front end {replica.index} failed {UNHEALTHY_LIMIT} health checks; replaced"]


def _http_for(http_listen: str, index: int) -> str:
    """Replica `index`'s HTTP listener: PORT + index, or port 0 (any) for all."""
    if not http_listen:
        return ""
    host, port = http_listen.rsplit(":", 1)
    return f"{host}:{int(port) + index if int(port) else 0}"


def _last_line(exc: Exception) -> str:
    """The last line of a Ray error: the original exception, without Ray's traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _where(endpoint: Endpoint) -> str:
    return f"{endpoint.address} on node {endpoint.node_id[:8]}"


def describe(endpoint: Endpoint) -> str:
    """One line for an endpoint, as the serve command prints it."""
    http = f", HTTP on port {endpoint.http_port}" if endpoint.http_port else ""
    return f"front end {endpoint.replica} serving on {_where(endpoint)}{http}"
