"""The training step, one function per step (torchvision's references/classification style).

Kept free of Flower: central, local-only and federated training, and the benchmark, all
train through `train_one_epoch` on a `TrainingSetup`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """FedProx: squared distance of the trainable weights to the round's global weights."""
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor) if p.requires_grad)


@dataclass
class DriftCorrection:
    """SCAFFOLD's correction of a site's drift (Karimireddy et al. 2020), one tensor per trainable parameter
    in `model.parameters()` order: `correction` (c - c_i, the server's control variate minus the site's)
    is added to every minibatch gradient before the optimiser steps; `gradient_sum` adds up the gradients
    as computed, uncorrected, whose mean over the `steps` is the site's next c_i."""

    correction: list[torch.Tensor]
    gradient_sum: list[torch.Tensor] = field(init=False)
    steps: int = 0

    def __post_init__(self) -> None:
        self.gradient_sum = [torch.zeros_like(c) for c in self.correction]

    def mean_gradients(self) -> list[torch.Tensor]:
        return [total / max(self.steps, 1) for total in self.gradient_sum]


def correct_drift(
    model: nn.Module, drift: DriftCorrection, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Record this step's gradients, then move them by c - c_i (a parameter without a gradient is left alone)."""
    if scaler is not None:
        # The correction is in gradient units, so the gradients are unscaled first (scaler.step knows they are).
        scaler.unscale_(optimizer)
        if not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
            return  # an overflow: the scaler skips this step, and it is no gradient of the site's data either
    for parameter, correction, total in zip(model.parameters(), drift.correction, drift.gradient_sum, strict=True):
        if parameter.grad is not None:
            total += parameter.grad
            parameter.grad += correction
    drift.steps += 1


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,  # a DataLoader or a BatchRange of one: batches with a length
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    schedule: StepSchedule | None = None,
    class_weights: torch.Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
    anchor: list[torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    present_classes: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    batch_augmentation: Augmentation | None = None,
    drift: DriftCorrection | None = None,
) -> dict[str, float]:
    """One pass over the loader. Returns mean loss, images seen, seconds and images/second.

    batch_augmentation: applied to each whole batch on the device (else the loader's items
    arrive augmented, or not at all). drift: SCAFFOLD's gradient correction, which also
    records the gradients it corrects."""
    model.train()
    weights = class_weights.to(device) if class_weights is not None else None
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
        loss = coarse_label_loss(logits, masks, weights, present_classes, label_smoothing)
        if anchor is not None and proximal_mu > 0:
            loss = loss + proximal_mu / 2 * proximal_term(model, anchor)
        optimizer.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if drift is not None:
            correct_drift(model, drift, optimizer, scaler)
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
