"""OperatorService's campaign, rollout and gate-policy calls (a part of OperatorServicer).

Each method asks for its principal by its own name (roles.REQUIRED_ROLE), converts, calls one
domain method of `orch.campaigns`, `orch.rollouts` or `orch.policies` (changes through `_change`,
which audits a refusal; the domain audits what it does), and converts back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import grpc

from orchestrator.domain import CampaignState, RolloutState
from orchestrator.servicers import convert
from orchestrator.servicers import convert_fleet as cf
from orchestrator.servicers.base import OperatorServicerBase
from orchestrator.servicers.errors import rpc
from protos.pocketlora.v1 import operator_service_pb2 as pb

T = TypeVar("T")


class FleetRpcs(OperatorServicerBase):
    """Campaigns, rollouts and gate policies."""

    # ------------------------------------------------------------------ campaigns
    @rpc
    async def SubmitCampaign(
        self, request: pb.SubmitCampaignRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitCampaignResponse:
        who = await self._principal(context, "SubmitCampaign")
        deadline = convert.from_ts(request.deadline, "deadline") if request.HasField("deadline") else 0.0
        view, created = await self._change(
            who,
            "SubmitCampaign",
            request.name,
            self.orch.campaigns.create,
            request.request_id,
            request.name,
            convert.selector(request.selector),
            convert.training_dict(request.training),
            request.max_attempts,
            deadline,
            request.target_count,
        )
        return pb.SubmitCampaignResponse(campaign=cf.campaign_pb(view), created=created)

    @rpc
    async def GetCampaign(
        self, request: pb.GetCampaignRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCampaignResponse:
        await self._principal(context, "GetCampaign")
        view = await self._run(self.orch.campaigns.get, request.campaign_id)
        return pb.GetCampaignResponse(campaign=cf.campaign_pb(view))

    @rpc
    async def ListCampaigns(
        self, request: pb.ListCampaignsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCampaignsResponse:
        await self._principal(context, "ListCampaigns")
        states = cf.states(CampaignState, request.states)
        views, token = await self._run(
            self.orch.campaigns.list_campaigns, states, request.page_size, request.page_token
        )
        return pb.ListCampaignsResponse(campaigns=[cf.campaign_pb(v) for v in views], next_page_token=token)

    @rpc
    async def PauseCampaign(
        self, request: pb.PauseCampaignRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseCampaignResponse:
        view = await self._change_one(context, "PauseCampaign", self.orch.campaigns.pause, request.campaign_id)
        return pb.PauseCampaignResponse(campaign=cf.campaign_pb(view))

    @rpc
    async def ResumeCampaign(
        self, request: pb.ResumeCampaignRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeCampaignResponse:
        view = await self._change_one(context, "ResumeCampaign", self.orch.campaigns.resume, request.campaign_id)
        return pb.ResumeCampaignResponse(campaign=cf.campaign_pb(view))

    @rpc
    async def CancelCampaign(
        self, request: pb.CancelCampaignRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelCampaignResponse:
        view, cancelled = await self._change_one(
            context, "CancelCampaign", self.orch.campaigns.cancel, request.campaign_id
        )
        return pb.CancelCampaignResponse(campaign=cf.campaign_pb(view), cancelled_jobs=cancelled)

    async def _change_one(self, context: grpc.aio.ServicerContext, action: str, fn: Callable[..., T], target: str) -> T:
        who = await self._principal(context, action)
        return await self._change(who, action, target, fn, target)

    # ------------------------------------------------------------------ rollouts
    @rpc
    async def StartRollout(
        self, request: pb.StartRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartRolloutResponse:
        who = await self._principal(context, "StartRollout")
        view, created = await self._change(
            who,
            "StartRollout",
            request.campaign_id,
            self.orch.rollouts.start,
            request.request_id,
            request.campaign_id,
            list(request.steps),
            cf.eval_gate(request.eval_gate, request.HasField("eval_gate")),
            request.min_healthy_share if request.HasField("min_healthy_share") else None,
            request.max_failure_share if request.HasField("max_failure_share") else None,
            request.bake.ToNanoseconds() / 1e9 if request.HasField("bake") else 0.0,
        )
        return pb.StartRolloutResponse(rollout=cf.rollout_pb(view), created=created)

    @rpc
    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRolloutResponse:
        await self._principal(context, "GetRollout")
        view = await self._run(
            functools.partial(
                self.orch.rollouts.get,
                request.rollout_id,
                request.campaign_id,
                include_devices=request.include_devices,
            )
        )
        return pb.GetRolloutResponse(
            rollout=cf.rollout_pb(view), devices=[cf.rollout_device_pb(t, d) for t, d in view.devices]
        )

    @rpc
    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRolloutsResponse:
        await self._principal(context, "ListRollouts")
        states = cf.states(RolloutState, request.states)
        views, token = await self._run(
            self.orch.rollouts.list_rollouts, request.campaign_id, states, request.page_size, request.page_token
        )
        return pb.ListRolloutsResponse(rollouts=[cf.rollout_pb(v) for v in views], next_page_token=token)

    @rpc
    async def PauseRollout(
        self, request: pb.PauseRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseRolloutResponse:
        view = await self._change_one(context, "PauseRollout", self.orch.rollouts.pause, request.rollout_id)
        return pb.PauseRolloutResponse(rollout=cf.rollout_pb(view))

    @rpc
    async def ResumeRollout(
        self, request: pb.ResumeRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeRolloutResponse:
        view = await self._change_one(context, "ResumeRollout", self.orch.rollouts.resume, request.rollout_id)
        return pb.ResumeRolloutResponse(rollout=cf.rollout_pb(view))

    @rpc
    async def UndoRollout(
        self, request: pb.UndoRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.UndoRolloutResponse:
        view, back = await self._change_one(context, "UndoRollout", self.orch.rollouts.undo, request.rollout_id)
        return pb.UndoRolloutResponse(rollout=cf.rollout_pb(view), rolled_back_device_ids=back)

    # ------------------------------------------------------------------ gate policies
    @rpc
    async def SetGatePolicy(
        self, request: pb.SetGatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetGatePolicyResponse:
        who = await self._principal(context, "SetGatePolicy")
        p = request.policy
        record = await self._change(
            who,
            "SetGatePolicy",
            p.name,
            self.orch.policies.set,
            p.name,
            convert.selector(p.selector),
            cf.policy_fields(p.policy),
            p.priority,
        )
        return pb.SetGatePolicyResponse(policy=cf.fleet_policy_pb(record))

    @rpc
    async def ListGatePolicies(
        self, request: pb.ListGatePoliciesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListGatePoliciesResponse:
        await self._principal(context, "ListGatePolicies")
        records = await self._run(self.orch.policies.list_policies)
        return pb.ListGatePoliciesResponse(policies=[cf.fleet_policy_pb(r) for r in records])

    @rpc
    async def DeleteGatePolicy(
        self, request: pb.DeleteGatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteGatePolicyResponse:
        deleted = await self._change_one(context, "DeleteGatePolicy", self.orch.policies.delete, request.name)
        return pb.DeleteGatePolicyResponse(deleted=deleted)
