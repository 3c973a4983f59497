"""Parent side of training: start the worker child, stream its events, pause, kill, collect.

Torch-free: the idle agent imports this. The child is `python -m agent.training.worker JOB_DIR`;
see agent/training/worker.py for its event stream and exit codes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from agent.procinfo import thread_env
from agent.training.errors import EXIT_DONE, EXIT_PAUSED
from agent.training.heap import allocator_env
from agent.training.spec import TrainingSpec
from protos.wire import ErrorClass

log = logging.getLogger(__name__)
# The repository root, so `-m agent.training.worker` resolves whatever the agent's cwd is.
_ROOT = Path(__file__).resolve().parents[2]
# The worker reads this to arm PR_SET_PDEATHSIG against the right parent (see worker.py).
PARENT_PID_ENV = "POCKETLORA_PARENT_PID"
_STDERR_TAIL_LINES = 40


@dataclass
class Outcome:
    """How a worker run ended."""

    kind: Literal["done", "paused", "failed"]
    error_class: ErrorClass | None
    message: str | None
    adapter_dir: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0


def write_spec(job_dir: Path, spec: TrainingSpec) -> Path:
    """Write JOB_DIR/spec.json atomically (creating the job folder) and return its path."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / "spec.json"
    tmp = job_dir / f".spec.json.tmp-{os.getpid()}"
    tmp.write_text(spec.to_json())
    os.replace(tmp, path)
    return path


def _spec_threads(job_dir: Path) -> int:
    """The torch_threads of JOB_DIR/spec.json (1 when unset or unreadable: the worker fails on it)."""
    try:
        return int(json.loads((job_dir / "spec.json").read_text()).get("torch_threads") or 1)
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


class TrainingProcess:
    """One run of the training worker for a job folder."""

    def __init__(
        self,
        job_dir: Path,
        *,
        python: str = sys.executable,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.job_dir = Path(job_dir)
        self.python = python
        self.on_event = on_event
        self.env = env
        self.events: list[dict[str, Any]] = []
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._proc: subprocess.Popen[bytes] | None = None
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The worker's process id once started."""
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Launch the worker and start reading its events."""
        if self._proc is not None:
            raise RuntimeError("this TrainingProcess was already started")
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        # Native thread pools (OpenMP, MKL, tokenizers) size themselves when first used, from
        # the environment: cap them before the child starts, at the spec's torch_threads.
        env.update(thread_env(_spec_threads(self.job_dir)))
        # jemalloc when installed: glibc's heap keeps NF4's freed step buffers (agent.training.heap).
        env.update(allocator_env(env))
        # The worker arms PR_SET_PDEATHSIG itself and checks it still has this parent. No
        # preexec_fn here: running Python between fork and exec in a process with gRPC's threads
        # aborted the child ("epoll_wait error: Bad file descriptor" from grpc's poller), and
        # without preexec_fn subprocess can use vfork, which runs no such code in the child.
        env[PARENT_PID_ENV] = str(os.getpid())
        self._proc = subprocess.Popen(
            [self.python, "-m", "agent.training.worker", str(self.job_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read_events, args=(self._proc.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read_events(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self._stderr_tail.append(f"[stdout] {line}")
                continue
            if not isinstance(event, dict):
                continue
            with self._lock:
                self.events.append(event)
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception:  # a faulty callback must not stop event collection
                    log.exception("on_event callback failed for %s", event.get("event"))

    def _read_stderr(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr_tail.append(line)

    def request_pause(self) -> None:
        """Ask the worker to checkpoint and exit 3 after its current optimizer step."""
        control = self.job_dir / "control"
        control.mkdir(parents=True, exist_ok=True)
        (control / "pause").touch()
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGUSR1)

    def clear_pause(self) -> None:
        """Remove the pause request so the next run trains (call before a resume)."""
        with contextlib.suppress(FileNotFoundError):
            (self.job_dir / "control" / "pause").unlink()

    def kill(self) -> None:
        """Kill the worker at once (SIGKILL); it resumes from its last checkpoint next time."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def poll(self) -> Outcome | None:
        """Return the outcome if the worker has exited, else None."""
        if self._proc is None or self._proc.poll() is None:
            return None
        return self._outcome()

    def wait(self, timeout: float | None = None) -> Outcome:
        """Wait for the worker to exit and return its outcome (subprocess.TimeoutExpired on timeout)."""
        if self._proc is None:
            raise RuntimeError("the worker was not started")
        self._proc.wait(timeout)
        return self._outcome()

    def stderr_tail(self, lines: int = 10) -> str:
        """Return the last lines the worker wrote to stderr."""
        return "\n".join(list(self._stderr_tail)[-lines:])

    def _outcome(self) -> Outcome:
        assert self._proc is not None
        for t in self._readers:
            t.join(timeout=5)
        code = int(self._proc.returncode)
        with self._lock:
            events = list(self.events)
        last = {e.get("event"): e for e in events}
        if code == EXIT_DONE and "done" in last:
            done = last["done"]
            return Outcome("done", None, None, done.get("adapter_dir"), dict(done.get("metrics") or {}), code)
        if code == EXIT_PAUSED and "paused" in last:
            return Outcome("paused", None, None, None, {"step": last["paused"].get("step")}, code)
        if code > 0 and "error" in last:
            err = last["error"]
            error = ErrorClass.__members__.get(str(err.get("error_class")), ErrorClass.CRASHED)
            return Outcome("failed", error, str(err.get("message")), None, {}, code)
        if code < 0:
            try:
                why = f"worker killed by {signal.Signals(-code).name}"
            except ValueError:
                why = f"worker killed by signal {-code}"
        else:
            why = f"worker exited with code {code} without a final event"
        tail = self.stderr_tail(5)
        return Outcome("failed", ErrorClass.CRASHED, f"{why}: {tail}" if tail else why, None, {}, code)
