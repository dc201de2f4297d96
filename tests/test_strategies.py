"""Every configured strategy is a Flower strategy that screens updates: NaN, wrong shapes and errors never count."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.federation.events import EventBus
from server.federation.strategies import BASES, make_strategy
from client.attack import lying
from shared.arrays import layout_of, pack, to_record, to_state_dict


@pytest.fixture(autouse=True)
def server_task_identity():
    """Messages take their run id from the process's task identity, as inside a running ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def reply(arrays: ArrayRecord, node: int, examples: int = 10, error: str | None = None) -> Message:
    ask = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    if error:
        msg = Message(Error(code=0, reason=error), reply_to=ask)
    else:
        msg = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": examples})}), reply_to=ask)
    return msg


def prepared(name: str, tiny_cfg, global_arrays: ArrayRecord, events: list):
    fed = dataclasses.replace(tiny_cfg.fed, strategy=name, min_nodes=1, krum_byzantine=0)
    strategy = make_strategy(fed, EventBus([lambda e, a=None: events.append(e)]), seed=0)
    # What configure_train records before messages go out (it needs a live Grid to run for real).
    strategy._reference = to_state_dict(global_arrays)
    strategy._layout = layout_of(global_arrays)
    strategy._sampled, strategy._round_start = [1, 2, 3, 4], 0.0
    strategy.current_arrays = {k: a.numpy() for k, a in global_arrays.items()} if name == "fedadam" else global_arrays
    return strategy


def shifted(state: dict, delta: float) -> ArrayRecord:
    return to_record({k: v + delta if v.is_floating_point() else v for k, v in state.items()})


@pytest.mark.parametrize("name", sorted(BASES))
def test_strategy_aggregates_only_valid_updates(name, tiny_cfg, tiny_student):
    state = tiny_student.state_dict()
    global_arrays, events = to_record(state), []
    strategy = prepared(name, tiny_cfg, global_arrays, events)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    nan = {k: v.clone() for k, v in state.items()}
    nan[key][0] = float("nan")
    # Node 1 and the NaN node answer in the packed wire format, node 2 per tensor: both are understood.
    replies = [reply(pack(shifted(state, 0.01)), 1), reply(shifted(state, 0.03), 2),
               reply(pack(to_record(nan)), 3), reply(global_arrays, 4, error="camera offline")]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    for k, a in arrays.items():  # dtypes survive averaging (num_batches_tracked stays an integer)
        assert a.numpy().dtype == state[k].numpy().dtype and a.numpy().shape == tuple(state[k].shape), k
        assert np.isfinite(a.numpy()).all(), k
    (event,) = [e for e in events if e.kind == "train_result"]
    outcomes = {c["node_id"]: c for c in event.data["clients"]}
    assert event.data["accepted"] == 2 and outcomes[1]["ok"] and outcomes[2]["ok"]
    assert "NaN" in outcomes[3]["reason"] and key in outcomes[3]["reason"]  # named after unpacking
    assert "camera offline" in outcomes[4]["reason"]


def test_superlink_error_reply_is_logged_under_the_node_it_stands_for(tiny_cfg, tiny_student):
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    state = tiny_student.state_dict()
    global_arrays, events = to_record(state), []
    strategy = prepared("fedavg", tiny_cfg, global_arrays, events)
    strategy._sampled = [7, 9]
    asks = [Message(RecordDict({"arrays": global_arrays}), dst_node_id=n, message_type="train") for n in (7, 9)]
    for ask in asks:  # what the Grid does when it pushes them
        ask.metadata.__dict__["_message_id"] = ask.object_id
    strategy._sent = asks
    # What Flower's SuperLink answers for a node whose heartbeat expired: the SuperLink (node 1) is the sender.
    dead = create_message_error_unavailable_res_message(asks[1].metadata, "node_unavail")
    assert dead.metadata.src_node_id == 1
    ok = Message(RecordDict({"arrays": pack(shifted(state, 0.01)), "metrics": MetricRecord({"num-examples": 5})}),
                 reply_to=asks[0])
    strategy.aggregate_train(1, [ok, dead])
    (event,) = [e for e in events if e.kind == "train_result"]
    outcomes = {c["node_id"]: c for c in event.data["clients"]}
    assert set(outcomes) == {7, 9} and outcomes[7]["ok"] and not outcomes[9]["ok"]
    assert "Node Unavailable" in outcomes[9]["reason"]


def test_unknown_strategy_is_named(tiny_cfg):
    with pytest.raises(ValueError, match="unknown strategy 'fedfoo'"):
        make_strategy(dataclasses.replace(tiny_cfg.fed, strategy="fedfoo"), EventBus(), 0)


def test_too_large_update_is_rejected(tiny_cfg, tiny_student):
    state, events = tiny_student.state_dict(), []
    strategy = prepared("fedavg", tiny_cfg, to_record(state), events)
    strategy.max_update_norm = 1.0
    arrays, _ = strategy.aggregate_train(1, [reply(shifted(state, 5.0), 1)])
    assert arrays is None
    assert "exceeds the bound" in events[-1].data["clients"][0]["reason"]
    assert "no reply" in events[-1].data["clients"][-1]["reason"]  # sampled nodes 2-4 never answered


def test_packed_update_of_the_wrong_size_is_rejected(tiny_cfg, tiny_student):
    state, events = tiny_student.state_dict(), []
    strategy = prepared("fedavg", tiny_cfg, to_record(state), events)
    short = {k: v for k, v in list(state.items())[:-3]}
    arrays, _ = strategy.aggregate_train(1, [reply(pack(to_record(short)), 1)])
    assert arrays is None
    assert "packed float32" in events[-1].data["clients"][0]["reason"]


@pytest.mark.parametrize("name", sorted(BASES))
def test_personal_keys_are_left_out_by_cameras_and_kept_by_every_strategy(name, tiny_cfg, tiny_student):
    """fed.personal = bn: replies without BatchNorm keys are aggregated by the unchanged Flower strategy, the
    global BatchNorm stays exactly as it was, and a reply that carries a personal key is refused."""
    from shared.personal import personal_keys

    state = tiny_student.state_dict()
    keys = personal_keys(tiny_student, "bn")
    assert keys and all(".bn." in k for k in keys)
    global_arrays, events = to_record(state), []
    strategy = prepared(name, tiny_cfg, global_arrays, events)
    strategy.personal = frozenset(keys)
    sent = {k: v for k, v in shifted(state, 0.02).items() if k not in keys}
    leaky = shifted(state, 0.02)  # sends its BatchNorm too
    arrays, _ = strategy.aggregate_train(1, [reply(pack(ArrayRecord(sent)), 1), reply(ArrayRecord(sent), 2),
                                             reply(pack(leaky), 3), reply(leaky, 4)])
    assert arrays is not None and list(arrays.keys()) == list(state)
    for k in keys:
        assert np.array_equal(arrays[k].numpy(), state[k].numpy()), k
    moved = [k for k in state if k not in keys and not np.array_equal(arrays[k].numpy(), state[k].numpy())]
    assert moved, "the shared weights did not move"
    (event,) = [e for e in events if e.kind == "train_result"]
    outcomes = {c["node_id"]: c for c in event.data["clients"]}
    assert event.data["accepted"] == 2 and not outcomes[3]["ok"]
    assert "packed" in outcomes[3]["reason"]  # packed with its BatchNorm: more values than the shared layout
    assert "carries personal keys" in outcomes[4]["reason"] and sorted(keys)[0] in outcomes[4]["reason"]


@pytest.mark.parametrize("name", ["fedavg", "fedmedian"])
def test_update_far_beyond_the_rounds_median_norm_is_rejected(name, tiny_cfg, tiny_student):
    """fed.norm-outlier: a x10 update is refused with its norm and the median named; the honest ones are averaged."""
    state, events = tiny_student.state_dict(), []
    strategy = prepared(name, tiny_cfg, to_record(state), events)
    strategy.max_update_norm, strategy.norm_outlier = None, 5.0
    def replies():
        return [reply(pack(shifted(state, d)), n) for n, d in ((1, 0.01), (2, 0.012), (3, 0.011), (4, 0.11))]

    arrays, _ = strategy.aggregate_train(1, replies())
    outcomes = {c["node_id"]: c for c in events[-1].data["clients"]}
    assert [n for n, c in outcomes.items() if not c["ok"]] == [4]
    assert "exceeds 5x the round's median" in outcomes[4]["reason"]
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    moved = float(np.mean(arrays[key].numpy() - state[key].numpy()))
    assert 0.0099 < moved < 0.0121  # within the honest shifts: the scaled one took no part
    strategy.norm_outlier = 0.0  # off: the same update is accepted
    strategy.aggregate_train(1, replies())
    assert events[-1].data["accepted"] == 4


def garbage(arrays: ArrayRecord) -> ArrayRecord:
    from flwr.app import Array

    out = dict(arrays.items())
    key, arr = next(iter(out.items()))
    out[key] = Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype, data=b"\x93NUMPY not really")
    return ArrayRecord(out)


def half_precision(arrays: ArrayRecord) -> ArrayRecord:
    from flwr.app import Array

    return ArrayRecord({k: Array(a.numpy().astype(np.float16)) if a.dtype == "float32" else a
                        for k, a in arrays.items()})


MALFORMED = {  # name -> (how the reply is broken, what the reason must say); lying: client/attack.py's
    "lying header": (lambda c: c.__setitem__("arrays", lying(c["arrays"])), "declares float32"),
    "lying packed header": (lambda c: c.__setitem__("arrays", lying(pack(c["arrays"]))), "declares float32"),
    "not .npy bytes": (lambda c: c.__setitem__("arrays", garbage(c["arrays"])), "undecodable array"),
    "float16 weights": (lambda c: c.__setitem__("arrays", half_precision(c["arrays"])), "dtype float16"),
    "no num-examples": (lambda c: c["metrics"].__delitem__("num-examples"), "num-examples is None"),
    "infinite num-examples": (lambda c: c["metrics"].__setitem__("num-examples", float("inf")), "num-examples is inf"),
    "two metric records": (lambda c: c.__setitem__("more", MetricRecord({"x": 1.0})), "2 metric records"),
    "an extra array record": (lambda c: c.__setitem__("extra", ArrayRecord()), "unexpected array records"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_reply_is_rejected_by_name_and_the_round_goes_on(name, tiny_cfg, tiny_student):
    """Drill 6 on the Flower side: each broken reply gets a reason naming the defect; the honest replies are
    averaged (one of them with a metric key the others lack, which Flower alone would fail the round on)."""
    state, events = tiny_student.state_dict(), []
    strategy = prepared("fedavg", tiny_cfg, to_record(state), events)
    bad = reply(shifted(state, 0.5), 3)
    breaks, reason = MALFORMED[name]
    breaks(bad.content)
    odd = reply(pack(shifted(state, 0.02)), 2)
    odd.content["metrics"]["only-here"] = 1.0
    arrays, _ = strategy.aggregate_train(1, [reply(pack(shifted(state, 0.01)), 1), odd, bad])
    outcomes = {c["node_id"]: c for c in events[-1].data["clients"]}
    assert outcomes[1]["ok"] and outcomes[2]["ok"] and not outcomes[3]["ok"]
    assert reason in outcomes[3]["reason"], outcomes[3]["reason"]
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    assert float(np.mean(arrays[key].numpy() - state[key].numpy())) == pytest.approx(0.015, abs=1e-4)


def test_the_local_lr_decays_over_the_rounds_as_configured(tiny_cfg):
    """fed.lr-decay: cosine from fed.local-lr at round 1 to that fraction of it at the last round, in the plan every
    train message carries (and the baselines' local steps read); 1.0 keeps it constant; outside (0, 1] is refused."""
    from shared.train import TrainSpec, local_plan

    fed = dataclasses.replace(tiny_cfg.fed, rounds=5, local_lr=1e-3, lr_decay=0.1)
    lrs = [local_plan(fed, rnd)["lr"] for rnd in range(1, 6)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4) and lrs[2] == pytest.approx(5.5e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert TrainSpec.local(tiny_cfg.train, fed, local_plan(fed, 5)).lr == pytest.approx(1e-4)
    constant = dataclasses.replace(fed, lr_decay=1.0)
    assert {local_plan(constant, rnd)["lr"] for rnd in range(1, 6)} == {1e-3}
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="fed.lr-decay"):
            dataclasses.replace(fed, lr_decay=bad)
