"""Versioned checkpoint format: everything predict and evaluate need, in one file.

Format ``fedbt-checkpoint`` version 1, a dict saved with ``torch.save``:
- ``model_state``: state_dict; ``model``: ModelConfig as a dict
- ``task``, ``classes``, ``image_size``, ``normalization`` ({'mean', 'std'} on [0, 1] pixels)
- ``config``: the whole ExperimentConfig; ``provenance``: who trained it, when, on what
- ``progress``: {'kind': 'central'|'federated', 'epoch' or 'round', 'history', ...}
- ``optimizer_state`` (optional): for resuming
- ``temperature`` (optional, a float): what the model's logits are divided by before the softmax
  (fedbt.eval.calibration), fitted on validation data after training; absent means 1

Only tensors and plain values (dicts, lists, strings, numbers) are stored, and files are read
with ``torch.load(weights_only=True)``: a checkpoint can never run code when it is loaded. A file
holding anything else is refused, with no command that would unpickle it: a checkpoint an older
fedbt wrote with pickled objects is retrained, or re-saved by the fedbt that wrote it.
"""

from __future__ import annotations

import datetime as dt
import pickle
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedbt.config import ExperimentConfig, ModelConfig, from_dict, to_dict
from fedbt.data.labels import get_task
from fedbt.data.transforms import PIXEL_MEAN, PIXEL_STD
from fedbt.fileio import atomic_write
from fedbt.model.architectures import build_model

FORMAT = "fedbt-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    pass


def provenance(kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "torch": str(torch.__version__),  # a plain string: torch's version object would need unpickling
    }


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: ExperimentConfig,
    progress: dict[str, Any],
    kind: str,
    optimizer_state: dict | None = None,
) -> Path:
    task = get_task(cfg.data.task)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": to_dict(cfg.model),
        "task": task.name,
        "classes": list(task.classes),
        "image_size": cfg.data.image_size,
        "normalization": {"mean": PIXEL_MEAN, "std": PIXEL_STD},
        "config": to_dict(cfg),
        "provenance": provenance(kind),
        "progress": progress,
        "optimizer_state": optimizer_state,
    }
    # All at once, so an interrupted save never leaves a broken 'last' checkpoint; private, as
    # weights trained on patient images are.
    return atomic_write(path, lambda fh: torch.save(payload, fh), private=True)


def load_checkpoint(path: str | Path, expect_task: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: it holds pickled Python objects, not only tensors and plain values "
            f"(an older fedbt's checkpoint, or not a checkpoint at all); fedbt never unpickles a file: "
            f"retrain it, or load and re-save it with the fedbt version that wrote it"
        ) from None
    except Exception as err:  # noqa: BLE001 - any other reading failure means "not a checkpoint"
        raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedbt checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {payload.get('version')}, this fedbt reads version {VERSION}"
        )
    if expect_task is not None and payload["task"] != expect_task:
        raise CheckpointError(f"{path}: checkpoint is for task {payload['task']!r}, not {expect_task!r}")
    return payload


def store_temperature(path: str | Path, temperature: float) -> None:
    """Write the fitted temperature into a saved checkpoint (it is fitted once training has ended)."""
    payload = load_checkpoint(path)
    payload["temperature"] = float(temperature)
    atomic_write(path, lambda fh: torch.save(payload, fh), private=True)


def temperature_of(payload: dict[str, Any]) -> float:
    """The checkpoint's temperature; 1 (the probabilities as the model gives them) for one saved before calibration."""
    temperature = payload.get("temperature", 1.0)
    if type(temperature) is not float or not 0 < temperature < float("inf"):
        raise CheckpointError(f"checkpoint temperature {temperature!r} is not a positive number")
    return temperature


def model_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    model = build_model(ModelConfig(**payload["model"]), len(payload["classes"]), payload["image_size"])
    model.load_state_dict(payload["model_state"])
    return model


def config_from_checkpoint(payload: dict[str, Any]) -> ExperimentConfig:
    return from_dict(payload["config"], strict=False)
