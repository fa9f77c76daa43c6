"""Runs are tracked in MLflow: read back through MLflow's own client, as its UI reads them."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from fedbt.config import TrackingConfig
from fedbt.tracking import tracked_run

SITES = ("figshare", "sartaj", "br35h")


def runs_by_name(client: MlflowClient, experiment: str) -> dict:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    return {run.info.run_name: run for run in client.search_runs([found.experiment_id])}


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    return {artifact.path for artifact in client.list_artifacts(run_id, folder)}


def test_a_two_round_simulation_is_read_back_with_its_settings_per_site_rounds_and_files(finished_run, tmp_path):
    client = MlflowClient(finished_run.store)
    runs = runs_by_name(client, "finished")
    assert set(runs) == {"simulate results", "federated results", "central results", "evaluate evaluation"}
    runs = {name.split()[0]: run for name, run in runs.items()}
    parent = runs["simulate"].info.run_id
    for name in ("federated", "central"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent
    assert {run.info.status for run in runs.values()} == {"FINISHED"}

    federated = runs["federated"]
    assert federated.data.params["federated.rounds"] == "2"
    assert federated.data.params["data.image_size"] == "32"
    recorded = json.loads((finished_run.out / "federated" / "metrics.json").read_text())["history"]
    for site in SITES:
        scores = client.get_metric_history(federated.info.run_id, f"val/{site}/set_accuracy")
        assert [(m.step, m.value) for m in scores] == [(h["round"], h["sites"][site]["set_accuracy"]) for h in recorded]
        losses = client.get_metric_history(federated.info.run_id, f"train/{site}/train_loss")
        assert [(m.step, m.value) for m in losses] == [(h["round"], h["train"][site]["train_loss"]) for h in recorded]
    pooled = client.get_metric_history(federated.info.run_id, "val/pooled/accuracy")
    assert [m.step for m in pooled] == [1, 2]
    assert [m.value for m in client.get_metric_history(federated.info.run_id, "sites/answered")] == [3, 3]
    assert {"test/pooled/accuracy", "wall_seconds"} <= set(federated.data.metrics)
    assert artifact_paths(client, federated.info.run_id) == {"final.pt", "metrics.json", "rounds"}
    assert artifact_paths(client, federated.info.run_id, "rounds") == {"rounds/round-001.json", "rounds/round-002.json"}

    central = runs["central"].info.run_id
    assert [m.step for m in client.get_metric_history(central, "val/loss")] == [1, 2]  # one per epoch
    assert artifact_paths(client, central) == {"final.pt", "curves.png", "metrics.json"}
    report_files = {"report.html", "report.md", "curves.png", "comparison.json", "experiment.json"}
    assert report_files <= artifact_paths(client, parent)
    report = client.download_artifacts(parent, "report.html", str(tmp_path))
    assert open(report).read() == (finished_run.out / "report.html").read_text()


def test_an_evaluation_is_a_run_with_its_scores_and_report(finished_run):
    client = MlflowClient(finished_run.store)
    evaluation = runs_by_name(client, "finished")["evaluate evaluation"]
    assert evaluation.data.params["request.checkpoint"] == str(finished_run.out / "central" / "final.pt")
    assert evaluation.data.params["trained.train.epochs"] == "2"
    assert {"test/accuracy", "test/macro_auc", "latency/ms_per_image_batch1"} <= set(evaluation.data.metrics)
    assert {"report.html", "evaluation.json", "roc.png"} <= artifact_paths(client, evaluation.info.run_id)


@pytest.mark.parametrize("switch", ["config", "environment"])
def test_tracking_switched_off_logs_nothing(tmp_path, monkeypatch, switch):
    store = tmp_path / "untouched" / "mlflow.db"
    settings = TrackingConfig(uri=f"sqlite:///{store}", enabled=switch != "config")
    if switch == "environment":
        monkeypatch.setenv("FEDBT_TRACKING", "off")
    with tracked_run(settings, "off", "central", {"train": {"epochs": 1}}) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
    assert tracker.run_id is None
    assert not store.parent.exists()


def test_the_runs_of_a_seed_study_are_children_of_one_run_named_after_it():
    study = TrackingConfig(parent="seed study")  # the store: MLFLOW_TRACKING_URI (conftest)
    ids = []
    for seed in (0, 1):
        with tracked_run(study, "seeds", "central", {"train": {"seed": seed}}) as tracker:
            ids.append(tracker.run_id)
    client = MlflowClient()
    runs = runs_by_name(client, "seeds")
    assert set(runs) == {"seed study", "central"}
    children = [client.get_run(run_id) for run_id in ids]
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {runs["seed study"].info.run_id}
    assert [run.data.params["train.seed"] for run in children] == ["0", "1"]


def test_a_run_whose_work_fails_ends_failed():
    with pytest.raises(RuntimeError), tracked_run(TrackingConfig(), "failing", "broken", {}) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
        raise RuntimeError("the work broke")
    run = MlflowClient().get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.metrics["loss"] == 1.0


def test_a_tracking_failure_ends_the_tracking_not_the_work():
    with tracked_run(TrackingConfig(), "refusing", "central", {"train": {"epochs": 1}}) as tracker:
        MlflowClient().delete_run(tracker.run_id)  # from here on the store refuses every log to this run
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_round({"round": 1, "train": {}, "dropped": {}, "sites": {}, "server": {}, "elapsed_seconds": 1.0})
    # The block ran to its end without an error from the tracker, which gave up on the run.
    assert tracker.client is None


def test_a_store_that_cannot_be_opened_is_one_line_naming_it():
    with pytest.raises(RuntimeError, match=r"^tracking store htp://typo:5000: .*unsupported URI") as failure:
        with tracked_run(TrackingConfig(uri="htp://typo:5000"), "typo", "central", {}):
            pass
    assert "\n" not in str(failure.value)
