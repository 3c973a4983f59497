"""AgentService: device calls. Each method authenticates, converts, calls one domain method."""

from __future__ import annotations

import asyncio
import functools

import grpc

from orchestrator.domain import ErrorClass
from orchestrator.errors import InvalidArgument, PermissionDenied, Unauthenticated
from orchestrator.service import HeartbeatInput
from orchestrator.servicers import convert
from orchestrator.servicers.base import ServicerBase, bearer, metadata_value
from orchestrator.servicers.errors import rpc
from protos.pocketlora.v1 import agent_service_pb2 as pb
from protos.pocketlora.v1 import agent_service_pb2_grpc as pb_grpc
from protos.pocketlora.v1 import types_pb2 as tpb

DEVICE_HEADER = "x-pocketlora-device"


class AgentServicer(ServicerBase, pb_grpc.AgentServiceServicer):
    """The device-facing API."""

    async def _device(self, context: grpc.aio.ServicerContext, claimed: str = "") -> str:
        device_id, unverified = await self._device_deferred(context, claimed)
        if unverified is not None:
            await self._run(self.orch.authenticate_device, device_id, unverified)
        return device_id

    async def _device_deferred(self, context: grpc.aio.ServicerContext, claimed: str = "") -> tuple[str, str | None]:
        """The calling device, and its credential when the cache could not vouch for it (None
        when it did): the domain call then checks it against the device row it reads anyway,
        saving a transaction and an executor hop per poll."""
        device_id = metadata_value(context, DEVICE_HEADER)
        if not device_id:
            raise Unauthenticated(f"metadata {DEVICE_HEADER} is required")
        credential = bearer(context)
        # A cached credential is checked on the event loop, without I/O.
        unverified = None if self.orch.authenticate_device_cached(device_id, credential) else credential
        if claimed and claimed != device_id:
            if unverified is not None:  # a stranger learns nothing before authenticating
                await self._run(self.orch.authenticate_device, device_id, unverified)
            raise PermissionDenied(f"credential is for {device_id!r}, request names {claimed!r}")
        return device_id, unverified

    @rpc
    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        caps = convert.capabilities_dict(request.capabilities)
        credential = await self._run(self.orch.enroll, bearer(context), request.device_id, caps)
        return pb.EnrollResponse(device_credential=credential, next_poll_after=convert.duration(1.0))

    @rpc
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        device_id, credential = await self._device_deferred(context, request.device_id)
        try:
            hb = self._heartbeat_input(request)
        except InvalidArgument:
            if credential is not None:  # a stranger learns nothing before authenticating
                await self._run(self.orch.authenticate_device, device_id, credential)
            raise
        result = await self._run_poll(functools.partial(self.orch.heartbeat, device_id, hb, credential=credential))
        reply = pb.HeartbeatResponse(
            cancel_job_ids=result.cancel_job_ids,
            stale_job_ids=result.stale_job_ids,
            next_poll_after=convert.duration(result.next_poll_s),
            lease_expires_at=convert.ts(result.lease_expires_at),
        )
        if result.desired_adapter is not None:
            reply.desired_adapter.CopyFrom(convert.adapter_ref(result.desired_adapter))
        return reply

    @staticmethod
    def _heartbeat_input(request: pb.HeartbeatRequest) -> HeartbeatInput:
        running = request.running if request.HasField("running") else None
        hb = HeartbeatInput(
            power=convert.power_dict(request.power),
            eligible=request.eligible,
            eligibility_reason=convert.reason_name(request.eligibility_reason),
            eligibility_detail=request.eligibility_detail,
            active_adapter_id=request.active_adapter_id,
            free_storage_bytes=request.free_storage_bytes,
        )
        if running is not None and running.job_id:
            hb.running_job_id = running.job_id
            hb.running_epoch = running.lease_epoch
            if running.state != tpb.JOB_STATE_UNSPECIFIED:
                hb.running_state = convert.job_state(running.state, "running.state")
            hb.progress = convert.progress(running.progress)
        return hb

    @rpc
    async def LeaseJob(self, request: pb.LeaseJobRequest, context: grpc.aio.ServicerContext) -> pb.LeaseJobResponse:
        device_id, credential = await self._device_deferred(context, request.device_id)
        wait = min(request.wait.ToNanoseconds() / 1e9, 30.0) if request.HasField("wait") else 0.0
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(wait, 0.0)
        while True:
            result = await self._run_poll(functools.partial(self.orch.lease, device_id, credential=credential))
            credential = None  # verified (or refused) by the first call
            if result.job is not None or loop.time() >= give_up:
                break
            await asyncio.sleep(min(0.5, give_up - loop.time()))
        reply = pb.LeaseJobResponse(next_poll_after=convert.duration(result.next_poll_s))
        job = result.job
        if job is not None:
            reply.assignment.CopyFrom(
                pb.Assignment(
                    job_id=job.job_id,
                    attempt=job.attempt,
                    lease_epoch=job.lease_epoch,
                    lease_expires_at=convert.ts(job.lease_expires_at),
                    training=convert.training_pb(job.training),
                    upload_url=result.upload_url,
                    upload_url_expires_at=convert.ts(result.upload_url_expires_at),
                    dataset_url=result.dataset_url,
                )
            )
        return reply

    @rpc
    async def ReportProgress(
        self, request: pb.ReportProgressRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportProgressResponse:
        device_id = await self._device(context)
        state = convert.job_state(request.state)
        result = await self._run(
            self.orch.report_progress,
            device_id,
            request.job_id,
            request.lease_epoch,
            state,
            convert.progress(request.progress),
            convert.reason_name(request.pause_reason),
        )
        return pb.ReportProgressResponse(
            lease_expires_at=convert.ts(result.lease_expires_at),
            cancel_requested=result.cancel_requested,
            upload_url=result.upload_url,
            upload_url_expires_at=convert.ts(result.upload_url_expires_at),
        )

    @rpc
    async def CompleteJob(
        self, request: pb.CompleteJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteJobResponse:
        device_id = await self._device(context)
        metrics = {k[:64]: float(v) for k, v in list(request.metrics.items())[:64]}
        adapter = await self._run(
            self.orch.complete,
            device_id,
            request.job_id,
            request.lease_epoch,
            request.sha256,
            request.size_bytes,
            metrics,
        )
        return pb.CompleteJobResponse(adapter=convert.adapter_pb(adapter))

    @rpc
    async def FailJob(self, request: pb.FailJobRequest, context: grpc.aio.ServicerContext) -> pb.FailJobResponse:
        device_id = await self._device(context)
        if request.error_class == 0 or request.error_class not in tpb.ErrorClass.values():
            raise InvalidArgument("error_class", f"{request.error_class} is not a valid error class")
        error = ErrorClass(tpb.ErrorClass.Name(request.error_class).removeprefix("ERROR_CLASS_"))
        will_retry, state = await self._run(
            self.orch.fail, device_id, request.job_id, request.lease_epoch, error, request.message
        )
        return pb.FailJobResponse(will_retry=will_retry, state=convert.job_state_pb(state))  # type: ignore[arg-type]

    @rpc
    async def GetAdapterDownloadUrl(
        self, request: pb.GetAdapterDownloadUrlRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAdapterDownloadUrlResponse:
        device_id = await self._device(context)
        adapter, url, expires = await self._run(self.orch.adapter_download, device_id, request.adapter_id)
        return pb.GetAdapterDownloadUrlResponse(
            adapter=convert.adapter_ref(adapter), url=url, expires_at=convert.ts(expires)
        )
