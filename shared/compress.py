"""Model deltas on the wire (fed.compress): block-scaled int8 with stochastic rounding, or the top k % of entries
with error feedback; decoded exactly to the quantization step, and every payload checked before it is used."""

from __future__ import annotations

import zlib
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord

from shared.arrays import PACKED_PREFIX, UpdateError
from shared.config import COMPRESS_MODES as MODES
PREFIX = "compressed."
FLOAT = PACKED_PREFIX + "float32"  # the packed group that is compressed; integer buffers travel whole
# Values per int8 scale. Small blocks follow each tensor's own range in the flat, key-ordered vector (bucketed
# quantization as in QSGD); at 1024 the scales cost 0.1 % of the values.
BLOCK = 1024
LEVEL = 6  # zlib level: stochastic-rounded int8 deltas are mostly near zero and deflate well


def is_compressed(record: ArrayRecord) -> bool:
    return any(k.startswith(PREFIX) for k in record)


def mode_of(record: ArrayRecord) -> str:
    modes = {k[len(PREFIX):].split(".")[0] for k in record if k.startswith(PREFIX)}
    return modes.pop() if len(modes) == 1 else "none"


def encode(new: ArrayRecord, base: ArrayRecord, mode: str, topk: float, rng: np.random.Generator,
           residual: np.ndarray | None = None) -> tuple[ArrayRecord, np.ndarray | None]:
    """`new` minus `base` (packed records of one layout) in `mode`; returns the payload and, for topk, what was
    left unsent (error feedback: the caller adds it to its next delta)."""
    if mode not in MODES[1:]:
        raise ValueError(f"config key 'fed.compress': '{mode}' is not one of {', '.join(MODES)}")
    if set(new) != set(base) or FLOAT not in base or new[FLOAT].shape != base[FLOAT].shape:
        raise ValueError("encode: the new and base records differ in layout")
    delta = new[FLOAT].numpy().astype(np.float32) - base[FLOAT].numpy().astype(np.float32)
    out = OrderedDict((k, new[k]) for k in new if k != FLOAT)
    if mode == "int8":
        q, scales = quantize(delta, rng)
        out[f"{PREFIX}int8.values"], out[f"{PREFIX}int8.scales"] = _deflate(q), Array(scales)
        return ArrayRecord(out), None
    acc = delta if residual is None else delta + residual
    n, k = acc.size, max(1, min(acc.size, int(round(topk * acc.size))))
    index = np.sort(np.argpartition(np.abs(acc), n - k)[n - k:])
    q, scales = quantize(acc[index], rng)
    sent = np.zeros_like(acc)
    sent[index] = dequantize(q, scales)
    gaps = np.diff(index, prepend=-1).astype("<u4") - 1  # >= 0; byte planes apart so zlib sees the zeros
    out[f"{PREFIX}topk.values"], out[f"{PREFIX}topk.scales"] = _deflate(q), Array(scales)
    out[f"{PREFIX}topk.gaps"] = _deflate(gaps.view(np.uint8).reshape(-1, 4).T)
    return ArrayRecord(out), acc - sent


def decode(record: ArrayRecord, base: ArrayRecord) -> ArrayRecord:
    """The packed record `base` + the sent delta; UpdateError naming the defect if the payload does not fit."""
    if FLOAT not in base:
        raise UpdateError("compressed payload: the base model has no float32 values")
    mode, n = mode_of(record), base[FLOAT].numpy().size
    expect = {k for k in base if k != FLOAT} | {f"{PREFIX}{mode}.{p}" for p in _PARTS.get(mode, ())}
    if mode not in _PARTS or set(record) != expect:
        raise UpdateError(f"compressed payload: keys {sorted(record)} do not form an int8 or topk payload "
                          f"for this model (expected {sorted(expect)})")
    scales = record[f"{PREFIX}{mode}.scales"].numpy()
    if mode == "int8":
        delta = _values(record, mode, n, scales)
    else:
        raw = _inflate(record[f"{PREFIX}topk.gaps"], 4 * n, "topk.gaps", exact=False)
        if raw.size % 4:
            raise UpdateError("compressed payload: topk.gaps is not a whole number of 32-bit gaps")
        gaps = np.ascontiguousarray(raw.reshape(4, -1).T).view("<u4").reshape(-1)
        index = np.cumsum(gaps.astype(np.int64) + 1) - 1
        if not gaps.size or index[-1] >= n:  # strictly increasing by construction: gaps are >= 0
            raise UpdateError(f"compressed payload: {gaps.size} topk indices (last {index[-1] if gaps.size else '-'})"
                              f" do not fit {n} values")
        delta = np.zeros(n, np.float32)
        delta[index] = _values(record, mode, gaps.size, scales)
    summed = Array(base[FLOAT].numpy().astype(np.float32) + delta)
    return ArrayRecord(OrderedDict((k, summed if k == FLOAT else record[k]) for k in base))


def limit_norm(record: ArrayRecord, bound: float) -> tuple[ArrayRecord, float]:
    """The payload with its scales shrunk so that the delta it decodes to has an L2 norm of at most `bound`, and the
    factor applied. Scaling the scales scales every decoded value exactly (up to float32 rounding of the scales,
    which the 1e-6 margin covers): central DP clips what the server will see, not what rounding made of it."""
    mode = mode_of(record)
    if mode not in _PARTS:
        raise ValueError("limit_norm: not a compressed payload")
    key = f"{PREFIX}{mode}.scales"
    scales = record[key].numpy()
    q = _inflate(record[f"{PREFIX}{mode}.values"], scales.size * BLOCK, f"{mode}.values", exact=False).view(np.int8)
    norm = float(np.sqrt(np.sum((q.astype(np.float64) * np.repeat(scales.astype(np.float64), BLOCK)[:q.size]) ** 2)))
    factor = min(1.0, bound * (1 - 1e-6) / norm) if norm > 0 else 1.0
    if factor == 1.0:
        return record, 1.0
    out = OrderedDict((k, Array((scales * np.float32(factor)).astype(np.float32)) if k == key else record[k])
                      for k in record)
    return ArrayRecord(out), factor


def quantize(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """int8 of x with one scale per BLOCK values, rounded stochastically (unbiased: E[q * s] = x)."""
    blocks = np.zeros(-(-x.size // BLOCK) * BLOCK, np.float32)
    blocks[:x.size] = x
    blocks = blocks.reshape(-1, BLOCK)
    scales = (np.abs(blocks).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    q = np.floor(blocks / safe + rng.random(blocks.shape, dtype=np.float32))
    return np.clip(q, -127, 127).astype(np.int8).reshape(-1)[:x.size], scales


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.repeat(scales, BLOCK)[:q.size]


def step_of(scales: np.ndarray, n: int) -> np.ndarray:
    """The quantization step of each of n values: what a decoded entry may differ from the true one by."""
    return np.repeat(scales, BLOCK)[:n]


_PARTS = {"int8": ("values", "scales"), "topk": ("values", "scales", "gaps")}


def _values(record: ArrayRecord, mode: str, n: int, scales: np.ndarray) -> np.ndarray:
    if scales.dtype != np.float32 or scales.ndim != 1 or scales.size != -(-n // BLOCK):
        raise UpdateError(f"compressed payload: {mode}.scales holds {scales.size} {scales.dtype} values, "
                          f"expected {-(-n // BLOCK)} float32 for {n} values")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise UpdateError(f"compressed payload: {mode}.scales has a negative, NaN or Inf scale")
    q = _inflate(record[f"{PREFIX}{mode}.values"], n, f"{mode}.values").view(np.int8)
    return dequantize(q, scales)


def _deflate(values: np.ndarray) -> Array:
    return Array(np.frombuffer(zlib.compress(np.ascontiguousarray(values).tobytes(), LEVEL), np.uint8))


def _inflate(arr: Array, size: int, name: str, exact: bool = True) -> np.ndarray:
    """At most `size` bytes (exactly `size` if `exact`): a corrupt or oversized stream is refused, never expanded."""
    data = arr.numpy()
    if data.dtype != np.uint8 or data.ndim != 1:
        raise UpdateError(f"compressed payload: {name} is {data.dtype} of shape {data.shape}, expected flat uint8")
    unzip = zlib.decompressobj()
    try:
        raw = unzip.decompress(data.tobytes(), size + 1)
    except zlib.error as err:
        raise UpdateError(f"compressed payload: {name} is not a valid zlib stream ({err})") from None
    if len(raw) > size:
        raise UpdateError(f"compressed payload: {name} expands past the {size} bytes it may hold")
    if not unzip.eof:
        raise UpdateError(f"compressed payload: {name} is a truncated zlib stream")
    if exact and len(raw) != size:
        raise UpdateError(f"compressed payload: {name} holds {len(raw)} bytes, expected {size}")
    return np.frombuffer(raw, np.uint8)


def checksum(record: ArrayRecord) -> float:
    """CRC-32 of a record's arrays: a camera reports it so the server knows both ends hold the same model."""
    value = 0
    for key in sorted(record):
        value = zlib.crc32(np.ascontiguousarray(record[key].numpy()).tobytes(), value)
    return float(value)  # 32 bits: exact in a MetricRecord float


def message_bytes(obj) -> int:
    """Bytes of a Flower Message as it travels: every object of its tree (records, arrays, chunks) deflated, as
    the SuperLink stores and sends them; an object the tree holds twice travels once."""
    seen: dict[str, int] = {}

    def walk(node) -> None:
        for child in (node.children or {}).values():
            walk(child)
        seen.setdefault(node.object_id, len(node.deflate()))

    walk(obj)
    return sum(seen.values())
