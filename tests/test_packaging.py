"""Packaging: Flower's FAB holds only the three packages; the editable install does not expose the repo root; the base
install (no extra) is the torch-free device runtime."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import shared

ROOT = Path(shared.__file__).resolve().parents[1]


def build_fab(app: Path, out: Path) -> Path:
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "flwr.cli.app", "build", "--app", str(app)], cwd=out,
                          capture_output=True, text=True, timeout=120, env={"FLWR_HOME": str(out / "flwr"),
                                                                             "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = out.glob("*.fab")
    return fab


def test_fab_holds_only_server_client_shared(tmp_path):
    # Flower wants the app folder named like an app (letters, digits, hyphens); a checkout may be named
    # anything, so build a copy of it (tests, simulations, deploy and docs included: they must stay out).
    app = tmp_path / "fedcam"
    top = {".venv", ".git", "data", "runs"}  # at the top only: shared/data is part of the app

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n == "__pycache__" or (Path(folder) == ROOT and n in top)}

    shutil.copytree(ROOT, app, ignore=ignore)
    fab = build_fab(app, tmp_path / "checkout")
    names = zipfile.ZipFile(fab).namelist()
    assert {n.split("/")[0] for n in names} <= {"server", "client", "shared", "pyproject.toml", ".info"}
    assert "server/federation/server_app.py" in names and "client/client_app.py" in names
    assert "server/snapshots/pipeline.py" in names  # the ServerApp makes snapshots after its rounds
    assert "shared/data/dataset.py" in names  # the ClientApp reads its camera's frames
    tooling = ("server/local/", "server/cli/", "server/web/", "client/runtime/")  # no node runs these
    assert not [n for n in names if n.startswith(tooling)]
    # What `fedcam simulate` and the loopback deployment hand to `flwr run`: the same FAB, to the byte (its name
    # carries the hash of its content), from a copy that leaves the venv, worlds and runs out of Flower's walk.
    from server.local.simulation import app_source

    staged = app_source(tmp_path / "staged" / "app")
    assert not (staged / ".venv").exists() and not (staged / "tests").exists()
    assert build_fab(staged, tmp_path / "from-staged").name == fab.name


def test_repo_root_is_not_on_sys_path():
    code = "import sys, shared; print(any(p.rstrip('/') == %r for p in sys.path))" % str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def tiny_snapshot(folder: Path, imgsz: int = 32) -> Path:
    """A detector-shaped model (each output is the pixel's mean) and its manifest: one box on a uniform frame."""
    import onnx
    from onnx import TensorProto, helper

    from shared.snapshot.format import MODEL_FILE, MANIFEST_FILE, Manifest, sha256_file

    folder.mkdir(parents=True)
    nc, model = 2, folder / MODEL_FILE
    k = helper.make_tensor("k", TensorProto.FLOAT, [4 + nc, 3, 1, 1], [1 / 3] * ((4 + nc) * 3))
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, 4 + nc, imgsz * imgsz])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "k"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["output0"])],
        "mean", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, imgsz, imgsz])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + nc, imgsz * imgsz])], [k, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    m = Manifest(version="v0001", round=1, target="x86", sha256=sha256_file(model), size=model.stat().st_size,
                 imgsz=imgsz, names=["a", "b"], map50_fp32=0, map50_int8=0, map_fp32=0, map_int8=0, latency_ms=0,
                 created="2000-01-01T00:00:00Z", parent_checkpoint="")
    (folder / MANIFEST_FILE).write_bytes(m.to_bytes())
    return folder


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_base_install_is_the_device_runtime_without_torch(tmp_path):
    # A fresh venv and a plain (non-editable) `pip install <repo>` from a copy of the repository: no extra, no
    # requirements file. pip fetches the device runtime's dependencies (about 14 s here, 351 MB of venv).
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "data", "runs", "__pycache__",
                                                             ".pytest_cache"))
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    out = subprocess.run([py, "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True, env=env,
                         cwd=work, timeout=1500)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    seconds = time.monotonic() - started
    size = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True).stdout.split()[0]
    print(f"\nbase install: {seconds:.1f} s, venv {size} MB")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, env=env, cwd=work, timeout=300)

    code = ("import importlib.util; "
            "import client.runtime.cli, client.runtime.agent, client.runtime.collector; "
            "import shared.snapshot.format, shared.snapshot.inference; "
            "print([m for m in ('torch', 'torchvision', 'flwr', 'ultralytics', 'typer') "
            "if importlib.util.find_spec(m) is not None])")
    out = run(py, "-c", code)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "[]", out.stdout  # none of the training stack is installed
    out = run(py, "-m", "pip", "check")
    assert out.returncode == 0, out.stdout + out.stderr

    device = str(venv / "bin" / "fedcam-device")
    out = run(device, "--help")
    assert out.returncode == 0 and "detect" in out.stdout and "collect" in out.stdout, out.stdout + out.stderr

    # And it runs: a snapshot through cv2, onnxruntime and the numpy decode, on a frame the colour of the letterbox
    # padding (every anchor alike, so NMS leaves one box).
    snap = tiny_snapshot(tmp_path / "snap")
    frame = tmp_path / "grey.png"
    cv2_code = f"import cv2, numpy as np; cv2.imwrite({str(frame)!r}, np.full((48, 64, 3), 114, np.uint8))"
    assert run(py, "-c", cv2_code).returncode == 0
    out = run(device, "detect", "--snapshot", str(snap), "--source", str(frame))
    assert out.returncode == 0, out.stdout + out.stderr
    (line,) = out.stdout.splitlines()
    result = json.loads(line)
    assert result["snapshot"] == "v0001" and len(result["boxes"]) == 1 and result["classes"] == ["a"], result
