"""Integration tests on the shared real data (small slices where training is involved)."""

import csv
from collections import Counter, defaultdict
from dataclasses import replace

import pytest

from fedbt.config import DataConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.inspect import inspect_report
from fedbt.data.readers import scan_site
from fedbt.data.sites import load_site

pytestmark = pytest.mark.real_data


def test_site_readers_find_every_file_of_the_manifest(real_root, site_files):
    manifest = Counter((row["origin"], row["label"]) for row in csv.DictReader(open(real_root / "MANIFEST.csv")))
    found = Counter()
    for site_file in site_files:
        scan = scan_site(load_site(site_file, real_root))
        assert not scan.problems, scan.problems[:3]
        found.update((r.site, r.source_label) for r in scan.records)
    assert found == manifest


def test_inspect_finds_the_known_duplicates_and_no_leakage(real_root, tmp_path):
    catalog = build_catalog(
        DataConfig(data_root=str(real_root), image_size=32, cache_dir=str(tmp_path)), progress=False
    )
    report = inspect_report(catalog)
    assert set(report["sites"]) == {"figshare", "sartaj", "br35h"}
    assert report["sites"]["figshare"]["per_label"] == {"glioma": 1212, "meningioma": 602, "pituitary": 790}
    exact = report["duplicates"]["exact_duplicate_copies"]
    # SARTAJ no_tumor shares byte-identical images with Br35H no ...
    assert sum(v for k, v in exact.items() if "br35h" in k and "sartaj" in k) > 150
    # ... and SARTAJ repeats images inside itself, across its own Training/Testing too.
    assert exact.get("sartaj/test + sartaj/train", 0) > 0
    assert sum(v for k, v in exact.items() if k in ("sartaj/train", "sartaj/test")) > 0
    assert sum(report["duplicates"]["near_duplicate_pairs"].values()) > 0
    # No test image that is scored shares a picture (a byte-identical copy, or a re-encoding
    # across the releases) with a training image: within a site copies share a split, and a
    # test image whose picture another site trains on is held out of every test set.
    trained = {catalog.picture_ids[i] for i in catalog.indices(split="train", pooled=True)}
    for site in [None, *catalog.site_names]:
        scored = catalog.indices(site, "test", pooled=site is None)
        assert [i for i in scored if catalog.picture_ids[i] in trained] == []
    assert report["duplicates"]["test_images_also_trained_on"] == 0
    # A byte-identical copy at two sites is in one split at both, unless a site groups it with
    # other pictures (a near duplicate of its own), whose smallest hash then draws the split.
    group_shas, copies = defaultdict(set), defaultdict(list)
    for i, record in enumerate(catalog.records):
        group_shas[catalog.group_ids[i]].add(record.sha256)
        copies[record.sha256].append(i)
    for members in copies.values():
        if all(group_shas[catalog.group_ids[i]] == {catalog.records[i].sha256} for i in members):
            assert len({catalog.splits[i] for i in members}) == 1


def test_each_site_is_split_the_same_alone_as_with_the_others(real_root, site_files, tmp_path):
    config = DataConfig(data_root=str(real_root), image_size=32, cache_dir=str(tmp_path))
    together = build_catalog(config, progress=False)
    splits_together = {r.path: split for r, split in zip(together.records, together.splits)}
    for site_file in site_files:
        alone = build_catalog(replace(config, sites=[site_file]), progress=False)
        assert {r.path: split for r, split in zip(alone.records, alone.splits)} == {
            r.path: splits_together[r.path] for r in alone.records
        }
