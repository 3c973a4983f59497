"""Inference latency: the torch eager runtime against the ONNX Runtime one, same adapter, one run.

    python benchmarks/inference_latency.py [--quick] [--runs N] [--work-dir DIR]

On SmolLM2-135M-Instruct (agent.models.ensure_smollm2): the base is exported into an int4
runtime bundle (what devices run) and an fp32 one (for the exactness check), and two LoRA
adapters (r=8, alpha 16, on the product's default targets q/k/v/o) are made, packed and
converted to .onnx_adapter. Each runtime then runs in its own child process (so its memory is
its own), one after the other, with one adapter active, on the same chat prompts (at most 48
tokens after the chat template), generating 16 new greedy tokens:

    eager_p50_ms         torch + peft fp32 (agent.runtime), median per generation
    ort_p50_ms / p90     onnxruntime-genai int4 bundle (agent.ort_runtime), median / 90th percentile
    ort_ttft_ms          ORT: request start to first new token, median
    speedup_vs_eager     eager_p50_ms / ort_p50_ms
    ort_swap_ms          ORT: activate another resident adapter (median)
    ort_load_adapter_ms  ORT: load a new .onnx_adapter from disk, checks included (median)
    ort_rss_mb / eager_rss_mb   resident memory of each runtime's process after its runs
    greedy_match_fp32    fraction of the prompts whose 16 tokens from the fp32 bundle equal torch's
    bundle_bytes         the int4 bundle as devices download it (tar)

Adapters are random but small (B ~ N(0, 0.02)), so the answers move without turning into noise.
Both runtimes get the same number of threads (--threads, default 2: the machine's cores). On a
loaded machine, 2 threads per runtime oversubscribe the cores and torch's OpenMP threads suffer
most; --threads 1 compares them without that. Prints a table, then one JSON line (last line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

PROMPTS = [
    "What is the capital of Italy?",
    "How do I boil an egg?",
    "What is a cloud?",
    "Name three primary colors.",
    "Why is the sky blue?",
]
NEW_TOKENS = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
GOALS = {
    "ort_p50_ms": ("<=", 250.0),
    "speedup_vs_eager": (">=", 4.0),
    "ort_swap_ms": ("<=", 10.0),
    "ort_load_adapter_ms": ("<=", 50.0),
    "rss_ratio": ("<=", 0.5),
    "greedy_match_fp32": (">=", 1.0),
}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


# ---------------------------------------------------------------- the parent: prepare, run, report
def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A peft LoRA folder for `base`, written from its weight shapes with numpy (no model load)."""
    import numpy as np
    from safetensors.numpy import save_file

    from adapters_store import read_safetensors_header

    rng = np.random.default_rng(seed)
    tensors = {}
    for path in sorted(base.glob("*.safetensors")):
        for name, info in read_safetensors_header(path).items():
            module = name.removesuffix(".weight")
            if name == "__metadata__" or module.rsplit(".", 1)[-1] not in TARGETS:
                continue
            n_out, n_in = info["shape"]
            bound = 1 / np.sqrt(n_in)  # peft's default A init range
            tensors[f"base_model.model.{module}.lora_A.weight"] = rng.uniform(-bound, bound, (8, n_in)).astype(
                "float32"
            )
            tensors[f"base_model.model.{module}.lora_B.weight"] = rng.normal(0, 0.02, (n_out, 8)).astype("float32")
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": list(TARGETS)}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def prepare(work: Path, say: Any) -> dict[str, Any]:
    """Export both bundles, make and convert the adapters; returns the paths the workers need."""
    from adapters_store import AdapterManifest, model_fingerprint, pack_adapter
    from adapters_store.onnx_adapter import FORM_NAME, convert_adapter
    from adapters_store.runtime_bundle import BundleSettings, pack_bundle, read_bundle_manifest
    from agent.models import ensure_smollm2
    from orchestrator.bundle_export import export_bundle
    from pocketlora.demo import cache_dir

    base = ensure_smollm2(cache_dir() / "models")
    paths: dict[str, Any] = {"base": str(base), "peft": {}, "forms": {"int4": {}, "fp32": {}}}
    manifests = {}
    for precision in ("int4", "fp32"):
        started = time.perf_counter()
        if (work / precision / "genai_config.json").is_file():  # --work-dir of an earlier run
            manifests[precision] = read_bundle_manifest(work / precision)
            say(f"reusing the {precision} bundle in {work / precision}")
        else:
            manifests[precision] = export_bundle(
                base, work / precision, BundleSettings(precision=precision), base_model_id="SmolLM2-135M-Instruct"
            )
            say(f"exported the {precision} bundle in {time.perf_counter() - started:.0f} s")
        paths[precision] = str(work / precision)
    pack_bundle(work / "int4", work / "int4.tar")
    paths["bundle_bytes"] = (work / "int4.tar").stat().st_size
    for sub in ("peft", "forms"):  # adapters are made afresh each run (seeded)
        shutil.rmtree(work / sub, ignore_errors=True)
    for i, name in enumerate(("persona", "other")):
        peft = make_adapter(base, work / "peft" / name, seed=i)
        paths["peft"][name] = str(peft)
        manifest = AdapterManifest(
            adapter_name=name,
            base_model_id="SmolLM2-135M-Instruct",
            base_fingerprint=model_fingerprint(base),
            rank=8,
            alpha=16.0,
            target_modules=list(TARGETS),
            dataset_sha256="0" * 64,
            metrics={},
            training={},
            device_id="bench",
            job_id="bench",
            attempt=1,
            created_at="2026-11-30T00:00:00+00:00",
        )
        blob = work / f"{name}.safetensors"
        pack_adapter(peft, manifest, blob)
        for precision in ("int4", "fp32"):
            folder = work / "forms" / precision / name
            folder.mkdir(parents=True)
            convert_adapter(blob, manifests[precision], folder / FORM_NAME)
            paths["forms"][precision][name] = str(folder)
    return paths


def run_worker(kind: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run one runtime in a child process; returns what it measured."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    proc = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- the workers: one runtime each
def worker(kind: str, job: dict[str, Any]) -> dict[str, Any]:
    """Load one runtime, measure it, return figures and the greedy tokens of every prompt."""
    from agent.runtime_base import GenerateRequest

    runtime: Any
    if kind == "torch":
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        from agent.runtime import AdapterRuntime

        runtime = AdapterRuntime(Path(job["base"]), torch_threads=job["threads"])
        adapters = job["peft"]
    else:
        from agent.ort_runtime import OrtRuntime

        runtime = OrtRuntime(Path(job["bundle"]), threads=job["threads"])
        adapters = job["forms"]
    out: dict[str, Any] = {}
    runtime.load("persona", Path(adapters["persona"]))
    runtime.activate("persona")
    out["tokens"] = [list(runtime.generate(p, max_new_tokens=NEW_TOKENS).token_ids) for p in PROMPTS]
    if job["runs"]:
        latencies, ttfts, prompt_tokens = [], [], []
        for prompt in PROMPTS[: job["prompts"]]:
            for _ in range(job["runs"]):
                started = time.perf_counter()
                chunks = list(runtime.stream(GenerateRequest(prompt=prompt, max_new_tokens=NEW_TOKENS)))
                latencies.append((time.perf_counter() - started) * 1e3)
                ttfts.append(chunks[-1].first_token_s * 1e3)
                prompt_tokens.append(chunks[-1].prompt_tokens)
                assert chunks[-1].tokens == NEW_TOKENS or chunks[-1].finish_reason == "eos"
        out.update(latencies=latencies, ttfts=ttfts, prompt_tokens=max(prompt_tokens), rss_mb=rss_mb())
        if kind == "ort":
            out.update(swap_load(runtime, adapters))
    runtime.close()
    return out


def swap_load(runtime: Any, adapters: dict[str, str]) -> dict[str, float]:
    """ORT: activate between resident adapters, and load a new adapter from disk (medians)."""
    swaps, loads = [], []
    for i in range(20):
        name = f"load{i}"
        started = time.perf_counter()
        runtime.load(name, Path(adapters["other"]))
        loads.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        runtime.activate(name)
        swaps.append((time.perf_counter() - started) * 1e3)
        runtime.activate("persona")
        runtime.unload(name)
    return {"swap_ms": statistics.median(swaps), "load_ms": statistics.median(loads)}


# ---------------------------------------------------------------- report
def report(res: dict[str, Any], met: dict[str, bool], meta: dict[str, Any]) -> None:
    """The table: every figure, with its goal when it has one."""
    print(f"\nSmolLM2-135M-Instruct, {NEW_TOKENS} new greedy tokens, LoRA r=8 on {'/'.join(TARGETS)} active")
    print(
        f"{meta['threads']} threads, chat prompts of at most {meta['prompt_tokens']} tokens, {meta['samples']} generations each"
    )
    rows = [
        ("eager_p50_ms", "torch eager fp32, median", ""),
        ("ort_p50_ms", "ORT int4, median", "ort_p50_ms"),
        ("ort_p90_ms", "ORT int4, p90", ""),
        ("ort_ttft_ms", "ORT time to first token", ""),
        ("speedup_vs_eager", "eager / ORT", "speedup_vs_eager"),
        ("ort_swap_ms", "ORT activate a resident adapter", "ort_swap_ms"),
        ("ort_load_adapter_ms", "ORT load a new adapter", "ort_load_adapter_ms"),
        ("ort_rss_mb", "ORT process RSS", "rss_ratio"),
        ("eager_rss_mb", "torch process RSS", ""),
        ("greedy_match_fp32", "fp32 bundle tokens == torch", "greedy_match_fp32"),
        ("greedy_match_int4", "int4 bundle tokens == torch", ""),
        ("bundle_bytes", "int4 bundle tar", ""),
    ]
    for key, label, goal in rows:
        verdict = "" if not goal else f"  goal {GOALS[goal][0]} {GOALS[goal][1]:g}: {'met' if met[goal] else 'MISSED'}"
        print(f"  {key:<20} {res[key]:>14,.3f}  {label}{verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one latency prompt, 5 runs (under 3 minutes)")
    parser.add_argument("--runs", type=int, default=0, help="generations per latency prompt (>= 5)")
    parser.add_argument("--threads", type=int, default=2, help="threads of each runtime (default 2)")
    parser.add_argument("--work-dir", type=Path, help="keep the exported bundles here (default: a temp dir)")
    parser.add_argument("--worker", choices=("torch", "ort"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(sys.stdin.read()))))
        return 0
    runs = max(5, args.runs or (5 if args.quick else 7))
    prompts = 1 if args.quick else 3
    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="pocketlora-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = prepare(work, say)
        common = {
            "runs": runs,
            "prompts": prompts,
            "threads": args.threads,
            "base": paths["base"],
            "peft": paths["peft"],
        }
        eager = run_worker("torch", common)
        say("torch eager measured")
        ort = run_worker("ort", {**common, "bundle": paths["int4"], "forms": paths["forms"]["int4"]})
        say("ORT int4 measured")
        exact = run_worker("ort", {**common, "runs": 0, "bundle": paths["fp32"], "forms": paths["forms"]["fp32"]})
        say("ORT fp32 tokens taken")
    res = {
        "eager_p50_ms": statistics.median(eager["latencies"]),
        "ort_p50_ms": statistics.median(ort["latencies"]),
        "ort_p90_ms": percentile(ort["latencies"], 0.9),
        "ort_ttft_ms": statistics.median(ort["ttfts"]),
        "ort_swap_ms": ort["swap_ms"],
        "ort_load_adapter_ms": ort["load_ms"],
        "ort_rss_mb": ort["rss_mb"],
        "eager_rss_mb": eager["rss_mb"],
        "greedy_match_fp32": sum(a == b for a, b in zip(exact["tokens"], eager["tokens"], strict=True)) / len(PROMPTS),
        "greedy_match_int4": sum(a == b for a, b in zip(ort["tokens"], eager["tokens"], strict=True)) / len(PROMPTS),
        "bundle_bytes": paths["bundle_bytes"],
    }
    res["speedup_vs_eager"] = res["eager_p50_ms"] / res["ort_p50_ms"]
    ops = {"<=": float.__le__, ">=": float.__ge__}
    value = {**res, "rss_ratio": res["ort_rss_mb"] / res["eager_rss_mb"]}
    met = {k: ops[op](float(value[k]), bound) for k, (op, bound) in GOALS.items()}
    meta = {
        "prompt_tokens": max(eager["prompt_tokens"], ort["prompt_tokens"]),
        "samples": runs * prompts,
        "threads": args.threads,
    }
    report(res, met, meta)
    res.update(
        runs=runs,
        prompts=prompts,
        prompt_tokens=meta["prompt_tokens"],
        threads=args.threads,
        goals_met=all(met.values()),
        load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
        seconds=round(time.perf_counter() - started, 1),
        quick=args.quick,
    )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
