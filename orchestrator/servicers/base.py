"""What every servicer shares: the domain, the poll runner, blocking calls off the loop, metadata,
and for operator-facing services the principal of each call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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
        return await principal_for(self.orch, self._run, bearer(context), action)

    async def _change(self, principal: Principal, action: str, target: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a mutating domain call as the principal; a refusal is appended to the audit log."""
        return await change_as(self.orch, self._run, principal, action, target, fn, *args)


Runner = Callable[..., Awaitable[Any]]


async def principal_for(orch: Orchestrator, run: Runner, token: str, action: str) -> Principal:
    """Who an operator-facing call (gRPC or HTTP) comes from, checked against the role `action`
    needs (roles.REQUIRED_ROLE); a refused change is audited."""
    operators = orch.operators
    principal = operators.cached(token)
    if principal is None:
        principal = await run(operators.authenticate, token)
    needed = REQUIRED_ROLE[action]
    try:
        operators.authorize(principal, needed, action)
    except PermissionDenied as exc:
        if needed != Role.VIEWER:
            await run(orch.audit.refused, principal.actor, action, "", exc)
        raise
    return principal


async def change_as(
    orch: Orchestrator, run: Runner, principal: Principal, action: str, target: str, fn: Callable[..., T], *args: Any
) -> T:
    """Run a mutating domain call as the principal; a refusal is appended to the audit log."""
    try:
        return await run(fn, principal.actor, *args)  # type: ignore[no-any-return]
    except OrchestratorError as exc:
        await run(orch.audit.refused, principal.actor, action, target, exc)
        raise
