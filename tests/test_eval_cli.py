"""`fedcam eval` takes every model fedcam makes (student .pt, Ultralytics .pt, round checkpoints old and new,
snapshot folder, ONNX) with the same mAP for the same weights, and refuses anything else in one line, exit code 2."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from server.federation.checkpoint import RoundsDone, RunCheckpoints
from server.cli import app
from server.snapshots.export import export_onnx
from server.snapshots.registry import Registry, now_iso
from shared import models, task
from shared.arrays import to_record
from shared.config import to_flat
from shared.evaluate import TorchPredictor
from shared.snapshot.format import MODEL_FILE, Manifest, sha256_file

IMGSZ = 64
SETS = ["--set", "train.threads=1", "--set", "eval.batch=8"]


def confident(model, frames: torch.Tensor):
    """Random weights that detect something: BatchNorm statistics taken from real frames (at random init the
    activations fade to ~1e-7 by the head, so every score is 0.5 and every box the same), boxes about one stride
    wide (an untrained head's are wider than the 64 px frame) and class scores spread around 0.5."""
    head = model.model[-1]
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.reset_running_stats()
            bn.momentum = None  # the plain average over the passes below
        model.train()
        model(frames)
        for box, cls in zip(head.cv2, head.cv3):
            box[-1].weight.mul_(0.1)  # still input-dependent, a little
            bias = box[-1].bias.view(4, head.reg_max)  # per box side, its DFL bins
            bias.zero_()
            bias[:, :2] = 8.0  # expected distance ~0.5 stride
            cls[-1].bias.zero_()
    return model.eval()


def self_labelled(model, cfg, out: Path) -> Path:
    """The tiny world's base val frames labelled with `model`'s own 3 best detections each: these weights score a
    high mAP50 on it, any others a low one, so equal figures mean equal weights evaluated the same way."""
    batch = next(iter(task.make_loader(task.base_yaml(cfg), "val", cfg, False, batch=64)))
    preds = TorchPredictor(model, task.nms_settings(cfg))(batch["img"].numpy())
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    for file, pred in zip(batch["im_file"], preds):  # frames are 64 x 64: the letterbox changes nothing
        lines = []
        for x1, y1, x2, y2, _, c in pred[:3]:
            x1, y1, x2, y2 = np.clip([x1, y1, x2, y2], 0, IMGSZ) / IMGSZ
            lines.append(f"{int(c)} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
        shutil.copy(file, out / "images" / Path(file).name)
        (out / "labels" / f"{Path(file).stem}.txt").write_text("\n".join(lines) + "\n")
    data = out / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(out), "train": "images", "val": "images",
                                    "names": dict(enumerate(cfg.data.names))}))
    return data


def write_run(run: Path, cfg, start: Path) -> None:
    """A run folder's run_config.json, as simulation.launch writes it."""
    run.mkdir(parents=True)
    flat = {**to_flat(cfg.replace(**{"model.student-checkpoint": str(start)})), "run-dir": str(run)}
    (run / "run_config.json").write_text(json.dumps(flat, indent=1))


@pytest.fixture(scope="module")
def made(tiny_cfg, tiny_world, tmp_path_factory):
    """One set of weights in every form fedcam writes, the run's starting student, and data they are scored on."""
    tmp = tmp_path_factory.mktemp("eval_cli")
    cfg = tiny_cfg.replace(**{"data.root": str(tiny_world), "train.threads": 1})
    torch.manual_seed(0)
    start = models.build_student(cfg.model, cfg.data.names)
    frames = next(iter(task.make_loader(task.base_yaml(cfg), "train", cfg, False, batch=64)))["img"]
    net = confident(copy.deepcopy(start), frames.float() / 255)  # "after round 1"
    names = list(cfg.data.names)
    files = {"start": models.save(start, tmp / "start.pt"), "pt": models.save(net, tmp / "student.pt")}
    ultra = tmp / "ultralytics.pt"
    torch.save({"model": copy.deepcopy(net), "train_args": {"imgsz": IMGSZ, "task": "detect"}}, ultra)
    files["ultralytics"] = ultra

    write_run(tmp / "run", cfg, files["start"])  # round checkpoint as the server writes it
    state = {"momentum": np.arange(3, dtype=np.float32)}
    files["round"] = RunCheckpoints(tmp / "run").save(1, to_record(net), state, RoundsDone(1, 2, "fedavg"),
                                                      net.yaml, names)
    write_run(tmp / "old", cfg, files["start"])  # a round checkpoint from before they described their model
    (tmp / "old" / "checkpoints").mkdir()
    files["old_round"] = tmp / "old" / "checkpoints" / "global_r0001.pt"
    torch.save(dict(net.state_dict()), files["old_round"])
    np.savez(tmp / "old" / "checkpoints" / "state_r0001.npz", **state)

    files["onnx"] = export_onnx(net, tmp / "student.onnx", IMGSZ, {})  # fp32: agrees with torch
    registry = Registry(tmp / "snapshots", tmp / "server_ed25519.pem")
    manifest = Manifest(version=registry.next_version(), round=1, target="x86", sha256=sha256_file(files["onnx"]),
                        size=files["onnx"].stat().st_size, imgsz=IMGSZ, names=names, map50_fp32=0.0,
                        map50_int8=0.0, map_fp32=0.0, map_int8=0.0, latency_ms=0.0, created=now_iso(),
                        parent_checkpoint=str(files["round"]))
    files["snapshot"] = registry.publish(manifest, files["onnx"])
    files["snapshot_onnx"] = files["snapshot"] / MODEL_FILE
    return files, self_labelled(net, cfg, tmp / "selflabelled"), net, tmp


def run_eval(path: Path, data: Path, *extra: str):
    return CliRunner().invoke(app, ["eval", "--checkpoint", str(path), "--data", str(data), *SETS, *extra])


def scores(path: Path, data: Path, *extra: str) -> dict:
    result = run_eval(path, data, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_kind_of_model_file_scores_the_same(made):
    files, data, _, _ = made
    torch_size = ["--set", f"data.imgsz={IMGSZ}"]  # ONNX models bring their own (the default is not 64)
    got = {k: scores(files[k], data, *torch_size) for k in ("pt", "ultralytics", "round", "old_round")}
    got.update({k: scores(files[k], data) for k in ("onnx", "snapshot", "snapshot_onnx")})
    assert {k: v["kind"] for k, v in got.items()} == {
        "pt": "fedcam checkpoint", "ultralytics": "Ultralytics checkpoint", "round": "round checkpoint",
        "old_round": "round checkpoint", "onnx": "ONNX model", "snapshot": "ONNX snapshot",
        "snapshot_onnx": "ONNX snapshot"}
    ref = got["pt"]
    assert ref["map50"] > 0.3, ref  # the weights find their own labels
    for kind, r in got.items():
        assert abs(r["map50"] - ref["map50"]) <= 1e-3 and abs(r["map"] - ref["map"]) <= 1e-3, (kind, r, ref)
        assert set(r["per_class"]) == set(ref["per_class"]) and r["images"] == ref["images"] == 12, kind
    # the old round checkpoint got the round's weights, not those of the starting student its run names
    assert scores(files["start"], data, *torch_size)["map50"] < ref["map50"] - 0.2


def test_table_output_names_the_kind(made):
    files, data, _, _ = made
    result = run_eval(files["snapshot"], data)
    assert result.exit_code == 0, result.output
    assert "ONNX snapshot" in result.stdout and "mAP50" in result.stdout


def test_resume_reads_round_checkpoints_old_and_new(made):
    files, _, net, tmp = made
    want = to_record(net)
    for run in (tmp / "run", tmp / "old"):
        arrays, state = RunCheckpoints(run).load(1)
        assert list(arrays) == list(want)
        assert all(np.array_equal(arrays[k].numpy(), want[k].numpy()) for k in want), run
        assert np.array_equal(state["momentum"], np.arange(3, dtype=np.float32))
    blob = torch.load(files["round"], weights_only=True)  # self-describing, and plain data
    assert blob["names"] == list(net.names.values()) and blob["meta"] == {"round": 1, "strategy": "fedavg"}


def wrong_files(made, tiny_cfg, tmp: Path) -> dict[str, tuple[Path, Path, str]]:
    """name -> (model path, data path, what the message must say)."""
    import onnx
    from onnx import TensorProto, helper

    files, data, net, _ = made
    notes = tmp / "notes.txt"
    notes.write_text("not a model\n")
    fake_onnx = tmp / "fake.onnx"
    fake_onnx.write_text("not a model either\n")
    add = tmp / "add.onnx"
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "xy")
    proto = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(add))
    optimizer = tmp / "optimizer.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.01}}, optimizer)
    weights = tmp / "weights.pt"
    torch.save(dict(net.state_dict()), weights)
    other = models.build_student(tiny_cfg.model, ["cat", "dog", "bird"])
    other_pt = models.save(other, tmp / "other_names.pt")
    other_onnx = export_onnx(other, tmp / "other_names.onnx", IMGSZ, {})
    tampered = tmp / "tampered"
    shutil.copytree(files["snapshot"], tampered)
    with open(tampered / MODEL_FILE, "ab") as f:
        f.write(b"\0")
    (tmp / "empty").mkdir()
    orphan = tmp / "orphan" / "checkpoints" / "global_r0001.pt"  # an old round checkpoint without its run
    orphan.parent.mkdir(parents=True)
    shutil.copy(files["old_round"], orphan)
    return {
        "missing": (tmp / "missing.pt", data, "no such file"),
        "text": (notes, data, "not a torch checkpoint"),
        "text as onnx": (fake_onnx, data, "not a readable ONNX model"),
        "not a detector": (add, data, "expected a detector"),
        "optimizer": (optimizer, data, "neither a fedcam checkpoint nor an Ultralytics detection checkpoint"),
        "bare weights": (weights, data, "plain weights without a model description"),
        "old round, no run": (orphan, data, "without its run's"),
        "other classes": (other_pt, data, "['cat', 'dog', 'bird']"),
        "other classes onnx": (other_onnx, data, "expected the same classes in the same order"),
        "tampered": (tampered, data, "sha256 differs"),
        "empty folder": (tmp / "empty", data, "a folder without model.onnx"),
        "missing data": (files["pt"], tmp / "nope.yaml", "data.yaml not found"),
    }


def test_wrong_files_get_one_line_and_exit_code_2(made, tiny_cfg, tmp_path):
    for name, (path, data, says) in wrong_files(made, tiny_cfg, tmp_path).items():
        for extra in ([], ["--json"]):
            result = run_eval(path, data, *extra)
            assert result.exit_code == 2, (name, result.output)
            assert "Traceback" not in result.output and result.stdout == "", (name, result.output)
            (line,) = result.stderr.strip().splitlines()
            assert line.startswith("error: ") and says in line, (name, line)
            assert str(path if name != "missing data" else data) in line, (name, line)  # names the file
