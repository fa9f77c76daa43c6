"""Temperature scaling: the fit, the calibration error, site sums, and the checkpoint's temperature in predict."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.special import log_softmax, softmax

from fedbt.config import ExperimentConfig, ModelConfig
from fedbt.data.labels import get_task
from fedbt.data.transforms import to_device_batch
from fedbt.eval.calibration import (
    TemperatureLosses,
    confidence_bins,
    expected_calibration_error,
    temperature_losses,
)
from fedbt.eval.predict import load_model, predict_files, read_input
from fedbt.model.architectures import build_model
from fedbt.model.checkpoint import load_checkpoint, save_checkpoint, store_temperature

TASK = get_task("4class")
TUMOUR_SET = np.array([c != "no_tumor" for c in TASK.classes])


def calibrated_model_outputs(
    rng: np.random.Generator, n: int, coarse_share: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that is calibrated by construction (each image's class is drawn from its
    softmax), and label masks where some tumour images only say 'tumour' (Br35H's coarse label)."""
    logits = rng.normal(0.0, 2.0, (n, TASK.num_classes))
    probs = softmax(logits, axis=1)
    y = (probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    masks = np.eye(TASK.num_classes, dtype=bool)[y]
    coarse = (rng.random(n) < coarse_share) & TUMOUR_SET[y]
    masks[coarse] = TUMOUR_SET
    return logits, masks


def ece(logits: np.ndarray, masks: np.ndarray) -> float:
    return expected_calibration_error(confidence_bins(softmax(logits, axis=1), masks))


@pytest.mark.parametrize("scale", [3.0, 1 / 3])
def test_the_fit_recovers_the_temperature_that_undoes_an_over_or_under_confident_model(scale):
    logits, masks = calibrated_model_outputs(np.random.default_rng(0), 20000)
    # Logits times `scale`: divided by the temperature `scale` they are the calibrated ones again.
    fitted = temperature_losses(log_softmax(scale * logits, axis=1), masks).best_temperature()
    assert fitted == pytest.approx(scale, rel=0.05)


def test_the_calibration_error_is_near_zero_for_a_calibrated_model_and_not_for_a_miscalibrated_one():
    # With coarse labels among them: those would count any tumour type on top as right and make a
    # calibrated model look under-confident, so the error is counted on one-class labels.
    logits, masks = calibrated_model_outputs(np.random.default_rng(1), 20000, coarse_share=0.5)
    assert ece(logits, masks) < 0.01
    assert ece(3 * logits, masks) > 0.05  # over-confident
    assert ece(logits / 3, masks) > 0.05  # under-confident


def test_two_sites_loss_sums_fit_the_same_temperature_as_their_pooled_images():
    rng = np.random.default_rng(2)
    sites = [calibrated_model_outputs(rng, n) for n in (700, 2300)]
    log_probs = [log_softmax(2.0 * logits, axis=1) for logits, _ in sites]
    summed = temperature_losses(log_probs[0], sites[0][1]) + temperature_losses(log_probs[1], sites[1][1])
    pooled = temperature_losses(np.concatenate(log_probs), np.concatenate([masks for _, masks in sites]))
    assert summed.count == pooled.count == 3000
    assert summed.sums == pytest.approx(pooled.sums)
    assert summed.best_temperature() == pooled.best_temperature() != 1.0


def test_a_sites_loss_sums_are_checked():
    logits, masks = calibrated_model_outputs(np.random.default_rng(3), 50)
    arrays = temperature_losses(log_softmax(logits, axis=1), masks).arrays()
    assert TemperatureLosses.from_arrays(arrays).count == 50
    with pytest.raises(ValueError, match="not a count"):
        TemperatureLosses.from_arrays({**arrays, "count": np.array(-1)})
    with pytest.raises(ValueError, match="finite non-negative"):
        TemperatureLosses.from_arrays({**arrays, "sums": arrays["sums"][:10]})
    with pytest.raises(ValueError, match="finite non-negative"):
        TemperatureLosses.from_arrays({**arrays, "sums": -arrays["sums"]})


@pytest.fixture()
def checkpoint_and_image(tmp_path):
    """An untrained 32 px CNN checkpoint and one image file to predict."""
    torch.manual_seed(0)
    cfg = ExperimentConfig(model=ModelConfig(name="cnn"))
    cfg.data.image_size = 32
    checkpoint = save_checkpoint(tmp_path / "model.pt", build_model(cfg.model, 4, 32), cfg, {}, "central")
    image = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(image)
    return checkpoint, image


def test_predict_reports_probabilities_at_the_checkpoints_temperature(checkpoint_and_image):
    checkpoint, image = checkpoint_and_image
    store_temperature(checkpoint, 0.05)
    assert torch.load(checkpoint, weights_only=True)["temperature"] == 0.05  # a plain float
    model = load_model(checkpoint, "cpu")
    [row] = predict_files([str(image)], model)
    pixels = read_input(image, model.config.data)[None]
    with torch.no_grad():
        logits = model.model(to_device_batch(pixels, model.device)).double()
    expected = torch.softmax(logits / 0.05, dim=1)[0].numpy()
    assert list(row.probabilities.values()) == pytest.approx(expected, abs=1e-4)
    assert row.confidence == pytest.approx(expected.max(), abs=1e-4)
    assert abs(row.confidence - torch.softmax(logits, dim=1).max().item()) > 0.05


def test_a_checkpoint_saved_before_calibration_loads_with_temperature_1(checkpoint_and_image):
    checkpoint, _ = checkpoint_and_image
    assert "temperature" not in load_checkpoint(checkpoint)
    assert load_model(checkpoint, "cpu").temperature == 1.0
