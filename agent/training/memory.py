"""Peak-memory estimate and plan for a LoRA job, from config.json and safetensors headers only.

Torch-free: the agent can refuse a job (DoesNotFit) before it starts a child process. The model
is never loaded; parameter counts and dtypes come from the safetensors headers.

The estimate is the larger of the load peak and the training peak (bytes of resident memory):
    runtime      torch + transformers + peft (+ bitsandbytes) imported, measured
    weights      fp32 LoRA: every weight as fp32 (a memory map of the checkpoint, paged in)
                 NF4: linears of the decoder at 0.5 byte/param + blockwise absmax, the rest fp32
    lora         LoRA A/B params + their grads + AdamW's two moments (all fp32; the moments
                 live on disk when the optimizer is offloaded)
    activations  per token per layer ~ a*hidden + b*intermediate floats kept for backward;
                 with checkpointing, only each layer's input plus one layer being recomputed
    logits       chunk x vocab floats, alive several times (logits, log-softmax, their grads);
                 the chunk is min(micro_batch x seq, agent.training.arch.chunk_tokens) where the
                 chunked loss applies, else every token of the micro-batch
    load peak    NF4 only: the base is quantized tensor by tensor into a cached copy
                 (agent.training.quantized), then memory-mapped: about the runtime plus the
                 4-bit weights, below the training peak
The coefficients were fitted to peak RSS measured on SmolLM2-135M and the tiny test models
(benchmarks/training_memory.py checks the estimate against a fresh measurement).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from adapters_store.fingerprint import read_safetensors_header
from agent.training.arch import (
    ArchInfo,
    arch_info,
    chunk_tokens,
    read_config,
    resolve_targets,
    supports_chunked_loss,
)
from agent.training.errors import DoesNotFit, IncompatibleBase
from agent.training.spec import TrainingSpec

MB = 2**20
# Measured on SmolLM2-135M (2 cores, torch 2.13, transformers 5.24, 1 thread), see module doc.
# Resident set after importing torch, transformers, peft and bitsandbytes.
IMPORT_BYTES = 390 * MB
# ... plus tokenizer, model skeleton, peft wrapping and allocator arenas, before any weight
# (421 MiB with the tiny test models, 458 MiB with SmolLM2 and its 3.5 MB tokenizer).
RUNTIME_BYTES = 440 * MB
# NF4 training keeps dequantization scratch on top of the 4-bit weights (bitsandbytes
# dequantizes every linear in every forward and backward; glibc keeps the freed heap), in
# proportion to the checkpoint (80 MiB for SmolLM2's 513 MiB; it varies +-50 MiB run to run).
NF4_EXTRA_PER_FILE_BYTE = 0.15
# Floats kept for backward per token per decoder layer, per unit of hidden / intermediate width
# (fitted: 13*576 + 4*1536 floats = 53 KiB per token per layer on SmolLM2).
ACT_PER_HIDDEN = 13.0
ACT_PER_INTERMEDIATE = 4.0
# bitsandbytes' 4-bit matmul saves its fp32 inputs as well when no layer is checkpointed.
NF4_ACT_PER_HIDDEN = 3.0
# With checkpointing each layer keeps its input, the rotary tables and the dropout masks.
CKPT_KEEP_PER_HIDDEN = 6.0
# Logit-sized float buffers alive at the loss peak (logits, log-softmax, their gradients).
LOGIT_COPIES = 4.0
NF4_BLOCK = 64
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_EMBEDDING_HINTS = ("embed", "wte", "wpe", "lm_head", "shared")


@dataclass(frozen=True)
class WeightStats:
    """Parameter counts and checkpoint bytes of a model folder, from safetensors headers."""

    linear_params: int
    other_params: int
    file_bytes: int
    lora_params: int


@dataclass
class MemoryPlan:
    """How a job will run within its memory budget, and the estimate that justified it."""

    micro_batch: int
    grad_accum: int
    checkpointing: bool
    offload_optimizer: bool
    estimate_bytes: int
    budget_bytes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """Return the plan as a JSON-ready dict."""
        return dataclasses.asdict(self)


def weight_stats(model_dir: str | Path, targets: list[str], rank: int) -> WeightStats:
    """Count linear and other parameters and the LoRA parameters for the target modules."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise IncompatibleBase(f"{model_dir}: no *.safetensors weights")
    linear = other = lora = file_bytes = 0
    for path in files:
        file_bytes += path.stat().st_size
        for name, info in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            shape = [int(d) for d in info["shape"]]
            n = math.prod(shape)
            if len(shape) == 2 and not any(h in name for h in _EMBEDDING_HINTS):
                linear += n
                if name.endswith(".weight") and name.rsplit(".", 2)[-2] in targets:
                    lora += rank * (shape[0] + shape[1])
            else:
                other += n
    return WeightStats(linear, other, file_bytes, lora)


def _nf4_bytes_per_param(double_quant: bool) -> float:
    # 4-bit codes, plus one absmax per 64-weight block: fp32, or with double quantization
    # 8-bit codes plus one fp32 absmax per 256 blocks.
    absmax = (1 + 4 / 256) if double_quant else 4
    return 0.5 + absmax / NF4_BLOCK


def _activation_bytes(arch: ArchInfo, micro_batch: int, seq: int, checkpointing: bool, nf4: bool) -> float:
    tokens = micro_batch * seq
    per_layer = tokens * (ACT_PER_HIDDEN * arch.hidden + ACT_PER_INTERMEDIATE * arch.intermediate) * 4
    if checkpointing:
        # Every layer keeps its input; one layer at a time is recomputed with full activations.
        return arch.layers * tokens * CKPT_KEEP_PER_HIDDEN * arch.hidden * 4 + per_layer
    if nf4:
        per_layer += tokens * NF4_ACT_PER_HIDDEN * arch.hidden * 4
    return arch.layers * per_layer


def estimate_peak_bytes(
    model_dir: str | Path,
    spec: TrainingSpec,
    micro_batch: int,
    checkpointing: bool,
    *,
    offload_optimizer: bool = False,
    seq_len: int | None = None,
) -> int:
    """Estimate the worker's peak resident bytes without loading the model."""
    config = read_config(model_dir)
    arch = arch_info(config)
    stats = weight_stats(model_dir, resolve_targets(spec.target_modules, config), spec.rank)
    seq = min(seq_len or spec.max_seq_len, spec.max_seq_len)
    nf4 = spec.quantization == "nf4"
    if nf4:
        weights = stats.linear_params * _nf4_bytes_per_param(spec.double_quant) + stats.other_params * 4
    else:
        weights = (stats.linear_params + stats.other_params) * 4
    lora = stats.lora_params * 4 * (2 if offload_optimizer else 4)
    tokens = micro_batch * seq
    if supports_chunked_loss(config):
        tokens = min(tokens, chunk_tokens(arch.vocab))
    logits = tokens * arch.vocab * 4 * LOGIT_COPIES
    train_peak = (
        RUNTIME_BYTES
        + (NF4_EXTRA_PER_FILE_BYTE * stats.file_bytes if nf4 else 0)
        + weights
        + lora
        + logits
        + _activation_bytes(arch, micro_batch, seq, checkpointing, nf4)
    )
    # Writing the NF4 copy holds the 4-bit tensors (the fp32 ones stream through); loading it
    # maps the copy. (When no copy can be written, from_pretrained quantizes while loading and
    # peaks near IMPORT_BYTES + file_bytes + weights: agent.training.model warns about it.)
    load_peak = IMPORT_BYTES + weights if nf4 else 0
    return int(max(train_peak, load_peak))


def _micro_batch_candidates(spec: TrainingSpec) -> list[int]:
    if spec.micro_batch:
        return [spec.micro_batch]
    eff = spec.effective_batch
    return sorted({math.ceil(eff / k) for k in range(1, eff + 1)}, reverse=True)


def _choices(value: str) -> list[bool]:
    return {"on": [True], "off": [False]}.get(value, [False, True])


def plan_memory(
    model_dir: str | Path,
    spec: TrainingSpec,
    budget_bytes: int,
    *,
    seq_len: int | None = None,
) -> MemoryPlan:
    """Pick micro-batch, checkpointing and optimizer offload to fit the budget, or raise DoesNotFit."""
    # Cheapest first: a smaller micro-batch (same effective batch through accumulation) costs
    # little on a CPU; checkpointing recomputes every layer; offload adds disk I/O per step.
    notes: list[str] = []
    best: tuple[int, int, bool, bool] | None = None
    for offload in _choices(spec.offload_optimizer):
        for ckpt in _choices(spec.gradient_checkpointing):
            for mb in _micro_batch_candidates(spec):
                est = estimate_peak_bytes(model_dir, spec, mb, ckpt, offload_optimizer=offload, seq_len=seq_len)
                if best is None or est < best[0]:
                    best = (est, mb, ckpt, offload)
                if est <= budget_bytes:
                    if mb < spec.effective_batch:
                        notes.append(f"micro-batch {mb} x {math.ceil(spec.effective_batch / mb)} accumulation")
                    if ckpt:
                        notes.append("gradient checkpointing on")
                    if offload:
                        notes.append("optimizer state offloaded to disk")
                    return MemoryPlan(
                        micro_batch=mb,
                        grad_accum=math.ceil(spec.effective_batch / mb),
                        checkpointing=ckpt,
                        offload_optimizer=offload,
                        estimate_bytes=est,
                        budget_bytes=budget_bytes,
                        notes=notes,
                    )
    assert best is not None
    est, mb, ckpt, offload = best
    raise DoesNotFit(
        f"training {Path(model_dir).name} needs an estimated {est / MB:.0f} MiB even at "
        f"micro-batch {mb}, checkpointing {'on' if ckpt else 'off'}, optimizer offload "
        f"{'on' if offload else 'off'}, seq {seq_len or spec.max_seq_len}; "
        f"the budget is {budget_bytes / MB:.0f} MiB"
    )
