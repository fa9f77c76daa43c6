"""Running a model over a loader: log-probabilities, probabilities at a temperature, and the metrics they give."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedbt.data.labels import Task
from fedbt.data.transforms import to_device_batch
from fedbt.eval.calibration import TemperatureLosses, temperature_losses, tempered_probabilities
from fedbt.eval.metrics import classification_metrics
from fedbt.model.device import autocast_for


@torch.inference_mode()
def predict_log_probabilities(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Log-softmax outputs (N, C) and target masks (N, C) for every item of the loader.

    Logs rather than probabilities: a temperature divides them without the underflow that
    probabilities rounded to 0 in float32 would bring.
    """
    model.eval()
    log_probs, masks = [], []
    for images, batch_masks in loader:
        with autocast_for(device):
            logits = model(to_device_batch(images, device))
        log_probs.append(logits.float().log_softmax(dim=1).cpu())
        masks.append(batch_masks)
    if not log_probs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), bool)
    return torch.cat(log_probs).numpy(), torch.cat(masks).numpy()


def predict_probabilities(
    model: nn.Module, loader: DataLoader, device: torch.device, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) at the temperature, and target masks (N, C)."""
    log_probs, masks = predict_log_probabilities(model, loader, device)
    return tempered_probabilities(log_probs, temperature), masks


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, task: Task, temperature: float = 1.0) -> dict:
    """Metrics of the model's probabilities at the temperature on a loader (fedbt.eval.metrics.classification_metrics),
    with the calibration error at temperature 1 beside the one at the temperature."""
    return metrics_of(*predict_log_probabilities(model, loader, device), task, temperature)


def metrics_of(log_probs: np.ndarray, masks: np.ndarray, task: Task, temperature: float = 1.0) -> dict:
    """evaluate()'s metrics from predictions already made (predict_log_probabilities')."""
    untempered = np.exp(log_probs)
    return classification_metrics(tempered_probabilities(log_probs, temperature), masks, task, untempered)


def validation_temperature_losses(model: nn.Module, loader: DataLoader, device: torch.device) -> TemperatureLosses:
    """The summed set-label loss of the loader's images at every temperature of the grid: what a temperature is
    fitted from (fedbt.eval.calibration)."""
    return temperature_losses(*predict_log_probabilities(model, loader, device))
