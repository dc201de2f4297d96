"""Models build from yaml, checkpoints load safely, and weights round-trip exactly through ArrayRecord."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from shared import models
from shared.arrays import UpdateError, check_compatible, is_packed, layout_of, pack, to_record, to_state_dict, unpack


def test_student_is_tiny_and_teacher_larger(tiny_cfg, tiny_student):
    teacher = models.build_teacher(tiny_cfg.model, tiny_cfg.data.names)
    assert 100_000 < models.count_params(tiny_student) < 600_000
    assert models.count_params(teacher) > 2 * models.count_params(tiny_student)
    assert tiny_student.model[-1].nc == len(tiny_cfg.data.names)


def test_unknown_scale_is_a_clear_error():
    with pytest.raises(ValueError, match="no scale 'q'"):
        models.model_yaml("yolov8", "q")


def test_student_activation_stays_with_the_student(tiny_cfg, tmp_path):
    from ultralytics.nn.modules import Conv

    relu = models.build_student(tiny_cfg.replace(**{"model.student-activation": "relu"}).model, tiny_cfg.data.names)
    teacher = models.build_teacher(tiny_cfg.model, tiny_cfg.data.names)  # built after: must not inherit ReLU
    acts = lambda m: {type(c.act).__name__ for c in m.modules() if isinstance(c, Conv)}  # noqa: E731
    assert acts(relu) == {"ReLU"} and acts(teacher) == {"SiLU"}
    assert acts(models.load(models.save(relu, tmp_path / "s.pt"))) == {"ReLU"}  # the yaml carries it
    silu = models.build_student(tiny_cfg.replace(**{"model.student-activation": "silu"}).model, tiny_cfg.data.names)
    assert acts(silu) == {"SiLU"}
    with pytest.raises(ValueError, match="unknown activation 'gelu2'"):
        models.model_yaml("yolov8", "n", activation="gelu2")
    with pytest.raises(models.CheckpointError, match="__import__"):  # Ultralytics would eval() this string
        models.build({**relu.yaml, "activation": "__import__('os').getcwd()"}, tiny_cfg.data.names)


def test_array_record_round_trip_is_exact(tiny_student):
    with torch.no_grad():  # make BatchNorm buffers non-trivial
        for m in tiny_student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.num_batches_tracked.fill_(7)
    state = tiny_student.state_dict()
    back = to_state_dict(to_record(tiny_student))
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert any(v.dtype == torch.int64 for v in back.values())


def test_check_compatible_names_the_culprit(tiny_student):
    ref = {k: v.clone() for k, v in tiny_student.state_dict().items()}
    assert check_compatible(ref, to_record(ref)) == 0.0
    key = next(k for k, v in ref.items() if v.is_floating_point() and v.ndim == 4)
    bad = dict(ref, **{key: ref[key].clone().fill_(float("nan"))})
    with pytest.raises(UpdateError, match=f"{key}: contains NaN"):
        check_compatible(ref, to_record(bad))
    with pytest.raises(UpdateError, match="shape"):
        check_compatible(ref, to_record(dict(ref, **{key: ref[key][:1]})))
    with pytest.raises(UpdateError, match="dtype"):
        check_compatible(ref, to_record(dict(ref, **{key: ref[key].double()})))
    with pytest.raises(UpdateError, match="missing"):
        check_compatible(ref, to_record({k: v for k, v in ref.items() if k != key}))
    with pytest.raises(UpdateError, match="exceeds the bound"):
        check_compatible(ref, to_record(dict(ref, **{key: ref[key] + 100.0})), max_norm=1.0)


def test_fedcam_checkpoint_round_trip(tmp_path, tiny_student):
    path = models.save(tiny_student, tmp_path / "s.pt", note="x")
    loaded = models.load(path)
    for k, v in tiny_student.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert loaded.names == tiny_student.names


def test_ultralytics_checkpoint_loads_with_weights_only(tmp_path, tiny_student):
    # The layout Ultralytics' trainer saves: a pickled half-precision model object.
    ckpt = {"date": "2026", "version": "8.4", "epoch": -1, "model": copy.deepcopy(tiny_student).half(),
            "ema": None, "optimizer": None, "train_args": {"imgsz": 64}}
    torch.save(ckpt, tmp_path / "ul.pt")
    loaded = models.load(tmp_path / "ul.pt")
    w = "model.0.conv.weight"
    assert torch.allclose(loaded.state_dict()[w], tiny_student.state_dict()[w], atol=1e-2)
    assert loaded.state_dict()[w].dtype == torch.float32


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fedcam-pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    torch.save({"model": _Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(models.CheckpointError, match="refused"):
        models.load(tmp_path / "evil.pt")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(models.CheckpointError, match="trunc.pt"):
        models.load(tmp_path / "trunc.pt")
    with pytest.raises(models.CheckpointError, match="not found"):
        models.load(tmp_path / "missing.pt")


def test_packed_wire_format_is_exact_and_checked(tiny_student):
    record = to_record(tiny_student)
    wire = pack(record)
    assert is_packed(wire) and not is_packed(record) and len(wire) == 2  # float32 and int64
    back = to_state_dict(unpack(wire, layout_of(record)))
    assert list(back) == list(tiny_student.state_dict())
    assert all(torch.equal(back[k], v) for k, v in tiny_student.state_dict().items())
    with pytest.raises(UpdateError, match="packed float32"):
        unpack(wire, layout_of(record)[:-5])


def test_a_pruned_student_is_rebuilt_from_its_yaml_alone(tiny_cfg, tiny_student, tmp_path):
    """A student pruned before the rounds travels as yaml + weights: a ClientApp (packed arrays, whose layout it
    derives from the yaml) and a checkpoint both rebuild the same network; a record that widens a layer, names
    other layers or is not integers is refused, naming the layer."""
    import json

    from client.camera import global_model
    from server.snapshots.prune import prune
    from shared.pruned import KEY

    pruned = prune(tiny_student, 0.5, 64, round_to=1)
    assert models.count_params(pruned) < 0.7 * models.count_params(tiny_student)
    names = list(tiny_cfg.data.names)
    config = {"model-yaml": json.dumps(pruned.yaml), "names": names}
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = pruned.eval()(x)[0]
        for rebuilt in (global_model(pack(to_record(pruned)), config),
                        models.load(models.save(pruned, tmp_path / "pruned.pt"))):
            assert layout_of(to_record(rebuilt)) == layout_of(to_record(pruned))
            assert torch.equal(rebuilt.eval()(x)[0], want)
    record = json.loads(json.dumps(pruned.yaml))[KEY]
    conv = next(n for n, (cin, cout, _) in record["conv"].items() if cout < 16 and n.endswith(".conv"))
    widened = copy.deepcopy(record)
    widened["conv"][conv][1] = 10_000
    missing = copy.deepcopy(record)
    del missing["bn"][next(iter(missing["bn"]))]
    texty = copy.deepcopy(record)
    texty["conv"][conv][0] = "8"
    for bad, match in ((widened, f"{conv} out width 10000"), (missing, "bn layers differ"),
                       (texty, f"{conv} in width '8'"), ([1, 2], "expected")):
        with pytest.raises(models.CheckpointError, match=match):
            models.build({**pruned.yaml, KEY: bad}, names)
