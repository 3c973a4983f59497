"""What every servicer shares: the domain, the poll runner, blocking calls off the loop, metadata,
and for operator-facing services the principal of each call."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from orchestrator.errors import OrchestratorError, PermissionDenied
from orchestrator.limits import Gatekeeper
from orchestrator.operators import Principal
from orchestrator.polls import PollRunner
from orchestrator.service import Orchestrator
from orchestrator.servicers.roles import REQUIRED_ROLE
from protos.wire import Role

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

    def __init__(self, orch: Orchestrator, polls: PollRunner, executor: Executor, gate: Gatekeeper) -> None:
        self.orch = orch
        self.polls = polls
        self.executor = executor
        self.gate = gate

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # Store calls block (SQL, S3): run them off the event loop so other RPCs keep flowing.
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


class OperatorServicerBase(ServicerBase):
    """Authentication, authorization and auditing of operator calls, for every operator-facing
    service: each method asks for its principal by its own name (roles.REQUIRED_ROLE) and makes
    changes through `_change`, which audits a refused change."""

    async def _principal(self, context: grpc.aio.ServicerContext, action: str) -> Principal:
        token = bearer(context)
        operators = self.orch.operators
        principal = operators.cached(token)
        if principal is None:
            principal = await self._run(operators.authenticate, token)
        needed = REQUIRED_ROLE[action]
        try:
            operators.authorize(principal, needed, action)
        except PermissionDenied as exc:
            if needed != Role.VIEWER:
                await self._run(self.orch.audit.refused, principal.actor, action, "", exc)
            raise
        return principal

    async def _change(self, principal: Principal, action: str, target: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a mutating domain call as the principal; a refusal is appended to the audit log."""
        try:
            return await self._run(fn, principal.actor, *args)
        except OrchestratorError as exc:
            await self._run(self.orch.audit.refused, principal.actor, action, target, exc)
            raise
