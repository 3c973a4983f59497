"""`pocketlora infer`: answer a prompt through a device agent's inference API (DeviceInferenceService
on its unix socket or loopback port), or with a runtime in this process (--local); the work is
in pocketlora/infer.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from pocketlora.cli_common import UserError, app


@app.command("infer")
def infer(
    prompt: Annotated[str, typer.Option(help="The user message.")],
    connect: Annotated[
        str,
        typer.Option(
            help="The agent's inference API: unix:/path or 127.0.0.1:PORT (default: WORK_DIR/inference.sock)."
        ),
    ] = "",
    work_dir: Annotated[Path, typer.Option(help="The agent's work dir, to find its socket.")] = Path(
        ".pocketlora/agent"
    ),
    adapter: Annotated[
        str,
        typer.Option(
            help="Remote: a resident adapter's name (default: the active one). Local: an adapter file or folder."
        ),
    ] = "",
    base: Annotated[bool, typer.Option("--base", help="Answer with the base model, no adapter.")] = False,
    local: Annotated[bool, typer.Option("--local", help="Run the runtime in this process instead.")] = False,
    bundle: Annotated[Path | None, typer.Option(help="Local ONNX runtime: the runtime bundle folder.")] = None,
    base_model: Annotated[Path | None, typer.Option(help="Local torch runtime: the base model folder.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=1024)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="0: greedy.")] = 0.0,
    stop: Annotated[list[str], typer.Option("--stop", help="Stop string (repeatable).")] = [],  # noqa: B006
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt without the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
) -> None:
    """Answer a prompt through the device agent's inference API, or in-process with --local."""
    import dataclasses
    import json

    import grpc

    from adapters_store.errors import StoreError
    from agent.runtime_base import AdapterRuntimeError, collect
    from pocketlora import infer as inf

    local = local or bundle is not None or base_model is not None
    ask = inf.Ask(prompt, adapter or None, base, max_new_tokens, temperature, tuple(stop), raw)
    if local:
        if (bundle is None) == (base_model is None):
            raise UserError("--local needs exactly one of --bundle (ONNX runtime) or --base-model (torch runtime)")
        model, backend = (bundle, "onnx") if bundle is not None else (base_model, "torch")
        assert model is not None
        wanted = "genai_config.json" if backend == "onnx" else "config.json"
        if not (model / wanted).is_file():
            raise UserError(f"--{'bundle' if backend == 'onnx' else 'base-model'} {model}: no {wanted} there")
        if adapter and not Path(adapter).exists():
            raise UserError(f"--adapter {adapter}: no such file or folder")
        chunks = inf.local(model, backend, Path(adapter) if adapter else None, ask)
    else:
        address = connect or f"unix:{(work_dir / 'inference.sock').resolve()}"
        chunks = inf.remote(address, ask)
    started = time.perf_counter()
    try:
        if as_json:
            result = collect(chunks, started)
            print(json.dumps(dataclasses.asdict(result)))
            return
        for chunk in chunks:
            print(chunk.text, end="", flush=True)
        print()
    except grpc.RpcError as exc:
        raise UserError(f"inference API: {exc.code().name}: {exc.details()}") from None
    except (AdapterRuntimeError, StoreError, OSError, ValueError) as exc:
        raise UserError(str(exc)) from None
