"""Decoding image files to grayscale uint8 tensors of one size (the catalog caches the result).

A file is checked before it is decoded: its header's dimensions against `ImageLimits`
(a 333-byte JPEG may claim 20000 x 20000 pixels), and after: one 2-D image, not constant.
A file that fails is an `UnusableImage`, naming the file and the reason.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from fedbt.config import DataConfig
from fedbt.data.readers.dicom import dicom_image_shape, read_dicom_image
from fedbt.data.readers.figshare_mat import mat_image_shape, read_mat_image
from fedbt.data.readers.nifti import read_nifti_slice
from fedbt.data.readers.volumes import SkippedFile
from fedbt.data.records import VolumeSlice


class UnusableImage(ValueError):
    """A file that is not one usable image; the message is '<path>: <reason>'."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """Which files are decoded at all: at most max_pixels (width x height), at least min_side a side."""

    max_pixels: int
    min_side: int

    @classmethod
    def of(cls, cfg: DataConfig) -> ImageLimits:
        return cls(cfg.max_image_pixels, cfg.min_image_side)


def check_dimensions(path: str, width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise UnusableImage(
            path, f"{width} x {height} pixels, more than data.max_image_pixels ({limits.max_pixels}): not decoded"
        )
    if min(width, height) < limits.min_side:
        raise UnusableImage(path, f"{width} x {height} pixels, smaller than data.min_image_side ({limits.min_side})")


def check_not_constant(path: str, lowest: float, highest: float) -> None:
    if lowest == highest:
        raise UnusableImage(path, f"constant image (every pixel is {lowest:g}): nothing to classify")


def raster_dimensions(path: str) -> tuple[int, int]:
    """(width, height) from the file's header; the pixels are not read."""
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 million pixels; the caller checks its own limit next.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.size
    except Image.DecompressionBombError:
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise UnusableImage(path, f"header claims more than {limit} pixels (Pillow's limit): not decoded") from None
    except UnidentifiedImageError:
        raise UnusableImage(path, "cannot decode image (not an image format Pillow reads)") from None
    except (OSError, ValueError) as err:
        raise UnusableImage(path, f"cannot decode image ({err})") from None


def _decode_with_pil(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # raises on truncated data
        gray = np.asarray(img.convert("L"))
    return torch.from_numpy(gray.copy()).unsqueeze(0)


def decode_mat(path: str, limits: ImageLimits) -> torch.Tensor:
    """A figshare .mat file's image scaled to the full uint8 range, as (1, H, W)."""
    try:
        shape, dtype = mat_image_shape(Path(path))
    except ValueError as err:
        raise UnusableImage(path, str(err)) from None
    if len(shape) != 2:
        raise UnusableImage(path, f"not a single 2-D image: cjdata/image has shape {shape}")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise UnusableImage(path, f"cjdata/image holds {dtype}, not pixel values")
    check_dimensions(path, width=shape[1], height=shape[0], limits=limits)
    image = read_mat_image(Path(path)).astype(np.float32)
    if not np.isfinite(image).all():
        raise UnusableImage(path, "cjdata/image holds NaN or infinite values")
    return to_uint8(path, image, window=None)


def to_uint8(path: str, image: np.ndarray, window: tuple[float, float] | None) -> torch.Tensor:
    """(1, H, W) uint8: values from center - width/2 to center + width/2 of the window, or
    from the image's lowest to its highest value, spread over 0..255."""
    check_not_constant(path, float(image.min()), float(image.max()))
    if window is None:
        lo, hi = float(image.min()), float(image.max())
    else:
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    scaled = (np.clip(image, lo, hi) - lo) / (hi - lo) * 255.0
    return torch.from_numpy(scaled.round().astype(np.uint8)).unsqueeze(0)


def decode_slice(path: str, where: VolumeSlice, limits: ImageLimits) -> torch.Tensor:
    """One slice of a DICOM series (the file) or a NIfTI volume, windowed to uint8, as (1, H, W)."""
    try:
        if where.index is None:
            check_dimensions(path, *dicom_image_shape(path), limits)
            image = read_dicom_image(path)
        else:
            image = read_nifti_slice(path, where.index, where.axis)
    except SkippedFile as err:
        raise UnusableImage(path, str(err)) from None
    if image.ndim != 2:
        raise UnusableImage(path, f"not a single 2-D image: shape {image.shape}")
    check_dimensions(path, width=image.shape[1], height=image.shape[0], limits=limits)
    if not np.isfinite(image).all():
        raise UnusableImage(path, "holds NaN or infinite values")
    return to_uint8(path, image, where.window)


def decode_raster(path: str, limits: ImageLimits) -> torch.Tensor:
    """A JPEG, PNG, BMP or TIFF file as a grayscale (1, H, W) uint8 tensor."""
    if Path(path).stat().st_size == 0:
        raise UnusableImage(path, "empty file")
    check_dimensions(path, *raster_dimensions(path), limits)
    data = Path(path).read_bytes()
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.GRAY)
    except RuntimeError:
        # libjpeg refuses some files Pillow reads (odd markers, palette PNGs named .jpg).
        try:
            image = _decode_with_pil(data)
        except (OSError, ValueError) as err:
            raise UnusableImage(path, f"cannot decode image ({err})") from None
    if image.ndim != 3:  # an animated GIF or PNG decodes to frames
        raise UnusableImage(path, f"not a single 2-D image: decoded to shape {tuple(image.shape)}")
    check_not_constant(path, float(image.min()), float(image.max()))
    return image


def decode_file(path: str, limits: ImageLimits, where: VolumeSlice | None = None) -> torch.Tensor:
    """A file's pixels (or the slice `where` of a DICOM series or NIfTI volume) as a (1, H, W)
    uint8 tensor; UnusableImage naming the file and the reason otherwise."""
    if where is not None:
        return decode_slice(path, where, limits)
    if path.lower().endswith(".mat"):
        return decode_mat(path, limits)
    return decode_raster(path, limits)


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
