"""The job lifecycle: where a job changes state once it is queued.

    QUEUED --lease--> LEASED --device reports--> RUNNING <-> PAUSED --> UPLOADING
    UPLOADING --complete (blob verified)--> SUCCEEDED
    any leased state --fail / lease expiry (reap)--> QUEUED (backoff) | FAILED
    unfinished --deadline (reap)--> FAILED

Every method is one or two transactions, durable before it returns. Locks are taken job first,
then device, in every use case that locks both, so replicas never deadlock on them. Reports
carry the lease's fencing epoch: one carrying another epoch is refused, so a job that was
re-leased is never completed by its old holder. The bookkeeping of each transition lives on
JobRecord (domain.py); this module decides which transition applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters_store import BlobStore, IntegrityError, UploadTarget, upload_key, verify_and_promote
from adapters_store.errors import AdapterFormatError, StoreUnavailable
from orchestrator import metrics as telemetry  # `metrics` is also CompleteJob's reported metrics
from orchestrator import validation
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import AdapterRecord, DeviceRecord, ErrorClass, JobRecord, JobState, Progress, new_id
from orchestrator.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from orchestrator.gate_policies import GatePolicies
from orchestrator.identity import DeviceCall, Identity, require_device
from orchestrator.pace import next_poll_after
from orchestrator.placement import placement_problem
from orchestrator.reports import HeartbeatInput, HeartbeatResult, LeaseResult, ProgressResult, validate_heartbeat
from orchestrator.state.base import StateStore, Tx

# (store, upload key, sha256, size) -> (sha256, size, blob key, manifest dict). Injected so the
# Ray layer can run it as a task; the default runs it in the calling thread.
Verifier = Callable[[BlobStore, str, str, int], tuple[str, int, str, dict[str, Any]]]

# Fleet size and queue depth steer the pace; counting them on every poll would cost a scan.
_FLEET_STATS_S = 5.0


def local_verifier(store: BlobStore, key: str, sha256: str, size: int) -> tuple[str, int, str, dict[str, Any]]:
    """Read the uploaded blob back, check it, promote it to its content address."""
    info, blob_key, manifest = verify_and_promote(store, key, sha256, size)
    return info.sha256, info.size, blob_key, manifest.to_dict()


class FleetStats:
    """Fleet size and queue depth for pace steering, re-counted at most every few seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.devices = 0
        self.queued = 0
        self._at = float("-inf")

    def due(self) -> bool:
        """True when the counts are old enough to read again."""
        return self.clock() - self._at >= _FLEET_STATS_S

    def update(self, devices: int, queued: int) -> None:
        """Take freshly read counts."""
        self.devices, self.queued, self._at = devices, queued, self.clock()

    def read(self, tx: Tx) -> None:
        """Refresh from the store when stale."""
        if self.due():
            self.update(*tx.fleet_counts())


class JobLifecycle:
    """Device-side use cases of a job, and the control loop's reaper."""

    def __init__(
        self,
        state: StateStore,
        blobs: BlobStore,
        config: OrchestratorConfig,
        identity: Identity,
        clock: Callable[[], float],
        verifier: Verifier = local_verifier,
        policies: GatePolicies | None = None,
        on_verified: Callable[[AdapterRecord], None] | None = None,
    ) -> None:
        self.state = state
        self.blobs = blobs
        self.config = config
        self.identity = identity
        self.clock = clock
        self.verifier = verifier
        self.policies = policies or GatePolicies(state, config, clock)
        self.on_verified = on_verified  # told of every adapter registered, after its commit
        self.fleet = FleetStats(clock)

    def pace(self, *, running: bool) -> float:
        """When the device should call again (from the fleet counts last read)."""
        return next_poll_after(
            self.config.pace,
            self.fleet.devices,
            queue_depth=self.fleet.queued,
            running=running,
            lease_s=self.config.lease_s,
        )

    # ------------------------------------------------------------------ polls
    def heartbeat(self, call: DeviceCall, hb: HeartbeatInput) -> HeartbeatResult:
        """Record the device's state, renew its job's lease, tell it what to stop and activate.

        A steady heartbeat is a read-only transaction: the device row is written only when a
        reported field changed or last_seen is older than config.last_seen_write_s.
        """
        now = self.clock()
        with self.state.transaction() as tx:
            device = tx.get_device(call.device_id)
            self.identity.check(call, device, tx)
            validate_heartbeat(hb)
            device = require_device(device, call.device_id)
            cancel, stale, lease_expires_at = self._renew_running(tx, device.device_id, hb, now)
            record_device_report(tx, device, hb, now, self.config.last_seen_write_s)
            desired = tx.get_adapter(device.desired_adapter_id) if device.desired_adapter_id else None
            policy, names = self.policies.for_device(tx, device)
            self.fleet.read(tx)
        pace = self.pace(running=bool(hb.running_job_id))
        return HeartbeatResult(cancel, desired, lease_expires_at, pace, stale, policy, names)

    def _renew_running(
        self, tx: Tx, device_id: str, hb: HeartbeatInput, now: float
    ) -> tuple[list[str], list[str], float]:
        """The heartbeat's job part: (cancelled ids, stale ids, the renewed lease's expiry)."""
        if not hb.running_job_id:
            return [], [], 0.0
        job = tx.get_job(hb.running_job_id, for_update=True)
        if job is None or job.device_id != device_id:
            return [], [hb.running_job_id], 0.0
        if job.state == JobState.CANCELLED:
            return [hb.running_job_id], [], 0.0
        if not job.state.leased or job.lease_epoch != hb.running_epoch:
            telemetry.fenced_report("heartbeat")
            return [], [hb.running_job_id], 0.0
        if hb.running_state is not None and hb.running_state != job.state:
            job.move(hb.running_state, now, hb.eligibility_reason)
        if hb.progress is not None:
            job.progress = hb.progress
        job.renew(now, self.config.lease_s)
        tx.save_job(job)
        return [], [], job.lease_expires_at

    def lease(self, call: DeviceCall) -> LeaseResult:
        """Hand the device its oldest due job that fits it, under a new lease epoch."""
        now = self.clock()
        with self.state.transaction() as tx:
            # Read without a lock: placement only needs the capabilities, and a poll that finds
            # nothing stays a read-only transaction.
            device = tx.get_device(call.device_id)
            self.identity.check(call, device, tx)
            device = require_device(device, call.device_id)
            chosen = claim_fitting_job(tx, device, now)
            if chosen is not None:
                chosen.lease(now, self.config.lease_s)
                tx.save_job(chosen)
            if chosen is not None or now - device.last_seen >= self.config.last_seen_write_s:
                # Only these two fields are written, so no re-read under a lock is needed.
                values: dict[str, Any] = {"last_seen": now}
                if chosen is not None:
                    values["running_job_id"] = chosen.job_id
                tx.update_device(device.device_id, values)
            self.fleet.read(tx)
        return self.lease_reply(chosen, now)

    def lease_reply(self, job: JobRecord | None, now: float) -> LeaseResult:
        """The reply for a lease decision: presigned URLs for a leased job, and the pace."""
        if job is None:
            return LeaseResult(None, "", 0.0, "", self.pace(running=False))
        upload, upload_exp = self._upload_target(job, now)
        shipped = job.training.get("dataset_object", "")
        dataset_url = self.blobs.presign_get(shipped, int(self.config.lease_s)) if shipped else ""
        return LeaseResult(job, upload.url, upload_exp, dataset_url, self.pace(running=True), upload.fields)

    def _upload_target(self, job: JobRecord, now: float) -> tuple[UploadTarget, float]:
        # Scoped to this job's attempt key, capped in size, and no longer-lived than its lease.
        ttl = int(min(self.config.upload_url_s, self.config.lease_s))
        with telemetry.blob_operation("presign_put"):
            target = self.blobs.presign_upload(upload_key(job.job_id, job.attempt), ttl, self.config.max_adapter_bytes)
        return target, now + ttl

    # ------------------------------------------------------------------ reports
    def report_progress(
        self, call: DeviceCall, job_id: str, epoch: int, state: JobState, progress: Progress, pause_reason: str = ""
    ) -> ProgressResult:
        """Record progress or a RUNNING/PAUSED/UPLOADING change and renew the lease."""
        now = self.clock()
        with self.state.transaction() as tx:
            self.identity.admit(call, tx)
            if state not in (JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING):
                raise InvalidArgument("state", f"must be RUNNING, PAUSED or UPLOADING, not {state.value}")
            validation.object_id(job_id, "job_id")
            job = tx.get_job(job_id, for_update=True)
            if job is not None and job.state == JobState.CANCELLED and job.device_id == call.device_id:
                return ProgressResult(0.0, cancel_requested=True)
            job = own_job(job, call.device_id, job_id, epoch)
            job.move(state, now, pause_reason)
            job.progress = progress
            job.renew(now, self.config.lease_s)
            tx.save_job(job)
        result = ProgressResult(job.lease_expires_at, cancel_requested=False)
        if state == JobState.UPLOADING:
            upload, result.upload_url_expires_at = self._upload_target(job, now)
            result.upload_url, result.upload_fields = upload.url, upload.fields
        return result

    def complete(
        self, call: DeviceCall, job_id: str, epoch: int, sha256: str, size: int, metrics: dict[str, float]
    ) -> AdapterRecord:
        """Verify the uploaded blob and register it as the next adapter version; SUCCEEDED.

        The blob is read back and checked outside any transaction (it can take a while); the
        lease is checked before and again after, so a job re-leased meanwhile is never completed
        by its old holder. Idempotent: a retry of a completion that already succeeded (same
        lease, same sha256 and size) returns the same adapter. A store outage answers
        Unavailable and changes nothing, so the device can retry the same call.
        """
        with self.state.transaction() as tx:
            self.identity.admit(call, tx)
            validation.sha256_hex(sha256)
            if not 0 < size <= self.config.max_adapter_bytes:
                raise InvalidArgument("size_bytes", f"must be between 1 and {self.config.max_adapter_bytes}")
            validation.object_id(job_id, "job_id")
            job = tx.get_job(job_id)
            done = completed_before(tx, job, call.device_id, epoch, sha256, size)
            if done is not None:
                return done
            attempt = own_job(job, call.device_id, job_id, epoch).attempt
        try:
            with telemetry.blob_operation("verify"):
                sha, real_size, blob_key, manifest = self.verifier(
                    self.blobs, upload_key(job_id, attempt), sha256, size
                )
        except (IntegrityError, AdapterFormatError) as exc:
            telemetry.verification(exc.reason if isinstance(exc, IntegrityError) else "format")
            # Bytes that are not a well-formed adapter for this attempt fail it like a bad digest.
            self.fail(call, job_id, epoch, ErrorClass.INTEGRITY, f"uploaded adapter rejected: {exc}")
            raise FailedPrecondition(f"uploaded adapter rejected: {exc}") from exc
        except StoreUnavailable as exc:
            raise Unavailable(f"the adapter store is unavailable ({exc}); the upload is kept, retry") from exc
        now = self.clock()
        with self.state.transaction() as tx:
            job = tx.get_job(job_id, for_update=True)
            done = completed_before(tx, job, call.device_id, epoch, sha, real_size)
            if done is not None:  # a concurrent retry recorded it first
                return done
            job = own_job(job, call.device_id, job_id, epoch)
            name = str(job.training.get("adapter_name", "adapter"))
            adapter = AdapterRecord(
                adapter_id=new_id("ad"),
                name=name,
                version=tx.latest_adapter_version(call.device_id, name) + 1,
                device_id=call.device_id,
                job_id=job_id,
                attempt=attempt,
                sha256=sha,
                size_bytes=real_size,
                base_model_id=str(manifest.get("base_model_id") or job.training.get("base_model_id", "")),
                base_fingerprint=str(manifest.get("base_fingerprint", "")),
                manifest={**manifest, "reported_metrics": metrics},
                created_at=now,
                blob_key=blob_key,
            )
            tx.insert_adapter(adapter)
            telemetry.verification("ok")
            job.succeed(adapter.adapter_id, now)
            tx.save_job(job)
            release_device(tx, call.device_id, job_id)
        if self.on_verified is not None:
            self.on_verified(adapter)
        return adapter

    def fail(self, call: DeviceCall, job_id: str, epoch: int, error: ErrorClass, message: str) -> tuple[bool, JobState]:
        """Record a failed attempt: requeue with backoff when retryable and attempts remain."""
        now = self.clock()
        with self.state.transaction() as tx:
            self.identity.admit(call, tx)
            job = self._own(tx, call.device_id, job_id, epoch)
            job.fail_attempt(error, validation.device_text(message, 500), now, self.config.retry)
            tx.save_job(job)
            release_device(tx, call.device_id, job_id)
        telemetry.attempt_failed(error.value, requeued=job.state == JobState.QUEUED)
        return job.state == JobState.QUEUED, job.state

    def adapter_download(self, call: DeviceCall, adapter_id: str) -> tuple[AdapterRecord, str, float]:
        """A short-lived URL for one of the device's own adapters."""
        with self.state.transaction() as tx:
            self.identity.admit(call, tx)
            validation.object_id(adapter_id, "adapter_id")
            adapter = tx.get_adapter(adapter_id)
        if adapter is None:
            raise NotFound(f"adapter {adapter_id} not found")
        if adapter.device_id != call.device_id:
            raise PermissionDenied(f"adapter {adapter_id} belongs to another device")
        ttl = int(self.config.download_url_s)
        with telemetry.blob_operation("presign_get"):
            url = self.blobs.presign_get(adapter.blob_key, ttl)
        return adapter, url, self.clock() + ttl

    def _own(self, tx: Tx, device_id: str, job_id: str, epoch: int) -> JobRecord:
        validation.object_id(job_id, "job_id")
        return own_job(tx.get_job(job_id, for_update=True), device_id, job_id, epoch)

    # ------------------------------------------------------------------ control loop
    def reap(self, limit: int = 500) -> int:
        """Requeue (or fail) jobs whose lease expired; fail jobs past their deadline."""
        now = self.clock()
        with self.state.transaction() as tx:
            jobs = tx.expired_jobs(now, limit)
            for job in jobs:
                if job.past_deadline(now):
                    job.miss_deadline(now)
                else:
                    job.fail_attempt(
                        ErrorClass.LEASE_EXPIRED, "the device stopped renewing its lease", now, self.config.retry
                    )
                tx.save_job(job)
        for job in jobs:  # counted once committed
            if job.last_error_class == ErrorClass.DEADLINE_EXCEEDED.value:
                telemetry.deadline_missed()
            else:
                telemetry.lease_expired()
                telemetry.attempt_failed(ErrorClass.LEASE_EXPIRED.value, requeued=job.state == JobState.QUEUED)
        return len(jobs)


def own_job(job: JobRecord | None, device_id: str, job_id: str, epoch: int) -> JobRecord:
    """The job (read for update), checked to be this device's and leased under this epoch."""
    if job is None:
        raise NotFound(f"job {job_id} not found")
    if job.device_id != device_id:
        raise PermissionDenied(f"job {job_id} belongs to another device")
    if job.state == JobState.CANCELLED:
        raise FailedPrecondition(f"job {job_id} was cancelled")
    if not job.state.leased or job.lease_epoch != epoch:
        telemetry.fenced_report("report")
        raise FailedPrecondition(
            f"stale lease on job {job_id}: epoch {epoch} is not the current lease "
            f"(epoch {job.lease_epoch}, state {job.state.value})"
        )
    return job


def completed_before(
    tx: Tx, job: JobRecord | None, device_id: str, epoch: int, sha256: str, size: int
) -> AdapterRecord | None:
    """The adapter an earlier CompleteJob of this very lease registered for these bytes, if any."""
    if job is None or (job.state, job.device_id, job.lease_epoch) != (JobState.SUCCEEDED, device_id, epoch):
        return None
    adapter = tx.get_adapter(job.adapter_id) if job.adapter_id else None
    return adapter if adapter is not None and (adapter.sha256, adapter.size_bytes) == (sha256, size) else None


def claim_fitting_job(tx: Tx, device: DeviceRecord, now: float) -> JobRecord | None:
    """The device's oldest due job that fits it, locked; a job that does not fit stays QUEUED
    and says why in its status_message.

    The oldest job almost always fits: fetch (and, on PostgreSQL, lock) just that one, and look
    further, up to 8 jobs, only when it does not.
    """
    seen: set[str] = set()
    for limit in (1, 8):
        batch = tx.claimable_jobs(device.device_id, now, limit=limit)
        for job in batch:
            if job.job_id in seen:
                continue
            seen.add(job.job_id)
            problem = placement_problem(job, device)
            if not problem:
                return job
            if job.status_message != problem:
                job.status_message = problem
                job.updated_at = now
                tx.save_job(job)
        if len(batch) < limit:
            return None
    return None


def record_device_report(
    tx: Tx, device: DeviceRecord, hb: HeartbeatInput, now: float, last_seen_write_s: float
) -> None:
    """Write the fields a heartbeat owns, only when one changed or last_seen is getting old.

    Only those fields are written, so no lock or re-read is needed: an activation or re-enroll
    writing other fields at once keeps its update. Free storage lives in the capabilities, which
    enroll also writes, so that one is read-modify-written under the lock.
    """
    fields: dict[str, Any] = {
        "power": hb.power,
        "eligible": hb.eligible,
        "eligibility_reason": hb.eligibility_reason,
        "eligibility_detail": hb.eligibility_detail,
        "active_adapter_id": hb.active_adapter_id,
        "running_job_id": hb.running_job_id,
        "adapter_refusals": hb.adapter_refusals,
    }
    values = {k: v for k, v in fields.items() if getattr(device, k) != v}
    storage = hb.free_storage_bytes and hb.free_storage_bytes != device.capabilities.get("free_storage_bytes")
    if not values and not storage and now - device.last_seen < last_seen_write_s:
        return
    values["last_seen"] = now
    if storage:
        locked = tx.get_device(device.device_id, for_update=True) or device
        values["capabilities"] = {**locked.capabilities, "free_storage_bytes": hb.free_storage_bytes}
    tx.update_device(device.device_id, values)
    for key, value in values.items():
        setattr(device, key, value)


def release_device(tx: Tx, device_id: str, job_id: str) -> None:
    """Clear the device's running job once that job has ended."""
    device = tx.get_device(device_id, for_update=True)
    if device is not None and device.running_job_id == job_id:
        tx.update_device(device_id, {"running_job_id": ""})
