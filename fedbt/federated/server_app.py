"""Flower ServerApp: runs the configured strategy, evaluates the global model, checkpoints each round."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedbt.config import ExperimentConfig
from fedbt.data.labels import get_task
from fedbt.data.loader import make_loader
from fedbt.eval.inference import evaluate
from fedbt.eval.metrics import classification_metrics
from fedbt.federated.common import EXPERIMENT_KEY, SPLIT_KEY, experiment_from_context, experiment_record
from fedbt.federated.grid import PatientGrid
from fedbt.federated.strategy import make_strategy
from fedbt.federated.task import load_catalog, new_model
from fedbt.model.checkpoint import load_checkpoint, save_checkpoint
from fedbt.model.device import configure_threads, prepare_model, select_device
from fedbt.progress import headline, log
from fedbt.train.central import evaluate_everywhere

app = ServerApp()


def federated_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output_dir) / "federated"


class FederatedRun:
    """State of one federated run: history, checkpoints, server-side evaluation."""

    def __init__(self, cfg: ExperimentConfig, num_clients: int, server_has_data: bool):
        self.cfg = cfg
        self.out = federated_dir(cfg)
        self.out.mkdir(parents=True, exist_ok=True)
        self.num_classes = get_task(cfg.data.task).num_classes
        self.server_has_data = server_has_data
        self.history: list[dict] = []
        self.initial: dict = {}  # the untrained global model's pooled validation metrics
        self.start_round = 0
        model = new_model(cfg, self.num_classes)
        self.initial_state = model.state_dict()
        strategy_state: dict = {}
        if cfg.federated.resume and (self.out / "last.pt").is_file():
            saved = load_checkpoint(self.out / "last.pt")
            self.initial_state = saved["model_state"]
            self.history = saved["progress"]["history"]
            self.start_round = saved["progress"]["round"]
            self.initial = saved["progress"]["initial"]
            strategy_state = saved["progress"]["strategy_state"]
            log(f"[federated] resuming after round {self.start_round} of {cfg.federated.rounds}")
        self.strategy = make_strategy(cfg.federated, num_clients, self.start_round)
        self.strategy.restore_optimizer_state(strategy_state)
        self.started = time.perf_counter()

    def model_from(self, arrays: ArrayRecord) -> torch.nn.Module:
        model = new_model(self.cfg, self.num_classes)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by the strategy before round 1 (0) and after every round."""
        absolute_round = server_round + self.start_round
        model = self.model_from(arrays)
        pooled: dict = {}
        if self.server_has_data and (server_round == 0 or self.strategy.evaluation_due(absolute_round)):
            device = select_device(self.cfg.train.device)
            catalog = load_catalog(self.cfg)
            # Rounds are watched on validation data, as central epochs are; test is scored once, at the end.
            loader = make_loader(catalog.dataset(split="val", pooled=True), self.cfg.train.batch_size, False, device)
            pooled = evaluate(prepare_model(model, device), loader, device, catalog.task)
        if server_round == 0:
            if pooled and self.start_round == 0:
                self.initial = headline(pooled)
                log(f"[federated] initial global model: pooled val {self.initial}")
            return MetricRecord({"accuracy": pooled.get("accuracy", 0.0)}) if pooled else None
        entry = {
            "round": absolute_round,
            "elapsed_seconds": time.perf_counter() - self.started,
            "server": headline(pooled) if pooled else {},
            "train": self.strategy.site_train.get(absolute_round, {}),
            "sites": self.strategy.site_eval.get(absolute_round, {}),
        }
        self.history.append(entry)
        self._log_round(entry)
        progress = {
            "round": absolute_round,
            "history": self.history,
            "initial": self.initial,
            "strategy_state": self.strategy.optimizer_state(),
        }
        save_checkpoint(self.out / "last.pt", model, self.cfg, progress, "federated")
        return (
            MetricRecord({k: float(v) for k, v in entry["server"].items() if isinstance(v, (int, float))})
            if pooled
            else None
        )

    def _log_round(self, entry: dict) -> None:
        sites = ", ".join(
            f"{name} {100 * m.get('set_accuracy', float('nan')):.1f}%" for name, m in sorted(entry["sites"].items())
        )
        server = entry["server"]
        pooled = f"pooled val acc {100 * server['accuracy']:.1f}% " if "accuracy" in server else ""
        scores = f"{pooled}sites: {sites}" if pooled or sites else "trained (not scored this round)"
        log(f"[federated] round {entry['round']}/{self.cfg.federated.rounds} {scores}")

    def finish(self, arrays: ArrayRecord, grid: Grid) -> dict:
        model = self.model_from(arrays)
        progress = {
            "round": self.cfg.federated.rounds,
            "history": self.history,
            "initial": self.initial,
            "strategy_state": {},
        }
        save_checkpoint(self.out / "final.pt", model, self.cfg, progress, "federated")
        result = {
            "kind": "federated",
            "rounds": self.cfg.federated.rounds,
            "initial": self.initial,
            "history": self.history,
        }
        if self.server_has_data:
            device = select_device(self.cfg.train.device)
            result["test"] = evaluate_everywhere(
                prepare_model(model, device), load_catalog(self.cfg), device, self.cfg.train.batch_size
            )
        else:
            result["test"] = site_test_results(grid, arrays, self.cfg)
        result["wall_seconds"] = time.perf_counter() - self.started
        (self.out / "metrics.json").write_text(json.dumps(result, indent=2))
        log(f"[federated] results in {self.out}")
        return result


def site_test_results(grid: Grid, arrays: ArrayRecord, cfg: ExperimentConfig) -> dict:
    """Test metrics of the final model from the sites' own test splits (a server without data).

    Each site returns probabilities and allowed-class masks of its test images; pooling them
    gives the same pooled and per-site metrics as evaluate_everywhere on the pooled catalog.
    """
    config = ConfigRecord({EXPERIMENT_KEY: experiment_record(cfg), SPLIT_KEY: "test"})
    messages = [
        Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node, message_type=MessageType.EVALUATE)
        for node in grid.get_node_ids()
    ]
    replies = [r for r in grid.send_and_receive(messages, timeout=cfg.federated.round_timeout) if not r.has_error()]
    if not replies:
        raise RuntimeError("no site returned test results for the final model")
    task = get_task(cfg.data.task)
    outputs = {}
    for reply in replies:
        predictions = reply.content["predictions"].to_torch_state_dict()
        outputs[str(reply.content["site"]["name"])] = (predictions["probs"].numpy(), predictions["masks"].numpy())
    pooled = tuple(np.concatenate([output[i] for output in outputs.values()]) for i in (0, 1))
    log(f"[federated] test results from sites: {', '.join(sorted(outputs))}")
    return {
        "pooled": classification_metrics(*pooled, task),
        "sites": {name: classification_metrics(probs, masks, task) for name, (probs, masks) in sorted(outputs.items())},
    }


def run_federated(grid: Grid, cfg: ExperimentConfig, num_clients: int, server_has_data: bool = True) -> dict:
    configure_threads(cfg.train.threads)
    run = FederatedRun(cfg, num_clients, server_has_data)
    fc = cfg.federated
    grid = PatientGrid(grid, fc.poll_interval, run.strategy.min_available_nodes, fc.round_timeout)
    remaining = fc.rounds - run.start_round
    arrays = ArrayRecord(torch_state_dict=run.initial_state)
    if remaining > 0:
        result = run.strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=remaining,
            timeout=fc.round_timeout,
            train_config=ConfigRecord({EXPERIMENT_KEY: experiment_record(cfg)}),
            evaluate_config=ConfigRecord({EXPERIMENT_KEY: experiment_record(cfg)}),
            evaluate_fn=run.evaluate_round,
        )
        arrays = result.arrays
    return run.finish(arrays, grid)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = experiment_from_context(context)
    run_federated(grid, cfg, cfg.federated.num_clients, server_has_data=cfg.data.data_root is not None)
