"""The CPUID mask of the benchmarks (simulations/isa_mask.py): a masked process sees AVX2 alone, in PyTorch and in
onnxruntime's int8 kernels, and an unknown level stops the process instead of timing it unmasked; and which
snapshots a CPU's int8 kernels run differently from their graph."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.cpu_isa import int8_kernel_note

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("isa_mask", ROOT / "simulations" / "isa_mask.py")
isa_mask = importlib.util.module_from_spec(spec)
spec.loader.exec_module(isa_mask)

masked = pytest.mark.skipif(bool(isa_mask.unavailable()), reason=isa_mask.unavailable() or "available")

# u8 x s8 products at their extremes, summed over K: AVX2's u8 x s8 instruction (vpmaddubsw) adds each pair of
# products into a saturating int16 (255 * 127 * 2 = 64770 becomes 32767); VNNI and AMX accumulate in int32.
SATURATION = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
k = 64
w = numpy_helper.from_array(np.full((k, 8), 127, np.int8), "w")
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "sat",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, k])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 8])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
print(int(sess.run(None, {"a": np.full((4, k), 255, np.uint8)})[0].max()))
"""


def run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@masked
def test_a_masked_process_sees_avx2_alone_in_pytorch_and_in_onnxruntimes_int8_kernels():
    env = isa_mask.masked_env("avx2")
    assert isa_mask.check(env) == "AVX2"
    done = run(SATURATION, env)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 32767 * 32  # every pair saturated: MLAS runs its AVX2 kernel


@masked
def test_the_shim_is_built_once_per_version_of_its_source_outside_the_checkout(tmp_path):
    lib = isa_mask.library(tmp_path)
    assert lib.parent == tmp_path and lib.suffix == ".so"
    stamp = lib.stat().st_mtime_ns
    assert isa_mask.library(tmp_path) == lib and lib.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no half-built file left beside it


@masked
def test_an_unknown_level_stops_the_process_and_says_so():
    env = {**isa_mask.masked_env("avx2"), "FEDCAM_CPUID_MASK": "sse2"}
    done = run("print('timed unmasked')", env)
    assert done.returncode == 97 and "timed unmasked" not in done.stdout
    assert "FEDCAM_CPUID_MASK=sse2" in done.stderr and "avx2" in done.stderr
    with pytest.raises(ValueError, match="unknown instruction set level 'sse2'"):
        isa_mask.masked_env("sse2")


def test_the_int8_kernel_note_names_only_signed_snapshots_on_x86_without_vnni():
    avx2, vnni = {"sse4_1", "avx2", "fma"}, {"sse4_1", "avx2", "fma", "avx512f", "avx512_vnni"}
    assert "snapshot.target=x86" in int8_kernel_note("arm64", avx2, "x86_64")
    assert int8_kernel_note("arm64", vnni, "x86_64") == int8_kernel_note("arm64", avx2 | {"avx_vnni"}, "x86_64") == ""
    assert int8_kernel_note("x86", avx2, "x86_64") == ""  # unsigned activations stay within 4 steps on AVX2
    assert int8_kernel_note("arm64", {"asimd", "asimddp"}, "aarch64") == ""
