"""What every `pocketlora` command shares: the command groups, the consoles, the common options,
and the helpers that turn replies and arguments into one-line results or one-line errors.

Command modules import this one; cli.py imports them all. Nothing imports back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from rich.console import Console

from pocketlora.client import OperatorClient
from pocketlora.tls import TlsConfig, TlsConfigError, load_tls
from protos import wire

app = typer.Typer(
    help="PocketLoRA: on-device LoRA personalisation for fleets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
orchestrator_app = typer.Typer(help="Run the orchestrator.", no_args_is_help=True)
agent_app = typer.Typer(help="Run a device agent.", no_args_is_help=True)
job_app = typer.Typer(help="Submit, follow and cancel training jobs.", no_args_is_help=True)
device_app = typer.Typer(help="Inspect devices; label, reset, revoke or delete them (admin).", no_args_is_help=True)
adapter_app = typer.Typer(help="Inspect and activate adapters.", no_args_is_help=True)
token_app = typer.Typer(help="Enrollment tokens for devices (admin).", no_args_is_help=True)
operator_app = typer.Typer(help="Operators and their tokens (admin).", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log of every change (admin).", no_args_is_help=True)
for sub, name in (
    (orchestrator_app, "orchestrator"),
    (agent_app, "agent"),
    (job_app, "job"),
    (device_app, "device"),
    (adapter_app, "adapter"),
    (token_app, "token"),
    (operator_app, "operator"),
    (audit_app, "audit"),
):
    app.add_typer(sub, name=name)

out = Console()
err = Console(stderr=True)

DEFAULT_STATE_DIR = Path(".pocketlora")
Address = Annotated[
    str,
    typer.Option(
        "--orchestrator",
        envvar="POCKETLORA_ORCHESTRATOR",
        help="Orchestrator HOST:PORT (over TLS: pocketlora --tls-ca CA ..., or POCKETLORA_TLS_CA).",
    ),
]
Token = Annotated[
    str,
    typer.Option(
        "--token",
        envvar="POCKETLORA_OPERATOR_TOKEN",
        help="Operator token (default: read from .pocketlora/operator-token).",
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
# Client-side TLS: options of the root command for every operator command (`pocketlora --tls-ca
# CA job list`, as docker's --tlscacert), and of `agent run`; any of them turns TLS on.
TlsCa = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        envvar="POCKETLORA_TLS_CA",
        help="Use TLS; verify the orchestrator against this CA certificate (PEM).",
        show_default=False,
    ),
]
TlsCert = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert",
        envvar="POCKETLORA_TLS_CERT",
        help="Use TLS; present this client certificate (PEM) for mutual TLS.",
        show_default=False,
    ),
]
TlsKey = Annotated[
    Path | None,
    typer.Option(
        "--tls-key", envvar="POCKETLORA_TLS_KEY", help="The private key (PEM) of --tls-cert.", show_default=False
    ),
]


# What the root command was given (set before any command runs; one command per process).
_root_tls_files: dict[str, Path | None] = {}


@app.callback()
def client_options(tls_ca: TlsCa = None, tls_cert: TlsCert = None, tls_key: TlsKey = None) -> None:
    """PocketLoRA: on-device LoRA personalisation for fleets. The --tls-* options (or
    POCKETLORA_TLS_*) apply to every command that calls the orchestrator."""
    _root_tls_files.update(ca=tls_ca, cert=tls_cert, key=tls_key)


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def fail(message: str, code: int = 1) -> None:
    """Print one line and exit."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def operator_token(token: str) -> str:
    if token:
        return token
    path = DEFAULT_STATE_DIR / "operator-token"
    if path.is_file():
        return path.read_text().strip()
    raise UserError(
        "no operator token: pass --token, set POCKETLORA_OPERATOR_TOKEN, or run from the orchestrator's directory"
    )


def client_tls(ca: Path | None, cert: Path | None, key: Path | None) -> TlsConfig | None:
    """The client TLS settings the --tls-* options name (None: plaintext); one line if unusable."""
    try:
        return load_tls(ca=ca, cert=cert, key=key)
    except TlsConfigError as exc:
        raise UserError(str(exc)) from None


def client(address: str, token: str) -> OperatorClient:
    if ":" not in address:
        raise UserError(f"--orchestrator {address!r} must be HOST:PORT")
    return OperatorClient(address, operator_token(token), tls=client_tls(**_root_tls_files))


def call(address: str, token: str, method: str, request: Any) -> Any:
    """One operator RPC on a fresh channel."""
    with client(address, token) as c:
        return c.call(method, request)


def show(reply: Any, as_json: bool, text: str) -> None:
    """The reply as JSON with --json, else the one-line summary."""
    if as_json:
        print_json(dump(reply))
    else:
        out.print(text)


def dump(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def print_json(data: Any) -> None:
    out.print_json(json.dumps(data))


def state_name(value: int) -> str:
    """A job state number as its short name (QUEUED, RUNNING, ...)."""
    state = wire.from_pb(wire.JobState, value)
    return state.value if state is not None else "UNSPECIFIED"


def reason_name(value: int) -> str:
    """An eligibility reason number as its short name (ELIGIBLE, TOO_HOT, ...)."""
    reason = wire.from_pb(wire.EligibilityReason, value)
    return reason.value if reason is not None else "UNSPECIFIED"


def parse_states(states: list[str]) -> list[int]:
    """--state values (QUEUED or JOB_STATE_QUEUED, any case) as proto numbers."""
    parsed: list[int] = []
    for s in states:
        state = wire.from_pb_name(wire.JobState, s)
        if state is None:
            names = ", ".join(wire.JobState)
            raise typer.BadParameter(f"unknown state {s!r}; one of {names}", param_hint="--state")
        parsed.append(wire.to_pb(state))
    return parsed


def parse_kv(pairs: list[str], flag: str) -> dict[str, str]:
    """KEY=VALUE options (labels) as a dict; a malformed pair names its flag."""
    out_: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0]:
            raise typer.BadParameter(f"{pair!r} must be KEY=VALUE", param_hint=flag)
        k, v = pair.split("=", 1)
        out_[k] = v
    return out_
