"""Roles are enforced on every operator-facing RPC: a table-driven test over every method of
OperatorService and AdminService, called by a viewer, an operator and an admin."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory

from orchestrator.servicers.roles import REQUIRED_ROLE
from protos import wire
from protos.pocketlora.v1 import admin_service_pb2 as adpb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.wire import Role
from tests.support.orch import ServerThread, op_md

SERVICES = {"OperatorService": opb, "AdminService": adpb}
METHODS = [
    (service, m) for service, module in SERVICES.items() for m in module.DESCRIPTOR.services_by_name[service].methods
]


def test_every_operator_facing_method_has_a_role_and_nothing_else_does() -> None:
    assert {m.name for _, m in METHODS} == set(REQUIRED_ROLE)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, dict[Role, str]]]:
    with ServerThread(tmp_path_factory.mktemp("roles")) as srv:
        tokens: dict[Role, str] = {}
        for role in Role:
            name = f"op-{role.value.lower()}"
            srv.admin.CreateOperator(adpb.CreateOperatorRequest(name=name, role=wire.to_pb(role)), metadata=op_md())  # type: ignore[arg-type]
            reply = srv.admin.CreateOperatorToken(adpb.CreateOperatorTokenRequest(operator=name), metadata=op_md())
            tokens[role] = reply.token
        yield srv, tokens


def _call(srv: ServerThread, service: str, method: Any, token: str) -> grpc.StatusCode:
    request = message_factory.GetMessageClass(method.input_type)()
    path = f"/pocketlora.v1.{service}/{method.name}"
    out = message_factory.GetMessageClass(method.output_type)
    try:
        if method.server_streaming:
            stream = srv.channel.unary_stream(
                path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=out.FromString
            )
            for _ in stream(request, metadata=op_md(token), timeout=0.5):
                pass
        else:
            unary = srv.channel.unary_unary(
                path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=out.FromString
            )
            unary(request, metadata=op_md(token), timeout=20)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[m.name for _, m in METHODS])
def test_each_role_may_call_exactly_what_its_role_allows(
    world: tuple[ServerThread, dict[Role, str]], service: str, method: Any
) -> None:
    srv, tokens = world
    needed = REQUIRED_ROLE[method.name]
    for role, token in tokens.items():
        code = _call(srv, service, method, token)
        if role.allows(needed):
            # Past authorization: an empty request may still be refused, but not for who asks.
            assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), (role, code)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (role, code)
    assert _call(srv, service, method, "not-a-token") == grpc.StatusCode.UNAUTHENTICATED
