"""Temperature scaling: probabilities whose confidence matches how often the model is right.

A model's log-probabilities divided by one temperature T and normalised again keep every
prediction (the order of the classes is unchanged) and only make them more (T < 1) or less
(T > 1) confident. T is the one that minimises the coarse-label loss on validation data, the
set likelihood of fedbt.train.losses: a Br35H 'tumour' counts as right when the probability
mass is anywhere on the tumour classes.

The fit only needs each site's loss summed at every temperature of a fixed grid
(TemperatureLosses): sums of several sites add up to the sums of their pooled images, so a
federation fits the same T from its sites' sums as a server pooling their images would.

Expected calibration error (ECE) compares, in bins of confidence (the top class's probability),
the mean confidence with the share of images whose top class is their class. It is counted on the
images with one class for a label: a coarse label (Br35H 'tumour') would count any tumour type on
top as right, more often than the top class's probability says, and make even a calibrated model
look under-confident. The bins, too, are sums that add up over sites.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.special import log_softmax, logsumexp

# 301 temperatures, each 2% above the last (finer than a validation split can pin T down);
# 1, no change, is the middle one.
TEMPERATURES = np.geomspace(0.05, 20.0, 301)
CONFIDENCE_BINS = 10


def tempered_log_probabilities(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """log softmax(log p / T): the same as softmax(logits / T), since log p differs from the logits by a constant."""
    return log_softmax(log_probs.astype(np.float64) / temperature, axis=1)


def tempered_probabilities(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    return np.exp(tempered_log_probabilities(log_probs, temperature)).astype(np.float32)


def set_losses(log_probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Each image's -log P(its label set) from normalised log-probabilities (N, C)."""
    return -logsumexp(log_probs, axis=1, b=masks.astype(np.float64))


@dataclasses.dataclass
class TemperatureLosses:
    """The set-label loss of some images, summed, at each temperature of TEMPERATURES."""

    count: int
    sums: np.ndarray  # (len(TEMPERATURES),)

    @classmethod
    def empty(cls) -> TemperatureLosses:
        return cls(0, np.zeros(len(TEMPERATURES)))

    def __add__(self, other: TemperatureLosses) -> TemperatureLosses:
        return TemperatureLosses(self.count + other.count, self.sums + other.sums)

    def best_temperature(self) -> float:
        """The grid temperature with the lowest loss; 1 (no change) without images."""
        return float(TEMPERATURES[np.argmin(self.sums)]) if self.count else 1.0

    def mean_loss(self, temperature: float) -> float | None:
        """The mean loss at the grid temperature nearest to `temperature` (1 and every fitted one are on it)."""
        if not self.count:
            return None
        return float(self.sums[np.argmin(np.abs(np.log(TEMPERATURES / temperature)))] / self.count)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"count": np.asarray(self.count, dtype=np.int64), "sums": self.sums.astype(np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> TemperatureLosses:
        """Sums a site sent, checked: the grid's shape, a count, finite non-negative losses."""
        if set(arrays) != {"count", "sums"}:
            raise ValueError(f"temperature losses hold {sorted(arrays)}, not ['count', 'sums']")
        count, sums = arrays["count"], arrays["sums"]
        if count.shape != () or count.dtype.kind not in "iu" or count < 0:
            raise ValueError("temperature losses: the count is not a count")
        if sums.shape != TEMPERATURES.shape or not np.isfinite(sums).all() or (sums < 0).any():
            raise ValueError(f"temperature losses: sums are not {len(TEMPERATURES)} finite non-negative numbers")
        return cls(int(count), sums.astype(np.float64))


def temperature_losses(log_probs: np.ndarray, masks: np.ndarray) -> TemperatureLosses:
    """The summed set-label loss of these images at every grid temperature."""
    sums = [set_losses(tempered_log_probabilities(log_probs, t), masks).sum() for t in TEMPERATURES]
    return TemperatureLosses(len(log_probs), np.array(sums, dtype=np.float64))


def confidence_bins(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(3, CONFIDENCE_BINS): per bin of top-class confidence, the images with a one-class label, their
    summed confidence and how many have that class on top. Bin b holds confidences in (b/B, (b+1)/B]."""
    one_class = masks.sum(axis=1) == 1
    probs, masks = probs[one_class], masks[one_class]
    n = len(probs)
    if n == 0:
        return np.zeros((3, CONFIDENCE_BINS))
    top = probs.argmax(axis=1)
    confidence = probs[np.arange(n), top].astype(np.float64)
    correct = masks.astype(bool)[np.arange(n), top]
    which = np.clip(np.ceil(confidence * CONFIDENCE_BINS).astype(int) - 1, 0, CONFIDENCE_BINS - 1)
    return np.stack(
        [np.bincount(which, weights=weights, minlength=CONFIDENCE_BINS) for weights in (None, confidence, correct)]
    ).astype(np.float64)


def expected_calibration_error(bins: np.ndarray) -> float | None:
    """Sum over bins of |right - summed confidence| / all images: each bin's |accuracy - mean
    confidence| weighted by its share of the images."""
    count, confidence, correct = bins
    return float(np.abs(correct - confidence).sum() / count.sum()) if count.sum() else None


def reliability(bins: np.ndarray, untempered_bins: np.ndarray) -> dict:
    """ECE and the reliability diagram's bins; `untempered_bins`, the same images at temperature 1, give the ECE
    before calibration."""
    table = []
    for b, (count, confidence, correct) in enumerate(bins.T):
        row = {"lower": b / CONFIDENCE_BINS, "upper": (b + 1) / CONFIDENCE_BINS, "count": int(count)}
        row["confidence"] = float(confidence / count) if count else None
        row["accuracy"] = float(correct / count) if count else None
        table.append(row)
    return {
        "ece": expected_calibration_error(bins),
        "ece_untempered": expected_calibration_error(untempered_bins),
        "bins": table,
    }


def calibration_summary(losses: TemperatureLosses, fitted_on: str, pooled_test: dict) -> dict:
    """What a run reports of its calibration: the temperature, the validation data it was fitted on and
    its loss there, and the pooled test split's ECE before and after."""
    temperature = losses.best_temperature()
    test = pooled_test.get("calibration", {})
    return {
        "temperature": temperature,
        "fitted_on": fitted_on,
        "validation_images": losses.count,
        "validation_loss_before": losses.mean_loss(1.0),
        "validation_loss_after": losses.mean_loss(temperature),
        "test_ece_before": test.get("ece_untempered"),
        "test_ece_after": test.get("ece"),
    }
