"""``figshare_mat``: the original figshare release, MATLAB v7.3 (HDF5) files with a
``cjdata`` group holding ``image``, ``label`` (1 meningioma, 2 glioma, 3 pituitary), ``PID``."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from fedbt.data.labels import FIGSHARE_MAT_LABELS
from fedbt.data.records import Problem, Record, SiteScan, _require_root, file_sha256, list_files
from fedbt.data.sites import SiteSpec


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


def mat_image_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape (rows, columns, ...) and type of a figshare .mat file's image, without its pixels."""
    try:
        with h5py.File(path, "r") as f:
            image = f["cjdata"]["image"]
            if not isinstance(image, h5py.Dataset):
                raise ValueError("cjdata/image is a group, not an array")
            # h5py sees MATLAB's column-major arrays transposed.
            return tuple(reversed(image.shape)), image.dtype
    except (OSError, KeyError) as err:
        raise ValueError(f"cannot read cjdata/image: {err}") from None


def read_mat_image(path: Path) -> np.ndarray:
    """The image of a figshare .mat file, as MATLAB holds it: (rows, columns) for a 2-D one."""
    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f["cjdata"]["image"]).T
    except (OSError, KeyError) as err:
        raise ValueError(f"cannot read cjdata/image: {err}") from None


def scan_figshare_mat(spec: SiteSpec) -> SiteScan:
    _require_root(spec)
    records: list[Record] = []
    problems: list[Problem] = []
    for f in list_files(spec.root, spec.name, problems):
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
