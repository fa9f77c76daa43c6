"""What happens to pixels between the cache and the model: training augmentation, and the
intensity normalisation every model of this project is trained and served with."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from fedbt.config import TrainConfig

# Intensity normalisation applied on the device to uint8 batches; kept in checkpoints.
PIXEL_MEAN = 0.2
PIXEL_STD = 0.25


@dataclass(frozen=True)
class Augmentation:
    """Label-preserving changes an MRI slice can plausibly undergo, drawn anew for every image.

    Two ways to apply the same changes: per item in the loader (torchvision v2 on uint8, what a
    CPU trains with: there it costs ~1% of a step), or for a whole float batch at once on the
    device (`on_batch`), where per-item work on the host would starve a GPU.
    """

    degrees: float = 10.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.9, 1.1)
    intensity_jitter: float = 0.0

    @cached_property
    def item_transform(self) -> v2.Transform:
        steps: list[v2.Transform] = [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=self.degrees, translate=(self.translate,) * 2, scale=self.scale),
        ]
        if self.intensity_jitter > 0:
            steps.append(v2.ColorJitter(brightness=self.intensity_jitter, contrast=self.intensity_jitter))
        return v2.Compose(steps)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.item_transform(image)

    def on_batch(self, images: torch.Tensor) -> torch.Tensor:
        """The same changes on a float batch (N, C, H, W) in [0, 1], each image its own draw."""
        n = len(images)
        grid = F.affine_grid(self._sampling_matrices(n, images.device), list(images.shape), align_corners=False)
        # Zeros outside the image: the black background, as RandomAffine fills uint8 images.
        moved = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.intensity_jitter <= 0:
            return moved
        return self._jitter(moved)

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        return torch.empty(n, device=device).uniform_(low, high)

    def _sampling_matrices(self, n: int, device: torch.device) -> torch.Tensor:
        """(N, 2, 3) maps from output to input coordinates (-1..1): the inverse of each image's
        flip, rotation, scaling and shift, as grid_sample reads pixels where they came from."""
        angle = self._uniform(n, -self.degrees, self.degrees, device) * (math.pi / 180)
        scale = self._uniform(n, *self.scale, device)
        shift = torch.stack([self._uniform(n, -self.translate, self.translate, device) for _ in range(2)], 1) * 2
        flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        # Forward map x' = R S F x + t, so x = F S^-1 R^-1 (x' - t); F flips the x row.
        row_x = torch.stack([cos, sin], 1) * flip.unsqueeze(1)
        row_y = torch.stack([-sin, cos], 1)
        linear = torch.stack([row_x, row_y], 1)
        offset = -(linear @ shift.unsqueeze(2))
        return torch.cat([linear, offset], 2)

    def _jitter(self, images: torch.Tensor) -> torch.Tensor:
        """Brightness then contrast, each a factor in [1 - j, 1 + j] per image, as ColorJitter."""
        n, j = len(images), self.intensity_jitter
        brightness = self._uniform(n, 1 - j, 1 + j, images.device).view(n, 1, 1, 1)
        contrast = self._uniform(n, 1 - j, 1 + j, images.device).view(n, 1, 1, 1)
        images = (images * brightness).clamp_(0, 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        return ((images - mean) * contrast + mean).clamp_(0, 1)


def augmentation_for(train: TrainConfig) -> Augmentation | None:
    return Augmentation(intensity_jitter=train.intensity_jitter) if train.augment else None


def to_device_batch(
    images: torch.Tensor, device: torch.device, augmentation: Augmentation | None = None
) -> torch.Tensor:
    """uint8 (N, 1, S, S) -> the model's input on the device: augmented there when asked,
    intensity normalised, channels_last."""
    images = images.to(device, non_blocking=True).float().div_(255.0)
    if augmentation is not None:
        images = augmentation.on_batch(images)
    images = images.sub_(PIXEL_MEAN).div_(PIXEL_STD)
    return images.contiguous(memory_format=torch.channels_last)
