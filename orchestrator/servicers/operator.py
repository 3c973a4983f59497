"""OperatorService: operator and dashboard calls over the domain service (campaigns, rollouts and
gate policies in fleet_rpcs.py)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from concurrent.futures import Executor

import grpc

from orchestrator.domain import JobRecord
from orchestrator.feed import ChangeFeed
from orchestrator.limits import Gatekeeper
from orchestrator.polls import PollRunner
from orchestrator.service import Orchestrator
from orchestrator.servicers import convert
from orchestrator.servicers import convert_fleet as cf
from orchestrator.servicers.errors import rpc
from orchestrator.servicers.fleet_rpcs import FleetRpcs
from protos.pocketlora.v1 import operator_service_pb2 as pb
from protos.pocketlora.v1 import operator_service_pb2_grpc as pb_grpc


class OperatorServicer(FleetRpcs, pb_grpc.OperatorServiceServicer):
    """The operator-facing API; every call needs an operator token whose role allows it."""

    def __init__(
        self, orch: Orchestrator, polls: PollRunner, executor: Executor, gate: Gatekeeper, feed: ChangeFeed
    ) -> None:
        super().__init__(orch, polls, executor, gate)
        self.feed = feed

    @rpc
    async def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.aio.ServicerContext) -> pb.SubmitJobResponse:
        who = await self._principal(context, "SubmitJob")
        deadline = convert.from_ts(request.deadline, "deadline") if request.HasField("deadline") else 0.0
        job, created = await self._change(
            who,
            "SubmitJob",
            request.device_id,
            self.orch.fleet.submit_job,
            request.request_id,
            request.device_id,
            convert.training_dict(request.training),
            request.max_attempts,
            deadline,
        )
        return pb.SubmitJobResponse(job=convert.job_pb(job), created=created)

    @rpc
    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.CancelJobResponse:
        who = await self._principal(context, "CancelJob")
        job = await self._change(who, "CancelJob", request.job_id, self.orch.fleet.cancel_job, request.job_id)
        return pb.CancelJobResponse(job=convert.job_pb(job))

    @rpc
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.GetJobResponse:
        await self._principal(context, "GetJob")
        return pb.GetJobResponse(job=convert.job_pb(await self._run(self.orch.queries.get_job, request.job_id)))

    @rpc
    async def GetJobHistory(
        self, request: pb.GetJobHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetJobHistoryResponse:
        await self._principal(context, "GetJobHistory")
        return convert.history_pb(await self._run(self.orch.queries.job_history, request.job_id))

    @rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        await self._principal(context, "ListJobs")
        flt = convert.job_filter(request.filter)
        jobs, token = await self._run(self.orch.queries.list_jobs, flt, request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[convert.job_pb(j) for j in jobs], next_page_token=token)

    @rpc
    async def WatchJobs(
        self, request: pb.WatchJobsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobsResponse]:
        """Stream job changes from the process's change feed (which sees every replica's writes)."""
        principal = await self._principal(context, "WatchJobs")
        flt = convert.job_filter(request.filter)
        with self.gate.watch(principal.name):
            async with self.feed.subscribe(flt, encode=watch_response) as changes:
                if request.include_initial:
                    jobs, _ = await self._run(self.orch.queries.list_jobs, flt, 1000, "")
                    for job in reversed(jobs):
                        yield watch_response(job)
                async for response in changes:
                    yield response

    @rpc
    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDevicesResponse:
        await self._principal(context, "ListDevices")
        devices, token = await self._run(
            self.orch.queries.list_devices, convert.selector(request.selector), request.page_size, request.page_token
        )
        return pb.ListDevicesResponse(devices=[convert.device_pb(d) for d in devices], next_page_token=token)

    @rpc
    async def GetDevice(self, request: pb.GetDeviceRequest, context: grpc.aio.ServicerContext) -> pb.GetDeviceResponse:
        await self._principal(context, "GetDevice")
        return pb.GetDeviceResponse(
            device=convert.device_pb(await self._run(self.orch.queries.get_device, request.device_id))
        )

    @rpc
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        await self._principal(context, "ListAdapters")
        adapters, token = await self._run(
            self.orch.queries.list_adapters, request.device_id, request.name, request.page_size, request.page_token
        )
        return pb.ListAdaptersResponse(adapters=[convert.adapter_pb(a) for a in adapters], next_page_token=token)

    @rpc
    async def GetAdapter(
        self, request: pb.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAdapterResponse:
        await self._principal(context, "GetAdapter")
        return pb.GetAdapterResponse(
            adapter=convert.adapter_pb(await self._run(self.orch.queries.get_adapter, request.adapter_id))
        )

    @rpc
    async def ActivateAdapter(
        self, request: pb.ActivateAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.ActivateAdapterResponse:
        who = await self._principal(context, "ActivateAdapter")
        selector = convert.selector(request.selector) if request.HasField("selector") else None
        target = request.adapter_id or request.adapter_name or request.campaign_id
        activate = functools.partial(
            self.orch.fleet.activate_adapter,
            name=request.adapter_name,
            selector=selector,
            campaign_id=request.campaign_id,
            canary_percent=request.canary_percent,
            eval_gate=cf.eval_gate(request.eval_gate, request.HasField("eval_gate")),
        )
        done = await self._change(who, "ActivateAdapter", target, activate, request.adapter_id)
        return cf.activation_pb(done)

    @rpc
    async def DeactivateAdapter(
        self, request: pb.DeactivateAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeactivateAdapterResponse:
        who = await self._principal(context, "DeactivateAdapter")
        selector = convert.selector(request.selector) if request.HasField("selector") else None
        devices = await self._change(
            who, "DeactivateAdapter", request.device_id, self.orch.fleet.deactivate_adapter, request.device_id, selector
        )
        return pb.DeactivateAdapterResponse(device_ids=devices)

    @rpc
    async def RollbackAdapter(
        self, request: pb.RollbackAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackAdapterResponse:
        who = await self._principal(context, "RollbackAdapter")
        return pb.RollbackAdapterResponse(
            desired_adapter_id=await self._change(
                who, "RollbackAdapter", request.device_id, self.orch.fleet.rollback_adapter, request.device_id
            )
        )

    @rpc
    async def GetFleetSummary(
        self, request: pb.GetFleetSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetFleetSummaryResponse:
        await self._principal(context, "GetFleetSummary")
        return convert.summary_pb(await self._run(self.orch.fleet.fleet_summary))

    @rpc
    async def CreateEnrollmentToken(
        self, request: pb.CreateEnrollmentTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateEnrollmentTokenResponse:
        who = await self._principal(context, "CreateEnrollmentToken")
        ttl = request.ttl.ToNanoseconds() / 1e9 if request.HasField("ttl") else 86400.0
        token, record = await self._change(
            who,
            "CreateEnrollmentToken",
            request.description,
            self.orch.identity.create_enrollment_token,
            ttl,
            request.description,
            request.max_devices,
            dict(request.labels),
        )
        return pb.CreateEnrollmentTokenResponse(
            token=token, expires_at=convert.ts(record.expires_at), token_id=record.token_id
        )


def watch_response(job: JobRecord) -> pb.WatchJobsResponse:
    """A change as WatchJobs sends it; the change feed encodes each change once for all streams."""
    return pb.WatchJobsResponse(job=convert.job_pb(job))
