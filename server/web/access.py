"""Who may read the registry and the dashboard: per-device and operator tokens (SQLite, SHA-256 hashes only), checked
on every request, with per-token rate limits and request size limits; required off loopback, with TLS."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse

ROLES = ("device", "operator")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PUBLIC = ("/", "/static/plotly.min.js")  # the page and Plotly's script hold no data: the API behind them is guarded
# What a device token may read: the snapshot registry (its own camera's channel, the global one, the public key).
DEVICE_PATHS = re.compile(r"^/api/(snapshots(/.*)?|public-key|cameras/(?P<camera>[^/]+)/snapshots(/.*)?)$")
SCHEMA = """CREATE TABLE IF NOT EXISTS tokens (name TEXT PRIMARY KEY, role TEXT NOT NULL, camera TEXT,
    hash TEXT NOT NULL UNIQUE, created REAL NOT NULL, revoked REAL)"""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def digest(token: str) -> str:
    # Tokens are 256 random bits: a plain SHA-256 cannot be brute-forced, so no slow password hash is needed.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Holder:
    name: str
    role: str
    camera: str | None
    revoked: bool


class TokenStore:
    """Tokens in one SQLite file; the secret is shown once, at creation, and only its hash is stored."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute(SCHEMA)
        self._lock, self._cache, self._stamp = threading.Lock(), {}, None

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        return db

    def create(self, name: str, role: str, camera: str | None = None) -> str:
        if not NAME.match(name):
            raise ValueError(f"token name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
        if role not in ROLES:
            raise ValueError(f"token role {role!r} is not one of {', '.join(ROLES)}")
        if camera is not None and role != "device":
            raise ValueError("only a device token is bound to a camera")
        token = "fct_" + secrets.token_urlsafe(32)
        try:
            with self._db() as db:
                db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, NULL)", (name, role, camera, digest(token),
                                                                               time.time()))
        except sqlite3.IntegrityError:
            raise ValueError(f"a token named {name!r} exists already (revoke it, or choose another name)") from None
        return token

    def revoke(self, name: str) -> bool:
        with self._db() as db:
            return db.execute("UPDATE tokens SET revoked = ? WHERE name = ? AND revoked IS NULL",
                              (time.time(), name)).rowcount == 1

    def rows(self) -> list[dict]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT name, role, camera, created, revoked FROM tokens ORDER BY name")]

    def holder(self, token: str) -> Holder | None:
        """Who holds this token (None: nobody). The table is re-read when the file changes, so a revocation by
        the CLI takes effect on the running server's next request."""
        stamp = self.path.stat().st_mtime_ns
        with self._lock:
            if stamp != self._stamp:
                with self._db() as db:
                    self._cache = {r["hash"]: Holder(r["name"], r["role"], r["camera"], r["revoked"] is not None)
                                   for r in db.execute("SELECT * FROM tokens")}
                self._stamp = stamp
            return self._cache.get(digest(token))


class Bucket:
    """A token bucket per key: `rate` requests a second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst, self._lock, self._state = rate, burst, threading.Lock(), {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            level, then = self._state.get(key, (float(self.burst), now))
            level = min(self.burst, level + (now - then) * self.rate)
            self._state[key] = (level - 1, now) if level >= 1 else (level, now)
            return level >= 1


class Guard(BaseHTTPMiddleware):
    """Every request: size limit, then token (Authorization: Bearer), then role and camera, then rate limit."""

    def __init__(self, app, tokens: TokenStore | None, rate: float = 10.0, burst: int = 50, max_body: int = 4096):
        super().__init__(app)
        self.tokens, self.bucket, self.max_body = tokens, Bucket(rate, burst), max_body

    async def dispatch(self, request: Request, call_next):
        length = request.headers.get("content-length")
        if (length is not None and (not length.isdigit() or int(length) > self.max_body)) or \
                "transfer-encoding" in request.headers:
            return JSONResponse({"detail": f"request body over {self.max_body} bytes"}, status_code=413)
        path = request.url.path
        who = request.client.host if request.client else "?"
        if self.tokens is not None and path not in PUBLIC:
            auth = request.headers.get("authorization", "")
            if not auth.lower().startswith("bearer "):
                return JSONResponse({"detail": "a token is required (Authorization: Bearer ...)"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            holder = self.tokens.holder(auth[7:].strip())
            if holder is None:
                return JSONResponse({"detail": "unknown token"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
            if holder.revoked:
                return JSONResponse({"detail": f"token {holder.name!r} is revoked"}, status_code=403)
            if holder.role == "device":
                match = DEVICE_PATHS.match(path)
                if match is None:
                    return JSONResponse({"detail": "a device token reads the snapshot registry only"}, status_code=403)
                if match["camera"] and holder.camera and match["camera"] != holder.camera:
                    return JSONResponse({"detail": f"token {holder.name!r} is for camera {holder.camera}"},
                                        status_code=403)
            who = f"token:{holder.name}"
        if self.tokens is not None and not self.bucket.allow(who):  # loopback without tokens: not limited
            return JSONResponse({"detail": "too many requests"}, status_code=429, headers={"Retry-After": "1"})
        return await call_next(request)


def check_exposure(host: str, tls: bool, tokens: TokenStore | None) -> None:
    """Off loopback the server speaks TLS and asks for tokens, or it does not start."""
    if is_loopback(host):
        return
    missing = [what for what, ok in (("TLS (--tls-cert and --tls-key)", tls), ("tokens (--tokens)", tokens)) if not ok]
    if missing:
        raise ValueError(f"refusing to serve on {host} (not loopback) without {' and '.join(missing)}; "
                         "certificates: deploy/certs.sh, tokens: fedcam tokens create")
