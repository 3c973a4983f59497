"""The poll seam: how the two calls every device makes all the time (Heartbeat, LeaseJob) reach
the store.

Polls dominate an orchestrator's load, so each backend runs them the fastest way it has, and
this module is the one place that knows which: `open_poll_runner` looks at the store it is
given and returns a runner. Servicers and the server only ever see a `PollRunner`.

- SQLite: on the event loop, inside the open group-commit batch; only the COMMIT goes to a
  thread (`SqliteStore.run_inline`), since a thread hop costs more CPU than the poll's SQL.
- PostgreSQL: one server-side function call per poll on an async connection
  (`state/pg_functions.py`), so a poll is one round trip and no thread.
- Anything else: the domain call on the executor's threads.
Whatever the path, the reply is sent only once what the poll wrote is durable, and the
semantics are those of lifecycle.JobLifecycle (tests/orchestrator/test_polls.py runs the same
cases through every runner).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

import psycopg

from orchestrator import metrics
from orchestrator.domain import DeviceRecord, JobState, Progress
from orchestrator.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from orchestrator.identity import DeviceCall, check_certificate, hash_secret, require_device
from orchestrator.lifecycle import JobLifecycle
from orchestrator.reports import HeartbeatInput, HeartbeatResult, LeaseResult, validate_heartbeat
from orchestrator.state.base import StateStore
from orchestrator.state.pg_functions import ILLEGAL_TRANSITION
from orchestrator.state.postgres import PostgresStore
from orchestrator.state.sql import progress_json, row_to_adapter, row_to_job
from orchestrator.state.sqlite import SqliteStore


class PollRunner(abc.ABC):
    """Runs device polls; returns only once what they wrote is durable."""

    @abc.abstractmethod
    async def heartbeat(self, call: DeviceCall, hb: HeartbeatInput) -> HeartbeatResult:
        """JobLifecycle.heartbeat, the backend's fastest way."""

    @abc.abstractmethod
    async def lease(self, call: DeviceCall) -> LeaseResult:
        """JobLifecycle.lease, the backend's fastest way."""

    async def close(self) -> None:  # noqa: B027 - most runners hold nothing
        """Release what the runner holds (connections)."""


class ThreadPolls(PollRunner):
    """The domain calls on an executor's threads (any store)."""

    def __init__(self, jobs: JobLifecycle, executor: Executor) -> None:
        self.jobs = jobs
        self.executor = executor

    async def heartbeat(self, call: DeviceCall, hb: HeartbeatInput) -> HeartbeatResult:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.jobs.heartbeat, call, hb)

    async def lease(self, call: DeviceCall) -> LeaseResult:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.jobs.lease, call)


class InlinePolls(PollRunner):
    """The domain calls on the event loop, in SQLite's group-commit batch."""

    def __init__(self, jobs: JobLifecycle, store: SqliteStore) -> None:
        self.jobs = jobs
        self.store = store

    async def heartbeat(self, call: DeviceCall, hb: HeartbeatInput) -> HeartbeatResult:
        return await self.store.run_inline(self.jobs.heartbeat, call, hb)

    async def lease(self, call: DeviceCall) -> LeaseResult:
        return await self.store.run_inline(self.jobs.lease, call)


# ---------------------------------------------------------------------------- PostgreSQL
# Through the generic path a lease or heartbeat is BEGIN, a device read, a job read or claim,
# the writes and COMMIT: six round trips, each blocking a thread. Here each poll is one
# statement, `SELECT * FROM pocketlora_lease(...)` or `pocketlora_heartbeat(...)`
# (state/pg_functions.py), run in autocommit on a small pool of async connections driven by the
# server's event loop: one round trip, no thread hop, durable when the statement returns. What
# the functions cannot decide alone goes to the generic path on a thread: a request naming
# another device, a job that may not fit the device (placement records why), a malformed
# heartbeat from a caller not yet authenticated.

_EMPTY_PROGRESS = progress_json(Progress())
# Outcomes the Python path decides: a job that may not fit (placement records why), and a
# credential the function does not know (wrong, revoked, or a rotated one on its first use,
# which the Python path promotes).
_GENERIC = ("slow", "unauthenticated")
# Parameters are typed in the statement so that a NULL or a large number never leaves
# PostgreSQL guessing which function is meant.
_LEASE = (
    "SELECT outcome, job_json FROM pocketlora_lease(%s::text, %s::text, %s::float8, %s::float8, %s::float8, %s::text)"
)
_HEARTBEAT = (
    "SELECT outcome, lease_expires_at, adapter_json, device_labels, device_caps FROM pocketlora_heartbeat("
    "%s::text, %s::text, %s::float8, %s::float8, %s::float8, %s::text, %s::bigint, %s::text, %s::text,"
    " %s::text, %s::text, %s::boolean, %s::text, %s::text, %s::text, %s::bigint, %s::text)"
)
_FLEET = "SELECT (SELECT COUNT(*) FROM devices) AS d, (SELECT COUNT(*) FROM jobs WHERE state = 'QUEUED') AS q"
# Connections per replica. Each poll that writes waits for its commit's WAL flush; PostgreSQL
# flushes the commits of every backend waiting at that moment together, so more connections in
# flight mean more polls per flush.
POOL_SIZE = 16


def _drop(conn: psycopg.AsyncConnection[Any] | None) -> psycopg.AsyncConnection[Any] | None:
    """Close a connection that cannot be reused (synchronously: this may run while cancelled);
    returns None, its replacement in the idle queue (the next taker reconnects)."""
    if conn is not None:
        conn.pgconn.finish()
    return None


class AsyncConnections:
    """A fixed set of autocommit async connections, opened on first use in the running loop.

    Leaner than a general pool (no health checks, no resizing): a poll takes an idle
    connection, runs one statement, and gives it back; a connection that broke is replaced by
    the next caller that gets it.
    """

    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self.size = size
        self._idle: asyncio.Queue[psycopg.AsyncConnection[Any] | None] | None = None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """An idle connection for one statement."""
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self.size):
                self._idle.put_nowait(None)  # opened by whoever takes it first
        conn = await self._idle.get()
        try:
            if conn is None or conn.closed:
                conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            yield conn
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError):  # the connection broke
                conn = _drop(conn)
            raise
        except BaseException:
            # Cancelled mid-statement (the client went away): the protocol state is unknown.
            conn = _drop(conn)
            raise
        finally:
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        """Close every idle connection."""
        while self._idle is not None and not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                await conn.close()


class PgPolls(PollRunner):
    """Polls as single statements on async connections; the rest through the generic path."""

    def __init__(self, jobs: JobLifecycle, store: PostgresStore, executor: Executor) -> None:
        self.jobs = jobs
        self.identity = jobs.identity
        self.config = jobs.config
        self.clock = jobs.clock
        self.fallback = ThreadPolls(jobs, executor)
        self.executor = executor
        self._conns = AsyncConnections(store.url, POOL_SIZE)

    async def _one(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...]:
        async with self._conns.connection() as conn:
            try:
                cur = await conn.execute(sql, params)
            except psycopg.Error as exc:
                if exc.sqlstate == ILLEGAL_TRANSITION:
                    raise FailedPrecondition(exc.diag.message_primary or "illegal transition") from None
                raise
            row = await cur.fetchone()
        assert row is not None  # both functions return exactly one row
        return tuple(row)

    def _cred_hash(self, call: DeviceCall) -> str | None:
        """None when the cache vouches for the caller; else the hash the function checks."""
        if not call.device_id or not call.credential:
            raise Unauthenticated("device id and credential metadata are required")
        check_certificate(call.device_id, call.certified)
        return None if self.identity.vouched(call) else hash_secret(call.credential)

    def _admitted(self, call: DeviceCall, cred_hash: str | None, outcome: str) -> None:
        """Raise for the function's refusals; remember a credential it accepted."""
        if outcome == "no_device":
            require_device(None, call.device_id)
        if cred_hash is not None:
            self.identity.remember(call.device_id, cred_hash)

    async def _fleet(self) -> None:
        if self.jobs.fleet.due():
            devices, queued = await self._one(_FLEET, ())
            self.jobs.fleet.update(int(devices), int(queued))

    async def lease(self, call: DeviceCall) -> LeaseResult:
        if call.claimed and call.claimed != call.device_id:
            return await self.fallback.lease(call)
        cred_hash = self._cred_hash(call)
        now = self.clock()
        params = (call.device_id, cred_hash, now, self.config.lease_s, self.config.last_seen_write_s, _EMPTY_PROGRESS)
        outcome, job_json = await self._one(_LEASE, params)
        if outcome in _GENERIC:
            return await self.fallback.lease(call)
        self._admitted(call, cred_hash, outcome)
        if outcome == "leased":
            metrics.transition(JobState.LEASED.value)
        await self._fleet()
        return self.jobs.lease_reply(row_to_job(json.loads(job_json)) if job_json else None, now)

    async def heartbeat(self, call: DeviceCall, hb: HeartbeatInput) -> HeartbeatResult:
        if call.claimed and call.claimed != call.device_id:
            return await self.fallback.heartbeat(call, hb)
        cred_hash = self._cred_hash(call)
        try:
            validate_heartbeat(hb)
        except InvalidArgument:
            return await self.fallback.heartbeat(call, hb)  # authenticates, then refuses
        now = self.clock()
        params = (
            call.device_id,
            cred_hash,
            now,
            self.config.lease_s,
            self.config.last_seen_write_s,
            hb.running_job_id,
            hb.running_epoch,  # validate_heartbeat capped it to the column's range
            hb.running_state.value if hb.running_state is not None else None,
            progress_json(hb.progress) if hb.progress is not None else None,
            hb.eligibility_reason,
            json.dumps(hb.power, sort_keys=True),
            hb.eligible,
            hb.eligibility_reason,
            hb.eligibility_detail,
            hb.active_adapter_id,
            hb.free_storage_bytes,
            json.dumps(hb.adapter_refusals, sort_keys=True),
        )
        outcome, expires, adapter_json, labels, caps = await self._one(_HEARTBEAT, params)
        if outcome in _GENERIC:
            return await self.fallback.heartbeat(call, hb)
        self._admitted(call, cred_hash, outcome)
        await self._fleet()
        desired = row_to_adapter(json.loads(adapter_json)) if adapter_json else None
        cancel = [hb.running_job_id] if outcome == "cancel" else []
        stale = [hb.running_job_id] if outcome == "stale" else []
        if stale:
            metrics.fenced_report("heartbeat")
        policy, names = await self._gate_policy(call.device_id, labels, caps)
        pace = self.jobs.pace(running=bool(hb.running_job_id))
        return HeartbeatResult(cancel, desired, float(expires), pace, stale, policy, names)

    async def _gate_policy(self, device_id: str, labels: str, caps: str) -> tuple[dict[str, Any], list[str]]:
        """The fleet's gate policy for the device (policies re-read on a thread when stale)."""
        policies = self.jobs.policies
        if policies.stale():
            await asyncio.get_running_loop().run_in_executor(self.executor, policies.refresh)
        if not policies.any():
            return {}, []
        return policies.match(DeviceRecord(device_id, "", json.loads(caps), json.loads(labels)))

    async def close(self) -> None:
        await self._conns.close()


def open_poll_runner(state: StateStore, jobs: JobLifecycle, executor: Executor) -> PollRunner:
    """The fastest runner for this store."""
    if isinstance(state, SqliteStore):
        return InlinePolls(jobs, state)
    if isinstance(state, PostgresStore):
        return PgPolls(jobs, state, executor)
    return ThreadPolls(jobs, executor)
