"""What happens to pixels between the cache and the model: training augmentation, and the
intensity normalisation every model of this project is trained and served with."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from fedbt.config import TrainConfig

# Intensity normalisation applied on the device to uint8 batches; kept in checkpoints.
PIXEL_MEAN = 0.2
PIXEL_STD = 0.25


def train_augmentation(intensity_jitter: float = 0.0) -> v2.Transform:
    """Label-preserving changes an MRI slice can plausibly undergo (on uint8 tensors)."""
    steps: list[v2.Transform] = [
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
    ]
    if intensity_jitter > 0:
        steps.append(v2.ColorJitter(brightness=intensity_jitter, contrast=intensity_jitter))
    return v2.Compose(steps)


def augmentation_for(train: TrainConfig) -> v2.Transform | None:
    return train_augmentation(train.intensity_jitter) if train.augment else None


def to_device_batch(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, 1, S, S) -> normalised float on device, channels_last."""
    images = images.to(device, non_blocking=True).float().div_(255.0)
    images = images.sub_(PIXEL_MEAN).div_(PIXEL_STD)
    return images.contiguous(memory_format=torch.channels_last)
