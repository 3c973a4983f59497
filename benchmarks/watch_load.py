"""Watch load: heartbeat latency under fleet polls, with and without 2,000 open watch streams.

    python benchmarks/watch_load.py [--quick] [--runs N] [--seconds S] [--streams N]

The server is `start_server` over SQLite in its own process. A load generator sends the fleet's
polls open-loop at a fixed rate (each a Heartbeat then a LeaseJob of a random device, so jobs
keep changing state), and records every Heartbeat's latency. First without watchers, then with
`--streams` WatchJobs streams held open by a second client process: all but `--fleet-streams`
of them follow one device's jobs each (a device page in a dashboard), the rest follow every job
(fleet views). All streams share the replica's one change feed (orchestrator/feed.py), so the
store is polled once per interval whatever the number of watchers; the fan-out to matching
streams is what watching costs.

    hb_p99_ms_base      heartbeat p99 without watchers (median of --runs windows)
    hb_p99_ms_watched   the same with every stream open
    p99_ratio           watched / base (goal: <= 2)
    events_per_s        job changes delivered to watchers per second while measured
    server_cpu_share    the server's CPU seconds per second of wall time, base and watched
    client_cpu_share    the same for the load generator (this process)
    watchers_cpu_share  the same for the watchers' process (run at --watchers-nice, default 19)

Prints a table, then one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    ONE_PEER_FLEET,
    OPERATOR_TOKEN,
    device_credential,
    device_id,
    median,
    p99,
    seed,
    start_server_process,
    stop_process,
)
from benchmarks.poll_throughput import process_cpu_s

GOAL_RATIO = 2.0


async def paced_polls(address: str, devices: int, rate: float, seconds: float) -> tuple[list[float], int]:
    """Poll pairs started every 1/rate s for `seconds` (open loop: a slow reply never delays the
    next start); returns the Heartbeat latencies (ms) and the number of failed calls."""
    import grpc

    from protos.pocketlora.v1 import agent_service_pb2 as apb
    from protos.pocketlora.v1 import agent_service_pb2_grpc

    channel = grpc.aio.insecure_channel(address)
    stub = agent_service_pb2_grpc.AgentServiceStub(channel)
    loop = asyncio.get_running_loop()
    rng = random.Random(7)
    latencies: list[float] = []
    errors = 0

    async def pair(i: int) -> None:
        nonlocal errors
        md = (("authorization", f"Bearer {device_credential(i)}"), ("x-pocketlora-device", device_id(i)))
        t0 = loop.time()
        try:
            await stub.Heartbeat(apb.HeartbeatRequest(device_id=device_id(i), eligible=True), metadata=md, timeout=30)
            latencies.append((loop.time() - t0) * 1000)
            await stub.LeaseJob(apb.LeaseJobRequest(device_id=device_id(i)), metadata=md, timeout=30)
        except grpc.aio.AioRpcError:
            errors += 1

    tasks = []
    start = loop.time()
    n = 0
    while (due := start + n / rate) < start + seconds:
        await asyncio.sleep(max(0.0, due - loop.time()))
        tasks.append(asyncio.ensure_future(pair(rng.randrange(devices))))
        n += 1
    await asyncio.gather(*tasks)
    await channel.close()
    return latencies, errors


WATCHERS = r"""
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
import grpc
from protos.pocketlora.v1 import operator_service_pb2 as opb, operator_service_pb2_grpc, types_pb2 as tpb

address, token, streams, fleet, devices = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])

async def main():
    md = (("authorization", f"Bearer {token}"),)
    # Several channels, as many dashboards would open: one HTTP/2 connection caps concurrent streams.
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, streams // 90))]
    events, opened = 0, 0
    ready = asyncio.Event()

    async def watch(k):
        nonlocal events, opened
        stub = operator_service_pb2_grpc.OperatorServiceStub(channels[k % len(channels)])
        per_device = k >= fleet
        flt = tpb.JobFilter(device_id=f"dev-{k % devices:06d}") if per_device else tpb.JobFilter()
        call = stub.WatchJobs(opb.WatchJobsRequest(filter=flt, include_initial=per_device), metadata=md)
        seen = not per_device  # a fleet stream counts as open at once; a device's, at its first job
        opened += seen
        async for _ in call:
            if not seen:
                seen = True
                opened += 1
            events += 1
            if opened >= streams:
                ready.set()

    tasks = [asyncio.ensure_future(watch(k)) for k in range(streams)]
    await asyncio.wait_for(ready.wait(), 300)
    print(f"ready {opened}", flush=True)
    while True:
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        print(f"events {events} {time.monotonic()}", flush=True)
    for t in tasks:
        t.cancel()

asyncio.run(main())
"""


def measure(address: str, devices: int, rate: float, runs: int, seconds: float, pid: int, watchers=None):
    """Median heartbeat p99 over `runs` windows, the CPU shares (cores) of the server, of this load
    generator and of the watchers' process, and job changes delivered to watchers per second."""
    tails, errors, cpu, events = [], 0, {"server": [], "client": [], "watchers": []}, []
    pids = {"server": pid, "client": os.getpid(), "watchers": watchers.pid if watchers else 0}
    for _ in range(runs):
        before = _events(watchers)
        cpu0, t0 = {k: process_cpu_s(p) if p else None for k, p in pids.items()}, time.monotonic()
        latencies, errs = asyncio.run(paced_polls(address, devices, rate, seconds))
        cpu1, t1 = {k: process_cpu_s(p) if p else None for k, p in pids.items()}, time.monotonic()
        after = _events(watchers)
        tails.append(p99(latencies))
        errors += errs
        for k in pids:
            a, b = cpu0[k], cpu1[k]
            if a is not None and b is not None:
                cpu[k].append((b - a) / (t1 - t0))
        if before is not None and after is not None:
            events.append((after[0] - before[0]) / (after[1] - before[1]))
    shares = {k: median(v) if v else 0.0 for k, v in cpu.items()}
    return median(tails), errors, shares, median(events) if events else 0.0


def _events(watchers: subprocess.Popen[str] | None) -> tuple[int, float] | None:
    if watchers is None:
        return None
    assert watchers.stdin is not None and watchers.stdout is not None
    watchers.stdin.write("?\n")
    watchers.stdin.flush()
    _, count, at = watchers.stdout.readline().split()
    return int(count), float(at)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer devices, streams and shorter windows")
    parser.add_argument("--runs", type=int, default=3, help="measurement windows per phase (median)")
    parser.add_argument("--seconds", type=float, default=0.0, help="length of a window")
    parser.add_argument("--streams", type=int, default=0, help="watch streams (default 2,000; --quick 400)")
    parser.add_argument("--fleet-streams", type=int, default=10, help="streams that follow every job")
    parser.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="poll pairs per second (default 100: the one-process server at ~0.7 of a core before any watcher)",
    )
    parser.add_argument(
        "--watchers-nice",
        type=int,
        default=19,
        help="niceness of the watchers' process (default 19; 0 to let it compete with the server)",
    )
    args = parser.parse_args(argv)
    seconds = args.seconds or (4.0 if args.quick else 8.0)
    streams = args.streams or (400 if args.quick else 2_000)
    devices = 2_000
    jobs = 20_000 if args.quick else 60_000

    tmp = Path(tempfile.mkdtemp(prefix="pocketlora-watch-"))
    db_url = f"sqlite:///{tmp / 'state.db'}"
    seed(db_url, devices, jobs)
    limits = {"limits.watch_streams": streams + 100, "limits.watch_streams_per_operator": streams + 100}
    server, address = start_server_process(db_url, tmp, **ONE_PEER_FLEET, **limits)
    watchers = None
    try:
        base, base_err, base_cpu, _ = measure(address, devices, args.rate, args.runs, seconds, server.pid)
        root = str(Path(__file__).resolve().parents[1])
        # Dashboards run on other machines than the replica they watch; here they share the cores
        # with the server and this load generator. At the default nice 19 the watchers' process
        # gets only the CPU those two leave, so the ratio is what serving the streams costs the
        # server, not what 2,000 clients' own decoding takes from a 2-core machine (--watchers-nice 0).
        nice = ["nice", "-n", str(args.watchers_nice)] if args.watchers_nice else []
        watchers = subprocess.Popen(
            [*nice, sys.executable, "-c", WATCHERS, root, address, OPERATOR_TOKEN, str(streams), str(args.fleet_streams),
             str(devices)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert watchers.stdout is not None
        line = watchers.stdout.readline().strip()
        if not line.startswith("ready"):
            raise RuntimeError(f"watchers did not open their streams: {line!r}")
        watched, w_err, w_cpu, events = measure(address, devices, args.rate, args.runs, seconds, server.pid, watchers)
    finally:
        if watchers is not None:
            watchers.stdin.close()  # type: ignore[union-attr]
            watchers.terminate()
            watchers.wait(10)
        stop_process(server)
    if base_err or w_err:
        raise RuntimeError(f"{base_err} + {w_err} poll calls failed")
    result = {
        "devices": devices,
        "rate_pairs_per_s": args.rate,
        "streams": streams,
        "fleet_streams": args.fleet_streams,
        "runs": args.runs,
        "window_s": seconds,
        "hb_p99_ms_base": round(base, 2),
        "hb_p99_ms_watched": round(watched, 2),
        "p99_ratio": round(watched / base, 2) if base else None,
        "events_per_s": round(events, 1),
        "server_cpu_share_base": round(base_cpu["server"], 3),
        "server_cpu_share_watched": round(w_cpu["server"], 3),
        "client_cpu_share_base": round(base_cpu["client"], 3),
        "client_cpu_share_watched": round(w_cpu["client"], 3),
        "watchers_cpu_share": round(w_cpu["watchers"], 3),
        "watchers_nice": args.watchers_nice,
    }
    print(f"watch load: {devices:,} devices, {args.rate:.0f} poll pairs/s, median of {args.runs} x {seconds:.0f} s")
    print(
        f"  heartbeat p99 without watchers   {base:8.2f} ms   CPU cores: server {base_cpu['server']:.2f}, "
        f"load generator {base_cpu['client']:.2f}"
    )
    print(
        f"  with {streams:,} watch streams     {watched:8.2f} ms   CPU cores: server {w_cpu['server']:.2f}, "
        f"load generator {w_cpu['client']:.2f}, watchers {w_cpu['watchers']:.2f} (nice {args.watchers_nice})"
    )
    print(f"  {events:,.0f} job changes/s delivered to watchers")
    ratio = result["p99_ratio"]
    print(
        f"  goal p99_ratio <= {GOAL_RATIO}: {ratio} {'met' if ratio is not None and ratio <= GOAL_RATIO else 'NOT met'}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
