#!/usr/bin/env bash
# Build an emulated aarch64 device root: Debian's arm64 Python, the aarch64 wheels of the device runtime's libraries
# at the versions this machine runs, and fedcam's own wheel. simulations/arm64_check.py runs the device runtime in it
# under qemu-user (no root privileges, no binfmt_misc: the interpreter is started through qemu with -L).
#
#   sudo apt-get install qemu-user-static debootstrap     # from Debian's registry
#   deploy/arm64/build-root.sh [ROOT]                      # default /opt/fedcam-arm64; ~500 MB, ~1 min
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(realpath -m "${1:-/opt/fedcam-arm64}")
PY=${PY:-.venv/bin/python}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 2; }
command -v qemu-aarch64-static >/dev/null || { echo "qemu-aarch64-static is missing: apt-get install qemu-user-static" >&2; exit 2; }

# First stage only: it unpacks without running arm64 code. The packages of the second stage are unpacked by hand;
# their maintainer scripts are not needed to run a Python interpreter.
if [ ! -x "$ROOT/usr/bin/python3.11" ]; then
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,libpython3.11-stdlib,ca-certificates \
    bookworm "$ROOT" "$MIRROR"
  for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
fi

# qemu 7.2 serves the host's /proc/cpuinfo (x86) to the guest, and onnxruntime's cpuinfo library dereferences a
# null ARM core description on it (SIGSEGV on import). qemu-user looks paths up under -L first, so an ARM
# description here is what the guest reads: a 2-core Cortex-A72 (part 0xd08) with NEON only.
mkdir -p "$ROOT/proc"
for i in 0 1; do
  printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i"
done > "$ROOT/proc/cpuinfo"

# The device's libraries at the host's versions, so the two sides differ only in the CPU.
pins=$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("numpy", "onnxruntime", "opencv-python-headless", "cryptography")))
EOF
)
wheel=$(mktemp -d)
"$PY" -m pip wheel -q --no-deps -w "$wheel" .
"$PY" -m pip install -q --no-warn-conflicts --target "$ROOT/opt/site" --upgrade --python-version 3.11 \
  --implementation cp --only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux2014_aarch64 $pins
"$PY" -m pip install -q --no-warn-conflicts --target "$ROOT/opt/site" --upgrade --no-deps "$wheel"/*.whl
rm -rf "$wheel"
PYTHONPATH="$ROOT/opt/site" qemu-aarch64-static -cpu cortex-a72 -L "$ROOT" "$ROOT/usr/bin/python3.11" -c \
  "import platform, onnxruntime; import client.runtime.cli; print('aarch64 root ready:', platform.machine(), 'onnxruntime', onnxruntime.__version__)"
