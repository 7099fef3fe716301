"""The one image-input layer: decoding, orientation, mode and dtype rules, normalisation constants.

Every entry point that takes images (the predictor, the data sets, the image processor's file paths, the
command line) reads them through this module, so one picture gives the same pixels everywhere:

- Files are decoded with Pillow, completely (a truncated file is an error, never half-decoded), under a
  pixel limit against decompression bombs (``max_pixels``; Pillow's default, 89.5 million, unless told
  otherwise; the data sets read theirs without one: training data is trusted), and turned upright by their
  EXIF orientation (the data sets read theirs as stored, the pixels their masks are checked against, unless the
  mask has the upright size only: see :func:`segformer.data.datasets.upright_turn`).
- Every Pillow mode becomes RGB (:func:`to_rgb`): alpha is dropped, palettes are expanded, 16-bit
  grayscale is scaled by 1/257 (65535 → 255), float grayscale follows the float rule below.
- Arrays and tensors (:func:`hwc_rgb`, :func:`pixel_values`): (H, W), (H, W, 1|3|4) or (1|3|4, H, W); uint8 as
  is, bool → 0 / 255, uint16 → round(v / 257), other integers must lie in [0, 255] (an error otherwise,
  never clipped), floats must be finite (integral floats in [0, 255] count as 8-bit).
- Floats: the image processor follows its ``do_rescale`` flag, as Transformers does (the values are taken as
  given and resized in float); everywhere else (the predictor, and so ``segformer serve``) :func:`float_to_uint8` reads
  a maximum <= 1 as [0, 1] and anything else as [0, 255], and values outside that range are an error.
- Normalisation (:func:`normalize`): /255, minus the ImageNet mean, divided by the ImageNet std, with
  Transformers' arithmetic (rescale in float64, normalise in float32), so our pixels are theirs bit for bit.
"""

from __future__ import annotations

import functools
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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif", ".ppm",
                    ".pgm", ".pnm", ".tga", ".avif", ".heic", ".heif", ".jp2", ".j2k", ".qoi")  # fmt: skip
# formats Pillow opens only with a plugin: a file of theirs that it cannot identify says what is missing
_PLUGIN_FORMATS = {
    ".heic": ("HEIF", "pillow-heif"),
    ".heif": ("HEIF", "pillow-heif"),
    ".avif": ("AVIF", "pillow>=11.3"),
}
# The raster formats Pillow may decode here (whatever the file's name says). Not the others: EPS runs Ghostscript
# on the file (PostScript from an upload would be a program), WMF/EMF and the scientific and video stubs are no
# photographs.
RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "TIFF", "GIF", "PPM", "TGA", "ICO", "JPEG2000", "PCX", "SGI",
                  "QOI", "PSD", "AVIF", "HEIF", "SUN", "IM")  # fmt: skip

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor


class ImageError(ValueError):
    """An input image that cannot be segmented; the message is the reason (one line). ``too_large``: it has more
    pixels than the limit (a possible decompression bomb), which a server answers differently (413)."""

    def __init__(self, message: str = "", *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


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
            if path.is_symlink():
                raise ImageError("a link to a file that does not exist")
            pattern = any(c in path.name for c in "*?[")  # (a glob that matched nothing was "no such file": audit)
            raise ImageError("no such file, and no file matches it as a pattern" if pattern else "no such file")
        if path.is_dir():
            raise ImageError("is a directory")
        if not path.is_file():  # (a FIFO was "empty file": audit)
            raise ImageError("not a regular file (a pipe, socket or device)")
        if path.stat().st_size == 0:
            raise ImageError("empty file")
    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        # Our own limit replaces Pillow's (which warns above 1x and raises only above 2x its limit); truncated
        # data must raise instead of being padded with grey.
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                try:
                    img = Image.open(path, formats=_raster_formats())
                except Image.UnidentifiedImageError:
                    plugin = _PLUGIN_FORMATS.get(path.suffix.lower()) if isinstance(path, Path) else None
                    if plugin is not None and plugin[0] not in _raster_formats():
                        raise ImageError(
                            f"a {plugin[0]} image (by its name), which this Pillow cannot decode: install {plugin[1]}"
                        ) from None
                    raise ImageError("not an image (Pillow cannot identify the format)") from None
                except Exception as exc:
                    raise ImageError(f"cannot open: {first_line(exc)}") from None
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    img.close()
                    raise ImageError(
                        f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
                        "(possible decompression bomb; raise max_pixels / --max-pixels to allow it)",
                        too_large=True,
                    )
                try:
                    img.load()  # header-only until now: decode everything so that truncation shows here
                except Exception as exc:
                    img.close()
                    raise ImageError(f"cannot decode: {first_line(exc)}") from None
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return img


@functools.lru_cache(maxsize=1)
def _raster_formats() -> tuple[str, ...]:
    """:data:`RASTER_FORMATS` that this Pillow has (a plugin may be missing: AVIF, HEIF)."""
    Image.init()
    return tuple(f for f in RASTER_FORMATS if f in Image.OPEN)


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor on any device → a numpy array (bf16 / fp16 as float32)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy()


def channel_axis(shape: tuple[int, ...], given: str | None, what: str, channels: int = 3) -> int:
    """0 (channels first) or -1 (channels last) for a 3-D image shape; ``given``: "channels_first" /
    "channels_last" / None (guessed: the end with 1, 3 or 4 entries). Where both ends have (an image with a side
    of at most 4 pixels), the end with the expected ``channels``, if only one has them, else channels first, as
    the processor's specification and Transformers read arrays; with a warning naming the shape and the reading."""
    if given is not None:
        axis = 0 if given == "channels_first" else -1
        if shape[axis] not in (1, 3, 4):
            raise ImageError(f"{what}: {given} shape {shape} has {shape[axis]} channels; expected 1, 3 or 4")
        return axis
    first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
    if first and last:
        axis = -1 if shape[-1] == channels != shape[0] else 0
        chosen, other = ("first", "last") if axis == 0 else ("last", "first")
        warnings.warn(
            f"{what}: shape {shape} could be channels first or last; read as channels {chosen} ({shape[axis]} "
            f"channels); pass input_data_format='channels_{other}' to read {shape[-1 - axis]} channels {other}",
            stacklevel=2,
        )
        return axis
    if first or last:
        return 0 if first else -1
    raise ImageError(
        f"{what}: shape {shape} has no channel axis of size 1, 3 or 4 at the front or the back "
        "(supported: gray, RGB, RGBA); pass a list of 2-D arrays for a batch of gray images"
    )


def sixteen_to_eight(values: np.ndarray, what: str = "image") -> np.ndarray:
    """16-bit values (0..65535) → 8 bits by round(v / 257), so 65535 → 255; other values are an error."""
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageError(f"{what}: 16-bit values must lie in [0, 65535], got [{values.min()}, {values.max()}]")
    return ((values * 2 + 257) // 514).astype(np.uint8)


def pixel_values(array: np.ndarray, what: str = "image", *, integral_floats: bool = True) -> np.ndarray:
    """Pixel values → uint8, or float32 for a float image; the input is never modified. The dtype rules:
    uint8 as is; bool → 0 / 255; uint16 → round(v / 257); other integers must lie in [0, 255]; floats must be
    finite, and (``integral_floats``) integral floats in [0, 255] become uint8 (as Transformers does); other
    floats stay float32."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return sixteen_to_eight(array, what)
    if array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ImageError(
                f"{what}: integer pixel values must lie in [0, 255], got [{array.min()}, {array.max()}] "
                "(pass 16-bit images as uint16)"
            )
        return array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise ImageError(f"{what}: the image contains NaN or infinite values")
        integral = integral_floats and np.array_equal(array, np.round(array))
        if integral and array.size and array.min() >= 0 and array.max() <= 255:
            return array.astype(np.uint8)
        return array.astype(np.float32, copy=False)
    raise ImageError(f"{what}: unsupported pixel dtype {array.dtype}")


def hwc_rgb(
    array: np.ndarray | torch.Tensor,
    input_data_format: str | None = None,
    what: str = "image",
    *,
    integral_floats: bool = True,
) -> np.ndarray:
    """A 2-D or 3-D array or tensor → (H, W, 3) uint8 or float32 (:func:`pixel_values`): channels last, gray
    replicated, alpha dropped. ``input_data_format``: "channels_first" / "channels_last" / None (guessed, see
    :func:`channel_axis`: only an image with a side of at most 4 pixels can be ambiguous)."""
    tensor = isinstance(array, torch.Tensor)
    array = tensor_to_numpy(array) if tensor else np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3:
        axis = channel_axis(array.shape, input_data_format, what)
        array = np.moveaxis(array, 0, -1) if axis == 0 else array
    else:
        raise ImageError(f"{what}: expected a 2-D or 3-D image (or a 4-D batch), got shape {tuple(array.shape)}")
    array = pixel_values(array, what, integral_floats=integral_floats)
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return array[..., :3]


def float_to_uint8(array: np.ndarray, what: str = "image") -> np.ndarray:
    """Float pixels → uint8 where no rescale flag says what they mean: a maximum <= 1 reads as [0, 1] (x 255),
    otherwise as [0, 255]; rounded. Values outside the range they read as are an error, never clipped."""
    top = 1.0 if array.size == 0 or array.max() <= 1.0 else 255.0
    if array.size and array.min() < 0:
        raise ImageError(f"{what}: float pixel values must lie in [0, 1] or [0, 255], got min {array.min():.4g}")
    if top == 255.0 and array.max() > 255:
        raise ImageError(f"{what}: float pixel values must lie in [0, 1] or [0, 255], got max {array.max():.4g}")
    return np.floor(array.astype(np.float64) * (255.0 / top) + 0.5).astype(np.uint8)


_SIXTEEN_BIT_AS_I = ("PNG", "PPM")  # file formats whose 16-bit grayscale Pillow opens as mode "I"


def to_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """Any Pillow mode → RGB. Alpha is dropped (the colours under it are kept), palettes are expanded, CMYK
    and YCbCr are converted, 16-bit grayscale ("I;16*", and "I" read from a 16-bit PNG or PGM, which Pillow opens
    as "I": PNGs before Pillow 10.3) goes through :func:`sixteen_to_eight`, other 32-bit integer grayscale ("I":
    made in memory, a 32-bit TIFF) follows the integer rule of arrays (values in 0..255, as for int32 arrays;
    anything else an error naming the mode), float grayscale ("F") through :func:`float_to_uint8`. The file
    format is ``image.format`` (:func:`upright` keeps it on the turned copy)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or (mode == "I" and image.format in _SIXTEEN_BIT_AS_I):
        return Image.fromarray(sixteen_to_eight(np.asarray(image), what)).convert("RGB")
    if mode.startswith("I"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ImageError(
                f"{what}: a mode {mode} (32-bit integer) image must hold values in [0, 255], got "
                f"[{values.min()}, {values.max()}]; for 16-bit data convert it to mode I;16"
            )
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")
    if mode == "F":
        floats = pixel_values(np.asarray(image), what, integral_floats=False)
        return Image.fromarray(float_to_uint8(floats, what)).convert("RGB")
    if mode in ("P", "PA"):
        return image.convert("RGBA").convert("RGB")  # via RGBA so palettes with transparency convert cleanly
    return image.convert("RGB")  # L, LA, 1, RGBA, RGBa, CMYK, YCbCr, LAB, HSV


def array_to_rgb(array: np.ndarray | torch.Tensor, what: str = "image") -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) with C in 1/3/4 → (H, W, 3) uint8 RGB: :func:`hwc_rgb`'s dtype rules, then
    floats through :func:`float_to_uint8`."""
    hwc = hwc_rgb(array, None, what, integral_floats=False)  # the float rule alone decides a float's range
    return np.ascontiguousarray(hwc if hwc.dtype == np.uint8 else float_to_uint8(hwc, what))


def array_to_image(array: np.ndarray | torch.Tensor, what: str = "image") -> Image.Image:
    """:func:`array_to_rgb` as an RGB PIL image."""
    return Image.fromarray(array_to_rgb(array, what), "RGB")


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
        return array_to_image(source)
    else:
        raise ImageError(f"cannot segment a {type(source).__name__}: pass a path, a PIL image or an array")
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ImageError(f"{img.width}x{img.height} pixels is over the limit of {max_pixels:,}", too_large=True)
    if source is img:
        return to_rgb(upright(img))
    try:
        return to_rgb(upright(img))
    except ImageError as exc:  # a file's errors follow its name ("a.tif: float pixel values ..."), not "image: "
        raise ImageError(str(exc).removeprefix("image: ")) from None


def upright(image: Image.Image) -> Image.Image:
    """A copy of ``image`` turned by its EXIF orientation (as stored without one, or with a broken EXIF block: the
    picture as stored is better than none); it keeps the file format, which :func:`to_rgb` reads mode I by."""
    try:
        turned = ImageOps.exif_transpose(image)  # (a copy, Pillow >= 9.4)
    except Exception:
        turned = image.copy()
    turned.format = image.format
    return turned


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
    "array_to_rgb",
    "channel_axis",
    "float_to_uint8",
    "hwc_rgb",
    "pixel_values",
    "sixteen_to_eight",
    "tensor_to_numpy",
    "load_image",
    "normalize",
    "normalize_table",
    "open_image",
    "to_rgb",
    "upright",
]
