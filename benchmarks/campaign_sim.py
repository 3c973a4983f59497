"""Campaign and staged-rollout simulation: thousands of simulated devices through the real gRPC API.

    python benchmarks/campaign_sim.py [--devices N] [--late-share 0.25] [--procs N]
    python benchmarks/fleet_sim.py --campaign-only ...   (the same, from the fleet simulation)

The orchestrator runs in a process of its own (as in fleet_sim.py), over SQLite, with the control
loop's passes (reaper, campaign fan-out, rollout steps) every 0.5 s. Simulated devices are asyncio
tasks in a few processes: each enrolls with an enrollment token that fixes the label pool=spring
(the labels selectors target are set by admins or tokens, never by devices), heartbeats (reporting the
adapter it runs and the ones it refused), leases, "trains" (a sleep: the only fake), uploads a real
packed adapter blob whose manifest carries held-out figures that beat the base, and completes.
A device "loads" the adapter its heartbeat reply names, unless the adapter is named bad-*: then
it reports a load failure.

1. Three quarters of the devices enroll; campaign A is created; the rest enroll afterwards and
   the fan-out must give each of them a job.
2. Once every job of A succeeded: a rollout of A in steps 1, 10, 50, 100% with an eval gate;
   it must complete, every device running its own adapter.
3. Campaign B trains the injected bad adapter (bad-persona) on every device; its rollout must halt
   at its first step and send that step's devices back to their adapter from A.

Checks: one job per device per campaign, every job SUCCEEDED once (acknowledgements and adapter
versions), nothing lost. Prints a table, then one JSON line (the last line) with campaign_jobs,
late_enrollees_served, rollout_steps, rollout_halted, rolled_back_devices and the checks.
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

from benchmarks._common import OPERATOR_TOKEN, ROOT, start_server_process, stop_process

POLL_CAP_S = 3.0
EVAL = {"eval_loss_base": 2.0, "eval_loss_adapter": 1.6, "eval_examples": 8}
STEPS = [1, 10, 50, 100]
MD = (("authorization", f"Bearer {OPERATOR_TOKEN}"),)


# ----------------------------------------------------------------------------- devices process
async def run_devices(
    address: str, token: str, first: int, count: int, early: int, tmp: Path, train_s: float
) -> dict[str, Any]:
    import grpc

    from adapters_store import upload_to_url
    from protos.pocketlora.v1 import agent_service_pb2 as apb
    from protos.pocketlora.v1 import agent_service_pb2_grpc
    from protos.pocketlora.v1 import types_pb2 as tpb
    from tests.support.orch import fake_adapter_blob

    rng = random.Random(first)
    channel = grpc.aio.insecure_channel(address)
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    stats: dict[str, Any] = {"completed": [], "refused": 0, "errors": collections.Counter()}
    caps = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)
    enrolled: list[str] = []
    go_late = tmp / "late-go"

    async def device(n: int) -> None:
        device_id = f"cmp-{n:05d}"
        if n >= early:
            while not go_late.exists():
                await asyncio.sleep(0.2)
        for attempt in range(20):
            try:
                reply = await stub.Enroll(
                    apb.EnrollRequest(device_id=device_id, capabilities=caps),
                    metadata=(("authorization", f"Bearer {token}"),),
                    timeout=60,
                )
                break
            except grpc.aio.AioRpcError as exc:
                stats["errors"][f"enroll:{exc.code().name}"] += 1
                await asyncio.sleep(rng.uniform(0.5, 2.0) * (attempt + 1))
        else:
            raise RuntimeError(f"{device_id} could not enroll")
        md = (("authorization", f"Bearer {reply.device_credential}"), ("x-pocketlora-device", device_id))
        enrolled.append(device_id)
        active, refusals = "", {}
        while not stop.is_set():
            try:
                hb = await stub.Heartbeat(
                    apb.HeartbeatRequest(
                        device_id=device_id,
                        eligible=True,
                        eligibility_reason=tpb.ELIGIBILITY_REASON_ELIGIBLE,
                        active_adapter_id=active,
                        adapter_refusals=[tpb.AdapterRefusal(adapter_id=k, reason=v) for k, v in refusals.items()],
                    ),
                    metadata=md,
                    timeout=30,
                )
                ref = hb.desired_adapter if hb.HasField("desired_adapter") else None
                if ref is None:
                    active = ""
                elif ref.adapter_id != active and ref.adapter_id not in refusals:
                    if ref.name.startswith("bad-"):  # the injected bad adapter: it fails to load
                        refusals[ref.adapter_id] = "load failed: simulated bad adapter"
                        stats["refused"] += 1
                    else:
                        active = ref.adapter_id
                lease = await stub.LeaseJob(apb.LeaseJobRequest(device_id=device_id), metadata=md, timeout=30)
                if lease.HasField("assignment"):
                    await train(lease.assignment, md)
                wait = lease.next_poll_after.seconds + lease.next_poll_after.nanos / 1e9
                await asyncio.sleep(min(wait, POLL_CAP_S) * rng.uniform(0.5, 1.0))
            except grpc.aio.AioRpcError as exc:
                stats["errors"][exc.code().name] += 1
                await asyncio.sleep(1.0)

    async def train(a: Any, md: Any) -> None:
        async def report(state: int) -> Any:
            req = apb.ReportProgressRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, state=state)
            return await stub.ReportProgress(req, metadata=md, timeout=30)

        await report(tpb.JOB_STATE_RUNNING)
        await asyncio.sleep(train_s)
        up = await report(tpb.JOB_STATE_UPLOADING)
        blob, info = await asyncio.to_thread(
            fake_adapter_blob, tmp, device_id=md[1][1], job_id=a.job_id, attempt=a.attempt, metrics=EVAL
        )
        await asyncio.to_thread(upload_to_url, up.upload_url or a.upload_url, blob)
        blob.unlink()
        req = apb.CompleteJobRequest(
            job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size
        )
        await stub.CompleteJob(req, metadata=md, timeout=60)
        stats["completed"].append(a.job_id)

    tasks = [asyncio.create_task(device(n)) for n in range(first, first + count)]
    early_here = max(0, min(count, early - first))
    while len(enrolled) < early_here and not any(t.done() for t in tasks):
        await asyncio.sleep(0.2)
    print(json.dumps({"enrolled": len(enrolled)}), flush=True)
    await stop.wait()
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    stats["crashed"] = sum(1 for r in results if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError))
    stats["errors"] = dict(stats["errors"])
    return stats


# ----------------------------------------------------------------------------- driver
def _wait(what: str, check: Any, timeout_s: float, every_s: float = 1.0) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(every_s)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _jobs(stub: Any, campaign_id: str) -> list[Any]:
    from protos.pocketlora.v1 import operator_service_pb2 as opb
    from protos.pocketlora.v1 import types_pb2 as tpb

    out, token = [], ""
    while True:
        req = opb.ListJobsRequest(filter=tpb.JobFilter(campaign_id=campaign_id), page_size=1000, page_token=token)
        page = stub.ListJobs(req, metadata=MD, timeout=60)
        out += list(page.jobs)
        token = page.next_page_token
        if not token:
            return out


def _campaign_done(stub: Any, campaign_id: str, devices: int) -> bool:
    jobs = _jobs(stub, campaign_id)
    return len(jobs) == devices and all(j.state in (6, 7, 8) for j in jobs)


def _rollout(stub: Any, campaign_id: str, ends: tuple[int, ...], timeout_s: float) -> Any:
    from protos.pocketlora.v1 import operator_service_pb2 as opb

    req = opb.StartRolloutRequest(
        campaign_id=campaign_id,
        steps=STEPS,
        eval_gate=opb.EvalGate(min_improvement=0.05),
        min_healthy_share=0.95,
        max_failure_share=0.05,
    )
    rollout_id = stub.StartRollout(req, metadata=MD, timeout=60).rollout.rollout_id
    get = opb.GetRolloutRequest(rollout_id=rollout_id, include_devices=True)
    _wait(
        f"rollout of {campaign_id}",
        lambda: stub.GetRollout(get, metadata=MD, timeout=60).rollout.state in ends,
        timeout_s,
    )
    return stub.GetRollout(get, metadata=MD, timeout=60)


def run_campaign_sim(devices: int, late_share: float, procs: int, train_s: float, timeout_s: float) -> dict[str, Any]:
    """Run the three phases; returns the result fields."""
    import grpc

    from protos.pocketlora.v1 import operator_service_pb2 as opb
    from protos.pocketlora.v1 import operator_service_pb2_grpc
    from protos.pocketlora.v1 import types_pb2 as tpb

    early = devices - int(devices * late_share)
    tmp = Path(tempfile.mkdtemp(prefix="pocketlora-campaign-"))
    server, address = start_server_process(f"sqlite:///{tmp / 'state.db'}", tmp, lease_s=10.0, reap_every=0.5)
    children: list[subprocess.Popen[str]] = []
    result: dict[str, Any] = {"campaign_devices": devices, "late_devices": devices - early}
    try:
        stub = operator_service_pb2_grpc.OperatorServiceStub(grpc.insecure_channel(address))
        made = opb.CreateEnrollmentTokenRequest(description="campaign sim", labels={"pool": "spring"})
        token = str(stub.CreateEnrollmentToken(made, metadata=MD, timeout=60).token)
        per = -(-devices // procs)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for p in range(procs):
            first, count = p * per, min(per, devices - p * per)
            if count > 0:
                cmd = [
                    sys.executable,
                    __file__,
                    "devices",
                    address,
                    token,
                    str(first),
                    str(count),
                    str(early),
                    str(tmp),
                    str(train_s),
                ]
                children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
        for child in children:
            assert child.stdout is not None
            if "enrolled" not in json.loads(child.stdout.readline() or "{}"):
                raise RuntimeError("a devices process died while enrolling")
        selector = tpb.DeviceSelector(labels={"pool": "spring"})

        def campaign(name: str, adapter: str) -> str:
            spec = tpb.TrainingSpec(adapter_name=adapter, base_model_id="tiny", dataset="captain", eval_share=0.2)
            req = opb.SubmitCampaignRequest(request_id=name, name=name, selector=selector, training=spec)
            return str(stub.SubmitCampaign(req, metadata=MD, timeout=300).campaign.campaign_id)

        t0 = time.perf_counter()
        a = campaign("spring", "persona")
        (tmp / "late-go").touch()
        _wait("campaign A", lambda: _campaign_done(stub, a, devices), timeout_s)
        result["campaign_s"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        good = _rollout(stub, a, (tpb.ROLLOUT_STATE_COMPLETED, tpb.ROLLOUT_STATE_HALTED), timeout_s)
        result["rollout_s"] = round(time.perf_counter() - t1, 1)
        b = campaign("spring-bad", "bad-persona")
        _wait("campaign B", lambda: _campaign_done(stub, b, devices), timeout_s)
        bad = _rollout(stub, b, (tpb.ROLLOUT_STATE_COMPLETED, tpb.ROLLOUT_STATE_HALTED), timeout_s)
        for child in children:
            child.send_signal(signal.SIGTERM)
        stats = [json.loads(child.communicate(timeout=120)[0].strip().splitlines()[-1]) for child in children]
        result.update(_tally(stub, a, b, good, bad, stats, early, devices))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        stop_process(server)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _tally(
    stub: Any, a: str, b: str, good: Any, bad: Any, stats: list[Any], early: int, devices: int
) -> dict[str, Any]:
    from protos.pocketlora.v1 import operator_service_pb2 as opb

    jobs_a, jobs_b = _jobs(stub, a), _jobs(stub, b)
    per_device = collections.Counter((j.campaign_id, j.device_id) for j in jobs_a + jobs_b)
    acks = collections.Counter(job_id for s in stats for job_id in s["completed"])
    ours = {j.job_id for j in jobs_a + jobs_b}
    versions: collections.Counter[str] = collections.Counter()
    token = ""
    while True:
        page = stub.ListAdapters(opb.ListAdaptersRequest(page_size=1000, page_token=token), metadata=MD, timeout=60)
        versions.update(x.job_id for x in page.adapters if x.job_id in ours)
        token = page.next_page_token
        if not token:
            break
    a_adapter = {j.device_id: j.adapter_id for j in jobs_a}
    back = [d for d in bad.devices if d.outcome == 4]  # TARGET_OUTCOME_ROLLED_BACK
    return {
        "campaign_jobs": len(jobs_a),
        "late_enrollees_served": sum(1 for j in jobs_a if int(j.device_id[4:]) >= early and j.state == 6),
        "rollout_steps": good.rollout.current_step,
        "rollout_completed": good.rollout.state == 4,
        "rollout_active_devices": sum(s.active for s in good.rollout.steps),
        "rollout_halted": bad.rollout.state == 3,
        "halted_at_step": bad.rollout.current_step + 1,
        "rolled_back_devices": len(back),
        "rolled_back_to_previous": sum(1 for d in back if d.desired_adapter_id == a_adapter.get(d.device_id)),
        "succeeded": sum(1 for j in jobs_a + jobs_b if j.state == 6),
        "lost": 2 * devices - len(jobs_a + jobs_b) + sum(1 for j in jobs_a + jobs_b if j.state != 6),
        "double_jobs": sum(1 for n in per_device.values() if n > 1),
        "double_completed": sum(1 for n in acks.values() if n > 1) + sum(1 for n in versions.values() if n > 1),
        "load_refusals": sum(s["refused"] for s in stats),
        "device_errors": dict(sum((collections.Counter(s["errors"]) for s in stats), collections.Counter())),
        "crashed_devices": sum(s["crashed"] for s in stats),
        "rollout_message": bad.rollout.message[:160],
    }


def ok(result: dict[str, Any]) -> bool:
    """The checks that make the run pass."""
    return (
        result["lost"] == 0
        and result["double_jobs"] == 0
        and result["double_completed"] == 0
        and result["late_enrollees_served"] == result["late_devices"]
        and result["rollout_completed"]
        and result["rollout_halted"]
        and result["rolled_back_devices"] == result["rolled_back_to_previous"] > 0
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2_000)
    parser.add_argument("--late-share", type=float, default=0.25, help="share of devices enrolling after creation")
    parser.add_argument("--procs", type=int, default=4, help="device processes")
    parser.add_argument("--train-s", type=float, default=1.0, help="simulated training time per job")
    parser.add_argument("--timeout-s", type=float, default=900)
    args = parser.parse_args(argv)
    result = run_campaign_sim(args.devices, args.late_share, args.procs, args.train_s, args.timeout_s)
    print(f"campaign simulation: {args.devices:,} devices ({result['late_devices']:,} enrolling late)")
    for key in (
        "campaign_jobs",
        "late_enrollees_served",
        "rollout_steps",
        "rollout_active_devices",
        "rollout_halted",
        "halted_at_step",
        "rolled_back_devices",
        "rolled_back_to_previous",
        "lost",
        "double_jobs",
        "double_completed",
        "campaign_s",
        "rollout_s",
    ):
        print(f"  {key:<26}{result[key]}")
    print(json.dumps(result))
    return 0 if ok(result) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "devices":
        a = sys.argv[2:]
        stats = asyncio.run(run_devices(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), Path(a[5]), float(a[6])))
        print(json.dumps(stats), flush=True)
    else:
        raise SystemExit(main())
