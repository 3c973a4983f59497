"""TrainingSpec: the typed, validated description of one LoRA/QLoRA training job.

Torch-free: the idle agent builds, validates and writes specs; the worker reads them back.
The spec is copied verbatim into the adapter's training manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from agent.training.errors import SpecError

QUANTIZATIONS = ("nf4", "none")
ON_4BIT_UNSUPPORTED = ("fallback", "fail")
TRI_STATE = ("auto", "on", "off")
MIXED_PRECISIONS = ("auto", "fp32", "bf16")

# Fields that change the training math: a checkpoint only resumes a job whose values match.
# The rest (micro_batch, checkpoint cadence, threads, budget, ...) may change between runs.
IDENTITY_FIELDS = (
    "base_model_dir",
    "dataset_path",
    "rank",
    "alpha",
    "dropout",
    "target_modules",
    "quantization",
    "double_quant",
    "learning_rate",
    "effective_batch",
    "epochs",
    "max_steps",
    "max_seq_len",
    "mixed_precision",
    "seed",
)


@dataclass
class TrainingSpec:
    """One training job: base model, data, LoRA shape, optimisation and resource settings."""

    base_model_dir: str
    dataset_path: str
    output_dir: str
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    # None: chosen by architecture (Llama-style q/k/v/o_proj, GPT-2-style c_attn).
    target_modules: list[str] | None = None
    quantization: str = "nf4"
    double_quant: bool = True
    on_4bit_unsupported: str = "fallback"
    learning_rate: float = 2e-4
    effective_batch: int = 8
    # 0: planned from the memory budget.
    micro_batch: int = 0
    epochs: int = 1
    # 0: derived from epochs. One step is one optimizer step (effective_batch examples).
    max_steps: int = 0
    max_seq_len: int = 256
    gradient_checkpointing: str = "auto"
    mixed_precision: str = "auto"
    seed: int = 0
    checkpoint_every_steps: int = 10
    checkpoint_every_s: float = 60
    # 0: psutil's available RAM when the job starts.
    memory_budget_mb: int = 0
    # 0: one thread, so training stays a background job on a phone-class CPU.
    torch_threads: int = 0
    offload_optimizer: str = "auto"
    # Share of the records held out of training to measure the base and the adapter on (0-0.5).
    eval_share: float = 0.0

    def __post_init__(self) -> None:
        _check_str(self, "base_model_dir", nonempty=True)
        _check_str(self, "dataset_path", nonempty=True)
        _check_str(self, "output_dir", nonempty=True)
        _check_int(self, "rank", minimum=1)
        _check_float(self, "alpha", minimum=0, exclusive=True)
        _check_float(self, "dropout", minimum=0)
        if self.dropout >= 1:
            raise SpecError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            ok = isinstance(self.target_modules, list) and all(isinstance(m, str) and m for m in self.target_modules)
            if not ok or not self.target_modules:
                raise SpecError(
                    f"target_modules must be null or a non-empty list of module names, got {self.target_modules!r}"
                )
        _check_choice(self, "quantization", QUANTIZATIONS)
        _check_bool(self, "double_quant")
        _check_choice(self, "on_4bit_unsupported", ON_4BIT_UNSUPPORTED)
        _check_float(self, "learning_rate", minimum=0, exclusive=True)
        _check_int(self, "effective_batch", minimum=1)
        _check_int(self, "micro_batch", minimum=0)
        if self.micro_batch > self.effective_batch:
            raise SpecError(
                f"micro_batch must be <= effective_batch ({self.effective_batch}), got {self.micro_batch!r}"
            )
        _check_int(self, "epochs", minimum=1)
        _check_int(self, "max_steps", minimum=0)
        _check_int(self, "max_seq_len", minimum=2)
        _check_choice(self, "gradient_checkpointing", TRI_STATE)
        _check_choice(self, "mixed_precision", MIXED_PRECISIONS)
        _check_int(self, "seed", minimum=0)
        _check_int(self, "checkpoint_every_steps", minimum=0)
        _check_float(self, "checkpoint_every_s", minimum=0)
        _check_int(self, "memory_budget_mb", minimum=0)
        _check_int(self, "torch_threads", minimum=0)
        _check_choice(self, "offload_optimizer", TRI_STATE)
        _check_float(self, "eval_share", minimum=0)
        if self.eval_share > 0.5:
            raise SpecError(f"eval_share must be in [0, 0.5], got {self.eval_share!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a JSON-ready dict."""
        out = dataclasses.asdict(self)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSpec:
        """Build a spec from a dict, refusing unknown keys and missing required fields."""
        if not isinstance(data, dict):
            raise SpecError(f"a training spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown training spec field(s): {', '.join(unknown)}")
        missing = [n for n in ("base_model_dir", "dataset_path", "output_dir") if n not in data]
        if missing:
            raise SpecError(f"missing required training spec field(s): {', '.join(missing)}")
        try:
            return cls(**data)
        except TypeError as exc:  # only reachable for malformed keyword sets
            raise SpecError(f"bad training spec: {exc}") from exc

    def to_json(self) -> str:
        """Serialise the spec to a JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingSpec:
        """Parse a spec from JSON text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"training spec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def identity(self) -> dict[str, Any]:
        """Return the fields a checkpoint must agree on to be resumed."""
        d = self.to_dict()
        identity = {k: d[k] for k in IDENTITY_FIELDS}
        if self.eval_share:  # which records train; absent when none are held out, as before
            identity["eval_share"] = self.eval_share
        return identity


def _check_str(spec: TrainingSpec, name: str, *, nonempty: bool) -> None:
    value = getattr(spec, name)
    if not isinstance(value, str) or (nonempty and not value):
        raise SpecError(f"{name} must be a non-empty string, got {value!r}")


def _check_bool(spec: TrainingSpec, name: str) -> None:
    value = getattr(spec, name)
    if not isinstance(value, bool):
        raise SpecError(f"{name} must be true or false, got {value!r}")


def _check_int(spec: TrainingSpec, name: str, *, minimum: int) -> None:
    value = getattr(spec, name)
    # bool is an int subclass; `rank: true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(f"{name} must be >= {minimum}, got {value!r}")


def _check_float(spec: TrainingSpec, name: str, *, minimum: float, exclusive: bool = False) -> None:
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        op = ">" if exclusive else ">="
        raise SpecError(f"{name} must be {op} {minimum}, got {value!r}")
    setattr(spec, name, float(value))


def _check_choice(spec: TrainingSpec, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(spec, name)
    if value not in choices:
        raise SpecError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
