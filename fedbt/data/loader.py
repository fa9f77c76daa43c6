"""DataLoaders the same way for training, validation and inference."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from fedbt.data.catalog import MRIDataset


class WholeBatches(Dataset):
    """An in-memory dataset whose items need no per-item work, served a batch at a time: one
    indexing of its tensors per batch instead of a call per image and a stack of them (64
    single-image calls and a copy each batch, host work a GPU waits for at 224 px).

    The DataLoader still draws the indices (its sampler, its seeded generator), so batches hold
    the images they would hold item by item; Opacus' Poisson batches draw through it as well."""

    def __init__(self, dataset: MRIDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.as_tensor(indices, dtype=torch.long)
        # index_select: a row copy each; indexing with a tensor (pixels[chosen]) gathers element
        # by element, 20 times slower on uint8 images.
        return self.dataset.pixels.index_select(0, chosen), self.dataset.masks.index_select(0, chosen)


def already_batched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def batching(dataset: Dataset) -> tuple[Dataset, object]:
    """The dataset a loader reads and how it makes batches: whole batches at once where the
    items are in-memory tensors used as they are, else item by item and stacked."""
    if isinstance(dataset, MRIDataset) and dataset.augmentation is None:
        return WholeBatches(dataset), already_batched
    return dataset, None  # None: the DataLoader's default collation


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
    served, collate = batching(dataset)
    return DataLoader(
        served,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=generator,
        collate_fn=collate,
    )
