"""All Ray API calls live in this package: the orchestrator as a Ray application.

Plain classes hold the logic (orchestrator.service.Orchestrator); this package turns them into
actors and tasks (Ray Serve's controller pattern):

- runtime.py: in-process Ray or attaching to a cluster, shipping the project's code there
  (runtime_env py_modules) or checking the cluster's own installation, and the environment
  (credentials) actors receive without it reaching Ray's logs.
- actors.py: FrontendActor (one gRPC front end, with TLS and an HTTP listener), ControlLoopActor
  (Orchestrator.control_tick: lease reaper, deadlines, campaigns, rollouts), verify_blob (adapter
  verification as a Ray task) and unwrap_ray_errors (a task's own error, not Ray's wrapper).
- deployment.py: where they run (front ends spread over ingress nodes, the control loop
  restartable anywhere) and supervision (lost front ends replaced, endpoints health-checked).
- forms.py: runtime bundle exports and adapter conversions (.onnx_adapter) as Ray tasks.
- probe.py: the versions and code digest compared between the driver and every node.
"""

from __future__ import annotations

from orchestrator.ray_layer.actors import CONTROL_ACTOR_NAME, Endpoint, unwrap_ray_errors
from orchestrator.ray_layer.deployment import Deployment, describe, health_check, port_open
from orchestrator.ray_layer.runtime import (
    CODE_MODES,
    INGRESS_RESOURCE,
    NAMESPACE,
    CodeMode,
    DeploymentError,
    ForwardedEnv,
    init_ray,
    node_count,
    ray_env,
)

__all__ = [
    "CODE_MODES",
    "CONTROL_ACTOR_NAME",
    "INGRESS_RESOURCE",
    "NAMESPACE",
    "CodeMode",
    "Deployment",
    "DeploymentError",
    "Endpoint",
    "ForwardedEnv",
    "describe",
    "health_check",
    "init_ray",
    "node_count",
    "port_open",
    "ray_env",
    "unwrap_ray_errors",
]
