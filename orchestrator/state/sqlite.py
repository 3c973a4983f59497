"""SQLite backend: one file, WAL, the embedded default for one orchestrator process.

Group commit. SQLite has one writer and, with synchronous=FULL, every COMMIT waits for an
fsync of the WAL (milliseconds on ordinary disks): one COMMIT per request caps a busy
orchestrator at a few hundred writes per second. So transactions share commits: each
`transaction()` runs its body inside a SAVEPOINT of one open physical transaction (a body that
fails rolls back only its own savepoint), and one COMMIT makes every savepoint released since
the previous COMMIT durable at once. The caller that finds nobody queued behind it issues that
COMMIT; whoever arrived meanwhile queues on the connection lock, and their bodies all land in
the next batch. Every caller still waits until the COMMIT covering its work has returned before
`transaction()` returns, so the contract is unchanged: an acknowledged write is durable (and,
with FULL, survives power loss). If a COMMIT fails, every member of its batch raises.

Inline calls (`run_inline`, used by the device-poll runner in orchestrator/polls.py). Handing
each poll to a thread pool costs more CPU than the poll's SQL (future plumbing, a loop
wake-up, GIL hand-offs between threads). So the event loop
runs a poll's bodies itself, in the open batch, and only the COMMIT (the fsync) goes to one
committer thread: the loop defers the COMMIT to a callback queued behind the requests already
ready, so every poll that arrived meanwhile joins the batch, and each caller's coroutine
awaits the COMMIT covering its work before it replies. While a COMMIT runs, new inline calls
wait for it on the loop (the connection is busy) instead of blocking it; when a thread of this
process is inside a transaction, or another process holds the file's write lock, an inline call
that has not started runs in a thread instead, so the loop never waits on a lock. Threads keep using
`transaction()` as before and share batches with inline calls; whoever commits a batch wakes
every member of it, on threads and on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from orchestrator import metrics
from orchestrator.state.base import StateStore, Tx
from orchestrator.state.schema import LATEST, MIGRATIONS
from orchestrator.state.sql import SqlTx
from orchestrator.state.sql_base import Dialect

# A batch is committed at the latest once it holds this many transactions, even with callers
# still queued (the queue is bounded by the threads calling in, but a cap keeps latency bounded).
MAX_BATCH = 64

T = TypeVar("T")

# How long a thread waits for another process's write lock before "database is locked".
BUSY_TIMEOUT_MS = 30_000


class SqliteDialect(Dialect):
    """SQLite's flavour: `?` placeholders, whole-database write locks."""

    unique_errors = (sqlite3.IntegrityError,)


def _dict_factory(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {col[0]: value for col, value in zip(cursor.description, row, strict=True)}


class _Batch:
    """Transactions sharing one physical COMMIT."""

    __slots__ = ("dirty", "done", "error", "members", "waiters")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.members = 0
        # True once a member wrote: later members may have read that uncommitted work.
        self.dirty = False
        # Inline members awaiting the COMMIT on an event loop.
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def finish(self) -> None:
        """Wake every member: threads through the event, inline callers on their loops (one
        wake-up per loop for the whole batch, not one per member)."""
        self.done.set()
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for loop, fut in self.waiters:
            by_loop.setdefault(loop, []).append(fut)
        for loop, futs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody awaits it now
                loop.call_soon_threadsafe(_resolve, futs, self.error)


def _resolve(futs: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for fut in futs:
        if fut.done():  # the caller was cancelled (client gone)
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


class _Inline:
    """One inline call in progress: the loop it runs on and the COMMITs it must await."""

    __slots__ = ("flush", "loop", "started", "waits")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waits: list[asyncio.Future[None]] = []
        self.flush = False  # a batch was left open: the loop must have it committed
        self.started = False  # a transaction began: from then on it must finish inline


class _LockBusy(BaseException):
    """An inline call's first transaction found the connection or the file's write lock held
    (a BaseException so that no `except Exception` in the domain code can swallow it)."""


_INLINE: ContextVar[_Inline | None] = ContextVar("pocketlora_sqlite_inline", default=None)


def _enable_wal(conn: sqlite3.Connection, timeout_s: float = BUSY_TIMEOUT_MS / 1000) -> None:
    """Switch the file to WAL, retrying while another connection holds it.

    Changing the journal mode needs an exclusive lock, and SQLite does not call the busy
    handler for it while this connection holds a shared lock (waiting could deadlock), so
    `timeout=` does not cover it: two processes opening one new file together (the Ray
    control loop and a front end) fail with "database is locked" at once. The mode is
    persistent, so once any connection has switched it the pragma is a no-op read.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SqliteStore(StateStore):
    """State in one SQLite file, shared by the threads of one process."""

    # Threads queue on the connection lock and share one group commit: more callers, bigger batches.
    worker_threads = 16

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        self.path = str(path)
        self.url = f"sqlite:///{self.path}"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # One connection serialised by a lock: SQLite admits one writer at a time anyway, and
        # BEGIN IMMEDIATE below makes every batch a writer so read-modify-write is safe.
        self._conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
        )
        self._conn.row_factory = _dict_factory
        self._lock = threading.Lock()
        _enable_wal(self._conn)
        # FULL: a transaction acknowledged to a client survives power loss, not only kill -9.
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._dialect = SqliteDialect()
        self._batch: _Batch | None = None  # the open physical transaction, if any
        self._queued = 0  # callers waiting for the connection lock
        self._queued_lock = threading.Lock()
        self._owner = 0  # thread running a body, to refuse nesting (it would deadlock)
        self.commits = 0  # physical COMMITs issued (for tests and benchmarks)
        # Inline calls: the COMMIT running on the committer thread (a future of the loop), and
        # whether a flush callback is already queued on the loop.
        self._committer: ThreadPoolExecutor | None = None
        self._fallback: ThreadPoolExecutor | None = None  # inline calls that found the lock held
        self.inline_fallbacks = 0  # how many (for tests and benchmarks)
        self._committing: asyncio.Future[None] | None = None
        self._flush_queued = False

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A savepoint in the shared batch; returns once the COMMIT covering it is durable."""
        started = time.perf_counter()
        try:
            with self._transaction() as tx:
                yield tx
        finally:
            metrics.transaction_seconds("sqlite", time.perf_counter() - started)

    @contextmanager
    def _transaction(self) -> Iterator[Tx]:
        if self._owner == threading.get_ident():
            raise RuntimeError("SqliteStore transactions do not nest")
        inline = _INLINE.get()
        with self._queued_lock:
            self._queued += 1
        error: BaseException | None = None
        must_wait = False
        with self._locked(inline) as may_fall_back:
            with self._queued_lock:
                self._queued -= 1
            batch = self._batch
            try:
                if batch is None:
                    self._begin(may_fall_back)
                    batch = self._batch = _Batch()
                before = self._conn.total_changes
                cur = self._conn.cursor()
                self._owner = threading.get_ident()
                try:
                    cur.execute("SAVEPOINT tx")
                    try:
                        yield SqlTx(cur, self._dialect)
                    except BaseException as exc:
                        error = exc
                        cur.execute("ROLLBACK TO tx")
                    cur.execute("RELEASE tx")
                finally:
                    self._owner = 0
                    cur.close()
            except BaseException as exc:
                # The savepoint could not be opened, released or rolled back: the batch's state
                # is unknown, so nothing in it may commit.
                if batch is not None:
                    self._abort_locked(batch, exc)
                raise
            wrote = self._conn.total_changes != before
            # Everyone waits for the COMMIT, even a failed body, when what it saw may include
            # uncommitted work: a reply must never rest on state that could still be lost. A
            # read-only body in a batch nobody has written to saw only committed rows.
            must_wait = wrote or batch.dirty
            batch.dirty = must_wait
            if must_wait:
                batch.members += 1
            if inline is not None:
                # Never COMMIT (fsync) on the event loop: the caller awaits the batch's COMMIT,
                # which the loop's flush hands to the committer thread.
                inline.flush = True
                if must_wait:
                    fut = inline.loop.create_future()
                    batch.waiters.append((inline.loop, fut))
                    inline.waits.append(fut)
                    must_wait = False
            else:
                with self._queued_lock:
                    last = self._queued == 0
                if last or batch.members >= MAX_BATCH:
                    self._commit_locked(batch)
        if must_wait:
            batch.done.wait()
            if batch.error is not None and error is None:
                raise batch.error
        if error is not None:
            raise error

    @contextmanager
    def _locked(self, inline: _Inline | None) -> Iterator[bool]:
        """Hold the connection lock; yields whether this transaction may still fall back.

        An inline call's first transaction does not wait for a thread that holds the lock (that
        thread's body, or its COMMIT's fsync, would stall the whole event loop): it raises
        _LockBusy and run_inline hands the call to a thread instead."""
        first_inline = False
        if inline is not None and not inline.started:
            inline.started = first_inline = True
            if not self._lock.acquire(blocking=False):
                with self._queued_lock:
                    self._queued -= 1
                raise _LockBusy
        else:
            self._lock.acquire()
        try:
            yield first_inline
        finally:
            self._lock.release()

    def _begin(self, may_fall_back: bool) -> None:
        """BEGIN IMMEDIATE, which takes the file's write lock. Another process may hold it (the
        Ray control loop's reaper writes the same file); an inline call must not sleep in
        SQLite's busy handler on the event loop, so it tries once and falls back to a thread."""
        if not may_fall_back:
            self._conn.execute("BEGIN IMMEDIATE")
            return
        self._conn.execute("PRAGMA busy_timeout = 0")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise _LockBusy from exc
            raise
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    async def run_inline(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` (which opens transactions here) on the calling event loop, then await the
        COMMIT covering its work: it returns, or raises, only once that work is durable."""
        loop = asyncio.get_running_loop()
        while self._committing is not None:
            # The connection is busy with a COMMIT: wait for it here rather than block the loop.
            await asyncio.wait([self._committing])
        call = _Inline(loop)
        token = _INLINE.set(call)
        error: BaseException | None = None
        try:
            result = fn(*args)
        except _LockBusy:
            # Another thread, or another process, holds the lock; nothing of fn has run yet, so
            # it can run again in a thread that may wait.
            self.inline_fallbacks += 1
            return await loop.run_in_executor(self._fallback_executor(), fn, *args)
        except BaseException as exc:  # re-raised below, once what it saw is durable
            error = exc
        finally:
            _INLINE.reset(token)
        if call.flush and not self._flush_queued:
            self._flush_queued = True
            loop.call_soon(self._flush, loop)
        commit_error: BaseException | None = None
        for fut in call.waits:
            try:
                await fut
            except Exception as exc:
                commit_error = commit_error or exc
        if error is not None:
            raise error
        if commit_error is not None:
            raise commit_error
        return result

    def _fallback_executor(self) -> ThreadPoolExecutor:
        if self._fallback is None:
            self._fallback = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sqlite-inline-busy")
        return self._fallback

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop, behind the requests that were ready: COMMIT the open batch off the loop."""
        self._flush_queued = False
        if self._committing is not None or self._batch is None:
            return  # a COMMIT is running (inline bodies wait for it) or a thread committed it
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-commit")
        committing = loop.run_in_executor(self._committer, self._commit_open)
        self._committing = committing

        def done(_: asyncio.Future[None]) -> None:
            if self._committing is committing:
                self._committing = None

        committing.add_done_callback(done)

    def _commit_open(self) -> None:
        """COMMIT whatever batch is open (on the committer thread); errors go to its members."""
        with self._lock:
            if self._batch is not None:
                self._commit_locked(self._batch)

    def _commit_locked(self, batch: _Batch) -> None:
        """COMMIT the open batch (the caller holds the lock) and wake its members."""
        self._batch = None
        try:
            self._conn.execute("COMMIT")
            self.commits += 1
            if batch.members:
                metrics.commit_batch(batch.members)
        except BaseException as exc:
            batch.error = exc
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        finally:
            batch.finish()

    def _abort_locked(self, batch: _Batch, exc: BaseException) -> None:
        """Roll the open batch back: every member that was waiting for it raises `exc`."""
        self._batch = None
        batch.error = exc
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        finally:
            batch.finish()

    def _settle_locked(self) -> None:
        """Commit a batch left open (none is, once every caller has returned)."""
        if self._batch is not None:
            self._commit_locked(self._batch)

    def migrate(self, target: int = 0) -> int:
        """Apply pending migrations in one write transaction (safe when processes race)."""
        with self._lock:
            self._settle_locked()
            # The version is read inside the write transaction (BEGIN IMMEDIATE takes the
            # file's write lock): two processes opening one file at once (the Ray control
            # loop and a front end do) would otherwise both see version 0 and the second
            # would fail with "table ... already exists".
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = self._conn.execute("SELECT MAX(version) AS v FROM schema_version").fetchone()
                current = int(row["v"] or 0)
                for version in range(current + 1, (target or LATEST) + 1):
                    for stmt in MIGRATIONS[version - 1]:
                        if isinstance(stmt, str):
                            self._conn.execute(stmt.format(bigint="INTEGER", float="REAL"))
                    self._conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return max(current, target or LATEST)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._settle_locked()
            self._conn.close()
        for pool in (self._committer, self._fallback):
            if pool is not None:
                pool.shutdown(wait=False)
