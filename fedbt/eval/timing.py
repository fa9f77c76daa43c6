"""Inference speed, host to host: what a single request costs, and a batch."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from fedbt.data.catalog import MRIDataset
from fedbt.eval.inference import predict_probabilities


def latency_ms(model: nn.Module, dataset: MRIDataset, device: torch.device, repeats: int, warmup: int) -> float:
    """Median ms to predict one image, input on the host to probabilities on the host."""
    # A one-batch list stands in for a loader: what a single request costs, without DataLoader startup.
    one = [(dataset.pixels[:1], dataset.masks[:1])]
    for _ in range(warmup):
        predict_probabilities(model, one, device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict_probabilities(model, one, device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure_latency(
    model: nn.Module, pixels: torch.Tensor, device: torch.device, batch: int = 32, repeats: int = 20, warmup: int = 3
) -> dict:
    """Median ms per image at batch 1 and images/s at `batch`, after warm-up, host to host ."""
    targets = torch.zeros((len(pixels), 1), dtype=torch.bool)  # predict_probabilities reads (image, target) pairs
    single = latency_ms(model, MRIDataset(pixels, targets), device, repeats, warmup)
    filled = torch.arange(batch) % len(pixels)  # repeats images when fewer were evaluated: same cost
    full = [(pixels[filled], targets[filled])]
    for _ in range(warmup):
        predict_probabilities(model, full, device)
    start = time.perf_counter()
    for _ in range(repeats):
        predict_probabilities(model, full, device)  # returns numpy arrays: the device has finished
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "ms_per_image_batch1": single,
        "batch": batch,
        "images_per_second_batched": batch * repeats / (time.perf_counter() - start),
    }
