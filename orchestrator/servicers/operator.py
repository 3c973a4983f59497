"""OperatorService: operator and dashboard calls over the domain service."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator

import grpc

from orchestrator.errors import OrchestratorError
from orchestrator.servicers import convert
from orchestrator.servicers.base import ServicerBase, bearer
from orchestrator.servicers.errors import log, rpc, status_for
from protos.pocketlora.v1 import operator_service_pb2 as pb
from protos.pocketlora.v1 import operator_service_pb2_grpc as pb_grpc

WATCH_POLL_S = 0.25


class OperatorServicer(ServicerBase, pb_grpc.OperatorServiceServicer):
    """The operator-facing API; every call needs the operator token."""

    async def _operator(self, context: grpc.aio.ServicerContext) -> None:
        self.orch.authenticate_operator(bearer(context))

    @rpc
    async def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.aio.ServicerContext) -> pb.SubmitJobResponse:
        await self._operator(context)
        deadline = convert.from_ts(request.deadline, "deadline") if request.HasField("deadline") else 0.0
        job, created = await self._run(
            self.orch.submit_job,
            request.request_id,
            request.device_id,
            convert.training_dict(request.training),
            request.max_attempts,
            deadline,
        )
        return pb.SubmitJobResponse(job=convert.job_pb(job), created=created)

    @rpc
    async def SubmitCampaign(
        self, request: pb.SubmitCampaignRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitCampaignResponse:
        await self._operator(context)
        deadline = convert.from_ts(request.deadline, "deadline") if request.HasField("deadline") else 0.0
        campaign, created = await self._run(
            self.orch.submit_campaign,
            request.request_id,
            request.name,
            convert.selector(request.selector),
            convert.training_dict(request.training),
            request.max_attempts,
            deadline,
        )
        _, counts = await self._run(self.orch.get_campaign, campaign.campaign_id)
        return pb.SubmitCampaignResponse(campaign=convert.campaign_pb(campaign, counts), created=created)

    @rpc
    async def GetCampaign(
        self, request: pb.GetCampaignRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCampaignResponse:
        await self._operator(context)
        campaign, counts = await self._run(self.orch.get_campaign, request.campaign_id)
        return pb.GetCampaignResponse(campaign=convert.campaign_pb(campaign, counts))

    @rpc
    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.CancelJobResponse:
        await self._operator(context)
        return pb.CancelJobResponse(job=convert.job_pb(await self._run(self.orch.cancel_job, request.job_id)))

    @rpc
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.GetJobResponse:
        await self._operator(context)
        return pb.GetJobResponse(job=convert.job_pb(await self._run(self.orch.get_job, request.job_id)))

    @rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        await self._operator(context)
        flt = convert.job_filter(request.filter)
        jobs, token = await self._run(self.orch.list_jobs, flt, request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[convert.job_pb(j) for j in jobs], next_page_token=token)

    async def WatchJobs(
        self, request: pb.WatchJobsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobsResponse]:
        """Stream job changes; follows the store's watch cursor, so it sees every replica's writes."""
        # A streaming method cannot use @rpc, so it maps errors the same way here: before, a
        # store error (or a filter PostgreSQL refused) escaped as UNKNOWN.
        try:
            self.orch.authenticate_operator(bearer(context))
            flt = convert.job_filter(request.filter)
            cursor = await self._run(self.orch.watch_cursor)
            if request.include_initial:
                jobs, _ = await self._run(self.orch.list_jobs, flt, 1000, "")
                for job in reversed(jobs):
                    yield pb.WatchJobsResponse(job=convert.job_pb(job))
            while not context.done():
                changed, cursor = await self._run(self.orch.jobs_changed_after, cursor, flt, 500)
                for job in changed:
                    yield pb.WatchJobsResponse(job=convert.job_pb(job))
                if not changed:
                    await asyncio.sleep(WATCH_POLL_S)
        except OrchestratorError as exc:
            await context.abort(status_for(exc), str(exc))
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("internal error in WatchJobs")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the orchestrator log")

    @rpc
    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDevicesResponse:
        await self._operator(context)
        devices, token = await self._run(
            self.orch.list_devices, convert.selector(request.selector), request.page_size, request.page_token
        )
        return pb.ListDevicesResponse(devices=[convert.device_pb(d) for d in devices], next_page_token=token)

    @rpc
    async def GetDevice(self, request: pb.GetDeviceRequest, context: grpc.aio.ServicerContext) -> pb.GetDeviceResponse:
        await self._operator(context)
        return pb.GetDeviceResponse(device=convert.device_pb(await self._run(self.orch.get_device, request.device_id)))

    @rpc
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        await self._operator(context)
        adapters, token = await self._run(
            self.orch.list_adapters, request.device_id, request.name, request.page_size, request.page_token
        )
        return pb.ListAdaptersResponse(adapters=[convert.adapter_pb(a) for a in adapters], next_page_token=token)

    @rpc
    async def GetAdapter(
        self, request: pb.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAdapterResponse:
        await self._operator(context)
        return pb.GetAdapterResponse(
            adapter=convert.adapter_pb(await self._run(self.orch.get_adapter, request.adapter_id))
        )

    @rpc
    async def ActivateAdapter(
        self, request: pb.ActivateAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.ActivateAdapterResponse:
        await self._operator(context)
        selector = convert.selector(request.selector) if request.HasField("selector") else None
        devices = await self._run(
            functools.partial(
                self.orch.activate_adapter,
                request.adapter_id,
                name=request.adapter_name,
                selector=selector,
                campaign_id=request.campaign_id,
                canary_percent=request.canary_percent,
            )
        )
        return pb.ActivateAdapterResponse(device_ids=devices)

    @rpc
    async def DeactivateAdapter(
        self, request: pb.DeactivateAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeactivateAdapterResponse:
        await self._operator(context)
        selector = convert.selector(request.selector) if request.HasField("selector") else None
        devices = await self._run(self.orch.deactivate_adapter, request.device_id, selector)
        return pb.DeactivateAdapterResponse(device_ids=devices)

    @rpc
    async def RollbackAdapter(
        self, request: pb.RollbackAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackAdapterResponse:
        await self._operator(context)
        return pb.RollbackAdapterResponse(
            desired_adapter_id=await self._run(self.orch.rollback_adapter, request.device_id)
        )

    @rpc
    async def GetFleetSummary(
        self, request: pb.GetFleetSummaryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetFleetSummaryResponse:
        await self._operator(context)
        s = await self._run(self.orch.fleet_summary)
        return pb.GetFleetSummaryResponse(
            jobs_by_state={"JOB_STATE_" + k: v for k, v in s["jobs_by_state"].items()},
            devices_by_eligibility={
                "ELIGIBILITY_REASON_" + (k or "UNSPECIFIED"): v for k, v in s["devices_by_eligibility"].items()
            },
            device_count=s["device_count"],
            devices_online=s["devices_online"],
            adapter_count=s["adapter_count"],
        )

    @rpc
    async def CreateEnrollmentToken(
        self, request: pb.CreateEnrollmentTokenRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateEnrollmentTokenResponse:
        await self._operator(context)
        ttl = request.ttl.ToNanoseconds() / 1e9 if request.HasField("ttl") else 86400.0
        token, expires = await self._run(self.orch.create_enrollment_token, ttl, request.description)
        return pb.CreateEnrollmentTokenResponse(token=token, expires_at=convert.ts(expires))
