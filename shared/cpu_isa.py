"""The instruction sets a speed figure was measured with: this CPU's, and the ones PyTorch and oneDNN were held to."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that decide which int8 / fp32 kernels PyTorch, oneDNN and onnxruntime's MLAS pick, in that order of
# power on x86 (AVX-512 VNNI and AVX-VNNI have the 8-bit dot products), and their ARM counterparts.
X86_FLAGS = ("sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "sve")


def cpu_flags() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ('unknown', set()) where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", set()
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model == "unknown":
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def isa_summary() -> str:
    """One line for a benchmark's output: CPU, the relevant flags it has, and any restriction in force."""
    model, flags = cpu_flags()
    known = X86_FLAGS if platform.machine() in ("x86_64", "AMD64") else ARM_FLAGS
    has = [f for f in known if f in flags]
    parts = [f"{model} ({platform.machine()}, {os.cpu_count()} cores): {' '.join(has) or 'no SIMD flags read'}"]
    torch_cap = _torch_capability()
    if torch_cap:
        parts.append(f"PyTorch kernels {torch_cap}")
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        if os.environ.get(var):
            parts.append(f"{var}={os.environ[var]}")
    # MLAS chooses its kernels from CPUID at start and has no switch of its own; simulations/isa_mask.py hides
    # instruction sets from CPUID itself, for every library of the process.
    if os.environ.get("FEDCAM_CPUID_MASK"):
        parts.append(f"CPUID masked to {os.environ['FEDCAM_CPUID_MASK'].upper()} for onnxruntime, PyTorch and oneDNN "
                     "(AVX-512, VNNI and AMX hidden; the flags above are the CPU's)")
    else:
        parts.append("onnxruntime: all of this CPU's instruction sets")
    return "; ".join(parts)


def _torch_capability() -> str:
    import sys

    if "torch" not in sys.modules:  # never import torch for this: the device runtime's benchmarks run without it
        return ""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:
        return ""
