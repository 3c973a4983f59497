"""One change feed per orchestrator process: a single task follows the store's watch cursor and
fans each committed job change out to every subscriber (gRPC WatchJobs, the HTTP event stream).

Without it every watcher polled the store on its own, so the cost of watching grew with the
number of open dashboards; with it a replica polls once per interval whatever the number of
watchers. The poll follows the store's cursor over committed changes, so subscribers see the
writes of every replica (orchestrator/queries.py), and a subscriber sees every change committed
after `subscribe` returned. The task runs only while someone is subscribed.

Subscribers that follow one device are indexed by its id, so a change is offered only to the
subscribers that can want it (the fleet-wide ones and that device's), and each change is encoded
(e.g. into a WatchJobsResponse) once for all the subscribers that share an encoder. Long
batches give the event loop back every few changes, so polls are not held up by a fan-out.

Each subscriber has a bounded queue; one that falls that far behind (a stalled client) is
dropped with `FeedOverflow` instead of holding the others back or growing without bound, and
its client reconnects. `admit` is the one place that decides whether a new subscriber is taken
(a per-operator cap belongs there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from orchestrator.domain import JobFilter, JobRecord
from orchestrator.errors import ResourceExhausted, Unavailable
from orchestrator.queries import Queries, check_filter
from orchestrator.state.base import WatchCursor

log = logging.getLogger("pocketlora.orchestrator")

# Turns a changed job into what a subscriber yields; shared encoders run once per change.
Encoder = Callable[[JobRecord], Any]

T = TypeVar("T")
# Runs a blocking domain call off the event loop (the servers' executor).
Runner = Callable[..., Awaitable[Any]]

# Between polls changes pile up, and each poll's fan-out runs as one burst of stream writes that
# unary calls queue behind: at 0.25 s a heartbeat's p99 went 16 -> 41 ms under 2,000 streams
# (benchmarks/watch_load.py, 100 poll pairs/s), at 0.1 s 15 -> 25 ms. A poll is one indexed read.
POLL_S = 0.1
BATCH = 500
QUEUE_MAX = 10_000
# Changes fanned out between two yields to the event loop.
FAN_OUT_SLICE = 50


class FeedOverflow(ResourceExhausted):
    """A subscriber fell too far behind and was dropped; it should watch again."""


class FeedClosed(Unavailable):
    """The server is stopping."""


class Subscription:
    """One subscriber's view of the feed: an async iterator of the changes that match, each as
    its encoder made it (the JobRecord itself without one)."""

    def __init__(self, feed: ChangeFeed, flt: JobFilter, encode: Encoder | None = None) -> None:
        self.feed = feed
        self.filter = flt
        self.encode = encode
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.dropped = False

    def offer(self, job: JobRecord, encoded: dict[Encoder, Any]) -> None:
        """Queue a change (on the feed's task); `encoded` holds this change's encodings so far."""
        if self.dropped or not self.filter.matches(job):
            return
        if self.queue.qsize() >= QUEUE_MAX:
            self.dropped = True
            self.queue.put_nowait(FeedOverflow(f"watch fell more than {QUEUE_MAX} changes behind; watch again"))
            return
        if self.encode is None:
            self.queue.put_nowait(job)
            return
        if self.encode not in encoded:
            encoded[self.encode] = self.encode(job)
        self.queue.put_nowait(encoded[self.encode])

    def close(self, reason: BaseException) -> None:
        """End the subscription with `reason` once queued changes are consumed."""
        if not self.dropped:
            self.dropped = True
            self.queue.put_nowait(reason)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def next(self, timeout: float) -> Any:
        """The next change, or None after `timeout` seconds without one (for keep-alives)."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


class ChangeFeed:
    """Follows committed job changes for every subscriber of this process."""

    def __init__(self, queries: Queries, run: Runner, *, poll_s: float = POLL_S) -> None:
        self.queries = queries
        self.run = run
        self.poll_s = poll_s
        self.subscribers: set[Subscription] = set()
        self._wide: set[Subscription] = set()  # filters naming no device
        self._by_device: dict[str, set[Subscription]] = {}
        self.polls = 0  # store polls made (tests check that watchers share them)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def admit(self, flt: JobFilter) -> None:
        """Refuse a subscription that may not be taken (raises an OrchestratorError)."""
        check_filter(flt)
        if self._closed:
            raise FeedClosed("the orchestrator is stopping")

    @contextlib.asynccontextmanager
    async def subscribe(self, flt: JobFilter, encode: Encoder | None = None) -> AsyncIterator[Subscription]:
        """A subscription for the body of the `async with`; every change committed after entry
        that matches `flt` is delivered, in commit order, as `encode` makes it."""
        self.admit(flt)
        sub = Subscription(self, flt, encode)
        self.subscribers.add(sub)
        group = self._by_device.setdefault(flt.device_id, set()) if flt.device_id else self._wide
        group.add(sub)
        try:
            if self._task is None or self._task.done():
                # The cursor is read before the first subscriber is told it is subscribed, so
                # nothing committed after that is missed.
                cursor = await self.run(self.queries.watch_cursor)
                if self._task is None or self._task.done():
                    self._task = asyncio.get_running_loop().create_task(self._follow(cursor))
            yield sub
        finally:
            self.subscribers.discard(sub)
            group.discard(sub)
            if flt.device_id and not group:
                self._by_device.pop(flt.device_id, None)

    async def _follow(self, cursor: WatchCursor) -> None:
        """Poll the store while anyone is subscribed, handing each change to every subscriber."""
        everything = JobFilter()
        while self.subscribers and not self._closed:
            try:
                changed, cursor = await self.run(self.queries.jobs_changed_after, cursor, everything, BATCH)
            except Exception:
                log.exception("change feed: reading job changes failed; retrying")
                await asyncio.sleep(max(self.poll_s, 1.0))
                continue
            self.polls += 1
            for n, job in enumerate(changed, 1):
                encoded: dict[Encoder, Any] = {}
                for sub in [*self._wide, *self._by_device.get(job.device_id, ())]:
                    sub.offer(job, encoded)
                if n % FAN_OUT_SLICE == 0:
                    await asyncio.sleep(0)
            if len(changed) < BATCH:
                await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        """End every subscription and the polling task."""
        self._closed = True
        for sub in list(self.subscribers):
            sub.close(FeedClosed("the orchestrator is stopping"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
