"""Gate policy from the fleet, applied on the device.

Heartbeat replies carry the thresholds the fleet's operators set for this device (only the
fields they set). The agent's own policy (its command line or policy file) gives the defaults
for everything else. With the local veto on, the fleet may only make the gate stricter than
the local policy, never looser: the larger minimum battery and free storage, the lower
temperature marks and CPU ceiling, charging required if either requires it, and the local
hours when both set hours. A fleet policy the gate cannot use (e.g. merged marks that cross)
is ignored with a warning, and the agent keeps the policy it had.

Torch-free: the idle agent imports it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from agent.gate import Gate, GatePolicy
from protos.pocketlora.v1 import types_pb2 as tpb

log = logging.getLogger("pocketlora.agent")

FIELDS = (
    "require_charging",
    "min_battery_pct",
    "temp_high_c",
    "temp_low_c",
    "min_free_storage_bytes",
    "max_cpu_load_pct",
    "start_hour",
    "end_hour",
)
_HIGHER = ("min_battery_pct", "min_free_storage_bytes")
_LOWER = ("temp_high_c", "temp_low_c", "max_cpu_load_pct")


def fleet_fields(policy: tpb.GatePolicy | None) -> dict[str, Any]:
    """The fields a GatePolicy message sets (floats rounded: they travel as 32-bit floats)."""
    if policy is None:
        return {}
    out: dict[str, Any] = {}
    for name in FIELDS:
        if policy.HasField(name):  # type: ignore[arg-type]
            value = getattr(policy, name)
            out[name] = round(value, 3) if isinstance(value, float) else value
    return out


def effective(local: GatePolicy, fleet: dict[str, Any], veto: bool) -> GatePolicy:
    """The policy to gate with; ValueError when the result is not a usable policy."""
    if not fleet:
        return local
    if not veto:
        return local.with_overrides(**fleet)
    mine = asdict(local)
    merged: dict[str, Any] = {}
    for name, value in fleet.items():
        have = mine.get(name)
        if name in _HIGHER:
            merged[name] = max(value, have or 0)
        elif name in _LOWER:
            merged[name] = value if have is None else min(value, have)
        elif name == "require_charging":
            merged[name] = bool(value or have)
        elif local.start_hour is None:  # hours: the device's own window wins when it has one
            merged[name] = value
    return local.with_overrides(**merged)


class FleetGate:
    """Keeps the gate's policy in step with what the fleet sends, over the local policy."""

    def __init__(self, gate: Gate, *, veto: bool = False) -> None:
        self.gate = gate
        self.local = gate.policy
        self.veto = veto
        self.fields: dict[str, Any] = {}
        self.names: list[str] = []

    def apply(self, fields: dict[str, Any], names: list[str]) -> str:
        """Gate with the fleet's fields from now on; returns what changed ("" for nothing)."""
        if fields == self.fields:
            return ""
        self.fields, self.names = fields, names
        try:
            policy = effective(self.local, fields, self.veto)
        except ValueError as exc:
            log.warning("fleet gate policy %s is not usable here (%s); keeping the current one", names, exc)
            return ""
        self.gate.policy = policy
        if not fields:
            return "back to the local gate policy"
        shown = ", ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        return f"fleet gate policy {', '.join(names)}: {shown}" + (" (within the local veto)" if self.veto else "")
