"""Pace steering: when a device should come back, sized to the fleet (Bonawitz et al. 2019, 2.3).

Pure functions. The orchestrator aims at a target rate of polls per second across the whole
fleet, so the interval grows with the fleet; devices with work due poll sooner; jitter spreads
devices that were started together so they never arrive in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class PacePolicy:
    """Bounds and target of the fleet-wide poll rate."""

    target_polls_per_s: float = 200.0
    min_interval_s: float = 1.0
    max_interval_s: float = 300.0
    busy_interval_s: float = 5.0
    jitter: float = 0.2


def next_poll_after(
    policy: PacePolicy,
    fleet_size: int,
    *,
    has_work: bool = False,
    running: bool = False,
    lease_s: float = 60.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds until the device should call again."""
    draw = rng.uniform if rng is not None else random.uniform
    base = max(fleet_size, 1) / policy.target_polls_per_s
    if running:
        # A device holding a lease must renew it well before it expires.
        base = min(policy.busy_interval_s, lease_s / 3)
    elif has_work:
        base = min(base, policy.busy_interval_s)
    base = min(max(base, policy.min_interval_s), policy.max_interval_s)
    if running:
        base = min(base, lease_s / 3)
    return base * (1 + draw(-policy.jitter, policy.jitter))
