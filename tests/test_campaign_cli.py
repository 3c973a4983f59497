"""The campaign, rollout and gate-policy commands against a real server: JSON out, one-line errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.orchestrator.test_rollouts import GOOD, train
from tests.support.api import enroll
from tests.support.orch import OPERATOR_TOKEN, ServerThread
from tests.support.waiting import wait_for
from tests.test_cli import assert_one_line_error, cli


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(tmp_path_factory.mktemp("campaign-cli"), reap_every_s=0.2) as srv:
        yield srv


@pytest.fixture(scope="module")
def env(server: ServerThread) -> dict[str, str]:
    return {"POCKETLORA_OPERATOR_TOKEN": OPERATOR_TOKEN, "POCKETLORA_ORCHESTRATOR": server.address}


def run_json(env: dict[str, str], *args: str) -> dict[str, object]:
    result = cli(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_campaign_and_its_rollout_from_the_command_line(
    server: ServerThread, env: dict[str, str], tmp_path: Path
) -> None:
    mds = {d: enroll(server, d, labels={"tier": "beta"}) for d in ("cli-a", "cli-b")}
    created = run_json(
        env,
        "campaign",
        "create",
        "--name",
        "spring",
        "--label",
        "tier=beta",
        "--dataset",
        "notes",
        "--base-model-id",
        "tiny",
        "--eval-share",
        "0.2",
        "--target-count",
        "5",
    )
    cmp = created["campaign"]
    assert cmp["job_count"] == 2 and cmp["enrolling"] and cmp["training"]["eval_share"] == pytest.approx(0.2)
    campaign_id = str(cmp["campaign_id"])
    listed = run_json(env, "campaign", "list", "--state", "active")
    assert campaign_id in [c["campaign_id"] for c in listed["campaigns"]]  # type: ignore[union-attr]
    assert run_json(env, "campaign", "pause", campaign_id)["campaign"]["state"] == "CAMPAIGN_STATE_PAUSED"  # type: ignore[index]
    resumed = cli("campaign", "resume", campaign_id, env=env)
    assert resumed.returncode == 0 and "ACTIVE" in resumed.stdout
    for device, md in mds.items():
        train(server, tmp_path, device, md, GOOD)
    got = run_json(env, "campaign", "get", campaign_id)
    assert got["jobs_by_state"] == {"JOB_STATE_SUCCEEDED": 2} and got["progress"] == 1.0
    shown = cli("campaign", "get", campaign_id, env=env)
    assert "2/2 succeeded (100%)" in shown.stdout
    started = run_json(env, "rollout", "start", campaign_id, "--steps", "50,100", "--min-improvement", "0.1")
    rollout_id = str(started["rollout"]["rollout_id"])  # type: ignore[index]
    wait_for(
        lambda: len(run_json(env, "rollout", "status", rollout_id, "--devices").get("devices", [])) == 1,  # type: ignore[arg-type]
        30,
        "the first step's device",
    )
    table = cli("rollout", "status", "--campaign-id", campaign_id, "--devices", env=env)
    assert "PENDING" in table.stdout and "step 1/2" in table.stdout
    paused = cli("rollout", "pause", "--campaign-id", campaign_id, env=env)
    assert paused.returncode == 0 and "PAUSED" in paused.stdout
    fleet = run_json(env, "rollout", "status")
    assert [r["state"] for r in fleet["rollouts"]] == ["ROLLOUT_STATE_PAUSED"]  # type: ignore[index]
    undone = cli("rollout", "undo", "--all", env=env)
    assert undone.returncode == 0 and "UNDONE" in undone.stdout and "1 device(s) rolled back" in undone.stdout
    cancelled = cli("campaign", "cancel", campaign_id, env=env)
    assert cancelled.returncode == 0 and "CANCELLED" in cancelled.stdout
    watched = cli("campaign", "watch", campaign_id, "--json", env=env)  # done at once: cancelled, rollout undone
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert lines and lines[-1]["campaign"]["state"] == "CAMPAIGN_STATE_CANCELLED"
    assert lines[-1]["rollout"]["state"] == "ROLLOUT_STATE_UNDONE"


def test_gate_policies_from_the_command_line(env: dict[str, str]) -> None:
    set_ = run_json(
        env,
        "gate-policy",
        "set",
        "beta-night",
        "--label",
        "tier=beta",
        "--min-battery",
        "80",
        "--hours",
        "22-6",
        "--no-require-charging",
        "--priority",
        "5",
    )
    policy = set_["policy"]["policy"]  # type: ignore[index]
    assert policy == {"require_charging": False, "min_battery_pct": 80.0, "start_hour": 22, "end_hour": 6}
    listed = cli("gate-policy", "list", env=env)
    assert "beta-night" in listed.stdout and "tier" in listed.stdout
    assert run_json(env, "gate-policy", "delete", "beta-night")["deleted"] is True
    assert "no gate policy named beta-night" in cli("gate-policy", "delete", "beta-night", env=env).stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["rollout", "start", "cmp-x", "--steps", "a,b"], "--steps"),
        (["rollout", "start", "cmp-x", "--steps", "10,50"], "INVALID_ARGUMENT"),
        (["rollout", "pause"], "ROLLOUT_ID"),
        (["rollout", "undo", "ro-1", "--all"], "--all"),
        (["campaign", "get", "cmp-doesnotexist"], "NOT_FOUND"),
        (["campaign", "list", "--state", "BOGUS"], "BOGUS"),
        (["campaign", "create", "--name", "x", "--dataset", "d", "--eval-share", "0.9"], "--eval-share"),
        (["gate-policy", "set", "p", "--hours", "9"], "--hours"),
        (["gate-policy", "set", "p", "--temp-high", "40", "--temp-low", "41"], "policy.policy.temp_low_c"),
    ],
)
def test_campaign_mistakes_give_one_line(env: dict[str, str], args: list[str], needle: str) -> None:
    assert_one_line_error(cli(*args, env=env), needle)


NEW_COMMANDS = (
    [["campaign", sub] for sub in ("create", "list", "get", "pause", "resume", "cancel", "watch")]
    + [["rollout", sub] for sub in ("start", "status", "pause", "resume", "undo")]
    + [["gate-policy", sub] for sub in ("set", "list", "delete")]
)


def test_every_new_subcommand_has_help() -> None:
    from typer.testing import CliRunner

    from pocketlora.cli import app

    runner = CliRunner()
    for sub in NEW_COMMANDS:
        result = runner.invoke(app, [*sub, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (sub, result.output)
        assert "Usage" in result.output, sub
