"""Operator commands: devices, adapters (activation, rollback, garbage collection) and the fleet
summary.

Every failure a user can cause ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from pocketlora.cli_common import (
    DEFAULT_STATE_DIR,
    Address,
    AsJson,
    Token,
    UserError,
    adapter_app,
    app,
    call,
    client,
    device_app,
    dump,
    out,
    parse_kv,
    print_json,
    reason_name,
    show,
)
from pocketlora.client import DEFAULT_ADDRESS
from protos.pocketlora.v1 import operator_service_pb2 as op
from protos.pocketlora.v1 import types_pb2 as tpb


# ---------------------------------------------------------------------- devices
@device_app.command("list")
def device_list(
    label: Annotated[list[str], typer.Option("--label", help="KEY=VALUE the device must carry (repeatable).")] = [],  # noqa: B006
    page_size: Annotated[int, typer.Option(min=0, max=1000)] = 100,
    page_token: Annotated[str, typer.Option()] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """List enrolled devices."""
    sel = tpb.DeviceSelector(labels=parse_kv(label, "--label"))
    with client(address, token) as c:
        reply = c.call("ListDevices", op.ListDevicesRequest(selector=sel, page_size=page_size, page_token=page_token))
    if as_json:
        print_json(dump(reply))
        return
    table = Table("device", "eligible", "reason", "battery", "temp", "active adapter", "running job")
    for d in reply.devices:
        reason = reason_name(d.eligibility_reason)
        batt = f"{d.power.battery_pct:.0f}%" if d.power.HasField("battery_pct") else "-"
        temp = f"{d.power.temperature_c:.1f}°C" if d.power.HasField("temperature_c") else "-"
        table.add_row(
            d.device_id,
            "yes" if d.eligible else "no",
            reason,
            batt,
            temp,
            d.active_adapter_id or "(base)",
            d.running_job_id or "-",
        )
    out.print(table)


@device_app.command("get")
def device_get(device_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False) -> None:
    """Show one device."""
    with client(address, token) as c:
        d = c.call("GetDevice", op.GetDeviceRequest(device_id=device_id)).device
    data = dump(d)
    if as_json:
        print_json(data)
    else:
        for k, v in data.items():
            out.print(f"[bold]{k}[/]: {v}")


# ---------------------------------------------------------------------- adapters
@adapter_app.command("list")
def adapter_list(
    device_id: Annotated[str, typer.Option("--device-id")] = "",
    name: Annotated[str, typer.Option("--name")] = "",
    page_size: Annotated[int, typer.Option(min=0, max=1000)] = 100,
    page_token: Annotated[str, typer.Option()] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """List adapter versions, newest first."""
    with client(address, token) as c:
        reply = c.call(
            "ListAdapters",
            op.ListAdaptersRequest(device_id=device_id, name=name, page_size=page_size, page_token=page_token),
        )
    if as_json:
        print_json(dump(reply))
        return
    table = Table("adapter", "name", "version", "device", "job", "size", "sha256")
    for a in reply.adapters:
        table.add_row(
            a.adapter_id, a.name, str(a.version), a.device_id, a.job_id, f"{a.size_bytes / 1e6:.2f} MB", a.sha256[:16]
        )
    out.print(table)


@adapter_app.command("get")
def adapter_get(
    adapter_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False
) -> None:
    """Show one adapter version with its lineage manifest."""
    with client(address, token) as c:
        a = c.call("GetAdapter", op.GetAdapterRequest(adapter_id=adapter_id)).adapter
    data = dump(a)
    data["manifest"] = json.loads(data.pop("manifest_json", "{}"))
    if as_json:
        print_json(data)
    else:
        out.print_json(json.dumps(data))


@adapter_app.command("activate")
def adapter_activate(
    adapter_id: Annotated[str, typer.Argument(help="Activate this adapter on the device that trained it.")] = "",
    name: Annotated[
        str, typer.Option("--name", help="Or: each matching device's latest version of this adapter name.")
    ] = "",
    label: Annotated[
        list[str], typer.Option("--label", help="With --name: KEY=VALUE the devices must carry (repeatable).")
    ] = [],  # noqa: B006
    campaign_id: Annotated[
        str, typer.Option("--campaign-id", help="Or: a canary share of this campaign's devices.")
    ] = "",
    canary_percent: Annotated[int, typer.Option(min=0, max=100, help="With --campaign-id: the share, 1-100.")] = 0,
    min_improvement: Annotated[
        float | None,
        typer.Option(
            "--min-improvement",
            min=-1.0,
            max=0.99,
            help="Eval gate: only adapters whose held-out loss is this much (relative) below their base's.",
        ),
    ] = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Make adapters the desired ones: one adapter, a name across a selector, or a canary share."""
    if sum(map(bool, (adapter_id, name, campaign_id))) != 1:
        raise typer.BadParameter("give exactly one of ADAPTER_ID, --name or --campaign-id", param_hint="ADAPTER_ID")
    request = op.ActivateAdapterRequest(
        adapter_id=adapter_id, adapter_name=name, campaign_id=campaign_id, canary_percent=canary_percent
    )
    if name:
        request.selector.CopyFrom(tpb.DeviceSelector(labels=parse_kv(label, "--label")))
    if min_improvement is not None:
        request.eval_gate.CopyFrom(op.EvalGate(min_improvement=min_improvement))
    reply = call(address, token, "ActivateAdapter", request)
    show(
        reply,
        as_json,
        f"activated on {len(reply.device_ids)} device(s): {', '.join(reply.device_ids) or 'none changed'}",
    )
    if not as_json:
        for r in reply.refused:
            out.print(f"  left out {r.device_id} ({r.adapter_id}): {r.reason}", highlight=False)


@adapter_app.command("deactivate")
def adapter_deactivate(
    device_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False
) -> None:
    """Send a device back to its base model."""
    reply = call(address, token, "DeactivateAdapter", op.DeactivateAdapterRequest(device_id=device_id))
    show(
        reply,
        as_json,
        f"{device_id} goes back to the base model" if reply.device_ids else f"{device_id} already runs the base model",
    )


@adapter_app.command("rollback")
def adapter_rollback(
    device_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False
) -> None:
    """Make a device's previously desired adapter desired again."""
    reply = call(address, token, "RollbackAdapter", op.RollbackAdapterRequest(device_id=device_id))
    show(reply, as_json, f"{device_id} now wants {reply.desired_adapter_id or 'the base model'}")


@adapter_app.command("gc")
def adapter_gc(
    db: Annotated[
        str, typer.Option(help="The orchestrator's database URL.")
    ] = f"sqlite:///{DEFAULT_STATE_DIR}/state.db",
    store: Annotated[
        str, typer.Option(help="The orchestrator's store URL (S3 credentials from the environment).")
    ] = "",
    keep_versions: Annotated[
        int, typer.Option(min=0, help="Keep this many newest versions per device and name (0: all).")
    ] = 0,
    upload_grace_hours: Annotated[float, typer.Option(min=0.0, help="Leave uploads younger than this.")] = 1.0,
    delete: Annotated[
        bool, typer.Option("--delete", help="Delete for real (default: a dry run that only lists).")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Remove blobs no adapter version references, and superseded versions past a retention count."""
    from adapters_store import open_store
    from adapters_store.errors import StoreError
    from orchestrator.errors import InvalidArgument
    from orchestrator.gc import run_gc
    from orchestrator.state import open_state

    try:
        state = open_state(db)
        blobs = open_store(store or f"file://{(DEFAULT_STATE_DIR / 'blobs').resolve()}")
    except InvalidArgument as exc:
        raise UserError(f"--{exc}") from None
    except StoreError as exc:
        raise UserError(f"--store: {exc}") from None
    try:
        report = run_gc(
            state, blobs, keep_versions=keep_versions, dry_run=not delete, upload_grace_s=upload_grace_hours * 3600
        )
    finally:
        state.close()
        blobs.close()
    if as_json:
        print_json(
            {"dry_run": report.dry_run, "pruned_adapters": report.pruned_adapters, "deleted_keys": report.deleted_keys}
        )
        return
    verb = "would delete" if report.dry_run else "deleted"
    out.print(f"{verb} {len(report.deleted_keys)} blob(s) and {len(report.pruned_adapters)} superseded version(s)")
    for key in report.deleted_keys:
        out.print(f"  {key}")


@app.command("summary")
def summary(address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False) -> None:
    """Fleet summary: jobs by state, devices by eligibility."""
    with client(address, token) as c:
        reply = c.call("GetFleetSummary", op.GetFleetSummaryRequest())
    data = dump(reply)
    if as_json:
        print_json(data)
    else:
        out.print_json(json.dumps(data))


# Server-side and device-side commands live in their own module to keep this one readable.
