"""Fleet simulation: thousands of simulated agents through the real gRPC API.

    python benchmarks/fleet_sim.py [--quick] [--agents N] [--jobs N] [--procs N] [--real-agents N]
    python benchmarks/fleet_sim.py --ray-address ADDR --replicas 2 [--db postgresql://...]

The orchestrator runs as start_server over an Orchestrator in a process of its own (no Ray: the
control loop's reaper runs in that process every 0.5 s, as ControlLoopActor would), over SQLite
with a 5 s lease. A share of the agents (--real-agents, a tenth by default) are the product's
agent.agent.Agent, one thread each, whose training child is replaced by a sleeping stand-in
that speaks the worker's protocol (benchmarks/fleet_real_agents.py). The rest are asyncio tasks
spread over a few processes; each one enrolls, polls, and for every job leases it, reports
RUNNING, "trains" (a sleep), reports UPLOADING, PUTs a real packed adapter blob to the presigned
URL and calls CompleteJob.

- Charging windows gate every agent: outside its window it reports PAUSED (keeping its lease)
  or, when idle, does not ask for work.
- 8% of the simulated agents vanish mid-job (the process "crashes": it goes silent); after a while the
  device comes back as a new incarnation with the same credential, first tries to report on its
  old lease (it must be refused: counted as `fenced`), then polls again and gets the requeued
  job under a new attempt. Jobs are per device, so only that device can pick the job up again.
- 2% of attempts fail with a TRANSIENT error and are retried by the orchestrator.

With --ray-address the orchestrator is deployed on that Ray cluster instead, as
`pocketlora orchestrator serve --ray-address ADDR --replicas N` deploys it (code shipped, front
ends on the ingress nodes), over PostgreSQL (--db, else a temporary server); the same simulation
first runs against the single-process SQLite server, and the JSON adds replicas, nodes and the
ratio of the two jobs_per_s figures.

Asserts every job ends SUCCEEDED or FAILED within its attempt limit, none lost, none completed
twice (by acknowledgements and by registered adapter versions). Then measures campaign fan-out:
one SubmitCampaign to 10,000 devices seeded through the state store. With --campaign, then runs
the campaign and staged-rollout simulation of campaign_sim.py (late enrollees, a rollout, an
injected bad adapter) over --agents devices and adds its fields; --campaign-only runs just that.
Prints a table, then one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    ONE_PEER_FLEET,
    OPERATOR_TOKEN,
    ROOT,
    start_ray_deployment,
    start_server_process,
    stop_process,
)
from benchmarks.fleet_sim_agents import LEASE_S, TRANSIENT_SHARE


# ----------------------------------------------------------------------------- driver
async def submit_all(address: str, devices: list[str], jobs: int, max_attempts: int) -> list[str]:
    import grpc

    from protos.pocketlora.v1 import operator_service_pb2 as opb
    from protos.pocketlora.v1 import operator_service_pb2_grpc
    from protos.pocketlora.v1 import types_pb2 as tpb

    spec = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")
    md = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = operator_service_pb2_grpc.OperatorServiceStub(channel)
        sem = asyncio.Semaphore(32)
        out: list[str] = [""] * jobs

        async def one(k: int) -> None:
            async with sem:
                req = opb.SubmitJobRequest(
                    request_id=f"sim-job-{k}",
                    device_id=devices[k % len(devices)],
                    training=spec,
                    max_attempts=max_attempts,
                )
                out[k] = (await stub.SubmitJob(req, metadata=md, timeout=60)).job.job_id

        await asyncio.gather(*(one(k) for k in range(jobs)))
    return out


def operator_stub(address: str) -> Any:
    import grpc

    from protos.pocketlora.v1 import operator_service_pb2_grpc

    return operator_service_pb2_grpc.OperatorServiceStub(grpc.insecure_channel(address))


def all_jobs(stub: Any) -> list[Any]:
    from protos.pocketlora.v1 import operator_service_pb2 as opb

    md = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)
    jobs, token = [], ""
    while True:
        page = stub.ListJobs(opb.ListJobsRequest(page_size=1000, page_token=token), metadata=md, timeout=60)
        jobs += list(page.jobs)
        token = page.next_page_token
        if not token:
            return jobs


def all_adapters(stub: Any) -> list[Any]:
    from protos.pocketlora.v1 import operator_service_pb2 as opb

    md = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)
    out, token = [], ""
    while True:
        page = stub.ListAdapters(opb.ListAdaptersRequest(page_size=1000, page_token=token), metadata=md, timeout=60)
        out += list(page.adapters)
        token = page.next_page_token
        if not token:
            return out


def seed_fanout_devices(db_url: str, n: int) -> None:
    from orchestrator.domain import DeviceRecord
    from orchestrator.state import open_state

    now = time.time()
    store = open_state(db_url)
    try:
        with store.transaction() as tx:
            tx.insert_devices(
                [
                    DeviceRecord(
                        f"fan-{i:06d}",
                        "unused",
                        {"base_model_id": "tiny", "ram_bytes": 8 * 2**30},
                        {"pool": "fanout"},
                        enrolled_at=now,
                        last_seen=now,
                    )
                    for i in range(n)
                ]
            )
    finally:
        store.close()


# ----------------------------------------------------------------------------- on a Ray cluster
def single_process_baseline(argv: list[str]) -> dict[str, Any]:
    """The same simulation against the single-process SQLite server (this script without the
    Ray flags, in a subprocess); its JSON line."""
    drop = {"--ray-address", "--replicas", "--db"}
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in drop:
            skip = "=" not in arg
        else:
            rest.append(arg)
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *rest], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the single-process baseline failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def start_orchestrator(args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> tuple[Any, str, str]:
    """The server under test: (process, address, db URL)."""
    if not args.ray_address:
        db_url = args.db or f"sqlite:///{tmp / 'state.db'}"
        server, address = start_server_process(
            db_url, tmp, lease_s=LEASE_S, retry_base_s=0.5, reap_every=0.5, **ONE_PEER_FLEET
        )
        return server, address, db_url
    db_url = args.db
    if not db_url:
        from tests.support.postgres import PostgresServer

        db_url = stack.enter_context(PostgresServer()).create_database()
    server, address, args.nodes = start_ray_deployment(
        args.ray_address,
        db_url,
        tmp,
        args.replicas,
        lease_s=LEASE_S,
        retry_base_s=0.5,
        reap_interval_s=0.5,
        **ONE_PEER_FLEET,
    )
    return server, address, db_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 agents, 400 jobs, 2,000-device fan-out")
    parser.add_argument("--agents", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--procs", type=int, default=4, help="agent processes")
    parser.add_argument("--real-agents", type=int, default=-1, help="real Agent instances (default: a tenth)")
    parser.add_argument("--fanout", type=int, default=0, help="devices a campaign fans out to")
    parser.add_argument("--train-s", type=float, default=1.0, help="simulated training time per job")
    parser.add_argument("--db", default="", help="state URL (default: a fresh SQLite file)")
    parser.add_argument("--timeout-s", type=float, default=0, help="give up waiting for jobs after this")
    parser.add_argument("--ray-address", default="", help="deploy the orchestrator on this Ray cluster")
    parser.add_argument("--replicas", type=int, default=2, help="front ends on the Ray cluster")
    parser.add_argument("--campaign", action="store_true", help="then the campaign and rollout simulation")
    parser.add_argument("--campaign-only", action="store_true", help="only the campaign and rollout simulation")
    args = parser.parse_args(argv)
    if args.campaign_only:
        return campaign_phase(args, {})
    baseline = single_process_baseline(sys.argv[1:] if argv is None else argv) if args.ray_address else {}
    agents = args.agents or (200 if args.quick else 2_000)
    real = agents // 10 if args.real_agents < 0 else min(args.real_agents, agents)
    jobs = args.jobs or (400 if args.quick else 5_000)
    fanout = args.fanout or (2_000 if args.quick else 10_000)
    timeout_s = args.timeout_s or (120 if args.quick else 900)
    max_attempts = 6

    tmp = Path(tempfile.mkdtemp(prefix="pocketlora-fleet-"))
    stack = contextlib.ExitStack()
    server, address, db_url = start_orchestrator(args, tmp, stack)
    procs: list[subprocess.Popen[str]] = []
    result: dict[str, Any] = {
        "agents": agents,
        "real_agents": real,
        "jobs": jobs,
        "db": db_url.split("?")[0].split(":")[0],
    }
    if args.ray_address:
        result.update(replicas=args.replicas, nodes=args.nodes)
    try:
        simulated = agents - real
        per = -(-simulated // args.procs)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if real:
            here = Path(__file__).resolve().parent
            cmd = [sys.executable, str(here / "fleet_real_agents.py"), address, "0", str(real), str(tmp), "99"]
            cmd += [str(args.train_s), str(TRANSIENT_SHARE)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
        for p in range(args.procs):
            first, count = p * per, min(per, simulated - p * per)
            if count <= 0:
                break
            cmd = [
                sys.executable,
                str(Path(__file__).resolve().with_name("fleet_sim_agents.py")),
                address,
                str(first),
                str(count),
                str(tmp),
                str(p),
                str(args.train_s),
            ]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line or "enrolled" not in json.loads(line):
                raise RuntimeError("an agent process died while enrolling")
        devices = [f"real-{n:05d}" for n in range(real)] + [f"sim-{n:05d}" for n in range(simulated)]

        t0 = time.perf_counter()
        job_ids = asyncio.run(submit_all(address, devices, jobs, max_attempts))
        submitted_s = time.perf_counter() - t0
        ours = set(job_ids)
        stub = operator_stub(address)
        open_states = {1, 2, 3, 4, 5}  # QUEUED .. UPLOADING
        give_up = time.monotonic() + timeout_s
        while True:
            remaining = sum(1 for j in all_jobs(stub) if j.job_id in ours and j.state in open_states)
            if remaining == 0 or time.monotonic() > give_up:
                break
            time.sleep(1.0)
        wall = time.perf_counter() - t0

        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        stats = []
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            stats.append(json.loads(out.strip().splitlines()[-1]))

        final = {j.job_id: j for j in all_jobs(stub) if j.job_id in ours}
        acks = collections.Counter(job_id for s in stats for job_id, _ in s["completed"])
        adapters = collections.Counter(a.job_id for a in all_adapters(stub) if a.job_id in ours)
        result.update(
            jobs=len(job_ids),
            succeeded=sum(1 for j in final.values() if j.state == 6),
            failed=sum(1 for j in final.values() if j.state == 7),
            lost=len(ours) - sum(1 for j in final.values() if j.state in (6, 7)),
            double_completed=sum(1 for n in acks.values() if n > 1) + sum(1 for n in adapters.values() if n > 1),
            over_attempts=sum(1 for j in final.values() if j.attempt > j.max_attempts),
            succeeded_without_adapter=sum(1 for j in final.values() if j.state == 6 and adapters[j.job_id] != 1),
            vanished=sum(s["vanished"] for s in stats),
            fenced=sum(s["fenced"] for s in stats),
            transient_failures=sum(s["transient"] for s in stats),
            pauses=sum(s["paused"] for s in stats),
            retried_jobs=sum(1 for j in final.values() if j.attempt > 1),
            agent_errors=sum(s["errors"] for s in stats),
            real_agents_completed=len(stats[0]["completed"]) if real else 0,
            real_agents_events=stats[0]["events"] if real else {},
            refused=dict(sum((collections.Counter(s["refused"]) for s in stats), collections.Counter())),
            submit_s=round(submitted_s, 2),
            wall_s=round(wall, 1),
            jobs_per_s=round(len(ours) / wall, 1),
        )

        # Campaign fan-out: one SubmitCampaign to every device with the label, seeded now (after
        # the simulation, so they never inflated the fleet size the pace steering sees).
        seed_fanout_devices(db_url, fanout)
        from protos.pocketlora.v1 import operator_service_pb2 as opb
        from protos.pocketlora.v1 import types_pb2 as tpb

        req = opb.SubmitCampaignRequest(
            request_id="fanout-1",
            name="fanout",
            selector=tpb.DeviceSelector(labels={"pool": "fanout"}),
            training=tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain"),
        )
        t1 = time.perf_counter()
        campaign = stub.SubmitCampaign(
            req, metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),), timeout=300
        ).campaign
        result["fanout_devices"] = int(campaign.job_count)
        result["fanout_s"] = round(time.perf_counter() - t1, 2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        stop_process(server)
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if baseline:
        result.update(
            baseline_db="sqlite",
            baseline_jobs_per_s=baseline["jobs_per_s"],
            jobs_per_s_ratio=round(result["jobs_per_s"] / baseline["jobs_per_s"], 2),
        )

    where = f", Ray cluster: {args.replicas} front ends, {args.nodes} nodes" if args.ray_address else ""
    print(
        f"fleet simulation: {agents:,} agents in {len(procs)} processes, {jobs:,} jobs, lease {LEASE_S:g} s, {result['db']}{where}"
    )
    for key in (
        "succeeded",
        "failed",
        "lost",
        "double_completed",
        "over_attempts",
        "vanished",
        "fenced",
        "transient_failures",
        "retried_jobs",
        "pauses",
        "wall_s",
        "jobs_per_s",
        "fanout_devices",
        "fanout_s",
        *(("baseline_jobs_per_s", "jobs_per_s_ratio") if baseline else ()),
    ):
        print(f"  {key:<20}{result[key]}")
    ok = (
        result["lost"] == 0
        and result["double_completed"] == 0
        and result["over_attempts"] == 0
        and result["succeeded_without_adapter"] == 0
        and result["succeeded"] + result["failed"] == result["jobs"]
    )
    if args.campaign:
        return campaign_phase(args, result, ok)
    print(json.dumps(result))
    return 0 if ok else 1


def campaign_phase(args: argparse.Namespace, result: dict[str, Any], ok: bool = True) -> int:
    """The campaign and staged-rollout simulation (campaign_sim.py), its fields added to result."""
    from benchmarks import campaign_sim

    devices = args.agents or (200 if args.quick else 2_000)
    got = campaign_sim.run_campaign_sim(devices, 0.25, args.procs, args.train_s, args.timeout_s or 900)
    print(f"campaign simulation: {devices:,} devices ({got['late_devices']:,} enrolling late)")
    for key in ("campaign_jobs", "late_enrollees_served", "rollout_steps", "rollout_halted", "rolled_back_devices"):
        print(f"  {key:<22}{got[key]}")
    result.update({k if k not in result else f"campaign_{k}": v for k, v in got.items()})
    print(json.dumps(result))
    return 0 if ok and campaign_sim.ok(got) else 1


if __name__ == "__main__":
    raise SystemExit(main())
