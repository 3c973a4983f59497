"""Pace steering: when a device should come back, sized to the fleet (Bonawitz et al. 2019, 2.3).

Pure functions. The orchestrator aims at a budget of polls per second across the whole fleet, so
an idle device's interval grows with the fleet. The budget goes where the work is: while jobs
are queued, idle devices poll at the full budget; with an empty queue they poll at a share of it;
with at least one queued job per device, they come back as soon as a busy device would. A device
holding a lease renews it well before it expires. Jitter spreads devices that were started
together so they never arrive in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class PacePolicy:
    """Bounds and budget of the fleet-wide poll rate."""

    target_polls_per_s: float = 200.0
    min_interval_s: float = 1.0
    max_interval_s: float = 300.0
    busy_interval_s: float = 5.0
    # Share of the poll budget idle devices use while no job is queued anywhere.
    idle_share: float = 0.25
    jitter: float = 0.2


def next_poll_after(
    policy: PacePolicy,
    fleet_size: int,
    *,
    queue_depth: int = 0,
    running: bool = False,
    lease_s: float = 60.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds until the device should call again.

    `fleet_size` is the number of enrolled devices, `queue_depth` the number of QUEUED jobs in
    the fleet, `running` whether this device holds a lease.
    """
    draw = rng.uniform if rng is not None else random.uniform
    fleet = max(fleet_size, 1)
    if running:
        base = min(policy.busy_interval_s, lease_s / 3)
    elif queue_depth >= fleet:
        base = min(fleet / policy.target_polls_per_s, policy.busy_interval_s)
    elif queue_depth > 0:
        base = fleet / policy.target_polls_per_s
    else:
        base = fleet / (policy.target_polls_per_s * policy.idle_share)
    base = min(max(base, policy.min_interval_s), policy.max_interval_s)
    if running:
        base = min(base, lease_s / 3)
    return base * (1 + draw(-policy.jitter, policy.jitter))
