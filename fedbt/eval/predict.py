"""Standalone prediction: image files, DICOM files and folders, NIfTI volumes or folders in;
labels, probabilities and Grad-CAM overlays out.

Every image goes through the pipeline training used: ``decode_file`` -> ``preprocess``
at the checkpoint's image size and crop setting -> uint8 batch -> the engine's on-device
normalisation.  A DICOM series or NIfTI volume gives the slices a `SliceRule` picks, one row
each, naming its input and its slice.  A file that cannot be read becomes one error row;
the others go on.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbt.config import DataConfig, ExperimentConfig
from fedbt.data.catalog import MRIDataset
from fedbt.data.images import ImageLimits, UnusableImage, decode_file, preprocess
from fedbt.data.labels import Task, get_task
from fedbt.data.loader import make_loader
from fedbt.data.readers.dicom import dicom_series_slices, is_dicom_file
from fedbt.data.readers.nifti import is_nifti, read_volume, slice_digest, volume_slices
from fedbt.data.readers.volumes import SkippedFile
from fedbt.data.records import IMAGE_SUFFIXES, Problem, VolumeSlice, file_sha256, list_files
from fedbt.data.sites import SliceRule
from fedbt.data.transforms import PIXEL_MEAN, PIXEL_STD, to_device_batch
from fedbt.eval.calibration import tempered_probabilities
from fedbt.eval.gradcam import grad_cam, save_overlay
from fedbt.eval.inference import predict_log_probabilities
from fedbt.fileio import write_text
from fedbt.model.checkpoint import (
    CheckpointError,
    config_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    temperature_of,
)
from fedbt.model.device import prepare_model, select_device

PREDICT_SUFFIXES = IMAGE_SUFFIXES | {".mat"}  # and DICOM and NIfTI files, found by is_volume_file
CAM_BATCH = 32  # Grad-CAM keeps activations and gradients: smaller batches than plain inference


@dataclass
class LoadedModel:
    """A checkpoint's model on a device, with what its inputs must look like and its calibration temperature."""

    path: str
    model: nn.Module
    task: Task
    config: ExperimentConfig
    provenance: dict[str, Any]
    device: torch.device
    temperature: float = 1.0

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def crop(self) -> bool:
        return self.config.data.crop_to_content

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "architecture": self.config.model.name,
            "task": self.task.name,
            "classes": list(self.task.classes),
            "image_size": self.image_size,
            "crop_to_content": self.crop,
            "temperature": self.temperature,
            "provenance": self.provenance,
        }

    def log_probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Log-softmax outputs (N, C) before calibration, for uint8 images (N, 1, S, S)."""
        # predict_log_probabilities reads (image, target) pairs; the targets are not used here.
        targets = torch.zeros((len(pixels), self.task.num_classes), dtype=torch.bool)
        loader = make_loader(MRIDataset(pixels, targets), self.config.train.batch_size, False, self.device)
        return predict_log_probabilities(self.model, loader, self.device)[0]

    def probabilities(self, pixels: torch.Tensor) -> np.ndarray:
        """Calibrated softmax outputs (N, C): at the checkpoint's temperature."""
        return tempered_probabilities(self.log_probabilities(pixels), self.temperature)


def load_model(path: str | Path, device: str = "auto", expect_task: str | None = None) -> LoadedModel:
    payload = load_checkpoint(path, expect_task)
    norm = payload["normalization"]
    # The engine normalises every batch on the device with its own constants (to_device_batch);
    # a model trained with other ones would get inputs it never saw, silently.
    if not (math.isclose(norm["mean"], PIXEL_MEAN) and math.isclose(norm["std"], PIXEL_STD)):
        raise CheckpointError(
            f"{path}: trained with pixel mean {norm['mean']} and std {norm['std']}; "
            f"this fedbt normalises with mean {PIXEL_MEAN} and std {PIXEL_STD}"
        )
    config = config_from_checkpoint(payload)
    config.data.image_size = payload["image_size"]  # the checkpoint's own field is the one build_model used
    torch_device = select_device(device)
    model = prepare_model(model_from_checkpoint(payload), torch_device).eval()
    task = get_task(payload["task"])
    return LoadedModel(str(path), model, task, config, payload["provenance"], torch_device, temperature_of(payload))


@dataclass
class Prediction:
    path: str
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    gradcam: str | None = None
    error: str | None = None
    slice: str | None = None  # which slice of a DICOM series or NIfTI volume was scored

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ImageInput:
    """One image to score: a file, or one slice of a DICOM series or NIfTI volume."""

    path: Path
    key: str  # content hash: the decode cache's key
    where: VolumeSlice | None = None


@dataclass
class InputReport:
    """What one named input gave: the images to score, error rows, and which slices were picked."""

    name: str
    images: list[ImageInput]
    errors: list[Prediction]
    slices: str | None = None  # for DICOM and NIfTI inputs: "scored ... of ..."


def nifti_inputs(path: Path, rule: SliceRule, axis: int) -> tuple[list[ImageInput], str]:
    """The picked slices of a volume, and which they are; SkippedFile when it has none to give."""
    shape = read_volume(path).shape
    digest = file_sha256(path)
    picked = volume_slices(shape, axis, rule, None, "")
    first, last = picked[0].index, picked[-1].index
    which = f"{path.name} slices {first}-{last} of {shape[axis]} along axis {axis} ({rule.describe()})"
    return [ImageInput(path, slice_digest(digest, s), s) for s in picked], which


def add_image(report: InputReport, path: Path) -> None:
    try:
        report.images.append(ImageInput(path, file_sha256(path)))
    except OSError as err:
        report.errors.append(Prediction(str(path), error=f"cannot be read ({err.strerror})"))


def expand_input(name: str, rule: SliceRule, axis: int) -> InputReport:
    """A named file or folder (searched recursively) as images to score, and what was left out."""
    path = Path(name)
    report = InputReport(name, [], [])
    if path.is_dir():
        problems: list[Problem] = []
        files = list_files(path, name, problems)
        report.errors += [Prediction(p.path, error=p.message) for p in problems]
    elif path.exists():
        files = [path]
    else:
        report.errors.append(Prediction(name, error="no such file or folder"))
        return report
    volume_slices_seen: list[str] = []
    dicom_files = []
    # A file named explicitly is tried whatever its suffix; a folder's, by suffix or DICM preamble.
    named = not path.is_dir()
    for f in files:
        if f.suffix.lower() in PREDICT_SUFFIXES:
            add_image(report, f)
        elif is_nifti(f):
            try:
                slices, which = nifti_inputs(f, rule, axis)
            except SkippedFile as err:
                report.errors.append(Prediction(str(f), error=str(err)))
                continue
            report.images += slices
            volume_slices_seen.append(which)
        elif is_dicom_file(f):
            dicom_files.append(f)
        elif named:
            add_image(report, f)
    if dicom_files:
        picked, left_out = dicom_series_slices(dicom_files, rule)
        report.images += [ImageInput(s.path, s.digest, s.where()) for s in picked]
        report.errors += [Prediction(str(f), error=why) for f, why in left_out]
        volume_slices_seen.append(f"{len(picked)} of {len(dicom_files)} DICOM files ({rule.describe()} of each series)")
    if volume_slices_seen:
        report.slices = "; ".join(volume_slices_seen)
    if path.is_dir() and not report.images and not report.errors:
        report.errors.append(Prediction(name, error="no image files in this folder"))
    return report


def read_input(path: Path, data: DataConfig, where: VolumeSlice | None = None) -> torch.Tensor:
    """(1, size, size) uint8 as training saw it (the image of a file, or its slice `where`);
    ValueError with the reason when it cannot be used."""
    try:
        image = decode_file(str(path), ImageLimits.of(data), where)
        return preprocess(image, data.image_size, data.crop_to_content)
    except UnusableImage as err:
        raise ValueError(err.reason) from None  # the row names the file
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file, not a crash
        raise ValueError(f"cannot decode image ({type(err).__name__}: {err})") from None


def predict_files(
    paths: list[str],
    model: LoadedModel,
    gradcam_dir: Path | None = None,
    rule: SliceRule = SliceRule(),
    axis: int = 2,
    reports: list[InputReport] | None = None,
) -> list[Prediction]:
    """One row per image (a file or a slice), in input order: the prediction, or why there is
    none. `reports`, when given, receives what each named input gave."""
    rows: list[Prediction] = []
    readable: list[int] = []
    pixels: list[torch.Tensor] = []
    for name in paths:
        report = expand_input(name, rule, axis)
        if reports is not None:
            reports.append(report)
        rows += report.errors
        for item in report.images:
            where = item.where.describe() if item.where and item.where.index is not None else None
            try:
                pixels.append(read_input(item.path, model.config.data, item.where))
            except ValueError as err:
                rows.append(Prediction(str(item.path), error=str(err), slice=where))
                continue
            readable.append(len(rows))
            rows.append(Prediction(str(item.path), slice=where))
    if not pixels:
        return rows
    batch = torch.stack(pixels)
    probs = model.probabilities(batch)
    classes = model.task.classes
    for row, p in zip((rows[i] for i in readable), probs):
        best = int(p.argmax())
        row.label, row.confidence = classes[best], float(p[best])
        row.probabilities = {c: float(v) for c, v in zip(classes, p)}
    if gradcam_dir is not None:
        write_overlays(model, batch, probs.argmax(axis=1), rows, readable, gradcam_dir)
    return rows


def write_overlays(
    model: LoadedModel,
    batch: torch.Tensor,
    predicted: np.ndarray,
    rows: list[Prediction],
    readable: list[int],
    folder: Path,
) -> None:
    """Grad-CAM of the predicted class over each image (batch[k] is rows[readable[k]]).

    Files are named <row number>-<file stem>.png: unique even when two folders hold the same name.
    """
    for start in range(0, len(batch), CAM_BATCH):
        part = slice(start, start + CAM_BATCH)
        cams = grad_cam(model.model, to_device_batch(batch[part], model.device), predicted[part].tolist()).cams
        for gray, cam, i in zip(batch[part, 0].numpy(), cams, readable[part]):
            rows[i].gradcam = str(save_overlay(gray, cam, folder / f"{i:04d}-{Path(rows[i].path).stem}.png"))


def format_predictions(rows: list[Prediction], classes: tuple[str, ...], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([r.as_dict() for r in rows], indent=2) + "\n"
    if fmt != "csv":
        raise ValueError(f"unknown format {fmt!r}: json or csv")
    text = io.StringIO()
    columns = ["path", "slice", "prediction", "confidence", *(f"p_{c}" for c in classes), "gradcam", "error"]
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    for r in rows:
        probs = {f"p_{c}": f"{v:.6f}" for c, v in (r.probabilities or {}).items()}
        confidence = "" if r.confidence is None else f"{r.confidence:.6f}"
        writer.writerow(
            {
                "path": r.path,
                "slice": r.slice or "",
                "prediction": r.label or "",
                "confidence": confidence,
                **probs,
                "gradcam": r.gradcam or "",
                "error": r.error or "",
            }
        )
    return text.getvalue()


def run_predict(
    paths: list[str],
    checkpoint: str,
    gradcam_dir: str | None = None,
    fmt: str = "json",
    output: str | None = None,
    device: str = "auto",
    rule: SliceRule = SliceRule(),
    axis: int = 2,
) -> int:
    """The `fedbt predict` command: exit code 0 when at least one image was predicted, else 1."""
    model = load_model(checkpoint, device)
    reports: list[InputReport] = []
    rows = predict_files(paths, model, Path(gradcam_dir) if gradcam_dir else None, rule, axis, reports)
    for report in reports:
        if report.slices:
            print(f"fedbt: {report.name}: scored {report.slices}", file=sys.stderr)
    for r in rows:
        if r.error:
            print(f"fedbt: error: {r.path}: {r.error}", file=sys.stderr)
    text = format_predictions(rows, model.task.classes, fmt)
    if output:
        write_text(output, text)
    else:
        sys.stdout.write(text)
    return 0 if any(r.label for r in rows) else 1
