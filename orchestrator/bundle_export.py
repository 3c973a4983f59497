"""Export a base model into a runtime bundle: onnxruntime-genai's graph with LoRA left open.

onnxruntime-genai's model builder writes a graph ready for its runtime (int4 MatMulNBits
weights, GroupQueryAttention, KV cache), and with `adapter_path` it adds a LoRA branch
(x @ A @ B, added to the projection's output) for every module the adapter trains. Two steps
turn that into a bundle that serves any adapter without a rebuild:

1. The builder runs with a template adapter (zeros, written here from the base's safetensors
   headers: no torch in this process) and `nodes_to_exclude` naming every LoRA MatMul, so
   the LoRA weights stay float initializers instead of being quantized with the base.
2. Graph surgery (the `onnx` package): each LoRA initializer becomes a graph input with a
   symbolic rank dimension ([in, lora_r] and [lora_r, out]) whose default is a rank-0
   initializer, so a run without an adapter is the base model exactly.

The builder imports torch and transformers, so it runs in a child process; this module does
not. Only architectures tested end to end are accepted (Llama); the builder also mistakes any
linear layer as wide as the vocabulary for the LM head, which is refused up front.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters_store.fingerprint import model_fingerprint, read_safetensors_header
from adapters_store.runtime_bundle import (
    BUNDLE_MANIFEST_NAME,
    RANK_DIM,
    BundleManifest,
    BundleSettings,
    LoraInput,
)

SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM"})
# peft module name -> the builder's block name in node and initializer names.
_BLOCKS = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "o_proj": "attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_WEIGHT = re.compile(r"(?P<module>model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<proj>\w+))\.weight")
_LORA_INIT = re.compile(
    r"model\.layers\.(?P<layer>\d+)\.(?P<block>attn|mlp)\.(?P<proj>\w+)\.lora_(?P<part>[AB])\.MatMul\.weight"
)
_TEMPLATE_RANK = 4
_TOOLS = ("onnxruntime-genai", "onnxruntime", "onnx")

Progress = Callable[[str], None]


class ExportError(Exception):
    """The base cannot be exported (unsupported architecture, builder failure); says why."""


def resolve_targets(base_dir: Path, targets: tuple[str, ...]) -> tuple[str, ...]:
    """The bundle's LoRA targets: the given ones, or the product's defaults for the architecture."""
    from agent.training.arch import default_target_modules, read_config
    from agent.training.errors import TrainingError

    if targets:
        return tuple(targets)
    try:
        return tuple(default_target_modules(read_config(base_dir)))
    except TrainingError as exc:
        raise ExportError(str(exc)) from None


def _check_base(base_dir: Path, targets: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Return (config.json, {module path: [out, in]} of the targeted modules), or refuse the base."""
    try:
        config = json.loads((base_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{base_dir}: unreadable config.json: {exc}") from None
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"architecture {arch} has no runtime bundle export (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    unknown = sorted(set(targets) - set(_BLOCKS))
    if unknown:
        raise ExportError(f"LoRA targets {unknown} have no bundle input (supported: {', '.join(_BLOCKS)})")
    vocab = int(config.get("vocab_size", 0))
    modules: dict[str, list[int]] = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        for name, info in read_safetensors_header(path).items():
            m = _WEIGHT.fullmatch(name)
            shape = [int(d) for d in info["shape"]] if isinstance(info, dict) and "shape" in info else []
            if m is None or len(shape) != 2:
                continue
            if shape[0] == vocab:
                raise ExportError(
                    f"{name} is as wide as the vocabulary ({vocab}); the builder would take it for the LM head"
                )
            if m["proj"] in targets:
                modules[m["module"]] = shape
    if not modules:
        raise ExportError(f"{base_dir}: no weights of the target modules {list(targets)}")
    return config, modules


def _write_template(out: Path, base_dir: Path, targets: tuple[str, ...], modules: dict[str, list[int]]) -> None:
    """A zero LoRA adapter in peft's layout: it only tells the builder where the branches go."""
    import numpy as np
    from safetensors.numpy import save_file

    out.mkdir(parents=True)
    tensors = {}
    for module, (n_out, n_in) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.zeros((_TEMPLATE_RANK, n_in), np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.zeros((n_out, _TEMPLATE_RANK), np.float32)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": _TEMPLATE_RANK,
        "lora_alpha": _TEMPLATE_RANK,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config))


def _lora_node_names(layers: int) -> list[str]:
    # Every LoRA MatMul the builder can make; names of modules not targeted are harmless.
    return [
        f"/model/layers.{i}/{block}/{proj}/lora_{part}/MatMul"
        for i in range(layers)
        for proj, block in _BLOCKS.items()
        for part in "AB"
    ]


def _run_builder(
    base_dir: Path, raw: Path, template: Path, precision: str, layers: int, work: Path, progress: Progress
) -> None:
    """Run the model builder in a child process; ExportError with its log tail on failure."""
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(base_dir),
        "-o",
        str(raw),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(work / "cache"),
        "--extra_options",
        f"adapter_path={template}",
        "nodes_to_exclude=" + ",".join(_lora_node_names(layers)),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log_path = work / "builder.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            m = re.match(r"Reading layer (\d+)", line)
            if m:
                progress(f"exporting layer {int(m[1]) + 1}/{layers}")
        code = proc.wait()
    if code != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        raise ExportError(f"the model builder exited with {code}:\n{tail}")


def _open_lora_inputs(raw: Path, out: Path, modules: dict[str, list[int]]) -> list[LoraInput]:
    """Turn the LoRA initializers into inputs with a symbolic rank and rank-0 defaults."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(raw / "model.onnx"))
    by_layer_proj = {
        (int(m["layer"]), m["proj"]): module for module in modules if (m := _WEIGHT.fullmatch(module + ".weight"))
    }
    inputs: list[LoraInput] = []
    for init in model.graph.initializer:
        m = _LORA_INIT.fullmatch(init.name)
        if m is None:
            if ".lora_" in init.name:
                raise ExportError(f"LoRA weight {init.name} was quantized; the bundle needs it float")
            continue
        module = by_layer_proj.get((int(m["layer"]), m["proj"]))
        if module is None:
            raise ExportError(f"graph has LoRA weight {init.name} for no targeted module")
        rows, cols = list(init.dims)
        part = m["part"]
        dim = rows if part == "A" else cols
        zero = np.zeros((dim, 0) if part == "A" else (0, dim), np.float32)
        init.CopyFrom(numpy_helper.from_array(zero, init.name))
        shape: list[int | str] = [dim, RANK_DIM] if part == "A" else [RANK_DIM, dim]
        model.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, shape))
        inputs.append(LoraInput(name=init.name, module=module, part=part, dim=dim))
    if len(inputs) != 2 * len(modules):
        raise ExportError(f"expected {2 * len(modules)} LoRA weights in the graph, found {len(inputs)}")
    onnx.save(
        model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    return inputs


def _tool_versions() -> dict[str, str]:
    versions = {}
    for name in _TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def export_bundle(
    base_dir: Path,
    out_dir: Path,
    settings: BundleSettings,
    *,
    base_model_id: str,
    progress: Progress | None = None,
) -> BundleManifest:
    """Export `base_dir` into the bundle folder `out_dir` (created, must not exist)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    say = progress or (lambda _msg: None)
    targets = resolve_targets(base_dir, settings.targets)
    settings = BundleSettings(precision=settings.precision, targets=targets, max_rank=settings.max_rank)
    config, modules = _check_base(base_dir, targets)
    layers = int(config.get("num_hidden_layers", 0))
    with tempfile.TemporaryDirectory(prefix="pocketlora-export-") as tmp:
        work = Path(tmp)
        _write_template(work / "template", base_dir, targets, modules)
        say(f"exporting {base_model_id} ({settings.precision}, LoRA on {', '.join(targets)})")
        _run_builder(base_dir, work / "raw", work / "template", settings.precision, layers, work, say)
        say("opening the LoRA inputs")
        out_dir.mkdir(parents=True)
        inputs = _open_lora_inputs(work / "raw", out_dir, modules)
        for path in sorted((work / "raw").iterdir()):
            if path.is_file() and not path.name.startswith("model.onnx"):
                shutil.copy2(path, out_dir / path.name)
    manifest = BundleManifest(
        base_model_id=base_model_id,
        base_fingerprint=model_fingerprint(base_dir),
        settings=settings,
        lora_inputs=inputs,
        tools=_tool_versions(),
    )
    (out_dir / BUNDLE_MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest
