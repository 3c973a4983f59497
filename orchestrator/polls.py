"""The poll seam: how the two calls every device makes all the time (Heartbeat, LeaseJob) reach
the store.

Polls dominate an orchestrator's load, so each backend runs them the fastest way it has, and
this module is the one place that knows which: `open_poll_runner` looks at the store it is
given and returns a runner. Servicers and the server only ever see a `PollRunner`.

- SQLite: on the event loop, inside the open group-commit batch; only the COMMIT goes to a
  thread (`SqliteStore.run_inline`), since a thread hop costs more CPU than the poll's SQL.
- PostgreSQL: one server-side function call per poll on an async connection
  (`state/pg_polls.py`), so a poll is one round trip and no thread.
- Anything else: the domain call on the executor's threads.
Whatever the path, the reply is sent only once what the poll wrote is durable, and the
semantics are those of lifecycle.JobLifecycle (tests/orchestrator/test_polls.py runs the same
cases through every runner).
"""

from __future__ import annotations

import abc
import asyncio
from concurrent.futures import Executor

from orchestrator.identity import DeviceCall
from orchestrator.lifecycle import HeartbeatInput, HeartbeatResult, JobLifecycle, LeaseResult
from orchestrator.state.base import StateStore
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


def open_poll_runner(state: StateStore, jobs: JobLifecycle, executor: Executor) -> PollRunner:
    """The fastest runner for this store."""
    if isinstance(state, SqliteStore):
        return InlinePolls(jobs, state)
    return ThreadPolls(jobs, executor)
