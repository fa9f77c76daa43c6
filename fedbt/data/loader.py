"""DataLoaders the same way for training, validation and inference."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def make_loader(
    dataset: Dataset, batch_size: int, train: bool, device: torch.device, seed: int = 0, workers: int | None = None
) -> DataLoader:
    if workers is None:
        # Items are uint8 tensors already in memory: worker processes add only start-up and
        # hand-over. On CPU the cores train and per-item augmentation is ~1% of a step; on a
        # GPU augmentation runs on the device (train.augment_on=auto), and on an H100 the
        # engine fed 1.11 x the bare step at 128 px with no workers against 0.64 with 2
        # and 0.52 with 4 (docs/performance.md).
        workers = 0
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=generator,
    )
