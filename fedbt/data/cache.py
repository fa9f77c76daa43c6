"""Decoded pixels cached on disk by file hash and size.

Decoding a 512 px JPEG costs more than a training step on a small image, so every
file is decoded once per image size and kept as ``<cache>/<size>px/<sha[:2]>/<sha>.npy``.
Epochs then read raw uint8 pixels and never touch a JPEG again.

The cache heals itself: an entry that cannot be read (truncated, empty, not a .npy) or
holds anything but (1, size, size) uint8 pixels is deleted and its file decoded again.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedbt.data.images import ImageLimits, UnusableImage, decode_file, preprocess
from fedbt.data.records import Record
from fedbt.fileio import atomic_write


class ImageCache:
    """Pixels of decoded images at one size, keyed by the sha256 of the source file."""

    def __init__(self, cache_dir: str | Path, size: int, crop: bool, limits: ImageLimits) -> None:
        self.root = Path(cache_dir).expanduser() / (f"{size}px-crop" if crop else f"{size}px")
        self.size = size
        self.crop = crop
        self.limits = limits

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, self.size, self.size)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.npy"

    def _problem(self, entry: np.ndarray) -> str | None:
        if entry.shape != self.shape or entry.dtype != np.uint8:
            return f"holds {entry.dtype} {entry.shape}, not uint8 {self.shape}"
        return None

    def usable(self, sha256: str) -> bool:
        """Whether a sound entry exists. An unsound one is deleted, so that it is decoded again."""
        path = self.path_for(sha256)
        try:
            # Memory-mapped: reads the header and checks the file is long enough, not the pixels.
            entry = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, EOFError):  # empty, truncated or not a .npy file
            entry = None
        if entry is not None and self._problem(entry) is None:
            return True
        path.unlink(missing_ok=True)
        return False

    def load(self, sha256: str) -> np.ndarray:
        path = self.path_for(sha256)
        try:
            entry = np.load(path)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"decode cache entry {path} cannot be read ({err}); run again to decode it anew") from None
        if problem := self._problem(entry):
            raise ValueError(f"decode cache entry {path} {problem}; run again to decode it anew")
        return entry

    def store(self, sha256: str, pixels: np.ndarray) -> None:
        if problem := self._problem(pixels):
            raise ValueError(f"refusing to cache pixels of {sha256}: {problem}")
        # Not flushed to disk: an entry a crash cut short is found by usable() and decoded again.
        # Private: decoded patient images, for the user running the site or experiment alone.
        atomic_write(self.path_for(sha256), lambda fh: np.save(fh, pixels), durable=False, private=True)


def _decode_into_cache(job: tuple[Record, ImageCache]) -> str | None:
    """Decode one record's image into the cache; the reason it cannot be used, or None."""
    record, cache = job
    try:
        image = decode_file(record.path, cache.limits, record.slice)
        cache.store(record.sha256, preprocess(image, cache.size, cache.crop).numpy())
    except UnusableImage as err:
        return err.reason
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file, not a crash
        return f"cannot decode image ({type(err).__name__}: {err})"
    return None


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# Fewer images than this are decoded in this process. Where the start method is forkserver (a
# deployed site's tasks are forkserver children), each worker of a pool is a fresh interpreter
# that imports torch and fedbt before its first image: seconds, more than a few hundred small
# decodes take.
POOL_FROM_IMAGES = 512


def fill_cache(
    records: list[Record], cache: ImageCache, workers: int | None = None, progress: bool = True
) -> dict[str, str]:
    """Decode every record not cached soundly. Returns {sha256: reason} for files that cannot be used."""
    todo: dict[str, Record] = {}
    for r in records:
        if r.sha256 not in todo and not cache.usable(r.sha256):
            todo[r.sha256] = r
    if not todo:
        return {}
    jobs = [(r, cache) for r in todo.values()]
    workers = workers or default_workers()
    parallel = workers > 1 and len(jobs) >= POOL_FROM_IMAGES
    errors: dict[str, str] = {}
    bar = tqdm(total=len(jobs), desc=f"decoding to {cache.size}px cache", unit="img", disable=not progress)
    # One torch thread per worker: the workers are the parallelism, and a forked worker's first
    # multi-threaded torch operation hangs once the parent has started OpenMP's threads.
    single_threaded = {"initializer": torch.set_num_threads, "initargs": (1,)}
    with ProcessPoolExecutor(workers, **single_threaded) if parallel else contextlib.nullcontext() as pool:
        results = pool.map(_decode_into_cache, jobs, chunksize=16) if pool else map(_decode_into_cache, jobs)
        for (record, _), err in zip(jobs, results):
            bar.update()
            if err:
                errors[record.sha256] = err
    bar.close()
    return errors


def load_pixels(records: list[Record], cache: ImageCache) -> torch.Tensor:
    """Stack the cached pixels of records (all must be cached) into (N, 1, S, S) uint8."""
    out = torch.empty((len(records), 1, cache.size, cache.size), dtype=torch.uint8)
    for i, r in enumerate(records):
        out[i] = torch.from_numpy(cache.load(r.sha256))
    return out
