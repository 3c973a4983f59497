"""The CLI: every subcommand has --help; user mistakes give one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.pocketlora.v1 import agent_service_pb2 as apb
from tests.support.orch import ENROLL_TOKEN, OPERATOR_TOKEN, ServerThread, op_md

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in ("POCKETLORA_OPERATOR_TOKEN", "POCKETLORA_ORCHESTRATOR") and not k.startswith("POCKETLORA_TLS_")
    }
    full_env = {**inherited, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pocketlora", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    text = result.stderr.strip()
    for needle in needles:
        assert needle in text, text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(tmp_path_factory.mktemp("cli")) as srv:
        srv.agent.Enroll(apb.EnrollRequest(device_id="phone-1"), metadata=op_md(ENROLL_TOKEN))
        yield srv


SUBCOMMANDS = [
    [],
    ["demo"],
    ["orchestrator", "serve"],
    ["agent", "run"],
    ["job", "submit"],
    ["job", "list"],
    ["job", "get"],
    ["job", "cancel"],
    ["job", "watch"],
    ["device", "list"],
    ["device", "get"],
    ["adapter", "list"],
    ["adapter", "get"],
    ["adapter", "activate"],
    ["adapter", "deactivate"],
    ["adapter", "rollback"],
    ["adapter", "gc"],
    ["infer"],
    ["summary"],
    ["token", "create"],
    ["model", "prepare"],
]


@pytest.mark.parametrize("sub", SUBCOMMANDS, ids=lambda s: " ".join(s) or "root")
def test_every_subcommand_has_help(sub: list[str]) -> None:
    result = cli(*sub, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_operator_commands_round_trip(server: ServerThread) -> None:
    env = {"POCKETLORA_OPERATOR_TOKEN": OPERATOR_TOKEN, "POCKETLORA_ORCHESTRATOR": server.address}
    sub = cli(
        "job", "submit", "--device-id", "phone-1", "--dataset", "notes", "--request-id", "cli-1", "--json", env=env
    )
    assert sub.returncode == 0, sub.stderr
    job_id = json.loads(sub.stdout)["job"]["job_id"]
    listed = cli("job", "list", "--json", env=env)
    assert [j["job_id"] for j in json.loads(listed.stdout)["jobs"]] == [job_id]
    got = cli("job", "get", job_id, "--json", env=env)
    assert json.loads(got.stdout)["state"] == "JOB_STATE_QUEUED"
    devices = cli("device", "list", "--json", env=env)
    assert json.loads(devices.stdout)["devices"][0]["device_id"] == "phone-1"
    cancelled = cli("job", "cancel", job_id, env=env)
    assert cancelled.returncode == 0 and "CANCELLED" in cancelled.stdout


def test_submit_ships_a_dataset_file_through_the_store(server: ServerThread, tmp_path: Path) -> None:
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "a note"}\n')
    env = {"POCKETLORA_OPERATOR_TOKEN": OPERATOR_TOKEN, "POCKETLORA_ORCHESTRATOR": server.address}
    store = f"file://{server.store.root}"
    sub = cli(
        "job", "submit", "--device-id", "phone-1", "--dataset-file", str(data), "--store", store, "--json", env=env
    )
    assert sub.returncode == 0, sub.stderr
    training = json.loads(sub.stdout)["job"]["training"]
    assert training["dataset_object"].startswith("datasets/sha256/") and "dataset" not in training
    assert server.store.stat(training["dataset_object"]) == data.stat().st_size
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    result = cli("job", "submit", "--device-id", "phone-1", "--dataset-file", str(bad), "--store", store, env=env)
    assert_one_line_error(result, "bad.jsonl:1")
    both = cli("job", "submit", "--device-id", "phone-1", "--dataset", "x", "--dataset-file", str(data), env=env)
    assert_one_line_error(both, "exactly one")


def test_unknown_job_id_is_one_line(server: ServerThread) -> None:
    env = {"POCKETLORA_OPERATOR_TOKEN": OPERATOR_TOKEN}
    result = cli("job", "get", "job-doesnotexist", "--orchestrator", server.address, env=env)
    assert_one_line_error(result, "NOT_FOUND", "job-doesnotexist")


def test_bad_request_names_the_field(server: ServerThread) -> None:
    env = {"POCKETLORA_OPERATOR_TOKEN": OPERATOR_TOKEN}
    result = cli(
        "job",
        "submit",
        "--device-id",
        "phone-1",
        "--dataset",
        "../../etc/passwd",
        "--orchestrator",
        server.address,
        env=env,
    )
    assert_one_line_error(result, "INVALID_ARGUMENT", "training.dataset")


def test_wrong_token_is_one_line(server: ServerThread) -> None:
    result = cli("job", "list", "--orchestrator", server.address, "--token", "wrong", env={})
    assert_one_line_error(result, "UNAUTHENTICATED")


def test_unreachable_orchestrator(tmp_path: Path) -> None:
    result = cli("job", "list", "--orchestrator", "127.0.0.1:1", "--token", "x", env={})
    assert_one_line_error(result, "cannot reach the orchestrator at 127.0.0.1:1")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["job", "list", "--page-size", "-5", "--token", "x"], "--page-size"),
        (["job", "list", "--state", "BOGUS", "--token", "x"], "BOGUS"),
        (["job", "list", "--orchestrator", "nocolon", "--token", "x"], "HOST:PORT"),
        (["job", "submit", "--device-id", "d", "--dataset", "x", "--rank", "0", "--token", "x"], "--rank"),
        (["device", "list", "--label", "novalue", "--token", "x"], "KEY=VALUE"),
        (["orchestrator", "serve", "--listen", "nonsense"], "HOST:PORT"),
        (["orchestrator", "serve", "--db", "mysql://x", "--state-dir", "{tmp}"], "unsupported database URL scheme"),
        (
            ["orchestrator", "serve", "--store", "ftp://x", "--state-dir", "{tmp}", "--db", "sqlite:///{tmp}/s.db"],
            "ftp",
        ),
        (["agent", "run", "--device-id", "d", "--base-model", "/nonexistent"], "no config.json"),
        (["infer", "--base-model", "/nonexistent", "--prompt", "hi"], "no config.json"),
        (["demo", "--dataset", "/nonexistent.jsonl"], "no such file"),
    ],
)
def test_bad_input_gives_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = cli(*args, env={})
    assert_one_line_error(result, needle)


def test_malformed_dataset_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    result = cli("demo", "--dataset", str(bad), env={})
    assert_one_line_error(result, "bad.jsonl", "2")


def test_agent_enrollment_problems_are_one_line(server: ServerThread, tmp_path: Path) -> None:
    from tests.support.tiny_models import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base")
    args = [
        "agent",
        "run",
        "--device-id",
        "p9",
        "--base-model",
        str(base),
        "--work-dir",
        str(tmp_path / "w"),
        "--orchestrator",
        server.address,
        "--sensors",
        "psutil",
    ]
    assert_one_line_error(cli(*args, env={}), "no enrollment token")
    assert_one_line_error(cli(*args, "--enrollment-token", "wrong", env={}), "enrollment refused", "UNAUTHENTICATED")


class Lines:
    """A process's stdout lines, read in a thread, to wait for what it printed."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()

    def wait(self, needle: str, times: int = 1, timeout: float = 60.0) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: sum(needle in line for line in self.lines) >= times, timeout)
            assert ok, f"{needle!r} x{times} not printed: {self.lines}"


def _drive_job(server: ServerThread, job_id: str, device: str, credential: str, printed: Lines, prefix: str) -> None:
    """Lease the job as its device would, report progress, pause, resume, then fail it for good,
    each change once the watch has printed the one before (a watch sees a job's latest state)."""
    from protos.pocketlora.v1 import types_pb2 as tpb
    from tests.support.orch import dev_md

    md = dev_md(device, credential)
    printed.wait(f"{prefix}QUEUED")
    a = server.agent.LeaseJob(apb.LeaseJobRequest(device_id=device), metadata=md).assignment
    assert a.job_id == job_id
    for n, (step, state, name) in enumerate(
        (
            (1, tpb.JOB_STATE_RUNNING, "RUNNING"),
            (2, tpb.JOB_STATE_PAUSED, "PAUSED"),
            (3, tpb.JOB_STATE_RUNNING, "RUNNING"),
        )
    ):
        server.agent.ReportProgress(
            apb.ReportProgressRequest(
                job_id=a.job_id,
                lease_epoch=a.lease_epoch,
                state=state,
                progress=tpb.JobProgress(step=step, total_steps=4, loss=2.0 / step),
                pause_reason=tpb.ELIGIBILITY_REASON_TOO_HOT,
            ),
            metadata=md,
        )
        printed.wait(f"{prefix}{name}", times=2 if n == 2 else 1)
    server.agent.FailJob(
        apb.FailJobRequest(
            job_id=a.job_id, lease_epoch=a.lease_epoch, error_class=tpb.ERROR_CLASS_DATASET_INVALID, message="bad rows"
        ),
        metadata=md,
    )


@pytest.mark.parametrize("as_json", [True, False])
def test_job_watch_follows_a_job_to_its_end(server: ServerThread, as_json: bool) -> None:
    env = {**os.environ, "POCKETLORA_OPERATOR_TOKEN": OPERATOR_TOKEN, "POCKETLORA_ORCHESTRATOR": server.address}
    env["COLUMNS"] = "200"
    device = f"watched-{as_json}".lower()
    enrolled = server.agent.Enroll(apb.EnrollRequest(device_id=device), metadata=op_md(ENROLL_TOKEN))
    sub = cli("job", "submit", "--device-id", device, "--dataset", "notes", "--json", env=env)
    job_id = json.loads(sub.stdout)["job"]["job_id"]
    cmd = [sys.executable, "-m", "pocketlora", "job", "watch", job_id, *(["--json"] if as_json else [])]
    watch = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        printed = Lines(watch)
        _drive_job(server, job_id, device, enrolled.device_credential, printed, "JOB_STATE_" if as_json else "")
        watch.wait(timeout=60)
        printed.wait("FAILED")
    finally:
        watch.kill()
    stdout = "".join(printed.lines)
    assert watch.returncode == 1, stdout  # it failed for good: a script can tell
    if as_json:
        states = [json.loads(line)["state"] for line in stdout.splitlines()]
        assert states[0] == "JOB_STATE_QUEUED" and states[-1] == "JOB_STATE_FAILED"
        assert "JOB_STATE_PAUSED" in states and "JOB_STATE_RUNNING" in states
    else:
        for needle in ("QUEUED", "RUNNING", "PAUSED", "TOO_HOT", "FAILED", "bad rows", "3/4"):
            assert needle in stdout, stdout
