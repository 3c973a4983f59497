"""The real training and inference children run below normal priority with capped threads.

Read from outside, as an operator would: nice from /proc/<pid>/stat, the thread count from
/proc/<pid>/status, the environment from /proc/<pid>/environ, the I/O class from ioprio_get, the allocator from /proc/<pid>/maps.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from agent.inference import RuntimeHost
from agent.procinfo import IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE, Priority, read_priority
from agent.training.heap import active_allocator, jemalloc_path
from agent.training.runner import TrainingProcess, write_spec
from agent.training.spec import TrainingSpec

# Threads a capped child may hold besides its one compute thread (the main thread computes):
# a helper or two that libraries start (seen: none while training, one in the inference host).
OTHER_THREADS = 2


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.slow
def test_training_child_runs_at_nice_19_idle_io_with_capped_threads(
    tmp_path: Path, tiny_llama: Path, memorise_data: Path
) -> None:
    spec = TrainingSpec(
        base_model_dir=str(tiny_llama),
        dataset_path=str(memorise_data),
        output_dir=str(tmp_path / "adapter"),
        effective_batch=2,
        max_steps=500,  # far more than the test waits for: it pauses the worker once measured
        checkpoint_every_steps=0,
        torch_threads=1,
    )
    job = write_spec(tmp_path / "job", spec).parent
    seen: dict[str, Any] = {}
    training = threading.Event()
    proc: TrainingProcess

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "plan":
            seen["plan"] = event
        if event["event"] == "progress" and event["step"] == 2 and not training.is_set():
            # Measured mid-training, while torch's pools exist: from the reader thread, so the
            # worker is certainly still running.
            assert proc.pid is not None
            seen["priority"] = read_priority(proc.pid)
            seen["environ"] = _environ(proc.pid)
            seen["allocator"] = active_allocator(proc.pid)
            training.set()
            proc.request_pause()

    proc = TrainingProcess(job, on_event=on_event)
    proc.start()
    outcome = proc.wait(timeout=180)

    assert outcome.kind == "paused", proc.stderr_tail()
    priority: Priority = seen["priority"]
    assert priority.nice == 19
    assert priority.io_class == IOPRIO_CLASS_IDLE
    assert priority.threads <= 1 + OTHER_THREADS, priority
    assert seen["plan"]["torch_threads"] == 1
    assert seen["environ"]["OMP_NUM_THREADS"] == "1" and seen["environ"]["MKL_NUM_THREADS"] == "1"
    # jemalloc when installed (agent.training.heap), as the child itself reports and its maps show.
    want = "jemalloc" if jemalloc_path() else "system"
    assert seen["allocator"] == seen["plan"]["allocator"] == want


@pytest.mark.slow
def test_inference_child_is_niced_with_capped_threads(tiny_llama: Path) -> None:
    host = RuntimeHost(tiny_llama, threads=1)
    try:
        host.generate("hello", max_new_tokens=2)  # the pools exist once a forward ran
        priority = read_priority(host.proc.pid)
        environ = _environ(host.proc.pid)
    finally:
        host.close()

    assert priority.nice == 10
    assert (priority.io_class, priority.io_level) == (IOPRIO_CLASS_BE, 7)
    assert priority.threads <= 1 + OTHER_THREADS, priority
    assert environ["OMP_NUM_THREADS"] == "1"
