"""The one image-input layer: decoding, orientation, mode and dtype rules, normalisation constants.

Every entry point that takes images (the predictor, the data sets, the image processor's file paths, the
command line) reads them through this module, so one picture gives the same pixels everywhere:

- Files are decoded with Pillow, completely (a truncated file is an error, never half-decoded), under a
  pixel limit against decompression bombs (``max_pixels``; Pillow's default, 89.5 million, unless told
  otherwise), and turned upright by their EXIF orientation.
- Every Pillow mode becomes RGB (:func:`to_rgb`): alpha is dropped, palettes are expanded, 16/32-bit
  grayscale is scaled by 1/257 (65535 → 255), float grayscale in [0, 1] is scaled by 255.
- Arrays (:func:`array_to_image`): (H, W), (H, W, 3|4) or (3, H, W); uint8 as is, uint16 / 257, bool → 0/255,
  floats whose maximum is <= 1 are taken as [0, 1] and scaled by 255, other floats and integers are rounded
  and clipped to [0, 255].
- Normalisation (:func:`normalize`): /255, minus the ImageNet mean, divided by the ImageNet std, with
  Transformers' arithmetic (rescale in float64, normalise in float32), so our pixels are theirs bit for bit.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .hub import first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default for Image.MAX_IMAGE_PIXELS
# what a folder of images may hold (data sets, `segformer predict`); compared lower-case
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm")

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor


class ImageError(ValueError):
    """An input image that cannot be segmented; the message is the reason (one line)."""


# ----------------------------------------------------------------------------------------------- loading
# Pillow's bomb limit and truncation flag are process-wide; they are swapped only under this lock.
_PIL_LOCK = threading.Lock()


def open_image(source: str | os.PathLike | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode one file (a path, or its bytes); every problem becomes an ImageError with the
    reason. The image is returned as stored: see :func:`load_image` for the upright RGB image."""
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty file")
        path: Path | io.BytesIO = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError("no such file")
        if path.is_dir():
            raise ImageError("is a directory")
    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        # Our own limit replaces Pillow's (which warns above 1x and raises only above 2x its limit); truncated
        # data must raise instead of being padded with grey.
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                try:
                    img = Image.open(path)
                except Image.UnidentifiedImageError:
                    raise ImageError("not an image (Pillow cannot identify the format)") from None
                except Exception as exc:
                    raise ImageError(f"cannot open: {first_line(exc)}") from None
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    img.close()
                    raise ImageError(
                        f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
                        "(possible decompression bomb; raise max_pixels / --max-pixels to allow it)"
                    )
                try:
                    img.load()  # header-only until now: decode everything so that truncation shows here
                except Exception as exc:
                    img.close()
                    raise ImageError(f"cannot decode: {first_line(exc)}") from None
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return img


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB. Alpha is dropped (the colours under it are kept), palettes are expanded, CMYK
    and YCbCr are converted, 16/32-bit integer grayscale is scaled by 1/257 (65535 → 255) and clipped, float
    grayscale in [0, 1] is scaled by 255 (otherwise clipped to [0, 255])."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):  # "I", "I;16", "I;16B", "I;16L", ...: 16-bit PNG/TIFF grayscale
        arr = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        arr = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr
        return Image.fromarray(np.clip(np.nan_to_num(arr) + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("P", "PA"):
        return image.convert("RGBA").convert("RGB")  # via RGBA so palettes with transparency convert cleanly
    return image.convert("RGB")  # L, LA, 1, RGBA, RGBa, CMYK, YCbCr, LAB, HSV


def array_to_image(array: np.ndarray | torch.Tensor) -> Image.Image:
    """(H, W), (H, W, C) or (C, H, W) with C in 1/3/4; uint8 as is, uint16 / 257, floats in [0, 1] × 255."""
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) → (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(f"array of shape {arr.shape} is not an image: expected (H, W), (H, W, 3|4) or (3, H, W)")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float64))
        arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
        arr = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"array of dtype {arr.dtype} is not an image")
    return Image.fromarray(np.ascontiguousarray(arr))


def load_image(source: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, encoded bytes, PIL image, numpy array or tensor → an RGB PIL image, upright (EXIF orientation
    applied).

    Raises :class:`ImageError` with a one-line reason for a missing, unreadable, truncated or non-image file,
    or one over ``max_pixels`` (None: no limit). Arrays follow :func:`to_rgb`'s rules for their dtype."""
    if isinstance(source, (str, os.PathLike, bytes)):
        img = open_image(source, max_pixels)
    elif isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        return array_to_image(source).convert("RGB")
    else:
        raise ImageError(f"cannot segment a {type(source).__name__}: pass a path, a PIL image or an array")
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ImageError(f"{img.width}x{img.height} pixels is over the limit of {max_pixels:,}")
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block should not cost the picture; keep the stored orientation
        pass
    return to_rgb(img)


@lru_cache(maxsize=16)
def normalize_table(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, rescale: float | None = 1 / 255
) -> np.ndarray:
    """(3, 256) float32, read-only: the rescaled and normalised value of every 8-bit level in each channel.

    Transformers' arithmetic (rescale in float64 then cast to float32, normalise in float32), so looking a
    value up gives the same bits as computing it. ``rescale=None`` skips the rescale; ``mean=None`` or
    ``std=None`` skips the normalisation.
    """
    levels = np.arange(256, dtype=np.float64)
    levels = (levels * rescale if rescale is not None else levels).astype(np.float32)
    table = np.repeat(levels[None, :], 3, axis=0)
    if mean is not None and std is not None:
        table = (table - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    table = np.ascontiguousarray(table, dtype=np.float32)
    table.setflags(write=False)
    return table


def normalize(
    rgb: np.ndarray | Image.Image,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    channels_first: bool = True,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB (or an RGB PIL image) → float32 (3, H, W) (``channels_first``) or (H, W, 3):
    /255, minus ``mean``, divided by ``std`` (see :func:`normalize_table`)."""
    hwc = np.asarray(rgb)
    if hwc.dtype != np.uint8 or hwc.ndim != 3 or hwc.shape[-1] != 3:
        raise ValueError(f"normalize() takes (H, W, 3) uint8 RGB, got {hwc.dtype} {hwc.shape}")
    table = normalize_table(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    out = np.empty((3, *hwc.shape[:2]), np.float32)
    for c in range(3):
        np.take(table[c], hwc[..., c], out=out[c])  # (H, W) lookups; uint8 indices are always in range
    return out if channels_first else np.ascontiguousarray(out.transpose(1, 2, 0))


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "ImageInput",
    "array_to_image",
    "load_image",
    "normalize",
    "normalize_table",
    "open_image",
    "to_rgb",
]
