"""Delta downloads of snapshots: version N+1's model as a byte-wise difference from version N's, deflated. Two
snapshots of one structure serialize to the same ONNX layout, and a round moves most int8 weights by a step or not
at all, so the difference is mostly zeros. The device checks the rebuilt model against the signed manifest's
sha256, exactly as a full download; the delta itself needs no trust."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np

MAGIC = b"FCD1"
HEADER = struct.Struct("<4sQQ32s")  # magic, new size, old size, sha256 of the old model
MAX_SIZE = 1 << 30  # no snapshot for a camera is near 1 GiB: a header that says so is corrupt


class DeltaError(ValueError):
    """A delta that does not apply to the model this device holds (another base, corrupt, truncated)."""


def make_delta(old: bytes, new: bytes, level: int = 9) -> bytes:
    """(new - old) mod 256 over their common length, then new's tail; deflated, behind a header naming the base."""
    n = min(len(old), len(new))
    diff = (np.frombuffer(new[:n], np.uint8) - np.frombuffer(old[:n], np.uint8)).tobytes() + new[n:]
    return HEADER.pack(MAGIC, len(new), len(old), hashlib.sha256(old).digest()) + zlib.compress(diff, level)


def apply_delta(old: bytes, delta: bytes) -> bytes:
    """The new model's bytes; DeltaError if `delta` is not one made from exactly `old`."""
    if len(delta) < HEADER.size:
        raise DeltaError("delta is shorter than its header")
    magic, new_size, old_size, base = HEADER.unpack_from(delta)
    if magic != MAGIC or new_size > MAX_SIZE:
        raise DeltaError("not a fedcam snapshot delta (bad magic or size)")
    if old_size != len(old) or base != hashlib.sha256(old).digest():
        raise DeltaError("delta was made from another model than the one this device holds")
    unzip = zlib.decompressobj()
    try:
        diff = unzip.decompress(delta[HEADER.size:], new_size + 1)
    except zlib.error as err:
        raise DeltaError(f"delta body is not a valid zlib stream ({err})") from None
    if len(diff) != new_size or not unzip.eof:
        raise DeltaError(f"delta body holds {len(diff)} bytes{'' if unzip.eof else ' (truncated)'}, "
                         f"expected {new_size}")
    n = min(len(old), new_size)
    head = (np.frombuffer(diff[:n], np.uint8) + np.frombuffer(old[:n], np.uint8)).tobytes()
    return head + diff[n:]


def delta_name(base_version: str) -> str:
    return f"delta-{base_version}.bin"
