"""DataLoaders the same way for training, validation and inference."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset


def make_loader(
    dataset: Dataset, batch_size: int, train: bool, device: torch.device, seed: int = 0, workers: int | None = None
) -> DataLoader:
    if workers is None:
        # On CPU both cores train; per-item augmentation is ~1% of a step and runs inline.
        workers = 4 if device.type == "cuda" else 0
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
