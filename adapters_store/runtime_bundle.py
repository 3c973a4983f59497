"""Runtime bundles: a base model exported once for an on-device runtime, LoRA inputs left open.

A bundle is the folder onnxruntime-genai loads (genai_config.json, model.onnx + data, tokenizer
files) plus `pocketlora-bundle.json`, this module's BundleManifest: which base it was exported
from (id and fingerprint), the export settings, and every LoRA graph input (name, the peft
module it stands for, A or B, its fixed dimension). The rank dimension of those inputs is
symbolic, so one bundle serves adapters of any rank up to `max_rank`, and rank 0 (the graph's
own initializers) is the base model.

Store layout, outside `blobs/` so the adapter garbage collector leaves bundles alone:

    runtimes/onnx/sha256/<hex>.tar                                the bundle, content-addressed
    runtimes/onnx/bases/<fingerprint hex>/<settings id>.json      link: the bundle serving a base
    runtimes/onnx/adapters/<adapter hex>/<bundle hex>.onnx_adapter    an adapter's runtime form
    runtimes/onnx/adapters/<adapter hex>/<bundle hex>.json            its manifest (or why refused)

Torch-free and onnx-free: the orchestrator and the device agent both read these manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters_store.blob import sha256_file
from adapters_store.errors import AdapterFormatError
from adapters_store.keys import normalize_sha256, validate_key

RUNTIME_ONNX = "onnx"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_MANIFEST_NAME = "pocketlora-bundle.json"
RANK_DIM = "lora_r"
PRECISIONS = ("int4", "fp32")
_PREFIX = "runtimes/onnx/"
_MODULE = re.compile(r"[A-Za-z0-9_.]{1,200}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_MAX_BUNDLE_FILES = 64


def _fail(name: str, value: Any, why: str) -> AdapterFormatError:
    shown = repr(value)
    return AdapterFormatError(f"bundle field {name!r}: {why}, got {shown[:80]}")


@dataclass(frozen=True)
class BundleSettings:
    """How a base is exported: weight precision, LoRA target modules, the largest rank served."""

    precision: str = "int4"  # "int4" (MatMulNBits weights) or "fp32" (exact, for comparisons)
    targets: tuple[str, ...] = ()  # peft target module names, resolved (never empty in a manifest)
    max_rank: int = 64

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise _fail("precision", self.precision, f"must be one of {', '.join(PRECISIONS)}")
        if not isinstance(self.max_rank, int) or isinstance(self.max_rank, bool) or not 1 <= self.max_rank <= 1024:
            raise _fail("max_rank", self.max_rank, "must be an int in 1..1024")
        if not all(isinstance(t, str) and re.fullmatch(r"[A-Za-z0-9_]{1,64}", t) for t in self.targets):
            raise _fail("targets", self.targets, "must be module names of [A-Za-z0-9_]")

    def settings_id(self) -> str:
        """A short, stable id of these settings (part of the bundle's link key)."""
        body = json.dumps(
            {"v": BUNDLE_FORMAT_VERSION, "p": self.precision, "t": sorted(self.targets), "r": self.max_rank},
            separators=(",", ":"),
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LoraInput:
    """One LoRA graph input: the peft module it replaces, A ([dim, r]) or B ([r, dim])."""

    name: str  # graph input name
    module: str  # peft module path without the "base_model.model." prefix, e.g. model.layers.0.self_attn.q_proj
    part: str  # "A" or "B"
    dim: int  # A: the module's input features; B: its output features

    def shape(self, rank: int) -> tuple[int, int]:
        """The input's shape for an adapter of this rank."""
        return (self.dim, rank) if self.part == "A" else (rank, self.dim)


@dataclass
class BundleManifest:
    """What a runtime bundle is; stored in the bundle and in its link (see the module docstring)."""

    base_model_id: str
    base_fingerprint: str
    settings: BundleSettings
    lora_inputs: list[LoraInput]
    tools: dict[str, str] = field(default_factory=dict)  # exporter package versions
    runtime: str = RUNTIME_ONNX
    rank_dim: str = RANK_DIM
    format_version: int = BUNDLE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != BUNDLE_FORMAT_VERSION:
            raise _fail("format_version", self.format_version, f"supported: {BUNDLE_FORMAT_VERSION}")
        if self.runtime != RUNTIME_ONNX:
            raise _fail("runtime", self.runtime, f"supported: {RUNTIME_ONNX}")
        normalize_sha256(self.base_fingerprint)
        if not self.lora_inputs:
            raise _fail("lora_inputs", self.lora_inputs, "a bundle needs at least one LoRA input")
        for inp in self.lora_inputs:
            if inp.part not in ("A", "B") or not _MODULE.fullmatch(inp.module) or inp.dim <= 0:
                raise _fail("lora_inputs", asdict(inp), "needs part A/B, a module path and a positive dim")

    def modules(self) -> dict[str, dict[str, LoraInput]]:
        """peft module path -> {"A": input, "B": input}."""
        out: dict[str, dict[str, LoraInput]] = {}
        for inp in self.lora_inputs:
            out.setdefault(inp.module, {})[inp.part] = inp
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (settings.targets as a list)."""
        d = asdict(self)
        d["settings"]["targets"] = list(self.settings.targets)
        return d

    def to_json(self) -> str:
        """Serialise (sorted keys, so equal manifests are equal strings)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> BundleManifest:
        """Parse and validate; AdapterFormatError names the bad field."""
        if not isinstance(d, dict):
            raise AdapterFormatError("bundle manifest must be a JSON object")
        try:
            settings = d["settings"]
            inputs = [LoraInput(**x) for x in d["lora_inputs"]]
            return cls(
                base_model_id=str(d["base_model_id"]),
                base_fingerprint=str(d["base_fingerprint"]),
                settings=BundleSettings(
                    precision=settings["precision"],
                    targets=tuple(settings["targets"]),
                    max_rank=settings["max_rank"],
                ),
                lora_inputs=inputs,
                tools={str(k): str(v) for k, v in dict(d.get("tools") or {}).items()},
                runtime=d.get("runtime", RUNTIME_ONNX),
                rank_dim=d.get("rank_dim", RANK_DIM),
                format_version=d.get("format_version", BUNDLE_FORMAT_VERSION),
            )
        except (KeyError, TypeError) as exc:
            raise AdapterFormatError(f"bundle manifest is incomplete or malformed: {exc!r}") from None

    @classmethod
    def from_json(cls, text: str) -> BundleManifest:
        """Parse from JSON text."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise AdapterFormatError(f"bundle manifest is not JSON: {exc}") from None


def _fingerprint_hex(fingerprint: str) -> str:
    return normalize_sha256(fingerprint)


def bundle_key(sha256_hex: str) -> str:
    """Content-addressed key of a bundle tar."""
    return validate_key(f"{_PREFIX}sha256/{normalize_sha256(sha256_hex)}.tar")


def bundle_link_key(base_fingerprint: str, settings: BundleSettings) -> str:
    """Key of the link naming the bundle that serves this base under these settings."""
    return validate_key(f"{_PREFIX}bases/{_fingerprint_hex(base_fingerprint)}/{settings.settings_id()}.json")


def adapter_form_key(adapter_sha256: str, bundle_sha256: str) -> str:
    """Key of an adapter's .onnx_adapter form for one bundle (beside its manifest)."""
    return validate_key(
        f"{_PREFIX}adapters/{normalize_sha256(adapter_sha256)}/{normalize_sha256(bundle_sha256)}.onnx_adapter"
    )


def adapter_form_manifest_key(adapter_sha256: str, bundle_sha256: str) -> str:
    """Key of the JSON manifest of an adapter's runtime form (or of its refusal)."""
    return adapter_form_key(adapter_sha256, bundle_sha256).removesuffix(".onnx_adapter") + ".json"


ADAPTER_FORMS_PREFIX = f"{_PREFIX}adapters/"


def pack_bundle(folder: Path, out: Path) -> str:
    """Write a deterministic tar of the bundle folder's files to `out`; return its sha256 hex."""
    folder = Path(folder)
    if not (folder / BUNDLE_MANIFEST_NAME).is_file():
        raise AdapterFormatError(f"{folder}: no {BUNDLE_MANIFEST_NAME}; not a runtime bundle")
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=path.name)
            # Same files, same bytes: the tar's digest is the bundle's content address.
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return sha256_file(out)


def unpack_bundle(tar_path: Path, dest: Path) -> BundleManifest:
    """Extract a bundle tar into `dest` (replaced atomically) and return its manifest.

    Only plain files with plain names are accepted: a bundle comes from the orchestrator, but a
    tar that could write outside `dest` (links, '..', absolute paths) is refused outright.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > _MAX_BUNDLE_FILES:
                raise AdapterFormatError(f"{Path(tar_path).name}: {len(members)} entries; a bundle has few files")
            for m in members:
                if not m.isfile() or not _FILE_NAME.fullmatch(m.name) or m.name.startswith("."):
                    raise AdapterFormatError(f"{Path(tar_path).name}: refusing bundle entry {m.name!r}")
                src = tar.extractfile(m)
                assert src is not None  # a regular file always has a payload
                with src, open(tmp / m.name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        manifest = read_bundle_manifest(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    except tarfile.TarError as exc:
        raise AdapterFormatError(f"{Path(tar_path).name} is not a bundle tar: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def read_bundle_manifest(folder: Path) -> BundleManifest:
    """Read pocketlora-bundle.json from an unpacked bundle folder."""
    path = Path(folder) / BUNDLE_MANIFEST_NAME
    try:
        return BundleManifest.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterFormatError(f"{folder}: no {BUNDLE_MANIFEST_NAME}; not a runtime bundle") from None


@dataclass(frozen=True)
class BundleRef:
    """A stored bundle: its content address and manifest (the link object's content)."""

    sha256: str
    size: int
    key: str
    manifest: BundleManifest

    def to_json(self) -> str:
        """Serialise the link."""
        return json.dumps(
            {"sha256": self.sha256, "size": self.size, "key": self.key, "manifest": self.manifest.to_dict()},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> BundleRef:
        """Parse a link object."""
        try:
            d = json.loads(text)
            return cls(
                sha256=normalize_sha256(str(d["sha256"])),
                size=int(d["size"]),
                key=validate_key(str(d["key"])),
                manifest=BundleManifest.from_dict(d["manifest"]),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise AdapterFormatError(f"bundle link is malformed: {exc!r}") from None
