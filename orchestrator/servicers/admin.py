"""AdminService: operators and their tokens, enrollment tokens, device identities, the audit log.

Every call needs an admin token; every change goes through `_change`, so it is audited in its
own transaction and a refusal is audited too.
"""

from __future__ import annotations

import grpc

from orchestrator.access_records import AuditFilter
from orchestrator.errors import InvalidArgument
from orchestrator.servicers import convert
from orchestrator.servicers.admin_convert import (
    audit_event_pb,
    enrollment_token_pb,
    operator_pb,
    operator_token_pb,
    role,
)
from orchestrator.servicers.base import OperatorServicerBase
from orchestrator.servicers.errors import rpc
from protos.pocketlora.v1 import admin_service_pb2 as pb
from protos.pocketlora.v1 import admin_service_pb2_grpc as pb_grpc
from protos.wire import Role


class AdminServicer(OperatorServicerBase, pb_grpc.AdminServiceServicer):
    """The administrators' API."""

    @rpc
    async def CreateOperator(
        self, request: pb.CreateOperatorRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateOperatorResponse:
        who = await self._principal(context, "CreateOperator")
        granted = role(request.role, "role") or Role.VIEWER
        operator = await self._change(
            who, "CreateOperator", request.name, self.orch.operators.create_operator, request.name, granted
        )
        return pb.CreateOperatorResponse(operator=operator_pb(operator))

    @rpc
    async def ListOperators(
        self, request: pb.ListOperatorsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOperatorsResponse:
        await self._principal(context, "ListOperators")
        operators = await self._run(self.orch.operators.list_operators)
        return pb.ListOperatorsResponse(operators=[operator_pb(o) for o in operators])

    @rpc
    async def CreateOperatorToken(
        self, request: pb.CreateOperatorTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateOperatorTokenResponse:
        who = await self._principal(context, "CreateOperatorToken")
        ttl = request.ttl.ToNanoseconds() / 1e9 if request.HasField("ttl") else 0.0
        secret, record = await self._change(
            who,
            "CreateOperatorToken",
            request.operator,
            self.orch.operators.create_token,
            request.operator,
            role(request.role, "role"),
            ttl,
            request.description,
        )
        return pb.CreateOperatorTokenResponse(token=secret, info=operator_token_pb(record))

    @rpc
    async def ListOperatorTokens(
        self, request: pb.ListOperatorTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListOperatorTokensResponse:
        await self._principal(context, "ListOperatorTokens")
        tokens, page = await self._run(
            self.orch.operators.list_tokens, request.operator, request.page_size, request.page_token
        )
        return pb.ListOperatorTokensResponse(tokens=[operator_token_pb(t) for t in tokens], next_page_token=page)

    @rpc
    async def RevokeOperatorToken(
        self, request: pb.RevokeOperatorTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeOperatorTokenResponse:
        who = await self._principal(context, "RevokeOperatorToken")
        revoke = self.orch.operators.revoke_token
        await self._change(who, "RevokeOperatorToken", request.token_id, revoke, request.token_id)
        return pb.RevokeOperatorTokenResponse()

    @rpc
    async def ListEnrollmentTokens(
        self, request: pb.ListEnrollmentTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListEnrollmentTokensResponse:
        await self._principal(context, "ListEnrollmentTokens")
        tokens, page = await self._run(self.orch.identity.list_enrollment_tokens, request.page_size, request.page_token)
        return pb.ListEnrollmentTokensResponse(tokens=[enrollment_token_pb(t) for t in tokens], next_page_token=page)

    @rpc
    async def RevokeEnrollmentToken(
        self, request: pb.RevokeEnrollmentTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeEnrollmentTokenResponse:
        who = await self._principal(context, "RevokeEnrollmentToken")
        revoke = self.orch.identity.revoke_enrollment_token
        await self._change(who, "RevokeEnrollmentToken", request.token_id, revoke, request.token_id)
        return pb.RevokeEnrollmentTokenResponse()

    @rpc
    async def SetDeviceLabels(
        self, request: pb.SetDeviceLabelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetDeviceLabelsResponse:
        who = await self._principal(context, "SetDeviceLabels")
        label = self.orch.identity.set_device_labels
        device = await self._change(
            who, "SetDeviceLabels", request.device_id, label, request.device_id, dict(request.labels)
        )
        return pb.SetDeviceLabelsResponse(device=convert.device_pb(device))

    @rpc
    async def ResetDevice(
        self, request: pb.ResetDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetDeviceResponse:
        who = await self._principal(context, "ResetDevice")
        reset = self.orch.identity.reset_device
        device = await self._change(who, "ResetDevice", request.device_id, reset, request.device_id)
        return pb.ResetDeviceResponse(device=convert.device_pb(device))

    @rpc
    async def RevokeDevice(
        self, request: pb.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeDeviceResponse:
        who = await self._principal(context, "RevokeDevice")
        revoke = self.orch.identity.revoke_device
        device = await self._change(who, "RevokeDevice", request.device_id, revoke, request.device_id)
        return pb.RevokeDeviceResponse(device=convert.device_pb(device))

    @rpc
    async def DeleteDevice(
        self, request: pb.DeleteDeviceRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDeviceResponse:
        who = await self._principal(context, "DeleteDevice")
        delete = self.orch.identity.delete_device
        cancelled = await self._change(who, "DeleteDevice", request.device_id, delete, request.device_id)
        return pb.DeleteDeviceResponse(cancelled_jobs=cancelled)

    @rpc
    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        await self._principal(context, "ListAuditEvents")
        f = request.filter
        flt = AuditFilter(
            actor=f.actor,
            action=f.action,
            target=f.target,
            since=convert.from_ts(f.since, "filter.since"),
            until=convert.from_ts(f.until, "filter.until"),
        )
        if flt.since and flt.until and flt.since >= flt.until:
            raise InvalidArgument("filter.until", "must be after filter.since")
        events, page = await self._run(self.orch.audit.list, flt, request.page_size, request.page_token)
        return pb.ListAuditEventsResponse(events=[audit_event_pb(e) for e in events], next_page_token=page)
