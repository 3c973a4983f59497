"""Domain errors -> gRPC status codes: the one mapping, for unary and streaming methods alike.

A domain error (orchestrator/errors.py) is answered with its code and its message, which names
the field or the object. Anything else is a bug: it is logged with a fresh error id and the
client gets INTERNAL with that id only, never the exception's text (which could carry server
paths or internals). Conversion code raises InvalidArgument naming the field, so a ValueError
reaching this decorator is a bug too.
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from orchestrator import errors

log = logging.getLogger("pocketlora.orchestrator")

CODES: dict[type[errors.OrchestratorError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

F = TypeVar("F", bound=Callable[..., Any])


def status_for(exc: errors.OrchestratorError) -> grpc.StatusCode:
    """The code of the most specific mapped class in the error's ancestry."""
    for cls in type(exc).__mro__:
        code = CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, errors.OrchestratorError):
        await context.abort(status_for(exc), str(exc))
    error_id = secrets.token_hex(6)
    log.error("internal error %s in %s", error_id, method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); see the orchestrator log")


def rpc(fn: F) -> F:
    """Map what a servicer method raises to a status, for unary and server-streaming methods."""
    name = fn.__name__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, name)

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, name)
        raise AssertionError("unreachable")  # context.abort always raises

    return unary  # type: ignore[return-value]
