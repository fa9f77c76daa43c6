"""``nifti``: one volume a file (.nii or .nii.gz, read by nibabel), labelled from a CSV
keyed by subject or by file. A file's subject is the first folder under the root
(BIDS: ``sub-01/anat/sub-01_T1w.nii.gz``), or the file itself when it lies in the root.

Read from a file: its voxels and their shape. The header's description and the subject
folder's name are not kept; the subject enters records as a keyed hash.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

from fedbt.data.readers.volumes import NOT_PICKED, LabelTable, SkippedFile, finish_scan, keyed_hash, site_secret
from fedbt.data.records import Problem, Record, SiteScan, VolumeSlice, _require_root, file_sha256, list_files
from fedbt.data.sites import SiteSpec, SliceRule, Window

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    return next(path.name[: -len(s)] for s in NIFTI_SUFFIXES if path.name.lower().endswith(s))


def subject_of(path: Path, root: Path) -> str:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else _stem(path)


def read_volume(path: Path) -> np.ndarray:
    """The voxels as float32, 3-D (a 4-D file with one volume counts); SkippedFile otherwise."""
    try:
        voxels = np.asarray(nib.load(path).get_fdata(dtype=np.float32))
    except Exception as err:  # noqa: BLE001 - nibabel, gzip and zlib raise many types on a damaged file
        raise SkippedFile("unreadable", f"unreadable NIfTI file ({type(err).__name__}: {err})") from None
    if voxels.ndim == 4 and voxels.shape[3] == 1:
        voxels = voxels[..., 0]
    if voxels.ndim != 3:
        raise SkippedFile("not a volume", f"not one 3-D volume: shape {voxels.shape}")
    return voxels


def volume_slices(
    shape: tuple[int, ...], axis: int, rule: SliceRule, window: Window | None, series: str
) -> list[VolumeSlice]:
    """The picked slices of one volume; SkippedFile when it has a single slice along `axis`."""
    if shape[axis] < 2:
        raise SkippedFile("not a volume", f"one slice along axis {axis} (shape {shape}): not a volume")
    chosen = (window.center, window.width) if window else None
    return [VolumeSlice(series, series, i, axis, chosen) for i in rule.pick(shape[axis])]


def slice_digest(file_digest: str, where: VolumeSlice) -> str:
    """A slice's cache and duplicate key: the file's content and how the slice is cut from it."""
    return hashlib.sha256(f"{file_digest}:{where.axis}:{where.index}:{where.window}".encode()).hexdigest()


def read_nifti_slice(path: str, index: int, axis: int) -> np.ndarray:
    """One 2-D slice of a volume, rows and columns as the voxel array stores them."""
    return np.take(read_volume(Path(path)), index, axis=axis)


def scan_nifti(spec: SiteSpec) -> SiteScan:
    _require_root(spec)
    layout = spec.volumes
    secret = site_secret(spec)
    table = LabelTable(spec)
    problems: list[Problem] = []
    tally: Counter[str] = Counter()
    records: list[Record] = []
    for f in list_files(spec.root, spec.name, problems):
        if f == table.path:
            continue
        if not is_nifti(f):
            problems.append(Problem(spec.name, str(f), "not a NIfTI file (.nii, .nii.gz), skipped"))
            tally["not NIfTI"] += 1
            continue
        relative = f.relative_to(spec.root).as_posix()
        subject = subject_of(f, spec.root)
        try:
            shape = read_volume(f).shape  # read whole: a file cut short fails here, once, not once a slice
            series = keyed_hash(secret, "volume", relative)
            picked = volume_slices(shape, layout.axis, layout.slices, layout.window, series)
        except SkippedFile as skipped:
            problems.append(Problem(spec.name, str(f), f"{skipped}, skipped"))
            tally[skipped.reason] += 1
            continue
        label = table.label_of(subject if layout.key == "subject" else relative)
        if label is None:
            problems.append(Problem(spec.name, str(f), f"its {layout.key} has no row in {table.path.name}, skipped"))
            tally["no label"] += shape[layout.axis]
            continue
        tally[NOT_PICKED] += shape[layout.axis] - len(picked)
        digest = file_sha256(f)
        patient = keyed_hash(secret, "patient", subject)
        allowed = spec.allowed_for(label)
        records += [
            Record(spec.name, str(f), label, allowed, slice_digest(digest, s), patient, None, s) for s in picked
        ]
    table.check_all_used("NIfTI file")
    return finish_scan(spec, records, problems, tally)
