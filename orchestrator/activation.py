"""Which adapter each device should run: per device, per selector, canary shares, rollback.

The orchestrator keeps, per device, the desired adapter (set here) and the actual one (reported
by the device's heartbeats). A change of desire pushes the previous one onto the device's
history, so a rollback is always one step back.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from orchestrator.domain import AdapterRecord, DeviceRecord, DeviceSelector, JobFilter, JobState
from orchestrator.errors import FailedPrecondition, InvalidArgument, found
from orchestrator.evaluation import EvalGate
from orchestrator.state.base import Tx

_HISTORY = 20


@dataclass
class Activation:
    """What an activation did: devices whose desire changed, and devices left out with why."""

    changed: list[str] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (device, adapter, reason)

    def offer(self, tx: Tx, device: DeviceRecord, adapter: AdapterRecord, gate: EvalGate | None) -> None:
        """Make the adapter desired on the device unless the gate refuses it."""
        problem = gate.problem(adapter) if gate is not None else ""
        if problem:
            self.refused.append((device.device_id, adapter.adapter_id, problem))
            return
        locked = tx.get_device(device.device_id, for_update=True)
        if locked is not None and set_desired(tx, locked, adapter.adapter_id):
            self.changed.append(device.device_id)


def compatible(adapter: AdapterRecord, device: DeviceRecord) -> bool:
    """True unless both fingerprints are known and differ."""
    have = str(device.capabilities.get("base_fingerprint", ""))
    return not (adapter.base_fingerprint and have and have != adapter.base_fingerprint)


def set_desired(tx: Tx, device: DeviceRecord, adapter_id: str) -> bool:
    """Make adapter_id ("" for the base) desired on a device read for update; False when it
    already was. Only the two fields change, so a heartbeat writing others keeps its update."""
    if device.desired_adapter_id == adapter_id:
        return False
    device.adapter_history = [*device.adapter_history, device.desired_adapter_id][-_HISTORY:]
    device.desired_adapter_id = adapter_id
    tx.update_device(device.device_id, {"desired_adapter_id": adapter_id, "adapter_history": device.adapter_history})
    return True


def matching_devices(tx: Tx, selector: DeviceSelector) -> list[DeviceRecord]:
    """Every device the selector matches, ordered by id."""
    return [d for d in tx.iter_devices() if selector.matches(d)]


def activate_one(tx: Tx, adapter_id: str, gate: EvalGate | None = None) -> Activation:
    """The adapter on the device that trained it; refused when the bases differ or it fails
    the eval gate (the error carries the figures)."""
    adapter = found(tx.get_adapter(adapter_id), "adapter", adapter_id)
    device = found(tx.get_device(adapter.device_id, for_update=True), "device", adapter.device_id)
    if not compatible(adapter, device):
        have = str(device.capabilities.get("base_fingerprint", ""))
        raise FailedPrecondition(
            f"adapter {adapter_id} was trained on base {adapter.base_fingerprint[:23]}..., "
            f"device {device.device_id} has {have[:23]}..."
        )
    problem = gate.problem(adapter) if gate is not None else ""
    if problem:
        raise FailedPrecondition(f"eval gate: {problem}")
    return Activation([device.device_id] if set_desired(tx, device, adapter_id) else [])


def activate_by_name(tx: Tx, name: str, selector: DeviceSelector, gate: EvalGate | None = None) -> Activation:
    """On each matching device, its latest compatible version of the named adapter."""
    done = Activation()
    for device in matching_devices(tx, selector):
        versions = tx.list_adapters(device.device_id, name, 50)
        latest = next((a for a in sorted(versions, key=lambda a: -a.version) if compatible(a, device)), None)
        if latest is not None:
            done.offer(tx, device, latest, gate)
    return done


def canary_rank(campaign_id: str, device_id: str) -> str:
    """A stable pseudo-random order: raising the percentage only ever adds devices."""
    return hashlib.sha256(f"{campaign_id}/{device_id}".encode()).hexdigest()


def campaign_adapters(tx: Tx, campaign_id: str) -> list[tuple[DeviceRecord, AdapterRecord]]:
    """(device, adapter) of every succeeded job of the campaign whose adapter suits its device,
    in canary order (a stable hash of campaign and device)."""
    flt = JobFilter(states=(JobState.SUCCEEDED,), campaign_id=campaign_id)
    pairs = {j.device_id: j.adapter_id for j in tx.iter_jobs(flt) if j.adapter_id}
    adapters = {a.adapter_id: a for a in tx.get_adapters(sorted(set(pairs.values())))}
    devices = {d.device_id: d for d in tx.get_devices(sorted(pairs))}
    out = [
        (devices[d], adapters[a])
        for d, a in pairs.items()
        if d in devices and a in adapters and compatible(adapters[a], devices[d])
    ]
    out.sort(key=lambda pair: canary_rank(campaign_id, pair[0].device_id))
    return out


def activate_canary(tx: Tx, campaign_id: str, percent: int, gate: EvalGate | None = None) -> Activation:
    """The campaign's adapters on a stable `percent` share of the devices where it succeeded
    (and, with a gate, where the adapter passed it)."""
    if not 1 <= percent <= 100:
        raise InvalidArgument("canary_percent", f"{percent} is outside 1-100")
    found(tx.get_campaign(campaign_id), "campaign", campaign_id)
    done = Activation()
    pool = []
    for device, adapter in campaign_adapters(tx, campaign_id):
        problem = gate.problem(adapter) if gate is not None else ""
        if problem:
            done.refused.append((device.device_id, adapter.adapter_id, problem))
        else:
            pool.append((device, adapter))
    for device, adapter in pool[: math.ceil(len(pool) * percent / 100)]:
        done.offer(tx, device, adapter, None)
    return done


def deactivate(tx: Tx, devices: list[DeviceRecord]) -> list[str]:
    """Send devices back to the base model."""
    return [d.device_id for d in devices if set_desired(tx, d, "")]


def revert(tx: Tx, device: DeviceRecord, adapter_id: str, previous: str) -> bool:
    """Send a device that still wants `adapter_id` back to `previous` (dropping the history
    entry the change pushed); False when its desire moved on since."""
    if device.desired_adapter_id != adapter_id:
        return False
    if device.adapter_history and device.adapter_history[-1] == previous:
        device.adapter_history = device.adapter_history[:-1]
    device.desired_adapter_id = previous
    tx.update_device(device.device_id, {"desired_adapter_id": previous, "adapter_history": device.adapter_history})
    return True


def rollback(tx: Tx, device_id: str) -> str:
    """Make the previously desired adapter (or the base) desired again."""
    device = found(tx.get_device(device_id, for_update=True), "device", device_id)
    if not device.adapter_history:
        raise FailedPrecondition(f"device {device_id} has no earlier adapter to roll back to")
    *rest, previous = device.adapter_history
    device.adapter_history = rest
    device.desired_adapter_id = previous
    tx.upsert_device(device)
    return previous
