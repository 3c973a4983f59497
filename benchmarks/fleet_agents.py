"""The simulated agents of fleet_sim.py: one process of asyncio tasks, each a device that enrolls,
polls, leases, reports, uploads a real packed adapter blob and completes (training is a sleep),
gated by charging windows; some vanish mid-job and come back, some attempts fail TRANSIENT.

    python benchmarks/fleet_agents.py ADDRESS FIRST COUNT TMP SEED TRAIN_S

Prints one JSON line when enrolled, then its statistics (one JSON line) after SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ENROLL_TOKEN

# The orchestrator's lease in the simulation (fleet_sim.py serves with it).
LEASE_S = 5.0
VANISH_SHARE = 0.08
TRANSIENT_SHARE = 0.02
CHARGE_PERIOD_S = 8.0
CHARGE_SHARE = 0.75
IDLE_POLL_MAX_S = 5.0


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


if __name__ == "__main__":
    a = sys.argv[1:]
    agents_main(a[0], int(a[1]), int(a[2]), a[3], int(a[4]), float(a[5]))
