"""Training child process: `python -m agent.training.worker JOB_DIR`.

Reads JOB_DIR/spec.json, trains (resuming from JOB_DIR/checkpoint when present) and reports on
stdout, one JSON object per line:
    {"event": "plan", micro_batch, grad_accum, checkpointing, offload_optimizer,
     estimate_bytes, budget_bytes, notes, mixed_precision, torch_threads, allocator}
    {"event": "resumed", "step"}                 only when a checkpoint was picked up
    {"event": "progress", "step", "total_steps", "epoch", "loss", "tokens_seen"}
    {"event": "checkpoint", "step"}
    {"event": "paused", "step"}
    {"event": "done", "adapter_dir", "metrics"}
    {"event": "error", "error_class", "message"}
The process runs at nice 19 in the idle I/O class; its native thread pools are capped by the
environment the parent sets (agent.training.runner) and torch's by the spec's torch_threads.
A pause is requested by creating JOB_DIR/control/pause or sending SIGTERM/SIGUSR1: the current
optimizer step finishes, a checkpoint is written, and the process exits 3.
Exit codes: 0 done, 3 paused, 2 non-retryable error, 1 crash or retryable error.
Logs go to stderr; anything a library prints is redirected there too.
"""

from __future__ import annotations

import os

# Before any Hugging Face import: no hub, no telemetry, no progress bars on a device.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import logging
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from agent.training.errors import (
    EXIT_CRASH,
    EXIT_DONE,
    EXIT_NON_RETRYABLE,
    EXIT_PAUSED,
    TrainingError,
)
from protos.wire import ErrorClass

log = logging.getLogger("agent.training.worker")
# The training child yields the CPU to everything else on the device.
TRAINING_NICE = 19


class Emitter:
    """Writes one JSON event per line to the event stream and flushes it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        # CLOCK_MONOTONIC is system-wide on Linux: the agent can order these events against
        # its own actions (e.g. how many steps ran after it asked for a pause).
        line = json.dumps({**event, "t": time.monotonic()}, separators=(",", ":"), default=str)
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                # The agent is gone (its end of the pipe is closed): keep going to the
                # checkpoint PDEATHSIG asked for; nobody is left to read events.
                pass


class PauseRequest:
    """True once JOB_DIR/control/pause exists or SIGTERM/SIGUSR1 arrived."""

    def __init__(self, job_dir: Path) -> None:
        self.path = job_dir / "control" / "pause"
        self.signalled = False

    def install(self) -> None:
        """Route SIGTERM and SIGUSR1 to a pause at the next optimizer-step boundary."""

        def handler(signum: int, _frame: Any) -> None:
            self.signalled = True
            log.info("signal %s: pausing after the current optimizer step", signum)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGUSR1, handler)

    def __call__(self) -> bool:
        return self.signalled or self.path.exists()


def _lower_priority() -> None:
    """Run as a background job: the lowest CPU priority and the idle I/O class."""
    from agent.procinfo import IOPRIO_CLASS_IDLE, lower_priority

    for problem in lower_priority(TRAINING_NICE, IOPRIO_CLASS_IDLE):
        log.warning("could not lower the training priority: %s", problem)


def _event_stream() -> TextIO:
    """Keep the real stdout for events and point fd 1 at stderr so stray prints cannot corrupt it."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(events_fd, "w", buffering=1, encoding="utf-8")


def _die_with_parent() -> None:
    """Get SIGTERM (a checkpointed pause) when the agent dies, even by kill -9 (Linux)."""
    expected = os.environ.get("POCKETLORA_PARENT_PID")
    if not expected or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    # The parent may have died before prctl ran: then we were re-parented already.
    if os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Run the job in JOB_DIR and return the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    emit = Emitter(_event_stream())
    if len(args) != 1:
        emit({"event": "error", "error_class": ErrorClass.INVALID_SPEC, "message": "usage: worker JOB_DIR"})
        return EXIT_NON_RETRYABLE
    job_dir = Path(args[0])
    pause = PauseRequest(job_dir)
    pause.install()
    _die_with_parent()  # after install(): an early SIGTERM becomes a pause request
    _lower_priority()
    try:
        from agent.training.job import run_job

        outcome = run_job(job_dir, emit=emit, should_pause=pause)
    except TrainingError as exc:
        log.error("%s: %s", exc.error_class, exc)
        emit({"event": "error", "error_class": exc.error_class, "message": str(exc)})
        return EXIT_CRASH if exc.retryable else EXIT_NON_RETRYABLE
    except BaseException as exc:  # everything unexpected is a crash, reported, never re-raised
        traceback.print_exc(file=sys.stderr)
        message = f"{type(exc).__name__}: {exc}"
        emit({"event": "error", "error_class": ErrorClass.CRASHED, "message": message})
        return EXIT_CRASH
    return EXIT_PAUSED if outcome == "paused" else EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
