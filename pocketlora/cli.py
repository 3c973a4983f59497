"""The `pocketlora` command line: `pocketlora --help` lists every command.

The commands live by role (operator_cli.py: jobs, devices, adapters, tokens; orchestrator_cli.py:
the orchestrator's serve and health commands; commands.py: the agent, inference and the demo) and register themselves on the shared groups of
cli_common.py when imported here.
"""

from __future__ import annotations

import os
import sys

from pocketlora import commands, operator_cli, orchestrator_cli
from pocketlora.cli_common import UserError, app, err
from pocketlora.client import ClientError

COMMAND_MODULES = (commands, operator_cli, orchestrator_cli)


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
