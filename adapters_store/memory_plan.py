"""Training memory of a LoRA job, planned from the base model's shape alone: one planner, both sides.

Torch-free and file-free. A device describes its base as a `BaseShape` (built from config.json
and safetensors headers by agent.training.memory, sent to the orchestrator at enrollment). The
device plans with it before it starts a training child; the orchestrator plans with the same
functions before it leases a job, and refuses a job whose smallest plan exceeds the device's
budget. So both sides agree on what fits.

The estimate is the larger of the load peak and the training peak (bytes of resident memory):
    runtime      torch + transformers + peft (+ bitsandbytes) imported, measured
    weights      fp32 LoRA: every weight as fp32 (a memory map of the checkpoint, paged in)
                 NF4: linears of the decoder at 0.5 byte/param + blockwise absmax, the rest fp32
    lora         LoRA A/B params + their grads + AdamW's two moments (all fp32; the moments
                 live on disk when the optimizer is offloaded)
    activations  per token per layer ~ a*hidden + b*intermediate floats kept for backward;
                 with checkpointing, only each layer's input plus one layer being recomputed
    logits       chunk x vocab floats, alive several times (logits, log-softmax, their grads);
                 the chunk is min(micro_batch x seq, chunk tokens) where the chunked loss
                 applies, else every token of the micro-batch
    bf16         autocast keeps a bf16 copy of each weight a matmul saves for its backward:
                 the output matrix's (one loss chunk at a time), and every fp32 linear's when
                 no layer is recomputed (NF4 dequantizes again in the backward)
    load peak    NF4 only: the base is quantized tensor by tensor into a cached copy, then
                 memory-mapped: about the runtime plus the 4-bit weights
The coefficients were fitted to peak resident memory measured on SmolLM2-135M and the tiny test
models (benchmarks/training_memory.py checks the estimate against a fresh measurement).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_store.fingerprint import read_safetensors_header

MB = 2**20
# Resident set after importing torch, transformers, peft and bitsandbytes.
IMPORT_BYTES = 390 * MB
# ... plus tokenizer, model skeleton, peft wrapping and allocator arenas, before any weight
# (421 MiB with the tiny test models, 458 MiB with SmolLM2 and its 3.5 MB tokenizer).
RUNTIME_BYTES = 440 * MB
# NF4 training keeps dequantization scratch on top of the 4-bit weights (bitsandbytes
# dequantizes every linear in every forward and backward), in proportion to the checkpoint.
# glibc malloc keeps much more of it (freed buffers stay resident behind longer-lived small
# tensors; agent/training/heap.py) than jemalloc, which the training child uses when installed.
NF4_EXTRA_PER_FILE_BYTE = {"jemalloc": 0.05, "system": 0.15}  # system: glibc malloc
# Floats kept for backward per token per decoder layer, per unit of hidden / intermediate width.
ACT_PER_HIDDEN = 13.0
ACT_PER_INTERMEDIATE = 4.0
# bitsandbytes' 4-bit matmul saves its fp32 inputs as well when no layer is checkpointed.
NF4_ACT_PER_HIDDEN = 3.0
# With checkpointing each layer keeps its input (and the rotary tables); under glibc the
# recompute's freed scratch stays resident on top, in proportion to the tokens.
CKPT_KEEP_PER_HIDDEN = {"jemalloc": 1.5, "system": 6.0}
# Logit-sized float buffers alive at the loss peak (logits, log-softmax, their gradients).
LOGIT_COPIES = 4.0
# Logit bytes per loss chunk (agent.training.loss computes the head and loss chunk by chunk):
# larger chunks hold more logits, smaller ones re-read the output matrix more often.
CHUNK_LOGIT_BYTES = 24 * MB
NF4_BLOCK = 64
# Weight-name parts that mark embeddings and output heads (kept in fp32 under NF4, no LoRA).
EMBEDDING_HINTS = ("embed", "wte", "wpe", "lm_head", "shared")


class PlanDoesNotFit(ValueError):
    """No plan fits the budget; says the smallest estimate, the plan behind it, and the budget."""

    def __init__(self, estimate_bytes: int, budget_bytes: int, plan_description: str) -> None:
        super().__init__(
            f"needs an estimated {estimate_bytes / MB:.0f} MiB even at {plan_description}; the budget is "
            f"{budget_bytes / MB:.0f} MiB ({(estimate_bytes - budget_bytes) / MB:.0f} MiB short)"
        )
        self.estimate_bytes = estimate_bytes
        self.budget_bytes = budget_bytes
        self.plan_description = plan_description


@dataclass(frozen=True)
class BaseShape:
    """What training memory depends on in a base model, read without loading it."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    # True when the output layer and loss run chunk by chunk (agent.training.arch decides).
    chunked_loss: bool
    # Parameters of the decoder's 2-D weights (quantized under NF4) and of everything else.
    linear_params: int
    other_params: int
    # Bytes of the checkpoint files.
    file_bytes: int
    # Per module name (the last part, e.g. "q_proj"): the sum of rows + columns of its 2-D
    # weights over all layers, so a rank-r LoRA on it has r times that many parameters.
    lora_dims: dict[str, int]
    # LoRA targets a job gets when it names none; empty for architectures without defaults.
    default_targets: tuple[str, ...] = ()

    def lora_params(self, targets: Iterable[str], rank: int) -> int:
        """Parameters of a rank-`rank` LoRA on the given module names."""
        return rank * sum(self.lora_dims.get(t, 0) for t in set(targets))

    def to_dict(self) -> dict[str, Any]:
        """The shape as a JSON-ready dict (what a device sends at enrollment)."""
        out = dataclasses.asdict(self)
        out["default_targets"] = list(self.default_targets)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseShape:
        """Build a shape from its dict, raising ValueError naming the first bad field."""
        ints = ("layers", "hidden", "intermediate", "vocab", "linear_params", "other_params", "file_bytes")
        for name in ints:
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if "params" in name else 1):
                raise ValueError(f"base_shape.{name} must be a positive integer, got {value!r}")
        dims = data.get("lora_dims")
        if not isinstance(dims, dict) or not all(isinstance(v, int) and v >= 0 for v in dims.values()):
            raise ValueError(f"base_shape.lora_dims must map module names to sizes, got {dims!r}")
        targets = data.get("default_targets") or []
        if not isinstance(targets, list | tuple) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"base_shape.default_targets must be a list of names, got {targets!r}")
        return cls(
            model_type=str(data.get("model_type", "")),
            layers=data["layers"],
            hidden=data["hidden"],
            intermediate=data["intermediate"],
            vocab=data["vocab"],
            chunked_loss=bool(data.get("chunked_loss", False)),
            linear_params=data["linear_params"],
            other_params=data["other_params"],
            file_bytes=data["file_bytes"],
            lora_dims={str(k): int(v) for k, v in dims.items()},
            default_targets=tuple(targets),
        )


@dataclass(frozen=True)
class WeightTally:
    """Parameter counts and checkpoint bytes of a model folder, from safetensors headers."""

    linear_params: int
    other_params: int
    file_bytes: int
    lora_dims: dict[str, int]


def tally_weights(model_dir: str | Path) -> WeightTally:
    """Count a folder's linear and other parameters and the LoRA dimensions per module name."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    linear = other = file_bytes = 0
    dims: dict[str, int] = {}
    for path in files:
        file_bytes += path.stat().st_size
        for name, info in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            shape = [int(d) for d in info["shape"]]
            n = math.prod(shape)
            if len(shape) == 2 and not any(h in name for h in EMBEDDING_HINTS):
                linear += n
                if name.endswith(".weight"):
                    module = name.rsplit(".", 2)[-2]
                    dims[module] = dims.get(module, 0) + shape[0] + shape[1]
            else:
                other += n
    return WeightTally(linear, other, file_bytes, dims)


@dataclass(frozen=True)
class PlanInputs:
    """The job settings training memory depends on. Defaults are the training recipe's."""

    rank: int = 8
    # None: the base's default targets.
    targets: tuple[str, ...] | None = None
    nf4: bool = True
    double_quant: bool = True
    bf16: bool = False
    max_seq_len: int = 256
    effective_batch: int = 8
    # 0: the planner picks; otherwise fixed.
    micro_batch: int = 0
    # "auto" (the planner decides), "on" or "off".
    checkpointing: str = "auto"
    offload_optimizer: str = "auto"
    # The training process's allocator: "jemalloc" (the product's default where installed) or
    # "system" (glibc malloc); the orchestrator plans for jemalloc, the device for what it runs.
    allocator: str = "jemalloc"


_API_PRECISION = {"MIXED_PRECISION_FP32": "fp32", "MIXED_PRECISION_BF16": "bf16", "MIXED_PRECISION_FP16": "fp16"}
_API_CHECKPOINTING = {"GRADIENT_CHECKPOINTING_ON": "on", "GRADIENT_CHECKPOINTING_OFF": "off"}


def plan_inputs_from_api(training: dict[str, Any], *, native_bf16: bool, supports_4bit: bool) -> PlanInputs:
    """The planner's inputs for a job as the API stores its TrainingSpec (proto JSON names).

    Unset fields take the recipe's defaults (PlanInputs'); a device without 4-bit support
    plans fp32 LoRA, which it falls back to.
    """
    d = PlanInputs()
    lora = training.get("lora") or {}
    targets = tuple(lora.get("target_modules") or ()) or None
    precision, _ = resolve_precision(
        _API_PRECISION.get(str(training.get("mixed_precision", "")), "auto"), native_bf16=native_bf16
    )
    return PlanInputs(
        rank=int(lora.get("rank") or d.rank),
        targets=targets,
        nf4=training.get("quantization") != "QUANTIZATION_NONE" and supports_4bit,
        double_quant=bool(training.get("double_quant", d.double_quant)),
        bf16=precision == "bf16",
        max_seq_len=int(training.get("max_seq_len") or d.max_seq_len),
        effective_batch=int(training.get("effective_batch") or d.effective_batch),
        micro_batch=int(training.get("micro_batch") or 0),
        checkpointing=_API_CHECKPOINTING.get(str(training.get("gradient_checkpointing", "")), "auto"),
    )


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


def resolve_precision(requested: str, *, native_bf16: bool) -> tuple[str, str | None]:
    """What the CPU trainer computes in for a requested mixed_precision: ("fp32" | "bf16", a note when changed).

    auto is bf16 where the CPU computes bfloat16 natively (emulated bf16 is far slower than
    fp32), else fp32; fp16 is a GPU setting, replaced the same way.
    """
    if requested in ("fp32", "bf16"):
        return requested, None
    if requested == "auto":
        return ("bf16" if native_bf16 else "fp32"), None
    if requested == "fp16":
        fallback = "bf16" if native_bf16 else "fp32"
        return fallback, f"mixed_precision fp16 is a GPU setting; the CPU trainer used {fallback}"
    raise ValueError(f"mixed_precision must be auto, fp32, bf16 or fp16, got {requested!r}")


def _nf4_bytes_per_param(double_quant: bool) -> float:
    # 4-bit codes, plus one absmax per 64-weight block: fp32, or with double quantization
    # 8-bit codes plus one fp32 absmax per 256 blocks.
    absmax = (1 + 4 / 256) if double_quant else 4
    return 0.5 + absmax / NF4_BLOCK


def chunk_tokens(vocab: int) -> int:
    """Return how many tokens one loss chunk holds for a vocabulary size."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * max(1, vocab)))


def _activation_bytes(
    shape: BaseShape, micro_batch: int, seq: int, checkpointing: bool, nf4: bool, allocator: str
) -> float:
    tokens = micro_batch * seq
    per_layer = tokens * (ACT_PER_HIDDEN * shape.hidden + ACT_PER_INTERMEDIATE * shape.intermediate) * 4
    if checkpointing:
        # Every layer keeps its input; one layer at a time is recomputed with full activations.
        return shape.layers * tokens * CKPT_KEEP_PER_HIDDEN[allocator] * shape.hidden * 4 + per_layer
    if nf4:
        per_layer += tokens * NF4_ACT_PER_HIDDEN * shape.hidden * 4
    return shape.layers * per_layer


def _bf16_copies_bytes(shape: BaseShape, nf4: bool, checkpointing: bool) -> float:
    head = shape.vocab * shape.hidden * 2
    return head + (0 if nf4 or checkpointing else shape.linear_params * 2)


def estimate_peak_bytes(
    shape: BaseShape,
    inputs: PlanInputs,
    micro_batch: int,
    checkpointing: bool,
    *,
    offload_optimizer: bool = False,
    seq_len: int | None = None,
) -> int:
    """Estimate the training process's peak resident bytes."""
    targets = inputs.targets if inputs.targets is not None else shape.default_targets
    seq = min(seq_len or inputs.max_seq_len, inputs.max_seq_len)
    if inputs.nf4:
        weights = shape.linear_params * _nf4_bytes_per_param(inputs.double_quant) + shape.other_params * 4
    else:
        weights = (shape.linear_params + shape.other_params) * 4
    lora = shape.lora_params(targets, inputs.rank) * 4 * (2 if offload_optimizer else 4)
    tokens = micro_batch * seq
    if shape.chunked_loss:
        tokens = min(tokens, chunk_tokens(shape.vocab))
    logits = tokens * shape.vocab * 4 * LOGIT_COPIES
    train_peak = (
        RUNTIME_BYTES
        + (NF4_EXTRA_PER_FILE_BYTE[inputs.allocator] * shape.file_bytes if inputs.nf4 else 0)
        + weights
        + lora
        + logits
        + _activation_bytes(shape, micro_batch, seq, checkpointing, inputs.nf4, inputs.allocator)
        + (_bf16_copies_bytes(shape, inputs.nf4, checkpointing) if inputs.bf16 else 0)
    )
    # Writing the NF4 copy holds the 4-bit tensors (the fp32 ones stream through); loading it
    # maps the copy.
    load_peak = IMPORT_BYTES + weights if inputs.nf4 else 0
    return int(max(train_peak, load_peak))


def _micro_batch_candidates(inputs: PlanInputs) -> list[int]:
    if inputs.micro_batch:
        return [inputs.micro_batch]
    eff = inputs.effective_batch
    return sorted({math.ceil(eff / k) for k in range(1, eff + 1)}, reverse=True)


def _choices(value: str) -> list[bool]:
    return {"on": [True], "off": [False]}.get(value, [False, True])


def _candidates(inputs: PlanInputs) -> list[tuple[int, bool, bool]]:
    # Cheapest first: a smaller micro-batch (same effective batch through accumulation) costs
    # little on a CPU; checkpointing recomputes every layer; offload adds disk I/O per step.
    return [
        (mb, ckpt, offload)
        for offload in _choices(inputs.offload_optimizer)
        for ckpt in _choices(inputs.checkpointing)
        for mb in _micro_batch_candidates(inputs)
    ]


def smallest_plan(shape: BaseShape, inputs: PlanInputs, *, seq_len: int | None = None) -> tuple[int, str]:
    """The lowest peak any plan the spec allows reaches (no smaller budget can run the job), and that plan."""
    est, mb, ckpt, offload = min(
        (estimate_peak_bytes(shape, inputs, mb, ckpt, offload_optimizer=offload, seq_len=seq_len), mb, ckpt, offload)
        for mb, ckpt, offload in _candidates(inputs)
    )
    return est, _describe(inputs, mb, ckpt, offload, seq_len)


def smallest_estimate(shape: BaseShape, inputs: PlanInputs, *, seq_len: int | None = None) -> int:
    """The lowest peak any plan the spec allows reaches."""
    return smallest_plan(shape, inputs, seq_len=seq_len)[0]


def _describe(inputs: PlanInputs, mb: int, ckpt: bool, offload: bool, seq_len: int | None) -> str:
    seq = min(seq_len or inputs.max_seq_len, inputs.max_seq_len)
    return (
        f"micro-batch {mb}, checkpointing {'on' if ckpt else 'off'}, "
        f"optimizer offload {'on' if offload else 'off'}, seq {seq}"
    )


def plan_memory(shape: BaseShape, inputs: PlanInputs, budget_bytes: int, *, seq_len: int | None = None) -> MemoryPlan:
    """Pick micro-batch, checkpointing and optimizer offload to fit the budget, or raise PlanDoesNotFit."""
    best: tuple[int, int, bool, bool] | None = None
    for mb, ckpt, offload in _candidates(inputs):
        est = estimate_peak_bytes(shape, inputs, mb, ckpt, offload_optimizer=offload, seq_len=seq_len)
        if est <= budget_bytes:
            return _plan(inputs, mb, ckpt, offload, est, budget_bytes)
        if best is None or est < best[0]:
            best = (est, mb, ckpt, offload)
    assert best is not None
    est, mb, ckpt, offload = best
    raise PlanDoesNotFit(est, budget_bytes, _describe(inputs, mb, ckpt, offload, seq_len))


def _plan(inputs: PlanInputs, mb: int, ckpt: bool, offload: bool, est: int, budget: int) -> MemoryPlan:
    notes: list[str] = []
    if mb < inputs.effective_batch:
        notes.append(f"micro-batch {mb} x {math.ceil(inputs.effective_batch / mb)} accumulation")
    if ckpt:
        notes.append("gradient checkpointing on")
    if offload:
        notes.append("optimizer state offloaded to disk")
    return MemoryPlan(
        micro_batch=mb,
        grad_accum=math.ceil(inputs.effective_batch / mb),
        checkpointing=ckpt,
        offload_optimizer=offload,
        estimate_bytes=est,
        budget_bytes=budget,
        notes=notes,
    )
