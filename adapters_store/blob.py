"""The adapter blob: one safetensors file carrying the LoRA weights, their config and manifest.

peft's adapter_model.safetensors is kept byte-for-byte in its tensor section; only the JSON
header is rewritten, with `__metadata__` extended by the adapter_config.json text and the
manifest JSON. One file means one hash, one presigned URL and no way to pair weights with the
wrong provenance. This is pure byte work: no torch, so the orchestrator can read manifests.
Pickled checkpoints (torch .bin) are refused before anything parses them: unpickling runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from adapters_store.errors import AdapterFormatError
from adapters_store.fingerprint import SafetensorsHeaderError, read_safetensors_header
from adapters_store.limits import MAX_ADAPTER_HEADER_BYTES, MAX_CONFIG_BYTES, JsonLimitError, load_json
from adapters_store.manifest import AdapterManifest

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
MANIFEST_NAME = "manifest.json"
META_CONFIG = "pocketlora.adapter_config"
META_MANIFEST = "pocketlora.manifest"

_CHUNK = 1 << 20
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = 0x80  # pickle protocol >= 2 opens with PROTO
_PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class BlobInfo:
    """What a blob's bytes are: hex sha256 (no prefix) and size in bytes."""

    sha256: str
    size: int


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _looks_pickled(head: bytes) -> bool:
    if head.startswith(_ZIP_MAGIC):
        return True
    # PROTO opcode followed by a protocol number 2..5; a safetensors length never looks like
    # this AND fails to parse, and we only ask after parsing failed.
    return len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5


def ensure_safetensors(path: Path, max_header_bytes: int | None = None) -> dict[str, Any]:
    """Return the header of a well-formed safetensors file; AdapterFormatError otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise AdapterFormatError(f"{path.name}: no such file") from None
    try:
        header = read_safetensors_header(path, *([max_header_bytes] if max_header_bytes else []))
    except SafetensorsHeaderError as exc:
        if _looks_pickled(head):
            raise AdapterFormatError(
                f"{path.name} is a pickled PyTorch file; PocketLoRA loads only safetensors adapters"
            ) from None
        # The header error names the full path; callers may show this to a remote client (the
        # orchestrator rejecting an upload), so keep only the file name.
        why = str(exc).replace(str(path), path.name)
        raise AdapterFormatError(f"{path.name} is not a safetensors file ({why})") from None
    (header_len,) = struct.unpack("<Q", head[:8])
    _check_tensor_layout(path.name, header, size - 8 - header_len)
    return header


def _check_tensor_layout(name: str, header: dict[str, Any], data_len: int) -> None:
    """Check tensor entries tile the data section exactly, as the safetensors loader demands."""
    spans: list[tuple[int, int]] = []
    for tensor, info in header.items():
        if tensor == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise AdapterFormatError(f"{name}: __metadata__ must map strings to strings")
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise AdapterFormatError(f"{name}: tensor {tensor!r} has bad data_offsets")
        spans.append((offsets[0], offsets[1]))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise AdapterFormatError(f"{name}: tensor data has a gap or overlap at byte {start}")
        end = stop
    if end != data_len:
        raise AdapterFormatError(
            f"{name}: tensor data is {data_len} bytes, header describes {end} (truncated or padded)"
        )


def _encode_header(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    # safetensors aligns the data section to 8 bytes by space-padding the JSON.
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _copy_data_section(src: BinaryIO, dst: BinaryIO, h: hashlib._Hash) -> int:
    copied = 0
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        h.update(chunk)
        copied += len(chunk)
    return copied


def _find_weights(adapter_dir: Path) -> Path:
    weights = adapter_dir / WEIGHTS_NAME
    if weights.is_file():
        return weights
    for candidate in sorted(adapter_dir.iterdir()) if adapter_dir.is_dir() else []:
        if candidate.suffix in _PICKLED_SUFFIXES and candidate.is_file():
            ensure_safetensors(candidate)  # raises the clear "pickled PyTorch file" message
    raise AdapterFormatError(f"{adapter_dir}: no {WEIGHTS_NAME} (save the adapter with peft)")


def _read_adapter_config(adapter_dir: Path) -> str:
    path = adapter_dir / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
        config = json.loads(text)
    except FileNotFoundError:
        raise AdapterFormatError(f"{adapter_dir}: no {CONFIG_NAME}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{CONFIG_NAME} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} must be a JSON object")
    return text


def _parse_config(config_text: str, name: str) -> dict[str, Any]:
    """The peft config carried in a blob's metadata, bounded like every untrusted JSON."""
    try:
        config = load_json(config_text, f"{name}: {META_CONFIG} metadata", max_bytes=MAX_CONFIG_BYTES)
    except JsonLimitError as exc:
        raise AdapterFormatError(str(exc)) from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{name}: {META_CONFIG} metadata must be a JSON object")
    return config


def _check_config_matches(config_text: str, manifest: AdapterManifest) -> None:
    """Refuse a manifest whose rank/alpha disagree with the weights' own config."""
    config = _parse_config(config_text, CONFIG_NAME)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if r is not None and r != manifest.rank:
        raise AdapterFormatError(f"manifest field 'rank' is {manifest.rank}, adapter_config r is {r}")
    if isinstance(alpha, int | float) and alpha != manifest.alpha:  # exact, no float overflow
        raise AdapterFormatError(f"manifest field 'alpha' is {manifest.alpha}, adapter_config lora_alpha is {alpha}")


def pack_adapter(adapter_dir: Path, manifest: AdapterManifest, out: Path) -> BlobInfo:
    """Write the upload blob for a peft adapter folder to `out` and return its sha256/size."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    weights = _find_weights(adapter_dir)
    header = ensure_safetensors(weights)
    config_text = _read_adapter_config(adapter_dir)
    _check_config_matches(config_text, manifest)
    meta = dict(header.get("__metadata__") or {})
    meta[META_CONFIG] = config_text
    meta[META_MANIFEST] = manifest.to_json()
    header["__metadata__"] = meta
    encoded = _encode_header(header)
    h = hashlib.sha256(encoded)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(weights, "rb") as src, open(tmp, "wb") as dst:
            (old_len,) = struct.unpack("<Q", src.read(8))
            src.seek(8 + old_len)
            dst.write(encoded)
            size = len(encoded) + _copy_data_section(src, dst, h)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return BlobInfo(sha256=h.hexdigest(), size=size)


def _blob_metadata(blob: Path) -> dict[str, str]:
    meta = ensure_safetensors(blob, MAX_ADAPTER_HEADER_BYTES).get("__metadata__") or {}
    for key in (META_CONFIG, META_MANIFEST):
        if key not in meta:
            raise AdapterFormatError(f"{Path(blob).name}: not a PocketLoRA blob (no {key!r} metadata)")
    return dict(meta)


def read_blob_manifest(blob: Path) -> AdapterManifest:
    """Return the manifest stored in a blob's safetensors metadata."""
    return AdapterManifest.from_json(_blob_metadata(blob)[META_MANIFEST])


def read_blob_config(blob: Path) -> dict[str, Any]:
    """Return the peft adapter_config stored in a blob's safetensors metadata."""
    config = json.loads(_blob_metadata(blob)[META_CONFIG])
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{Path(blob).name}: {META_CONFIG} metadata must be a JSON object")
    return config


def unpack_adapter(blob: Path, dest_dir: Path) -> AdapterManifest:
    """Write a peft-loadable adapter folder (weights, config, manifest.json) from a blob."""
    blob, dest_dir = Path(blob), Path(dest_dir)
    meta = _blob_metadata(blob)
    manifest = AdapterManifest.from_json(meta[META_MANIFEST])
    _parse_config(meta[META_CONFIG], blob.name)
    dest_dir.mkdir(parents=True, exist_ok=True)
    # The weights keep the extra metadata: safetensors and peft ignore unknown metadata keys.
    shutil.copyfile(blob, dest_dir / WEIGHTS_NAME)
    (dest_dir / CONFIG_NAME).write_text(meta[META_CONFIG], encoding="utf-8")
    (dest_dir / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest
