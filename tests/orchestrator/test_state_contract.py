"""The state-store contract, run unchanged against SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.domain import (
    AdapterRecord,
    CampaignRecord,
    DeviceRecord,
    JobFilter,
    JobRecord,
    JobState,
    Progress,
    new_id,
)
from orchestrator.errors import AlreadyExists
from orchestrator.state import StateStore, open_state


def _job(device: str = "dev-1", **kw: object) -> JobRecord:
    now = time.time()
    return JobRecord(
        job_id=new_id("job"), device_id=device, training={"adapter_name": "a"}, created_at=now, updated_at=now, **kw
    )  # type: ignore[arg-type]


def test_job_round_trip(state: StateStore) -> None:
    job = _job(progress=Progress(3, 10, 1, 0.5, 99), deadline=123.0)
    with state.transaction() as tx:
        tx.insert_job(job)
    with state.transaction() as tx:
        got = tx.get_job(job.job_id)
    assert got is not None
    got.change_seq = job.change_seq = 0
    assert got == job


def test_request_id_is_unique_but_empty_ids_never_clash(state: StateStore) -> None:
    with state.transaction() as tx:
        tx.insert_job(_job(request_id="r1"))
        tx.insert_job(_job())
        tx.insert_job(_job())
    with pytest.raises(AlreadyExists), state.transaction() as tx:
        tx.insert_job(_job(request_id="r1"))
    with state.transaction() as tx:
        assert tx.get_job_by_request("r1") is not None
        assert len(tx.list_jobs(JobFilter(), 10)) == 3


def test_failed_transaction_rolls_back(state: StateStore) -> None:
    job = _job()
    with pytest.raises(RuntimeError), state.transaction() as tx:
        tx.insert_job(job)
        raise RuntimeError("boom")
    with state.transaction() as tx:
        assert tx.get_job(job.job_id) is None


def test_save_job_advances_change_seq_and_the_watch_cursor(state: StateStore) -> None:
    a, b = _job(), _job()
    with state.transaction() as tx:
        tx.insert_job(a)
        tx.insert_job(b)
        seq = tx.max_change_seq()
    with state.transaction() as tx:
        start = tx.watch_cursor()
        assert tx.jobs_changed_after(start, JobFilter(), 10) == ([], start)
    with state.transaction() as tx:
        job = tx.get_job(a.job_id, for_update=True)
        assert job is not None
        job.state = JobState.LEASED
        tx.save_job(job)
    with state.transaction() as tx:
        changed, after = tx.jobs_changed_after(start, JobFilter(), 10)
        assert [j.job_id for j in changed] == [a.job_id]
        assert changed[0].state == JobState.LEASED and changed[0].change_seq > seq
        assert after > start and tx.jobs_changed_after(after, JobFilter(), 10) == ([], after)
        assert tx.max_change_seq() > seq
        assert tx.jobs_changed_after(start, JobFilter(states=(JobState.QUEUED,)), 10)[0] == []


def test_a_change_committed_after_a_later_one_still_reaches_the_watcher(state: StateStore) -> None:
    """Writer A changes job a, then writer B changes job b and commits first; a watcher reading
    in between must still get a once A commits (a change_seq cursor skipped it on PostgreSQL,
    where A's sequence value is below B's). SQLite has one writer: B waits for A there."""
    a, b = _job(), _job()
    with state.transaction() as tx:
        tx.insert_job(a)
        tx.insert_job(b)
    with state.transaction() as tx:
        cursor = tx.watch_cursor()
    a_written, release, b_done = threading.Event(), threading.Event(), threading.Event()

    def change(job_id: str) -> None:
        with state.transaction() as tx:
            job = tx.get_job(job_id, for_update=True)
            assert job is not None
            job.status_message = "changed"
            tx.save_job(job)
            if job_id == a.job_id:
                a_written.set()
                release.wait(10)
        if job_id == b.job_id:
            b_done.set()

    writer_a = threading.Thread(target=change, args=(a.job_id,))
    writer_a.start()
    assert a_written.wait(10)
    writer_b = threading.Thread(target=change, args=(b.job_id,))
    writer_b.start()
    if not b_done.wait(1.0):
        release.set()  # one writer at a time (SQLite): B cannot commit while A is open
    seen: list[str] = []
    with state.transaction() as tx:
        changed, cursor = tx.jobs_changed_after(cursor, JobFilter(), 10)
        seen += [j.job_id for j in changed]
    release.set()
    writer_a.join(10)
    writer_b.join(10)
    with state.transaction() as tx:
        changed, cursor = tx.jobs_changed_after(cursor, JobFilter(), 10)
        seen += [j.job_id for j in changed]
    assert sorted(seen) == sorted([a.job_id, b.job_id])


def test_claimable_jobs_respect_device_state_and_backoff(state: StateStore) -> None:
    now = time.time()
    due, later, other, leased = _job(), _job(not_before=now + 60), _job("dev-2"), _job(state=JobState.LEASED)
    with state.transaction() as tx:
        for j in (due, later, other, leased):
            tx.insert_job(j)
    with state.transaction() as tx:
        assert [j.job_id for j in tx.claimable_jobs("dev-1", now, 10)] == [due.job_id]
        assert {j.job_id for j in tx.claimable_jobs("dev-1", now + 61, 10)} == {due.job_id, later.job_id}


def test_expired_jobs(state: StateStore) -> None:
    now = time.time()
    expired = _job(state=JobState.RUNNING, lease_expires_at=now - 1)
    fresh = _job(state=JobState.RUNNING, lease_expires_at=now + 60)
    late = _job(deadline=now - 5)
    paused_late = _job(state=JobState.PAUSED, lease_expires_at=now + 60, deadline=now - 5)
    with state.transaction() as tx:
        for j in (expired, fresh, late, paused_late):
            tx.insert_job(j)
    with state.transaction() as tx:
        assert {j.job_id for j in tx.expired_jobs(now, 10)} == {expired.job_id, late.job_id}


def test_list_jobs_pages_and_filters(state: StateStore) -> None:
    # One job per device per campaign (a unique index), so each job has its own device.
    jobs = [_job(f"dev-{i}", campaign_id="c1" if i % 2 else "") for i in range(7)]
    with state.transaction() as tx:
        for j in jobs:
            tx.insert_job(j)
    seen: list[str] = []
    before = ""
    while True:
        with state.transaction() as tx:
            page = tx.list_jobs(JobFilter(), 3, before)
        seen += [j.job_id for j in page]
        if len(page) < 3:
            break
        before = page[-1].job_id
    assert seen == sorted((j.job_id for j in jobs), reverse=True)
    with state.transaction() as tx:
        assert len(tx.list_jobs(JobFilter(campaign_id="c1"), 100)) == 3
        assert tx.count_jobs_by_state() == {"QUEUED": 7}
        assert tx.count_jobs_by_state("c1") == {"QUEUED": 3}


def test_devices(state: StateStore) -> None:
    now = time.time()
    with state.transaction() as tx:
        for i in range(5):
            tx.upsert_device(
                DeviceRecord(
                    f"d{i}",
                    "h",
                    {"ram_bytes": i},
                    {"k": "v"},
                    eligibility_reason="TOO_HOT" if i else "ELIGIBLE",
                    last_seen=now - i * 100,
                )
            )
    with state.transaction() as tx:
        d = tx.get_device("d1", for_update=True)
        assert d is not None and d.capabilities == {"ram_bytes": 1} and d.labels == {"k": "v"}
        d.desired_adapter_id = "ad-1"
        d.adapter_history = ["", "ad-0"]
        tx.upsert_device(d)
    with state.transaction() as tx:
        d = tx.get_device("d1")
        assert d is not None and d.desired_adapter_id == "ad-1" and d.adapter_history == ["", "ad-0"]
        assert [x.device_id for x in tx.list_devices(2, "d1")] == ["d2", "d3"]
        by_reason, total, online = tx.count_devices_by_reason(now - 150)
        assert by_reason == {"ELIGIBLE": 1, "TOO_HOT": 4} and total == 5 and online == 2


def test_update_device_writes_only_the_named_fields(state: StateStore) -> None:
    with state.transaction() as tx:
        tx.upsert_device(DeviceRecord("d1", "h", {"ram_bytes": 1}, {"k": "v"}, desired_adapter_id="ad-1"))
    with state.transaction() as tx:
        assert tx.update_device(
            "d1", {"last_seen": 5.0, "eligible": True, "power": {"battery": 80}, "running_job_id": "job-1"}
        )
        assert not tx.update_device("nope", {"last_seen": 5.0})
        assert tx.update_device("d1", {}) and not tx.update_device("nope", {})
        with pytest.raises(ValueError, match="no_such_field"):
            tx.update_device("d1", {"no_such_field": 1})
    with state.transaction() as tx:
        d = tx.get_device("d1")
        assert d is not None
        assert (d.last_seen, d.eligible, d.power, d.running_job_id) == (5.0, True, {"battery": 80}, "job-1")
        assert (d.credential_hash, d.capabilities, d.labels, d.desired_adapter_id) == (
            "h",
            {"ram_bytes": 1},
            {"k": "v"},
            "ad-1",
        )


def test_bulk_inserts(state: StateStore) -> None:
    jobs = [_job(f"d{i % 3}") for i in range(50)]
    with state.transaction() as tx:
        tx.insert_devices([DeviceRecord(f"d{i}", f"h{i}", {"ram_bytes": i}) for i in range(3)])
    with state.transaction() as tx:
        start = tx.watch_cursor()
    with state.transaction() as tx:
        tx.insert_jobs(jobs)
    with state.transaction() as tx:
        got = tx.get_job(jobs[7].job_id)
        assert got is not None and got.device_id == "d1" and got.state == JobState.QUEUED
        # Every row gets its own change_seq, so watchers see each bulk-inserted job.
        changed, _ = tx.jobs_changed_after(start, JobFilter(), 100)
        assert sorted(j.job_id for j in changed) == sorted(j.job_id for j in jobs)
        assert len({j.change_seq for j in changed}) == 50
        device = tx.get_device("d2")
        assert device is not None and device.credential_hash == "h2"
    with pytest.raises(AlreadyExists), state.transaction() as tx:
        tx.insert_jobs([_job(), jobs[0]])
    with pytest.raises(AlreadyExists), state.transaction() as tx:
        tx.insert_devices([DeviceRecord("d0", "x")])
    with state.transaction() as tx:
        assert len(tx.list_jobs(JobFilter(), 100)) == 50  # the failed bulk insert left nothing


def test_adapters_and_versions(state: StateStore) -> None:
    def ad(version: int) -> AdapterRecord:
        return AdapterRecord(
            new_id("ad"),
            "persona",
            version,
            "d1",
            "job",
            1,
            "0" * 64,
            10,
            "base",
            "fp",
            {"rank": 8},
            time.time(),
            f"blobs/sha256/{version}",
        )

    with state.transaction() as tx:
        tx.insert_adapter(ad(1))
        tx.insert_adapter(ad(2))
        assert tx.latest_adapter_version("d1", "persona") == 2
        assert tx.latest_adapter_version("d1", "other") == 0
    with pytest.raises(AlreadyExists), state.transaction() as tx:
        tx.insert_adapter(ad(2))
    with state.transaction() as tx:
        assert [a.version for a in tx.list_adapters("d1", "", 10)] == [2, 1]
        assert tx.adapter_count() == 2
        assert tx.referenced_blob_keys() == {"blobs/sha256/1", "blobs/sha256/2"}
        oldest = tx.list_adapters("d1", "", 10)[-1]
        tx.delete_adapter(oldest.adapter_id)
        tx.delete_adapter(oldest.adapter_id)  # idempotent
        assert tx.get_adapter(oldest.adapter_id) is None
        assert tx.referenced_blob_keys() == {"blobs/sha256/2"}


def test_campaigns(state: StateStore) -> None:
    c = CampaignRecord(new_id("cmp"), "spring", {"labels": {"a": "b"}}, "req-1", time.time(), 3)
    with state.transaction() as tx:
        tx.insert_campaign(c)
    with state.transaction() as tx:
        assert tx.get_campaign(c.campaign_id) == c
        assert tx.get_campaign_by_request("req-1") == c


def test_state_survives_reopen(state_url: str) -> None:
    store = open_state(state_url)
    job = _job()
    with store.transaction() as tx:
        tx.insert_job(job)
    store.close()
    again = open_state(state_url)
    with again.transaction() as tx:
        assert tx.get_job(job.job_id) is not None
    assert again.migrate() == again.migrate()  # idempotent
    again.close()


def test_concurrent_claims_never_share_a_job(state_url: str) -> None:
    """Two stores (two replicas' connections) claim in parallel: every job is claimed once."""
    setup = open_state(state_url)
    with setup.transaction() as tx:
        for _ in range(40):
            tx.insert_job(_job())
    stores = [open_state(state_url, migrate=False) for _ in range(2)]
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(store: StateStore) -> None:
        while True:
            with store.transaction() as tx:
                jobs = tx.claimable_jobs("dev-1", time.time(), 1)
                if not jobs:
                    return
                job = jobs[0]
                job.state = JobState.LEASED
                tx.save_job(job)
            with lock:
                claimed.append(job.job_id)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 40 and len(set(claimed)) == 40
    for s in (*stores, setup):
        s.close()


def test_concurrent_transactions_are_durable_on_return_and_fail_alone(state_url: str) -> None:
    """Many threads write at once (SQLite shares one COMMIT among them): each write is visible to
    another connection the moment its transaction() returns, and a failing transaction among
    them rolls back only its own work."""
    store = open_state(state_url)
    observer = open_state(state_url, migrate=False)
    kept: list[str] = []
    dropped: list[str] = []
    unseen: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(15):
            job = _job(device=f"dev-{n}")
            fail = i % 4 == 3
            try:
                with store.transaction() as tx:
                    tx.insert_job(job)
                    if fail:
                        raise RuntimeError("this transaction fails")
            except RuntimeError:
                with lock:
                    dropped.append(job.job_id)
                continue
            if i % 5 == 0:  # another connection sees it at once: committed before returning
                with observer.transaction() as tx:
                    if tx.get_job(job.job_id) is None:
                        with lock:
                            unseen.append(job.job_id)
            with lock:
                kept.append(job.job_id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    again = open_state(state_url, migrate=False)
    with again.transaction() as tx:
        assert unseen == []
        assert all(tx.get_job(job_id) is not None for job_id in kept)
        assert all(tx.get_job(job_id) is None for job_id in dropped)
        assert len(kept) == 8 * 12 and len(dropped) == 8 * 3
    again.close()
    observer.close()


def test_a_version_1_database_migrates_with_its_jobs_and_they_reach_watchers(state_url: str) -> None:
    """An orchestrator upgraded over an existing database: migration 2 (change_xid) keeps every
    job, and a job written before it is still delivered to a watch once it changes."""
    from orchestrator.state.sql import SqlTx, _job_to_row

    old = open_state(state_url, migrate=False)
    try:
        assert old.migrate(1) == 1
        job = _job()
        row = _job_to_row(job)
        with old.transaction() as tx:
            assert isinstance(tx, SqlTx)
            # Written as the version-1 code wrote it: no change_xid column exists yet.
            cols = ", ".join(row)
            tx._q(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' for _ in row)})", list(row.values()))
    finally:
        old.close()
    store = open_state(state_url)  # migrates to the latest version, as a restart would
    try:
        assert store.migrate() == store.migrate(1) >= 2  # idempotent, never goes down
        with store.transaction() as tx:
            got = tx.get_job(job.job_id)
            assert got is not None and got.training == job.training
            cursor = tx.watch_cursor()
        with store.transaction() as tx:
            got = tx.get_job(job.job_id, for_update=True)
            assert got is not None
            got.state = JobState.CANCELLED
            tx.save_job(got)
        with store.transaction() as tx:
            changed, _ = tx.jobs_changed_after(cursor, JobFilter(), 10)
        assert [(j.job_id, j.state) for j in changed] == [(job.job_id, JobState.CANCELLED)]
    finally:
        store.close()
