import io
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedbt.data.catalog import build_catalog
from fedbt.data.dedup import difference_hash, near_duplicate_pairs
from fedbt.data.records import Record
from fedbt.data.sites import SplitPolicy
from fedbt.data.splits import assign_splits
from fedbt.data.synthetic import make_image


def test_near_duplicates_match_reencodings_but_not_other_images():
    rng = np.random.default_rng(3)
    original = make_image("glioma", rng, size=200).pixels
    buffer = io.BytesIO()
    Image.fromarray(original).save(buffer, format="JPEG", quality=90)  # a re-save of the same picture
    reencoded = np.asarray(Image.open(buffer))
    other = make_image("glioma", rng, size=200).pixels
    batch = torch.from_numpy(np.stack([original, reencoded, other])).unsqueeze(1)
    pixels = torch.nn.functional.interpolate(batch.float(), size=(64, 64), mode="area").round().to(torch.uint8)
    pairs = near_duplicate_pairs(difference_hash(pixels), max_bits=10)
    assert pairs == [(0, 1)]


def test_duplicates_never_straddle_splits_even_across_sites(data_config):
    catalog = build_catalog(data_config, progress=False)
    by_sha = defaultdict(set)
    for r, split in zip(catalog.records, catalog.splits):
        by_sha[r.sha256].add(split)
    copies = Counter(r.sha256 for r in catalog.records)
    shared = [sha for sha, n in copies.items() if n > 1]
    assert len(shared) >= 3  # the generator repeats SARTAJ no_tumor files in Br35H and SARTAJ/Testing
    assert all(len(by_sha[sha]) == 1 for sha in shared)
    groups = defaultdict(set)
    for g, split in zip(catalog.group_ids.tolist(), catalog.splits):
        groups[g].add(split)
    assert all(len(s) == 1 for s in groups.values())


def test_pooled_split_holds_each_image_once_and_sites_keep_their_own(data_config):
    catalog = build_catalog(data_config, progress=False)
    for split in ("train", "val", "test"):
        pooled = catalog.indices(split=split, pooled=True)
        shas = [catalog.records[i].sha256 for i in pooled]
        assert len(shas) == len(set(shas))
        per_site = sum(len(catalog.indices(site, split)) for site in catalog.site_names)
        assert per_site >= len(pooled)
    dup = next(r.sha256 for r in catalog.records if Path(r.path).name.startswith("dup"))
    holders = {r.site for r in catalog.records if r.sha256 == dup}
    assert holders == {"sartaj", "br35h"}


def _records(n_per_label: int, patients: bool = False) -> list[Record]:
    out = []
    for label in ("a", "b"):
        for i in range(n_per_label):
            patient = f"p{label}{i // 4}" if patients else None
            out.append(Record("s", f"{label}{i}", label, frozenset({"glioma"}), f"{label}{i}", patient))
    return out


def test_splits_are_stratified_seeded_and_reproducible():
    records = _records(40)
    groups = np.arange(len(records))
    policy = {"s": SplitPolicy(test=0.25, val=0.1)}
    first = assign_splits(records, groups, policy, seed=1)
    assert first == assign_splits(records, groups, policy, seed=1)
    assert first != assign_splits(records, groups, policy, seed=2)
    for label in ("a", "b"):
        counts = Counter(s for r, s in zip(records, first) if r.source_label == label)
        assert counts == {"train": 26, "test": 10, "val": 4}


def test_patient_groups_stay_together():
    from fedbt.data.dedup import UnionFind, union_equal

    records = _records(40, patients=True)
    uf = UnionFind(len(records))
    union_equal(uf, [r.patient for r in records])
    splits = assign_splits(records, uf.labels(), {"s": SplitPolicy(test=0.25, val=0.1)}, seed=0)
    by_patient = defaultdict(set)
    for r, s in zip(records, splits):
        by_patient[r.patient].add(s)
    assert all(len(s) == 1 for s in by_patient.values())
    assert set(splits) == {"train", "val", "test"}


def test_release_split_is_kept_when_asked():
    records = [
        Record("s", f"f{i}", "a", frozenset({"glioma"}), f"h{i}", None, "test" if i < 5 else "train") for i in range(30)
    ]
    splits = assign_splits(records, np.arange(30), {"s": SplitPolicy(val=0.2, use_source_split=True)}, seed=0)
    assert splits[:5] == ["test"] * 5
    assert Counter(splits[5:]) == {"train": 20, "val": 5}
