"""DICOM and NIfTI sites: real MR slices shipped with pydicom, generated series and volumes
with known identifiers in their headers. Sites load and split by patient, predict and
evaluate score slices, every bad input gives one line, and no identifier reaches anything
a run writes or a site sends."""

from __future__ import annotations

import json
import os
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
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, MRImageStorage, generate_uid

from fedbt.cli import main
from fedbt.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.images import ImageLimits, decode_file
from fedbt.data.inspect import inspect_report
from fedbt.data.readers import scan_site
from fedbt.data.records import VolumeSlice
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
    lines = archive.yaml.read_text().splitlines()
    archive.yaml.write_text("\n".join(line for line in lines if not line.startswith("patient_secret")))
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


def test_dicom_pixels_are_rescaled_then_windowed_to_8_bits(tmp_path):
    """Stored value v shows 2v - 100 (RescaleSlope 2, RescaleIntercept -100, as write_dicom
    writes); the window 100 +- 100 maps 0 to black, 200 to white, values between linearly."""
    stored = np.tile(np.arange(SIDE, dtype=np.uint16) * 4, (SIDE, 1))  # 0, 4, ..., 156 along a row
    path = tmp_path / "ramp.dcm"
    write_dicom(path, stored, 0, generate_uid(), generate_uid(), 1, pixel_data=stored.astype("<u2").tobytes())
    decoded = decode_file(str(path), ImageLimits.of(DataConfig()), VolumeSlice("s", "s", window=(100.0, 200.0)))
    expected = np.clip((stored * 2.0 - 100) / 200 * 255, 0, 255).round().astype(np.uint8)
    assert torch.equal(decoded[0], torch.from_numpy(expected))
    archive = dicom_archive(tmp_path, patients=1, extra_yaml="  window: {center: 100, width: 200}\n")
    assert {r.slice.window for r in scan_site(load_site(archive.yaml, None)).records} == {(100.0, 200.0)}


def test_nifti_labels_keyed_by_file(tmp_path):
    archive = nifti_archive(tmp_path, subjects=2)
    (archive.root / "participants.csv").write_text(
        "file,label\nsub-00/anat/sub-00_T1w.nii.gz,glioma\nsub-01/anat/sub-01_T1w.nii.gz,meningioma\n"
    )
    archive.yaml.write_text(archive.yaml.read_text().replace("key: subject", "key: file"))
    scan = scan_site(load_site(archive.yaml, None))
    assert {(Path(r.path).name, r.source_label) for r in scan.records} == {
        ("sub-00_T1w.nii.gz", "glioma"),
        ("sub-01_T1w.nii.gz", "meningioma"),
    }
    assert [p.message for p in scan.problems] == ["its file has no row in participants.csv, skipped"]  # ses-2


def test_inspect_reports_a_dicom_site(tmp_path, capsys):
    archive = dicom_archive(tmp_path, patients=4)
    assert main(["data", "inspect", "--set", f"data.sites=[{archive.yaml}]", "--set", "data.image_size=32",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "DICOM/NIfTI site hospital_dicom: 4 patients, 4 studies, 4 series, 20 slices kept" in out
    assert "slices skipped: localiser 5, no label 7, non-axial 15, not picked by the slice rule 8" in out
    assert "patients per label: glioma 1, meningioma 1, no_tumor 1, pituitary 1" in out
    assert not any(identifier in out for identifier in IDENTIFIERS)


# ---------------------------------------------------------------- predict and evaluate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained 32 px CNN: these tests check which slices are scored, not how well."""
    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("dicom-model")
    cfg = ExperimentConfig(data=DataConfig(image_size=32), model=ModelConfig(name="cnn"))
    return save_checkpoint(work / "model.pt", build_model(cfg.model, 4, 32), cfg, {}, "central")


def test_predict_scores_a_real_dcm_a_series_folder_and_a_nifti_volume(checkpoint, tmp_path, capsys):
    real = get_testdata_file("MR_small.dcm", download=False)
    rng = np.random.default_rng(3)
    write_series(tmp_path / "series", 1, "glioma", generate_uid(), 7, rng)
    volume = tmp_path / "sub-01_T1w.nii.gz"
    write_nifti(volume, label_volume("pituitary", rng, slices=9), 1)
    out = tmp_path / "predictions.json"
    args = [real, str(tmp_path / "series"), str(volume), "--checkpoint", str(checkpoint), "--device", "cpu"]
    assert main(["predict", *args, "--output", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert not any("error" in r for r in rows)
    assert [Path(r["path"]).name for r in rows[:1]] == ["MR_small.dcm"]
    assert [Path(r["path"]).name for r in rows[1:6]] == [f"IM{k:04d}.dcm" for k in range(1, 6)]  # middle 5 of 7
    assert [r["slice"] for r in rows[6:]] == [f"slice {i} along axis 2" for i in range(2, 7)]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    err = capsys.readouterr().err
    assert f"fedbt: {real}: scored 1 of 1 DICOM files (the middle 5 slices of each series)" in err
    assert f"fedbt: {tmp_path / 'series'}: scored 5 of 7 DICOM files (the middle 5 slices of each series)" in err
    assert f"fedbt: {volume}: scored sub-01_T1w.nii.gz slices 2-6 of 9 along axis 2 (the middle 5 slices)" in err
    assert main(["predict", str(volume), "--slices", "all", "--checkpoint", str(checkpoint), "--output", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 9


def test_evaluate_a_folder_of_class_folders_holding_dicom_and_nifti(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(4)
    folder = tmp_path / "labelled"
    write_series(folder / "glioma" / "series-a", 1, "glioma", generate_uid(), 6, rng)
    write_nifti(folder / "no_tumor" / "sub-02.nii.gz", label_volume("no_tumor", rng, slices=7), 2)
    out = tmp_path / "eval"
    args = ["--checkpoint", str(checkpoint), "--folder", str(folder), "--bootstrap", "10", "--device", "cpu"]
    assert main(["evaluate", *args, "--slices", "3", "--out", str(out)]) == 0
    data = json.loads((out / "evaluation.json").read_text())["data"]
    assert data["n"] == 6 and not data["problems"]
    assert data["slices_scored"] == {
        str(folder / "glioma"): "3 of 6 DICOM files (the middle 3 slices of each series)",
        str(folder / "no_tumor"): "sub-02.nii.gz slices 2-4 of 7 along axis 2 (the middle 3 slices)",
    }
    assert f"{folder / 'no_tumor'}: scored sub-02.nii.gz slices 2-4" in capsys.readouterr().out


# ---------------------------------------------------------------- each bad input, one line


def test_bad_files_are_one_line_problems_of_the_site(tmp_path):
    archive = dicom_archive(tmp_path, patients=2)
    rng = np.random.default_rng(5)
    bad = archive.root / "s000" / "bad"
    write_series(bad / "no-pixels", 0, "glioma", generate_uid(), 1, rng)
    ds = pydicom.dcmread(bad / "no-pixels" / "IM0000.dcm")
    del ds.PixelData
    ds.save_as(bad / "no-pixels" / "IM0000.dcm")
    shutil.copy(get_testdata_file("MR_truncated.dcm", download=False), bad / "truncated.dcm")
    (bad / "cut.dcm").write_bytes((archive.root / "s000" / "axial" / "IM0000.dcm").read_bytes()[:-500])
    jpeg_ls = {"syntax": JPEGLSLossless, "pixel_data": encapsulate([b"\0" * 8])}
    write_series(bad / "jpeg-ls", 0, "glioma", generate_uid(), 1, rng, **jpeg_ls)
    paths = write_series(bad / "mixed", 0, "glioma", generate_uid(), 3, rng)
    larger = make_image("glioma", rng, 48).pixels
    write_dicom(paths[1], larger, 0, generate_uid(), pydicom.dcmread(paths[0]).SeriesInstanceUID, 2)
    (bad / "notes.txt").write_text("not DICOM")
    scan = scan_site(load_site(archive.yaml, None))
    problems = {Path(p.path).relative_to(archive.root).as_posix(): p.message for p in scan.problems}
    assert problems["s000/bad/no-pixels/IM0000.dcm"] == (
        "DICOM without pixel data (not an image, or a file cut short), skipped"
    )
    assert problems["s000/bad/truncated.dcm"] == "truncated: 8130 of 8192 bytes of pixels, skipped"
    assert problems["s000/bad/cut.dcm"] == "truncated: 2700 of 3200 bytes of pixels, skipped"
    assert problems["s000/bad/jpeg-ls/IM0000.dcm"] == (
        "transfer syntax JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80): "
        "no installed decoder reads it, skipped"
    )
    assert problems["s000/bad/mixed"] == "series of 3 slices: slices disagree in size (40 x 40, 48 x 48), skipped"
    assert problems["s000/bad/notes.txt"] == "not a DICOM file (no DICM preamble), skipped"
    assert all("\n" not in m and PATIENT_ID not in m for m in problems.values())


def test_bad_volumes_are_one_line_problems_and_error_rows(checkpoint, tmp_path, capsys):
    archive = nifti_archive(tmp_path, subjects=2)
    rng = np.random.default_rng(6)
    flat = archive.root / "sub-00" / "flat.nii.gz"
    write_nifti(flat, label_volume("glioma", rng, slices=1), 0)
    cut = archive.root / "sub-01" / "cut.nii.gz"
    write_nifti(cut, label_volume("glioma", rng), 1)
    cut.write_bytes(cut.read_bytes()[:-2000])
    problems = {Path(p.path).name: p.message for p in scan_site(load_site(archive.yaml, None)).problems}
    assert problems["flat.nii.gz"] == "one slice along axis 2 (shape (40, 40, 1)): not a volume, skipped"
    assert problems["cut.nii.gz"].startswith("unreadable NIfTI file (") and "\n" not in problems["cut.nii.gz"]
    assert main(["predict", str(flat), str(cut), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"fedbt: error: {flat}: one slice along axis 2 (shape (40, 40, 1)): not a volume"
    assert err[1].startswith(f"fedbt: error: {cut}: unreadable NIfTI file (") and len(err) == 2


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("PatientID,label\nMRN-7731000,glioma\nMRN-7731001,meningioma\nMRN-7731001,glioma\n",
         "labels.csv lines 3 and 4: the same PatientID twice"),
        ("PatientID,label\nMRN-7731000,glioma\nMRN-7731001,glioma\nMRN-9999999,glioma\n",
         "labels.csv line 4: PatientID matches no DICOM series under the root"),
        ("PatientID,label\nMRN-7731000,astrocytoma\n",
         "labels.csv line 2: unknown label 'astrocytoma': map it under 'labels:' in the site YAML"),
        ("patient,diagnosis\n", "labels.csv: needs columns PatientID and label, has patient, diagnosis"),
    ],
)  # fmt: skip
def test_a_bad_label_csv_is_one_line_error(tmp_path, capsys, rows, message):
    archive = dicom_archive(tmp_path, patients=2)
    (archive.root / "labels.csv").write_text(rows)
    assert main(["data", "inspect", "--set", f"data.sites=[{archive.yaml}]", "--set", "data.image_size=32",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err == f"fedbt: error: {archive.root / message}\n"
    assert PATIENT_ID not in err.replace(str(archive.root), "")


def test_site_yaml_mistakes_are_one_line(tmp_path):
    archive = dicom_archive(tmp_path, patients=1)
    text = archive.yaml.read_text()
    archive.yaml.write_text(text.replace("key: PatientID", "key: subject"))
    with pytest.raises(ConfigError, match="volumes.key 'subject': a dicom label CSV is keyed by one of PatientID"):
        load_site(archive.yaml, None)
    archive.yaml.write_text(text.replace("format: dicom", "format: class_folders"))
    with pytest.raises(ConfigError, match="'volumes' and 'patient_secret' are for formats dicom and nifti only"):
        load_site(archive.yaml, None)


# ---------------------------------------------------------------- no identifier leaves a site


def identifiers_in(data: bytes) -> list[str]:
    return [i for i in IDENTIFIERS if i.encode() in data or i.encode("utf-16-le") in data]


def files_holding_identifiers(*folders: Path) -> list[str]:
    return [
        f"{path}: {', '.join(found)}"
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file() and (found := identifiers_in(path.read_bytes()))
    ]


@pytest.mark.e2e
def test_a_simulation_with_dicom_and_nifti_sites_trains_and_writes_no_identifier(
    demo_root, site_files, tmp_path, monkeypatch, capfd
):
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    dicom, nifti = dicom_archive(inputs / "dicom", patients=8), nifti_archive(inputs / "nifti", subjects=8)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    monkeypatch.setenv("FEDBT_CACHE", str(work / "cache"))
    sites = ",".join([*site_files, str(dicom.yaml), str(nifti.yaml)])
    args = ["--config", "configs/demo.yaml", "--data-root", str(demo_root), "--set", "data.image_size=32",
            "--set", f"data.cache_dir={work / 'cache'}", "--set", f"data.sites=[{sites}]"]  # fmt: skip
    assert main(["simulate", *args, "--clients", "5", "--rounds", "2", "--skip-local", "--out", str(work / "out")]) == 0
    assert main(["data", "inspect", *args, "--json", str(work / "inspect.json")]) == 0
    evaluate = ["evaluate", "--checkpoint", str(work / "out" / "central" / "final.pt"), "--site", "hospital_dicom",
                "--data-root", str(demo_root), "--bootstrap", "10", "--device", "cpu"]  # fmt: skip
    assert main([*evaluate, "--out", str(work / "eval")]) == 0
    logs = capfd.readouterr()
    metrics = json.loads((work / "out" / "federated" / "metrics.json").read_text())
    assert {"hospital_dicom", "hospital_nifti"} <= set(json.dumps(metrics).split('"'))  # both sites took part
    assert files_holding_identifiers(work, Path(os.environ["FLWR_HOME"])) == []
    assert identifiers_in((logs.out + logs.err).encode()) == []


def reply_bytes(reply) -> bytes:
    """Everything a reply carries: its tensors' names and bytes, its numbers' and texts' keys and values."""
    parts = []
    for name, group in reply.tensors.items():
        parts.append(name.encode())
        parts += [key.encode() + value.numpy().tobytes() for key, value in group.items()]
    parts += [f"{key}={value!r}".encode() for key, value in {**reply.metrics, **reply.site}.items()]
    return b"\n".join(parts)


def test_every_message_a_dicom_or_nifti_site_sends_holds_no_identifier(tmp_path):
    """Two rounds of the server's round against the sites' own handlers, as their nodes run them;
    every reply is kept as it leaves the site."""
    from fedbt.config import FederatedConfig, TrackingConfig, TrainConfig
    from fedbt.fl.protocol import NODE_CACHE_DIR, NODE_DATA_ROOT, NODE_SITE
    from fedbt.fl.server import run_federated
    from fedbt.fl.site import SiteContext, answer
    from fedbt.fl.transport import InMemoryTransport

    archives = [dicom_archive(tmp_path / "dicom", patients=8), nifti_archive(tmp_path / "nifti", subjects=8)]
    replies = []

    def recorded(context: SiteContext):
        def site(request):
            replies.append(answer(request, context))
            return replies[-1]

        return site

    sites = {}
    for node, archive in enumerate(archives, start=21):
        config = {NODE_SITE: str(archive.yaml), NODE_DATA_ROOT: str(tmp_path)}
        config[NODE_CACHE_DIR] = str(tmp_path / f"c{node}")
        sites[node] = recorded(SiteContext(config, run_id=7))
    cfg = ExperimentConfig(
        output_dir=str(tmp_path / "out"),
        data=DataConfig(image_size=32),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(batch_size=16, log_every=0),
        federated=FederatedConfig(rounds=2, num_clients=2, poll_interval=0.01, round_timeout=60),
        tracking=TrackingConfig(enabled=False),
    )
    transport = InMemoryTransport(sites)
    result = run_federated(transport, cfg, server_has_data=False, clock=transport.clock)
    assert set(result["test"]["sites"]) == {"hospital_dicom", "hospital_nifti"}
    sent = b"\n".join(reply_bytes(r) for r in replies)
    patient_keys = {r.patient.encode() for a in archives for r in scan_site(load_site(a.yaml, None)).records}
    assert identifiers_in(sent) == [] and not any(key in sent for key in patient_keys)
    assert b"IM0001" not in sent and b"sub-01" not in sent  # nor a file or subject name
    assert files_holding_identifiers(tmp_path / "out", tmp_path / "c21", tmp_path / "c22") == []
