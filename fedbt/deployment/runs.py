"""`fedbt run`: submit the federated experiment to a running server, follow it, report it.

`flwr run --stream` exits 0 even when the run failed, so the outcome is read from the
run's status on the server, and a failed run exits non-zero with the server's reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedbt.config import PROJECT_ROOT, ExperimentConfig, load_config
from fedbt.data.labels import get_task
from fedbt.deployment.control import FlowerControl
from fedbt.deployment.processes import DeploymentError
from fedbt.tracking import experiment_run, is_enabled, store_uri

COMPLETED = "finished:completed"


@dataclass
class RunRequest:
    server: str  # HOST:PORT of the SuperLink
    ca_cert: Path
    out: Path  # where the ServerApp writes, on the server machine
    config: str = "configs/demo.yaml"  # a profile inside the app (configs/...)
    overrides: list[str] = field(default_factory=list)
    resume: bool = False

    def all_overrides(self) -> list[str]:
        return [*self.overrides, *(["federated.resume=true"] if self.resume else [])]

    def experiment(self) -> ExperimentConfig:
        """The experiment the ServerApp will build from the same profile and overrides."""
        cfg = load_config([self.config], self.all_overrides())
        cfg.output_dir = str(self.out)
        return cfg


def server_tracking(cfg: ExperimentConfig) -> list[str]:
    """The ServerApp runs in the server's own process, which knows neither this command's environment
    nor its working folder: it is told to track where this machine would (run on the server machine,
    that is its store), or not at all."""
    if not is_enabled(cfg.tracking):
        return ["tracking.enabled=false"]
    return [f"tracking.uri={store_uri(cfg.tracking)}"]


def run_config_arg(request: RunRequest) -> str:
    """`--run-config` for flwr: TOML values, the overrides joined as the ServerApp splits them."""
    overrides = [*request.all_overrides(), *server_tracking(request.experiment())]
    for text in overrides:
        if ";" in text or '"' in text:
            raise ValueError(f"override {text!r}: ';' and '\"' cannot travel in the run config")
    values = {
        "config": request.config,
        "overrides": "; ".join(overrides),
        "out": str(request.out),
        "deployment": True,
    }
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


@dataclass
class RunOutcome:
    run_id: int
    status: str
    details: str
    wall_seconds: float
    metrics: dict | None  # federated/metrics.json when the results folder is readable here


def submit_and_follow(request: RunRequest, control: FlowerControl | None = None) -> RunOutcome:
    request.experiment()  # a bad profile or override fails here, before anything reaches the server
    control = control or FlowerControl(request.server, request.ca_cert)
    started = time.perf_counter()
    run_id = control.submit(PROJECT_ROOT, run_config_arg(request))
    print(f"fedbt: run {run_id} submitted to {request.server}; following its log", flush=True)
    try:
        control.stream_logs(run_id)
    except KeyboardInterrupt:
        control.stop(run_id)
        raise DeploymentError(f"run {run_id} stopped on request") from None
    status, details = control.run_status(run_id)
    metrics_file = request.out / "federated" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if status == COMPLETED and metrics_file.is_file() else None
    return RunOutcome(run_id, status, details, time.perf_counter() - started, metrics)


def report(request: RunRequest, outcome: RunOutcome) -> Path | None:
    """The simulation's report (federated rows and each site's personalised model: no pooled data exists
    for baselines)."""
    from fedbt.reports.comparison import write_report

    if outcome.metrics is None:
        return None
    cfg = request.experiment()
    results = {"federated": outcome.metrics, "wall_seconds_total": outcome.wall_seconds}
    if "personalised" in outcome.metrics:  # each site's own model, personalised and scored at the site
        results["personalised"] = outcome.metrics["personalised"]
    return write_report(results, cfg, list(get_task(cfg.data.task).classes), request.out)


def run_deployment(request: RunRequest) -> RunOutcome:
    """Submit, follow, check, report; a DeploymentError when the run did not complete.

    Tracked as a run that holds the ServerApp's federated run (logged round by round on the
    server as the sites' replies arrive) and the report.
    """
    cfg = request.experiment()
    with experiment_run(cfg, "deployment") as tracker:
        if tracker.run_id:
            request.overrides.append(f"tracking.parent_run_id={tracker.run_id}")
        outcome = submit_and_follow(request)
        if outcome.status != COMPLETED:
            reason = outcome.details or "no reason given; see the log above"
            raise DeploymentError(f"run {outcome.run_id} ended as {outcome.status}: {reason}")
        path = report(request, outcome)
        tracker.log_metrics({"wall_seconds": outcome.wall_seconds})
        if path:
            tracker.log_files(*sorted(path.parent.iterdir()))
    where = f"report: {path}" if path else f"results are on the server in {request.out}"
    print(f"fedbt: run {outcome.run_id} completed in {outcome.wall_seconds:.0f} s; {where}", flush=True)
    return outcome
