"""fed.personal: a camera's personal part stays in its replies' absence, in its state and on its disk."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.camera import PersonalPart, personal_file
from client.client_app import app
from shared import personal
from shared.arrays import UpdateError, layout_of, pack, to_record, to_state_dict, unpack
from shared.config import to_flat
from shared.train import local_plan

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def task_identity():
    """Messages take their run id from the process's task identity, as inside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def train_message(model, cfg, seed: int = 1) -> Message:
    names = [model.names[i] for i in sorted(model.names)]
    config = ConfigRecord({"model-yaml": json.dumps(model.yaml), "names": names, **local_plan(cfg.fed),
                           "seed": seed, "evaluate-first": True})
    return Message(RecordDict({"arrays": pack(to_record(model)), "config": config}), dst_node_id=5,
                   message_type="train")


def test_the_bn_part_never_leaves_the_camera_and_survives_a_restart(tiny_cfg, tiny_world, tiny_student, tmp_path):
    cfg = tiny_cfg.replace(**{"data.root": str(tiny_world), "run-dir": str(tmp_path / "run"), "fed.personal": "bn",
                              "fed.freeze-bn": False, "fed.local-lr": 0.01})
    keys = personal.personal_keys(tiny_student, "bn")
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config=to_flat(cfg))
    out = app(train_message(tiny_student, cfg), context)
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    shared_layout = [item for item in layout_of(to_record(tiny_student)) if item[0] not in keys]
    reply = unpack(out.content["arrays"], shared_layout)  # fits the shared keys exactly: no BatchNorm in it
    assert not set(keys) & set(reply.keys())
    with pytest.raises(UpdateError):
        unpack(out.content["arrays"], layout_of(to_record(tiny_student)))
    metrics = out.content["metrics"]
    assert metrics["personal-kept"] == 0.0 and 0.0 <= metrics["own-map50"] <= 1.0
    # Kept in the node's state and on disk, and trained (BatchNorm statistics moved on this camera's frames).
    path = personal_file(context.node_config, cfg, tiny_student.yaml, "bn")
    assert personal.STATE_KEY in context.state and path.is_file()
    part = personal.load_part(path)
    initial = personal.part_of(tiny_student, keys)
    assert any(not torch.equal(part[k], initial[k]) for k in keys if k.endswith("running_mean"))
    # A restarted node (empty state) takes it from disk; the next round starts from it, not from the global one.
    restarted = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                        run_config=to_flat(cfg))
    again = app(train_message(tiny_student, cfg, seed=2), restarted)
    assert again.content["metrics"]["personal-kept"] == 1.0
    fresh = PersonalPart(tiny_student, "bn", RecordDict(), path)
    probe = copy.deepcopy(tiny_student)
    assert fresh.restore(probe) == "disk"
    assert all(torch.equal(probe.state_dict()[k], v) for k, v in personal.load_part(path).items())


def test_an_unusable_part_is_set_aside_and_the_camera_starts_from_global(tiny_cfg, tiny_student, tmp_path):
    path = tmp_path / "personal_0.pt"
    keys = personal.personal_keys(tiny_student, "bn")
    personal.save_part(path, {k: torch.zeros(3) for k in keys[:2]})  # another model's part
    model = copy.deepcopy(tiny_student)
    assert PersonalPart(model, "bn", RecordDict(), path).restore(model) == "global"
    assert not path.exists() and path.with_suffix(".unusable").is_file()  # kept, not overwritten
    assert all(torch.equal(model.state_dict()[k], tiny_student.state_dict()[k]) for k in keys)
    path.write_bytes(b"not a torch file")
    assert PersonalPart(model, "bn", RecordDict(), path).restore(model) == "global"
    assert path.with_suffix(".unusable").read_bytes() == b"not a torch file"
    with pytest.raises(ValueError, match="'fed.personal': 'all'"):
        tiny_cfg.replace(**{"fed.personal": "all"})


@pytest.mark.numerics
def test_adabn_sets_the_statistics_of_the_frames_and_leaves_the_weights(tiny_student):
    from shared.train import estimate_bn_stats

    model = copy.deepcopy(tiny_student)
    frames = [torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8) * (i + 1) // 2 for i in range(2)]
    weights = {k: v.clone() for k, v in model.named_parameters()}
    momentum = model.model[0].bn.momentum
    assert estimate_bn_stats(model, [{"img": x} for x in frames]) == 8
    with torch.no_grad():
        first = torch.cat([model.model[0].conv(x.float() / 255) for x in frames])
    assert torch.allclose(model.model[0].bn.running_mean, first.mean((0, 2, 3)), atol=1e-4)
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert model.model[0].bn.momentum == momentum and not model.training


def test_a_camera_that_keeps_its_finetuned_model_runs_exactly_what_it_sent(tiny_cfg, tiny_world, tiny_student,
                                                                            tmp_path):
    """fed.keep-finetuned (FedAvg+FT): the whole update still goes to the server, the camera keeps that model
    (state and disk) and Flower's evaluate stage scores it rather than the global model it is sent."""
    cfg = tiny_cfg.replace(**{"data.root": str(tiny_world), "run-dir": str(tmp_path / "run"),
                              "fed.keep-finetuned": True, "fed.local-lr": 0.01})
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config=to_flat(cfg))
    out = app(train_message(tiny_student, cfg), context)
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    sent = to_state_dict(unpack(out.content["arrays"], layout_of(to_record(tiny_student))))  # every key
    kept = personal.load_part(personal_file(context.node_config, cfg, tiny_student.yaml, "finetuned"))
    assert kept is not None and set(kept) == set(sent)
    assert all(torch.equal(kept[k], sent[k]) for k in sent)
    assert any(not torch.equal(sent[k], v) for k, v in tiny_student.state_dict().items() if v.is_floating_point())
    assert out.content["metrics"]["own-map50"] >= 0.0  # scored after the fine-tune: the model it now runs


def evaluate_message(model, keep_finetuned: bool) -> Message:
    names = [model.names[i] for i in sorted(model.names)]
    config = ConfigRecord({"model-yaml": json.dumps(model.yaml), "names": names, "personal": "none",
                           "keep-finetuned": keep_finetuned})
    return Message(RecordDict({"arrays": to_record(model), "config": config}), dst_node_id=5, message_type="evaluate")


def test_evaluate_scores_the_model_the_camera_kept_not_the_one_it_is_sent(trained, tmp_path):
    from shared import models

    cfg, model, map50 = trained
    cfg = cfg.replace(**{"run-dir": str(tmp_path / "run"), "fed.keep-finetuned": True})
    fresh = models.build_student(cfg.model, cfg.data.names)  # what the server sends: it detects nothing yet
    path = personal_file({"partition-id": 0}, cfg, fresh.yaml, "finetuned")
    PersonalPart(model, "none", RecordDict(), tmp_path / "unused.pt", True, path).keep(model)
    scores = {}
    for keep in (True, False):  # a SuperNode restart each time: only the disk remembers
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                          run_config=to_flat(cfg.replace(**{"fed.keep-finetuned": keep})))
        ev = app(evaluate_message(fresh, keep), context)
        assert not ev.has_error(), ev.error.reason if ev.has_error() else ""
        scores[keep] = ev.content["metrics"]["map50"]
    assert scores[True] == pytest.approx(map50)  # the kept (trained) model, on the camera's val split
    assert scores[False] < map50 / 2  # without keep-finetuned it runs what it receives


def test_ditto_sends_the_same_update_and_pulls_its_own_model_toward_the_global_one(tiny_cfg, tiny_world,
                                                                                   tiny_student, tmp_path):
    """fed.ditto-lambda: what the camera sends is its fine-tune of the global model, exactly as without Ditto;
    the model it keeps goes on from its own last one, pulled toward the global model the harder the larger lambda."""
    base = {"data.root": str(tiny_world), "fed.local-lr": 0.01}
    mine = copy.deepcopy(tiny_student)  # a model of its own from an earlier round, away from the global one
    with torch.no_grad():
        for p in mine.parameters():
            p.add_(0.002 * torch.randn_like(p))
    sent, distance = {}, {}
    for lam in (0.0, 1e-3, 20.0):
        cfg = tiny_cfg.replace(**base, **{"run-dir": str(tmp_path / f"run{lam}"), "fed.ditto-lambda": lam})
        path = personal_file({"partition-id": 0}, cfg, tiny_student.yaml, "finetuned")
        if lam:
            PersonalPart(mine, "none", RecordDict(), tmp_path / "unused.pt", True, path).keep(mine)
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                          run_config=to_flat(cfg))
        out = app(train_message(tiny_student, cfg), context)
        assert not out.has_error(), out.error.reason if out.has_error() else ""
        sent[lam] = to_state_dict(unpack(out.content["arrays"], layout_of(to_record(tiny_student))))
        if lam:
            assert out.content["metrics"]["personal-kept"] == 1.0 and "ditto-loss" in out.content["metrics"]
            kept = personal.load_part(path)
            distance[lam] = sum(float(((kept[k] - v.detach()) ** 2).sum()) for k, v in tiny_student.named_parameters())
    assert all(torch.equal(sent[0.0][k], v) for lam in (1e-3, 20.0) for k, v in sent[lam].items())
    assert distance[20.0] < 0.5 * distance[1e-3]
    with pytest.raises(ValueError, match="'fed.ditto-lambda'"):
        tiny_cfg.replace(**{"fed.ditto-lambda": -1.0})
