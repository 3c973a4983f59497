"""Causal-LM loss without materialising the logits: the output layer and cross-entropy in chunks.

The logits are the largest tensors of a small model's step (micro_batch x seq x vocab floats:
96 MiB for SmolLM2 at 4 x 128, and several copies are alive at once: logits, log-softmax and
their gradients). Here the decoder runs as usual and returns its last hidden states; the
output layer and the summed cross-entropy then run over a few tokens at a time, and each
chunk's gradient with respect to the hidden states is taken right away (the head is frozen, so
that is its only gradient). The chunk's logits are freed before the next chunk, and backward
just scales the stored gradient: no recomputation, the same operations on the same numbers.
Each token's loss and gradient depend on its own row only, so the result equals the plain
loss up to float summation order (tests/agent/training/test_loss.py).

Used only where the causal-LM head is known to be a plain linear map of the decoder output
(no logit soft-capping or scaling) and is frozen; anything else takes the plain path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from agent.training.arch import chunk_tokens, supports_chunked_loss
from agent.training.datasets import IGNORE_INDEX


def _split(model: torch.nn.Module) -> tuple[Any, Any] | None:
    """Return (decoder, output layer) of a (peft-wrapped) causal LM, or None to use the plain path."""
    get_base = getattr(model, "get_base_model", None)
    hf: Any = get_base() if callable(get_base) else model
    config = getattr(hf, "config", None)
    if config is None or not supports_chunked_loss(config.to_dict()):
        return None
    decoder = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if decoder is None or decoder is hf or type(head) is not torch.nn.Linear:
        return None
    if any(p.requires_grad for p in head.parameters()):
        return None  # a trained head (LoRA on lm_head, modules_to_save) needs its own grads
    return decoder, head


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum of cross_entropy(head(hidden), labels) over tokens, computed chunk by chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        head: torch.nn.Module,
        chunk: int,
        bf16: bool,
    ) -> torch.Tensor:
        flat = hidden.detach().reshape(-1, hidden.size(-1))
        grad = torch.zeros_like(flat) if hidden.requires_grad else None
        total = torch.zeros((), dtype=torch.float32)
        for start in range(0, flat.size(0), chunk):
            lab = labels[start : start + chunk]
            if not bool((lab != IGNORE_INDEX).any()):
                continue  # contributes nothing to the loss nor to any gradient
            h = flat[start : start + chunk].detach().requires_grad_(grad is not None)
            with torch.enable_grad():
                # Same ops as the plain path: the head under autocast, the loss in fp32.
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = head(h)
                loss = F.cross_entropy(logits.float(), lab, ignore_index=IGNORE_INDEX, reduction="sum")
            if grad is not None:
                (g,) = torch.autograd.grad(loss, h)
                grad[start : start + chunk] = g
            total += loss.detach()
            del logits, loss
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.shape = hidden.shape
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).view(ctx.shape), None, None, None, None


def causal_lm_loss_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    shifted_labels: torch.Tensor,
    *,
    bf16_autocast: bool = False,
    chunked: bool = True,
) -> torch.Tensor:
    """Return the summed next-token cross-entropy over label tokens (labels already shifted)."""
    parts = _split(model) if chunked else None
    if parts is None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return F.cross_entropy(
            logits.float().view(-1, logits.size(-1)),
            shifted_labels.view(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    decoder, head = parts
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    loss: torch.Tensor = _ChunkedHeadLoss.apply(  # type: ignore[no-untyped-call]
        hidden,
        shifted_labels.reshape(-1),
        head,
        chunk_tokens(head.out_features),
        bf16_autocast,
    )
    return loss
