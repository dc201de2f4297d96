"""Child processes that see fewer instruction sets than this CPU has (AVX2 alone on an AVX-512 VNNI machine), by
CPUID faulting (isa/cpuid_mask.c): how onnxruntime's kernels for an AVX2 camera or server time and compute."""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from shared.cpu_isa import cpu_flags
from shared.env import STATE_DIR

SOURCE = Path(__file__).parent / "isa" / "cpuid_mask.c"
LEVELS = ("avx2",)  # what cpuid_mask.c knows: AVX-512 (all of it), AVX-VNNI and AMX hidden
PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability())"


def unavailable() -> str:
    """Why a masked process cannot run here, or '' when it can."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"CPUID masking needs Linux on x86_64, not {platform.system()} on {platform.machine()}"
    if "cpuid_fault" not in cpu_flags()[1]:
        return "this CPU (or its hypervisor) offers no CPUID faulting: /proc/cpuinfo lists no cpuid_fault"
    if shutil.which("cc") is None:
        return f"no C compiler (cc) to build {SOURCE.name}"
    return ""


def library(cache: Path | None = None) -> Path:
    """The shim, built once per version of its source into the cache (never committed: a binary of this machine)."""
    source = SOURCE.read_bytes()
    folder = cache or STATE_DIR / "isa"
    lib = folder / f"cpuid_mask-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-Wall", "-o", str(tmp), str(SOURCE)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building {SOURCE} failed:\n{done.stderr}")
        tmp.replace(lib)  # whole or not at all: a concurrent build writes its own tmp
    return lib


def masked_env(level: str = "avx2", base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose processes see only `level`'s instruction sets."""
    if level not in LEVELS:
        raise ValueError(f"unknown instruction set level {level!r}: one of {', '.join(LEVELS)}")
    if why := unavailable():
        raise RuntimeError(why)
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = " ".join(filter(None, (str(library()), env.get("LD_PRELOAD", ""))))
    env["FEDCAM_CPUID_MASK"] = level
    return env


def check(env: dict[str, str]) -> str:
    """The kernel level PyTorch reads from CPUID in a process with `env` (ATEN_CPU_CAPABILITY aside): proof that the
    mask holds there, as PyTorch reads CPUID as MLAS does."""
    probe_env = {k: v for k, v in env.items() if k != "ATEN_CPU_CAPABILITY"}
    done = subprocess.run([sys.executable, "-c", PROBE], env=probe_env, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"a process under the CPUID mask failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    """`python simulations/isa_mask.py [--level avx2] -- COMMAND...`: COMMAND seeing only the level's instruction
    sets where this machine can hide the others, elsewhere COMMAND as it is, after a line that says why."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--level", default="avx2", choices=LEVELS)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given")
    if why := unavailable():
        print(f"isa_mask: {why}; running unmasked", file=sys.stderr, flush=True)
        env = dict(os.environ)
    else:
        env = masked_env(args.level)
        print(f"isa_mask: CPUID masked to {args.level.upper()} (PyTorch reads {check(env)} from it)", file=sys.stderr,
              flush=True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
