"""Classification metrics from predicted probabilities and target masks (scikit-learn).

Samples with a fine label (one allowed class) are scored on the task's classes.
Coarse samples (Br35H 'tumour, type unknown') cannot be scored on tumour type,
so they count in ``set_accuracy`` (prediction inside the allowed set) and in the
tumour-vs-none metrics, which every sample has.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from fedbt.data.labels import Task
from fedbt.eval.calibration import confidence_bins, reliability

ROC_POINTS = 101  # curves are kept on a fixed FPR grid so they stay small in JSON
TUMOUR_THRESHOLD = 0.5  # P(tumour) at which an image is called a tumour


def safe_auc(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = roc_auc_score(is_positive.astype(int), scores, sample_weight=weights)
    except ValueError:  # a class absent from the truth: AUC undefined
        return None
    return None if np.isnan(value) else float(value)


def roc_on_grid(is_positive: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> dict | None:
    """One-vs-rest ROC curve on a fixed FPR grid (small in JSON); None without both outcomes."""
    if is_positive.all() or not is_positive.any():
        return None
    fpr, tpr, _ = roc_curve(is_positive.astype(int), scores, sample_weight=weights)
    grid = np.linspace(0, 1, ROC_POINTS)
    return {"fpr": grid.tolist(), "tpr": np.interp(grid, fpr, tpr).round(4).tolist()}


def set_likelihood_losses(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Each image's -log P(allowed set): the coarse-label loss, computed from probabilities."""
    allowed = (probs * masks).sum(axis=1)
    return -np.log(np.clip(allowed, 1e-12, None))


def set_likelihood_loss(probs: np.ndarray, masks: np.ndarray) -> float:
    return float(set_likelihood_losses(probs, masks).mean())


def label_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...], weights: np.ndarray | None = None
) -> dict:
    """The metrics of predicted labels alone. `weights` counts each (true, predicted) pair:
    scored from a confusion matrix, one pair per cell weighted by its count, they are the same
    numbers as from the images themselves."""
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0, sample_weight=weights
    )
    present = [c for c in labels if support[c] > 0]
    macro = lambda values: float(np.mean([values[c] for c in present])) if present else None  # noqa: E731
    return {
        "accuracy": float(accuracy_score(y_true, y_pred, sample_weight=weights)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred, sample_weight=weights)),
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "per_class": {
            classes[c]: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c in labels
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels, sample_weight=weights).astype(int).tolist(),
    }


def with_class_aucs(metrics: dict, aucs: dict[str, float | None]) -> dict:
    """label_metrics plus each class's one-vs-rest ROC-AUC and their mean over the defined ones."""
    defined = [v for v in aucs.values() if v is not None]
    for name, auc in aucs.items():
        metrics["per_class"][name]["auc"] = auc
    return {**metrics, "macro_auc": float(np.mean(defined)) if defined else None}


def fine_label_metrics(probs: np.ndarray, y_true: np.ndarray, classes: tuple[str, ...]) -> dict:
    metrics = label_metrics(y_true, probs.argmax(axis=1), classes)
    return with_class_aucs(metrics, {name: safe_auc(y_true == c, probs[:, c]) for c, name in enumerate(classes)})


def binary_confusion(predicted: np.ndarray, actual: np.ndarray) -> list[list[int]]:
    """[[TN, FP], [FN, TP]]."""
    return [
        [int((~predicted & ~actual).sum()), int((predicted & ~actual).sum())],
        [int((~predicted & actual).sum()), int((predicted & actual).sum())],
    ]


def tumour_vs_none_from(confusion: list[list[int]], auc: float | None, roc: dict | None) -> dict:
    """Tumour-vs-none metrics from the confusion at P(tumour) >= 0.5 and the ranking's AUC and ROC curve."""
    (tn, fp), (fn, tp) = confusion
    return {
        "accuracy": (tp + tn) / (tn + fp + fn + tp),
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "auc": auc,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "roc_curve": roc,
    }


def tumour_vs_none_metrics(p_tumour: np.ndarray, is_tumour: np.ndarray) -> dict:
    confusion = binary_confusion(p_tumour >= TUMOUR_THRESHOLD, is_tumour)
    return tumour_vs_none_from(confusion, safe_auc(is_tumour, p_tumour), roc_on_grid(is_tumour, p_tumour))


def classification_metrics(
    probs: np.ndarray, masks: np.ndarray, task: Task, untempered: np.ndarray | None = None
) -> dict:
    """All metrics of one evaluation as a JSON-ready dict. `untempered`: the same model's
    probabilities before temperature scaling, for the calibration error before it (default: probs)."""
    masks = masks.astype(bool)
    n = len(probs)
    out: dict = {"n": n, "task": task.name, "classes": list(task.classes)}
    if n == 0:
        return out
    fine = masks.sum(axis=1) == 1
    predicted = probs.argmax(axis=1)
    out["loss"] = set_likelihood_loss(probs, masks)
    out["set_accuracy"] = float(masks[np.arange(n), predicted].mean())
    out["n_fine"] = int(fine.sum())
    if fine.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a class absent from a small split
            out.update(fine_label_metrics(probs[fine], masks[fine].argmax(axis=1), task.classes))
    out["tumour_vs_none"] = tumour_vs_none_metrics(task.tumour_probability(probs), task.is_tumour(masks))
    before = probs if untempered is None else untempered
    out["calibration"] = reliability(confidence_bins(probs, masks), confidence_bins(before, masks))
    return out
