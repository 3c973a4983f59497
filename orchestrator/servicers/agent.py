"""AgentService: device calls. Each method converts, calls one domain method, converts back.

Who the caller is travels as a DeviceCall (the device id in metadata, the bearer credential, the
device id the request names, the device ids its verified client certificate names); the domain
checks it in the transaction it opens anyway. A request that fails conversion is refused only
after its caller is authenticated, so a stranger learns nothing about what a valid request looks
like.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc

from orchestrator.audit import Actor
from orchestrator.errors import InvalidArgument, PermissionDenied
from orchestrator.identity import DeviceCall
from orchestrator.reports import HeartbeatInput
from orchestrator.servicers import convert
from orchestrator.servicers.base import ServicerBase, bearer, metadata_value
from orchestrator.servicers.convert_fleet import policy_pb
from orchestrator.servicers.errors import rpc
from pocketlora.tls import certified_names
from protos import wire
from protos.pocketlora.v1 import agent_service_pb2 as pb
from protos.pocketlora.v1 import agent_service_pb2_grpc as pb_grpc
from protos.pocketlora.v1 import types_pb2 as tpb
from protos.wire import DEVICE_HEADER

T = TypeVar("T")


class AgentServicer(ServicerBase, pb_grpc.AgentServiceServicer):
    """The device-facing API."""

    async def _convert(self, call: DeviceCall, fn: Callable[[], T]) -> T:
        """Convert a request; a malformed one is refused once its caller is authenticated."""
        try:
            return fn()
        except InvalidArgument:
            await self._run(self.orch.identity.authenticate, call)
            raise

    @rpc
    async def Enroll(self, request: pb.EnrollRequest, context: grpc.aio.ServicerContext) -> pb.EnrollResponse:
        caps = convert.capabilities_dict(request.capabilities)
        try:
            credential = await self._run(
                self.orch.identity.enroll, bearer(context), request.device_id, caps, _certified(context)
            )
        except PermissionDenied as exc:  # an enrolled id, or another device's certificate: audited
            actor = Actor("device", request.device_id[:128])
            await self._run(self.orch.audit.refused, actor, "Enroll", request.device_id[:128], exc)
            raise
        return pb.EnrollResponse(device_credential=credential, next_poll_after=convert.duration(1.0))

    @rpc
    async def RotateCredential(
        self, request: pb.RotateCredentialRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateCredentialResponse:
        credential = await self._run(self.orch.identity.rotate_credential, _caller(context))
        return pb.RotateCredentialResponse(device_credential=credential)

    @rpc
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        call = _caller(context, request.device_id)
        hb = await self._convert(call, lambda: heartbeat_input(request))
        result = await self.polls.heartbeat(call, hb)
        reply = pb.HeartbeatResponse(
            cancel_job_ids=result.cancel_job_ids,
            stale_job_ids=result.stale_job_ids,
            next_poll_after=convert.duration(result.next_poll_s),
            lease_expires_at=convert.ts(result.lease_expires_at),
            gate_policy_names=result.gate_policy_names,
        )
        if result.gate_policy:
            reply.gate_policy.CopyFrom(policy_pb(result.gate_policy))
        if result.desired_adapter is not None:
            reply.desired_adapter.CopyFrom(convert.adapter_ref(result.desired_adapter))
        return reply

    @rpc
    async def LeaseJob(self, request: pb.LeaseJobRequest, context: grpc.aio.ServicerContext) -> pb.LeaseJobResponse:
        result = await self.polls.lease(_caller(context, request.device_id))
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
                    upload_fields=result.upload_fields,
                )
            )
        return reply

    @rpc
    async def ReportProgress(
        self, request: pb.ReportProgressRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportProgressResponse:
        call = _caller(context)
        state = await self._convert(call, lambda: convert.job_state(request.state))
        result = await self._run(
            self.orch.jobs.report_progress,
            call,
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
            upload_fields=result.upload_fields,
        )

    @rpc
    async def CompleteJob(
        self, request: pb.CompleteJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteJobResponse:
        metrics = {k[:64]: float(v) for k, v in list(request.metrics.items())[:64]}
        adapter = await self._run(
            self.orch.jobs.complete,
            _caller(context),
            request.job_id,
            request.lease_epoch,
            request.sha256,
            request.size_bytes,
            metrics,
        )
        return pb.CompleteJobResponse(adapter=convert.adapter_pb(adapter))

    @rpc
    async def FailJob(self, request: pb.FailJobRequest, context: grpc.aio.ServicerContext) -> pb.FailJobResponse:
        call = _caller(context)
        error = await self._convert(call, lambda: convert.error_class(request.error_class))
        will_retry, state = await self._run(
            self.orch.jobs.fail, call, request.job_id, request.lease_epoch, error, request.message
        )
        return pb.FailJobResponse(will_retry=will_retry, state=wire.to_pb(state))  # type: ignore[arg-type]

    @rpc
    async def GetAdapterDownloadUrl(
        self, request: pb.GetAdapterDownloadUrlRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAdapterDownloadUrlResponse:
        call = _caller(context)
        if request.form == pb.ADAPTER_FORM_ONNX_ADAPTER:
            adapter, form, url, expires = await self._run(self.orch.runtimes.adapter_form, call, request.adapter_id)
            return pb.GetAdapterDownloadUrlResponse(
                adapter=convert.adapter_ref(adapter),
                url=url,
                expires_at=convert.ts(expires),
                runtime_form=convert.runtime_form(form),
            )
        if request.form not in (pb.ADAPTER_FORM_UNSPECIFIED, pb.ADAPTER_FORM_SAFETENSORS):
            await self._run(self.orch.identity.authenticate, call)
            raise InvalidArgument("form", f"{request.form} is not an adapter form")
        adapter, url, expires = await self._run(self.orch.jobs.adapter_download, call, request.adapter_id)
        return pb.GetAdapterDownloadUrlResponse(
            adapter=convert.adapter_ref(adapter), url=url, expires_at=convert.ts(expires)
        )

    @rpc
    async def GetRuntimeBundleUrl(
        self, request: pb.GetRuntimeBundleUrlRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRuntimeBundleUrlResponse:
        call = _caller(context)
        if request.runtime != tpb.INFERENCE_RUNTIME_ONNX:
            await self._run(self.orch.identity.authenticate, call)
            raise InvalidArgument("runtime", "only INFERENCE_RUNTIME_ONNX has runtime bundles")
        ref, url, expires = await self._run(self.orch.runtimes.bundle, call, request.base_fingerprint)
        return pb.GetRuntimeBundleUrlResponse(
            sha256=ref.sha256,
            size_bytes=ref.size,
            url=url,
            expires_at=convert.ts(expires),
            manifest_json=ref.manifest.to_json(),
        )


def _certified(context: grpc.aio.ServicerContext) -> tuple[str, ...] | None:
    """The device ids the caller's verified client certificate names (None: no certificate)."""
    return certified_names(context.auth_context())


def _caller(context: grpc.aio.ServicerContext, claimed: str = "") -> DeviceCall:
    return DeviceCall(metadata_value(context, DEVICE_HEADER), bearer(context), claimed, _certified(context))


def heartbeat_input(request: pb.HeartbeatRequest) -> HeartbeatInput:
    """The domain's view of a heartbeat."""
    hb = HeartbeatInput(
        power=convert.power_dict(request.power),
        eligible=request.eligible,
        eligibility_reason=convert.reason_name(request.eligibility_reason),
        eligibility_detail=request.eligibility_detail,
        active_adapter_id=request.active_adapter_id,
        free_storage_bytes=convert.byte_count(request.free_storage_bytes),
        adapter_refusals={r.adapter_id: r.reason for r in request.adapter_refusals},
    )
    running = request.running if request.HasField("running") else None
    if running is not None and running.job_id:
        hb.running_job_id = running.job_id
        hb.running_epoch = running.lease_epoch
        if running.state != tpb.JOB_STATE_UNSPECIFIED:
            hb.running_state = convert.job_state(running.state, "running.state")
        hb.progress = convert.progress(running.progress)
    return hb
