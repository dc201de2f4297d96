"""The registry and dashboard beyond loopback: refused without TLS and tokens; over real HTTPS (uvicorn, the deploy
PKI) a wrong or revoked token gets 401/403, a device token reads its own channel only, a valid one downloads and
verifies, path tricks and oversized requests are refused, and a burst past the rate limit gets 429."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.web.access import TokenStore, is_loopback

REPO = Path(__file__).resolve().parents[1]


def test_tokens_are_stored_hashed_and_revocable(tmp_path):
    store = TokenStore(tmp_path / "tokens.sqlite")
    token = store.create("cam00", "device", camera="cam00")
    assert token.startswith("fct_") and len(token) > 40
    assert token.encode() not in (tmp_path / "tokens.sqlite").read_bytes()  # the secret is never stored
    assert store.holder(token).name == "cam00" and store.holder(token + "x") is None
    with pytest.raises(ValueError, match="exists already"):
        store.create("cam00", "device")
    with pytest.raises(ValueError, match="only a device token"):
        store.create("ops", "operator", camera="cam00")
    assert store.revoke("cam00") and not store.revoke("cam00")
    assert TokenStore(tmp_path / "tokens.sqlite").holder(token).revoked  # another process sees the revocation
    assert [r["name"] for r in store.rows()] == ["cam00"] and "hash" not in store.rows()[0]
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_serving_off_loopback_without_tls_and_tokens_is_refused(tmp_path):
    for extra in ([], ["--tokens", str(tmp_path / "t.sqlite")]):
        got = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--registry", str(tmp_path), "--host",
                              "0.0.0.0", "--port", "1", *extra], capture_output=True, text=True, timeout=60)
        assert got.returncode == 2 and "refusing to serve on 0.0.0.0" in got.stderr and "TLS" in got.stderr, got


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    subprocess.run(["bash", str(REPO / "deploy" / "certs.sh"), str(out), "127.0.0.1", "localhost", "--"], check=True,
                   capture_output=True, timeout=120)
    return out


class HttpsRegistry:
    """`fedcam serve` with TLS, tokens and a tight rate limit, on loopback, in a child process stopped by PID."""

    def __init__(self, root: Path, pki: Path, tokens: Path):
        from test_runtime import free_port

        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--registry", str(root), "--port",
                                      str(self.port), "--tls-cert", str(pki / "server.crt"), "--tls-key",
                                      str(pki / "server.key"), "--tokens", str(tokens), "--rate", "0.01",
                                      "--burst", "20"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()
                time.sleep(0.2)
        raise TimeoutError("registry server did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.mark.slow
def test_https_registry_with_tokens(tmp_path, pki, tiny_student, tiny_cfg):
    from client.runtime.agent import Agent
    from server.snapshots.export import export_onnx
    from server.snapshots.registry import Registry
    from test_runtime import publish

    registry = Registry(tmp_path / "registry", tmp_path / "key.pem")
    version = publish(registry, export_onnx(tiny_student, tmp_path / "m.onnx", 64, {}), tiny_cfg.data.names)
    publish(registry, tmp_path / "m.onnx", tiny_cfg.data.names, camera="cam01", base=version)
    store = TokenStore(tmp_path / "tokens.sqlite")
    cam, other, ops, busy = (store.create("cam00", "device", camera="cam00"), store.create("gone", "device"),
                             store.create("ops", "operator"), store.create("busy", "device"))
    store.revoke("gone")
    server = HttpsRegistry(registry.root, pki, tmp_path / "tokens.sqlite")
    tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))

    def status(path: str, token: str | None = None, data: bytes | None = None) -> int:
        req = urllib.request.Request(server.url + path, data=data,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10, context=tls) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        latest = "/api/snapshots/latest"
        assert status(latest) == 401 and status(latest, "fct_wrong") == 401 and status(latest, other) == 403
        assert status(latest, cam) == 200 and status(latest, ops) == 200
        assert status("/api/run", cam) == 403 and status("/api/camera-snapshots", cam) == 403  # operator only
        assert status("/api/cameras/cam01/snapshots/latest", cam) == 403  # another camera's channel
        assert status("/api/cameras/cam01/snapshots/latest", ops) == 200
        for trick in ("/api/snapshots/..%2F..%2Fkey.pem/x", f"/api/snapshots/{version}/..%2Fkey.pem",
                      "/api/cameras/..%2F..%2F/snapshots/latest", "/api/snapshots/../../tokens.sqlite"):
            assert status(trick, ops) in (403, 404), trick
        assert status(latest, ops, data=b"x" * 10_000) == 413
        with pytest.raises(urllib.error.URLError):  # the server's certificate is checked: no CA, no connection
            urllib.request.urlopen(server.url + latest, timeout=10, context=ssl.create_default_context())

        # a valid device token: the agent downloads over HTTPS and verifies the signature as always
        key = (registry.root / "server_public_key.pem").read_bytes()
        agent = Agent(server.url, tmp_path / "device", key, timeout=10, ca_file=pki / "ca.crt", token=cam,
                      camera_id="cam00")
        assert agent.poll_once() == f"updated {version}"
        with pytest.raises(ValueError, match="https only"):
            Agent(f"http://127.0.0.1:{server.port}", tmp_path / "d2", key, token=cam)

        # a burst of 20 at one request per 100 s: the 21st gets 429 (this token only), whatever the CPU's speed
        codes = [status(latest, busy) for _ in range(25)]
        assert codes == [200] * 20 + [429] * 5, codes
        assert status(latest, cam) == 200
        listing = json.loads(urllib.request.urlopen(urllib.request.Request(
            server.url + "/api/snapshots", headers={"Authorization": f"Bearer {cam}"}), context=tls).read())
        assert [r["version"] for r in listing] == [version]
    finally:
        server.stop()
