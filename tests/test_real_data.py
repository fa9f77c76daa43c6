"""Integration tests on the shared real data (small slices where training is involved)."""

import csv
from collections import Counter, defaultdict

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
    # No picture sits on both sides of a split: every byte-identical copy, and both files of every
    # near-duplicate pair (re-encodings across the releases), are in one split.
    splits_of_picture = defaultdict(set)
    for record, split in zip(catalog.records, catalog.splits):
        splits_of_picture[record.sha256].add(split)
    assert [sha for sha, splits in splits_of_picture.items() if len(splits) > 1] == []
    assert sum(report["duplicates"]["near_duplicate_pairs"].values()) > 0
    assert [(i, j) for i, j in catalog.near_pairs if catalog.splits[i] != catalog.splits[j]] == []
