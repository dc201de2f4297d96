"""The attack drill's mod (client/attack.py): which cameras attack, and that each attack sends what it says."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.attack import attack_mod, attack_of
from shared.arrays import pack, to_record
from shared.config import load_config, to_flat


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def run_config(**flat) -> dict:
    return to_flat(load_config({f"drill.{k.replace('_', '-')}": v for k, v in flat.items()}))


def test_the_first_fraction_of_partitions_attack_and_a_node_config_overrides():
    rc = run_config(attack="signflip", attackers=0.2)
    chosen = [p for p in range(10) if attack_of({"partition-id": p, "num-partitions": 10}, rc) != "none"]
    assert chosen == [0, 1]
    assert attack_of({"partition-id": 0, "num-partitions": 10}, run_config()) == "none"  # off by default
    assert attack_of({"partition-id": 0}, run_config()) == "none"  # a camera the tests call directly
    assert attack_of({"attack": "noise"}, run_config()) == "noise"  # a real SuperNode's own setting
    with pytest.raises(ValueError, match="attack 'flood' is not one of"):
        attack_of({"attack": "flood"}, rc)
    with pytest.raises(ValueError, match="drill.attack"):
        load_config({"drill.attack": "flood"})


def honest_app(delta: float):
    """The ClientApp's answer: the received weights moved by `delta` (an honest camera's update)."""
    def call_next(msg: Message, context: Context) -> Message:
        got = msg.content["arrays"]
        out = ArrayRecord({k: Array(a.numpy() + np.asarray(delta, a.numpy().dtype) if a.numpy().dtype.kind == "f"
                                    else a.numpy()) for k, a in got.items()})
        return Message(RecordDict({"arrays": out, "metrics": MetricRecord({"num-examples": 4})}), reply_to=msg)
    return call_next


@pytest.mark.parametrize("mode", ["signflip", "scale", "noise"])
def test_each_attack_replaces_the_update_as_named(mode, tiny_student):
    received = pack(to_record(tiny_student.state_dict()))
    msg = Message(RecordDict({"arrays": received, "config": ConfigRecord({"seed": 3})}), dst_node_id=5,
                  message_type="train")
    ctx = Context(1, 5, {"partition-id": 0, "num-partitions": 5}, RecordDict(), run_config(attack=mode))
    out = attack_mod(msg, ctx, honest_app(0.01))
    assert set(out.content["metrics"]) == {"num-examples"}  # nothing gives it away (Flower wants the same keys)
    floats = "packed.float32"
    delta = out.content["arrays"][floats].numpy() - received[floats].numpy()
    honest = np.full_like(delta, 0.01)
    if mode == "signflip":
        np.testing.assert_allclose(delta, -3 * honest, atol=1e-6)  # drill.flip-scale
    elif mode == "scale":
        np.testing.assert_allclose(delta, 10 * honest, rtol=1e-3, atol=1e-6)
    else:  # as long as the honest update, in an unrelated direction
        assert np.linalg.norm(delta) == pytest.approx(np.linalg.norm(honest), rel=1e-3)
        assert abs(float(np.dot(delta, honest))) < 0.05 * float(np.dot(honest, honest))
    ints = "packed.int64"  # BatchNorm's batch counters are never touched
    if ints in received:
        np.testing.assert_array_equal(out.content["arrays"][ints].numpy(), received[ints].numpy())


def test_an_honest_camera_passes_untouched(tiny_student):
    received = pack(to_record(tiny_student.state_dict()))
    msg = Message(RecordDict({"arrays": received, "config": ConfigRecord({})}), dst_node_id=5, message_type="train")
    ctx = Context(1, 5, {"partition-id": 4, "num-partitions": 5}, RecordDict(), run_config(attack="scale"))
    out = attack_mod(msg, ctx, honest_app(0.01))
    np.testing.assert_allclose(out.content["arrays"]["packed.float32"].numpy() - received["packed.float32"].numpy(),
                               0.01, atol=1e-6)


def test_a_malformed_attacker_sends_a_lying_header(tiny_student):
    from shared.arrays import UpdateError, check_decodable

    received = pack(to_record(tiny_student.state_dict()))
    msg = Message(RecordDict({"arrays": received, "config": ConfigRecord({})}), dst_node_id=5, message_type="train")
    ctx = Context(1, 5, {"partition-id": 0, "num-partitions": 5}, RecordDict(), run_config(attack="malformed"))
    out = attack_mod(msg, ctx, honest_app(0.01))
    with pytest.raises(UpdateError, match="packed.float32: declares float32"):
        check_decodable(out.content["arrays"])
    assert "malformed" in out.content["metrics"]


def test_a_crashing_camera_raises_in_its_round_only(tiny_student):
    received = pack(to_record(tiny_student.state_dict()))
    ctx = Context(1, 5, {"partition-id": 1, "num-partitions": 5}, RecordDict(), run_config(attack="crash",
                                                                                            attackers=0.4))
    for rnd in (1, 2, 3):
        msg = Message(RecordDict({"arrays": received, "config": ConfigRecord({"server-round": rnd})}),
                      dst_node_id=5, message_type="train")
        if rnd == 2:
            with pytest.raises(RuntimeError, match="camera 1 crashed mid-round"):
                attack_mod(msg, ctx, honest_app(0.01))
        else:
            assert not attack_mod(msg, ctx, honest_app(0.01)).has_error()
