"""Whether this CPU computes bfloat16 natively, decided without torch.

The spec asks for `mixed_precision` "auto", "fp32", "bf16" or "fp16"; the trainer runs on the
CPU, where the choice is between fp32 and bf16 autocast (matmuls in bfloat16, the loss, the
LoRA weights and the optimizer in fp32):

    auto  bf16 where the CPU has native bfloat16 instructions (x86 AVX512-BF16 or AMX-BF16,
          Arm's BF16 extension), fp32 elsewhere: emulated bf16 is slower than fp32
    bf16  bf16 autocast on any CPU (emulated where not native: many times slower, and it holds
          bf16 copies of the weights on top of the fp32 ones)
    fp16  a GPU setting; the CPU trainer runs bf16 where native, else fp32, and says so
    fp32  no autocast

The resolution itself (adapters_store.memory_plan.resolve_precision) is shared with the
orchestrator, which plans a job's memory for the device before leasing it.
"""

from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean native bfloat16 arithmetic.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """Return the CPU feature flags the kernel lists (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU computes bfloat16 natively (so bf16 autocast is worth it)."""
    return bool(cpu_flags(cpuinfo) & NATIVE_BF16_FLAGS)
