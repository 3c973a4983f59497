"""`pocketlora job watch`: follow jobs as they change, from OperatorService.WatchJobs.

With a job id: a live progress bar (steps done of planned, loss, state, and why it is paused),
a line for every state change, and an exit status that says how the job ended (0 succeeded,
1 failed or cancelled). Without one: a line per change of any job. `--json` prints each change
as one JSON object per line instead, for scripts.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pocketlora.cli_common import Address, Token, client, dump, job_app, out, state_name
from pocketlora.client import DEFAULT_ADDRESS, OperatorClient
from protos.pocketlora.v1 import operator_service_pb2 as op
from protos.pocketlora.v1 import types_pb2 as tpb

ENDED = (tpb.JOB_STATE_SUCCEEDED, tpb.JOB_STATE_FAILED, tpb.JOB_STATE_CANCELLED)
_COLOURS = {"RUNNING": "green", "PAUSED": "yellow", "SUCCEEDED": "bold green", "FAILED": "bold red"}


@job_app.command("watch")
def job_watch(
    job_id: Annotated[str, typer.Argument(help="Follow this job until it ends (default: every job).")] = "",
    device_id: Annotated[str, typer.Option("--device-id", help="Only this device's jobs.")] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per change, per line.")] = False,
) -> None:
    """Follow jobs live; with JOB_ID, a progress bar until it ends (exit 0 succeeded, 1 otherwise)."""
    with client(address, token) as c:
        if not job_id:
            _every_job(c, device_id, as_json)
            return
        job = c.call("GetJob", op.GetJobRequest(job_id=job_id)).job  # NOT_FOUND early, as one line
        changes = (ch.job for ch in _watch(c, job.device_id) if ch.job.job_id == job_id)
        final = _follow_json(changes) if as_json else _follow_bar(job, changes)
    if final is not None and final.state != tpb.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


def _watch(c: OperatorClient, device_id: str) -> Any:
    return c.watch(op.WatchJobsRequest(filter=tpb.JobFilter(device_id=device_id), include_initial=True))


def _every_job(c: OperatorClient, device_id: str, as_json: bool) -> None:
    for change in _watch(c, device_id):
        j = change.job
        if as_json:
            print(json.dumps(dump(j)), flush=True)
        else:
            p = j.progress
            out.print(
                f"{j.job_id} {state_name(j.state):<10} step {p.step}/{p.total_steps} loss {p.loss:.3f} {j.status_message}"
            )


def _follow_json(changes: Any) -> Any:
    for j in changes:
        print(json.dumps(dump(j)), flush=True)
        if j.state in ENDED:
            return j
    return None


def _follow_bar(first: Any, changes: Any) -> Any:
    """A progress bar until the job ends; returns its last state (None if the stream ended first)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.fields[state]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[why]}"),
    )
    last_state = None
    with Progress(*columns, console=out) as bar:
        task = bar.add_task(first.job_id, total=None, state="", loss="-", why="")
        for j in changes:
            name = state_name(j.state)
            if j.state != last_state:
                attempt = f" (attempt {j.attempt}/{j.max_attempts})" if j.attempt else ""
                said = [j.status_message, j.last_error if j.state in (tpb.JOB_STATE_QUEUED, *ENDED) else ""]
                detail = ": " + "; ".join(x for x in said if x) if any(said) else ""
                bar.console.print(f"{name}{attempt}{detail}")
                last_state = j.state
            p = j.progress
            why = j.status_message if j.state == tpb.JOB_STATE_PAUSED else ""
            colour = _COLOURS.get(name, "cyan")
            loss = f"{p.loss:.3f}" if p.total_steps else "-"
            bar.update(task, state=f"[{colour}]{name}[/]", why=why, loss=loss)
            if p.total_steps:
                bar.update(task, total=p.total_steps, completed=p.step)
            if j.state in ENDED:
                if j.adapter_id:
                    bar.console.print(f"adapter [bold]{j.adapter_id}[/]")
                return j
    return None
