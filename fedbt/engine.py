"""Training engine shared by central and federated code: one function per step.

Kept free of Flower.  Schedules are functions of *global progress* (0 at the
first step of the whole training, 1 at the last) so that a federated client
training round r of R continues the same learning-rate curve a central run
follows, instead of restarting it every round.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedbt.config import TrainConfig
from fedbt.labels import Task
from fedbt.metrics import classification_metrics

# Intensity normalisation applied on the device to uint8 batches; kept in checkpoints.
PIXEL_MEAN = 0.2
PIXEL_STD = 0.25


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(threads: int | None) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    # channels_last lets oneDNN (CPU) and cuDNN (GPU) pick their fastest conv kernels.
    return model.to(device=device, memory_format=torch.channels_last)


def to_device_batch(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, 1, S, S) -> normalised float on device, channels_last."""
    images = images.to(device, non_blocking=True).float().div_(255.0)
    images = images.sub_(PIXEL_MEAN).div_(PIXEL_STD)
    return images.contiguous(memory_format=torch.channels_last)


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


def coarse_label_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    present_classes: torch.Tensor | None = None,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """-log sum_{c in allowed} p_c: cross-entropy for fine labels, set likelihood for coarse ones.

    A Br35H 'tumour of unknown type' thus only pushes probability mass onto the
    tumour classes as a whole and never onto a type it cannot vouch for.
    With `present_classes` (restricted softmax, as in FedRS) the probabilities are
    normalised over the classes a site has at all: figshare, which has no healthy
    scans, then never learns to push 'no tumour' down, a class it knows nothing about.
    `smoothing` mixes in the cross-entropy to a uniform target over those classes, so a
    from-scratch model is not driven to ever larger logits on a few noisy labels.
    """
    logits = logits.float()
    if present_classes is not None:
        present_classes = present_classes.to(logits.device)
        logits = logits.masked_fill(~present_classes, float("-inf"))
    normaliser = logits.logsumexp(dim=1)
    per_sample = normaliser - logits.masked_fill(~masks, float("-inf")).logsumexp(dim=1)
    if smoothing > 0:
        in_play = logits if present_classes is None else logits[:, present_classes]
        per_sample = (1 - smoothing) * per_sample + smoothing * (normaliser - in_play.mean(dim=1))
    if class_weights is None:
        return per_sample.mean()
    weights = (masks.float() * class_weights).sum(1) / masks.sum(1)
    return (weights * per_sample).sum() / weights.sum()


def class_weights_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights; a coarse sample counts fractionally for each allowed class."""
    counts = (masks.float() / masks.sum(1, keepdim=True)).sum(0).clamp_min(1.0)
    return counts.sum() / (len(counts) * counts)


def lr_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at a point of the whole training (progress in [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "onecycle":
        # Warm up over the first 30% from lr/25, then cosine-anneal to ~0 (as torch's OneCycleLR).
        warm = 0.3
        if progress < warm:
            return 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * progress / warm)) / 2
        return 1e-4 / 25 + (1 - 1e-4 / 25) * (1 + math.cos(math.pi * (progress - warm) / (1 - warm))) / 2
    if schedule == "cosine":
        return (1 + math.cos(math.pi * progress)) / 2
    if schedule in ("constant", "plateau"):
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}: onecycle, cosine, plateau or constant")


def build_optimizer(params: Iterable[nn.Parameter] | list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Parameters or param groups; frozen parameters get no gradient and are skipped."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: adam, adamw or sgd")


def autocast_for(device: torch.device):
    """Mixed precision on CUDA (bf16 where supported, else fp16); full precision on CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def make_grad_scaler(device: torch.device) -> torch.amp.GradScaler | None:
    needs_scaling = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda") if needs_scaling else None


@dataclass
class StepSchedule:
    """Maps an optimiser step to an LR: steps [first_step, first_step + steps) of total_steps."""

    base_lr: float
    schedule: str
    total_steps: int
    first_step: int = 0

    def lr(self, step: int) -> float:
        return self.base_lr * lr_factor(self.schedule, (self.first_step + step) / max(self.total_steps - 1, 1))


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """FedProx: squared distance of the trainable weights to the round's global weights."""
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor) if p.requires_grad)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    schedule: StepSchedule | None = None,
    class_weights: torch.Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
    proximal_mu: float = 0.0,
    on_step: Callable[[int, int, float], None] | None = None,
    present_classes: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """One pass over the loader. Returns mean loss, images seen, seconds and images/second."""
    model.train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    weights = class_weights.to(device) if class_weights is not None else None
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    for step, (images, masks) in enumerate(loader):
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(step) * group.get("lr_scale", 1.0)
        images = to_device_batch(images, device)
        masks = masks.to(device, non_blocking=True)
        with autocast_for(device):
            logits = model(images)
        loss = coarse_label_loss(logits, masks, weights, present_classes, label_smoothing)
        if anchor is not None:
            loss = loss + proximal_mu / 2 * proximal_term(model, anchor)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total_loss += loss.item() * len(images)
        seen += len(images)
        if on_step is not None:
            on_step(step, len(loader), loss.item())
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(seen, 1),
        "images": seen,
        "seconds": seconds,
        "images_per_second": seen / max(seconds, 1e-9),
    }


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
