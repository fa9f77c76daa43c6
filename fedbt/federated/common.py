"""What both Flower apps share: reading the experiment config from a run's context."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context, Message

from fedbt.config import PROJECT_ROOT, ExperimentConfig, from_dict, load_config, to_dict
from fedbt.data.sites import SitePolicy, load_site
from fedbt.data.synthetic import ensure_demo_data
from fedbt.federated.policy import SiteSetup, settable_part, site_experiment

# run_simulation.py names the fully resolved experiment file here for its ServerApp.
EXPERIMENT_ENV = "FEDBT_EXPERIMENT"
# The server sends the experiment inside every message's config, so clients need no
# shared file or environment: Ray workers on another machine or a hospital's SuperNode
# learn the run's settings from the server.
EXPERIMENT_KEY = "fedbt-experiment"
# The round a message belongs to (the client continues its LR curve and seeds from it).
ROUND_KEY = "server-round"
# Which split an evaluate message asks for: "val" every round, "test" once at the end of a deployment.
SPLIT_KEY = "split"
# A training message that asks the site to score the model it brings on its validation split
# before training on it: round r's global model is scored on round r+1's message, so the model
# crosses the wire once per round, not twice (docs/performance.md).
SCORE_FIRST_KEY = "score-first"
# The temperature a test scoring divides the logits by (fedbt.eval.calibration); 1 when not sent.
TEMPERATURE_KEY = "temperature"
# A validation reply's losses at every temperature of the calibration grid, beside its metrics.
TEMPERATURE_LOSSES_KEY = "temperature-losses"
# SCAFFOLD: the server's control variate c, beside the model in a training message, and a site's
# change of its own c_i, beside its model in the reply (both at the transport precision).
CONTROL_KEY, CONTROL_DELTA_KEY = "control", "control-delta"
# A SuperNode's node config names its own site file, data root and decode cache (`fedbt site`).
NODE_SITE, NODE_DATA_ROOT, NODE_CACHE_DIR = "site", "data-root", "cache-dir"


def experiment_from_context(context: Context) -> ExperimentConfig:
    """The experiment of this run: a resolved JSON file, or the run config (`flwr run`).

    Under `flwr run` the keys of [tool.flwr.app.config] apply: `config` (a YAML profile),
    `overrides` ("train.epochs=2; federated.rounds=3"), `data-root` (empty: demo data) and
    `out`; a SuperNode's node config may name its own `data-root`. `deployment = true`
    (set by `fedbt run`) means the server holds no data: the sites evaluate the final model.
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


def experiment_record(cfg: ExperimentConfig, settable_only: bool) -> str:
    """The experiment as the server sends it. Sites that hold their own data (a deployment) get
    the settings a server may set alone: where their data is and how it is split is theirs."""
    return json.dumps(settable_part(cfg) if settable_only else to_dict(cfg))


def site_setup(context: Context) -> SiteSetup | None:
    """What `fedbt site` started this node with; None for a simulated site, which has no files of its own."""
    node = context.node_config
    if not node.get(NODE_SITE):
        return None
    data_root = str(node[NODE_DATA_ROOT]) if node.get(NODE_DATA_ROOT) else None
    cache_dir = str(node[NODE_CACHE_DIR]) if node.get(NODE_CACHE_DIR) else None
    site_file = str(node[NODE_SITE])
    return SiteSetup(site_file, load_site(site_file, data_root), data_root, cache_dir)


def client_experiment(msg: Message, context: Context) -> tuple[ExperimentConfig, SitePolicy]:
    """The experiment a site runs and the policy it runs under. A simulated site takes the server's
    experiment as it is (one experimenter runs both) under the default policy; a hospital's node
    checks it against its own policy (PolicyRefusal when it asks for more than that allows)."""
    sent = json.loads(str(msg.content["config"][EXPERIMENT_KEY]))
    setup = site_setup(context)
    if setup is None:
        return from_dict(sent), SitePolicy()
    return site_experiment(sent, setup), setup.policy
