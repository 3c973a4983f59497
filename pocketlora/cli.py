"""The `pocketlora` command line: `pocketlora --help` lists every command.

The commands live by role (job_cli.py: jobs; watch_cli.py: job watch; operator_cli.py: devices, adapters, tokens, the
summary; admin_cli.py: operators, tokens, device identities, the audit log; campaign_cli.py and
rollout_cli.py: campaigns and rollouts; policy_cli.py: fleet gate policies; orchestrator_cli.py: the orchestrator's
serve and health commands; commands.py: the agent and the demo; infer_cli.py: inference) and register themselves on
the groups of cli_common.py (or their own) when imported here.
"""

from __future__ import annotations

import os
import sys

from pocketlora import (
    admin_cli,
    campaign_cli,
    commands,
    infer_cli,
    job_cli,
    operator_cli,
    orchestrator_cli,
    policy_cli,
    rollout_cli,
    watch_cli,
)
from pocketlora.cli_common import UserError, app, err
from pocketlora.client import ClientError

COMMAND_MODULES = (
    admin_cli,
    commands,
    orchestrator_cli,
    infer_cli,
    job_cli,
    operator_cli,
    watch_cli,
    campaign_cli,
    rollout_cli,
    policy_cli,
)


def main() -> None:
    """Console-script entry point with one-line errors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        app()
    except (ClientError, UserError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
