"""Connecting to Ray: in-process or a cluster, the project's code on the cluster, and what the
actors' environment carries.

Code on a cluster (`--ray-code`):
- `ship` (default): the driver uploads the server-side packages (orchestrator, adapters_store,
  protos, pocketlora) as the job's runtime_env `py_modules`; every worker of this job imports
  them ahead of anything installed on the node. The nodes need only Ray and the pinned
  dependencies (the project's image, or any image with the same versions).
- `installed`: nothing is uploaded; the nodes' own installation must be this very version.
Either way, before anything starts, a probe runs on every live node and compares Python, the
server dependencies, the project version and a digest of its code with the driver's; a
mismatch stops start-up with one line per node (DeploymentError), not a traceback in an actor.

Secrets (PostgreSQL and S3 credentials, the presigned-URL key) never go into the runtime env:
Ray writes runtime envs into its logs and job table. They travel as an actor/task argument
(ForwardedEnv) and are applied inside the actor's own process.

`ray` is imported inside functions: it reads some settings (loopback binding) at import time,
and init_ray sets them first.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchestrator.ray_layer import probe

NAMESPACE = "pocketlora"
# Front ends run only on nodes that offer this custom resource (nodes that receive client traffic).
INGRESS_RESOURCE = "pocketlora_ingress"
CodeMode = Literal["ship", "installed"]
CODE_MODES: tuple[CodeMode, ...] = ("ship", "installed")
# Environment the actors and tasks get from the serve process (libpq, S3, PocketLoRA, offline HF).
FORWARDED_PREFIXES = ("PG", "AWS_", "POCKETLORA_", "HF_", "TRANSFORMERS_")
PROBE_TIMEOUT_S = 180.0
ATTACH_ATTEMPTS = 3
log = logging.getLogger("pocketlora.orchestrator")


class DeploymentError(Exception):
    """The orchestrator cannot start on this Ray: another version there, no ingress nodes, an
    actor that failed to start (its one-line reason)."""


@dataclass(frozen=True)
class ForwardedEnv:
    """Environment variables handed to actors and tasks as an argument; repr never shows values."""

    values: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ForwardedEnv:
        """The forwarded subset of an environment (os.environ by default)."""
        environ = os.environ if environ is None else environ
        return cls({k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES) and k.isupper()})

    def apply(self) -> None:
        """Set the variables in this process (an actor's own worker process)."""
        os.environ.update(self.values)

    def __repr__(self) -> str:
        return f"ForwardedEnv({', '.join(sorted(self.values))})"


def ray_env(tmp_root: Path | None = None) -> dict[str, str]:
    """Environment that keeps an in-process Ray on 127.0.0.1, quiet, and telemetry off."""
    tmp = tmp_root or Path(tempfile.gettempdir()) / f"pocketlora-ray-{os.getuid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        # The only setting seen to make every Ray server bind 127.0.0.1 (_node_ip_address is
        # ignored). It also stops a node from joining a cluster, so only in-process Ray gets it.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(tmp),
        "RAY_DEDUP_LOGS": "0",
    }


def shipped_modules() -> list[str]:
    """Folders of the server-side packages, as runtime_env py_modules takes them (paths work
    through Ray Client too; module objects do not)."""
    folders = [probe.package_dir(name) for name in probe.SERVER_PACKAGES]
    return [str(f) for f in folders if f is not None]


def init_ray(
    address: str | None = None,
    *,
    code: CodeMode = "ship",
    num_cpus: int | None = None,
    tmp_root: Path | None = None,
) -> str:
    """Start an in-process Ray, or attach to a cluster (`ray://host:10001`, `host:6379`, `auto`)
    and check that it can run this code. Returns one line saying where the code comes from."""
    if not address:
        os.environ.update(ray_env(tmp_root))
    import ray

    if ray.is_initialized():
        return "Ray already initialised in this process"
    if not address:
        # address="local": a bare ray.init() would attach to any leftover cluster in RAY_TMPDIR.
        ray.init(
            address="local",
            namespace=NAMESPACE,
            num_cpus=num_cpus or max(os.cpu_count() or 2, 2),
            resources={INGRESS_RESOURCE: 64},
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            object_store_memory=200 * 2**20,
        )
        return "code: this process's (in-process Ray)"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _attach(address, code)
    return check_cluster(code)


def _attach(address: str, code: CodeMode) -> None:
    import ray

    runtime_env: dict[str, Any] = {}
    if code == "ship":
        runtime_env = {"py_modules": shipped_modules(), "excludes": ["__pycache__", "*.pyc"]}
    for attempt in range(1, ATTACH_ATTEMPTS + 1):
        try:
            ray.init(
                address=address,
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
                runtime_env=runtime_env,
            )
            return
        except (ConnectionError, RuntimeError, ValueError) as exc:
            # A head still starting, or a Ray Client server that failed to start for us.
            ray.shutdown()
            if attempt == ATTACH_ATTEMPTS:
                raise DeploymentError(f"cannot attach to the Ray cluster at {address}: {exc}") from None
            log.warning("attaching to the Ray cluster at %s failed (%s); retrying", address, str(exc).splitlines()[0])
            time.sleep(5.0 * attempt)


def node_count() -> int:
    """Live nodes of the Ray this process joined."""
    return len(_alive_nodes())


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]


def check_cluster(code: CodeMode) -> str:
    """Probe every live node; raise DeploymentError naming each node that differs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.cloudpickle.register_pickle_by_value(probe)  # type: ignore[no-untyped-call]
    mine = probe.fingerprint()
    take = ray.remote(num_cpus=0, max_retries=1)(probe.fingerprint)
    nodes = _alive_nodes()
    refs = [
        take.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
        for n in nodes
    ]
    try:
        found = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise DeploymentError(f"the cluster did not run the version probe within {PROBE_TIMEOUT_S:.0f} s") from None
    problems = []
    for node, theirs in zip(nodes, found, strict=True):
        diff = probe.differences(mine, theirs)
        if diff:
            problems.append(f"  node {node['NodeID'][:8]} ({node['NodeManagerAddress']}): {'; '.join(diff)}")
    if problems:
        hint = (
            "the nodes need Ray and the pinned dependencies of this version"
            if code == "ship"
            else "ship the code (--ray-code ship) or install this PocketLoRA version on the cluster"
        )
        raise DeploymentError(
            f"the Ray cluster cannot run this PocketLoRA {mine['pocketlora']} ({hint}):\n" + "\n".join(problems)
        )
    source = (
        f"shipped to the cluster as runtime_env py_modules ({', '.join(probe.SERVER_PACKAGES)})"
        if code == "ship"
        else "the cluster's own installation"
    )
    return f"code: {source}; pocketlora {mine['pocketlora']}, code sha256 {mine['code'][:12]}, checked on {len(nodes)} node(s)"


def ingress_capacity() -> float:
    """Units of the ingress resource the live cluster offers (front ends need one each)."""
    import ray

    return float(ray.cluster_resources().get(INGRESS_RESOURCE, 0.0))  # type: ignore[no-untyped-call]
