"""The snapshot's compression, searched under the gate: prune in steps, recovering, quantizing and scoring each."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from server.snapshots import costmodel, precision
from server.snapshots.export import GraphReport, export_onnx, float_nodes, inspect_optimized, quantize
from shared.config import Config
from shared.evaluate import EvalResult
from shared.models import count_params

log = logging.getLogger("fedcam.server")
RATIO_STEP_EPOCHS = 0.5  # snapshot.recover-epochs is the recovery of a 50 % cut; a search step gets its share
# A step that loses at most this many times snapshot.tolerance is recovered once more for the same epochs and scored
# again: stepwise recovery gives each step less than one cut would get (README: searched compression).
NEAR_MISS = 2.0
# A deeper cut replaces the fastest candidate so far only when it is this much faster on the target: host timings of
# candidates ~1 ms apart move by a few % between measurements, and a cut that is not measurably faster buys nothing
# for the accuracy it costs (measured: 62.5 % at 1.38 ms was chosen over 50 % at 1.39 ms, and ran at 1.60 ms in the
# benchmark's steady timing, with five float layers; README: searched compression).
FASTER_BY = 0.03


class OutOfTime(Exception):
    """A recovery projected past the search's time budget: stopped before it wastes the rest."""


def within(got: float, ref: float, tolerance: float) -> bool:
    """The gate: the int8 mAP50 keeps all but `tolerance` (a fraction) of the fp32 mAP50."""
    return ref - got <= tolerance * ref + 1e-9  # the boundary itself passes, whatever the float rounding


@dataclass
class Candidate:
    path: Path
    graph: GraphReport
    params: int
    model: object  # the fp32 student it was quantized from
    ratio: float
    float_layers: list[int] | int = 0
    precision: dict = field(default_factory=dict)  # precision.Precision.as_dict() where the layers were chosen


@dataclass
class Tried:
    """One candidate's figures, as the manifest records them."""
    ratio: float
    params: int
    map50: float
    drop: float  # fraction of the dense fp32 mAP50 lost
    passed: bool
    latency_ms: float  # this machine, onnxruntime, 1 thread
    target_ms: float  # on snapshot.latency-target: the same figure for host, else the cost model's estimate
    epochs: int  # recovery epochs of this step
    minutes: float  # this step's wall time (recovery, precision, quantization, scoring)
    float_layers: list[int] | int
    note: str = ""


@dataclass
class Outcome:
    best: Candidate | None  # the fastest candidate that passed
    last: Candidate  # the last one scored (what a rejection records)
    last_score: EvalResult
    best_score: EvalResult | None
    tried: list[Tried]
    minutes: float
    stopped: str  # why the search ended


Score = Callable[[Candidate], EvalResult]
Build = Callable[..., Candidate]


def figures_of(tried: Sequence[Tried], cand: Candidate) -> Tried:
    """A candidate's figures: the last scored at its ratio (a step recovered again was scored twice)."""
    return next(t for t in reversed(tried) if t.ratio == cand.ratio)


def step_ratio(prev: float, ratio: float) -> float:
    """The cut of the current model that takes it from `prev` to `ratio` of the starting model's channels."""
    return 1.0 - (1.0 - ratio) / (1.0 - prev)


def run(dense, cfg: Config, ref: float, score: Score, build: Build, latency: Callable[[Path], float],
        say: Callable[[str, int, int], None], versus: Callable[[Path, Path], float] | None = None) -> Outcome:
    """Fixed snapshot.prune-ratio: that ratio, then unpruned (the old recipe). "auto": the unpruned int8 candidate
    (the fallback), then the ladder snapshot.search-ratios, each step pruned from the last one and recovered
    (distilled from `dense`) for its share of snapshot.recover-epochs, while it passes the gate, fits the time
    budget and the latency budget is not yet met. `versus(a, b)`: b's time relative to a's, (b - a) / a, timed side
    by side; with it a passing candidate replaces the best one on that (host target), not on `latency` figures
    taken minutes apart."""
    s, t0, tried = cfg.snapshot, time.perf_counter(), []
    best = best_score = None
    last = last_score = None
    minutes = lambda: (time.perf_counter() - t0) / 60  # noqa: E731

    def consider(cand: Candidate, epochs: int, started: float, note: str = "") -> bool:
        nonlocal best, best_score, last, last_score
        got = score(cand)
        host = latency(cand.path)
        target = host if s.latency_target == "host" else costmodel.estimate_ms(
            cand.path.with_name("fp32.onnx"), float_nodes(cand.path.with_name("fp32.onnx"), cand.float_layers),
            s.latency_target)
        passed = within(got.map50, ref, s.tolerance)
        if passed and best is not None and versus is not None and s.latency_target == "host":
            # Side by side: one structure timed 4.81 and 3.44 ms alone, minutes apart, in one search (README)
            change = versus(best.path, cand.path)
            faster = change < -FASTER_BY
            note = "; ".join(filter(None, [note, f"{change:+.1%} against prune {best.ratio:.0%}, paired"]))
        else:
            faster = best is None or target < (1 - FASTER_BY) * figures_of(tried, best).target_ms
        tried.append(Tried(cand.ratio, cand.params, got.map50, (ref - got.map50) / ref if ref else 0.0, passed, host,
                           target, epochs, (time.perf_counter() - started) / 60, cand.float_layers, note))
        last, last_score = cand, got
        if passed and faster:
            best, best_score = cand, got
        if not passed:
            log.warning("snapshot candidate rejected: prune %.0f%%, mAP50 %.3f int8 vs %.3f fp32 (tolerance %.0f%%)",
                        cand.ratio * 100, got.map50, ref, s.tolerance * 100)
        return passed

    if s.ratio is not None:  # a fixed ratio: the configured one, then no pruning
        for ratio in dict.fromkeys([s.ratio, 0.0]):
            started = time.perf_counter()
            if consider(build(dense, ratio, s.recover_epochs if ratio else 0), s.recover_epochs if ratio else 0,
                        started):
                break
        return Outcome(best, last, last_score, best_score, tried, minutes(), "fixed ratio")

    started = time.perf_counter()
    if not consider(build(dense, 0.0, 0), 0, started):  # unpruned fails: pruning will not pass either
        return Outcome(None, last, last_score, None, tried, minutes(), "the unpruned int8 candidate failed the gate")
    budget, current, prev, per_epoch = s.search_minutes * 60, dense, 0.0, None
    stopped = "every ratio of snapshot.search-ratios tried"
    for ratio in s.ladder:
        if s.latency_budget_ms > 0 and figures_of(tried, best).target_ms <= s.latency_budget_ms:
            stopped = f"latency budget met ({figures_of(tried, best).target_ms:.1f} <= {s.latency_budget_ms} ms)"
            break
        epochs = max(1, round(s.recover_epochs * (ratio - prev) / RATIO_STEP_EPOCHS)) if s.recover_epochs else 0
        left = budget - (time.perf_counter() - t0)
        # The last step's cost per epoch (recovery gets cheaper as the model shrinks: an upper bound)
        if per_epoch is not None and per_epoch * epochs > left:
            stopped = f"prune {ratio:.0%} would not fit the {s.search_minutes:g} min budget"
            break
        started = time.perf_counter()
        try:
            cand = build(current, ratio, epochs, step=step_ratio(prev, ratio), deadline=t0 + budget)
        except OutOfTime:
            stopped = f"prune {ratio:.0%}: its recovery would have overrun the {s.search_minutes:g} min budget"
            break
        per_epoch = (time.perf_counter() - started) / max(epochs, 1)
        passed = consider(cand, epochs, started)
        if not passed and epochs and tried[-1].drop <= NEAR_MISS * s.tolerance:
            if per_epoch * epochs > budget - (time.perf_counter() - t0):
                stopped = f"prune {ratio:.0%} failed the gate; recovering it again would not fit the budget"
                break
            missed, started = tried[-1].drop, time.perf_counter()
            try:
                cand = build(cand.model, ratio, epochs, step=0.0, again=True, deadline=t0 + budget)
            except OutOfTime:
                stopped = f"prune {ratio:.0%} failed the gate; recovering it again would have overrun the budget"
                break
            passed = consider(cand, epochs, started,
                              f"recovered again: {missed:.1%} lost after the first {epochs} epochs")
        if not passed:
            stopped = f"prune {ratio:.0%} failed the gate"  # deeper cuts of this model lose more
            break
        current, prev = cand.model, ratio
    return Outcome(best, last, last_score, best_score, tried, minutes(), stopped)


def candidate(model, ratio: float, epochs: int, cfg: Config, frames: np.ndarray, work: Path, metadata: dict,
              progress: Callable[[str, int, int], None], dense, step: float | None = None,
              deadline: float | None = None, previous_float: Sequence[int] = (), again: bool = False) -> Candidate:
    """1. prune `model` by `step` (default `ratio`) and recover it `epochs` from `dense` (`again`: a candidate's
    model, already pruned, recovered `epochs` more), 2. export, 3. choose the
    float layers (float-layers auto; `previous_float`: the channel's previous snapshot's) and quantize, and check
    what onnxruntime really runs."""
    from server.snapshots.pipeline import pruned_student, recover

    s, cut = cfg.snapshot, ratio if step is None else step
    work = work / f"prune{ratio:g}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def steps(done: int, total: int, _loss: float) -> None:
        progress(f"prune {ratio:.0%}: recovering", done, total)
        # Projected at a tenth of the way: a step that would overrun is stopped while little is spent
        if deadline is not None and done == max(1, total // 10):
            if t0 + (time.perf_counter() - t0) * total / done > deadline:
                raise OutOfTime(ratio)

    # The EMA steadies a recovery that continues from a recovered model; a fresh cut of the dense student is still
    # climbing at its end, where the EMA lags (fixed recipe: 0.006-0.03 mAP50 lost; README, searched compression)
    ema = s.recover_ema if model is not dense or again else 0.0
    if cut > 0:
        model = pruned_student(model, cut, cfg, progress=steps, teacher=dense, epochs=epochs, ema=ema)
    elif again and epochs > 0:  # a new shuffle of the frames for the second pass
        model = recover(model, dense, cfg, epochs, cfg.seed + 1, steps, ema)
    if s.cluster:  # weight sharing: the int8 model then packs into indices + codebooks (shared/snapshot/packed.py)
        from server.snapshots.cluster import clustered_student

        shares = lambda done, total, _loss: progress(f"prune {ratio:.0%}: sharing weights", done, total)  # noqa: E731
        model = clustered_student(model, dense, cfg, frames, progress=shares)
    fp32 = export_onnx(model, work / "fp32.onnx", cfg.data.imgsz, metadata)
    layers: list[int] | int = s.first_float if s.first_float is not None else 0
    chosen = {}
    if s.first_float is None and s.method == "static":
        # arm64: this machine's kernels are not the camera's; the cost model's core stands in for its latency
        core = (s.latency_target if s.latency_target != "host" else "cortex-a53") if s.target == "arm64" else None
        mixed = precision.choose(fp32, frames, s.target, work, s.float_budget,
                                 lambda done, total: progress(f"prune {ratio:.0%}: choosing float layers", done, total),
                                 core, previous_float)
        layers, chosen = mixed.float_layers, mixed.as_dict()
    progress(f"prune {ratio:.0%}: int8 quantization", 0, 1)
    int8 = quantize(fp32, work / "model.onnx", frames, s.target, s.method, layers)
    return Candidate(int8, inspect_optimized(int8, work), count_params(model), model, ratio, layers, chosen)


def record(outcome: Outcome) -> dict:
    """The manifest's account of the search."""
    return {"search_minutes": round(outcome.minutes, 2), "search_stopped": outcome.stopped,
            "candidates": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(t).items()}
                           for t in outcome.tried]}
