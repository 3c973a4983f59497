"""SQL for campaigns, rollouts and gate policies (part of the one SQL implementation of the store
contract, sql.SqlTx). Rows are dicts; JSON columns hold selectors, specs and lists."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from orchestrator.domain import (
    CampaignRecord,
    CampaignState,
    GatePolicyRecord,
    JobState,
    RolloutRecord,
    RolloutState,
    RolloutTarget,
    TargetOutcome,
)
from orchestrator.state.sql_base import SqlBase

_CAMPAIGN_JSON = ("selector", "training")
_ROLLOUT_JSON = ("steps", "eval_gate")
_ROLLOUT_FIELDS = tuple(f.name for f in fields(RolloutRecord))


def _json_row(record: Any, json_fields: tuple[str, ...]) -> dict[str, Any]:
    row = asdict(record)
    for key in json_fields:
        row[key] = json.dumps(row[key], sort_keys=True)
    if "request_id" in row:
        row["request_id"] = row["request_id"] or None  # NULLs never clash in the unique index
    return row


def _campaign(row: dict[str, Any]) -> CampaignRecord:
    row = dict(row)
    for key in _CAMPAIGN_JSON:
        row[key] = json.loads(row[key])
    row["state"] = CampaignState(row["state"])
    row["request_id"] = row["request_id"] or ""
    return CampaignRecord(**row)


def _rollout(row: dict[str, Any]) -> RolloutRecord:
    row = {k: row[k] for k in _ROLLOUT_FIELDS}
    for key in _ROLLOUT_JSON:
        row[key] = json.loads(row[key])
    row["state"] = RolloutState(row["state"])
    row["request_id"] = row["request_id"] or ""
    return RolloutRecord(**row)


def _target(row: dict[str, Any]) -> RolloutTarget:
    row = dict(row)
    row["outcome"] = TargetOutcome(row["outcome"])
    return RolloutTarget(**row)


def _policy(row: dict[str, Any]) -> GatePolicyRecord:
    row = dict(row)
    row["selector"] = json.loads(row["selector"])
    row["policy"] = json.loads(row["policy"])
    return GatePolicyRecord(**row)


class FleetSql(SqlBase):
    """The campaign, rollout and gate-policy part of the store contract."""

    def _update(self, table: str, key: str, row: dict[str, Any]) -> None:
        value = row.pop(key)
        sets = ", ".join(f"{c} = ?" for c in row)
        self._q(f"UPDATE {table} SET {sets} WHERE {key} = ?", [*row.values(), value])

    # --- campaigns ---
    def insert_campaign(self, campaign: CampaignRecord) -> None:
        self._insert("campaigns", _json_row(campaign, _CAMPAIGN_JSON), f"campaign (request {campaign.request_id!r})")

    def save_campaign(self, campaign: CampaignRecord) -> None:
        self._update("campaigns", "campaign_id", _json_row(campaign, _CAMPAIGN_JSON))

    def get_campaign(self, campaign_id: str, *, for_update: bool = False) -> CampaignRecord | None:
        rows = self._q(f"SELECT * FROM campaigns WHERE campaign_id = ?{self._lock(for_update)}", [campaign_id])
        return _campaign(rows[0]) if rows else None

    def get_campaign_by_request(self, request_id: str) -> CampaignRecord | None:
        rows = self._q("SELECT * FROM campaigns WHERE request_id = ?", [request_id])
        return _campaign(rows[0]) if rows else None

    def list_campaigns(
        self, limit: int, before_campaign_id: str = "", states: tuple[CampaignState, ...] = ()
    ) -> list[CampaignRecord]:
        where, params = ["1 = 1"], []
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params += [s.value for s in states]
        if before_campaign_id:
            where.append("campaign_id < ?")
            params.append(before_campaign_id)
        rows = self._q(
            f"SELECT * FROM campaigns WHERE {' AND '.join(where)} ORDER BY campaign_id DESC LIMIT ?", [*params, limit]
        )
        return [_campaign(r) for r in rows]

    def count_failures_by_class(self, campaign_id: str) -> dict[str, int]:
        rows = self._q(
            "SELECT last_error_class AS c, COUNT(*) AS n FROM jobs WHERE campaign_id = ? AND state = ?"
            " GROUP BY last_error_class",
            [campaign_id, JobState.FAILED.value],
        )
        return {(r["c"] or "UNSPECIFIED"): int(r["n"]) for r in rows}

    # --- rollouts ---
    def insert_rollout(self, rollout: RolloutRecord) -> None:
        self._insert("rollouts", _json_row(rollout, _ROLLOUT_JSON), f"rollout (request {rollout.request_id!r})")

    def save_rollout(self, rollout: RolloutRecord) -> None:
        self._update("rollouts", "rollout_id", _json_row(rollout, _ROLLOUT_JSON))

    def get_rollout(self, rollout_id: str, *, for_update: bool = False) -> RolloutRecord | None:
        rows = self._q(f"SELECT * FROM rollouts WHERE rollout_id = ?{self._lock(for_update)}", [rollout_id])
        return _rollout(rows[0]) if rows else None

    def get_rollout_by_request(self, request_id: str) -> RolloutRecord | None:
        rows = self._q("SELECT * FROM rollouts WHERE request_id = ?", [request_id])
        return _rollout(rows[0]) if rows else None

    def list_rollouts(
        self, campaign_id: str, states: tuple[RolloutState, ...], limit: int, before_rollout_id: str = ""
    ) -> list[RolloutRecord]:
        where, params = ["1 = 1"], []
        if campaign_id:
            where.append("campaign_id = ?")
            params.append(campaign_id)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            params += [s.value for s in states]
        if before_rollout_id:
            where.append("rollout_id < ?")
            params.append(before_rollout_id)
        rows = self._q(
            f"SELECT * FROM rollouts WHERE {' AND '.join(where)} ORDER BY rollout_id DESC LIMIT ?", [*params, limit]
        )
        return [_rollout(r) for r in rows]

    def insert_rollout_targets(self, targets: list[RolloutTarget]) -> None:
        for target in targets:
            row = asdict(target)
            row["outcome"] = target.outcome.value
            self._insert("rollout_targets", row, f"device {target.device_id} in rollout {target.rollout_id}")

    def save_rollout_target(self, target: RolloutTarget) -> None:
        self._q(
            "UPDATE rollout_targets SET adapter_id = ?, step = ?, previous_adapter_id = ?, outcome = ?, reason = ?,"
            " changed_at = ? WHERE rollout_id = ? AND device_id = ?",
            [
                target.adapter_id,
                target.step,
                target.previous_adapter_id,
                target.outcome.value,
                target.reason,
                target.changed_at,
                target.rollout_id,
                target.device_id,
            ],
        )

    def list_rollout_targets(self, rollout_id: str, limit: int, after_device_id: str = "") -> list[RolloutTarget]:
        rows = self._q(
            "SELECT * FROM rollout_targets WHERE rollout_id = ? AND device_id > ? ORDER BY device_id LIMIT ?",
            [rollout_id, after_device_id, limit],
        )
        return [_target(r) for r in rows]

    # --- gate policies ---
    def put_gate_policy(self, policy: GatePolicyRecord) -> None:
        self.delete_gate_policy(policy.name)
        row = asdict(policy)
        row["selector"] = json.dumps(policy.selector, sort_keys=True)
        row["policy"] = json.dumps(policy.policy, sort_keys=True)
        self._insert("gate_policies", row, f"gate policy {policy.name}")

    def delete_gate_policy(self, name: str) -> bool:
        self._q("DELETE FROM gate_policies WHERE name = ?", [name])
        return bool(self.cur.rowcount)

    def list_gate_policies(self) -> list[GatePolicyRecord]:
        return [_policy(r) for r in self._q("SELECT * FROM gate_policies ORDER BY priority, name")]
