"""`pocketlora campaign create|list|get|pause|resume|cancel|watch`: living campaigns, the fleet
operator's daily workflow (rollouts of their adapters: rollout_cli.py).

A campaign trains one spec on every device its selector matches, and on devices that enroll or
start matching later. Read commands take --json; `campaign watch` draws a live progress view
(or prints one JSON line per change with --json) until the campaign is done, and its rollout too.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any

import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pocketlora import spec_options as so
from pocketlora.cli_common import Address, AsJson, Token, app, client, dump, out, parse_kv, print_json
from pocketlora.client import DEFAULT_ADDRESS, ClientError, OperatorClient
from pocketlora.rollout_cli import enum_name, enum_states, rollout_view
from protos import wire
from protos.pocketlora.v1 import operator_service_pb2 as op
from protos.pocketlora.v1 import types_pb2 as tpb

campaign_app = typer.Typer(help="Create, follow, pause and cancel campaigns.", no_args_is_help=True)
app.add_typer(campaign_app, name="campaign")

_OPEN_JOBS = ("QUEUED", "LEASED", "RUNNING", "PAUSED", "UPLOADING")
_ORDER = ("QUEUED", "LEASED", "RUNNING", "PAUSED", "UPLOADING", "SUCCEEDED", "FAILED", "CANCELLED")


def _short(counts: Any) -> dict[str, int]:
    """Counts keyed by short state names (QUEUED rather than JOB_STATE_QUEUED)."""
    out_: dict[str, int] = {}
    for key, n in counts.items():
        state = wire.from_pb_name(wire.JobState, key)
        out_[state.value if state else key] = int(n)
    return out_


# ---------------------------------------------------------------------- campaigns
@campaign_app.command("create")
def campaign_create(
    name: Annotated[str, typer.Option("--name", help="A name for people.")],
    label: Annotated[list[str], typer.Option("--label", help="KEY=VALUE devices must carry (repeatable).")] = [],  # noqa: B006
    device: Annotated[list[str], typer.Option("--device-id", help="Only these devices (repeatable).")] = [],  # noqa: B006
    min_ram_gb: Annotated[float, typer.Option(min=0.0, help="Only devices with this much RAM.")] = 0.0,
    requires_4bit: Annotated[bool, typer.Option("--requires-4bit", help="Only devices that train in 4 bits.")] = False,
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
    target_count: Annotated[int, typer.Option(min=0, help="Create at most this many jobs (0: no limit).")] = 0,
    deadline_hours: Annotated[
        float, typer.Option(min=0.0, help="No new jobs after this many hours; unfinished jobs fail then (0: none).")
    ] = 0.0,
    max_attempts: so.MaxAttempts = 0,
    request_id: so.RequestId = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Train one spec on every device the selector matches, now and as devices enroll later."""
    spec = so.spec_from(locals())
    selector = tpb.DeviceSelector(
        labels=parse_kv(label, "--label"),
        device_ids=device,
        min_ram_bytes=int(min_ram_gb * 2**30),
        requires_4bit=requires_4bit,
    )
    request = op.SubmitCampaignRequest(
        request_id=request_id or uuid.uuid4().hex,
        name=name,
        selector=selector,
        training=spec,
        max_attempts=max_attempts,
        target_count=target_count,
    )
    if deadline_hours:
        request.deadline.CopyFrom(Timestamp(seconds=int(time.time() + deadline_hours * 3600)))
    with client(address, token) as c:
        reply = c.call("SubmitCampaign", request)
    if as_json:
        print_json(dump(reply))
        return
    cmp = reply.campaign
    verb = "created" if reply.created else "already created"
    out.print(f"{verb} campaign [bold]{cmp.campaign_id}[/] ({cmp.name}): {cmp.job_count} job(s) now", highlight=False)
    if cmp.enrolling:
        out.print("devices that enroll or start matching later get a job too", highlight=False)


@campaign_app.command("list")
def campaign_list(
    state: Annotated[list[str], typer.Option("--state", help="Only these states (repeatable).")] = [],  # noqa: B006
    page_size: Annotated[int, typer.Option(min=0, max=1000)] = 50,
    page_token: Annotated[str, typer.Option()] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """List campaigns, newest first."""
    states = enum_states(state, wire.CampaignState, "--state")
    with client(address, token) as c:
        request = op.ListCampaignsRequest(states=states, page_size=page_size, page_token=page_token)
        reply = c.call("ListCampaigns", request)
    if as_json:
        print_json(dump(reply))
        return
    table = Table("campaign", "name", "state", "jobs", "succeeded", "failed", "open", "enrolling")
    for cmp in reply.campaigns:
        counts = _short(cmp.jobs_by_state)
        table.add_row(
            cmp.campaign_id,
            cmp.name,
            enum_name(wire.CampaignState, cmp.state),
            str(cmp.job_count) + (f"/{cmp.target_count}" if cmp.target_count else ""),
            str(counts.get("SUCCEEDED", 0)),
            str(counts.get("FAILED", 0)),
            str(sum(counts.get(s, 0) for s in _OPEN_JOBS)),
            "yes" if cmp.enrolling else "no",
        )
    out.print(table)
    if reply.next_page_token:
        out.print(f"more: --page-token {reply.next_page_token}")


@campaign_app.command("get")
def campaign_get(
    campaign_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False
) -> None:
    """Show a campaign: jobs by state, progress, failures by error class."""
    with client(address, token) as c:
        cmp = c.call("GetCampaign", op.GetCampaignRequest(campaign_id=campaign_id)).campaign
    if as_json:
        print_json(dump(cmp))
    else:
        out.print(_campaign_view(cmp, None))


def _lifecycle(verb: str, method: str, request: Any, address: str, token: str, as_json: bool) -> None:
    with client(address, token) as c:
        reply = c.call(method, request)
    if as_json:
        print_json(dump(reply))
        return
    cmp = reply.campaign
    extra = f", {reply.cancelled_jobs} unfinished job(s) cancelled" if method == "CancelCampaign" else ""
    out.print(
        f"campaign {cmp.campaign_id} {verb}: now {enum_name(wire.CampaignState, cmp.state)}{extra}", highlight=False
    )


@campaign_app.command("pause")
def campaign_pause(
    campaign_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False
) -> None:
    """Stop leasing the campaign's jobs and creating new ones; running jobs go on."""
    _lifecycle("paused", "PauseCampaign", op.PauseCampaignRequest(campaign_id=campaign_id), address, token, as_json)


@campaign_app.command("resume")
def campaign_resume(
    campaign_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False
) -> None:
    """Undo a pause."""
    _lifecycle("resumed", "ResumeCampaign", op.ResumeCampaignRequest(campaign_id=campaign_id), address, token, as_json)


@campaign_app.command("cancel")
def campaign_cancel(
    campaign_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False
) -> None:
    """Cancel the campaign and its unfinished jobs; training devices stop at their next heartbeat."""
    _lifecycle(
        "cancelled", "CancelCampaign", op.CancelCampaignRequest(campaign_id=campaign_id), address, token, as_json
    )


@campaign_app.command("watch")
def campaign_watch(
    campaign_id: str,
    interval_s: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between refreshes.")] = 1.0,
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Follow a campaign (and its rollout) live until both are done; Ctrl-C stops watching."""
    with client(address, token) as c:
        if as_json:
            _watch_json(c, campaign_id, interval_s)
            return
        cmp, ro = _poll(c, campaign_id)
        with Live(_campaign_view(cmp, ro), console=out, refresh_per_second=4) as live:
            while not _finished(cmp, ro):
                time.sleep(interval_s)
                cmp, ro = _poll(c, campaign_id)
                live.update(_campaign_view(cmp, ro))


def _watch_json(c: OperatorClient, campaign_id: str, interval_s: float) -> None:
    last = ""
    while True:
        cmp, ro = _poll(c, campaign_id)
        line = json.dumps({"campaign": dump(cmp), "rollout": dump(ro) if ro is not None else None}, sort_keys=True)
        if line != last:
            print(line, flush=True)
            last = line
        if _finished(cmp, ro):
            return
        time.sleep(interval_s)


def _poll(c: OperatorClient, campaign_id: str) -> tuple[Any, Any]:
    cmp = c.call("GetCampaign", op.GetCampaignRequest(campaign_id=campaign_id)).campaign
    try:
        ro = c.call("GetRollout", op.GetRolloutRequest(campaign_id=campaign_id)).rollout
    except ClientError as exc:
        if "NOT_FOUND" not in str(exc):
            raise
        ro = None
    return cmp, ro


def _finished(cmp: Any, ro: Any) -> bool:
    counts = _short(cmp.jobs_by_state)
    jobs_done = not cmp.enrolling and not any(counts.get(s, 0) for s in _OPEN_JOBS)
    state = wire.from_pb(wire.RolloutState, ro.state) if ro is not None else None
    return jobs_done and (state is None or not state.live)


def _campaign_view(cmp: Any, ro: Any) -> Group:
    counts = _short(cmp.jobs_by_state)
    total = max(sum(counts.values()), 1)
    state = enum_name(wire.CampaignState, cmp.state)
    head = Text.assemble(
        ("campaign ", ""),
        (cmp.campaign_id, "bold"),
        f" {cmp.name!r}  {state}",
        ("  enrolling new devices" if cmp.enrolling else "", "green"),
        f"  {cmp.job_count} job(s)" + (f" of {cmp.target_count}" if cmp.target_count else ""),
    )
    done = counts.get("SUCCEEDED", 0)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=total, completed=done, width=40), Text(f"{done}/{total} succeeded ({cmp.progress:.0%})")
    )
    parts: list[Any] = [head, bar, Text("  ".join(f"{s.lower()} {counts.get(s, 0)}" for s in _ORDER))]
    if cmp.failures_by_error_class:
        fails = ", ".join(f"{k.removeprefix('ERROR_CLASS_')} {v}" for k, v in cmp.failures_by_error_class.items())
        parts.append(Text(f"failures: {fails}", style="red"))
    if ro is not None:
        parts.append(rollout_view(ro))
    return Group(*parts)
