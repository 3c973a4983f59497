"""Gate policy from the fleet on the device: over local defaults, within a local veto, by the hour."""

from __future__ import annotations

import time

import pytest

from agent.fleet_gate import FleetGate, effective, fleet_fields
from agent.gate import Gate, GatePolicy
from agent.sensors import SensorReading
from protos.pocketlora.v1 import types_pb2 as tpb
from protos.wire import EligibilityReason


def reading(battery: float = 70.0, temp: float = 30.0) -> SensorReading:
    return SensorReading(charging=True, battery_pct=battery, temperature_c=temp, has_battery=True)


def test_only_the_fields_the_fleet_sets_arrive() -> None:
    got = fleet_fields(tpb.GatePolicy(min_battery_pct=80.2, start_hour=0, end_hour=6))
    assert got == {"min_battery_pct": 80.2, "start_hour": 0, "end_hour": 6}  # hour 0 is set, not unset
    assert fleet_fields(None) == {} and fleet_fields(tpb.GatePolicy()) == {}


def test_without_a_veto_the_fleet_overrides_local_defaults_both_ways() -> None:
    local = GatePolicy(min_battery_pct=50.0, temp_high_c=45.0, temp_low_c=40.0)
    assert effective(local, {"min_battery_pct": 30.0}, veto=False).min_battery_pct == 30.0
    assert effective(local, {"temp_high_c": 50.0, "temp_low_c": 44.0}, veto=False).temp_high_c == 50.0
    assert effective(local, {}, veto=False) is local


def test_with_a_veto_the_fleet_can_only_tighten() -> None:
    local = GatePolicy(min_battery_pct=50.0, temp_high_c=45.0, temp_low_c=40.0, start_hour=1, end_hour=6)
    loose = effective(local, {"min_battery_pct": 30.0, "temp_high_c": 60.0, "require_charging": False}, veto=True)
    assert (loose.min_battery_pct, loose.temp_high_c, loose.require_charging) == (50.0, 45.0, True)
    tight = effective(local, {"min_battery_pct": 80.0, "temp_high_c": 38.0, "temp_low_c": 35.0}, veto=True)
    assert (tight.min_battery_pct, tight.temp_high_c, tight.temp_low_c) == (80.0, 38.0, 35.0)
    assert effective(local, {"start_hour": 10, "end_hour": 12}, veto=True).start_hour == 1  # local hours stay
    assert effective(GatePolicy(), {"max_cpu_load_pct": 40.0}, veto=True).max_cpu_load_pct == 40.0


def test_a_policy_change_closes_the_gate_and_removing_it_reopens_it() -> None:
    gate = Gate(GatePolicy())
    fleet = FleetGate(gate)
    assert gate.evaluate(reading(battery=70)).eligible
    said = fleet.apply({"min_battery_pct": 90.0}, ["beta-battery"])
    assert "beta-battery" in said and "min_battery_pct=90.0" in said
    denied = gate.evaluate(reading(battery=70))
    assert denied.reason == EligibilityReason.BATTERY_LOW and "90" in denied.detail
    assert fleet.apply({"min_battery_pct": 90.0}, ["beta-battery"]) == ""  # unchanged: nothing to say
    assert fleet.apply({}, []) == "back to the local gate policy"
    assert gate.evaluate(reading(battery=70)).eligible


def test_an_unusable_fleet_policy_keeps_the_current_one() -> None:
    gate = Gate(GatePolicy(temp_high_c=45.0, temp_low_c=40.0))
    fleet = FleetGate(gate)
    assert fleet.apply({"temp_high_c": 39.0}, ["hot"]) == ""  # 39 would fall below the local 40 low mark
    assert gate.policy.temp_high_c == 45.0


@pytest.mark.parametrize(("start", "end", "hour", "open_"), [(1, 6, 3, True), (1, 6, 6, False), (22, 6, 23, True)])
def test_hours_of_the_day(start: int, end: int, hour: int, open_: bool) -> None:
    at = time.mktime((2026, 3, 10, hour, 30, 0, 0, 0, -1))  # local time
    gate = Gate(GatePolicy(start_hour=start, end_hour=end), clock=lambda: at)
    got = gate.evaluate(reading())
    assert got.eligible == open_
    if not open_:
        assert got.reason == EligibilityReason.OUTSIDE_HOURS and f"{start}:00-{end}:00" in got.detail


@pytest.mark.parametrize("kw", [{"start_hour": 3}, {"start_hour": 3, "end_hour": 3}, {"start_hour": 24, "end_hour": 2}])
def test_bad_hours_are_refused_naming_the_field(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="hour"):
        GatePolicy(**kw)  # type: ignore[arg-type]
