"""Handing a trained adapter in: pack it, upload it where the orchestrator says, then CompleteJob.

The upload goes to the presigned target of the lease: a PUT of the bytes, or a multipart form
POST whose S3 policy pins the key and caps the size. CompleteJob is then asked until the
orchestrator answers: while it says "not now" (Transient: its adapter store is down, or it is
unreachable) the call is repeated with backoff, the upload stays in the store and heartbeats keep
the lease. The uploaded sha256 and size are persisted with the job, so an agent restarted
meanwhile asks again instead of training again; CompleteJob is idempotent on the orchestrator,
so a retry after a lost reply returns the adapter the first call registered.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path

from adapters_store import upload_to_url
from agent.client import DeviceClient, Transient
from agent.jobs import LocalJob, eval_figures, pack_output
from protos.pocketlora.v1 import agent_service_pb2 as pb

RETRY_MAX_S = 60.0


def upload(
    job: LocalJob,
    job_dir: Path,
    device_id: str,
    base_model_id: str,
    reply: pb.ReportProgressResponse,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Pack the job's adapter and upload it; records its sha256/size on the job (the caller saves).

    Raises StoreError (refused or failed transfer), OSError, KeyError or ValueError (no usable
    training output).
    """
    url, fields = (
        (reply.upload_url, dict(reply.upload_fields)) if reply.upload_url else (job.upload_url, job.upload_fields)
    )
    blob, info = pack_output(job, job_dir, device_id, base_model_id)
    upload_to_url(url, blob, fields=fields, ssl_context=ssl_context)
    job.uploaded_sha256, job.uploaded_size = info.sha256, info.size


class Completion:
    """CompleteJob for an uploaded adapter, with backoff across "not now" answers."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.next_at = 0.0
        self.last_reason = ""

    def reset(self) -> None:
        """A fresh upload: the next call goes out at once."""
        self.delay, self.next_at = 0.0, 0.0

    def due(self) -> bool:
        """Whether the next try may go out now."""
        return time.monotonic() >= self.next_at

    def call(self, client: DeviceClient, job: LocalJob, job_dir: Path) -> pb.CompleteJobResponse | None:
        """The orchestrator's answer, or None when it said "not now" (try again once due).

        The reported metrics carry the held-out evaluation the worker wrote in job_dir, if any.
        Gone (the lease moved on) and Invalid (refused as malformed) propagate to the caller.
        """
        metrics = {
            "final_loss": float(job.progress.get("loss", 0.0) or 0.0),
            "steps": float(job.progress.get("step", 0)),
            **eval_figures(job_dir),
        }
        try:
            return client.complete_job(job.job_id, job.lease_epoch, job.uploaded_sha256, job.uploaded_size, metrics)
        except Transient as exc:
            self.delay = min(max(self.delay * 2, 1.0), RETRY_MAX_S)
            self.next_at = time.monotonic() + self.delay
            self.last_reason = exc.details
            return None
