"""A test scoring as aggregates: what the pooled test metrics need, and no value of any one image.

A site scoring the final model on its test split returns counts only: the number of images,
their summed loss, how many predictions fell inside the allowed set, the confusion matrix of
the fine-labelled images, the tumour-vs-none confusion, and for every class (and for P(tumour))
a histogram of the scores of the images that are, and are not, of that class, and the
confidence bins of the expected calibration error (fedbt.eval.calibration) at the model's
temperature and at 1. Aggregates of several sites add up; the metrics of the sum are those of
the pooled images.

The histograms bin the score's log-odds, which spreads the crowded ends of a softmax (0.0001
and 0.001 differ as much as 0.5 and 0.9), into SCORE_BINS equal bins over +-LOGIT_LIMIT.
Ranked by bin, only a positive and a negative image in the same bin are tied, so the ROC-AUC
of the histograms stays within 0.001 of the per-image one (tests/test_score_aggregates.py).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from fedbt.data.labels import Task
from fedbt.eval.calibration import CONFIDENCE_BINS, confidence_bins, reliability
from fedbt.eval.metrics import (
    TUMOUR_THRESHOLD,
    binary_confusion,
    label_metrics,
    roc_on_grid,
    safe_auc,
    set_likelihood_losses,
    tumour_vs_none_from,
    with_class_aucs,
)

# 2^16 bins over +-32 log-odds: one bin is a 0.1% change in odds. With 4096 (a 1.6% change) a
# deployment's 59 test images, their P(tumour) crowded between 0.73 and 0.89, shared bins across
# classes enough to move the AUC by 0.002. The histograms cost 5 MB once per run per site.
SCORE_BINS = 65536
# Log-odds beyond +-32 (P within 1e-14 of 0 or 1) share the end bins; +-16 cut a confident
# model's ranking of near-certain images enough to move an AUC by 0.001.
LOGIT_LIMIT = 32.0
# The aggregates that are sums of real numbers, not counts.
SUMS = frozenset({"loss_sum", "confidence_bins", "untempered_confidence_bins"})


def score_bins(scores: np.ndarray) -> np.ndarray:
    """The histogram bin of each probability: equal bins of its log-odds; 0.5 starts bin SCORE_BINS / 2."""
    p = scores.astype(np.float64)
    with np.errstate(divide="ignore"):  # 0 and 1 are -inf and +inf: the end bins
        log_odds = np.log(p) - np.log1p(-p)
    which = np.floor((log_odds + LOGIT_LIMIT) / (2 * LOGIT_LIMIT) * SCORE_BINS)
    return np.clip(which, 0, SCORE_BINS - 1).astype(np.int64)


def score_histogram(is_positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(2, SCORE_BINS) counts: row 0 the negatives' scores, row 1 the positives'."""
    bins = score_bins(scores)
    return np.stack(
        [np.bincount(bins[~is_positive], minlength=SCORE_BINS), np.bincount(bins[is_positive], minlength=SCORE_BINS)]
    )


@dataclasses.dataclass
class ScoreAggregates:
    n: int
    loss_sum: float
    set_correct: int  # predictions inside the allowed set
    confusion: np.ndarray  # (C, C) fine-labelled images, rows true, columns predicted
    class_scores: np.ndarray  # (C, 2, SCORE_BINS) per class: histograms of its score on fine images (not / of it)
    tumour_confusion: np.ndarray  # (2, 2) [[TN, FP], [FN, TP]] at P(tumour) >= 0.5, every image
    tumour_scores: np.ndarray  # (2, SCORE_BINS) histograms of P(tumour): non-tumour / tumour images
    # (3, CONFIDENCE_BINS) per confidence bin: images, summed confidence, top class in the label set;
    # of the probabilities scored and of the same model's at temperature 1.
    confidence_bins: np.ndarray
    untempered_confidence_bins: np.ndarray

    def __add__(self, other: ScoreAggregates) -> ScoreAggregates:
        return ScoreAggregates(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def arrays(self) -> dict[str, np.ndarray]:
        return {field.name: np.asarray(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], num_classes: int) -> ScoreAggregates:
        """Aggregates a site sent, checked: the right shapes, counts that are counts and agree with each other."""
        shapes = {
            "n": (),
            "loss_sum": (),
            "set_correct": (),
            "confusion": (num_classes, num_classes),
            "class_scores": (num_classes, 2, SCORE_BINS),
            "tumour_confusion": (2, 2),
            "tumour_scores": (2, SCORE_BINS),
            "confidence_bins": (3, CONFIDENCE_BINS),
            "untempered_confidence_bins": (3, CONFIDENCE_BINS),
        }
        if set(arrays) != set(shapes):
            raise ValueError(f"test aggregates hold {sorted(arrays)}, not {sorted(shapes)}")
        for name, shape in shapes.items():
            value = arrays[name]
            if value.shape != shape:
                raise ValueError(f"test aggregate {name} has shape {value.shape}, not {shape}")
            if name not in SUMS and (value.dtype.kind not in "iu" or (value < 0).any()):
                raise ValueError(f"test aggregate {name} is not a count ({value.dtype})")
        agg = cls(
            n=int(arrays["n"]),
            loss_sum=float(arrays["loss_sum"]),
            set_correct=int(arrays["set_correct"]),
            **{name: arrays[name].astype(np.int64) for name in shapes if arrays[name].ndim and name not in SUMS},
            **{name: arrays[name].astype(np.float64) for name in SUMS if name != "loss_sum"},
        )
        fine = agg.confusion.sum()
        consistent = (
            np.isfinite(agg.loss_sum)
            and agg.loss_sum >= 0
            and agg.set_correct <= agg.n
            and agg.tumour_confusion.sum() == agg.tumour_scores.sum() == agg.n
            and (agg.class_scores.sum(axis=(1, 2)) == fine).all()
            and fine <= agg.n
            and all(bins_agree(bins, fine) for bins in (agg.confidence_bins, agg.untempered_confidence_bins))
        )
        if not consistent:
            raise ValueError("test aggregates disagree with each other")
        return agg


def bins_agree(bins: np.ndarray, n: int) -> bool:
    """Confidence bins of n images (those with a one-class label): finite, as many images as n, no bin
    with more confidence or right predictions than images."""
    count, confidence, correct = bins
    return bool(
        np.isfinite(bins).all()
        and (bins >= 0).all()
        and count.sum() == n
        and (confidence <= count).all()
        and (correct <= count).all()
    )


def aggregate_scores(
    probs: np.ndarray, masks: np.ndarray, task: Task, untempered: np.ndarray | None = None
) -> ScoreAggregates:
    """The aggregates of one split's probabilities (N, C) and allowed-class masks (N, C); `untempered`,
    the probabilities before temperature scaling, as in classification_metrics."""
    masks = masks.astype(bool)
    n, classes = len(probs), task.num_classes
    fine = masks.sum(axis=1) == 1
    y_true, y_pred = masks[fine].argmax(axis=1), probs[fine].argmax(axis=1)
    p_tumour, is_tumour = task.tumour_probability(probs), task.is_tumour(masks)
    return ScoreAggregates(
        n=n,
        loss_sum=float(set_likelihood_losses(probs, masks).sum()),
        set_correct=int(masks[np.arange(n), probs.argmax(axis=1)].sum()) if n else 0,
        confusion=np.bincount(y_true * classes + y_pred, minlength=classes * classes).reshape(classes, classes),
        class_scores=np.stack([score_histogram(y_true == c, probs[fine, c]) for c in range(classes)]),
        tumour_confusion=np.array(binary_confusion(p_tumour >= TUMOUR_THRESHOLD, is_tumour)),
        tumour_scores=score_histogram(is_tumour, p_tumour),
        confidence_bins=confidence_bins(probs, masks),
        untempered_confidence_bins=confidence_bins(probs if untempered is None else untempered, masks),
    )


def _weighted_bins(histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (2, SCORE_BINS) histogram as weighted samples: (is positive, bin as score, count), empty bins left out."""
    is_positive = np.repeat([False, True], SCORE_BINS)
    scores = np.tile(np.arange(SCORE_BINS), 2)
    counts = histogram.ravel()
    kept = counts > 0
    return is_positive[kept], scores[kept], counts[kept]


def ranking_auc(histogram: np.ndarray) -> float | None:
    return safe_auc(*_weighted_bins(histogram))


def aggregate_metrics(agg: ScoreAggregates, task: Task) -> dict:
    """The metrics fedbt.eval.metrics.classification_metrics gives, from aggregates."""
    out: dict = {"n": agg.n, "task": task.name, "classes": list(task.classes)}
    if agg.n == 0:
        return out
    out["loss"] = agg.loss_sum / agg.n
    out["set_accuracy"] = agg.set_correct / agg.n
    out["n_fine"] = int(agg.confusion.sum())
    if out["n_fine"]:
        # One (true, predicted) pair per non-empty cell of the confusion matrix, weighted by its count.
        y_true, y_pred = np.nonzero(agg.confusion)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a class absent from a small split
            metrics = label_metrics(y_true, y_pred, task.classes, agg.confusion[y_true, y_pred])
        aucs = {name: ranking_auc(agg.class_scores[c]) for c, name in enumerate(task.classes)}
        out.update(with_class_aucs(metrics, aucs))
    auc = ranking_auc(agg.tumour_scores)
    roc = roc_on_grid(*_weighted_bins(agg.tumour_scores))
    out["tumour_vs_none"] = tumour_vs_none_from(agg.tumour_confusion.tolist(), auc, roc)
    out["calibration"] = reliability(agg.confidence_bins, agg.untempered_confidence_bins)
    return out
