"""A site's side of the federation, free of Flower: a Request in, a Reply out.

The site reads the experiment the server sent (a simulated site as it is; a hospital's node
checks it against its own policy, fedbt.fl.policy), trains or scores the global model on its
own partition (fedbt.fl.task), and answers with its model and numbers: nothing of one image,
and no exception text (which carries local paths), only a generic reason; the detail goes to
the site's log. What a site keeps between requests (its optimiser, its FedBN layers, its privacy
account, its SCAFFOLD c_i, its count of test scorings) is in a SiteStore. Asked to personalise in
the final request, the site adapts the final model on its own data and keeps the result: only its
scores leave the site.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedbt.config import ExperimentConfig, from_dict
from fedbt.data.partition import Partition
from fedbt.data.sites import SitePolicy, load_site
from fedbt.eval.aggregates import aggregate_scores
from fedbt.eval.calibration import tempered_probabilities
from fedbt.fileio import atomic_write, make_private_folders
from fedbt.fl.ledger import DAY_SECONDS, PrivacyLedger, TestQuota, data_key, privacy_refusal
from fedbt.fl.policy import PolicyRefusal, SiteSetup, site_experiment
from fedbt.fl.privacy import clipped_at_site
from fedbt.fl.protocol import (
    ACCEPTED_ROUND_KEY,
    CLIPPING_NORM_KEY,
    CONTROL,
    CONTROL_DELTA,
    EXAMPLES_KEY,
    EXPERIMENT_KEY,
    FAILED_CODE,
    FAILED_REASON,
    MODEL,
    NODE_CACHE_DIR,
    NODE_DATA_ROOT,
    NODE_SITE,
    NUM_PARTITIONS,
    PARTITION_ID,
    PERSONALISE_KEY,
    PERSONALISED_AGGREGATES,
    PERSONALISED_KEY,
    REFUSED_CODE,
    REFUSED_REASON,
    ROUND_KEY,
    SCORE_FIRST_KEY,
    SITE_METRICS_KEY,
    SITE_NAME_KEY,
    SPLIT_KEY,
    TEMPERATURE_KEY,
    TEMPERATURE_LOSSES,
    TEST_AGGREGATES,
    TRAIN,
    Reply,
    Request,
    TensorGroup,
)
from fedbt.fl.task import (
    LocalState,
    client_partition,
    control_update,
    evaluate_partition,
    load_catalog,
    partition_log_probabilities,
    starting_state,
    train_partition,
    transport_state,
)
from fedbt.model.checkpoint import load_checkpoint, temperature_of
from fedbt.progress import log
from fedbt.train.personalise import SiteData, personalise_site
from fedbt.train.setup import new_model

# A hospital's own state of each run, in its cache folder (see FileStore).
SITE_STATE_FOLDER = "site-state"


class SiteStore(Protocol):
    """What a site keeps between the requests of a run, by name: tensors, numbers and strings only."""

    def read(self, what: str, default: Any) -> Any: ...
    def write(self, what: str, value: Any) -> None: ...


@dataclass
class MemoryStore:
    """A simulated site's state, held by whoever runs the site (tests: this object)."""

    values: dict[str, Any] = field(default_factory=dict)

    def read(self, what: str, default: Any) -> Any:
        return self.values.get(what, default)

    def write(self, what: str, value: Any) -> None:
        self.values[what] = value


@dataclass
class FileStore:
    """A hospital's state of one run, in its own cache folder, its owner's alone. A SuperNode would
    push the whole context back after every message, in one request that can be lost under load
    (with the optimiser state, ~86 MB for ResNet18): so it is kept here instead."""

    folder: Path
    run_id: int

    def path(self, what: str) -> Path:
        return self.folder / f"run-{self.run_id}-{what}.pt"

    def read(self, what: str, default: Any) -> Any:
        path = self.path(what)
        return torch.load(path, weights_only=True) if path.exists() else default

    def write(self, what: str, value: Any) -> None:
        atomic_write(self.path(what), lambda fh: torch.save(value, fh), private=True)


@dataclass
class SiteFiles:
    """A hospital node's own files, in its state folder: each run's state, and what outlives runs
    (the privacy ledger and the test quota of its data, fedbt.fl.ledger)."""

    folder: Path
    run_id: int
    key: str  # the site and its data (fedbt.fl.ledger.data_key)

    @property
    def store(self) -> FileStore:
        return FileStore(self.folder, self.run_id)

    @property
    def ledger(self) -> PrivacyLedger:
        return PrivacyLedger(self.folder / f"privacy-ledger-{self.key}.json")

    @property
    def quota(self) -> TestQuota:
        return TestQuota(self.folder / f"test-quota-{self.key}.json")

    @property
    def personalised(self) -> Path:
        """Where the run's personalised model stays: beside the ledger, not a run's state that end_run removes."""
        return self.folder / f"personalised-run-{self.run_id}"

    def run_files(self) -> list[Path]:
        return sorted(self.folder.glob("run-*-*.pt"))

    def end_run(self) -> None:
        """The run is over: what it kept here is of no further use."""
        for path in self.folder.glob(f"run-{self.run_id}-*.pt"):
            path.unlink(missing_ok=True)

    def sweep(self, keep_days: float, now: float | None = None) -> None:
        """Remove other runs' state untouched for `keep_days` (a run that failed or was abandoned)."""
        now = time.time() if now is None else now
        current = f"run-{self.run_id}-"
        for path in self.run_files():
            if not path.name.startswith(current) and now - path.stat().st_mtime > keep_days * DAY_SECONDS:
                path.unlink(missing_ok=True)


@dataclass
class SiteContext:
    """Who this site is (its node config), which run it serves, and where a simulated site keeps its
    state (whoever runs the simulation holds it); a hospital's node keeps its own files."""

    node_config: Mapping[str, Any]
    run_id: int
    memory: SiteStore = field(default_factory=MemoryStore)

    def files(self, cfg: ExperimentConfig) -> SiteFiles | None:
        """A hospital node's files; None for a simulated site."""
        setup = site_setup(self.node_config)
        if setup is None:
            return None
        return SiteFiles(state_folder(cfg, setup), self.run_id, data_key(setup.site.name, setup.site.root))

    def store(self, cfg: ExperimentConfig) -> SiteStore:
        files = self.files(cfg)
        return self.memory if files is None else files.store

    def personalised(self, cfg: ExperimentConfig, partition: Partition) -> Path:
        """Where the site keeps its personalised model: a hospital in its own state folder; a simulated
        site in the run's folder, where the simulation keeps every site's (personalised/<site>/)."""
        files = self.files(cfg)
        return Path(cfg.output_dir) / "personalised" / partition.name if files is None else files.personalised


def site_setup(node_config: Mapping[str, Any]) -> SiteSetup | None:
    """What `fedbt site` started this node with; None for a simulated site, which has no files of its own."""
    if not node_config.get(NODE_SITE):
        return None
    data_root = str(node_config[NODE_DATA_ROOT]) if node_config.get(NODE_DATA_ROOT) else None
    cache_dir = str(node_config[NODE_CACHE_DIR]) if node_config.get(NODE_CACHE_DIR) else None
    site_file = str(node_config[NODE_SITE])
    return SiteSetup(site_file, load_site(site_file, data_root), data_root, cache_dir)


def state_folder(cfg: ExperimentConfig, setup: SiteSetup) -> Path:
    return Path(cfg.data.cache_dir) / SITE_STATE_FOLDER / setup.site.name


def site_experiment_of(request: Request, node_config: Mapping[str, Any]) -> tuple[ExperimentConfig, SitePolicy]:
    """The experiment a site runs and the policy it runs under. A simulated site takes the server's
    experiment as it is (one experimenter runs both) under the default policy; a hospital's node
    checks it against its own policy (PolicyRefusal when it asks for more than that allows)."""
    sent = json.loads(str(request.config[EXPERIMENT_KEY]))
    setup = site_setup(node_config)
    if setup is None:
        return from_dict(sent), SitePolicy()
    return site_experiment(sent, setup), setup.policy


def partition_of(node_config: Mapping[str, Any], cfg: ExperimentConfig) -> Partition:
    if PARTITION_ID in node_config:  # simulation
        return client_partition(cfg, int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS]))
    # Deployment: the node names its site; the catalog holds that site alone.
    return client_partition(cfg, 0, 1)


def answer(request: Request, context: SiteContext) -> Reply:
    """The site's reply to a request; a generic error reply when it refuses or fails (the detail is
    logged here, at the site)."""
    what = f"{request.kind} request of run {context.run_id}"
    try:
        return train(request, context) if request.kind == TRAIN else evaluate(request, context)
    except PolicyRefusal as err:
        log(f"[site] refused the server's {what}: {err}")
        return Reply.error(request.node, REFUSED_CODE, REFUSED_REASON)
    except Exception:
        log(f"[site] the server's {what} failed:\n{traceback.format_exc()}")
        return Reply.error(request.node, FAILED_CODE, FAILED_REASON)


def load_local(context: SiteContext, cfg: ExperimentConfig) -> LocalState:
    return LocalState(**context.store(cfg).read("local", {}))


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


def train(request: Request, context: SiteContext) -> Reply:
    cfg, policy = site_experiment_of(request, context.node_config)
    files = context.files(cfg)
    if files is not None:
        files.sweep(policy.keep_run_state_days)
        if refusal := privacy_refusal(cfg, policy, files.ledger, str(context.run_id)):
            raise PolicyRefusal(refusal)
    partition = partition_of(context.node_config, cfg)
    server_round = int(request.config[ROUND_KEY])
    catalog = load_catalog(cfg)
    log(
        f"[client {partition.name}] round {server_round}/{cfg.federated.rounds}: "
        f"training on {len(partition.indices['train'])} images"
    )
    global_state = request.tensors[MODEL]
    local = load_local(context, cfg)
    site = {SITE_NAME_KEY: partition.name}
    if request.config.get(SCORE_FIRST_KEY):
        # The previous round's global model, as it arrived: scored here so it crosses the wire once.
        validation, _ = evaluate_partition(cfg, catalog, partition, global_state, local, split="val")
        site[SITE_METRICS_KEY] = json.dumps(validation)
    server_control = request.tensors[CONTROL] if cfg.federated.strategy == "scaffold" else None
    if server_control is not None:
        local = local.settled(int(request.config.get(ACCEPTED_ROUND_KEY, 0)))
    state, examples, metrics, trained = train_partition(
        cfg, catalog, partition, global_state, server_round, local, server_control
    )
    log(f"[client {partition.name}] round {server_round}: {training_summary(metrics, cfg.privacy.target_epsilon)}")
    kept = trained
    if server_control is not None:
        # The new c_i waits until the server says it counted this reply (`LocalState.settled`).
        kept = dataclasses.replace(
            trained, control=local.control, pending_control=trained.control, pending_round=server_round
        )
    context.store(cfg).write("local", kept.as_tensors())
    if files is not None and "dp_epsilon" in metrics:
        files.ledger.record(str(context.run_id), float(metrics["dp_epsilon"]), cfg.privacy.delta)
    if CLIPPING_NORM_KEY in request.config:
        # Client-level DP clipped here: no unclipped update leaves the site.
        parameters = {name for name, _ in new_model(cfg, catalog.task.num_classes).named_parameters()}
        state = clipped_at_site(state, global_state, parameters, float(request.config[CLIPPING_NORM_KEY]))
    dtype = cfg.federated.transport_dtype
    tensors = {MODEL: transport_state(state, dtype)}
    if server_control is not None:
        tensors[CONTROL_DELTA] = transport_state(control_update(local, trained), dtype)
    return Reply(request.node, tensors, {**metrics, EXAMPLES_KEY: examples}, site)


def evaluate(request: Request, context: SiteContext) -> Reply:
    cfg, policy = site_experiment_of(request, context.node_config)
    split = str(request.config.get(SPLIT_KEY, "val"))
    files = context.files(cfg)
    if split == "test":
        if files is None:
            count_test_request(context.memory, policy)
        else:
            files.quota.take(policy, str(context.run_id))
    partition = partition_of(context.node_config, cfg)
    global_state = request.tensors[MODEL]
    catalog = load_catalog(cfg)
    local = load_local(context, cfg)
    site = {SITE_NAME_KEY: partition.name}
    if split == "test":
        reply = test_aggregates(request, cfg, catalog, partition, global_state, local, site)
        if request.config.get(PERSONALISE_KEY):
            # Within this request, so within the test scoring the site has counted: one final scoring, of two models.
            state, folder = starting_state(cfg, global_state, local), context.personalised(cfg, partition)
            summary, aggregates = personalised_scores(cfg, catalog, partition, state, folder)
            reply.site[PERSONALISED_KEY] = summary
            reply.tensors[PERSONALISED_AGGREGATES] = aggregates
        if files is not None:
            files.end_run()  # the final scoring is a run's last request
        return reply
    metrics, losses = evaluate_partition(cfg, catalog, partition, global_state, local, split="val")
    # Only numbers every site has, so that they average; the full metrics travel as JSON.
    numbers = {
        "loss": metrics["loss"],
        "set_accuracy": metrics["set_accuracy"],
        "tumour_accuracy": metrics["tumour_vs_none"]["accuracy"],
        EXAMPLES_KEY: int(metrics["n"]),
    }
    # Sums over the split at each grid temperature: the server fits the calibration from them.
    tensors = {TEMPERATURE_LOSSES: {k: torch.from_numpy(v) for k, v in losses.arrays().items()}}
    return Reply(request.node, tensors, numbers, {**site, SITE_METRICS_KEY: json.dumps(metrics)})


def count_test_request(store: SiteStore, policy: SitePolicy) -> None:
    """Count a simulated site's final test scoring of this run; PolicyRefusal beyond the policy's
    number (a hospital's node counts in its test quota, across runs: fedbt.fl.ledger)."""
    done = int(store.read("test-requests", 0))
    if done >= policy.max_test_requests:
        raise PolicyRefusal(
            f"test scoring number {done + 1} in this run; this site allows {policy.max_test_requests} per run"
        )
    store.write("test-requests", done + 1)


def test_aggregates(request: Request, cfg, catalog, partition, global_state, local, site: dict) -> Reply:
    """The final model's test scoring at this site, at the temperature the server fitted, for a server
    that holds no data: counts and score histograms (fedbt.eval.aggregates), never a value of one
    image; the server adds them up into the pooled test metrics."""
    temperature = float(request.config.get(TEMPERATURE_KEY, 1.0))
    if not 0 < temperature < math.inf:
        raise ValueError(f"the server sent the temperature {temperature}, not a positive number")
    aggregates = scoring_aggregates(cfg, catalog, partition, global_state, local, temperature)
    return Reply(request.node, {TEST_AGGREGATES: aggregates}, {}, site)


def scoring_aggregates(cfg, catalog, partition, state, local, temperature: float) -> TensorGroup:
    """A model's test scoring at the temperature, as aggregates (counts and histograms)."""
    log_probs, masks = partition_log_probabilities(cfg, catalog, partition, state, local, "test")
    probs = tempered_probabilities(log_probs, temperature)
    arrays = aggregate_scores(probs, masks, catalog.task, untempered=np.exp(log_probs)).arrays()
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def personalised_scores(cfg, catalog, partition, state, folder: Path) -> tuple[str, TensorGroup]:
    """Personalise `state` on this site's splits (fedbt.train.personalise), keeping the model in `folder`,
    owner-only and never sent. What leaves the site: as JSON, the candidate kept, each candidate's
    validation scores, the training images and the time; and the kept model's test scoring at its own
    temperature (fitted on the site's validation split), aggregates as the global model's."""
    make_private_folders(folder)
    data = SiteData.of(catalog, partition, cfg.train)
    result = personalise_site(cfg, state, data, folder, f"personalise {partition.name}")
    kept = load_checkpoint(folder / "final.pt")
    aggregates = scoring_aggregates(cfg, catalog, partition, kept["model_state"], LocalState(), temperature_of(kept))
    summary = {
        "chosen": result["chosen"],
        # Not each candidate's test score: the site reports on its test split the model it keeps.
        "candidates": {name: {"val": c["val"]} for name, c in result["candidates"].items()},
        "train_images": result["train_images"],
        "temperature": result["temperature"],
        "wall_seconds": result["wall_seconds"],
    }
    return json.dumps(summary), aggregates
