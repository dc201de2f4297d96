"""snapshot.cluster: k shared values per conv survive int8, pack into indices + codebooks, and rebuild exactly."""

from __future__ import annotations

import copy
import gzip

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from server.snapshots.cluster import (freeze_shared, input_moments, kmeans_1d, kmeans_rows, refit_centroids,
                                      share_weights)
from server.snapshots.export import export_onnx, quantize
from server.snapshots.pipeline import calibration_frames, make_snapshot
from server.snapshots.registry import Registry
from shared.snapshot.packed import PACKED_FILE, PackedError, pack_model, unpack_model

pytestmark = pytest.mark.slow


def test_kmeans_gives_each_weight_its_nearest_of_k_values():
    w = torch.randn(64, 32, 3, 3)
    centroids, index = kmeans_1d(w, 16)
    assert centroids.shape == (16,) and torch.all(centroids[1:] >= centroids[:-1])
    nearest = (w.reshape(-1, 1) - centroids).abs().argmin(dim=1).reshape(w.shape)
    assert torch.equal(centroids[index], centroids[nearest])
    assert float((centroids[index] - w).abs().mean()) < float(w.abs().mean()) / 5


def test_kmeans_per_row_fits_each_row_at_least_as_well_as_one_codebook():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(8, 288, generator=gen) * torch.logspace(-2, 0, 8)[:, None]  # channels of unlike scales
    centroids, index = kmeans_rows(rows, 16)
    assert centroids.shape == (8, 16) and torch.all(centroids[:, 1:] >= centroids[:, :-1])
    nearest = (rows[:, :, None] - centroids[:, None, :]).abs().argmin(dim=2)
    assert torch.equal(torch.gather(centroids, 1, index), torch.gather(centroids, 1, nearest))
    shared, one = kmeans_1d(rows, 16)
    err = lambda r: ((r - rows).norm(dim=1) / rows.norm(dim=1))  # noqa: E731  (relative, as BatchNorm sees it)
    per_row, per_layer = err(torch.gather(centroids, 1, index)), err(shared[one])
    assert torch.all(per_row <= per_layer + 1e-6) and float(per_row.max()) < 0.2 < float(per_layer.max())


def test_refit_to_inputs_that_are_uncorrelated_and_alike_keeps_each_clusters_mean():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(6, 90, generator=gen)
    centroids, index = kmeans_rows(rows, 8)
    means = torch.stack([torch.stack([r[i == j].mean() if (i == j).any() else torch.tensor(0.0) for j in range(8)])
                         for r, i in zip(rows, index)])
    refit = refit_centroids(rows, index, 8, torch.eye(90))  # E[x x^T] = I: the output error is the weights' error
    assert torch.allclose(refit, means, atol=1e-5) and torch.allclose(centroids, means, atol=1e-5)


def smooth_frames(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 frames whose neighbouring pixels correlate, as in camera frames (so do a conv's input patches)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, size // 8, size // 8, generator=gen)
    return (torch.nn.functional.interpolate(coarse, size=size, mode="bilinear") * 255).round().byte().numpy()


@pytest.mark.parametrize("per", ["channel", "layer"])
def test_a_fit_to_the_outputs_moves_them_less_than_kmeans_of_the_weights(per):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 24, 3, padding=1)).eval()
    frames, held = smooth_frames(16), torch.from_numpy(smooth_frames(8, seed=1)).float() / 255
    with torch.no_grad():
        dense = model(held)
    kmeans, fitted = copy.deepcopy(model), copy.deepcopy(model)
    assert share_weights(kmeans, 8, per) == share_weights(fitted, 8, per, input_moments(fitted, frames)) == 2
    freeze_shared(kmeans)
    freeze_shared(fitted)
    conv = fitted[2].weight.reshape(24 if per == "channel" else 1, -1)
    assert all(len(torch.unique(row)) <= 8 for row in conv)  # still k values: the packed form holds
    with torch.no_grad():
        err = lambda m: float((m(held) - dense).pow(2).mean() / dense.var())  # noqa: E731
        assert err(fitted) < err(kmeans) / 2, (err(fitted), err(kmeans))


def int8_of(model, cfg, path):
    fp32 = export_onnx(model, path.with_name(path.stem + "_fp32.onnx"), cfg.data.imgsz, {})
    return quantize(fp32, path, calibration_frames(cfg), "x86", "static", cfg.snapshot.first_float or 0).read_bytes()


def test_shared_weights_stay_few_through_int8_and_pack_exactly(trained, tmp_path):
    cfg, model, _ = trained
    shared, layered = copy.deepcopy(model), copy.deepcopy(model)
    assert share_weights(shared, 16) > 0 and share_weights(layered, 16, per="layer") > 0
    freeze_shared(shared)
    freeze_shared(layered)
    convs = [m for m in shared.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(len(torch.unique(m.weight[c])) <= 16 for m in convs for c in range(m.out_channels))
    assert any(len(torch.unique(m.weight)) > 16 for m in convs)  # per channel: codebooks differ between channels
    assert all(len(torch.unique(m.weight)) <= 16 for m in layered.modules()
               if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 64)
    plain, clustered = int8_of(model, cfg, tmp_path / "plain.onnx"), int8_of(shared, cfg, tmp_path / "shared.onnx")
    weights = [numpy_helper.to_array(t) for t in onnx.load_from_string(clustered).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert weights and all(len(np.unique(w[c])) <= 16 for w in weights for c in range(w.shape[0]))
    packed, by_layer = pack_model(clustered), pack_model(int8_of(layered, cfg, tmp_path / "layered.onnx"))
    assert packed is not None and unpack_model(packed) == clustered  # byte for byte: the same sha256
    # per channel each channel's codebook has 16 values of its own: on this tiny model (8-64 channels of few weights)
    # they are a larger share than on the student, where the packed form is 58 % of the gzipped plain int8 model
    print(f"packed / gzip(plain int8): per channel {len(packed) / len(gzip.compress(plain, 9)):.3f}, "
          f"per layer {len(by_layer) / len(gzip.compress(plain, 9)):.3f}")
    assert len(packed) < 0.7 * len(gzip.compress(plain, 9)) and len(by_layer) < 0.6 * len(gzip.compress(plain, 9))
    assert pack_model(plain) is None or len(pack_model(plain)) > len(packed)
    for bad in (packed[:-20], packed[:8] + b"x" + packed[9:], b"FCP1" + packed[4:6]):
        with pytest.raises(PackedError):
            unpack_model(bad)


def test_a_clustered_snapshot_is_gated_signed_and_published_with_its_packed_form(trained, tmp_path):
    cfg, model, _ = trained
    registry = Registry(tmp_path / "snapshots", tmp_path / "key.pem")
    result = make_snapshot(model, cfg.replace(**{"snapshot.prune-ratio": 0.0, "snapshot.tolerance": 1.0,
                                                 "snapshot.cluster": 16, "snapshot.cluster-epochs": 1}),
                           1, "", registry)
    assert result.published and result.manifest.extra["cluster"] == 16
    assert result.manifest.extra["cluster_fit"] == "outputs"  # the default: fit to each conv's outputs
    folder = registry.folder() / result.manifest.version
    packed = result.manifest.extra["packed"]
    assert (folder / PACKED_FILE).stat().st_size == packed["size"] < result.manifest.size / 2
    assert unpack_model((folder / PACKED_FILE).read_bytes()) == (folder / "model.onnx").read_bytes()
