"""What /metrics shows: this process's counters and histograms, and gauges of the fleet read from
the store at scrape time.

The gauges come from the fleet summary (the same domain call as GetFleetSummary and the
console's overview), read at most once every CACHE_S seconds however often Prometheus scrapes,
so a scrape's cost on the store is bounded: a handful of GROUP BY queries. Every replica reads
the same store, so these gauges are equal across replicas (aggregate them with max, not sum).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from orchestrator.domain import JobState
from orchestrator.metrics import DomainCollector, Sample
from orchestrator.service import Orchestrator
from protos.wire import EligibilityReason

log = logging.getLogger("pocketlora.orchestrator")
CACHE_S = 5.0
SYNC_STATES = ("CONVERGED", "PENDING", "REFUSED", "OFFLINE")


class FleetCollector:
    """Gauges of jobs, devices and adapters from the store, cached for CACHE_S seconds."""

    def __init__(self, orch: Orchestrator, cache_s: float = CACHE_S) -> None:
        self.orch = orch
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._summary: dict[str, Any] | None = None
        self._at = float("-inf")
        self.reads = 0  # store reads made (tests check the cache)

    def summary(self) -> dict[str, Any] | None:
        """The fleet summary, re-read when older than cache_s (None when the store failed)."""
        with self._lock:
            now = self.orch.clock()
            if not self._at <= now < self._at + self.cache_s:
                self._at = now
                self.reads += 1
                try:
                    self._summary = self.orch.fleet.fleet_summary()
                except Exception:
                    log.exception("metrics: reading the fleet summary failed")
                    self._summary = None
            return self._summary

    def collect(self) -> Iterator[Metric]:
        """The fleet gauges, and whether the store could be read."""
        s = self.summary()
        up = GaugeMetricFamily(
            "pocketlora_store_up", "1 when the last read of the state store for these gauges worked."
        )
        up.add_metric([], 0.0 if s is None else 1.0)
        yield up
        if s is None:
            return
        jobs = GaugeMetricFamily("pocketlora_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], s["jobs_by_state"].get(state.value, 0))
        yield jobs
        leased = sum(s["jobs_by_state"].get(state.value, 0) for state in JobState if state.leased)
        yield _gauge("pocketlora_leases_in_flight", "Jobs held by a device under a lease.", leased)
        queued = GaugeMetricFamily(
            "pocketlora_queue_depth", "QUEUED jobs by the base model they need.", labels=["base_model"]
        )
        for model, n in sorted(s["queued_by_base_model"].items()):
            queued.add_metric([model], n)
        yield queued
        yield _gauge("pocketlora_devices_enrolled", "Enrolled devices.", s["device_count"])
        yield _gauge("pocketlora_devices_online", "Devices seen in the last two minutes.", s["devices_online"])
        gate = GaugeMetricFamily(
            "pocketlora_devices_by_gate", "Devices by their gate's last reported reason.", labels=["reason"]
        )
        for reason in [*EligibilityReason, "UNSPECIFIED"]:
            gate.add_metric([str(reason)], s["devices_by_eligibility"].get(str(reason), 0))
        yield gate
        sync = GaugeMetricFamily(
            "pocketlora_devices_by_adapter_sync",
            "Devices by whether they run the adapter operators want (CONVERGED) or why not.",
            labels=["sync"],
        )
        for sync_state in SYNC_STATES:
            sync.add_metric([sync_state], s["devices_by_adapter_sync"].get(sync_state, 0))
        yield sync
        yield _gauge("pocketlora_adapter_versions", "Registered adapter versions.", s["adapter_count"])


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def metrics_registry(orch: Orchestrator, remote: Callable[[], Iterable[Sample]] | None = None) -> CollectorRegistry:
    """Everything one orchestrator's /metrics serves."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DomainCollector(remote))
    registry.register(FleetCollector(orch))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format (blocking: the fleet gauges may read the store)."""
    return generate_latest(registry)
