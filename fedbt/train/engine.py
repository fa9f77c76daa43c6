"""The training step, one function per step (torchvision's references/classification style).

Central, local-only and federated training, and the benchmark, all train through
`train_one_epoch`, which knows no federated method: as torchvision's takes its criterion, it takes
the loss to minimise and a hook between backward and step (FedProx's and FedRS's losses and
SCAFFOLD's correction are fedbt.fl.local's).
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from fedbt.config import TrainConfig
from fedbt.data.transforms import Augmentation, to_device_batch
from fedbt.model.device import autocast_for
from fedbt.train.losses import coarse_label_loss
from fedbt.train.schedules import StepSchedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(params: Iterable[nn.Parameter] | list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Parameters or param groups; frozen parameters get no gradient and are skipped."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: adam, adamw or sgd")


def make_grad_scaler(device: torch.device) -> torch.amp.GradScaler | None:
    needs_scaling = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda") if needs_scaling else None


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()


# What a step's loss is: the model's output and the batch's label masks in, a scalar out. The
# model is the criterion's to close over when the loss depends on the weights (FedProx's pull).
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def coarse_criterion(
    class_weights: torch.Tensor | None, label_smoothing: float, device: torch.device
) -> Criterion:
    """The coarse-label loss every trainer minimises (fedbt.train.losses), with its class weights on the device."""
    weights = class_weights.to(device) if class_weights is not None else None
    return functools.partial(coarse_label_loss, class_weights=weights, smoothing=label_smoothing)


def train_one_epoch(
    model: nn.Module,
    criterion: Criterion,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,  # a DataLoader or a BatchRange of one: batches with a length
    device: torch.device,
    schedule: StepSchedule | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    batch_augmentation: Augmentation | None = None,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over the loader. Returns mean loss, images seen, seconds and images/second.

    batch_augmentation: applied to each whole batch on the device (else the loader's items
    arrive augmented, or not at all). after_backward: called between the backward pass and the
    optimiser's step, where a method may read or change the gradients (SCAFFOLD's correction)."""
    model.train()
    # Summed on the device (in float64, as Python floats would be): reading the loss every step
    # would make the host wait for each step to finish before it queues the next one.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen, start = 0, time.perf_counter()
    for step, (images, masks) in enumerate(loader):
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(step) * group.get("lr_scale", 1.0)
        images = to_device_batch(images, device, batch_augmentation)
        masks = masks.to(device, non_blocking=True)
        with autocast_for(device):
            logits = model(images)
        loss = criterion(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if after_backward is not None:
            after_backward()
        optimizer_step(optimizer, scaler)
        total_loss += loss.detach().double() * len(images)
        seen += len(images)
        if on_step is not None:
            # A 0-d tensor: a logger that formats it waits for the step, one that skips the step does not.
            on_step(step, len(loader), loss.detach())
    mean_loss = total_loss.item() / max(seen, 1)  # waits for the last step: the clock below includes it
    seconds = time.perf_counter() - start
    return {
        "loss": mean_loss,
        "images": seen,
        "seconds": seconds,
        "images_per_second": seen / max(seconds, 1e-9),
    }
