"""Clinical-grade metrics beyond fedbt.eval.metrics: specificity, precision-recall curves and
average precision, one-vs-rest ROC curves, percentile-bootstrap confidence intervals, and
McNemar's test against a second model on the same images. (Calibration, the expected
calibration error and the reliability diagram's bins, is in every evaluation's metrics.)

Class-level metrics use the images with a fine label, as in fedbt.eval.metrics: a Br35H
'tumour of unknown type' cannot say whether a glioma prediction was right.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

from fedbt.data.labels import Task
from fedbt.eval.metrics import ROC_POINTS, classification_metrics, fine_label_metrics, roc_on_grid

CONFIDENCE_LEVEL = 0.95


CI_METRICS = ("accuracy", "macro_f1", "macro_auc")


def specificity(confusion: np.ndarray) -> np.ndarray:
    """Per class TN / (TN + FP) from a confusion matrix (rows true, columns predicted); NaN if no negatives."""
    confusion = np.asarray(confusion, dtype=float)
    total, true, predicted, hits = confusion.sum(), confusion.sum(1), confusion.sum(0), np.diag(confusion)
    negatives = total - true
    true_negatives = negatives - (predicted - hits)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(negatives > 0, true_negatives / negatives, np.nan)


def row_normalised(confusion: np.ndarray) -> list[list[float]]:
    """Each true class's row as fractions (rows of absent classes stay 0)."""
    confusion = np.asarray(confusion, dtype=float)
    return (confusion / np.clip(confusion.sum(axis=1, keepdims=True), 1, None)).round(4).tolist()


def precision_recall(is_positive: np.ndarray, scores: np.ndarray) -> tuple[dict, float] | None:
    """Interpolated PR curve on a fixed recall grid and the average precision; None without positives.

    The curve stores, per recall level r, the best precision reached at recall >= r (the
    usual interpolation, monotone and small in JSON); AP is scikit-learn's step-wise sum,
    not the area under the interpolated curve.
    """
    if not is_positive.any():
        return None
    precision, recall, _ = precision_recall_curve(is_positive.astype(int), scores)
    grid = np.linspace(0, 1, ROC_POINTS)
    # Recall falls along the arrays, so a running maximum is the best precision at recall >= recall[i].
    best = np.maximum.accumulate(precision)
    reached = (recall[None, :] >= grid[:, None]).sum(axis=1)  # points with recall >= r; >= 1 as recall[0] = 1
    at_grid = best[reached - 1]
    curve = {"recall": grid.tolist(), "precision": at_grid.round(4).tolist()}
    return curve, float(average_precision_score(is_positive.astype(int), scores))


def bootstrap_ci(
    statistic: Callable[[np.ndarray], dict[str, float | None]],
    n: int,
    resamples: int = 1000,
    seed: int = 0,
    level: float = CONFIDENCE_LEVEL,
) -> dict[str, dict[str, float] | None]:
    """Percentile-bootstrap intervals of each value statistic(indices) returns, over n samples.

    Resamples where a value is undefined (e.g. an AUC when a class was not drawn) are left
    out of that value's interval.
    """
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        for name, value in statistic(rng.integers(0, n, n)).items():
            if value is not None:
                draws.setdefault(name, []).append(value)
    tail = 100 * (1 - level) / 2
    out: dict[str, dict[str, float] | None] = {}
    for name in statistic(np.arange(n)):
        values = draws.get(name)
        if values:
            low, high = np.percentile(values, [tail, 100 - tail]).tolist()
            out[name] = {"low": low, "high": high}
        else:
            out[name] = None
    return out


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test: do two models err on the same images equally often?

    Only discordant images count: b (A right, B wrong) and c (A wrong, B right); under the
    null hypothesis b ~ Binomial(b + c, 1/2).  Two-sided p = min(1, 2 P(X <= min(b, c))).
    """
    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    discordant = b + c
    tail = sum(math.comb(discordant, k) for k in range(min(b, c) + 1)) / 2**discordant
    return {
        "n": len(correct_a),
        "a_right_b_wrong": b,
        "a_wrong_b_right": c,
        "p_value": min(1.0, 2 * tail),
        "test": "exact binomial (two-sided)",
    }


def clinical_metrics(
    probs: np.ndarray,
    masks: np.ndarray,
    task: Task,
    resamples: int = 1000,
    seed: int = 0,
    untempered: np.ndarray | None = None,
) -> dict:
    """classification_metrics (`untempered` as there) plus specificity, ROC and PR curves, AP and bootstrap CIs."""
    out = classification_metrics(probs, masks, task, untempered)
    masks = masks.astype(bool)
    fine = masks.sum(axis=1) == 1
    if not fine.any():
        return out
    probs, y_true = probs[fine], masks[fine].argmax(axis=1)
    present = [c for c in range(task.num_classes) if (y_true == c).any()]
    spec = specificity(out["confusion_matrix"])
    curves_pr = {}
    for c, name in enumerate(task.classes):
        pr = precision_recall(y_true == c, probs[:, c])
        curves_pr[name] = pr[0] if pr else None
        out["per_class"][name]["specificity"] = None if np.isnan(spec[c]) else float(spec[c])
        out["per_class"][name]["average_precision"] = pr[1] if pr else None
    # Macro averages over the classes present, as fedbt.metrics does.
    for key, macro in (("specificity", "macro_specificity"), ("average_precision", "macro_average_precision")):
        values = [out["per_class"][task.classes[c]][key] for c in present]
        defined = [v for v in values if v is not None]
        out[macro] = float(np.mean(defined)) if defined else None
    out["confusion_matrix_normalized"] = row_normalised(out["confusion_matrix"])
    out["roc_curves"] = {name: roc_on_grid(y_true == c, probs[:, c]) for c, name in enumerate(task.classes)}
    out["pr_curves"] = curves_pr

    def statistic(idx: np.ndarray) -> dict[str, float | None]:
        m = fine_label_metrics(probs[idx], y_true[idx], task.classes)
        return {name: m[name] for name in CI_METRICS}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes missing from a resample
        intervals = bootstrap_ci(statistic, len(y_true), resamples, seed)
    out["confidence_intervals"] = {"level": CONFIDENCE_LEVEL, "resamples": resamples, "seed": seed, **intervals}
    return out
