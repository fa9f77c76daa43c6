"""The Flower adapters' wire (fedbt.federated.packing): a Request or Reply maps onto a Message and
back unchanged; a message's arrays cross the wire as one flat array per dtype, unpacked into the
identical records on arrival; a reply or request that cannot be read (a layout that does not fit
its arrays, a record missing) becomes a failed Reply at the server and an error reply at a site,
never an exception.

Generated tensors only, no Flower processes.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedbt.config import ExperimentConfig, to_dict
from fedbt.data.labels import get_task
from fedbt.federated import client_app
from fedbt.federated.packing import (
    FLAT_KEY,
    LAYOUT_FIELD,
    LAYOUT_KEY,
    is_packed,
    packed,
    packing_mod,
    reply_message,
    reply_of,
    request_message,
    request_of,
    unpacked_reply,
)
from fedbt.federated.server_app import GridTransport
from fedbt.fl import site
from fedbt.fl.protocol import (
    CLIPPING_NORM_KEY,
    EVALUATE,
    EXAMPLES_KEY,
    EXPERIMENT_KEY,
    FAILED_CODE,
    FAILED_REASON,
    MALFORMED_CODE,
    MODEL,
    ROUND_KEY,
    SITE_METRICS_KEY,
    SITE_NAME_KEY,
    TEMPERATURE_LOSSES,
    TRAIN,
    Reply,
    Request,
)
from fedbt.fl.task import LocalState, transport_state
from fedbt.fl.transport import answered
from fedbt.train.setup import new_model
from tests.flower_messages import in_a_server_app, reply, server_request

SMALL_STATE = {
    "conv.weight": torch.arange(9, dtype=torch.float32).reshape(3, 3),
    "bn.running_mean": torch.tensor([0.5, 1.5, 2.5]),
    "bn.num_batches_tracked": torch.tensor(5),
}


@pytest.fixture(scope="module")
def trained_resnet18() -> dict[str, torch.Tensor]:
    """A ResNet18 state dict whose tensors all differ, as after training (an untrained one has many
    equal BatchNorm tensors, which Flower sends once)."""
    cfg = ExperimentConfig()
    cfg.model.name = "resnet18"
    generator = torch.Generator().manual_seed(0)
    state = new_model(cfg, 4).state_dict()
    return {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value + i
        for i, (key, value) in enumerate(state.items())
    }


def model_request(state: dict[str, torch.Tensor]) -> Message:
    return server_request("train", {ROUND_KEY: 3}, ArrayRecord(torch_state_dict=state))


def float16_transport(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state as federated.transport_dtype=float16 sends it, with one tensor beyond float16's range
    (which stays float32): float16, float32 and int64 tensors in one record."""
    first = next(iter(state))
    return transport_state({**state, first: state[first] * 1e6}, "float16")


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_a_packed_resnet18_unpacks_to_identical_tensors(trained_resnet18, precision):
    state = trained_resnet18 if precision == "float32" else float16_transport(trained_resnet18)
    message = model_request(state)
    on_the_wire = packed(message)
    assert sorted(on_the_wire.content.keys()) == sorted(["config", FLAT_KEY, LAYOUT_KEY])
    arrived = unpacked_reply(on_the_wire)
    back = arrived.content[MODEL].to_torch_state_dict()
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key
    assert dict(arrived.content["config"]) == dict(message.content["config"])
    assert {v.dtype for v in back.values()} >= {torch.int64, torch.float32}
    assert any(v.dim() == 0 for v in back.values())  # BatchNorm's batch counters


def test_packing_cuts_a_resnet18_message_from_over_200_objects_to_under_20(trained_resnet18):
    # Each object is one HTTP request on each hop of a deployment.
    message = model_request(trained_resnet18)
    plain, packed_objects = len(get_all_nested_objects(message)), len(get_all_nested_objects(packed(message)))
    assert plain > 200
    assert packed_objects < 20


def test_messages_without_arrays_and_error_replies_cross_as_they_are():
    scores = reply("a", SMALL_STATE, 4)
    del scores.content[MODEL]
    failed = Message(Error(101, "could not"), reply_to=scores)
    assert packed(scores) is scores and packed(failed) is failed
    assert unpacked_reply(scores) is scores and unpacked_reply(failed) is failed


class RecordedGrid:
    """A Grid that keeps what is pushed and answers pulls with prepared replies."""

    def __init__(self, replies: list[Message]):
        self.pushed: list[Message] = []
        self.replies = replies

    def get_node_ids(self) -> list[int]:
        return [1]

    def push_messages(self, messages) -> list[str]:
        self.pushed += list(messages)
        return ["sent"]

    def pull_messages(self, ids) -> list[Message]:
        return self.replies


def test_the_grid_transport_pushes_packed_requests_and_reads_the_replies_unpacked(monkeypatch):
    in_a_server_app(monkeypatch)
    site_reply = packed(reply("a", SMALL_STATE, 4, node=3))
    wire = RecordedGrid([site_reply])
    transport = GridTransport(wire)
    assert transport.node_ids() == [1]
    assert transport.send([Request(1, TRAIN, 3, {ROUND_KEY: 3}, {MODEL: SMALL_STATE})]) == ["sent"]
    [pushed] = wire.pushed
    assert is_packed(pushed) and MODEL not in pushed.content
    assert pushed.metadata.dst_node_id == 1 and pushed.metadata.message_type == "train"
    [(answers, pulled)] = transport.receive({"sent"})
    assert answers == "sent" and pulled.node == 3 and not pulled.failed
    assert list(pulled.tensors) == [MODEL]
    assert all(torch.equal(pulled.tensors[MODEL][k], v) for k, v in SMALL_STATE.items())
    assert pulled.metrics == {EXAMPLES_KEY: 4} and pulled.site == {SITE_NAME_KEY: "a"}


def test_a_request_crosses_packed_and_arrives_as_it_was_sent(monkeypatch):
    in_a_server_app(monkeypatch)
    sent = Request(4, EVALUATE, 2, {ROUND_KEY: 2, "split": "test", "temperature": 1.5}, {MODEL: SMALL_STATE})
    message = packed(request_message(sent))
    arrived = request_of(Message(content=unpacked_reply(message).content, metadata=message.metadata))
    assert (arrived.node, arrived.kind, arrived.round, arrived.config) == (4, EVALUATE, 2, sent.config)
    assert list(arrived.tensors) == [MODEL]
    assert all(torch.equal(arrived.tensors[MODEL][k], v) for k, v in SMALL_STATE.items())


def test_a_reply_and_a_failed_reply_cross_as_they_were_sent():
    request = server_request("evaluate", {ROUND_KEY: 1}, ArrayRecord(torch_state_dict=SMALL_STATE), node=6)
    losses = {"losses": torch.tensor([0.5, 0.25], dtype=torch.float64)}
    site = {SITE_NAME_KEY: "a", SITE_METRICS_KEY: "{}"}
    sent = Reply(6, {TEMPERATURE_LOSSES: losses}, {"loss": 0.5, EXAMPLES_KEY: 9}, site)
    arrived = reply_of(reply_message(sent, request))
    assert (arrived.node, arrived.metrics, arrived.site, arrived.failed) == (6, sent.metrics, sent.site, False)
    assert torch.equal(arrived.tensors[TEMPERATURE_LOSSES]["losses"], losses["losses"])
    failed = reply_of(reply_message(Reply.error(6, FAILED_CODE, FAILED_REASON), request))
    assert (failed.node, failed.error_code, failed.error_reason) == (6, FAILED_CODE, FAILED_REASON)
    assert failed.tensors == {} and failed.metrics == {}


def edited_layout(edit):
    """A spoiler that edits the packed model record's list of [name, dtype, shape]."""

    def spoil(message: Message) -> None:
        [[_, tensors]] = json.loads(message.content[LAYOUT_KEY][LAYOUT_FIELD])
        edit(tensors)
        message.content[LAYOUT_KEY] = ConfigRecord({LAYOUT_FIELD: json.dumps([[MODEL, tensors]])})

    return spoil


def set_item(index: int, field: int, value):
    return edited_layout(lambda tensors: tensors[index].__setitem__(field, value))


def npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def replaced_flat_float32(data: bytes):
    def spoil(message: Message) -> None:
        message.content[FLAT_KEY]["float32"] = Array("float32", (12,), "numpy.ndarray", data)

    return spoil


def deleted(key: str):
    return lambda message: message.content.__delitem__(key)


MALFORMED = {
    "fewer values than the array holds": (set_item(0, 2, [1, 3]), "tensors hold 6 values"),
    "more values than the array holds": (set_item(0, 2, [3, 4]), "tensors hold 15 values"),
    "a name twice": (set_item(1, 0, "conv.weight"), "lists tensor 'conv.weight' twice"),
    "a dtype not allowed": (set_item(0, 1, "object"), "has dtype 'object'"),
    "a negative dimension": (set_item(0, 2, [-3, -3]), "not a list of non-negative whole numbers"),
    "a dimension not whole": (set_item(0, 2, [3.0, 3]), "not a list of non-negative whole numbers"),
    "a tensor left out": (edited_layout(lambda tensors: tensors.pop(0)), "tensors hold 3 values"),
    "no flat arrays": (deleted(FLAT_KEY), "the packed arrays are missing"),
    "an extra flat array": (
        lambda m: m.content[FLAT_KEY].__setitem__("float64", Array(np.zeros(1))),
        "the packed arrays are ['float32', 'float64', 'int64']",
    ),
    "a layout that is not JSON": (
        lambda m: m.content.__setitem__(LAYOUT_KEY, ConfigRecord({LAYOUT_FIELD: "[[arrays"})),
        "the layout is not JSON",
    ),
    "a record both packed and plain": (
        lambda m: m.content.__setitem__(MODEL, ArrayRecord(torch_state_dict=SMALL_STATE)),
        "'arrays' is also sent unpacked",
    ),
    "bytes of another dtype": (replaced_flat_float32(npy_bytes(np.zeros(12))), "decodes to float64"),
    "bytes that are no array": (replaced_flat_float32(b"not an array"), "does not decode"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_packed_reply_becomes_an_error_reply_with_the_reason(case, capsys):
    spoil, reason = MALFORMED[case]
    site_reply = packed(reply("a", SMALL_STATE, 4, node=3))
    spoil(site_reply)
    [(answers, pulled)] = GridTransport(RecordedGrid([site_reply])).receive({"sent"})
    assert pulled.error_code == MALFORMED_CODE and pulled.error_reason.startswith("malformed packed reply: ")
    assert reason in pulled.error_reason and "\n" not in pulled.error_reason
    assert answers == "sent" and pulled.node == 3
    assert answered([pulled], 1) == []  # the round counts it as a site that did not answer
    logged = capsys.readouterr().err
    assert "the reply of node 3 is not used: malformed packed reply: " in logged and reason in logged


def test_a_site_refuses_a_malformed_packed_request_without_running_its_handler(capsys):
    request = packed(model_request(SMALL_STATE))
    set_item(0, 1, "object")(request)
    handled = []
    answer = packing_mod(request, None, lambda msg, context: handled.append(msg))
    assert handled == []
    assert answer.has_error() and answer.error.code == MALFORMED_CODE
    assert "has dtype 'object'" in answer.error.reason
    assert answer.metadata.reply_to_message_id == request.metadata.message_id
    assert "refused the server's train request of run 7: malformed packed request" in capsys.readouterr().err


def test_a_plain_request_reaches_the_handler_as_it_is_and_its_reply_stays_plain():
    request = model_request(SMALL_STATE)
    answer = Message(RecordDict({MODEL: request.content[MODEL]}), reply_to=request)
    assert packing_mod(request, None, lambda msg, context: answer if msg is request else None) is answer


def with_array(data: bytes, stype: str = "numpy.ndarray"):
    """A spoiler that replaces the "conv.weight" tensor of a plain message with an Array of these bytes."""

    def spoil(message: Message) -> None:
        message.content[MODEL]["conv.weight"] = Array("float32", (3, 3), stype, data)

    return spoil


MALFORMED_PLAIN = {
    "a tensor of strings": (
        lambda m: m.content[MODEL].__setitem__("conv.weight", Array(np.array(["ab", "c"]))),
        "TypeError",
    ),
    "bytes that are no array": (with_array(b"not an array"), "ValueError"),
    "a truncated array": (with_array(npy_bytes(np.zeros(9, np.float32))[:-8]), "ValueError"),
    "no bytes at all": (with_array(b""), "EOFError"),
    "an array of another serialisation": (with_array(npy_bytes(np.zeros(9, np.float32)), "torch.Tensor"), "TypeError"),
}


@pytest.mark.parametrize("case", MALFORMED_PLAIN)
def test_a_malformed_plain_reply_becomes_a_failed_reply_with_the_reason(case, capsys):
    spoil, error = MALFORMED_PLAIN[case]
    site_reply = reply("a", SMALL_STATE, 4, node=3)
    spoil(site_reply)
    [(answers, pulled)] = GridTransport(RecordedGrid([site_reply])).receive({"sent"})
    assert answers == "sent" and pulled.node == 3
    assert pulled.error_code == MALFORMED_CODE and f"malformed reply ({error}" in pulled.error_reason
    assert answered([pulled], 1) == []  # the round counts it as a site that did not answer
    assert "the reply of node 3 is not used: malformed reply" in capsys.readouterr().err


def context_of(node_config: dict | None = None) -> Context:
    return Context(run_id=7, node_id=5, node_config=node_config or {}, state=RecordDict(), run_config={})


MALFORMED_REQUESTS = {
    "no config record": (deleted("config"), "malformed request (KeyError"),
    "a tensor of strings": (
        lambda m: m.content[MODEL].__setitem__("conv.weight", Array(np.array(["ab", "c"]))),
        "malformed request (TypeError",
    ),
    "no bytes at all": (with_array(b""), "malformed request (EOFError"),
}


@pytest.mark.parametrize("case", MALFORMED_REQUESTS)
def test_a_site_answers_a_malformed_plain_request_with_an_error_reply(case, capsys):
    spoil, reason = MALFORMED_REQUESTS[case]
    request = model_request(SMALL_STATE)
    spoil(request)
    answer = client_app.handle(request, context_of())
    assert answer.has_error() and answer.error.code == MALFORMED_CODE and reason in answer.error.reason
    assert answer.metadata.reply_to_message_id == request.metadata.message_id
    assert "refused the server's train request of run 7: malformed request" in capsys.readouterr().err


def test_a_sites_client_level_dp_clips_the_request_unpacked_and_its_reply_leaves_packed(monkeypatch):
    # The site's real ClientApp, its packing mod included; only its data and its training are stand-ins.
    cfg = ExperimentConfig()
    cfg.model.name, cfg.data.image_size = "cnn", 32
    num_classes = get_task(cfg.data.task).num_classes
    global_state = new_model(cfg, num_classes).state_dict()
    trained = {k: v + 1 if v.is_floating_point() else v + 4 for k, v in global_state.items()}
    monkeypatch.setattr(site, "partition_of", lambda *_: SimpleNamespace(name="a", indices={"train": [0] * 4}))
    monkeypatch.setattr(site, "load_catalog", lambda _: SimpleNamespace(task=get_task(cfg.data.task)))
    metrics = {"train_loss": 1.0, "images_per_second": 1.0}
    monkeypatch.setattr(site, "train_partition", lambda *_: (trained, 4, metrics, LocalState()))
    clipped_from = []

    def watched_clipping(trained_state, sent, parameter_keys, clipping_norm):
        clipped_from.append(sent)
        return site_clipping(trained_state, sent, parameter_keys, clipping_norm)

    site_clipping = site.clipped_at_site
    monkeypatch.setattr(site, "clipped_at_site", watched_clipping)
    config = {ROUND_KEY: 1, EXPERIMENT_KEY: json.dumps(to_dict(cfg)), CLIPPING_NORM_KEY: 1.0}
    request = packed(server_request("train", config, ArrayRecord(torch_state_dict=global_state)))

    answer = client_app.app(request, context_of())

    [sent] = clipped_from
    assert list(sent) == list(global_state) and all(torch.equal(sent[k], v) for k, v in global_state.items())
    assert is_packed(answer)
    arrived = unpacked_reply(answer)
    assert isinstance(arrived.content["metrics"], MetricRecord)
    state = arrived.content[MODEL].to_torch_state_dict()
    parameters = [name for name, _ in new_model(cfg, num_classes).named_parameters()]
    update = torch.cat([(state[k] - global_state[k]).flatten() for k in parameters])
    assert torch.linalg.vector_norm(update) == pytest.approx(1.0, rel=1e-3)  # clipped to the norm sent
    buffers = [k for k in global_state if k not in parameters]
    assert all(torch.equal(state[k], trained[k]) for k in buffers)
