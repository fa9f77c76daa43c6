"""What a site's local update adds to plain training: FedProx's and FedRS's losses, SCAFFOLD's
drift correction. The training engine (fedbt.train.engine) knows none of them: they enter it as
its criterion and its after-backward hook.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fedbt.train.engine import Criterion
from fedbt.train.losses import coarse_label_loss


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """FedProx: squared distance of the trainable weights to the round's global weights."""
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor) if p.requires_grad)


def site_criterion(
    model: nn.Module,
    class_weights: torch.Tensor | None,
    label_smoothing: float,
    device: torch.device,
    present_classes: torch.Tensor | None = None,
    anchor: list[torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
) -> Criterion:
    """The coarse-label loss a site minimises: over the classes it has (FedRS's restricted softmax,
    `present_classes`), plus mu/2 x the squared distance to the round's global weights (FedProx)."""
    weights = class_weights.to(device) if class_weights is not None else None
    base = functools.partial(
        coarse_label_loss, class_weights=weights, present_classes=present_classes, smoothing=label_smoothing
    )
    if anchor is None or proximal_mu <= 0:
        return base

    def with_proximal_term(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return base(logits, masks) + proximal_mu / 2 * proximal_term(model, anchor)

    return with_proximal_term


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


def drift_hook(
    model: nn.Module, drift: DriftCorrection, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> Callable[[], None]:
    """SCAFFOLD's correction as the engine's after-backward hook."""
    return functools.partial(correct_drift, model, drift, optimizer, scaler)
