"""``dicom``: a folder tree of DICOM files (any nesting, one slice a file), grouped into
series by SeriesInstanceUID, labelled from a CSV keyed by PatientID, StudyInstanceUID or
SeriesInstanceUID (pydicom reads the files; nothing of the format is parsed here).

Read from a header: the label key; PatientID, StudyInstanceUID and SeriesInstanceUID, hashed
with the site's secret at once; ImageType (localisers), ImageOrientationPatient and
ImagePositionPatient (the plane, the slice order); Rows, Columns, NumberOfFrames; the
transfer syntax; RescaleSlope and RescaleIntercept; WindowCenter and WindowWidth. Nothing
else is kept: the header itself, names, dates, institutions and descriptions stay in the file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.misc import is_dicom
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.pixels.utils import get_expected_length

from fedbt.data.readers.volumes import NOT_PICKED, LabelTable, SkippedFile, finish_scan, keyed_hash, site_secret
from fedbt.data.records import Problem, Record, SiteScan, VolumeSlice, _require_root, list_files
from fedbt.data.sites import SiteSpec, SliceRule, Window

PLANES = ("sagittal", "coronal", "axial")  # the patient axis (x, y, z) a slice's normal points along


@dataclass(frozen=True)
class DicomSlice:
    """What the pipeline needs of one DICOM file. `label_key` is the raw value the label CSV
    is keyed by: it is looked up during the scan and kept nowhere else."""

    path: Path
    label_key: str
    patient: str  # keyed hashes
    study: str
    series: str
    size: tuple[int, int]  # (columns, rows)
    plane: str
    position: float  # along the slice normal (or the instance number): the order within a series
    window: tuple[float, float] | None
    digest: str  # the pixel data and how it becomes 8 bits, not the header: a copy re-exported is the same slice

    def where(self) -> VolumeSlice:
        return VolumeSlice(self.study, self.series, window=self.window)


def read_dataset(path: Path, pixels: bool = True) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        raise SkippedFile("not DICOM", "not a DICOM file (no DICM preamble)") from None
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on a damaged file
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise SkippedFile("unreadable", f"unreadable DICOM file ({type(err).__name__}: {first_line})") from None


def check_pixel_data(ds: Dataset) -> None:
    """Refuse what no packaged handler decodes, by name, and pixel data cut short."""
    if "PixelData" not in ds:
        raise SkippedFile("no pixel data", "DICOM without pixel data (not an image, or a file cut short)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise SkippedFile("multi-frame", f"multi-frame DICOM ({frames} frames): one slice a file is read")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        decodable = syntax is not None and get_decoder(syntax).is_available
    except NotImplementedError:
        decodable = False
    if not decodable:
        name = f"{syntax.name} ({syntax})" if syntax else "no transfer syntax"
        raise SkippedFile("unsupported transfer syntax", f"transfer syntax {name}: no installed decoder reads it")
    if not syntax.is_encapsulated and len(ds.PixelData) < get_expected_length(ds):
        raise SkippedFile("unreadable", f"truncated: {len(ds.PixelData)} of {get_expected_length(ds)} bytes of pixels")


def plane_and_position(ds: Dataset) -> tuple[str, float]:
    orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if orientation is None or len(orientation) != 6:
        return "unknown orientation", float(ds.get("InstanceNumber") or 0)
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    plane = PLANES[int(np.abs(normal).argmax())]
    along = float(np.dot(np.asarray(position, float), normal)) if position is not None and len(position) == 3 else None
    return plane, along if along is not None else float(ds.get("InstanceNumber") or 0)


def dicom_window(ds: Dataset, override: Window | None) -> tuple[float, float] | None:
    """The site's window, else the file's first (WindowCenter, WindowWidth), else None (min-max)."""
    if override is not None:
        return override.center, override.width
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    first = [float(v[0] if isinstance(v, pydicom.multival.MultiValue) else v) for v in (center, width)]
    return (first[0], first[1]) if first[1] > 0 else None


def read_slice(path: Path, key: str, secret: bytes, window: Window | None) -> DicomSlice:
    """One file's `DicomSlice`; SkippedFile when it gives none."""
    ds = read_dataset(path)
    check_pixel_data(ds)
    image_type = [str(v).upper() for v in ds.get("ImageType") or []]
    if "LOCALIZER" in image_type:
        raise SkippedFile("localiser", "localiser (ImageType LOCALIZER)")
    patient = str(ds.get("PatientID") or "")
    if not patient:
        raise SkippedFile("no PatientID", "no PatientID: its slices cannot be kept to one patient")
    label_key = str(ds.get(key) or "")
    plane, position = plane_and_position(ds)
    chosen = dicom_window(ds, window)
    rescale = (float(ds.get("RescaleSlope") or 1), float(ds.get("RescaleIntercept") or 0))
    digest = hashlib.sha256(bytes(ds.PixelData))
    digest.update(f"{ds.file_meta.TransferSyntaxUID}:{rescale}:{chosen}".encode())
    return DicomSlice(
        path=path,
        label_key=label_key,
        patient=keyed_hash(secret, "patient", patient),
        study=keyed_hash(secret, "study", str(ds.get("StudyInstanceUID") or "")),
        series=keyed_hash(secret, "series", str(ds.get("SeriesInstanceUID") or "")),
        size=(int(ds.Columns), int(ds.Rows)),
        plane=plane,
        position=position,
        window=chosen,
        digest=digest.hexdigest(),
    )


def dicom_image_shape(path: str) -> tuple[int, int]:
    """(columns, rows) of a DICOM file's image, from its header."""
    ds = read_dataset(Path(path), pixels=False)
    return int(ds.get("Columns") or 0), int(ds.get("Rows") or 0)


def read_dicom_image(path: str) -> np.ndarray:
    """A DICOM file's pixels in the scanner's units (RescaleSlope and Intercept applied)."""
    ds = read_dataset(Path(path))
    check_pixel_data(ds)
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)


def describe_sizes(sizes: list[tuple[int, int]]) -> str:
    return ", ".join(f"{w} x {h}" for w, h in sizes)


def series_records(
    spec: SiteSpec, series: list[DicomSlice], table: LabelTable, problems: list[Problem], tally: Counter[str]
) -> list[Record]:
    """The picked slices of one series as records; a series that cannot be used is one problem."""
    folder = os.path.commonpath([str(s.path.parent) for s in series])

    def skip(reason: str, message: str) -> list[Record]:
        problems.append(Problem(spec.name, folder, f"series of {len(series)} slices: {message}, skipped"))
        tally[reason] += len(series)
        return []

    sizes = sorted({s.size for s in series})
    if len(sizes) > 1:
        return skip("sizes disagree", "slices disagree in size (" + describe_sizes(sizes) + ")")
    planes = sorted({s.plane for s in series})
    if spec.volumes.axial_only and planes != ["axial"]:
        return skip("non-axial", f"not axial ({', '.join(planes)})")
    label = table.label_of(series[0].label_key)
    if label is None:
        return skip("no label", f"its {table.key} has no row in {table.path.name}")
    ordered = sorted(series, key=lambda s: (s.position, s.path))
    picked = [ordered[i] for i in spec.volumes.slices.pick(len(ordered))]
    tally[NOT_PICKED] += len(ordered) - len(picked)
    allowed = spec.allowed_for(label)
    return [Record(spec.name, str(s.path), label, allowed, s.digest, s.patient, None, s.where()) for s in picked]


def scan_dicom(spec: SiteSpec) -> SiteScan:
    _require_root(spec)
    secret = site_secret(spec)
    table = LabelTable(spec)
    problems: list[Problem] = []
    tally: Counter[str] = Counter()
    by_series: dict[str, list[DicomSlice]] = defaultdict(list)
    for f in list_files(spec.root, spec.name, problems):
        if f == table.path:
            continue
        try:
            s = read_slice(f, table.key, secret, spec.volumes.window)
        except SkippedFile as skipped:
            problems.append(Problem(spec.name, str(f), f"{skipped}, skipped"))
            tally[skipped.reason] += 1
            continue
        by_series[s.series].append(s)
    records = [r for series in by_series.values() for r in series_records(spec, series, table, problems, tally)]
    table.check_all_used("DICOM series")
    return finish_scan(spec, records, problems, tally)


def is_dicom_file(path: Path) -> bool:
    """A .dcm name, or the DICM preamble (archives often name files without a suffix)."""
    try:
        return path.suffix.lower() == ".dcm" or is_dicom(path)
    except OSError:  # unreadable: whoever reads it next reports why
        return False


def dicom_series_slices(files: list[Path], rule: SliceRule) -> tuple[list[DicomSlice], list[tuple[Path, str]]]:
    """The slices to score out of DICOM files named for prediction (a file, or a folder's
    files): each series in slice order, picked by `rule`, in any plane; and per file or
    series left out, why. The keys are made with a throw-away secret: they only sort slices
    into series here, and nothing of the header leaves this function but a `DicomSlice`."""
    secret = secrets.token_bytes(16)
    by_series: dict[str, list[DicomSlice]] = defaultdict(list)
    left_out: list[tuple[Path, str]] = []
    for f in files:
        try:
            s = read_slice(f, "PatientID", secret, None)
        except SkippedFile as skipped:
            left_out.append((f, str(skipped)))
            continue
        by_series[s.series].append(s)
    picked: list[DicomSlice] = []
    for series in by_series.values():
        sizes = sorted({s.size for s in series})
        if len(sizes) > 1:
            folder = Path(os.path.commonpath([str(s.path.parent) for s in series]))
            sizes_text = describe_sizes(sizes)
            left_out.append((folder, f"series of {len(series)} slices: slices disagree in size ({sizes_text})"))
            continue
        ordered = sorted(series, key=lambda s: (s.position, s.path))
        picked += [ordered[i] for i in rule.pick(len(ordered))]
    return picked, left_out
