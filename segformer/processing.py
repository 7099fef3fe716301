"""SegformerImageProcessor: turn images (and segmentation maps) into model inputs, and logits into maps.

Pipeline, per image: make it RGB → resize to ``size`` → multiply by ``rescale_factor`` → subtract
``image_mean`` and divide by ``image_std``. Output ``pixel_values`` are float32, (B, 3, H, W) (or
(B, H, W, 3) with ``data_format="channels_last"``). Segmentation maps get the same output size with
NEAREST resampling (after ``do_reduce_labels``: 0 → 255, x → x - 1, 255 stays 255) and come out as int64
``labels`` of shape (B, H, W).

Two backends (option ``backend``):

- ``"pil"``: resizes uint8 images with PIL exactly as Transformers' (PIL) ``SegformerImageProcessor`` does,
  then rescales and normalises in float; ``pixel_values`` match Transformers to ~1e-7 and labels exactly.
- ``"torch"``: for batches of torch tensors. Resizes the whole batch with ``F.interpolate`` (antialiased
  bilinear/bicubic, PIL's filters) on the tensors' own device; on CPU uint8 stays uint8 (torch's 8-bit
  kernel, close to PIL's fixed point), elsewhere it goes through float32 and is rounded back to 8 bits.
  NEAREST (images and all label maps) is an index gather that reproduces PIL's coordinates exactly.
  Against the PIL backend, measured over 150 random size pairs on noise images (normalised units; one 8-bit
  level is 1/255/0.224 = 0.0175): BILINEAR max 0.0175, mean 0.0012 (6.7% of values one level off; pure
  down- or upscaling such as 1024x768 -> 512x512 is mostly exact); BICUBIC mean 0.0016 but a few pixels up
  to 0.44 (PIL clips its intermediate 8-bit pass); float inputs max 4e-5; the float32 route (CUDA) max one
  level, mean 0.003; NEAREST and labels identical. Float tensors are resized in float even when they hold
  integers (the PIL backend would take those as 8-bit).
- ``"auto"`` (default): ``"torch"`` when every image is a uint8 or floating torch tensor and the filter is
  NEAREST, BILINEAR or BICUBIC; ``"pil"`` otherwise. Pass ``backend="pil"`` for Transformers' exact numbers.

Inputs: PIL images, numpy arrays, torch tensors and file paths (opened with PIL, EXIF orientation applied),
one or a list; numpy arrays / tensors are (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4, or a 4-D batch.
The channel axis is the first or last axis of size 1, 3 or 4; when both qualify, the one of size 3 is (a
(3, H, 4) array is channels-first), else the first (as Transformers does), with a warning naming the shape;
``input_data_format`` overrides (:func:`segformer.images.channel_axis`). Conversions to RGB (beyond
Transformers 5.x, which fails on these): gray (L, 1, 2-D arrays, one channel) is replicated, alpha (RGBA, LA,
PA, 4 channels) is dropped without compositing, P and CMYK go through PIL's ``convert("RGB")``, 16-bit data (PIL
I;16, uint16 arrays, and mode I read from a PNG or PGM file, as PIL opens 16-bit ones) is scaled to 8 bits by
``round(v / 257)``; other mode I images (32-bit integers) must hold values in [0, 255], as int32 arrays.

Pixel value types: uint8 is the reference. bool becomes 0/255. Other integer arrays must lie in [0, 255].
Float arrays whose values are all integers in [0, 255] are treated as uint8 (as Transformers does). Other
float arrays are resized in float precision (PIL mode "F", or float interpolation) and keep their range:
``do_rescale`` multiplies by ``rescale_factor`` whatever the input range, so images already in [0, 1] need
``do_rescale=False`` (a warning says so). Transformers instead truncates [0, 1] floats to 8 bits before
resizing, and with its own rounding the results differ by up to two 8-bit levels (0.035 after normalising);
it rejects other float ranges.

Segmentation maps: PIL images of one band (L, P, 1, I, I;16, F), 2-D arrays or tensors (a 3-D array is a
batch of maps), or paths. Values must be non-negative integers; maps whose values exceed 255 are resized in
PIL's 32-bit mode "I" (Transformers would fail). When resizing, a map gets its image's output size; without
(``do_resize=False``) it keeps its own size, as in Transformers (the loss upsamples the logits to it); either way a
warning says so when its size was not its image's (the labels may not line up: e.g. an image file turned upright
by its EXIF orientation, a map drawn on its stored pixels).

``size`` may be an int (square), a ``(width, height)`` tuple (the convention of the SegformerFeatureExtractor
docs; note that Transformers >= 4.26 reads tuples as (height, width), so prefer dicts), ``{"height": h,
"width": w}``, ``{"shortest_edge": n}`` (the short side becomes n, the long one ``int(n * long / short)``) or
``{"shortest_edge": n, "longest_edge": m}`` (the same, unless the long side would exceed m: then it becomes m, or
m - 1 through float rounding, as in Transformers).
It is stored as a dict whose keys also read as attributes (``size.height``, as Transformers 5's SizeDict).

Four channels: with four ``image_mean`` / ``image_std`` values (models with ``num_channels=4``) images keep all
four channels instead of becoming RGB, as Transformers does: 4-band PIL images (RGBA, CMYK, RGBX) and (H, W, 4) /
(4, H, W) arrays or tensors, resized as one RGBA image by PIL (which weights colours by the fourth channel, as
Transformers' resize does) when 8-bit; float ones keep float precision and are resized channel by channel, without
that weighting (Transformers truncates them to 8 bits first); always on the PIL backend. Other channel counts are an
error naming the image.
One channel likewise: with one-value sequences (``image_mean=[0.5], image_std=[0.25]``, models with
``num_channels=1``) one-band images (L, 1, I, I;16, F; 2-D, (H, W, 1) and (1, H, W) arrays and tensors) keep their
one channel, as in Transformers; a plain number still means "the same for every channel" of RGB.

The output is a :class:`SegformerBatch` (Transformers' ``BatchFeature``: a dict with attribute access, ``.data``,
``.convert_to_tensors(...)`` and ``.to(...)``).
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .fileio import atomic_write_text
from .hub import CheckpointError, first_line, push_folder, resolve_file
from .images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    channel_axis,
    hwc_rgb,
    normalize_table,
    open_image,
    pixel_values,
    tensor_to_numpy,
    to_rgb,
    upright,
)
from .inference import resized_labels
from .labels import reduce_labels

__all__ = ["SegformerBatch", "SegformerFeatureExtractor", "SegformerImageProcessor"]

CONFIG_NAME = "preprocessor_config.json"

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike
ImageInput = ImageLike | Sequence[ImageLike]
TargetSizes = Sequence[Sequence[int]] | torch.Tensor | np.ndarray
_P = TypeVar("_P", bound="SegformerImageProcessor")

_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_TORCH_FILTERS = {2: "bilinear", 3: "bicubic"}  # NEAREST (0) is an index gather; others need PIL
_BACKENDS = ("auto", "pil", "torch")
_FORMATS = ("channels_first", "channels_last")
_TENSOR_TYPES = ("np", "pt", "tf", "jax")
_TYPE_KEYS = ("image_processor_type", "feature_extractor_type")  # written by save_pretrained, never kept
_MAX_MODE_I = 2**31 - 1


# ------------------------------------------------------------------------------------------- output
class SegformerBatch(dict):
    """The processor's output: a dict (``pixel_values``, optionally ``labels``) with attribute access, as
    Transformers' ``BatchFeature``.

    ``out.pixel_values`` is ``out["pixel_values"]``; ``out.data`` is the dict itself; :meth:`convert_to_tensors`
    turns lists of arrays into one framework batch; :meth:`to` moves/casts the torch tensors in place.
    """

    @property
    def data(self) -> dict[str, Any]:
        """The fields as a dict (this batch itself, so changes show in both), as ``BatchFeature.data``."""
        return self

    def convert_to_tensors(
        self, tensor_type: str | None = None, skip_tensor_conversion: Sequence[str] | None = None
    ) -> SegformerBatch:
        """Convert every field in place to ``tensor_type`` ("pt", "np", "tf", "jax"; None leaves them): a list of
        per-image arrays is stacked into one batch (same sizes needed). Fields named in ``skip_tensor_conversion``
        stay as they are. Returns self."""
        kind = _tensor_type(tensor_type)
        if kind is None:
            return self
        for key, value in list(self.items()):
            if skip_tensor_conversion is not None and key in skip_tensor_conversion:
                continue
            if (
                isinstance(value, (list, tuple))
                and value
                and all(isinstance(v, (np.ndarray, torch.Tensor)) for v in value)
            ):
                self[key] = _convert(_stack(list(value), key, kind), kind)
            elif isinstance(value, (np.ndarray, torch.Tensor)):
                self[key] = _convert(value, kind)
            else:
                raise ValueError(f"convert_to_tensors: field {key!r} holds {type(value).__name__}, not arrays")
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"SegformerBatch has no field {name!r} (fields: {list(self)})") from None

    def to(
        self,
        device_or_dtype: str | torch.device | torch.dtype | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> SegformerBatch:
        """Move every torch tensor to ``device`` and cast the floating ones to ``dtype``; returns self.

        Integer tensors (``labels``) are never cast. Values that are not tensors are left as they are.
        """
        if isinstance(device_or_dtype, torch.dtype):
            dtype = device_or_dtype
        elif device_or_dtype is not None:
            device = device_or_dtype
        for key, value in list(self.items()):
            if not isinstance(value, torch.Tensor):
                continue
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype=dtype)
            if device is not None:
                value = value.to(device=device, non_blocking=non_blocking)
            self[key] = value
        return self


# ---------------------------------------------------------------------------------- option parsing
@dataclass(frozen=True)
class _Options:
    """The options of one call, validated and normalised."""

    do_resize: bool
    size: dict[str, int]
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]  # 3 values (RGB), 4 (four-channel images) or 1 (one-channel images)
    image_std: tuple[float, ...]
    do_reduce_labels: bool
    backend: str
    data_format: str
    input_data_format: str | None


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class SizeDict(dict):
    """A processor's ``size``: a dict (``size["height"]``, saved as JSON as it is) whose keys are also read as
    attributes, as Transformers 5's ``SizeDict`` is (``size.height``; a size field it does not hold is None)."""

    _FIELDS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")

    def __getattr__(self, name: str) -> int | None:
        if name in self._FIELDS:
            return self.get(name)
        raise AttributeError(f"size has no field {name!r} (fields: {', '.join(self._FIELDS)})")


def _normalize_size(size: Any) -> SizeDict:
    """int → square; (width, height) → dict; {"height", "width"} or {"shortest_edge"} checked."""
    if not isinstance(size, Mapping) and all(hasattr(size, f) for f in ("height", "width", "shortest_edge")):
        size = {f: getattr(size, f, None) for f in SizeDict._FIELDS}  # (Transformers' SizeDict, not a Mapping)
    if isinstance(size, Mapping):
        keys = {k for k, v in size.items() if v is not None}  # (Transformers' SizeDict lists absent fields as None)
        if keys == {"height", "width"}:
            return SizeDict(
                height=_positive_int(size["height"], "size height"), width=_positive_int(size["width"], "size width")
            )
        if keys == {"shortest_edge"}:
            return SizeDict(shortest_edge=_positive_int(size["shortest_edge"], "size shortest_edge"))
        if keys == {"shortest_edge", "longest_edge"}:
            return SizeDict(
                shortest_edge=_positive_int(size["shortest_edge"], "size shortest_edge"),
                longest_edge=_positive_int(size["longest_edge"], "size longest_edge"),
            )
        raise ValueError(
            "size must have keys {'height', 'width'}, {'shortest_edge'} or {'shortest_edge', 'longest_edge'}, got "
            f"{sorted(keys)}"
        )
    if isinstance(size, (tuple, list)) and len(size) == 2:
        width, height = size
        return SizeDict(height=_positive_int(height, "size height"), width=_positive_int(width, "size width"))
    if isinstance(size, (tuple, list)):
        raise ValueError(f"a size tuple must be (width, height), got {size!r}")
    side = _positive_int(size, "size")
    return SizeDict(height=side, width=side)


def _normalize_resample(resample: Any) -> int:
    """A PIL filter (int, ``Image.Resampling`` member or its name) → its int code."""
    if isinstance(resample, str) and resample.lower() in _RESAMPLE_NAMES:
        return _RESAMPLE_NAMES[resample.lower()]
    if isinstance(resample, bool) or not isinstance(resample, (int, np.integer)) or int(resample) not in range(6):
        raise ValueError(f"resample must be a PIL filter (0-5 or one of {sorted(_RESAMPLE_NAMES)}), got {resample!r}")
    return int(resample)


def _normalize_stats(mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean and image_std: None → ImageNet's; one number → the same for every channel; a sequence of 1
    value (one-channel images), 3 (RGB) or 4 (four-channel images), the same count in both."""
    lists, numbers = [], []
    for value, default, name in ((mean, IMAGENET_MEAN, "image_mean"), (std, IMAGENET_STD, "image_std")):
        number = value is not None and np.ndim(value) == 0
        values = list(default) if value is None else [value] if number else list(value)
        if len(values) not in (1, 3, 4):
            raise ValueError(f"{name} needs 1, 3 or 4 values (one per image channel), got {len(values)}")
        lists.append([float(v) for v in values])
        numbers.append(number)
    # a number fits any channel count (three when both are numbers); a sequence gives its own
    counts = [len(values) for values, number in zip(lists, numbers, strict=True) if not number]
    channels = max(counts) if counts else 3
    mean_t, std_t = (
        tuple(values * channels if number else values) for values, number in zip(lists, numbers, strict=True)
    )
    if len(mean_t) != len(std_t):
        raise ValueError(f"image_mean has {len(mean_t)} values but image_std has {len(std_t)}; give one per channel")
    return mean_t, std_t


def _normalize_format(value: Any, name: str, *, allow_none: bool) -> str | None:
    value = getattr(value, "value", value)  # accepts enums whose value is the string
    if value is None or value == "none":
        if allow_none:
            return None
        return "channels_first"
    if value not in _FORMATS:
        raise ValueError(f"{name} must be one of {_FORMATS}, got {value!r}")
    return value


def _merge_reduce_labels(options: dict[str, Any]) -> dict[str, Any]:
    """Fold the old spelling ``reduce_labels`` into ``do_reduce_labels`` (the new one wins)."""
    options = dict(options)
    if "reduce_labels" in options:
        old = options.pop("reduce_labels")
        options.setdefault("do_reduce_labels", old)
    return options


# Per-call options of Transformers' image processors in general that SegFormer's has no step for: accepted, as
# Transformers' SegFormer processor accepts and ignores them (a pipeline written for any model passes them), with
# a warning where they ask for a step that does not happen (value: the setting that asks for something).
_OTHER_STEPS = {"do_convert_rgb": False, "do_pad": True, "do_center_crop": True, "crop_size": None, "pad_size": None,
                "default_to_square": None, "disable_grouping": None, "image_seq_length": None}  # fmt: skip


def _without_other_steps(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` less :data:`_OTHER_STEPS`, with one warning naming those that asked for a step."""
    asked = [f"{k}={options[k]!r}" for k, v in _OTHER_STEPS.items() if v is not None and k in options
             and options[k] is not None and bool(options[k]) == v]  # fmt: skip
    if asked:
        warnings.warn(
            f"{', '.join(asked)}: ignored: SegFormer's image processor has no centre crop or padding and always makes "
            "images RGB (Transformers' ignores these too)",
            stacklevel=4,
        )
    return {k: v for k, v in options.items() if k not in _OTHER_STEPS}


# ----------------------------------------------------------------------------------- input reading
def _open_image(path: str | os.PathLike, what: str) -> Image.Image:
    """Open an image file through the one input layer (complete decode, pixel limit), EXIF orientation
    applied; the mode is kept (the processor's own mode rules follow)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{what}: no such image file: {path}")
    try:
        with open_image(path) as im:
            return upright(im)  # a loaded copy, upright (its file format kept, for to_rgb's mode I rule)
    except (ImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{what}: cannot read {path} as an image ({exc})") from None


def _as_list(items: Any, batch_ndim: int, what: str) -> list[Any]:
    """One item, a list/tuple (or another sequence: a ``datasets`` column) of items (images: also a list of
    lists of them), or an array/tensor batch (ndim == batch_ndim) → a list."""
    if items is None:
        raise ValueError(f"no {what} given")
    if isinstance(items, Sequence) and not isinstance(items, (str, bytes)):
        out = list(items)
        nested = batch_ndim == 4 and out and all(isinstance(i, (list, tuple)) for i in out)  # (images only:
        if nested:  # [[a], [b, c]] is one batch, as in Transformers; a map as nested lists is no list of maps)
            out = [item for group in out for item in group]
        if not out:
            raise ValueError(f"no {what} given (empty list)")
        return out
    if isinstance(items, (np.ndarray, torch.Tensor)) and items.ndim == batch_ndim:
        return list(items)
    return [items]


def _pil_to_rgb(image: Image.Image, what: str) -> Image.Image | np.ndarray:
    """A PIL image of any mode → an RGB PIL image (:func:`segformer.images.to_rgb`), or (H, W, 3) float32 for
    float ("F") images, which keep their values for ``do_rescale`` as in Transformers."""
    if image.mode == "F":
        return np.repeat(pixel_values(np.asarray(image), what)[..., None], 3, axis=-1)
    return to_rgb(image, what)


def _image_to_rgb(image: Any, input_data_format: str | None, what: str) -> Image.Image | np.ndarray:
    """Any supported image → an RGB PIL image or an (H, W, 3) uint8/float32 numpy array."""
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(image, what)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, what)
    if isinstance(image, (torch.Tensor, np.ndarray)):
        return hwc_rgb(image, input_data_format, what)
    raise TypeError(
        f"{what}: unsupported type {type(image).__name__}; expected a PIL image, numpy array, torch tensor or file path"
    )


def _image_with_bands(image: Any, bands: int, input_data_format: str | None, what: str) -> np.ndarray:
    """Any supported image with ``bands`` channels (4, or 1) → (H, W, bands) uint8 or float32, every channel kept
    (:func:`segformer.images.pixel_values`' value rules: 16-bit data to 8 bits, float kept); another channel
    count is a ValueError naming the image."""
    values = "1 value" if bands == 1 else f"{bands} values"
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(image, what)
    if isinstance(image, Image.Image):
        if len(image.getbands()) != bands:
            raise ValueError(
                f"{what}: a {image.mode} image has {len(image.getbands())} channel(s), but image_mean and image_std "
                f"have {values} (one per channel)"
            )
        if bands == 1:  # (L, 1, I, I;16, F: through the RGB conversion's value rules, one band kept)
            return np.ascontiguousarray(np.asarray(_pil_to_rgb(image, what))[..., :1])
        return np.asarray(image)
    tensor = isinstance(image, torch.Tensor)
    if tensor:
        image = tensor_to_numpy(image)
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"{what}: unsupported type {type(image).__name__}; expected a PIL image, numpy array, torch tensor or path"
        )
    if image.ndim == 2 and bands == 1:
        image = image[..., None]
    if image.ndim != 3:
        shapes = f"(H, W, {bands}) or ({bands}, H, W)" + (" or (H, W)" if bands == 1 else "")
        raise ValueError(f"{what}: a {bands}-channel image must be {shapes}, got {image.shape}")
    axis = channel_axis(image.shape, input_data_format, what, bands)  # (hwc_rgb)
    array = pixel_values(np.moveaxis(image, 0, -1) if axis == 0 else image, what)
    if array.shape[-1] != bands:
        raise ValueError(
            f"{what}: has {array.shape[-1]} channel(s), but image_mean and image_std have {values} (one per channel)"
        )
    return array


def _image_pixels(image: Any, options: _Options, what: str) -> Image.Image | np.ndarray:
    """RGB (:func:`_image_to_rgb`), or all four channels, or the one, when the options normalise four or one."""
    if len(options.image_mean) in (1, 4):
        pixels = _image_with_bands(image, len(options.image_mean), options.input_data_format, what)
    else:
        pixels = _image_to_rgb(image, options.input_data_format, what)
    _check_not_empty(pixels.size[::-1] if isinstance(pixels, Image.Image) else pixels.shape[:2], what)
    return pixels


def _check_not_empty(height_width: tuple[int, ...], what: str) -> None:
    """An image with no pixels is an error (resizing would invent a whole picture from nothing)."""
    if min(height_width) == 0:
        raise ValueError(f"{what}: has no pixels (height x width {height_width[0]}x{height_width[1]})")


def _label_array(seg: Any, what: str) -> np.ndarray:
    """A segmentation map → (H, W) int64 copy, checked to hold non-negative integers."""
    if isinstance(seg, (str, os.PathLike)):
        seg = _open_image(seg, what)
    if isinstance(seg, Image.Image):
        if len(seg.getbands()) != 1:
            raise ValueError(f"{what}: a {seg.mode} image has {len(seg.getbands())} bands; a label map needs one")
        array = np.asarray(seg)
    elif isinstance(seg, torch.Tensor):
        array = tensor_to_numpy(seg)
    elif isinstance(seg, np.ndarray):
        array = seg
    else:
        raise TypeError(f"{what}: unsupported type {type(seg).__name__}; expected a PIL image, array, tensor or path")
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array[0] if array.shape[0] == 1 else array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"{what}: a segmentation map must be 2-D (H, W), got shape {tuple(array.shape)}")
    return _integer_labels(array, what)


def _integer_labels(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise ValueError(f"{what}: label values must be integers (got non-integer floats)")
    elif array.dtype.kind not in "iub":
        raise TypeError(f"{what}: unsupported label dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{what}: label values must be >= 0 (got {array.min()}); use 255 to ignore pixels")
    if array.size and array.max() > _MAX_MODE_I:
        raise ValueError(f"{what}: label values must be < 2**31 (got {array.max()})")
    return array.astype(np.int64)


# ----------------------------------------------------------------------------------- shared numerics
def _output_size(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """(height, width) after resizing: ``size`` itself, or the short side set to ``shortest_edge`` (the long one
    ``int(n * long / short)``); with ``longest_edge`` too, a long side that would exceed it sets the scale instead
    (the short side becomes ``round(longest * short / long)``, the long one ``int(longest * short / long * long /
    short)``), and a short side already at its target keeps the image's size (Transformers' rule for this pair)."""
    if "shortest_edge" not in size:
        return size["height"], size["width"]
    target = size["shortest_edge"]
    short, long = (width, height) if width <= height else (height, width)
    scale_short = None  # the short side's exact length when longest_edge set the scale
    if "longest_edge" in size and long / short * target > size["longest_edge"]:
        scale_short = size["longest_edge"] * short / long
        target = int(round(scale_short))
    if "longest_edge" in size and short == target:
        return height, width
    new_long = int((scale_short if scale_short is not None else target) * long / short)
    return (new_long, target) if width <= height else (target, new_long)


def _uint8_lut(options: _Options) -> np.ndarray:
    """(C, 256) float32: the value of every 8-bit level in each channel under these options
    (:func:`segformer.images.normalize_table`, shared with the predictor and the data sets)."""
    mean = tuple(options.image_mean) if options.do_normalize else None
    std = tuple(options.image_std) if options.do_normalize else None
    rescale = float(options.rescale_factor) if options.do_rescale else None
    if len(options.image_mean) == 3:
        return normalize_table(mean, std, rescale)
    # the table is made for three channels: one row of a table per channel of a four-channel image
    return np.stack(
        [
            normalize_table(None if mean is None else (mean[c],) * 3, None if std is None else (std[c],) * 3, rescale)[
                0
            ]
            for c in range(len(options.image_mean))
        ]
    )


def _rescale_normalize_float(hwc: np.ndarray, options: _Options) -> np.ndarray:
    """(H, W, C) float → float32 with Transformers' arithmetic; always a new array."""
    out = (hwc.astype(np.float64) * options.rescale_factor).astype(np.float32) if options.do_rescale else hwc
    out = out.astype(np.float32)
    if options.do_normalize:
        out = (out - np.asarray(options.image_mean, np.float32)) / np.asarray(options.image_std, np.float32)
    return out


# -------------------------------------------------------------------------------------- PIL backend
_BAND_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # the PIL mode an 8-bit (H, W, C) array is resized in


def _pil_resize_pixels(rgb: Image.Image | np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize an RGB image / (H, W, 3) uint8 array as one RGB image ((H, W, 4): as one RGBA image, as Transformers
    does; (H, W, 1): as one L image), float32 channel by channel in mode F."""
    if isinstance(rgb, Image.Image) or rgb.dtype == np.uint8:
        if isinstance(rgb, Image.Image):
            image = rgb
        else:
            bands = rgb.shape[-1]
            image = Image.fromarray(np.ascontiguousarray(rgb[..., 0] if bands == 1 else rgb), _BAND_MODES[bands])
        resized = np.asarray(image.resize((width, height), resample))
        return resized[..., None] if resized.ndim == 2 else resized
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]), "F").resize((width, height), resample))
        for c in range(rgb.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def _pil_finish_pixels(hwc: np.ndarray, options: _Options, lut: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8/float → float32 (C, H, W) or (H, W, C), rescaled and normalised."""
    if hwc.dtype == np.uint8:
        out = np.empty((hwc.shape[-1], *hwc.shape[:2]), np.float32)
        for c in range(hwc.shape[-1]):
            np.take(lut[c], hwc[..., c], out=out[c], mode="clip")  # uint8 indices are always in range
        return np.ascontiguousarray(out.transpose(1, 2, 0)) if options.data_format == "channels_last" else out
    out = _rescale_normalize_float(hwc, options)
    return out if options.data_format == "channels_last" else np.ascontiguousarray(out.transpose(2, 0, 1))


def _pil_resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """NEAREST resize of (h, w) int64 labels via PIL mode L (values <= 255) or mode I (32-bit)."""
    if labels.size and labels.max() > 255:
        image = Image.fromarray(labels.astype(np.int32), "I")
    else:
        image = Image.fromarray(labels.astype(np.uint8), "L")
    return np.asarray(image.resize((width, height), Image.Resampling.NEAREST)).astype(np.int64)


def _check_map_size(
    labels: Any, image_hw: tuple[int, int], index: int, resize: bool = False, warned: bool = False
) -> bool:
    """A map of another size than its image: a warning, once per call (``warned``: one was given). As in
    Transformers, with ``resize`` both are resized to the output size, and without it the map keeps its own size
    (the loss upsamples the logits to the labels' size: labels at a finer resolution than their image work);
    either way the labels may not line up with the pixels (an image file turned upright by its EXIF orientation
    with a map drawn on the stored pixels has the map's sides swapped). Returns whether a warning has been given.
    (Without resizing it was a ValueError here, where Transformers' processor passes the map on: spec audit.)"""
    map_hw, image_hw = tuple(labels.shape[-2:]), tuple(image_hw)
    if map_hw == image_hw:
        return warned
    if warned:
        return True
    message = f"segmentation map {index} has size {map_hw} but its image has {image_hw}"
    hint = " (sides swapped: an image file turned upright by its EXIF orientation?)" if map_hw == image_hw[::-1] else ""
    done = "both are resized to the output size" if resize else "with do_resize=False the map keeps its own size"
    warnings.warn(f"{message}{hint}; {done}, so the labels may not line up", stacklevel=4)
    return True


def _pil_pipeline(
    images: list[Any], maps: list[Any] | None, options: _Options
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Process images one by one through numpy/PIL → per-image pixel arrays and label arrays."""
    lut = _uint8_lut(options)
    pixels, labels, warned, warned_map = [], [] if maps is not None else None, False, False
    for i, image in enumerate(images):
        rgb = _image_pixels(image, options, f"image {i}")
        if isinstance(rgb, np.ndarray) and rgb.dtype != np.uint8 and not warned:
            warned = _warn_if_prescaled(rgb, options)
        height, width = in_hw = (rgb.height, rgb.width) if isinstance(rgb, Image.Image) else rgb.shape[:2]
        if options.do_resize:
            height, width = _output_size(height, width, options.size)
            hwc = _pil_resize_pixels(rgb, height, width, options.resample)
        else:
            hwc = np.asarray(rgb)
        pixels.append(_pil_finish_pixels(hwc, options, lut))
        if maps is not None:
            seg = _label_array(maps[i], f"segmentation map {i}")
            seg = reduce_labels(seg) if options.do_reduce_labels else seg
            warned_map = _check_map_size(seg, in_hw, i, options.do_resize, warned_map)
            if options.do_resize:
                seg = _pil_resize_labels(seg, height, width)
            labels.append(seg)
    return pixels, labels


def _warn_if_prescaled(values: np.ndarray | torch.Tensor, options: _Options) -> bool:
    """Warn (and return True) when float pixels already in [0, 1] are about to be rescaled again."""
    empty = values.numel() == 0 if isinstance(values, torch.Tensor) else values.size == 0
    if not options.do_rescale or empty or float(values.min()) < 0 or float(values.max()) > 1:
        return False
    warnings.warn(
        "float images with values in [0, 1] are being multiplied by rescale_factor; "
        "pass do_rescale=False if they are already scaled",
        UserWarning,
        stacklevel=5,
    )
    return True


# ------------------------------------------------------------------------------------ torch backend
def _torch_eligible(images: list[Any], options: _Options) -> bool:
    """Whether the torch backend can take these images (all uint8/float tensors, a supported filter)."""
    if (options.do_resize and options.resample not in (0, *_TORCH_FILTERS)) or len(options.image_mean) != 3:
        return False
    return all(isinstance(im, torch.Tensor) and (im.dtype == torch.uint8 or im.is_floating_point()) for im in images)


def _tensor_batches(
    images: Any, image_list: list[torch.Tensor], input_data_format: str | None
) -> list[tuple[torch.Tensor, int]]:
    """Group tensors into 4-D batches with their channel axis (0: first, -1: last).

    The caller's 4-D tensor is used as is, equal tensors are stacked, others go one by one.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        axis = channel_axis(tuple(images.shape[1:]), input_data_format, "images")
        _check_not_empty(images.shape[2:] if axis == 0 else images.shape[1:3], "images")
        return [(images, axis)]
    items = []
    for i, im in enumerate(image_list):
        if im.ndim == 2:
            items.append((im[None], 0))
        elif im.ndim == 3:
            items.append((im, channel_axis(tuple(im.shape), input_data_format, f"image {i}")))
        else:
            raise ValueError(f"image {i}: expected a 2-D or 3-D tensor (or a 4-D batch), got shape {tuple(im.shape)}")
    for i, (im, ax) in enumerate(items):
        _check_not_empty(im.shape[1:] if ax == 0 else im.shape[:2], f"image {i}")
    first, axis = items[0]
    same = all(
        im.shape == first.shape and im.dtype == first.dtype and im.device == first.device and ax == axis
        for im, ax in items
    )
    if same and len(items) > 1:
        return [(torch.stack([im for im, _ in items]), axis)]
    return [(im[None], ax) for im, ax in items]


def _nearest_index(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """Source index of each output row/column under PIL's NEAREST resize.

    PIL walks the source in float64 steps of ``in / out`` starting at half a step and truncates; the
    accumulated rounding of that walk decides ties, so the positions are accumulated the same way here.
    """
    steps = np.full(size_out, size_in / size_out)
    steps[0] *= 0.5
    positions = np.add.accumulate(steps).astype(np.int64)  # sequential sums, as PIL's loop
    return torch.from_numpy(np.minimum(positions, size_in - 1)).to(device)


def _nearest_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize the last two axes by index gathering (exactly PIL's NEAREST, any dtype and device)."""
    x = x.index_select(-2, _nearest_index(x.shape[-2], height, x.device))
    return x.index_select(-1, _nearest_index(x.shape[-1], width, x.device))


def _torch_resize(
    x: torch.Tensor, height: int, width: int, resample: int, uint8_kernel: bool | None = None
) -> torch.Tensor:
    """Resize (B, C, H, W) like PIL: antialiased filter, uint8 results rounded to 8 bits.

    ``uint8_kernel`` (default: on CPU) resizes uint8 directly with torch's 8-bit kernel, which follows PIL's
    fixed-point arithmetic; otherwise (e.g. CUDA) uint8 goes through float32 and is rounded back.
    """
    if (height, width) == tuple(x.shape[-2:]):
        return x
    if resample == 0:
        return _nearest_resize(x, height, width)
    mode = _TORCH_FILTERS[resample]
    if uint8_kernel is None:
        uint8_kernel = x.device.type == "cpu"
    if x.dtype == torch.uint8 and uint8_kernel:
        return F.interpolate(x, size=(height, width), mode=mode, antialias=True, align_corners=False)
    y = F.interpolate(x.float(), size=(height, width), mode=mode, antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255) if x.dtype == torch.uint8 else y


def _torch_pixels(batch: torch.Tensor, axis: int, options: _Options) -> torch.Tensor:
    """A uint8/float batch, (B, C, H, W) (axis 0) or (B, H, W, C) (axis -1) → float32 pixel values.

    The result is (B, 3, H', W') (or (B, H', W', 3) for channels_last) on the batch's device.
    """
    x = batch.detach() if axis == 0 else batch.detach().permute(0, 3, 1, 2)
    x = x[:, :3] if x.shape[1] == 4 else x
    if options.do_resize:
        x = _torch_resize(x, *_output_size(x.shape[-2], x.shape[-1], options.size), options.resample)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.dtype == torch.uint8:  # make the cheap uint8 tensor dense in the output layout
        layout = torch.channels_last if options.data_format == "channels_last" else torch.contiguous_format
        x = x.contiguous(memory_format=layout)
    y = _torch_rescale_normalize(x, options)
    return y.permute(0, 2, 3, 1).contiguous() if options.data_format == "channels_last" else y.contiguous()


def _torch_rescale_normalize(x: torch.Tensor, options: _Options) -> torch.Tensor:
    """x * scale + shift per channel in float32 (one fused step); never writes into ``x``."""
    scale = np.full(3, options.rescale_factor if options.do_rescale else 1.0)
    shift = np.zeros(3)
    if options.do_normalize:
        std, mean = np.asarray(options.image_std), np.asarray(options.image_mean)
        scale, shift = scale / std, -mean / std
    y = x.to(torch.float32)
    if not (options.do_rescale or options.do_normalize):
        return y.clone() if y is x else y
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    shift_t = torch.as_tensor(shift, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    if y is x:  # x may be the caller's tensor
        return torch.addcmul(shift_t, y, scale_t)
    return y.mul_(scale_t).add_(shift_t)


def _torch_labels(
    maps: list[Any],
    out_sizes: list[tuple[int, int]],
    in_sizes: list[tuple[int, int]],
    options: _Options,
    device: torch.device,
) -> list[torch.Tensor]:
    """Each map → (H', W') int64 on ``device``: checked, reduced, resized by exact index gathering."""
    labels, warned = [], False
    for i, seg in enumerate(maps):
        t = torch.from_numpy(_label_array(seg, f"segmentation map {i}")).to(device)
        t = reduce_labels(t) if options.do_reduce_labels else t
        warned = _check_map_size(t, in_sizes[i], i, options.do_resize, warned)
        if options.do_resize:
            t = _nearest_resize(t, *out_sizes[i])
        labels.append(t)
    return labels


def _torch_pipeline(
    images: Any, image_list: list[torch.Tensor], maps: list[Any] | None, options: _Options
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Process tensors batch-wise on their device → pixel batches (B_i, ...) and per-image labels."""
    pixels, in_sizes, out_sizes = [], [], []
    warned = False
    with torch.no_grad():
        for batch, axis in _tensor_batches(images, image_list, options.input_data_format):
            if batch.is_floating_point() and not warned:
                warned = _warn_if_prescaled(batch, options)
            out = _torch_pixels(batch, axis, options)
            in_hw = tuple(batch.shape[2:]) if axis == 0 else tuple(batch.shape[1:3])
            out_hw = tuple(out.shape[2:]) if options.data_format == "channels_first" else tuple(out.shape[1:3])
            in_sizes += [in_hw] * batch.shape[0]
            out_sizes += [out_hw] * batch.shape[0]
            pixels.append(out)
        if maps is None:
            return pixels, None
        return pixels, _torch_labels(maps, out_sizes, in_sizes, options, pixels[0].device)


# ------------------------------------------------------------------------------------------ packing
def _tensor_type(return_tensors: Any) -> str | None:
    value = getattr(return_tensors, "value", return_tensors)
    if value is None or value in _TENSOR_TYPES:
        return value
    raise ValueError(f"return_tensors must be None or one of {_TENSOR_TYPES}, got {return_tensors!r}")


def _stack(items: list[np.ndarray] | list[torch.Tensor], name: str, kind: str) -> np.ndarray | torch.Tensor:
    shapes = [tuple(x.shape) for x in items]
    if len(set(shapes)) > 1:
        raise ValueError(
            f"cannot stack {name} of different sizes {shapes} into one return_tensors={kind!r} batch; "
            "keep do_resize=True with a fixed size, or use return_tensors=None"
        )
    if isinstance(items[0], torch.Tensor):
        return torch.stack(items) if len(items) > 1 else items[0][None]
    return np.stack(items)


def _convert(stacked: np.ndarray | torch.Tensor, kind: str) -> Any:
    """A stacked numpy array / torch tensor → the framework asked for."""
    if kind == "pt":
        return stacked if isinstance(stacked, torch.Tensor) else torch.from_numpy(stacked)
    array = tensor_to_numpy(stacked) if isinstance(stacked, torch.Tensor) else stacked
    if kind == "np":
        return array
    module = {"tf": "tensorflow", "jax": "jax.numpy"}[kind]
    try:
        framework = __import__(module, fromlist=["_"])
    except ImportError:
        raise ValueError(f"return_tensors={kind!r} needs {module.split('.')[0]}, which is not installed") from None
    return framework.convert_to_tensor(array) if kind == "tf" else framework.asarray(array)


def _pack(items: list[np.ndarray] | list[torch.Tensor], name: str, kind: str | None) -> Any:
    """Per-image arrays or tensor batches → a list of numpy arrays (kind None) or one stacked batch."""
    if kind is None:
        per_image = []
        for item in items:
            if isinstance(item, torch.Tensor):
                item = tensor_to_numpy(item)
            per_image += list(item) if item.ndim == 4 else [item]
        return per_image
    if isinstance(items[0], torch.Tensor) and items[0].ndim == 4:  # torch pixel batches
        if len(items) == 1:
            return _convert(items[0], kind)
        items = [row for batch in items for row in batch]
    return _convert(_stack(items, name, kind), kind)


# ---------------------------------------------------------------------------------------- processor
class SegformerImageProcessor:
    """Prepares images and segmentation maps for SegFormer and turns its logits into label maps.

    Args:
        do_resize: resize images (and maps) to ``size``.
        size: int (square), ``(width, height)``, ``{"height": h, "width": w}``, ``{"shortest_edge": n}`` or
            ``{"shortest_edge": n, "longest_edge": m}``.
        resample: PIL filter for images (int or ``PIL.Image.Resampling``); maps always use NEAREST.
        do_rescale: multiply pixel values by ``rescale_factor`` (1/255: 8-bit values to [0, 1]).
        do_normalize: subtract ``image_mean`` and divide by ``image_std`` (per channel: 3 values for RGB, 4 or 1
            for four- or one-channel images, a number for every channel; None → ImageNet).
        reduce_labels / do_reduce_labels: map label 0 to 255 (ignored) and every other label x to x - 1.
        backend: ``"auto"``, ``"pil"`` or ``"torch"`` (see the module docstring); run-time only, not saved.
        data_format: ``"channels_first"`` (B, 3, H, W) or ``"channels_last"`` (B, H, W, 3) pixel values.
        **kwargs: other keys (of configs from other versions) are kept; ``save_pretrained`` writes them back.
    """

    model_input_names = ["pixel_values"]
    _config_type_name = "SegformerImageProcessor"

    def __init__(
        self,
        do_resize: bool = True,
        size: int | tuple[int, int] | Mapping[str, int] = 512,
        resample: int | Image.Resampling = Image.Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        reduce_labels: bool = False,
        *,
        do_reduce_labels: bool | None = None,
        backend: str = "auto",
        data_format: str = "channels_first",
        **kwargs: Any,
    ) -> None:
        self.do_resize = bool(do_resize)
        self.size = _normalize_size(size)
        self.resample = _normalize_resample(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean, self.image_std = (list(v) for v in _normalize_stats(image_mean, image_std))
        self.do_reduce_labels = bool(reduce_labels if do_reduce_labels is None else do_reduce_labels)
        self.backend = backend
        self.data_format = data_format
        self.extra = {k: v for k, v in kwargs.items() if k not in _TYPE_KEYS}
        self._options({})  # validate now rather than at the first call

    @property
    def reduce_labels(self) -> bool:
        """The docs page's name of ``do_reduce_labels``."""
        return self.do_reduce_labels

    @reduce_labels.setter
    def reduce_labels(self, value: bool) -> None:
        self.do_reduce_labels = bool(value)

    # ------------------------------------------------------------------------------------ options
    def _options(self, overrides: Mapping[str, Any]) -> _Options:
        """This processor's options with per-call ``overrides``, validated."""
        overrides = _merge_reduce_labels(overrides)
        overrides = _without_other_steps(overrides)
        known = set(_Options.__dataclass_fields__)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; options are {sorted(known)}")

        def get(name: str) -> Any:  # a per-call None means "not given", as in Transformers 4.x: the processor's own
            value = overrides.get(name)
            return getattr(self, name, None) if value is None else value

        backend = get("backend")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        mean, std = _normalize_stats(get("image_mean"), get("image_std"))
        if 0.0 in std:
            raise ValueError(f"image_std must not contain zeros, got {std}")
        return _Options(
            do_resize=bool(get("do_resize")),
            size=_normalize_size(get("size")),
            resample=_normalize_resample(get("resample")),
            do_rescale=bool(get("do_rescale")),
            rescale_factor=float(get("rescale_factor")),
            do_normalize=bool(get("do_normalize")),
            image_mean=mean,
            image_std=std,
            do_reduce_labels=bool(get("do_reduce_labels")),
            backend=backend,
            data_format=_normalize_format(get("data_format"), "data_format", allow_none=False),
            input_data_format=_normalize_format(get("input_data_format"), "input_data_format", allow_none=True),
        )

    # ------------------------------------------------------------------------------------ processing
    def __call__(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        return_tensors: str | None = None,
        **overrides: Any,
    ) -> SegformerBatch:
        """Prepare ``images`` (and ``segmentation_maps``) for the model; see :meth:`preprocess`."""
        return self.preprocess(images, segmentation_maps, return_tensors, **overrides)

    def preprocess(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        return_tensors: str | None = None,
        **overrides: Any,
    ) -> SegformerBatch:
        """Prepare a batch.

        Args:
            images: one image or a list (PIL image, numpy array, torch tensor or file path; a list of lists is
                one batch), or a 4-D array/tensor batch. Arrays are (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4.
            segmentation_maps: one label map per image: (H, W) arrays/tensors, one-band PIL images or paths,
                or a (B, H, W) / (B, 1, H, W) batch.
            return_tensors: None → lists of numpy arrays, one per image; "np" / "pt" / "tf" / "jax" → one
                stacked batch of that framework.
            **overrides: any option of the constructor for this call only, plus ``input_data_format``
                ("channels_first" / "channels_last": the layout of array inputs when it is ambiguous) and
                ``device`` (with return_tensors="pt": where the tensors go). Options of Transformers' image
                processors in general that SegFormer's has no step for (``do_convert_rgb``, ``do_pad``,
                ``do_center_crop``, ``crop_size``, ...) are accepted and ignored, as Transformers does, with a
                warning where they ask for a step (``do_center_crop=True``); other names are a TypeError.

        Returns:
            SegformerBatch with ``pixel_values`` float32 (B, 3, H, W) (or (B, H, W, 3) with channels_last)
            and, with maps, ``labels`` int64 (B, H, W).
        """
        device = overrides.pop("device", None)
        options = self._options(overrides)
        kind = _tensor_type(return_tensors)
        if device is not None and kind != "pt":
            raise ValueError(f"device={device!r} moves torch tensors: pass return_tensors='pt' with it")
        image_list = _as_list(images, 4, "images")
        if isinstance(segmentation_maps, (np.ndarray, torch.Tensor)) and segmentation_maps.ndim == 4:
            segmentation_maps = segmentation_maps[:, 0] if segmentation_maps.shape[1] == 1 else segmentation_maps
        maps = None if segmentation_maps is None else _as_list(segmentation_maps, 3, "segmentation maps")
        if maps is not None and len(maps) != len(image_list):
            raise ValueError(
                f"got {len(image_list)} images but {len(maps)} segmentation maps "
                "(a 3-D array of maps is read as a batch of 2-D maps)"
            )
        if self._use_torch(image_list, options):
            pixels, labels = _torch_pipeline(images, image_list, maps, options)
        else:
            pixels, labels = _pil_pipeline(image_list, maps, options)
        batch = SegformerBatch(pixel_values=_pack(pixels, "pixel_values", kind))
        if labels is not None:
            batch["labels"] = _pack(labels, "labels", kind)
        return batch if device is None else batch.to(device)

    @staticmethod
    def _use_torch(image_list: list[Any], options: _Options) -> bool:
        eligible = _torch_eligible(image_list, options)
        if options.backend == "torch" and not eligible:
            raise ValueError(
                "backend='torch' needs every image to be a uint8 or floating torch tensor, resample to be "
                "NEAREST, BILINEAR or BICUBIC and three image_mean/image_std values; use backend='pil' or 'auto'"
            )
        return options.backend == "torch" or (options.backend == "auto" and eligible)

    # ------------------------------------------------------------------------------ post-processing
    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: TargetSizes | None = None, return_segmentation_scores: bool = False
    ) -> list[torch.Tensor] | list[SegformerBatch]:
        """Logits → one int64 label map per image.

        Args:
            outputs: a model output with ``.logits`` (B, C, h, w), or the logits tensor itself.
            target_sizes: one (height, width) per image (a list of pairs or a (B, 2) tensor/array); each
                image's logits are resized to it bilinearly (align_corners=False) before the argmax. None →
                argmax at the logits' resolution.
            return_segmentation_scores: return, per image, ``segmentation`` (the map) and
                ``segmentation_scores`` (the (C, height, width) logits it is the argmax of), as Transformers 5.x.

        Returns:
            list of B int64 tensors of shape (height, width) (or (h, w)), on the logits' device; with
            ``return_segmentation_scores``, a list of B :class:`SegformerBatch` holding both.

        Without the scores, CPU float32 maps come from :func:`segformer.inference.resized_labels`: the resize as
        one matrix per axis with the argmax taken band by band, never the (C, height, width) resized logits (150
        classes, a 683x512 photo: ~2x faster). Those maps equal the argmax of F.interpolate's logits except where
        two classes are within ~1e-5 of the logits' range (F.interpolate's float32 source coordinates); there they
        follow the resize computed in float64. With the scores, the maps are the scores' argmax.
        """
        if not return_segmentation_scores:
            return self._post_process(outputs, target_sizes, scores=False)[0]
        maps, scores = self._post_process(outputs, target_sizes, scores=True)
        return [SegformerBatch(segmentation=m, segmentation_scores=s) for m, s in zip(maps, scores, strict=True)]

    def _post_process(
        self, outputs: Any, target_sizes: TargetSizes | None, scores: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, Mapping):
            logits = outputs.get("logits")
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
            raise TypeError("outputs must have .logits of shape (B, C, h, w), or be that tensor")
        if target_sizes is None:
            return list(torch.max(logits, dim=1).indices), list(logits)  # argmax's indices, 2-4x faster (CPU)
        sizes = target_sizes.tolist() if isinstance(target_sizes, (torch.Tensor, np.ndarray)) else list(target_sizes)
        if len(sizes) == 2 and all(isinstance(v, (int, np.integer)) for v in sizes):
            raise ValueError(
                f"target_sizes must hold one (height, width) per image, got the pair {tuple(sizes)}: for one image "
                f"write [{tuple(sizes)}]"
            )
        if len(sizes) != logits.shape[0]:
            raise ValueError(f"got {len(sizes)} target sizes for a batch of {logits.shape[0]} logits")
        maps, resized_logits = [], []
        for i, hw in enumerate(sizes):
            hw = hw.tolist() if isinstance(hw, (torch.Tensor, np.ndarray)) else hw  # (list(a (B, 2) tensor))
            if not isinstance(hw, Sequence) or isinstance(hw, str) or len(hw) != 2:
                raise ValueError(f"target size {i} must be (height, width), got {hw!r}")
            size = (_positive_int(hw[0], "target height"), _positive_int(hw[1], "target width"))
            if not scores:
                maps.append(resized_labels(logits[i], size))
                continue
            resized = F.interpolate(logits[i : i + 1], size=size, mode="bilinear", align_corners=False)
            maps.append(torch.max(resized[0], dim=0).indices)  # the argmax (see above)
            resized_logits.append(resized[0])
        return maps, resized_logits

    # ----------------------------------------------------------------------------------- config I/O
    def to_dict(self) -> dict[str, Any]:
        """The config as Transformers writes it (``do_reduce_labels``, ``size`` dict, int ``resample``)."""
        options = self._options({})
        config = dict(self.extra)
        config.update(
            image_processor_type=self._config_type_name,
            do_resize=options.do_resize,
            size=dict(options.size),
            resample=options.resample,
            do_rescale=options.do_rescale,
            rescale_factor=options.rescale_factor,
            do_normalize=options.do_normalize,
            image_mean=list(options.image_mean),
            image_std=list(options.image_std),
            do_reduce_labels=options.do_reduce_labels,
        )
        if options.data_format != "channels_first":
            config["data_format"] = options.data_format
        return config

    def to_json_string(self) -> str:
        """:meth:`to_dict` as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Write :meth:`to_json_string` to ``json_file_path`` atomically."""
        atomic_write_text(Path(json_file_path), self.to_json_string())

    @classmethod
    def from_json_file(cls: type[_P], json_file: str | os.PathLike) -> _P:
        """Build from a preprocessor JSON file (either layout; see :meth:`from_pretrained`)."""
        path = Path(json_file)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable JSON preprocessor config ({first_line(exc)})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: a preprocessor config must be a JSON object")
        try:
            return cls.from_dict(config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: invalid preprocessor config ({exc})") from None

    def save_pretrained(self, save_directory: str | os.PathLike, *, push_to_hub: bool = False, **hub: Any) -> list[str]:
        """Write ``preprocessor_config.json`` into ``save_directory`` (created if needed) atomically.

        Returns the list of files written (one path), as Transformers does; its
        ``SegformerImageProcessor.from_pretrained`` and ``AutoImageProcessor`` read the file. With
        ``push_to_hub=True`` it is then uploaded (``hub``: the arguments of :meth:`push_to_hub`; ``repo_id``
        defaults to the directory's name).
        """
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory}: save_pretrained needs a directory, found a file")
        if hub and not push_to_hub:
            raise TypeError(f"save_pretrained got unexpected argument(s) {', '.join(sorted(hub))}")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        self.to_json_file(path)
        if push_to_hub:
            self.push_to_hub(hub.pop("repo_id", directory.resolve().name), **hub)
        return [str(path)]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload ``preprocessor_config.json`` to the hub repo ``repo_id`` (created if needed) in one commit; see
        :func:`segformer.hub.push_folder` for the arguments. Returns the commit's ``CommitInfo``."""
        default = "Upload feature extractor" if "FeatureExtractor" in type(self).__name__ else "Upload processor"
        return push_folder(
            repo_id,
            lambda folder: self.save_pretrained(folder),
            commit_message=commit_message or default,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )

    @classmethod
    def from_dict(cls: type[_P], config: Mapping[str, Any], **overrides: Any) -> _P:
        """Build from a config dict (old or new key spellings); ``overrides`` win over the config."""
        config = _merge_reduce_labels({k: v for k, v in config.items() if k not in (*_TYPE_KEYS, "backend")})
        return cls(**{**config, **_merge_reduce_labels(overrides)})

    @classmethod
    def from_pretrained(
        cls: type[_P],
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        subfolder: str = "",
        return_unused_kwargs: bool = False,
        **overrides: Any,
    ) -> _P | tuple[_P, dict[str, Any]]:
        """Load ``preprocessor_config.json`` from a directory or a hub id (through the huggingface_hub cache), or
        from its ``subfolder``.

        Reads both the current layout and the legacy one (``feature_extractor_type``, ``reduce_labels``, an
        int ``size``). ``overrides`` replace options of the file. With ``return_unused_kwargs=True`` (as in
        Transformers) the overrides that are neither an option nor a key of the file are left out and returned:
        ``(processor, unused)``. Raises CheckpointError (a ValueError).
        """
        path = resolve_file(
            pretrained_model_name_or_path,
            CONFIG_NAME,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            subfolder=subfolder,
        )
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable JSON preprocessor config ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: a preprocessor config must be a JSON object")
        unused: dict[str, Any] = {}
        if return_unused_kwargs:
            known = {*inspect.signature(SegformerImageProcessor.__init__).parameters, *config, "reduce_labels"}
            unused = {k: v for k, v in overrides.items() if k not in known}
            overrides = {k: v for k, v in overrides.items() if k in known}
        try:
            processor = cls.from_dict(config, **overrides)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: invalid preprocessor config ({exc})") from None
        return (processor, unused) if return_unused_kwargs else processor


class SegformerFeatureExtractor(SegformerImageProcessor):
    """:class:`SegformerImageProcessor` under its pre-4.26 Transformers name.

    Identical behaviour; ``save_pretrained`` writes ``image_processor_type: "SegformerImageProcessor"``, the
    name Transformers writes (its 5.x ``AutoImageProcessor`` knows no SegformerFeatureExtractor); files naming
    either class are read. Positional arguments follow the documented order of this class: ``do_resize, size,
    resample, do_normalize, image_mean, image_std, reduce_labels`` (the rescale options are keywords here).
    """

    def __init__(
        self,
        do_resize: bool = True,
        size: int | tuple[int, int] | Mapping[str, int] = 512,
        resample: int | Image.Resampling = Image.Resampling.BILINEAR,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        reduce_labels: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            do_resize=do_resize,
            size=size,
            resample=resample,
            do_normalize=do_normalize,
            image_mean=image_mean,
            image_std=image_std,
            reduce_labels=reduce_labels,
            **kwargs,
        )
