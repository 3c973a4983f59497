"""Job history and dashboard aggregates, run unchanged against SQLite and PostgreSQL (the state
contract's fixtures): what save_job records, its bounds, and the counts dashboards read."""

from __future__ import annotations

import math
import time

import pytest

from orchestrator.domain import CampaignRecord, DeviceRecord, JobRecord, JobState, Progress, RetryPolicy, new_id
from orchestrator.state import StateStore, history
from protos.wire import ErrorClass


def _job(device: str = "dev-1", base: str = "tiny") -> JobRecord:
    now = time.time()
    return JobRecord(
        job_id=new_id("job"), device_id=device, training={"adapter_name": "a", "base_model_id": base}, created_at=now
    )


def _step(state: StateStore, job_id: str, fn: object) -> JobRecord:
    with state.transaction() as tx:
        job = tx.get_job(job_id, for_update=True)
        assert job is not None
        fn(job)  # type: ignore[operator]
        tx.save_job(job)
        return job


def test_state_changes_and_progress_are_recorded_where_jobs_are_saved(state: StateStore) -> None:
    job = _job()
    with state.transaction() as tx:
        tx.insert_job(job)
    now = time.time()
    _step(state, job.job_id, lambda j: j.lease(now, 60))
    _step(state, job.job_id, lambda j: j.move(JobState.RUNNING, now + 1))
    for step, loss in ((1, 2.0), (2, 1.5), (2, 1.5), (3, float("nan"))):

        def report(j: JobRecord, step: int = step, loss: float = loss) -> None:
            j.progress = Progress(step, 3, 0, loss, step * 10)
            j.renew(now + 2, 60)

        _step(state, job.job_id, report)
    _step(state, job.job_id, lambda j: j.move(JobState.PAUSED, now + 3, "TOO_HOT"))
    _step(state, job.job_id, lambda j: j.renew(now + 4, 60))  # no change: nothing recorded
    _step(state, job.job_id, lambda j: j.fail_attempt(ErrorClass.CRASHED, "oom", now + 5, RetryPolicy()))
    with state.transaction() as tx:
        events, points = tx.job_history(job.job_id)
    assert [(e.state, e.attempt) for e in events] == [
        (JobState.LEASED, 1),
        (JobState.RUNNING, 1),
        (JobState.PAUSED, 1),
        (JobState.QUEUED, 1),
    ]
    assert "TOO_HOT" in events[2].message
    assert events[3].error_class == "CRASHED" and "oom" in events[3].message
    assert [(p.step, p.loss) for p in points[:2]] == [(1, 2.0), (2, 1.5)]
    assert points[2].step == 3 and points[2].loss is None  # a NaN loss is kept as unknown
    assert all(p.attempt == 1 and p.total_steps == 3 for p in points)


def test_history_is_bounded_per_job(state: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "EVENTS_MAX", 30)
    monkeypatch.setattr(history, "POINTS", 40)
    job = _job()
    with state.transaction() as tx:
        tx.insert_job(job)
    now = time.time()
    _step(state, job.job_id, lambda j: j.lease(now, 60))
    total = 20 * history.POINTS
    with state.transaction() as tx:
        j = tx.get_job(job.job_id, for_update=True)
        assert j is not None
        for step in range(1, total + 1, 3):
            j.progress = Progress(step, total, 0, 1.0 / step, 0)
            tx.save_job(j)
        for n in range(history.EVENTS_MAX + 50):  # a device flapping between PAUSED and RUNNING
            j.move(JobState.PAUSED if n % 2 == 0 else JobState.RUNNING, now + n)
            tx.save_job(j)
    with state.transaction() as tx:
        events, points = tx.job_history(job.job_id)
    assert len(events) == history.EVENTS_MAX
    assert history.POINTS * 0.9 <= len(points) <= history.POINTS + 2
    steps = [p.step for p in points]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] > total * 0.95  # spread over the whole run


def test_dashboard_aggregates(state: StateStore) -> None:
    now = time.time()
    jobs = [_job(base="tiny"), _job(base="tiny"), _job(base="SmolLM2"), _job(base="tiny")]
    with state.transaction() as tx:
        tx.insert_jobs(jobs)
        for d, desired, active, refusals, seen in (
            ("d1", "ad-1", "ad-1", {}, now),
            ("d2", "ad-2", "", {"ad-2": "wrong base"}, now),
            ("d3", "ad-3", "", {"ad-9": "old refusal"}, now),
            ("d4", "ad-4", "", {}, now - 3600),
            ("d5", "", "", {}, now),
        ):
            tx.upsert_device(
                DeviceRecord(
                    d,
                    "h",
                    desired_adapter_id=desired,
                    active_adapter_id=active,
                    adapter_refusals=refusals,
                    last_seen=seen,
                )
            )
    _step(state, jobs[3].job_id, lambda j: j.lease(now, 60))
    _step(state, jobs[3].job_id, lambda j: j.succeed("ad-x", now))
    _step(state, jobs[2].job_id, lambda j: j.cancel(now))
    with state.transaction() as tx:
        assert tx.queued_by_base_model() == {"tiny": 2}
        assert tx.adapter_sync_counts(now - 120) == {"CONVERGED": 2, "REFUSED": 1, "PENDING": 1, "OFFLINE": 1}
        per_minute = tx.finished_per_minute(now - 60)
        assert per_minute == {math.floor(now / 60): (1, 1)}
        assert tx.get_device("d2") is not None and tx.get_device("d2").adapter_refusals == {"ad-2": "wrong base"}  # type: ignore[union-attr]


def test_campaigns_list_newest_first(state: StateStore) -> None:
    ids = [new_id("cmp") for _ in range(5)]
    with state.transaction() as tx:
        for n, cid in enumerate(ids):
            tx.insert_campaign(CampaignRecord(cid, f"c{n}", {}, "", time.time()))
    with state.transaction() as tx:
        first = tx.list_campaigns(3)
        rest = tx.list_campaigns(3, first[-1].campaign_id)
    assert [c.campaign_id for c in first + rest] == ids[::-1]
