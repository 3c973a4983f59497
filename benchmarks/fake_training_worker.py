"""A stand-in for `python -m agent.training.worker JOB_DIR` that sleeps instead of training.

fleet_sim runs some of its agents as the real agent.agent.Agent; their training child is this
script, so everything above the child-process boundary (runner, polling, gating, pause and
resume, reports, upload, completion) is the product's code. It speaks the worker's protocol
(agent/training/worker.py): JSON-line events on stdout, a pause at the next step when
JOB_DIR/control/pause exists or SIGTERM/SIGUSR1 arrives (exit 3), exit 0 after "done", exit 1
after a retryable "error". Progress survives a pause in JOB_DIR/fake_state.json. It writes a
small but well-formed peft adapter folder where the spec's output_dir says.

Settings from the environment: POCKETLORA_FAKE_TRAIN_S (seconds of "training" per job, default
1), POCKETLORA_FAKE_TRANSIENT (share of runs that fail with a TRANSIENT error, default 0).
Standard library only, so it starts fast (the wrapper runs it with `python -S`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

STEP_S = 0.25


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({**event, "t": time.monotonic()}) + "\n")
    sys.stdout.flush()


def write_adapter(out: Path, spec: dict[str, Any]) -> None:
    """A peft-shaped folder: one rank-4 LoRA pair as safetensors, its config, a training manifest."""
    out.mkdir(parents=True, exist_ok=True)
    rank, width = 4, 32
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    names.append(names[0].replace("lora_A", "lora_B"))
    shapes = [[rank, width], [width, rank]]
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in zip(names, shapes, strict=True):
        size = shape[0] * shape[1] * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = struct.pack(f"<{offset // 4}f", *(random.uniform(-0.01, 0.01) for _ in range(offset // 4)))
    (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    config = {"peft_type": "LORA", "r": int(spec["rank"]), "lora_alpha": spec["alpha"], "target_modules": ["q_proj"]}
    (out / "adapter_config.json").write_text(json.dumps(config))
    manifest = {
        "spec": spec,
        "loss_curve": [2.0, 1.5],
        "tokens_seen": 1024,
        "steps": 2,
        "duration_s": float(os.environ.get("POCKETLORA_FAKE_TRAIN_S", "1")),
        "peak_rss_bytes": 0,
        "base_fingerprint": "sha256:" + "ab" * 32,
        "dataset_sha256": "cd" * 32,
    }
    (out / "training_manifest.json").write_text(json.dumps(manifest))


def main(job_dir: Path) -> int:
    """Sleep through the job's training time in steps, pausing and resuming like the worker."""
    stop = {"signalled": False}

    def on_signal(_signum: int, _frame: Any) -> None:
        stop["signalled"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)
    spec = json.loads((job_dir / "spec.json").read_text())
    state_path = job_dir / "fake_state.json"
    done_s = json.loads(state_path.read_text())["done_s"] if state_path.is_file() else 0.0
    train_s = float(os.environ.get("POCKETLORA_FAKE_TRAIN_S", "1"))
    total = max(1, round(train_s / STEP_S))
    emit({"event": "plan", "micro_batch": 1, "grad_accum": 8, "checkpointing": True, "notes": ["fake training"]})
    if done_s:
        emit({"event": "resumed", "step": round(done_s / STEP_S)})
    while done_s < train_s:
        if stop["signalled"] or (job_dir / "control" / "pause").exists():
            state_path.write_text(json.dumps({"done_s": done_s}))
            emit({"event": "checkpoint", "step": round(done_s / STEP_S)})
            emit({"event": "paused", "step": round(done_s / STEP_S)})
            return 3
        time.sleep(STEP_S)
        done_s += STEP_S
        step = round(done_s / STEP_S)
        emit({"event": "progress", "step": step, "total_steps": total, "epoch": 0, "loss": 2.0 / step})
    if random.random() < float(os.environ.get("POCKETLORA_FAKE_TRANSIENT", "0")):
        state_path.unlink(missing_ok=True)
        emit({"event": "error", "error_class": "TRANSIENT", "message": "simulated transient failure"})
        return 1
    write_adapter(Path(spec["output_dir"]), spec)
    emit({"event": "done", "adapter_dir": spec["output_dir"], "metrics": {"steps": total}})
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[-1])))
