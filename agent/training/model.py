"""Load a base model for LoRA training: NF4 4-bit (QLoRA) when possible, fp32 otherwise.

Worker-side only: imports torch, transformers, peft and (lazily) bitsandbytes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapters_store.memory_plan import resolve_precision
from agent.training.arch import arch_name, read_config, resolve_targets
from agent.training.errors import IncompatibleBase, Unsupported4Bit
from agent.training.heap import trim_heap
from agent.training.precision import cpu_has_native_bf16
from agent.training.spec import TrainingSpec

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class LoadedModel:
    """A peft-wrapped model ready to train, its tokenizer and how it was loaded."""

    model: Any
    tokenizer: Any
    quantized: bool
    target_modules: list[str]
    compute_dtype: str
    notes: list[str] = field(default_factory=list)


def disable_bnb_cpu_repack(model: Any) -> int:
    """Turn off bitsandbytes' in-place CPU weight repack on every Linear4bit; return the count."""
    # Trap (docs/platform.md, bitsandbytes 0.50.2): on CPUs with AVX512-BF16/AMX, the first
    # eval-mode no-grad forward of a Linear4bit (generate(), an eval loop) repacks its weight in
    # place for a fast inference kernel that has no autograd. Every later backward through that
    # layer silently yields no gradients for the LoRA weights ("gemv_4bit: an autograd kernel
    # was not registered") and the loss goes flat. A model that is trained must never repack.
    from bitsandbytes.nn.modules import Linear4bit

    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def _own_unquantized_params(model: Any) -> None:
    """Copy the parameters NF4 left in fp32 out of the safetensors memory map."""
    # The unquantized tensors (embeddings, norms, lm_head) are views into the mmap of the fp32
    # checkpoint; while any view lives, every page quantization touched stays resident: the
    # whole fp32 file on top of its 4-bit copy. Owning them releases it.
    from bitsandbytes.nn.modules import Params4bit

    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not isinstance(p, Params4bit):
                p.data = p.data.clone()


def probe_4bit() -> str | None:
    """Return why NF4 is unusable here, or None when a small quantize/dequantize round trip works."""
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # an ImportError or a broken native library: both mean "no 4-bit"
        return f"bitsandbytes unavailable: {type(exc).__name__}: {exc}"
    try:
        w = torch.randn(64, 64)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        back = bnbf.dequantize_4bit(q, state)
        if back.shape != w.shape or not torch.isfinite(back).all():
            return "bitsandbytes NF4 round trip returned a bad tensor"
    except Exception as exc:  # any failure of the native kernels means this CPU cannot do NF4
        return f"bitsandbytes NF4 quantization failed: {type(exc).__name__}: {exc}"
    return None


def decide_quantization(spec: TrainingSpec) -> tuple[bool, str | None]:
    """Return (use NF4, why not when falling back); raise Unsupported4Bit when fallback is refused."""
    if spec.quantization != "nf4":
        return False, None
    reason = probe_4bit()
    if reason is None:
        return True, None
    if spec.on_4bit_unsupported == "fail":
        raise Unsupported4Bit(f"NF4 requested but unsupported on this device: {reason}")
    log.warning("falling back to fp32 LoRA: %s", reason)
    return False, f"NF4 unavailable, trained fp32 LoRA instead: {reason}"


def load_tokenizer(model_dir: str | Path) -> Any:
    """Load the base model's tokenizer, with a pad token for batching."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_nf4(spec: TrainingSpec, compute: torch.dtype, cache_dir: str | Path | None, notes: list[str]) -> Any:
    """Load the base in NF4: from its pre-quantized copy when one can be made, else on the fly."""
    from transformers import AutoModelForCausalLM

    from agent.training.quantized import QuantizedCopyUnsupported, bnb_config, ensure_nf4_copy

    try:
        copy = ensure_nf4_copy(
            spec.base_model_dir,
            double_quant=spec.double_quant,
            compute_dtype=compute,
            fallback_dir=cache_dir,
        )
    except QuantizedCopyUnsupported as exc:
        log.warning("quantizing while loading (higher peak memory): %s", exc)
        notes.append(f"NF4 quantized while loading: {exc}")
        model = AutoModelForCausalLM.from_pretrained(
            spec.base_model_dir,
            dtype=torch.float32,
            quantization_config=bnb_config(spec.double_quant, compute),
        )
        _own_unquantized_params(model)
    else:
        # The copy holds exactly the tensors training reads (4-bit linears, fp32 rest): its
        # memory map is the model's memory, with no fp32 checkpoint behind it to page in.
        model = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32)
    n = disable_bnb_cpu_repack(model)
    notes.append(f"NF4 on {n} linear layers, CPU repack disabled")
    return model


def load_for_training(
    spec: TrainingSpec,
    *,
    checkpointing: bool,
    quantize: bool | None = None,
    precision: str | None = None,
    tokenizer: Any = None,
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load the base (NF4 or fp32), freeze it, wrap it in LoRA and return it in train mode.

    quantize=None decides from the spec (probing bitsandbytes, falling back or failing);
    precision=None resolves the spec's mixed_precision for this CPU (agent.training.precision).
    NF4 loads from a pre-quantized copy kept next to the base (agent.training.quantized), or in
    cache_dir when the base folder is read-only.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = Path(spec.base_model_dir)
    config = read_config(base)
    targets = resolve_targets(spec.target_modules, config)
    notes: list[str] = []
    if precision is None:
        precision, note = resolve_precision(spec.mixed_precision, native_bf16=cpu_has_native_bf16())
        if note:
            notes.append(note)
    # The weights stay fp32 (NF4 linears dequantize to the compute dtype); bf16 is autocast's.
    compute = torch.bfloat16 if precision == "bf16" else torch.float32

    if quantize is None:
        quantize, reason = decide_quantization(spec)
        if reason:
            notes.append(reason)
    model: Any = None
    if quantize:
        model = _load_nf4(spec, compute, cache_dir, notes)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        # Non-reentrant checkpointing gives LoRA grads without forcing grads on the inputs.
        kwargs_ckpt = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs_ckpt)
        else:  # the name before transformers 5.2x
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs_ckpt)

    if tokenizer is None:
        tokenizer = load_tokenizer(base)

    lora = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft accepts float scaling
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores weights transposed; bitsandbytes turns them into plain Linear4bit.
        fan_in_fan_out=config.get("model_type") == "gpt2" and not quantize,
    )
    # Same seed, same LoRA init: a job restarted from scratch starts from identical weights.
    torch.manual_seed(spec.seed)
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise IncompatibleBase(f"{arch_name(config)} has no modules {targets}: {exc}") from exc
        raise
    model.train()
    trim_heap()  # hand the loader's freed scratch back before training allocates
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        quantized=quantize,
        target_modules=targets,
        compute_dtype=str(compute).removeprefix("torch."),
        notes=notes,
    )


def base_linear_bytes(model: Any) -> tuple[int, int]:
    """Return (bytes, parameter count) of the base linear layers that NF4 would quantize."""
    linear4: tuple[type, ...] = ()
    try:
        from bitsandbytes.nn.modules import Linear4bit

        linear4 = (Linear4bit,)
    except Exception:  # no bitsandbytes: only fp32 linears can exist
        pass
    total = params = 0
    for name, module in model.named_modules():
        # lm_head stays unquantized under NF4 and LoRA layers are not base weights.
        if "lora_" in name or name.endswith("lm_head"):
            continue
        if linear4 and isinstance(module, linear4):
            w = getattr(module, "weight")  # noqa: B009 - typed as object by the isinstance
            qs = getattr(w, "quant_state", None)
            if qs is None:
                continue
            total += w.numel() * w.element_size() + _quant_state_bytes(qs)
            params += int(torch.Size(qs.shape).numel())
        elif type(module) is torch.nn.Linear:
            total += module.weight.numel() * module.weight.element_size()
            params += module.weight.numel()
    return total, params


def _quant_state_bytes(qs: Any) -> int:
    n = qs.absmax.numel() * qs.absmax.element_size()
    if getattr(qs, "state2", None) is not None:
        n += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        n += qs.state2.code.numel() * qs.state2.code.element_size()
    return int(n)
