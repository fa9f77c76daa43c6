"""Exact and near-duplicate detection, so no picture sits on both sides of a split.

Exact duplicates share the sha256 of their bytes.  Near duplicates are the same
picture re-encoded or resized: their 64-bit difference hashes (dHash of the
decoded pixels) differ in at most a few of their 256 bits.  A 64-bit hash is
too coarse for MRI: dark background and a bright oval make thousands of
unrelated slices collide; 256 bits separate them and still match re-encodings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

HASH_SIDE = 16  # 16 x 16 horizontal gradients = 256 bits


def difference_hash(pixels: torch.Tensor) -> np.ndarray:
    """256-bit dHash of each image in a uint8 batch (N, 1, S, S) -> (N, 4) uint64 words."""
    small = F.interpolate(pixels.float(), size=(HASH_SIDE, HASH_SIDE + 1), mode="area")[:, 0]
    bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(pixels), -1).numpy()
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)


def near_duplicate_pairs(hashes: np.ndarray, max_bits: int, chunk: int = 256) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most max_bits bits."""
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk]
        distance = np.bitwise_count(block[:, None, :] ^ hashes[None, :, :]).sum(axis=2)
        rows, cols = np.nonzero(distance <= max_bits)
        rows = rows + start
        keep = rows < cols
        pairs.extend(zip(rows[keep].tolist(), cols[keep].tolist()))
    return pairs


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))])


def union_equal(uf: UnionFind, keys: list) -> None:
    """Join every pair of indices whose key is equal (None keys are never joined)."""
    first: dict = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        if key in first:
            uf.union(first[key], i)
        else:
            first[key] = i
