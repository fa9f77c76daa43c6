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

ROC_POINTS = 101  # curves are kept on a fixed FPR grid so they stay small in JSON


def _safe_auc(y_true: np.ndarray, scores: np.ndarray, **kwargs) -> float | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = roc_auc_score(y_true, scores, **kwargs)
    except ValueError:  # a class absent from y_true: AUC undefined
        return None
    return None if np.isnan(value) else float(value)


def set_likelihood_loss(probs: np.ndarray, masks: np.ndarray) -> float:
    """Mean -log P(allowed set): the coarse-label loss, computed from probabilities."""
    allowed = (probs * masks).sum(axis=1)
    return float(-np.log(np.clip(allowed, 1e-12, None)).mean())


def fine_label_metrics(probs: np.ndarray, y_true: np.ndarray, classes: tuple[str, ...]) -> dict:
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = [c for c in labels if (y_true == c).any()]
    macro = lambda values: float(np.mean([values[c] for c in present])) if present else None  # noqa: E731
    per_class_auc = {classes[c]: _safe_auc((y_true == c).astype(int), probs[:, c]) for c in labels}
    aucs = [v for v in per_class_auc.values() if v is not None]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "per_class": {
            classes[c]: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
                "auc": per_class_auc[classes[c]],
            }
            for c in labels
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def tumour_vs_none_metrics(p_tumour: np.ndarray, is_tumour: np.ndarray) -> dict:
    predicted = p_tumour >= 0.5
    tp = int((predicted & is_tumour).sum())
    tn = int((~predicted & ~is_tumour).sum())
    fp = int((predicted & ~is_tumour).sum())
    fn = int((~predicted & is_tumour).sum())
    roc = None
    if is_tumour.any() and (~is_tumour).any():
        fpr, tpr, _ = roc_curve(is_tumour.astype(int), p_tumour)
        grid = np.linspace(0, 1, ROC_POINTS)
        roc = {"fpr": grid.tolist(), "tpr": np.interp(grid, fpr, tpr).round(4).tolist()}
    return {
        "accuracy": (tp + tn) / len(predicted),
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "auc": _safe_auc(is_tumour.astype(int), p_tumour),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "roc_curve": roc,
    }


def classification_metrics(probs: np.ndarray, masks: np.ndarray, task: Task) -> dict:
    """All metrics of one evaluation as a JSON-ready dict."""
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
    return out
