"""Which images each federated client holds.

- ``origin`` (default): one client per hospital site; with more clients than
  sites, each site is split into stratified sub-sites (clients dealt round-robin
  over the sites, so N=6 gives two clients per site).
- ``iid``: the pooled data dealt evenly and stratified over N clients.
- ``dirichlet``: the pooled data split by class with Dirichlet(alpha) proportions,
  the usual synthetic label skew.

Every partition carries train, val and test indices into the catalog.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from fedbt.data.catalog import Catalog
from fedbt.data.splits import SPLITS


@dataclass(frozen=True)
class Partition:
    name: str
    site: str | None  # the origin site, when the partition lies inside one
    indices: dict[str, list[int]]


def _by_label(catalog: Catalog, indices: list[int]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        groups["|".join(sorted(catalog.records[i].allowed))].append(i)
    return groups


def _stratified_deal(catalog: Catalog, indices: list[int], parts: int, rng: np.random.Generator) -> list[list[int]]:
    by_label = _by_label(catalog, indices)
    out: list[list[int]] = [[] for _ in range(parts)]
    offset = 0
    for label in sorted(by_label):
        members = rng.permutation(by_label[label]).tolist()
        for k, i in enumerate(members):
            out[(k + offset) % parts].append(i)
        offset += len(members)  # so small classes do not always favour client 0
    return [sorted(p) for p in out]


def _dirichlet_deal(
    catalog: Catalog, indices: list[int], parts: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    by_label = _by_label(catalog, indices)
    out: list[list[int]] = [[] for _ in range(parts)]
    for label in sorted(by_label):
        members = rng.permutation(by_label[label])
        shares = rng.dirichlet([alpha] * parts)
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for p, chunk in enumerate(np.split(members, cuts)):
            out[p].extend(chunk.tolist())
    return [sorted(p) for p in out]


def make_partitions(
    catalog: Catalog, num_clients: int, scheme: str = "origin", alpha: float = 0.5, seed: int = 0
) -> list[Partition]:
    if num_clients < 1:
        raise ValueError("need at least one client")
    rng = np.random.default_rng(seed)
    if scheme == "origin":
        return _origin_partitions(catalog, num_clients, rng)
    if scheme not in ("iid", "dirichlet"):
        raise ValueError(f"unknown partition {scheme!r}: origin, iid or dirichlet")
    per_split = {}
    for split in SPLITS:
        pooled = catalog.indices(split=split, pooled=True)
        if scheme == "iid" or split != "train":
            # Evaluation splits stay stratified so every client can score every class it can.
            per_split[split] = _stratified_deal(catalog, pooled, num_clients, rng)
        else:
            per_split[split] = _dirichlet_deal(catalog, pooled, num_clients, alpha, rng)
    return [Partition(f"client{c}", None, {split: per_split[split][c] for split in SPLITS}) for c in range(num_clients)]


def _origin_partitions(catalog: Catalog, num_clients: int, rng: np.random.Generator) -> list[Partition]:
    sites = catalog.site_names
    if num_clients < len(sites):
        raise ValueError(
            f"partition 'origin' needs at least one client per site ({len(sites)}), got {num_clients}; "
            "use fewer --sites or partition iid/dirichlet"
        )
    counts = [num_clients // len(sites) + (s < num_clients % len(sites)) for s in range(len(sites))]
    partitions = []
    for site, parts in zip(sites, counts):
        dealt = {split: _stratified_deal(catalog, catalog.indices(site, split), parts, rng) for split in SPLITS}
        for p in range(parts):
            name = site if parts == 1 else f"{site}-{p + 1}"
            partitions.append(Partition(name, site, {split: dealt[split][p] for split in SPLITS}))
    return partitions
