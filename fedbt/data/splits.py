"""Stratified, seeded, group-aware train/val/test splits.

A *group* is every record that must land in the same split: exact and near
duplicates (even across sites) and, where the source records one, all slices of
a patient.  Groups are dealt to test, then val, then train within each stratum
(site x source label) until each split holds its share of the stratum's images.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from fedbt.data.records import Record
from fedbt.data.sites import SplitPolicy

SPLITS = ("train", "val", "test")


def _deal(groups: list[list[int]], policy: SplitPolicy, rng: np.random.Generator, out: list[str]) -> None:
    """Deal one stratum's groups into test/val/train by image count."""
    total = sum(len(g) for g in groups)
    targets = {"test": round(policy.test * total), "val": round(policy.val * total)}
    filled = {"test": 0, "val": 0}
    for gi in rng.permutation(len(groups)):
        members = groups[gi]
        split = next((s for s in ("test", "val") if filled[s] < targets[s]), "train")
        if split != "train":
            filled[split] += len(members)
        for i in members:
            out[i] = split


def assign_splits(
    records: list[Record], group_ids: np.ndarray, policies: dict[str, SplitPolicy], seed: int
) -> list[str]:
    """One split name per record; no group straddles two splits."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids.tolist()):
        members[g].append(i)

    out = [""] * len(records)
    strata: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
    for group in members.values():
        # A group containing a release-fixed test image is test as a whole: the
        # release's test set stays intact and its duplicates leave training.
        fixed_test = any(
            policies[records[i].site].use_source_split and records[i].source_split == "test" for i in group
        )
        if fixed_test:
            for i in group:
                out[i] = "test"
            continue
        head = records[group[0]]
        strata[(head.site, head.source_label)].append(group)

    rng = np.random.default_rng(seed)
    for (site, _), groups in sorted(strata.items()):
        policy = policies[site]
        if policy.use_source_split:
            # Test is the release's own; only val is drawn from its training part.
            policy = SplitPolicy(test=0.0, val=policy.val)
        _deal(groups, policy, rng, out)
    return out
