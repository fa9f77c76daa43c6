"""What both Flower apps share: reading the experiment config from a run's context."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context

from fedbt.config import ExperimentConfig, from_dict, load_config

# run_simulation.py writes the fully resolved experiment here for every process of the run.
EXPERIMENT_ENV = "FEDBT_EXPERIMENT"


def experiment_from_context(context: Context) -> ExperimentConfig:
    """The experiment of this run: a resolved JSON file, or the run config (`flwr run`)."""
    run_config = context.run_config
    path = os.environ.get(EXPERIMENT_ENV) or str(run_config.get("experiment-file", ""))
    if path:
        return from_dict(json.loads(Path(path).read_text()))
    overrides = [s.strip() for s in str(run_config.get("overrides", "")).split(";") if s.strip()]
    cfg = load_config([str(run_config.get("config", "configs/demo.yaml"))], overrides)
    data_root = context.node_config.get("data-root") or run_config.get("data-root")
    if data_root:
        cfg.data.data_root = str(data_root)
    return cfg
