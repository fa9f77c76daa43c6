"""A federation's decoded images in one checksummed file, for a machine that cannot reach the data.

A lent GPU machine receives only the working tree and a few carried files (64 MiB in all), and
the sites' JPEGs are larger than that. A pack holds what the catalog would read from the decode
cache (each distinct image once, uint8 at one size, compressed) and every record's metadata
(site, label sets, file hash, patient, the release's own split), but no split: `build_catalog`
recomputes duplicates, splits and the held-out test rule from it exactly as from the folders.

`--data-root PACK.npz` then stands for the data root everywhere a catalog is built. A pack holds
decoded patient images: it is written owner-only, beside a `sha256sum`-style checksum file, and
belongs under an ignored folder (`packs/`), never in git.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fedbt.config import DataConfig
from fedbt.data.records import Problem, Record
from fedbt.data.sites import SiteSpec
from fedbt.fileio import atomic_write

PACK_SUFFIX = ".npz"
PACK_VERSION = 1
PACK_XZ_PRESET = 6
# What decides which images a catalog holds and how they were decoded; a pack serves only a
# configuration that agrees on all of them (splits, duplicates and the task are recomputed).
DECODING_FIELDS = ("image_size", "crop_to_content", "max_image_pixels", "min_image_side", "max_per_label")


@dataclass
class PackContents:
    records: list[Record]
    problems: list[Problem]
    pixels: torch.Tensor  # (N, 1, S, S) uint8, one row per record


def is_pack(root: str | Path | None) -> bool:
    return root is not None and Path(root).suffix == PACK_SUFFIX and Path(root).is_file()


def default_pack_path(cfg: DataConfig) -> Path:
    """packs/<data root's name>-<size>px.npz: packs/ is ignored by git."""
    return Path("packs") / f"{Path(str(cfg.data_root)).name}-{cfg.image_size}px{PACK_SUFFIX}"


def checksum_path(pack: Path) -> Path:
    return pack.with_name(pack.name + ".sha256")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decoding(cfg: DataConfig) -> dict:
    return {name: getattr(cfg, name) for name in DECODING_FIELDS}


def _relative_path(record: Record, site: SiteSpec) -> str:
    """The file's path inside its site: enough for reports (file names), without this machine's folders."""
    try:
        return str(Path(record.path).relative_to(site.root))
    except ValueError:
        return Path(record.path).name


def _record_row(record: Record, site: SiteSpec, pixel_row: int) -> dict:
    row = asdict(record)
    row.update(path=_relative_path(record, site), allowed=sorted(record.allowed), pixels=pixel_row)
    return row


def _json_bytes(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


def _compressed(array: np.ndarray) -> np.ndarray:
    # xz: the real sites' 128 px images come to 0.51 of their bytes, against 0.62 with the
    # deflate of np.savez_compressed (67 MiB, over what travels to a lent GPU machine).
    return np.frombuffer(lzma.compress(np.ascontiguousarray(array).tobytes(), preset=PACK_XZ_PRESET), dtype=np.uint8)


def _decompressed(stored: np.ndarray, shape: np.ndarray) -> np.ndarray:
    return np.frombuffer(bytearray(lzma.decompress(stored.tobytes())), dtype=np.uint8).reshape(tuple(shape))


def write_pack(
    path: str | Path,
    cfg: DataConfig,
    sites: list[SiteSpec],
    records: list[Record],
    problems: list[Problem],
    pixels: torch.Tensor,
    generated: bool = False,
) -> str:
    """Write the pack and its checksum file; returns the pack's sha256. `generated`: the images
    are generated data (the device check says which it measured on).

    `pixels` has one row per record, as the catalog holds them; each file hash is stored once."""
    path = Path(path)
    if path.suffix != PACK_SUFFIX:
        raise ValueError(f"a pack's file name ends in {PACK_SUFFIX}: {path}")
    by_name = {site.name: site for site in sites}
    first_record: dict[str, int] = {}  # file hash -> the first record holding it
    for i, record in enumerate(records):
        first_record.setdefault(record.sha256, i)
    pixel_row = {sha256: row for row, sha256 in enumerate(first_record)}
    rows = [_record_row(record, by_name[record.site], pixel_row[record.sha256]) for record in records]
    unique = pixels[torch.tensor(list(first_record.values()), dtype=torch.long)].numpy()
    meta = {
        "version": PACK_VERSION,
        "decoding": _decoding(cfg),
        "sites": [site.name for site in sites],
        "generated": generated,
        "images": len(records),
        "problems": [{"site": p.site, "path": Path(p.path).name, "message": p.message} for p in problems],
    }
    arrays = {
        "pixels": _compressed(unique),
        "pixels_shape": np.array(unique.shape),
        "records": _json_bytes(rows),
        "meta": _json_bytes(meta),
    }
    # Stored, not deflated again: the pixels are xz already, the metadata is small.
    atomic_write(path, lambda fh: np.savez(fh, **arrays), private=True)
    digest = file_sha256(path)
    atomic_write(checksum_path(path), lambda fh: fh.write(f"{digest}  {path.name}\n".encode()))
    return digest


def verify_checksum(path: Path) -> str:
    """The pack's sha256, checked against its checksum file (a pack cut short in transit fails here)."""
    listed = checksum_path(path)
    if not listed.is_file():
        raise ValueError(f"pack {path} has no checksum file {listed.name} beside it")
    expected = (listed.read_text().split() or [""])[0]
    digest = file_sha256(path)
    if digest != expected:
        raise ValueError(f"pack {path} does not match its checksum ({digest[:12]}, expected {expected[:12]})")
    return digest


def _stored_meta(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as stored:
        return json.loads(stored["meta"].tobytes())


def pack_summary(path: str | Path) -> dict:
    """What the pack holds, from its metadata and checksum file (the pixels are not read)."""
    path = Path(path)
    meta = _stored_meta(path)
    return {
        "source": "generated" if meta["generated"] else "real",
        "images": meta["images"],
        "image_size": meta["decoding"]["image_size"],
        "sha256": (checksum_path(path).read_text().split() or ["unknown"])[0],
    }


def read_pack(path: str | Path, cfg: DataConfig, sites: list[SiteSpec]) -> PackContents:
    """The records, problems and pixels of the named sites, in the order the pack holds them
    (the order the catalog scanned them in), after checking the checksum and that the pack was
    decoded as `cfg` asks."""
    path = Path(path)
    verify_checksum(path)
    with np.load(path, allow_pickle=False) as stored:
        meta = json.loads(stored["meta"].tobytes())
        rows = json.loads(stored["records"].tobytes())
        unique = torch.from_numpy(_decompressed(stored["pixels"], stored["pixels_shape"]))
    if meta.get("version") != PACK_VERSION:
        raise ValueError(f"pack {path} is version {meta.get('version')}; this fedbt reads version {PACK_VERSION}")
    if meta["decoding"] != _decoding(cfg):
        differ = sorted(k for k in DECODING_FIELDS if meta["decoding"].get(k) != getattr(cfg, k))
        details = ", ".join(f"{k} {meta['decoding'].get(k)} (asked {getattr(cfg, k)})" for k in differ)
        raise ValueError(f"pack {path} was decoded with other settings: {details}")
    by_name = {site.name: site for site in sites}
    if missing := [name for name in by_name if name not in meta["sites"]]:
        raise ValueError(f"pack {path} holds no site {', '.join(missing)} (it has {', '.join(meta['sites'])})")
    chosen = [row for row in rows if row["site"] in by_name]
    records = [
        Record(
            site=row["site"],
            path=str(by_name[row["site"]].root / row["path"]),
            source_label=row["source_label"],
            allowed=frozenset(row["allowed"]),
            sha256=row["sha256"],
            patient=row["patient"],
            source_split=row["source_split"],
        )
        for row in chosen
    ]
    pixels = unique[torch.tensor([row["pixels"] for row in chosen], dtype=torch.long)]
    problems = [Problem(**p) for p in meta["problems"] if p["site"] in by_name]
    return PackContents(records, problems, pixels)
