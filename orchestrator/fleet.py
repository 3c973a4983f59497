"""Fleet operations: what operators ask of the fleet (submit jobs and campaigns, cancel, choose
which adapter each device runs) and the fleet's summary.

Submissions are idempotent on `request_id`: a repeat returns the first job or campaign. A
campaign creates one job per matching device in one transaction. Activation decisions are in
activation.py; this module validates the request and runs them in a transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from orchestrator import activation, validation
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import CampaignRecord, DeviceRecord, DeviceSelector, JobRecord, new_id
from orchestrator.errors import FailedPrecondition, InvalidArgument, found
from orchestrator.placement import planned_peak_bytes
from orchestrator.state.base import StateStore


class FleetOps:
    """Operator use cases that change the fleet's work or adapters."""

    def __init__(self, state: StateStore, config: OrchestratorConfig, clock: Callable[[], float]) -> None:
        self.state = state
        self.config = config
        self.clock = clock

    # ------------------------------------------------------------------ work
    def submit_job(
        self, request_id: str, device_id: str, training: dict[str, Any], max_attempts: int, deadline: float
    ) -> tuple[JobRecord, bool]:
        """Queue a job for one device; a repeated request_id returns the first job."""
        validation.device_id(device_id)
        now = self._check_submission(request_id, training, max_attempts, deadline)
        with self.state.transaction() as tx:
            earlier = tx.get_job_by_request(request_id) if request_id else None
            if earlier is not None:
                return earlier, False
            device = found(tx.get_device(device_id), "device", device_id)
            job = self._new_job(device, training, max_attempts, deadline, now, request_id=request_id)
            tx.insert_job(job)
        return job, True

    def submit_campaign(
        self,
        request_id: str,
        name: str,
        selector: DeviceSelector,
        training: dict[str, Any],
        max_attempts: int,
        deadline: float,
    ) -> tuple[CampaignRecord, dict[str, int], bool]:
        """One job per device matching the selector, created in one transaction; returns the
        campaign, its jobs counted by state, and whether this call created it."""
        validation.text(name, "name", 200)
        now = self._check_submission(request_id, training, max_attempts, deadline)
        campaign = CampaignRecord(new_id("cmp"), name, asdict(selector), request_id, now)
        with self.state.transaction() as tx:
            earlier = tx.get_campaign_by_request(request_id) if request_id else None
            if earlier is not None:
                return earlier, tx.count_jobs_by_state(earlier.campaign_id), False
            jobs = [
                self._new_job(d, training, max_attempts, deadline, now, campaign_id=campaign.campaign_id)
                for d in tx.iter_devices()
                if selector.matches(d)
            ]
            tx.insert_jobs(jobs)
            campaign.job_count = len(jobs)
            tx.insert_campaign(campaign)
            counts = tx.count_jobs_by_state(campaign.campaign_id)
        return campaign, counts, True

    def _check_submission(self, request_id: str, training: dict[str, Any], max_attempts: int, deadline: float) -> float:
        """Validate what every submission carries; returns the time of the submission."""
        validation.text(request_id, "request_id", 128)
        validation.training_spec(training)
        if max_attempts > 100:
            raise InvalidArgument("max_attempts", f"{max_attempts} is above 100")
        now = self.clock()
        if deadline and deadline <= now:
            raise InvalidArgument("deadline", "is in the past")
        return now

    def _new_job(
        self,
        device: DeviceRecord,
        training: dict[str, Any],
        max_attempts: int,
        deadline: float,
        now: float,
        *,
        request_id: str = "",
        campaign_id: str = "",
    ) -> JobRecord:
        job = JobRecord(
            job_id=new_id("job"),
            device_id=device.device_id,
            training=training,
            created_at=now,
            updated_at=now,
            deadline=deadline,
            request_id=request_id,
            campaign_id=campaign_id,
        )
        # The smallest plan the device's own planner would reach, from the base shape it reported
        # (0: it reported none); placement compares it with the device's budget.
        job.memory_estimate_bytes = planned_peak_bytes(training, device.capabilities)
        if max_attempts:
            job.max_attempts = max_attempts
        return job

    def cancel_job(self, job_id: str) -> JobRecord:
        """Cancel a job that has not ended; its device learns it on the next heartbeat."""
        validation.object_id(job_id, "job_id")
        with self.state.transaction() as tx:
            job = found(tx.get_job(job_id, for_update=True), "job", job_id)
            if job.state.terminal:
                raise FailedPrecondition(f"job {job_id} already ended ({job.state.value})")
            job.cancel(self.clock())
            tx.save_job(job)
        return job

    # ------------------------------------------------------------------ adapters
    def activate_adapter(
        self,
        adapter_id: str = "",
        *,
        name: str = "",
        selector: DeviceSelector | None = None,
        campaign_id: str = "",
        canary_percent: int = 0,
    ) -> list[str]:
        """Make adapters desired: one adapter on its device, a name across a selector, or a
        canary share of a campaign. Returns the devices whose desire changed."""
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
                return activation.activate_one(tx, adapter_id)
            if name:
                return activation.activate_by_name(tx, name, selector or DeviceSelector())
            return activation.activate_canary(tx, campaign_id, canary_percent)

    def deactivate_adapter(self, device_id: str = "", selector: DeviceSelector | None = None) -> list[str]:
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
            return activation.deactivate(tx, devices)

    def rollback_adapter(self, device_id: str) -> str:
        """Make the previously desired adapter (or the base) desired again."""
        validation.device_id(device_id)
        with self.state.transaction() as tx:
            return activation.rollback(tx, device_id)

    # ------------------------------------------------------------------ summary
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
