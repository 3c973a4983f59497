"""Runtime bundles of a tiny Llama and LoRA adapters for it, built once per test session.

The tiny Llama comes from tests.support.tiny_models (hidden 64: every linear output a multiple
of 32, and none as wide as the 512-token vocabulary, which onnxruntime-genai's builder would
take for the LM head). Adapters are real peft LoRAs with random A and B (init_lora_weights=False)
so each one moves the outputs somewhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters_store import AdapterManifest, BlobInfo, model_fingerprint, pack_adapter

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_lora(
    base: Path,
    out: Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: float = 16,
    targets: tuple[str, ...] = LLAMA_TARGETS,
    **config: Any,
) -> Path:
    """Save a peft LoRA with random (non-zero) A and B for `base` into `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **config,
    )
    get_peft_model(model, lora).save_pretrained(out)
    return out


def pack_lora(adapter_dir: Path, base: Path, out: Path, *, rank: int = 8, alpha: float = 16, **fields: Any) -> BlobInfo:
    """Pack a peft folder into a PocketLoRA blob whose manifest names `base`'s fingerprint."""
    values: dict[str, Any] = {
        "adapter_name": adapter_dir.name,
        "base_model_id": "tiny",
        "base_fingerprint": model_fingerprint(base),
        "rank": rank,
        "alpha": float(alpha),
        "target_modules": list(LLAMA_TARGETS),
        "dataset_sha256": "cd" * 32,
        "metrics": {},
        "training": {},
        "device_id": "dev-1",
        "job_id": "job-1",
        "attempt": 1,
        "created_at": "2026-11-30T00:00:00+00:00",
    }
    values.update(fields)
    return pack_adapter(adapter_dir, AdapterManifest(**values), out)


@dataclass
class TinyBundle:
    """A tiny Llama, its fp32 runtime bundle, three adapters (peft folders, blobs, .onnx_adapter folders)."""

    base: Path
    bundle: Path
    peft: dict[str, Path] = field(default_factory=dict)
    blobs: dict[str, Path] = field(default_factory=dict)
    forms: dict[str, Path] = field(default_factory=dict)


def build_tiny_bundle(root: Path) -> TinyBundle:
    """Export the bundle and convert three adapters (about 20 s, mostly the builder's imports)."""
    import json

    from adapters_store.onnx_adapter import FORM_NAME, convert_adapter
    from adapters_store.runtime_bundle import BundleSettings
    from orchestrator.bundle_export import export_bundle
    from tests.support.tiny_models import make_tiny_llama

    base = make_tiny_llama(root / "base", hidden=64, layers=2)
    manifest = export_bundle(base, root / "bundle", BundleSettings(precision="fp32"), base_model_id="tiny")
    tiny = TinyBundle(base=base, bundle=root / "bundle")
    for seed, name in enumerate(("alpha", "beta", "gamma"), start=1):
        tiny.peft[name] = make_lora(base, root / "peft" / name, seed=seed)
        tiny.blobs[name] = root / "blobs" / f"{name}.safetensors"
        tiny.blobs[name].parent.mkdir(parents=True, exist_ok=True)
        pack_lora(tiny.peft[name], base, tiny.blobs[name])
        folder = root / "forms" / name
        folder.mkdir(parents=True)
        info = convert_adapter(tiny.blobs[name], manifest, folder / FORM_NAME)
        (folder / "manifest.json").write_text(json.dumps(info.to_dict()))
        tiny.forms[name] = folder
    return tiny
