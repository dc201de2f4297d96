"""fed.strategy = scaffold: corrected local steps, the camera's control variate, the server's c, a real simulation."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from server.federation.events import EventBus
from server.federation.strategies import make_strategy
from shared import task
from shared.arrays import layout_of, pack, to_record, to_state_dict
from shared.config import to_flat
from shared.train import CONTROL, TrainSpec, local_plan


@pytest.fixture(autouse=True)
def task_identity():
    """Messages take their run id from the process's task identity, as inside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def test_a_corrected_step_moves_by_the_correction_and_reports_the_raw_gradient(tiny_cfg, tiny_world, tiny_student):
    cfg = tiny_cfg.replace(**{"data.root": str(tiny_world)})
    spec = TrainSpec(epochs=1, max_steps=1, lr=0.01, optimizer="SGD", momentum=0.9, weight_decay=0.0, lr_final=1.0,
                     freeze_bn=True)
    yaml = task.camera_yaml(cfg, 0)
    plain, corrected = copy.deepcopy(tiny_student), copy.deepcopy(tiny_student)
    gen = torch.Generator().manual_seed(3)
    correction = [torch.randn(p.shape, generator=gen) * 1e-2 for _, p in trainable(tiny_student)]
    zero = task.fit(plain, yaml, cfg, spec, seed=7, correction=[torch.zeros_like(c) for c in correction])
    done = task.fit(corrected, yaml, cfg, spec, seed=7, correction=correction)
    # The same batch from the same weights: the raw gradients match, and the corrected step differs by exactly
    # lr·(1 + momentum)·correction (Nesterov's first step from rest).
    for g0, g1 in zip(zero.mean_grad, done.mean_grad):
        torch.testing.assert_close(g0, g1)
    assert any(float(g.abs().max()) > 0 for g in done.mean_grad)
    for (name, p0), (_, p1), c in zip(trainable(plain), trainable(corrected), correction):
        torch.testing.assert_close(p1.detach() - p0.detach(), -spec.lr * (1 + spec.momentum) * c, atol=1e-6,
                                   rtol=1e-4, msg=name)


def train_message(model, cfg, control: dict[str, np.ndarray]) -> Message:
    names = [model.names[i] for i in sorted(model.names)]
    config = ConfigRecord({"model-yaml": json.dumps(model.yaml), "names": names, **local_plan(cfg.fed), "seed": 1,
                           "scaffold": True})
    content = RecordDict({"arrays": pack(to_record(model)), "config": config})
    content[CONTROL] = to_record({k: torch.from_numpy(v) for k, v in control.items()})
    return Message(content, dst_node_id=5, message_type="train")


def test_the_camera_keeps_its_control_variate_and_replies_with_its_change(tiny_cfg, tiny_world, tiny_student,
                                                                           tmp_path):
    from client.camera import personal_file
    from client.client_app import app
    from client.scaffold import STATE_KEY
    from shared import personal

    cfg = tiny_cfg.replace(**{"data.root": str(tiny_world), "run-dir": str(tmp_path / "run"),
                              "fed.strategy": "scaffold", "fed.personal": "head", "fed.local-lr": 0.01})
    head = set(personal.personal_keys(tiny_student, "head"))
    shared_names = [n for n, _ in trainable(tiny_student) if n not in head]
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config=to_flat(cfg))
    out = app(train_message(tiny_student, cfg, {}), context)  # round 1: c is empty, c_k starts at zero
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    assert list(out.content.array_records) == ["arrays", CONTROL]  # the weights first: the server screens those
    first = to_state_dict(out.content[CONTROL])
    assert list(first) == shared_names  # the personal head is never corrected, and nothing else travels
    assert any(float(v.abs().max()) > 0 for v in first.values())
    path = personal_file(context.node_config, cfg, tiny_student.yaml, "scaffold")
    assert STATE_KEY in context.state and path.is_file()
    # A restarted node (empty state) takes c_k from disk: its next update is c_k+ − c_k, not c_k+ − 0.
    restarted = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                        run_config=to_flat(cfg))
    c = {k: v.numpy() / 4 for k, v in first.items()}
    out2 = app(train_message(tiny_student, cfg, c), restarted)
    assert not out2.has_error(), out2.error.reason if out2.has_error() else ""
    second = to_state_dict(out2.content[CONTROL])
    kept = personal.load_part(path)
    for name in shared_names:
        torch.testing.assert_close(second[name], kept[name] - first[name])


def control_reply(arrays: ArrayRecord, node: int, control: dict[str, np.ndarray] | None) -> Message:
    ask = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": arrays})
    if control is not None:
        content[CONTROL] = to_record({k: torch.from_numpy(v) for k, v in control.items()})
    content["metrics"] = MetricRecord({"num-examples": 10})
    return Message(content, reply_to=ask)


def test_the_server_adds_the_cameras_control_updates_over_all_cameras_and_averages_weights_as_fedavg(
        tiny_cfg, tiny_student):
    state = tiny_student.state_dict()
    global_arrays = to_record(state)

    def strategy(name: str):
        fed = dataclasses.replace(tiny_cfg.fed, strategy=name, min_nodes=1)
        s = make_strategy(fed, EventBus([]), seed=0)
        s._reference, s._layout = to_state_dict(global_arrays), layout_of(global_arrays)
        s._sampled, s._round_start = [1, 2, 3], 0.0
        return s

    scaffold, fedavg = strategy("scaffold"), strategy("fedavg")
    scaffold._cameras = 4  # four connected, three sampled: c moves by the sum over the sampled / 4
    key = next(n for n, _ in trainable(tiny_student))
    shape = tuple(state[key].shape)
    updates = [np.full(shape, 1.0, np.float32), np.full(shape, 3.0, np.float32), np.full(shape, np.nan, np.float32)]
    weights = [to_record({k: v + 0.01 * (i + 1) if v.is_floating_point() else v for k, v in state.items()})
               for i in range(3)]
    got, _ = scaffold.aggregate_train(1, [control_reply(w, i + 1, {key: u}) for i, (w, u) in
                                          enumerate(zip(weights, updates))])
    want, _ = fedavg.aggregate_train(1, [control_reply(w, i + 1, None) for i, w in enumerate(weights)])
    np.testing.assert_allclose(scaffold.scaffold_c[key], np.full(shape, (1.0 + 3.0) / 4))  # the NaN one ignored
    for k in want:  # the NaN control does not cost that camera its weights: all three are averaged
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy())
    assert "scaffold_c/" + key in scaffold.state_arrays()  # resumed runs continue with the same c


@pytest.mark.slow
def test_a_scaffold_simulation_runs_and_moves_c(tiny_cfg, tiny_world, tmp_path):
    from server.federation.checkpoint import RunCheckpoints
    from server.local import simulation

    from conftest import sim_cfg

    cfg = sim_cfg(tiny_cfg, tiny_world, tmp_path / "run", **{"fed.strategy": "scaffold", "snapshot.enabled": False})
    assert simulation.launch(cfg, 2, timeout=300) == 0
    checkpoints = RunCheckpoints(cfg.run_dir)
    _, state = checkpoints.load(checkpoints.progress().round)
    c = {k: v for k, v in state.items() if k.startswith("scaffold_c/")}
    assert c and any(np.abs(v).max() > 0 for v in c.values())


def test_scaffold_refuses_what_does_not_cover_its_second_record(tiny_cfg):
    for key, value in (("fed.compress", "int8"), ("fed.compress-down", "topk"), ("fed.dp", "local")):
        with pytest.raises(ValueError, match="fed.strategy' = scaffold"):
            tiny_cfg.replace(**{"fed.strategy": "scaffold", key: value})
