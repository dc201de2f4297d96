"""`fedcam-device`: detect with a snapshot, run the update agent, collect frames, or check a snapshot (numpy/onnxruntime/cv2 only)."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def frames(source: str) -> Iterator[tuple[str, np.ndarray]]:
    """Frames from an image, a folder of images, a video file, a camera index or an RTSP/HTTP URL."""
    path = Path(source)
    if path.is_dir():
        for p in sorted(q for q in path.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES):
            img = cv2.imread(str(p))
            if img is None:
                logging.warning("skipping unreadable image %s", p)
                continue
            yield str(p), img
        return
    if path.suffix.lower() in IMAGE_SUFFIXES:
        img = cv2.imread(str(path))
        if img is None:
            raise SystemExit(f"cannot read image {path}")
        yield str(path), img
        return
    cap = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not cap.isOpened():
        raise SystemExit(f"cannot open source {source}")
    i = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        yield f"{source}#{i}", img
        i += 1
    cap.release()


def draw(img: np.ndarray, det, names: list[str]) -> np.ndarray:
    out = img.copy()
    for (x1, y1, x2, y2), s, c in zip(det.boxes.astype(int), det.scores, det.classes):
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 255, 0), 2)
        cv2.putText(out, f"{names[c]} {s:.2f}", (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 0), 1)
    return out


class Meter:
    """Rolling latency and FPS over the last N frames."""

    def __init__(self, n: int = 50):
        self.lat, self.stamps = collections.deque(maxlen=n), collections.deque(maxlen=n)

    def add(self, latency_ms: float) -> str:
        self.lat.append(latency_ms)
        self.stamps.append(time.perf_counter())
        fps = (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0]) if len(self.stamps) > 1 else 0.0
        return f"latency p50 {np.median(self.lat):.1f} ms, {fps:.1f} FPS"


def emit(frame_id: str, det, names: list[str], version: str, annotate: Path | None, img: np.ndarray) -> None:
    print(json.dumps({"frame": frame_id, "snapshot": version, **det.as_dict(names)}), flush=True)
    if annotate:
        annotate.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(annotate / (Path(frame_id.replace("#", "_")).stem + ".jpg")), draw(img, det, names))


def cmd_detect(args) -> None:
    from shared.snapshot.format import MODEL_FILE, Manifest, MANIFEST_FILE
    from shared.snapshot.inference import Detector, device_settings

    folder = Path(args.snapshot)
    manifest = Manifest.from_bytes((folder / MANIFEST_FILE).read_bytes())
    detector = Detector(folder / MODEL_FILE, manifest.imgsz, device_settings(manifest, args.conf), args.threads)
    meter = Meter()
    for frame_id, img in frames(args.source):
        det = detector.detect(img)
        emit(frame_id, det, manifest.names, manifest.version, args.annotate, img)
        print(meter.add(det.latency_ms), file=sys.stderr)


def cmd_run(args) -> None:
    from client.runtime.agent import Agent

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    agent = Agent(args.server, args.state, Path(args.key).read_bytes(), args.threads, args.conf,
                  camera_id=args.camera_id, ca_file=args.ca, token=token,
                  max_download=int(args.max_download_mb * 2**20))
    stop = threading.Event()
    poller = threading.Thread(target=agent.poll_forever, args=(args.poll, stop), daemon=True)
    poller.start()
    meter = Meter()
    try:
        while not stop.is_set():
            for frame_id, img in frames(args.source):
                det, manifest = agent.detect(img)
                if det is not None:
                    emit(frame_id, det, manifest.names, manifest.version, args.annotate, img)
                    print(meter.add(det.latency_ms), file=sys.stderr)
            if not args.loop:
                break
    finally:
        stop.set()


def cmd_check(args) -> None:
    """Verify a snapshot against the pinned key, run it on frames and save what it computed, to compare devices."""
    from shared.cpu_isa import int8_kernel_note
    from shared.snapshot.format import MODEL_FILE, load_public_key, verify_dir
    from shared.snapshot.inference import Detector, device_settings, letterbox, session, to_chw_rgb

    folder = Path(args.snapshot)
    manifest = verify_dir(folder, load_public_key(Path(args.key).read_bytes()))
    if (note := int8_kernel_note(manifest.target)) and not args.unoptimized:
        logging.warning("snapshot %s: %s", manifest.version, note)
    detector = Detector(folder / MODEL_FILE, manifest.imgsz, device_settings(manifest, args.conf), args.threads,
                        not args.unoptimized)
    # The probe: the same graph with inner tensors as extra outputs (made by the host from this model). It is a
    # diagnostic, not a snapshot: nothing of it is installed.
    probe = session(args.probe, args.threads, not args.unoptimized) if args.probe else None
    probed = [o.name for o in probe.get_outputs()] if probe is not None else []
    out: dict[str, np.ndarray] = {}
    for i, (frame_id, img) in enumerate(frames(args.source)):
        det = detector.detect(img)
        out.update({f"{i}/boxes": det.boxes, f"{i}/scores": det.scores, f"{i}/classes": det.classes})
        x = to_chw_rgb(letterbox(img, detector.imgsz)[0])[None]
        out[f"{i}/raw"] = detector.raw(x)
        if probe is not None:
            for name, value in zip(probed, probe.run(None, {detector.input: x.astype(np.float32) / 255.0})):
                out[f"{i}/tensor/{name}"] = value
        emit(frame_id, det, manifest.names, manifest.version, args.annotate, img)
    if not out:
        raise SystemExit(f"no readable frame in {args.source}")
    np.savez_compressed(args.out, **out)
    logging.info("snapshot %s verified; %d frames run; results in %s", manifest.version,
                 len({k.split("/")[0] for k in out}), args.out)


def cmd_collect(args) -> None:
    from client.runtime.collector import FrameStore, collect

    store = FrameStore(args.store, [n.strip() for n in args.names.split(",") if n.strip()], args.max_frames)
    n = collect(frames(args.source), store, args.every, args.min_change, args.max_new)
    logging.info("stored %d new frames; %s holds %d (bound %d)", n, store.pool, len(store.frames()), args.max_frames)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ap = argparse.ArgumentParser(prog="fedcam-device", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("detect", "run", "check"):
        p = sub.add_parser(name)
        p.add_argument("--source", required=True, help="image, folder, video, camera index or RTSP URL")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--conf", type=float, default=0.25)
        p.add_argument("--annotate", type=Path, default=None, help="write annotated frames here")
    sub.choices["detect"].add_argument("--snapshot", required=True, help="snapshot folder (model.onnx + manifest)")
    check = sub.choices["check"]
    check.add_argument("--snapshot", required=True, help="snapshot folder, verified before it runs")
    check.add_argument("--key", required=True, help="the server's public key (PEM)")
    check.add_argument("--out", type=Path, required=True, help="write raw outputs and detections here (.npz)")
    check.add_argument("--probe", default=None, help="the model with inner tensors as extra outputs, also saved")
    check.add_argument("--unoptimized", action="store_true",
                       help="run the graph as written: int8 as float arithmetic, the reference for comparing CPUs")
    run = sub.choices["run"]
    run.add_argument("--server", required=True, help="registry URL, e.g. http://127.0.0.1:8080")
    run.add_argument("--state", type=Path, default=Path.home() / ".fedcam-device")
    run.add_argument("--camera-id", default=None,
                     help="follow this camera's own snapshot channel (falls back to the global one when that is newer)")
    run.add_argument("--key", required=True, help="the server's public key (PEM), pinned at install time")
    run.add_argument("--ca", default=None, help="CA certificate the https registry is checked against (deploy/certs.sh)")
    run.add_argument("--token-file", default=None, help="file holding this device's registry token (fedcam tokens)")
    run.add_argument("--poll", type=float, default=30.0, help="seconds between update checks")
    run.add_argument("--max-download-mb", type=float, default=64.0, help="largest response the agent accepts")
    run.add_argument("--loop", action="store_true", help="replay the source forever (files)")
    col = sub.add_parser("collect", help="sample frames of a camera or video into a bounded local store")
    col.add_argument("--source", required=True, help="video file, camera index, RTSP URL or folder")
    col.add_argument("--store", type=Path, required=True, help="store folder: the SuperNode's data-path")
    col.add_argument("--names", required=True, help="class names, comma separated (as the server's model)")
    col.add_argument("--max-frames", type=int, default=500, help="bound of the pool; oldest frames go first")
    col.add_argument("--every", type=float, default=2.0, help="seconds between stored frames")
    col.add_argument("--min-change", type=float, default=4.0, help="mean grey-level change to count as new")
    col.add_argument("--max-new", type=int, default=None, help="stop after storing this many frames")
    args = ap.parse_args(argv)
    {"detect": cmd_detect, "run": cmd_run, "collect": cmd_collect, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    main()
