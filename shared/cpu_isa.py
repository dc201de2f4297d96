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


VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # int8 dot products that accumulate in 32 bits


def visible_flags() -> set[str]:
    """This CPU's flags as its libraries see them: less what FEDCAM_CPUID_MASK hides (simulations/isa_mask.py)."""
    flags = cpu_flags()[1]
    if os.environ.get("FEDCAM_CPUID_MASK") == "avx2":
        flags = {f for f in flags if not f.startswith(("avx512", "amx")) and f != "avx_vnni"}
    return flags


def int8_kernel_note(target: str, flags: set[str] | None = None, machine: str | None = None) -> str:
    """Why this CPU's int8 kernels depart from a snapshot's graph, or '' when they do not. Signed activations
    (snapshot.target arm64) on an x86 CPU without VNNI go through AVX2's u8 x s8 instruction, whose 16-bit pair
    sums saturate: 57 quantization steps off the graph, other detections on 4 of 16 frames (README)."""
    if target != "arm64" or (machine or platform.machine()) not in ("x86_64", "AMD64"):
        return ""
    if (visible_flags() if flags is None else flags) & VNNI_FLAGS:
        return ""
    return ("an arm64 snapshot (signed int8) on an x86 CPU without VNNI: onnxruntime's AVX2 int8 kernel saturates "
            "on signed activations, so detections can differ from those the server's gate scored; x86 devices "
            "should get snapshots made with snapshot.target=x86")


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
