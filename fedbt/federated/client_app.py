"""Flower ClientApp: a hospital site. A thin adapter over fedbt.federated.task."""

from __future__ import annotations

import functools
import io
import json
import math
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedbt.data.sites import SitePolicy
from fedbt.eval.aggregates import aggregate_scores
from fedbt.eval.calibration import tempered_probabilities
from fedbt.federated.client_privacy import clipped_at_site
from fedbt.federated.common import (
    CONTROL_DELTA_KEY,
    CONTROL_KEY,
    ROUND_KEY,
    SCORE_FIRST_KEY,
    SPLIT_KEY,
    TEMPERATURE_KEY,
    TEMPERATURE_LOSSES_KEY,
    client_experiment,
    site_setup,
)
from fedbt.federated.flower_internals import CLIPPING_NORM_KEY
from fedbt.federated.packing import packing_mod
from fedbt.federated.policy import PolicyRefusal
from fedbt.federated.task import (
    LocalState,
    client_partition,
    control_update,
    evaluate_partition,
    load_catalog,
    partition_log_probabilities,
    train_partition,
    transport_state,
)
from fedbt.fileio import atomic_write
from fedbt.progress import log
from fedbt.train.setup import new_model

# packing_mod first, so it is outermost: every other mod and handler sees the request unpacked
# and the reply is packed after all of them (fedbt.federated.packing).
CLIENT_MODS = [packing_mod]
app = ClientApp(mods=CLIENT_MODS)
LOCAL_STATE_KEY = "fedbt-local-state"
TEST_REQUESTS_KEY = "fedbt-test-requests"
# A hospital's own state of each run, in its cache folder (see _site_state_file).
SITE_STATE_FOLDER = "site-state"
# What the server learns when a site will not or cannot do what it asked: no exception text,
# which carries local paths and file names (the detail goes to the site's log). fedbt's own
# codes: Flower's run from 0 to 8.
REFUSED_CODE, FAILED_CODE = 100, 101
REFUSED_REASON = "refused by the site's policy (the reason is in the site's log)"
FAILED_REASON = "the site could not do this (the reason is in the site's log)"


def site_guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """The handler, replying with a generic error when it refuses or fails; the detail is logged at the site."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        request = f"{msg.metadata.message_type} request of run {msg.metadata.run_id}"
        try:
            return handler(msg, context)
        except PolicyRefusal as err:
            log(f"[site] refused the server's {request}: {err}")
            return Message(Error(REFUSED_CODE, REFUSED_REASON), reply_to=msg)
        except Exception:
            log(f"[site] the server's {request} failed:\n{traceback.format_exc()}")
            return Message(Error(FAILED_CODE, FAILED_REASON), reply_to=msg)

    return guarded


def _partition_of(context: Context, cfg):
    node = context.node_config
    if "partition-id" in node:  # simulation
        return client_partition(cfg, int(node["partition-id"]), int(node["num-partitions"]))
    # Deployment: the SuperNode names its site (see client_experiment); the catalog holds that site alone.
    return client_partition(cfg, 0, 1)


def _site_state_file(context: Context, cfg, what: str) -> Path | None:
    """Where a hospital's node keeps `what` of this run between its messages; None for a simulated site.

    A simulated site keeps it in context.state, which Ray holds in memory. A SuperNode would push
    the whole context back after every message, in one request that can be lost under load (with
    the optimiser state, ~86 MB for ResNet18, and the count of test scorings the policy limits):
    so a hospital keeps it in its own cache folder, its owner's alone.
    """
    setup = site_setup(context)
    if setup is None:
        return None
    return Path(cfg.data.cache_dir) / SITE_STATE_FOLDER / setup.site.name / f"run-{context.run_id}-{what}.pt"


def _read_site_state(path: Path, default):
    return torch.load(path, weights_only=True) if path.exists() else default


def _write_site_state(path: Path, value) -> None:
    atomic_write(path, lambda fh: torch.save(value, fh), private=True)


def _load_local(context: Context, cfg) -> LocalState:
    path = _site_state_file(context, cfg, "local")
    if path is not None:
        return LocalState(**_read_site_state(path, {}))
    if LOCAL_STATE_KEY not in context.state:
        return LocalState()
    blob = context.state[LOCAL_STATE_KEY]["blob"]
    return LocalState(**torch.load(io.BytesIO(blob), weights_only=True))


def _save_local(context: Context, cfg, local: LocalState) -> None:
    path = _site_state_file(context, cfg, "local")
    if path is not None:
        _write_site_state(path, local.as_tensors())
        return
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
@site_guarded
def train(msg: Message, context: Context) -> Message:
    cfg, _ = client_experiment(msg, context)
    partition = _partition_of(context, cfg)
    config = msg.content["config"]
    server_round = int(config[ROUND_KEY])
    catalog = load_catalog(cfg)
    log(
        f"[client {partition.name}] round {server_round}/{cfg.federated.rounds}: "
        f"training on {len(partition.indices['train'])} images"
    )
    global_state = msg.content["arrays"].to_torch_state_dict()
    local = _load_local(context, cfg)
    scores = {}
    if config.get(SCORE_FIRST_KEY):
        # The previous round's global model, as it arrived: scored here so it crosses the wire once.
        validation, _ = evaluate_partition(cfg, catalog, partition, global_state, local, split="val")
        scores = {"metrics-json": json.dumps(validation)}
    scaffold = cfg.federated.strategy == "scaffold"
    server_control = msg.content[CONTROL_KEY].to_torch_state_dict() if scaffold else None
    state, examples, metrics, trained = train_partition(
        cfg, catalog, partition, global_state, server_round, local, server_control
    )
    log(f"[client {partition.name}] round {server_round}: {training_summary(metrics, cfg.privacy.target_epsilon)}")
    _save_local(context, cfg, trained)
    if CLIPPING_NORM_KEY.get() in config:
        # Client-level DP clipped here: no unclipped update leaves the site.
        parameters = {name for name, _ in new_model(cfg, catalog.task.num_classes).named_parameters()}
        state = clipped_at_site(msg, context, state, parameters)
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=transport_state(state, cfg.federated.transport_dtype)),
            "metrics": MetricRecord({**metrics, "num-examples": examples}),
            "site": ConfigRecord({"name": partition.name, **scores}),
        }
    )
    if scaffold:
        delta = transport_state(control_update(local, trained), cfg.federated.transport_dtype)
        content[CONTROL_DELTA_KEY] = ArrayRecord(torch_state_dict=delta)
    return Message(content=content, reply_to=msg)


@app.evaluate()
@site_guarded
def evaluate(msg: Message, context: Context) -> Message:
    cfg, policy = client_experiment(msg, context)
    split = str(msg.content["config"].get(SPLIT_KEY, "val"))
    if split == "test":
        count_test_request(context, cfg, policy)
    partition = _partition_of(context, cfg)
    global_state = msg.content["arrays"].to_torch_state_dict()
    if split == "test":
        return _test_aggregates(msg, context, cfg, partition, global_state)
    catalog = load_catalog(cfg)
    metrics, losses = evaluate_partition(cfg, catalog, partition, global_state, _load_local(context, cfg), split="val")
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
            # Sums over the split at each grid temperature: the server fits the calibration from them.
            TEMPERATURE_LOSSES_KEY: ArrayRecord(
                torch_state_dict={k: torch.from_numpy(v) for k, v in losses.arrays().items()}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


def count_test_request(context: Context, cfg, policy: SitePolicy) -> None:
    """Count a final test scoring of this run; PolicyRefusal beyond the policy's number.
    Each scoring tells the server more about the same test images."""
    path = _site_state_file(context, cfg, "test-requests")
    if path is not None:
        done = int(_read_site_state(path, 0))
    else:
        done = int(context.state[TEST_REQUESTS_KEY]["count"]) if TEST_REQUESTS_KEY in context.state else 0
    if done >= policy.max_test_requests:
        raise PolicyRefusal(
            f"test scoring number {done + 1} in this run; this site allows {policy.max_test_requests} per run"
        )
    if path is not None:
        _write_site_state(path, done + 1)
    else:
        context.state[TEST_REQUESTS_KEY] = ConfigRecord({"count": done + 1})


def _test_aggregates(msg: Message, context: Context, cfg, partition, global_state) -> Message:
    """The final model's test scoring at this site, at the temperature the server fitted, for a server
    that holds no data.

    Counts and score histograms leave the site (fedbt.eval.aggregates), never a value of one
    image: the server adds them up into the pooled test metrics.
    """
    catalog = load_catalog(cfg)
    temperature = float(msg.content["config"].get(TEMPERATURE_KEY, 1.0))
    if not 0 < temperature < math.inf:
        raise ValueError(f"the server sent the temperature {temperature}, not a positive number")
    local = _load_local(context, cfg)
    log_probs, masks = partition_log_probabilities(cfg, catalog, partition, global_state, local, "test")
    probs = tempered_probabilities(log_probs, temperature)
    arrays = aggregate_scores(probs, masks, catalog.task, untempered=np.exp(log_probs)).arrays()
    content = RecordDict(
        {
            "test-aggregates": ArrayRecord(torch_state_dict={k: torch.from_numpy(v) for k, v in arrays.items()}),
            "site": ConfigRecord({"name": partition.name}),
        }
    )
    return Message(content=content, reply_to=msg)
