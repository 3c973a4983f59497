"""`pocketlora rollout start|status|pause|resume|undo`: a campaign's adapters activated step by
step (e.g. 1%, 10%, 50%, 100% of the devices whose adapter passed the eval gate), each step held
until its devices report the adapter active, halted and rolled back when too many refuse it.
Without an id, `status` shows every rollout in the fleet and `--all` pauses, resumes or undoes
every live one.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import typer
from google.protobuf.duration_pb2 import Duration
from rich.console import Group
from rich.table import Table
from rich.text import Text

from pocketlora import spec_options as so
from pocketlora.cli_common import Address, AsJson, Token, app, client, dump, out, print_json
from pocketlora.client import DEFAULT_ADDRESS, OperatorClient
from protos import wire
from protos.pocketlora.v1 import operator_service_pb2 as op

rollout_app = typer.Typer(help="Roll a campaign's adapters out in steps, with guard rails.", no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")


def enum_name(cls: type[Any], value: int) -> str:
    """A proto enum number as its short name (RUNNING, not ROLLOUT_STATE_RUNNING)."""
    member = wire.from_pb(cls, value)
    return member.value if member is not None else "UNSPECIFIED"


def enum_states(values: list[str], cls: type[Any], flag: str) -> list[Any]:
    """--state values (short or proto names, any case) as proto numbers."""
    parsed = []
    for v in values:
        member = wire.from_pb_name(cls, v)
        if member is None:
            raise typer.BadParameter(f"unknown state {v!r}; one of {', '.join(m.value for m in cls)}", param_hint=flag)
        parsed.append(wire.to_pb(member))
    return parsed


def rollout_view(ro: Any) -> Group:
    """A rollout's state, message and steps, as `status` and `campaign watch` show it."""
    state = enum_name(wire.RolloutState, ro.state)
    step = min(ro.current_step + 1, len(ro.steps))
    title = Text.assemble(
        ("rollout ", ""), (ro.rollout_id, "bold"), f"  {state}  step {step}/{len(ro.steps)}", f"  {ro.message}"
    )
    table = Table("step", "share", "devices", "active", "failed", "pending", "rolled back")
    for i, s in enumerate(ro.steps):
        marker = "▶ " if i == ro.current_step and state in ("RUNNING", "PAUSED") else "  "
        table.add_row(
            f"{marker}{i + 1}",
            f"{s.percent}%",
            str(s.devices),
            str(s.active),
            str(s.failed),
            str(s.pending),
            str(s.rolled_back),
        )
    note = Text(
        f"eligible devices {ro.eligible_devices}, kept out by the eval gate {ro.gate_refused_devices}", style="dim"
    )
    return Group(title, table, note)


def _rollout_id(c: OperatorClient, rollout_id: str, campaign_id: str) -> str:
    if bool(rollout_id) == bool(campaign_id):
        raise typer.BadParameter("give exactly one of ROLLOUT_ID and --campaign-id", param_hint="ROLLOUT_ID")
    if rollout_id:
        return rollout_id
    return str(c.call("GetRollout", op.GetRolloutRequest(campaign_id=campaign_id)).rollout.rollout_id)


@rollout_app.command("start")
def rollout_start(
    campaign_id: str,
    steps: Annotated[
        str, typer.Option(help="Shares of the eligible devices, comma-separated, ending at 100.")
    ] = "1,10,50,100",
    min_improvement: Annotated[
        float | None,
        typer.Option(min=-1.0, max=0.99, help="Eval gate: only adapters this much (relative) better than their base."),
    ] = None,
    min_healthy: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="Share of a step's devices that must report the adapter active.")
    ] = 0.9,
    max_failures: Annotated[
        float,
        typer.Option(min=0.0, max=0.99, help="Share of a step's devices that may refuse it before the rollout halts."),
    ] = 0.1,
    bake_s: Annotated[float, typer.Option(min=0.0, help="Least seconds each step runs.")] = 0.0,
    request_id: so.RequestId = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Activate a campaign's adapters step by step; a failing step halts and rolls back."""
    try:
        shares = [int(p) for p in steps.split(",") if p.strip()]
    except ValueError:
        raise typer.BadParameter(f"{steps!r} must be comma-separated whole percentages", param_hint="--steps") from None
    request = op.StartRolloutRequest(
        request_id=request_id or uuid.uuid4().hex,
        campaign_id=campaign_id,
        steps=shares,
        min_healthy_share=min_healthy,
        max_failure_share=max_failures,
        bake=Duration(seconds=int(bake_s), nanos=int(bake_s % 1 * 1e9)),
    )
    if min_improvement is not None:
        request.eval_gate.CopyFrom(op.EvalGate(min_improvement=min_improvement))
    with client(address, token) as c:
        reply = c.call("StartRollout", request)
    if as_json:
        print_json(dump(reply))
        return
    ro = reply.rollout
    verb = "started" if reply.created else "already started"
    out.print(f"{verb} rollout [bold]{ro.rollout_id}[/] of {campaign_id}: steps {steps}%", highlight=False)


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[str, typer.Argument(help="A rollout (default: every rollout, or --campaign-id's).")] = "",
    campaign_id: Annotated[str, typer.Option("--campaign-id", help="The campaign's latest rollout.")] = "",
    devices: Annotated[bool, typer.Option("--devices", help="Also list every device: desired vs actual.")] = False,
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Show rollouts fleet-wide, or one rollout with its steps (and devices)."""
    with client(address, token) as c:
        if not rollout_id and not campaign_id:
            reply = c.call("ListRollouts", op.ListRolloutsRequest(page_size=100))
            if as_json:
                print_json(dump(reply))
            for ro in [] if as_json else reply.rollouts:
                out.print(rollout_view(ro))
            if not as_json and not reply.rollouts:
                out.print("no rollouts")
            return
        got = c.call(
            "GetRollout",
            op.GetRolloutRequest(rollout_id=rollout_id, campaign_id=campaign_id, include_devices=devices),
        )
    if as_json:
        print_json(dump(got))
        return
    out.print(rollout_view(got.rollout))
    if devices:
        table = Table("device", "step", "outcome", "rollout's adapter", "desired", "active", "reason")
        for d in got.devices:
            table.add_row(
                d.device_id,
                str(d.step + 1),
                enum_name(wire.TargetOutcome, d.outcome),
                d.adapter_id,
                d.desired_adapter_id or "(base)",
                d.active_adapter_id or "(base)",
                d.reason,
            )
        out.print(table)


def _rollout_change(
    method: str, verb: str, rollout_id: str, campaign_id: str, every: bool, address: str, token: str, as_json: bool
) -> None:
    if every and (rollout_id or campaign_id):
        raise typer.BadParameter("--all goes alone, without ROLLOUT_ID or --campaign-id", param_hint="--all")
    with client(address, token) as c:
        if every:
            live: list[Any] = [wire.to_pb(wire.RolloutState.RUNNING), wire.to_pb(wire.RolloutState.PAUSED)]
            request = op.ListRolloutsRequest(states=live, page_size=1000)
            ids = [r.rollout_id for r in c.call("ListRollouts", request).rollouts]
        else:
            ids = [_rollout_id(c, rollout_id, campaign_id)]
        request_cls = getattr(op, f"{method}Request")
        replies = [c.call(method, request_cls(rollout_id=i)) for i in ids]
    if as_json:
        print_json([dump(r) for r in replies] if every else dump(replies[0]))
        return
    for reply in replies:
        ro = reply.rollout
        extra = f"; {len(reply.rolled_back_device_ids)} device(s) rolled back" if method == "UndoRollout" else ""
        out.print(
            f"rollout {ro.rollout_id} {verb}: now {enum_name(wire.RolloutState, ro.state)}{extra}", highlight=False
        )
    if every and not replies:
        out.print("no live rollouts")


Every = Annotated[bool, typer.Option("--all", help="Every live rollout in the fleet.")]
RolloutArg = Annotated[str, typer.Argument(help="The rollout (or use --campaign-id / --all).")]
CampaignOpt = Annotated[str, typer.Option("--campaign-id", help="The campaign's latest rollout.")]


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: RolloutArg = "",
    campaign_id: CampaignOpt = "",
    every: Every = False,
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Hold rollouts at their current step."""
    _rollout_change("PauseRollout", "paused", rollout_id, campaign_id, every, address, token, as_json)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: RolloutArg = "",
    campaign_id: CampaignOpt = "",
    every: Every = False,
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Let paused rollouts go on."""
    _rollout_change("ResumeRollout", "resumed", rollout_id, campaign_id, every, address, token, as_json)


@rollout_app.command("undo")
def rollout_undo(
    rollout_id: RolloutArg = "",
    campaign_id: CampaignOpt = "",
    every: Every = False,
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Send every device a rollout changed back to what it wanted before."""
    _rollout_change("UndoRollout", "undone", rollout_id, campaign_id, every, address, token, as_json)
