"""Flower ServerApp: Flower's Grid as the federated core's Transport (the round is fedbt.fl.server)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbt.config import PROJECT_ROOT, ExperimentConfig, from_dict, load_config
from fedbt.data.synthetic import ensure_demo_data
from fedbt.federated.packing import packed, reply_of, request_message, unpacked_reply
from fedbt.fl.protocol import NODE_DATA_ROOT, Reply, Request
from fedbt.fl.server import run_federated

# run_simulation.py names the fully resolved experiment file here for its ServerApp.
EXPERIMENT_ENV = "FEDBT_EXPERIMENT"
app = ServerApp()


class GridTransport:
    """The run's Grid: requests sent as packed Messages, replies read back from them (fedbt.federated.packing)."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def send(self, requests: list[Request]) -> list[str]:
        return list(self.grid.push_messages([packed(request_message(r)) for r in requests]))

    def receive(self, pending: set[str]) -> list[tuple[str, Reply]]:
        messages = self.grid.pull_messages(pending)
        return [(m.metadata.reply_to_message_id, reply_of(unpacked_reply(m))) for m in messages]


def experiment_from_context(context: Context) -> ExperimentConfig:
    """The experiment of this run: a resolved JSON file, or the run config (`flwr run`).

    Under `flwr run` the keys of [tool.flwr.app.config] apply: `config` (a YAML profile),
    `overrides` ("train.epochs=2; federated.rounds=3"), `data-root` (empty: demo data) and
    `out`. `deployment = true` (set by `fedbt run`) means the server holds no data: the sites
    evaluate the final model.
    """
    run_config = context.run_config
    path = os.environ.get(EXPERIMENT_ENV) or str(run_config.get("experiment-file", ""))
    if path:
        return from_dict(json.loads(Path(path).read_text()))
    overrides = [s.strip() for s in str(run_config.get("overrides", "")).split(";") if s.strip()]
    cfg = load_config([str(run_config.get("config", "configs/demo.yaml"))], overrides)
    data_root = context.node_config.get(NODE_DATA_ROOT) or run_config.get("data-root")
    if run_config.get("deployment"):
        cfg.data.data_root = None
    else:
        cfg.data.data_root = str(data_root) if data_root else str(ensure_demo_data(PROJECT_ROOT / "demo-data"))
    cfg.output_dir = str(PROJECT_ROOT / str(run_config.get("out", "results/flwr-run")))  # an absolute out wins
    return cfg


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = experiment_from_context(context)
    run_federated(GridTransport(grid), cfg, server_has_data=cfg.data.data_root is not None)
