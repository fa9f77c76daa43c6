"""Small synthetic MRI-like images, written in the real sources' on-disk layouts.

A brain-shaped ellipse with smooth texture inside a bright skull ring; a lesion
whose place and look depend on the class: glioma deep inside a hemisphere,
meningioma against the skull, pituitary small and low on the midline.  Used by
the tests and by the demo when no data path is given.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

CLASS_NAMES = ("glioma", "meningioma", "no_tumor", "pituitary")
SARTAJ_FOLDERS = {
    "glioma": "glioma_tumor",
    "meningioma": "meningioma_tumor",
    "no_tumor": "no_tumor",
    "pituitary": "pituitary_tumor",
}
MAT_LABEL = {"meningioma": 1, "glioma": 2, "pituitary": 3}


@dataclass(frozen=True)
class SyntheticImage:
    pixels: np.ndarray  # (H, W) uint8
    label: str
    lesion_center: tuple[float, float] | None  # (row, col) as fractions of the image size


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.random((scale, scale))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _lesion_center(label: str, rng: np.random.Generator) -> tuple[float, float]:
    """Lesion centre as (row, col) in brain-relative units: (0, 0) centre, 1 the ellipse edge."""
    side = rng.choice([-1.0, 1.0])
    if label == "glioma":
        return rng.uniform(-0.35, 0.2), side * rng.uniform(0.2, 0.45)
    if label == "meningioma":
        angle = rng.uniform(-2.6, -0.5)  # upper half, against the skull
        return 0.82 * np.sin(angle), 0.82 * np.cos(angle)
    return rng.uniform(0.45, 0.55), rng.uniform(-0.05, 0.05)  # pituitary: low midline


def make_image(label: str, rng: np.random.Generator, size: int | None = None) -> SyntheticImage:
    size = size or int(rng.integers(160, 257))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cy, cx = 0.5 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02)
    ry, rx = rng.uniform(0.36, 0.42), rng.uniform(0.28, 0.34)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    brain = (r < 1.0) * (0.35 + 0.25 * _smooth_noise(rng, size, 12))
    skull = ((r >= 1.0) & (r < 1.1)) * 0.85
    image = brain + skull
    center = None
    if label != "no_tumor":
        ly, lx = _lesion_center(label, rng)
        py, px = cy + ly * ry, cx + lx * rx
        radius = {"glioma": 0.09, "meningioma": 0.07, "pituitary": 0.04}[label] * rng.uniform(0.85, 1.15)
        d = np.sqrt((yy - py) ** 2 + (xx - px) ** 2) / radius
        if label == "glioma":  # irregular edge, darker necrotic core
            d = d * (1 + 0.25 * (_smooth_noise(rng, size, 6) - 0.5))
            image = np.where(d < 1.0, 0.95 - 0.4 * (d < 0.45), image)
        else:
            image = np.where(d < 1.0, 0.9 + 0.1 * (1 - d), image)
        center = (float(py), float(px))
    image = image + rng.normal(0, 0.03, image.shape)
    pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return SyntheticImage(pixels, label, center)


def save_jpeg(pixels: np.ndarray, path: Path, rgb: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pixels, mode="L")
    (img.convert("RGB") if rgb else img).save(path, quality=92)


def write_figshare_mat(path: Path, pixels: np.ndarray, label: str, patient: str) -> None:
    """A .mat file shaped like the original figshare release (MATLAB v7.3 = HDF5)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        g = f.create_group("cjdata")
        # MATLAB is column-major: h5py sees arrays transposed, as MATLAB writes them.
        g.create_dataset("image", data=pixels.astype(np.int16).T)
        g.create_dataset("label", data=np.array([[MAT_LABEL[label]]], dtype=np.float64))
        g.create_dataset("PID", data=np.array([[ord(c)] for c in patient], dtype=np.uint16))
        g.create_dataset("tumorMask", data=np.zeros(pixels.shape, dtype=np.uint8).T)


def generate_demo_data(root: str | Path, per_class: int = 40, seed: int = 0, duplicates: int = 4) -> Path:
    """Write figshare/, sartaj/ and br35h/ in the shared data's layout under root.

    SARTAJ's no_tumor images are partly repeated byte-for-byte in Br35H's no/ and
    across SARTAJ's own Training/Testing folders, as in the real releases.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for label in ("glioma", "meningioma", "pituitary"):
        for i in range(per_class):
            save_jpeg(make_image(label, rng).pixels, root / "figshare" / label / f"{i}.jpg", rgb=False)
    for label, folder in SARTAJ_FOLDERS.items():
        for i in range(per_class):
            split = "Testing" if i % 5 == 0 else "Training"
            save_jpeg(make_image(label, rng).pixels, root / "sartaj" / split / folder / f"{i}.jpg", rgb=True)
    for folder, labels in (("yes", ("glioma", "meningioma", "pituitary")), ("no", ("no_tumor",))):
        for i in range(per_class * (1 if folder == "yes" else 2)):
            label = labels[i % len(labels)]
            save_jpeg(make_image(label, rng).pixels, root / "br35h" / folder / f"{folder[0]}{i}.jpg", rgb=True)
    sartaj_no = sorted((root / "sartaj" / "Training" / "no_tumor").glob("*.jpg"))
    for i, src in enumerate(sartaj_no[:duplicates]):
        shutil.copyfile(src, root / "br35h" / "no" / f"dup{i}.jpg")
        shutil.copyfile(src, root / "sartaj" / "Testing" / "no_tumor" / f"dup{i}.jpg")
    return root


def ensure_demo_data(root: str | Path) -> Path:
    """Generated demo data at root, written on first use."""
    root = Path(root)
    if not (root / "br35h").is_dir():
        from fedbt.progress import log

        log(f"no data root given: generating demo data in {root}/")
        generate_demo_data(root)
    return root
