"""Transition bookkeeping on the job record, with a clock the test moves by hand."""

from __future__ import annotations

import pytest

from orchestrator.domain import ErrorClass, JobRecord, JobState, Progress, RetryPolicy
from orchestrator.errors import FailedPrecondition
from tests.support.orch import FakeClock

RETRY = RetryPolicy(base_s=10.0, max_s=60.0)


def leased(clock: FakeClock, **kw: object) -> JobRecord:
    job = JobRecord("job-1", "phone-1", {}, created_at=clock.now, **kw)  # type: ignore[arg-type]
    job.lease(clock.now, 30.0)
    return job


def test_a_lease_starts_a_new_attempt_under_a_new_epoch() -> None:
    clock = FakeClock()
    job = JobRecord("job-1", "phone-1", {}, status_message="retry 2/6", progress=Progress(step=7))

    job.lease(clock.now, 30.0)
    job.lease(clock.now + 1, 30.0)

    assert (job.state, job.attempt, job.lease_epoch) == (JobState.LEASED, 2, 2)
    assert job.lease_expires_at == clock.now + 31.0
    assert job.status_message == "" and job.progress == Progress()


def test_paused_time_accumulates_across_pauses_and_extends_the_deadline() -> None:
    clock = FakeClock()
    job = leased(clock, deadline=clock.now + 100)
    job.move(JobState.RUNNING, clock.now)

    clock.advance(10)
    job.move(JobState.PAUSED, clock.now, "TOO_HOT")
    clock.advance(25)
    job.move(JobState.RUNNING, clock.now)
    clock.advance(5)
    job.move(JobState.PAUSED, clock.now, "")
    clock.advance(15)
    job.move(JobState.UPLOADING, clock.now)

    assert job.paused_s == 40.0 and job.paused_since == 0.0
    assert job.status_message == ""
    clock.advance(80)  # 135 s after the deadline was set, 40 of them paused
    assert not job.past_deadline(clock.now)
    clock.advance(10)
    assert job.past_deadline(clock.now)


def test_a_pause_says_why() -> None:
    clock = FakeClock()
    job = leased(clock)

    job.move(JobState.PAUSED, clock.now, "BATTERY_LOW")
    first = job.status_message
    job.move(JobState.RUNNING, clock.now)
    job.move(JobState.PAUSED, clock.now, "")

    assert first == "paused by the device's gate (BATTERY_LOW)"
    assert job.status_message == "paused by the device's gate (reason not given)"


def test_a_paused_job_does_not_miss_its_deadline_while_paused() -> None:
    clock = FakeClock()
    job = leased(clock, deadline=clock.now + 10)
    job.move(JobState.PAUSED, clock.now)

    clock.advance(1000)

    assert not job.past_deadline(clock.now)


@pytest.mark.parametrize(
    ("start", "new"),
    [(JobState.UPLOADING, JobState.RUNNING), (JobState.UPLOADING, JobState.PAUSED), (JobState.LEASED, JobState.QUEUED)],
)
def test_a_device_cannot_report_an_illegal_transition(start: JobState, new: JobState) -> None:
    clock = FakeClock()
    job = leased(clock)
    job.state = start

    with pytest.raises(FailedPrecondition, match=f"cannot go from {start.value} to {new.value}"):
        job.move(new, clock.now)
    assert job.state == start


def test_failures_back_off_exponentially_then_give_up() -> None:
    clock = FakeClock()
    job = leased(clock, max_attempts=3)
    delays = []
    for _ in range(2):
        job.fail_attempt(ErrorClass.CRASHED, "boom", clock.now, RETRY)
        assert job.state == JobState.QUEUED and job.lease_expires_at == 0.0
        delays.append(job.not_before - clock.now)
        job.lease(clock.now, 30.0)
    job.fail_attempt(ErrorClass.CRASHED, "boom", clock.now, RETRY)

    assert delays == [10.0, 20.0]
    assert job.state == JobState.FAILED and job.status_message == "gave up after 3 attempts"
    assert (job.last_error_class, job.last_error) == ("CRASHED", "boom")


def test_a_non_retryable_failure_ends_the_job_at_once() -> None:
    clock = FakeClock()
    job = leased(clock)

    job.fail_attempt(ErrorClass.DATASET_INVALID, "line 3: not JSON", clock.now, RETRY)

    assert job.state == JobState.FAILED and job.status_message == "DATASET_INVALID is not retryable"


def test_backoff_is_capped() -> None:
    assert [RETRY.delay(a) for a in (1, 2, 3, 4, 5)] == [10.0, 20.0, 40.0, 60.0, 60.0]


def test_a_failure_while_paused_closes_the_pause() -> None:
    clock = FakeClock()
    job = leased(clock)
    job.move(JobState.PAUSED, clock.now)
    clock.advance(12)

    job.fail_attempt(ErrorClass.LEASE_EXPIRED, "gone", clock.now, RETRY)

    assert job.paused_s == 12.0 and job.paused_since == 0.0


def test_success_cancel_and_deadline_end_the_lease() -> None:
    clock = FakeClock()
    done, cancelled, late = leased(clock), leased(clock), leased(clock, deadline=clock.now + 1)
    cancelled.move(JobState.PAUSED, clock.now)
    clock.advance(5)

    done.succeed("ad-1", clock.now)
    cancelled.cancel(clock.now)
    late.miss_deadline(clock.now)

    assert (done.state, done.adapter_id, done.lease_expires_at) == (JobState.SUCCEEDED, "ad-1", 0.0)
    assert cancelled.state == JobState.CANCELLED and cancelled.paused_s == 5.0
    assert (late.state, late.last_error_class, late.status_message) == (
        JobState.FAILED,
        "DEADLINE_EXCEEDED",
        "deadline passed",
    )
    assert all(j.updated_at == clock.now for j in (done, cancelled, late))
