"""Small synthetic MRI-like images, written in the real sources' on-disk layouts.

A brain-shaped ellipse with smooth texture inside a bright skull ring; a lesion
whose place and look depend on the class: glioma deep inside a hemisphere,
meningioma against the skull, pituitary small and low on the midline.  Every source
keeps its real release's label space; the demo's data also takes each release's class
proportions and look (framing, brightness, contrast), so that a model trained at one
site meets the same kinds of surprise at the others as on the real data.  Used by the
tests and by the demo when no data path is given; a stamp file marks a folder as generated.
"""

from __future__ import annotations

import json
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
BR35H_YES_LABELS = ("glioma", "meningioma", "pituitary")  # drawn in turn for its coarse 'yes'
STAMP_FILE = "generated-demo-data.json"
# Raise whenever generate_demo_data writes different images: demo folders from before are then rewritten.
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class SyntheticImage:
    pixels: np.ndarray  # (H, W) uint8
    label: str
    lesion_center: tuple[float, float] | None  # (row, col) as fractions of the image's height and width


def _smooth_noise(rng: np.random.Generator, height: int, width: int, scale: int) -> np.ndarray:
    coarse = rng.random((scale, scale))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
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


@dataclass(frozen=True)
class SiteLook:
    """How a source's scanners and export frame and expose a head.

    The real releases differ this way (measured on the shared data): figshare is grey
    512 px and dark (mean head intensity 0.29, spread 0.12), SARTAJ is RGB at many sizes,
    a little brighter and more varied (0.32, 0.13), Br35H is small, bright and contrasty
    (0.46, 0.20) and fills more of its frame.
    """

    sides: tuple[int, int] = (160, 256)  # image height range in pixels
    aspect: tuple[float, float] = (1.0, 1.0)  # width / height range: non-square images squash when resized
    head: float = 1.0  # head size relative to the neutral look's (skull about 86% of the height)
    gain: tuple[float, float] = (1.0, 1.0)  # intensity multiplier range
    contrast: tuple[float, float] = (1.0, 1.0)  # range of the stretch of the head's intensities about their mean
    # How far a lesion stands out of the tissue around it (1: fully): contrast-enhanced T1
    # (all of figshare) lights tumours up; other sequences show some of them faintly.
    lesion: tuple[float, float] = (1.0, 1.0)


NEUTRAL_LOOK = SiteLook()
HEAD_MEAN = 0.5  # mean intensity of a generated head before a site's look


@dataclass(frozen=True)
class SiteStyle:
    """How one source is written: its look, and its images per source label in units of per_class."""

    look: SiteLook
    shares: dict[str, float]


# Every source in one look with per_class images per label (two per class for Br35H's 'no'):
# small, balanced sets for tests.
PLAIN_SITES = {
    "figshare": SiteStyle(NEUTRAL_LOOK, {"glioma": 1.0, "meningioma": 1.0, "pituitary": 1.0}),
    "sartaj": SiteStyle(NEUTRAL_LOOK, dict.fromkeys(SARTAJ_FOLDERS, 1.0)),
    "br35h": SiteStyle(NEUTRAL_LOOK, {"yes": 1.0, "no": 2.0}),
}
# Every source in its real release's look and class proportions: figshare is mostly glioma
# (1,426 / 708 / 930), SARTAJ has few healthy scans (926 / 937 / 500 / 901). Br35H keeps the
# plain sites' two healthy scans per tumour scan (the release has as many of each).
REAL_SITES = {
    "figshare": SiteStyle(
        SiteLook(sides=(256, 256), gain=(0.5, 0.6), contrast=(1.1, 1.3)),
        {"glioma": 1.5, "meningioma": 0.75, "pituitary": 1.0},
    ),
    "sartaj": SiteStyle(
        SiteLook(
            sides=(180, 320), aspect=(0.85, 1.15), head=1.03, gain=(0.5, 0.72), contrast=(0.9, 1.3), lesion=(0.3, 1.0)
        ),
        {"glioma": 1.0, "meningioma": 1.0, "no_tumor": 0.5, "pituitary": 1.0},
    ),
    "br35h": SiteStyle(
        SiteLook(
            sides=(150, 300), aspect=(0.75, 1.1), head=1.1, gain=(0.75, 0.9), contrast=(1.3, 1.6), lesion=(0.3, 1.0)
        ),
        PLAIN_SITES["br35h"].shares,
    ),
}
# What ensure_demo_data writes: about 1,000 images, two minutes of demo on 2 CPU cores.
DEMO_DATA = {"per_class": 100, "seed": 0, "duplicates": 4, "real_sites": True}


def _setting(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """A value within bounds. A fixed setting draws nothing, so the neutral look draws the images it always did."""
    low, high = bounds
    return low if low == high else rng.uniform(low, high)


def make_image(
    label: str, rng: np.random.Generator, size: int | None = None, look: SiteLook = NEUTRAL_LOOK
) -> SyntheticImage:
    height = size or int(rng.integers(look.sides[0], look.sides[1] + 1))
    width = int(round(height * _setting(rng, look.aspect)))
    # Both axes in units of the height: the head stays round in pixels, whatever the frame.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / height
    cy, cx = 0.5 + rng.normal(0, 0.02), 0.5 * width / height + rng.normal(0, 0.02)
    ry, rx = look.head * rng.uniform(0.36, 0.42), look.head * rng.uniform(0.28, 0.34)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    brain = (r < 1.0) * (0.35 + 0.25 * _smooth_noise(rng, height, width, 12))
    skull = ((r >= 1.0) & (r < 1.1)) * 0.85
    image = brain + skull
    center = None
    if label != "no_tumor":
        ly, lx = _lesion_center(label, rng)
        py, px = cy + ly * ry, cx + lx * rx
        radius = {"glioma": 0.09, "meningioma": 0.07, "pituitary": 0.04}[label] * look.head * rng.uniform(0.85, 1.15)
        d = np.sqrt((yy - py) ** 2 + (xx - px) ** 2) / radius
        if label == "glioma":  # irregular edge, darker necrotic core
            d = d * (1 + 0.25 * (_smooth_noise(rng, height, width, 6) - 0.5))
            lesion = 0.95 - 0.4 * (d < 0.45)
        else:
            lesion = 0.9 + 0.1 * (1 - d)
        image = np.where(d < 1.0, image + _setting(rng, look.lesion) * (lesion - image), image)
        center = (float(py), float(px * height / width))
    inside_skull = r < 1.1
    image = np.where(inside_skull, HEAD_MEAN + (image - HEAD_MEAN) * _setting(rng, look.contrast), 0.0)
    image = image * _setting(rng, look.gain) + rng.normal(0, 0.03, image.shape)
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


def generate_demo_data(
    root: str | Path, per_class: int = 40, seed: int = 0, duplicates: int = 4, real_sites: bool = False
) -> Path:
    """Write figshare/, sartaj/ and br35h/ in the shared data's layout under root.

    real_sites: each source in its real release's look and class proportions (the demo's
    data); otherwise every source plain and balanced (PLAIN_SITES). SARTAJ's no_tumor images
    are partly repeated byte-for-byte in Br35H's no/ and across SARTAJ's own Training/Testing
    folders, as in the real releases. The stamp, written last, marks the folder as generated.
    """
    root = Path(root)
    sites = REAL_SITES if real_sites else PLAIN_SITES
    rng = np.random.default_rng(seed)

    def count(site: str, label: str) -> int:
        return round(sites[site].shares[label] * per_class)

    for label in sites["figshare"].shares:
        for i in range(count("figshare", label)):
            image = make_image(label, rng, look=sites["figshare"].look)
            save_jpeg(image.pixels, root / "figshare" / label / f"{i}.jpg", rgb=False)
    for label, folder in SARTAJ_FOLDERS.items():
        for i in range(count("sartaj", label)):
            split = "Testing" if i % 5 == 0 else "Training"
            image = make_image(label, rng, look=sites["sartaj"].look)
            save_jpeg(image.pixels, root / "sartaj" / split / folder / f"{i}.jpg", rgb=True)
    for folder, labels in (("yes", BR35H_YES_LABELS), ("no", ("no_tumor",))):
        for i in range(count("br35h", folder)):
            image = make_image(labels[i % len(labels)], rng, look=sites["br35h"].look)
            save_jpeg(image.pixels, root / "br35h" / folder / f"{folder[0]}{i}.jpg", rgb=True)
    sartaj_no = sorted((root / "sartaj" / "Training" / "no_tumor").glob("*.jpg"))
    for i, src in enumerate(sartaj_no[:duplicates]):
        shutil.copyfile(src, root / "br35h" / "no" / f"dup{i}.jpg")
        shutil.copyfile(src, root / "sartaj" / "Testing" / "no_tumor" / f"dup{i}.jpg")
    stamp = _stamp(per_class, seed, duplicates, real_sites)
    (root / STAMP_FILE).write_text(json.dumps(stamp) + "\n")
    return root


def _stamp(per_class: int, seed: int, duplicates: int, real_sites: bool) -> dict:
    return {
        "generator": GENERATOR_VERSION,
        "per_class": per_class,
        "seed": seed,
        "duplicates": duplicates,
        "real_sites": real_sites,
    }


def is_generated_data(root: str | Path) -> bool:
    """Whether root holds images this module generated (and so no patient's)."""
    return (Path(root) / STAMP_FILE).is_file()


def ensure_demo_data(root: str | Path) -> Path:
    """Generated demo data at root, written on first use and again when the generator has changed."""
    from fedbt.progress import log

    root = Path(root)
    stamp = root / STAMP_FILE
    if stamp.is_file() and json.loads(stamp.read_text()) == _stamp(**DEMO_DATA):
        return root
    if (root / "br35h").is_dir():
        log(f"{root}/ holds other or older generated data: writing the demo data anew")
        for site in REAL_SITES:
            shutil.rmtree(root / site, ignore_errors=True)
    log(f"no data root given: generating demo data in {root}/")
    generate_demo_data(root, **DEMO_DATA)
    return root
