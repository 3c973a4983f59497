"""Fleet simulation: thousands of simulated agents through the real gRPC API.

    python benchmarks/fleet_sim.py [--quick] [--agents N] [--jobs N] [--procs N]

The orchestrator runs as start_server over an Orchestrator in a process of its own (no Ray: the
control loop's reaper runs in that process every 0.5 s, as ControlLoopActor would), over SQLite
with a 5 s lease. Agents are asyncio tasks spread over a few processes; each one enrolls, polls,
and for every job leases it, reports RUNNING, "trains" (a sleep: the only fake), reports
UPLOADING, PUTs a real packed adapter blob to the presigned URL and calls CompleteJob.

- Charging windows gate every agent: outside its window it reports PAUSED (keeping its lease)
  or, when idle, does not ask for work.
- 8% of the agents vanish mid-job (the process "crashes": it goes silent); after a while the
  device comes back as a new incarnation with the same credential, first tries to report on its
  old lease (it must be refused: counted as `fenced`), then polls again and gets the requeued
  job under a new attempt. Jobs are per device, so only that device can pick the job up again.
- 2% of attempts fail with a TRANSIENT error and are retried by the orchestrator.

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
import json
import os
import random
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
    ENROLL_TOKEN,
    ONE_PEER_FLEET,
    OPERATOR_TOKEN,
    ROOT,
    start_server_process,
    stop_process,
)

LEASE_S = 5.0
VANISH_SHARE = 0.08
TRANSIENT_SHARE = 0.02
CHARGE_PERIOD_S = 8.0
CHARGE_SHARE = 0.75
IDLE_POLL_MAX_S = 5.0


# ----------------------------------------------------------------------------- agents process
async def run_agents(address: str, first: int, count: int, tmp: Path, seed_: int, train_s: float) -> dict[str, Any]:
    import grpc

    from adapters_store import upload_to_url
    from protos.pocketlora.v1 import agent_service_pb2 as apb
    from protos.pocketlora.v1 import agent_service_pb2_grpc
    from protos.pocketlora.v1 import types_pb2 as tpb
    from tests.support.orch import fake_adapter_blob

    rng = random.Random(seed_)
    channel = grpc.aio.insecure_channel(address)
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    stats: dict[str, Any] = {
        "completed": [],
        "fenced": 0,
        "vanished": 0,
        "transient": 0,
        "paused": 0,
        "errors": 0,
        "refused": collections.Counter(),
    }
    caps = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)

    async def agent(n: int) -> None:
        device_id = f"sim-{n:05d}"
        phase = rng.uniform(0, CHARGE_PERIOD_S)
        vanish = rng.random() < VANISH_SHARE
        for attempt in range(20):
            try:
                reply = await stub.Enroll(
                    apb.EnrollRequest(device_id=device_id, capabilities=caps),
                    metadata=(("authorization", f"Bearer {ENROLL_TOKEN}"),),
                    timeout=60,
                )
                break
            except grpc.aio.AioRpcError as exc:
                # 2,000 agents enrolling at once on 2 cores: back off and retry like a real agent.
                stats["refused"][f"enroll:{exc.code().name}"] += 1
                await asyncio.sleep(rng.uniform(0.5, 2.0) * (attempt + 1))
        else:
            raise RuntimeError(f"{device_id} could not enroll")
        md = (("authorization", f"Bearer {reply.device_credential}"), ("x-pocketlora-device", device_id))
        enrolled.append(device_id)

        def charging() -> bool:
            return ((time.monotonic() + phase) % CHARGE_PERIOD_S) < CHARGE_PERIOD_S * CHARGE_SHARE

        async def report(job_id: str, epoch: int, state: int) -> Any:
            return await stub.ReportProgress(
                apb.ReportProgressRequest(job_id=job_id, lease_epoch=epoch, state=state), metadata=md, timeout=30
            )

        while not stop.is_set():
            try:
                if not charging():
                    hb = await stub.Heartbeat(
                        apb.HeartbeatRequest(
                            device_id=device_id, eligible=False, eligibility_reason=tpb.ELIGIBILITY_REASON_NOT_CHARGING
                        ),
                        metadata=md,
                        timeout=30,
                    )
                    # Pace steering, as the real agent obeys it (capped: a sim has short windows).
                    wait = hb.next_poll_after.seconds + hb.next_poll_after.nanos / 1e9
                    await asyncio.sleep(min(wait, IDLE_POLL_MAX_S) * rng.uniform(0.5, 1.0))
                    continue
                lease = await stub.LeaseJob(apb.LeaseJobRequest(device_id=device_id), metadata=md, timeout=30)
                if not lease.HasField("assignment"):
                    wait = lease.next_poll_after.seconds + lease.next_poll_after.nanos / 1e9
                    await asyncio.sleep(min(wait, IDLE_POLL_MAX_S) * rng.uniform(0.5, 1.0))
                    continue
                a = lease.assignment
                await report(a.job_id, a.lease_epoch, tpb.JOB_STATE_RUNNING)
                if vanish:
                    # The agent process dies mid-job; the device comes back later as a new
                    # incarnation that still remembers the old lease and tries to report on it.
                    vanish = False
                    stats["vanished"] += 1
                    await asyncio.sleep(LEASE_S * 2 + rng.uniform(0, 2))
                    try:
                        await report(a.job_id, a.lease_epoch, tpb.JOB_STATE_RUNNING)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                            stats["fenced"] += 1
                    continue
                trained = 0.0
                paused = False
                while trained < train_s:
                    if charging():
                        if paused:
                            await report(a.job_id, a.lease_epoch, tpb.JOB_STATE_RUNNING)
                            paused = False
                        step = min(0.5, train_s - trained)
                        await asyncio.sleep(step)
                        trained += step
                    else:
                        if not paused:
                            stats["paused"] += 1
                            paused = True
                        await report(a.job_id, a.lease_epoch, tpb.JOB_STATE_PAUSED)  # renews the lease
                        await asyncio.sleep(LEASE_S / 3)
                if rng.random() < TRANSIENT_SHARE:
                    stats["transient"] += 1
                    await stub.FailJob(
                        apb.FailJobRequest(
                            job_id=a.job_id,
                            lease_epoch=a.lease_epoch,
                            error_class=tpb.ERROR_CLASS_TRANSIENT,
                            message="simulated",
                        ),
                        metadata=md,
                        timeout=30,
                    )
                    continue
                up = await report(a.job_id, a.lease_epoch, tpb.JOB_STATE_UPLOADING)
                blob, info = await asyncio.to_thread(
                    fake_adapter_blob, tmp, device_id=device_id, job_id=a.job_id, attempt=a.attempt
                )
                target = up if up.upload_url else a
                await asyncio.to_thread(upload_to_url, target.upload_url, blob, fields=dict(target.upload_fields))
                blob.unlink()
                await stub.CompleteJob(
                    apb.CompleteJobRequest(
                        job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size
                    ),
                    metadata=md,
                    timeout=60,
                )
                stats["completed"].append([a.job_id, a.attempt])
            except grpc.aio.AioRpcError as exc:
                # A refused report (a lease lost while the machine was slow) is the fencing
                # working; the agent drops the job and polls again.
                stats["refused"][exc.code().name] += 1
                await asyncio.sleep(1.0)
            except Exception:
                stats["errors"] += 1
                await asyncio.sleep(1.0)

    enrolled: list[str] = []
    tasks = [asyncio.create_task(agent(n)) for n in range(first, first + count)]
    while len(enrolled) < count:
        await asyncio.sleep(0.2)
        if any(t.done() for t in tasks):
            break
    if len(enrolled) < count:
        failed = next(t for t in tasks if t.done())
        raise RuntimeError(f"enrollment failed: {failed.exception()!r}")
    print(json.dumps({"enrolled": len(enrolled)}), flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    stats["refused"] = dict(stats["refused"])
    return stats


def agents_main(address: str, first: int, count: int, tmp: str, seed_: int, train_s: float) -> None:
    stats = asyncio.run(run_agents(address, first, count, Path(tmp), seed_, train_s))
    print(json.dumps(stats), flush=True)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 agents, 400 jobs, 2,000-device fan-out")
    parser.add_argument("--agents", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--procs", type=int, default=4, help="agent processes")
    parser.add_argument("--fanout", type=int, default=0, help="devices a campaign fans out to")
    parser.add_argument("--train-s", type=float, default=1.0, help="simulated training time per job")
    parser.add_argument("--db", default="", help="state URL (default: a fresh SQLite file)")
    parser.add_argument("--timeout-s", type=float, default=0, help="give up waiting for jobs after this")
    parser.add_argument("--campaign", action="store_true", help="then the campaign and rollout simulation")
    parser.add_argument("--campaign-only", action="store_true", help="only the campaign and rollout simulation")
    args = parser.parse_args(argv)
    if args.campaign_only:
        return campaign_phase(args, {})
    agents = args.agents or (200 if args.quick else 2_000)
    jobs = args.jobs or (400 if args.quick else 5_000)
    fanout = args.fanout or (2_000 if args.quick else 10_000)
    timeout_s = args.timeout_s or (120 if args.quick else 900)
    max_attempts = 6

    tmp = Path(tempfile.mkdtemp(prefix="pocketlora-fleet-"))
    db_url = args.db or f"sqlite:///{tmp / 'state.db'}"
    server, address = start_server_process(
        db_url, tmp, lease_s=LEASE_S, retry_base_s=0.5, reap_every=0.5, **ONE_PEER_FLEET
    )
    procs: list[subprocess.Popen[str]] = []
    result: dict[str, Any] = {"agents": agents, "jobs": jobs, "db": db_url.split("?")[0].split(":")[0]}
    try:
        per = -(-agents // args.procs)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for p in range(args.procs):
            first, count = p * per, min(per, agents - p * per)
            if count <= 0:
                break
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "agents",
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
        devices = [f"sim-{n:05d}" for n in range(agents)]

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
            out, _ = proc.communicate(timeout=60)
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
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"fleet simulation: {agents:,} agents in {len(procs)} processes, {jobs:,} jobs, lease {LEASE_S:g} s, {result['db']}"
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
    if len(sys.argv) > 1 and sys.argv[1] == "agents":
        a = sys.argv[2:]
        agents_main(a[0], int(a[1]), int(a[2]), a[3], int(a[4]), float(a[5]))
    else:
        raise SystemExit(main())
