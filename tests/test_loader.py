"""The loader serves in-memory images a whole batch at a time, with the batches item-by-item loading gives."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from fedbt.data.catalog import MRIDataset
from fedbt.data.loader import make_loader
from fedbt.data.transforms import Augmentation

CPU = torch.device("cpu")


class CountingDataset(MRIDataset):
    """Counts the single-item reads a loader makes."""

    item_reads = 0

    def __getitem__(self, i):
        CountingDataset.item_reads += 1
        return super().__getitem__(i)


def images(n: int = 50) -> CountingDataset:
    pixels = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    masks = torch.nn.functional.one_hot(torch.arange(n) % 4, 4).bool()
    return CountingDataset(pixels, masks)


def test_training_batches_are_those_of_item_by_item_loading_read_whole():
    dataset = images()
    item_by_item = DataLoader(
        dataset, batch_size=8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3)
    )
    expected = list(item_by_item)
    CountingDataset.item_reads = 0
    served = list(make_loader(dataset, 8, train=True, device=CPU, seed=3))
    assert CountingDataset.item_reads == 0  # one indexing per batch, no call per image
    assert len(served) == len(expected) == 6  # 50 images, the last 2 dropped
    for (pixels, masks), (want_pixels, want_masks) in zip(served, expected):
        assert pixels.dtype == torch.uint8 and torch.equal(pixels, want_pixels) and torch.equal(masks, want_masks)


def test_evaluation_keeps_every_image_in_order():
    dataset = images()
    served = torch.cat([pixels for pixels, _ in make_loader(dataset, 16, train=False, device=CPU)])
    assert torch.equal(served, dataset.pixels)


def test_items_augmented_in_the_loader_are_still_read_one_by_one():
    dataset = images()
    dataset.augmentation = Augmentation()
    CountingDataset.item_reads = 0
    batch, _ = next(iter(make_loader(dataset, 8, train=True, device=CPU)))
    assert CountingDataset.item_reads == 8 and batch.shape == (8, 1, 4, 4)
