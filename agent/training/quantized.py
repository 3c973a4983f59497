"""A pre-quantized NF4 copy of a base model, written by streaming: low peak memory, same weights.

Why: loading an fp32 checkpoint with a bitsandbytes quantization config memory-maps the whole
file and quantizes tensor by tensor; every page it touched stays resident until the map goes,
so the load peaks at the fp32 file plus its 4-bit copy (~1.1 GB for SmolLM2-135M, more than the
NF4 training step itself). Here each fp32 tensor is read with plain file reads (page cache, not
this process's RSS), quantized with the very call transformers makes (Params4bit on CPU), and
only the small 4-bit results are kept. They are written as a safetensors file in the layout
transformers' save_pretrained gives a bnb 4-bit model, next to a config.json carrying the
quantization config, so from_pretrained(copy) loads it as a pre-quantized model.

The copy is bit-identical to quantizing on the fly (tests compare the loaded models); it is
cached next to the base (BASE/.pocketlora/nf4-...) or, when the base folder is read-only, in a
fallback folder, and a marker written last ties it to the exact source files (names, sizes,
mtimes) and library versions. Safetensors and JSON only: nothing here unpickles.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import torch

from adapters_store.fingerprint import read_safetensors_header
from agent.training.heap import trim_heap

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "pocketlora-nf4.json"
_CACHE_PARENT = ".pocketlora"
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_COPY_CHUNK = 8 * 2**20


class QuantizedCopyUnsupported(RuntimeError):
    """This base cannot be pre-quantized by streaming; quantize it on the fly instead."""


def bnb_config(double_quant: bool, compute_dtype: torch.dtype) -> Any:
    """Return the BitsAndBytesConfig the product trains with (NF4)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def variant_name(double_quant: bool, compute_dtype: torch.dtype) -> str:
    """Return the cache folder name of one quantization variant."""
    return f"nf4{'-dq' if double_quant else ''}-{str(compute_dtype).removeprefix('torch.')}"


def _source_files(base: Path) -> list[Path]:
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise QuantizedCopyUnsupported(f"{base}: no *.safetensors weights")
    return files


def _marker(base: Path, double_quant: bool, compute_dtype: torch.dtype) -> dict[str, Any]:
    import bitsandbytes
    import transformers

    sources = [base / "config.json", *_source_files(base)]
    return {
        "format": FORMAT_VERSION,
        "variant": variant_name(double_quant, compute_dtype),
        "sources": [{"name": p.name, "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in sources],
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
    }


def _is_current(copy: Path, marker: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((copy / MARKER).read_text()) == marker)
    except (OSError, ValueError):
        return False


def ensure_nf4_copy(
    base: str | Path,
    *,
    double_quant: bool,
    compute_dtype: torch.dtype,
    fallback_dir: str | Path | None = None,
) -> Path:
    """Return a folder holding the NF4 copy of base, writing it first when missing or stale.

    Written into BASE/.pocketlora/<variant>; when that folder cannot be written, into
    fallback_dir/<variant> (raises QuantizedCopyUnsupported when there is none either).
    """
    base = Path(base)
    marker = _marker(base, double_quant, compute_dtype)
    name = variant_name(double_quant, compute_dtype)
    places = [base / _CACHE_PARENT / name]
    if fallback_dir is not None:
        places.append(Path(fallback_dir) / name)
    for copy in places:
        if _is_current(copy, marker):
            return copy
    errors = []
    for copy in places:
        try:
            copy.parent.mkdir(parents=True, exist_ok=True)
            _remove_abandoned(copy.parent, name)
            tmp = copy.parent / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            errors.append(f"{copy.parent}: {exc.strerror or exc}")
            continue
        try:
            started = time.monotonic()
            write_nf4_copy(base, tmp, double_quant=double_quant, compute_dtype=compute_dtype)
            (tmp / MARKER).write_text(json.dumps(marker))
            # Another job may have finished the same copy meanwhile: either one is fine.
            shutil.rmtree(copy, ignore_errors=True)
            os.replace(tmp, copy)
            log.info("wrote NF4 copy of %s in %.1f s", base, time.monotonic() - started)
            return copy
        except OSError as exc:
            errors.append(f"{copy}: {exc.strerror or exc}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise QuantizedCopyUnsupported("cannot write an NF4 copy: " + "; ".join(errors))


def _remove_abandoned(parent: Path, name: str) -> None:
    """Delete half-written copies whose writer process is gone (killed mid-write)."""
    for tmp in parent.glob(f".{name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, OSError):
            continue


def _skeleton(base: Path, double_quant: bool, compute_dtype: torch.dtype) -> Any:
    """Build the model on the meta device with transformers' own bnb 4-bit module swap."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    quantizer = AutoHfQuantizer.from_config(bnb_config(double_quant, compute_dtype), pre_quantized=False)
    quantizer.preprocess_model(model, device_map={"": "cpu"})
    return model


def _read_tensor(f: Any, start: int, info: dict[str, Any]) -> torch.Tensor:
    begin, end = (int(x) for x in info["data_offsets"])
    buf = bytearray(end - begin)
    f.seek(start + begin)
    if f.readinto(buf) != len(buf):
        raise QuantizedCopyUnsupported(f"{f.name}: truncated tensor data")
    dtype = _DTYPES[info["dtype"]]
    shape = [int(d) for d in info["shape"]]
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def write_nf4_copy(base: str | Path, out: str | Path, *, double_quant: bool, compute_dtype: torch.dtype) -> None:
    """Quantize base's linear layers tensor by tensor and write the pre-quantized model to out."""
    from bitsandbytes.nn.modules import Linear4bit, Params4bit
    from transformers.pytorch_utils import Conv1D

    base, out = Path(base), Path(out)
    skeleton = _skeleton(base, double_quant, compute_dtype)
    modules = dict(skeleton.named_modules())
    expected = set(skeleton.state_dict().keys())
    quantized: dict[str, torch.Tensor] = {}
    # (name, source file, data start, header entry) of tensors copied through unchanged.
    passthrough: list[tuple[str, Path, int, dict[str, Any]]] = []
    seen: set[str] = set()
    for path in _source_files(base):
        header = read_safetensors_header(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            start = 8 + header_len
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name not in expected or info["dtype"] not in _DTYPES:
                    # A checkpoint whose keys transformers would rename on load (old layouts):
                    # leave it to from_pretrained.
                    raise QuantizedCopyUnsupported(f"{path.name}: unexpected tensor {name!r}")
                seen.add(name)
                module_name, _, leaf = name.rpartition(".")
                module = modules.get(module_name)
                if leaf == "weight" and isinstance(module, Linear4bit):
                    value = _read_tensor(f, start, info).to(torch.float32)
                    # What transformers' Bnb4bitQuantize does, call for call.
                    if issubclass(getattr(module, "source_cls", type(None)), Conv1D):
                        value = value.T
                    old = module.weight
                    param: Any = Params4bit(value, requires_grad=False, **old.__dict__)
                    param = param.to("cpu")
                    quantized[name] = param.data
                    for key, v in param.quant_state.as_dict(packed=True).items():
                        quantized[f"{name}.{key}"] = v
                    del value, param
                    trim_heap()
                else:
                    passthrough.append((name, path, start, info))
    missing = [n for n, m in modules.items() if isinstance(m, Linear4bit) and f"{n}.weight" not in seen]
    if missing:
        raise QuantizedCopyUnsupported(f"{base}: no weights for {missing[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    _write_safetensors(out / "model.safetensors", quantized, passthrough)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = bnb_config(double_quant, compute_dtype).to_dict()
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))


def _write_safetensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    passthrough: list[tuple[str, Path, int, dict[str, Any]]],
) -> None:
    """Write a safetensors file: in-memory tensors, then source tensors copied in chunks."""
    entries: list[tuple[str, str, list[int], int, Any]] = []
    for name, t in tensors.items():
        t = t.contiguous()
        entries.append((name, _NAMES[t.dtype], list(t.shape), t.numel() * t.element_size(), t))
    for name, src, start, info in passthrough:
        begin, end = (int(x) for x in info["data_offsets"])
        shape = [int(d) for d in info["shape"]]
        entries.append((name, info["dtype"], shape, end - begin, (src, start + begin)))
    # Widest dtypes first keeps every tensor aligned to its element size (as safetensors does).
    entries.sort(key=lambda e: (-_DTYPES[e[1]].itemsize, e[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes, _ in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _name, _dtype, _shape, nbytes, data in entries:
            if isinstance(data, torch.Tensor):
                f.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())
                continue
            src, pos = data
            with open(src, "rb") as s:
                s.seek(pos)
                left = nbytes
                while left:
                    chunk = s.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise QuantizedCopyUnsupported(f"{src}: truncated tensor data")
                    f.write(chunk)
                    left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
