"""A finished simulation's models are calibrated: the temperature each run reports is in its checkpoint,
its test figures are at that temperature, and the report and evaluation say so."""

import json

import pytest

from fedbt.model.checkpoint import load_checkpoint


@pytest.mark.parametrize(("run", "checkpoint"), [("federated", "final.pt"), ("central", "final.pt")])
def test_each_run_stores_the_temperature_it_reports_and_its_ece_before_and_after(finished_run, run, checkpoint):
    metrics = json.loads((finished_run.out / run / "metrics.json").read_text())
    calibration = metrics["calibration"]
    assert load_checkpoint(finished_run.out / run / checkpoint)["temperature"] == calibration["temperature"]
    assert calibration["validation_images"] > 0
    assert calibration["validation_loss_after"] <= calibration["validation_loss_before"]
    pooled = metrics["test"]["pooled"]["calibration"]
    assert (calibration["test_ece_before"], calibration["test_ece_after"]) == (pooled["ece_untempered"], pooled["ece"])


def test_the_report_and_the_evaluation_show_the_calibration(finished_run):
    report = (finished_run.out / "report.html").read_text()
    central = json.loads((finished_run.out / "central" / "metrics.json").read_text())["calibration"]
    assert "pooled test ECE before" in report and f"{central['temperature']:.3g}" in report
    evaluation = json.loads((finished_run.evaluation / "evaluation.json").read_text())
    assert evaluation["model"]["temperature"] == central["temperature"]
