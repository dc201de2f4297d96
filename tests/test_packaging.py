"""Packaging: Flower's FAB holds only the three packages; the editable install does not expose the repo root."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import shared

ROOT = Path(shared.__file__).resolve().parents[1]


def test_fab_holds_only_server_client_shared(tmp_path):
    # Flower wants the app folder named like an app (letters, digits, hyphens); a checkout may be named
    # anything, so build a copy of it (tests, simulations, deploy and docs included: they must stay out).
    app = tmp_path / "fedcam"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(".venv", ".git", "data", "runs", "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "flwr.cli.app", "build", "--app", str(app)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={"FLWR_HOME": str(tmp_path / "flwr"),
                                                                            "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert {n.split("/")[0] for n in names} <= {"server", "client", "shared", "pyproject.toml", ".info"}
    assert "server/server_app.py" in names and "client/client_app.py" in names


def test_repo_root_is_not_on_sys_path():
    code = "import sys, shared; print(any(p.rstrip('/') == %r for p in sys.path))" % str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.stdout.strip() == "False", out.stderr
