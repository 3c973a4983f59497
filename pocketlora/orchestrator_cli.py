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

from pocketlora.cli_common import DEFAULT_STATE_DIR, UserError, err, orchestrator_app, out, root_client_tls

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


def _check_listen(listen: str, flag: str = "--listen") -> None:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"{listen!r} must be HOST:PORT", param_hint=flag)


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


def _runtime_bases(values: list[str]) -> dict[str, str]:
    """--runtime-base [ID=]DIR values as {id: absolute folder}."""
    bases = {}
    for value in values:
        base_id, sep, folder = value.partition("=")
        path = Path(folder if sep else value).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise typer.BadParameter(f"{value!r}: no config.json in {path}", param_hint="--runtime-base")
        bases[base_id if sep else path.name] = str(path)
    return bases


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
    http_listen: Annotated[
        str,
        typer.Option(
            help="HOST:PORT for /metrics, the JSON API and the web console (default: off); replica i uses PORT+i."
        ),
    ] = "",
    lease_s: Annotated[float, typer.Option(min=1.0, help="Lease length in seconds.")] = 60.0,
    reap_interval_s: Annotated[
        float, typer.Option(min=0.1, max=60.0, help="How often the control loop reaps expired leases.")
    ] = 1.0,
    state_dir: Annotated[Path, typer.Option(help="Where tokens are kept.")] = DEFAULT_STATE_DIR,
    bootstrap: Annotated[
        bool,
        typer.Option(
            "--bootstrap/--no-bootstrap",
            help="Register the bootstrap operator token (POCKETLORA_OPERATOR_TOKEN, else STATE_DIR/operator-token)"
            " as the first admin's when no admin exists yet.",
        ),
    ] = True,
    runtime_base: Annotated[
        list[str],
        typer.Option(
            help="[ID=]DIR of a base model to export a runtime bundle for (ONNX devices); repeatable. ID defaults to the folder name."
        ),
    ] = [],  # noqa: B006
    bundle_precision: Annotated[str, typer.Option(help="Bundle weights: int4 | fp32.")] = "int4",
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Serve TLS with this certificate chain (PEM).", show_default=False)
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="The private key (PEM) of --tls-cert.", show_default=False)
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-client-ca",
            help="Require client certificates signed by this CA (mutual TLS); a device's must name its id.",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow plaintext gRPC on a non-loopback --listen address.")
    ] = False,
) -> None:
    """Run the orchestrator: gRPC front ends and the control loop on Ray, supervised until stopped."""
    from orchestrator.config import OrchestratorConfig
    from orchestrator.ray_layer import CODE_MODES, Deployment, DeploymentError, describe, init_ray
    from pocketlora.tls import TlsConfigError, check_listen, load_server_tls

    _check_listen(listen)
    if bundle_precision not in ("int4", "fp32"):
        raise typer.BadParameter(f"{bundle_precision!r} is not int4 or fp32", param_hint="--bundle-precision")
    if http_listen:
        _check_listen(http_listen, "--http-listen")
    if ray_code not in CODE_MODES:
        raise typer.BadParameter(f"{ray_code!r}: one of {', '.join(CODE_MODES)}", param_hint="--ray-code")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        tls = load_server_tls(tls_cert, tls_key, tls_client_ca)
        check_listen(listen, tls, insecure)
    except TlsConfigError as exc:
        raise UserError(str(exc)) from None
    if insecure and tls is None:
        _say(f"INSECURE: plaintext gRPC on {listen}: tokens and credentials travel in clear", to_err=True)
    store = store or f"file://{(state_dir / 'blobs').resolve()}"
    operator_token = _secret_file(state_dir / "operator-token", OPERATOR_TOKEN_ENV) if bootstrap else ""
    enrollment_token = _secret_file(state_dir / "enrollment-token", ENROLLMENT_TOKEN_ENV)
    # One presigned-URL key for every front end (they all sign and check file-store URLs).
    os.environ.setdefault(URL_SECRET_ENV, secrets.token_hex(32))
    config = OrchestratorConfig(
        lease_s=lease_s,
        reap_interval_s=reap_interval_s,
        bootstrap_token=operator_token,
        enrollment_token=enrollment_token,
        runtime_bases=_runtime_bases(runtime_base),
        bundle_precision=bundle_precision,
    )
    _check_stores(db, store)
    if ray_address and store.startswith("file:"):
        _say(
            "warning: a file:// store works on a cluster only if every node and device shares this machine", to_err=True
        )
    try:
        _say(init_ray(ray_address or None, code="installed" if ray_code == "installed" else "ship"))
        deployment = Deployment(
            db, store, config, listen=listen, replicas=replicas, tls=tls, insecure=insecure, http_listen=http_listen
        )
        endpoints = deployment.start()
    except DeploymentError as exc:
        raise UserError(str(exc)) from None
    checked = "health check" if tls is None else "port reachable over TCP"
    for endpoint in endpoints:
        state = "healthy" if deployment.healthy(endpoint) else f"NOT passing its {checked}"
        _say(f"{describe(endpoint)} ({state})")
    _say(f"control loop on node {deployment.control_node[:8]}")
    addresses = ", ".join(sorted({e.address for e in endpoints}))
    security = "plaintext" if tls is None else "TLS, client certificates required" if tls.ca else "TLS"
    _say(f"orchestrator serving on {addresses} ({security}; db {db.split('@')[-1]}, {replicas} replica(s))")
    for endpoint in endpoints:
        if endpoint.http_port:
            where = f"http://{endpoint.host}:{endpoint.http_port}/"
            _say(f"web console on {where} (operator token required), metrics on {where}metrics")
    if bootstrap:
        _say(f"bootstrap admin token in {state_dir / 'operator-token'} (it creates the first admin)")
    _say(f"enrollment token in {state_dir / 'enrollment-token'}")
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
    """Exit 0 when the orchestrator at ADDRESS answers SERVING to a gRPC health check, else 1
    (over TLS with the root --tls-* options)."""
    from orchestrator.ray_layer import health_check

    if ":" not in address:
        raise UserError(f"--address {address!r} must be HOST:PORT")
    if not health_check(address, timeout_s, root_client_tls()):
        raise UserError(f"{address} is not serving")
    _say(f"{address} serving")
