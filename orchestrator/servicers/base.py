"""What every servicer shares: the domain, the poll runner, blocking calls off the loop, metadata."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from orchestrator.polls import PollRunner
from orchestrator.service import Orchestrator

T = TypeVar("T")


def metadata_value(context: grpc.aio.ServicerContext, name: str) -> str:
    """One metadata value, or ""."""
    for key, value in context.invocation_metadata() or ():
        if key == name and isinstance(value, str):
            return value
    return ""


def bearer(context: grpc.aio.ServicerContext) -> str:
    """The token of the `authorization: Bearer <token>` metadata, or ""."""
    value = metadata_value(context, "authorization")
    return value.removeprefix("Bearer ").strip() if value.startswith("Bearer ") else ""


class ServicerBase:
    """Holds the domain, the poll runner and the executor blocking domain calls run on."""

    def __init__(self, orch: Orchestrator, polls: PollRunner, executor: Executor) -> None:
        self.orch = orch
        self.polls = polls
        self.executor = executor

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # Store calls block (SQL, S3): run them off the event loop so other RPCs keep flowing.
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
