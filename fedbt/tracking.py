"""Experiment tracking with MLflow: every run's settings, its metrics as they come and its
outputs, in one store whose UI compares runs side by side (docs/tracking.md).

Plain dicts and paths come in; nothing here knows models, data or Flower, so every layer
above can log. Runs go to `tracking.uri`, else `$MLFLOW_TRACKING_URI` (a tracking server),
else the embedded SQLite store results/mlflow.db: nothing to start. `tracking.enabled=false`
or `FEDBT_TRACKING=off` logs nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from fedbt.config import ExperimentConfig, TrackingConfig, to_dict
from fedbt.progress import headline, log

EMBEDDED_STORE = Path("results") / "mlflow.db"
OFF_ENV = "FEDBT_TRACKING"
# Marks the run that groups a seed study's or a sweep's runs (tracking.parent).
GROUP_TAG = "fedbt.group"
# MLflow accepts at most this many parameters in one request.
PARAMS_PER_BATCH = 100


def is_enabled(tc: TrackingConfig) -> bool:
    return tc.enabled and os.environ.get(OFF_ENV, "").lower() not in ("off", "0", "false")


def store_uri(tc: TrackingConfig) -> str:
    """Where runs go. The embedded store's path is absolute, so a process started elsewhere (a
    deployment's ServerApp) that is handed this URI writes to the same file."""
    return tc.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{EMBEDDED_STORE.resolve()}"


def artifact_root(uri: str) -> str | None:
    """An SQLite store keeps its runs' files in mlartifacts/ beside the database; a server chooses its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.001}} -> {'train.lr': 0.001}: a config as MLflow parameters."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat


def numbers(metrics: dict, prefix: str) -> dict[str, float]:
    """The plain numbers of a metrics dict as prefix/name (nested curves and matrices stay in the report)."""
    return {
        f"{prefix}/{key}": float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def epoch_metrics(entry: dict) -> dict[str, float]:
    """One epoch of central or local-only training: its training statistics and validation scores."""
    return {**numbers(entry["train"], "train"), **numbers(entry["val"], "val")}


def round_metrics(entry: dict) -> dict[str, float]:
    """One federated round as the server saw it: each site's training reply, the pooled validation
    score, how many sites answered or were dropped, the time so far."""
    metrics = {
        "sites/answered": len(entry["train"]),
        "sites/dropped": len(entry["dropped"]),
        "elapsed_seconds": entry["elapsed_seconds"],
        **numbers(entry["server"], "val/pooled"),
    }
    for site, reply in entry["train"].items():
        metrics.update(numbers(reply, f"train/{site}"))
    return metrics


def site_score_metrics(entry: dict) -> dict[str, float]:
    """Each site's validation score of a round's global model (they arrive with a later message)."""
    metrics = {}
    for site, scores in entry["sites"].items():
        metrics.update(numbers(headline(scores), f"val/{site}"))
    return metrics


def metrics_on_test(test: dict) -> dict[str, float]:
    """Test scores on the pooled test split and each site's ({'pooled': ..., 'sites': {...}})."""
    metrics = numbers(headline(test["pooled"]), "test/pooled")
    for site, scores in test["sites"].items():
        metrics.update(numbers(headline(scores), f"test/{site}"))
    return metrics


class Tracker:
    """One MLflow run. Without a client (tracking off) nothing is logged.

    A log that fails (a tracking server gone, a full disk) is reported once and ends the
    tracking of this run, never the run: a federation does not stop for its dashboard.
    """

    def __init__(self, client: Any = None, run_id: str | None = None):
        self.client, self.run_id = client, run_id

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> None:
        """client.method(run_id, *args, **kwargs), unless tracking is off or has failed."""
        if self.client is None:
            return
        from mlflow.exceptions import MlflowException

        try:
            getattr(self.client, method)(self.run_id, *args, **kwargs)
        except (MlflowException, OSError) as err:
            log(f"[tracking] could not log {what} ({err}); run {self.run_id} is not tracked further")
            self.client = None

    def log_params(self, params: dict) -> None:
        if self.client is None:
            return
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in flatten(params).items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self._call("the settings", "log_batch", params=items[start : start + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call(f"step {step}", "log_batch", metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_files(self, *paths: Path) -> None:
        """The files that exist, as the run's artifacts."""
        for path in paths:
            if path.is_file():
                self._call(path.name, "log_artifact", str(path))

    def log_epoch(self, entry: dict) -> None:
        self.log_metrics(epoch_metrics(entry), step=entry["epoch"])

    def log_round(self, entry: dict) -> None:
        self.log_metrics(round_metrics(entry), step=entry["round"])
        self._log_round_record(entry)

    def log_site_scores(self, entry: dict) -> None:
        """The sites' scores of a round's model, and the round's record again, now holding them."""
        self.log_metrics(site_score_metrics(entry), step=entry["round"])
        self._log_round_record(entry)

    def _log_round_record(self, entry: dict) -> None:
        """A round's whole record (which sites answered, why any was dropped, their scores) as a file."""
        self._call(f"round {entry['round']}", "log_dict", entry, f"rounds/round-{entry['round']:03d}.json")

    def log_result(self, result: dict, *files: Path) -> None:
        """A finished training run: its test scores, wall time and output files."""
        self.log_metrics({**metrics_on_test(result["test"]), "wall_seconds": result["wall_seconds"]})
        self.log_files(*files)

    def end(self, status: str) -> None:
        self._call("the end of the run", "set_terminated", status)


def client_for(uri: str) -> Any:
    # Imported here: mlflow takes seconds to import, and the sites' processes and runs with
    # tracking off never need it. No usage reports leave the machine.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    # MLflow's INFO lines (creating and upgrading its database tables) would interleave with the
    # run's progress; its warnings and errors still show.
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri)


def experiment_id(client: Any, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name, artifact_location=artifact_root(uri))


def group_run_id(client: Any, experiment: str, name: str) -> str:
    """The run named `name` that groups others (a seed study): the existing one, else a new one."""
    found = client.search_runs([experiment], f"tags.`{GROUP_TAG}` = '{name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=name, tags={GROUP_TAG: name})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def start_run(tc: TrackingConfig, experiment: str, name: str) -> Tracker:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
    from sqlalchemy.exc import SQLAlchemyError

    uri = store_uri(tc)
    try:
        client = client_for(uri)
        experiment_key = experiment_id(client, experiment, uri)
        parent = tc.parent_run_id or (group_run_id(client, experiment_key, tc.parent) if tc.parent else None)
        run = client.create_run(experiment_key, run_name=name, tags={MLFLOW_PARENT_RUN_ID: parent} if parent else {})
    except (MlflowException, SQLAlchemyError) as err:  # the REST and the database stores' errors
        problem = str(err).strip().splitlines()[0]
        raise RuntimeError(f"tracking store {uri}: {problem} (tracking.enabled=false runs untracked)") from None
    log(f"[tracking] run '{name}' {run.info.run_id} in {uri}")
    return Tracker(client, run.info.run_id)


@contextmanager
def tracked_run(tc: TrackingConfig, experiment: str, name: str, params: dict) -> Iterator[Tracker]:
    """A run in the MLflow experiment `experiment` with `params` (the resolved settings) logged;
    it ends FINISHED, or FAILED when the body raises. Tracking off: a Tracker that logs nothing."""
    if not is_enabled(tc):
        yield Tracker()
        return
    tracker = start_run(tc, experiment, name)
    tracker.log_params(params)
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def experiment_run(cfg: ExperimentConfig, kind: str) -> AbstractContextManager[Tracker]:
    """A run of the experiment cfg.name, with the whole resolved configuration as its parameters,
    named by its kind and results folder ("central central-cpu"), as runs are told apart in the UI."""
    return tracked_run(cfg.tracking, cfg.name, f"{kind} {Path(cfg.output_dir).name}", to_dict(cfg))
