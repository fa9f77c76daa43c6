"""What every reader produces: one ``Record`` per image, one ``Problem`` per file not used."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedbt.data.sites import SiteSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


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


def _require_root(spec: SiteSpec) -> None:
    if not spec.root.is_dir():
        raise FileNotFoundError(f"site {spec.name}: data path {spec.root} does not exist")
