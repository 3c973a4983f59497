"""The device's side of memory planning: describe the base model, plan a TrainingSpec against it.

Torch-free: the agent can refuse a job (DoesNotFit) before it starts a child process, and sends
its base's shape at enrollment so the orchestrator plans with the same numbers. The estimate
and the planner themselves live in adapters_store.memory_plan, shared with the orchestrator;
this module reads config.json and safetensors headers into a BaseShape and maps a TrainingSpec
onto the planner's inputs. The model is never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters_store.memory_plan import (
    MB,
    BaseShape,
    MemoryPlan,
    PlanDoesNotFit,
    PlanInputs,
    tally_weights,
)
from adapters_store.memory_plan import estimate_peak_bytes as _estimate
from adapters_store.memory_plan import plan_memory as _plan
from agent.training.arch import arch_info, default_target_modules, read_config, supports_chunked_loss
from agent.training.errors import DoesNotFit, IncompatibleBase, Unsupported
from agent.training.heap import training_allocator
from agent.training.spec import TrainingSpec

__all__ = ["MB", "MemoryPlan", "WeightStats", "base_shape", "estimate_peak_bytes", "plan_memory", "weight_stats"]


@dataclass(frozen=True)
class WeightStats:
    """Parameter counts and checkpoint bytes of a model folder, from safetensors headers."""

    linear_params: int
    other_params: int
    file_bytes: int
    lora_params: int


def base_shape(model_dir: str | Path) -> BaseShape:
    """Describe a model folder for the planner, from config.json and safetensors headers."""
    config = read_config(model_dir)
    arch = arch_info(config)
    try:
        tally = tally_weights(model_dir)
    except FileNotFoundError as exc:
        raise IncompatibleBase(str(exc)) from exc
    try:
        defaults = tuple(default_target_modules(config))
    except Unsupported:
        defaults = ()  # jobs on this base must name their targets
    return BaseShape(
        model_type=arch.model_type,
        layers=arch.layers,
        hidden=arch.hidden,
        intermediate=arch.intermediate,
        vocab=arch.vocab,
        chunked_loss=supports_chunked_loss(config),
        linear_params=tally.linear_params,
        other_params=tally.other_params,
        file_bytes=tally.file_bytes,
        lora_dims=tally.lora_dims,
        default_targets=defaults,
    )


def _targets(shape: BaseShape, spec: TrainingSpec, model_dir: str | Path) -> tuple[str, ...]:
    if spec.target_modules:
        return tuple(spec.target_modules)
    if not shape.default_targets:
        default_target_modules(read_config(model_dir))  # raises Unsupported naming the architecture
    return shape.default_targets


def plan_inputs(spec: TrainingSpec, targets: tuple[str, ...] | None = None) -> PlanInputs:
    """The planner's view of a spec; mixed_precision must already be resolved to fp32 or bf16."""
    return PlanInputs(
        rank=spec.rank,
        targets=targets if targets is not None else (tuple(spec.target_modules) if spec.target_modules else None),
        nf4=spec.quantization == "nf4",
        double_quant=spec.double_quant,
        bf16=spec.mixed_precision == "bf16",
        max_seq_len=spec.max_seq_len,
        effective_batch=spec.effective_batch,
        micro_batch=spec.micro_batch,
        checkpointing=spec.gradient_checkpointing,
        offload_optimizer=spec.offload_optimizer,
        allocator=training_allocator(),
    )


def weight_stats(model_dir: str | Path, targets: list[str], rank: int) -> WeightStats:
    """Count linear and other parameters and the LoRA parameters for the target modules."""
    try:
        tally = tally_weights(model_dir)
    except FileNotFoundError as exc:
        raise IncompatibleBase(str(exc)) from exc
    lora = rank * sum(tally.lora_dims.get(t, 0) for t in set(targets))
    return WeightStats(tally.linear_params, tally.other_params, tally.file_bytes, lora)


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
    shape = base_shape(model_dir)
    inputs = plan_inputs(spec, _targets(shape, spec, model_dir))
    return _estimate(shape, inputs, micro_batch, checkpointing, offload_optimizer=offload_optimizer, seq_len=seq_len)


def plan_memory(
    model_dir: str | Path,
    spec: TrainingSpec,
    budget_bytes: int,
    *,
    seq_len: int | None = None,
) -> MemoryPlan:
    """Pick micro-batch, checkpointing and optimizer offload to fit the budget, or raise DoesNotFit."""
    shape = base_shape(model_dir)
    try:
        return _plan(shape, plan_inputs(spec, _targets(shape, spec, model_dir)), budget_bytes, seq_len=seq_len)
    except PlanDoesNotFit as exc:
        raise DoesNotFit(f"training {Path(model_dir).name} {exc}") from None
