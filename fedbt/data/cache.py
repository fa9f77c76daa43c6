"""Decoded pixels cached on disk by file hash and size.

Decoding a 512 px JPEG costs more than a training step on a small image, so every
file is decoded once per image size and kept as ``<cache>/<size>px/<sha[:2]>/<sha>.npy``.
Epochs then read raw uint8 pixels and never touch a JPEG again.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedbt.data.images import decode_file, preprocess
from fedbt.data.records import Record


class ImageCache:
    """Pixels of decoded images at one size, keyed by the sha256 of the source file."""

    def __init__(self, cache_dir: str | Path, size: int, crop: bool = True) -> None:
        self.root = Path(cache_dir).expanduser() / (f"{size}px-crop" if crop else f"{size}px")
        self.size = size
        self.crop = crop

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.npy"

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def load(self, sha256: str) -> np.ndarray:
        return np.load(self.path_for(sha256))

    def store(self, sha256: str, pixels: np.ndarray) -> None:
        target = self.path_for(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a concurrent reader (another client process) never sees half a file.
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, pixels)
        os.replace(tmp, target)


def _decode_into_cache(job: tuple[str, str, str, int, bool]) -> str | None:
    path, sha256, cache_dir, size, crop = job
    try:
        pixels = preprocess(decode_file(path), size, crop)
    except ValueError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file, not a crash
        return f"{path}: cannot decode image ({type(err).__name__}: {err})"
    ImageCache(cache_dir, size, crop).store(sha256, pixels.numpy())
    return None


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def fill_cache(
    records: list[Record], cache: ImageCache, workers: int | None = None, progress: bool = True
) -> dict[str, str]:
    """Decode every record not yet cached. Returns {sha256: error message} for unreadable files."""
    todo: dict[str, str] = {}
    for r in records:
        if r.sha256 not in todo and not cache.has(r.sha256):
            todo[r.sha256] = r.path
    if not todo:
        return {}
    jobs = [(path, sha, str(cache.root.parent), cache.size, cache.crop) for sha, path in todo.items()]
    workers = workers or default_workers()
    parallel = workers > 1 and len(jobs) >= 16
    errors: dict[str, str] = {}
    bar = tqdm(total=len(jobs), desc=f"decoding to {cache.size}px cache", unit="img", disable=not progress)
    with ProcessPoolExecutor(workers) if parallel else contextlib.nullcontext() as pool:
        results = pool.map(_decode_into_cache, jobs, chunksize=16) if pool else map(_decode_into_cache, jobs)
        for (_, sha, *_), err in zip(jobs, results):
            bar.update()
            if err:
                errors[sha] = err
    bar.close()
    return errors


def load_pixels(records: list[Record], cache: ImageCache) -> torch.Tensor:
    """Stack the cached pixels of records (all must be cached) into (N, 1, S, S) uint8."""
    out = torch.empty((len(records), 1, cache.size, cache.size), dtype=torch.uint8)
    for i, r in enumerate(records):
        out[i] = torch.from_numpy(cache.load(r.sha256))
    return out
