"""Evaluation metrics on hand-computed cases, and `fedbt evaluate` end to end on generated data."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbt.cli import main
from fedbt.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.labels import get_task
from fedbt.eval.calibration import confidence_bins, reliability
from fedbt.eval.clinical import (
    bootstrap_ci,
    clinical_metrics,
    mcnemar,
    precision_recall,
    roc_on_grid,
    specificity,
)
from fedbt.model.architectures import build_model
from fedbt.model.checkpoint import config_from_checkpoint, load_checkpoint, save_checkpoint
from fedbt.train.central import TrainData, train_model


def test_specificity_from_a_confusion_matrix():
    confusion = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])  # rows true, columns predicted
    # Negatives of class 0: rows 1-2, 10 images, 2 predicted 0 -> 8/10. Class 1: rows 0 and 2,
    # 10 images, 1 predicted 1 -> 9/10. Class 2: rows 0-1, 12 images, 1 predicted 2 -> 11/12.
    assert specificity(confusion) == pytest.approx([8 / 10, 9 / 10, 11 / 12])
    assert np.isnan(specificity(np.array([[3, 1], [0, 0]]))[0])  # class 0 has no negatives


def calibration(probs: np.ndarray, y_true: np.ndarray) -> dict:
    bins = confidence_bins(probs, np.eye(probs.shape[1], dtype=bool)[y_true])
    return reliability(bins, bins)


def test_expected_calibration_error_by_hand():
    # Confidences 0.95 (right), 0.95 (wrong), 0.6 (right), 0.55 (right):
    # bin (0.9, 1]: acc 0.5 vs conf 0.95; bin (0.5, 0.6]: acc 1 vs conf 0.575.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.4, 0.6], [0.55, 0.45]])
    y_true = np.array([0, 1, 1, 0])
    result = calibration(probs, y_true)
    assert result["ece"] == pytest.approx(2 / 4 * 0.45 + 2 / 4 * 0.425)
    assert [b["count"] for b in result["bins"]] == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert result["bins"][5]["confidence"] == pytest.approx(0.575)
    assert calibration(np.array([[1.0, 0.0], [0.3, 0.7]]), np.array([0, 1]))["ece"] == pytest.approx(0.15)


def test_mcnemar_exact_binomial_by_hand():
    # 1 image only A gets right, 6 only B: p = 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * 8/128.
    a = np.array([True] * 10 + [True] + [False] * 6 + [False] * 3)
    b = np.array([True] * 10 + [False] + [True] * 6 + [False] * 3)
    result = mcnemar(a, b)
    assert (result["a_right_b_wrong"], result["a_wrong_b_right"], result["n"]) == (1, 6, 20)
    assert result["p_value"] == pytest.approx(0.125)
    assert mcnemar(b, a)["p_value"] == pytest.approx(0.125)
    assert mcnemar(a, a)["p_value"] == 1.0
    # Same as scipy's exact binomial test (scipy comes with scikit-learn).
    from scipy.stats import binomtest

    c = np.arange(200) % 7 == 0
    d = np.arange(200) % 3 == 0
    discordant = ((c & ~d).sum(), (~c & d).sum())
    expected = binomtest(int(min(discordant)), int(sum(discordant)), 0.5).pvalue
    assert mcnemar(c, d)["p_value"] == pytest.approx(expected)


def test_average_precision_and_interpolated_pr_curve_by_hand():
    labels = np.array([True, False, True, False])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    curve, ap = precision_recall(labels, scores)
    # Ranked: hit (P 1, R 0.5), miss, hit (P 2/3, R 1): AP = 0.5 * 1 + 0.5 * 2/3.
    assert ap == pytest.approx(0.5 + 1 / 3)
    grid = np.array(curve["recall"])
    precision = np.array(curve["precision"])
    assert precision[grid <= 0.5] == pytest.approx(1.0)
    assert precision[grid > 0.5] == pytest.approx(2 / 3, abs=1e-4)
    assert precision_recall(np.zeros(3, bool), scores[:3]) is None
    assert roc_on_grid(np.ones(3, bool), scores[:3]) is None
    assert roc_on_grid(labels, scores)["tpr"][-1] == 1.0


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.8

    def accuracy(idx):
        return {"accuracy": float(correct[idx].mean()), "undefined": None}

    first = bootstrap_ci(accuracy, len(correct), resamples=300, seed=1)
    assert first["accuracy"]["low"] < correct.mean() < first["accuracy"]["high"]
    # Binomial standard error sqrt(0.8 * 0.2 / 200) = 0.028: a 95% interval about 0.11 wide.
    assert 0.07 < first["accuracy"]["high"] - first["accuracy"]["low"] < 0.16
    assert first["undefined"] is None
    assert bootstrap_ci(accuracy, len(correct), resamples=300, seed=1) == first
    assert bootstrap_ci(accuracy, len(correct), resamples=300, seed=2) != first


def test_clinical_metrics_on_a_known_confusion_matrix():
    task = get_task("4class")  # glioma, meningioma, no_tumor, pituitary
    truth = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    called = [0, 0, 2, 1, 0, 2, 2, 3, 2, 3, 3, 2]
    probs = np.full((14, 4), 0.1)
    probs[np.arange(12), called] = 0.7
    probs[12:, 2] = 0.7  # two coarse 'tumour' images called no_tumor: not scored per class
    masks = np.zeros((14, 4), dtype=bool)
    masks[np.arange(12), truth] = True
    masks[12:] = [True, True, False, True]
    m = clinical_metrics(probs, masks, task, resamples=50, seed=0)
    assert (m["n"], m["n_fine"]) == (14, 12)
    assert m["confusion_matrix"] == [[2, 0, 1, 0], [1, 1, 0, 0], [0, 0, 3, 1], [0, 0, 1, 2]]
    # no_tumor: 8 images of other classes, 2 of them called no_tumor (its one miss does not count).
    assert m["per_class"]["no_tumor"]["specificity"] == pytest.approx(6 / 8)
    # glioma 8/9 (one meningioma called glioma), meningioma 10/10, pituitary 8/9.
    assert m["macro_specificity"] == pytest.approx(np.mean([8 / 9, 1, 6 / 8, 8 / 9]))
    assert m["confusion_matrix_normalized"][2] == [0, 0, 0.75, 0.25]
    # no_tumor's score is 0.7 for the 5 images called no_tumor (3 of them are), 0.1 for the other 7 (1 is):
    # AP = recall 3/4 at precision 3/5, then the last 1/4 at precision 4/12.
    assert m["per_class"]["no_tumor"]["average_precision"] == pytest.approx(3 / 4 * 3 / 5 + 1 / 4 * 4 / 12)
    # Every confidence 0.7; right: 8 of the 12 fine images (the two coarse ones are not counted).
    assert m["calibration"]["ece"] == pytest.approx(0.7 - 8 / 12)
    for name in ("accuracy", "macro_f1", "macro_auc"):
        interval = m["confidence_intervals"][name]
        assert interval["low"] <= m[name] <= interval["high"], name
    assert set(m["roc_curves"]) == set(m["pr_curves"]) == set(task.classes)


# --- `fedbt evaluate` end to end ---------------------------------------------------------


@dataclass
class Trained:
    checkpoint: Path
    other: Path  # an untrained model of the same kind, for the comparison
    data_root: Path
    cache_dir: str


@pytest.fixture(scope="module")
def trained(demo_root, site_files, tmp_path_factory) -> Trained:
    """A small CNN trained on the generated data at 32 px until it separates the classes (4 epochs
    at the default rate leave a constant predictor)."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("evaluate")
    data = DataConfig(data_root=str(demo_root), sites=site_files, image_size=32, cache_dir=str(work / "cache"))
    cfg = ExperimentConfig(data=data, model=ModelConfig(name="cnn"))
    cfg.train = TrainConfig(epochs=10, lr=3e-3, batch_size=16, threads=1, log_every=0)
    catalog = build_catalog(cfg.data, progress=False)
    splits = TrainData(catalog.dataset(split="train", pooled=True), catalog.dataset(split="val", pooled=True))
    train_model(cfg, splits, work / "run", "test")
    torch.manual_seed(1)
    other = save_checkpoint(work / "untrained.pt", build_model(cfg.model, 4, 32), cfg, {}, "central")
    return Trained(work / "run" / "final.pt", other, demo_root, data.cache_dir)


@pytest.fixture()
def eval_env(trained, monkeypatch) -> Trained:
    """The evaluation decodes into FEDBT_CACHE: the shared test cache, never ~/.cache."""
    monkeypatch.setenv("FEDBT_CACHE", trained.cache_dir)
    return trained


def test_evaluate_pooled_with_comparison_writes_json_plots_and_report(eval_env, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(eval_env.checkpoint),
            "--compare",
            str(eval_env.other),
            "--data-root",
            str(eval_env.data_root),
            "--out",
            str(out),
            "--bootstrap",
            "50",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "evaluation.json").read_text())
    m = result["metrics"]
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_precision",
        "macro_recall",
        "macro_specificity",
        "macro_f1",
        "macro_auc",
        "macro_average_precision",
        "confusion_matrix",
        "confusion_matrix_normalized",
        "roc_curves",
        "pr_curves",
        "calibration",
        "confidence_intervals",
        "tumour_vs_none",
        "per_class",
    ):
        assert key in m, key
    assert {"precision", "recall", "specificity", "f1", "auc", "average_precision"} <= set(m["per_class"]["glioma"])
    assert m["confidence_intervals"]["resamples"] == 50
    assert result["data"]["description"] == "pooled test split" and result["data"]["n"] == m["n"] > 0
    assert result["latency"]["ms_per_image_batch1"] > 0 and result["latency"]["images_per_second_batched"] > 0
    # The trained model beats always answering the commonest class of the same images.
    supports = [m["per_class"][name]["support"] for name in m["classes"]]
    assert m["accuracy"] > max(supports) / m["n_fine"]
    # McNemar's discordant counts, taken image by image, explain the accuracy gap to the untrained model.
    mc = result["comparison"]["mcnemar"]
    gap = m["accuracy"] - result["comparison"]["metrics"]["accuracy"]
    assert mc["n"] == m["n_fine"] and (mc["a_right_b_wrong"] - mc["a_wrong_b_right"]) / mc["n"] == pytest.approx(gap)
    assert gap > 0
    for name in ("roc.png", "pr.png", "reliability.png", "confusion.png", "samples.png", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "McNemar" in report and "ms per image" in report and "![ROC curves](roc.png)" in report
    assert "<table>" in (out / "report.html").read_text()


def test_evaluate_a_site_and_a_folder_of_class_folders(eval_env, tmp_path, capsys):
    site_out, folder_out = tmp_path / "site", tmp_path / "folder"
    common = ["--checkpoint", str(eval_env.checkpoint), "--bootstrap", "20", "--device", "cpu"]
    assert (
        main(["evaluate", *common, "--site", "sartaj", "--data-root", str(eval_env.data_root), "--out", str(site_out)])
        == 0
    )
    assert json.loads((site_out / "evaluation.json").read_text())["data"]["description"] == "site sartaj test split"

    folder = eval_env.data_root / "sartaj" / "Testing"  # glioma_tumor/, meningioma_tumor/, no_tumor/, ...
    assert main(["evaluate", *common, "--folder", str(folder), "--out", str(folder_out)]) == 0
    result = json.loads((folder_out / "evaluation.json").read_text())
    expected = sum(1 for f in folder.rglob("*.jpg"))
    assert result["data"]["n"] == result["metrics"]["n_fine"] == expected
    assert result["metrics"]["per_class"]["pituitary"]["support"] == len(list((folder / "pituitary_tumor").glob("*")))


def test_a_checkpoint_of_another_version_or_task_is_a_clear_error(eval_env, tmp_path, capsys):
    payload = torch.load(eval_env.checkpoint, weights_only=True)
    payload["version"] = 2
    torch.save(payload, tmp_path / "future.pt")
    args = ["--data-root", str(eval_env.data_root), "--out", str(tmp_path / "out")]
    assert main(["evaluate", "--checkpoint", str(tmp_path / "future.pt"), *args]) == 2
    assert "fedbt: error:" in capsys.readouterr().err

    cfg = config_from_checkpoint(load_checkpoint(eval_env.checkpoint))
    cfg.data.task = "binary"
    save_checkpoint(tmp_path / "binary.pt", build_model(cfg.model, 2, cfg.data.image_size), cfg, {}, "central")
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(eval_env.checkpoint),
                "--compare",
                str(tmp_path / "binary.pt"),
                "--bootstrap",
                "0",
                *args,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "fedbt: error:" in err and "is for task 'binary'" in err and "Traceback" not in err
    assert main(["predict", str(tmp_path), "--checkpoint", str(tmp_path / "future.pt")]) == 2
    assert "version 2" in capsys.readouterr().err
