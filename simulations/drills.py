"""Fault drills (issue 23), real processes on loopback: what was done, what held, with figures. The federation's
drills (1, 5, 3: simulations/drills_federation.py) run on the Deployment Engine, the attackers' (2:
simulations/drills_attack.py) in the Simulation Engine. The device agent's (drill 4):
`fedcam-device run` SIGKILLed at random moments of pulls and swaps, its state.json broken, its disk full; after each
it must serve a verified snapshot at once and reach the newest one by polling. And bad input on the registry's two
sides (part of drill 6): requests with path tricks to `fedcam serve`, a lying registry to a running device."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from shared.cpu_isa import isa_summary  # noqa: E402

from bench_registry import serve  # noqa: E402 - beside this script


class Fleet:
    """A registry served by `fedcam serve` on loopback, signed snapshots of three different students at 320 px."""

    def __init__(self, root: Path):
        import cv2
        import torch

        from server.snapshots.export import export_onnx
        from server.snapshots.registry import Registry
        from shared import models
        from shared.config import load_config

        self.root, cfg = root, load_config({})
        self.names, self.registry = cfg.data.names, Registry(root / "registry", root / "key.pem")
        torch.manual_seed(0)
        net = models.build_student(cfg.model, self.names)
        self.models = []
        for i in range(3):
            for p in net.parameters():
                p.data.mul_(0.97)
            self.models.append(export_onnx(net, root / f"m{i}.onnx", 320, {}))
        self.frames = root / "frames"
        self.frames.mkdir()
        for i in range(4):
            frame = np.random.default_rng(i).integers(0, 255, (240, 320, 3), np.uint8)
            cv2.imwrite(str(self.frames / f"f{i}.png"), frame)
        self.proc, port = serve(root, [])
        self.url, self.key = f"http://127.0.0.1:{port}", root / "registry" / "server_public_key.pem"

    def publish(self) -> str:
        from server.snapshots.registry import now_iso
        from shared.snapshot.format import Manifest, sha256_file

        version = self.registry.next_version()
        model = self.models[int(version[1:]) % len(self.models)]
        self.registry.publish(Manifest(version=version, round=1, target="x86", sha256=sha256_file(model),
                                       size=model.stat().st_size, imgsz=320, names=self.names, map50_fp32=0,
                                       map50_int8=0, map_fp32=0, map_int8=0, latency_ms=0, created=now_iso(),
                                       parent_checkpoint=""), model)
        return version

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


class Device:
    """`fedcam-device run` as a camera runs it: frames in a loop, a poll every 0.2 s, detections on stdout."""

    def __init__(self, fleet: Fleet, state: Path, url: str | None = None):
        self.out = state.parent / f"{state.name}.out"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "client.runtime.cli", "run", "--server", url or fleet.url, "--state", str(state),
             "--key", str(fleet.key), "--poll", "0.2", "--source", str(fleet.frames), "--loop"],
            stdout=self.out.open("w"), stderr=(state.parent / f"{state.name}.log").open("a"))
        self.started = time.monotonic()

    def served(self) -> str | None:
        """The snapshot of the last frame it answered, None before its first answer."""
        lines = [ln for ln in self.out.read_text().splitlines() if ln.startswith("{")]
        return json.loads(lines[-1])["snapshot"] if lines else None

    def wait_for(self, want, timeout: float = 60.0) -> float:
        """Seconds until it serves a snapshot `want` accepts (TimeoutError after `timeout`)."""
        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"device exited with {self.proc.returncode}")
            if (got := self.served()) is not None and want(got):
                return time.monotonic() - self.started
            time.sleep(0.05)
        raise TimeoutError(f"device served {self.served()} after {timeout:.0f} s")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=20)


def verified(state: Path, key: Path, version: str) -> bool:
    from shared.snapshot.format import load_public_key, verify_dir

    verify_dir(state / "snapshots" / version, load_public_key(key.read_bytes()))
    return True


def drill_kills(fleet: Fleet, work: Path, kills: int, rng: random.Random) -> tuple[str, str, str]:
    state = work / "device"
    device = Device(fleet, state)
    device.wait_for(lambda v: True)  # its first install
    first, reach, phases = [], [], {"before the pull": 0, "mid-pull": 0, "after the swap": 0}
    for _ in range(kills):
        newest = fleet.publish()
        time.sleep(rng.uniform(0.0, 0.35))  # somewhere in the next poll, download, verify, smoke test or swap
        if any((state / "staging").glob("*")):  # as seen just before the kill
            phases["mid-pull"] += 1
        else:
            swapped = json.loads((state / "state.json").read_text()).get("current") == newest
            phases["after the swap" if swapped else "before the pull"] += 1
        device.kill()
        device = Device(fleet, state)
        first.append(device.wait_for(lambda v: verified(state, fleet.key, v)))
        reach.append(device.wait_for(lambda v, n=newest: v == n))
    device.kill()
    return (f"SIGKILL at a random moment after each of {kills} publications ("
            + ", ".join(f"{n} {phase}" for phase, n in phases.items()) + ")",
            f"every restart served a verified snapshot and reached the newest ({kills}/{kills})",
            f"first frame {np.median(first):.1f} s median, {max(first):.1f} s max; newest after "
            f"{np.median(reach):.1f} s median, {max(reach):.1f} s max")


def drill_state(fleet: Fleet, work: Path) -> tuple[str, str, str]:
    state, held = work / "device", []
    for broken in (b"", b'{"current": "v0', b"\xff\xfe\x00garbage", b"[]"):
        device = Device(fleet, state)
        good = device.wait_for(lambda v: True)
        device.kill()
        last = json.loads((state / "state.json").read_text())["current"]
        (state / "state.json").write_bytes(broken)
        device = Device(fleet, state)
        device.wait_for(lambda v, last=last: v == last)
        newest = fleet.publish()
        device.wait_for(lambda v, n=newest: v == n)
        device.kill()
        held.append((state / "state.json.unusable").read_bytes() == broken)
    return ("state.json truncated, emptied, garbage or of the wrong shape, then a restart (4 cases)",
            f"served the last good snapshot at once, set the file aside, next poll took the newest "
            f"({sum(held)}/4)", f"startup with the first frame {good:.1f} s")


def drill_disk(fleet: Fleet, work: Path) -> tuple[str, str, str]:
    state = work / "small"
    state.mkdir()
    size = fleet.models[0].stat().st_size
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + size // 2 + 65536}", "tmpfs", str(state)],
                           capture_output=True, text=True)
    if mount.returncode:
        return "disk full (a tmpfs with room for one snapshot)", "not run", mount.stderr.strip()
    try:
        device = Device(fleet, state)
        first = device.wait_for(lambda v: True)
        blocked = fleet.publish()
        time.sleep(3.0)  # ~15 polls, each failing for room
        kept, staged = device.served() != blocked, list((state / "staging").glob("*"))
        subprocess.run(["mount", "-o", f"remount,size={4 * size + 65536}", str(state)], check=True)
        t0 = time.monotonic()
        device.wait_for(lambda v: v == blocked)
        device.kill()
        return ("disk full: a new snapshot does not fit beside the one in use; then room is made",
                f"kept serving {'yes' if kept else 'NO'}, no partial download left {'yes' if not staged else 'NO'}, "
                "the next poll after room was made took it", f"first frame {first:.1f} s; "
                f"newest {time.monotonic() - t0:.1f} s after room was made; model {size / 2**20:.1f} MiB")
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


# Requests a registry must refuse (no file outside a snapshot folder is ever served), sent as written.
TRICKS = ["/api/snapshots/../server_public_key.pem", "/api/snapshots/v0001/..%2F..%2Fkey.pem",
          "/api/snapshots/%2e%2e/%2e%2e/key.pem", "/api/snapshots/v0001/../../../../etc/passwd",
          "/api/cameras/..%2F..%2F/snapshots/latest", "/api/cameras/../snapshots/latest",
          "/api/snapshots/v0001/manifest.json%00.onnx", "/api/snapshots/v1/..\\..\\key.pem",
          "/api/cameras/cam00/snapshots/v0001/../../../../key.pem", "/%2e%2e/%2e%2e/etc/passwd"]


def drill_paths(fleet: Fleet) -> tuple[str, str, str]:
    port, served, statuses = int(fleet.url.rsplit(":", 1)[1]), [], []
    secret = (fleet.root / "key.pem").read_bytes()
    for path in TRICKS:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        statuses.append(resp.status)
        if resp.status < 400 or b"PRIVATE KEY" in body or b"root:" in body:
            served.append(f"{path} -> {resp.status}")
    return (f"{len(TRICKS)} requests with path tricks ('..', encoded, NUL, backslashes) to `fedcam serve`",
            f"refused: {len(TRICKS) - len(served)}/{len(TRICKS)}" + (f"; SERVED: {served}" if served else ""),
            "answers " + ", ".join(f"{code} ×{statuses.count(code)}" for code in sorted(set(statuses)))
            + "; no key or system file in any body")


def lying_registry(answers: dict[str, bytes]):
    """A registry that lies (compromised, or someone in the middle of plain HTTP): canned answers on loopback."""
    import threading
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

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # the device hangs up on what it refuses: a broken pipe here is the drill working

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def drill_lies(fleet: Fleet, work: Path) -> tuple[str, str, str]:
    """The device's registry answers with manifests that lie; the device process must keep serving, log the reason
    and change nothing it holds."""
    state = work / "device"
    current = json.loads((state / "state.json").read_text())["current"]  # what the device holds and serves
    good = json.loads((state / "snapshots" / current / "manifest.json").read_text())
    victim = work / "victim"
    victim.mkdir()
    (victim / "keep").write_text("mine")
    cases = {"a version of '../../victim'": {**good, "version": "../../victim"},
             "a missing field (size)": {k: v for k, v in good.items() if k != "size"},
             "a field of the wrong type (imgsz '320')": {**good, "imgsz": "320"},
             "a 100 MiB model (limit 64)": {**good, "version": "v9999"}}
    held, reasons = 0, []
    for name, manifest in cases.items():
        body = json.dumps(manifest).encode()
        server = lying_registry({"/api/snapshots/latest": body, "/api/snapshots/v9999/manifest.json": body,
                                 "/api/snapshots/v9999/manifest.sig": b"x" * 64,
                                 "/api/snapshots/v9999/model.onnx": b"\0" * (100 << 20)})
        before = (state / "state.json").read_bytes()
        log = state.parent / f"{state.name}.log"
        mark = log.stat().st_size if log.exists() else 0
        try:
            device = Device(fleet, state, f"http://127.0.0.1:{server.server_address[1]}")
            device.wait_for(lambda v: v == good["version"])
            time.sleep(1.5)  # several polls against the lying registry
            serving = device.served() == good["version"]
            device.kill()
        finally:
            server.shutdown()
            server.server_close()
        said = log.read_text()[mark:]
        reason = next((ln.split("update check failed: ", 1)[1].split(" (next try")[0]
                       for ln in said.splitlines() if "update check failed" in ln), "no reason logged")
        reasons.append(f"{name}: {reason}")
        unchanged = (state / "state.json").read_bytes() == before and not list((state / "staging").glob("*"))
        held += serving and unchanged and (victim / "keep").read_text() == "mine"
    return (f"the registry lies to a running device: {', '.join(cases)}",
            f"kept serving, nothing stored changed, no file outside its folder touched ({held}/{len(cases)})",
            "; ".join(reasons))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-federation", action="store_true", help="only the device and registry drills")
    ap.add_argument("--skip-attacks", action="store_true", help="leave out drill 2 and drill 1 in simulation (15 simulations, about 45 min)")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C: every drill's context managers stop the processes it started, by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"instruction sets: {isa_summary()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedcam-drills-") as tmp:
        work = Path(tmp)
        fleet = Fleet(work)
        try:
            fleet.publish()
            rows = [("4 device: killed", *drill_kills(fleet, work, args.kills, random.Random(args.seed))),
                    ("4 device: state.json", *drill_state(fleet, work)),
                    ("4 device: full disk", *drill_disk(fleet, work)),
                    ("6 registry: path tricks", *drill_paths(fleet)),
                    ("6 device: a lying registry", *drill_lies(fleet, work))]
        finally:
            fleet.stop()
            for p in work.glob("*.log"):
                if os.environ.get("FEDCAM_DRILL_LOGS"):
                    print(p.read_text(), file=sys.stderr)
        if not args.skip_federation:
            from drills_federation import drill_federation  # beside this script

            rows = drill_federation(work / "federation") + rows
        if not args.skip_attacks:
            from drills_attack import drill_attacks, drill_crash  # beside this script

            attack_rows, table = drill_attacks(work / "attacks")
            print("\n".join(table), flush=True)
            rows = [drill_crash(work / "attacks"), *attack_rows, *rows]
    print("\n| drill | what was done | what held | figures |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
