"""One SQL implementation of the state contract; sqlite.py and postgres.py supply the dialect."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from orchestrator.domain import (
    AdapterRecord,
    CampaignState,
    DeviceRecord,
    JobFilter,
    JobRecord,
    JobState,
    Progress,
)
from orchestrator.errors import AlreadyExists
from orchestrator.state.base import Tx, WatchCursor
from orchestrator.state.history import HistoryTx
from orchestrator.state.sql_access import AccessSql
from orchestrator.state.sql_base import Dialect
from orchestrator.state.sql_fleet import FleetSql

_JSON_DEVICE = {"capabilities", "labels", "power", "adapter_history", "reported_labels", "adapter_refusals"}
_HELD = [JobState.LEASED.value, JobState.RUNNING.value, JobState.PAUSED.value, JobState.UPLOADING.value]
_OPEN = [*_HELD, JobState.QUEUED.value]


# Shallow field copies: dataclasses.asdict deep-copies every nested dict and list, and that
# was the largest CPU cost of a poll once the commit stopped dominating. The nested values are
# serialised to JSON right away, so nothing shares them.
_JOB_FIELDS = tuple(f.name for f in fields(JobRecord))
_DEVICE_FIELDS = tuple(f.name for f in fields(DeviceRecord))


def _job_to_row(job: JobRecord) -> dict[str, Any]:
    row = {name: getattr(job, name) for name in _JOB_FIELDS}
    row["state"] = job.state.value
    row["training"] = json.dumps(job.training, sort_keys=True)
    row["progress"] = progress_json(job.progress)
    row["request_id"] = job.request_id or None  # NULLs never clash in the unique index
    return row


def progress_json(progress: Progress) -> str:
    """A job's progress as its column holds it."""
    return json.dumps(vars(progress))


def row_to_job(row: dict[str, Any]) -> JobRecord:
    """A jobs row (from a cursor or row_to_json) as the record."""
    row = dict(row)
    row.pop("change_xid", None)  # the watch cursor's, not the job's
    row["state"] = JobState(row["state"])
    row["training"] = json.loads(row["training"])
    row["progress"] = Progress(**json.loads(row["progress"]))
    row["request_id"] = row["request_id"] or ""
    return JobRecord(**row)


def _device_to_row(device: DeviceRecord) -> dict[str, Any]:
    row = {name: getattr(device, name) for name in _DEVICE_FIELDS}
    for key in _JSON_DEVICE:
        row[key] = json.dumps(row[key], sort_keys=True)
    row["eligible"] = int(device.eligible)
    return row


def _row_to_device(row: dict[str, Any]) -> DeviceRecord:
    row = dict(row)
    for key in _JSON_DEVICE:
        row[key] = json.loads(row[key])
    row["eligible"] = bool(row["eligible"])
    return DeviceRecord(**row)


def _adapter_to_row(adapter: AdapterRecord) -> dict[str, Any]:
    row = asdict(adapter)
    row["manifest"] = json.dumps(adapter.manifest, sort_keys=True)
    return row


def row_to_adapter(row: dict[str, Any]) -> AdapterRecord:
    """An adapters row (from a cursor or row_to_json) as the record."""
    row = dict(row)
    row["manifest"] = json.loads(row["manifest"])
    return AdapterRecord(**row)


def _in(values: list[Any]) -> str:
    return ", ".join("?" for _ in values)


class SqlTx(HistoryTx, AccessSql, FleetSql, Tx):
    """The contract over a DB-API cursor whose rows are dicts (access control and audit rows in
    sql_access.py, job history and dashboard aggregates in history.py; campaigns, rollouts and
    gate policies in sql_fleet.py)."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        super().__init__(cursor, dialect)
        self._seen = {}  # jobs read in this transaction: what a save changed (history.py)

    @staticmethod
    def _filter_sql(flt: JobFilter) -> tuple[str, list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if flt.states:
            where.append(f"state IN ({', '.join('?' for _ in flt.states)})")
            params += [s.value for s in flt.states]
        for col, value in (("device_id", flt.device_id), ("campaign_id", flt.campaign_id)):
            if value:
                where.append(f"{col} = ?")
                params.append(value)
        if flt.created_after:
            where.append("created_at >= ?")
            params.append(flt.created_after)
        if flt.created_before:
            where.append("created_at < ?")
            params.append(flt.created_before)
        return " AND ".join(where) or "1 = 1", params

    # --- jobs ---
    def _change_cols(self) -> tuple[list[str], list[str]]:
        """Columns every job write sets, and their SQL expressions."""
        if self.d.change_xid:
            return ["change_seq", "change_xid"], [self.d.next_change_seq, self.d.change_xid]
        return ["change_seq"], [self.d.next_change_seq]

    def insert_job(self, job: JobRecord) -> None:
        row = _job_to_row(job)
        del row["change_seq"]
        names, exprs = self._change_cols()
        cols = ", ".join([*row, *names])
        marks = ", ".join(["?"] * len(row) + exprs)
        try:
            self._q(f"INSERT INTO jobs ({cols}) VALUES ({marks})", list(row.values()))
        except self.d.unique_errors as exc:
            raise AlreadyExists(f"job {job.job_id} (request {job.request_id!r}) already exists") from exc

    def insert_campaign_job(self, job: JobRecord) -> bool:
        row = _job_to_row(job)
        del row["change_seq"]
        names, exprs = self._change_cols()
        cols = ", ".join([*row, *names])
        marks = ", ".join(["?"] * len(row) + exprs)
        # Without a conflict target: the partial unique index (campaign_id, device_id) is the one
        # that can clash, and both dialects skip any unique clash this way.
        self._q(f"INSERT INTO jobs ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING", list(row.values()))
        return bool(self.cur.rowcount)

    def campaign_devices(self, campaign_id: str, device_ids: list[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(device_ids), 500):
            chunk = device_ids[i : i + 500]
            rows = self._q(
                f"SELECT device_id FROM jobs WHERE campaign_id = ? AND device_id IN ({_in(chunk)})",
                [campaign_id, *chunk],
            )
            out.update(r["device_id"] for r in rows)
        return out

    def insert_jobs(self, jobs: list[JobRecord]) -> None:
        # One prepared statement, many rows: a 10,000-device campaign is one round of executemany
        # instead of 10,000 statements built and parsed one by one.
        if not jobs:
            return
        rows = [_job_to_row(job) for job in jobs]
        for row in rows:
            del row["change_seq"]
        names, exprs = self._change_cols()
        cols = ", ".join([*rows[0], *names])
        marks = ", ".join(["?"] * len(rows[0]) + exprs)
        try:
            self.cur.executemany(
                f"INSERT INTO jobs ({cols}) VALUES ({marks})".replace("?", self.d.placeholder),
                [list(row.values()) for row in rows],
            )
        except self.d.unique_errors as exc:
            raise AlreadyExists(f"one of {len(jobs)} jobs already exists") from exc

    def _jobs(self, rows: list[dict[str, Any]]) -> list[JobRecord]:
        return [self._remember(row_to_job(r)) for r in rows]

    def get_job(self, job_id: str, *, for_update: bool = False) -> JobRecord | None:
        rows = self._q(f"SELECT * FROM jobs WHERE job_id = ?{self._lock(for_update)}", [job_id])
        return self._jobs(rows)[0] if rows else None

    def get_job_by_request(self, request_id: str) -> JobRecord | None:
        rows = self._q("SELECT * FROM jobs WHERE request_id = ?", [request_id])
        return self._jobs(rows)[0] if rows else None

    def save_job(self, job: JobRecord) -> None:
        row = _job_to_row(job)
        for key in ("job_id", "change_seq"):
            del row[key]
        names, exprs = self._change_cols()
        sets = ", ".join([*(f"{c} = ?" for c in row), *(f"{n} = {e}" for n, e in zip(names, exprs, strict=True))])
        self._q(f"UPDATE jobs SET {sets} WHERE job_id = ?", [*row.values(), job.job_id])
        self._record(job)

    def claimable_jobs(self, device_id: str, now: float, limit: int) -> list[JobRecord]:
        rows = self._q(
            "SELECT * FROM jobs WHERE device_id = ? AND state = ? AND not_before <= ?"
            " AND (campaign_id = '' OR campaign_id NOT IN (SELECT campaign_id FROM campaigns WHERE state = ?))"
            f" ORDER BY created_at, job_id LIMIT ?{self.d.for_update}{self.d.skip_locked}",
            [device_id, JobState.QUEUED.value, now, CampaignState.PAUSED.value, limit],
        )
        return self._jobs(rows)

    def expired_jobs(self, now: float, limit: int) -> list[JobRecord]:
        held = ", ".join("?" for _ in _HELD)
        open_ = ", ".join("?" for _ in _OPEN)
        rows = self._q(
            f"SELECT * FROM jobs WHERE (state IN ({held}) AND lease_expires_at < ?)"
            f" OR (state IN ({open_}) AND deadline > 0 AND deadline + paused_s < ? AND state <> ?)"
            f" ORDER BY lease_expires_at LIMIT ?{self.d.for_update}{self.d.skip_locked}",
            [*_HELD, now, *_OPEN, now, JobState.PAUSED.value, limit],
        )
        return self._jobs(rows)

    def list_jobs(self, flt: JobFilter, limit: int, before_job_id: str = "") -> list[JobRecord]:
        where, params = self._filter_sql(flt)
        if before_job_id:
            where += " AND job_id < ?"
            params.append(before_job_id)
        rows = self._q(f"SELECT * FROM jobs WHERE {where} ORDER BY job_id DESC LIMIT ?", [*params, limit])
        return self._jobs(rows)

    def watch_cursor(self) -> WatchCursor:
        if self.d.xid_horizon:
            return (int(self._q(f"SELECT {self.d.xid_horizon} AS x")[0]["x"]), "")
        return (self.max_change_seq(), "")

    def jobs_changed_after(
        self, cursor: WatchCursor, flt: JobFilter, limit: int
    ) -> tuple[list[JobRecord], WatchCursor]:
        where, params = self._filter_sql(flt)
        key, last_id = cursor
        if self.d.xid_horizon:
            rows = self._q(
                f"SELECT * FROM jobs WHERE (change_xid, job_id) > (?, ?) AND change_xid < {self.d.xid_horizon}"
                f" AND {where} ORDER BY change_xid, job_id LIMIT ?",
                [key, last_id, *params, limit],
            )
            after = (int(rows[-1]["change_xid"]), str(rows[-1]["job_id"])) if rows else cursor
        else:
            rows = self._q(
                f"SELECT * FROM jobs WHERE change_seq > ? AND {where} ORDER BY change_seq LIMIT ?",
                [key, *params, limit],
            )
            after = (int(rows[-1]["change_seq"]), "") if rows else cursor
        return [row_to_job(r) for r in rows], after

    def max_change_seq(self) -> int:
        return int(self._q("SELECT COALESCE(MAX(change_seq), 0) AS s FROM jobs")[0]["s"])

    def count_jobs_by_state(self, campaign_id: str = "") -> dict[str, int]:
        where, params = ("WHERE campaign_id = ?", [campaign_id]) if campaign_id else ("", [])
        rows = self._q(f"SELECT state, COUNT(*) AS n FROM jobs {where} GROUP BY state", params)
        return {r["state"]: int(r["n"]) for r in rows}

    # --- devices ---
    def upsert_device(self, device: DeviceRecord) -> None:
        row = _device_to_row(device)
        del row["device_id"]
        sets = ", ".join(f"{c} = ?" for c in row)
        self._q(f"UPDATE devices SET {sets} WHERE device_id = ?", [*row.values(), device.device_id])
        if self.cur.rowcount == 0:  # one statement for the common case, an existing device
            self._insert("devices", _device_to_row(device), f"device {device.device_id}")

    def update_device(self, device_id: str, values: dict[str, Any]) -> bool:
        unknown = set(values) - set(_DEVICE_FIELDS) | ({"device_id"} & set(values))
        if unknown:
            raise ValueError(f"cannot update device fields {sorted(unknown)}")
        if not values:
            return bool(self._q("SELECT 1 AS one FROM devices WHERE device_id = ?", [device_id]))
        row = {k: json.dumps(v, sort_keys=True) if k in _JSON_DEVICE else v for k, v in values.items()}
        if "eligible" in row:
            row["eligible"] = int(row["eligible"])
        sets = ", ".join(f"{c} = ?" for c in row)
        self._q(f"UPDATE devices SET {sets} WHERE device_id = ?", [*row.values(), device_id])
        return bool(self.cur.rowcount)

    def insert_devices(self, devices: list[DeviceRecord]) -> None:
        if not devices:
            return
        rows = [_device_to_row(device) for device in devices]
        cols = ", ".join(rows[0])
        marks = ", ".join("?" for _ in rows[0])
        try:
            self.cur.executemany(
                f"INSERT INTO devices ({cols}) VALUES ({marks})".replace("?", self.d.placeholder),
                [list(row.values()) for row in rows],
            )
        except self.d.unique_errors as exc:
            raise AlreadyExists(f"one of {len(devices)} devices already exists") from exc

    def get_device(self, device_id: str, *, for_update: bool = False) -> DeviceRecord | None:
        rows = self._q(f"SELECT * FROM devices WHERE device_id = ?{self._lock(for_update)}", [device_id])
        return _row_to_device(rows[0]) if rows else None

    def list_devices(self, limit: int, after_device_id: str = "") -> list[DeviceRecord]:
        rows = self._q(
            "SELECT * FROM devices WHERE device_id > ? ORDER BY device_id LIMIT ?",
            [after_device_id, limit],
        )
        return [_row_to_device(r) for r in rows]

    def list_devices_changed(self, since: float, limit: int, after_device_id: str = "") -> list[DeviceRecord]:
        rows = self._q(
            "SELECT * FROM devices WHERE profile_at >= ? AND device_id > ? ORDER BY device_id LIMIT ?",
            [since, after_device_id, limit],
        )
        return [_row_to_device(r) for r in rows]

    def get_devices(self, device_ids: list[str]) -> list[DeviceRecord]:
        out: list[DeviceRecord] = []
        for i in range(0, len(device_ids), 500):
            chunk = device_ids[i : i + 500]
            out += [
                _row_to_device(r) for r in self._q(f"SELECT * FROM devices WHERE device_id IN ({_in(chunk)})", chunk)
            ]
        return out

    def fleet_counts(self) -> tuple[int, int]:
        row = self._q(
            "SELECT (SELECT COUNT(*) FROM devices) AS d, (SELECT COUNT(*) FROM jobs WHERE state = ?) AS q",
            [JobState.QUEUED.value],
        )[0]
        return int(row["d"]), int(row["q"])

    def count_devices_by_reason(self, online_since: float) -> tuple[dict[str, int], int, int]:
        rows = self._q(
            "SELECT eligibility_reason AS r, COUNT(*) AS n,"
            " SUM(CASE WHEN last_seen >= ? THEN 1 ELSE 0 END) AS online"
            " FROM devices GROUP BY eligibility_reason",
            [online_since],
        )
        by_reason = {(r["r"] or "UNSPECIFIED"): int(r["n"]) for r in rows}
        return by_reason, sum(by_reason.values()), sum(int(r["online"] or 0) for r in rows)

    def delete_device(self, device_id: str) -> bool:
        self._q("DELETE FROM devices WHERE device_id = ?", [device_id])
        return bool(self.cur.rowcount)

    # --- adapters ---
    def insert_adapter(self, adapter: AdapterRecord) -> None:
        what = f"adapter {adapter.device_id}/{adapter.name} v{adapter.version}"
        self._insert("adapters", _adapter_to_row(adapter), what)

    def get_adapter(self, adapter_id: str) -> AdapterRecord | None:
        rows = self._q("SELECT * FROM adapters WHERE adapter_id = ?", [adapter_id])
        return row_to_adapter(rows[0]) if rows else None

    def latest_adapter_version(self, device_id: str, name: str) -> int:
        rows = self._q("SELECT MAX(version) AS v FROM adapters WHERE device_id = ? AND name = ?", [device_id, name])
        return int(rows[0]["v"] or 0) if rows else 0

    def list_adapters(self, device_id: str, name: str, limit: int, before_adapter_id: str = "") -> list[AdapterRecord]:
        where, params = ["1 = 1"], []
        for col, value in (("device_id", device_id), ("name", name)):
            if value:
                where.append(f"{col} = ?")
                params.append(value)
        if before_adapter_id:
            where.append("adapter_id < ?")
            params.append(before_adapter_id)
        rows = self._q(
            f"SELECT * FROM adapters WHERE {' AND '.join(where)} ORDER BY adapter_id DESC LIMIT ?",
            [*params, limit],
        )
        return [row_to_adapter(r) for r in rows]

    def adapter_count(self) -> int:
        return int(self._q("SELECT COUNT(*) AS n FROM adapters")[0]["n"])

    def referenced_blob_keys(self) -> set[str]:
        return {r["blob_key"] for r in self._q("SELECT DISTINCT blob_key FROM adapters")}

    def delete_adapter(self, adapter_id: str) -> None:
        self._q("DELETE FROM adapters WHERE adapter_id = ?", [adapter_id])

    def get_adapters(self, adapter_ids: list[str]) -> list[AdapterRecord]:
        out: list[AdapterRecord] = []
        for i in range(0, len(adapter_ids), 500):
            chunk = adapter_ids[i : i + 500]
            out += [
                row_to_adapter(r) for r in self._q(f"SELECT * FROM adapters WHERE adapter_id IN ({_in(chunk)})", chunk)
            ]
        return out
