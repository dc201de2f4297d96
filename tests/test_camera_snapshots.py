"""Per-camera snapshots: calibration statistics from a camera's frames, the exchange's replies, and a real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import calibration
from client.camera import personal_file
from conftest import sim_cfg
from client.client_app import app
from server.snapshots.export import export_onnx, pre_process, quantize
from shared import personal
from shared.arrays import layout_of, pack, to_record, to_state_dict, unpack
from shared.config import to_flat
from shared.snapshot.calibration import CalibrationError, activation_ranges, from_lists, to_lists
from shared.snapshot.exchange import RIDE, RIDE_ARRAYS
from shared.train import local_plan

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def task_identity():
    """Messages take their run id from the process's task identity, as inside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def graph_of(model, tmp: Path) -> tuple[Path, Path]:
    fp32 = export_onnx(model, tmp / "fp32.onnx", 64, {})
    return fp32, pre_process(fp32, tmp / "fp32.pre.onnx")


def test_a_cameras_ranges_give_the_model_calibrated_on_its_own_frames(tiny_cfg, tiny_world, tiny_student, tmp_path):
    cfg = tiny_cfg.replace(**{"data.root": str(tiny_world)})
    fp32, pre = graph_of(tiny_student, tmp_path)
    cam = calibration.frames(tiny_world / "cam01" / "data.yaml", cfg, 8)
    base = calibration.frames(tiny_world / "base" / "data.yaml", cfg, 8)
    ranges = activation_ranges(pre, cam)
    on_camera = quantize(fp32, tmp_path / "cam.onnx", cam, pre=pre)  # what calibrating on the camera would give
    from_stats = quantize(fp32, tmp_path / "stats.onnx", base, ranges=ranges, pre=pre)  # the server, frameless
    on_base = quantize(fp32, tmp_path / "base.onnx", base, pre=pre)
    a, b, c = initializers(on_camera), initializers(from_stats), initializers(on_base)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)  # bit for bit
    assert any(not np.array_equal(a[k], c[k]) for k in a)  # and the camera's frames did matter
    lists = to_lists(ranges)
    assert from_lists(lists["tensors"], lists["low"], lists["high"], set(ranges), "camera x") == ranges
    with pytest.raises(CalibrationError, match="camera x.*missing"):
        from_lists(lists["tensors"][1:], lists["low"][1:], lists["high"][1:], set(ranges), "camera x")
    with pytest.raises(CalibrationError, match="camera x: tensor .* unusable"):
        from_lists(lists["tensors"], [float("nan")] + lists["low"][1:], lists["high"], set(ranges), "camera x")


def query(kind: str, content: RecordDict) -> Message:
    return Message(content, dst_node_id=5, message_type=kind)


def test_the_exchange_replies_carry_only_statistics_personal_tensors_and_figures(tiny_cfg, tiny_world, tiny_student,
                                                                                 tmp_path):
    cfg = tiny_cfg.replace(**{"data.root": str(tiny_world), "run-dir": str(tmp_path / "run"), "fed.personal": "bn",
                              "fed.freeze-bn": False, "fed.local-lr": 0.01})
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config=to_flat(cfg))
    names = [tiny_student.names[i] for i in sorted(tiny_student.names)]
    config = ConfigRecord({"model-yaml": json.dumps(tiny_student.yaml), "names": names, **local_plan(cfg.fed),
                           "seed": 1})
    trained = app(query("train", RecordDict({"arrays": pack(to_record(tiny_student)), "config": config})), context)
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""

    # 1. Its personal part for the snapshot's structure: the BatchNorm tensors it kept, nothing else.
    ask = ConfigRecord({"model-yaml": json.dumps(tiny_student.yaml), "names": names, "personal": "bn",
                        "keep-finetuned": False})
    out = app(query("query.personal", RecordDict({"arrays": pack(to_record(tiny_student)), "config": ask})), context)
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    keys = list(out.content["config"]["keys"])
    assert set(out.content["config"].keys()) == {"camera-id", "keys"} and out.content["config"]["camera-id"] == "cam01"
    assert keys and set(keys) <= set(personal.personal_keys(tiny_student, "bn"))
    layout = [item for item in layout_of(to_record(tiny_student)) if item[0] in set(keys)]
    own = to_state_dict(unpack(out.content["arrays"], layout))  # exactly those tensors: nothing else fits
    kept = personal.load_part(personal_file(context.node_config, cfg, tiny_student.yaml, "bn"))
    assert all(torch.equal(own[k], kept[k]) for k in keys)

    # 2. Calibration: named ranges of exactly the tensors the quantizer calibrates, and a score; no arrays.
    fp32, pre = graph_of(tiny_student, tmp_path)
    out = app(query("query.calibrate", RecordDict({"config": ConfigRecord({"onnx": pre.read_bytes()})})), context)
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    assert set(out.content.keys()) == {"calibration", "metrics"} and not out.content.array_records
    stats = out.content["calibration"]
    assert set(stats.keys()) == {"camera-id", "tensors", "low", "high"}
    expected = set(activation_ranges(pre, calibration.frames(tiny_world / "base" / "data.yaml", cfg, 1)))
    ranges = from_lists(stats["tensors"], stats["low"], stats["high"], expected, "camera cam01")
    assert set(out.content["metrics"].keys()) == {"frames", "num-examples", "map50-fp32", "map-fp32"}
    assert out.content["metrics"]["frames"] == min(cfg.snapshot.calib_frames, 16)  # its 8 pool + 8 of its train frames

    # 3. The int8 candidate the server makes from them, scored on the camera's val split.
    int8 = quantize(fp32, tmp_path / "int8.onnx", calibration.frames(tiny_world / "base" / "data.yaml", cfg, 1),
                    ranges=ranges, pre=pre)
    out = app(query("query.score", RecordDict({"config": ConfigRecord({"onnx": int8.read_bytes()})})), context)
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    assert set(out.content["metrics"].keys()) == {"num-examples", "map50-int8", "map-int8"}
    assert 0.0 <= out.content["metrics"]["map50-int8"] <= 1.0

    # The same steps riding on train messages (snapshot.every): the reply is the update, its metrics and the step's
    # answer, nothing more; a step the camera cannot do is named in its answer and its update still goes.
    def ride(step: str, **extra) -> RecordDict:
        asked = ConfigRecord({"step": step, "base": "v0001", **extra})
        out = app(query("train", RecordDict({"arrays": pack(to_record(tiny_student)), "config": config, RIDE: asked})),
                  context)
        assert not out.has_error(), out.error.reason if out.has_error() else ""
        return out.content

    head = {"step", "base", "camera-id"}
    got = ride("personal")
    assert set(got.keys()) == {"arrays", "metrics", RIDE, RIDE_ARRAYS}
    assert set(got[RIDE].keys()) == head | {"keys"} and got[RIDE]["step"] == "personal"
    keys = list(got[RIDE]["keys"])
    assert keys and set(keys) <= set(personal.personal_keys(tiny_student, "bn"))
    unpack(got[RIDE_ARRAYS], [item for item in layout_of(to_record(tiny_student)) if item[0] in set(keys)])
    got = ride("calibrate", onnx=pre.read_bytes())
    assert set(got.keys()) == {"arrays", "metrics", RIDE}
    assert set(got[RIDE].keys()) == head | {"tensors", "low", "high"} | {
        f"metric-{k}" for k in ("frames", "num-examples", "map50-fp32", "map-fp32")}
    got = ride("score", onnx=int8.read_bytes())
    assert set(got[RIDE].keys()) == head | {f"metric-{k}" for k in ("num-examples", "map50-int8", "map-int8")}
    got = ride("score", onnx=int8.read_bytes(), **{"global": int8.read_bytes()})  # the global one scored beside it
    assert got[RIDE]["metric-map50-global"] == got[RIDE]["metric-map50-int8"]
    assert got[RIDE]["metric-map-global"] == got[RIDE]["metric-map-int8"]
    got = ride("score", onnx=b"not an onnx model")
    assert set(got.keys()) == {"arrays", "metrics", RIDE} and "error" in got[RIDE], dict(got[RIDE])


@pytest.fixture(scope="session")
def camera_run(tmp_path_factory, tiny_cfg):
    """A 2-camera, 1-round simulation with per-camera snapshots (fed.personal bn) of a global snapshot pruned after
    the rounds (the tiny recipe's 50 %); camera 1's unlabelled pool has corrupt frames only, so it trains as usual
    and only its part of the exchange fails."""
    from server.local import simulation
    from shared.data.world import ensure_world

    root = tmp_path_factory.mktemp("camera_run")
    world = root / "world"  # a world of its own (a copy's data.yaml files would still point at the shared one)
    ensure_world(tiny_cfg.replace(**{"data.root": str(world)}), lazy=False)
    bad = world / "cam01" / "images" / "pool"
    for frame in bad.iterdir():  # one bad frame is skipped and reported; with none usable the camera must fail
        frame.write_bytes(b"not a jpeg")
    cfg = sim_cfg(tiny_cfg, world, root / "run", **{"fed.rounds": 1, "fed.personal": "bn", "fed.freeze-bn": False,
                                                    "snapshot.per-camera": True, "snapshot.tolerance": 1.0})
    code = simulation.launch(cfg, 2, timeout=400)
    return cfg, code, bad


def test_each_camera_gets_its_own_snapshot_and_a_failing_one_keeps_the_global(camera_run, tmp_path):
    from client.runtime.agent import Agent  # noqa: F401  (the device runtime: no torch, no Flower)
    from server.federation.events import read_events
    from server.snapshots.registry import Registry
    from shared.run_dir import RunDir
    from shared.snapshot.format import load_public_key, verify_dir
    from shared.snapshot.inference import Detector

    cfg, code, bad = camera_run
    run = RunDir(cfg.run_dir)
    assert code == 0, run.log.read_text()[-3000:]
    events = {e["data"]["camera"]: e["data"] for e in read_events(run.events) if e["kind"] == "camera_snapshot"}
    assert set(events) == {"cam00", "cam01"}
    ok, failed = events["cam00"], events["cam01"]
    assert ok["published"] and ok["version"] == "v0001" and ok["base"] == "v0001" and ok["personal_tensors"] > 0
    assert not failed["published"] and str(bad) in failed["reason"], failed  # the culprit is named
    registry = Registry(Path(cfg.run_dir) / "snapshots")
    assert registry.latest("cam00")["version"] == "v0001" and registry.latest("cam01") is None
    assert registry.latest()["version"] == "v0001"  # the global channel is untouched
    folder = registry.folder("cam00") / "v0001"
    key = load_public_key((registry.root / "server_public_key.pem").read_bytes())
    manifest = verify_dir(folder, key)
    assert manifest.extra["camera"] == "cam00" and manifest.extra["base_snapshot"] == "v0001"
    assert manifest.extra["calibration"]["source"] == "camera cam00" and manifest.extra["int8_convs"] > 0
    (out,) = Detector(folder / "model.onnx", manifest.imgsz).raw(np.zeros((1, 3, 64, 64), np.uint8))
    assert out.shape[0] == 4 + len(manifest.names) and np.isfinite(out).all()
    # A camera's snapshot is its own: different weights (its BatchNorm) and ranges than the global one. The global
    # one was pruned after the rounds; the camera's keeps the structure it trained (its part does not survive the
    # cut, README), and says so.
    glob = registry.folder() / "v0001"
    assert manifest.sha256 != json.loads((glob / "manifest.json").read_text())["sha256"]
    assert json.loads((glob / "manifest.json").read_text())["extra"]["prune_ratio"] == 0.5
    assert manifest.extra["prune_ratio"] == 0.0 and "unpruned" in manifest.extra["structure"]
    weights = lambda path: sum(v.size for k, v in initializers(path).items() if not k.startswith("/"))  # noqa: E731
    assert weights(folder / "model.onnx") > 1.5 * weights(glob / "model.onnx")
    assert [r["camera"] for r in registry.camera_rows()] == ["cam00"]



def test_an_own_snapshot_worse_than_the_global_one_on_its_camera_is_refused(camera_run, tmp_path):
    """Within the tolerance of its own fp32 model is not enough: the camera scores the global snapshot beside its
    candidate, and a candidate below it is refused (the camera keeps the global one); a tie is published."""
    import shutil

    from server.snapshots.cameras import Camera, _gate_and_publish
    from server.snapshots.export import inspect_optimized
    from server.snapshots.pipeline import SnapshotResult
    from server.snapshots.registry import registry_for
    from shared.snapshot.format import Manifest

    cfg, _, _ = camera_run
    shutil.copytree(Path(cfg.run_dir) / "snapshots", tmp_path / "snapshots")  # the run's own registry stays as it is
    registry = registry_for(cfg.replace(**{"snapshot.dir": str(tmp_path / "snapshots")}))
    folder = registry.folder() / "v0001"
    base = SnapshotResult(Manifest.from_bytes((folder / "manifest.json").read_bytes()), True, "", 0, 0, 0, 0)
    int8 = (folder / "model.onnx", inspect_optimized(folder / "model.onnx", tmp_path), 16, 10, {"map-fp32": 0.4})
    worse, tie = Camera(7, "cam07", map50_fp32=0.5), Camera(8, "cam08", map50_fp32=0.5)
    _gate_and_publish(worse, {"map50-int8": 0.5, "map-int8": 0.3, "map50-global": 0.6, "map-global": 0.4}, int8, base,
                      cfg, registry)
    assert not worse.published and "vs 0.600 of the global one on camera cam07" in worse.reason, worse.reason
    assert registry.latest("cam07") is None
    _gate_and_publish(tie, {"map50-int8": 0.5, "map-int8": 0.3, "map50-global": 0.5, "map-global": 0.3}, int8, base,
                      cfg, registry)
    assert tie.published and registry.latest("cam08")["version"] == "v0001"

@pytest.mark.slow
def test_cameras_that_do_not_answer_in_time_keep_the_global_snapshot(tiny_cfg, tiny_world, tmp_path):
    """snapshot.camera-timeout shorter than any camera's answer: the exchange gives up on every camera, each keeps
    the global snapshot (which is published), and the run still ends completed."""
    from server.federation.events import read_events
    from server.local import simulation
    from server.snapshots.registry import Registry
    from shared.run_dir import RunDir

    cfg = sim_cfg(tiny_cfg, tiny_world, tmp_path / "run", **{"fed.rounds": 1, "fed.personal": "bn",
                                                             "fed.freeze-bn": False, "snapshot.per-camera": True,
                                                             "snapshot.prune-ratio": 0.0, "snapshot.tolerance": 1.0,
                                                             "snapshot.camera-timeout": 0.05})
    run = RunDir(cfg.run_dir)
    assert simulation.launch(cfg, 2, timeout=400) == 0, run.log.read_text()[-3000:]
    outcomes = [e["data"] for e in read_events(run.events) if e["kind"] == "camera_snapshot"]
    assert len(outcomes) == 2 and not any(o["published"] for o in outcomes)
    assert all("query.personal: no answer within 0 s" in o["reason"] for o in outcomes), outcomes
    registry = Registry(Path(cfg.run_dir) / "snapshots")
    assert registry.latest()["version"] == "v0001" and registry.camera_rows() == []


@pytest.mark.slow
def test_camera_snapshots_ride_on_the_rounds_every_snapshot_every(tiny_cfg, tiny_world, tmp_path):
    """snapshot.every = 4 with per-camera snapshots: the exchange's steps ride on later rounds' train messages (one
    step per round, personal -> calibrate -> score), so each camera's own snapshot of an earlier global one is
    published while the rounds go on, and the exchange after the rounds still makes one of the last global one.
    Counted in rounds, not seconds: the first global snapshot (of round 4) is published about two rounds later, and
    the three steps then took 4-6 rounds here (a step waits for the server's 1-3 s of work, tiny rounds take 1-4
    s): 20 rounds leave room for twice that."""
    from server.federation.events import read_events
    from server.local import simulation
    from server.snapshots.registry import Registry
    from shared.run_dir import RunDir

    rounds = 20
    cfg = sim_cfg(tiny_cfg, tiny_world, tmp_path / "run", **{"fed.rounds": rounds, "fed.personal": "bn",
                                                             "fed.freeze-bn": False, "snapshot.per-camera": True,
                                                             "snapshot.every": 4, "snapshot.prune-ratio": 0.0,
                                                             "snapshot.tolerance": 1.0})
    run = RunDir(cfg.run_dir)
    assert simulation.launch(cfg, 2, timeout=900) == 0, run.log.read_text()[-3000:]
    events = read_events(run.events)
    last_round_end = max(e["time"] for e in events if e["kind"] == "round_end" and e["round"] == rounds)
    final = [e for e in events if e["kind"] == "snapshot" and e["round"] == rounds][0]["data"]["version"]
    own = [e for e in events if e["kind"] == "camera_snapshot"]
    during = [e for e in own if e["time"] < last_round_end]
    assert {e["data"]["camera"] for e in during} == {"cam00", "cam01"}, own
    assert all(e["data"]["published"] and e["data"]["personal_tensors"] > 0 for e in during), during
    assert all(e["data"]["base"] != final for e in during)  # of an earlier global snapshot
    # The steps rode on train messages, one a round: each camera spent exchange time in at least 3 rounds (its
    # snapshot is published while the round of its last step is aggregated), and no reply was rejected for them.
    trains = [e for e in events if e["kind"] == "train_result"]
    assert all(c["ok"] for t in trains for c in t["data"]["clients"]), trains
    for e in during:
        carried = [t["round"] for t in trains for c in t["data"]["clients"]
                  if c["metrics"].get("partition") == int(e["data"]["camera"][3:]) and "exchange-seconds" in c["metrics"]]
        assert len(carried) >= 3, (e["data"]["camera"], carried)
    # After the rounds, the exchange by query messages makes each camera's snapshot of the last global one.
    assert {e["data"]["camera"] for e in own if e["data"]["base"] == final and e["data"]["published"]} == {"cam00",
                                                                                                           "cam01"}
    registry = Registry(Path(cfg.run_dir) / "snapshots")
    rows = registry.camera_rows()
    assert all(sum(r["camera"] == cam for r in rows) >= 2 for cam in ("cam00", "cam01")), rows


def test_a_refused_candidate_is_tried_once_more_with_its_worst_int8_layers_float():
    from server.snapshots.cameras import more_float

    precision = {"layers": [{"index": i, "error": e} for i, e in enumerate([0.02, 0.05, 0.01, 0.04, 0.03])]}
    assert more_float([0, 2], precision, 2) == [0, 1, 2, 3]  # the two largest errors among the int8 layers
    assert more_float(1, precision, 1) == [0, 1]  # "the first N" counts as those N
    assert more_float([0, 1, 2, 3, 4], precision, 3) is None and more_float(2, {}, 3) is None  # nothing left to add


def test_a_candidate_refused_for_its_int8_loss_is_made_again_once_with_more_layers_float(camera_run, tiny_student,
                                                                                         tmp_path):
    """The exchange's own steps on the server (no camera): the candidate from a camera's ranges, refused for its
    int8 loss, comes back once with the 3 int8 layers of largest recorded error float as well; never twice."""
    import shutil

    from server.snapshots.cameras import Camera, Exchange
    from server.snapshots.pipeline import SnapshotResult
    from server.snapshots.registry import registry_for
    from shared.snapshot.format import Manifest

    cfg, _, _ = camera_run
    shutil.copytree(Path(cfg.run_dir) / "snapshots", tmp_path / "snapshots")
    cfg = cfg.replace(**{"snapshot.dir": str(tmp_path / "snapshots"), "snapshot.tolerance": 0.02})
    registry = registry_for(cfg)
    manifest = Manifest.from_bytes((registry.folder() / "v0001" / "manifest.json").read_bytes())
    layers = [{"index": i, "error": 0.01 * (i % 7)} for i in range(20)]  # as precision.py records them
    manifest.extra.update(float_layers=[0], precision={"layers": layers})
    ex = Exchange(cfg, SnapshotResult(manifest, True, "", 0, 0, 0, 0, tiny_student), registry, tmp_path / "work")
    cam = Camera(3, "cam03")
    graph = tmp_path / "pre.onnx"
    graph.write_bytes(ex.graph(cam))
    stats = to_lists(activation_ranges(graph, calibration.frames(Path(cfg.data.root) / "cam00" / "data.yaml", cfg, 4)))
    first = ex.quantize(cam, stats, {"map50-fp32": 0.5, "frames": 4, "map-fp32": 0.3})
    assert first is not None and not cam.reason, cam.reason
    float_before = ex.int8s[cam.node][1].float_convs
    ex.publish(cam, {"map50-int8": 0.3, "map-int8": 0.2})  # 40 % lost: refused
    assert cam.refused == "int8" and not cam.published
    again = ex.retry(cam)
    assert again is not None and again != first and not cam.reason and cam.retried
    assert ex.int8s[cam.node][1].float_convs > float_before  # 3 more modules float: their convs
    ex.publish(cam, {"map50-int8": 0.49, "map-int8": 0.3})
    assert cam.published and registry.latest("cam03")["version"] == "v0002"  # v0001: the refused one, on record
    cam.refused = "int8"
    assert ex.retry(cam) is None  # one more try, not more
