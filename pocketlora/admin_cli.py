"""Admin commands: operators and their tokens, enrollment tokens, device identities, the audit log.

Every command needs an operator token with the admin role.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from rich.table import Table

from pocketlora.cli_common import (
    Address,
    AsJson,
    Token,
    audit_app,
    call,
    device_app,
    dump,
    operator_app,
    out,
    parse_kv,
    print_json,
    show,
    token_app,
)
from pocketlora.client import DEFAULT_ADDRESS
from protos import wire
from protos.pocketlora.v1 import admin_service_pb2 as adm
from protos.pocketlora.v1 import operator_service_pb2 as op

operator_token_app = typer.Typer(help="Tokens of operators (admin).", no_args_is_help=True)
operator_app.add_typer(operator_token_app, name="token")


def _role(value: str, flag: str = "--role") -> int:
    role = wire.from_pb_name(wire.Role, value) if value else None
    if value and role is None:
        raise typer.BadParameter(f"{value!r} is not a role; one of viewer, operator, admin", param_hint=flag)
    return wire.to_pb(role)


def _when(ts: Timestamp) -> str:
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "-"


def _since(value: str) -> Timestamp | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO date or time", param_hint="--since") from None
    out_ = Timestamp()
    out_.FromDatetime(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))
    return out_


def _table(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> Table:
    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(v) for v in row))
    return table


# ---------------------------------------------------------------------- operators
@operator_app.command("create")
def operator_create(
    name: str,
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Create a named operator (then issue it a token)."""
    reply = call(address, token, "CreateOperator", adm.CreateOperatorRequest(name=name, role=_role(role)))  # type: ignore[arg-type]
    show(reply, as_json, f"operator {reply.operator.name} ({wire.from_pb(wire.Role, reply.operator.role)})")


@operator_app.command("list")
def operator_list(address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False) -> None:
    """List operators."""
    reply = call(address, token, "ListOperators", adm.ListOperatorsRequest())
    if as_json:
        print_json(dump(reply))
        return
    rows = [(o.name, wire.from_pb(wire.Role, o.role), _when(o.created_at), o.created_by) for o in reply.operators]
    out.print(_table(("operator", "role", "created", "by"), rows))


@operator_token_app.command("create")
def operator_token_create(
    operator: Annotated[str, typer.Option("--operator", help="Whose token.")],
    role: Annotated[str, typer.Option(help="A role below the operator's (default: the operator's).")] = "",
    ttl_hours: Annotated[float, typer.Option(min=0.0, max=24 * 366, help="0: never expires.")] = 0.0,
    description: Annotated[str, typer.Option()] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Issue a token for an operator; the secret is printed once."""
    request = adm.CreateOperatorTokenRequest(operator=operator, role=_role(role), description=description)  # type: ignore[arg-type]
    if ttl_hours:
        request.ttl.CopyFrom(Duration(seconds=int(ttl_hours * 3600)))
    reply = call(address, token, "CreateOperatorToken", request)
    if as_json:
        print_json(dump(reply))
    else:
        print(reply.token)


@operator_token_app.command("list")
def operator_token_list(
    operator: Annotated[str, typer.Option("--operator", help="Only this operator's tokens.")] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """List operator tokens (never their secrets)."""
    reply = call(address, token, "ListOperatorTokens", adm.ListOperatorTokensRequest(operator=operator, page_size=1000))
    if as_json:
        print_json(dump(reply))
        return
    rows = [
        (
            t.token_id,
            t.operator,
            wire.from_pb(wire.Role, t.role),
            _when(t.expires_at),
            _when(t.revoked_at),
            t.description,
        )
        for t in reply.tokens
    ]
    out.print(_table(("token", "operator", "role", "expires", "revoked", "description"), rows))


@operator_token_app.command("revoke")
def operator_token_revoke(token_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "") -> None:
    """Revoke an operator token (every replica refuses it within seconds)."""
    call(address, token, "RevokeOperatorToken", adm.RevokeOperatorTokenRequest(token_id=token_id))
    out.print(f"revoked {token_id}")


# ---------------------------------------------------------------------- enrollment tokens
@token_app.command("create")
def token_create(
    ttl_hours: Annotated[float, typer.Option(min=0.01, max=24 * 366)] = 24.0,
    description: Annotated[str, typer.Option()] = "",
    max_devices: Annotated[
        int, typer.Option(min=0, help="Devices that may enroll with it (0: any, 1: single use).")
    ] = 0,
    label: Annotated[list[str], typer.Option("--label", help="KEY=VALUE fixed on every device enrolled with it.")] = [],  # noqa: B006
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Issue an enrollment token for devices; the secret is printed once."""
    request = op.CreateEnrollmentTokenRequest(
        ttl=Duration(seconds=int(ttl_hours * 3600)),
        description=description,
        max_devices=max_devices,
        labels=parse_kv(label, "--label"),
    )
    reply = call(address, token, "CreateEnrollmentToken", request)
    if as_json:
        print_json(dump(reply))
    else:
        print(reply.token)


@token_app.command("list")
def token_list(address: Address = DEFAULT_ADDRESS, token: Token = "", as_json: AsJson = False) -> None:
    """List enrollment tokens (never their secrets)."""
    reply = call(address, token, "ListEnrollmentTokens", adm.ListEnrollmentTokensRequest(page_size=1000))
    if as_json:
        print_json(dump(reply))
        return
    rows = [
        (
            t.token_id,
            f"{t.uses}/{t.max_devices or 'any'}",
            _when(t.expires_at),
            _when(t.revoked_at),
            ",".join(f"{k}={v}" for k, v in sorted(t.labels.items())) or "-",
            t.description,
        )
        for t in reply.tokens
    ]
    out.print(_table(("token", "uses", "expires", "revoked", "labels", "description"), rows))


@token_app.command("revoke")
def token_revoke(token_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "") -> None:
    """Revoke an enrollment token: no device enrolls with it any more."""
    call(address, token, "RevokeEnrollmentToken", adm.RevokeEnrollmentTokenRequest(token_id=token_id))
    out.print(f"revoked {token_id}")


# ---------------------------------------------------------------------- devices
@device_app.command("label")
def device_label(
    device_id: str,
    label: Annotated[list[str], typer.Argument(help="KEY=VALUE labels; they replace the current ones.")],
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """Set the labels selectors target on a device."""
    request = adm.SetDeviceLabelsRequest(device_id=device_id, labels=parse_kv(label, "LABEL"))
    reply = call(address, token, "SetDeviceLabels", request)
    show(reply, as_json, f"{device_id}: {dict(reply.device.labels)}")


@device_app.command("reset")
def device_reset(device_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "") -> None:
    """Drop a device's credential so that it may enroll again (also lifts a revocation)."""
    call(address, token, "ResetDevice", adm.ResetDeviceRequest(device_id=device_id))
    out.print(f"{device_id} reset: it may enroll again with an enrollment token")


@device_app.command("revoke")
def device_revoke(device_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "") -> None:
    """Refuse a device from now on, until it is reset."""
    call(address, token, "RevokeDevice", adm.RevokeDeviceRequest(device_id=device_id))
    out.print(f"{device_id} revoked")


@device_app.command("delete")
def device_delete(device_id: str, address: Address = DEFAULT_ADDRESS, token: Token = "") -> None:
    """Forget a device and cancel its unfinished jobs."""
    reply = call(address, token, "DeleteDevice", adm.DeleteDeviceRequest(device_id=device_id))
    out.print(f"{device_id} deleted; {reply.cancelled_jobs} unfinished job(s) cancelled")


# ---------------------------------------------------------------------- audit
@audit_app.command("list")
def audit_list(
    actor: Annotated[str, typer.Option(help="Only this operator or device.")] = "",
    action: Annotated[str, typer.Option(help="Only this call, e.g. ActivateAdapter.")] = "",
    target: Annotated[str, typer.Option(help="Only this job, device, adapter or token.")] = "",
    since: Annotated[str, typer.Option(help="Only events at or after this ISO time.")] = "",
    page_size: Annotated[int, typer.Option(min=0, max=1000)] = 100,
    page_token: Annotated[str, typer.Option()] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = "",
    as_json: AsJson = False,
) -> None:
    """List audit events, newest first."""
    flt = adm.AuditFilter(actor=actor, action=action, target=target, since=_since(since))
    request = adm.ListAuditEventsRequest(filter=flt, page_size=page_size, page_token=page_token)
    reply = call(address, token, "ListAuditEvents", request)
    if as_json:
        print_json(dump(reply))
        return
    rows = [(_when(e.at), f"{e.actor_kind}:{e.actor}", e.action, e.target, e.result, e.detail) for e in reply.events]
    out.print(_table(("when (UTC)", "who", "what", "target", "result", "detail"), rows))
    if reply.next_page_token:
        out.print(f"more: --page-token {reply.next_page_token}")
