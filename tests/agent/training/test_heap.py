"""Which allocator the training child gets (agent.training.heap).

What it saves is measured by benchmarks/training_memory.py (peak RSS per configuration, with the
allocator in its output); tests/agent/training/test_child_priority.py reads the running child's
maps to check the choice reaches it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.training import heap

ROOT = Path(__file__).resolve().parents[3]
needs_jemalloc = pytest.mark.skipif(heap.jemalloc_path() is None, reason="libjemalloc2 not installed")


def test_allocator_env_preloads_jemalloc_once_and_honours_the_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "jemalloc_path", lambda: "/lib/libjemalloc.so.2")
    assert heap.allocator_env({}) == {"LD_PRELOAD": "/lib/libjemalloc.so.2"}
    assert heap.allocator_env({"LD_PRELOAD": "/x/libfoo.so"}) == {"LD_PRELOAD": "/lib/libjemalloc.so.2 /x/libfoo.so"}
    assert heap.allocator_env({"LD_PRELOAD": "/lib/libjemalloc.so.2"}) == {}
    assert heap.allocator_env({heap.ALLOCATOR_ENV: "system"}) == {}
    monkeypatch.setattr(heap, "jemalloc_path", lambda: None)
    assert heap.allocator_env({}) == {}


@needs_jemalloc
def test_a_child_started_with_allocator_env_runs_on_jemalloc() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    probe = "from agent.training.heap import active_allocator; print(active_allocator())"
    for extra, want in (({}, "system"), (heap.allocator_env(env), "jemalloc")):
        out = subprocess.run(
            [sys.executable, "-c", probe], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == want
