"""The device's gRPC client: enrollment, a persisted credential, and one typed method per RPC.

Every failed call raises one of a small error tree, mapped once from the status code:

    CallError                 a call failed (code and details kept for the log)
    ├── Transient             not now: unreachable, shedding load, timed out; try again later
    ├── Gone                  what the call is about is not this device's any more: the job was
    │                         re-leased, cancelled or never existed, the adapter is not ours
    ├── Refused               the orchestrator does not know this credential (enroll again)
    └── Invalid               the request was malformed, or the server failed on it: a bug on
                              one side, not a reason to retry the same call
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import psutil

from pocketlora.tls import TlsConfig, describe_failure, open_channel
from protos import wire
from protos.pocketlora.v1 import agent_service_pb2 as pb
from protos.pocketlora.v1 import agent_service_pb2_grpc as pb_grpc
from protos.pocketlora.v1 import types_pb2 as tpb
from protos.wire import DEVICE_HEADER, EligibilityReason, ErrorClass, JobState

R = TypeVar("R")
log = logging.getLogger(__name__)


class CallError(Exception):
    """An AgentService call failed."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.code = code
        self.details = details


class Transient(CallError):
    """Not now: the orchestrator is unreachable, busy or slow."""


class Gone(CallError):
    """The job or adapter the call names is no longer this device's."""


class Refused(CallError):
    """The orchestrator does not accept this device's credential or enrollment token."""


class Invalid(CallError):
    """The request was malformed or the server failed on it."""


_ERRORS: dict[grpc.StatusCode, type[CallError]] = {
    # "Not now": unreachable, or shedding a burst (gRPC's core drops calls past its backlog as
    # CANCELLED, RESOURCE_EXHAUSTED past its hard limit).
    grpc.StatusCode.UNAVAILABLE: Transient,
    grpc.StatusCode.DEADLINE_EXCEEDED: Transient,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Transient,
    grpc.StatusCode.CANCELLED: Transient,
    grpc.StatusCode.ABORTED: Transient,
    grpc.StatusCode.FAILED_PRECONDITION: Gone,
    grpc.StatusCode.NOT_FOUND: Gone,
    grpc.StatusCode.PERMISSION_DENIED: Gone,
    grpc.StatusCode.UNAUTHENTICATED: Refused,
}


def map_error(method: str, exc: grpc.RpcError, tls: TlsConfig | None = None) -> CallError:
    """The error-tree member for a failed call (Invalid for every code not listed above); a
    connection failure that TLS explains says so first."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or str(exc)
    tls_problem = describe_failure(details, tls) if code == grpc.StatusCode.UNAVAILABLE else None
    if tls_problem:
        details = f"{tls_problem} ({details})"
    return _ERRORS.get(code, Invalid)(method, code, details)


def detect_capabilities(
    work_dir: Path,
    base_model_id: str,
    base_fingerprint: str,
    labels: dict[str, str],
    memory_budget_bytes: int = 0,
    *,
    base_model_dir: Path | None = None,
) -> tpb.Capabilities:
    """What this machine can do, read without importing torch.

    With base_model_dir, the base's shape (config.json + safetensors headers) goes along, so
    the orchestrator plans a job's memory with the planner this device uses.
    """
    import importlib.util

    from agent.training.errors import TrainingError
    from agent.training.memory import base_shape
    from agent.training.precision import cpu_has_native_bf16

    shape = None
    if base_model_dir is not None:
        try:
            shape = tpb.BaseModelShape(**base_shape(base_model_dir).to_dict())
        except TrainingError as exc:  # the orchestrator then leaves memory to this device's planner
            log.warning("base model shape not reported: %s", exc)

    # bitsandbytes' NF4 kernels exist for CPU and CUDA builds alike; its presence is the test.
    supports_4bit = importlib.util.find_spec("bitsandbytes") is not None
    return tpb.Capabilities(
        ram_bytes=psutil.virtual_memory().total,
        free_storage_bytes=psutil.disk_usage(str(work_dir)).free,
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count() or 1,
        accelerator="",
        supports_4bit=supports_4bit,
        platform=f"{platform.system().lower()}-{platform.machine()}",
        base_model_id=base_model_id,
        base_fingerprint=base_fingerprint,
        labels=labels,
        memory_budget_bytes=memory_budget_bytes,
        base_shape=shape,
        native_bf16=cpu_has_native_bf16(),
    )


class DeviceClient:
    """AgentService calls carrying this device's credential (over TLS when `tls`)."""

    def __init__(
        self, address: str, device_id: str, work_dir: Path, *, timeout_s: float = 20.0, tls: TlsConfig | None = None
    ) -> None:
        self.address = address
        self.device_id = device_id
        self.timeout_s = timeout_s
        self.tls = tls
        self._cred_path = work_dir / "credential.json"
        self.channel = open_channel(address, tls)
        self.stub = pb_grpc.AgentServiceStub(self.channel)
        self._credential = self._load_credential()

    def _load_credential(self) -> str:
        try:
            data = json.loads(self._cred_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return ""
        return str(data.get("credential", "")) if data.get("device_id") == self.device_id else ""

    @property
    def enrolled(self) -> bool:
        """True once a credential is held."""
        return bool(self._credential)

    def _invoke(self, reply: type[R], fn: Callable[..., Any], request: Any, metadata: tuple[tuple[str, str], ...]) -> R:
        """One unary call; a failure raises the error-tree member of its status code."""
        try:
            answer = fn(request, metadata=metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise map_error(type(request).__name__.removesuffix("Request"), exc, self.tls) from None
        return cast(R, answer)

    def _call(self, reply: type[R], fn: Callable[..., Any], request: Any) -> R:
        metadata = (("authorization", f"Bearer {self._credential}"), (DEVICE_HEADER, self.device_id))
        return self._invoke(reply, fn, request, metadata)

    def enroll(self, enrollment_token: str, capabilities: tpb.Capabilities) -> None:
        """Enroll (or re-enroll) and persist the credential, readable by this user only."""
        reply = self._invoke(
            pb.EnrollResponse,
            self.stub.Enroll,
            pb.EnrollRequest(device_id=self.device_id, capabilities=capabilities),
            (("authorization", f"Bearer {enrollment_token}"),),
        )
        self._save(reply.device_credential)

    def rotate_credential(self) -> None:
        """Replace the credential with a new one. Crash-safe: the orchestrator accepts the old
        one until the new one is first used, and the new one is written (atomically) before it
        is used, so a crash at any point leaves this device with a credential that works."""
        reply = self._call(pb.RotateCredentialResponse, self.stub.RotateCredential, pb.RotateCredentialRequest())
        self._save(reply.device_credential)

    @property
    def credential_age_s(self) -> float:
        """Seconds since the credential was written (0 when none is held)."""
        try:
            return max(time.time() - self._cred_path.stat().st_mtime, 0.0)
        except FileNotFoundError:
            return 0.0

    def _save(self, credential: str) -> None:
        """Persist the credential (readable by this user only, replaced atomically), then use it."""
        tmp = self._cred_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"device_id": self.device_id, "credential": credential}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._cred_path)
        self._credential = credential

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        """Report the device's state; learn cancellations and the desired adapter."""
        return self._call(pb.HeartbeatResponse, self.stub.Heartbeat, request)

    def lease_job(self) -> pb.LeaseJobResponse:
        """Ask for a job."""
        return self._call(pb.LeaseJobResponse, self.stub.LeaseJob, pb.LeaseJobRequest(device_id=self.device_id))

    def report_progress(
        self,
        job_id: str,
        epoch: int,
        state: JobState,
        progress: tpb.JobProgress,
        pause_reason: EligibilityReason | None = None,
    ) -> pb.ReportProgressResponse:
        """Report a job's state and progress; renews its lease."""
        request = pb.ReportProgressRequest(
            job_id=job_id,
            lease_epoch=epoch,
            state=wire.to_pb(state),  # type: ignore[arg-type]
            progress=progress,
            pause_reason=wire.to_pb(pause_reason),  # type: ignore[arg-type]
        )
        return self._call(pb.ReportProgressResponse, self.stub.ReportProgress, request)

    def complete_job(
        self, job_id: str, epoch: int, sha256: str, size: int, metrics: dict[str, float]
    ) -> pb.CompleteJobResponse:
        """Hand in the uploaded adapter for verification."""
        request = pb.CompleteJobRequest(
            job_id=job_id, lease_epoch=epoch, sha256=sha256, size_bytes=size, metrics=metrics
        )
        return self._call(pb.CompleteJobResponse, self.stub.CompleteJob, request)

    def fail_job(self, job_id: str, epoch: int, error: ErrorClass, message: str) -> pb.FailJobResponse:
        """Report a failed attempt."""
        request = pb.FailJobRequest(
            job_id=job_id,
            lease_epoch=epoch,
            error_class=wire.to_pb(error),  # type: ignore[arg-type]
            message=message[:500],
        )
        return self._call(pb.FailJobResponse, self.stub.FailJob, request)

    def adapter_download_url(self, adapter_id: str, *, onnx: bool = False) -> pb.GetAdapterDownloadUrlResponse:
        """A short-lived URL for one of this device's adapters: the safetensors blob, or with onnx
        its .onnx_adapter form (Transient while it is being converted, Gone when it cannot be)."""
        form = pb.ADAPTER_FORM_ONNX_ADAPTER if onnx else pb.ADAPTER_FORM_SAFETENSORS
        request = pb.GetAdapterDownloadUrlRequest(adapter_id=adapter_id, form=form)
        return self._call(pb.GetAdapterDownloadUrlResponse, self.stub.GetAdapterDownloadUrl, request)

    def runtime_bundle_url(self, base_fingerprint: str) -> pb.GetRuntimeBundleUrlResponse:
        """A short-lived URL for the ONNX runtime bundle of this device's base (Transient while it
        is being exported, Gone with NOT_FOUND when the orchestrator exports none for it)."""
        request = pb.GetRuntimeBundleUrlRequest(runtime=tpb.INFERENCE_RUNTIME_ONNX, base_fingerprint=base_fingerprint)
        return self._call(pb.GetRuntimeBundleUrlResponse, self.stub.GetRuntimeBundleUrl, request)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()
