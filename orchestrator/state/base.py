"""The state-store contract: every backend passes tests/orchestrator/test_state_contract.py.

All reads and writes happen inside `StateStore.transaction()`. A transaction is atomic and
durable when the `with` block exits without an exception (the reply to a client is sent only
after that). Rows read with `for_update=True` stay locked (or, on SQLite, the whole database is
write-locked) until the transaction ends, so read-modify-write of a job is safe across threads,
processes and orchestrator replicas.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from orchestrator.access_records import (
    AuditEvent,
    AuditFilter,
    EnrollmentTokenRecord,
    OperatorRecord,
    OperatorTokenRecord,
)
from orchestrator.domain import (
    AdapterRecord,
    CampaignRecord,
    CampaignState,
    DeviceRecord,
    GatePolicyRecord,
    JobEvent,
    JobFilter,
    JobRecord,
    ProgressPoint,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
)

# Where a watch stands: (a backend-defined order key, the last job id at that key).
WatchCursor = tuple[int, str]


class Tx(abc.ABC):
    """Operations available inside one transaction."""

    # --- jobs ---
    @abc.abstractmethod
    def insert_job(self, job: JobRecord) -> None:
        """Insert a new job; AlreadyExists if its id or non-empty request_id is taken."""

    def insert_jobs(self, jobs: list[JobRecord]) -> None:
        """Insert many new jobs at once (campaign fan-out, seeding); AlreadyExists as insert_job."""
        for job in jobs:
            self.insert_job(job)

    @abc.abstractmethod
    def get_job(self, job_id: str, *, for_update: bool = False) -> JobRecord | None:
        """Return the job, or None."""

    @abc.abstractmethod
    def get_job_by_request(self, request_id: str) -> JobRecord | None:
        """Return the job submitted with this idempotency key, or None."""

    @abc.abstractmethod
    def save_job(self, job: JobRecord) -> None:
        """Write back a job read in this transaction; assigns it a new change_seq."""

    @abc.abstractmethod
    def insert_campaign_job(self, job: JobRecord) -> bool:
        """Insert a campaign's job unless that campaign already has a job for that device
        (False then): one job per device per campaign, whoever inserts concurrently."""

    @abc.abstractmethod
    def campaign_devices(self, campaign_id: str, device_ids: list[str]) -> set[str]:
        """Those of the devices that already have a job of the campaign."""

    @abc.abstractmethod
    def claimable_jobs(self, device_id: str, now: float, limit: int) -> list[JobRecord]:
        """QUEUED jobs of a device whose backoff has passed, oldest first, locked for update.
        Jobs of a PAUSED campaign are not claimable.

        On PostgreSQL rows locked by another replica's transaction are skipped, so two
        replicas never hand out the same job.
        """

    @abc.abstractmethod
    def expired_jobs(self, now: float, limit: int) -> list[JobRecord]:
        """Leased jobs whose lease expired, or unfinished jobs past their deadline, locked."""

    @abc.abstractmethod
    def list_jobs(self, flt: JobFilter, limit: int, before_job_id: str = "") -> list[JobRecord]:
        """Jobs matching the filter, newest first, with ids below before_job_id when given."""

    def iter_jobs(self, flt: JobFilter) -> Iterator[JobRecord]:
        """Every job matching the filter, newest first, paged inside this transaction."""
        return every_row(lambda n, before: self.list_jobs(flt, n, before), _job_key)

    @abc.abstractmethod
    def watch_cursor(self) -> WatchCursor:
        """Where a watch starts: every change committed from now on sorts after it."""

    @abc.abstractmethod
    def jobs_changed_after(
        self, cursor: WatchCursor, flt: JobFilter, limit: int
    ) -> tuple[list[JobRecord], WatchCursor]:
        """Committed job changes after the cursor, in cursor order, and the cursor after them.

        A change committed later never sorts before a cursor handed out earlier, so a watcher
        that follows the cursors misses nothing, whatever order concurrent writers commit in
        (a job changed twice in between is seen once, in its latest state).
        """

    @abc.abstractmethod
    def max_change_seq(self) -> int:
        """The highest change_seq of any job (0 when there are none)."""

    @abc.abstractmethod
    def count_jobs_by_state(self, campaign_id: str = "") -> dict[str, int]:
        """Number of jobs in each state (of one campaign when given)."""

    # --- history (written by save_job in the same transaction) and dashboard aggregates ---
    @abc.abstractmethod
    def job_history(self, job_id: str) -> tuple[list[JobEvent], list[ProgressPoint]]:
        """The job's recorded state changes (oldest first) and progress points (by attempt, step).

        save_job records an event whenever a job's state or attempt differs from what this
        transaction read, and a progress point whenever its step enters a new bucket of the
        attempt (a bounded sample: state/history.py)."""

    @abc.abstractmethod
    def finished_per_minute(self, since: float) -> dict[int, tuple[int, int]]:
        """Jobs that ended since `since`, per minute (UNIX seconds // 60): (succeeded, failed or cancelled)."""

    @abc.abstractmethod
    def queued_by_base_model(self) -> dict[str, int]:
        """QUEUED jobs by the base model they need (the largest few; the rest under "other")."""

    @abc.abstractmethod
    def adapter_sync_counts(self, online_since: float) -> dict[str, int]:
        """Devices by adapter convergence: CONVERGED, REFUSED, OFFLINE or PENDING."""

    @abc.abstractmethod
    def count_failures_by_class(self, campaign_id: str) -> dict[str, int]:
        """A campaign's FAILED jobs counted by the class of their last error."""

    # --- campaigns ---
    @abc.abstractmethod
    def insert_campaign(self, campaign: CampaignRecord) -> None:
        """Insert a campaign; AlreadyExists if its request_id is taken."""

    @abc.abstractmethod
    def save_campaign(self, campaign: CampaignRecord) -> None:
        """Write back a campaign read in this transaction."""

    @abc.abstractmethod
    def get_campaign(self, campaign_id: str, *, for_update: bool = False) -> CampaignRecord | None:
        """Return the campaign, or None."""

    @abc.abstractmethod
    def list_campaigns(
        self, limit: int, before_campaign_id: str = "", states: tuple[CampaignState, ...] = ()
    ) -> list[CampaignRecord]:
        """Campaigns newest first (in one of `states` when given), ids below before_campaign_id."""

    @abc.abstractmethod
    def get_campaign_by_request(self, request_id: str) -> CampaignRecord | None:
        """Return the campaign submitted with this idempotency key, or None."""

    # --- devices ---
    @abc.abstractmethod
    def upsert_device(self, device: DeviceRecord) -> None:
        """Insert or replace a device."""

    def insert_devices(self, devices: list[DeviceRecord]) -> None:
        """Insert many new devices at once (bulk enrollment, seeding); AlreadyExists on a taken id."""
        for device in devices:
            self.upsert_device(device)

    @abc.abstractmethod
    def update_device(self, device_id: str, values: dict[str, Any]) -> bool:
        """Set only the named fields of a device (values as DeviceRecord holds them); False when
        there is no such device.

        No lock is needed first: the fields not named are left as they are, so a concurrent
        writer of other fields (an activation, a re-enroll) never loses its update.
        """

    @abc.abstractmethod
    def get_device(self, device_id: str, *, for_update: bool = False) -> DeviceRecord | None:
        """Return the device, or None."""

    @abc.abstractmethod
    def list_devices(self, limit: int, after_device_id: str = "") -> list[DeviceRecord]:
        """Devices ordered by id, with ids above after_device_id when given."""

    def iter_devices(self) -> Iterator[DeviceRecord]:
        """Every device by id, paged inside this transaction."""
        return every_row(self.list_devices, _device_key)

    @abc.abstractmethod
    def list_devices_changed(self, since: float, limit: int, after_device_id: str = "") -> list[DeviceRecord]:
        """Devices whose profile (labels, capabilities) was written at or after `since`, by id."""

    def iter_devices_changed(self, since: float) -> Iterator[DeviceRecord]:
        """Every device changed at or after `since`, by id, paged inside this transaction."""
        return every_row(lambda n, after: self.list_devices_changed(since, n, after), _device_key)

    @abc.abstractmethod
    def get_devices(self, device_ids: list[str]) -> list[DeviceRecord]:
        """The devices among these ids that exist, in no particular order."""

    @abc.abstractmethod
    def fleet_counts(self) -> tuple[int, int]:
        """(enrolled devices, QUEUED jobs): what pace steering sizes intervals by."""

    @abc.abstractmethod
    def count_devices_by_reason(self, online_since: float) -> tuple[dict[str, int], int, int]:
        """(devices by eligibility reason, device count, devices seen since online_since)."""

    @abc.abstractmethod
    def delete_device(self, device_id: str) -> bool:
        """Forget a device; False when there was none."""

    # --- enrollment tokens ---
    @abc.abstractmethod
    def insert_enrollment_token(self, token: EnrollmentTokenRecord) -> None:
        """Store a new enrollment token (hashed); AlreadyExists on a taken id or hash."""

    @abc.abstractmethod
    def get_enrollment_token(self, token_hash: str, *, for_update: bool = False) -> EnrollmentTokenRecord | None:
        """The enrollment token with this hash, or None."""

    @abc.abstractmethod
    def list_enrollment_tokens(self, limit: int, after_token_id: str = "") -> list[EnrollmentTokenRecord]:
        """Enrollment tokens ordered by id."""

    @abc.abstractmethod
    def update_enrollment_token(self, token_id: str, values: dict[str, Any]) -> bool:
        """Set named fields (uses, revoked_at) of a token; False when there is none."""

    # --- operators ---
    @abc.abstractmethod
    def insert_operator(self, operator: OperatorRecord) -> None:
        """Store a new operator; AlreadyExists on a taken name."""

    @abc.abstractmethod
    def get_operator(self, name: str) -> OperatorRecord | None:
        """The operator, or None."""

    @abc.abstractmethod
    def list_operators(self) -> list[OperatorRecord]:
        """Every operator, by name (operators are few)."""

    @abc.abstractmethod
    def insert_operator_token(self, token: OperatorTokenRecord) -> None:
        """Store a new operator token (hashed); AlreadyExists on a taken id or hash."""

    @abc.abstractmethod
    def get_operator_token(self, token_hash: str) -> OperatorTokenRecord | None:
        """The operator token with this hash, or None."""

    @abc.abstractmethod
    def list_operator_tokens(self, operator: str, limit: int, after_token_id: str = "") -> list[OperatorTokenRecord]:
        """Tokens (of one operator when given), ordered by id."""

    @abc.abstractmethod
    def revoke_operator_token(self, token_id: str, at: float) -> bool:
        """Mark a token revoked; False when there is none."""

    # --- audit ---
    @abc.abstractmethod
    def append_audit(self, event: AuditEvent) -> None:
        """Append an audit event (in the transaction of the change it records)."""

    @abc.abstractmethod
    def list_audit(self, flt: AuditFilter, limit: int, before_event_id: str = "") -> list[AuditEvent]:
        """Audit events matching the filter, newest first."""

    # --- adapters ---
    @abc.abstractmethod
    def insert_adapter(self, adapter: AdapterRecord) -> None:
        """Register an adapter version; AlreadyExists on a (device, name, version) clash."""

    @abc.abstractmethod
    def get_adapter(self, adapter_id: str) -> AdapterRecord | None:
        """Return the adapter, or None."""

    @abc.abstractmethod
    def latest_adapter_version(self, device_id: str, name: str) -> int:
        """Highest version of (device, name), 0 when none."""

    @abc.abstractmethod
    def list_adapters(self, device_id: str, name: str, limit: int, before_adapter_id: str = "") -> list[AdapterRecord]:
        """Adapters newest first, filtered by device and name when given."""

    @abc.abstractmethod
    def adapter_count(self) -> int:
        """Number of registered adapter versions."""

    @abc.abstractmethod
    def referenced_blob_keys(self) -> set[str]:
        """Blob keys referenced by any adapter version (for garbage collection)."""

    @abc.abstractmethod
    def delete_adapter(self, adapter_id: str) -> None:
        """Forget an adapter version (garbage collection of superseded versions); idempotent."""

    @abc.abstractmethod
    def get_adapters(self, adapter_ids: list[str]) -> list[AdapterRecord]:
        """The adapters among these ids that exist, in no particular order."""

    # --- rollouts ---
    @abc.abstractmethod
    def insert_rollout(self, rollout: RolloutRecord) -> None:
        """Insert a rollout; AlreadyExists if its non-empty request_id is taken."""

    @abc.abstractmethod
    def save_rollout(self, rollout: RolloutRecord) -> None:
        """Write back a rollout read in this transaction."""

    @abc.abstractmethod
    def get_rollout(self, rollout_id: str, *, for_update: bool = False) -> RolloutRecord | None:
        """Return the rollout, or None."""

    @abc.abstractmethod
    def get_rollout_by_request(self, request_id: str) -> RolloutRecord | None:
        """Return the rollout started with this idempotency key, or None."""

    @abc.abstractmethod
    def list_rollouts(
        self, campaign_id: str, states: tuple[RolloutState, ...], limit: int, before_rollout_id: str = ""
    ) -> list[RolloutRecord]:
        """Rollouts newest first, filtered by campaign and states when given."""

    @abc.abstractmethod
    def insert_rollout_targets(self, targets: list[RolloutTarget]) -> None:
        """Add devices to a rollout; AlreadyExists when a device is in it already."""

    @abc.abstractmethod
    def save_rollout_target(self, target: RolloutTarget) -> None:
        """Write back a rollout's device."""

    @abc.abstractmethod
    def list_rollout_targets(self, rollout_id: str, limit: int, after_device_id: str = "") -> list[RolloutTarget]:
        """A rollout's devices by device id."""

    def iter_rollout_targets(self, rollout_id: str) -> Iterator[RolloutTarget]:
        """Every device of a rollout, by device id, paged inside this transaction."""
        return every_row(lambda n, after: self.list_rollout_targets(rollout_id, n, after), _target_key)

    # --- gate policies ---
    @abc.abstractmethod
    def put_gate_policy(self, policy: GatePolicyRecord) -> None:
        """Create or replace the named gate policy."""

    @abc.abstractmethod
    def delete_gate_policy(self, name: str) -> bool:
        """Remove the named gate policy; False when there was none."""

    @abc.abstractmethod
    def list_gate_policies(self) -> list[GatePolicyRecord]:
        """Every gate policy, by (priority, name)."""


class StateStore(abc.ABC):
    """A durable store of jobs, devices, campaigns and adapters."""

    url: str
    # How many threads blocking calls into this store are worth: more only queue where the
    # backend serialises writers anyway.
    worker_threads = 8

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[Tx]:
        """Open a transaction; commits on normal exit, rolls back on an exception."""

    @abc.abstractmethod
    def migrate(self, target: int = 0) -> int:
        """Bring the schema to `target` (default: the latest version); return the version now.
        Never goes down: a newer schema is left as it is."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""

    def iter_all_jobs(self, flt: JobFilter) -> Iterator[JobRecord]:
        """Every job matching the filter, newest first, a transaction per page (tools, tests)."""
        return every_row(lambda n, before: self._page(lambda tx: tx.list_jobs(flt, n, before)), _job_key)

    def iter_all_devices(self) -> Iterator[DeviceRecord]:
        """Every device by id, a transaction per page."""
        return every_row(lambda n, after: self._page(lambda tx: tx.list_devices(n, after)), _device_key)

    def iter_all_adapters(self) -> Iterator[AdapterRecord]:
        """Every adapter version, newest first, a transaction per page."""
        return every_row(lambda n, before: self._page(lambda tx: tx.list_adapters("", "", n, before)), _adapter_key)

    def _page(self, read: Callable[[Tx], list[T]]) -> list[T]:
        with self.transaction() as tx:
            return read(tx)


T = TypeVar("T")
PAGE = 1000


def every_row(fetch: Callable[[int, str], list[T]], key: Callable[[T], str], page: int = PAGE) -> Iterator[T]:
    """Every row of a keyset-paged listing, `page` rows at a time.

    `fetch(limit, after)` returns up to `limit` rows that follow the row whose key is `after`
    ("" for the first page), in the listing's order; `key(row)` is that row's key.
    """
    after = ""
    while True:
        batch = fetch(page, after)
        yield from batch
        if len(batch) < page:
            return
        after = key(batch[-1])


def _job_key(job: JobRecord) -> str:
    return job.job_id


def _device_key(device: DeviceRecord) -> str:
    return device.device_id


def _adapter_key(adapter: AdapterRecord) -> str:
    return adapter.adapter_id


def _target_key(target: RolloutTarget) -> str:
    return target.device_id
