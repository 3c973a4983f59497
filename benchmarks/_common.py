"""Shared pieces of the orchestrator benchmarks: seeding, a server subprocess, medians.

The orchestrator under test always runs in a process of its own (start_server over an
Orchestrator, no Ray), so the load generator never shares its event loop or GIL with it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OPERATOR_TOKEN = "bench-operator-token"
ENROLL_TOKEN = "bench-enroll-token"
SPEC_DICT = {"adapter_name": "persona", "base_model_id": "tiny", "dataset": "captain"}
CAPS = {"base_model_id": "tiny", "supports_4bit": True, "ram_bytes": 8 * 2**30}


def device_credential(i: int) -> str:
    """The credential seeded for device i (the benchmark knows them all)."""
    return f"pldev_bench_{i:08d}"


def device_id(i: int) -> str:
    """The id of seeded device i."""
    return f"dev-{i:06d}"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(db_url: str, devices: int, jobs: int, *, now: float | None = None) -> float:
    """Bulk-insert enrolled devices and queued jobs straight through the state store; returns seconds."""
    from orchestrator.domain import DeviceRecord, JobRecord, new_id
    from orchestrator.identity import hash_secret
    from orchestrator.state import open_state

    now = now or time.time()
    t0 = time.perf_counter()
    store = open_state(db_url)
    try:
        with store.transaction() as tx:
            tx.insert_devices(
                [
                    DeviceRecord(
                        device_id=device_id(i),
                        credential_hash=hash_secret(device_credential(i)),
                        capabilities=dict(CAPS),
                        enrolled_at=now,
                        last_seen=now,
                    )
                    for i in range(devices)
                ]
            )
        batch: list[JobRecord] = []
        for n in range(jobs):
            batch.append(
                JobRecord(
                    job_id=new_id("job"),
                    device_id=device_id(n % devices),
                    training=dict(SPEC_DICT),
                    created_at=now,
                    updated_at=now,
                )
            )
            if len(batch) == 10_000 or n == jobs - 1:
                with store.transaction() as tx:
                    tx.insert_jobs(batch)
                batch = []
    finally:
        store.close()
    return time.perf_counter() - t0


# The load generators speak for a whole fleet from one loopback address, where each real device
# has its own: the per-peer budget for calls the credential cache cannot vouch for (a guard
# against one unauthenticated flooder) would otherwise refuse most of their calls.
ONE_PEER_FLEET = {"limits.unverified_per_s": 1e9, "limits.unverified_burst": 10**9}


def start_server_process(db_url: str, tmp: Path, **config: Any) -> tuple[subprocess.Popen[str], str]:
    """Run `python benchmarks/_common.py serve ...` and wait until it prints its address.

    `config` holds OrchestratorConfig fields; `limits.NAME` keys set fields of its Limits."""
    args = [sys.executable, str(Path(__file__).resolve()), "serve", db_url, str(tmp)]
    args += [f"{k}={v}" for k, v in config.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("serving "):
        proc.kill()
        raise RuntimeError(f"benchmark server did not start: {line!r}")
    return proc, line.removeprefix("serving ")


def stop_process(proc: subprocess.Popen[str]) -> None:
    """Terminate a server process, then kill it if it lingers."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _serve(db_url: str, tmp: str, *overrides: str) -> None:
    import asyncio
    import signal

    from adapters_store import FileBlobStore
    from orchestrator.config import Limits, OrchestratorConfig
    from orchestrator.server import start_server
    from orchestrator.service import Orchestrator
    from orchestrator.state import open_state

    config: dict[str, Any] = {}
    limits: dict[str, int | float] = {}
    threads = 0
    reap_every = 0.0
    for item in overrides:
        key, value = item.split("=", 1)
        if key == "threads":
            threads = int(value)
        elif key == "reap_every":
            reap_every = float(value)
        elif key.startswith("limits."):
            name = key.removeprefix("limits.")
            limits[name] = type(getattr(Limits, name))(float(value))
        else:
            config[key] = float(value)
    cfg = OrchestratorConfig(
        bootstrap_token=OPERATOR_TOKEN, enrollment_token=ENROLL_TOKEN, limits=Limits(**limits), **config
    )
    store = FileBlobStore(Path(tmp) / "blobs", url_secret=secrets.token_bytes(32))
    orch = Orchestrator(open_state(db_url), store, cfg)

    async def main() -> None:
        running = await start_server(orch, "127.0.0.1:0", threads=threads)
        print(f"serving 127.0.0.1:{running.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        while not stop.is_set():
            if reap_every:
                # The control loop's passes, as ControlLoopActor runs them (here without Ray).
                await loop.run_in_executor(None, orch.control_tick)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), reap_every or 3600)
        await running.stop(0.5)
        orch.state.close()
        store.close()

    asyncio.run(main())


def median(values: list[float]) -> float:
    """The median, 0 for no values."""
    return float(statistics.median(values)) if values else 0.0


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "serve":
    _serve(*sys.argv[2:])
