"""The federated round, written out step by step, over a Transport (no Flower here).

Each round: wait for enough sites, choose which train, send them the global model, collect
their models within the round timeout, keep the replies that can be used, aggregate them with
the configured strategy, score the new global model when due (at the sites and, when the server
holds data, on the pooled validation split), checkpoint. After the last round the final model
is calibrated on the sites' validation splits and scored on the test splits, once.
"""

from __future__ import annotations

import functools
import json
import operator
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from fedbt.config import ExperimentConfig, FederatedConfig, to_dict
from fedbt.data.labels import Task, get_task
from fedbt.data.loader import make_loader
from fedbt.data.partition import Partition, make_partitions
from fedbt.eval.aggregates import ScoreAggregates, aggregate_metrics
from fedbt.eval.calibration import TemperatureLosses, calibration_summary
from fedbt.eval.inference import evaluate
from fedbt.fileio import write_json
from fedbt.fl.policy import settable_part
from fedbt.fl.privacy import client_level_epsilon, train_config
from fedbt.fl.protocol import (
    ACCEPTED_ROUND_KEY,
    CONTROL,
    CONTROL_DELTA,
    EVALUATE,
    EXAMPLES_KEY,
    EXPERIMENT_KEY,
    MODEL,
    PERSONALISE_KEY,
    PERSONALISED_AGGREGATES,
    PERSONALISED_KEY,
    ROUND_KEY,
    SCORE_FIRST_KEY,
    SITE_METRICS_KEY,
    SPLIT_KEY,
    TEMPERATURE_KEY,
    TEMPERATURE_LOSSES,
    TEST_AGGREGATES,
    TRAIN,
    Reply,
    Request,
)
from fedbt.fl.replies import (
    SiteRegistry,
    control_delta_problem,
    in_site_order,
    outsized_updates,
    site_name,
    train_reply_problem,
    update_norm,
    well_formed_personalisation,
)
from fedbt.fl.strategies import Scaffold, SiteUpdate, make_strategy
from fedbt.fl.task import load_catalog, round_steps, transport_state, zero_control
from fedbt.fl.transport import (
    Clock,
    SitesMissingError,
    Transport,
    WallClock,
    answered,
    send_and_collect,
    wait_for_sites,
)
from fedbt.model.checkpoint import load_checkpoint, save_checkpoint, store_temperature
from fedbt.model.device import configure_threads, prepare_model, select_device
from fedbt.progress import headline, log
from fedbt.tracking import Tracker, experiment_run
from fedbt.train.central import evaluate_everywhere
from fedbt.train.setup import new_model

T = TypeVar("T")  # what a site reply holds once read (validation metrics, test aggregates)


# Weights beyond this are refused before the server builds its model: far above any model fedbt
# builds from its profiles (a ResNet50 is 0.1 GB), far below what would exhaust a server.
MAX_MODEL_BYTES = 2 * 1024**3


def model_size_problem(cfg: ExperimentConfig, num_classes: int) -> str | None:
    """Why the configured model is too large to build (None: it fits), measured on torch's meta
    device, which allocates nothing: the small CNN grows with the image size."""
    with torch.device("meta"):
        state = new_model(cfg, num_classes).state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())
    if size > MAX_MODEL_BYTES:
        return (
            f"the {cfg.model.name} model at data.image_size={cfg.data.image_size} would hold {size / 1024**3:.1f} GiB "
            f"of weights (at most {MAX_MODEL_BYTES / 1024**3:g} GiB): lower the image size or choose resnet18"
        )
    return None


class AggregationError(RuntimeError):
    """The round's aggregate is unusable (non-finite): the run stops rather than keep a frozen model."""


def federated_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output_dir) / "federated"


def evaluation_due(server_round: int, fc: FederatedConfig) -> bool:
    """Score every `evaluate_every` rounds and after the last (checkpoints are written every round)."""
    return server_round % fc.evaluate_every == 0 or server_round >= fc.rounds


class FederatedRun:
    """What the server keeps across rounds: the global model, the strategy, the history."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        server_has_data: bool,
        tracker: Tracker | None = None,
        clock: Clock | None = None,
    ):
        fc = cfg.federated
        self.cfg = cfg
        self.tracker = tracker or Tracker()
        self.clock = clock or WallClock()
        self.out = federated_dir(cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        self.task = get_task(cfg.data.task)
        self.server_has_data = server_has_data
        self.min_sites = fc.min_clients or fc.num_clients
        if self.min_sites > fc.num_clients:
            raise ValueError(f"min_clients {self.min_sites} is more than the {fc.num_clients} clients")
        self.min_train = max(1, min(self.min_sites, round(fc.fraction_train * fc.num_clients)))
        if problem := model_size_problem(cfg, self.task.num_classes):
            raise ValueError(problem)
        model = new_model(cfg, self.task.num_classes)
        self.global_state = model.state_dict()
        # What a gradient moves: all that server optimisers step and client-level DP clips and noises.
        self.parameter_keys = {name for name, _ in model.named_parameters()}
        # SCAFFOLD's c starts at zeros, one float32 tensor per trainable parameter.
        control = zero_control(model) if fc.strategy == "scaffold" else None
        self.strategy = make_strategy(
            fc, self.parameter_keys, cfg.privacy.client_level, functools.partial(round_steps, cfg), control
        )
        # Sites whose record-level privacy budget is spent: they are asked to train no more.
        self.spent_nodes: set[int] = set()
        # SCAFFOLD: the last round each node's reply was counted into c (the site then keeps its c_i).
        self.accepted_rounds: dict[int, int] = {}
        self.history: list[dict] = []
        self.initial: dict = {}  # the untrained global model's pooled validation metrics
        self.last_round = 0
        self.rng = random.Random(cfg.training_seed)
        partitions = self._partitions() if server_has_data else []
        # Replies are aggregated in the sites' order (partition order when the server knows the partitions).
        self.site_order = [p.name for p in partitions]
        self.sites = SiteRegistry(sizes={p.name: len(p.indices["train"]) for p in partitions})
        if fc.resume and (self.out / "last.pt").is_file():
            self._resume(load_checkpoint(self.out / "last.pt"))
        self._wire_cache: tuple[tuple[str, int], dict[str, torch.Tensor]] = (("", 0), {})
        self.started = time.perf_counter()

    @property
    def control(self) -> dict[str, torch.Tensor] | None:
        """SCAFFOLD's server control variate c (None under any other strategy)."""
        return self.strategy.control if isinstance(self.strategy, Scaffold) else None

    def accepted_round(self, node: int) -> dict[str, int]:
        """What a SCAFFOLD training request tells a site: which of its replies c counts."""
        return {ACCEPTED_ROUND_KEY: self.accepted_rounds.get(node, 0)} if self.control is not None else {}

    def _partitions(self) -> list[Partition]:
        fc = self.cfg.federated
        return make_partitions(
            load_catalog(self.cfg), fc.num_clients, fc.partition, fc.dirichlet_alpha, self.cfg.data.seed
        )

    def _resume(self, saved: dict) -> None:
        self.global_state = saved["model_state"]
        progress = saved["progress"]
        self.history, self.last_round, self.initial = progress["history"], progress["round"], progress["initial"]
        self.strategy.load_state_dict(progress["server_optimizer"])
        log(f"[federated] resuming after round {self.last_round} of {self.cfg.federated.rounds}")

    def global_model(self) -> torch.nn.Module:
        return new_model(self.cfg, self.task.num_classes, self.global_state)

    def wire_state(self, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` in the transport precision, made once for every request of a round (the server's
        own copy stays float32)."""
        key = (name, id(state))
        if self._wire_cache[0] != key:
            self._wire_cache = (key, transport_state(state, self.cfg.federated.transport_dtype))
        return self._wire_cache[1]

    def request(self, node: int, kind: str, server_round: int, **config) -> Request:
        """The global model (in the transport precision; the server's own copy stays float32) and the
        experiment: all of it in a simulation, the settings a server may set in a deployment."""
        experiment = to_dict(self.cfg) if self.server_has_data else settable_part(self.cfg)
        tensors = {MODEL: self.wire_state(MODEL, self.global_state)}
        if self.control is not None and kind == TRAIN:
            tensors[CONTROL] = transport_state(self.control, self.cfg.federated.transport_dtype)
        settings = {ROUND_KEY: server_round, EXPERIMENT_KEY: json.dumps(experiment), **config}
        return Request(node, kind, server_round, settings, tensors)

    def checkpoint(self, path_name: str) -> None:
        progress = {
            "round": self.last_round,
            "history": self.history,
            "initial": self.initial,
            "server_optimizer": self.strategy.state_dict(),
        }
        save_checkpoint(self.out / path_name, self.global_model(), self.cfg, progress, "federated")


def run_federated(
    transport: Transport, cfg: ExperimentConfig, server_has_data: bool = True, clock: Clock | None = None
) -> dict:
    configure_threads(cfg.train.threads)
    with experiment_run(cfg, "federated") as tracker:
        run = FederatedRun(cfg, server_has_data, tracker, clock)
        if run.last_round == 0 and scores_on_server(run):
            run.initial = headline(score_on_server(run))
            log(f"[federated] initial global model: pooled val acc {100 * run.initial['accuracy']:.1f}%")
        for server_round in range(run.last_round + 1, cfg.federated.rounds + 1):
            play_round(transport, run, server_round)
        return finish(transport, run)


def play_round(transport: Transport, run: FederatedRun, server_round: int) -> None:
    fc = run.cfg.federated
    nodes = wait_for_sites(transport, run.min_sites, fc.round_timeout, fc.poll_interval, run.clock)
    trainable = [node for node in nodes if node not in run.spent_nodes]
    chosen = choose_sites(trainable, fc.fraction_train, run.min_train, run.rng)
    config = train_config(run.cfg.privacy.client_level)
    # The previous round's model, due for scoring, is scored by the sites on this round's request.
    previous = run.history[-1] if run.history else None
    score_first = previous is not None and evaluation_due(previous["round"], fc)
    if score_first:
        config[SCORE_FIRST_KEY] = True
    requests = [run.request(node, TRAIN, server_round, **config, **run.accepted_round(node)) for node in chosen]
    if score_first:
        # Sites that do not train this round score the previous model all the same: every
        # connected site's score, not only the chosen ones'.
        requests += [
            run.request(node, EVALUATE, server_round, **{SPLIT_KEY: "val"}) for node in nodes if node not in chosen
        ]
    replies = collect(transport, run, requests)
    if score_first:
        record_site_scores(run, previous, site_contents(replies, run, read_validation_metrics, "a score"))
    accepted, dropped = screen_train_replies(run, [r for r in replies if r.node in chosen])
    for who, reason in dropped.items():
        log(f"[federated] round {server_round}: dropped the reply of {who}: {reason}")
    if len(accepted) < run.min_train:
        # A site dropped, timed out or sent what cannot be used: averaging fewer sites than agreed
        # would silently change the experiment.
        raise SitesMissingError(
            f"round {server_round}: only {len(accepted)} of the required {run.min_train} sites "
            "returned a usable model within the round timeout; stopping the run"
        )
    accepted = in_site_order(accepted, run.site_order)
    update_global_model(run, server_round, accepted)
    entry = {
        "round": server_round,
        "server": {},
        "train": {site_name(r): dict(r.metrics) for r in accepted},
        "dropped": dropped,
        "sites": {},
    }
    if run.cfg.privacy.client_level.enabled:
        entry["client_privacy"] = client_privacy_spent(run, server_round)
    if evaluation_due(server_round, fc) and scores_on_server(run):
        entry["server"] = headline(score_on_server(run))
    entry["elapsed_seconds"] = time.perf_counter() - run.started
    run.history.append(entry)
    run.last_round = server_round
    run.checkpoint("last.pt")
    log_round(entry, fc.rounds)
    run.tracker.log_round(entry)


def choose_sites(nodes: list[int], fraction: float, minimum: int, rng: random.Random) -> list[int]:
    """A random `fraction` of the connected sites (at least `minimum`), in node order."""
    count = min(len(nodes), max(minimum, round(fraction * len(nodes))))
    return sorted(rng.sample(nodes, count))


def collect(transport: Transport, run: FederatedRun, requests: list[Request]) -> list[Reply]:
    """The replies with content; each failed one logged (RunRefusedError when the sites refused the run)."""
    fc = run.cfg.federated
    replies = send_and_collect(transport, requests, fc.round_timeout, fc.poll_interval, run.clock)
    for reply in replies:
        if reply.failed:
            log(f"[federated] {run.sites.author(reply)} did not answer: {reply.error_reason}")
    return answered(replies, len(requests))


def screen_train_replies(run: FederatedRun, replies: list[Reply]) -> tuple[list[Reply], dict[str, str]]:
    """The replies that can be aggregated (in float32), and why each other one was dropped."""
    accepted, dropped = [], {}
    for reply in replies:
        problem = train_reply_problem(reply, run.global_state, run.sites) or control_delta_problem(reply, run.control)
        if problem:
            dropped[run.sites.author(reply)] = problem
            continue
        name = site_name(reply)
        run.sites.accept(reply.node, name, int(reply.metrics[EXAMPLES_KEY]))
        if reply.metrics.get("dp_budget_spent"):
            # It returned the global model untrained; averaging that in would only slow the others down.
            run.spent_nodes.add(reply.node)
            dropped[name] = "its privacy budget is spent: it did not train and is not asked again"
            continue
        # The server aggregates in float32 whatever precision crossed the wire.
        reply.tensors = {key: transport_state(group, "float32") for key, group in reply.tensors.items()}
        accepted.append(reply)
    ratio = run.cfg.federated.max_update_ratio
    if ratio is not None:
        norms = [update_norm(r.tensors[MODEL], run.global_state) for r in accepted]
        for i in reversed(outsized_updates(norms, ratio)):
            reason = f"its update ({norms[i]:.3g}) is more than {ratio:g} times the median of the others'"
            dropped[site_name(accepted.pop(i))] = reason
    return accepted, dropped


def client_privacy_spent(run: FederatedRun, server_round: int) -> dict[str, float]:
    """Client-level DP after this round: one noised release per round, of a sampled share of the sites."""
    settings, fc = run.cfg.privacy.client_level, run.cfg.federated
    sample_rate = min(1.0, max(run.min_train, round(fc.fraction_train * fc.num_clients)) / fc.num_clients)
    return {
        "epsilon": client_level_epsilon(settings, sample_rate, server_round),
        "delta": settings.delta,
        "noise_multiplier": settings.noise_multiplier,
        "clipping_norm": settings.clipping_norm,
        "sample_rate": sample_rate,
    }


def update_global_model(run: FederatedRun, server_round: int, replies: list[Reply]) -> None:
    """Aggregate with the strategy. A non-finite aggregate is never kept, saved or sent: the run
    stops there, its last checkpoint (model and strategy state of the previous round) intact."""
    updates = [
        SiteUpdate(r.tensors[MODEL], int(r.metrics[EXAMPLES_KEY]), r.tensors.get(CONTROL_DELTA)) for r in replies
    ]
    new_state = run.strategy.aggregate(server_round, run.global_state, updates)
    if bad := [
        key for key, value in new_state.items() if value.is_floating_point() and not torch.isfinite(value).all()
    ]:
        raise AggregationError(
            f"round {server_round}: aggregation gave non-finite weights ({bad[0]} and {len(bad) - 1} more); "
            f"stopping the run (last.pt holds round {run.last_round})"
        )
    run.global_state = new_state
    run.accepted_rounds.update({r.node: server_round for r in replies})


def record_site_scores(run: FederatedRun, entry: dict, scores: dict[str, dict]) -> None:
    """The sites' validation scores of a round's global model, which arrive with a later request."""
    entry["sites"] = scores
    listed = ", ".join(f"{name} {100 * m.get('set_accuracy', float('nan')):.1f}%" for name, m in sorted(scores.items()))
    log(f"[federated] round {entry['round']}/{run.cfg.federated.rounds} at the sites (validation): {listed or 'none'}")
    run.tracker.log_site_scores(entry)


def final_validation_at_sites(transport: Transport, run: FederatedRun) -> dict[str, tuple[dict, TemperatureLosses]]:
    """Each connected site's scoring of the final model on its own validation split: its metrics and its
    summed loss at every temperature of the calibration grid (what the temperature is fitted from,
    without an image leaving its site). The last round has no next request to ride on."""
    fc = run.cfg.federated
    nodes = wait_for_sites(transport, run.min_sites, fc.round_timeout, fc.poll_interval, run.clock)
    replies = collect(transport, run, [run.request(node, EVALUATE, fc.rounds, **{SPLIT_KEY: "val"}) for node in nodes])
    return site_contents(replies, run, read_validation, "the final validation")


def site_contents(replies: list[Reply], run: FederatedRun, read: Callable[[Reply], T], what: str) -> dict[str, T]:
    """Each site's checked reply content, as `read` reads it; a malformed or unbound reply is logged and left out."""
    scored = {}
    for reply in replies:
        try:
            name, content = site_name(reply), read(reply)
        except (KeyError, TypeError, ValueError) as err:
            log(f"[federated] {what} from node {reply.node} is malformed and was dropped: {err}")
            continue
        if problem := run.sites.identity_problem(reply.node, name):
            log(f"[federated] {what} from node {reply.node} was dropped: {problem}")
            continue
        scored[name] = content
    return scored


def read_validation_metrics(reply: Reply) -> dict:
    metrics = json.loads(str(reply.site[SITE_METRICS_KEY]))
    if not isinstance(metrics, dict):
        raise ValueError("the validation metrics are not a JSON object")
    return metrics


def read_validation(reply: Reply) -> tuple[dict, TemperatureLosses]:
    arrays = {k: v.numpy() for k, v in reply.tensors[TEMPERATURE_LOSSES].items()}
    return read_validation_metrics(reply), TemperatureLosses.from_arrays(arrays)


def scores_on_server(run: FederatedRun) -> bool:
    """Whether the server scores the global model itself. Not under FedBN: each site scores it with
    its own BatchNorm layers, and the averaged ones the server holds are used by no site."""
    return run.server_has_data and not run.cfg.federated.fedbn


def score_on_server(run: FederatedRun) -> dict:
    """The global model on the pooled validation split (rounds are watched on validation data, as epochs are)."""
    device = select_device(run.cfg.train.device)
    catalog = load_catalog(run.cfg)
    loader = make_loader(catalog.dataset(split="val", pooled=True), run.cfg.train.batch_size, False, device)
    return evaluate(prepare_model(run.global_model(), device), loader, device, catalog.task)


def log_round(entry: dict, rounds: int) -> None:
    """The round's training, and the server's own pooled validation score when it holds the data
    (the sites' scores of this model come with the next request, see record_site_scores)."""
    server = entry["server"]
    trained = ", ".join(f"{name} loss {m.get('train_loss', float('nan')):.3f}" for name, m in entry["train"].items())
    pooled = f"; pooled val acc {100 * server['accuracy']:.1f}%" if "accuracy" in server else ""
    log(f"[federated] round {entry['round']}/{rounds} trained: {trained}{pooled}")
    if privacy := entry.get("client_privacy"):
        log(
            f"[federated] client-level DP: noise multiplier {privacy['noise_multiplier']:g}, "
            f"epsilon {privacy['epsilon']:.2f} at delta {privacy['delta']:g} spent after {entry['round']} rounds"
        )


def finish(transport: Transport, run: FederatedRun) -> dict:
    """Checkpoint the final model, calibrate it on the sites' validation splits, and score it on the test
    splits, once, at that temperature."""
    validations = final_validation_at_sites(transport, run)
    if run.history:
        record_site_scores(run, run.history[-1], {name: metrics for name, (metrics, _) in validations.items()})
    run.checkpoint("final.pt")
    site_losses = {name: losses for name, (_, losses) in validations.items()}
    losses = sum(site_losses.values(), TemperatureLosses.empty())
    temperature = losses.best_temperature()
    log(f"[federated] calibration: temperature {temperature:.3g} from the validation of {len(site_losses)} sites")
    store_temperature(run.out / "final.pt", temperature)
    result = {"kind": "federated", "rounds": run.cfg.federated.rounds, "initial": run.initial, "history": run.history}
    if run.history and "client_privacy" in run.history[-1]:
        result["client_privacy"] = run.history[-1]["client_privacy"]
    if scores_on_server(run):
        device = select_device(run.cfg.train.device)
        model = prepare_model(run.global_model(), device)
        catalog = load_catalog(run.cfg)
        result["test"] = evaluate_everywhere(model, catalog, device, run.cfg.train.batch_size, temperature)
    else:
        result["test"], personalised = site_test_results(transport, run, temperature)
        if personalised:
            # Each site's own model, on its own test split: beside the global model's row, never pooled into it.
            result["personalised"] = personalised
    fitted_on = f"the validation splits of {', '.join(sorted(site_losses)) or 'no site'}, as per-temperature sums"
    result["calibration"] = calibration_summary(losses, fitted_on, result["test"]["pooled"])
    result["wall_seconds"] = time.perf_counter() - run.started
    write_json(run.out / "metrics.json", result)
    run.tracker.log_result(result, run.out / "metrics.json", run.out / "final.pt")
    log(f"[federated] results in {run.out}")
    return result


def site_test_results(transport: Transport, run: FederatedRun, temperature: float) -> tuple[dict, dict]:
    """Test metrics of the final model at the temperature, from the sites' own test splits (a server
    without data, or FedBN), and, under personalise.enabled without data here, each site's personalised
    model on its own test split.

    Each site returns the aggregates of its scoring (fedbt.eval.aggregates), nothing per image;
    their sum gives the pooled metrics, each site's its own.
    """
    fc = run.cfg.federated
    nodes = wait_for_sites(transport, run.min_sites, fc.round_timeout, fc.poll_interval, run.clock)
    request = {SPLIT_KEY: "test", TEMPERATURE_KEY: temperature}
    if run.cfg.personalise.enabled and not run.server_has_data:
        # A server with the data personalises every site itself (fedbt.federated.simulation).
        request[PERSONALISE_KEY] = True
    replies = collect(transport, run, [run.request(node, EVALUATE, fc.rounds, **request) for node in nodes])
    read = functools.partial(read_final_scores, task=run.task)
    scored = site_contents(replies, run, read, "the test results")
    if not scored:
        raise RuntimeError("no site returned test results for the final model")
    log(f"[federated] test results from sites: {', '.join(sorted(scored))}")
    pooled = functools.reduce(operator.add, (aggregates for aggregates, _ in scored.values()))
    test = {
        "pooled": aggregate_metrics(pooled, run.task),
        "sites": {name: aggregate_metrics(agg, run.task) for name, (agg, _) in sorted(scored.items())},
    }
    return test, {name: mine for name, (_, mine) in sorted(scored.items()) if mine is not None}


def read_test_aggregates(reply: Reply, num_classes: int, group: str = TEST_AGGREGATES) -> ScoreAggregates:
    arrays = {k: v.numpy() for k, v in reply.tensors[group].items()}
    return ScoreAggregates.from_arrays(arrays, num_classes)


def read_final_scores(reply: Reply, task: Task) -> tuple[ScoreAggregates, dict | None]:
    """A final reply's test aggregates and, when the site personalised, what it sent of that: the kept
    candidate, each candidate's validation scores, and the kept model's test metrics (from its aggregates)."""
    aggregates = read_test_aggregates(reply, task.num_classes)
    if PERSONALISED_KEY not in reply.site:
        return aggregates, None
    personalised = json.loads(str(reply.site[PERSONALISED_KEY]))
    if not well_formed_personalisation(personalised):
        raise ValueError("the personalisation is not the candidate kept, their validation scores and the time")
    mine = read_test_aggregates(reply, task.num_classes, PERSONALISED_AGGREGATES)
    return aggregates, {**personalised, "test": aggregate_metrics(mine, task)}
