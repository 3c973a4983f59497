"""`pocketlora orchestrator serve` as a real process (with Ray) for tests, killable as a whole."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.pocketlora.v1 import agent_service_pb2_grpc, operator_service_pb2_grpc
from tests.support.orch import ENROLL_TOKEN, OPERATOR_TOKEN
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """`python -m pocketlora orchestrator serve` in its own session (so Ray's processes are killable)."""

    def __init__(self, tmp: Path, db_url: str, name: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray_tmp = tmp / "ray"
        ray_tmp.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "POCKETLORA_OPERATOR_TOKEN": OPERATOR_TOKEN,
            "POCKETLORA_ENROLLMENT_TOKEN": ENROLL_TOKEN,
            # Presigned URLs must stay valid across the restart, like a real deployment's secret.
            "POCKETLORA_URL_SECRET": "b" * 64,
            "RAY_TMPDIR": str(ray_tmp),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(ROOT),
        }
        self.log = open(tmp / f"serve-{name}.log", "w")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pocketlora",
                "orchestrator",
                "serve",
                "--listen",
                self.address,
                "--db",
                db_url,
                "--store",
                f"file://{tmp / 'blobs'}",
                "--state-dir",
                str(tmp / "state"),
                "--lease-s",
                "600",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.channel = grpc.insecure_channel(self.address)
        self.agent = agent_service_pb2_grpc.AgentServiceStub(self.channel)
        self.operator = operator_service_pb2_grpc.OperatorServiceStub(self.channel)

    def wait_ready(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)

        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"orchestrator exited with {self.proc.returncode}; see {self.log.name}")
            try:
                return bool(
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
            except grpc.RpcError:
                return False

        wait_for(serving, 120, "the orchestrator to serve", every_s=0.25)

    def kill9(self) -> None:
        """SIGKILL the whole session: the CLI, Ray's GCS, raylet, workers and actors."""
        self.channel.close()
        sid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sid, signal.SIGKILL)
        self.proc.wait(30)

        # Ray puts each worker (the actors) in a process group of its own, within our session:
        # kill those by pid too, so no front end outlives the "crash".
        def all_dead() -> bool:
            for pid in _session_pids(sid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not _session_pids(sid)

        wait_for(all_dead, 30, "every process of the killed session to exit", every_s=0.2)
        self.log.close()


def _session_pids(sid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[3] the session id; zombies wait only for their reaper.
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(entry.name))
    return out
