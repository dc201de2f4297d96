"""Offline process environment: no Ultralytics, Ray or Flower traffic leaves this machine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Where fedcam keeps its own Ultralytics settings and font; never the user's ~/.config.
STATE_DIR = Path(os.environ.get("FEDCAM_STATE_DIR", Path.home() / ".cache" / "fedcam"))

OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "False",
    "YOLO_VERBOSE": "False",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def _install_font(config_dir: Path) -> None:
    """Ultralytics looks for Arial.ttf and downloads it if missing; give it matplotlib's DejaVuSans."""
    target = config_dir / "Ultralytics" / "Arial.ttf"
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib  # only to find its bundled font; cheap compared with torch

    src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)  # atomic: concurrent processes never see half a font


def setup_offline() -> dict[str, str]:
    """Set the offline variables (unless already set); cheap, imports nothing. Return them."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(STATE_DIR / "yolo"))
    return {k: os.environ[k] for k in [*OFFLINE_ENV, "YOLO_CONFIG_DIR"]}


def prepare_ultralytics() -> None:
    """Call before importing Ultralytics: offline variables plus the font it would otherwise download."""
    setup_offline()
    _install_font(Path(os.environ["YOLO_CONFIG_DIR"]))


def ray_home(base: Path) -> Path:
    """A HOME for Ray processes holding ray_bootstrap_config.yaml, so Ray skips its cloud-metadata probe."""
    base.mkdir(parents=True, exist_ok=True)
    cfg = base / "ray_bootstrap_config.yaml"
    if not cfg.exists():
        cfg.write_text("provider:\n  type: local\n")
    return base
