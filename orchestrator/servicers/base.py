"""What every servicer shares: running blocking domain calls off the loop, reading metadata."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

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
    """Holds the domain service and the executor its blocking calls run on."""

    def __init__(self, orch: Orchestrator, executor: Executor) -> None:
        self.orch = orch
        self.executor = executor

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # Store calls block (SQL, S3): run them off the event loop so other RPCs keep flowing.
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _run_poll(self, fn: Callable[..., T], *args: Any) -> T:
        """A device poll (heartbeat, lease): a few short statements and no other I/O. Where the
        store allows it, it runs on the loop and only the COMMIT leaves it (the thread hop
        costs more CPU than the poll itself); otherwise as _run."""
        if self.orch.state.inline:
            return await self.orch.state.run_inline(fn, *args)
        return await self._run(fn, *args)
