"""Clinical-grade evaluation of a checkpoint: the metrics beyond fedbt.metrics, and the run.

On top of ``classification_metrics`` (accuracy, balanced accuracy, per-class precision,
recall, F1, AUC, confusion matrix, tumour-vs-none): specificity, precision-recall curves
and average precision, one-vs-rest ROC curves, calibration (expected calibration error
and the reliability diagram's bins), percentile-bootstrap confidence intervals, McNemar's
test against a second model on the same images, and inference latency.

Class-level metrics use the images with a fine label, as in fedbt.metrics: a Br35H
'tumour of unknown type' cannot say whether a glioma prediction was right.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve
from torch import nn

from fedbt.bench import latency_ms
from fedbt.config import DataConfig
from fedbt.data import MRIDataset, build_catalog
from fedbt.engine import predict_probabilities, to_device_batch
from fedbt.evalreport import write_evaluation_report
from fedbt.gradcam import GridItem, grad_cam
from fedbt.images import ImageCache, fill_cache, load_pixels
from fedbt.labels import Task
from fedbt.metrics import ROC_POINTS, classification_metrics, fine_label_metrics
from fedbt.predict import LoadedModel, load_model
from fedbt.readers import Problem, Record, scan_class_folders
from fedbt.sites import SiteSpec

CALIBRATION_BINS = 10
CONFIDENCE_LEVEL = 0.95
CI_METRICS = ("accuracy", "macro_f1", "macro_auc")


# --- metric functions --------------------------------------------------------------------


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


def roc_on_grid(is_positive: np.ndarray, scores: np.ndarray) -> dict | None:
    """One-vs-rest ROC curve on a fixed FPR grid (small in JSON); None without both outcomes."""
    if is_positive.all() or not is_positive.any():
        return None
    fpr, tpr, _ = roc_curve(is_positive.astype(int), scores)
    grid = np.linspace(0, 1, ROC_POINTS)
    return {"fpr": grid.tolist(), "tpr": np.interp(grid, fpr, tpr).round(4).tolist()}


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


def calibration(probs: np.ndarray, y_true: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error of the top-class confidence, and the reliability diagram's bins.

    Bin b holds confidences in (b/B, (b+1)/B]; ECE = sum over bins of |accuracy - mean
    confidence| weighted by the bin's share of the images.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        row = {"lower": b / bins, "upper": (b + 1) / bins, "count": count, "confidence": None, "accuracy": None}
        if count:
            row["confidence"] = float(confidence[inside].mean())
            row["accuracy"] = float(correct[inside].mean())
            ece += count / len(confidence) * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return {"ece": ece, "bins": table}


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


def measure_latency(
    model: nn.Module, pixels: torch.Tensor, device: torch.device, batch: int = 32, repeats: int = 20, warmup: int = 3
) -> dict:
    """Median ms per image at batch 1 and images/s at `batch`, after warm-up, host to host (fedbt.bench's way)."""
    targets = torch.zeros((len(pixels), 1), dtype=torch.bool)  # predict_probabilities reads (image, target) pairs
    single = latency_ms(model, MRIDataset(pixels, targets), device, repeats, warmup)
    filled = torch.arange(batch) % len(pixels)  # repeats images when fewer were evaluated: same cost
    full = [(pixels[filled], targets[filled])]
    for _ in range(warmup):
        predict_probabilities(model, full, device)
    start = time.perf_counter()
    for _ in range(repeats):
        predict_probabilities(model, full, device)  # returns numpy arrays: the device has finished
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "ms_per_image_batch1": single,
        "batch": batch,
        "images_per_second_batched": batch * repeats / (time.perf_counter() - start),
    }


def clinical_metrics(probs: np.ndarray, masks: np.ndarray, task: Task, resamples: int = 1000, seed: int = 0) -> dict:
    """classification_metrics plus specificity, ROC and PR curves, AP, calibration and bootstrap CIs."""
    out = classification_metrics(probs, masks, task)
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
    out["calibration"] = calibration(probs, y_true)

    def statistic(idx: np.ndarray) -> dict[str, float | None]:
        m = fine_label_metrics(probs[idx], y_true[idx], task.classes)
        return {name: m[name] for name in CI_METRICS}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes missing from a resample
        intervals = bootstrap_ci(statistic, len(y_true), resamples, seed)
    out["confidence_intervals"] = {"level": CONFIDENCE_LEVEL, "resamples": resamples, "seed": seed, **intervals}
    return out


# --- the evaluate run --------------------------------------------------------------------


@dataclass
class EvalRequest:
    checkpoint: str
    compare: str | None = None
    site: str | None = None  # a site's test split; None (and no folder): the pooled test split
    folder: str | None = None  # class folders named as in fedbt.labels.KNOWN_SOURCE_LABELS
    data_root: str | None = None  # None: the data root the checkpoint was trained on
    device: str = "auto"
    resamples: int = 1000
    seed: int = 0
    samples: int = 8  # images in the Grad-CAM grid


@dataclass
class EvalSet:
    description: str
    records: list[Record]
    masks: torch.Tensor  # (N, C) bool
    problems: list[Problem]


def _cache_dir() -> str:
    # The checkpoint's cache path belongs to the machine that trained it; decode into this one's.
    return DataConfig().cache_dir


def eval_set(request: EvalRequest, model: LoadedModel) -> EvalSet:
    """The images to score: a folder of class folders, a site's test split or the pooled test split."""
    if request.folder:
        scan = scan_class_folders(SiteSpec("folder", "class_folders", Path(request.folder)))
        masks = torch.tensor([model.task.target_mask(r.allowed) for r in scan.records], dtype=torch.bool)
        masks = masks.reshape(-1, model.task.num_classes)  # (0, C) too when the folder holds no images
        return EvalSet(f"folder {request.folder}", scan.records, masks, scan.problems)
    # The checkpoint's data settings and seed deal the same splits as in training.
    trained_on = model.config.data
    data = replace(trained_on, data_root=request.data_root or trained_on.data_root, cache_dir=_cache_dir())
    catalog = build_catalog(data)
    indices = catalog.indices(request.site, "test", pooled=request.site is None)
    description = f"site {request.site} test split" if request.site else "pooled test split"
    problems = [p for p in catalog.problems if request.site in (None, p.site)]
    return EvalSet(description, [catalog.records[i] for i in indices], catalog.masks[indices], problems)


def decode_for(model: LoadedModel, records: list[Record]) -> tuple[list[int], torch.Tensor, list[Problem]]:
    """The records' pixels as the model's training saw them: kept indices, pixels, unreadable files."""
    cache = ImageCache(_cache_dir(), model.image_size, model.crop)
    errors = fill_cache(records, cache, progress=False)
    kept = [i for i, r in enumerate(records) if r.sha256 not in errors]
    problems = [Problem(r.site, r.path, errors[r.sha256]) for r in records if r.sha256 in errors]
    return kept, load_pixels([records[i] for i in kept], cache), problems


def fine_correct(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Whether each fine-labelled image's prediction is its class (the images accuracy counts)."""
    fine = masks.sum(axis=1) == 1
    return probs[fine].argmax(axis=1) == masks[fine].argmax(axis=1)


def sample_grid(
    model: LoadedModel, pixels: torch.Tensor, probs: np.ndarray, masks: np.ndarray, count: int
) -> list[GridItem]:
    """Mistakes first, then correct predictions, each with the Grad-CAM of its predicted class."""
    predicted = probs.argmax(axis=1)
    right = masks[np.arange(len(probs)), predicted]
    chosen = np.concatenate([np.flatnonzero(~right), np.flatnonzero(right)])[:count]
    cams = grad_cam(model.model, to_device_batch(pixels[chosen], model.device), predicted[chosen].tolist()).cams
    classes = model.task.classes
    items = []
    for i, cam in zip(chosen, cams):
        truth = "|".join(c for c, allowed in zip(classes, masks[i]) if allowed)
        title = f"{classes[predicted[i]]} {probs[i, predicted[i]]:.2f}\ntrue: {truth}"
        items.append(GridItem(pixels[i, 0].numpy(), cam, title, bool(right[i])))
    return items


def compare(other: LoadedModel, records: list[Record], masks: np.ndarray, probs: np.ndarray) -> dict:
    """The second model on the same images (at its own size and crop) and McNemar's test against the first."""
    kept, pixels, _ = decode_for(other, records)
    if len(kept) != len(records):
        raise ValueError(f"{other.path}: could not decode the same images as the evaluated checkpoint")
    other_probs = other.probabilities(pixels)
    metrics = classification_metrics(other_probs, masks, other.task)
    return {
        "checkpoint": other.path,
        "model": other.summary(),
        "metrics": {k: metrics.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")},
        "mcnemar": mcnemar(fine_correct(probs, masks), fine_correct(other_probs, masks)),
    }


def run_evaluation(request: EvalRequest, out: Path) -> dict:
    """Score the checkpoint (and the one to compare); write JSON, figures and the report into out."""
    model = load_model(request.checkpoint, request.device)
    # Both checkpoints are checked before any work: a wrong --compare fails in seconds, not after scoring.
    other = load_model(request.compare, request.device, expect_task=model.task.name) if request.compare else None
    images = eval_set(request, model)
    kept, pixels, unreadable = decode_for(model, images.records)
    if not kept:
        raise ValueError(f"no images to evaluate in the {images.description}")
    records, masks = [images.records[i] for i in kept], images.masks[kept].numpy()
    probs = model.probabilities(pixels)
    result = {
        "checkpoint": str(request.checkpoint),
        "model": model.summary(),
        "data": {
            "description": images.description,
            "n": len(records),
            "problems": [{"path": p.path, "message": p.message} for p in images.problems + unreadable],
        },
        "metrics": clinical_metrics(probs, masks, model.task, request.resamples, request.seed),
        "latency": measure_latency(model.model, pixels, model.device),
    }
    if other is not None:
        result["comparison"] = compare(other, records, masks, probs)
    write_evaluation_report(result, sample_grid(model, pixels, probs, masks, request.samples), out)
    return result
