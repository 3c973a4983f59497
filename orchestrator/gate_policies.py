"""Gate policy from the fleet: operators set gate thresholds per device selector, and every
heartbeat reply carries the thresholds for the device that sent it.

A policy names only the fields it sets. Where several policies match a device (through
DeviceSelector.matches), they are merged field by field in (priority, name) order, so a higher
priority overrides a lower one. The agent applies what arrives over its own defaults, within
its local veto (agent/fleet_gate.py). Each replica keeps the policies in memory and re-reads
them at most every `gate_policy_refresh_s`; a change made through a replica reaches its own
devices at their next heartbeat.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from orchestrator import audit, validation
from orchestrator.audit import Actor
from orchestrator.config import OrchestratorConfig
from orchestrator.domain import DeviceRecord, DeviceSelector, GatePolicyRecord
from orchestrator.errors import InvalidArgument
from orchestrator.state.base import StateStore, Tx

# Field -> type, as the proto's GatePolicy names them.
POLICY_FIELDS: dict[str, type] = {
    "require_charging": bool,
    "min_battery_pct": float,
    "temp_high_c": float,
    "temp_low_c": float,
    "min_free_storage_bytes": int,
    "max_cpu_load_pct": float,
    "start_hour": int,
    "end_hour": int,
}
MAX_POLICIES = 1000


def check_policy(fields: dict[str, Any], at: str = "policy.policy") -> dict[str, Any]:
    """Refuse values no gate could use, naming the field (under `at`, its request path)."""
    unknown = sorted(set(fields) - set(POLICY_FIELDS))
    if unknown:
        raise InvalidArgument(at, f"unknown field(s) {unknown}")
    if not fields:
        raise InvalidArgument(at, "sets no threshold")
    for name, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"{at}.{name}", f"{value} is not a finite number")
    if not 0 <= fields.get("min_battery_pct", 0) <= 100:
        raise InvalidArgument(f"{at}.min_battery_pct", f"{fields['min_battery_pct']} is outside 0-100")
    if not 0 < fields.get("max_cpu_load_pct", 100) <= 100:
        raise InvalidArgument(f"{at}.max_cpu_load_pct", f"{fields['max_cpu_load_pct']} is outside (0, 100]")
    high, low = fields.get("temp_high_c"), fields.get("temp_low_c")
    if high is not None and low is not None and not low < high:
        raise InvalidArgument(f"{at}.temp_low_c", f"{low} must be below temp_high_c {high}")
    if ("start_hour" in fields) != ("end_hour" in fields):
        raise InvalidArgument(f"{at}.start_hour", "set start_hour and end_hour together")
    for name in ("start_hour", "end_hour"):
        if not 0 <= fields.get(name, 0) <= 23:
            raise InvalidArgument(f"{at}.{name}", f"{fields[name]} is outside 0-23")
    if fields.get("start_hour") is not None and fields["start_hour"] == fields["end_hour"]:
        raise InvalidArgument(f"{at}.end_hour", "equals start_hour: the window would be empty")
    return fields


def merge(policies: list[GatePolicyRecord], device: DeviceRecord) -> tuple[dict[str, Any], list[str]]:
    """The fields of every policy matching the device, higher priority last, and their names."""
    fields: dict[str, Any] = {}
    names: list[str] = []
    for policy in policies:
        if DeviceSelector.from_dict(policy.selector).matches(device):
            fields.update(policy.policy)
            names.append(policy.name)
    return fields, names


class GatePolicies:
    """Operators' gate policies and what each device gets in its heartbeat replies."""

    def __init__(self, state: StateStore, config: OrchestratorConfig, clock: Callable[[], float]) -> None:
        self.state = state
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: list[GatePolicyRecord] = []
        self._at = float("-inf")

    def set(
        self, actor: Actor, name: str, selector: DeviceSelector, policy: dict[str, Any], priority: int
    ) -> GatePolicyRecord:
        """Create or replace the named policy."""
        validation.name(name, "policy.name")
        record = GatePolicyRecord(name, asdict(selector), check_policy(policy), priority, self.clock())
        with self.state.transaction() as tx:
            existing = {p.name for p in tx.list_gate_policies()}
            if len(existing) >= MAX_POLICIES and name not in existing:
                raise InvalidArgument("policy.name", f"already {MAX_POLICIES} policies; delete one first")
            tx.put_gate_policy(record)
            audit.record(tx, record.updated_at, actor, "SetGatePolicy", name, detail=str(sorted(policy.items())))
        self._forget()
        return record

    def delete(self, actor: Actor, name: str) -> bool:
        """Remove the named policy; False when there was none."""
        validation.name(name, "name")
        with self.state.transaction() as tx:
            deleted = tx.delete_gate_policy(name)
            if deleted:
                audit.record(tx, self.clock(), actor, "DeleteGatePolicy", name)
        self._forget()
        return deleted

    def list_policies(self) -> list[GatePolicyRecord]:
        """Every policy, lowest priority first."""
        with self.state.transaction() as tx:
            return tx.list_gate_policies()

    def for_device(self, tx: Tx, device: DeviceRecord) -> tuple[dict[str, Any], list[str]]:
        """The merged thresholds for this device (policies re-read inside the caller's
        transaction when the cached ones are stale)."""
        if self.stale():
            self.load(tx.list_gate_policies())
        return self.match(device)

    def stale(self) -> bool:
        """True when the cached policies are due to be read again."""
        with self._lock:
            return self.clock() - self._at >= self.config.gate_policy_refresh_s

    def load(self, policies: list[GatePolicyRecord]) -> None:
        """Cache freshly read policies."""
        with self._lock:
            self._cached, self._at = policies, self.clock()

    def refresh(self) -> None:
        """Read the policies in a transaction of their own (for poll paths without one)."""
        with self.state.transaction() as tx:
            self.load(tx.list_gate_policies())

    def any(self) -> bool:
        """True when some policy is cached (else no device needs matching)."""
        with self._lock:
            return bool(self._cached)

    def match(self, device: DeviceRecord) -> tuple[dict[str, Any], list[str]]:
        """The merged thresholds of the cached policies matching the device, and their names."""
        with self._lock:
            policies = self._cached
        return merge(policies, device) if policies else ({}, [])

    def _forget(self) -> None:
        with self._lock:
            self._at = float("-inf")
