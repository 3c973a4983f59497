"""`pocketlora gate-policy`: gate thresholds the fleet's operators set per device selector.

A policy sets only the thresholds given; devices get the merged policies that match them in
their next heartbeat reply (higher --priority wins field by field). An agent started with
--local-veto takes only what makes its own gate stricter.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from pocketlora.cli_common import Address, AsJson, Token, app, call, dump, out, parse_kv, print_json, show
from pocketlora.client import DEFAULT_ADDRESS
from protos.pocketlora.v1 import operator_service_pb2 as op
from protos.pocketlora.v1 import types_pb2 as tpb

policy_app = typer.Typer(help="Set the fleet's gate thresholds per device selector.", no_args_is_help=True)
app.add_typer(policy_app, name="gate-policy")


def _hours(value: str) -> tuple[int, int]:
    """'22-6' as (22, 6)."""
    try:
        start, end = (int(x) for x in value.split("-", 1))
    except ValueError:
        raise typer.BadParameter(f"{value!r} must be START-END hours, e.g. 1-6 or 22-6", param_hint="--hours") from None
    return start, end


@policy_app.command("set")
def policy_set(
    name: str,
    label: Annotated[list[str], typer.Option("--label", help="KEY=VALUE devices must carry (repeatable).")] = [],  # noqa: B006
    device: Annotated[list[str], typer.Option("--device-id", help="Only these devices (repeatable).")] = [],  # noqa: B006
    priority: Annotated[int, typer.Option(help="Higher wins where several policies match a device.")] = 0,
    require_charging: Annotated[
        bool | None, typer.Option("--require-charging/--no-require-charging", help="Train only on external power.")
    ] = None,
    min_battery: Annotated[float | None, typer.Option(min=0, max=100, help="Minimum battery percent.")] = None,
    temp_high: Annotated[float | None, typer.Option(help="Pause at this temperature (°C).")] = None,
    temp_low: Annotated[float | None, typer.Option(help="Resume below this temperature (°C).")] = None,
    min_free_storage_mb: Annotated[int | None, typer.Option(min=0, help="Minimum free storage in MiB.")] = None,
    max_cpu_load: Annotated[
        float | None, typer.Option(min=0.1, max=100, help="Maximum CPU load of others (%).")
    ] = None,
    hours: Annotated[str, typer.Option(help="Train only in these local hours, START-END (e.g. 1-6, 22-6).")] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Create or replace a named gate policy."""
    fields: dict[str, object] = {
        k: v
        for k, v in (
            ("require_charging", require_charging),
            ("min_battery_pct", min_battery),
            ("temp_high_c", temp_high),
            ("temp_low_c", temp_low),
            ("min_free_storage_bytes", None if min_free_storage_mb is None else min_free_storage_mb * 2**20),
            ("max_cpu_load_pct", max_cpu_load),
        )
        if v is not None
    }
    if hours:
        fields["start_hour"], fields["end_hour"] = _hours(hours)
    policy = op.FleetGatePolicy(
        name=name,
        selector=tpb.DeviceSelector(labels=parse_kv(label, "--label"), device_ids=device),
        policy=tpb.GatePolicy(**fields),  # type: ignore[arg-type]
        priority=priority,
    )
    reply = call(address, token, "SetGatePolicy", op.SetGatePolicyRequest(policy=policy))
    show(reply, as_json, f"gate policy {name} set; devices it matches get it at their next heartbeat")


@policy_app.command("list")
def policy_list(address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False) -> None:
    """List gate policies, lowest priority first."""
    reply = call(address, token, "ListGatePolicies", op.ListGatePoliciesRequest())
    if as_json:
        print_json(dump(reply))
        return
    table = Table("name", "priority", "selector", "thresholds")
    for p in reply.policies:
        selector = dump(p.selector)
        table.add_row(p.name, str(p.priority), str(selector or "every device"), str(dump(p.policy)))
    out.print(table)


@policy_app.command("delete")
def policy_delete(name: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False) -> None:
    """Remove a gate policy; its devices go back to their own thresholds."""
    reply = call(address, token, "DeleteGatePolicy", op.DeleteGatePolicyRequest(name=name))
    show(reply, as_json, f"gate policy {name} deleted" if reply.deleted else f"no gate policy named {name}")
