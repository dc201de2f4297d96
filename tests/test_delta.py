"""Snapshot deltas: tensors are paired by name wherever they sit, so a new layout still downloads small; a delta that
does not fit the device's model (tampered table, another base, truncated) is refused by name."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from server.snapshots.export import export_onnx
from shared.snapshot.delta import HEADER, SPAN, DeltaError, apply_delta, make_delta, tensor_spans


@pytest.fixture()
def two_layouts(tiny_student, tmp_path):
    """A model, and its next version with one conv moved, its initializers in reverse order and a node renamed:
    what another choice of float layers does to the file."""
    old = export_onnx(tiny_student, tmp_path / "old.onnx", 64, {}).read_bytes()
    proto = onnx.load_from_string(old)
    inits = list(proto.graph.initializer)
    conv = next(t for t in inits if len(t.dims) == 4 and np.prod(t.dims) >= 256)
    value = numpy_helper.to_array(conv)
    conv.CopyFrom(numpy_helper.from_array(value + np.float32(1e-3), conv.name))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(reversed([onnx.TensorProto.FromString(t.SerializeToString()) for t in inits]))
    proto.graph.node[0].name += "_moved"
    return old, proto.SerializeToString()


def test_a_new_layout_still_downloads_only_what_changed(two_layouts):
    old, new = two_layouts
    spans = tensor_spans(old, new)
    assert len(spans) > 10 and sum(at != was for at, was, _ in spans) > len(spans) / 2  # most tensors moved
    delta = make_delta(old, new)
    assert apply_delta(old, delta) == new
    # byte for byte over the common length (the old format) the reordered file is noise; paired by name it is not
    aligned = len(gzip.compress((np.frombuffer(new[:len(old)], np.uint8) - np.frombuffer(old[:len(new)], np.uint8))
                                .tobytes(), 9))
    assert len(delta) < len(gzip.compress(new, 9)) / 5 and len(delta) < aligned / 5
    assert len(make_delta(b"not onnx", b"not onnx either")) > 0  # not ONNX: byte for byte, still a delta
    assert apply_delta(b"not onnx", make_delta(b"not onnx", b"not onnx either")) == b"not onnx either"


def test_a_delta_that_does_not_fit_is_refused_by_name(two_layouts):
    old, new = two_layouts
    delta = make_delta(old, new)
    count = HEADER.unpack_from(delta)[4]
    first = HEADER.size

    def with_span(i: int, span: tuple[int, int, int]) -> bytes:
        at = first + i * SPAN.size
        return delta[:at] + SPAN.pack(*span) + delta[at + SPAN.size:]

    at, was, size = SPAN.unpack_from(delta, first)
    cases = [  # (what the device holds, the delta it gets, the reason it must name)
        (old, with_span(0, (at, len(old), size)), "falls outside the models"),
        (old, with_span(1, (at, was, size)) if count > 1 else with_span(0, (len(new), 0, 1)), "overlaps"),
        (new, delta, "made from another model"),
        (old, delta[:-40], "truncated"),
        (old, delta[:10], "shorter than its header"),
        (old, b"FCD1" + delta[4:], "bad magic"),
        (old, delta[:HEADER.size - 4] + struct.pack("<I", 1 << 20) + delta[HEADER.size:], "too long"),
    ]
    for held, bad, reason in cases:
        with pytest.raises(DeltaError, match=reason):
            apply_delta(held, bad)
