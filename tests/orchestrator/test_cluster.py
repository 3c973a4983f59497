"""The orchestrator on a real multi-node Ray cluster on loopback (tests/support/ray_cluster.py):
a head with no CPUs and two worker nodes that offer the ingress resource, PostgreSQL state,
S3 adapters on SeaweedFS, and `pocketlora orchestrator serve --ray-address ... --replicas 2`
run from a folder where nothing of the project is importable.

The cluster's interpreter has Ray and the dependencies but not PocketLoRA, so these tests also
show that shipping the code is what makes the deployment run. Every wait polls for a condition
with a generous ceiling: a slow 2-core machine makes them slower, never wrong.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from adapters_store import upload_to_url
from agent.client import DeviceClient, Gone, Transient
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import operator_service_pb2_grpc
from protos.pocketlora.v1 import types_pb2 as tpb
from protos.wire import JobState
from tests.support.orch import ENROLL_TOKEN, fake_adapter_blob, op_md
from tests.support.ray_cluster import LoopbackCluster, free_port
from tests.support.seaweed import SeaweedServer
from tests.support.tiny_agent import codes_spec, start, tiny_agent
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.s3]

ROOT = Path(__file__).resolve().parents[2]
INGRESS = {"pocketlora_ingress": 2}
SPEC = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")
CAPS = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)
# Values that must reach the actors but never any file Ray writes.
PG_SECRET = "pg-secret-never-logged-7c1e"
OPERATOR = "operator-token-never-logged-93ab"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackCluster, list[str]]]:
    """A head (no CPUs) and two worker nodes with one CPU and the ingress resource each."""
    with LoopbackCluster(tmp_path_factory.mktemp("cluster")) as c:
        workers = [c.add_node(num_cpus=1, resources=INGRESS) for _ in range(2)]
        yield c, workers


class Serve:
    """`pocketlora orchestrator serve` in a session of its own, its output collected line by line."""

    def __init__(self, cluster: LoopbackCluster, cwd: Path, *args: str, env: dict[str, str]) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RAY_", "AWS_", "PG"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pocketlora", "orchestrator", "serve", *args],
            cwd=cwd,  # the driver's folder is on its workers' path: nothing importable there
            env={**clean, **cluster.env(), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def matches(self, pattern: str) -> list[re.Match[str]]:
        """Every output line matching the pattern so far."""
        return [m for line in list(self.lines) if (m := re.search(pattern, line))]

    def wait_line(self, pattern: str, timeout_s: float, count: int = 1) -> list[re.Match[str]]:
        def seen() -> list[re.Match[str]] | None:
            if self.proc.poll() is not None and len(self.matches(pattern)) < count:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n" + "\n".join(self.lines[-40:]))
            found = self.matches(pattern)
            return found if len(found) >= count else None

        return wait_for(seen, timeout_s, f"serve to print {pattern!r}", every_s=0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._pump.join(10)


def test_the_cluster_runs_pocketlora_only_when_the_driver_ships_it(
    cluster: tuple[LoopbackCluster, list[str]], tmp_path: Path, postgres_url: str
) -> None:
    c, _ = cluster
    # A plain task from a driver in an empty folder: the cluster's workers cannot import the project.
    probe = (
        f"import ray; ray.init(address='{c.address}', log_to_driver=False)\n"
        "@ray.remote(num_cpus=0.1)\n"
        "def where():\n"
        "    try:\n        import orchestrator\n    except ImportError as e:\n        return repr(e)\n"
        "    return orchestrator.__file__\n"
        "print(ray.get(where.remote()))\n"
    )
    (tmp_path / "empty").mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RAY_"))}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path / "empty",
        env={**clean, **c.env()},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "No module named 'orchestrator'" in result.stdout, result.stdout + result.stderr[-2000:]

    # serve (through Ray Client) with --ray-code installed refuses to start, naming every node,
    # before anything runs.
    serve = Serve(
        c,
        tmp_path / "cwd",
        *("--ray-address", c.client_address, "--ray-code", "installed", "--db", postgres_url),
        *("--store", f"file://{tmp_path / 'blobs'}", "--state-dir", str(tmp_path / "state")),
        env={"POCKETLORA_OPERATOR_TOKEN": OPERATOR, "POCKETLORA_ENROLLMENT_TOKEN": ENROLL_TOKEN},
    )
    try:
        serve.proc.wait(300)
    finally:
        serve.stop()
    output = "\n".join(serve.lines)
    assert serve.proc.returncode == 1, output
    assert "cannot run this PocketLoRA" in output
    assert len(serve.matches(r"node [0-9a-f]{8} \(127\.0\.0\.1\): pocketlora missing")) == 3, output
    assert "Traceback" not in output


class Device:
    """A simulated device on the agent's own client: lease, RUNNING, UPLOADING, upload, complete."""

    def __init__(self, address: str, device_id: str, tmp: Path, acks: collections.Counter[str]) -> None:
        self.device_id, self.tmp, self.acks = device_id, tmp / device_id, acks
        self.tmp.mkdir(parents=True)
        self.client = DeviceClient(address, device_id, self.tmp, timeout_s=30)
        self.client.enroll(ENROLL_TOKEN, CAPS)
        self.stop = threading.Event()
        self.vanish = threading.Event()  # set: drop off the network holding the next lease
        self.vanished_job = ""
        self.resume = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.work_once()
            except (Transient, Gone):
                # A lost node's front end, or a lease that moved on: poll again, as the agent does.
                time.sleep(0.5)
            except Exception as exc:  # kept for the failure message; the device carries on
                self.errors.append(repr(exc))
                time.sleep(0.5)

    def work_once(self) -> None:
        lease = self.client.lease_job()
        if not lease.HasField("assignment"):
            time.sleep(0.3)
            return
        a = lease.assignment
        self.client.report_progress(a.job_id, a.lease_epoch, JobState.RUNNING, tpb.JobProgress())
        if self.vanish.is_set():
            self.vanish.clear()
            self.vanished_job = a.job_id
            self.resume.wait(600)  # silent: the lease runs out, the control loop must requeue it
            return
        up = self.client.report_progress(a.job_id, a.lease_epoch, JobState.UPLOADING, tpb.JobProgress())
        blob, info = fake_adapter_blob(self.tmp, device_id=self.device_id, job_id=a.job_id, attempt=a.attempt)
        target = up if up.upload_url else a  # an S3 store hands out a presigned POST policy
        upload_to_url(target.upload_url, blob, fields=dict(target.upload_fields))
        self.client.complete_job(a.job_id, a.lease_epoch, info.sha256, info.size, {"final_loss": 1.0})
        self.acks[a.job_id] += 1


def _waiting(serve: Serve, devices: list[Device], jobs: dict[str, Any]) -> str:
    """What the test saw, for a failure message."""
    states = collections.Counter(tpb.JobState.Name(j.state) for j in jobs.values())
    failures = collections.Counter(
        f"{tpb.ErrorClass.Name(j.last_error_class)}: {j.last_error}" for j in jobs.values() if j.last_error
    )
    errors = {d.device_id: d.errors[-3:] for d in devices if d.errors}
    return f"jobs {dict(states)}; job errors {dict(failures)}; device errors {errors}; serve said:\n" + "\n".join(
        serve.lines[-30:]
    )


def _call(method: Any, request: Any) -> Any:
    """An operator call retried while its front end is unreachable (its node was just lost):
    the channel reconnects to a live one, as any gRPC client's would."""
    give_up = time.monotonic() + 120
    while True:
        try:
            return method(request, metadata=op_md(OPERATOR), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                raise
            time.sleep(1.0)


def _jobs(stub: Any, ids: set[str]) -> dict[str, Any]:
    jobs = _call(stub.ListJobs, opb.ListJobsRequest(page_size=1000)).jobs
    return {j.job_id: j for j in jobs if j.job_id in ids}


# A cluster of three nodes, a real agent training a job and a node loss with its restarts: more
# than the suite's 600 s default on a loaded 2-core machine.
@pytest.mark.timeout(1500)
def test_two_front_ends_on_two_nodes_survive_losing_the_control_loops_node(
    cluster: tuple[LoopbackCluster, list[str]], tmp_path: Path, postgres_url: str, seaweed: SeaweedServer
) -> None:
    c, workers = cluster
    port = free_port()
    address = f"127.0.0.1:{port}"
    serve = Serve(
        c,
        tmp_path / "cwd",
        *("--ray-address", c.address, "--replicas", "2", "--listen", address, "--db", postgres_url),
        *("--store", f"s3://cluster-adapters?endpoint={seaweed.endpoint}", "--state-dir", str(tmp_path / "state")),
        *("--lease-s", "20", "--reap-interval-s", "0.5"),
        env={
            "POCKETLORA_OPERATOR_TOKEN": OPERATOR,
            "POCKETLORA_ENROLLMENT_TOKEN": ENROLL_TOKEN,
            "AWS_ACCESS_KEY_ID": seaweed.access_key,
            "AWS_SECRET_ACCESS_KEY": seaweed.secret_key,
            "PGPASSWORD": PG_SECRET,  # trust auth ignores it; it must still never be written down
        },
    )
    devices: list[Device] = []
    acks: collections.Counter[str] = collections.Counter()
    channel = grpc.insecure_channel(address)
    agent_stop: threading.Event | None = None
    try:
        # Two front ends, one on each worker node, both healthy; the control loop on a worker.
        fronts = serve.wait_line(r"front end (\d) serving on (\S+) on node ([0-9a-f]{8}) \(healthy\)", 600, count=2)
        assert {m.group(2) for m in fronts} == {address}
        assert {m.group(3) for m in fronts} == {w[:8] for w in workers}, serve.lines
        assert "shipped to the cluster" in "\n".join(serve.lines)
        control = serve.wait_line(r"control loop on node ([0-9a-f]{8})", 60)[0].group(1)
        victim = next(w for w in workers if w.startswith(control))

        operator = operator_service_pb2_grpc.OperatorServiceStub(channel)
        devices = [Device(address, f"edge-{i}", tmp_path, acks) for i in range(3)]
        ids: set[str] = set()

        def submit(n: int) -> None:
            for k in range(n):
                req = opb.SubmitJobRequest(
                    request_id=f"r{len(ids)}-{k}", device_id=devices[(len(ids) + k) % 3].device_id, training=SPEC
                )
                ids.add(_call(operator.SubmitJob, req).job.job_id)  # idempotent on request_id

        # One real agent trains a job end to end: QLoRA, presigned upload to S3, verification as
        # a Ray task on a worker node.
        agent_stop, agent_thread = start(tiny_agent(address, tmp_path, "phone-real", ENROLL_TOKEN)[0])
        wait_for(
            lambda: any(
                d.device_id == "phone-real"
                for d in operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md(OPERATOR), timeout=30).devices
            ),
            300,
            "the real agent to enroll",
        )
        real = operator.SubmitJob(
            opb.SubmitJobRequest(request_id="real-1", device_id="phone-real", training=codes_spec(max_steps=4)),
            metadata=op_md(OPERATOR),
            timeout=30,
        ).job.job_id
        devices[0].vanish.set()
        for d in devices:
            d.thread.start()
        submit(6)

        def succeeded() -> list[Any]:
            return [j for j in _jobs(operator, ids).values() if j.state == tpb.JOB_STATE_SUCCEEDED]

        try:
            wait_for(lambda: len(succeeded()) >= 3 and devices[0].vanished_job, 300, "jobs done before the node loss")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_waiting(serve, devices, _jobs(operator, ids))}") from None
        trained = wait_for(
            lambda: (j := _jobs(operator, {real})[real]).state in (tpb.JOB_STATE_SUCCEEDED, tpb.JOB_STATE_FAILED) and j,
            600,
            "the real agent's job",
        )
        assert trained.state == tpb.JOB_STATE_SUCCEEDED, trained.last_error
        agent_stop.set()
        agent_thread.join(60)

        # Kill the node that holds the control loop (and one front end) at once.
        c.kill_node(victim)
        submit(6)
        serve.wait_line(r"control loop now on node ([0-9a-f]{8})", 300)
        assert serve.matches(r"control loop now on node ([0-9a-f]{8})")[0].group(1) != control
        # The vanished device's lease runs out after the loss: only the restarted loop can requeue it.
        wait_for(
            lambda: (
                _jobs(operator, {devices[0].vanished_job})[devices[0].vanished_job].last_error_class
                == tpb.ERROR_CLASS_LEASE_EXPIRED
            ),
            300,
            "the restarted control loop to requeue the expired lease",
        )
        devices[0].resume.set()
        # The lost front end comes back on the surviving node.
        try:
            serve.wait_line(r"front end \d serving on \S+ on node ([0-9a-f]{8}) \(replacement\)", 300)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_waiting(serve, devices, _jobs(operator, ids))}") from None
        try:
            wait_for(lambda: len(succeeded()) == len(ids), 300, "every job to succeed after the node loss")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_waiting(serve, devices, _jobs(operator, ids))}") from None

        final = _jobs(operator, ids)
        assert all(j.state == tpb.JOB_STATE_SUCCEEDED for j in final.values())
        assert final[devices[0].vanished_job].attempt == 2
        # None completed twice: no job acknowledged twice, exactly one adapter version per job.
        assert set(acks) <= ids and max(acks.values()) == 1, acks
        adapters = _call(operator.ListAdapters, opb.ListAdaptersRequest(page_size=1000)).adapters
        assert collections.Counter(a.job_id for a in adapters if a.job_id in ids) == dict.fromkeys(ids, 1)
        health = subprocess.run(
            [sys.executable, "-m", "pocketlora", "orchestrator", "health", "--address", address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 0, health.stdout + health.stderr
    finally:
        if agent_stop is not None:
            agent_stop.set()
        for d in devices:
            d.stop.set()
            d.resume.set()
        for d in devices:
            d.thread.join(60)
            d.client.close()
        channel.close()
        serve.stop()
    # Secrets reached the actors (S3 verification worked) but no file Ray wrote holds them.
    for secret in (seaweed.secret_key, PG_SECRET, OPERATOR):
        leaked = subprocess.run(["grep", "-rlF", secret, str(c.tmp)], capture_output=True, text=True).stdout
        assert not leaked, f"a secret was written to {leaked}"
    with contextlib.suppress(Exception):
        channel.close()
