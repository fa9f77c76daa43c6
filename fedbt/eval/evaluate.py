"""`fedbt evaluate`: score a checkpoint on a site's or the pooled test split (or a folder of
class folders holding images, DICOM files or series, NIfTI volumes), with the clinical
metrics, latency, Grad-CAM samples and a report page."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fedbt.config import DataConfig, TrackingConfig, to_dict
from fedbt.data.cache import ImageCache, fill_cache, load_pixels
from fedbt.data.catalog import build_catalog
from fedbt.data.images import ImageLimits
from fedbt.data.labels import KNOWN_SOURCE_LABELS
from fedbt.data.readers.class_folders import split_roots
from fedbt.data.records import Problem, Record, _visible
from fedbt.data.sites import SliceRule
from fedbt.data.transforms import to_device_batch
from fedbt.eval.calibration import tempered_probabilities
from fedbt.eval.clinical import clinical_metrics, mcnemar
from fedbt.eval.gradcam import grad_cam
from fedbt.eval.metrics import classification_metrics
from fedbt.eval.predict import LoadedModel, expand_input, load_model
from fedbt.eval.timing import measure_latency
from fedbt.reports.evaluation import write_evaluation_report
from fedbt.reports.plots import GridItem
from fedbt.tracking import numbers, tracked_run


@dataclass
class EvalRequest:
    checkpoint: str
    compare: str | None = None
    site: str | None = None  # a site's test split; None (and no folder): the pooled test split
    folder: str | None = None  # class folders named as in fedbt.labels.KNOWN_SOURCE_LABELS
    data_root: str | None = None  # None: the data root the checkpoint was trained on
    device: str = "auto"
    resamples: int = 1000
    seed: int = 0
    samples: int = 8  # images in the Grad-CAM grid
    slices: SliceRule = SliceRule()  # which slices of a folder's DICOM series and NIfTI volumes
    axis: int = 2  # the NIfTI voxel axis slices are cut across


@dataclass
class EvalSet:
    description: str
    records: list[Record]
    masks: torch.Tensor  # (N, C) bool
    problems: list[Problem]
    slices: dict[str, str] = field(default_factory=dict)  # DICOM/NIfTI input -> which slices were scored


def _cache_dir() -> str:
    # The checkpoint's cache path belongs to the machine that trained it; decode into this one's.
    return DataConfig().cache_dir


def eval_set(request: EvalRequest, model: LoadedModel) -> EvalSet:
    """The images to score: a folder of class folders, a site's test split or the pooled test split."""
    if request.folder:
        images = folder_set(request)
        masks = torch.tensor([model.task.target_mask(r.allowed) for r in images.records], dtype=torch.bool)
        images.masks = masks.reshape(-1, model.task.num_classes)  # (0, C) too when the folder holds no images
        return images
    # The checkpoint's data settings and seed deal the same splits as in training.
    trained_on = model.config.data
    data = replace(trained_on, data_root=request.data_root or trained_on.data_root, cache_dir=_cache_dir())
    catalog = build_catalog(data)
    indices = catalog.indices(request.site, "test", pooled=request.site is None)
    description = f"site {request.site} test split" if request.site else "pooled test split"
    problems = [p for p in catalog.problems if request.site in (None, p.site)]
    return EvalSet(description, [catalog.records[i] for i in indices], catalog.masks[indices], problems)


def folder_set(request: EvalRequest) -> EvalSet:
    """Class folders (a release's Training/Testing folders included), each holding what
    `fedbt predict` takes: images, .mat files, DICOM files and series, NIfTI volumes."""
    records: list[Record] = []
    problems: list[Problem] = []
    slices: dict[str, str] = {}
    for split_root, _ in split_roots(Path(request.folder)):
        for label_dir in sorted(d for d in split_root.iterdir() if _visible(d)):
            allowed = KNOWN_SOURCE_LABELS.get(label_dir.name) if label_dir.is_dir() else None
            if allowed is None:
                problems.append(Problem("folder", str(label_dir), "not a class folder named as in fedbt.data.labels"))
                continue
            found = expand_input(str(label_dir), request.slices, request.axis)
            problems += [Problem("folder", row.path, row.error or "") for row in found.errors]
            records += [
                Record("folder", str(i.path), label_dir.name, allowed, i.key, None, None, i.where) for i in found.images
            ]
            if found.slices:
                slices[str(label_dir)] = found.slices
    empty = torch.zeros((0, 0), dtype=torch.bool)
    return EvalSet(f"folder {request.folder}", records, empty, problems, slices)


def decode_for(model: LoadedModel, records: list[Record]) -> tuple[list[int], torch.Tensor, list[Problem]]:
    """The records' pixels as the model's training saw them: kept indices, pixels, unreadable files."""
    cache = ImageCache(_cache_dir(), model.image_size, model.crop, ImageLimits.of(model.config.data))
    errors = fill_cache(records, cache, progress=False)
    kept = [i for i, r in enumerate(records) if r.sha256 not in errors]
    problems = [Problem(r.site, r.path, errors[r.sha256]) for r in records if r.sha256 in errors]
    return kept, load_pixels([records[i] for i in kept], cache), problems


def fine_correct(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Whether each fine-labelled image's prediction is its class (the images accuracy counts)."""
    fine = masks.sum(axis=1) == 1
    return probs[fine].argmax(axis=1) == masks[fine].argmax(axis=1)


def set_correct(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Whether each image's prediction is a class its label allows (what set accuracy counts)."""
    return masks[np.arange(len(masks)), probs.argmax(axis=1)]


def sample_grid(
    model: LoadedModel, pixels: torch.Tensor, probs: np.ndarray, masks: np.ndarray, count: int
) -> list[GridItem]:
    """Mistakes first, then correct predictions, each with the Grad-CAM of its predicted class."""
    predicted = probs.argmax(axis=1)
    right = masks[np.arange(len(probs)), predicted]
    chosen = np.concatenate([np.flatnonzero(~right), np.flatnonzero(right)])[:count]
    cams = grad_cam(model.model, to_device_batch(pixels[chosen], model.device), predicted[chosen].tolist()).cams
    classes = model.task.classes
    items = []
    for i, cam in zip(chosen, cams):
        truth = "|".join(c for c, allowed in zip(classes, masks[i]) if allowed)
        title = f"{classes[predicted[i]]} {probs[i, predicted[i]]:.2f}\ntrue: {truth}"
        items.append(GridItem(pixels[i, 0].numpy(), cam, title, bool(right[i])))
    return items


def compare(other: LoadedModel, records: list[Record], masks: np.ndarray, probs: np.ndarray) -> dict:
    """The second model on the same images (at its own size and crop) and McNemar's test against the first."""
    kept, pixels, _ = decode_for(other, records)
    if len(kept) != len(records):
        raise ValueError(f"{other.path}: could not decode the same images as the evaluated checkpoint")
    other_probs = other.probabilities(pixels)
    metrics = classification_metrics(other_probs, masks, other.task)
    return {
        "checkpoint": other.path,
        "model": other.summary(),
        "metrics": {k: metrics.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")},
        "mcnemar": mcnemar(fine_correct(probs, masks), fine_correct(other_probs, masks)),
    }


def run_evaluation(request: EvalRequest, out: Path) -> dict:
    """Score the checkpoint (and the one to compare); write JSON, figures and the report into out."""
    model = load_model(request.checkpoint, request.device)
    # Both checkpoints are checked before any work: a wrong --compare fails in seconds, not after scoring.
    other = load_model(request.compare, request.device, expect_task=model.task.name) if request.compare else None
    images = eval_set(request, model)
    kept, pixels, unreadable = decode_for(model, images.records)
    if not kept:
        raise ValueError(f"no images to evaluate in the {images.description}")
    records, masks = [images.records[i] for i in kept], images.masks[kept].numpy()
    log_probs = model.log_probabilities(pixels)
    probs = tempered_probabilities(log_probs, model.temperature)  # calibrated: what the report shows
    result = {
        "checkpoint": str(request.checkpoint),
        "model": model.summary(),
        "data": {
            "description": images.description,
            "n": len(records),
            "slices_scored": images.slices,
            "problems": [{"path": p.path, "message": p.message} for p in images.problems + unreadable],
        },
        "metrics": clinical_metrics(probs, masks, model.task, request.resamples, request.seed, np.exp(log_probs)),
        "latency": measure_latency(model.model, pixels, model.device),
    }
    if other is not None:
        result["comparison"] = compare(other, records, masks, probs)
    write_evaluation_report(result, sample_grid(model, pixels, probs, masks, request.samples), out)
    log_evaluation(request, model, result, out)
    return result


def log_evaluation(request: EvalRequest, model: LoadedModel, result: dict, out: Path) -> None:
    """The evaluation as a run of the checkpoint's experiment, tracked as this machine tracks (no --set here)."""
    params = {"request": vars(request), "images": result["data"]["description"], "trained": to_dict(model.config)}
    with tracked_run(TrackingConfig(), model.config.name, f"evaluate {out.name}", params) as tracker:
        tracker.log_metrics({**numbers(result["metrics"], "test"), **numbers(result["latency"], "latency")})
        tracker.log_files(*sorted(out.iterdir()))
