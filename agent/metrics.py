"""The agent's own metrics, on an optional local endpoint (`agent run --metrics-listen
127.0.0.1:9464`; off by default, loopback only: a phone never opens a port to its network).

It follows the agent's events (the listener the agent calls for everything it does) and, at
scrape time, reads what is cheap to read: the gate's state, the current job's progress, the
resident memory of the agent and its children. Labels come from fixed sets (gate reasons,
process roles, job outcomes); the adapter in use shows as its version under its name, never
as an id. This module imports no torch.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from protos.wire import EligibilityReason

_OUTCOMES = ("completed", "failed", "dropped")


def check_loopback(listen: str) -> tuple[str, int]:
    """HOST:PORT on a loopback address, or ValueError naming the problem."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics-listen {listen!r} must be a loopback HOST:PORT such as 127.0.0.1:9464")
    return host, int(port)


class AgentMetrics:
    """Counts the agent's events; `collect` adds its current state at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.agent: Any = None  # agent.agent.Agent, bound once built
        self._lock = threading.Lock()
        self._progress: dict[str, float] = {}
        self._rate = (0.0, 0.0)  # (tokens seen, monotonic time) of the previous progress event
        self._tokens_per_s = 0.0
        self._checkpoint_bytes = 0
        self._adapter: tuple[str, int] | None = None
        self.pauses = Counter("pocketlora_agent_pauses", "Training pauses (the gate closed).", registry=self.registry)
        self.checkpoints = Counter("pocketlora_agent_checkpoints", "Checkpoints written.", registry=self.registry)
        self.jobs = Counter(
            "pocketlora_agent_jobs", "Jobs this agent finished, by outcome.", ["outcome"], registry=self.registry
        )
        self.switches = Counter("pocketlora_agent_adapter_switches", "Adapters activated.", registry=self.registry)
        self.refusals = Counter("pocketlora_agent_adapter_refusals", "Adapters refused.", registry=self.registry)
        for outcome in _OUTCOMES:
            self.jobs.labels(outcome)
        self.registry.register(self)

    # ------------------------------------------------------------------ events
    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        """The agent's listener: called on its loop thread for each event."""
        with self._lock:
            if kind == "progress":
                self._on_progress(data)
            elif kind == "paused":
                self.pauses.inc()
            elif kind == "checkpoint":
                self.checkpoints.inc()
                self._checkpoint_bytes = self._current_checkpoint_bytes()
            elif kind in ("completed", "failed", "job_dropped"):
                self.jobs.labels({"job_dropped": "dropped"}.get(kind, kind)).inc()
                self._progress, self._tokens_per_s = {}, 0.0
            elif kind == "adapter_active":
                self.switches.inc()
                adapter_id = str(data.get("adapter_id", ""))
                self._adapter = (str(data.get("name", "")), int(data.get("version", 0))) if adapter_id else None
            elif kind == "adapter_refused":
                self.refusals.inc()

    def _on_progress(self, data: dict[str, Any]) -> None:
        now, tokens = time.monotonic(), float(data.get("tokens_seen", 0) or 0)
        then, before = self._rate[1], self._rate[0]
        if then and now > then and tokens >= before:
            self._tokens_per_s = (tokens - before) / (now - then)
        self._rate = (tokens, now)
        self._progress = {k: float(data.get(k, 0) or 0) for k in ("step", "total_steps", "loss", "tokens_seen")}

    def _current_checkpoint_bytes(self) -> int:
        job = getattr(self.agent, "job", None)
        if job is None:
            return 0
        folder = Path(self.agent.cfg.work_dir) / "jobs" / job.job_id / "checkpoint"
        return sum(f.stat().st_size for f in folder.glob("*") if f.is_file()) if folder.is_dir() else 0

    # ------------------------------------------------------------------ scrape
    def collect(self) -> Iterator[Metric]:
        """The agent's current state."""
        with self._lock:
            progress, rate, ckpt, adapter = (
                dict(self._progress),
                self._tokens_per_s,
                self._checkpoint_bytes,
                self._adapter,
            )
        elig = getattr(self.agent, "eligibility", None)
        eligible = GaugeMetricFamily("pocketlora_agent_eligible", "1 when the gate allows training now.")
        eligible.add_metric([], 1.0 if elig is not None and elig.eligible else 0.0)
        yield eligible
        gate = GaugeMetricFamily("pocketlora_agent_gate_reason", "1 for the gate's current reason.", labels=["reason"])
        for reason in EligibilityReason:
            gate.add_metric([reason.value], 1.0 if elig is not None and elig.reason == reason else 0.0)
        yield gate
        for name, key, doc in (
            ("pocketlora_agent_training_step", "step", "Optimizer steps done in the current job's attempt."),
            ("pocketlora_agent_training_steps_planned", "total_steps", "Optimizer steps the current attempt plans."),
            ("pocketlora_agent_training_loss", "loss", "Latest training loss of the current job."),
            ("pocketlora_agent_training_tokens", "tokens_seen", "Tokens the current job has trained on."),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], progress.get(key, 0.0))
            yield family
        yield _gauge(
            "pocketlora_agent_training_tokens_per_second", "Training throughput between progress reports.", rate
        )
        yield _gauge("pocketlora_agent_checkpoint_bytes", "Size of the current job's latest checkpoint.", ckpt)
        yield from self._memory()
        active = GaugeMetricFamily(
            "pocketlora_agent_adapter_active_version",
            "Version of the adapter in use, by adapter name (no series: the base model).",
            labels=["adapter"],
        )
        if adapter is not None:
            active.add_metric([adapter[0]], adapter[1])
        yield active

    def _memory(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "pocketlora_agent_resident_memory_bytes", "Resident memory by process role.", labels=["process"]
        )
        pids = {"agent": psutil.Process().pid}
        proc = getattr(self.agent, "proc", None)
        if proc is not None and proc.pid:
            pids["training"] = proc.pid
        runtime = getattr(self.agent, "runtime", None)
        if runtime is not None and getattr(runtime, "proc", None) is not None:
            pids["runtime"] = runtime.proc.pid
        for role, pid in pids.items():
            try:
                family.add_metric([role], psutil.Process(pid).memory_info().rss)
            except psutil.Error:  # it just exited
                continue
        yield family

    def serve(self, listen: str) -> Any:
        """Serve /metrics on a loopback HOST:PORT in a daemon thread; returns the HTTP server."""
        host, port = check_loopback(listen)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], value)
    return family
