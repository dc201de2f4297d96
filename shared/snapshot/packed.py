"""Weight-shared snapshot downloads: an int8 ONNX model whose conv weights hold at most 16 values per output channel
(snapshot.cluster) travels as 4-bit indices + per-channel codebooks + the rest of the file, deflated. The device
rebuilds the exact bytes of the signed model (numpy only), so the same sha256 check covers the model it runs."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np

MAGIC, LEVELS = b"FCP1", 16
PACKED_FILE = "model.packed"
HEADER = struct.Struct("<4sI")  # magic, length of the JSON table that follows
MAX_SIZE = 1 << 30


class PackedError(ValueError):
    """A packed model that does not rebuild (corrupt, truncated, or not one)."""


def pack_model(model: bytes) -> bytes | None:
    """The packed form of an int8 ONNX model, or None if none of its weights has few enough values (server side)."""
    import onnx

    proto = onnx.load_from_string(model)
    spans, books, nibbles, taken = [], [], [], 0
    for init in sorted(proto.graph.initializer, key=lambda t: model.find(t.raw_data) if t.raw_data else -1):
        if init.data_type != onnx.TensorProto.INT8 or len(init.dims) < 2 or len(init.raw_data) < 256:
            continue
        q = np.frombuffer(init.raw_data, np.int8).reshape(init.dims[0], -1)
        at = model.find(init.raw_data, taken)
        if at < 0 or model.find(init.raw_data, at + 1) >= 0:
            continue  # not found once, in order: left in the file as it is
        table = [np.unique(row) for row in q]
        if max(len(t) for t in table) > LEVELS:
            continue
        book = np.stack([np.pad(t, (0, LEVELS - len(t)), constant_values=t[-1]) for t in table])
        index = np.stack([np.searchsorted(b[:len(t)], row) for b, t, row in zip(book, table, q)]).astype(np.uint8)
        flat = index.reshape(-1)
        flat = np.concatenate([flat, np.zeros(len(flat) % 2, np.uint8)])
        spans.append([at, len(init.raw_data), int(q.shape[0])])
        books.append(book.tobytes())
        nibbles.append((flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes())
        taken = at + len(init.raw_data)
    if not spans:
        return None
    rest, cursor = [], 0
    for at, size, _ in spans:
        rest.append(model[cursor:at])
        cursor = at + size
    rest.append(model[cursor:])
    table = json.dumps({"size": len(model), "spans": spans}).encode()
    body = b"".join(rest) + b"".join(books) + b"".join(nibbles)
    return HEADER.pack(MAGIC, len(table)) + table + zlib.compress(body, 9)


def unpack_model(packed: bytes) -> bytes:
    """The model's exact bytes again (device side); PackedError if `packed` is not a packed model that fits."""
    try:
        magic, n = HEADER.unpack_from(packed)
        table = json.loads(packed[HEADER.size:HEADER.size + n]) if magic == MAGIC else None
        size, spans = int(table["size"]), [(int(a), int(b), int(c)) for a, b, c in table["spans"]]
    except (struct.error, ValueError, TypeError, KeyError) as err:
        raise PackedError(f"not a packed fedcam model ({type(err).__name__})") from None
    if magic != MAGIC or not 0 < size <= MAX_SIZE:
        raise PackedError("not a packed fedcam model (bad magic or size)")
    kept = size - sum(b for _, b, _ in spans)
    need = kept + sum(c * LEVELS + (b + 1) // 2 for _, b, c in spans)
    unzip = zlib.decompressobj()
    try:
        body = unzip.decompress(packed[HEADER.size + n:], need + 1)
    except zlib.error as err:
        raise PackedError(f"packed model body is not a valid zlib stream ({err})") from None
    if len(body) != need or not unzip.eof or kept < 0:
        raise PackedError(f"packed model body holds {len(body)} bytes, expected {need}")
    out, cursor, books, nib = bytearray(), 0, kept, kept + sum(c * LEVELS for _, _, c in spans)
    prev = 0
    for at, count, channels in spans:
        if at < prev or count % channels:
            raise PackedError("packed model spans overlap or do not divide into channels")
        out += body[cursor:cursor + at - prev]
        cursor += at - prev
        book = np.frombuffer(body[books:books + channels * LEVELS], np.int8).reshape(channels, LEVELS)
        raw = np.frombuffer(body[nib:nib + (count + 1) // 2], np.uint8)
        index = np.stack([raw & 15, raw >> 4], axis=1).reshape(-1)[:count].reshape(channels, -1)
        out += np.take_along_axis(book, index.astype(np.int64), axis=1).tobytes()
        books, nib, prev = books + channels * LEVELS, nib + (count + 1) // 2, at + count
    out += body[cursor:kept]
    if len(out) != size:
        raise PackedError(f"packed model rebuilds {len(out)} bytes, expected {size}")
    return bytes(out)
