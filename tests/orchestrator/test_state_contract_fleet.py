"""The state-store contract for campaigns, rollouts and gate policies, run unchanged against
SQLite and PostgreSQL (the rest of the contract is in test_state_contract.py)."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.domain import (
    AdapterRecord,
    CampaignRecord,
    CampaignState,
    DeviceRecord,
    GatePolicyRecord,
    JobRecord,
    JobState,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
    TargetOutcome,
    new_id,
)
from orchestrator.errors import AlreadyExists
from orchestrator.state import StateStore, open_state


def _job(device: str, campaign_id: str = "", **kw: object) -> JobRecord:
    now = time.time()
    return JobRecord(
        job_id=new_id("job"),
        device_id=device,
        training={"adapter_name": "a"},
        created_at=now,
        updated_at=now,
        campaign_id=campaign_id,
        **kw,  # type: ignore[arg-type]
    )


def _campaign(**kw: object) -> CampaignRecord:
    return CampaignRecord(new_id("cmp"), "spring", {"labels": {"tier": "beta"}}, "", time.time(), **kw)  # type: ignore[arg-type]


def test_campaign_round_trip_save_and_list_by_state(state: StateStore) -> None:
    a = _campaign(training={"adapter_name": "x"}, max_attempts=3, deadline=99.0, target_count=5, scanned_until=7.0)
    b = _campaign(state=CampaignState.PAUSED)
    with state.transaction() as tx:
        tx.insert_campaign(a)
        tx.insert_campaign(b)
    with state.transaction() as tx:
        assert tx.get_campaign(a.campaign_id) == a
        got = tx.get_campaign(a.campaign_id, for_update=True)
        assert got is not None
        got.state, got.job_count, got.scanned_until = CampaignState.CLOSED, 4, 11.0
        tx.save_campaign(got)
    with state.transaction() as tx:
        assert tx.get_campaign(a.campaign_id) == got
        assert [c.campaign_id for c in tx.list_campaigns(10)] == [b.campaign_id, a.campaign_id]
        assert [c.campaign_id for c in tx.list_campaigns(10, b.campaign_id)] == [a.campaign_id]
        assert [c.campaign_id for c in tx.list_campaigns(10, "", (CampaignState.PAUSED,))] == [b.campaign_id]
        assert tx.list_campaigns(10, "", (CampaignState.ACTIVE,)) == []


def test_one_job_per_device_per_campaign(state: StateStore) -> None:
    with state.transaction() as tx:
        assert tx.insert_campaign_job(_job("d1", "c1"))
        assert not tx.insert_campaign_job(_job("d1", "c1"))  # the device has a job of c1 already
        assert tx.insert_campaign_job(_job("d1", "c2"))
        assert tx.insert_campaign_job(_job("d2", "c1"))
        tx.insert_job(_job("d1"))  # jobs outside campaigns never clash
        tx.insert_job(_job("d1"))
        assert tx.campaign_devices("c1", ["d1", "d2", "d3"]) == {"d1", "d2"}
        assert tx.campaign_devices("c2", ["d2"]) == set()
    with pytest.raises(AlreadyExists), state.transaction() as tx:
        tx.insert_job(_job("d2", "c1"))
    with pytest.raises(AlreadyExists), state.transaction() as tx:
        tx.insert_jobs([_job("d9", "c1"), _job("d1", "c2")])
    with state.transaction() as tx:
        assert tx.count_jobs_by_state("c1") == {"QUEUED": 2}


def test_concurrent_fan_outs_create_one_job_per_device(state_url: str) -> None:
    """Two stores (two control loops) insert the same campaign's jobs at once: one each."""
    stores = [open_state(state_url), open_state(state_url, migrate=False)]
    made: list[bool] = []
    lock = threading.Lock()

    def worker(store: StateStore) -> None:
        for i in range(30):
            with store.transaction() as tx:
                ok = tx.insert_campaign_job(_job(f"d{i}", "c1"))
            with lock:
                made.append(ok)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with stores[0].transaction() as tx:
        assert tx.count_jobs_by_state("c1") == {"QUEUED": 30}
    assert made.count(True) == 30 and made.count(False) == 30
    for s in stores:
        s.close()


def test_jobs_of_a_paused_campaign_are_not_claimable(state: StateStore) -> None:
    paused = _campaign(state=CampaignState.PAUSED)
    active = _campaign()
    with state.transaction() as tx:
        tx.insert_campaign(paused)
        tx.insert_campaign(active)
        held = _job("d1", paused.campaign_id)
        free = _job("d1", active.campaign_id)
        single = _job("d1")
        tx.insert_jobs([held, free, single])
    with state.transaction() as tx:
        ids = {j.job_id for j in tx.claimable_jobs("d1", time.time(), 10)}
        assert ids == {free.job_id, single.job_id}
        campaign = tx.get_campaign(paused.campaign_id, for_update=True)
        assert campaign is not None
        campaign.state = CampaignState.ACTIVE
        tx.save_campaign(campaign)
    with state.transaction() as tx:
        assert len(tx.claimable_jobs("d1", time.time(), 10)) == 3


def test_failures_are_counted_by_error_class(state: StateStore) -> None:
    with state.transaction() as tx:
        rows = [
            (JobState.FAILED, "DATASET_INVALID"),
            (JobState.FAILED, "DATASET_INVALID"),
            (JobState.FAILED, ""),
            (JobState.QUEUED, "TRANSIENT"),
            (JobState.FAILED, "DOES_NOT_FIT"),
        ]
        for i, (st, cls) in enumerate(rows):
            tx.insert_job(_job(f"d{i}", "c1", state=st, last_error_class=cls))
        tx.insert_job(_job("d0", "c2", state=JobState.FAILED, last_error_class="CRASHED"))
    with state.transaction() as tx:
        assert tx.count_failures_by_class("c1") == {"DATASET_INVALID": 2, "UNSPECIFIED": 1, "DOES_NOT_FIT": 1}
        assert tx.count_failures_by_class("none") == {}


def test_devices_changed_since_and_refusals(state: StateStore) -> None:
    with state.transaction() as tx:
        tx.insert_devices([DeviceRecord(f"d{i}", "h", profile_at=float(i * 10)) for i in range(5)])
    with state.transaction() as tx:
        assert [d.device_id for d in tx.list_devices_changed(20.0, 10)] == ["d2", "d3", "d4"]
        assert [d.device_id for d in tx.list_devices_changed(20.0, 1, "d2")] == ["d3"]
        assert [d.device_id for d in tx.iter_devices_changed(35.0)] == ["d4"]
        assert tx.update_device("d1", {"adapter_refusals": {"ad-1": "load failed: bad shapes"}})
        assert sorted(d.device_id for d in tx.get_devices(["d1", "d3", "nope"])) == ["d1", "d3"]
        assert tx.get_devices([]) == []
    with state.transaction() as tx:
        d = tx.get_device("d1")
        assert d is not None and d.adapter_refusals == {"ad-1": "load failed: bad shapes"} and d.profile_at == 10.0


def test_adapters_by_ids(state: StateStore) -> None:
    ads = [
        AdapterRecord(new_id("ad"), "p", v, "d1", "job", 1, "0" * 64, 1, "b", "fp", {"metrics": {}}, 1.0, f"k{v}")
        for v in (1, 2, 3)
    ]
    with state.transaction() as tx:
        for a in ads:
            tx.insert_adapter(a)
    with state.transaction() as tx:
        got = tx.get_adapters([ads[0].adapter_id, ads[2].adapter_id, "ad-missing"])
        assert sorted(a.version for a in got) == [1, 3]


def test_rollouts_and_their_devices(state: StateStore) -> None:
    r1 = RolloutRecord(new_id("ro"), "c1", [10, 100], request_id="start-1", eval_gate={"min_improvement": 0.02})
    r2 = RolloutRecord(new_id("ro"), "c2", [100], state=RolloutState.HALTED)
    with state.transaction() as tx:
        tx.insert_rollout(r1)
        tx.insert_rollout(r2)
    with pytest.raises(AlreadyExists), state.transaction() as tx:
        tx.insert_rollout(RolloutRecord(new_id("ro"), "c1", [100], request_id="start-1"))
    with state.transaction() as tx:
        assert tx.get_rollout(r1.rollout_id) == r1
        assert tx.get_rollout_by_request("start-1") == r1
        got = tx.get_rollout(r1.rollout_id, for_update=True)
        assert got is not None
        got.current_step, got.assigned_step, got.message = 1, 0, "step 1 healthy"
        tx.save_rollout(got)
        assert [r.rollout_id for r in tx.list_rollouts("", (), 10)] == [r2.rollout_id, r1.rollout_id]
        assert [r.rollout_id for r in tx.list_rollouts("c1", (), 10)] == [r1.rollout_id]
        assert [r.rollout_id for r in tx.list_rollouts("", (RolloutState.HALTED,), 10)] == [r2.rollout_id]
        assert [r.rollout_id for r in tx.list_rollouts("", (), 10, r2.rollout_id)] == [r1.rollout_id]
    with state.transaction() as tx:
        assert tx.get_rollout(r1.rollout_id) == got
        targets = [RolloutTarget(r1.rollout_id, f"d{i}", f"ad-{i}", 0, "") for i in range(3)]
        tx.insert_rollout_targets(targets)
    with pytest.raises(AlreadyExists), state.transaction() as tx:
        tx.insert_rollout_targets([RolloutTarget(r1.rollout_id, "d1", "ad-9", 1, "")])
    with state.transaction() as tx:
        t = targets[1]
        t.outcome, t.reason, t.changed_at = TargetOutcome.FAILED, "runtime exited with 1", 5.0
        tx.save_rollout_target(t)
        assert [x.device_id for x in tx.list_rollout_targets(r1.rollout_id, 2)] == ["d0", "d1"]
        assert list(tx.iter_rollout_targets(r1.rollout_id)) == targets
        assert list(tx.iter_rollout_targets(r2.rollout_id)) == []


def test_gate_policies(state: StateStore) -> None:
    with state.transaction() as tx:
        tx.put_gate_policy(GatePolicyRecord("night", {}, {"start_hour": 1, "end_hour": 5}, 5, 1.0))
        tx.put_gate_policy(GatePolicyRecord("beta", {"labels": {"tier": "beta"}}, {"min_battery_pct": 80.0}, 10, 1.0))
        tx.put_gate_policy(GatePolicyRecord("all", {}, {"require_charging": True}, 5, 1.0))
    with state.transaction() as tx:
        assert [p.name for p in tx.list_gate_policies()] == ["all", "night", "beta"]
        tx.put_gate_policy(GatePolicyRecord("beta", {}, {"min_battery_pct": 90.0}, 1, 2.0))  # replaces
    with state.transaction() as tx:
        policies = tx.list_gate_policies()
        assert [p.name for p in policies] == ["beta", "all", "night"]
        assert policies[0] == GatePolicyRecord("beta", {}, {"min_battery_pct": 90.0}, 1, 2.0)
        assert tx.delete_gate_policy("night") and not tx.delete_gate_policy("night")
        assert [p.name for p in tx.list_gate_policies()] == ["beta", "all"]


def test_a_version_2_database_keeps_its_campaigns_as_closed_snapshots(state_url: str) -> None:
    """Campaigns made before migration 3 had no spec to give late devices: they come out CLOSED."""
    old = open_state(state_url, migrate=False)
    try:
        assert old.migrate(2) == 2
        with old.transaction() as tx:
            tx._q(  # type: ignore[attr-defined]
                "INSERT INTO campaigns (campaign_id, name, selector, request_id, created_at, job_count)"
                " VALUES ('cmp-old', 'old', '{}', NULL, 5.0, 2)"
            )
            tx._q(  # type: ignore[attr-defined]
                "INSERT INTO devices (device_id, credential_hash, capabilities, labels, power, eligible,"
                " eligibility_reason, eligibility_detail, active_adapter_id, desired_adapter_id, adapter_history,"
                " last_seen, enrolled_at, running_job_id)"
                " VALUES ('d1', 'h', '{}', '{}', '{}', 0, '', '', '', '', '[]', 0, 0, '')"
            )
    finally:
        old.close()
    store = open_state(state_url)
    try:
        with store.transaction() as tx:
            c = tx.get_campaign("cmp-old")
            assert c is not None and c.state == CampaignState.CLOSED and c.training == {} and c.job_count == 2
            assert c.room(time.time()) == 0
            d = tx.get_device("d1")
            assert d is not None and d.adapter_refusals == {} and d.profile_at == 0.0
    finally:
        store.close()
