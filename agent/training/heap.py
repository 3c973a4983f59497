"""Memory allocator choices for the training child: jemalloc when installed, glibc trims otherwise.

Why jemalloc: NF4 training dequantizes every linear weight into a fresh buffer of a few MB (in
forward, in the checkpointed recompute, in backward) and frees it right after, while small
tensors that outlive a step are allocated between them. glibc malloc raises its mmap threshold
to the size of the first such buffer it frees (its "dynamic threshold"), so later buffers come
from the heap, the long-lived small tensors pin the heap between them, and freed buffers stay
resident: on SmolLM2-135M with checkpointing the first forward grew the process by ~260 MiB it
never used again (peak 880-950 MiB; 740 MiB under jemalloc, at the same step time). Fixing
glibc's threshold instead (mallopt M_MMAP_THRESHOLD) gave the same peak but doubled the NF4 step
time: every buffer is then mapped fresh and page-faulted in. jemalloc keeps size classes apart
and reuses them. PyTorch's CPU tuning guide recommends it (or TCMalloc) for the same reason.

The allocator is chosen when the child starts (LD_PRELOAD); POCKETLORA_ALLOCATOR=system keeps
glibc. Devices without jemalloc run on glibc, with trim_heap after the loader's scratch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ALLOCATOR_ENV = "POCKETLORA_ALLOCATOR"  # "jemalloc" (the default when installed) or "system"
_JEMALLOC_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")

_libc: Any = None


def jemalloc_path() -> str | None:
    """The installed jemalloc shared library, or None."""
    for d in _LIB_DIRS:
        for name in _JEMALLOC_NAMES:
            if (Path(d) / name).is_file():
                return str(Path(d) / name)
    found = ctypes.util.find_library("jemalloc")  # other layouts: ldconfig's cache
    return found if found and "/" in found else None


def allocator_env(env: Mapping[str, str]) -> dict[str, str]:
    """What to add to a training child's environment so it allocates with jemalloc (or nothing)."""
    if env.get(ALLOCATOR_ENV, "jemalloc") == "system":
        return {}
    lib = jemalloc_path()
    preload = env.get("LD_PRELOAD", "")
    if lib is None or lib in preload.replace(":", " ").split():
        return {}
    return {"LD_PRELOAD": " ".join(p for p in (lib, preload) if p)}


def active_allocator(pid: int | str = "self") -> str:
    """ "jemalloc" when the process has jemalloc mapped, else "system"."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def training_allocator(env: Mapping[str, str] | None = None) -> str:
    """The allocator training runs with here: this process's, or the one a training child gets."""
    if active_allocator() == "jemalloc" or allocator_env(os.environ if env is None else env):
        return "jemalloc"
    return "system"


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim); a no-op elsewhere."""
    # Tensors of a few MB freed in a loop leave glibc's heap fragmented: quantizing a model
    # tensor by tensor keeps hundreds of MiB of freed memory resident without this.
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") and active_allocator() == "system" else False
        except OSError:  # not glibc (musl, macOS): nothing to trim
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
