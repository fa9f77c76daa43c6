"""``class_folders``: ``<root>/[Training|Testing/]<label>/*.jpg`` (SARTAJ, the combined
Kaggle set, figshare as JPEG folders, Br35H ``yes``/``no``)."""

from __future__ import annotations

from pathlib import Path

from fedbt.data.records import (
    IMAGE_SUFFIXES,
    Problem,
    Record,
    SiteScan,
    _link_problem,
    _require_root,
    _visible,
    file_sha256,
    list_files,
)
from fedbt.data.sites import SiteSpec

SOURCE_SPLIT_DIRS = {"training": "train", "train": "train", "testing": "test", "test": "test"}


def split_roots(root: Path) -> list[tuple[Path, str | None]]:
    """The release's own split folders when present, else the root alone."""
    split_dirs = [
        (d, SOURCE_SPLIT_DIRS[d.name.lower()])
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name.lower() in SOURCE_SPLIT_DIRS
    ]
    return split_dirs or [(root, None)]


def scan_class_folders(spec: SiteSpec) -> SiteScan:
    _require_root(spec)
    records: list[Record] = []
    problems: list[Problem] = []
    for split_root, source_split in split_roots(spec.root):
        for label_dir in sorted(d for d in split_root.iterdir() if _visible(d)):
            if not label_dir.is_dir():
                dangling = label_dir.is_symlink() and not label_dir.exists()
                stray = _link_problem(label_dir) if dangling else "stray file outside a class folder"
                problems.append(Problem(spec.name, str(label_dir), stray))
                continue
            allowed = spec.allowed_for(label_dir.name)
            walk_problems: list[Problem] = []
            files = list_files(label_dir, spec.name, walk_problems)
            if allowed is None:
                problems.append(Problem(spec.name, str(label_dir), f"unknown class folder, {len(files)} files skipped"))
                continue
            problems.extend(walk_problems)
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
