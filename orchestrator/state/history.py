"""What dashboards read and the job lifecycle does not need: each job's history, and fleet
aggregates. Mixed into SqlTx (state/sql.py), so it works on every SQL backend.

History is written where a job is saved, in the same transaction, so no use case has to
remember to write it and it is exactly as durable as the change it describes:

- a state change (or a new attempt) appends a `job_events` row: the job's timeline, its
  attempts with their errors, and the jobs-ended-per-minute count. At most EVENTS_MAX rows per
  job are kept (a device pausing and resuming forever cannot grow the table without bound).
- progress appends a `job_progress` row when the step crosses into a new one of POINTS buckets
  of the attempt's planned steps: a short job keeps every step, a long one about POINTS points
  spread over its length, so the loss curve has the same shape at a bounded cost.
The previous state of a job is what this transaction read, so the rule needs no extra query.
"""

from __future__ import annotations

import math

from orchestrator import metrics
from orchestrator.domain import JobEvent, JobRecord, JobState, ProgressPoint
from orchestrator.state.sql_base import SqlBase

EVENTS_MAX = 1000
POINTS = 500
QUEUED_MODELS_MAX = 20
_INT_MAX = 2**62
_FINISHED = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)


def progress_bucket(step: int, total_steps: int) -> int:
    """Which of the attempt's POINTS buckets a step falls in (0 before the first step, so the
    first report is always kept): each step its own for short attempts (or an unknown total);
    steps past the planned total all fall in the last one."""
    if step <= 0:
        return 0
    if total_steps <= 0:
        return 1 + min(step, POINTS)
    return 1 + min(step * POINTS // total_steps, POINTS)


class HistoryTx(SqlBase):
    """Job history and fleet aggregates over a DB-API cursor."""

    _seen: dict[str, tuple[JobState, int, int]]

    # --- writing, as jobs are read and saved ---
    def _remember(self, job: JobRecord) -> JobRecord:
        """Note a job's state as read, to tell later what a save changed."""
        self._seen[job.job_id] = (job.state, job.attempt, progress_bucket(job.progress.step, job.progress.total_steps))
        return job

    def _record(self, job: JobRecord) -> None:
        """Append what a save changed to the job's history."""
        before = self._seen.get(job.job_id)
        p = job.progress
        bucket = progress_bucket(p.step, p.total_steps)
        if before is None or before[0] != job.state or before[1] != job.attempt:
            self._add_event(job)
        if job.state.leased and p.step > 0 and (before is None or before[1] != job.attempt or bucket > before[2]):
            loss = float(p.loss) if math.isfinite(p.loss) else None
            self._q(
                "INSERT INTO job_progress (job_id, attempt, step, total_steps, loss, tokens_seen, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [
                    job.job_id,
                    job.attempt,
                    min(p.step, _INT_MAX),
                    min(p.total_steps, _INT_MAX),
                    loss,
                    min(p.tokens_seen, _INT_MAX),
                    job.updated_at,
                ],
            )
        self._remember(job)

    def _add_event(self, job: JobRecord) -> None:
        count = self._q("SELECT COUNT(*) AS n FROM job_events WHERE job_id = ?", [job.job_id])[0]["n"]
        if int(count) >= EVENTS_MAX:
            return
        failed = job.state in (JobState.QUEUED, JobState.FAILED) and bool(job.last_error_class) and job.attempt > 0
        message = job.status_message
        if failed and job.last_error:
            message = f"{message}: {job.last_error}" if message else job.last_error
        self._q(
            "INSERT INTO job_events (job_id, at, state, attempt, message, error_class) VALUES (?, ?, ?, ?, ?, ?)",
            [job.job_id, job.updated_at, job.state.value, job.attempt, message, job.last_error_class if failed else ""],
        )
        metrics.transition(job.state.value)

    # --- reading ---
    def job_history(self, job_id: str) -> tuple[list[JobEvent], list[ProgressPoint]]:
        """The job's recorded state changes and progress points, oldest first."""
        events = [
            JobEvent(float(r["at"]), JobState(r["state"]), int(r["attempt"]), r["message"], r["error_class"])
            for r in self._q("SELECT * FROM job_events WHERE job_id = ? ORDER BY at", [job_id])
        ]
        points = [
            ProgressPoint(
                float(r["at"]),
                int(r["attempt"]),
                int(r["step"]),
                int(r["total_steps"]),
                None if r["loss"] is None else float(r["loss"]),
                int(r["tokens_seen"]),
            )
            for r in self._q("SELECT * FROM job_progress WHERE job_id = ? ORDER BY attempt, step", [job_id])
        ]
        return events, points

    def finished_per_minute(self, since: float) -> dict[int, tuple[int, int]]:
        """Jobs that ended per minute since `since`: {minute (UNIX s / 60): (succeeded, failed or cancelled)}."""
        marks = ", ".join("?" for _ in _FINISHED)
        rows = self._q(
            f"SELECT {self.d.minute_of('at')} AS m, state, COUNT(*) AS n FROM job_events"
            f" WHERE at >= ? AND state IN ({marks}) GROUP BY {self.d.minute_of('at')}, state",
            [since, *_FINISHED],
        )
        out: dict[int, tuple[int, int]] = {}
        for r in rows:
            ok, bad = out.get(int(r["m"]), (0, 0))
            if r["state"] == JobState.SUCCEEDED.value:
                ok += int(r["n"])
            else:
                bad += int(r["n"])
            out[int(r["m"])] = (ok, bad)
        return out

    def queued_by_base_model(self) -> dict[str, int]:
        """QUEUED jobs by the base model they need: the largest QUEUED_MODELS_MAX, the rest as "other"."""
        model = self.d.json_text("training", "base_model_id")
        rows = self._q(
            f"SELECT {model} AS m, COUNT(*) AS n FROM jobs WHERE state = ? GROUP BY {model} ORDER BY n DESC",
            [JobState.QUEUED.value],
        )
        out = {str(r["m"] or ""): int(r["n"]) for r in rows[:QUEUED_MODELS_MAX]}
        rest = sum(int(r["n"]) for r in rows[QUEUED_MODELS_MAX:])
        if rest:
            out["other"] = out.get("other", 0) + rest
        return out

    def adapter_sync_counts(self, online_since: float) -> dict[str, int]:
        """Devices by whether they run the adapter operators want: CONVERGED, REFUSED (the device
        reported refusing it), OFFLINE (not seen since online_since) or PENDING."""
        rows = self._q(
            "SELECT CASE WHEN desired_adapter_id = active_adapter_id THEN 'CONVERGED'"
            # The refusals are a JSON object keyed by adapter id: a quoted id is a key.
            " WHEN desired_adapter_id <> '' AND adapter_refusals LIKE ? || desired_adapter_id || ?"
            " THEN 'REFUSED' WHEN last_seen < ? THEN 'OFFLINE' ELSE 'PENDING' END AS s, COUNT(*) AS n"
            " FROM devices GROUP BY 1",
            ['%"', '"%', online_since],
        )
        return {str(r["s"]): int(r["n"]) for r in rows}
