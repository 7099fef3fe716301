"""Segment images: paths, PIL images or arrays in, label maps at each image's original resolution out.

>>> from segformer.predict import SegformerPredictor, segment
>>> labels = segment("street.jpg")                                  # (H, W) class ids, default ADE20K b0
>>> predictor = SegformerPredictor("nvidia/segformer-b0-finetuned-cityscapes-1024-1024", mode="slide",
...                                crop_size=(1024, 1024), stride=(768, 768), device="cuda", dtype="float16")
>>> result = predictor.predict("frame.png", return_probs=True)      # Segmentation: .labels, .probs
>>> for source, result in predictor.predict_iter(paths):            # bad files come back as ImageError
...     ...

:func:`predict_to_folder` is the whole ``segformer predict`` run (files and folders in; label PNGs, overlays,
a summary and a legend out; each failure reported and skipped); it shards its inputs across the ranks of a
``torchrun`` job.

Choices worth knowing:

- Images are read by :mod:`segformer.images`, the one input layer: EXIF orientation applied, every mode and
  dtype turned into RGB by one documented rule, then /255 and ImageNet mean/std. A truncated file is an error,
  never silently half-decoded; so is a file whose header claims more than ``max_pixels`` pixels (a
  decompression bomb; Pillow's default limit, 89.5 million, unless told otherwise).
- Images smaller than ``min_size`` on either side (default: the model's minimum input, 29 px for the published
  configs) are reported and skipped in every mode, including those that resize anyway: a handful of pixels
  carries too little to segment, and one rule for all modes is easier to reason about.
- Only images of the same size share a batch (each batch is one tensor); the predictor groups each window of
  ``batch_size`` images by size.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .fileio import atomic_write, atomic_write_text
from .hub import CheckpointError, first_line
from .images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    ImageInput,
    load_image,
    normalize,
    to_rgb,
)
from .inference import InferenceOptions, aligned_size, infer, labels_from_probs, resolve_options
from .visualize import class_names, colorize, label_image, legend, overlay, palette_for, side_by_side

DEFAULT_MODEL = "nvidia/segformer-b0-finetuned-ade-512-512"


# ----------------------------------------------------------------------------------------------- model
def select_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto": CUDA when available, else Apple's MPS, else the CPU; anything else as given."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """None → float32; "float16"/"fp16"/"half", "bfloat16"/"bf16", "float32"/"fp32" or a torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        return dtype
    if str(dtype) not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of float32, float16, bfloat16")
    return _DTYPES[str(dtype)]


def load_model(
    model: str | os.PathLike | nn.Module = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> nn.Module:
    """A SegformerForSemanticSegmentation from a checkpoint directory or hub id (or a model, passed through),
    in eval mode on ``device`` (see :func:`select_device`) in ``dtype``.

    A checkpoint that cannot be found raises :class:`CheckpointError` with one line that says how to point
    at a local checkpoint and that hub ids need network or a populated cache."""
    dev, dt = select_device(device), resolve_dtype(dtype)
    if isinstance(model, nn.Module):
        return model.to(device=dev, dtype=dt).eval()
    from .modeling import SegformerForSemanticSegmentation

    try:
        net = SegformerForSemanticSegmentation.from_pretrained(model)
    except CheckpointError as exc:
        reason = str(exc).split(" (hub ids need")[0]  # the advice below replaces hub.py's shorter one
        reason = reason.removeprefix(f"{model}: ")
        raise CheckpointError(
            f"cannot load model '{model}': {reason}. Pass a local checkpoint directory (written by "
            "save_pretrained or `segformer convert`); hub ids such as "
            "nvidia/segformer-b0-finetuned-ade-512-512 need network access or a populated Hugging Face "
            "cache (HF_HOME)"
        ) from None
    return net.to(device=dev, dtype=dt).eval()


# ----------------------------------------------------------------------------------------------- predictor
@dataclass
class Segmentation:
    """The prediction for one image.

    labels: (H, W) class ids at the image's size (after EXIF orientation); uint8 for up to 256 classes,
    uint16 up to 65536, else int32. probs: (K, H, W) float32 class probabilities, or None unless asked for.
    """

    labels: np.ndarray
    probs: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL gives it."""
        return self.labels.shape[1], self.labels.shape[0]

    def areas(self, num_classes: int) -> np.ndarray:
        """(num_classes,) int64 pixel count of each class."""
        return np.bincount(self.labels.reshape(-1).astype(np.int64), minlength=num_classes)[:num_classes]


class SegformerPredictor:
    """Segments images with a SegFormer; numpy label maps at each image's original resolution out.

    Args:
        model: a checkpoint directory, a hub id (default: ADE20K b0) or a SegformerForSemanticSegmentation.
        device: "auto" / None (CUDA, else MPS, else CPU), "cpu", "cuda", "cuda:1", "mps" or a torch.device.
        dtype: "float32" (default), "float16" or "bfloat16"; probabilities are float32 whatever the dtype.
        options: the :class:`~segformer.inference.InferenceOptions` (default: :attr:`default_options`, the
            aligned mode). Its fields may also be given as keywords (``mode=``, ``crop_size=``, ``stride=``,
            ``short_side=``, ``long_side=``, ``align=``, ``scales=``, ``flip=``), alone or as changes to
            ``options``. Modes: "aligned" (default; resize keeping the ratio to fit (long_side, short_side),
            sides rounded up to a multiple of ``align`` (32) — the ADE20K protocol, and bounded work for huge
            images), "whole" (the image as is) or "slide" (``crop_size`` windows at ``stride`` — the Cityscapes
            protocol); scales, flip: multi-scale + flip test-time augmentation (e.g. scales=[0.75, 1.0, 1.25],
            flip=True). Invalid values raise ValueError.
        batch_size: images per forward pass (only images of the same size share one).
        max_pixels: refuse images with more pixels than this (decompression bombs); None: no limit.
        min_size: refuse images with a side shorter than this (default: the model's minimum input size).
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        options: InferenceOptions | None = None,
        batch_size: int = 1,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_size: int | None = None,
        **keywords: Any,
    ) -> None:
        self.options = resolve_options(self.default_options if options is None else options, keywords)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be positive (or None for no limit), got {max_pixels}")
        self.model = load_model(model, device=device, dtype=dtype)
        self.model_name = str(model) if not isinstance(model, nn.Module) else type(model).__name__
        self.batch_size, self.max_pixels = batch_size, max_pixels
        from .modeling import min_input_size

        self.min_size = int(min_size) if min_size is not None else min_input_size(self.config)
        k = self.config.num_labels
        # A one-label (binary) model predicts 0 = not the class, 1 = the class.
        self.num_classes = 2 if k == 1 else k
        names = class_names(self.config.id2label, k)
        self.class_names: list[str] = ["background", names[0]] if k == 1 else names
        self.palette: np.ndarray = palette_for(self.class_names if k != 1 else 2)

    # The options of a predictor built without ``options``: the ADE20K protocol, bounded work for huge images.
    default_options = InferenceOptions(mode="aligned")

    @property
    def config(self) -> Any:
        return self.model.config

    # Read-only views of self.options, as the attributes of earlier versions.
    mode = property(lambda self: self.options.mode)
    crop_size = property(lambda self: self.options.crop_size)
    stride = property(lambda self: self.options.stride)
    short_side = property(lambda self: self.options.short_side)
    long_side = property(lambda self: self.options.long_side)
    scales = property(lambda self: list(self.options.scales) if self.options.scales is not None else None)
    flip = property(lambda self: self.options.flip)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _labels_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.num_classes <= 256 else np.uint16 if self.num_classes <= 65536 else np.int32)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image → (3, H, W) float32: /255, then ImageNet mean/std (:func:`segformer.images.normalize`)."""
        return torch.from_numpy(normalize(image))  # (3, H, W)

    def _check(self, image: Image.Image) -> None:
        if min(image.size) < self.min_size:
            raise ImageError(
                f"image is {image.width}x{image.height}, smaller than the minimum of {self.min_size} "
                "pixels a side for this model"
            )

    def load(self, source: ImageInput) -> Image.Image:
        """The RGB image the predictor would segment (see :func:`load_image`); raises ImageError."""
        image = load_image(source, max_pixels=self.max_pixels)
        self._check(image)
        return image

    # Above this many output elements (B·K·H·W) an aligned single pass is upsampled in row chunks.
    chunk_threshold: int = 1 << 26

    def _run(self, images: list[Image.Image], return_probs: bool) -> list[Segmentation]:
        """Same-size RGB images → one forward pass (through segformer.inference)."""
        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, H, W)
        b, (h, w) = batch.shape[0], batch.shape[-2:]
        opts, k = self.options, self.config.num_labels
        if opts.mode == "aligned" and opts.single_pass and not return_probs and b * k * h * w > self.chunk_threshold:
            # A huge photo would need (B, K, H, W) float32 probabilities at full size (7 GB for 150 classes
            # at 12 MP). Take them at the working size and upsample their logs in row chunks instead: log p
            # differs from the logits by a per-pixel constant, so the argmax is the same.
            work = aligned_size(h, w, short_side=opts.short_side, long_side=opts.long_side, align=opts.align)
            small = infer(self.model, batch, opts, output_size=work)  # (B, K, h', w')
            labels = _upsampled_argmax(small, (h, w))
            probs = None
        else:
            probs = infer(self.model, batch, opts)  # (B, K, H, W) float32 at the input size
            labels = labels_from_probs(probs)  # (B, H, W)
        labels_np = labels.cpu().numpy().astype(self._labels_dtype())
        probs_np = probs.float().cpu().numpy() if return_probs and probs is not None else None
        return [Segmentation(labels_np[i], probs_np[i] if probs_np is not None else None) for i in range(len(images))]

    def predict_iter(
        self, images: Iterable[ImageInput], *, return_probs: bool = False
    ) -> Iterator[tuple[ImageInput, Segmentation | ImageError]]:
        """Yield ``(source, Segmentation)`` for each input in order, or ``(source, ImageError)`` for one that
        cannot be read or is too small/large: a bad image never stops the others."""
        for source, _, result in self._iter(images, return_probs):
            yield source, result

    def _iter(
        self, images: Iterable[ImageInput], return_probs: bool
    ) -> Iterator[tuple[ImageInput, Image.Image | None, Segmentation | ImageError]]:
        """predict_iter that also yields the decoded RGB image (None for a failure)."""
        window: list[tuple[ImageInput, Image.Image | ImageError]] = []

        def flush() -> Iterator[tuple[ImageInput, Image.Image | None, Segmentation | ImageError]]:
            results: dict[int, Segmentation | ImageError] = {}
            groups: dict[tuple[int, int], list[int]] = {}
            for i, (_, img) in enumerate(window):
                if isinstance(img, ImageError):
                    results[i] = img
                else:
                    groups.setdefault(img.size, []).append(i)
            for idx in groups.values():
                outs = self._run([window[i][1] for i in idx], return_probs)  # type: ignore[misc]
                results.update(zip(idx, outs, strict=True))
            for i, (src, img) in enumerate(window):
                yield src, (img if isinstance(img, Image.Image) else None), results[i]
            window.clear()

        for source in images:
            try:
                loaded: Image.Image | ImageError = self.load(source)
            except ImageError as exc:
                loaded = exc
            window.append((source, loaded))
            if len(window) >= self.batch_size:
                yield from flush()
        if window:
            yield from flush()

    def predict(
        self, images: ImageInput | Sequence[ImageInput], *, return_probs: bool = False
    ) -> Segmentation | list[Segmentation]:
        """One image → a :class:`Segmentation`; a list → a list. Raises :class:`ImageError` (naming the
        image) for the first input that cannot be segmented."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        out: list[Segmentation] = []
        for source, result in self.predict_iter(items, return_probs=return_probs):
            if isinstance(result, ImageError):
                name = source if isinstance(source, (str, os.PathLike)) else f"image {len(out)}"
                raise ImageError(f"{name}: {result}")
            out.append(result)
        return out[0] if single else out

    __call__ = predict


def _upsampled_argmax(probs: torch.Tensor, size: tuple[int, int], rows: int = 256) -> torch.Tensor:
    """(B, K, h, w) probabilities → (B, H, W) int64 class ids, as the argmax of the bilinearly upsampled
    (align_corners=False, as F.interpolate) logits would give them at ``size``, ``rows`` output rows at a time
    so that only a slice ever exists at full size. K == 1 (sigmoid): logit > 0."""
    height, width = size
    h = probs.shape[-2]
    binary = probs.shape[1] == 1
    p = probs.clamp(1e-30, 1 - 1e-7) if binary else probs.clamp_min(1e-30)
    values = p.log() - (-p).log1p() if binary else p.log()  # the logits, up to a per-pixel constant
    # Source row of every output row, as F.interpolate computes it: (i + 0.5) · h / H - 0.5, clamped at 0.
    src = ((torch.arange(height, dtype=torch.float64) + 0.5) * (h / height) - 0.5).clamp_min(0)
    y0 = src.floor().long().clamp_max(h - 1)
    y1 = (y0 + 1).clamp_max(h - 1)
    wy = (src - y0).to(device=probs.device, dtype=probs.dtype)
    out = torch.empty((probs.shape[0], height, width), dtype=torch.long, device=probs.device)
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        # Widen the needed source rows (same row count: the height is untouched), then blend rows.
        top = F.interpolate(values[:, :, y0[r0:r1]], size=(r1 - r0, width), mode="bilinear", align_corners=False)
        bottom = F.interpolate(values[:, :, y1[r0:r1]], size=(r1 - r0, width), mode="bilinear", align_corners=False)
        blend = top + (bottom - top) * wy[r0:r1].view(1, 1, -1, 1)  # (B, K, rows, W)
        out[:, r0:r1] = labels_from_probs(blend, threshold=0.0)  # blend holds logits: > 0 is p > 0.5
    return out


def segment(
    images: ImageInput | Sequence[ImageInput],
    model: str | os.PathLike | nn.Module | SegformerPredictor = DEFAULT_MODEL,
    *,
    return_probs: bool = False,
    **options: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray] | list:
    """Segment one image (or a list) in one call: (H, W) label maps at the original size.

    ``model``: a checkpoint directory, hub id, model or a ready :class:`SegformerPredictor` (reuse one for
    many calls: building it loads the weights). ``options`` go to SegformerPredictor (device, dtype, mode,
    scales, flip, batch_size, ...). With ``return_probs`` each result is ``(labels, probs)``, probs (K, H, W).
    """
    predictor = model if isinstance(model, SegformerPredictor) else SegformerPredictor(model, **options)
    result = predictor.predict(images, return_probs=return_probs)
    pick = (lambda s: (s.labels, s.probs)) if return_probs else (lambda s: s.labels)
    return [pick(s) for s in result] if isinstance(result, list) else pick(result)


# ----------------------------------------------------------------------------------------------- folders
def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def collect_images(inputs: Sequence[str | os.PathLike], *, recursive: bool = False) -> list[tuple[Path, Path]]:
    """Files, folders and glob patterns → sorted, de-duplicated ``(path, relative output path)`` pairs.

    A file is taken whatever its name (and reported later if it is not an image). Folders give the files with
    an image extension (:data:`IMAGE_EXTENSIONS`) directly inside them, or below them with ``recursive``; the
    relative path keeps the sub-folders. Globs (``**`` allowed) are expanded here when the shell did not,
    relative to the folder before the first wildcard. A path that matches nothing is kept, so that it is
    reported as missing. Raises ValueError when nothing at all is found."""
    found: dict[Path, Path] = {}
    for item in inputs:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            for f in sorted(path.glob(pattern)):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."):
                    found.setdefault(f.resolve(), f.relative_to(path))
        elif not path.exists() and _has_magic(text):
            parts = Path(text).parts
            base = Path(*[p for p in parts[: next(i for i, p in enumerate(parts) if _has_magic(p))]] or ["."])
            for m in sorted(glob.glob(text, recursive=True)):
                f = Path(m)
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    found.setdefault(f.resolve(), f.relative_to(base) if f.is_relative_to(base) else Path(f.name))
        else:
            found.setdefault(path.resolve() if path.exists() else path, Path(path.name))
    if not found:
        raise ValueError(f"no images found in {', '.join(os.fspath(i) for i in inputs) or 'the inputs'}")
    return sorted(found.items(), key=lambda kv: str(kv[0]))


@dataclass
class ImageRecord:
    """One image of a folder run: where it came from and went, its status and its class areas."""

    image: str
    label: str | None
    status: str  # "ok", "skipped" (outputs existed) or "failed"
    width: int = 0
    height: int = 0
    pixels: list[int] = field(default_factory=list)  # (K,) pixel count per class id
    error: str | None = None
    rank: int = 0  # the torchrun rank that handled it


@dataclass
class RunReport:
    """What :func:`predict_to_folder` did: one record per input (all ranks), the output folder and files."""

    records: list[ImageRecord]
    output: Path
    class_names: list[str]

    @property
    def failures(self) -> list[ImageRecord]:
        return [r for r in self.records if r.status == "failed"]


def _output_stems(items: list[tuple[Path, Path]]) -> list[Path]:
    """Relative output stems (no suffix). Inputs that share a stem (a.jpg, a.png) keep their extension
    (a_jpg, a_png); a clash that remains is a ValueError naming both inputs."""
    plain = [rel.with_suffix("") for _, rel in items]
    counts: dict[Path, int] = {}
    for s in plain:
        counts[s] = counts.get(s, 0) + 1
    stems = [
        s if counts[s] == 1 else rel.with_name(rel.name.replace(".", "_"))
        for s, (_, rel) in zip(plain, items, strict=True)
    ]
    seen: dict[Path, Path] = {}
    reserved = {Path("summary"), Path("legend")}
    for stem, (src, _) in zip(stems, items, strict=True):
        if stem in reserved:
            raise ValueError(f"{src}: its output name would clash with the run's {stem}.* files; rename it")
        if stem in seen:
            raise ValueError(f"{seen[stem]} and {src} would both be written as {stem}.png; pass them separately")
        seen[stem] = src
    return stems


def _save(path: Path, image: Image.Image, fmt: str, **params: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **params))


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would append ".npy" to the temporary name
            np.save(fh, array)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def _read_labels(path: Path) -> np.ndarray | None:
    """A label PNG written earlier, or None if it is missing or unreadable (then it is predicted again)."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img)
    except Exception:
        return None


def _gather(records: list[tuple[int, ImageRecord]]) -> list[tuple[int, ImageRecord]]:
    """Every rank's records, on every rank (one process: unchanged)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return records
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [(i, asdict(r)) for i, r in records])
    return [(i, ImageRecord(**r)) for part in parts for i, r in part]


def predict_to_folder(
    predictor: SegformerPredictor,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    recursive: bool = False,
    alpha: float = 0.5,
    overlay_format: str = "jpg",
    side_by_side_image: bool = False,
    save_probs: bool = False,
    skip_existing: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> RunReport:
    """Segment files / folders / globs and write, per image (sub-folders mirrored under ``output``):

    - ``NAME.png``: the label map, palette PNG with pixel value = class id (16-bit grayscale PNG when the
      model has more than 256 classes);
    - ``NAME_overlay.jpg`` (or .png): the colours blended over the image with ``alpha``, RGB;
    - ``NAME_side.jpg`` with ``side_by_side_image``: image | colour map; ``NAME_probs.npy`` with
      ``save_probs``: float16 (K, H, W) probabilities;

    and for the run: ``summary.csv`` / ``summary.json`` (each image's class areas in pixels and percent,
    failures with their reason) and ``legend.png``. Every file is written atomically. With ``rank`` /
    ``world_size`` (a torchrun job) each rank takes every world_size-th image of the sorted list and rank 0
    writes the merged summary (gathered over torch.distributed, which must then be initialised).
    Returns the :class:`RunReport` of all images (on every rank)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if overlay_format not in ("jpg", "png"):
        raise ValueError(f"overlay_format must be 'jpg' or 'png', got {overlay_format!r}")
    out = Path(output)
    items = collect_images(inputs, recursive=recursive)
    stems = _output_stems(items)
    for (src, _), stem in zip(items, stems, strict=True):
        if (out / stem).with_suffix(".png").resolve() == src:
            raise ValueError(f"{src}: the label map would overwrite this input; choose another --output folder")
    out.mkdir(parents=True, exist_ok=True)
    k, names, palette = predictor.num_classes, predictor.class_names, predictor.palette

    def paths(stem: Path) -> dict[str, Path]:
        p = {"label": out / f"{stem}.png", "overlay": out / f"{stem}_overlay.{overlay_format}"}
        if side_by_side_image:
            p["side"] = out / f"{stem}_side.jpg"
        if save_probs:
            p["probs"] = out / f"{stem}_probs.npy"
        return p

    mine = [(i, items[i][0], stems[i]) for i in range(len(items)) if i % world_size == rank]
    records: list[tuple[int, ImageRecord]] = []
    todo: list[tuple[int, Path, Path]] = []
    for i, src, stem in mine:
        p = paths(stem)
        existing = _read_labels(p["label"]) if skip_existing and all(q.exists() for q in p.values()) else None
        if existing is not None:
            counts = np.bincount(existing.reshape(-1).astype(np.int64), minlength=k)[:k]
            h, w = existing.shape
            rec = ImageRecord(str(src), str(p["label"]), "skipped", w, h, counts.tolist(), rank=rank)
            records.append((i, rec))
        else:
            todo.append((i, src, stem))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="img", desc="segmenting", disable=not progress or rank != 0, file=sys.stderr)
    by_source = {src: (i, stem) for i, src, stem in todo}
    for src, image, result in predictor._iter([s for _, s, _ in todo], save_probs):
        i, stem = by_source[src]  # type: ignore[index]
        if isinstance(result, ImageError) or image is None:
            records.append((i, ImageRecord(str(src), None, "failed", error=str(result), rank=rank)))
        else:
            try:
                rec = _write_outputs(src, image, result, paths(stem), k, palette, alpha, overlay_format)
                rec.rank = rank
            except (OSError, ValueError) as exc:  # e.g. disk full: report it like a bad image and go on
                rec = ImageRecord(str(src), None, "failed", error=f"cannot write outputs: {first_line(exc)}", rank=rank)
            records.append((i, rec))
        bar.update(1)
    bar.close()

    merged = sorted(_gather(records), key=lambda t: t[0])
    report = RunReport([r for _, r in merged], out, names)
    if rank == 0:
        write_summary(report, palette)
    return report


def _write_outputs(
    src: Path,
    image: Image.Image,
    result: Segmentation,
    p: dict[str, Path],
    num_classes: int,
    palette: np.ndarray,
    alpha: float,
    overlay_format: str,
) -> ImageRecord:
    labels = result.labels
    _save(p["label"], label_image(labels, palette), "PNG")
    blend = overlay(image, labels, palette, alpha)
    if overlay_format == "jpg":
        _save(p["overlay"], blend, "JPEG", quality=92)
    else:
        _save(p["overlay"], blend, "PNG")
    if "side" in p:
        _save(p["side"], side_by_side([image, colorize(labels, palette)]), "JPEG", quality=92)
    if "probs" in p and result.probs is not None:
        _save_npy(p["probs"], result.probs.astype(np.float16))
    counts = result.areas(num_classes)
    return ImageRecord(str(src), str(p["label"]), "ok", labels.shape[1], labels.shape[0], counts.tolist())


def write_summary(report: RunReport, palette: np.ndarray) -> None:
    """``summary.csv`` (one row per image and present class; failed images one row with the error),
    ``summary.json`` (per image every present class with pixels and percent; run totals) and ``legend.png``
    (every class of the model) in ``report.output``."""
    names, out = report.class_names, report.output
    images, rows = [], []
    totals = np.zeros(len(names), np.int64)
    for r in report.records:
        entry: dict[str, Any] = {"image": r.image, "label": r.label, "status": r.status, "rank": r.rank}
        if r.status == "failed":
            entry["error"] = r.error
            rows.append([r.image, "", r.status, "", "", "", "", "", "", r.error])
        else:
            px = np.asarray(r.pixels, np.int64)
            totals[: len(px)] += px
            total = int(px.sum())
            classes = [
                {"id": c, "name": names[c], "pixels": int(px[c]), "percent": 100.0 * int(px[c]) / total}
                for c in np.flatnonzero(px).tolist()
            ]
            entry.update(width=r.width, height=r.height, classes=classes)
            for c in classes:
                rows.append([r.image, r.label, r.status, r.width, r.height, c["id"], c["name"], c["pixels"],
                             f"{c['percent']:.6f}", ""])  # fmt: skip
        images.append(entry)
    counts = {s: sum(r.status == s for r in report.records) for s in ("ok", "skipped", "failed")}
    all_px = int(totals.sum())
    summary = {
        "images": images,
        "totals": {"images": len(report.records), **counts},
        "classes": [
            {
                "id": c,
                "name": n,
                "pixels": int(totals[c]),
                "percent": 100.0 * int(totals[c]) / all_px if all_px else 0.0,
            }
            for c, n in enumerate(names)
        ],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["image", "label", "status", "width", "height", "class_id", "class_name", "pixels", "percent"]
    writer.writerow([*header, "error"])
    writer.writerows(rows)
    atomic_write_text(out / "summary.csv", buf.getvalue())
    _save(out / "legend.png", legend(names, palette), "PNG")


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "ImageRecord",
    "RunReport",
    "SegformerPredictor",
    "Segmentation",
    "collect_images",
    "load_image",
    "load_model",
    "predict_to_folder",
    "resolve_dtype",
    "segment",
    "select_device",
    "to_rgb",
    "write_summary",
]
