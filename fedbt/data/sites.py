"""Hospital sites: one YAML file each, describing where a site's images are and what they mean.

A site file is validated against `SiteFile` (unknown keys, wrong types, unknown formats
and classes, impossible splits refused) and every error is one line naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass as validated_dataclass

from fedbt.config import (
    ConfigError,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    read_yaml_mapping,
    resolve_project_path,
    validated,
)
from fedbt.data.labels import KNOWN_SOURCE_LABELS, parse_allowed

SiteFormat = Literal["class_folders", "figshare_mat", "kaggle_combined", "dicom", "nifti"]
FORMATS: tuple[str, ...] = get_args(SiteFormat)
VOLUME_FORMATS = ("dicom", "nifti")
DATA_ROOT_ENV = "FEDBT_DATA_ROOT"
# What a label CSV may be keyed by, per format (the CSV has this column and a `label` column).
LABEL_KEYS = {
    "dicom": ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"),
    "nifti": ("subject", "file"),
}

SplitShare = Annotated[float, Field(ge=0, lt=1)]


@validated_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SplitPolicy:
    test: SplitShare = 0.15
    val: SplitShare = 0.10
    # Use the release's own Training/Testing folders (SARTAJ) instead of a fresh split.
    use_source_split: bool = False
    # Keep all slices of one patient in one split when the source records patient ids.
    group_by_patient: bool = True

    @model_validator(mode="after")
    def _leaves_images_to_train_on(self) -> SplitPolicy:
        if self.test + self.val >= 1:
            raise ValueError(f"test + val is {self.test + self.val:g}: it must stay below 1 to leave training images")
        return self


@validated_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SitePolicy:
    """What a site decides whatever a server asks (fedbt.fl.policy enforces it).

    Its data root comes from `fedbt site --data-root` (or the site file's absolute root), its
    split from `split:` and split_seed; the server may set training hyper-parameters within
    the limits below, nothing else. The defaults fit the project's profiles (224 px and
    batches of 64 on a GPU) and allow one final test scoring per run.
    """

    # Where decoded pixels go; None: $FEDBT_CACHE or ~/.cache/fedbt of the user running the site.
    cache_dir: str | None = None
    # Seed of the train/val/test split: a server choosing it could move other images into "test".
    split_seed: NonNegativeInt = 0
    # Local ImageNet weights (resnet50 transfer learning) this site loads; a server never names a file.
    pretrained_path: str | None = None
    max_image_size: PositiveInt = 256
    max_batch_size: PositiveInt = 64
    max_local_epochs: PositiveInt = 5
    # Final test scorings (aggregates only) one run may ask of the site...
    max_test_requests: NonNegativeInt = 1
    # ...and all runs together within test_quota_days, counted across runs and restarts: each
    # scoring tells a server more about the same test images.
    test_quota: NonNegativeInt = 3
    test_quota_days: PositiveFloat = 7.0
    # Record-level differential privacy the site demands whatever a server asks (docs/privacy.md):
    # DP-SGD on in every run, at most this epsilon (and delta) a run, at most this epsilon over
    # all its runs together (its privacy ledger). A server may ask for stricter, never looser.
    require_privacy: bool = False
    max_epsilon_per_run: PositiveFloat | None = None
    max_epsilon_total: PositiveFloat | None = None
    max_delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    # Days a run's left-over state (optimiser, FedBN layers, SCAFFOLD c_i) is kept after its last
    # request, so that an interrupted run can still be resumed; the ledger and quota are kept for good.
    keep_run_state_days: PositiveFloat = 2.0


@validated_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SliceRule:
    """Which slices of a series (DICOM) or volume (NIfTI) become images."""

    # 'middle': the `count` slices around the middle (the ends of a head scan show little brain).
    keep: Literal["all", "middle"] = "middle"
    count: PositiveInt = 5

    def pick(self, slices: int) -> range:
        """Indices of the slices kept out of `slices` in order."""
        if self.keep == "all" or slices <= self.count:
            return range(slices)
        start = (slices - self.count) // 2
        return range(start, start + self.count)

    def describe(self) -> str:
        return "all slices" if self.keep == "all" else f"the middle {self.count} slices"


@validated_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Window:
    """Values from center - width/2 (black) to center + width/2 (white), after DICOM's rescale."""

    center: float
    width: PositiveFloat


@validated_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class VolumeLayout:
    """How a DICOM or NIfTI archive maps to labelled slices (`volumes:` in a site YAML)."""

    # CSV with a `label` column and a `key` column; relative to the site's root.
    labels_csv: str
    # dicom: PatientID, StudyInstanceUID or SeriesInstanceUID; nifti: subject or file.
    key: str
    slices: SliceRule = SliceRule()
    # dicom: keep axial series only (orientation from ImageOrientationPatient).
    axial_only: bool = True
    # nifti: the voxel axis slices are cut across (2: the third, axial in RAS-stored volumes).
    axis: Literal[0, 1, 2] = 2
    # None: the DICOM file's own window, else each slice's lowest to highest value.
    window: Window | None = None


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    name: str
    format: str
    root: Path
    labels: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    split: SplitPolicy = SplitPolicy()
    policy: SitePolicy = SitePolicy()
    # kaggle_combined only: which origin of the combined set this site takes, and the
    # site YAMLs whose files decide SARTAJ vs Br35H by byte identity.
    origin: str | None = None
    reference_sites: tuple[SiteSpec, ...] = ()
    # dicom and nifti only: the archive's layout, and the owner-only file holding the key
    # patient ids are hashed with (None: the site's default, created on first use).
    volumes: VolumeLayout | None = None
    patient_secret: Path | None = None

    def allowed_for(self, source_label: str) -> frozenset[str] | None:
        return self.labels.get(source_label, KNOWN_SOURCE_LABELS.get(source_label))


def _label_key(key: object) -> str:
    # YAML 1.1 reads unquoted yes/no as booleans; Br35H's folders are named exactly that.
    if isinstance(key, bool):
        return "yes" if key else "no"
    return str(key)


# The canonical classes a source folder name allows (a class, a list, or 'tumor').
AllowedClasses = Annotated[str | list[str], AfterValidator(parse_allowed)]


class SiteFile(BaseModel):
    """What a site YAML may say."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    name: Annotated[str, Field(min_length=1)]
    format: SiteFormat
    root: str
    labels: dict[str, AllowedClasses] = {}
    split: SplitPolicy = SplitPolicy()
    policy: SitePolicy = SitePolicy()
    origin: str | None = None
    reference_sites: list[str] = []
    volumes: VolumeLayout | None = None
    patient_secret: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_means_default(cls, values: Any) -> Any:
        # `labels:`, `split:` or `policy:` with nothing under them reads as null: take the default.
        return {k: v for k, v in values.items() if v is not None} if isinstance(values, dict) else values

    @field_validator("labels", mode="before")
    @classmethod
    def _folder_names_as_text(cls, labels: Any) -> Any:
        return {_label_key(k): v for k, v in labels.items()} if isinstance(labels, dict) else labels

    @model_validator(mode="after")
    def _combined_names_its_origin(self) -> SiteFile:
        if self.format == "kaggle_combined" and self.origin is None:
            raise ValueError("format kaggle_combined needs 'origin' (the site name it takes, e.g. figshare)")
        return self

    @model_validator(mode="after")
    def _volumes_with_volume_formats(self) -> SiteFile:
        volume_format = self.format in VOLUME_FORMATS
        if volume_format and self.volumes is None:
            raise ValueError(f"format {self.format} needs 'volumes' (labels_csv and key at least)")
        if not volume_format and (self.volumes is not None or self.patient_secret is not None):
            raise ValueError(f"'volumes' and 'patient_secret' are for formats {' and '.join(VOLUME_FORMATS)} only")
        if volume_format and self.volumes.key not in LABEL_KEYS[self.format]:
            keys = ", ".join(LABEL_KEYS[self.format])
            raise ValueError(f"volumes.key {self.volumes.key!r}: a {self.format} label CSV is keyed by one of {keys}")
        return self


def resolve_root(root: str, data_root: str | Path | None) -> Path:
    """An absolute root as it is; a relative one inside the data root (`..` may not leave it)."""
    path = Path(root).expanduser()
    if path.is_absolute():
        return path
    base = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV)
    if base is None:
        raise ValueError(f"site root {root!r} is relative: give a data root (--data-root or ${DATA_ROOT_ENV})")
    base = Path(base).expanduser()
    # Judged on the names alone: a data root's own symbolic links (to a data disk) stay allowed.
    resolved = Path(os.path.normpath(base / path))
    if not resolved.is_relative_to(os.path.normpath(base)):
        raise ValueError(f"site root {root!r} leads out of the data root {base}: give an absolute path to leave it")
    return resolved


def _reference_chain(path: str | Path, referenced_from: tuple[Path, ...]) -> tuple[Path, ...]:
    """The files from the first site to this one; a file already on it is a cycle."""
    chain = (*referenced_from, resolve_project_path(path).resolve())
    if chain[-1] in referenced_from:
        raise ConfigError(f"{path}: reference_sites cycle: {' -> '.join(str(p) for p in chain)}")
    return chain


def _load_site(path: str | Path, data_root: str | Path | None, referenced_from: tuple[Path, ...]) -> SiteSpec:
    chain = _reference_chain(path, referenced_from)
    site: SiteFile = validated(SiteFile, read_yaml_mapping(path, "site"), str(path))
    try:
        root = resolve_root(site.root, data_root)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    return SiteSpec(
        name=site.name,
        format=site.format,
        root=root,
        labels=site.labels,
        split=site.split,
        policy=site.policy,
        origin=site.origin,
        reference_sites=tuple(_load_site(ref, data_root, chain) for ref in site.reference_sites),
        volumes=site.volumes,
        # Relative to the YAML's folder: the secret sits with the site's own settings, never in the data.
        patient_secret=chain[-1].parent / Path(site.patient_secret).expanduser() if site.patient_secret else None,
    )


def load_site(path: str | Path, data_root: str | Path | None) -> SiteSpec:
    return _load_site(path, data_root, referenced_from=())


def load_sites(paths: list[str], data_root: str | Path | None) -> list[SiteSpec]:
    sites = [load_site(p, data_root) for p in paths]
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"site names must be unique, got {names}")
    return sites
