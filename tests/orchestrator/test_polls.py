"""The poll seam: every poll runner gives the same answers and leaves the same state.

Runs each case through SQLite's inline runner, the generic thread runner on PostgreSQL (the
Python reference) and PostgreSQL's server-side functions, with a fake clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from adapters_store import FileBlobStore
from orchestrator.audit import Actor
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import AdapterRecord, JobFilter, JobState, Progress
from orchestrator.errors import FailedPrecondition, NotFound, PermissionDenied, Unauthenticated
from orchestrator.identity import DeviceCall
from orchestrator.polls import POOL_SIZE, InlinePolls, PgPolls, PollRunner, ThreadPolls
from orchestrator.reports import HeartbeatInput
from orchestrator.service import Orchestrator
from orchestrator.state import open_state
from orchestrator.state.postgres import PostgresStore
from orchestrator.state.sqlite import SqliteStore
from tests.support.orch import FakeClock

TRAINING = {"adapter_name": "persona", "base_model_id": "tiny", "dataset": "notes"}
CAPS = {"base_model_id": "tiny", "supports_4bit": True, "ram_bytes": 8 * 2**30}
ADMIN = Actor("operator", "admin")


class World:
    """An orchestrator on one backend with one poll runner, driven from one event loop."""

    def __init__(self, orch: Orchestrator, runner: PollRunner, clock: FakeClock) -> None:
        self.orch, self.runner, self.clock = orch, runner, clock
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def enroll(self, device_id: str = "phone-1", **caps: Any) -> DeviceCall:
        credential = self.orch.identity.enroll("enroll-token", device_id, {**CAPS, **caps})
        return DeviceCall(device_id, credential)

    def submit(self, device_id: str = "phone-1", **training: Any) -> str:
        job, _ = self.orch.fleet.submit_job(ADMIN, "", device_id, {**TRAINING, **training}, 0, 0.0)
        self.clock.advance(0.001)  # distinct created_at: the oldest job is well defined
        return job.job_id

    def lease(self, call: DeviceCall) -> Any:
        return self.run(self.runner.lease(call))

    def heartbeat(self, call: DeviceCall, **kw: Any) -> Any:
        return self.run(self.runner.heartbeat(call, HeartbeatInput(**kw)))

    def job(self, job_id: str) -> Any:
        return self.orch.queries.get_job(job_id)


@pytest.fixture(params=["sqlite-inline", "postgres-thread", "postgres-function"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    backend, kind = request.param.split("-")
    if backend == "postgres":
        request.applymarker(pytest.mark.postgres)
        url = str(request.getfixturevalue("postgres_url"))
    else:
        url = f"sqlite:///{tmp_path / 'state.db'}"
    clock = FakeClock()
    config = OrchestratorConfig(bootstrap_token="op", enrollment_token="enroll-token", lease_s=30.0)
    # A credential cache would let a later call skip the check under test: read the store always.
    config.credential_cache_s = 0
    orch = Orchestrator(open_state(url), FileBlobStore(tmp_path / "blobs", url_secret=b"k" * 32), config, clock=clock)
    executor = ThreadPoolExecutor(4)
    runner: PollRunner
    if kind == "inline":
        assert isinstance(orch.state, SqliteStore)
        runner = InlinePolls(orch.jobs, orch.state)
    elif kind == "thread":
        runner = ThreadPolls(orch.jobs, executor)
    else:
        assert isinstance(orch.state, PostgresStore)
        runner = PgPolls(orch.jobs, orch.state, executor)
    w = World(orch, runner, clock)
    yield w
    w.run(runner.close())
    w.loop.close()
    executor.shutdown()
    orch.close()


def test_lease_hands_out_the_oldest_due_job_under_a_new_epoch(world: World) -> None:
    call = world.enroll()
    first, second = world.submit(), world.submit()

    got = world.lease(call)

    assert got.job.job_id == first and got.job.state == JobState.LEASED
    assert (got.job.attempt, got.job.lease_epoch) == (1, 1)
    assert got.job.lease_expires_at == pytest.approx(world.clock.now + 30.0)
    assert got.upload_url and got.upload_url_expires_at > world.clock.now
    assert world.orch.queries.get_device("phone-1").running_job_id == first
    assert world.job(second).state == JobState.QUEUED
    assert world.lease(call).job.job_id == second
    assert world.lease(call).job is None


def test_a_wrong_credential_or_unknown_device_is_refused_and_nothing_changes(world: World) -> None:
    call = world.enroll()
    job_id = world.submit()

    with pytest.raises(Unauthenticated):
        world.lease(DeviceCall("phone-1", "pldev_wrong"))
    with pytest.raises(Unauthenticated):
        world.heartbeat(DeviceCall("phone-1", "pldev_wrong"), running_job_id=job_id, running_epoch=1)
    with pytest.raises(Unauthenticated):
        world.lease(DeviceCall("phone-9", call.credential))

    assert world.job(job_id).state == JobState.QUEUED
    assert world.job(job_id).lease_epoch == 0


def test_a_client_certificate_for_another_device_is_refused_and_nothing_changes(world: World) -> None:
    call = world.enroll()
    job_id = world.submit()
    stolen = DeviceCall(call.device_id, call.credential, certified=("phone-2",))

    with pytest.raises(PermissionDenied, match="certificate is for 'phone-2'"):
        world.lease(stolen)
    with pytest.raises(PermissionDenied):
        world.heartbeat(stolen, running_job_id=job_id, running_epoch=1)
    with pytest.raises(PermissionDenied):
        world.lease(DeviceCall(call.device_id, call.credential, certified=()))

    assert world.job(job_id).state == JobState.QUEUED
    bound = DeviceCall(call.device_id, call.credential, certified=("phone-1", "phone-1-alias"))
    assert world.lease(bound).job.job_id == job_id


def test_a_job_that_does_not_fit_waits_and_says_why(world: World) -> None:
    call = world.enroll(ram_bytes=2**30)
    big = world.submit()
    with world.orch.state.transaction() as tx:
        job = tx.get_job(big, for_update=True)
        assert job is not None
        job.memory_estimate_bytes = 4 * 2**30
        tx.save_job(job)
    fits = world.submit()

    got = world.lease(call)

    assert got.job.job_id == fits
    assert world.job(big).state == JobState.QUEUED
    assert "device budget is 1024 MiB" in world.job(big).status_message


def test_heartbeats_renew_the_lease_and_account_paused_time(world: World) -> None:
    call = world.enroll()
    job_id = world.submit()
    epoch = world.lease(call).job.lease_epoch

    world.clock.advance(10)
    renewed = world.heartbeat(call, running_job_id=job_id, running_epoch=epoch, running_state=JobState.RUNNING)
    world.clock.advance(5)
    world.heartbeat(
        call, running_job_id=job_id, running_epoch=epoch, running_state=JobState.PAUSED, eligibility_reason="TOO_HOT"
    )
    paused = world.job(job_id)
    world.clock.advance(40)
    world.heartbeat(
        call,
        running_job_id=job_id,
        running_epoch=epoch,
        running_state=JobState.RUNNING,
        progress=Progress(step=3, total_steps=9, loss=1.5),
    )
    resumed = world.job(job_id)

    assert renewed.lease_expires_at == pytest.approx(world.clock.now - 45 + 30.0)
    assert renewed.cancel_job_ids == [] and renewed.stale_job_ids == []
    assert paused.state == JobState.PAUSED and paused.status_message == "paused by the device's gate (TOO_HOT)"
    assert resumed.state == JobState.RUNNING and resumed.status_message == ""
    assert resumed.paused_s == pytest.approx(40.0) and resumed.paused_since == 0.0
    assert (resumed.progress.step, resumed.progress.total_steps, resumed.progress.loss) == (3, 9, 1.5)
    assert resumed.lease_expires_at == pytest.approx(world.clock.now + 30.0)


def test_an_illegal_transition_is_refused_and_leaves_no_trace(world: World) -> None:
    call = world.enroll()
    job_id = world.submit()
    epoch = world.lease(call).job.lease_epoch
    world.heartbeat(call, running_job_id=job_id, running_epoch=epoch, running_state=JobState.UPLOADING)
    before = world.job(job_id)

    world.clock.advance(3)
    with pytest.raises(FailedPrecondition, match="cannot go from UPLOADING to RUNNING"):
        world.heartbeat(call, running_job_id=job_id, running_epoch=epoch, running_state=JobState.RUNNING)

    after = world.job(job_id)
    assert after.state == JobState.UPLOADING
    assert after.lease_expires_at == before.lease_expires_at and after.updated_at == before.updated_at


def test_cancelled_and_stale_jobs_are_named_in_the_reply(world: World) -> None:
    call = world.enroll()
    cancelled, stale = world.submit(), world.submit()
    first = world.lease(call).job
    world.orch.fleet.cancel_job(ADMIN, cancelled)
    second = world.lease(call).job

    assert first.job_id == cancelled and second.job_id == stale
    got = world.heartbeat(call, running_job_id=cancelled, running_epoch=first.lease_epoch)
    assert got.cancel_job_ids == [cancelled] and got.stale_job_ids == [] and got.lease_expires_at == 0.0
    got = world.heartbeat(call, running_job_id=stale, running_epoch=second.lease_epoch + 1)
    assert got.stale_job_ids == [stale] and got.cancel_job_ids == []
    got = world.heartbeat(call, running_job_id="job-unknown", running_epoch=1)
    assert got.stale_job_ids == ["job-unknown"]


def test_a_steady_heartbeat_writes_nothing_until_last_seen_gets_old(world: World) -> None:
    call = world.enroll()
    report: dict[str, Any] = {"power": {"charging": True}, "eligible": True, "eligibility_reason": "ELIGIBLE"}
    world.heartbeat(call, **report)
    seen = world.orch.queries.get_device("phone-1").last_seen

    world.clock.advance(2)
    world.heartbeat(call, **report)
    steady = world.orch.queries.get_device("phone-1")
    world.clock.advance(4)
    world.heartbeat(call, **report, free_storage_bytes=123)
    moved = world.orch.queries.get_device("phone-1")

    assert steady.last_seen == seen and steady.power == {"charging": True} and steady.eligible
    assert moved.last_seen == world.clock.now
    assert moved.capabilities["free_storage_bytes"] == 123 and moved.capabilities["ram_bytes"] == CAPS["ram_bytes"]


def test_the_desired_adapter_comes_back_with_the_heartbeat(world: World) -> None:
    call = world.enroll()
    adapter = AdapterRecord(
        "ad-1", "persona", 1, "phone-1", "job-x", 1, "ab" * 32, 10, "tiny", "fp", {"k": [1, 2]}, 1.5, "blobs/x"
    )
    with world.orch.state.transaction() as tx:
        tx.insert_adapter(adapter)
        tx.update_device("phone-1", {"desired_adapter_id": "ad-1"})

    got = world.heartbeat(call, eligible=True)

    assert got.desired_adapter == adapter


def test_a_credential_that_outlived_its_device_gets_not_found(world: World) -> None:
    world.orch.config.credential_cache_s = 60
    call = world.enroll()
    with world.orch.state.transaction() as tx:
        tx.cur.execute("DELETE FROM devices")  # type: ignore[attr-defined]

    with pytest.raises(NotFound):
        world.lease(call)


def test_concurrent_leases_never_hand_out_a_job_twice(world: World) -> None:
    call = world.enroll()
    jobs = {world.submit() for _ in range(6)}

    async def many() -> list[Any]:
        return await asyncio.gather(*(world.runner.lease(call) for _ in range(10)))

    got = [r.job.job_id for r in world.run(many()) if r.job is not None]

    assert sorted(got) == sorted(jobs)
    leased = list(world.orch.state.iter_all_jobs(JobFilter(states=(JobState.LEASED,))))
    assert {j.job_id for j in leased} == jobs and all(j.lease_epoch == 1 for j in leased)


def test_function_polls_recover_from_connections_the_database_dropped(world: World) -> None:
    if not isinstance(world.runner, PgPolls):
        pytest.skip("only the PostgreSQL runner holds connections of its own")
    call = world.enroll()
    world.submit()
    world.lease(call)  # opens a connection
    with world.orch.state.transaction() as tx:
        tx.cur.execute(  # type: ignore[attr-defined]
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )

    failures = 0
    for _ in range(POOL_SIZE + 2):
        try:
            world.heartbeat(call, eligible=True)
        except psycopg.OperationalError:
            failures += 1

    assert 1 <= failures <= POOL_SIZE  # each dropped connection fails one poll, then is replaced
    assert world.heartbeat(call, eligible=True).stale_job_ids == []


def test_polls_record_the_history_and_refusals_dashboards_read(world: World) -> None:
    """Every runner writes the same job history (state changes, bounded progress points) and
    stores the adapters a device refused, as the Python reference does."""
    call = world.enroll()
    job_id = world.submit()
    epoch = world.lease(call).job.lease_epoch
    running = {"running_job_id": job_id, "running_epoch": epoch}
    for step, loss in ((1, 2.0), (1, 2.0), (2, float("nan")), (3, 1.25)):
        world.clock.advance(1)
        world.heartbeat(
            call, **running, running_state=JobState.RUNNING, progress=Progress(step=step, total_steps=4, loss=loss)
        )
    world.heartbeat(
        call, **running, running_state=JobState.PAUSED, eligibility_reason="TOO_HOT", progress=Progress(3, 4, 0, 1.25)
    )
    world.heartbeat(call, adapter_refusals={"ad-0001": "base fingerprint differs"})
    _job, events, points = world.orch.queries.job_history(job_id)
    assert [(e.state, e.attempt) for e in events] == [
        (JobState.LEASED, 1),
        (JobState.RUNNING, 1),
        (JobState.PAUSED, 1),
    ]
    assert "TOO_HOT" in events[-1].message
    assert [(p.step, p.total_steps, p.loss) for p in points] == [(1, 4, 2.0), (2, 4, None), (3, 4, 1.25)]
    assert world.orch.queries.get_device("phone-1").adapter_refusals == {"ad-0001": "base fingerprint differs"}
    world.heartbeat(call)  # the device no longer reports refusals (it restarted): they are gone
    assert world.orch.queries.get_device("phone-1").adapter_refusals == {}


def test_a_paused_campaign_hands_out_no_lease(world: World) -> None:
    from orchestrator.domain import DeviceSelector

    call = world.enroll()
    view, _ = world.orch.campaigns.create(ADMIN, "", "c", DeviceSelector(), TRAINING, 0, 0.0)
    world.orch.campaigns.pause(ADMIN, view.campaign.campaign_id)
    single = world.submit()

    assert world.lease(call).job.job_id == single  # only the job outside the paused campaign
    assert world.lease(call).job is None
    world.orch.campaigns.resume(ADMIN, view.campaign.campaign_id)
    assert world.lease(call).job.campaign_id == view.campaign.campaign_id


def test_heartbeats_record_refusals_and_carry_the_fleet_gate_policy(world: World) -> None:
    from orchestrator.domain import DeviceSelector

    call = world.enroll()
    world.orch.identity.set_device_labels(ADMIN, "phone-1", {"tier": "beta"})
    world.orch.policies.set(ADMIN, "beta", DeviceSelector(labels={"tier": "beta"}), {"min_battery_pct": 80.0}, 1)
    world.orch.policies.set(ADMIN, "ga", DeviceSelector(labels={"tier": "ga"}), {"min_battery_pct": 20.0}, 2)

    got = world.heartbeat(call, eligible=True, adapter_refusals={"ad-9": "load failed: bad shapes"})

    assert (got.gate_policy, got.gate_policy_names) == ({"min_battery_pct": 80.0}, ["beta"])
    assert world.orch.queries.get_device("phone-1").adapter_refusals == {"ad-9": "load failed: bad shapes"}
    world.orch.policies.delete(ADMIN, "beta")
    got = world.heartbeat(call, eligible=True)
    assert (got.gate_policy, got.gate_policy_names) == ({}, [])
    assert world.orch.queries.get_device("phone-1").adapter_refusals == {}


def test_uint64_extremes_in_a_heartbeat_are_kept_capped_on_every_runner(world: World) -> None:
    call = world.enroll()
    job_id = world.submit()
    world.lease(call)

    got = world.heartbeat(call, free_storage_bytes=2**64 - 1, running_job_id=job_id, running_epoch=2**64 - 1)

    assert got.stale_job_ids == [job_id]  # no real epoch is that large
    assert world.orch.queries.get_device("phone-1").capabilities["free_storage_bytes"] == 2**63 - 1
