"""Model weights <-> Flower ArrayRecord, exact both ways, with checks that name the offending tensor."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


class UpdateError(ValueError):
    """An update that does not fit the model: wrong keys, shapes, dtypes, or non-finite values."""


def to_record(model_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> ArrayRecord:
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    # BatchNorm buffers (running stats, num_batches_tracked) travel too: a camera's statistics matter.
    return ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state.items()))


def to_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, torch.from_numpy(np.array(arr.numpy(), copy=True))) for k, arr in record.items())


def check_decodable(record: ArrayRecord) -> None:
    """Raise UpdateError unless every Array decodes and holds what its header declares. An Array travels as a dtype
    and shape beside .npy bytes; a reply whose bytes lie about them (or are no .npy at all) must not reach averaging,
    where numpy would broadcast or fail mid-round."""
    for key, arr in record.items():
        try:
            value = arr.numpy()  # np.load without pickles: an object array is refused here
        except Exception as err:  # noqa: BLE001 - whatever numpy makes of foreign bytes, the culprit is this key
            raise UpdateError(f"{key}: undecodable array ({type(err).__name__}: {str(err)[:80]})") from None
        if tuple(value.shape) != tuple(arr.shape) or str(value.dtype) != arr.dtype:
            raise UpdateError(f"{key}: declares {arr.dtype} {tuple(arr.shape)} but holds {value.dtype} "
                              f"{tuple(value.shape)}")


def check_compatible(reference: dict[str, torch.Tensor], record: ArrayRecord, max_norm: float | None = None) -> float:
    """Raise UpdateError unless `record` has exactly reference's keys, shapes, dtypes and finite values.

    Returns the L2 norm of (record - reference) over floating tensors, checked against `max_norm`.
    """
    missing, extra = set(reference) - set(record), set(record) - set(reference)
    if missing or extra:
        raise UpdateError(f"keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    sq = 0.0
    for key, ref in reference.items():
        arr = record[key]
        if tuple(arr.shape) != tuple(ref.shape):
            raise UpdateError(f"{key}: shape {tuple(arr.shape)} != expected {tuple(ref.shape)}")
        if arr.dtype != str(ref.numpy().dtype):
            raise UpdateError(f"{key}: dtype {arr.dtype} != expected {ref.numpy().dtype}")
        if ref.is_floating_point():
            value = arr.numpy()
            if not np.isfinite(value).all():
                raise UpdateError(f"{key}: contains NaN or Inf")
            sq += float(np.sum((value.astype(np.float64) - ref.numpy().astype(np.float64)) ** 2))
    norm = sq ** 0.5
    if max_norm is not None and norm > max_norm:
        raise UpdateError(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}")
    return norm


# --- wire format -------------------------------------------------------------------------------------------
# Flower moves every Array of a message as its own object, one HTTP request per object and hop (server ->
# SuperLink -> SuperNode -> ClientApp and back). 355 tensors made that most of a deployed round, so messages
# carry one flat array per dtype; both ends know the layout (the model's own state_dict order).
PACKED_PREFIX = "packed."


def is_packed(record: ArrayRecord) -> bool:
    return bool(len(record)) and all(k.startswith(PACKED_PREFIX) for k in record)


def layout_of(record: ArrayRecord) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of every tensor, in order: what unpack() needs."""
    return [(k, tuple(a.shape), str(a.dtype)) for k, a in record.items()]


def pack(record: ArrayRecord) -> ArrayRecord:
    """One flat array per dtype, concatenated in key order (exact: no conversion)."""
    groups: dict[str, list[np.ndarray]] = {}
    for _, arr in record.items():
        value = arr.numpy()
        groups.setdefault(str(value.dtype), []).append(value.reshape(-1))
    return ArrayRecord(OrderedDict((PACKED_PREFIX + d, Array(np.concatenate(parts))) for d, parts in groups.items()))


def unpack(packed: ArrayRecord, layout: list[tuple[str, tuple[int, ...], str]]) -> ArrayRecord:
    """The per-tensor record again; UpdateError if the flat arrays do not fit the layout exactly."""
    need: dict[str, int] = {}
    for _, shape, dtype in layout:
        need[dtype] = need.get(dtype, 0) + int(np.prod(shape, dtype=np.int64))
    have = {k[len(PACKED_PREFIX):]: packed[k].numpy() for k in packed}
    if set(have) != set(need):
        raise UpdateError(f"packed dtypes {sorted(have)} != expected {sorted(need)}")
    for dtype, n in need.items():
        if have[dtype].ndim != 1 or have[dtype].size != n or str(have[dtype].dtype) != dtype:
            raise UpdateError(f"packed {dtype}: {have[dtype].size} values of {have[dtype].dtype}, expected {n}")
    offsets, out = dict.fromkeys(need, 0), OrderedDict()
    for key, shape, dtype in layout:
        n = int(np.prod(shape, dtype=np.int64))
        out[key] = Array(np.array(have[dtype][offsets[dtype]:offsets[dtype] + n].reshape(shape), copy=True))
        offsets[dtype] += n
    return ArrayRecord(out)
