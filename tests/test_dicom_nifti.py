"""DICOM and NIfTI sites: real MR slices shipped with pydicom, generated series and volumes
with known identifiers in their headers. Sites load and split by patient, predict and
evaluate score slices, every bad input gives one line, and no identifier reaches anything
a run writes or a site sends."""

from __future__ import annotations

import json
import shutil
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, MRImageStorage, generate_uid

from fedbt.cli import main
from fedbt.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.inspect import inspect_report
from fedbt.data.readers import scan_site
from fedbt.data.sites import load_site
from fedbt.data.synthetic import make_image
from fedbt.model.architectures import build_model
from fedbt.model.checkpoint import save_checkpoint

# What the generated headers hold, and nothing a run writes may: name, id and birth date.
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "MRN-77310"
BIRTH_DATE = "19610314"
IDENTIFIERS = (PATIENT_NAME, "JANE", PATIENT_ID, BIRTH_DATE)
LABELS = ("glioma", "meningioma", "no_tumor", "pituitary")
AXIAL = [1, 0, 0, 0, 1, 0]
SAGITTAL = [0, 1, 0, 0, 0, -1]
SIDE = 40


def patient_id(i: int) -> str:
    return f"{PATIENT_ID}{i:02d}"


def write_dicom(path: Path, pixels: np.ndarray, patient: int, study: str, series: str, instance: int, **tags) -> None:
    """One MR slice with a patient's name, id and birth date in its header, as a scanner writes them."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = tags.pop("syntax", ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"{PATIENT_NAME}{patient}", patient_id(patient), BIRTH_DATE
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, instance
    ds.ImageType = tags.pop("image_type", ["ORIGINAL", "PRIMARY", "AXIAL"])
    ds.ImageOrientationPatient = tags.pop("orientation", AXIAL)
    ds.ImagePositionPatient = [0, 0, 5.0 * instance]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.PixelData = tags.pop("pixel_data", (pixels.astype(np.uint16) * 8 + 50).astype("<u2").tobytes())
    for name, value in tags.items():
        setattr(ds, name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, patient: int, label: str, study: str, slices: int, rng, **tags) -> list[Path]:
    series = generate_uid()
    paths = []
    for k in range(slices):
        paths.append(folder / f"IM{k:04d}.dcm")
        write_dicom(paths[-1], make_image(label, rng, SIDE).pixels, patient, study, series, k + 1, **tags)
    return paths


@dataclass
class Archive:
    root: Path
    yaml: Path
    labels: dict[int, str]  # patient number -> label


def dicom_archive(tmp_path: Path, patients: int = 8, seed: int = 0, extra_yaml: str = "") -> Archive:
    """Per patient one study: an axial series of 7 slices, a sagittal one of 3 and a localiser;
    and one patient with no row in the label CSV. Folders are named without identifiers."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "dicom-archive"
    labels = {i: LABELS[i % len(LABELS)] for i in range(patients)}
    for i in range(patients + 1):
        label = labels.get(i, "glioma")
        study, folder = generate_uid(), root / f"s{i:03d}"
        write_series(folder / "axial", i, label, study, 7, rng)
        write_series(folder / "sagittal", i, label, study, 3, rng, orientation=SAGITTAL)
        write_series(folder / "scout", i, label, study, 1, rng, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    rows = "".join(f"{patient_id(i)},{label}\n" for i, label in labels.items())
    (root / "labels.csv").write_text("PatientID,label\n" + rows)
    yaml = tmp_path / "hospital-dicom.yaml"
    yaml.write_text(
        f"name: hospital_dicom\nformat: dicom\nroot: {root}\npatient_secret: {tmp_path / 'secrets' / 'dicom.key'}\n"
        f"split:\n  test: 0.3\n  val: 0.2\nvolumes:\n  labels_csv: labels.csv\n  key: PatientID\n{extra_yaml}"
    )
    return Archive(root, yaml, labels)


def write_nifti(path: Path, volume: np.ndarray, patient: int) -> None:
    image = nib.Nifti1Image(volume.astype(np.int16), np.eye(4))
    image.header["descrip"] = f"{PATIENT_NAME}{patient} {patient_id(patient)} {BIRTH_DATE}".encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def label_volume(label: str, rng, slices: int = 9) -> np.ndarray:
    return np.stack([make_image(label, rng, SIDE).pixels.astype(np.int16) * 4 for _ in range(slices)], axis=2)


def nifti_archive(tmp_path: Path, subjects: int = 8, seed: int = 1) -> Archive:
    """BIDS-like: sub-XX/anat/sub-XX_T1w.nii.gz, two sessions for every other subject."""
    rng = np.random.default_rng(seed)
    root = tmp_path / "nifti-archive"
    labels = {i: LABELS[i % len(LABELS)] for i in range(subjects)}
    for i, label in labels.items():
        write_nifti(root / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T1w.nii.gz", label_volume(label, rng), i)
        if i % 2:
            write_nifti(root / f"sub-{i:02d}" / "ses-2" / f"sub-{i:02d}_ses-2_T1w.nii", label_volume(label, rng), i)
    rows = "".join(f"sub-{i:02d},{label}\n" for i, label in labels.items())
    (root / "participants.csv").write_text("subject,label\n" + rows)
    yaml = tmp_path / "hospital-nifti.yaml"
    yaml.write_text(
        f"name: hospital_nifti\nformat: nifti\nroot: {root}\npatient_secret: {tmp_path / 'secrets' / 'nifti.key'}\n"
        "split:\n  test: 0.3\n  val: 0.2\nvolumes:\n  labels_csv: participants.csv\n  key: subject\n"
    )
    return Archive(root, yaml, labels)


def catalog_of(*yamls: Path, tmp_path: Path):
    cfg = DataConfig(sites=[str(y) for y in yamls], image_size=32, cache_dir=str(tmp_path / "cache"))
    return build_catalog(cfg, progress=False)


# ---------------------------------------------------------------- sites load and split by patient


def test_dicom_site_keeps_middle_axial_slices_and_splits_by_patient(tmp_path):
    archive = dicom_archive(tmp_path, patients=12)
    catalog = catalog_of(archive.yaml, tmp_path=tmp_path)
    # 12 labelled patients x the middle 5 of 7 axial slices; sagittal, localiser, unlabelled left out.
    assert len(catalog.records) == 12 * 5
    assert {Path(r.path).parent.name for r in catalog.records} == {"axial"}
    assert {Path(r.path).name for r in catalog.records} == {f"IM{k:04d}.dcm" for k in range(1, 6)}
    splits_of_patient = defaultdict(set)
    for r, split in zip(catalog.records, catalog.splits):
        splits_of_patient[r.patient].add(split)
    assert len(splits_of_patient) == 12 and all(len(s) == 1 for s in splits_of_patient.values())
    assert {s for each in splits_of_patient.values() for s in each} == {"train", "val", "test"}
    tally = catalog.slice_tally["hospital_dicom"]
    assert tally["kept"] == 60 and tally["non-axial"] == 13 * 3 and tally["localiser"] == 13
    assert tally["no label"] == 7 and tally["not picked by the slice rule"] == 12 * 2


def test_patient_key_is_a_keyed_hash_of_the_sites_own_owner_only_secret(tmp_path):
    archive = dicom_archive(tmp_path, patients=2)
    first = scan_site(load_site(archive.yaml, None))
    secret = tmp_path / "secrets" / "dicom.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    patients = {r.patient for r in first.records}
    assert len(patients) == 2 and all(PATIENT_ID not in p and len(p) == 16 for p in patients)
    assert {r.patient for r in scan_site(load_site(archive.yaml, None)).records} == patients  # stable
    secret.write_bytes(b"another site's secret, 32 bytes")
    assert {r.patient for r in scan_site(load_site(archive.yaml, None)).records}.isdisjoint(patients)
    secret.chmod(0o644)
    with pytest.raises(ValueError, match=r"has mode 644: make it owner-only \(chmod 600\)"):
        scan_site(load_site(archive.yaml, None))


def test_default_secret_lives_under_fedbt_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBT_SECRETS", str(tmp_path / "keys"))
    archive = dicom_archive(tmp_path, patients=1)
    archive.yaml.write_text("\n".join(line for line in archive.yaml.read_text().splitlines() if not line.startswith("patient_secret")))
    scan_site(load_site(archive.yaml, None))
    assert stat.S_IMODE((tmp_path / "keys" / "hospital_dicom.key").stat().st_mode) == 0o600


def test_nifti_site_slices_each_volume_and_keeps_a_subjects_sessions_together(tmp_path):
    archive = nifti_archive(tmp_path)
    catalog = catalog_of(archive.yaml, tmp_path=tmp_path)
    assert len(catalog.records) == (8 + 4) * 5  # 12 volumes, the middle 5 of 9 slices
    assert sorted({r.slice.index for r in catalog.records}) == [2, 3, 4, 5, 6]
    splits_of_patient = defaultdict(set)
    for r, split in zip(catalog.records, catalog.splits):
        splits_of_patient[r.patient].add(split)
    assert len(splits_of_patient) == 8 and all(len(s) == 1 for s in splits_of_patient.values())
    report = inspect_report(catalog)["volume_sites"]["hospital_nifti"]
    assert report["patients"] == 8 and report["series"] == 12
    assert report["patients_per_label"] == {"glioma": 2, "meningioma": 2, "no_tumor": 2, "pituitary": 2}


def test_real_pydicom_mr_slices_make_a_site(tmp_path):
    """MR_small.dcm as pydicom ships it, plainly and RLE-compressed: a packaged decoder reads both."""
    root = tmp_path / "real"
    for name in ("MR_small.dcm", "MR_small_RLE.dcm"):
        (root / name.removesuffix(".dcm")).mkdir(parents=True)
        shutil.copy(get_testdata_file(name, download=False), root / name.removesuffix(".dcm") / name)
    (root / "labels.csv").write_text("PatientID,label\n4MR1,glioma\n")
    yaml = tmp_path / "real.yaml"
    yaml.write_text(
        f"name: real\nformat: dicom\nroot: {root}\npatient_secret: {tmp_path / 'k'}\n"
        "volumes:\n  labels_csv: labels.csv\n  key: PatientID\n"
    )
    catalog = catalog_of(yaml, tmp_path=tmp_path)
    assert len(catalog.records) == 2 and not catalog.problems
    # The same pixels stored two ways decode alike, and are found to be one picture.
    assert torch.equal(catalog.pixels[0], catalog.pixels[1])
    assert len(set(catalog.picture_ids.tolist())) == 1


def test_inspect_reports_a_dicom_site(tmp_path, capsys):
    archive = dicom_archive(tmp_path, patients=4)
    assert main(["data", "inspect", "--set", f"data.sites=[{archive.yaml}]", "--set", "data.image_size=32",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "DICOM/NIfTI site hospital_dicom: 4 patients, 4 studies, 4 series, 20 slices kept" in out
    assert "slices skipped: localiser 5, no label 7, non-axial 15, not picked by the slice rule 8" in out
    assert "patients per label: glioma 1, meningioma 1, no_tumor 1, pituitary 1" in out
    assert not any(identifier in out for identifier in IDENTIFIERS)
