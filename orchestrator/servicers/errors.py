"""Map domain errors to gRPC status codes, in one place."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from orchestrator import errors

log = logging.getLogger("pocketlora.orchestrator")

_CODES: list[tuple[type[errors.OrchestratorError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]

R = TypeVar("R")


def status_for(exc: errors.OrchestratorError) -> grpc.StatusCode:
    """The most specific status code for a domain error."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def rpc(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Turn domain errors into statuses; anything else is logged and answered INTERNAL without details."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await fn(self, request, context)
        except errors.OrchestratorError as exc:
            await context.abort(status_for(exc), str(exc))
        except (ValueError, OverflowError) as exc:
            # Conversion of an out-of-range proto value (e.g. a timestamp beyond year 9999).
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}")
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the orchestrator log")
        raise AssertionError("unreachable")  # context.abort always raises

    return wrapper
