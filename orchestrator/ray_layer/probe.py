"""What a Python process runs: its Python, the server's dependencies and the project's code.

The driver compares its own fingerprint with one taken on every node of the cluster before it
starts anything there. This module imports only the standard library, and the driver pickles it
by value (`ray.cloudpickle.register_pickle_by_value`), so the probe runs even on a node that
cannot import PocketLoRA at all, and reports exactly that.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

# The project's packages the server side imports (and `pocketlora` for its version).
SERVER_PACKAGES = ("orchestrator", "adapters_store", "protos", "pocketlora")
# Distributions the server side imports; each must have the driver's (pinned) version.
SERVER_DISTRIBUTIONS = (
    "ray",
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "protobuf",
    "psycopg",
    "minio",
    "prometheus-client",
    "aiohttp",
)
MISSING = "missing"


def package_dir(name: str) -> Path | None:
    """The folder a top-level package is imported from here, or None when it cannot be."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def code_digest() -> str:
    """sha256 over the project's server-side Python sources (relative paths and bytes)."""
    digest = hashlib.sha256()
    for name in SERVER_PACKAGES:
        folder = package_dir(name)
        if folder is None:
            return ""
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(f"{name}/{path.relative_to(folder).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def project_version() -> str:
    """pocketlora.__version__ as this process imports it, or MISSING."""
    if package_dir("pocketlora") is None:
        return MISSING
    import pocketlora

    return str(pocketlora.__version__)


def fingerprint() -> dict[str, str]:
    """Python major.minor, each server distribution's version, the project version and code digest."""
    found = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    for dist in SERVER_DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = MISSING
    found["pocketlora"] = project_version()
    found["code"] = code_digest() if found["pocketlora"] != MISSING else ""
    return found


def differences(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    """One phrase per mismatch, e.g. "grpcio 1.80.0 (driver 1.85.3)"; empty when all match."""
    out = []
    for key, want in expected.items():
        got = found.get(key, MISSING)
        if got == want:
            continue
        if key == "code":
            if found.get("pocketlora") != MISSING:
                out.append(f"code differs (sha256 {got[:12]}, driver {want[:12]})")
        elif got == MISSING:
            out.append(f"{key} missing (driver {want})")
        else:
            out.append(f"{key} {got} (driver {want})")
    return out
