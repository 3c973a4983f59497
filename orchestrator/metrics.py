"""What the orchestrator counts as it works: the one module domain code calls to record metrics.

Domain code says what happened (`metrics.lease_expired()`, `metrics.attempt_failed(...)`) and
never touches prometheus_client itself. Every series here is a counter or a histogram, so the
counts of several processes add up: the Ray control loop (which reaps expired leases) hands
its `snapshot()` to a front end, whose /metrics adds it to its own (`DomainCollector`).

Labels take only values from small fixed sets (states, error classes, RPC methods and codes,
backends): never a job, device or adapter id, so a fleet of any size keeps a bounded number of
series. Gauges of the fleet's state (jobs by state, devices by gate reason...) are not kept
here: they are read from the store at scrape time (orchestrator/http/scrape.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import Metric

from protos.wire import ErrorClass, JobState

# `_created` series are per-process timestamps: they do not add up across processes and most
# dashboards never read them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Samples as they travel between processes: (sample name, sorted label pairs, value).
Sample = tuple[str, tuple[tuple[str, str], ...], float]

REGISTRY = CollectorRegistry(auto_describe=False)

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

LEASE_EXPIRIES = Counter(
    "pocketlora_lease_expiries",
    "Leases that expired because their device stopped renewing them.",
    registry=REGISTRY,
)
DEADLINES_MISSED = Counter(
    "pocketlora_deadlines_missed",
    "Jobs failed because their deadline passed.",
    registry=REGISTRY,
)
ATTEMPT_FAILURES = Counter(
    "pocketlora_attempt_failures",
    "Failed attempts by error class and outcome (requeued with backoff, or failed for good).",
    ["error_class", "outcome"],
    registry=REGISTRY,
)
FENCED_REPORTS = Counter(
    "pocketlora_fenced_reports",
    "Device reports refused or ignored because they carried a stale lease (another epoch, or a job no longer leased).",
    ["call"],
    registry=REGISTRY,
)
VERIFICATIONS = Counter(
    "pocketlora_adapter_verifications",
    "Uploaded adapters checked by the orchestrator, by result (ok, missing, size_mismatch, sha256_mismatch, format).",
    ["result"],
    registry=REGISTRY,
)
TRANSITIONS = Counter(
    "pocketlora_job_transitions",
    "Job state changes, by the state entered.",
    ["state"],
    registry=REGISTRY,
)
COMMIT_BATCH = Histogram(
    "pocketlora_sqlite_commit_batch_transactions",
    "Transactions made durable by one SQLite group COMMIT.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
TRANSACTION_SECONDS = Histogram(
    "pocketlora_db_transaction_seconds",
    "Time inside a state-store transaction (a thread's includes waiting for its group commit).",
    ["backend"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
BLOB_SECONDS = Histogram(
    "pocketlora_blob_operation_seconds",
    "Time of adapter-store operations the orchestrator makes (presigning URLs, verifying uploads).",
    ["operation"],
    buckets=_LATENCY,
    registry=REGISTRY,
)


# Every known label value starts at 0, so dashboards show a flat line rather than no data and
# rate() sees the first increase.
for _error in ErrorClass:
    for _outcome in ("requeued", "failed"):
        ATTEMPT_FAILURES.labels(_error.value, _outcome)
for _result in ("ok", "missing", "size_mismatch", "sha256_mismatch", "format"):
    VERIFICATIONS.labels(_result)
for _call in ("heartbeat", "report"):
    FENCED_REPORTS.labels(_call)
for _state in JobState:
    TRANSITIONS.labels(_state.value)


def lease_expired() -> None:
    """The reaper found a lease its device stopped renewing."""
    LEASE_EXPIRIES.inc()


def deadline_missed() -> None:
    """The reaper failed a job whose deadline passed."""
    DEADLINES_MISSED.inc()


def attempt_failed(error_class: str, *, requeued: bool) -> None:
    """An attempt ended in an error; `requeued` when the job will be tried again."""
    ATTEMPT_FAILURES.labels(error_class, "requeued" if requeued else "failed").inc()


def fenced_report(call: str) -> None:
    """A device reported on a lease it no longer holds (`call`: heartbeat or report)."""
    FENCED_REPORTS.labels(call).inc()


def verification(result: str) -> None:
    """An uploaded adapter was verified: "ok", or why it was rejected."""
    VERIFICATIONS.labels(result).inc()


def transition(state: str) -> None:
    """A job entered `state` (recorded where the store saves the change)."""
    TRANSITIONS.labels(state).inc()


def commit_batch(transactions: int) -> None:
    """One SQLite COMMIT made this many transactions durable."""
    COMMIT_BATCH.observe(transactions)


def transaction_seconds(backend: str, seconds: float) -> None:
    """One state-store transaction took this long."""
    TRANSACTION_SECONDS.labels(backend).observe(seconds)


@contextmanager
def blob_operation(operation: str) -> Iterator[None]:
    """Time an adapter-store operation."""
    started = time.perf_counter()
    try:
        yield
    finally:
        BLOB_SECONDS.labels(operation).observe(time.perf_counter() - started)


def snapshot() -> list[Sample]:
    """Every sample of this process's domain metrics, to be added to another process's."""
    return [
        (s.name, tuple(sorted(s.labels.items())), float(s.value))
        for family in REGISTRY.collect()
        for s in family.samples
    ]


class DomainCollector:
    """This process's domain metrics plus those another process handed over (`remote`, e.g. the
    control loop's snapshot): counters and histogram buckets with equal labels are added."""

    def __init__(self, remote: Callable[[], Iterable[Sample]] | None = None) -> None:
        self.remote = remote

    def collect(self) -> Iterator[Metric]:
        """Families of the domain registry, with the remote samples added in."""
        extra: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for name, labels, value in self.remote() if self.remote else ():
            extra[(name, labels)] = extra.get((name, labels), 0.0) + value
        for family in REGISTRY.collect():
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                merged.add_sample(s.name, s.labels, s.value + extra.pop(key, 0.0))
            for (name, labels), value in list(extra.items()):
                # A labelled series only the other process has seen so far.
                if name.startswith(family.name) and name[len(family.name) :] in _SUFFIXES[family.type]:
                    merged.add_sample(name, dict(labels), value)
                    del extra[(name, labels)]
            yield merged


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
