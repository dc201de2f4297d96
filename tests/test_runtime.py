"""Device runtime: the update agent against a real registry server over HTTP (swap, reject, roll back, outages)."""

from __future__ import annotations

import json
import logging
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from client.runtime.agent import Agent
from server.snapshots.export import export_onnx
from server.snapshots.registry import Registry, now_iso
from shared.snapshot.format import MODEL_FILE, Manifest, SnapshotError, sha256_file

pytestmark = pytest.mark.slow


# --- the agent against a real registry server ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RegistryServer:
    """`fedcam serve` in a child process on loopback, stopped by PID."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--registry", str(self.root),
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()
                time.sleep(0.2)
        raise TimeoutError("registry server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def publish(registry: Registry, model: Path, names: list[str], imgsz: int = 64, camera: str | None = None,
            base: str = "", target: str = "x86") -> str:
    """A signed snapshot on the global channel, or on `camera`'s own channel made from global snapshot `base`."""
    version = registry.next_version(camera)
    m = Manifest(version=version, round=1, target=target, sha256=sha256_file(model), size=model.stat().st_size,
                 imgsz=imgsz, names=names, map50_fp32=0, map50_int8=0, map_fp32=0, map_int8=0, latency_ms=0,
                 created=now_iso(), parent_checkpoint="",
                 extra={"camera": camera, "base_snapshot": base} if camera else {})
    registry.publish(m, model, camera)
    return version


def nan_on_real_frames(path: Path, nc: int, imgsz: int = 64) -> Path:
    """A valid detector-shaped model that is finite on the all-black smoke frame and NaN on any real frame."""
    k = helper.make_tensor("k", TensorProto.FLOAT, [4 + nc, 3, 1, 1], [1.0] * ((4 + nc) * 3))
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1, 4 + nc, imgsz * imgsz])
    graph = helper.make_graph(
        [helper.make_node("Neg", ["images"], ["n"]), helper.make_node("Sqrt", ["n"], ["s"]),
         helper.make_node("Conv", ["s", "k"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["output0"])],
        "nan", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, imgsz, imgsz])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + nc, imgsz * imgsz])], [k, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture()
def fleet(tmp_path, tiny_student):
    registry = Registry(tmp_path / "registry", tmp_path / "key.pem")
    server = RegistryServer(registry.root).start()
    models = []
    for i in range(2):  # two genuinely different snapshots
        for p in tiny_student.parameters():
            p.data.mul_(0.9)
        models.append(export_onnx(tiny_student, tmp_path / f"m{i}.onnx", 64, {}))
    yield registry, server, models, tmp_path
    server.stop()


def test_agent_swaps_rejects_rolls_back_and_survives_outages(fleet, tiny_cfg):
    registry, server, (m1, m2), tmp = fleet
    names = tiny_cfg.data.names
    key = (registry.root / "server_public_key.pem").read_bytes()
    agent = Agent(server.url, tmp / "device", key, timeout=5)
    frame = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    assert agent.detect(frame) == (None, None)  # nothing installed yet
    v1 = publish(registry, m1, names)
    assert agent.poll_once() == f"updated {v1}" and agent.poll_once() == "unchanged"

    # a new version is swapped in while frames keep flowing: every frame gets an answer
    results, stop = [], threading.Event()

    def camera():
        for _ in range(400):
            if stop.is_set():
                break
            results.append(agent.detect(frame)[0])

    cam = threading.Thread(target=camera)
    cam.start()
    v2 = publish(registry, m2, names)
    assert agent.poll_once() == f"updated {v2}"
    time.sleep(0.2)
    stop.set()
    cam.join(timeout=60)
    assert results and all(r is not None for r in results)
    assert agent.detect(frame)[1].version == v2

    # tampered after signing: refused, old one keeps serving, retried later (not blacklisted)
    v3 = publish(registry, m1, names)
    for served in [registry.folder() / v3 / MODEL_FILE, *(registry.folder() / v3).glob("delta-*.bin")]:
        data = bytearray(served.read_bytes())  # the model and any delta that rebuilds it
        data[-100] ^= 0xFF
        served.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="sha256"):
        agent.poll_once()
    assert agent.detect(frame)[1].version == v2 and v3 not in agent.state["bad"]

    # a signed model that passes the smoke test but fails on real frames is rolled back
    v4 = publish(registry, nan_on_real_frames(tmp / "nan.onnx", len(names)), names)
    assert agent.poll_once() == f"updated {v4}"
    for _ in range(3):
        assert agent.detect(frame)[0] is None
    assert agent.detect(frame)[1].version == v2 and v4 in agent.state["bad"]
    assert agent.poll_once() == "unchanged"  # the bad one is never taken again

    # server outage: polling fails, detection goes on; after the restart polling works again
    server.stop()
    with pytest.raises(OSError):
        agent.poll_once()
    assert agent.detect(frame)[0] is not None
    server.start()
    v5 = publish(registry, m1, names)
    assert agent.poll_once() == f"updated {v5}"

    # reboot: a fresh agent on the same state folder serves the same snapshot, verified again
    rebooted = Agent(server.url, tmp / "device", key)
    assert rebooted.detect(frame)[1].version == v5


def test_agent_follows_its_cameras_channel_and_falls_back_to_the_global_one(fleet, tiny_cfg):
    registry, server, models, tmp = fleet
    names, frame = tiny_cfg.data.names, np.zeros((64, 64, 3), np.uint8)
    key = (registry.root / "server_public_key.pem").read_bytes()
    agent = Agent(server.url, tmp / "device", key, timeout=5, camera_id="cam00")
    assert agent.poll_once() == "unchanged"  # nothing published anywhere yet
    g1 = publish(registry, models[0], names)
    assert agent.poll_once() == f"updated {g1}"  # no snapshot of its own yet: the global one
    c1 = publish(registry, models[1], names, camera="cam00", base=g1)
    assert agent.poll_once() == f"updated cam00@{c1}"
    assert agent.detect(frame)[1].extra["camera"] == "cam00"
    publish(registry, models[0], names, camera="cam01", base=g1)  # another camera's channel is not its concern
    assert agent.poll_once() == "unchanged"
    g2 = publish(registry, models[0], names)  # the global channel moves past its own snapshot's base
    assert agent.poll_once() == f"updated {g2}"
    c2 = publish(registry, models[1], names, camera="cam00", base=g2)
    model = registry.folder("cam00") / c2 / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))  # tampered on the server: refused, and it keeps running what it runs
    with pytest.raises(SnapshotError, match="sha256"):
        agent.poll_once()
    assert agent.state["current"] == g2 and agent.detect(frame)[1].version == g2
    # Camera 1's genuine, signed snapshot put on camera 0's channel is refused too: it names its camera.
    for _ in range(2):
        c3 = publish(registry, models[1], names, camera="cam01", base=g2)
    (registry.folder("cam00") / c3).mkdir()
    for name in ("manifest.json", "manifest.sig", MODEL_FILE):
        (registry.folder("cam00") / c3 / name).write_bytes((registry.folder("cam01") / c3 / name).read_bytes())
    (registry.folder("cam00") / "latest.json").write_text((registry.folder("cam01") / "latest.json").read_text())
    with pytest.raises(SnapshotError, match="signed for camera 'cam01'"):
        agent.poll_once()
    assert Agent(server.url, tmp / "device", key, camera_id="cam00").state["current"] == g2  # after a reboot too


def test_the_global_channel_has_a_folder_of_its_own_and_an_older_registry_goes_on_where_it_is(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not a real model: the registry only stores and signs it")
    key = tmp_path / "key.pem"
    fresh = Registry(tmp_path / "new", key)
    v1 = publish(fresh, model, ["a"])
    assert (tmp_path / "new" / "global" / v1 / MODEL_FILE).exists() and fresh.latest()["version"] == v1
    assert not (tmp_path / "new" / v1).exists()
    old = tmp_path / "old"  # as written before: ROOT/vNNNN and ROOT/latest.json
    (old / "v0001").mkdir(parents=True)
    (old / "latest.json").write_text(json.dumps({"version": "v0001", "sha256": "", "round": 1}))
    legacy = Registry(old, key)
    assert legacy.folder() == old and legacy.latest()["version"] == "v0001"  # its next snapshot goes there too


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the note is about x86 int8 kernels")
def test_an_arm64_snapshot_on_x86_without_vnni_runs_with_a_warning_an_x86_one_without(fleet, tiny_cfg, monkeypatch,
                                                                                      caplog):
    registry, server, (m1, m2), tmp = fleet
    monkeypatch.setenv("FEDCAM_CPUID_MASK", "avx2")  # what a process held to AVX2 sees, whatever this CPU has
    agent = Agent(server.url, tmp / "device", (registry.root / "server_public_key.pem").read_bytes(), timeout=5)
    frame = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    with caplog.at_level(logging.WARNING, logger="fedcam.device"):
        v1 = publish(registry, m1, tiny_cfg.data.names, target="x86")
        assert agent.poll_once() == f"updated {v1}"
        v2 = publish(registry, m2, tiny_cfg.data.names, target="arm64")
        assert agent.poll_once() == f"updated {v2}"
    warned = [r.getMessage() for r in caplog.records if "VNNI" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"snapshot {v2}:") and "snapshot.target=x86" in warned[0]
    assert agent.detect(frame)[1].version == v2  # it still runs: a warning, not a refusal


def one_weight_changed(model: Path, out: Path, seed: int) -> Path:
    """The same graph with one conv's weights moved: what a round does to a snapshot of one structure."""
    from onnx import numpy_helper

    proto = onnx.load(str(model))
    init = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    value = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(value + np.random.default_rng(seed).normal(0, 1e-3, value.shape)
                                          .astype(value.dtype), init.name))
    onnx.save(proto, str(out))
    return out


def test_a_device_downloads_only_what_changed_and_a_bad_delta_costs_a_whole_download(fleet, tiny_cfg):
    registry, server, (m1, _), tmp = fleet
    names, key = tiny_cfg.data.names, (registry.root / "server_public_key.pem").read_bytes()
    agent = Agent(server.url, tmp / "device", key, timeout=5)
    v1 = publish(registry, m1, names)
    assert agent.poll_once() == f"updated {v1}" and agent.downloaded > m1.stat().st_size
    m2 = one_weight_changed(m1, tmp / "m2.onnx", 1)
    v2 = publish(registry, m2, names)
    manifest = json.loads((registry.folder() / v2 / "manifest.json").read_text())
    assert manifest["extra"]["delta"]["from"] == v1  # named in what is signed
    assert agent.poll_once() == f"updated {v2}"
    assert agent.downloaded < m2.stat().st_size / 4  # the delta and the manifest, not the model
    assert sha256_file(tmp / "device" / "snapshots" / v2 / MODEL_FILE) == sha256_file(m2)
    frame = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    assert agent.detect(frame)[1].version == v2
    # A delta tampered with on the server: the device notices and downloads the whole model instead.
    m3 = one_weight_changed(m2, tmp / "m3.onnx", 2)
    v3 = publish(registry, m3, names)
    delta = registry.folder() / v3 / f"delta-{v2}.bin"
    body = bytearray(delta.read_bytes())
    body[-10] ^= 0xFF
    delta.write_bytes(bytes(body))
    assert agent.poll_once() == f"updated {v3}" and agent.downloaded > m3.stat().st_size
    assert sha256_file(tmp / "device" / "snapshots" / v3 / MODEL_FILE) == sha256_file(m3)


def test_a_weight_shared_snapshot_downloads_as_indices_and_codebooks(fleet, tiny_cfg, tiny_student):
    from server.snapshots.cluster import freeze_shared, share_weights
    from server.snapshots.export import quantize

    registry, server, _, tmp = fleet
    names, key = tiny_cfg.data.names, (registry.root / "server_public_key.pem").read_bytes()
    share_weights(tiny_student, 16)
    freeze_shared(tiny_student)
    frames = np.random.default_rng(0).integers(0, 255, (8, 3, 64, 64), dtype=np.uint8)
    model = quantize(export_onnx(tiny_student, tmp / "shared_fp32.onnx", 64, {}), tmp / "shared.onnx", frames,
                     "x86", "static", 3)

    def publish_shared() -> str:
        version = registry.next_version()
        registry.publish(Manifest(version=version, round=1, target="x86", sha256=sha256_file(model),
                                  size=model.stat().st_size, imgsz=64, names=names, map50_fp32=0, map50_int8=0,
                                  map_fp32=0, map_int8=0, latency_ms=0, created=now_iso(), parent_checkpoint="",
                                  extra={"cluster": 16}), model)
        return version

    v1 = publish_shared()
    agent = Agent(server.url, tmp / "device", key, timeout=5)
    assert agent.poll_once() == f"updated {v1}" and agent.downloaded < model.stat().st_size * 0.6
    assert sha256_file(tmp / "device" / "snapshots" / v1 / MODEL_FILE) == sha256_file(model)
    # Tampered on the server: the packed form no longer matches what is signed, so the whole model comes instead.
    fresh = Agent(server.url, tmp / "device2", key, timeout=5)
    packed = registry.folder() / v1 / "model.packed"
    packed.write_bytes(packed.read_bytes()[:-1] + b"\0")
    assert fresh.poll_once() == f"updated {v1}" and fresh.downloaded > model.stat().st_size
    assert sha256_file(tmp / "device2" / "snapshots" / v1 / MODEL_FILE) == sha256_file(model)


def test_device_check_verifies_then_saves_what_the_snapshot_computed_and_refuses_a_tampered_one(fleet, tiny_cfg):
    """`fedcam-device check`: the arm64 comparison's device side (simulations/arm64_check.py), on this CPU."""
    import cv2

    from client.runtime.cli import main as device
    from server.snapshots.registry import PUBLIC_KEY

    registry, _, models, tmp = fleet
    folder = registry.folder() / publish(registry, models[0], tiny_cfg.data.names)
    frames = tmp / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(frames / f"f{i}.png"), rng.integers(0, 255, (48, 80, 3), dtype=np.uint8))
    argv = ["check", "--snapshot", str(folder), "--key", str(registry.root / PUBLIC_KEY), "--source", str(frames),
            "--conf", "0.0"]
    device([*argv, "--out", str(tmp / "out.npz")])
    out = np.load(tmp / "out.npz")
    nc = len(tiny_cfg.data.names)
    for i in range(2):
        assert out[f"{i}/raw"].shape[:2] == (1, 4 + nc) and np.isfinite(out[f"{i}/raw"]).all()
        assert out[f"{i}/boxes"].shape == (len(out[f"{i}/scores"]), 4)
        assert (out[f"{i}/boxes"] <= [80, 48, 80, 48]).all()  # mapped back to the 80x48 frame's own pixels
    with open(folder / MODEL_FILE, "r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SnapshotError, match="sha256"):
        device([*argv, "--out", str(tmp / "tampered.npz")])
    assert not (tmp / "tampered.npz").exists()


# --- drills: a device that crashes, loses its state file or runs out of disk keeps serving --------------------

FRAME = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)


@pytest.mark.parametrize("broken", [b"", b'{"current": "v00', b"\xff\xfe\x00garbage", b"[]", b'{"current": 5}'])
def test_a_broken_state_file_is_set_aside_and_the_device_serves_its_last_good_snapshot(fleet, tiny_cfg, broken):
    registry, server, (m1, m2), tmp = fleet
    names, key = tiny_cfg.data.names, (registry.root / "server_public_key.pem").read_bytes()
    agent = Agent(server.url, tmp / "device", key, timeout=5)
    v1, _ = publish(registry, m1, names), agent.poll_once()
    v2, _ = publish(registry, m2, names), agent.poll_once()
    (tmp / "device" / "state.json").write_bytes(broken)  # truncated by a power cut, or garbage
    rebooted = Agent(server.url, tmp / "device", key, timeout=5)
    assert rebooted.detect(FRAME)[1].version == v2 and rebooted.state["previous"] == v1  # rebuilt from disk
    assert (tmp / "device" / "state.json.unusable").read_bytes() == broken  # kept for a look, not overwritten
    assert rebooted.poll_once() == "unchanged"
    v3 = publish(registry, m1, names)
    assert rebooted.poll_once() == f"updated {v3}"


def test_a_download_cut_by_a_crash_or_a_full_disk_leaves_nothing_and_the_next_poll_succeeds(fleet, tiny_cfg):
    registry, server, (m1, m2), tmp = fleet
    names, key = tiny_cfg.data.names, (registry.root / "server_public_key.pem").read_bytes()
    device = tmp / "device"
    device.mkdir()
    size = m1.stat().st_size
    # A small tmpfs: room for one snapshot, not two (needs root, as a camera's service has; skipped elsewhere).
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + size // 2 + 65536}", "tmpfs", str(device)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        agent = Agent(server.url, device, key, timeout=5)
        v1 = publish(registry, m1, names)
        assert agent.poll_once() == f"updated {v1}"
        # A crash mid-download leaves a partial staging folder: the restarted agent clears it and serves v1.
        (device / "staging" / "v0009").mkdir(parents=True)
        (device / "staging" / "v0009" / MODEL_FILE).write_bytes(b"\0" * 1000)
        agent = Agent(server.url, device, key, timeout=5)
        assert not (device / "staging").exists() and agent.detect(FRAME)[1].version == v1
        v2 = publish(registry, m2, names)
        with pytest.raises(OSError, match="No space left"):
            agent.poll_once()
        assert agent.detect(FRAME)[1].version == v1 and agent.state["current"] == v1
        assert not list((device / "staging").glob("*"))  # the cut download does not keep the disk full
        assert json.loads((device / "state.json").read_text())["current"] == v1
        subprocess.run(["mount", "-o", f"remount,size={4 * size + 65536}", str(device)], check=True)  # room again
        assert agent.poll_once() == f"updated {v2}"
        assert Agent(server.url, device, key, timeout=5).detect(FRAME)[1].version == v2  # and after a reboot
    finally:
        subprocess.run(["umount", "-l", str(device)], check=False)


class Hostile:
    """A registry that lies (a compromised server, or someone in the middle of plain HTTP): canned answers."""

    def __init__(self, answers: dict[str, bytes]):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                body = answers.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_a_lying_registry_gets_a_clear_error_and_nothing_stored_changes(fleet, tiny_cfg):
    registry, server, (m1, _), tmp = fleet
    names, key = tiny_cfg.data.names, (registry.root / "server_public_key.pem").read_bytes()
    v1 = publish(registry, m1, names)
    assert Agent(server.url, tmp / "device", key, timeout=5).poll_once() == f"updated {v1}"
    victim = tmp / "victim"  # what a version of "../../victim" would have deleted
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    good = json.loads((registry.folder() / v1 / "manifest.json").read_text())
    before = (tmp / "device" / "state.json").read_bytes()
    cases = {
        "version": ({**good, "version": "../../victim"}, "not of the form vNNNN"),
        "missing": ({k: v for k, v in good.items() if k != "size"}, "size"),
        "type": ({**good, "imgsz": "64"}, "imgsz"),
        "big": ({**good, "version": "v0002"}, "download limit"),
    }
    for name, (manifest, message) in cases.items():
        big = b"\0" * (2 << 20)  # the "model" of v0002: more than the limit below, whatever its manifest says
        hostile = Hostile({"/api/snapshots/latest": json.dumps(manifest).encode(),
                           "/api/snapshots/v0002/manifest.json": json.dumps(manifest).encode(),
                           "/api/snapshots/v0002/manifest.sig": b"x", "/api/snapshots/v0002/model.onnx": big})
        try:
            agent = Agent(hostile.url, tmp / "device", key, timeout=5, max_download=1 << 20)
            with pytest.raises(SnapshotError, match=message):
                agent.poll_once()
            assert agent.detect(FRAME)[1].version == v1, name  # still serving what it had
        finally:
            hostile.stop()
        assert (victim / "keep.txt").read_text() == "mine", name
        assert (tmp / "device" / "state.json").read_bytes() == before, name
        assert not list((tmp / "device" / "staging").glob("*")), name
