"""Atomic training checkpoints: tensors in safetensors, everything else in JSON (never pickle).

Layout of <job_dir>/checkpoint/:
    adapter.safetensors    trainable (LoRA) parameters by name
    optimizer.safetensors  AdamW state tensors, keyed "<param index>.<state name>"
    rng.safetensors        torch CPU RNG state
    state.json             step, data position, loss curve, tokens seen, scheduler and optimizer
                           hyper-parameters, python RNG, and the job identity it belongs to
A checkpoint is written into a temp dir and renamed into place; the previous one is moved to
checkpoint.old first and removed last, so a kill at any instant leaves one complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = "checkpoint"
_OLD = "checkpoint.old"
_STATE = "state.json"


@dataclass
class TrainState:
    """Where training stands: optimizer steps done, the next example, and the curves so far."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    loss_curve: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    train_seconds: float = 0.0


@dataclass
class Checkpoint:
    """A checkpoint read back from disk, ready to be applied to a model and optimizer."""

    state: TrainState
    meta: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    torch_rng: torch.Tensor
    python_rng: Any


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the trainable parameters by name (detached, contiguous copies)."""
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_to_disk(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into safetensors-ready tensors and a JSON-ready rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_disk(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state_dict from optimizer_to_disk's two halves."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _jsonable_python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def save_checkpoint(
    job_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    meta: dict[str, Any],
) -> Path:
    """Write a complete checkpoint atomically to <job_dir>/checkpoint and return its path."""
    job_dir = Path(job_dir)
    final = job_dir / CHECKPOINT
    tmp = job_dir / f"{CHECKPOINT}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "adapter.safetensors"))
    opt_tensors, opt_rest = optimizer_to_disk(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    # LambdaLR keeps its lambdas as None in state_dict; the schedule itself is rebuilt from the spec.
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    doc = {
        "state": asdict(state),
        "meta": meta,
        "optimizer": opt_rest,
        "scheduler": sched,
        "python_rng": _jsonable_python_rng(),
    }
    with open(tmp / _STATE, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    old = job_dir / _OLD
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(job_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def load_checkpoint(job_dir: Path) -> Checkpoint | None:
    """Read the job's checkpoint (or the previous one if a kill hit mid-swap); None if absent."""
    for name in (CHECKPOINT, _OLD):
        path = Path(job_dir) / name
        if (path / _STATE).is_file():
            return _read(path)
    return None


def _read(path: Path) -> Checkpoint:
    doc = json.loads((path / _STATE).read_text())
    opt = optimizer_from_disk(load_file(str(path / "optimizer.safetensors")), doc["optimizer"])
    version, internal, gauss = doc["python_rng"]
    return Checkpoint(
        state=TrainState(**doc["state"]),
        meta=doc["meta"],
        adapter=load_file(str(path / "adapter.safetensors")),
        optimizer=opt,
        scheduler=doc["scheduler"],
        torch_rng=load_file(str(path / "rng.safetensors"))["torch_cpu"],
        python_rng=(version, tuple(internal), gauss),
    )


def apply_checkpoint(ckpt: Checkpoint, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Restore adapter weights, optimizer, scheduler and RNG states from a checkpoint."""
    params = dict(model.named_parameters())
    missing = [n for n in ckpt.adapter if n not in params]
    if missing:
        raise KeyError(f"checkpoint has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in ckpt.adapter.items():
            params[name].copy_(value)
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(dict(ckpt.scheduler, lr_lambdas=[None] * len(optimizer.param_groups)))
    torch.set_rng_state(ckpt.torch_rng)
    random.setstate(ckpt.python_rng)
