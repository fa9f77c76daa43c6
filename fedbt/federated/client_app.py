"""Flower ClientApp: a hospital site. A thin adapter over fedbt.federated.task."""

from __future__ import annotations

import io
import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbt.federated.client_privacy import clipped_at_site
from fedbt.federated.common import ROUND_KEY, SPLIT_KEY, client_experiment
from fedbt.federated.flower_internals import CLIPPING_NORM_KEY
from fedbt.federated.task import (
    LocalState,
    client_partition,
    evaluate_partition,
    load_catalog,
    predict_partition,
    train_partition,
    transport_state,
)
from fedbt.progress import log
from fedbt.train.setup import new_model

app = ClientApp()
LOCAL_STATE_KEY = "fedbt-local-state"


def _partition_of(context: Context, cfg):
    node = context.node_config
    if "partition-id" in node:  # simulation
        return client_partition(cfg, int(node["partition-id"]), int(node["num-partitions"]))
    # Deployment: the SuperNode names its site (see client_experiment); the catalog holds that site alone.
    return client_partition(cfg, 0, 1)


def _load_local(context: Context) -> LocalState:
    if LOCAL_STATE_KEY not in context.state:
        return LocalState()
    blob = context.state[LOCAL_STATE_KEY]["blob"]
    return LocalState(**torch.load(io.BytesIO(blob), weights_only=True))


def _save_local(context: Context, local: LocalState) -> None:
    buffer = io.BytesIO()
    torch.save(local.as_tensors(), buffer)
    context.state[LOCAL_STATE_KEY] = ConfigRecord({"blob": buffer.getvalue()})


def training_summary(metrics: dict, target_epsilon: float) -> str:
    """Loss and speed, the privacy spent so far; or that the privacy budget stopped the training."""
    if metrics.get("dp_budget_spent"):
        return (
            f"privacy budget spent (epsilon {metrics['dp_epsilon']:.2f} of {target_epsilon:g}): "
            "not training, returning the global model unchanged"
        )
    summary = f"loss {metrics['train_loss']:.4f}, {metrics['images_per_second']:.1f} img/s"
    if "dp_epsilon" in metrics:
        summary += f", epsilon {metrics['dp_epsilon']:.2f} of {target_epsilon:g} spent"
    return summary


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = client_experiment(msg, context)
    partition = _partition_of(context, cfg)
    config = msg.content["config"]
    server_round = int(config[ROUND_KEY])
    catalog = load_catalog(cfg)
    log(
        f"[client {partition.name}] round {server_round}/{cfg.federated.rounds}: "
        f"training on {len(partition.indices['train'])} images"
    )
    global_state = msg.content["arrays"].to_torch_state_dict()
    state, examples, metrics, local = train_partition(
        cfg, catalog, partition, global_state, server_round, _load_local(context)
    )
    log(f"[client {partition.name}] round {server_round}: {training_summary(metrics, cfg.privacy.target_epsilon)}")
    _save_local(context, local)
    if CLIPPING_NORM_KEY.get() in config:
        # Client-level DP clipped here: no unclipped update leaves the site.
        parameters = {name for name, _ in new_model(cfg, catalog.task.num_classes).named_parameters()}
        state = clipped_at_site(msg, context, state, parameters)
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=transport_state(state, cfg.federated.transport_dtype)),
            "metrics": MetricRecord({**metrics, "num-examples": examples}),
            "site": ConfigRecord({"name": partition.name}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = client_experiment(msg, context)
    partition = _partition_of(context, cfg)
    global_state = msg.content["arrays"].to_torch_state_dict()
    split = str(msg.content["config"].get(SPLIT_KEY, "val"))
    if split == "test":
        return _test_predictions(msg, context, cfg, partition, global_state)
    metrics = evaluate_partition(cfg, load_catalog(cfg), partition, global_state, _load_local(context), split="val")
    # Only numbers every site has, so Flower can average them; the full metrics travel as JSON.
    numbers = {
        "loss": metrics["loss"],
        "set_accuracy": metrics["set_accuracy"],
        "tumour_accuracy": metrics["tumour_vs_none"]["accuracy"],
    }
    content = RecordDict(
        {
            "metrics": MetricRecord({**numbers, "num-examples": int(metrics["n"])}),
            "site": ConfigRecord({"name": partition.name, "metrics-json": json.dumps(metrics)}),
        }
    )
    return Message(content=content, reply_to=msg)


def _test_predictions(msg: Message, context: Context, cfg, partition, global_state) -> Message:
    """The final model's outputs on this site's test split, for a server that holds no data.

    Probabilities and allowed-class masks leave the site, never images: the server pools
    them into the same test metrics a simulation computes from the pooled data.
    """
    probs, masks = predict_partition(cfg, load_catalog(cfg), partition, global_state, _load_local(context), "test")
    predictions = {"probs": torch.from_numpy(probs), "masks": torch.from_numpy(masks)}
    content = RecordDict(
        {
            "predictions": ArrayRecord(torch_state_dict=predictions),
            "site": ConfigRecord({"name": partition.name}),
        }
    )
    return Message(content=content, reply_to=msg)
