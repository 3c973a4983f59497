"""Job commands: submit (with a dataset on the device or shipped through the store), list, get,
cancel and watch.

Every failure a user can cause ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pocketlora.cli_common import (
    Address,
    AsJson,
    Token,
    UserError,
    call,
    client,
    dump,
    job_app,
    out,
    parse_states,
    print_json,
    show,
    state_name,
)
from pocketlora.client import DEFAULT_ADDRESS
from protos.pocketlora.v1 import operator_service_pb2 as op
from protos.pocketlora.v1 import types_pb2 as tpb


def _jobs_table(jobs: list[Any]) -> Table:
    table = Table("job", "device", "state", "attempt", "progress", "loss", "adapter", "status")
    for j in jobs:
        prog = f"{j.progress.step}/{j.progress.total_steps}" if j.progress.total_steps else "-"
        loss = f"{j.progress.loss:.3f}" if j.progress.total_steps else "-"
        table.add_row(
            j.job_id,
            j.device_id,
            state_name(j.state),
            f"{j.attempt}/{j.max_attempts}",
            prog,
            loss,
            j.adapter_id or "-",
            j.status_message or j.last_error or "",
        )
    return table


# ---------------------------------------------------------------------- jobs
_MIXED_PRECISION = {
    "auto": tpb.MIXED_PRECISION_UNSPECIFIED,
    "fp32": tpb.MIXED_PRECISION_FP32,
    "bf16": tpb.MIXED_PRECISION_BF16,
    "fp16": tpb.MIXED_PRECISION_FP16,
}


@job_app.command("submit")
def job_submit(
    device_id: Annotated[str, typer.Option("--device-id", help="Device that trains the adapter.")],
    dataset: Annotated[
        str, typer.Option("--dataset", help="Name of a dataset in the device's dataset directory.")
    ] = "",
    dataset_file: Annotated[
        Path | None,
        typer.Option("--dataset-file", help="Or: a local JSONL file to ship to the device through the store."),
    ] = None,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            envvar="POCKETLORA_STORE",
            help="Store URL for --dataset-file (credentials from the environment).",
        ),
    ] = "",
    adapter_name: Annotated[
        str, typer.Option("--adapter-name", help="Adapter name (versions count per device and name).")
    ] = "personal",
    base_model_id: Annotated[
        str, typer.Option("--base-model-id", help="Base model the device must have.")
    ] = "SmolLM2-135M-Instruct",
    rank: Annotated[int, typer.Option(min=1, max=256, help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(min=0.0, help="LoRA alpha (0: the default).")] = 0.0,
    learning_rate: Annotated[
        float, typer.Option("--lr", min=0.0, max=1.0, help="AdamW learning rate (0: 2e-4).")
    ] = 0.0,
    epochs: Annotated[int, typer.Option(min=0, help="Passes over the data (0: 3).")] = 0,
    max_steps: Annotated[int, typer.Option(min=0, help="Optimizer steps (0: from epochs).")] = 0,
    max_seq_len: Annotated[int, typer.Option(min=0, help="Longest example in tokens (0: 256).")] = 0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    quantization: Annotated[str, typer.Option(help="nf4 or none.")] = "nf4",
    double_quant: Annotated[
        bool, typer.Option("--double-quant/--no-double-quant", help="NF4 double quantization of the block scales.")
    ] = True,
    mixed_precision: Annotated[
        str,
        typer.Option(help="auto (bf16 where the device computes bfloat16 natively, else fp32), fp32, bf16 or fp16."),
    ] = "auto",
    max_attempts: Annotated[int, typer.Option(min=0, max=100, help="Attempts (0: 6).")] = 0,
    request_id: Annotated[str, typer.Option(help="Idempotency key (default: random).")] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Queue a training job for one device."""
    if quantization not in ("nf4", "none"):
        raise typer.BadParameter(f"{quantization!r} is not nf4 or none", param_hint="--quantization")
    precision = _MIXED_PRECISION.get(mixed_precision)
    if precision is None:
        raise typer.BadParameter(
            f"{mixed_precision!r} is not one of {', '.join(_MIXED_PRECISION)}", param_hint="--mixed-precision"
        )
    if bool(dataset) == (dataset_file is not None):
        raise typer.BadParameter(
            "give exactly one of --dataset (on the device) and --dataset-file (shipped)", param_hint="--dataset"
        )
    shipped, shipped_sha = ("", "") if dataset_file is None else _ship_dataset(dataset_file, store)
    spec = tpb.TrainingSpec(
        adapter_name=adapter_name,
        base_model_id=base_model_id,
        dataset=dataset,
        dataset_object=shipped,
        dataset_sha256=shipped_sha,
        lora=tpb.LoraSettings(rank=rank, alpha=alpha, dropout=-1),
        quantization=tpb.QUANTIZATION_NF4 if quantization == "nf4" else tpb.QUANTIZATION_NONE,
        double_quant=double_quant,
        mixed_precision=precision,
        learning_rate=learning_rate,
        epochs=epochs,
        max_steps=max_steps,
        max_seq_len=max_seq_len,
        seed=seed,
    )
    with client(address, token) as c:
        reply = c.call(
            "SubmitJob",
            op.SubmitJobRequest(
                request_id=request_id or uuid.uuid4().hex, device_id=device_id, training=spec, max_attempts=max_attempts
            ),
        )
    if as_json:
        print_json(dump(reply))
    else:
        out.print(
            f"{'submitted' if reply.created else 'already submitted'} job [bold]{reply.job.job_id}[/] for {device_id} ({state_name(reply.job.state)})"
        )


def _ship_dataset(path: Path, store_url: str) -> tuple[str, str]:
    """Check a dataset file, then upload it to its content address; returns (key, sha256)."""
    from adapters_store import dataset_key, open_store, sha256_file
    from adapters_store.errors import StoreError
    from agent.training.datasets import read_records
    from agent.training.errors import DatasetError

    if not path.is_file():
        raise UserError(f"--dataset-file {path}: no such file")
    try:
        read_records(path)
    except DatasetError as exc:
        raise UserError(f"--dataset-file {exc}") from None
    if not store_url:
        raise UserError("--dataset-file needs --store (or POCKETLORA_STORE): the orchestrator's store URL")
    digest = sha256_file(path)
    key = dataset_key(digest)
    try:
        with open_store(store_url) as blobs:
            if blobs.stat(key) is None:
                blobs.put_file(key, path)
    except StoreError as exc:
        raise UserError(f"--store: {exc}") from None
    return key, digest


@job_app.command("list")
def job_list(
    state: Annotated[list[str], typer.Option("--state", help="Only these states (repeatable).")] = [],  # noqa: B006
    device_id: Annotated[str, typer.Option("--device-id")] = "",
    campaign_id: Annotated[str, typer.Option("--campaign-id")] = "",
    page_size: Annotated[int, typer.Option(min=0, max=1000)] = 50,
    page_token: Annotated[str, typer.Option()] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """List jobs, newest first."""
    flt = tpb.JobFilter(states=parse_states(state), device_id=device_id, campaign_id=campaign_id)  # type: ignore[arg-type]
    with client(address, token) as c:
        reply = c.call("ListJobs", op.ListJobsRequest(filter=flt, page_size=page_size, page_token=page_token))
    if as_json:
        print_json(dump(reply))
        return
    out.print(_jobs_table(list(reply.jobs)))
    if reply.next_page_token:
        out.print(f"more: --page-token {reply.next_page_token}")


@job_app.command("get")
def job_get(job_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False) -> None:
    """Show one job."""
    with client(address, token) as c:
        job = c.call("GetJob", op.GetJobRequest(job_id=job_id)).job
    if as_json:
        print_json(dump(job))
    else:
        out.print(_jobs_table([job]))


@job_app.command("cancel")
def job_cancel(job_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False) -> None:
    """Cancel a job; a training device stops on its next heartbeat."""
    job = call(address, token, "CancelJob", op.CancelJobRequest(job_id=job_id)).job
    show(job, as_json, f"job {job.job_id} is {state_name(job.state)}")


@job_app.command("watch")
def job_watch(
    job_id: Annotated[str, typer.Argument(help="Stop when this job ends (default: watch every job).")] = "",
    device_id: Annotated[str, typer.Option("--device-id")] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Stream job changes as they happen."""
    with client(address, token) as c:
        if job_id:
            c.call("GetJob", op.GetJobRequest(job_id=job_id))  # NOT_FOUND early, as one line
        for change in c.watch(op.WatchJobsRequest(filter=tpb.JobFilter(device_id=device_id), include_initial=True)):
            j = change.job
            if job_id and j.job_id != job_id:
                continue
            if as_json:
                print(json.dumps(dump(j)), flush=True)
            else:
                p = j.progress
                out.print(
                    f"{j.job_id} {state_name(j.state):<10} step {p.step}/{p.total_steps} loss {p.loss:.3f} {j.status_message}"
                )
            if job_id and j.state in (tpb.JOB_STATE_SUCCEEDED, tpb.JOB_STATE_FAILED, tpb.JOB_STATE_CANCELLED):
                return
