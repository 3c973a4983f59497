"""What an adapter on the device must be before a runtime touches it (torch-free checks).

A peft folder for the torch runtime: adapter_model.safetensors (never a pickle, even renamed),
a JSON adapter_config.json, and optionally manifest.json naming the base fingerprint it was
trained on. Both runtimes refuse an adapter whose manifest names another base.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapters_store.blob import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME, ensure_safetensors
from adapters_store.errors import AdapterFormatError
from agent.runtime_base import AdapterLoadError, check_name

_PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Config keys that do not change the adapter's modules: a slot is reusable when the rest matches.
_CONFIG_IGNORED = {"base_model_name_or_path", "revision", "inference_mode", "peft_version"}


def strip_sha(fingerprint: str) -> str:
    """A fingerprint without its optional 'sha256:' prefix, for comparisons."""
    return fingerprint.removeprefix("sha256:")


def check_adapter_dir(name: str, adapter_dir: Path) -> tuple[Path, str]:
    """Return (safetensors weights, config key) of a loadable adapter folder, or raise why not."""
    check_name(name)
    if not adapter_dir.is_dir():
        raise AdapterLoadError(f"adapter {name!r}: {adapter_dir} is not a directory")
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        pickled = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in _PICKLED_SUFFIXES)
        if pickled:
            raise AdapterLoadError(
                f"adapter {name!r}: {adapter_dir} holds only pickled weights ({', '.join(pickled)}); "
                f"PocketLoRA loads only {WEIGHTS_NAME} (unpickling can run code)"
            )
        raise AdapterLoadError(f"adapter {name!r}: {adapter_dir} has no {WEIGHTS_NAME}")
    try:
        ensure_safetensors(weights)  # also catches a pickle renamed to .safetensors
    except AdapterFormatError as exc:
        raise AdapterLoadError(f"adapter {name!r}: {adapter_dir}: {exc}") from None
    try:
        config = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"adapter {name!r}: unreadable {CONFIG_NAME}: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"adapter {name!r}: {CONFIG_NAME} must be a JSON object")
    key = {k: v for k, v in config.items() if k not in _CONFIG_IGNORED}
    return weights, json.dumps(key, sort_keys=True)


def manifest_fingerprint(name: str, adapter_dir: Path) -> str | None:
    """Return manifest.json's base_fingerprint, None when the folder has no manifest."""
    path = adapter_dir / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"adapter {name!r}: unreadable {MANIFEST_NAME}: {exc}") from None
    value = manifest.get("base_fingerprint") if isinstance(manifest, dict) else None
    if not isinstance(value, str):
        raise AdapterLoadError(f"adapter {name!r}: {MANIFEST_NAME} has no base_fingerprint string")
    return value
