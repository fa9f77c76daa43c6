"""Personalised site models: a site adapts the federation's final global model on its own training
split and keeps the adaptation only where it scores higher on its own validation split.

The model a site would use is judged on the site's own images; the global model, the one the
federation publishes, is judged on every site's. Each candidate starts from the global model:

- ``batchnorm``: the BatchNorm statistics re-estimated on the site's training images (one pass,
  no gradient step): the global model's averaged statistics describe no site's scanner;
- ``head``: the last layer (ResNet's ``fc``) trained for ``personalise.epochs``, the rest frozen;
- ``all``: every layer trained for ``personalise.epochs`` at ``train.lr x personalise.lr_factor``;
- ``local``: not an adaptation but the site's own local-only model, where the site has one (the
  simulation trains it at the run's budget and seed): a hospital whose own model scores higher on
  its validation split than anything the federation gave it would use its own.

The training runs through `train_model`, the loop every model here trains with (its schedule,
loss, class weights and augmentation). Selection: the highest validation set accuracy, and the
global model unless a candidate beats it strictly, so personalisation never lowers the site's
validation score. Flower-free: the simulation runs it for every site after the federated run
(`fedbt personalise --run` for a finished one); in a deployment each site runs it in its answer
to the final request (fedbt.fl.site).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from fedbt.config import ExperimentConfig, TrainConfig
from fedbt.data.catalog import Catalog, MRIDataset
from fedbt.data.labels import get_task
from fedbt.data.loader import make_loader
from fedbt.data.partition import Partition
from fedbt.data.transforms import augmentation_for, to_device_batch
from fedbt.eval.inference import evaluate, validation_temperature_losses
from fedbt.model.checkpoint import save_checkpoint, store_temperature
from fedbt.model.device import prepare_model, select_device
from fedbt.progress import headline, log
from fedbt.train.central import TrainData, train_model
from fedbt.train.setup import new_model

GLOBAL = "global"
LOCAL = "local"
HEAD_PREFIX = "fc."


@dataclass
class SiteData:
    train: MRIDataset  # augmented as the run's training is
    val: MRIDataset
    test: MRIDataset

    @classmethod
    def of(cls, catalog: Catalog, partition: Partition, train: TrainConfig) -> SiteData:
        """A site's three splits, its training split augmented as `train` says."""
        return cls(
            train=catalog.subset(partition.indices["train"], augment=augmentation_for(train)),
            val=catalog.subset(partition.indices["val"]),
            test=catalog.subset(partition.indices["test"]),
        )


def global_model(cfg: ExperimentConfig, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    model = new_model(cfg, get_task(cfg.data.task).num_classes)
    model.load_state_dict(state)
    return prepare_model(model, device)


def reestimated_batchnorm(model: nn.Module, images: MRIDataset, cfg: ExperimentConfig, device: torch.device) -> None:
    """The BatchNorm layers' running statistics, recomputed as the mean over one pass of the site's images
    (torch's update_bn: cumulative, not a moving average) without augmentation; no weight changes."""
    loader = make_loader(images.without_augmentation(), cfg.train.batch_size, False, device)
    # A batch of one image has no spread per channel for BatchNorm to measure (torch refuses it in
    # training mode); a site with no larger batch keeps the statistics it has.
    if len(images) < 2:
        return
    update_bn((to_device_batch(batch, device) for batch, _ in loader if len(batch) > 1), model)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def has_head(model: nn.Module) -> bool:
    return any(name.startswith(HEAD_PREFIX) for name, _ in model.named_parameters())


def candidate_config(cfg: ExperimentConfig, candidate: str) -> ExperimentConfig:
    """The training settings of a fine-tuning candidate: its epochs, its LR, what it freezes."""
    pc = cfg.personalise
    train = replace(cfg.train, epochs=pc.epochs, early_stopping_patience=None)
    if candidate == "head":
        # train_model's transfer-learning freeze with every epoch frozen: only the head learns.
        train = replace(train, freeze_backbone_epochs=pc.epochs)
    else:
        train = replace(train, lr=cfg.train.lr * pc.lr_factor, freeze_backbone_epochs=0)
    # The personalised model stays at its site, as its training data does: no federation's privacy
    # account covers it (only aggregate scores of it leave the site).
    return replace(cfg, train=train, privacy=replace(cfg.privacy, enabled=False))


def adapts(candidate: str, model: nn.Module) -> bool:
    """Whether the model has what the candidate adapts (the small CNN has neither BatchNorm nor `fc`)."""
    if candidate == "batchnorm":
        return has_batchnorm(model)
    if candidate == "head":
        return has_head(model)
    return True


def adapted_model(
    candidate: str,
    cfg: ExperimentConfig,
    state: dict[str, torch.Tensor],
    data: SiteData,
    work: Path,
    kind: str,
    device: torch.device,
) -> nn.Module:
    """The global model adapted by `candidate`."""
    if candidate == "batchnorm":
        model = global_model(cfg, state, device)
        reestimated_batchnorm(model, data.train, cfg, device)
        return model
    model, _ = train_model(
        candidate_config(cfg, candidate),
        TrainData(train=data.train, val=data.val),
        work / candidate,
        f"{kind} {candidate}",
        initial_state=state,
    )
    return model


def select(validation: dict[str, dict]) -> str:
    """The candidate with the highest validation set accuracy; the global model (first) unless one
    beats it strictly, and among equals the one tried first."""
    best = GLOBAL
    for name, metrics in validation.items():
        if metrics["set_accuracy"] > validation[best]["set_accuracy"]:
            best = name
    return best


def personalise_site(
    cfg: ExperimentConfig,
    state: dict[str, torch.Tensor],
    data: SiteData,
    out_dir: Path,
    kind: str,
    local_state: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Try every candidate of cfg.personalise on the site's data, keep the selected model as
    out_dir/final.pt (its temperature fitted on the site's validation split) and return its test
    metrics on the site's test split, with each candidate's validation and test scores.
    `local_state`: the site's local-only model, the 'local' candidate (not tried without one)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(cfg.train.device)
    task = get_task(cfg.data.task)
    start = time.perf_counter()

    def score(model: nn.Module, dataset: MRIDataset, temperature: float = 1.0) -> dict:
        return evaluate(model, make_loader(dataset, cfg.train.batch_size, False, device), device, task, temperature)

    work = out_dir / "candidates"
    models = {GLOBAL: global_model(cfg, state, device)}
    for candidate in cfg.personalise.candidates:
        if candidate == LOCAL:
            if local_state is not None:
                models[LOCAL] = global_model(cfg, local_state, device)
        elif adapts(candidate, models[GLOBAL]):
            models[candidate] = adapted_model(candidate, cfg, state, data, work, kind, device)
    validation = {name: score(model, data.val) for name, model in models.items()}
    chosen = select(validation)
    model = models[chosen]
    losses = validation_temperature_losses(model, make_loader(data.val, cfg.train.batch_size, False, device), device)
    temperature = losses.best_temperature()
    # Only the kept model is stored: a candidate's checkpoints are as large as the model.
    shutil.rmtree(work, ignore_errors=True)
    final = save_checkpoint(out_dir / "final.pt", model, cfg, {"personalised": chosen}, kind)
    store_temperature(final, temperature)
    result = {
        "kind": "personalised",
        "chosen": chosen,
        "train_images": len(data.train),
        "temperature": temperature,
        # Every candidate's test score is kept to measure which adaptation helps; only the chosen one's is reported.
        "candidates": {
            name: {"val": headline(validation[name]), "test_set_accuracy": score(m, data.test)["set_accuracy"]}
            for name, m in models.items()
        },
        "test": score(model, data.test, temperature),
        "wall_seconds": time.perf_counter() - start,
    }
    log(
        f"[{kind}] kept {chosen}: validation set accuracy "
        + ", ".join(f"{name} {metrics['set_accuracy']:.4f}" for name, metrics in validation.items())
    )
    return result
