"""Per-process peak memory and priority, read from /proc and the ioprio system calls."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent import procinfo

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30


def test_a_child_of_a_large_parent_reports_its_own_peak_not_the_parents() -> None:
    # The parent touches 1 GiB, frees it, then starts a child as the benchmarks do (subprocess,
    # which uses vfork + exec); the child reports both readings of its peak.
    parent = textwrap.dedent(
        """
        import json, subprocess, sys
        from agent.procinfo import peak_rss_bytes
        ballast = b"x" * (1 << 30)
        del ballast
        child = subprocess.run(
            [sys.executable, "-c",
             "import json, resource; from agent.procinfo import peak_rss_bytes; "
             "print(json.dumps([peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))"],
            capture_output=True, text=True, check=True,
        )
        print(json.dumps({"parent": peak_rss_bytes(), "child": json.loads(child.stdout)}))
        """
    )
    out = subprocess.run([sys.executable, "-c", parent], cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    child_peak, child_maxrss = report["child"]

    assert report["parent"] >= GiB
    assert child_peak < 200 * 2**20, f"the child reported {child_peak / 2**20:.0f} MiB"
    # The trap this guards against: ru_maxrss of the same child still carries the parent's peak.
    assert child_maxrss >= GiB


def test_peak_of_this_process_and_of_another_by_pid() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; b = b'x' * (300 << 20); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while procinfo.peak_rss_bytes(proc.pid) < 300 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.05)

        assert procinfo.peak_rss_bytes(proc.pid) >= 300 * 2**20
        assert procinfo.peak_rss_bytes() > 0
    finally:
        proc.kill()
        proc.wait()


def test_lower_priority_is_what_read_priority_sees_from_outside() -> None:
    code = (
        "import sys, time; from agent.procinfo import lower_priority; "
        "print(lower_priority(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])), flush=True); time.sleep(30)"
    )
    for nice, io_class, level in ((19, procinfo.IOPRIO_CLASS_IDLE, 0), (10, procinfo.IOPRIO_CLASS_BE, 7)):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(nice), str(io_class), str(level)], cwd=ROOT, stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"[]"
            seen = procinfo.read_priority(proc.pid)
        finally:
            proc.kill()
            proc.wait()

        assert (seen.nice, seen.io_class) == (nice, io_class)
        if io_class == procinfo.IOPRIO_CLASS_BE:
            assert seen.io_level == level
        assert seen.threads == 1


def test_unknown_pid_is_an_error() -> None:
    with pytest.raises(FileNotFoundError):
        procinfo.read_priority(2**22 + 12345)


def test_thread_env_caps_every_pool() -> None:
    env = procinfo.thread_env(0)

    assert {env[k] for k in procinfo.THREAD_ENV} == {"1"} and env["TOKENIZERS_PARALLELISM"] == "false"
    assert procinfo.thread_env(3)["OMP_NUM_THREADS"] == "3"
