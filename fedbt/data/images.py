"""Decoding image files to grayscale uint8 tensors of one size (the catalog caches the result)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from fedbt.data.readers.figshare_mat import read_mat_image


def _decode_with_pil(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # raises on truncated data
        gray = np.asarray(img.convert("L"))
    return torch.from_numpy(gray.copy()).unsqueeze(0)


def decode_file(path: str) -> torch.Tensor:
    """A file's pixels as a (1, H, W) uint8 tensor; ValueError naming the file if unreadable."""
    if path.lower().endswith(".mat"):
        image = read_mat_image(Path(path)).astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        scaled = (image - lo) / max(hi - lo, 1e-6) * 255.0
        return torch.from_numpy(scaled.round().astype(np.uint8)).unsqueeze(0)
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"{path}: empty file")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.GRAY)
    except RuntimeError:
        # libjpeg refuses some files Pillow reads (odd markers, palette PNGs named .jpg).
        try:
            return _decode_with_pil(data)
        except UnidentifiedImageError:
            raise ValueError(f"{path}: cannot decode image (not an image format torchvision or Pillow reads)") from None
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot decode image ({err})") from None


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    return TF.resize(image, [size, size], antialias=True)


def crop_to_content(image: torch.Tensor, threshold: float = 0.1, margin: float = 0.03) -> torch.Tensor:
    """Cut the black frame around the head, then pad to a square without distorting it.

    The sources frame heads very differently (figshare fills 512 px, SARTAJ and Br35H
    leave wide black borders at many aspect ratios); cropping makes a head the same
    size in every source, so the model learns anatomy rather than framing.
    """
    pixels = image[0].float()
    foreground = pixels > threshold * float(pixels.max())
    rows = foreground.any(dim=1).nonzero().flatten()
    cols = foreground.any(dim=0).nonzero().flatten()
    height, width = pixels.shape
    if len(rows) < 0.2 * height or len(cols) < 0.2 * width:
        return image  # nearly empty image: leave it alone rather than zoom into noise
    pad = int(margin * max(height, width))
    top, bottom = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + pad + 1, height)
    left, right = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + pad + 1, width)
    cropped = image[:, top:bottom, left:right]
    h, w = cropped.shape[1:]
    side = max(h, w)
    return TF.pad(cropped, [(side - w) // 2, (side - h) // 2, side - w - (side - w) // 2, side - h - (side - h) // 2])


def preprocess(image: torch.Tensor, size: int, crop: bool) -> torch.Tensor:
    return resize_square(crop_to_content(image) if crop else image, size)
