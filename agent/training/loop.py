"""The LoRA training loop: deterministic data order, accumulation, checkpoints, pause and resume.

Determinism: epoch e visits the examples in a permutation drawn from Random(seed, e), and the
data position is (epoch, index into that permutation). Each optimizer step consumes the next
effective_batch examples of the epoch (the last step of an epoch may take fewer), split into
micro-batches; the loss is summed over label tokens and divided by the step's label-token count,
so the update does not depend on how the step was split. With the RNG states restored from a
checkpoint, a paused-and-resumed run reproduces an uninterrupted one.

Schedule: linear warmup over the first 5% of steps (at least one), then cosine decay to 10% of
the learning rate at the last step. Short on-device jobs get a gentle start and a quiet finish.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from agent.training.checkpoint import (
    Checkpoint,
    TrainState,
    apply_checkpoint,
    save_checkpoint,
)
from agent.training.datasets import IGNORE_INDEX, Example
from agent.training.loss import causal_lm_loss_sum

log = logging.getLogger(__name__)
Emit = Callable[[dict[str, Any]], None]


@dataclass
class LoopConfig:
    """What the loop needs beyond the model: batch shape, schedule and checkpoint cadence."""

    learning_rate: float
    effective_batch: int
    micro_batch: int
    total_steps: int
    seed: int
    checkpoint_every_steps: int
    checkpoint_every_s: float
    pad_id: int
    offload_optimizer: bool = False
    bf16_autocast: bool = False
    # Output layer and loss over a few tokens at a time (agent.training.loss): same loss and
    # gradients without the micro_batch x seq x vocab logits.
    chunked_loss: bool = True


def steps_per_epoch(n_examples: int, effective_batch: int) -> int:
    """Return the optimizer steps one pass over the data takes."""
    return math.ceil(n_examples / effective_batch)


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """Return the example order of one epoch: a permutation fixed by (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def lr_factor(step: int, total_steps: int) -> float:
    """Return the learning-rate multiplier before optimizer step `step` (0-based)."""
    warmup = max(1, round(0.05 * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad examples into (input_ids, attention_mask, labels) tensors."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return ids, mask, labels


class OptimizerOffload:
    """Keeps AdamW moments in a safetensors file between steps instead of in RAM."""

    def __init__(self, optimizer: torch.optim.Optimizer, path: Path) -> None:
        self.optimizer = optimizer
        self.path = path
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def stash(self) -> None:
        """Write the moment tensors to disk and drop them from memory."""
        tensors = {}
        for i, p in enumerate(self.params):
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{i}.{key}"] = value
        if not tensors:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.path))
        for p in self.params:
            self.optimizer.state.pop(p, None)

    def restore(self) -> None:
        """Load the moment tensors back before a step or a checkpoint."""
        if not self.path.is_file() or any(p in self.optimizer.state for p in self.params):
            return
        for key, value in load_file(str(self.path)).items():
            i, name = key.split(".", 1)
            self.optimizer.state[self.params[int(i)]][name] = value


def train(
    model: torch.nn.Module,
    examples: list[Example],
    cfg: LoopConfig,
    *,
    job_dir: Path,
    meta: dict[str, Any],
    emit: Emit,
    should_pause: Callable[[], bool] | None = None,
    resume: Checkpoint | None = None,
) -> tuple[str, TrainState]:
    """Train to cfg.total_steps or until paused; return ("done" | "paused", final state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.total_steps))
    state = TrainState()
    if resume is not None:
        apply_checkpoint(resume, model, optimizer, scheduler)
        state = resume.state
        emit({"event": "resumed", "step": state.step})
    else:
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
    offload = OptimizerOffload(optimizer, Path(job_dir) / "offload" / "optimizer.safetensors")

    def checkpoint() -> None:
        if cfg.offload_optimizer:
            offload.restore()
        save_checkpoint(job_dir, model=model, optimizer=optimizer, scheduler=scheduler, state=state, meta=meta)
        if cfg.offload_optimizer:
            offload.stash()
        emit({"event": "checkpoint", "step": state.step})

    n = len(examples)
    last_ckpt_time = time.monotonic()
    last_ckpt_step = state.step
    model.train()
    while state.step < cfg.total_steps:
        started = time.monotonic()
        order = epoch_order(cfg.seed, state.epoch, n)
        chosen = [examples[i] for i in order[state.index : state.index + cfg.effective_batch]]
        loss_sum, tokens = _accumulate(model, chosen, cfg)
        if cfg.offload_optimizer:
            offload.restore()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.offload_optimizer:
            offload.stash()

        state.step += 1
        state.index += cfg.effective_batch
        if state.index >= n:
            state.epoch += 1
            state.index = 0
        state.loss_curve.append(loss_sum)
        state.tokens_seen += tokens
        state.train_seconds += time.monotonic() - started
        emit(
            {
                "event": "progress",
                "step": state.step,
                "total_steps": cfg.total_steps,
                "epoch": state.epoch,
                "loss": loss_sum,
                "tokens_seen": state.tokens_seen,
            }
        )
        pause = should_pause is not None and should_pause() and state.step < cfg.total_steps
        due_steps = cfg.checkpoint_every_steps and state.step - last_ckpt_step >= cfg.checkpoint_every_steps
        due_time = cfg.checkpoint_every_s and time.monotonic() - last_ckpt_time >= cfg.checkpoint_every_s
        if pause or due_steps or due_time or state.step == cfg.total_steps:
            checkpoint()
            last_ckpt_time, last_ckpt_step = time.monotonic(), state.step
        if pause:
            emit({"event": "paused", "step": state.step})
            return "paused", state
    if cfg.offload_optimizer:
        offload.restore()
    return "done", state


def _accumulate(model: torch.nn.Module, chosen: list[Example], cfg: LoopConfig) -> tuple[float, int]:
    """Run forward/backward over the step's micro-batches; return (mean token loss, tokens)."""
    # Normalise by the whole step's label tokens so any micro-batch split gives the same update.
    label_tokens = sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in chosen)
    denom = max(1, label_tokens)
    total = 0.0
    tokens = 0
    for start in range(0, len(chosen), cfg.micro_batch):
        ids, mask, labels = collate(chosen[start : start + cfg.micro_batch], cfg.pad_id)
        tokens += int(mask.sum())
        # Shift the labels rather than the logits: slicing the logits would copy the largest
        # tensor of the step (micro_batch x seq x vocab floats).
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        loss = (
            causal_lm_loss_sum(model, ids, mask, shifted, bf16_autocast=cfg.bf16_autocast, chunked=cfg.chunked_loss)
            / denom
        )
        loss.backward()  # type: ignore[no-untyped-call]
        total += float(loss.detach())
        del loss
    return total, tokens
