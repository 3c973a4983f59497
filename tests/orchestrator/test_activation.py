"""Which adapter each device should run: the activation rules on a real store."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import activation
from orchestrator.domain import AdapterRecord, CampaignRecord, DeviceRecord, DeviceSelector, JobRecord, JobState
from orchestrator.errors import FailedPrecondition, InvalidArgument, NotFound
from orchestrator.state import StateStore

FP = "sha256:" + "ab" * 32


def add_device(state: StateStore, device_id: str, fingerprint: str = FP, **labels: str) -> None:
    with state.transaction() as tx:
        tx.upsert_device(
            DeviceRecord(device_id, "h", capabilities={"base_fingerprint": fingerprint}, labels=dict(labels))
        )


def add_adapter(state: StateStore, adapter_id: str, device_id: str, version: int = 1, fingerprint: str = FP) -> None:
    with state.transaction() as tx:
        tx.insert_adapter(
            AdapterRecord(
                adapter_id, "persona", version, device_id, "job-x", 1, "cd" * 32, 1, "tiny", fingerprint, {}, 0.0, "k"
            )
        )


def desired(state: StateStore, device_id: str) -> tuple[str, list[str]]:
    with state.transaction() as tx:
        d = tx.get_device(device_id)
    assert d is not None
    return d.desired_adapter_id, d.adapter_history


@pytest.fixture
def state(tmp_path: Path) -> StateStore:
    from orchestrator.state import open_state

    return open_state(f"sqlite:///{tmp_path / 'state.db'}")


def test_compatible_unless_both_fingerprints_are_known_and_differ() -> None:
    adapter = AdapterRecord("a", "n", 1, "d", "j", 1, "s", 1, "b", FP, {}, 0.0, "k")
    assert activation.compatible(adapter, DeviceRecord("d", "h", capabilities={"base_fingerprint": FP}))
    assert activation.compatible(adapter, DeviceRecord("d", "h", capabilities={}))
    assert not activation.compatible(adapter, DeviceRecord("d", "h", capabilities={"base_fingerprint": "other"}))


def test_each_change_pushes_the_previous_desire_and_rollback_steps_back(state: StateStore) -> None:
    add_device(state, "d1")
    add_adapter(state, "ad-1", "d1")
    add_adapter(state, "ad-2", "d1", version=2)

    with state.transaction() as tx:
        first = activation.activate_one(tx, "ad-1").changed
        again = activation.activate_one(tx, "ad-1").changed
        activation.activate_one(tx, "ad-2")
    assert (first, again) == (["d1"], [])
    assert desired(state, "d1") == ("ad-2", ["", "ad-1"])

    with state.transaction() as tx:
        assert activation.rollback(tx, "d1") == "ad-1"
        assert activation.rollback(tx, "d1") == ""
        with pytest.raises(FailedPrecondition, match="no earlier adapter"):
            activation.rollback(tx, "d1")


def test_an_incompatible_adapter_is_refused_with_both_fingerprints(state: StateStore) -> None:
    add_device(state, "d1", fingerprint="sha256:" + "ee" * 32)
    add_adapter(state, "ad-1", "d1")

    with state.transaction() as tx, pytest.raises(FailedPrecondition, match="trained on base sha256:abab"):
        activation.activate_one(tx, "ad-1")
    with state.transaction() as tx, pytest.raises(NotFound):
        activation.activate_one(tx, "ad-missing")


def test_by_name_each_matching_device_gets_its_latest_compatible_version(state: StateStore) -> None:
    add_device(state, "d1", tier="beta")
    add_device(state, "d2", tier="beta")
    add_device(state, "d3", tier="ga")
    add_adapter(state, "ad-1", "d1")
    add_adapter(state, "ad-2", "d1", version=2, fingerprint="sha256:" + "ee" * 32)  # latest, wrong base
    add_adapter(state, "ad-3", "d3")

    with state.transaction() as tx:
        changed = activation.activate_by_name(tx, "persona", DeviceSelector(labels={"tier": "beta"})).changed

    assert changed == ["d1"]  # d2 has no version, d3 is not selected
    assert desired(state, "d1")[0] == "ad-1" and desired(state, "d3")[0] == ""


def test_canary_shares_are_stable_and_only_grow(state: StateStore) -> None:
    with state.transaction() as tx:
        tx.insert_campaign(CampaignRecord("cmp-1", "c", {}, "", 0.0))
    for i in range(20):
        device = f"d{i:02d}"
        add_device(state, device)
        add_adapter(state, f"ad-{i:02d}", device)
        with state.transaction() as tx:
            tx.insert_job(
                JobRecord(
                    f"job-{i:02d}", device, {}, campaign_id="cmp-1", state=JobState.SUCCEEDED, adapter_id=f"ad-{i:02d}"
                )
            )

    with state.transaction() as tx:
        ten = activation.activate_canary(tx, "cmp-1", 10).changed
        fifty = activation.activate_canary(tx, "cmp-1", 50).changed
        with pytest.raises(InvalidArgument, match="canary_percent"):
            activation.activate_canary(tx, "cmp-1", 0)

    ranked = sorted((f"d{i:02d}" for i in range(20)), key=lambda d: activation.canary_rank("cmp-1", d))
    assert ten == ranked[:2]
    assert fifty == ranked[2:10]  # the first two were already active: raising the share only adds


def test_deactivate_sends_devices_back_to_the_base(state: StateStore) -> None:
    add_device(state, "d1")
    add_adapter(state, "ad-1", "d1")
    with state.transaction() as tx:
        activation.activate_one(tx, "ad-1")
        device = tx.get_device("d1", for_update=True)
        assert device is not None
        assert activation.deactivate(tx, [device]) == ["d1"]

    assert desired(state, "d1") == ("", ["", "ad-1"])
