"""fed.compress: what a camera sends decodes to its own delta within the quantization step, both ways; a corrupt
payload is refused with its reason and never averaged."""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.client_app import app
from client.wire import CameraWire, WireError
from server.federation.events import EventBus
from server.federation.strategies import make_strategy
from server.federation.wire import ServerWire, shared_base
from shared import compress
from shared.arrays import UpdateError, layout_of, pack, to_record, to_state_dict, unpack
from shared.config import to_flat
from shared.train import local_plan


@pytest.fixture(autouse=True)
def task_identity():
    """Messages take their run id from the process's task identity, as inside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def flat(values: np.ndarray, counters=(1, 2)) -> ArrayRecord:
    return ArrayRecord({"packed.float32": Array(values.astype(np.float32)), "packed.int64": Array(np.array(counters))})


def model_like(rng, n=5000):
    """Values whose scale changes along the vector, as a model's tensors do (BN biases beside conv weights)."""
    return rng.normal(size=n) * np.repeat(10.0 ** rng.uniform(-4, 0, size=n // 500 + 1), 500)[:n]


@pytest.mark.parametrize("mode", ["int8", "topk"])
def test_a_decoded_delta_is_the_sent_one_within_its_quantization_step(mode):
    rng = np.random.default_rng(0)
    base, delta = flat(model_like(rng)), model_like(rng) * 1e-2
    new = flat(base["packed.float32"].numpy() + delta, counters=(5, 6))
    payload, left = compress.encode(new, base, mode, 0.1, rng)
    got = compress.decode(payload, base)
    sent = got["packed.float32"].numpy() - base["packed.float32"].numpy()
    assert np.array_equal(got["packed.int64"].numpy(), [5, 6])  # integer buffers travel whole
    step = compress.step_of(payload[f"compressed.{mode}.scales"].numpy(), int((sent != 0).sum() if mode == "topk"
                                                                              else sent.size))
    if mode == "int8":
        assert left is None and np.all(np.abs(sent - delta) <= step * 1.0001 + 1e-9)
    else:  # the sent entries are the largest tenth, each within its step; the rest is kept as the remainder
        picked = np.flatnonzero(sent)
        assert picked.size == round(0.1 * delta.size)
        assert np.abs(delta[picked]).min() >= np.quantile(np.abs(delta), 0.9) - step.max()
        assert np.all(np.abs(sent[picked] - delta[picked]) <= step * 1.0001 + 1e-9)
        assert np.allclose(sent + left, delta, atol=1e-7)
    assert compress.message_bytes(payload) < compress.message_bytes(new) / 4


def test_error_feedback_sends_every_delta_in_the_end():
    """Over rounds, what top-k sent plus what it still holds is what the camera's deltas add up to."""
    rng = np.random.default_rng(1)
    base, residual, total, sent = flat(np.zeros(4000)), None, np.zeros(4000), np.zeros(4000)
    for _ in range(20):
        delta = model_like(rng, 4000) * 1e-3
        payload, residual = compress.encode(flat(delta), base, "topk", 0.05, rng, residual)
        sent += compress.decode(payload, base)["packed.float32"].numpy()
        total += delta
    assert np.allclose(sent + residual, total, atol=1e-6)
    assert np.abs(total - sent).max() < np.abs(total).max()  # most of it arrived


def corruptions(payload: ArrayRecord) -> dict[str, tuple[ArrayRecord, str]]:
    def swap(key, value):
        return ArrayRecord({**{k: payload[k] for k in payload}, key: value})

    values = payload["compressed.topk.values"].numpy()
    scales = payload["compressed.topk.scales"].numpy()
    gaps = zlib.decompress(payload["compressed.topk.gaps"].numpy().tobytes())
    far = np.frombuffer(gaps, np.uint8).reshape(4, -1).copy()
    far[3, 0] = 255  # the first index lands far past the end
    return {
        "truncated": (swap("compressed.topk.values", Array(values[:len(values) // 2])), "truncated|not a valid"),
        "nan scale": (swap("compressed.topk.scales", Array(np.where(np.arange(scales.size) == 0, np.nan,
                                                                    scales).astype(np.float32))), "NaN"),
        "scales": (swap("compressed.topk.scales", Array(scales[:-1])), "scales holds"),
        "index": (swap("compressed.topk.gaps", Array(np.frombuffer(zlib.compress(far.tobytes()), np.uint8))),
                  "do not fit"),
        "keys": (ArrayRecord({k: payload[k] for k in payload if k != "compressed.topk.gaps"}), "do not form"),
        "bomb": (swap("compressed.topk.values", Array(np.frombuffer(zlib.compress(bytes(10 ** 7)), np.uint8))),
                 "expands past"),
    }


def test_a_corrupt_payload_is_refused_with_its_reason():
    rng = np.random.default_rng(2)
    base = flat(model_like(rng, 3000))
    payload, _ = compress.encode(flat(model_like(rng, 3000)), base, "topk", 0.5, rng)
    for name, (bad, reason) in corruptions(payload).items():
        with pytest.raises(UpdateError, match=reason):
            compress.decode(bad, base)
        assert name


def reply(arrays: ArrayRecord, node: int, metrics: dict | None = None) -> Message:
    ask = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10, **(metrics or {})})}),
                   reply_to=ask)


def test_the_server_averages_decoded_updates_and_never_a_corrupt_one(tiny_cfg, tiny_student):
    state, events = tiny_student.state_dict(), []
    fed = dataclasses.replace(tiny_cfg.fed, min_nodes=1, compress="topk", compress_topk=0.5)
    strategy = make_strategy(fed, EventBus([lambda e, a=None: events.append(e)]), seed=0)
    global_arrays = to_record(state)
    strategy._reference, strategy._layout = to_state_dict(global_arrays), layout_of(global_arrays)
    strategy._sampled, strategy._round_start = [1, 2, 3], 0.0
    base = shared_base(strategy._reference, frozenset())
    rng = np.random.default_rng(3)
    moved = to_record({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()})
    good, _ = compress.encode(pack(moved), base, "topk", 0.5, rng)
    bad = corruptions(good)["truncated"][0]
    arrays, _ = strategy.aggregate_train(1, [reply(good, 1), reply(bad, 2), reply(pack(moved), 3)])
    (event,) = [e for e in events if e.kind == "train_result"]
    outcomes = {c["node_id"]: c for c in event.data["clients"]}
    assert event.data["accepted"] == 1 and outcomes[1]["ok"]
    assert "truncated zlib stream" in outcomes[2]["reason"] or "not a valid" in outcomes[2]["reason"]
    assert "not compressed" in outcomes[3]["reason"]  # the run agreed on topk
    assert outcomes[1]["metrics"]["bytes-up"] < compress.message_bytes(reply(pack(moved), 3)) / 3
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    expect = compress.decode(good, base)
    assert np.allclose(arrays[key].numpy(), unpack(expect, layout_of(global_arrays))[key].numpy())


def train_message(model, cfg, extra: dict) -> Message:
    names = [model.names[i] for i in sorted(model.names)]
    config = ConfigRecord({"model-yaml": json.dumps(model.yaml), "names": names, **local_plan(cfg.fed), "seed": 1,
                           **extra})
    return Message(RecordDict({"arrays": pack(to_record(model)), "config": config}), dst_node_id=5,
                   message_type="train")


@pytest.mark.slow
def test_what_a_camera_sends_is_its_own_delta_within_the_step(tiny_cfg, tiny_world, tiny_student, tmp_path):
    """The same fine-tune (same seed) answered plainly and as int8: the int8 reply decodes to the plain one's delta
    within each entry's quantization step."""
    cfg = tiny_cfg.replace(**{"data.root": str(tiny_world), "run-dir": str(tmp_path / "run"), "fed.local-lr": 0.01})
    replies = {}
    for mode in ("none", "int8"):
        context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                          run_config=to_flat(cfg))
        out = app(train_message(tiny_student, cfg, {"compress": mode}), context)
        assert not out.has_error(), out.error.reason if out.has_error() else ""
        replies[mode] = out.content["arrays"]
    base = pack(to_record(tiny_student))
    plain = replies["none"]["packed.float32"].numpy() - base["packed.float32"].numpy()
    assert np.abs(plain).max() > 0  # it trained
    sent = compress.decode(replies["int8"], base)["packed.float32"].numpy() - base["packed.float32"].numpy()
    step = compress.step_of(replies["int8"]["compressed.int8.scales"].numpy(), plain.size)
    ulp = np.spacing(np.abs(base["packed.float32"].numpy()) + np.abs(plain))  # float32 rounding of base + delta
    assert np.all(np.abs(sent - plain) <= step + 2 * ulp)
    assert compress.message_bytes(replies["int8"]) < compress.message_bytes(replies["none"]) / 4


def test_a_camera_applies_a_compressed_download_to_the_copy_it_holds_even_after_a_restart(tmp_path):
    rng = np.random.default_rng(4)
    server = ServerWire("int8", "int8", 0.1, seed=0)
    g1 = flat(model_like(rng, 6000))
    full, delta, _ = server.downlink(unpack(g1, [("w", (6000,), "float32"), ("n", (2,), "int64")]), 1)
    assert delta is None  # nothing held yet: the first download is whole
    path = tmp_path / "wire.npz"
    camera = CameraWire(RecordDict(), path)
    camera.receive(full, {"down-version": "1"})
    server.confirm(7, {"replica-crc": compress.checksum(full)})
    g2 = flat(g1["packed.float32"].numpy() + model_like(rng, 6000) * 1e-2, counters=(3, 4))
    full2, delta2, base = server.downlink(unpack(g2, [("w", (6000,), "float32"), ("n", (2,), "int64")]), 2)
    messages = [Message(RecordDict({"arrays": g2, "config": ConfigRecord({"seed": 1})}), dst_node_id=n,
                        message_type="train") for n in (7, 8)]
    server.address(messages, full2, delta2, base)
    assert compress.is_compressed(messages[0].content["arrays"]) and not compress.is_compressed(
        messages[1].content["arrays"])  # node 8 holds nothing: it gets the model whole
    assert compress.message_bytes(messages[0]) < compress.message_bytes(messages[1]) / 3
    restarted = CameraWire(RecordDict(), path)  # a new node process: the held copy comes from disk
    got = restarted.receive(messages[0].content["arrays"], messages[0].content["config"])
    assert compress.checksum(got) == server.crc  # both ends hold the same model, bit for bit
    step = compress.step_of(delta2["compressed.int8.scales"].numpy(), 6000)
    assert np.all(np.abs(got["packed.float32"].numpy() - g2["packed.float32"].numpy()) <= step * 1.0001)
    with pytest.raises(WireError, match="holds v2"):  # a delta from a model it no longer holds
        restarted.receive(messages[0].content["arrays"], messages[0].content["config"])


@pytest.mark.slow
def test_a_compressed_run_through_the_simulation_engine(tiny_cfg, tiny_world, tmp_path):
    """fed.compress = topk with fed.personal = bn: the first download is whole, the next ones are deltas from the
    copy each camera holds (it confirms by checksum), every upload is a tenth or less, and every update counts."""
    from conftest import sim_cfg
    from server.federation.events import read_events
    from server.local import simulation

    cfg = sim_cfg(tiny_cfg, tiny_world, tmp_path / "run", **{"fed.rounds": 3, "fed.compress": "topk",
                                                             "fed.personal": "bn", "fed.freeze-bn": False,
                                                             "snapshot.enabled": False})
    assert simulation.launch(cfg, 2, timeout=300) == 0, (tmp_path / "run" / "simulation.log").read_text()[-3000:]
    trains = [e["data"] for e in read_events(tmp_path / "run" / "events.jsonl") if e["kind"] == "train_result"]
    assert [t["accepted"] for t in trains] == [2, 2, 2]
    down = [[c["metrics"]["bytes-down"] for c in t["clients"]] for t in trains]
    up = [c["metrics"]["bytes-up"] for t in trains for c in t["clients"]]
    whole = min(down[0])
    assert all(d < whole / 3 for d in down[1] + down[2]), down
    assert all(u < whole / 5 for u in up), (up, whole)
    assert len(list((tmp_path / "run" / "personal").glob("*wire*.npz"))) == 2


def test_a_cameras_unsent_remainder_survives_a_restart(tmp_path):
    rng = np.random.default_rng(5)
    base, path = flat(model_like(rng, 3000)), tmp_path / "wire.npz"
    d1, d2 = model_like(rng, 3000) * 1e-2, model_like(rng, 3000) * 1e-2
    first = CameraWire(RecordDict(), path).send(flat(base["packed.float32"].numpy() + d1), base, "topk", 0.1, 1)
    again = CameraWire(RecordDict(), path)  # a new ClientApp process: the remainder comes from disk
    second = again.send(flat(base["packed.float32"].numpy() + d2), base, "topk", 0.1, 2)
    sent = [compress.decode(p, base)["packed.float32"].numpy() - base["packed.float32"].numpy()
            for p in (first, second)]
    left = again.state["fedcam-wire-residual"]["r"].numpy()
    assert np.allclose(sent[0] + sent[1] + left, d1 + d2, atol=1e-6)
    assert np.abs(left).max() > 0 and path.is_file()
