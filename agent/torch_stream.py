"""Token-by-token decoding for the torch runtime (agent.runtime), for the streaming inference API.

A plain KV-cached decode loop rather than transformers' generate() with a streamer: no helper
thread, and stopping early (a stop string, a cancelled client) is just leaving the loop.
Greedy steps take the argmax of the same logits generate() sees with a fresh GenerationConfig,
so both give the same tokens. The caller holds the runtime's model lock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from agent.runtime_base import GenerateRequest, StopScanner, StreamChunk


def encode(tok: Any, request: GenerateRequest) -> Any:
    """Token ids [1, n] of the request: chat-templated unless chat=False or no template."""
    if request.chat and tok.chat_template:
        text = tok.apply_chat_template(request.chat_messages(), tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return tok(request.prompt, return_tensors="pt")["input_ids"]


def _eos_ids(tok: Any, model: Any) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return {int(i) for i in ids}


def _pick(torch: Any, logits: Any, request: GenerateRequest, gen: Any) -> int:
    if request.temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < request.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen).item())


def stream_tokens(model: Any, tok: Any, request: GenerateRequest, adapter: str | None) -> Iterator[StreamChunk]:
    """Decode a reply, yielding text as it becomes final; the last chunk carries the totals."""
    import torch

    started = time.perf_counter()
    ids = encode(tok, request)
    eos = _eos_ids(tok, model)
    gen = torch.Generator().manual_seed(request.seed) if request.temperature > 0 else None
    scanner = StopScanner(request.stop)
    new: list[int] = []
    shown, first, finish = "", 0.0, "length"
    cache, step_input = None, ids
    with torch.inference_mode():
        while len(new) < request.max_new_tokens:
            # logits_to_keep=1, as generate() does: the same last-row logits, bit for bit.
            out = model(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            token = _pick(torch, out.logits[0, -1].float(), request, gen)
            first = first or time.perf_counter() - started
            if token in eos:
                finish = "eos"
                break
            new.append(token)
            step_input = torch.tensor([[token]])
            text = tok.decode(new, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            delta, shown = text[len(shown) :], text
            emit = scanner.feed(delta)
            if emit:
                yield StreamChunk(emit, len(new), adapter)
            if scanner.stopped:
                finish = "stop"
                break
    # Whatever was held back as an incomplete character is final now.
    rest = scanner.feed(tok.decode(new, skip_special_tokens=True)[len(shown) :]) if finish != "stop" else ""
    yield StreamChunk(
        rest + scanner.flush(),
        len(new) + (finish == "eos"),
        adapter,
        token_ids=tuple(new),
        finish_reason=finish,
        prompt_tokens=int(ids.shape[1]),
        first_token_s=first,
        seconds=time.perf_counter() - started,
    )
