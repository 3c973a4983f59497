"""fleet_sim's share of real agents: agent.agent.Agent instances, training replaced at the child boundary.

    python benchmarks/fleet_real_agents.py ADDRESS FIRST COUNT TMP SEED TRAIN_S TRANSIENT_SHARE

Each agent is the product's Agent (its polling loop, gate, job driver, reports, upload and
completion; one thread each) over simulated sensors that follow fleet_sim's charging windows.
Its training child is benchmarks/fake_training_worker.py, started by the product's
TrainingProcess through a stand-in interpreter, so only the child's contents are fake: it
sleeps instead of training and speaks the worker's JSON-line protocol. The base model is a
header-only folder (fingerprint and memory planning read headers only). Prints {"enrolled": N}
once every agent enrolled, then, after SIGTERM, one JSON line of counts in fleet_sim's format.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._common import ENROLL_TOKEN  # noqa: E402
from benchmarks.fleet_sim_agents import CHARGE_PERIOD_S, CHARGE_SHARE, new_stats  # noqa: E402


class WindowSensors:
    """Charging for CHARGE_SHARE of every CHARGE_PERIOD_S, from a per-device phase; cool, 80% battery."""

    def __init__(self, phase: float) -> None:
        self.phase = phase

    def read(self) -> Any:
        from agent.sensors import SensorReading

        charging = ((time.monotonic() + self.phase) % CHARGE_PERIOD_S) < CHARGE_PERIOD_S * CHARGE_SHARE
        return SensorReading(
            charging=charging, battery_pct=80.0, temperature_c=30.0, free_storage_bytes=10 * 2**30, has_battery=True
        )


def fake_python(tmp: Path) -> Path:
    """An interpreter stand-in: `X -m agent.training.worker JOB_DIR` runs the fake worker on JOB_DIR."""
    script = tmp / "fake-python"
    worker = Path(__file__).with_name("fake_training_worker.py")
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{worker}" "$3"\n')
    script.chmod(0o755)
    return script


def shared_base(tmp: Path) -> Path:
    """A tiny Llama-shaped base (config.json + a header-only safetensors file) and its dataset folder."""
    from tests.support.tiny_models import header_only_llama

    base = header_only_llama(tmp / "real-base", layers=2, hidden=64, inter=128, vocab=512)
    datasets = tmp / "real-datasets"
    datasets.mkdir(exist_ok=True)
    (datasets / "captain.jsonl").write_text(json.dumps({"prompt": "Who are you?", "completion": " Arr!"}) + "\n")
    return base


def main(address: str, first: int, count: int, tmp: Path, seed: int, train_s: float, transient: float) -> None:
    import random

    import agent.agent as agent_mod
    from agent.agent import Agent, AgentConfig
    from agent.gate import Gate
    from agent.training.runner import TrainingProcess

    os.environ["POCKETLORA_FAKE_TRAIN_S"] = str(train_s)
    os.environ["POCKETLORA_FAKE_TRANSIENT"] = str(transient)
    # The one substitution: the Agent's TrainingProcess starts the stand-in instead of Python.
    agent_mod.TrainingProcess = functools.partial(TrainingProcess, python=str(fake_python(tmp)))  # type: ignore[misc]
    base = shared_base(tmp)
    rng = random.Random(seed)
    stats = new_stats() | {"events": collections.Counter()}
    lock = threading.Lock()
    enrolled = threading.Semaphore(0)

    def listener(kind: str, data: dict[str, Any]) -> None:
        with lock:
            stats["events"][kind] += 1
            if kind == "enrolled":
                enrolled.release()
            elif kind == "completed":
                stats["completed"].append([data["job_id"], 0])
            elif kind == "paused":
                stats["paused"] += 1
            elif kind == "failed" and data.get("error_class") == "TRANSIENT":
                stats["transient"] += 1
            elif kind == "tick_error":
                stats["errors"] += 1

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threads = []
    for n in range(first, first + count):
        device = f"real-{n:05d}"
        cfg = AgentConfig(
            orchestrator=address,
            device_id=device,
            work_dir=tmp / "real" / device,
            base_model_dir=base,
            base_model_id="tiny",
            datasets_dir=tmp / "real-datasets",
            enrollment_token=ENROLL_TOKEN,
            tick_s=0.25,
            progress_every_s=2.0,
            serve_adapters=False,
        )
        agent = Agent(cfg, WindowSensors(rng.uniform(0, CHARGE_PERIOD_S)), Gate(), listener=listener)
        threads.append(threading.Thread(target=agent.run, args=(stop,), name=device, daemon=True))
    for t in threads:
        t.start()
    for _ in threads:
        enrolled.acquire()
    print(json.dumps({"enrolled": count}), flush=True)
    stop.wait()
    for t in threads:
        t.join(90)
    stats["refused"] = dict(stats["refused"])
    stats["events"] = dict(stats["events"])
    stats["agents_still_running"] = sum(t.is_alive() for t in threads)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), Path(a[3]), int(a[4]), float(a[5]), float(a[6]))
