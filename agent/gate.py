"""The eligibility gate: may this device train right now, and if not, why not.

A device trains only when it is charging, its battery is at or above `min_battery_pct`, it is
cool, it has free storage and (optionally) an idle CPU. Temperature has hysteresis: the gate
pauses at or above `temp_high_c` and resumes only once the temperature falls below `temp_low_c`,
so a device hovering at the high mark does not flap between training and pausing.

Precedence: checks run in this order and the first that fails is reported; within a check, a
sensor that is unreadable under a "deny" policy reports SENSOR_UNKNOWN:

    1. thermal   TOO_HOT (safety first; also while the hot latch holds) or SENSOR_UNKNOWN
    2. power     SENSOR_UNKNOWN, or NOT_CHARGING (unplugged, or no battery with no_battery="deny")
    3. battery   BATTERY_LOW below min_battery_pct
    4. storage   SENSOR_UNKNOWN, or STORAGE_LOW below min_free_storage_bytes
    5. cpu       CPU_BUSY above max_cpu_load_pct
    6. hours     OUTSIDE_HOURS outside [start_hour, end_hour) local time, when both are set
                 (a window with end_hour < start_hour wraps past midnight)

Missing-sensor policy (psutil reports no battery and no temperature on many machines):

- No battery (`has_battery` False): `no_battery="external_power"` treats the machine as a
  mains-powered box, i.e. charging at 100%; `"deny"` refuses with NOT_CHARGING.
- Unknown temperature: `unknown_temperature="allow"` trains without a thermal check, `"deny"`
  refuses with SENSOR_UNKNOWN. While the hot latch holds, an unknown temperature keeps it held:
  nothing proves the device cooled down.
- Unknown charging state or battery level on a device that may have a battery:
  `unknown_charging="deny"` refuses with SENSOR_UNKNOWN, `"allow"` assumes charging and full.
- Unknown free storage counts as SENSOR_UNKNOWN only when `min_free_storage_bytes` > 0.
- Unknown CPU load is allowed: the CPU check is a courtesy, not a safety limit, and psutil's
  first reading is always unknown.

This module must not import torch: the idle agent imports it.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from agent.sensors import SensorReading
from protos.wire import EligibilityReason

_NO_BATTERY_CHOICES = ("external_power", "deny")
_UNKNOWN_CHOICES = ("allow", "deny")


@dataclass
class GatePolicy:
    """Thresholds and missing-sensor policy of the gate; validated on construction."""

    require_charging: bool = True
    min_battery_pct: float = 50.0
    temp_high_c: float = 45.0  # pause at or above
    temp_low_c: float = 40.0  # resume strictly below
    min_free_storage_bytes: int = 0
    max_cpu_load_pct: float | None = None
    no_battery: str = "external_power"
    unknown_temperature: str = "allow"
    unknown_charging: str = "deny"
    # Train only in [start_hour, end_hour) of the device's local time; None for any hour.
    start_hour: int | None = None
    end_hour: int | None = None

    def __post_init__(self) -> None:
        """Reject values that would make the gate meaningless, naming the field and value."""
        if not isinstance(self.require_charging, bool):
            raise ValueError(f"require_charging must be a bool, got {self.require_charging!r}")
        for name in ("min_battery_pct", "temp_high_c", "temp_low_c"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if not 0.0 <= self.min_battery_pct <= 100.0:
            raise ValueError(f"min_battery_pct must be in [0, 100], got {self.min_battery_pct!r}")
        if not self.temp_low_c < self.temp_high_c:
            raise ValueError(
                f"temp_low_c must be < temp_high_c, got temp_low_c={self.temp_low_c!r} "
                f"and temp_high_c={self.temp_high_c!r}"
            )
        storage = self.min_free_storage_bytes
        if isinstance(storage, bool) or not isinstance(storage, int) or storage < 0:
            raise ValueError(f"min_free_storage_bytes must be an int >= 0, got {storage!r}")
        cpu = self.max_cpu_load_pct
        if cpu is not None and (isinstance(cpu, bool) or not isinstance(cpu, int | float) or not 0.0 < cpu <= 100.0):
            raise ValueError(f"max_cpu_load_pct must be None or in (0, 100], got {cpu!r}")
        if self.no_battery not in _NO_BATTERY_CHOICES:
            raise ValueError(f"no_battery must be one of {_NO_BATTERY_CHOICES}, got {self.no_battery!r}")
        for name in ("unknown_temperature", "unknown_charging"):
            if getattr(self, name) not in _UNKNOWN_CHOICES:
                raise ValueError(f"{name} must be one of {_UNKNOWN_CHOICES}, got {getattr(self, name)!r}")
        self._check_hours()

    def _check_hours(self) -> None:
        if (self.start_hour is None) != (self.end_hour is None):
            raise ValueError(f"start_hour and end_hour go together, got {self.start_hour!r} and {self.end_hour!r}")
        for name in ("start_hour", "end_hour"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 23):
                raise ValueError(f"{name} must be None or an hour 0-23, got {value!r}")
        if self.start_hour is not None and self.start_hour == self.end_hour:
            raise ValueError(f"end_hour must differ from start_hour ({self.start_hour!r}): the window would be empty")

    def allows_hour(self, hour: int) -> bool:
        """True when training may run in this hour of the day."""
        if self.start_hour is None or self.end_hour is None:
            return True
        if self.start_hour < self.end_hour:
            return self.start_hour <= hour < self.end_hour
        return hour >= self.start_hour or hour < self.end_hour

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GatePolicy:
        """Build a policy from a mapping; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown gate policy field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: Path) -> GatePolicy:
        """Load a policy from TOML (top level or a [gate] table) or JSON, chosen by extension."""
        path = Path(path)
        suffix = path.suffix.lower()
        try:
            if suffix == ".toml":
                with open(path, "rb") as f:
                    data: Any = tomllib.load(f)
            elif suffix == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
            else:
                raise ValueError(f"{path}: gate policy must be a .toml or .json file")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot parse gate policy: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("gate"), dict) and len(data) == 1:
            data = data["gate"]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: gate policy must be a table/object of fields")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def with_overrides(self, **overrides: Any) -> GatePolicy:
        """Return a copy with the given fields replaced (validated again)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown gate policy field(s) {unknown}; known: {sorted(known)}")
        return replace(self, **overrides)


# The gate's reasons are the wire's eligibility reasons.
Reason = EligibilityReason


@dataclass(frozen=True)
class Eligibility:
    """The gate's decision, its reason and a sentence a person can read."""

    eligible: bool
    reason: Reason
    detail: str


def _deny(reason: Reason, detail: str) -> Eligibility:
    return Eligibility(False, reason, detail)


class Gate:
    """Stateful evaluator of a GatePolicy; the state is the thermal hysteresis latch."""

    def __init__(self, policy: GatePolicy | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy if policy is not None else GatePolicy()
        self.clock = clock  # for the hours-of-the-day window, in local time
        self._hot = False

    @property
    def hot(self) -> bool:
        """True while the thermal latch holds (paused until temperature < temp_low_c)."""
        return self._hot

    def reset(self) -> None:
        """Forget the thermal latch (e.g. after the device rebooted)."""
        self._hot = False

    def _thermal(self, temp: float | None) -> Eligibility | None:
        p = self.policy
        if temp is None:
            if self._hot:
                return _deny(
                    Reason.TOO_HOT,
                    f"temperature unknown; paused until it reads below {p.temp_low_c:.1f}°C",
                )
            if p.unknown_temperature == "deny":
                return _deny(Reason.SENSOR_UNKNOWN, "temperature unknown (unknown_temperature=deny)")
            return None
        # The latch is updated on every reading, whatever else fails, so hysteresis holds even
        # while the device is also unplugged.
        if temp >= p.temp_high_c:
            self._hot = True
            return _deny(Reason.TOO_HOT, f"temperature {temp:.1f}°C >= {p.temp_high_c:.1f}°C high mark")
        if self._hot and temp >= p.temp_low_c:
            return _deny(
                Reason.TOO_HOT,
                f"temperature {temp:.1f}°C not yet below {p.temp_low_c:.1f}°C low mark (cooling down)",
            )
        self._hot = False
        return None

    def evaluate(self, reading: SensorReading) -> Eligibility:
        """Decide eligibility for one reading, updating the thermal latch."""
        p = self.policy
        thermal = self._thermal(reading.temperature_c)
        if thermal is not None:
            return thermal

        charging, battery = reading.charging, reading.battery_pct
        power_note = ""
        if reading.has_battery is False:
            if p.no_battery == "deny":
                return _deny(Reason.NOT_CHARGING, "no battery present (no_battery=deny)")
            charging, battery, power_note = True, 100.0, "external power (no battery)"
        else:
            if charging is None or battery is None:
                missing = "charging state" if charging is None else "battery level"
                if p.unknown_charging == "deny":
                    return _deny(Reason.SENSOR_UNKNOWN, f"{missing} unknown (unknown_charging=deny)")
                charging = True if charging is None else charging
                battery = 100.0 if battery is None else battery
        if p.require_charging and not charging:
            return _deny(Reason.NOT_CHARGING, "not charging")
        if battery < p.min_battery_pct:
            return _deny(Reason.BATTERY_LOW, f"battery {battery:g}% < {p.min_battery_pct:g}% minimum")

        storage = reading.free_storage_bytes
        if p.min_free_storage_bytes > 0:
            if storage is None:
                return _deny(Reason.SENSOR_UNKNOWN, "free storage unknown")
            if storage < p.min_free_storage_bytes:
                return _deny(
                    Reason.STORAGE_LOW,
                    f"free storage {storage / 2**20:.0f} MiB < {p.min_free_storage_bytes / 2**20:.0f} MiB minimum",
                )
        cpu = reading.cpu_load_pct
        if p.max_cpu_load_pct is not None and cpu is not None and cpu > p.max_cpu_load_pct:
            return _deny(Reason.CPU_BUSY, f"CPU load {cpu:.0f}% > {p.max_cpu_load_pct:.0f}% maximum")

        hour = time.localtime(self.clock()).tm_hour
        if not p.allows_hour(hour):
            return _deny(
                Reason.OUTSIDE_HOURS, f"local hour {hour} is outside the {p.start_hour}:00-{p.end_hour}:00 window"
            )

        parts = [
            power_note or ("charging" if charging else "on battery"),
            f"battery {battery:g}%",
        ]
        if reading.temperature_c is not None:
            parts.append(f"{reading.temperature_c:.1f}°C")
        return Eligibility(True, Reason.ELIGIBLE, ", ".join(parts))
