"""The orchestrator's domain, composed: one object per role over shared stores and settings.

    identity   (identity.py)       devices: enrollment, credentials, rotation, revocation, labels
    operators  (operators.py)      operators: roles, tokens, the bootstrap admin
    audit      (audit.py)          the audit log of every mutating call
    jobs       (lifecycle.py)      a job's life once queued: lease, heartbeat, reports, completion, reaping
    fleet      (fleet.py)          operator changes: submissions, cancellation, activation
    campaigns  (campaigns.py)      living campaigns: create, pause, resume, cancel, fan-out to late devices
    rollouts   (rollouts.py)       staged activation of a campaign's adapters, halted by failures
    policies   (gate_policies.py)  the gate thresholds operators set, sent in heartbeat replies
    queries    (queries.py)        operator reads and watches
    runtimes   (runtimes.py)       runtime bundles and adapters' .onnx_adapter forms for devices

Nothing here knows gRPC or Ray: servicers convert requests and call one method of one role; the
Ray layer runs `control_tick` on a timer and adapter verification as tasks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapters_store import BlobStore
from orchestrator.audit import AuditLog
from orchestrator.campaigns import Campaigns
from orchestrator.config import OrchestratorConfig
from orchestrator.fleet import FleetOps
from orchestrator.gate_policies import GatePolicies
from orchestrator.identity import Identity
from orchestrator.lifecycle import JobLifecycle, Verifier, local_verifier
from orchestrator.operators import Operators
from orchestrator.queries import Queries
from orchestrator.rollouts import Rollouts
from orchestrator.runtime_forms import RuntimeForms
from orchestrator.runtimes import RuntimeDownloads
from orchestrator.state.base import StateStore

log = logging.getLogger("pocketlora.orchestrator")


@dataclass
class TickStats:
    """What one pass of the control loop did."""

    reaped: int = 0
    campaign_jobs: int = 0
    rollout_changes: int = 0


class Orchestrator:
    """The domain roles of one orchestrator process, sharing its stores, settings and clock."""

    def __init__(
        self,
        state: StateStore,
        blobs: BlobStore,
        config: OrchestratorConfig,
        *,
        clock: Callable[[], float] = time.time,
        verifier: Verifier = local_verifier,
        runtime_forms: RuntimeForms | None = None,
    ) -> None:
        self.state = state
        self.blobs = blobs
        self.config = config
        self.clock = clock
        self.identity = Identity(state, config, clock)
        self.operators = Operators(state, config, clock)
        self.audit = AuditLog(state, clock)
        self.policies = GatePolicies(state, config, clock)
        # A verified adapter gets its runtime form in the background (None: no bundles here).
        on_verified = runtime_forms.adapter_verified if runtime_forms is not None else None
        self.jobs = JobLifecycle(state, blobs, config, self.identity, clock, verifier, self.policies, on_verified)
        self.runtimes = RuntimeDownloads(self.jobs, self.identity, runtime_forms, config, clock)
        self.fleet = FleetOps(state, config, clock)
        self.campaigns = Campaigns(state, config, clock)
        self.rollouts = Rollouts(state, clock)
        self.queries = Queries(state, clock)

    def control_tick(self) -> TickStats:
        """One pass of the control loop: reap expired leases and deadlines, fan campaigns out to
        devices that enrolled since, move rollouts on. A part that fails is logged and the
        others still run."""
        stats = TickStats()
        for name, part in (
            ("reaped", self.jobs.reap),
            ("campaign_jobs", self.campaigns.tick),
            ("rollout_changes", self.rollouts.tick),
        ):
            try:
                setattr(stats, name, part())
            except Exception:  # a passing store error must not stop the other parts
                log.exception("control loop: %s failed", name)
        return stats

    def close(self) -> None:
        """Release the stores."""
        self.runtimes.close()
        self.state.close()
        self.blobs.close()
