"""Delta downloads of snapshots: version N+1's model as a byte-wise difference from version N's, deflated. A table
of spans pairs each weight tensor of the new file with the same-named one in the old file wherever each sits, so a
change of layout (another layer kept float, another graph order) shifts nothing; a round moves most int8 weights by
a step or not at all, so the difference is mostly zeros. The device checks the rebuilt model against the signed
manifest's sha256, exactly as a full download; the delta itself needs no trust."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np

MAGIC = b"FCD2"
HEADER = struct.Struct("<4sQQ32sI")  # magic, new size, old size, sha256 of the old model, number of spans
SPAN = struct.Struct("<QQQ")  # where in the new file, where in the old, how many bytes
MAX_SIZE = 1 << 30  # no snapshot for a camera is near 1 GiB: a header that says so is corrupt
MAX_SPANS = 1 << 16
MIN_TENSOR = 64  # smaller tensors (scales, zero points) travel as they are


class DeltaError(ValueError):
    """A delta that does not apply to the model this device holds (another base, corrupt, truncated)."""


def tensor_spans(old: bytes, new: bytes) -> list[tuple[int, int, int]]:
    """(new at, old at, size) of every initializer the two ONNX models share by name and byte size, each found exactly
    once in its file (server side: needs the onnx package); [] if either is not an ONNX model."""
    import onnx

    def where(model: bytes) -> dict[str, tuple[int, int]]:
        out = {}
        for t in onnx.load_from_string(model).graph.initializer:
            at = model.find(t.raw_data) if len(t.raw_data) >= MIN_TENSOR else -1
            if at >= 0 and model.find(t.raw_data, at + 1) < 0:  # found once: the tensor itself, not a look-alike
                out[t.name] = (at, len(t.raw_data))
        return out

    try:
        before, after = where(old), where(new)
    except Exception:  # noqa: BLE001  (onnx raises its own DecodeError types): then no tensor is paired
        return []
    return sorted((at, before[name][0], size) for name, (at, size) in after.items()
                  if name in before and before[name][1] == size)


def _body(old: bytes, new: bytes, spans: list[tuple[int, int, int]]) -> bytes:
    body = np.frombuffer(new, np.uint8).copy()
    src = np.frombuffer(old, np.uint8)
    for at, was, size in spans:
        body[at:at + size] -= src[was:was + size]  # uint8 wraps: (new - old) mod 256
    return body.tobytes()


def make_delta(old: bytes, new: bytes, level: int = 9) -> bytes:
    """The smaller of two deltas: tensors paired by name, or the files paired byte for byte over their common length
    (what suits two files of one layout, or files that are not ONNX); deflated, behind a header naming the base."""
    best = None
    for spans in (tensor_spans(old, new), [(0, 0, min(len(old), len(new)))]):
        if not spans:
            continue
        head = HEADER.pack(MAGIC, len(new), len(old), hashlib.sha256(old).digest(), len(spans))
        delta = head + b"".join(SPAN.pack(*s) for s in spans) + zlib.compress(_body(old, new, spans), level)
        best = delta if best is None or len(delta) < len(best) else best
    return best


def _read_spans(delta: bytes, count: int, new_size: int, old_size: int) -> list[tuple[int, int, int]]:
    """The span table, checked: in order, no overlap, inside both files."""
    if count > MAX_SPANS or len(delta) < HEADER.size + count * SPAN.size:
        raise DeltaError("delta's span table is truncated or too long")
    spans, end = [SPAN.unpack_from(delta, HEADER.size + i * SPAN.size) for i in range(count)], 0
    for at, was, size in spans:
        if at < end or at + size > new_size or was + size > old_size:
            raise DeltaError(f"delta span ({at}, {was}, {size}) overlaps or falls outside the models")
        end = at + size
    return spans


def apply_delta(old: bytes, delta: bytes) -> bytes:
    """The new model's bytes; DeltaError if `delta` is not one made from exactly `old`."""
    if len(delta) < HEADER.size:
        raise DeltaError("delta is shorter than its header")
    magic, new_size, old_size, base, count = HEADER.unpack_from(delta)
    if magic != MAGIC or new_size > MAX_SIZE:
        raise DeltaError("not a fedcam snapshot delta (bad magic or size)")
    if old_size != len(old) or base != hashlib.sha256(old).digest():
        raise DeltaError("delta was made from another model than the one this device holds")
    spans = _read_spans(delta, count, new_size, old_size)
    unzip = zlib.decompressobj()
    try:
        body = unzip.decompress(delta[HEADER.size + count * SPAN.size:], new_size + 1)
    except zlib.error as err:
        raise DeltaError(f"delta body is not a valid zlib stream ({err})") from None
    if len(body) != new_size or not unzip.eof:
        raise DeltaError(f"delta body holds {len(body)} bytes{'' if unzip.eof else ' (truncated)'}, "
                         f"expected {new_size}")
    out, src = np.frombuffer(body, np.uint8).copy(), np.frombuffer(old, np.uint8)
    for at, was, size in spans:
        out[at:at + size] += src[was:was + size]
    return out.tobytes()


def delta_name(base_version: str) -> str:
    return f"delta-{base_version}.bin"
