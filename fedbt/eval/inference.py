"""Running a model over a loader: probabilities, and the metrics they give."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedbt.data.labels import Task
from fedbt.data.transforms import to_device_batch
from fedbt.eval.metrics import classification_metrics
from fedbt.model.device import autocast_for


@torch.inference_mode()
def predict_probabilities(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) and target masks (N, C) for every item of the loader."""
    model.eval()
    probs, masks = [], []
    for images, batch_masks in loader:
        with autocast_for(device):
            logits = model(to_device_batch(images, device))
        probs.append(logits.float().softmax(dim=1).cpu())
        masks.append(batch_masks)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), bool)
    return torch.cat(probs).numpy(), torch.cat(masks).numpy()


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, task: Task) -> dict:
    """Metrics of the model on a loader (see fedbt.metrics.classification_metrics)."""
    probs, masks = predict_probabilities(model, loader, device)
    return classification_metrics(probs, masks, task)
