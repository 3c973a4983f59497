"""Sensor sources: fake sysfs trees, psutil on this machine, trace parsing and time scaling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.sensors import (
    PsutilSensors,
    SensorReading,
    SysfsSensors,
    TraceError,
    TraceSensors,
    parse_sensor_spec,
)

DATA = Path(__file__).resolve().parents[2] / "agent" / "data"


def _supply(root: Path, name: str, **files: str | bytes) -> None:
    d = root / "class" / "power_supply" / name
    d.mkdir(parents=True)
    for fname, content in files.items():
        path = d / fname
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content + "\n")


def _zone(root: Path, idx: int, temp: str | bytes | None) -> None:
    d = root / "class" / "thermal" / f"thermal_zone{idx}"
    d.mkdir(parents=True)
    if isinstance(temp, bytes):
        (d / "temp").write_bytes(temp)
    elif temp is not None:
        (d / "temp").write_text(temp + "\n")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- sysfs ----------------------------------------------------------------------------------


def test_sysfs_laptop_discharging_with_max_thermal_zone(tmp_path: Path) -> None:
    _supply(tmp_path, "BAT0", type="Battery", status="Discharging", capacity="64")
    _supply(tmp_path, "AC", type="Mains", online="0")
    _zone(tmp_path, 0, "38500")
    _zone(tmp_path, 1, "51250")

    reading = SysfsSensors(tmp_path, storage_path=tmp_path).read()

    assert reading.charging is False
    assert reading.battery_pct == 64.0
    assert reading.temperature_c == 51.25
    assert reading.has_battery is True
    assert reading.free_storage_bytes is not None and reading.free_storage_bytes > 0


@pytest.mark.parametrize("status", ["Charging", "Full"])
def test_sysfs_battery_status_charging_or_full(tmp_path: Path, status: str) -> None:
    _supply(tmp_path, "BAT0", type="Battery", status=status, capacity="99")
    assert SysfsSensors(tmp_path).read().charging is True


def test_sysfs_online_usb_supply_means_charging(tmp_path: Path) -> None:
    # Some phones report "Not charging" at a charge threshold while the charger is online.
    _supply(tmp_path, "battery", type="Battery", status="Not charging", capacity="80")
    _supply(tmp_path, "usb", type="USB", online="1")
    assert SysfsSensors(tmp_path).read().charging is True


def test_sysfs_ignores_peripheral_batteries(tmp_path: Path) -> None:
    _supply(tmp_path, "hid-mouse", type="Battery", scope="Device", status="Discharging", capacity="5")
    _supply(tmp_path, "AC", type="Mains", online="1")
    reading = SysfsSensors(tmp_path).read()
    assert reading.has_battery is False
    assert reading.battery_pct is None
    assert reading.charging is True


def test_sysfs_garbled_and_missing_files_read_as_none(tmp_path: Path) -> None:
    _supply(tmp_path, "BAT0", type="Battery", status="???", capacity="lots")
    _supply(tmp_path, "BAT1", type=b"\xff\xfe\x00garbage", capacity="70")
    _supply(tmp_path, "weird")  # no files at all
    _zone(tmp_path, 0, "hot")
    _zone(tmp_path, 1, None)
    _zone(tmp_path, 2, b"\x00\xff")
    _zone(tmp_path, 3, "-273200")  # an unused zone
    (tmp_path / "class" / "thermal" / "thermal_zone4").write_text("not a dir")

    reading = SysfsSensors(tmp_path).read()

    assert reading.charging is None
    assert reading.battery_pct is None
    assert reading.temperature_c is None
    assert reading.has_battery is True


def test_sysfs_missing_root_reads_all_unknown(tmp_path: Path) -> None:
    reading = SysfsSensors(tmp_path / "nope", storage_path=tmp_path / "nope").read()
    assert reading == SensorReading(
        charging=None,
        battery_pct=None,
        temperature_c=None,
        free_storage_bytes=None,
        cpu_load_pct=None,
        has_battery=None,
        source=f"sysfs:{tmp_path / 'nope'}",
    )


def test_sysfs_two_batteries_average(tmp_path: Path) -> None:
    _supply(tmp_path, "BAT0", type="Battery", status="Discharging", capacity="40")
    _supply(tmp_path, "BAT1", type="Battery", status="Charging", capacity="60")
    reading = SysfsSensors(tmp_path).read()
    assert reading.battery_pct == 50.0
    assert reading.charging is True


# --- psutil ---------------------------------------------------------------------------------


def test_psutil_on_this_machine_reports_missing_sensors_as_none(tmp_path: Path) -> None:
    sensors = PsutilSensors(tmp_path)
    first = sensors.read()
    # docs/platform.md: no battery and no thermal sensors here; first cpu reading is not a measurement.
    assert first.source == "psutil"
    assert first.cpu_load_pct is None
    assert first.free_storage_bytes is not None
    if first.has_battery is False:
        assert first.charging is None and first.battery_pct is None


def test_psutil_cpu_load_becomes_known(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sensors = PsutilSensors(tmp_path)
    monkeypatch.setattr(sensors, "_primed_at", sensors._primed_at - 1.0)
    load = sensors.read().cpu_load_pct
    assert load is not None and 0.0 <= load <= 100.0


def test_sensors_and_gate_do_not_import_torch() -> None:
    code = "import sys, agent.sensors, agent.gate; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=DATA.parents[1])


# --- traces ---------------------------------------------------------------------------------


def _write(tmp_path: Path, rows: list[object] | str) -> Path:
    path = tmp_path / "trace.jsonl"
    if isinstance(rows, str):
        path.write_text(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROW = {"t": 0, "charging": True, "battery": 80, "temp_c": 30.0}


@pytest.mark.parametrize(
    ("rows", "line", "field"),
    [
        ([ROW, {**ROW, "t": 1, "battery": 120}], 2, "battery"),
        ([ROW, {**ROW, "t": 2}, {**ROW, "t": 1}], 3, "t"),
        ([ROW, {"t": 1, "battery": 50, "temp_c": 30}], 2, "charging"),
        ([{**ROW, "charging": "yes"}], 1, "charging"),
        ([{**ROW, "temp_c": "hot"}], 1, "temp_c"),
        ([{**ROW, "temp": 30.0}], 1, "temp"),
        ([ROW, [1, 2]], 2, "<row>"),
        ([{**ROW, "t": None}], 1, "t"),
        ([{**ROW, "cpu_load_pct": 101}], 1, "cpu_load_pct"),
    ],
)
def test_trace_errors_name_file_line_and_field(tmp_path: Path, rows: list[object], line: int, field: str) -> None:
    path = _write(tmp_path, rows)
    with pytest.raises(TraceError) as info:
        TraceSensors(path)
    assert info.value.line == line
    assert info.value.field == field
    assert f"{path}:{line}: field {field!r}" in str(info.value)


def test_trace_bad_json_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path, json.dumps(ROW) + "\n\n{not json\n")
    with pytest.raises(TraceError, match=r"trace.jsonl:3: field '<row>': not JSON"):
        TraceSensors(path)


def test_trace_empty_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no rows"):
        TraceSensors(_write(tmp_path, "\n"))


def test_trace_follows_scaled_clock(tmp_path: Path) -> None:
    rows = [ROW, {**ROW, "t": 10, "temp_c": 47.0}, {**ROW, "t": 20, "charging": False}]
    clock = FakeClock()
    sensors = TraceSensors(_write(tmp_path, rows), clock=clock, speed=10.0)

    temps = []
    for wall in (0.0, 0.5, 0.99, 1.0, 1.5, 2.0, 50.0):
        clock.now = 1000.0 + wall
        temps.append((sensors.read().temperature_c, sensors.read().charging))

    assert temps == [
        (30.0, True),
        (30.0, True),
        (30.0, True),
        (47.0, True),
        (47.0, True),
        (30.0, False),
        (30.0, False),  # past the end the last row holds
    ]


def test_trace_loop_wraps_at_last_row(tmp_path: Path) -> None:
    rows = [ROW, {**ROW, "t": 10, "temp_c": 47.0}, {**ROW, "t": 20, "temp_c": 31.0}]
    clock = FakeClock()
    sensors = TraceSensors(_write(tmp_path, rows), clock=clock, loop=True)
    clock.now += 25.0
    assert sensors.read().temperature_c == 30.0
    clock.now += 10.0
    assert sensors.read().temperature_c == 47.0


def test_trace_null_fields_are_unknown(tmp_path: Path) -> None:
    reading = TraceSensors(_write(tmp_path, [{**ROW, "charging": None, "temp_c": None}])).read()
    assert reading.charging is None and reading.temperature_c is None


@pytest.mark.parametrize("name", ["demo_hot_spell.jsonl", "unplugged.jsonl"])
def test_shipped_traces_parse(name: str) -> None:
    sensors = TraceSensors(DATA / name)
    assert sensors.duration_s >= 40


def test_demo_trace_has_a_hot_spell_between_cool_charging_phases() -> None:
    clock = FakeClock()
    sensors = TraceSensors(DATA / "demo_hot_spell.jsonl", clock=clock)
    at = {}
    for t in (5.0, 30.0, 58.0):
        clock.now = 1000.0 + t
        at[t] = sensors.read()
    assert at[5.0].charging and at[5.0].battery_pct == pytest.approx(80.0, abs=1.0)
    assert at[5.0].temperature_c is not None and at[5.0].temperature_c < 40.0
    assert at[30.0].temperature_c is not None and at[30.0].temperature_c >= 45.0
    assert at[58.0].charging and at[58.0].temperature_c is not None
    assert at[58.0].temperature_c < 40.0


# --- specs ----------------------------------------------------------------------------------


def test_parse_sensor_spec_variants(tmp_path: Path) -> None:
    assert isinstance(parse_sensor_spec("psutil"), PsutilSensors)
    assert isinstance(parse_sensor_spec("sysfs"), SysfsSensors)
    sysfs = parse_sensor_spec(f"sysfs:{tmp_path}")
    assert isinstance(sysfs, SysfsSensors) and sysfs.read().source == f"sysfs:{tmp_path}"
    trace = parse_sensor_spec(f"trace:{DATA / 'unplugged.jsonl'}?speed=10&loop=1")
    assert isinstance(trace, TraceSensors)
    assert trace._speed == 10.0 and trace._loop is True
    # No battery in this machine's sysfs, so auto falls back to psutil.
    assert isinstance(parse_sensor_spec("auto"), PsutilSensors | SysfsSensors)


@pytest.mark.parametrize("spec", ["bogus", "trace:", "trace:/x.jsonl?fast=1", "trace:/x.jsonl?speed=abc", "Psutil"])
def test_parse_sensor_spec_rejects_unknown(spec: str) -> None:
    with pytest.raises(ValueError, match="spec"):
        parse_sensor_spec(spec)


def test_parse_sensor_spec_rejects_bad_speed() -> None:
    with pytest.raises(ValueError, match="speed"):
        parse_sensor_spec(f"trace:{DATA / 'unplugged.jsonl'}?speed=0")
