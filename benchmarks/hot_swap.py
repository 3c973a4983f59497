"""Hot-swap benchmark: what a LoRA swap costs next to reloading the base model.

    python benchmarks/hot_swap.py [--quick] [--runs N] [--tiny]

Measures on SmolLM2-135M-Instruct (agent.models.ensure_smollm2, cached in ~/.cache/pocketlora),
or on a config-built tiny Llama when SmolLM2 is unavailable or --tiny is given (marked as such):

    swap_ms          load a new adapter + activate it, base resident, a free slot of the same
                     LoRA config available (steady state: weights copied in place)
    swap_new_slot_ms the same when peft must inject new LoRA modules (first adapter of a config)
    switch_ms        activate between two resident adapters
    reload_ms        in-process: build a fresh runtime (base + tokenizer) and load + activate the adapter
    cold_reload_ms   a new Python process loading base + adapter until one token is generated
    swap_vs_reload   swap_ms / reload_ms
    adapter_bytes_ratio  adapter safetensors size / base safetensors size

Each value is the median of several runs. Prints a table, then one JSON line (last line).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

GOALS = {
    "swap_ms": ("<=", 100.0),
    "switch_ms": ("<=", 10.0),
    "swap_vs_reload": ("<=", 0.1),
    "adapter_bytes_ratio": ("<", 0.01),
}

_COLD_SCRIPT = """
import os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from agent.runtime import AdapterRuntime
rt = AdapterRuntime({base!r})
rt.load("cold", {adapter!r})
rt.activate("cold")
rt.generate("hi", max_new_tokens=1)
print("READY", time.perf_counter() - t0, flush=True)
"""


def resolve_base(tiny: bool, workdir: Path) -> tuple[Path, str, bool]:
    """Return (base dir, label, is_tiny): SmolLM2 when possible, else a tiny config model."""
    if not tiny:
        try:
            from agent.models import ensure_smollm2

            return (
                ensure_smollm2(Path.home() / ".cache" / "pocketlora"),
                "SmolLM2-135M-Instruct",
                False,
            )
        except (ImportError, FileNotFoundError, RuntimeError) as exc:
            print(f"SmolLM2 unavailable ({exc}); using the tiny config model", file=sys.stderr)
    from tests.support.tiny_models import make_tiny_llama

    base = make_tiny_llama(workdir / "tiny-base", hidden=256, layers=4)
    return base, "tiny-llama-256x4 (config-built, NOT a pretrained model)", True


def make_adapter(base: Path, out: Path, fingerprint: str) -> Path:
    """Save a random-init LoRA r=8 on q_proj/v_proj with a manifest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    (out / "manifest.json").write_text(json.dumps({"base_fingerprint": fingerprint}))
    del model
    gc.collect()
    return out


def median_ms(fn: Callable[[int], None], runs: int) -> float:
    """Median wall time of fn(i) over runs calls, in milliseconds."""
    times = []
    for i in range(runs):
        gc.collect()  # keep a collection of earlier garbage out of the timed region
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def cold_reload_ms(base: Path, adapter: Path, runs: int) -> float:
    """Median wall time from spawning a process until it has generated its first token."""
    code = _COLD_SCRIPT.format(root=str(ROOT), base=str(base), adapter=str(adapter))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
        elapsed = (time.perf_counter() - t0) * 1000
        if proc.returncode != 0 or "READY" not in proc.stdout:
            raise RuntimeError(f"cold reload child failed: {proc.stderr[-2000:]}")
        times.append(elapsed)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table and a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs; finishes under 60 s")
    parser.add_argument("--runs", type=int, default=None, help="runs per in-process metric")
    parser.add_argument("--tiny", action="store_true", help="use the tiny config model")
    args = parser.parse_args(argv)
    runs = args.runs or (5 if args.quick else 15)
    cold_runs = 2 if args.quick else 5
    started = time.perf_counter()

    from transformers.utils import logging as hf_logging

    from adapters_store.fingerprint import model_fingerprint
    from agent.runtime import AdapterRuntime

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    with tempfile.TemporaryDirectory(prefix="pocketlora-bench-") as tmp:
        workdir = Path(tmp)
        base, label, is_tiny = resolve_base(args.tiny, workdir)
        adapter = make_adapter(base, workdir / "adapter", model_fingerprint(base))
        adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
        base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))

        rt = AdapterRuntime(base)
        rt.generate("warm up", max_new_tokens=1)
        rt.load("warm", adapter)  # first load pays peft's one-time wrapping; not a swap
        rt.activate("warm")
        rt.activate(None)
        rt.unload("warm")

        # First adapter of a config: peft injects new LoRA modules (a new slot).
        new_slot_times = []
        for i in range(runs):
            t0 = time.perf_counter()
            rt.load(f"new{i}", adapter)
            rt.activate(f"new{i}")
            new_slot_times.append((time.perf_counter() - t0) * 1000)
        rt.activate(None)
        for i in range(runs):
            rt.unload(f"new{i}")  # leaves free slots behind, as in steady state

        # Steady state: a new adapter of the same config is copied into a free slot.
        swap_times = []
        for i in range(runs):
            gc.collect()
            t0 = time.perf_counter()
            rt.load(f"swap{i}", adapter)
            rt.activate(f"swap{i}")
            swap_times.append((time.perf_counter() - t0) * 1000)
            rt.activate(None)
            rt.unload(f"swap{i}")
        swap_ms = statistics.median(swap_times)
        new_slot_ms = statistics.median(new_slot_times)

        rt.load("x", adapter)
        rt.load("y", adapter)
        runtime = rt
        switch_ms = median_ms(lambda i: runtime.activate("x" if i % 2 else "y"), runs * 4)
        first_token = rt.generate("hello", max_new_tokens=1).seconds * 1000
        rt.close()
        gc.collect()

        def reload(_: int) -> None:
            fresh = AdapterRuntime(base)
            fresh.load("r", adapter)
            fresh.activate("r")
            fresh.close()

        reload(0)  # warm the page cache so reload_ms measures a warm reload
        reload_ms = median_ms(reload, max(3, runs // 3))
        cold_ms = cold_reload_ms(base, adapter, cold_runs)

    results = {
        "model": label,
        "tiny": is_tiny,
        "quick": args.quick,
        "runs": runs,
        "swap_ms": round(swap_ms, 2),
        "swap_new_slot_ms": round(new_slot_ms, 2),
        "switch_ms": round(switch_ms, 3),
        "reload_ms": round(reload_ms, 1),
        "cold_reload_ms": round(cold_ms, 1),
        "swap_vs_reload": round(swap_ms / reload_ms, 4),
        "swap_vs_cold_reload": round(swap_ms / cold_ms, 5),
        "adapter_bytes": adapter_bytes,
        "base_bytes": base_bytes,
        "adapter_bytes_ratio": round(adapter_bytes / base_bytes, 5),
        "one_token_ms": round(first_token, 1),
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    passed = {}
    for key, (op, goal) in GOALS.items():
        value = float(results[key])
        passed[key] = value <= goal if op == "<=" else value < goal
    results["goals_met"] = passed

    print(f"hot-swap benchmark on {label} (medians)")
    print(f"{'metric':<22}{'value':>14}  {'goal':<10}")
    for key in (
        "swap_ms",
        "swap_new_slot_ms",
        "switch_ms",
        "reload_ms",
        "cold_reload_ms",
        "swap_vs_reload",
        "swap_vs_cold_reload",
        "adapter_bytes_ratio",
        "one_token_ms",
    ):
        target = GOALS.get(key)
        goal_text = f"{target[0]} {target[1]:g}" if target else ""
        mark = ("ok" if passed[key] else "MISSED") if target else ""
        print(f"{key:<22}{results[key]:>14}  {goal_text:<10}{mark}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
