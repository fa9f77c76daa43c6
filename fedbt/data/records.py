"""What every reader produces: one ``Record`` per image, one ``Problem`` per file not used."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedbt.data.sites import SiteSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class VolumeSlice:
    """Where a record's image lies in a DICOM series or NIfTI volume and how it becomes 8 bits.

    `study` and `series` are keyed hashes, never the header's UIDs (see readers/volumes.py).
    """

    study: str
    series: str
    index: int | None = None  # NIfTI: the slice along `axis`; DICOM: None (one file, one slice)
    axis: int = 2
    window: tuple[float, float] | None = None  # (center, width); None: the file's own, else min-max

    def describe(self) -> str:
        return "1 DICOM slice" if self.index is None else f"slice {self.index} along axis {self.axis}"


@dataclass(frozen=True)
class Record:
    site: str
    path: str
    source_label: str
    allowed: frozenset[str]
    sha256: str
    patient: str | None = None
    source_split: str | None = None  # 'train' / 'test' when the release splits itself
    slice: VolumeSlice | None = None  # DICOM and NIfTI slices; None: the file is one image


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
    # DICOM and NIfTI sites: slices kept, and skipped by reason (`fedbt data inspect` reports it).
    tally: Counter[str] = field(default_factory=Counter)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _link_problem(path: Path) -> str:
    try:
        path.stat()
    except FileNotFoundError:
        return "broken symbolic link, skipped"
    except OSError as err:
        return f"symbolic link cannot be followed ({err.strerror}), skipped"  # a loop: ELOOP
    return "symbolic link to a folder, not followed"


def list_files(folder: Path, site: str, problems: list[Problem]) -> list[Path]:
    """Every visible file under `folder`, sorted. What cannot be read is added to `problems`:
    folders that cannot be listed, symbolic-link loops, broken links, links to folders (not
    followed: a link may lead out of the site, or back into it for ever) and special files."""

    def unreadable(err: OSError) -> None:
        problems.append(Problem(site, str(err.filename), f"folder cannot be read ({err.strerror}), skipped"))

    files = []
    for here, folders, names in os.walk(folder, onerror=unreadable):
        folders.sort()  # os.walk descends in this order: problems come out in a stable order
        for name in folders:
            path = Path(here, name)
            if path.is_symlink() and _visible(path):
                problems.append(Problem(site, str(path), _link_problem(path)))
        for name in sorted(names):
            path = Path(here, name)
            if not _visible(path):
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink():
                problems.append(Problem(site, str(path), _link_problem(path)))
            else:
                problems.append(Problem(site, str(path), "not a regular file, skipped"))
    return sorted(files)


def _require_root(spec: SiteSpec) -> None:
    if not spec.root.is_dir():
        raise FileNotFoundError(f"site {spec.name}: data path {spec.root} does not exist")
