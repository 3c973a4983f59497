"""The eligibility gate: hysteresis, every reason, missing-sensor policy and policy files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.gate import Eligibility, Gate, GatePolicy, Reason
from agent.sensors import SensorReading


def reading(
    *,
    charging: bool | None = True,
    battery: float | None = 80.0,
    temp: float | None = 30.0,
    storage: int | None = 10 * 2**30,
    cpu: float | None = 10.0,
    has_battery: bool | None = True,
) -> SensorReading:
    return SensorReading(charging, battery, temp, storage, cpu, has_battery, "test")


def test_eligible_when_charging_full_and_cool() -> None:
    result = Gate().evaluate(reading())
    assert result == Eligibility(True, Reason.ELIGIBLE, result.detail)
    assert "charging" in result.detail and "80%" in result.detail


def test_hysteresis_sequence() -> None:
    gate = Gate(GatePolicy(temp_high_c=45.0, temp_low_c=40.0))
    temps = [30.0, 44.9, 45.0, 44.0, 41.0, 40.0, 39.9, 44.0, 46.0, 39.0]
    got = [gate.evaluate(reading(temp=t)).reason for t in temps]
    E, H = Reason.ELIGIBLE, Reason.TOO_HOT
    assert got == [E, E, H, H, H, H, E, E, H, E]


def test_hot_detail_is_readable() -> None:
    gate = Gate()
    assert gate.evaluate(reading(temp=47.0)).detail == "temperature 47.0°C >= 45.0°C high mark"
    assert "not yet below 40.0°C" in gate.evaluate(reading(temp=42.0)).detail


def test_latch_updates_while_unplugged() -> None:
    gate = Gate()
    assert gate.evaluate(reading(charging=False, temp=50.0)).reason is Reason.TOO_HOT
    # Plugged in again at 42 °C: still cooling down, even though the hot reading came unplugged.
    assert gate.evaluate(reading(temp=42.0)).reason is Reason.TOO_HOT
    assert gate.hot
    gate.reset()
    assert gate.evaluate(reading(temp=42.0)).eligible


@pytest.mark.parametrize(
    ("policy", "kwargs", "reason", "detail"),
    [
        (GatePolicy(), {"charging": False}, Reason.NOT_CHARGING, "not charging"),
        (GatePolicy(), {"battery": 49.0}, Reason.BATTERY_LOW, "battery 49% is not above 50%"),
        (GatePolicy(), {"temp": 45.0}, Reason.TOO_HOT, "45.0°C >= 45.0°C"),
        (
            GatePolicy(min_free_storage_bytes=2**30),
            {"storage": 2**20},
            Reason.STORAGE_LOW,
            "free storage 1 MiB < 1024 MiB",
        ),
        (GatePolicy(max_cpu_load_pct=50.0), {"cpu": 90.0}, Reason.CPU_BUSY, "CPU load 90%"),
        (GatePolicy(), {"charging": None}, Reason.SENSOR_UNKNOWN, "charging state unknown"),
        (GatePolicy(), {"battery": None}, Reason.SENSOR_UNKNOWN, "battery level unknown"),
        (
            GatePolicy(min_free_storage_bytes=1),
            {"storage": None},
            Reason.SENSOR_UNKNOWN,
            "free storage unknown",
        ),
    ],
)
def test_each_reason(policy: GatePolicy, kwargs: dict, reason: Reason, detail: str) -> None:
    result = Gate(policy).evaluate(reading(**kwargs))
    assert not result.eligible
    assert result.reason is reason
    assert detail in result.detail


def test_battery_must_be_strictly_above_the_minimum() -> None:
    at_minimum = Gate().evaluate(reading(battery=50.0))

    assert not at_minimum.eligible and at_minimum.reason is Reason.BATTERY_LOW
    assert "50% is not above 50%" in at_minimum.detail
    assert Gate().evaluate(reading(battery=50.1)).eligible
    assert Gate(GatePolicy(min_battery_pct=80.0)).evaluate(reading(battery=80.0)).reason is Reason.BATTERY_LOW
    assert Gate(GatePolicy(min_battery_pct=0.0)).evaluate(reading(battery=0.5)).eligible


def test_precedence_hot_before_unplugged_before_low_battery() -> None:
    gate = Gate(GatePolicy(min_free_storage_bytes=2**30, max_cpu_load_pct=10.0))
    worst = reading(charging=False, battery=5.0, temp=60.0, storage=0, cpu=99.0)
    assert gate.evaluate(worst).reason is Reason.TOO_HOT
    gate.reset()
    assert gate.evaluate(reading(charging=False, battery=5.0, storage=0)).reason is Reason.NOT_CHARGING
    assert gate.evaluate(reading(battery=5.0, storage=0, cpu=99.0)).reason is Reason.BATTERY_LOW
    assert gate.evaluate(reading(storage=0, cpu=99.0)).reason is Reason.STORAGE_LOW
    assert gate.evaluate(reading(cpu=99.0)).reason is Reason.CPU_BUSY


def test_not_charging_is_fine_when_charging_not_required() -> None:
    result = Gate(GatePolicy(require_charging=False)).evaluate(reading(charging=False))
    assert result.eligible and "on battery" in result.detail


def test_no_battery_external_power_is_eligible() -> None:
    # What psutil reports on these machines: no battery, no temperature.
    r = reading(charging=None, battery=None, temp=None, has_battery=False)
    result = Gate().evaluate(r)
    assert result.eligible and "external power" in result.detail


def test_no_battery_deny() -> None:
    r = reading(charging=None, battery=None, has_battery=False)
    result = Gate(GatePolicy(no_battery="deny")).evaluate(r)
    assert (result.eligible, result.reason) == (False, Reason.NOT_CHARGING)


def test_unknown_temperature_policy() -> None:
    assert Gate(GatePolicy(unknown_temperature="allow")).evaluate(reading(temp=None)).eligible
    denied = Gate(GatePolicy(unknown_temperature="deny")).evaluate(reading(temp=None))
    assert denied.reason is Reason.SENSOR_UNKNOWN and "temperature unknown" in denied.detail


def test_unknown_temperature_keeps_hot_latch() -> None:
    gate = Gate(GatePolicy(unknown_temperature="allow"))
    gate.evaluate(reading(temp=50.0))
    assert gate.evaluate(reading(temp=None)).reason is Reason.TOO_HOT
    assert gate.evaluate(reading(temp=35.0)).eligible


def test_unknown_charging_allow_assumes_charging() -> None:
    gate = Gate(GatePolicy(unknown_charging="allow"))
    assert gate.evaluate(reading(charging=None, battery=None, has_battery=None)).eligible
    assert gate.evaluate(reading(charging=None, battery=10.0)).reason is Reason.BATTERY_LOW


def test_unknown_cpu_is_allowed() -> None:
    assert Gate(GatePolicy(max_cpu_load_pct=50.0)).evaluate(reading(cpu=None)).eligible


@given(st.lists(st.floats(min_value=20.0, max_value=60.0), min_size=1, max_size=40))
def test_hysteresis_property(temps: list[float]) -> None:
    gate = Gate()
    hot = False
    for t in temps:
        result = gate.evaluate(reading(temp=t))
        hot = t >= 45.0 or (hot and t >= 40.0)
        assert result.eligible is (not hot)


# --- policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temp_low_c": 45.0}, "temp_low_c must be < temp_high_c"),
        ({"min_battery_pct": 101.0}, "min_battery_pct"),
        ({"min_battery_pct": 100.0}, "min_battery_pct"),
        ({"min_battery_pct": "50"}, "min_battery_pct"),
        ({"min_free_storage_bytes": -1}, "min_free_storage_bytes"),
        ({"max_cpu_load_pct": 0.0}, "max_cpu_load_pct"),
        ({"no_battery": "yolo"}, "no_battery"),
        ({"unknown_temperature": "maybe"}, "unknown_temperature"),
        ({"unknown_charging": True}, "unknown_charging"),
        ({"require_charging": "yes"}, "require_charging"),
        ({"temp_high_c": float("nan")}, "temp_high_c"),
    ],
)
def test_policy_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GatePolicy(**kwargs)


def test_policy_from_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "gate.toml"
    toml.write_text("[gate]\nmin_battery_pct = 70\ntemp_high_c = 42.0\ntemp_low_c = 38.0\n")
    flat = tmp_path / "flat.toml"
    flat.write_text('unknown_temperature = "deny"\n')
    js = tmp_path / "gate.json"
    js.write_text(json.dumps({"no_battery": "deny", "max_cpu_load_pct": 80}))

    assert GatePolicy.from_file(toml) == GatePolicy(min_battery_pct=70, temp_high_c=42.0, temp_low_c=38.0)
    assert GatePolicy.from_file(flat).unknown_temperature == "deny"
    assert GatePolicy.from_file(js) == GatePolicy(no_battery="deny", max_cpu_load_pct=80)


def test_policy_file_errors_name_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("temp_low_c = 50.0\n")
    with pytest.raises(ValueError, match=r"bad.toml: temp_low_c must be < temp_high_c"):
        GatePolicy.from_file(bad)
    typo = tmp_path / "typo.json"
    typo.write_text('{"min_batery_pct": 10}')
    with pytest.raises(ValueError, match="min_batery_pct"):
        GatePolicy.from_file(typo)
    broken = tmp_path / "broken.toml"
    broken.write_text("min_battery_pct = \n")
    with pytest.raises(ValueError, match="cannot parse"):
        GatePolicy.from_file(broken)
    with pytest.raises(ValueError, match=r"\.toml or \.json"):
        GatePolicy.from_file(tmp_path / "gate.yaml")


def test_with_overrides_validates() -> None:
    base = GatePolicy()
    assert base.with_overrides(min_battery_pct=20.0).min_battery_pct == 20.0
    assert base.min_battery_pct == 50.0
    with pytest.raises(ValueError, match="temp_low_c"):
        base.with_overrides(temp_low_c=46.0)
    with pytest.raises(ValueError, match="bogus"):
        base.with_overrides(bogus=1)


def test_reason_values_match_proto_enum_names() -> None:
    proto = (Path(__file__).parents[2] / "protos" / "pocketlora" / "v1" / "types.proto").read_text()
    for reason in Reason:
        assert f"ELIGIBILITY_REASON_{reason.value} =" in proto
