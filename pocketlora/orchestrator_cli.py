"""`pocketlora orchestrator serve` (the orchestrator on in-process Ray or a Ray cluster) and
`pocketlora orchestrator health` (a gRPC health check, for container probes and operators)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from pocketlora.cli_common import DEFAULT_STATE_DIR, UserError, err, orchestrator_app, out

SUPERVISE_EVERY_S = 2.0
# Tokens come from these variables, else from files in --state-dir (created with random values).
OPERATOR_TOKEN_ENV = "POCKETLORA_OPERATOR_TOKEN"
ENROLLMENT_TOKEN_ENV = "POCKETLORA_ENROLLMENT_TOKEN"
# The key every front end signs and checks file-store URLs with (64 hex digits).
URL_SECRET_ENV = "POCKETLORA_URL_SECRET"


def _say(line: str, *, to_err: bool = False) -> None:
    """One plain line (no wrapping, no markup: addresses like [::] print as they are)."""
    (err if to_err else out).print(line, soft_wrap=True, highlight=False, markup=False)


def _secret_file(path: Path, env: str) -> str:
    """A secret from the environment, else from a 0600 file (created with a random value)."""
    if os.environ.get(env):
        return os.environ[env]
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def _check_listen(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"{listen!r} must be HOST:PORT", param_hint="--listen")


def _check_stores(db: str, store: str) -> None:
    """Fail fast on bad URLs or unreachable stores, with the field named, before Ray starts."""
    from orchestrator.errors import InvalidArgument

    try:
        from adapters_store import open_store
        from orchestrator.state import open_state

        open_state(db).close()
        open_store(store).close()
    except InvalidArgument as exc:
        raise UserError(f"--{exc}") from None
    except Exception as exc:
        raise UserError(f"cannot open stores: {exc}") from None


@orchestrator_app.command("serve")
def serve(
    listen: Annotated[
        str, typer.Option(help="HOST:PORT every front end binds on its node (0.0.0.0 on a cluster).")
    ] = "127.0.0.1:50051",
    db: Annotated[
        str, typer.Option(help="sqlite:///path or postgresql://... (PostgreSQL for a cluster or several replicas).")
    ] = f"sqlite:///{DEFAULT_STATE_DIR}/state.db",
    store: Annotated[
        str,
        typer.Option(
            help="file:///abs/path or s3://bucket?endpoint=host:port (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)."
        ),
    ] = "",
    ray_address: Annotated[
        str,
        typer.Option(help="Attach to this Ray cluster (ray://head:10001 or head:6379) instead of in-process Ray."),
    ] = "",
    ray_code: Annotated[
        str,
        typer.Option(
            help="On a cluster: 'ship' uploads this PocketLoRA's code (runtime_env py_modules); 'installed' uses the nodes' own, checked to be this version."
        ),
    ] = "ship",
    replicas: Annotated[int, typer.Option(min=1, max=64, help="gRPC front ends (spread over ingress nodes).")] = 1,
    lease_s: Annotated[float, typer.Option(min=1.0, help="Lease length in seconds.")] = 60.0,
    reap_interval_s: Annotated[
        float, typer.Option(min=0.1, max=60.0, help="How often the control loop reaps expired leases.")
    ] = 1.0,
    state_dir: Annotated[Path, typer.Option(help="Where tokens are kept.")] = DEFAULT_STATE_DIR,
) -> None:
    """Run the orchestrator: gRPC front ends and the control loop on Ray, supervised until stopped."""
    from orchestrator.config import OrchestratorConfig
    from orchestrator.ray_layer import CODE_MODES, Deployment, DeploymentError, describe, health_check, init_ray

    _check_listen(listen)
    if ray_code not in CODE_MODES:
        raise typer.BadParameter(f"{ray_code!r}: one of {', '.join(CODE_MODES)}", param_hint="--ray-code")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = store or f"file://{(state_dir / 'blobs').resolve()}"
    operator_token = _secret_file(state_dir / "operator-token", OPERATOR_TOKEN_ENV)
    enrollment_token = _secret_file(state_dir / "enrollment-token", ENROLLMENT_TOKEN_ENV)
    # One presigned-URL key for every front end (they all sign and check file-store URLs).
    os.environ.setdefault(URL_SECRET_ENV, secrets.token_hex(32))
    config = OrchestratorConfig(
        lease_s=lease_s,
        reap_interval_s=reap_interval_s,
        operator_token=operator_token,
        enrollment_token=enrollment_token,
    )
    _check_stores(db, store)
    if ray_address and store.startswith("file:"):
        _say(
            "warning: a file:// store works on a cluster only if every node and device shares this machine", to_err=True
        )
    try:
        _say(init_ray(ray_address or None, code="installed" if ray_code == "installed" else "ship"))
        deployment = Deployment(db, store, config, listen=listen, replicas=replicas)
        endpoints = deployment.start()
    except DeploymentError as exc:
        raise UserError(str(exc)) from None
    for endpoint in endpoints:
        state = "healthy" if health_check(endpoint.address) else "NOT answering health checks"
        _say(f"{describe(endpoint)} ({state})")
    _say(f"control loop on node {deployment.control_node[:8]}")
    addresses = ", ".join(sorted({e.address for e in endpoints}))
    _say(f"orchestrator serving on {addresses} (db {db.split('@')[-1]}, {replicas} replica(s))")
    _say(f"operator token in {state_dir / 'operator-token'}, enrollment token in {state_dir / 'enrollment-token'}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(SUPERVISE_EVERY_S):
        for event in deployment.supervise():
            _say(event)
    deployment.stop()


@orchestrator_app.command("health")
def health(
    address: Annotated[
        str, typer.Option("--address", envvar="POCKETLORA_ORCHESTRATOR", help="Front end HOST:PORT.")
    ] = "127.0.0.1:50051",
    timeout_s: Annotated[float, typer.Option(min=0.1, help="Give up after this many seconds.")] = 5.0,
) -> None:
    """Exit 0 when the orchestrator at ADDRESS answers SERVING to a gRPC health check, else 1."""
    from orchestrator.ray_layer import health_check

    if ":" not in address:
        raise UserError(f"--address {address!r} must be HOST:PORT")
    if not health_check(address, timeout_s):
        raise UserError(f"{address} is not serving")
    _say(f"{address} serving")
