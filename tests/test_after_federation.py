"""What is computed from a finished run's final models: the per-image paired test (kept on this machine,
owner-only), the report's per-site table of local-only, global and personalised models, and the learning
curves on one axis of epochs of training done."""

import json
import stat

import pytest

from fedbt.cli import main
from fedbt.config import ExperimentConfig, TrainConfig
from fedbt.data.catalog import build_catalog
from fedbt.federated.simulation import paired_tests
from fedbt.model.checkpoint import save_checkpoint
from fedbt.reports.comparison import personalised_note, personalised_rows, tried_candidates
from fedbt.reports.plots import learning_curves
from fedbt.train.setup import new_model


def test_the_paired_test_counts_each_images_correctness_and_keeps_them_private(data_config, tmp_path):
    cfg = ExperimentConfig(data=data_config, train=TrainConfig(device="cpu"))
    for name, seed in (("federated", 1), ("central", 2)):  # two different untrained models
        seeded = ExperimentConfig(data=data_config, train=TrainConfig(seed=seed))
        save_checkpoint(tmp_path / name / "final.pt", new_model(seeded, 4), seeded, {}, name)
    catalog = build_catalog(data_config, progress=False)
    summary = paired_tests(cfg, catalog, tmp_path, tmp_path)["pooled"]
    per_image = json.loads((tmp_path / "paired.json").read_text())["pooled"]
    federated, central = per_image["federated"], per_image["central"]
    fine = int(catalog.masks[catalog.indices(split="test", pooled=True)].sum(dim=1).eq(1).sum())
    assert summary["n"] == len(federated) == len(central) == fine
    assert summary["federated_accuracy"] == pytest.approx(sum(federated) / fine)
    assert summary["a_right_b_wrong"] == sum(f and not c for f, c in zip(federated, central))
    assert summary["a_wrong_b_right"] == sum(c and not f for f, c in zip(federated, central))
    assert stat.S_IMODE((tmp_path / "paired.json").stat().st_mode) == 0o600


def test_curves_put_rounds_and_epochs_on_one_axis_of_epochs_of_training_done():
    scored = {"accuracy": 0.5, "loss": 1.0}
    results = {
        "federated": {"history": [{"round": r, "server": scored, "sites": {}} for r in (4, 48)]},
        "central": {"history": [{"epoch": e, "val": scored} for e in (1, 12)]},
    }
    curves = {c.label: c.epochs for c in learning_curves(results, epochs_per_round=0.25)}
    assert curves == {"federated global (pooled)": [1.0, 12.0], "central (pooled)": [1.0, 12.0]}


def site_scores(value: float) -> dict:
    return {"sites": {"br35h": {"set_accuracy": value}}}


def test_the_personalised_model_has_its_own_row_per_site_beside_local_only_and_global():
    candidates = {"global": {"val": {"set_accuracy": 0.9}}, "head": {"val": {"set_accuracy": 0.95}}}
    results = {
        "federated": {"test": site_scores(0.93)},
        "local": {"br35h": {"test": site_scores(0.96)}},
        "personalised": {"br35h": {"chosen": "head", "candidates": candidates, "test": {"set_accuracy": 0.97}}},
    }
    assert personalised_rows(results) == [["br35h", "96.0%", "93.0%", "97.0%", "head", "global 90.0%, head 95.0%"]]


def test_the_personalised_note_names_only_the_candidates_the_run_tried():
    # A small CNN has no BatchNorm to re-estimate, and a deployment's site has no local-only model.
    cnn_site = {"candidates": {"global": {}, "head": {}, "all": {}}}
    resnet_site = {"candidates": {"global": {}, "batchnorm": {}, "head": {}, "all": {}}}
    assert tried_candidates([cnn_site, resnet_site]) == ["head", "all", "batchnorm"]
    adapted = "its adaptations on the site's training split"
    older = personalised_note(["batchnorm", "head", "all"])
    assert f"whichever of the global model or {adapted} (batchnorm, head, all) scores" in older
    assert "own local-only" not in older
    current = personalised_note(["batchnorm", "local"])
    assert f"whichever of the global model, {adapted} (batchnorm) or the site's own local-only model scores" in current


@pytest.mark.e2e
def test_a_finished_run_is_personalised_from_its_folder_without_training_the_federation(finished_run, tmp_path):
    out = tmp_path / "completed"
    assert main(["personalise", "--run", str(finished_run.out), "--out", str(out)]) == 0
    results = json.loads((out / "comparison.json").read_text())["results"]
    assert set(results["personalised"]) == {"figshare", "sartaj", "br35h"}
    finished = json.loads((finished_run.out / "comparison.json").read_text())["results"]
    assert results["federated"] == finished["federated"]
    assert set(results["paired"]) >= {"pooled"}
    assert (out / "personalised" / "br35h" / "final.pt").is_file()
    assert "Each site's own model" in (out / "report.md").read_text()
