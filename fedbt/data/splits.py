"""Seeded, group-aware train/val/test splits that depend on a site's own data only.

A *group* is every record of one site that must land in the same split: its exact and
near duplicates and, where the source records one, all slices of a patient. Each group
draws its split from a number in [0, 1) fixed by the seed and the content hash of one
member (its smallest sha256): below the site's test share it is test, below test + val
it is val, else train. Shares are met in expectation, per class as overall.

So a site's split is the same whether it is loaded alone (a deployment, a local-only
run) or with the others (simulation, central), and a byte-identical picture held by two
sites with the same shares lands in the same split at both, without the sites
exchanging anything. What that cannot settle (a near twin at another site, a copy that
one site groups with other pictures) is found where the catalog holds every site:
`held_out_test_records` lists the test records whose picture another site trains on,
which every test set the catalog serves then leaves out.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from fedbt.data.dedup import UnionFind, union_equal
from fedbt.data.records import Record
from fedbt.data.sites import SplitPolicy

SPLITS = ("train", "val", "test")


def split_draw(seed: int, sha256: str) -> float:
    """A number in [0, 1) fixed by the seed and a picture's content hash alone."""
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _group_split(group: list[int], records: list[Record], policy: SplitPolicy, seed: int) -> str:
    test_share = policy.test
    if policy.use_source_split:
        # Test is the release's own; only val is drawn from its training part. A group with
        # a release-fixed test image is test as a whole: its duplicates leave training.
        if any(records[i].source_split == "test" for i in group):
            return "test"
        test_share = 0.0
    draw = split_draw(seed, min(records[i].sha256 for i in group))
    if draw < test_share:
        return "test"
    return "val" if draw < test_share + policy.val else "train"


def assign_splits(
    records: list[Record], group_ids: np.ndarray, policies: dict[str, SplitPolicy], seed: int
) -> list[str]:
    """One split name per record; no group straddles two splits. Groups hold one site's records."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids.tolist()):
        members[g].append(i)
    out = [""] * len(records)
    for group in members.values():
        sites = {records[i].site for i in group}
        if len(sites) > 1:
            raise ValueError(f"a split group spans sites {sorted(sites)}: groups are formed within a site")
        split = _group_split(group, records, policies[records[group[0]].site], seed)
        for i in group:
            out[i] = split
    return out


def picture_groups(records: list[Record], near_pairs: list[tuple[int, int]]) -> np.ndarray:
    """One id per picture, across sites: byte-identical copies and near duplicates (chained)."""
    uf = UnionFind(len(records))
    union_equal(uf, [r.sha256 for r in records])
    for i, j in near_pairs:
        uf.union(i, j)
    return uf.labels()


def held_out_test_records(splits: list[str], picture_ids: np.ndarray) -> list[int]:
    """Test records whose picture the catalog also trains on, which can only be at another
    site (a site keeps its own copies in one split): scoring them would score memory."""
    trained = {g for g, split in zip(picture_ids.tolist(), splits) if split == "train"}
    return [i for i, (g, split) in enumerate(zip(picture_ids.tolist(), splits)) if split == "test" and g in trained]
