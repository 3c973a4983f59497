"""The change feed: one poll serves every subscriber, a subscriber sees what commits after it
joined, a stalled subscriber is dropped alone, and nothing polls while nobody watches."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from orchestrator import feed as feed_module
from orchestrator.domain import JobFilter, JobRecord, JobState, new_id
from orchestrator.feed import ChangeFeed, FeedClosed, FeedOverflow
from orchestrator.queries import Queries
from orchestrator.state import open_state


def _job(device: str) -> JobRecord:
    return JobRecord(job_id=new_id("job"), device_id=device, training={}, created_at=time.time())


def test_feed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed_module, "QUEUE_MAX", 5)
    state = open_state(f"sqlite:///{tmp_path / 'state.db'}")
    executor = ThreadPoolExecutor(4)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def run(fn: Any, *args: Any) -> Any:
            return await loop.run_in_executor(executor, fn, *args)

        feed = ChangeFeed(Queries(state, time.time), run, poll_s=0.02)

        def insert(*jobs: JobRecord) -> None:
            with state.transaction() as tx:
                tx.insert_jobs(list(jobs))

        insert(_job("before"))  # committed before anyone subscribed: nobody sees it
        async with feed.subscribe(JobFilter()) as every, feed.subscribe(JobFilter(device_id="b")) as only_b:
            async with feed.subscribe(JobFilter()) as stalled:
                a, b = _job("a"), _job("b")
                await run(insert, a, b)
                assert [(await every.next(5)).job_id for _ in range(2)] == [a.job_id, b.job_id]  # type: ignore[union-attr]
                assert (await only_b.next(5)).job_id == b.job_id  # type: ignore[union-attr]
                # `stalled` never reads: 6 changes behind (over 5) it is dropped, the others are not.
                more = [_job("a") for _ in range(4)]
                await run(insert, *more)
                for job in more:
                    assert (await every.next(5)).job_id == job.job_id  # type: ignore[union-attr]
                with pytest.raises(FeedOverflow):
                    async for _ in stalled:
                        pass
            assert await only_b.next(0.2) is None  # none of those were b's
            assert len(feed.subscribers) == 2
        # Nobody subscribed: the polling task ends, and no poll happens while nobody watches.
        await asyncio.sleep(0.1)
        polls = feed.polls
        await asyncio.sleep(0.2)
        assert feed.polls == polls
        async with feed.subscribe(JobFilter(states=(JobState.QUEUED,))) as again:
            late = _job("c")
            await run(insert, late)
            assert (await again.next(5)).job_id == late.job_id  # type: ignore[union-attr]
            await feed.close()
            with pytest.raises(FeedClosed):
                await again.next(5)
        with pytest.raises(FeedClosed):
            async with feed.subscribe(JobFilter()):
                pass

    try:
        asyncio.run(main())
    finally:
        executor.shutdown()
        state.close()
