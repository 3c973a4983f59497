"""Pace steering: the interval a poll reply suggests, as a pure function."""

from __future__ import annotations

import random

from orchestrator.pace import PacePolicy, next_poll_after

POLICY = PacePolicy(target_polls_per_s=100.0, min_interval_s=1.0, max_interval_s=300.0, busy_interval_s=5.0, jitter=0)


def interval(fleet: int, queued: int = 0, **kw: object) -> float:
    return next_poll_after(POLICY, fleet, queue_depth=queued, **kw)  # type: ignore[arg-type]


def test_idle_devices_space_out_as_the_fleet_grows() -> None:
    # With work queued, the fleet as a whole polls at the target rate: interval = fleet / rate.
    assert [interval(n, queued=1) for n in (50, 1_000, 10_000)] == [1.0, 10.0, 100.0]


def test_an_empty_queue_stretches_idle_polling_and_a_deep_one_shortens_it() -> None:
    fleet = 2_000
    empty, some, deep = interval(fleet, 0), interval(fleet, 10), interval(fleet, fleet)

    assert empty == fleet / (100.0 * POLICY.idle_share)
    assert some == 20.0
    assert deep == POLICY.busy_interval_s
    assert empty > some > deep


def test_bounds_hold_for_tiny_and_huge_fleets() -> None:
    assert interval(1, queued=1) == POLICY.min_interval_s
    assert interval(10_000_000, queued=0) == POLICY.max_interval_s


def test_a_device_holding_a_lease_renews_well_before_it_expires() -> None:
    assert interval(100_000, running=True, lease_s=60.0) == 5.0
    assert interval(100_000, running=True, lease_s=9.0) == 3.0


def test_jitter_spreads_devices_within_its_bounds() -> None:
    policy = PacePolicy(target_polls_per_s=100.0, jitter=0.2)
    rng = random.Random(7)
    draws = [next_poll_after(policy, 1_000, queue_depth=1, rng=rng) for _ in range(200)]

    assert min(draws) >= 8.0 and max(draws) <= 12.0
    assert max(draws) - min(draws) > 2.0  # not in lockstep
