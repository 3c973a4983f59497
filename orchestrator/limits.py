"""Overload protection at the gRPC edge: what one caller may cost the orchestrator.

- Calls that the credential caches cannot vouch for (a first call, an enrollment, a wrong token)
  each cost a database read. They draw on a token bucket per peer address; an empty bucket is
  answered RESOURCE_EXHAUSTED before any read, so a flood of forged credentials from one address
  costs nothing but the refusal, while devices and operators already checked are never slowed.
- One device may have only a few calls in flight; more are answered RESOURCE_EXHAUSTED.
- Watch streams are capped, in all and per operator.

Every limit is a setting of `config.Limits`; RESOURCE_EXHAUSTED tells a client to back off and retry
(the agent's client treats it as transient).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc

from orchestrator.config import Limits
from orchestrator.errors import ResourceExhausted
from orchestrator.identity import DeviceCall, Identity
from orchestrator.operators import Operators
from protos.wire import DEVICE_HEADER

# Peers remembered at once; the least recently seen is forgotten first (it starts full again).
_PEERS = 10_000


class TokenBucket:
    """`rate` tokens a second up to `burst`; a clock the tests can drive."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> bool:
        """Take one token; False when there is none."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Gatekeeper:
    """The checks of one replica, run before a call reaches its servicer."""

    def __init__(
        self, limits: Limits, identity: Identity, operators: Operators, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.identity = identity
        self.operators = operators
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._in_flight: dict[str, int] = {}
        self._watches: dict[str, int] = {}

    def admit_unverified(self, peer: str, metadata: dict[str, str]) -> None:
        """Refuse a call that would need a credential read once its peer's bucket is empty."""
        token = metadata.get("authorization", "").removeprefix("Bearer ").strip()
        device = metadata.get(DEVICE_HEADER, "")
        if device and self.identity.vouched(DeviceCall(device, token)):
            return
        if not device and self.operators.cached(token) is not None:
            return
        address = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer  # without the port
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket(
                self.limits.unverified_per_s, self.limits.unverified_burst, self.clock
            )
            if len(self._buckets) > _PEERS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
        if not bucket.take():
            raise ResourceExhausted("too many unauthenticated calls from this address; retry later")

    @contextlib.contextmanager
    def device_call(self, device_id: str) -> Iterator[None]:
        """Hold one of the device's in-flight slots for the call."""
        if not device_id:
            yield
            return
        held = self._in_flight.get(device_id, 0)
        if held >= self.limits.calls_per_device:
            raise ResourceExhausted(f"device {device_id[:128]} has {held} calls in flight; retry later")
        self._in_flight[device_id] = held + 1
        try:
            yield
        finally:
            left = self._in_flight[device_id] - 1
            if left:
                self._in_flight[device_id] = left
            else:
                del self._in_flight[device_id]

    @contextlib.contextmanager
    def watch(self, operator: str) -> Iterator[None]:
        """Hold a watch-stream slot, in all and for the operator."""
        total = sum(self._watches.values())
        mine = self._watches.get(operator, 0)
        if total >= self.limits.watch_streams:
            raise ResourceExhausted(f"{total} watch streams are open on this replica; retry later")
        if mine >= self.limits.watch_streams_per_operator:
            raise ResourceExhausted(f"operator {operator} has {mine} watch streams open; close one first")
        self._watches[operator] = mine + 1
        try:
            yield
        finally:
            self._watches[operator] -= 1
            if not self._watches[operator]:
                del self._watches[operator]


class LimitsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Runs the gatekeeper's per-call checks before every call's handler (peer and metadata are
    only known there, so the handler is wrapped)."""

    def __init__(self, gate: Gatekeeper) -> None:
        self.gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith("/pocketlora."):
            return handler  # health checks and reflection are not limited
        metadata = {k: v for k, v in handler_call_details.invocation_metadata or () if isinstance(v, str)}
        gate = self.gate

        async def refuse(context: grpc.aio.ServicerContext, exc: ResourceExhausted) -> None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    gate.admit_unverified(context.peer(), metadata)
                    with gate.device_call(metadata.get(DEVICE_HEADER, "")):
                        return await inner(request, context)
                except ResourceExhausted as exc:
                    await refuse(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream_inner = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    gate.admit_unverified(context.peer(), metadata)
                except ResourceExhausted as exc:
                    await refuse(context, exc)
                async for item in stream_inner(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
