"""Job commands: submit (with a dataset on the device or shipped through the store), list, get
and cancel (watch is in watch_cli.py).

Every failure a user can cause ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import typer
from rich.table import Table

from pocketlora import spec_options as so
from pocketlora.cli_common import (
    Address,
    AsJson,
    Token,
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
@job_app.command("submit")
def job_submit(
    device_id: Annotated[str, typer.Option("--device-id", help="Device that trains the adapter.")],
    dataset: so.Dataset = "",
    dataset_file: so.DatasetFile = None,
    store: so.Store = "",
    adapter_name: so.AdapterName = "personal",
    base_model_id: so.BaseModelId = so.DEFAULT_BASE,
    rank: so.Rank = 8,
    alpha: so.Alpha = 0.0,
    learning_rate: so.LearningRate = 0.0,
    epochs: so.Epochs = 0,
    max_steps: so.MaxSteps = 0,
    max_seq_len: so.MaxSeqLen = 0,
    seed: so.Seed = 0,
    quantization: so.Quantization = "nf4",
    eval_share: so.EvalShare = 0.0,
    max_attempts: so.MaxAttempts = 0,
    request_id: so.RequestId = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Queue a training job for one device."""
    spec = so.spec_from(locals())
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
