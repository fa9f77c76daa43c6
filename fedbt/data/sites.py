"""Hospital sites: one YAML file each, describing where a site's images are and what they mean."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedbt.config import resolve_project_path
from fedbt.data.labels import KNOWN_SOURCE_LABELS, parse_allowed

FORMATS = ("class_folders", "figshare_mat", "kaggle_combined")
DATA_ROOT_ENV = "FEDBT_DATA_ROOT"


@dataclass(frozen=True)
class SplitPolicy:
    test: float = 0.15
    val: float = 0.10
    # Use the release's own Training/Testing folders (SARTAJ) instead of a fresh split.
    use_source_split: bool = False
    # Keep all slices of one patient in one split when the source records patient ids.
    group_by_patient: bool = True


@dataclass(frozen=True)
class SiteSpec:
    name: str
    format: str
    root: Path
    labels: dict[str, frozenset[str]] = field(default_factory=dict)
    split: SplitPolicy = SplitPolicy()
    # kaggle_combined only: which origin of the combined set this site takes, and the
    # site YAMLs whose files decide SARTAJ vs Br35H by byte identity.
    origin: str | None = None
    reference_sites: tuple[SiteSpec, ...] = ()

    def allowed_for(self, source_label: str) -> frozenset[str] | None:
        return self.labels.get(source_label, KNOWN_SOURCE_LABELS.get(source_label))


def _label_key(key: object) -> str:
    # YAML 1.1 reads unquoted yes/no as booleans; Br35H's folders are named exactly that.
    if isinstance(key, bool):
        return "yes" if key else "no"
    return str(key)


def resolve_root(root: str, data_root: str | Path | None) -> Path:
    path = Path(root).expanduser()
    if path.is_absolute():
        return path
    base = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV)
    if base is None:
        raise ValueError(f"site root {root!r} is relative: give a data root (--data-root or ${DATA_ROOT_ENV})")
    return Path(base).expanduser() / path


def load_site(path: str | Path, data_root: str | Path | None) -> SiteSpec:
    yaml_path = resolve_project_path(path)
    if not yaml_path.is_file():
        raise FileNotFoundError(f"site file not found: {path}")
    raw = yaml.safe_load(yaml_path.read_text()) or {}
    where = str(yaml_path)
    for key in ("name", "format", "root"):
        if key not in raw:
            raise ValueError(f"{where}: missing required key {key!r}")
    if raw["format"] not in FORMATS:
        raise ValueError(f"{where}: format {raw['format']!r} is not one of {', '.join(FORMATS)}")
    try:
        labels = {_label_key(k): parse_allowed(v) for k, v in (raw.get("labels") or {}).items()}
        split = SplitPolicy(**(raw.get("split") or {}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    return SiteSpec(
        name=str(raw["name"]),
        format=raw["format"],
        root=resolve_root(str(raw["root"]), data_root),
        labels=labels,
        split=split,
        origin=raw.get("origin"),
        reference_sites=tuple(load_site(ref, data_root) for ref in raw.get("reference_sites") or ()),
    )


def load_sites(paths: list[str], data_root: str | Path | None) -> list[SiteSpec]:
    sites = [load_site(p, data_root) for p in paths]
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    return sites
