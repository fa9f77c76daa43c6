import io
import shutil
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedbt.config import DataConfig
from fedbt.data.catalog import Catalog, build_catalog
from fedbt.data.dedup import difference_hash, near_duplicate_pairs
from fedbt.data.inspect import duplicate_report
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


@pytest.fixture()
def copied_across_sites(demo_root, site_files, tmp_path) -> Catalog:
    """The demo data plus two figshare pictures repeated at other sites: a glioma re-saved as PNG into
    Br35H's 'yes' (other bytes, the same pixels: a near duplicate, labels consistent) and a meningioma
    copied byte for byte into SARTAJ's pituitary folder (an exact duplicate whose labels conflict)."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    Image.open(root / "figshare" / "glioma" / "0.jpg").save(root / "br35h" / "yes" / "resaved.png")
    copied = root / "sartaj" / "Training" / "pituitary_tumor" / "copied.jpg"
    shutil.copyfile(root / "figshare" / "meningioma" / "0.jpg", copied)
    config = DataConfig(data_root=str(root), sites=site_files, image_size=32, cache_dir=str(tmp_path / "cache"))
    return build_catalog(config, progress=False)


def index_of(catalog: Catalog, *tail: str) -> int:
    """The record whose path ends in the given parts."""
    return next(i for i, r in enumerate(catalog.records) if Path(r.path).parts[-len(tail) :] == tail)


def planted_pairs(catalog: Catalog) -> list[tuple[int, int]]:
    near = (index_of(catalog, "figshare", "glioma", "0.jpg"), index_of(catalog, "br35h", "yes", "resaved.png"))
    exact = (index_of(catalog, "figshare", "meningioma", "0.jpg"), index_of(catalog, "copied.jpg"))
    return [near, exact]


def test_copies_across_sites_and_labels_share_one_group_and_so_one_split(copied_across_sites):
    catalog = copied_across_sites
    copies = defaultdict(list)
    for i, r in enumerate(catalog.records):
        copies[r.sha256].append(i)
    # The generator's SARTAJ no_tumor images repeated in SARTAJ/Testing and Br35H: three places, two sites.
    repeated = [
        members for members in copies.values() if {catalog.records[i].site for i in members} == {"sartaj", "br35h"}
    ]
    assert [len(members) for members in repeated] == [3, 3, 3]
    for members in [*repeated, *planted_pairs(catalog)]:
        paths = [catalog.records[i].path for i in members]
        assert len({catalog.group_ids[i] for i in members}) == 1, paths
        assert len({catalog.splits[i] for i in members}) == 1, paths
    assert duplicate_report(catalog)["label_conflict_groups"] == [["figshare:meningioma", "sartaj:pituitary_tumor"]]


def test_the_leakage_check_counts_the_groups_whose_copies_were_split_apart(copied_across_sites):
    catalog = copied_across_sites
    splits = list(catalog.splits)
    for first, second in planted_pairs(catalog):
        splits[second] = "train" if splits[first] != "train" else "test"
    # Two of the five duplicate groups now straddle splits; the other three are left as dealt.
    report = duplicate_report(replace(catalog, splits=splits))
    assert (report["duplicate_groups"], report["groups_straddling_splits"]) == (5, 2)


def test_pooled_split_holds_each_image_once_and_sites_keep_their_own(data_config):
    catalog = build_catalog(data_config, progress=False)
    for split in ("train", "val", "test"):
        held = [r for r, s in zip(catalog.records, catalog.splits) if s == split]
        pooled = catalog.indices(split=split, pooled=True)
        assert sorted(catalog.records[i].sha256 for i in pooled) == sorted({r.sha256 for r in held})
        per_site = sum(len(catalog.indices(site, split)) for site in catalog.site_names)
        assert per_site == len({(r.site, r.sha256) for r in held})  # a picture two sites hold counts at each
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
