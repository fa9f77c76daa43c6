"""One training set-up for every trainer: central and local-only runs, federated clients, the benchmark.

Each builds its model, optimiser, gradient scaler and class weights here, in the same order
(threads, device, seed, model, optimiser), so the same seed gives the same weights whichever
of them trains, and a change to how training is set up lands in one place. Under
`privacy.enabled` a trainer makes its set-up private (`make_private`) before it trains.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedbt.config import ExperimentConfig
from fedbt.data.catalog import MRIDataset
from fedbt.data.loader import make_loader
from fedbt.data.transforms import Augmentation
from fedbt.model.architectures import build_model
from fedbt.model.device import configure_threads, prepare_model, select_device
from fedbt.train.engine import (
    Criterion,
    build_optimizer,
    coarse_criterion,
    make_grad_scaler,
    seed_everything,
    train_one_epoch,
)
from fedbt.train.losses import class_weights_from_masks
from fedbt.train.privacy import PrivacyAccount, open_account, poisson_batches, private_optimizer, restore_account
from fedbt.train.schedules import StepSchedule


@dataclass
class TrainingSetup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    class_weights: torch.Tensor | None
    privacy: PrivacyAccount | None = None


def param_groups(model: nn.Module, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Transfer learning trains layer4 at a lower LR than the new head ('lr_scale')."""
    if cfg.train.freeze_backbone_epochs <= 0:
        return [{"params": list(model.parameters())}]
    head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
    layer4 = [p for n, p in model.named_parameters() if n.startswith("layer4.")]
    factor = cfg.train.finetune_lr_factor
    # 'lr' holds for the plateau schedule; per-step schedules rescale by 'lr_scale'.
    return [{"params": head}, {"params": layer4, "lr": cfg.train.lr * factor, "lr_scale": factor}]


def new_model(cfg: ExperimentConfig, num_classes: int, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The untrained model of this experiment: the same weights for the same training seed.

    With `state`: the model holding those weights, built without drawing initial weights first
    (drawing ResNet18's 11M of them is most of building it, and every federated round's set-up
    would throw them away)."""
    seed_everything(cfg.training_seed)
    if state is None:
        return build_model(cfg.model, num_classes, cfg.data.image_size)
    with torch.device("meta"):
        model = build_model(cfg.model, num_classes, cfg.data.image_size)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state)  # strict: every weight and buffer the empty model holds is written
    return model


def training_setup(
    cfg: ExperimentConfig,
    num_classes: int,
    train_masks: torch.Tensor | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> TrainingSetup:
    """Model (from `initial_state` when given) on its device, optimiser, scaler, class weights."""
    configure_threads(cfg.train.threads)
    device = select_device(cfg.train.device)
    model = prepare_model(new_model(cfg, num_classes, initial_state), device)
    weights = class_weights_from_masks(train_masks) if cfg.train.class_weights and train_masks is not None else None
    return TrainingSetup(
        model=model,
        optimizer=build_optimizer(param_groups(model, cfg), cfg.train),
        scaler=make_grad_scaler(device),
        device=device,
        class_weights=weights,
    )


def epoch_loader(dataset: Dataset, cfg: ExperimentConfig, device: torch.device, seed: int = 0) -> DataLoader:
    """An epoch's shuffled batches. Under privacy, the loader whose length sets the Poisson
    sample rate: it keeps its last, smaller batch, since Poisson batches have no last one to drop."""
    shuffled = not cfg.privacy.enabled
    return make_loader(dataset, cfg.train.batch_size, shuffled, device, seed=seed, workers=cfg.train.num_workers)


class BatchRange:
    """Batches [start, stop) of a loader's epoch. The batches before `start` are drawn and dropped,
    so that the ranges of an epoch hold the images of the whole epoch's batches, in its order."""

    def __init__(self, loader: Iterable, batches: range) -> None:
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator:
        return itertools.islice(self.loader, self.batches.start, self.batches.stop)


def steps_per_epoch(dataset: Dataset, cfg: ExperimentConfig, device: torch.device) -> int:
    return len(epoch_loader(dataset, cfg, device))


def make_private(
    setup: TrainingSetup, dataset: Dataset, cfg: ExperimentConfig, planned_epochs: int, saved: dict | None
) -> TrainingSetup:
    """The set-up training with DP-SGD on `dataset`, its account open (or `saved` carried on).

    A fresh account fixes the noise that spends the target over `planned_epochs`; a saved one
    (an earlier round's, a checkpoint's) keeps its noise and what it spent.
    """
    loader = epoch_loader(dataset, cfg, setup.device)
    sample_rate = 1 / len(loader)
    if saved is None:
        account = open_account(cfg.privacy, sample_rate, planned_epochs * len(loader))
    else:
        account = restore_account(cfg.privacy, saved)
        if account.sample_rate != sample_rate:
            raise ValueError(
                f"privacy: the training data changed since the privacy account was opened "
                f"(sample rate {sample_rate:.6g}, was {account.sample_rate:.6g})"
            )
    return replace(
        setup,
        optimizer=private_optimizer(setup.model, setup.optimizer, loader, account),
        # A GradScaler unscales .grad; DP-SGD clips per-sample gradients before .grad exists.
        scaler=None,
        privacy=account,
    )


def place_augmentation(
    dataset: Dataset, cfg: ExperimentConfig, device: torch.device
) -> tuple[Dataset, Augmentation | None]:
    """The dataset the loader reads and the augmentation left for whole batches on the device:
    moved there under train.augment_on=device, or auto on CUDA."""
    on_device = cfg.train.augment_on == "device" or (cfg.train.augment_on == "auto" and device.type == "cuda")
    if on_device and isinstance(dataset, MRIDataset) and dataset.augmentation is not None:
        return dataset.without_augmentation(), dataset.augmentation
    return dataset, None


def train_epoch(
    setup: TrainingSetup,
    dataset: Dataset,
    cfg: ExperimentConfig,
    schedule: StepSchedule | None,
    seed: int,
    loader_seed: int,
    criterion: Criterion | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    after_backward: Callable[[], None] | None = None,
    batches: range | None = None,
) -> dict[str, float]:
    """One pass over the dataset, seeded so that a resumed or repeated run draws the same batches.

    criterion: the loss minimised (default: the coarse-label loss with the set-up's class weights
    and the configured label smoothing); after_backward: see train_one_epoch. batches: only these
    batches of the epoch (a federated round of a fraction of an epoch), with the images the whole
    epoch would put in them. Under privacy: Poisson batches, as many as the budget allows, and the
    epsilon spent after.
    """
    seed_everything(seed)
    dataset, batch_augmentation = place_augmentation(dataset, cfg, setup.device)
    loader = epoch_loader(dataset, cfg, setup.device, seed=loader_seed)
    batches = batches if batches is not None else range(len(loader))
    if cfg.privacy.enabled:
        if setup.privacy is None:
            raise ValueError("privacy.enabled, but this trainer does not train with differential privacy")
        batches = batches[: setup.privacy.steps_within_budget(len(batches))]
        loader = poisson_batches(loader, batches.stop)
    if batches != range(len(loader)):
        loader = BatchRange(loader, batches)
    criterion = criterion or coarse_criterion(setup.class_weights, cfg.train.label_smoothing, setup.device)
    stats = train_one_epoch(
        setup.model,
        criterion,
        setup.optimizer,
        loader,
        setup.device,
        schedule,
        setup.scaler,
        on_step=on_step,
        batch_augmentation=batch_augmentation,
        after_backward=after_backward,
    )
    if setup.privacy is not None:
        stats["epsilon"] = setup.privacy.epsilon()
    return stats
