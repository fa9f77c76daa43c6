"""The federation's data catalog and its per-site datasets (FLamby-style API).

``build_catalog`` scans every site, decodes into the pixel cache, finds duplicate
groups across all sites and deals leakage-free splits.  ``Catalog.dataset(site=...,
split=..., pooled=...)`` then serves one site's split, or the pooled split of all
sites holding each image once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fedbt.config import DataConfig
from fedbt.data.cache import ImageCache, fill_cache, load_pixels
from fedbt.data.dedup import UnionFind, difference_hash, near_duplicate_pairs, union_equal
from fedbt.data.images import ImageLimits
from fedbt.data.labels import Task, get_task
from fedbt.data.pack import is_pack, read_pack
from fedbt.data.readers import scan_site
from fedbt.data.records import Problem, Record
from fedbt.data.sites import SiteSpec, load_sites
from fedbt.data.splits import assign_splits, held_out_test_records, picture_groups
from fedbt.data.transforms import Augmentation


class MRIDataset(Dataset):
    """uint8 images (N, 1, S, S) in memory with their target masks (N, C).

    Items stay uint8: the engine converts and normalises a whole batch on the device. A
    training set carries its augmentation, applied per item here unless the trainer applies
    it to whole batches on the device (`without_augmentation`).
    """

    def __init__(self, pixels: torch.Tensor, masks: torch.Tensor, augmentation: Augmentation | None = None):
        self.pixels = pixels
        self.masks = masks
        self.augmentation = augmentation

    def without_augmentation(self) -> MRIDataset:
        return MRIDataset(self.pixels, self.masks)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.pixels[i]
        if self.augmentation is not None:
            image = self.augmentation(image)
        return image, self.masks[i]


@dataclass
class Catalog:
    sites: list[SiteSpec]
    task: Task
    image_size: int
    records: list[Record]
    problems: list[Problem]
    pixels: torch.Tensor
    masks: torch.Tensor
    group_ids: np.ndarray
    splits: list[str]
    near_pairs: list[tuple[int, int]] = field(default_factory=list)
    # One id per picture, across sites: exact copies and near duplicates share it.
    picture_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    # Test records left out of every test set served: another site trains on their picture.
    held_out_test: list[int] = field(default_factory=list)
    # DICOM and NIfTI sites: slices kept, and skipped by reason.
    slice_tally: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def indices(
        self, site: str | None = None, split: str = "train", pooled: bool = False, keep_held_out: bool = False
    ) -> list[int]:
        """Records of one site's split (each image once per site), or pooled (once overall).

        Test sets leave out `held_out_test` (pictures this catalog also trains on, at another
        site) unless `keep_held_out`: what a deployment, blind to the other sites, would score."""
        if not pooled and site is None:
            raise ValueError("name a site, or ask for pooled=True")
        if site is not None and site not in self.site_names:
            raise ValueError(f"unknown site {site!r}: have {', '.join(self.site_names)}")
        seen: set[tuple[str, str]] = set()
        held_out = set() if keep_held_out else set(self.held_out_test)
        chosen = []
        for i, r in enumerate(self.records):
            if self.splits[i] != split or (site is not None and r.site != site) or i in held_out:
                continue
            key = ("", r.sha256) if pooled else (r.site, r.sha256)
            if key not in seen:
                seen.add(key)
                chosen.append(i)
        return chosen

    def held_out_test_names(self) -> list[str]:
        """'site: file name' of each held-out test record, for reports (no folders)."""
        return [f"{self.records[i].site}: {Path(self.records[i].path).name}" for i in self.held_out_test]

    def dataset(
        self,
        site: str | None = None,
        split: str = "train",
        pooled: bool = False,
        augment: Augmentation | None = None,
        keep_held_out: bool = False,
    ) -> MRIDataset:
        """One site's split, or the pooled split; `augment` is applied to training items."""
        return self.subset(self.indices(site, split, pooled, keep_held_out), augment)

    def subset(self, indices: list[int], augment: Augmentation | None = None) -> MRIDataset:
        idx = torch.tensor(indices, dtype=torch.long)
        # index_select copies whole rows; indexing with a tensor gathers element by element (slower).
        return MRIDataset(self.pixels.index_select(0, idx), self.masks.index_select(0, idx), augment)

    def class_counts(self, indices: list[int]) -> dict[str, int]:
        """Images per source-label set, e.g. {'glioma': 80, 'glioma|meningioma|pituitary': 40}."""
        return dict(Counter("|".join(sorted(self.records[i].allowed)) for i in indices))


def _limit_per_label(records: list[Record], limit: int | None) -> list[Record]:
    if limit is None:
        return records
    kept: Counter[tuple[str, str, str | None]] = Counter()
    out = []
    for r in records:
        key = (r.site, r.source_label, r.source_split)
        if kept[key] < limit:
            kept[key] += 1
            out.append(r)
    return out


def split_groups(records: list[Record], near_pairs: list[tuple[int, int]], sites: list[SiteSpec]) -> np.ndarray:
    """What must share a split, within each site alone (so a site's split is its own): its
    exact and near duplicates, and a patient's slices where the source records patients."""
    uf = UnionFind(len(records))
    union_equal(uf, [(r.site, r.sha256) for r in records])
    for i, j in near_pairs:
        if records[i].site == records[j].site:
            uf.union(i, j)
    by_patient = {s.name for s in sites if s.split.group_by_patient}
    union_equal(uf, [(r.site, r.patient) if r.patient and r.site in by_patient else None for r in records])
    return uf.labels()


def build_catalog(cfg: DataConfig, progress: bool = True, data_root: str | Path | None = None) -> Catalog:
    """Scan, decode, de-duplicate and split every site named in the config.

    A data root that is a pack (`fedbt data pack`) gives the records and pixels the folders and
    the decode cache would; duplicates and splits are then found the same way."""
    root = data_root if data_root is not None else cfg.data_root
    sites = load_sites(cfg.sites, root)
    if is_pack(root):
        contents = read_pack(root, cfg, sites)
        # A pack keeps the records it holds, not the slices its DICOM or NIfTI sites skipped.
        records, problems, pixels, tallies = contents.records, contents.problems, contents.pixels, {}
    else:
        records, problems, pixels, tallies = scan_and_decode(cfg, sites, progress)
    return catalog_of(cfg, sites, records, problems, pixels, tallies)


def scan_and_decode(
    cfg: DataConfig, sites: list[SiteSpec], progress: bool = True
) -> tuple[list[Record], list[Problem], torch.Tensor, dict[str, Counter[str]]]:
    """Every site's readable records, the files not used, the records' pixels from the decode cache,
    and each DICOM or NIfTI site's tally of slices kept and skipped."""
    records: list[Record] = []
    problems: list[Problem] = []
    tallies: dict[str, Counter[str]] = {}
    for site in sites:
        scan = scan_site(site)
        records.extend(_limit_per_label(scan.records, cfg.max_per_label))
        problems.extend(scan.problems)
        if scan.tally:
            tallies[site.name] = scan.tally

    cache = ImageCache(cfg.cache_dir, cfg.image_size, cfg.crop_to_content, ImageLimits.of(cfg))
    errors = fill_cache(records, cache, progress=progress)
    for r in records:
        if r.sha256 in errors:
            problems.append(Problem(r.site, r.path, errors[r.sha256]))
            if r.site in tallies:
                tallies[r.site]["cannot decode"] += 1
    records = [r for r in records if r.sha256 not in errors]
    for name, tally in tallies.items():  # after max_per_label and decoding: the slices the catalog holds
        tally["kept"] = sum(r.site == name for r in records)
    if not records:
        raise ValueError("no readable images in any site")
    return records, problems, load_pixels(records, cache), tallies


def catalog_of(
    cfg: DataConfig,
    sites: list[SiteSpec],
    records: list[Record],
    problems: list[Problem],
    pixels: torch.Tensor,
    tallies: dict[str, Counter[str]],
) -> Catalog:
    """Duplicates, split groups, splits and the held-out test rule over decoded records."""
    task = get_task(cfg.task)
    masks = torch.tensor([task.target_mask(r.allowed) for r in records], dtype=torch.bool)
    max_bits = cfg.near_duplicate_bits
    pairs = near_duplicate_pairs(difference_hash(pixels), max_bits) if max_bits >= 0 else []
    group_ids = split_groups(records, pairs, sites)
    splits = assign_splits(records, group_ids, {s.name: s.split for s in sites}, cfg.seed)
    pictures = picture_groups(records, pairs)
    held_out = held_out_test_records(splits, pictures)
    return Catalog(
        sites,
        task,
        cfg.image_size,
        records,
        problems,
        pixels,
        masks,
        group_ids,
        splits,
        pairs,
        pictures,
        held_out,
        slice_tally=tallies,
    )
