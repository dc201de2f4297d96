"""The server's HTTP app (FastAPI): the read-only snapshot registry (global and per-camera channels) devices pull."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse

from server.snapshots.registry import PUBLIC_KEY, Registry, check_camera_id
from shared.snapshot.format import MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, VERSION
from shared.snapshot.packed import PACKED_FILE

FILES = {MODEL_FILE: "application/octet-stream", MANIFEST_FILE: "application/json",
         SIGNATURE_FILE: "application/octet-stream", PACKED_FILE: "application/octet-stream"}
DELTA = re.compile(r"^delta-v\d{4,}\.bin$")  # the model as a difference from an earlier version (shared/snapshot/delta.py)


def create_app(registry_root: Path | str, run_dir: Path | str | None = None, tokens: Path | str | None = None,
               rate: float = 10.0, burst: int = 50) -> FastAPI:
    """The registry API; with a run folder, the dashboard pages and their API too (one app, one port). With a token
    store every request but the page itself needs a token (server/web/access.py); requests are held to a size."""
    from server.web.access import Guard, TokenStore

    app = FastAPI(title="fedcam server", docs_url=None if tokens else "/api/docs",
                  openapi_url=None if tokens else "/api/openapi.json")
    app.add_middleware(Guard, tokens=TokenStore(tokens) if tokens else None, rate=rate, burst=burst)
    if run_dir is not None:
        from server.web.dashboard import add_dashboard

        add_dashboard(app, run_dir)
    registry = Registry(registry_root)
    app.state.registry = registry

    @app.get("/api/snapshots")
    def list_snapshots() -> list[dict]:
        return registry.rows()

    def latest_of(request: Request, camera: str | None) -> Response:
        pointer = registry.latest(camera)
        if pointer is None:
            raise HTTPException(404, "no snapshot published yet" + (f" for camera {camera}" if camera else ""))
        etag = f'"{camera + "-" if camera else ""}{pointer["version"]}-{pointer["sha256"][:16]}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        body = (registry.folder(camera) / pointer["version"] / MANIFEST_FILE).read_bytes()
        return Response(body, media_type="application/json", headers={"ETag": etag, "Cache-Control": "no-cache"})

    def file_of(camera: str | None, version: str, name: str) -> FileResponse:
        if not VERSION.match(version) or not (name in FILES or DELTA.match(name)):  # no path tricks: known names
            raise HTTPException(404, "no such snapshot file")
        path = registry.folder(camera) / version / name
        if not path.is_file():
            raise HTTPException(404, f"snapshot {version} has no {name}")
        # Snapshot folders are immutable, so a file's ETag never changes.
        return FileResponse(path, media_type=FILES.get(name, "application/octet-stream"), headers={"Cache-Control": "public, max-age=31536000, immutable"})

    def camera_id(camera: str) -> str:
        try:
            return check_camera_id(camera)
        except ValueError:  # not a name a channel can have: no path tricks
            raise HTTPException(404, "no such camera") from None

    @app.get("/api/snapshots/latest")
    def latest(request: Request) -> Response:
        """The newest published manifest; ETag = version + sha256, so a device's poll costs a 304 when nothing changed."""
        return latest_of(request, None)

    @app.get("/api/snapshots/{version}/{name}")
    def snapshot_file(version: str, name: str) -> FileResponse:
        return file_of(None, version, name)

    @app.get("/api/camera-snapshots")
    def camera_snapshots() -> list[dict]:
        """Every per-camera snapshot (published or rejected), oldest first."""
        return registry.camera_rows()

    @app.get("/api/cameras/{camera}/snapshots/latest")
    def camera_latest(camera: str, request: Request) -> Response:
        return latest_of(request, camera_id(camera))

    @app.get("/api/cameras/{camera}/snapshots/{version}/{name}")
    def camera_file(camera: str, version: str, name: str) -> FileResponse:
        return file_of(camera_id(camera), version, name)

    @app.get("/api/public-key")
    def public_key() -> Response:
        path = registry.root / PUBLIC_KEY
        if not path.exists():
            raise HTTPException(404, "no signing key yet")
        return Response(path.read_bytes(), media_type="application/x-pem-file")

    return app
