"""One training set-up for every trainer: central and local-only runs, federated clients, the benchmark.

Each builds its model, optimiser, gradient scaler and class weights here, in the same order
(threads, device, seed, model, optimiser), so the same seed gives the same weights whichever
of them trains, and a change to how training is set up lands in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fedbt.config import ExperimentConfig
from fedbt.data.loader import make_loader
from fedbt.model.architectures import build_model
from fedbt.model.device import configure_threads, prepare_model, select_device
from fedbt.train.engine import build_optimizer, make_grad_scaler, seed_everything, train_one_epoch
from fedbt.train.losses import class_weights_from_masks
from fedbt.train.schedules import StepSchedule


@dataclass
class TrainingSetup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    class_weights: torch.Tensor | None


def param_groups(model: nn.Module, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Transfer learning trains layer4 at a lower LR than the new head ('lr_scale')."""
    if cfg.train.freeze_backbone_epochs <= 0:
        return [{"params": list(model.parameters())}]
    head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
    layer4 = [p for n, p in model.named_parameters() if n.startswith("layer4.")]
    factor = cfg.train.finetune_lr_factor
    # 'lr' holds for the plateau schedule; per-step schedules rescale by 'lr_scale'.
    return [{"params": head}, {"params": layer4, "lr": cfg.train.lr * factor, "lr_scale": factor}]


def new_model(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The untrained model of this experiment: the same weights for the same training seed."""
    seed_everything(cfg.training_seed)
    return build_model(cfg.model, num_classes, cfg.data.image_size)


def training_setup(
    cfg: ExperimentConfig,
    num_classes: int,
    train_masks: torch.Tensor | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> TrainingSetup:
    """Model (from `initial_state` when given) on its device, optimiser, scaler, class weights."""
    configure_threads(cfg.train.threads)
    device = select_device(cfg.train.device)
    model = new_model(cfg, num_classes)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    model = prepare_model(model, device)
    weights = class_weights_from_masks(train_masks) if cfg.train.class_weights and train_masks is not None else None
    return TrainingSetup(
        model=model,
        optimizer=build_optimizer(param_groups(model, cfg), cfg.train),
        scaler=make_grad_scaler(device),
        device=device,
        class_weights=weights,
    )


def steps_per_epoch(dataset: Dataset, cfg: ExperimentConfig, device: torch.device) -> int:
    return len(make_loader(dataset, cfg.train.batch_size, True, device))


def train_epoch(
    setup: TrainingSetup,
    dataset: Dataset,
    cfg: ExperimentConfig,
    schedule: StepSchedule | None,
    seed: int,
    loader_seed: int,
    anchor: list[torch.Tensor] | None = None,
    present_classes: torch.Tensor | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict[str, float]:
    """One pass over the dataset, seeded so that a resumed or repeated run draws the same batches."""
    seed_everything(seed)
    loader = make_loader(
        dataset, cfg.train.batch_size, True, setup.device, seed=loader_seed, workers=cfg.train.num_workers
    )
    return train_one_epoch(
        setup.model,
        loader,
        setup.optimizer,
        setup.device,
        schedule,
        setup.class_weights,
        setup.scaler,
        anchor=anchor,
        proximal_mu=cfg.federated.proximal_mu if anchor is not None else 0.0,
        on_step=on_step,
        present_classes=present_classes,
        label_smoothing=cfg.train.label_smoothing,
    )
