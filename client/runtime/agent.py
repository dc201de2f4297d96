"""Device agent: pull signed snapshots (its camera's channel, else the global one), verify, smoke-test, swap between
frames, roll back; state survives reboot."""

from __future__ import annotations

import hashlib
import logging
import shutil
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from client.runtime.state import load_state, save_state
from shared.cpu_isa import int8_kernel_note
from shared.snapshot.delta import DeltaError, apply_delta, delta_name
from shared.snapshot.format import (MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, Manifest, SnapshotError,
                                    load_public_key, verify_dir, verify_manifest)
from shared.snapshot.inference import Detector, device_settings
from shared.snapshot.packed import PACKED_FILE, PackedError, unpack_model

log = logging.getLogger("fedcam.device")
BAD_FRAMES_BEFORE_ROLLBACK = 3


class Agent:
    def __init__(self, server: str, state_dir: Path | str, public_key_pem: bytes, threads: int = 1,
                 conf: float = 0.25, timeout: float = 10.0, camera_id: str | None = None,
                 ca_file: Path | str | None = None, token: str | None = None, max_download: int = 64 << 20):
        self.server, self.dir, self.timeout = server.rstrip("/"), Path(state_dir), timeout
        self.max_download = max_download  # bytes one response may have: a camera has ~1 GB of RAM and a small disk
        if token and not self.server.startswith("https://"):
            raise ValueError(f"{server}: a token goes over https only (the registry off loopback speaks TLS)")
        # https: the server is checked against the given CA (the deploy PKI), else the system's
        self.tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) \
            if self.server.startswith("https://") else None
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.camera = camera_id
        self.key = load_public_key(public_key_pem)
        self.threads, self.conf = threads, conf
        (self.dir / "snapshots").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.dir / "staging", ignore_errors=True)  # a download cut short by a crash or power loss
        self.state = load_state(self.dir, self.key)
        self.lock = threading.Lock()
        self.detector: Detector | None = None
        self.manifest: Manifest | None = None
        self.bad_frames = 0
        self.downloaded = 0  # bytes the last install fetched
        if self.state.get("current"):  # after a reboot: the last good snapshot, verified again
            self._activate(self.state["current"])

    def _save_state(self) -> None:
        save_state(self.dir, self.state)

    # --- inference -------------------------------------------------------------------------------------
    def detect(self, frame: np.ndarray):
        """Run the active snapshot on a frame; repeated failures of a new snapshot roll back to the previous."""
        with self.lock:  # the swap happens between frames, never during one
            detector, manifest = self.detector, self.manifest
        if detector is None:
            return None, None
        try:
            result = detector.detect(frame)
            if not np.isfinite(result.scores).all() or not np.isfinite(result.boxes).all():
                raise FloatingPointError("non-finite detections")
            self.bad_frames = 0
            return result, manifest
        except Exception as err:  # noqa: BLE001 - any failure of the model counts against it
            self.bad_frames += 1
            log.warning("snapshot %s failed on a frame (%s)", manifest.version, err)
            if self.bad_frames >= BAD_FRAMES_BEFORE_ROLLBACK and self.state.get("previous"):
                self.rollback(f"{err}")
            return None, manifest

    def rollback(self, reason: str) -> None:
        bad, previous = self.state["current"], self.state["previous"]
        log.error("rolling back %s -> %s: %s", bad, previous, reason)
        self.state["bad"] = sorted(set(self.state["bad"]) | {bad})
        self.state["current"], self.state["previous"] = previous, None
        self._save_state()
        self._activate(previous)
        self.bad_frames = 0
        shutil.rmtree(self.dir / "snapshots" / bad, ignore_errors=True)  # never served again, nor recovered

    def _activate(self, version: str) -> None:
        folder = self.dir / "snapshots" / version
        manifest = verify_dir(folder, self.key)  # re-checked on every activation, reboots included
        if note := int8_kernel_note(manifest.target):
            log.warning("snapshot %s: %s", version, note)
        detector = Detector(folder / MODEL_FILE, manifest.imgsz, device_settings(manifest, self.conf), self.threads)
        with self.lock:
            self.detector, self.manifest = detector, manifest

    # --- updates ---------------------------------------------------------------------------------------
    def _get(self, path: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
        req = urllib.request.Request(self.server + path, headers={**self.auth, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.tls) as resp:
                declared = int(resp.headers.get("Content-Length") or 0)
                body = resp.read(min(declared, self.max_download + 1) if declared else self.max_download + 1)
                if declared > self.max_download or len(body) > self.max_download:
                    raise SnapshotError(f"{path}: the response is larger than this device's download limit "
                                        f"({self.max_download} bytes)")
                return resp.status, body, dict(resp.headers)
        except urllib.error.HTTPError as err:
            if err.code == 304:
                return 304, b"", dict(err.headers)
            raise

    def poll_once(self) -> str:
        """One check for a new snapshot: 'unchanged', 'updated ID', or raises on network/verification errors.
        ID is vNNNN for a global snapshot, CAMERA@vNNNN for one of this camera's own."""
        if self.camera is not None:
            return self._poll_camera()
        status, body, headers = self._get("/api/snapshots/latest",
                                          {"If-None-Match": self.state["etag"]} if self.state.get("etag") else {})
        if status == 304:
            return "unchanged"
        version = Manifest.from_bytes(body).version
        if version == self.state.get("current") or version in self.state.get("bad", []):
            return "unchanged"
        self.install(version)
        self.state["etag"] = headers.get("ETag") or headers.get("etag")
        self._save_state()
        return f"updated {version}"

    def _poll_camera(self) -> str:
        """This camera's newest snapshot, unless the global channel has one made after it (its base is older)."""
        own, glob = self._latest(f"/api/cameras/{self.camera}/snapshots/latest"), self._latest("/api/snapshots/latest")
        if own is not None and (glob is None or _number(own.extra.get("base_snapshot", "")) >= _number(glob.version)):
            version, camera = own.version, self.camera
        elif glob is not None:
            version, camera = glob.version, None
        else:
            return "unchanged"
        ident = f"{camera}@{version}" if camera else version
        if ident == self.state.get("current") or ident in self.state.get("bad", []):
            return "unchanged"
        self.install(version, camera)
        return f"updated {ident}"

    def _latest(self, path: str) -> Manifest | None:
        try:
            return Manifest.from_bytes(self._get(path)[1])
        except urllib.error.HTTPError as err:
            if err.code == 404:  # nothing published on that channel yet
                return None
            raise

    def install(self, version: str, camera: str | None = None) -> None:
        """Download to staging, verify signature and hash, smoke-test, then swap it in; the old one is kept."""
        ident, base = (f"{camera}@{version}", f"/api/cameras/{camera}/snapshots") if camera else (version, "/api/snapshots")
        staging = self.dir / "staging" / ident
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.downloaded = 0  # bytes of this install, the delta or the whole model
        try:
            manifest = self._download(staging, version, camera, ident, base)
        except BaseException:  # a refused, cut or disk-full download leaves nothing behind to fill the disk
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._swap_in(staging, ident, manifest)

    def _download(self, staging: Path, version: str, camera: str | None, ident: str, base: str) -> Manifest:
        """Manifest, signature and model (whole, or rebuilt from a delta or packed form) into `staging`, verified."""
        for name in (MANIFEST_FILE, SIGNATURE_FILE):
            self._fetch(f"{base}/{version}/{name}", staging / name)
        url = f"{base}/{version}"
        try:  # what the signed manifest offers besides the whole model: a delta from this device's, a packed form
            signed = verify_manifest((staging / MANIFEST_FILE).read_bytes(), (staging / SIGNATURE_FILE).read_bytes(),
                                     self.key)
        except SnapshotError:
            signed = None  # verify_dir below names the failure, after the whole download
        if not (signed and (self._rebuild_from_delta(staging, url, camera, signed)
                            or self._rebuild_from_packed(staging, url, signed))):
            self._fetch(f"{url}/{MODEL_FILE}", staging / MODEL_FILE)
        # A bad signature or hash may be a truncated download: retried later, not blacklisted.
        manifest = verify_dir(staging, self.key)
        if manifest.version != version:
            raise SnapshotError(f"manifest names {manifest.version}, expected {version}")
        if manifest.extra.get("camera") != camera:  # signed for another camera (or the global channel)
            raise SnapshotError(f"snapshot {ident} is signed for camera {manifest.extra.get('camera')!r}, "
                                f"not {camera!r}")
        return manifest

    def _swap_in(self, staging: Path, ident: str, manifest: Manifest) -> None:
        """Smoke-test the verified download, then make it current; the old one stays as previous."""
        try:  # a signed model that does not run is broken for good: never try it again
            smoke = Detector(staging / MODEL_FILE, manifest.imgsz, threads=self.threads)
            (out,) = smoke.raw(np.zeros((1, 3, manifest.imgsz, manifest.imgsz), np.uint8))
            if out.ndim != 2 or out.shape[0] != 4 + len(manifest.names) or not np.isfinite(out).all():
                raise SnapshotError(f"output {out.shape} or non-finite")
        except Exception as err:
            shutil.rmtree(staging, ignore_errors=True)
            self.state["bad"] = sorted(set(self.state.get("bad", [])) | {ident})
            self._save_state()
            raise SnapshotError(f"snapshot {ident} failed its smoke test: {err}") from err
        final = self.dir / "snapshots" / ident
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        self.state["previous"], self.state["current"] = self.state.get("current"), ident
        self._save_state()
        self._activate(ident)
        self._prune_old()

    def _fetch(self, path: str, to: Path) -> bytes:
        _, data, _ = self._get(path)
        self.downloaded += len(data)
        to.write_bytes(data)
        return data

    def _rebuild_from_delta(self, staging: Path, url: str, camera: str | None, manifest: Manifest) -> bool:
        """The new model from the one this device runs plus the delta the signed manifest names, when it has one
        from that version; False (download it whole) if there is none or it does not rebuild the signed model."""
        current = self.state.get("current") or ""
        held = current.split("@")[-1] if current.startswith(f"{camera}@") or (camera is None and "@" not in current) else ""
        delta = manifest.extra.get("delta") or {}
        if not held or delta.get("from") != held:
            return False
        old = self.dir / "snapshots" / current / MODEL_FILE
        return self._rebuild(staging, f"{url}/{delta_name(held)}", delta, manifest,
                             lambda data: apply_delta(old.read_bytes(), data), f"delta {held} -> {manifest.version}")

    def _rebuild_from_packed(self, staging: Path, url: str, manifest: Manifest) -> bool:
        """A weight-shared model from its indices + codebooks, when the signed manifest names them; False (download
        it whole) if there are none or they do not rebuild the signed model."""
        packed = manifest.extra.get("packed") or {}
        return bool(packed) and self._rebuild(staging, f"{url}/{PACKED_FILE}", packed, manifest, unpack_model,
                                              f"packed {manifest.version}")

    def _rebuild(self, staging: Path, path: str, entry: dict, manifest: Manifest, build, what: str) -> bool:
        """Fetch `path`, check it against the manifest's `entry`, build the model from it and check that against the
        signed sha256; False (and a warning) if any step fails."""
        try:
            _, data, _ = self._get(path)
            self.downloaded += len(data)
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                raise DeltaError(f"{what}: sha256 does not match the signed manifest")
            model = build(data)
            if hashlib.sha256(model).hexdigest() != manifest.sha256:
                raise DeltaError(f"{what}: the rebuilt model's sha256 does not match the signed manifest")
        except (OSError, DeltaError, PackedError) as err:
            log.warning("%s not used (%s); downloading the whole model", what, err)
            return False
        (staging / MODEL_FILE).write_bytes(model)
        return True

    def _prune_old(self) -> None:
        keep = {self.state.get("current"), self.state.get("previous")}
        for folder in (self.dir / "snapshots").iterdir():
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def poll_forever(self, interval: float, stop: threading.Event, max_backoff: float = 300.0) -> None:
        """Poll until `stop`; network errors and rejected snapshots back off exponentially."""
        delay = interval
        while not stop.is_set():
            try:
                result = self.poll_once()
                if result != "unchanged":
                    log.info(result)
                delay = interval
            except (OSError, SnapshotError, ValueError) as err:
                log.warning("update check failed: %s (next try in %.0fs)", err, delay)
                delay = min(max_backoff, delay * 2)
            stop.wait(delay)


def _number(version: str) -> int:
    """vNNNN -> NNNN (-1 for anything else: never newer than a real version)."""
    return int(version[1:]) if version[:1] == "v" and version[1:].isdigit() else -1
