"""SQLite group commit: concurrent transactions share COMMITs, yet each returns only once its
own work is committed, and a COMMIT that fails fails every transaction it covered."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.domain import JobRecord, new_id
from orchestrator.state.sqlite import SqliteStore


def _job() -> JobRecord:
    now = time.time()
    return JobRecord(
        job_id=new_id("job"),
        device_id="dev-1",
        training={"adapter_name": "a"},
        created_at=now,
        updated_at=now,
    )


def _committed(path: Path, job_id: str) -> bool:
    """Whether a fresh connection (so: only committed data) sees the job."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone() is not None
    finally:
        conn.close()


def test_concurrent_writers_share_commits_and_return_committed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    store.migrate()
    start = store.commits
    uncommitted: list[str] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        for _ in range(10):
            job = _job()
            with store.transaction() as tx:
                tx.insert_job(job)
            if not _committed(path, job.job_id):
                uncommitted.append(job.job_id)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert uncommitted == []
    # 160 transactions; with 16 threads arriving together, batches form.
    assert store.commits - start < 160
    store.close()


class _FailingCommit:
    """The connection, except that COMMIT raises once."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.armed = True

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_a_failed_commit_fails_the_transaction_and_keeps_nothing(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    store.migrate()
    real = store._conn
    store._conn = _FailingCommit(real)  # type: ignore[assignment]
    job = _job()
    with pytest.raises(sqlite3.OperationalError, match="simulated"), store.transaction() as tx:
        tx.insert_job(job)
    with store.transaction() as tx:  # the store goes on working
        assert tx.get_job(job.job_id) is None
        tx.insert_job(_job())
    assert not real.in_transaction
    store._conn = real
    store.close()


def test_transactions_do_not_nest(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    store.migrate()
    with store.transaction() as tx:
        tx.insert_job(_job())
        with pytest.raises(RuntimeError, match="nest"), store.transaction():
            pass
    store.close()


class _CommitThreads:
    """The connection, recording which thread ran each COMMIT."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.threads: list[int] = []

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            self.threads.append(threading.get_ident())
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _insert(store: SqliteStore, job: JobRecord) -> str:
    with store.transaction() as tx:
        tx.insert_job(job)
    return job.job_id


def test_inline_calls_share_commits_return_committed_and_never_commit_on_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    store.migrate()
    real = store._conn
    spy = _CommitThreads(real)
    store._conn = spy  # type: ignore[assignment]
    start = store.commits
    uncommitted: list[str] = []

    async def caller() -> None:
        for _ in range(5):
            job_id = await store.run_inline(_insert, store, _job())
            if not _committed(path, job_id):
                uncommitted.append(job_id)

    async def main() -> int:
        await asyncio.gather(*(caller() for _ in range(32)))
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert uncommitted == []
    assert 0 < store.commits - start < 160  # 160 transactions, far fewer COMMITs
    assert spy.threads and loop_thread not in spy.threads  # the fsync never blocks the loop
    store._conn = real
    store.close()


def test_inline_calls_and_threads_share_batches_and_all_return_committed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    store.migrate()
    uncommitted: list[str] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            job_id = _insert(store, _job())
            if not _committed(path, job_id):
                uncommitted.append(job_id)

    async def caller() -> None:
        for _ in range(10):
            job_id = await store.run_inline(_insert, store, _job())
            if not _committed(path, job_id):
                uncommitted.append(job_id)

    async def main() -> None:
        await asyncio.gather(*(caller() for _ in range(16)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        asyncio.run(main())
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert uncommitted == []
    with store.transaction() as tx:  # nothing was left open
        tx.insert_job(_job())
    assert not store._conn.in_transaction
    store.close()


def _inline_insert_while_held(store: SqliteStore, release: Callable[[], None]) -> tuple[str, int, float]:
    """Start an inline insert while something holds the lock, let the loop tick 20 times, then
    release. Returns the job id, the ticks, and the longest gap between ticks (seconds)."""

    async def main() -> tuple[str, int, float]:
        loop = asyncio.get_running_loop()
        call = asyncio.create_task(store.run_inline(_insert, store, _job()))
        ticks, gap, last = 0, 0.0, loop.time()
        for _ in range(20):  # the loop keeps running while the lock is held
            await asyncio.sleep(0.01)
            ticks += 1
            gap, last = max(gap, loop.time() - last), loop.time()
        assert not call.done()
        release()
        return await call, ticks, gap

    return asyncio.run(main())


def test_an_inline_call_never_blocks_the_loop_on_a_thread_in_a_transaction(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    store.migrate()
    entered, release = threading.Event(), threading.Event()

    def slow_thread() -> None:
        with store.transaction() as tx:
            tx.insert_job(_job())
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=slow_thread)
    holder.start()
    assert entered.wait(10)
    job_id, ticks, gap = _inline_insert_while_held(store, release.set)
    holder.join(10)
    assert ticks == 20 and store.inline_fallbacks == 1
    assert gap < 1.0  # the holder keeps the lock for up to 10 s: the loop never waited for it
    assert _committed(path, job_id)
    store.close()


def test_an_inline_call_never_sleeps_on_the_loop_for_another_process_write_lock(tmp_path: Path) -> None:
    """Another process (the Ray control loop's reaper) holds the file's write lock: SQLite's busy
    handler would sleep, so the inline call runs in a thread and the loop keeps running."""
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    store.migrate()
    other = sqlite3.connect(path, isolation_level=None, timeout=30)
    other.execute("BEGIN IMMEDIATE")
    job_id, ticks, gap = _inline_insert_while_held(store, lambda: other.execute("COMMIT"))
    other.close()
    assert ticks == 20 and store.inline_fallbacks == 1
    assert gap < 1.0  # SQLite's busy handler would have slept up to 30 s on the loop
    assert _committed(path, job_id)
    with store.transaction() as tx:  # the busy timeout is back for everyone else
        tx.insert_job(_job())
    assert list(store._conn.execute("PRAGMA busy_timeout").fetchone().values()) == [30_000]
    store.close()


def test_a_failed_commit_fails_its_inline_members_and_keeps_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    store.migrate()
    real = store._conn
    store._conn = _FailingCommit(real)  # type: ignore[assignment]
    outcomes: list[tuple[str, bool]] = []  # (job id, whether its call raised)

    async def caller() -> None:
        job = _job()
        try:
            await store.run_inline(_insert, store, job)
        except sqlite3.OperationalError as exc:
            assert "simulated" in str(exc)
            outcomes.append((job.job_id, True))
        else:
            outcomes.append((job.job_id, False))

    async def main() -> None:
        await asyncio.gather(*(caller() for _ in range(8)))
        await asyncio.gather(*(caller() for _ in range(8)))  # the store goes on working

    asyncio.run(main())
    store._conn = real
    failed = [job_id for job_id, raised in outcomes if raised]
    assert failed, "the simulated COMMIT failure reached no caller"
    assert all(_committed(path, job_id) != raised for job_id, raised in outcomes)
    assert any(not raised for _, raised in outcomes[8:])
    store.close()


def _open_and_migrate(
    path: Path, barrier: threading.Barrier, stores: list[SqliteStore], errors: list[BaseException]
) -> None:
    try:
        barrier.wait(timeout=30)
        store = SqliteStore(path)
        stores.append(store)
        store.migrate()
    except BaseException as exc:
        errors.append(exc)


def test_stores_opening_one_new_file_together_migrate_it_once(tmp_path: Path) -> None:
    """The Ray control loop and a front end open the same new file at start-up: both migrate.

    Each thread has its own store (its own connection), as separate processes would. Before
    the fix this failed with "table devices already exists" or "database is locked".
    """
    for attempt in range(5):
        path = tmp_path / f"state-{attempt}.db"
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []
        stores: list[SqliteStore] = []
        threads = [threading.Thread(target=_open_and_migrate, args=(path, barrier, stores, errors)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for store in stores:
            store.close()
        assert errors == []
        conn = sqlite3.connect(path)
        try:
            versions = [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version")]
        finally:
            conn.close()
        assert versions and versions == sorted(set(versions))
