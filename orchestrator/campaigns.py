"""Campaigns as living objects: one training spec for every device a selector matches, now and
later.

    ACTIVE --pause--> PAUSED --resume--> ACTIVE (or CLOSED once it has no room left)
    ACTIVE --deadline passed / target count reached (fan-out)--> CLOSED
    any --cancel--> CANCELLED (its unfinished jobs too; running devices stop at their next heartbeat)

Creating a campaign gives a job to every matching device in one transaction. While it is ACTIVE,
the control loop's fan-out (`tick`) gives a job to each device that enrolled or re-enrolled
(labels and capabilities are written at enrollment) since its last pass and matches, until the
deadline or the target count. One job per device per campaign is a unique index in the store, so
a fan-out that runs twice creates nothing twice. Jobs of a PAUSED campaign are not leased
(the store's claim skips them); jobs already running go on. Selectors match through
DeviceSelector.matches, the one place that decides what a selector means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator import audit, validation
from orchestrator.activation import canary_rank
from orchestrator.audit import Actor
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import CampaignRecord, CampaignState, DeviceSelector, JobFilter, JobState, new_id
from orchestrator.errors import InvalidArgument, found
from orchestrator.fleet import build_job, check_submission
from orchestrator.state.base import StateStore, Tx

_OPEN_JOBS = (JobState.QUEUED, JobState.LEASED, JobState.RUNNING, JobState.PAUSED, JobState.UPLOADING)
MAX_TARGET = 10_000_000


@dataclass
class CampaignView:
    """A campaign with what operators read next to it."""

    campaign: CampaignRecord
    jobs_by_state: dict[str, int]
    failures_by_class: dict[str, int]
    now: float

    @property
    def enrolling(self) -> bool:
        """True while devices that enroll or start matching still get a job."""
        return self.campaign.room(self.now) != 0

    @property
    def progress(self) -> float:
        """Share of its jobs that succeeded."""
        total = sum(self.jobs_by_state.values())
        return self.jobs_by_state.get(JobState.SUCCEEDED.value, 0) / total if total else 0.0


class Campaigns:
    """Create, read, pause, resume and cancel campaigns; the control loop's fan-out."""

    def __init__(self, state: StateStore, config: OrchestratorConfig, clock: Callable[[], float]) -> None:
        self.state = state
        self.config = config
        self.clock = clock

    # ------------------------------------------------------------------ operator calls
    def create(
        self,
        actor: Actor,
        request_id: str,
        name: str,
        selector: DeviceSelector,
        training: dict[str, Any],
        max_attempts: int,
        deadline: float,
        target_count: int = 0,
    ) -> tuple[CampaignView, bool]:
        """A job for every device matching now (at most target_count, chosen in a stable random
        order); returns the campaign and whether this call created it (idempotent on request_id)."""
        validation.text(name, "name", 200)
        if not 0 <= target_count <= MAX_TARGET:
            raise InvalidArgument("target_count", f"{target_count} is outside 0-{MAX_TARGET}")
        now = check_submission(self.clock, request_id, training, max_attempts, deadline)
        campaign = CampaignRecord(
            campaign_id=new_id("cmp"),
            name=name,
            selector=asdict(selector),
            request_id=request_id,
            created_at=now,
            training=training,
            max_attempts=max_attempts,
            deadline=deadline,
            target_count=target_count,
            scanned_until=now,
            updated_at=now,
        )
        with self.state.transaction() as tx:
            earlier = tx.get_campaign_by_request(request_id) if request_id else None
            if earlier is not None:
                return self._view(tx, earlier, now), False
            devices = [d.device_id for d in tx.iter_devices() if selector.matches(d)]
            if target_count:
                devices = sorted(devices, key=lambda d: canary_rank(campaign.campaign_id, d))[:target_count]
            tx.insert_jobs([self._job(campaign, d, now) for d in devices])
            campaign.job_count = len(devices)
            if campaign.room(now) == 0:
                campaign.state = CampaignState.CLOSED
            tx.insert_campaign(campaign)
            audit.record(tx, now, actor, "SubmitCampaign", campaign.campaign_id, detail=f"{len(devices)} jobs")
            return self._view(tx, campaign, now), True

    def get(self, campaign_id: str) -> CampaignView:
        """The campaign with its jobs counted by state and its failures by error class."""
        validation.object_id(campaign_id, "campaign_id")
        with self.state.transaction() as tx:
            return self._view(tx, found(tx.get_campaign(campaign_id), "campaign", campaign_id), self.clock())

    def list_campaigns(
        self, states: tuple[CampaignState, ...], page_size: int, page_token: str
    ) -> tuple[list[CampaignView], str]:
        """A page of campaigns, newest first."""
        size = validation.page_size(page_size)
        validation.optional_object_id(page_token, "page_token")
        now = self.clock()
        with self.state.transaction() as tx:
            rows = tx.list_campaigns(size + 1, page_token, states)
            views = [self._view(tx, c, now) for c in rows[:size]]
        return views, (rows[size - 1].campaign_id if len(rows) > size else "")

    def pause(self, actor: Actor, campaign_id: str) -> CampaignView:
        """Stop leasing the campaign's jobs and creating new ones; running jobs go on."""
        return self._change(actor, "PauseCampaign", campaign_id, lambda c, now: c.move(CampaignState.PAUSED, now))

    def resume(self, actor: Actor, campaign_id: str) -> CampaignView:
        """Undo a pause: ACTIVE again, or CLOSED when its deadline or target was reached."""

        def resume(c: CampaignRecord, now: float) -> None:
            c.move(CampaignState.ACTIVE, now)
            if c.room(now) == 0:
                c.state = CampaignState.CLOSED

        return self._change(actor, "ResumeCampaign", campaign_id, resume)

    def cancel(self, actor: Actor, campaign_id: str) -> tuple[CampaignView, int]:
        """Cancel the campaign and its unfinished jobs; returns how many jobs this cancelled."""
        validation.object_id(campaign_id, "campaign_id")
        now = self.clock()
        with self.state.transaction() as tx:
            campaign = found(tx.get_campaign(campaign_id, for_update=True), "campaign", campaign_id)
            cancelled = 0
            if campaign.state != CampaignState.CANCELLED:
                campaign.move(CampaignState.CANCELLED, now)
                tx.save_campaign(campaign)
                for job in list(tx.iter_jobs(JobFilter(states=_OPEN_JOBS, campaign_id=campaign_id))):
                    locked = tx.get_job(job.job_id, for_update=True)
                    if locked is not None and not locked.state.terminal:
                        locked.cancel(now)
                        tx.save_job(locked)
                        cancelled += 1
                audit.record(tx, now, actor, "CancelCampaign", campaign_id, detail=f"{cancelled} jobs cancelled")
            return self._view(tx, campaign, now), cancelled

    def _change(
        self, actor: Actor, action: str, campaign_id: str, change: Callable[[CampaignRecord, float], None]
    ) -> CampaignView:
        validation.object_id(campaign_id, "campaign_id")
        now = self.clock()
        with self.state.transaction() as tx:
            campaign = found(tx.get_campaign(campaign_id, for_update=True), "campaign", campaign_id)
            change(campaign, now)
            tx.save_campaign(campaign)
            audit.record(tx, now, actor, action, campaign_id, detail=campaign.state.value)
            return self._view(tx, campaign, now)

    @staticmethod
    def _view(tx: Tx, campaign: CampaignRecord, now: float) -> CampaignView:
        cid = campaign.campaign_id
        return CampaignView(campaign, tx.count_jobs_by_state(cid), tx.count_failures_by_class(cid), now)

    def _job(self, campaign: CampaignRecord, device_id: str, now: float) -> Any:
        return build_job(
            self.config,
            device_id,
            campaign.training,
            campaign.max_attempts,
            campaign.deadline,
            now,
            campaign_id=campaign.campaign_id,
        )

    # ------------------------------------------------------------------ control loop
    def tick(self) -> int:
        """Fan every ACTIVE campaign out to devices that enrolled or changed since its last
        pass; close campaigns past their deadline or target. Returns the jobs created."""
        with self.state.transaction() as tx:
            ids = [c.campaign_id for c in tx.list_campaigns(1000, "", (CampaignState.ACTIVE,))]
        return sum(self._fan_out(campaign_id) for campaign_id in ids)

    def _fan_out(self, campaign_id: str) -> int:
        now = self.clock()
        with self.state.transaction() as tx:
            campaign = tx.get_campaign(campaign_id, for_update=True)
            if campaign is None or campaign.state != CampaignState.ACTIVE:
                return 0
            room = campaign.room(now)
            made = 0
            if room != 0:
                # Re-look a little before the last pass: an enrollment that was in flight then,
                # or written by a replica whose clock runs behind, is still seen.
                since = campaign.scanned_until - self.config.campaign_rescan_s
                selector = DeviceSelector.from_dict(campaign.selector)
                changed = [d.device_id for d in tx.iter_devices_changed(since) if selector.matches(d)]
                have = tx.campaign_devices(campaign_id, changed) if changed else set()
                for device_id in changed:
                    if made == room:
                        break
                    if device_id not in have and tx.insert_campaign_job(self._job(campaign, device_id, now)):
                        made += 1
            campaign.job_count += made
            quiet = made == 0 and now - campaign.scanned_until < self.config.campaign_rescan_s / 2
            if campaign.room(now) == 0:
                campaign.move(CampaignState.CLOSED, now)
            elif quiet:
                return 0  # nothing to write: the next pass still covers what this one saw
            campaign.scanned_until = now
            tx.save_campaign(campaign)
        return made
