"""A process's own peak memory and its scheduling priority, read and set without torch.

Peak memory: `VmHWM` of /proc/<pid>/status is the high-water mark of the process's current
address space, so it starts again at exec. `getrusage(RUSAGE_SELF).ru_maxrss` does not: Linux
carries the old address space's peak across execve, and a child that Python starts with vfork
(subprocess does when it can) execs out of its parent's address space, so a child of a large
parent reports at least the parent's peak. Every per-process peak in this project reads VmHWM.

Priority: the training child runs at nice 19 in the idle I/O class with capped threads, the
inference child at a milder nice in the lowest best-effort I/O level; `lower_priority` applies
that from inside the child, `read_priority` reads it from outside (tests and diagnostics).
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

# I/O scheduling classes of ioprio_set/ioprio_get (linux/ioprio.h).
IOPRIO_CLASS_NONE, IOPRIO_CLASS_RT, IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE = 0, 1, 2, 3
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
# System call numbers differ by architecture; None: not known here (ionice is then skipped).
_SYS_IOPRIO = {"x86_64": (251, 252), "aarch64": (30, 31), "armv7l": (314, 315), "armv8l": (314, 315)}
# Environment variables that size the thread pools of OpenMP, MKL, OpenBLAS and tokenizers.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _status_field(pid: int | str, name: str) -> str | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Return a process's own peak resident set in bytes (VmHWM; ru_maxrss where /proc is absent)."""
    value = _status_field(pid, "VmHWM")
    if value is not None:
        return int(value.split()[0]) * 1024  # "12345 kB"
    if pid != "self" and pid != os.getpid():
        raise ProcessLookupError(f"no /proc/{pid}/status")
    # Linux reports ru_maxrss in KiB, macOS in bytes; off Linux, the figure may include a parent's.
    scale = 1 if platform.system() == "Darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _syscall_numbers() -> tuple[int, int] | None:
    return _SYS_IOPRIO.get(platform.machine())


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def get_ioprio(pid: int = 0) -> tuple[int, int]:
    """Return (I/O class, level) of a process (0: this one) from the ioprio_get system call."""
    numbers = _syscall_numbers()
    if numbers is None:
        raise OSError(f"ioprio_get: unknown system call number on {platform.machine()}")
    value = _libc().syscall(numbers[1], _IOPRIO_WHO_PROCESS, pid)
    if value < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioprio_get({pid}): {os.strerror(err)}")
    return value >> _IOPRIO_CLASS_SHIFT, value & ((1 << _IOPRIO_CLASS_SHIFT) - 1)


def set_ioprio(io_class: int, level: int = 0, pid: int = 0) -> None:
    """Set the I/O class and level of a process (0: this one) with the ioprio_set system call."""
    numbers = _syscall_numbers()
    if numbers is None:
        raise OSError(f"ioprio_set: unknown system call number on {platform.machine()}")
    value = (io_class << _IOPRIO_CLASS_SHIFT) | level
    if _libc().syscall(numbers[0], _IOPRIO_WHO_PROCESS, pid, value) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioprio_set({pid}, {io_class}, {level}): {os.strerror(err)}")


@dataclass(frozen=True)
class Priority:
    """How a process is scheduled, as the kernel reports it."""

    nice: int
    io_class: int
    io_level: int
    threads: int


def read_priority(pid: int) -> Priority:
    """Read nice (/proc/<pid>/stat), thread count (/proc/<pid>/status) and I/O priority of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Field 2 (comm) may hold spaces and parentheses: the fields after it start past the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    nice = int(fields[16])  # field 19 of proc(5); fields[0] here is field 3 (state)
    threads = int(_status_field(pid, "Threads") or 0)
    io_class, io_level = get_ioprio(pid)
    return Priority(nice=nice, io_class=io_class, io_level=io_level, threads=threads)


def lower_priority(nice: int, io_class: int, io_level: int = 0) -> list[str]:
    """Raise this process's niceness to `nice` and set its I/O priority; return what failed."""
    problems: list[str] = []
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        problems.append(f"nice {nice}: {exc}")
    try:
        set_ioprio(io_class, io_level)
    except OSError as exc:  # best effort: unknown architecture, seccomp, non-Linux
        problems.append(f"ionice class {io_class}: {exc}")
    return problems


def thread_env(threads: int) -> dict[str, str]:
    """The environment that caps a child's native thread pools at `threads` (at least 1)."""
    n = str(max(1, threads))
    return {**dict.fromkeys(THREAD_ENV, n), "TOKENIZERS_PARALLELISM": "false"}
