"""Architecture facts read from config.json: default LoRA targets and the shapes memory needs.

Torch-free: the memory planner and the agent use it before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.training.errors import IncompatibleBase, Unsupported

# Separate q/k/v/o projections (Llama and its descendants).
LLAMA_STYLE = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "olmo",
        "olmo2",
        "granite",
        "smollm3",
    }
)
# One fused Conv1D for q/k/v.
GPT2_STYLE = frozenset({"gpt2"})
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
GPT2_TARGETS = ["c_attn"]

# Logit bytes per chunk (128 tokens for SmolLM2's 49152-token vocabulary). Every chunk reads
# the whole output matrix again, so chunks much smaller than this cost step time, and much
# larger ones give back the memory chunking saves.
CHUNK_LOGIT_BYTES = 24 * 2**20
# Model types whose *ForCausalLM forward is lm_head(decoder(...).last_hidden_state).
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "smollm3", "gpt2"})
# Config fields that, when set, put something between the hidden states and the logits.
_HEAD_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping")


def chunk_tokens(vocab: int) -> int:
    """Return how many tokens one loss chunk holds for a vocabulary size."""
    return max(1, CHUNK_LOGIT_BYTES // (4 * max(1, vocab)))


def supports_chunked_loss(config: dict[str, Any]) -> bool:
    """Whether the chunked loss applies to a model with this config.json (torch-free check)."""
    if str(config.get("model_type", "")) not in PLAIN_HEAD_TYPES:
        return False
    return not any(config.get(k) for k in _HEAD_MODIFIERS)


@dataclass(frozen=True)
class ArchInfo:
    """The shapes of a decoder-only transformer that drive its training memory."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """Load a model folder's config.json, raising IncompatibleBase when absent or unreadable."""
    path = Path(model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise IncompatibleBase(f"{model_dir}: not a model folder (no config.json)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise IncompatibleBase(f"{path}: unreadable model config: {exc}") from exc
    if not isinstance(data, dict):
        raise IncompatibleBase(f"{path}: model config is not a JSON object")
    return data


def arch_name(config: dict[str, Any]) -> str:
    """Return a readable architecture name (class name, else model_type)."""
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else str(config.get("model_type", "unknown"))


def default_target_modules(config: dict[str, Any]) -> list[str]:
    """Return the LoRA target modules for this architecture, or raise Unsupported naming it."""
    model_type = str(config.get("model_type", ""))
    if model_type in LLAMA_STYLE:
        return list(LLAMA_TARGETS)
    if model_type in GPT2_STYLE:
        return list(GPT2_TARGETS)
    raise Unsupported(
        f"no default LoRA target modules for architecture {arch_name(config)} "
        f"(model_type {model_type!r}); set target_modules in the spec"
    )


def arch_info(config: dict[str, Any]) -> ArchInfo:
    """Extract layer count, widths and vocabulary from a Llama- or GPT-2-style config."""

    def pick(*names: str, default: Any = None) -> Any:
        for n in names:
            if config.get(n) is not None:
                return config[n]
        if default is None:
            raise IncompatibleBase(f"config.json has none of {', '.join(names)}")
        return default

    hidden = int(pick("hidden_size", "n_embd", "d_model"))
    heads = int(pick("num_attention_heads", "n_head"))
    return ArchInfo(
        model_type=str(config.get("model_type", "unknown")),
        layers=int(pick("num_hidden_layers", "n_layer")),
        hidden=hidden,
        intermediate=int(pick("intermediate_size", "n_inner", default=4 * hidden)),
        heads=heads,
        kv_heads=int(pick("num_key_value_heads", default=heads)),
        vocab=int(pick("vocab_size")),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def resolve_targets(target_modules: list[str] | None, config: dict[str, Any]) -> list[str]:
    """Return the spec's target modules, or the architecture's defaults when unset."""
    return list(target_modules) if target_modules else default_target_modules(config)
