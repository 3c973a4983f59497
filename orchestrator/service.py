"""The orchestrator's domain, composed: one object per role over shared stores and settings.

    identity  (identity.py)   devices: enrollment, credentials, rotation, revocation, labels
    operators (operators.py)  operators: roles, tokens, the bootstrap admin
    audit     (audit.py)      the audit log of every mutating call
    jobs      (lifecycle.py)  a job's life once queued: lease, heartbeat, reports, completion, reaping
    fleet     (fleet.py)      operator changes: submissions, campaigns, cancellation, activation
    queries   (queries.py)    operator reads and watches
    runtimes  (runtimes.py)   runtime bundles and adapters' .onnx_adapter forms for devices

Nothing here knows gRPC or Ray: servicers convert requests and call one method of one role; the
Ray layer runs `jobs.reap` on a timer and adapter verification as tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from adapters_store import BlobStore
from orchestrator.audit import AuditLog
from orchestrator.config import OrchestratorConfig
from orchestrator.fleet import FleetOps
from orchestrator.identity import Identity
from orchestrator.lifecycle import JobLifecycle, Verifier, local_verifier
from orchestrator.operators import Operators
from orchestrator.queries import Queries
from orchestrator.runtime_forms import RuntimeForms
from orchestrator.runtimes import RuntimeDownloads
from orchestrator.state.base import StateStore


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
        # A verified adapter gets its runtime form in the background (None: no bundles here).
        on_verified = runtime_forms.adapter_verified if runtime_forms is not None else None
        self.jobs = JobLifecycle(state, blobs, config, self.identity, clock, verifier, on_verified)
        self.runtimes = RuntimeDownloads(self.jobs, self.identity, runtime_forms, config, clock)
        self.fleet = FleetOps(state, config, clock)
        self.queries = Queries(state, clock)

    def close(self) -> None:
        """Release the stores."""
        self.runtimes.close()
        self.state.close()
        self.blobs.close()
