"""Many devices pulling at once: N concurrent pulls (manifest, then the model) over HTTPS with one token each against
`fedcam serve` with TLS and tokens, on loopback; errors, latency percentiles and throughput, and the same over plain
HTTP without tokens side by side."""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.env import setup_offline

setup_offline()
from shared.cpu_isa import isa_summary

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def a_registry(root: Path) -> str:
    """A registry with one signed snapshot of the default student at 320 px (what a device downloads)."""
    from server.snapshots.export import export_onnx
    from server.snapshots.registry import Registry, now_iso
    from shared import models
    from shared.config import load_config
    from shared.snapshot.format import Manifest, sha256_file

    cfg = load_config({})
    net = models.build_student(cfg.model, cfg.data.names)
    model = export_onnx(net, root / "m.onnx", 320, {})
    registry = Registry(root / "registry", root / "key.pem")
    m = Manifest(version=registry.next_version(), round=1, target="x86", sha256=sha256_file(model),
                 size=model.stat().st_size, imgsz=320, names=cfg.data.names, map50_fp32=0, map50_int8=0, map_fp32=0,
                 map_int8=0, latency_ms=0, created=now_iso(), parent_checkpoint="")
    registry.publish(m, model)
    return m.version


def serve(root: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--registry", str(root / "registry"),
                             "--port", str(port), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode())
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("registry did not start")


async def pulls(url: str, tokens: list[str | None], tls: ssl.SSLContext | bool, timeout: float) -> tuple[list, float]:
    """Every device at once: its own connection, the latest manifest, then the model file."""
    import httpx

    async def one(token):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        t0 = time.perf_counter()
        try:
            async with httpx.AsyncClient(base_url=url, verify=tls, timeout=timeout, headers=headers) as client:
                latest = await client.get("/api/snapshots/latest")
                latest.raise_for_status()
                version = latest.json()["version"]
                model = await client.get(f"/api/snapshots/{version}/model.onnx")
                model.raise_for_status()
                return time.perf_counter() - t0, len(model.content), ""
        except Exception as err:  # counted, never hidden: the figure is the number of these
            return time.perf_counter() - t0, 0, f"{type(err).__name__}: {err}"[:120]

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(t) for t in tokens))
    return out, time.perf_counter() - t0


def report(name: str, results: list, wall: float) -> None:
    ok = [r for r in results if not r[2]]
    errors = [r[2] for r in results if r[2]]
    lat = sorted(r[0] for r in ok) or [float("nan")]
    mb = sum(r[1] for r in ok) / 1e6
    print(f"{name:<22}{len(results):>7}{len(errors):>8}{statistics.median(lat):>9.2f}{lat[int(0.95 * (len(lat) - 1))]:>9.2f}"
          f"{lat[-1]:>9.2f}{wall:>9.1f}{mb / wall:>9.1f}", flush=True)
    for e in sorted(set(errors))[:5]:
        print(f"   error: {e} (x{errors.count(e)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=300.0, help="per device, seconds")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a_registry(root)
        subprocess.run(["bash", str(REPO / "deploy" / "certs.sh"), str(root / "pki"), "127.0.0.1", "--"], check=True,
                       capture_output=True)
        from server.web.access import TokenStore

        store = TokenStore(root / "tokens.sqlite")
        tokens = [store.create(f"cam{i:04d}", "device", camera=f"cam{i:04d}") for i in range(args.devices)]
        tls = ssl.create_default_context(cafile=str(root / "pki" / "ca.crt"))
        print(f"\n{args.devices} devices at once, each: latest manifest + model.onnx; seconds")
        print(f"{'server':<22}{'pulls':>7}{'errors':>8}{'p50':>9}{'p95':>9}{'max':>9}{'wall':>9}{'MB/s':>9}")
        for name, extra, toks, verify, scheme in (
                ("https + tokens", ["--tls-cert", str(root / "pki" / "server.crt"), "--tls-key",
                                    str(root / "pki" / "server.key"), "--tokens", str(root / "tokens.sqlite")],
                 tokens, tls, "https"),
                ("http, loopback", [], [None] * args.devices, False, "http")):
            proc, port = serve(root, extra)
            try:
                results, wall = asyncio.run(pulls(f"{scheme}://127.0.0.1:{port}", toks, verify, args.timeout))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            report(name, results, wall)


if __name__ == "__main__":
    main()
