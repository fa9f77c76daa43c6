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
from fedbt.data.splits import assign_splits, held_out_test_records
from fedbt.data.synthetic import make_image
from fedbt.reports.comparison import held_out_effect


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


def test_copies_across_sites_share_one_picture_and_byte_identical_ones_one_split(copied_across_sites):
    catalog = copied_across_sites
    copies = defaultdict(list)
    for i, r in enumerate(catalog.records):
        copies[r.sha256].append(i)
    # The generator's SARTAJ no_tumor images repeated in SARTAJ/Testing and Br35H: three places, two sites.
    repeated = [
        members for members in copies.values() if {catalog.records[i].site for i in members} == {"sartaj", "br35h"}
    ]
    assert [len(members) for members in repeated] == [3, 3, 3]
    near, exact = planted_pairs(catalog)
    for members in [*repeated, exact]:
        paths = [catalog.records[i].path for i in members]
        assert len({catalog.splits[i] for i in members}) == 1, paths
    for members in [*repeated, near, exact]:
        assert len({catalog.picture_ids[i] for i in members}) == 1
    assert duplicate_report(catalog)["label_conflict_groups"] == [["figshare:meningioma", "sartaj:pituitary_tumor"]]


def test_a_byte_identical_picture_at_two_sites_lands_in_the_same_split_whatever_the_seed(
    demo_root, site_files, tmp_path
):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    copies = root / "sartaj" / "Training" / "glioma_tumor"
    for i in range(10):  # ten figshare pictures copied into SARTAJ: some go to test, some to train
        shutil.copyfile(root / "figshare" / "glioma" / f"{i}.jpg", copies / f"c{i}.jpg")
    seen = set()
    for seed in range(3):
        cache = str(tmp_path / "cache")
        config = DataConfig(data_root=str(root), sites=site_files, image_size=32, cache_dir=cache, seed=seed)
        catalog = build_catalog(config, progress=False)
        for i in range(10):
            a = index_of(catalog, "figshare", "glioma", f"{i}.jpg")
            b = index_of(catalog, "sartaj", "Training", "glioma_tumor", f"c{i}.jpg")
            assert catalog.splits[a] == catalog.splits[b]
            seen.add(catalog.splits[a])
    assert {"train", "test"} <= seen


def test_a_site_is_split_the_same_alone_and_with_the_others(data_config):
    together = build_catalog(data_config, progress=False)
    for site_file in data_config.sites:
        alone = build_catalog(replace(data_config, sites=[site_file]), progress=False)
        site = alone.site_names[0]
        with_others = {r.path: split for r, split in zip(together.records, together.splits) if r.site == site}
        assert dict(zip((r.path for r in alone.records), alone.splits)) == with_others
        assert alone.held_out_test == []  # alone, a site knows of no other site's training


def test_a_test_picture_another_site_trains_on_is_held_out_of_every_test_set(copied_across_sites):
    catalog = copied_across_sites
    near, _ = planted_pairs(catalog)
    splits = list(catalog.splits)
    splits[near[0]], splits[near[1]] = "train", "test"  # figshare trains on what Br35H tests on
    moved = replace(catalog, splits=splits, held_out_test=held_out_test_records(splits, catalog.picture_ids))
    assert near[1] in moved.held_out_test
    assert near[1] not in moved.indices("br35h", "test") and near[1] not in moved.indices(split="test", pooled=True)
    assert duplicate_report(moved)["test_images_also_trained_on"] == 0
    # The leakage check counts a test image that shares a picture with training and is not held out.
    assert duplicate_report(replace(moved, held_out_test=[]))["test_images_also_trained_on"] == 1
    # Scored as a deployment would (blind to the other sites), the held-out image is back.
    assert near[1] in moved.indices(split="test", pooled=True, keep_held_out=True)


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


def test_splits_are_seeded_reproducible_and_near_their_shares():
    records = _records(400)
    groups = np.arange(len(records))
    policy = {"s": SplitPolicy(test=0.25, val=0.1)}
    first = assign_splits(records, groups, policy, seed=1)
    assert first == assign_splits(records, groups, policy, seed=1)
    assert first != assign_splits(records, groups, policy, seed=2)
    for label in ("a", "b"):
        counts = Counter(s for r, s in zip(records, first) if r.source_label == label)
        # Binomial around 100 test and 40 val of 400: within four standard deviations.
        assert abs(counts["test"] - 100) <= 35 and abs(counts["val"] - 40) <= 24


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
    assert set(splits[5:]) == {"train", "val"}  # the release's training part gives val, never test


def test_the_report_says_how_the_held_out_images_move_pooled_accuracy():
    models = {
        "federated": {"pooled": {"accuracy": 0.9}, "pooled_with_held_out": {"accuracy": 0.95}, "sites": {}},
        "central": {"pooled": {"accuracy": 0.92}, "sites": {}},
    }
    sentence = held_out_effect(models)
    assert "federated 95.0% (reported: 90.0%)" in sentence
    assert "central" not in sentence  # a model scored without the held-out images is not claimed to move
    assert held_out_effect({"central": models["central"]}) == ""
