"""Test scoring from aggregates: the pooled metrics of the sites' counts and histograms equal the per-image ones."""

import numpy as np
import pytest

from fedbt.data.labels import get_task
from fedbt.eval.aggregates import ScoreAggregates, aggregate_metrics, aggregate_scores
from fedbt.eval.metrics import classification_metrics

TASK = get_task("4class")
EXACT = ("n", "loss", "set_accuracy", "n_fine", "accuracy", "balanced_accuracy", "macro_f1")


def scored_images(rng: np.random.Generator, n: int, spread: float, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """Float32 softmax outputs of a model `signal` sure of the truth, and masks with some coarse (tumour) labels."""
    y = rng.integers(0, TASK.num_classes, n)
    logits = rng.normal(0, spread, (n, TASK.num_classes))
    logits[np.arange(n), y] += signal
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)
    masks = np.eye(TASK.num_classes, dtype=bool)[y]
    coarse = (rng.random(n) < 0.2) & (y != TASK.classes.index("no_tumor"))
    masks[coarse] = [c != "no_tumor" for c in TASK.classes]
    return probs, masks


def aucs(metrics: dict) -> np.ndarray:
    per_class = [metrics["per_class"][c]["auc"] for c in TASK.classes]
    return np.array([*per_class, metrics["macro_auc"], metrics["tumour_vs_none"]["auc"]])


@pytest.mark.parametrize(("spread", "signal"), [(1.0, 1.0), (3.0, 4.0), (6.0, 8.0)])
def test_pooled_metrics_from_three_sites_aggregates_equal_the_per_image_ones(spread, signal):
    rng = np.random.default_rng(0)
    sites = [scored_images(rng, n, spread, signal) for n in (900, 400, 1300)]
    pooled = [np.concatenate(parts) for parts in zip(*sites)]
    exact = classification_metrics(*pooled, TASK)
    aggregates = [aggregate_scores(probs, masks, TASK) for probs, masks in sites]
    from_aggregates = aggregate_metrics(sum(aggregates[1:], aggregates[0]), TASK)
    assert np.abs(aucs(from_aggregates) - aucs(exact)).max() < 0.001
    for key in EXACT:
        assert from_aggregates[key] == pytest.approx(exact[key]), key
    assert from_aggregates["confusion_matrix"] == exact["confusion_matrix"]
    assert from_aggregates["tumour_vs_none"]["confusion_matrix"] == exact["tumour_vs_none"]["confusion_matrix"]
    curve, exact_curve = from_aggregates["tumour_vs_none"]["roc_curve"], exact["tumour_vs_none"]["roc_curve"]
    assert np.abs(np.array(curve["tpr"]) - exact_curve["tpr"]).mean() < 0.005


def test_a_sites_aggregates_are_checked_before_they_are_pooled():
    probs, masks = scored_images(np.random.default_rng(1), 50, 1.0, 2.0)
    arrays = aggregate_scores(probs, masks, TASK).arrays()
    assert ScoreAggregates.from_arrays(arrays, TASK.num_classes).n == 50
    with pytest.raises(ValueError, match="shape"):
        ScoreAggregates.from_arrays({**arrays, "confusion": arrays["confusion"][:2]}, TASK.num_classes)
    with pytest.raises(ValueError, match="not a count"):
        ScoreAggregates.from_arrays({**arrays, "tumour_scores": -arrays["tumour_scores"]}, TASK.num_classes)
    with pytest.raises(ValueError, match="disagree"):
        ScoreAggregates.from_arrays({**arrays, "n": np.array(51)}, TASK.num_classes)
