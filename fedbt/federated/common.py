"""What both Flower apps share: reading the experiment config from a run's context."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context, Message

from fedbt.config import PROJECT_ROOT, ExperimentConfig, from_dict, load_config, to_dict
from fedbt.synthetic import ensure_demo_data

# run_simulation.py names the fully resolved experiment file here for its ServerApp.
EXPERIMENT_ENV = "FEDBT_EXPERIMENT"
# The server sends the experiment inside every message's config, so clients need no
# shared file or environment: Ray workers on another machine or a hospital's SuperNode
# learn the run's settings from the server.
EXPERIMENT_KEY = "fedbt-experiment"


def experiment_from_context(context: Context) -> ExperimentConfig:
    """The experiment of this run: a resolved JSON file, or the run config (`flwr run`).

    Under `flwr run` the keys of [tool.flwr.app.config] apply: `config` (a YAML profile),
    `overrides` ("train.epochs=2; federated.rounds=3"), `data-root` (empty: demo data) and
    `out`; a SuperNode's node config may name its own `data-root`.
    """
    run_config = context.run_config
    path = os.environ.get(EXPERIMENT_ENV) or str(run_config.get("experiment-file", ""))
    if path:
        return from_dict(json.loads(Path(path).read_text()))
    overrides = [s.strip() for s in str(run_config.get("overrides", "")).split(";") if s.strip()]
    cfg = load_config([str(run_config.get("config", "configs/demo.yaml"))], overrides)
    data_root = context.node_config.get("data-root") or run_config.get("data-root")
    cfg.data.data_root = str(data_root) if data_root else str(ensure_demo_data(PROJECT_ROOT / "demo-data"))
    cfg.output_dir = str(PROJECT_ROOT / str(run_config.get("out", "results/flwr-run")))
    return cfg


def experiment_record(cfg: ExperimentConfig) -> str:
    return json.dumps(to_dict(cfg))


def client_experiment(msg: Message, context: Context) -> ExperimentConfig:
    """The experiment the server sent, with this node's own data root where it names one."""
    cfg = from_dict(json.loads(str(msg.content["config"][EXPERIMENT_KEY])))
    if context.node_config.get("data-root"):
        cfg.data.data_root = str(context.node_config["data-root"])
    return cfg
