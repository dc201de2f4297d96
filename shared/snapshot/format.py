"""Snapshot format shared by server and devices: manifest, canonical bytes, sha256, Ed25519 signatures."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MODEL_FILE, MANIFEST_FILE, SIGNATURE_FILE = "model.onnx", "manifest.json", "manifest.sig"
VERSION = re.compile(r"^v\d{4,}$")  # a folder name and a URL segment on the device: nothing else gets through
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class SnapshotError(ValueError):
    """A snapshot that is incomplete, tampered with, or signed by another key."""


@dataclass(frozen=True)
class Manifest:
    version: str
    round: int
    target: str
    sha256: str
    size: int
    imgsz: int
    names: list[str]
    map50_fp32: float
    map50_int8: float
    map_fp32: float
    map_int8: float
    latency_ms: float
    created: str
    parent_checkpoint: str
    extra: dict = field(default_factory=dict)
    # The NMS the gate scored with ({"iou", "max_det"}); a device keeps them and picks its own confidence.
    nms: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A device reads the newest manifest before it can check a signature, and names folders after its version:
        # a field of the wrong type or a version such as "../../x" is refused here, before any path is made.
        if not isinstance(self.version, str) or not VERSION.match(self.version):
            raise SnapshotError(f"manifest version {self.version!r} is not of the form vNNNN")
        if not isinstance(self.sha256, str) or not SHA256.match(self.sha256):
            raise SnapshotError(f"manifest sha256 {self.sha256!r} is not 64 lowercase hex digits")
        for name in ("round", "size", "imgsz"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "imgsz" else 0):
                raise SnapshotError(f"manifest {name} {value!r} is not a whole number in range")
        if not isinstance(self.names, list) or not self.names or not all(isinstance(n, str) for n in self.names):
            raise SnapshotError("manifest names are not a list of class names")
        if not isinstance(self.extra, dict) or not isinstance(self.nms, dict):
            raise SnapshotError("manifest extra and nms must be objects")

    def to_bytes(self) -> bytes:
        """Canonical JSON: the exact bytes that are signed."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict):
                raise SnapshotError(f"unreadable manifest: a JSON {type(fields).__name__}, not an object")
            return cls(**fields)
        except SnapshotError:
            raise
        except (ValueError, TypeError) as err:
            raise SnapshotError(f"unreadable manifest: {err}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The server's signing key: created once (mode 0600), then always the same one."""
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    tmp.chmod(0o600)
    tmp.replace(path)
    return key


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    return serialization.load_pem_public_key(pem)


def sign(manifest: Manifest, key: Ed25519PrivateKey) -> bytes:
    return key.sign(manifest.to_bytes())


def verify_manifest(manifest_bytes: bytes, signature: bytes, public_key: Ed25519PublicKey) -> Manifest:
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SnapshotError("manifest signature does not verify against the pinned key") from None
    return Manifest.from_bytes(manifest_bytes)


def verify_dir(folder: Path, public_key: Ed25519PublicKey) -> Manifest:
    """Check a snapshot folder end to end: signature over the manifest, then the model's size and sha256."""
    for name in (MODEL_FILE, MANIFEST_FILE, SIGNATURE_FILE):
        if not (folder / name).is_file():
            raise SnapshotError(f"snapshot {folder} is missing {name}")
    manifest = verify_manifest((folder / MANIFEST_FILE).read_bytes(), (folder / SIGNATURE_FILE).read_bytes(),
                               public_key)
    model = folder / MODEL_FILE
    if model.stat().st_size != manifest.size or sha256_file(model) != manifest.sha256:
        raise SnapshotError(f"{model}: size or sha256 does not match the signed manifest")
    return manifest
