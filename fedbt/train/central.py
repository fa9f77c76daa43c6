"""Centrally trained baseline (and local-only models): the plain training loop over the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedbt.config import ExperimentConfig, to_dict
from fedbt.data.catalog import Catalog, MRIDataset
from fedbt.data.labels import get_task
from fedbt.data.loader import make_loader
from fedbt.data.transforms import augmentation_for
from fedbt.eval.calibration import calibration_summary
from fedbt.eval.inference import evaluate, validation_temperature_losses
from fedbt.fileio import write_json
from fedbt.model.architectures import set_backbone_trainable
from fedbt.model.checkpoint import load_checkpoint, save_checkpoint, store_temperature
from fedbt.model.device import select_device
from fedbt.progress import headline, log, step_logger
from fedbt.reports.plots import plot_training_curves
from fedbt.tracking import Tracker, experiment_run
from fedbt.train.schedules import StepSchedule
from fedbt.train.setup import make_private, steps_per_epoch, train_epoch, training_setup


@dataclass
class TrainData:
    train: MRIDataset
    val: MRIDataset


def evaluate_everywhere(
    model: nn.Module, catalog: Catalog, device: torch.device, batch_size: int, temperature: float = 1.0
) -> dict:
    """Test metrics, of the probabilities at the temperature, on the pooled test split and on every site's.

    When test images were held out (another site trains on their picture), the pooled split is
    scored with them too, to show how much the control moves the figures."""

    def score(dataset: MRIDataset) -> dict:
        return evaluate(model, make_loader(dataset, batch_size, False, device), device, catalog.task, temperature)

    scores = {
        "pooled": score(catalog.dataset(split="test", pooled=True)),
        "sites": {name: score(catalog.dataset(site=name, split="test")) for name in catalog.site_names},
    }
    if catalog.held_out_test:
        scores["pooled_with_held_out"] = score(catalog.dataset(split="test", pooled=True, keep_held_out=True))
    return scores


def _apply_freezing(model: nn.Module, cfg: ExperimentConfig, epoch: int) -> None:
    if cfg.train.freeze_backbone_epochs <= 0:
        return
    frozen = epoch < cfg.train.freeze_backbone_epochs
    set_backbone_trainable(model, ("fc.",) if frozen else ("fc.", "layer4."))


def train_model(
    cfg: ExperimentConfig,
    data: TrainData,
    out_dir: Path,
    kind: str,
    resume: bool = False,
    tracker: Tracker | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Train for cfg.train.epochs (or until early stopping ends it); returns the final model and history.

    Like every run here it reports the model it ends with: validation is watched, and may stop
    training early, but never picks an earlier epoch's model. out_dir gets last.pt every epoch (for
    resuming) and final.pt, the reported model, at the end. A tracker gets each epoch's numbers as
    the epoch ends. initial_state: the weights to start from (a site adapting the global model)
    instead of the seed's untrained ones."""
    tracker = tracker or Tracker()
    tc = cfg.train
    last_path = out_dir / "last.pt"
    saved = load_checkpoint(last_path) if resume and last_path.is_file() else None
    setup = training_setup(cfg, data.train.masks.shape[1], data.train.masks, initial_state)
    if cfg.privacy.enabled:
        saved_account = saved["optimizer_state"].get("privacy") if saved is not None else None
        setup = make_private(setup, data.train, cfg, tc.epochs, saved_account)
    model, optimizer = setup.model, setup.optimizer
    plateau = None
    if tc.schedule == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.3, patience=1)
    val_loader = make_loader(data.val, tc.batch_size, False, setup.device)
    steps = steps_per_epoch(data.train, cfg, setup.device)
    task = get_task(cfg.data.task)

    history: list[dict] = []
    start_epoch, best_loss, stale = 0, float("inf"), 0
    if saved is not None:
        model.load_state_dict(saved["model_state"])
        optimizer.load_state_dict(saved["optimizer_state"]["optimizer"])
        if plateau is not None:
            plateau.load_state_dict(saved["optimizer_state"]["plateau"])
        history = saved["progress"]["history"]
        start_epoch = saved["progress"]["epoch"] + 1
        best_loss, stale = saved["progress"]["best_val_loss"], saved["progress"]["stale_epochs"]
        log(f"[{kind}] resuming after epoch {start_epoch} of {tc.epochs}")

    for epoch in range(start_epoch, tc.epochs):
        if setup.privacy is not None and setup.privacy.budget_spent():
            log(f"[{kind}] privacy budget spent (epsilon {setup.privacy.epsilon():.2f}): training stops")
            break
        _apply_freezing(model, cfg, epoch)
        # ReduceLROnPlateau owns the LR under 'plateau'; a per-step schedule would overwrite it.
        schedule = None if plateau else StepSchedule(tc.lr, tc.schedule, tc.epochs * steps, epoch * steps)
        # Seeded per epoch, so a resumed run draws the same batches and augmentations.
        seed = cfg.training_seed + epoch
        logger = step_logger(kind, epoch, tc.epochs, tc.log_every)
        stats = train_epoch(setup, data.train, cfg, schedule, seed, loader_seed=seed, on_step=logger)
        val = evaluate(model, val_loader, setup.device, task)
        if plateau is not None:
            plateau.step(val["loss"])
        history.append({"epoch": epoch + 1, "train": stats, "val": headline(val)})
        target = cfg.privacy.target_epsilon
        spent = f", epsilon {stats['epsilon']:.2f} of {target:g} spent" if "epsilon" in stats else ""
        tracker.log_epoch(history[-1])
        log(
            f"[{kind}] epoch {epoch + 1}/{tc.epochs} train loss {stats['loss']:.4f} "
            f"({stats['images_per_second']:.1f} img/s{spent}) val loss {val['loss']:.4f} "
            f"val acc {val.get('accuracy', float('nan')):.4f}"
        )
        improved = val["loss"] < best_loss
        best_loss, stale = (val["loss"], 0) if improved else (best_loss, stale + 1)
        progress = {"epoch": epoch, "history": history, "best_val_loss": best_loss, "stale_epochs": stale}
        opt_state = {
            "optimizer": optimizer.state_dict(),
            "plateau": plateau.state_dict() if plateau else None,
            "privacy": setup.privacy.as_plain() if setup.privacy is not None else None,
        }
        save_checkpoint(last_path, model, cfg, progress, kind, opt_state)
        if tc.early_stopping_patience is not None and stale >= tc.early_stopping_patience:
            log(f"[{kind}] early stop: val loss has not improved for {stale} epochs")
            break

    save_checkpoint(out_dir / "final.pt", model, cfg, {"epoch": len(history) - 1, "history": history}, kind)
    return model, history


def privacy_summary(cfg: ExperimentConfig, history: list[dict]) -> dict:
    """The (epsilon, delta) the training spent: what its last epoch reports."""
    return {"epsilon_spent": history[-1]["train"]["epsilon"], **to_dict(cfg.privacy)}


def run_central(cfg: ExperimentConfig, catalog: Catalog, out_dir: Path, resume: bool = False) -> dict:
    """Train on the pooled, de-duplicated training splits of all sites; evaluate everywhere."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = TrainData(
        train=catalog.dataset(split="train", pooled=True, augment=augmentation_for(cfg.train)),
        val=catalog.dataset(split="val", pooled=True),
    )
    log(f"[central] {len(data.train)} training images, {len(data.val)} validation images (pooled, each once)")
    with experiment_run(cfg, "central") as tracker:
        start = time.perf_counter()
        model, history = train_model(cfg, data, out_dir, "central", resume, tracker)
        wall = time.perf_counter() - start
        device = select_device(cfg.train.device)
        # Calibrated on the pooled validation split, as the federation is on the sum of its sites'.
        val_loader = make_loader(data.val, cfg.train.batch_size, False, device)
        losses = validation_temperature_losses(model, val_loader, device)
        temperature = losses.best_temperature()
        store_temperature(out_dir / "final.pt", temperature)
        result = {
            "kind": "central",
            "train_images": len(data.train),
            "epochs": cfg.train.epochs,
            "wall_seconds": wall,
            "history": history,
            "test": evaluate_everywhere(model, catalog, device, cfg.train.batch_size, temperature),
        }
        result["calibration"] = calibration_summary(losses, "the pooled validation split", result["test"]["pooled"])
        if cfg.privacy.enabled:
            result["privacy"] = privacy_summary(cfg, history)
        write_json(out_dir / "metrics.json", result)
        plot_training_curves(history, out_dir / "curves.png", title=f"central {cfg.model.name}")
        tracker.log_result(result, out_dir / "metrics.json", out_dir / "curves.png", out_dir / "final.pt")
    return result
