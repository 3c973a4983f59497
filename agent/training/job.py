"""One training job end to end: validate, plan, load, train or resume, and publish the adapter.

Called by the worker process; cheap checks (spec, dataset, base folder) run before torch is
imported so a bad job fails in well under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters_store.fingerprint import SafetensorsHeaderError, model_fingerprint
from adapters_store.memory_plan import resolve_precision
from agent.procinfo import peak_rss_bytes
from agent.training.arch import read_config, resolve_targets
from agent.training.datasets import dataset_sha256, read_records
from agent.training.errors import DatasetError, IncompatibleBase, SpecError
from agent.training.evaluation import split_holdout
from agent.training.heap import active_allocator
from agent.training.memory import plan_memory
from agent.training.precision import cpu_has_native_bf16
from agent.training.spec import TrainingSpec

log = logging.getLogger(__name__)
Emit = Callable[[dict[str, Any]], None]
MB = 2**20


def read_spec(job_dir: Path) -> TrainingSpec:
    """Read JOB_DIR/spec.json."""
    path = job_dir / "spec.json"
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the training spec: {exc.strerror or exc}") from exc
    return TrainingSpec.from_json(text)


def memory_budget(spec: TrainingSpec) -> int:
    """Return the job's memory budget in bytes: the spec's, else RAM available now."""
    if spec.memory_budget_mb:
        return spec.memory_budget_mb * MB
    import psutil

    return int(psutil.virtual_memory().available)


def _check_resume(ckpt_meta: dict[str, Any], spec: TrainingSpec, fingerprint: str, ds_sha: str) -> None:
    if ckpt_meta.get("base_fingerprint") != fingerprint:
        raise IncompatibleBase(
            f"the checkpoint was trained on base {ckpt_meta.get('base_fingerprint')}, "
            f"but {spec.base_model_dir} is {fingerprint}"
        )
    if ckpt_meta.get("dataset_sha256") != ds_sha:
        raise DatasetError(
            f"{spec.dataset_path}:1: the dataset changed since the checkpoint was written; "
            "delete the job's checkpoint to train from scratch"
        )
    old = ckpt_meta.get("identity", {})
    changed = sorted(k for k, v in spec.identity().items() if old.get(k) != v)
    if changed:
        raise SpecError(
            f"the spec changed since the checkpoint ({', '.join(changed)}); "
            "delete the job's checkpoint to train from scratch"
        )


def run_job(job_dir: Path, *, emit: Emit, should_pause: Callable[[], bool]) -> str:
    """Run or resume the job in job_dir; return "done" or "paused"."""
    started = time.monotonic()
    job_dir = Path(job_dir)
    spec = read_spec(job_dir)
    records, held_out = split_holdout(read_records(spec.dataset_path), spec.eval_share, spec.seed)
    config = read_config(spec.base_model_dir)
    resolve_targets(spec.target_modules, config)  # Unsupported before any heavy import
    try:
        fingerprint = model_fingerprint(Path(spec.base_model_dir))
    except (FileNotFoundError, SafetensorsHeaderError) as exc:
        raise IncompatibleBase(f"{spec.base_model_dir}: unusable base weights: {exc}") from exc
    ds_sha = dataset_sha256(spec.dataset_path)
    log.info("job %s: %d records (%d held out), base %s", job_dir.name, len(records), len(held_out), fingerprint[:19])

    import torch

    from agent.training.checkpoint import load_checkpoint
    from agent.training.datasets import examples_from_records
    from agent.training.loop import LoopConfig, steps_per_epoch, train
    from agent.training.model import decide_quantization, load_for_training, load_tokenizer

    threads = spec.torch_threads or 1
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before any inter-op work ran
        torch.set_num_interop_threads(1)
    resume = load_checkpoint(job_dir)
    if resume is not None:
        _check_resume(resume.meta, spec, fingerprint, ds_sha)
        log.info("resuming from step %d", resume.state.step)

    tokenizer = load_tokenizer(spec.base_model_dir)
    examples = examples_from_records(records, tokenizer, spec.max_seq_len, spec.dataset_path)
    eval_examples = _held_out_examples(held_out, tokenizer, spec)
    longest = max(len(e.input_ids) for e in [*examples, *eval_examples])

    quantize, fallback_note = decide_quantization(spec)
    precision, precision_note = resolve_precision(spec.mixed_precision, native_bf16=cpu_has_native_bf16())
    plan_spec = dataclasses.replace(spec, quantization="nf4" if quantize else "none", mixed_precision=precision)
    plan = plan_memory(spec.base_model_dir, plan_spec, memory_budget(spec), seq_len=longest)
    for note in (precision_note, fallback_note):
        if note:
            plan.notes.insert(0, note)
    emit(
        {
            "event": "plan",
            **plan.to_dict(),
            "mixed_precision": precision,
            "torch_threads": torch.get_num_threads(),
            "allocator": active_allocator(),
        }
    )

    loaded = load_for_training(
        spec,
        checkpointing=plan.checkpointing,
        quantize=quantize,
        precision=precision,
        tokenizer=tokenizer,
        cache_dir=job_dir / "cache",
    )
    total = spec.max_steps or spec.epochs * steps_per_epoch(len(examples), spec.effective_batch)
    cfg = LoopConfig(
        learning_rate=spec.learning_rate,
        effective_batch=spec.effective_batch,
        micro_batch=plan.micro_batch,
        total_steps=total,
        seed=spec.seed,
        checkpoint_every_steps=spec.checkpoint_every_steps,
        checkpoint_every_s=spec.checkpoint_every_s,
        pad_id=int(tokenizer.pad_token_id),
        offload_optimizer=plan.offload_optimizer,
        bf16_autocast=precision == "bf16",
    )
    meta = {"identity": spec.identity(), "base_fingerprint": fingerprint, "dataset_sha256": ds_sha}
    if should_pause():
        # Asked to stop while loading: the previous checkpoint (if any) is still the latest.
        step = resume.state.step if resume else 0
        emit({"event": "paused", "step": step})
        return "paused"
    outcome, state = train(
        loaded.model,
        examples,
        cfg,
        job_dir=job_dir,
        meta=meta,
        emit=emit,
        should_pause=should_pause,
        resume=resume,
    )
    if outcome == "paused":
        return "paused"

    figures: dict[str, Any] = {}
    if eval_examples:
        from agent.training.evaluation import evaluate

        figures = evaluate(loaded.model, eval_examples, plan.micro_batch, cfg.pad_id, cfg.bf16_autocast)
        emit({"event": "evaluated", **figures})
    manifest = {
        "spec": spec.to_dict(),
        "loss_curve": state.loss_curve,
        "tokens_seen": state.tokens_seen,
        "steps": state.step,
        "duration_s": round(state.train_seconds, 3),
        "wall_s_this_run": round(time.monotonic() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        "base_fingerprint": fingerprint,
        "dataset_sha256": ds_sha,
        "plan": plan.to_dict(),
        "quantization": "nf4" if loaded.quantized else "none",
        "mixed_precision": precision,
        "target_modules": loaded.target_modules,
        "notes": loaded.notes,
        "eval": figures,
    }
    adapter_dir = publish_adapter(loaded.model, Path(spec.output_dir), manifest)
    metrics = {
        "steps": state.step,
        "final_loss": state.loss_curve[-1] if state.loss_curve else None,
        "first_loss": state.loss_curve[0] if state.loss_curve else None,
        "tokens_seen": state.tokens_seen,
        "duration_s": manifest["duration_s"],
        "peak_rss_bytes": manifest["peak_rss_bytes"],
        "quantization": manifest["quantization"],
        "examples": len(examples),
        **figures,
    }
    emit({"event": "done", "adapter_dir": str(adapter_dir), "metrics": metrics})
    return "done"


def _held_out_examples(held_out: list[Any], tokenizer: Any, spec: TrainingSpec) -> list[Any]:
    """Tokenized held-out records; none when none of them keeps a loss token (no evaluation)."""
    from agent.training.datasets import examples_from_records

    if not held_out:
        return []
    try:
        return examples_from_records(held_out, tokenizer, spec.max_seq_len, spec.dataset_path)
    except DatasetError:
        log.warning("no held-out example keeps a loss token within max_seq_len; no evaluation")
        return []


def publish_adapter(model: Any, output_dir: Path, manifest: dict[str, Any]) -> Path:
    """Save the adapter (peft safetensors) and its manifest, replacing output_dir atomically."""
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training_manifest.json").write_text(json.dumps(manifest, indent=2))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    return output_dir
