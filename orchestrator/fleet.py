"""Fleet operations: what operators ask of the fleet (submit jobs, cancel, choose which adapter
each device runs) and the fleet's summary. Campaigns are in campaigns.py, staged rollouts in
rollouts.py.

Submissions are idempotent on `request_id`: a repeat returns the first job. Activation decisions
are in activation.py; this module validates the request and runs them in a transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator import activation, audit, validation
from orchestrator.activation import Activation
from orchestrator.audit import Actor
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import DeviceSelector, JobRecord, new_id
from orchestrator.errors import FailedPrecondition, InvalidArgument, found
from orchestrator.evaluation import EvalGate
from orchestrator.state.base import StateStore

# A device seen within this window counts as online (its polls come every few seconds to a minute).
ONLINE_WINDOW_S = 120.0
THROUGHPUT_MINUTES = 30


def check_submission(
    clock: Callable[[], float], request_id: str, training: dict[str, Any], max_attempts: int, deadline: float
) -> float:
    """Validate what every submission carries; returns the time of the submission."""
    validation.text(request_id, "request_id", 128)
    validation.training_spec(training)
    if max_attempts > 100:
        raise InvalidArgument("max_attempts", f"{max_attempts} is above 100")
    now = clock()
    if deadline and deadline <= now:
        raise InvalidArgument("deadline", "is in the past")
    return now


def build_job(
    config: OrchestratorConfig,
    device_id: str,
    training: dict[str, Any],
    max_attempts: int,
    deadline: float,
    now: float,
    *,
    request_id: str = "",
    campaign_id: str = "",
) -> JobRecord:
    """A new QUEUED job with the orchestrator's memory estimate for its base model."""
    job = JobRecord(
        job_id=new_id("job"),
        device_id=device_id,
        training=training,
        created_at=now,
        updated_at=now,
        deadline=deadline,
        request_id=request_id,
        campaign_id=campaign_id,
    )
    job.memory_estimate_bytes = config.base_model_min_bytes.get(str(training.get("base_model_id", "")), 0)
    if max_attempts:
        job.max_attempts = max_attempts
    return job


class FleetOps:
    """Operator use cases that change the fleet's work or adapters."""

    def __init__(self, state: StateStore, config: OrchestratorConfig, clock: Callable[[], float]) -> None:
        self.state = state
        self.config = config
        self.clock = clock

    # ------------------------------------------------------------------ work
    def submit_job(
        self,
        actor: Actor,
        request_id: str,
        device_id: str,
        training: dict[str, Any],
        max_attempts: int,
        deadline: float,
    ) -> tuple[JobRecord, bool]:
        """Queue a job for one device; a repeated request_id returns the first job."""
        validation.device_id(device_id)
        now = check_submission(self.clock, request_id, training, max_attempts, deadline)
        with self.state.transaction() as tx:
            earlier = tx.get_job_by_request(request_id) if request_id else None
            if earlier is not None:
                return earlier, False
            found(tx.get_device(device_id), "device", device_id)
            job = build_job(self.config, device_id, training, max_attempts, deadline, now, request_id=request_id)
            tx.insert_job(job)
            audit.record(tx, now, actor, "SubmitJob", job.job_id, detail=f"device {device_id}")
        return job, True

    def cancel_job(self, actor: Actor, job_id: str) -> JobRecord:
        """Cancel a job that has not ended; its device learns it on the next heartbeat."""
        validation.object_id(job_id, "job_id")
        with self.state.transaction() as tx:
            job = found(tx.get_job(job_id, for_update=True), "job", job_id)
            if job.state.terminal:
                raise FailedPrecondition(f"job {job_id} already ended ({job.state.value})")
            job.cancel(self.clock())
            tx.save_job(job)
            audit.record(tx, job.updated_at, actor, "CancelJob", job_id)
        return job

    # ------------------------------------------------------------------ adapters
    def activate_adapter(
        self,
        actor: Actor,
        adapter_id: str = "",
        *,
        name: str = "",
        selector: DeviceSelector | None = None,
        campaign_id: str = "",
        canary_percent: int = 0,
        eval_gate: EvalGate | None = None,
    ) -> Activation:
        """Make adapters desired: one adapter on its device, a name across a selector, or a
        canary share of a campaign; with an eval gate, only adapters that beat their base."""
        if sum(map(bool, (adapter_id, name, campaign_id))) != 1:
            raise InvalidArgument(
                "adapter_id", "set exactly one of adapter_id, adapter_name (with a selector) or campaign_id"
            )
        if adapter_id:
            validation.object_id(adapter_id, "adapter_id")
        elif name:
            validation.name(name, "adapter_name")
        else:
            validation.object_id(campaign_id, "campaign_id")
        with self.state.transaction() as tx:
            if adapter_id:
                done = activation.activate_one(tx, adapter_id, eval_gate)
            elif name:
                done = activation.activate_by_name(tx, name, selector or DeviceSelector(), eval_gate)
            else:
                done = activation.activate_canary(tx, campaign_id, canary_percent, eval_gate)
            target = adapter_id or name or campaign_id
            detail = f"{len(done.changed)} devices" + (f", {len(done.refused)} left out" if done.refused else "")
            audit.record(tx, self.clock(), actor, "ActivateAdapter", target, detail=detail)
        return done

    def deactivate_adapter(
        self, actor: Actor, device_id: str = "", selector: DeviceSelector | None = None
    ) -> list[str]:
        """Send one device, or every device matching a selector, back to its base model."""
        if bool(device_id) == (selector is not None):
            raise InvalidArgument("device_id", "set exactly one of device_id and selector")
        if device_id:
            validation.device_id(device_id)
        with self.state.transaction() as tx:
            if selector is None:
                devices = [found(tx.get_device(device_id, for_update=True), "device", device_id)]
            else:
                devices = activation.matching_devices(tx, selector)
            changed = activation.deactivate(tx, devices)
            target = device_id or "selector"
            audit.record(tx, self.clock(), actor, "DeactivateAdapter", target, detail=f"{len(changed)} devices")
        return changed

    def rollback_adapter(self, actor: Actor, device_id: str) -> str:
        """Make the previously desired adapter (or the base) desired again."""
        validation.device_id(device_id)
        with self.state.transaction() as tx:
            previous = activation.rollback(tx, device_id)
            audit.record(tx, self.clock(), actor, "RollbackAdapter", device_id, detail=previous or "base")
        return previous

    # ------------------------------------------------------------------ summary
    def fleet_summary(self, online_window_s: float = ONLINE_WINDOW_S) -> dict[str, Any]:
        """Jobs by state, devices by eligibility reason and by adapter convergence, queue depth by
        base model, jobs ended per minute over THROUGHPUT_MINUTES: what dashboards and the
        Prometheus gauges show (the same numbers, from this one read)."""
        now = self.clock()
        first_minute = int(now // 60) - THROUGHPUT_MINUTES + 1
        with self.state.transaction() as tx:
            jobs = tx.count_jobs_by_state()
            by_reason, total, online = tx.count_devices_by_reason(now - online_window_s)
            adapters = tx.adapter_count()
            sync = tx.adapter_sync_counts(now - online_window_s)
            queued = tx.queued_by_base_model()
            finished = tx.finished_per_minute(first_minute * 60.0)
        return {
            "jobs_by_state": jobs,
            "devices_by_eligibility": by_reason,
            "device_count": total,
            "devices_online": online,
            "adapter_count": adapters,
            "devices_by_adapter_sync": sync,
            "queued_by_base_model": queued,
            "finished_per_minute": [
                (minute * 60.0, *finished.get(minute, (0, 0)))
                for minute in range(first_minute, first_minute + THROUGHPUT_MINUTES)
            ],
        }
