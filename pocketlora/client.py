"""Small gRPC clients for operators (CLI, dashboards, the demo) with auth metadata and timeouts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from pocketlora.tls import TlsConfig, describe_failure, open_channel
from protos.pocketlora.v1 import admin_service_pb2_grpc as admin_grpc
from protos.pocketlora.v1 import operator_service_pb2 as op
from protos.pocketlora.v1 import operator_service_pb2_grpc as op_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


class ClientError(Exception):
    """A call failed; the message is one line fit for a terminal."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def describe_rpc_error(exc: grpc.RpcError, address: str, tls: TlsConfig | None = None) -> ClientError:
    """One line for a failed call: unreachable servers are named, TLS failures explained,
    statuses shown plainly."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    tls_problem = describe_failure(details or "", tls) if code == grpc.StatusCode.UNAVAILABLE else None
    if tls_problem:
        return ClientError(f"cannot talk to the orchestrator at {address}: {tls_problem} ({details})", code)
    if (
        code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        and "connect" in (details or "").lower()
    ):
        return ClientError(f"cannot reach the orchestrator at {address}: {details}", code)
    if code == grpc.StatusCode.UNAVAILABLE:
        return ClientError(f"cannot reach the orchestrator at {address} ({details})", code)
    name = code.name if code is not None else "ERROR"
    return ClientError(f"{name}: {details}", code)


class OperatorClient:
    """OperatorService and AdminService with the operator token attached to every call (over TLS
    when `tls`)."""

    def __init__(self, address: str, token: str, *, timeout_s: float = 15.0, tls: TlsConfig | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.tls = tls
        self._metadata = (("authorization", f"Bearer {token}"),)
        self.channel = open_channel(address, tls)
        self.stub = op_grpc.OperatorServiceStub(self.channel)
        self.admin_stub = admin_grpc.AdminServiceStub(self.channel)

    def call(self, method: str, request: Any, *, timeout_s: float | None = None) -> Any:
        """Invoke one unary RPC by name; failures become ClientError."""
        try:
            stub = self.stub if hasattr(self.stub, method) else self.admin_stub
            return getattr(stub, method)(request, metadata=self._metadata, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc, self.address, self.tls) from None

    def watch(self, request: op.WatchJobsRequest) -> Iterator[op.WatchJobsResponse]:
        """Stream job changes until the caller stops iterating."""
        try:
            yield from self.stub.WatchJobs(request, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise describe_rpc_error(exc, self.address, self.tls) from None

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
