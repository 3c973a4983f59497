"""RPC metrics for every gRPC method: calls by method and status code, and their latency.

A grpc.aio server interceptor wraps each unary and server-streaming handler (the two kinds the
services have); the labels are the service and method names the server registered plus the
status code, so their number is bounded whatever clients send (an unknown method never reaches
a handler and is not counted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from orchestrator.metrics import REGISTRY

HANDLED = Counter(
    "pocketlora_grpc_server_handled",
    "gRPC calls completed by the server, by service, method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
    registry=REGISTRY,
)
HANDLING_SECONDS = Histogram(
    "pocketlora_grpc_server_handling_seconds",
    "Time from a call's arrival to its reply (a stream's whole life for streaming methods).",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0),
    registry=REGISTRY,
)


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    """The status the call ended with."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    try:
        code = context.code()
    except Exception:  # an older grpc.aio context without code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return next((str(c.name) for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN" if exc is not None else "OK"


class RpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = str(handler_call_details.method).lstrip("/").rpartition("/")
        service = service.rsplit(".", 1)[-1]
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_unary(handler.unary_unary, service, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_stream(handler.unary_stream, service, method))
        return handler


def _unary(behavior: Callable[..., Awaitable[Any]], service: str, method: str) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _observe(service, method, _code(context, error), started)

    return wrapped


def _stream(
    behavior: Callable[..., AsyncIterator[Any]], service: str, method: str
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            _observe(service, method, _code(context, error), started)

    return wrapped


def _observe(service: str, method: str, code: str, started: float) -> None:
    HANDLED.labels(service, method, code).inc()
    HANDLING_SECONDS.labels(service, method).observe(time.perf_counter() - started)
