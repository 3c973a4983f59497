"""Device sensors: power, battery, temperature, storage and CPU load, as one plain reading.

Three sources share the `SensorSource` protocol:

    PsutilSensors   what psutil reports (None/{} on machines without battery or thermal sensors)
    SysfsSensors    Linux /sys/class/{power_supply,thermal}, readable without extra packages
    TraceSensors    a JSONL trace replayed against a clock, for tests and demos

A field the source cannot measure is None, never a guess: what an unknown value means is the
gate's policy (agent/gate.py), not the sensor's. No source raises on a missing or garbled file.
This module must not import torch: the idle agent imports it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

# Thermal zones that are unused or broken report 0, -273200 or huge values; outside this range
# a reading is noise, not a temperature.
_PLAUSIBLE_TEMP_C = (-40.0, 150.0)


@dataclass(frozen=True)
class SensorReading:
    """One snapshot of the device's sensors; None means the source could not measure it."""

    charging: bool | None
    battery_pct: float | None
    temperature_c: float | None
    free_storage_bytes: int | None = None
    cpu_load_pct: float | None = None
    has_battery: bool | None = None
    source: str = ""


class SensorSource(Protocol):
    """Anything that can produce a SensorReading on demand."""

    def read(self) -> SensorReading:
        """Return the current reading; never raises for a missing sensor."""
        ...


def free_storage_bytes(path: Path) -> int | None:
    """Return the free bytes of the filesystem holding path, or None if it cannot be stat'ed."""
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None


def _plausible_temp(value: float) -> bool:
    return math.isfinite(value) and _PLAUSIBLE_TEMP_C[0] < value < _PLAUSIBLE_TEMP_C[1]


class PsutilSensors:
    """Sensors as psutil reports them; missing battery or thermal support reads as None."""

    def __init__(self, storage_path: Path = Path(".")) -> None:
        import psutil

        self._psutil = psutil
        self._storage_path = Path(storage_path)
        # cpu_percent(interval=None) measures since the previous call and returns a meaningless
        # 0.0 the first time: prime it now and report None until a real interval has passed.
        psutil.cpu_percent(interval=None)
        self._primed_at = time.monotonic()
        self._cpu_ready = False

    def _cpu_load(self) -> float | None:
        value = float(self._psutil.cpu_percent(interval=None))
        if not self._cpu_ready:
            if time.monotonic() - self._primed_at < 0.1:
                return None
            self._cpu_ready = True
        return value

    def _temperature(self) -> float | None:
        read = getattr(self._psutil, "sensors_temperatures", None)  # absent on macOS/Windows
        if read is None:
            return None
        try:
            groups = read() or {}
        except (OSError, RuntimeError):
            return None
        temps = [
            float(entry.current)
            for entries in groups.values()
            for entry in entries
            if entry.current is not None and _plausible_temp(float(entry.current))
        ]
        return max(temps) if temps else None

    def read(self) -> SensorReading:
        """Read battery, temperature, storage and CPU load through psutil."""
        read_battery = getattr(self._psutil, "sensors_battery", None)
        try:
            battery = read_battery() if read_battery is not None else None
        except (OSError, RuntimeError):
            battery = None
        charging: bool | None = None
        pct: float | None = None
        if battery is not None:
            charging = None if battery.power_plugged is None else bool(battery.power_plugged)
            pct = float(battery.percent) if battery.percent is not None else None
        return SensorReading(
            charging=charging,
            battery_pct=pct,
            temperature_c=self._temperature(),
            free_storage_bytes=free_storage_bytes(self._storage_path),
            cpu_load_pct=self._cpu_load(),
            has_battery=battery is not None,
            source="psutil",
        )


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="strict").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_number(path: Path) -> float | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class SysfsSensors:
    """Linux sysfs power_supply and thermal_zone readings; garbled or missing files read as None."""

    def __init__(self, root: Path = Path("/sys"), storage_path: Path = Path(".")) -> None:
        self._root = Path(root)
        self._storage_path = Path(storage_path)

    def _power(self) -> tuple[bool | None, float | None, bool | None]:
        supplies_dir = self._root / "class" / "power_supply"
        try:
            supplies = sorted(p for p in supplies_dir.iterdir() if p.is_dir())
        except OSError:
            return None, None, None
        charging_votes: list[bool] = []
        capacities: list[float] = []
        batteries = 0
        for supply in supplies:
            kind = _read_text(supply / "type")
            # A wireless mouse's battery is scope "Device"; only the system's own battery counts.
            if kind == "Battery" and _read_text(supply / "scope") != "Device":
                batteries += 1
                status = _read_text(supply / "status")
                if status in ("Charging", "Full"):
                    charging_votes.append(True)
                elif status in ("Discharging", "Not charging"):
                    charging_votes.append(False)
                capacity = _read_number(supply / "capacity")
                if capacity is not None and 0.0 <= capacity <= 100.0:
                    capacities.append(capacity)
            elif kind in ("Mains", "USB", "USB_C", "USB_PD", "Wireless"):
                online = _read_number(supply / "online")
                if online is not None:
                    charging_votes.append(online >= 1)
        charging = any(charging_votes) if charging_votes else None
        pct = sum(capacities) / len(capacities) if capacities else None
        return charging, pct, batteries > 0

    def _temperature(self) -> float | None:
        temps: list[float] = []
        try:
            zones = sorted((self._root / "class" / "thermal").glob("thermal_zone*"))
        except OSError:
            return None
        for zone in zones:
            milli = _read_number(zone / "temp")
            if milli is not None and _plausible_temp(milli / 1000.0):
                temps.append(milli / 1000.0)
        return max(temps) if temps else None

    def read(self) -> SensorReading:
        """Read power supplies and thermal zones under the sysfs root."""
        charging, pct, has_battery = self._power()
        return SensorReading(
            charging=charging,
            battery_pct=pct,
            temperature_c=self._temperature(),
            free_storage_bytes=free_storage_bytes(self._storage_path),
            cpu_load_pct=None,
            has_battery=has_battery,
            source=f"sysfs:{self._root}",
        )


def sysfs_has_battery(root: Path = Path("/sys")) -> bool:
    """Return True when the sysfs tree under root shows a system battery."""
    _, _, has_battery = SysfsSensors(root)._power()
    return bool(has_battery)


class TraceError(ValueError):
    """A sensor trace line is malformed; the message names the file, line and field."""

    def __init__(self, path: Path, line: int, field: str, why: str) -> None:
        super().__init__(f"{path}:{line}: field {field!r}: {why}")
        self.path = path
        self.line = line
        self.field = field


@dataclass(frozen=True)
class _TraceRow:
    t: float
    reading: SensorReading


def _check_row(path: Path, line: int, row: Any, prev_t: float | None) -> _TraceRow:
    """Validate one parsed trace row and turn it into a reading at time t."""
    if not isinstance(row, dict):
        raise TraceError(path, line, "<row>", "expected a JSON object")
    allowed = {"t", "charging", "battery", "temp_c", "free_storage_bytes", "cpu_load_pct"}
    for key in row:
        if key not in allowed:
            raise TraceError(path, line, str(key), f"unknown field; allowed: {sorted(allowed)}")

    def number(field: str, lo: float, hi: float, required: bool) -> float | None:
        if field not in row:
            if required:
                raise TraceError(path, line, field, "missing")
            return None
        value = row[field]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TraceError(path, line, field, f"expected a number, got {value!r}")
        if not (math.isfinite(value) and lo <= value <= hi):
            raise TraceError(path, line, field, f"{value!r} is outside [{lo}, {hi}]")
        return float(value)

    if row.get("t", 0) is None:
        raise TraceError(path, line, "t", "must not be null")
    t = number("t", 0.0, math.inf, required=True)
    assert t is not None  # present and not null, checked above
    if prev_t is not None and t < prev_t:
        raise TraceError(path, line, "t", f"{t} goes back in time (previous row t={prev_t})")
    if "charging" not in row:
        raise TraceError(path, line, "charging", "missing")
    charging = row["charging"]
    if charging is not None and not isinstance(charging, bool):
        raise TraceError(path, line, "charging", f"expected true/false/null, got {charging!r}")
    battery = number("battery", 0.0, 100.0, required=True)
    temp = number("temp_c", *_PLAUSIBLE_TEMP_C, required=True)
    storage = number("free_storage_bytes", 0.0, math.inf, required=False)
    cpu = number("cpu_load_pct", 0.0, 100.0, required=False)
    reading = SensorReading(
        charging=charging,
        battery_pct=battery,
        temperature_c=temp,
        free_storage_bytes=None if storage is None else int(storage),
        cpu_load_pct=cpu,
        has_battery=True,
        source=f"trace:{path.name}",
    )
    return _TraceRow(t, reading)


def load_trace(path: Path) -> list[tuple[float, SensorReading]]:
    """Parse and validate a JSONL sensor trace into (t, reading) rows; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(path, 0, "<file>", f"cannot read: {exc}") from exc
    rows: list[_TraceRow] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(path, line_no, "<row>", f"not JSON: {exc.msg}") from exc
        rows.append(_check_row(path, line_no, raw, rows[-1].t if rows else None))
    if not rows:
        raise TraceError(path, 0, "<file>", "trace has no rows")
    return [(r.t, r.reading) for r in rows]


class TraceSensors:
    """Replay a JSONL trace: the reading at scaled elapsed time is the last row with t <= it."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        speed: float = 1.0,
        loop: bool = False,
    ) -> None:
        if not (isinstance(speed, int | float) and math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a positive number, got {speed!r}")
        self.path = Path(path)
        self._rows = load_trace(self.path)
        self._times = [t for t, _ in self._rows]
        self._clock = clock
        self._speed = float(speed)
        self._loop = loop
        self._start = clock()

    @property
    def duration_s(self) -> float:
        """Trace time of the last row; with loop=True the trace restarts at this point."""
        return self._times[-1]

    def elapsed(self) -> float:
        """Return the trace time now (wall time since construction times speed, maybe wrapped)."""
        elapsed = (self._clock() - self._start) * self._speed
        if self._loop and self.duration_s > 0:
            elapsed %= self.duration_s
        return elapsed

    def read(self) -> SensorReading:
        """Return the trace row in effect now; before the first row's t, the first row."""
        import bisect

        index = bisect.bisect_right(self._times, self.elapsed()) - 1
        return self._rows[max(index, 0)][1]


def parse_sensor_spec(spec: str, *, storage_path: Path = Path(".")) -> SensorSource:
    """Build a source from "psutil", "sysfs[:/root]", "trace:/p.jsonl[?speed=N&loop=1]" or "auto"."""
    kind, _, arg = spec.partition(":")
    if spec == "psutil":
        return PsutilSensors(storage_path)
    if kind == "sysfs":
        return SysfsSensors(Path(arg) if arg else Path("/sys"), storage_path)
    if kind == "trace" and arg:
        file_part, _, query = arg.partition("?")
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False) if query else {}
        unknown = set(params) - {"speed", "loop"}
        if unknown:
            raise ValueError(f"sensor spec {spec!r}: unknown option(s) {sorted(unknown)}")
        speed = 1.0
        if "speed" in params:
            try:
                speed = float(params["speed"][-1])
            except ValueError as exc:
                raise ValueError(f"sensor spec {spec!r}: speed must be a number") from exc
        loop_text = params.get("loop", ["0"])[-1].lower()
        if loop_text not in ("0", "1", "true", "false", "yes", "no"):
            raise ValueError(f"sensor spec {spec!r}: loop must be 0 or 1, got {loop_text!r}")
        return TraceSensors(Path(file_part), speed=speed, loop=loop_text in ("1", "true", "yes"))
    if spec == "auto":
        if sysfs_has_battery(Path("/sys")):
            return SysfsSensors(Path("/sys"), storage_path)
        return PsutilSensors(storage_path)
    raise ValueError(f"unknown sensor spec {spec!r}; expected psutil, sysfs[:ROOT], trace:PATH or auto")
