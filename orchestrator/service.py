"""The orchestrator's domain logic: one method per use case, each a short series of transactions.

Nothing here knows gRPC or Ray. Servicers parse requests into these calls and map the errors in
orchestrator.errors to status codes; the Ray layer runs `reap` on a timer and adapter
verification as tasks. Every state transition is one transaction, durable before the method
returns.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adapters_store import BlobStore, IntegrityError, upload_key, verify_and_promote
from adapters_store.errors import AdapterFormatError
from orchestrator import activation, validation
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import (
    DEVICE_TRANSITIONS,
    AdapterRecord,
    CampaignRecord,
    DeviceRecord,
    DeviceSelector,
    ErrorClass,
    JobFilter,
    JobRecord,
    JobState,
    Progress,
    new_id,
)
from orchestrator.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from orchestrator.pace import next_poll_after
from orchestrator.placement import placement_problem
from orchestrator.state.base import StateStore, Tx, WatchCursor

# (store, upload key, sha256, size) -> (sha256, size, blob key, manifest dict). Injected so the
# Ray layer can run it as a task; the default runs it in the calling thread.
Verifier = Callable[[BlobStore, str, str, int], tuple[str, int, str, dict[str, Any]]]


def local_verifier(store: BlobStore, key: str, sha256: str, size: int) -> tuple[str, int, str, dict[str, Any]]:
    """Read the uploaded blob back, check it, promote it to its content address."""
    info, blob_key, manifest = verify_and_promote(store, key, sha256, size)
    return info.sha256, info.size, blob_key, manifest.to_dict()


def hash_secret(secret: str) -> str:
    """Credentials are 256-bit random strings, so one round of sha256 is enough to store them."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class HeartbeatInput:
    """What a device reports in a heartbeat."""

    power: dict[str, Any] = field(default_factory=dict)
    eligible: bool = False
    eligibility_reason: str = ""
    eligibility_detail: str = ""
    running_job_id: str = ""
    running_epoch: int = 0
    running_state: JobState | None = None
    progress: Progress | None = None
    active_adapter_id: str = ""
    free_storage_bytes: int = 0


@dataclass
class HeartbeatResult:
    """What the device should do next."""

    cancel_job_ids: list[str]  # cancelled by an operator: discard the work
    desired_adapter: AdapterRecord | None
    lease_expires_at: float
    next_poll_s: float
    stale_job_ids: list[str] = field(default_factory=list)  # lease lost: stop, keep checkpoints


@dataclass
class LeaseResult:
    """At most one leased job, with its presigned URLs."""

    job: JobRecord | None
    upload_url: str
    upload_url_expires_at: float
    dataset_url: str
    next_poll_s: float


@dataclass
class ProgressResult:
    """The renewed lease and, with UPLOADING, a fresh upload URL."""

    lease_expires_at: float
    cancel_requested: bool
    upload_url: str = ""
    upload_url_expires_at: float = 0.0


class Orchestrator:
    """Use cases of devices and operators over a state store and a blob store."""

    def __init__(
        self,
        state: StateStore,
        blobs: BlobStore,
        config: OrchestratorConfig,
        *,
        clock: Callable[[], float] = time.time,
        verifier: Verifier = local_verifier,
    ) -> None:
        self.state = state
        self.blobs = blobs
        self.config = config
        self.clock = clock
        self.verifier = verifier
        self._operator_hash = hash_secret(config.operator_token)
        self._fleet_size = 0
        self._fleet_size_at = 0.0
        # device_id -> (credential hash, when read); see OrchestratorConfig.credential_cache_s.
        self._credentials: dict[str, tuple[str, float]] = {}

    # ------------------------------------------------------------------ identity
    def authenticate_operator(self, token: str) -> None:
        """Raise Unauthenticated unless the token is the operator token."""
        if not token or not hmac.compare_digest(hash_secret(token), self._operator_hash):
            raise Unauthenticated("a valid operator token is required")

    def authenticate_device_cached(self, device_id: str, credential: str) -> bool:
        """True when the credential matches a recently read hash (no I/O); False means: ask
        authenticate_device, which reads the store (a miss, an expired entry or a mismatch,
        since the device may have re-enrolled through another replica)."""
        cached = self._credentials.get(device_id)
        if cached is None or not credential or self.clock() - cached[1] >= self.config.credential_cache_s:
            return False
        return hmac.compare_digest(cached[0], hash_secret(credential))

    def authenticate_device(self, device_id: str, credential: str) -> None:
        """Raise Unauthenticated unless the credential is the device's."""
        if not device_id or not credential:
            raise Unauthenticated("device id and credential metadata are required")
        with self.state.transaction() as tx:
            device = tx.get_device(device_id)
        self._check_credential(device_id, device, credential)

    def _check_credential(self, device_id: str, device: DeviceRecord | None, credential: str) -> None:
        """Raise Unauthenticated unless the credential matches the device row just read."""
        if not credential or device is None or not hmac.compare_digest(device.credential_hash, hash_secret(credential)):
            raise Unauthenticated(f"unknown device or wrong credential for {device_id!r}")
        self._remember_credential(device_id, device.credential_hash)

    def _remember_credential(self, device_id: str, credential_hash: str) -> None:
        if not self.config.credential_cache_s:
            return
        if len(self._credentials) > 200_000:  # bounded: a fleet larger than this just reads more
            self._credentials.clear()
        self._credentials[device_id] = (credential_hash, self.clock())

    def create_enrollment_token(self, ttl_s: float, description: str) -> tuple[str, float]:
        """Issue an enrollment token; only its hash is stored."""
        if ttl_s <= 0 or ttl_s > 366 * 86400:
            raise InvalidArgument("ttl", "must be between 1 second and 366 days")
        validation.text(description, "description", 200)
        token = "plenr_" + secrets.token_urlsafe(32)
        expires_at = self.clock() + ttl_s
        with self.state.transaction() as tx:
            tx.add_enrollment_token(hash_secret(token), expires_at, description)
        return token, expires_at

    def _enrollment_token_ok(self, token: str) -> bool:
        if self.config.enrollment_token and hmac.compare_digest(token, self.config.enrollment_token):
            return True
        with self.state.transaction() as tx:
            expiry = tx.enrollment_token_expiry(hash_secret(token))
        return expiry is not None and expiry > self.clock()

    def enroll(self, enrollment_token: str, device_id: str, capabilities: dict[str, Any]) -> str:
        """Register a device (or re-register it, rotating its credential); return the credential."""
        if not enrollment_token or not self._enrollment_token_ok(enrollment_token):
            raise Unauthenticated("a valid enrollment token is required to enroll")
        validation.device_id(device_id)
        labels = validation.labels(
            {str(k): str(v) for k, v in capabilities.pop("labels", {}).items()}, "capabilities.labels"
        )
        credential = "pldev_" + secrets.token_urlsafe(32)
        now = self.clock()
        with self.state.transaction() as tx:
            device = tx.get_device(device_id, for_update=True) or DeviceRecord(
                device_id=device_id, credential_hash="", enrolled_at=now
            )
            device.credential_hash = hash_secret(credential)
            device.capabilities = capabilities
            device.labels = labels
            device.last_seen = now
            tx.upsert_device(device)
        self._remember_credential(device_id, device.credential_hash)
        return credential

    # ------------------------------------------------------------------ device calls
    def _fleet(self, tx: Tx) -> int:
        # Counting devices on every poll would cost a scan; a few seconds of staleness is fine.
        now = self.clock()
        if now - self._fleet_size_at > 5:
            _, self._fleet_size, _ = tx.count_devices_by_reason(now)
            self._fleet_size_at = now
        return self._fleet_size

    def _own_job(self, tx: Tx, device_id: str, job_id: str, epoch: int) -> JobRecord:
        """The job, locked, checked to be this device's and leased under this epoch."""
        validation.object_id(job_id, "job_id")
        job = tx.get_job(job_id, for_update=True)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job.device_id != device_id:
            raise PermissionDenied(f"job {job_id} belongs to another device")
        if job.state == JobState.CANCELLED:
            raise FailedPrecondition(f"job {job_id} was cancelled")
        if not job.state.leased or job.lease_epoch != epoch:
            raise FailedPrecondition(
                f"stale lease on job {job_id}: epoch {epoch} is not the current lease "
                f"(epoch {job.lease_epoch}, state {job.state.value})"
            )
        return job

    def heartbeat(self, device_id: str, hb: HeartbeatInput, *, credential: str | None = None) -> HeartbeatResult:
        """Record the device's state, renew its job's lease, tell it what to stop and activate.

        With `credential`, the caller is authenticated against the device row this call reads
        anyway (Unauthenticated on a mismatch): one transaction instead of two when the
        credential cache cannot vouch for it.

        Locks are taken job first, then device, as in every use case that locks both (lease,
        complete, fail), so two replicas can never deadlock on them. The device row is written
        only when something changed or last_seen is older than config.last_seen_write_s: a
        steady poll is a read-only transaction.
        """
        now = self.clock()
        cancel: list[str] = []
        stale: list[str] = []
        lease_expires_at = 0.0
        with self.state.transaction() as tx:
            device = tx.get_device(device_id)
            if credential is not None:  # before validating: a stranger learns nothing
                self._check_credential(device_id, device, credential)
            if hb.running_job_id:
                validation.object_id(hb.running_job_id, "running.job_id")
            validation.optional_object_id(hb.active_adapter_id, "active_adapter_id")
            detail = validation.device_text(hb.eligibility_detail, 200)
            if device is None:
                raise NotFound(f"device {device_id} is not enrolled")
            if hb.running_job_id:
                job = tx.get_job(hb.running_job_id, for_update=True)
                if job is not None and job.device_id == device_id and job.state == JobState.CANCELLED:
                    cancel.append(hb.running_job_id)
                elif (
                    job is None
                    or job.device_id != device_id
                    or not job.state.leased
                    or job.lease_epoch != hb.running_epoch
                ):
                    stale.append(hb.running_job_id)
                else:
                    if hb.running_state is not None and hb.running_state != job.state:
                        self._move(job, hb.running_state, now)
                    if hb.progress is not None:
                        job.progress = hb.progress
                    job.lease_expires_at = lease_expires_at = now + self.config.lease_s
                    job.updated_at = now
                    tx.save_job(job)
            fields: dict[str, Any] = {
                "power": hb.power,
                "eligible": hb.eligible,
                "eligibility_reason": hb.eligibility_reason,
                "eligibility_detail": detail,
                "active_adapter_id": hb.active_adapter_id,
                "running_job_id": hb.running_job_id,
            }
            storage = hb.free_storage_bytes and hb.free_storage_bytes != device.capabilities.get("free_storage_bytes")
            changed = storage or any(getattr(device, k) != v for k, v in fields.items())
            if changed or now - device.last_seen >= self.config.last_seen_write_s:
                # Only the fields this report owns are written, so no lock or re-read is needed
                # (an activation or re-enroll writing other fields at once keeps its update).
                values = {k: v for k, v in fields.items() if getattr(device, k) != v}
                values["last_seen"] = now
                if storage:
                    # capabilities is shared with enroll: read-modify-write it under the lock.
                    device = tx.get_device(device_id, for_update=True) or device
                    values["capabilities"] = {**device.capabilities, "free_storage_bytes": hb.free_storage_bytes}
                tx.update_device(device_id, values)
                for key, value in values.items():
                    setattr(device, key, value)
            desired = tx.get_adapter(device.desired_adapter_id) if device.desired_adapter_id else None
            fleet = self._fleet(tx)
        next_s = next_poll_after(self.config.pace, fleet, running=bool(hb.running_job_id), lease_s=self.config.lease_s)
        return HeartbeatResult(cancel, desired, lease_expires_at, next_s, stale)

    def lease(self, device_id: str, *, credential: str | None = None) -> LeaseResult:
        """Hand the device its oldest due job that fits it, under a new lease epoch.

        `credential` authenticates the caller against the device row read here, as in heartbeat.
        """
        now = self.clock()
        with self.state.transaction() as tx:
            # Read without a lock: placement only needs the capabilities, and a poll that finds
            # nothing stays a read-only transaction (no row lock, no commit record to flush).
            device = tx.get_device(device_id)
            if credential is not None:
                self._check_credential(device_id, device, credential)
            if device is None:
                raise NotFound(f"device {device_id} is not enrolled")
            chosen: JobRecord | None = None
            seen: set[str] = set()
            # The oldest job almost always fits: fetch (and, on PostgreSQL, lock) just that one,
            # and look further, up to 8 jobs, only when it does not.
            for limit in (1, 8):
                batch = tx.claimable_jobs(device_id, now, limit=limit)
                for job in batch:
                    if job.job_id in seen:
                        continue
                    seen.add(job.job_id)
                    problem = placement_problem(job, device)
                    if problem:
                        if job.status_message != problem:
                            job.status_message = problem
                            job.updated_at = now
                            tx.save_job(job)
                        continue
                    chosen = job
                    break
                if chosen is not None or len(batch) < limit:
                    break
            if chosen is not None:
                chosen.state = JobState.LEASED
                chosen.attempt += 1
                chosen.lease_epoch += 1
                chosen.lease_expires_at = now + self.config.lease_s
                chosen.status_message = ""
                chosen.progress = Progress()
                chosen.updated_at = now
                tx.save_job(chosen)
            if chosen is not None or now - device.last_seen >= self.config.last_seen_write_s:
                # Job row first, device row second: the lock order of every use case. Only the
                # two fields are written, so no re-read under a lock is needed.
                values: dict[str, Any] = {"last_seen": now}
                if chosen is not None:
                    values["running_job_id"] = chosen.job_id
                tx.update_device(device_id, values)
            fleet = self._fleet(tx)
        upload_url, upload_exp, dataset_url = "", 0.0, ""
        if chosen is not None:
            upload_url, upload_exp = self._upload_url(chosen, now)
            shipped = chosen.training.get("dataset_object", "")
            if shipped:
                dataset_url = self.blobs.presign_get(shipped, int(self.config.lease_s))
        next_s = next_poll_after(self.config.pace, fleet, running=chosen is not None, lease_s=self.config.lease_s)
        return LeaseResult(chosen, upload_url, upload_exp, dataset_url, next_s)

    def _upload_url(self, job: JobRecord, now: float) -> tuple[str, float]:
        # Scoped to this job's attempt key and no longer-lived than its lease.
        ttl = int(min(self.config.upload_url_s, self.config.lease_s))
        return self.blobs.presign_put(upload_key(job.job_id, job.attempt), ttl), now + ttl

    def _move(self, job: JobRecord, new: JobState, now: float) -> None:
        """Apply a device-reported transition, accounting paused time (it never eats deadlines)."""
        allowed = DEVICE_TRANSITIONS.get(job.state, frozenset())
        if new not in allowed:
            raise FailedPrecondition(f"job {job.job_id}: cannot go from {job.state.value} to {new.value}")
        if job.state == JobState.PAUSED and new != JobState.PAUSED and job.paused_since:
            job.paused_s += now - job.paused_since
            job.paused_since = 0.0
        if new == JobState.PAUSED and job.state != JobState.PAUSED:
            job.paused_since = now
        job.state = new

    def report_progress(
        self, device_id: str, job_id: str, epoch: int, state: JobState, progress: Progress, pause_reason: str = ""
    ) -> ProgressResult:
        """Record progress or a RUNNING/PAUSED/UPLOADING change and renew the lease."""
        if state not in (JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING):
            raise InvalidArgument("state", f"must be RUNNING, PAUSED or UPLOADING, not {state.value}")
        validation.object_id(job_id, "job_id")
        now = self.clock()
        with self.state.transaction() as tx:
            job = tx.get_job(job_id, for_update=True)
            if job is not None and job.state == JobState.CANCELLED and job.device_id == device_id:
                return ProgressResult(0.0, cancel_requested=True)
            job = self._own_job(tx, device_id, job_id, epoch)
            was = job.state
            self._move(job, state, now)
            if state == JobState.PAUSED and was != JobState.PAUSED:
                job.status_message = f"paused by the device's gate ({pause_reason or 'reason not given'})"
            elif state != JobState.PAUSED and was == JobState.PAUSED:
                job.status_message = ""
            job.progress = progress
            job.lease_expires_at = now + self.config.lease_s
            job.updated_at = now
            tx.save_job(job)
        result = ProgressResult(job.lease_expires_at, cancel_requested=False)
        if state == JobState.UPLOADING:
            result.upload_url, result.upload_url_expires_at = self._upload_url(job, now)
        return result

    def complete(
        self, device_id: str, job_id: str, epoch: int, sha256: str, size: int, metrics: dict[str, float]
    ) -> AdapterRecord:
        """Verify the uploaded blob and register it as the next adapter version; SUCCEEDED.

        The blob is read back and checked outside any transaction (it can take a while); the
        lease is checked before and again after, so a job re-leased meanwhile is never completed
        by its old holder.
        """
        validation.sha256_hex(sha256)
        if size <= 0:
            raise InvalidArgument("size_bytes", "must be positive")
        with self.state.transaction() as tx:
            job = self._own_job(tx, device_id, job_id, epoch)
            attempt = job.attempt
        try:
            sha, real_size, blob_key, manifest = self.verifier(self.blobs, upload_key(job_id, attempt), sha256, size)
        except (IntegrityError, AdapterFormatError) as exc:
            # Bytes that are not a well-formed adapter for this attempt fail it like a bad digest
            # (before, AdapterFormatError escaped as an INTERNAL error and the lease just ran out).
            self.fail(device_id, job_id, epoch, ErrorClass.INTEGRITY, f"uploaded adapter rejected: {exc}")
            raise FailedPrecondition(f"uploaded adapter rejected: {exc}") from exc
        now = self.clock()
        with self.state.transaction() as tx:
            job = self._own_job(tx, device_id, job_id, epoch)
            name = str(job.training.get("adapter_name", "adapter"))
            version = tx.latest_adapter_version(device_id, name) + 1
            adapter = AdapterRecord(
                adapter_id=new_id("ad"),
                name=name,
                version=version,
                device_id=device_id,
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
            if job.state == JobState.PAUSED and job.paused_since:
                job.paused_s += now - job.paused_since
                job.paused_since = 0.0
            job.state = JobState.SUCCEEDED
            job.adapter_id = adapter.adapter_id
            job.lease_expires_at = 0.0
            job.updated_at = now
            tx.save_job(job)
            device = tx.get_device(device_id, for_update=True)
            if device is not None and device.running_job_id == job_id:
                device.running_job_id = ""
                tx.upsert_device(device)
        return adapter

    def fail(self, device_id: str, job_id: str, epoch: int, error: ErrorClass, message: str) -> tuple[bool, JobState]:
        """Record a failed attempt: requeue with backoff when retryable and attempts remain."""
        now = self.clock()
        with self.state.transaction() as tx:
            job = self._own_job(tx, device_id, job_id, epoch)
            self._fail_attempt(job, error, message, now)
            tx.save_job(job)
            device = tx.get_device(device_id, for_update=True)
            if device is not None and device.running_job_id == job_id:
                device.running_job_id = ""
                tx.upsert_device(device)
        return job.state == JobState.QUEUED, job.state

    def _fail_attempt(self, job: JobRecord, error: ErrorClass, message: str, now: float) -> None:
        if job.state == JobState.PAUSED and job.paused_since:
            job.paused_s += now - job.paused_since
            job.paused_since = 0.0
        job.last_error_class = error.value
        job.last_error = validation.device_text(message, 500)
        job.lease_expires_at = 0.0
        job.updated_at = now
        if error.retryable and job.attempt < job.max_attempts:
            delay = min(self.config.retry_base_s * 2 ** max(job.attempt - 1, 0), self.config.retry_max_s)
            job.state = JobState.QUEUED
            job.not_before = now + delay
            job.status_message = (
                f"retry {job.attempt + 1}/{job.max_attempts} after {error.value}, not before +{delay:.0f}s"
            )
        else:
            job.state = JobState.FAILED
            job.status_message = (
                f"{error.value} is not retryable" if not error.retryable else f"gave up after {job.attempt} attempts"
            )

    def adapter_download(self, device_id: str, adapter_id: str) -> tuple[AdapterRecord, str, float]:
        """A short-lived URL for one of the device's own adapters."""
        validation.object_id(adapter_id, "adapter_id")
        with self.state.transaction() as tx:
            adapter = tx.get_adapter(adapter_id)
        if adapter is None:
            raise NotFound(f"adapter {adapter_id} not found")
        if adapter.device_id != device_id:
            raise PermissionDenied(f"adapter {adapter_id} belongs to another device")
        ttl = int(self.config.download_url_s)
        return adapter, self.blobs.presign_get(adapter.blob_key, ttl), self.clock() + ttl

    # ------------------------------------------------------------------ control loop
    def reap(self, limit: int = 500) -> int:
        """Requeue (or fail) jobs whose lease expired; fail jobs past their deadline."""
        now = self.clock()
        with self.state.transaction() as tx:
            jobs = tx.expired_jobs(now, limit)
            for job in jobs:
                deadline = job.deadline + job.paused_s if job.deadline else 0.0
                if deadline and deadline < now and job.state != JobState.PAUSED:
                    job.last_error_class = ErrorClass.DEADLINE_EXCEEDED.value
                    job.last_error = "deadline passed"
                    job.state = JobState.FAILED
                    job.status_message = "deadline passed"
                    job.lease_expires_at = 0.0
                    job.updated_at = now
                else:
                    self._fail_attempt(job, ErrorClass.LEASE_EXPIRED, "the device stopped renewing its lease", now)
                tx.save_job(job)
        return len(jobs)

    # ------------------------------------------------------------------ operator calls
    def submit_job(
        self, request_id: str, device_id: str, training: dict[str, Any], max_attempts: int, deadline: float
    ) -> tuple[JobRecord, bool]:
        """Queue a job for one device; a repeated request_id returns the first job."""
        validation.text(request_id, "request_id", 128)
        validation.device_id(device_id)
        validation.training_spec(training)
        if max_attempts > 100:
            raise InvalidArgument("max_attempts", f"{max_attempts} is above 100")
        now = self.clock()
        if deadline and deadline <= now:
            raise InvalidArgument("deadline", "is in the past")
        with self.state.transaction() as tx:
            if request_id:
                earlier = tx.get_job_by_request(request_id)
                if earlier is not None:
                    return earlier, False
            if tx.get_device(device_id) is None:
                raise NotFound(f"device {device_id} is not enrolled")
            job = self._new_job(device_id, training, max_attempts, deadline, now, request_id=request_id)
            tx.insert_job(job)
        return job, True

    def _new_job(
        self, device_id: str, training: dict[str, Any], max_attempts: int, deadline: float, now: float, **kw: str
    ) -> JobRecord:
        job = JobRecord(
            job_id=new_id("job"),
            device_id=device_id,
            training=training,
            created_at=now,
            updated_at=now,
            deadline=deadline,
            **kw,  # type: ignore[arg-type]
        )
        job.memory_estimate_bytes = self.config.base_model_min_bytes.get(str(training.get("base_model_id", "")), 0)
        if max_attempts:
            job.max_attempts = max_attempts
        return job

    def submit_campaign(
        self,
        request_id: str,
        name: str,
        selector: DeviceSelector,
        training: dict[str, Any],
        max_attempts: int,
        deadline: float,
    ) -> tuple[CampaignRecord, bool]:
        """One job per device matching the selector, created in one transaction."""
        validation.text(request_id, "request_id", 128)
        validation.text(name, "name", 200)
        validation.training_spec(training)
        if max_attempts > 100:
            raise InvalidArgument("max_attempts", f"{max_attempts} is above 100")
        now = self.clock()
        if deadline and deadline <= now:
            raise InvalidArgument("deadline", "is in the past")
        campaign = CampaignRecord(new_id("cmp"), name, _selector_dict(selector), request_id, now)
        with self.state.transaction() as tx:
            if request_id:
                earlier = tx.get_campaign_by_request(request_id)
                if earlier is not None:
                    return earlier, False
            after = ""
            while True:
                devices = tx.list_devices(1000, after)
                jobs = [
                    self._new_job(
                        device.device_id, training, max_attempts, deadline, now, campaign_id=campaign.campaign_id
                    )
                    for device in devices
                    if selector.matches(device)
                ]
                tx.insert_jobs(jobs)
                campaign.job_count += len(jobs)
                if len(devices) < 1000:
                    break
                after = devices[-1].device_id
            tx.insert_campaign(campaign)
        return campaign, True

    def get_campaign(self, campaign_id: str) -> tuple[CampaignRecord, dict[str, int]]:
        """The campaign and its jobs counted by state."""
        validation.object_id(campaign_id, "campaign_id")
        with self.state.transaction() as tx:
            campaign = tx.get_campaign(campaign_id)
            if campaign is None:
                raise NotFound(f"campaign {campaign_id} not found")
            return campaign, tx.count_jobs_by_state(campaign_id)

    def cancel_job(self, job_id: str) -> JobRecord:
        """Cancel a job that has not ended; its device learns it on the next heartbeat."""
        validation.object_id(job_id, "job_id")
        now = self.clock()
        with self.state.transaction() as tx:
            job = tx.get_job(job_id, for_update=True)
            if job is None:
                raise NotFound(f"job {job_id} not found")
            if job.state.terminal:
                raise FailedPrecondition(f"job {job_id} already ended ({job.state.value})")
            job.state = JobState.CANCELLED
            job.status_message = "cancelled by an operator"
            job.lease_expires_at = 0.0
            job.updated_at = now
            tx.save_job(job)
        return job

    def get_job(self, job_id: str) -> JobRecord:
        """One job."""
        validation.object_id(job_id, "job_id")
        with self.state.transaction() as tx:
            job = tx.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def list_jobs(self, flt: JobFilter, page_size: int, page_token: str) -> tuple[list[JobRecord], str]:
        """A page of jobs, newest first; the token is the last job id of the previous page."""
        size = validation.page_size(page_size)
        validation.optional_object_id(page_token, "page_token")
        _check_filter(flt)
        with self.state.transaction() as tx:
            jobs = tx.list_jobs(flt, size + 1, page_token)
        more = len(jobs) > size
        jobs = jobs[:size]
        return jobs, (jobs[-1].job_id if more else "")

    def jobs_changed_after(
        self, cursor: WatchCursor, flt: JobFilter, limit: int = 500
    ) -> tuple[list[JobRecord], WatchCursor]:
        """Job changes committed after a watch cursor, and the cursor after them."""
        _check_filter(flt)
        with self.state.transaction() as tx:
            return tx.jobs_changed_after(cursor, flt, limit)

    def watch_cursor(self) -> WatchCursor:
        """Where a watch starts: every change committed from now on comes after it."""
        with self.state.transaction() as tx:
            return tx.watch_cursor()

    def list_devices(self, selector: DeviceSelector, page_size: int, page_token: str) -> tuple[list[DeviceRecord], str]:
        """A page of devices matching the selector, ordered by id."""
        size = validation.page_size(page_size)
        validation.optional_device_id(page_token, "page_token")
        out: list[DeviceRecord] = []
        after = page_token
        with self.state.transaction() as tx:
            while len(out) <= size:
                batch = tx.list_devices(size + 1, after)
                out += [d for d in batch if selector.matches(d)]
                if len(batch) < size + 1:
                    break
                after = batch[-1].device_id
        more = len(out) > size
        out = out[:size]
        return out, (out[-1].device_id if more else "")

    def get_device(self, device_id: str) -> DeviceRecord:
        """One device."""
        validation.device_id(device_id)
        with self.state.transaction() as tx:
            device = tx.get_device(device_id)
        if device is None:
            raise NotFound(f"device {device_id} not found")
        return device

    def list_adapters(
        self, device_id: str, name: str, page_size: int, page_token: str
    ) -> tuple[list[AdapterRecord], str]:
        """A page of adapter versions, newest first."""
        size = validation.page_size(page_size)
        validation.optional_device_id(device_id, "device_id")
        if name and not validation.is_name(name):
            raise InvalidArgument("name", f"{name[:64]!r} is not an adapter name")
        validation.optional_object_id(page_token, "page_token")
        with self.state.transaction() as tx:
            adapters = tx.list_adapters(device_id, name, size + 1, page_token)
        more = len(adapters) > size
        adapters = adapters[:size]
        return adapters, (adapters[-1].adapter_id if more else "")

    def get_adapter(self, adapter_id: str) -> AdapterRecord:
        """One adapter version."""
        validation.object_id(adapter_id, "adapter_id")
        with self.state.transaction() as tx:
            adapter = tx.get_adapter(adapter_id)
        if adapter is None:
            raise NotFound(f"adapter {adapter_id} not found")
        return adapter

    def activate_adapter(
        self,
        adapter_id: str = "",
        *,
        name: str = "",
        selector: DeviceSelector | None = None,
        campaign_id: str = "",
        canary_percent: int = 0,
    ) -> list[str]:
        """Make adapters desired: one adapter on its device, a name across a selector, or a canary share."""
        modes = [bool(adapter_id), bool(name), bool(campaign_id)]
        if sum(modes) != 1:
            raise InvalidArgument(
                "adapter_id", "set exactly one of adapter_id, adapter_name (with a selector) or campaign_id"
            )
        with self.state.transaction() as tx:
            if adapter_id:
                validation.object_id(adapter_id, "adapter_id")
                return activation.activate_one(tx, adapter_id)
            if name:
                validation.name(name, "adapter_name")
                return activation.activate_by_name(tx, name, selector or DeviceSelector())
            validation.object_id(campaign_id, "campaign_id")
            return activation.activate_canary(tx, campaign_id, canary_percent)

    def deactivate_adapter(self, device_id: str = "", selector: DeviceSelector | None = None) -> list[str]:
        """Send one device, or every device matching a selector, back to its base model."""
        if bool(device_id) == (selector is not None):
            raise InvalidArgument("device_id", "set exactly one of device_id and selector")
        with self.state.transaction() as tx:
            if device_id:
                validation.device_id(device_id)
                device = tx.get_device(device_id, for_update=True)
                if device is None:
                    raise NotFound(f"device {device_id} not found")
                return activation.deactivate(tx, [device])
            assert selector is not None
            return activation.deactivate(tx, activation.matching_devices(tx, selector))

    def rollback_adapter(self, device_id: str) -> str:
        """Make the previously desired adapter (or the base) desired again."""
        validation.device_id(device_id)
        with self.state.transaction() as tx:
            return activation.rollback(tx, device_id)

    def fleet_summary(self, online_window_s: float = 120.0) -> dict[str, Any]:
        """Jobs by state, devices by eligibility reason, counts."""
        with self.state.transaction() as tx:
            jobs = tx.count_jobs_by_state()
            by_reason, total, online = tx.count_devices_by_reason(self.clock() - online_window_s)
            adapters = tx.adapter_count()
        return {
            "jobs_by_state": jobs,
            "devices_by_eligibility": by_reason,
            "device_count": total,
            "devices_online": online,
            "adapter_count": adapters,
        }


def _check_filter(flt: JobFilter) -> None:
    validation.optional_device_id(flt.device_id, "filter.device_id")
    validation.optional_object_id(flt.campaign_id, "filter.campaign_id")


def _selector_dict(selector: DeviceSelector) -> dict[str, Any]:
    return {
        "labels": selector.labels,
        "min_ram_bytes": selector.min_ram_bytes,
        "requires_4bit": selector.requires_4bit,
        "base_model_id": selector.base_model_id,
        "device_ids": list(selector.device_ids),
    }


__all__ = ["AlreadyExists", "HeartbeatInput", "Orchestrator", "hash_secret"]
