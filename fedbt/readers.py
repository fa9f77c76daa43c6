"""Readers for the on-disk layouts people download, producing one ``Record`` per image.

Formats:
- ``class_folders``: ``<root>/[Training|Testing/]<label>/*.jpg`` (SARTAJ, the combined
  Kaggle set, figshare as JPEG folders, Br35H ``yes``/``no``).
- ``figshare_mat``: the original figshare release, MATLAB v7.3 (HDF5) files with a
  ``cjdata`` group holding ``image``, ``label`` (1 meningioma, 2 glioma, 3 pituitary), ``PID``.
- ``kaggle_combined``: the 7,023-image combined set, keeping the images of one origin
  (see ``fedbt.origins``).

Nothing is dropped silently: every file that is not used becomes a ``Problem``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fedbt.labels import FIGSHARE_MAT_LABELS
from fedbt.sites import SiteSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
SOURCE_SPLIT_DIRS = {"training": "train", "train": "train", "testing": "test", "test": "test"}


@dataclass(frozen=True)
class Record:
    site: str
    path: str
    source_label: str
    allowed: frozenset[str]
    sha256: str
    patient: str | None = None
    source_split: str | None = None  # 'train' / 'test' when the release splits itself


@dataclass(frozen=True)
class Problem:
    site: str
    path: str
    message: str


@dataclass
class SiteScan:
    site: SiteSpec
    records: list[Record]
    problems: list[Problem]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _split_roots(root: Path) -> list[tuple[Path, str | None]]:
    """The release's own split folders when present, else the root alone."""
    split_dirs = [
        (d, SOURCE_SPLIT_DIRS[d.name.lower()])
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name.lower() in SOURCE_SPLIT_DIRS
    ]
    return split_dirs or [(root, None)]


def _require_root(spec: SiteSpec) -> None:
    if not spec.root.is_dir():
        raise FileNotFoundError(f"site {spec.name}: data path {spec.root} does not exist")


def scan_class_folders(spec: SiteSpec) -> SiteScan:
    _require_root(spec)
    records: list[Record] = []
    problems: list[Problem] = []
    for split_root, source_split in _split_roots(spec.root):
        for label_dir in sorted(d for d in split_root.iterdir() if _visible(d)):
            if not label_dir.is_dir():
                problems.append(Problem(spec.name, str(label_dir), "stray file outside a class folder"))
                continue
            allowed = spec.allowed_for(label_dir.name)
            files = sorted(f for f in label_dir.rglob("*") if f.is_file() and _visible(f))
            if allowed is None:
                problems.append(Problem(spec.name, str(label_dir), f"unknown class folder, {len(files)} files skipped"))
                continue
            if not files:
                problems.append(Problem(spec.name, str(label_dir), "empty class folder"))
            for f in files:
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    problems.append(Problem(spec.name, str(f), "not an image file, skipped"))
                    continue
                records.append(Record(spec.name, str(f), label_dir.name, allowed, file_sha256(f), None, source_split))
    if not records:
        problems.append(Problem(spec.name, str(spec.root), "no images found"))
    return SiteScan(spec, records, problems)


def _mat_string(dataset: h5py.Dataset) -> str:
    """MATLAB stores char arrays as uint16 code points."""
    codes = np.asarray(dataset).astype(np.int64).ravel()
    return "".join(chr(c) for c in codes if c)


def read_mat_header(path: Path) -> tuple[int, str]:
    """Label number and patient id of a figshare .mat file, without the pixels."""
    try:
        with h5py.File(path, "r") as f:
            group = f["cjdata"]
            label = int(np.asarray(group["label"]).ravel()[0])
            patient = _mat_string(group["PID"]) if "PID" in group else ""
    except OSError as err:
        raise ValueError(f"not a readable MATLAB v7.3 (HDF5) file: {err}") from None
    except KeyError as err:
        raise ValueError(f"missing field {err} in cjdata") from None
    return label, patient


def read_mat_image(path: Path) -> np.ndarray:
    """The image of a figshare .mat file as a 2-D array (rows, columns)."""
    try:
        with h5py.File(path, "r") as f:
            # h5py sees MATLAB's column-major arrays transposed.
            return np.asarray(f["cjdata"]["image"]).T
    except (OSError, KeyError) as err:
        raise ValueError(f"cannot read cjdata/image: {err}") from None


def scan_figshare_mat(spec: SiteSpec) -> SiteScan:
    _require_root(spec)
    records: list[Record] = []
    problems: list[Problem] = []
    for f in sorted(p for p in spec.root.rglob("*") if p.is_file() and _visible(p)):
        if f.suffix.lower() != ".mat":
            problems.append(Problem(spec.name, str(f), "not a .mat file, skipped"))
            continue
        try:
            number, patient = read_mat_header(f)
        except ValueError as err:
            problems.append(Problem(spec.name, str(f), str(err)))
            continue
        source_label = FIGSHARE_MAT_LABELS.get(number)
        allowed = spec.allowed_for(source_label) if source_label else None
        if allowed is None:
            problems.append(Problem(spec.name, str(f), f"unknown label {number}, skipped"))
            continue
        records.append(Record(spec.name, str(f), source_label, allowed, file_sha256(f), patient or None, None))
    if not records:
        problems.append(Problem(spec.name, str(spec.root), "no .mat images found"))
    return SiteScan(spec, records, problems)


def scan_site(spec: SiteSpec) -> SiteScan:
    if spec.format == "class_folders":
        return scan_class_folders(spec)
    if spec.format == "figshare_mat":
        return scan_figshare_mat(spec)
    if spec.format == "kaggle_combined":
        from fedbt.origins import scan_kaggle_origin  # origins builds on this module's readers

        return scan_kaggle_origin(spec)
    raise ValueError(f"site {spec.name}: unknown format {spec.format!r}")
