"""Read-only views for operators and dashboards: jobs, devices, adapters, watches (campaigns and
rollouts are read through campaigns.py and rollouts.py).

Lists are keyset-paged: the page token is the last id of the previous page (jobs and adapters
newest first, devices by id). A watch follows the store's cursor over committed job changes, so
it sees the writes of every replica.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from orchestrator import validation
from orchestrator.domain import (
    AdapterRecord,
    DeviceRecord,
    DeviceSelector,
    JobEvent,
    JobFilter,
    JobRecord,
    ProgressPoint,
)
from orchestrator.errors import InvalidArgument, found
from orchestrator.state.base import StateStore, WatchCursor

T = TypeVar("T")


class Queries:
    """Operator reads."""

    def __init__(self, state: StateStore, clock: Callable[[], float]) -> None:
        self.state = state
        self.clock = clock

    def get_job(self, job_id: str) -> JobRecord:
        """One job."""
        validation.object_id(job_id, "job_id")
        with self.state.transaction() as tx:
            return found(tx.get_job(job_id), "job", job_id)

    def list_jobs(self, flt: JobFilter, page_size: int, page_token: str) -> tuple[list[JobRecord], str]:
        """A page of jobs, newest first."""
        size = validation.page_size(page_size)
        validation.optional_object_id(page_token, "page_token")
        check_filter(flt)
        with self.state.transaction() as tx:
            jobs = tx.list_jobs(flt, size + 1, page_token)
        return _page(jobs, size, lambda j: j.job_id)

    def job_history(self, job_id: str) -> tuple[JobRecord, list[JobEvent], list[ProgressPoint]]:
        """The job, its state changes and its recorded progress points, oldest first."""
        validation.object_id(job_id, "job_id")
        with self.state.transaction() as tx:
            job = found(tx.get_job(job_id), "job", job_id)
            events, points = tx.job_history(job_id)
        return job, events, points

    def watch_cursor(self) -> WatchCursor:
        """Where a watch starts: every change committed from now on comes after it."""
        with self.state.transaction() as tx:
            return tx.watch_cursor()

    def jobs_changed_after(
        self, cursor: WatchCursor, flt: JobFilter, limit: int = 500
    ) -> tuple[list[JobRecord], WatchCursor]:
        """Job changes committed after a watch cursor, and the cursor after them."""
        check_filter(flt)
        with self.state.transaction() as tx:
            return tx.jobs_changed_after(cursor, flt, limit)

    def get_device(self, device_id: str) -> DeviceRecord:
        """One device."""
        validation.device_id(device_id)
        with self.state.transaction() as tx:
            return found(tx.get_device(device_id), "device", device_id)

    def list_devices(self, selector: DeviceSelector, page_size: int, page_token: str) -> tuple[list[DeviceRecord], str]:
        """A page of devices matching the selector, ordered by id."""
        size = validation.page_size(page_size)
        validation.optional_device_id(page_token, "page_token")
        out: list[DeviceRecord] = []
        after = page_token
        with self.state.transaction() as tx:
            while len(out) <= size:
                batch = tx.list_devices(size + 1, after)
                out += [d for d in batch if selector.matches(d)]
                if len(batch) < size + 1:
                    break
                after = batch[-1].device_id
        return _page(out, size, lambda d: d.device_id)

    def get_adapter(self, adapter_id: str) -> AdapterRecord:
        """One adapter version."""
        validation.object_id(adapter_id, "adapter_id")
        with self.state.transaction() as tx:
            return found(tx.get_adapter(adapter_id), "adapter", adapter_id)

    def list_adapters(
        self, device_id: str, name: str, page_size: int, page_token: str
    ) -> tuple[list[AdapterRecord], str]:
        """A page of adapter versions, newest first."""
        size = validation.page_size(page_size)
        validation.optional_device_id(device_id, "device_id")
        if name and not validation.is_name(name):
            raise InvalidArgument("name", f"{name[:64]!r} is not an adapter name")
        validation.optional_object_id(page_token, "page_token")
        with self.state.transaction() as tx:
            adapters = tx.list_adapters(device_id, name, size + 1, page_token)
        return _page(adapters, size, lambda a: a.adapter_id)


def check_filter(flt: JobFilter) -> None:
    """Refuse malformed ids in a job filter."""
    validation.optional_device_id(flt.device_id, "filter.device_id")
    validation.optional_object_id(flt.campaign_id, "filter.campaign_id")


def _page(rows: list[T], size: int, key: Callable[[T], str]) -> tuple[list[T], str]:
    """The first `size` rows and the next page's token ("" when these were the last)."""
    return rows[:size], (key(rows[size - 1]) if len(rows) > size else "")
