"""Evaluation before use: a held-out share of the device's own data, and the loss of the base
model and of the trained adapter on it. The data never leaves the device; only the two figures
travel, in the adapter's manifest.

The split is a fixed function of (seed, share, number of records), so a job that pauses and
resumes holds out the same records. The loss is the mean next-token cross-entropy over the
held-out label tokens (the same loss training minimises), computed with the adapter disabled
(the base) and enabled, in eval mode without gradients.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# Never hold out everything: at least this many records stay for training.
MIN_TRAIN = 1


def split_holdout(records: Sequence[T], share: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out): round(share * n) records held out (at least one when share > 0 and
    two or more records exist), chosen by a permutation fixed by the seed."""
    n = len(records)
    if share <= 0 or n < MIN_TRAIN + 1:
        return list(records), []
    k = min(max(1, round(share * n)), n - MIN_TRAIN)
    order = list(range(n))
    random.Random(seed * 7_919 + 17).shuffle(order)
    held = set(order[:k])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def mean_loss(model: Any, examples: list[Any], micro_batch: int, pad_id: int, bf16: bool) -> float:
    """Mean next-token loss per label token over the examples (no gradients)."""
    import torch

    from agent.training.datasets import IGNORE_INDEX
    from agent.training.loop import collate
    from agent.training.loss import causal_lm_loss_sum

    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), max(micro_batch, 1)):
            ids, mask, labels = collate(examples[start : start + micro_batch], pad_id)
            shifted = torch.full_like(labels, IGNORE_INDEX)
            shifted[:, :-1] = labels[:, 1:]
            total += float(causal_lm_loss_sum(model, ids, mask, shifted, bf16_autocast=bf16))
            tokens += int((shifted != IGNORE_INDEX).sum())
    return total / max(tokens, 1)


def evaluate(model: Any, examples: list[Any], micro_batch: int, pad_id: int, bf16: bool) -> dict[str, float]:
    """The held-out figures of a peft model: base (adapter disabled) and adapter losses."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            base = mean_loss(model, examples, micro_batch, pad_id, bf16)
        tuned = mean_loss(model, examples, micro_batch, pad_id, bf16)
    finally:
        model.train(was_training)
    return {"eval_loss_base": round(base, 6), "eval_loss_adapter": round(tuned, 6), "eval_examples": len(examples)}
