"""An adapter's runtime form: the peft safetensors blob converted to ONNX Runtime's .onnx_adapter.

ONNX Runtime's adapter format holds named tensors that override graph inputs at run time
(`onnxruntime.AdapterFormat`; onnxruntime-genai's `Adapters.load`). For a bundle
(adapters_store.runtime_bundle), each peft LoRA pair of module M becomes two tensors under the
bundle's input names: A transposed to [in, r], and B transposed to [r, out] with the LoRA scaling
(alpha / r, or alpha / sqrt(r) with rsLoRA) multiplied in, so the graph computes
x @ A @ B = scaling * (x @ A_peft.T @ B_peft.T), exactly peft's forward.

An adapter that trains fewer modules than the bundle opens (say q and v of q/k/v/o) gets zeros
of the same rank for the rest: every LoRA input of one run must share the rank dimension.
Refused, with the reason (IncompatibleForm): another base fingerprint, a module the bundle has
no input for, one rank per module (rank_pattern) or a rank above the bundle's max_rank, and
peft variants whose forward is not x @ A @ B (DoRA, LoRA bias, modules_to_save).

The safetensors blob stays the source of truth; conversion is deterministic, so a form can be
rebuilt from it at any time. numpy only (onnxruntime for writing): no torch.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters_store.blob import ensure_safetensors, read_blob_config, read_blob_manifest, sha256_file
from adapters_store.errors import AdapterFormatError, IncompatibleForm
from adapters_store.runtime_bundle import BundleManifest

FORM_NAME = "adapter.onnx_adapter"  # the file in a device's adapter folder
_PEFT_PREFIX = "base_model.model."
_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


@dataclass(frozen=True)
class FormInfo:
    """What a conversion produced: digest and size of the .onnx_adapter, rank, modules."""

    sha256: str
    size: int
    rank: int
    scaling: float
    modules: int  # LoRA modules the adapter trained
    zero_filled: int  # bundle modules the adapter does not train (zeros of its rank)
    base_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def read_tensors(path: Path) -> dict[str, Any]:
    """Read every tensor of a safetensors file as a float32 numpy array (F32, F16, BF16, F64)."""
    import numpy as np

    header = ensure_safetensors(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        data = f.read()[n:]
    out: dict[str, Any] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(str(info.get("dtype")))
        if dtype is None:
            raise AdapterFormatError(f"{Path(path).name}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
        start, stop = info["data_offsets"]
        arr = np.frombuffer(data[start:stop], dtype=dtype).reshape([int(d) for d in info["shape"]])
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.astype(np.float32)
    return out


def _peft_pairs(tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Group peft keys into {module path: {"A": array, "B": array}}; refuse anything else."""
    pairs: dict[str, dict[str, Any]] = {}
    for key, arr in tensors.items():
        body = key.removeprefix(_PEFT_PREFIX)
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if body.endswith(suffix):
                pairs.setdefault(body.removesuffix(suffix), {})[part] = arr
                break
        else:
            raise IncompatibleForm(f"tensor {key!r} is not a LoRA A/B weight (DoRA, bias or a saved module?)")
    for module, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise IncompatibleForm(f"module {module!r} has lora_{next(iter(parts))} without its pair")
    return pairs


def _check_config(config: Mapping[str, Any], bundle: BundleManifest) -> tuple[int, float]:
    """Return (rank, scaling) of a peft LoRA config this bundle can serve, else refuse."""
    if config.get("peft_type", "LORA") != "LORA":
        raise IncompatibleForm(f"peft_type {config.get('peft_type')!r}: only LORA adapters have this form")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise IncompatibleForm(f"{flag} is set: the bundle's graph computes plain LoRA (x @ A @ B)")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise IncompatibleForm("the adapter trains biases or whole modules; the bundle opens only LoRA A/B inputs")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise IncompatibleForm("per-module ranks or alphas (rank_pattern/alpha_pattern): the bundle has one rank")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise IncompatibleForm(f"adapter_config r must be a positive int, got {r!r}")
    if r > bundle.settings.max_rank:
        raise IncompatibleForm(f"rank {r} is above the bundle's max_rank {bundle.settings.max_rank}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise IncompatibleForm(f"adapter_config lora_alpha must be a number, got {alpha!r}")
    scaling = float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)
    return r, scaling


def form_tensors(
    config: Mapping[str, Any], tensors: Mapping[str, Any], bundle: BundleManifest
) -> tuple[dict[str, Any], int, float, int]:
    """Map peft tensors onto the bundle's inputs; returns (inputs, rank, scaling, zero-filled count)."""
    import numpy as np

    rank, scaling = _check_config(config, bundle)
    pairs = _peft_pairs(tensors)
    modules = bundle.modules()
    unknown = sorted(set(pairs) - set(modules))
    if unknown:
        targets = ", ".join(bundle.settings.targets)
        raise IncompatibleForm(
            f"the bundle (targets {targets}) has no LoRA input for {unknown[:3]} ({len(unknown)} modules)"
        )
    out: dict[str, Any] = {}
    for module, inputs in modules.items():
        a_in, b_in = inputs["A"], inputs["B"]
        if module not in pairs:
            out[a_in.name] = np.zeros(a_in.shape(rank), np.float32)
            out[b_in.name] = np.zeros(b_in.shape(rank), np.float32)
            continue
        a, b = pairs[module]["A"], pairs[module]["B"]  # peft: A [r, in], B [out, r]
        if a.shape != (rank, a_in.dim) or b.shape != (b_in.dim, rank):
            raise IncompatibleForm(
                f"module {module!r}: A {list(a.shape)} / B {list(b.shape)} do not fit rank {rank} "
                f"and the bundle's [{a_in.dim} in, {b_in.dim} out]"
            )
        out[a_in.name] = np.ascontiguousarray(a.T)
        out[b_in.name] = np.ascontiguousarray((b * np.float32(scaling)).T)
    return out, rank, scaling, len(modules) - len(pairs)


def convert_adapter(blob: Path, bundle: BundleManifest, out: Path) -> FormInfo:
    """Convert a PocketLoRA adapter blob to an .onnx_adapter for `bundle` at `out`."""
    import onnxruntime as ort

    manifest = read_blob_manifest(blob)
    if manifest.base_fingerprint.removeprefix("sha256:") != bundle.base_fingerprint.removeprefix("sha256:"):
        raise IncompatibleForm(
            f"adapter was trained on base {manifest.base_fingerprint}, the bundle serves {bundle.base_fingerprint}"
        )
    config = read_blob_config(blob)
    tensors, rank, scaling, filled = form_tensors(config, read_tensors(blob), bundle)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in tensors.items()})
    fmt.export_adapter(str(out))
    return FormInfo(
        sha256=sha256_file(out),
        size=Path(out).stat().st_size,
        rank=rank,
        scaling=scaling,
        modules=len(bundle.modules()) - filled,
        zero_filled=filled,
        base_fingerprint=bundle.base_fingerprint,
    )


def check_form(shapes: Mapping[str, tuple[int, ...]], bundle: BundleManifest) -> int:
    """Check an .onnx_adapter's tensor shapes against a bundle; return its rank (device side)."""
    inputs = {inp.name: inp for inp in bundle.lora_inputs}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise IncompatibleForm(f"tensors {unknown[:3]} are not LoRA inputs of this bundle")
    missing = sorted(set(inputs) - set(shapes))
    if missing:
        raise IncompatibleForm(f"the adapter lacks {len(missing)} LoRA inputs of this bundle, e.g. {missing[0]!r}")
    ranks = {tuple(shape)[1 if inputs[name].part == "A" else 0] for name, shape in shapes.items()}
    if len(ranks) != 1:
        raise IncompatibleForm(f"LoRA inputs disagree on the rank ({sorted(ranks)}); the bundle has one rank")
    rank = ranks.pop()
    if not 0 < rank <= bundle.settings.max_rank:
        raise IncompatibleForm(f"rank {rank} is outside 1..{bundle.settings.max_rank}")
    for name, shape in shapes.items():
        if tuple(shape) != inputs[name].shape(rank):
            raise IncompatibleForm(
                f"tensor {name!r} has shape {list(shape)}, expected {list(inputs[name].shape(rank))}"
            )
    return int(rank)


def form_manifest(adapter_sha256: str, bundle_sha256: str, info: FormInfo | None, refused: str = "") -> str:
    """The JSON stored beside a form (or in its place, saying why there is none)."""
    body: dict[str, Any] = {"adapter_sha256": adapter_sha256, "bundle_sha256": bundle_sha256, "format": "onnx_adapter"}
    if info is None:
        body.update(status="refused", reason=refused)
    else:
        body.update(status="ok", **info.to_dict())
    return json.dumps(body, sort_keys=True)
