"""Which adapter each device should run: per device, per selector, canary shares, rollback.

The orchestrator keeps, per device, the desired adapter (set here) and the actual one (reported
by the device's heartbeats). A change of desire pushes the previous one onto the device's
history, so a rollback is always one step back.
"""

from __future__ import annotations

import hashlib
import math

from orchestrator.domain import AdapterRecord, DeviceRecord, DeviceSelector, JobFilter, JobState
from orchestrator.errors import FailedPrecondition, InvalidArgument, found
from orchestrator.state.base import Tx

_HISTORY = 20


def compatible(adapter: AdapterRecord, device: DeviceRecord) -> bool:
    """True unless both fingerprints are known and differ."""
    have = str(device.capabilities.get("base_fingerprint", ""))
    return not (adapter.base_fingerprint and have and have != adapter.base_fingerprint)


def set_desired(tx: Tx, device: DeviceRecord, adapter_id: str) -> bool:
    """Make adapter_id ("" for the base) desired; False when it already was."""
    if device.desired_adapter_id == adapter_id:
        return False
    device.adapter_history = [*device.adapter_history, device.desired_adapter_id][-_HISTORY:]
    device.desired_adapter_id = adapter_id
    tx.upsert_device(device)
    return True


def matching_devices(tx: Tx, selector: DeviceSelector) -> list[DeviceRecord]:
    """Every device the selector matches, ordered by id."""
    return [d for d in tx.iter_devices() if selector.matches(d)]


def activate_one(tx: Tx, adapter_id: str) -> list[str]:
    """The adapter on the device that trained it; refused when the bases differ."""
    adapter = found(tx.get_adapter(adapter_id), "adapter", adapter_id)
    device = found(tx.get_device(adapter.device_id, for_update=True), "device", adapter.device_id)
    if not compatible(adapter, device):
        have = str(device.capabilities.get("base_fingerprint", ""))
        raise FailedPrecondition(
            f"adapter {adapter_id} was trained on base {adapter.base_fingerprint[:23]}..., "
            f"device {device.device_id} has {have[:23]}..."
        )
    return [device.device_id] if set_desired(tx, device, adapter_id) else []


def activate_by_name(tx: Tx, name: str, selector: DeviceSelector) -> list[str]:
    """On each matching device, its latest compatible version of the named adapter."""
    changed: list[str] = []
    for device in matching_devices(tx, selector):
        versions = tx.list_adapters(device.device_id, name, 50)
        latest = next((a for a in sorted(versions, key=lambda a: -a.version) if compatible(a, device)), None)
        if latest is not None and set_desired(tx, device, latest.adapter_id):
            changed.append(device.device_id)
    return changed


def canary_rank(campaign_id: str, device_id: str) -> str:
    """A stable pseudo-random order: raising the percentage only ever adds devices."""
    return hashlib.sha256(f"{campaign_id}/{device_id}".encode()).hexdigest()


def activate_canary(tx: Tx, campaign_id: str, percent: int) -> list[str]:
    """The campaign's adapters on a stable `percent` share of the devices where it succeeded."""
    if not 1 <= percent <= 100:
        raise InvalidArgument("canary_percent", f"{percent} is outside 1-100")
    found(tx.get_campaign(campaign_id), "campaign", campaign_id)
    flt = JobFilter(states=(JobState.SUCCEEDED,), campaign_id=campaign_id)
    done = [(j.device_id, j.adapter_id) for j in tx.iter_jobs(flt)]
    done.sort(key=lambda pair: canary_rank(campaign_id, pair[0]))
    chosen = done[: math.ceil(len(done) * percent / 100)]
    changed: list[str] = []
    for device_id, adapter_id in chosen:
        adapter = tx.get_adapter(adapter_id)
        device = tx.get_device(device_id, for_update=True)
        if adapter is None or device is None or not compatible(adapter, device):
            continue
        if set_desired(tx, device, adapter_id):
            changed.append(device_id)
    return changed


def deactivate(tx: Tx, devices: list[DeviceRecord]) -> list[str]:
    """Send devices back to the base model."""
    return [d.device_id for d in devices if set_desired(tx, d, "")]


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
