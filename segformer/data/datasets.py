"""Segmentation data sets on disk: a plain folder layout, ADE20K and Cityscapes, and a check of the files.

Layouts (``split`` is "train" or "val"; ADE20K's "training" / "validation" folder names work too):

- folder: ``DIR/images/SPLIT/*.{jpg,png,...}`` and ``DIR/annotations/SPLIT/*.png`` paired by file stem, and
  ``DIR/labels.json`` = id2label (``{"0": "background", ...}`` or a list of names). Mask pixels are class ids;
  255 is ignored.
- ade20k: ``ADEChallengeData2016/{images,annotations}/{training,validation}``; 150 classes, labels reduced
  (0 "other" → 255 ignored, k → k - 1).
- cityscapes: ``leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` and ``gtFine/SPLIT/CITY/*_gtFine_labelTrainIds.png``
  (19 classes + 255; make the labelTrainIds files with cityscapesscripts' createTrainIdLabelImgs).

A data set yields ``(pixel_values (3, H, W) float32, labels (H, W) int64)``. Indexing with an ``(index, seed)``
pair seeds the random augmentation of that sample, which makes augmentation a function of the sample's
position in the training stream (see :class:`segformer.train.StreamSampler`) and so reproducible across
resumes, data-loader workers and process counts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import IMAGE_EXTENSIONS, open_image, to_rgb
from ..labels import ADE20K_CLASSES, CITYSCAPES_CLASSES, reduce_labels
from .transforms import eval_transform

SPLIT_ALIASES = (("train", "training"), ("val", "validation"), ("test", "testing"))
KINDS = ("folder", "ade20k", "cityscapes")


# ------------------------------------------------------------------------------------------- listing
@dataclass
class Listing:
    """Image/mask pairs found for one split, and the files that found no partner."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_masks: list[Path] = field(default_factory=list)


def _split_dir(parent: Path, split: str) -> Path:
    """``parent/split`` or its alias (train ↔ training, val ↔ validation)."""
    names = next((group for group in SPLIT_ALIASES if split in group), (split,))
    for name in names:
        if (parent / name).is_dir():
            return parent / name
    names = " or ".join(str(parent / n) for n in names)
    raise ValueError(f"no {split} split: {names} does not exist")


def _pair_by_key(images: dict[str, Path], masks: dict[str, Path]) -> Listing:
    listing = Listing()
    for key in sorted(images):
        if key in masks:
            listing.pairs.append((images[key], masks[key]))
        else:
            listing.unpaired_images.append(images[key])
    listing.unpaired_masks = [masks[k] for k in sorted(masks) if k not in images]
    return listing


def _files(root: Path, suffixes: tuple[str, ...], recursive: bool = False) -> list[Path]:
    it = root.rglob("*") if recursive else root.iterdir()
    return sorted(p for p in it if p.is_file() and p.name.lower().endswith(suffixes) and not p.name.startswith("."))


def list_folder(root: str | os.PathLike, split: str) -> Listing:
    """Pairs of the folder layout (and ADE20K's): images/SPLIT/X.* with annotations/SPLIT/X.png."""
    root = Path(root)
    image_dir, mask_dir = _split_dir(root / "images", split), _split_dir(root / "annotations", split)
    images: dict[str, Path] = {}
    for p in _files(image_dir, IMAGE_EXTENSIONS):
        if p.stem in images:
            raise ValueError(f"{p}: two images share the stem {p.stem!r} ({images[p.stem].name})")
        images[p.stem] = p
    masks = {p.stem: p for p in _files(mask_dir, (".png",))}
    return _pair_by_key(images, masks)


def list_cityscapes(root: str | os.PathLike, split: str) -> Listing:
    """Pairs of leftImg8bit/SPLIT/CITY/X_leftImg8bit.png with gtFine/SPLIT/CITY/X_gtFine_labelTrainIds.png."""
    root = Path(root)
    image_dir, mask_dir = _split_dir(root / "leftImg8bit", split), _split_dir(root / "gtFine", split)
    images = {
        str(p.relative_to(image_dir)).removesuffix("_leftImg8bit.png"): p
        for p in _files(image_dir, ("_leftimg8bit.png",), recursive=True)
    }
    masks = {
        str(p.relative_to(mask_dir)).removesuffix("_gtFine_labelTrainIds.png"): p
        for p in _files(mask_dir, ("_gtfine_labeltrainids.png",), recursive=True)
    }
    if images and not masks:
        raise ValueError(
            f"{mask_dir}: no *_gtFine_labelTrainIds.png files (create them with cityscapesscripts' "
            "createTrainIdLabelImgs)"
        )
    return _pair_by_key(images, masks)


def read_labels_json(path: str | os.PathLike) -> dict[int, str]:
    """id2label from ``labels.json``: ``{"0": "sky", ...}``, ``{"id2label": {...}}`` or ``["sky", ...]``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (the folder layout needs labels.json holding id2label)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if isinstance(data, Mapping) and "id2label" in data:
        data = data["id2label"]
    if isinstance(data, list):
        data = dict(enumerate(data))
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{path}: expected id2label as a non-empty object or list of class names")
    try:
        id2label = {int(k): str(v) for k, v in data.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{path}: id2label keys must be integer class ids") from None
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"{path}: class ids must be 0..{len(id2label) - 1} without gaps, got {sorted(id2label)}")
    return id2label


def detect_kind(root: str | os.PathLike) -> str:
    """ "cityscapes" when ``root`` has leftImg8bit/ and gtFine/, "ade20k" for ADEChallengeData2016 (no
    labels.json, training/validation folders), else "folder"."""
    root = Path(root)
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if not (root / "labels.json").exists() and (root / "images" / "training").is_dir():
        return "ade20k"
    return "folder"


# ------------------------------------------------------------------------------------------- data set
def load_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB, as stored (no EXIF rotation: masks are drawn on the stored pixels), through the one
    input layer's mode rules (:func:`segformer.images.to_rgb`); no pixel limit (training data is trusted)."""
    with open_image(path, max_pixels=None) as im:
        return np.asarray(to_rgb(im))


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """(H, W) class ids as stored (P or L PNGs hold ids, not colours); uint8, or int32 for 16-bit PNGs."""
    with Image.open(path) as im:
        if im.mode in ("P", "L", "1"):
            return np.asarray(im if im.mode != "1" else im.convert("L"), dtype=np.uint8)
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.int32)
        raise ValueError(f"{path}: a mask must be a one-band PNG of class ids, got mode {im.mode}")


Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/mask pairs with a paired transform; ``dataset[i]`` or ``dataset[(i, seed)]`` →
    ``(pixel_values (3, H, W) float32, labels (H, W) int64)``.

    ``pairs``: (image path, mask path); ``id2label``: class names; ``reduce_labels``: ADE20K's 0 → ignore,
    k → k - 1; ``transform``: a paired transform ``(image, mask, rng) → tensors`` (default: normalise only).
    Without a seed, sample i is augmented with seed i.
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        id2label: Mapping[int, str],
        *,
        transform: Transform | None = None,
        reduce_labels: bool = False,
        ignore_index: int = 255,
        name: str = "dataset",
    ):
        self.pairs = list(pairs)
        self.id2label = dict(id2label)
        self.transform = transform or eval_transform()
        self.reduce_labels = reduce_labels
        self.ignore_index = ignore_index
        self.name = name

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw (image uint8 (H, W, 3), mask (H, W) ids after label reduction) of sample ``index``."""
        image_path, mask_path = self.pairs[index]
        image, mask = load_image(image_path), load_mask(mask_path)
        if self.reduce_labels:
            mask = reduce_labels(mask, self.ignore_index)
        return image, mask

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        image, mask = self.read(index)
        return self.transform(image, mask, np.random.default_rng(seed))

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.name}, {len(self)} images, {self.num_labels} classes)"


def build_dataset(
    root: str | os.PathLike,
    split: str = "train",
    *,
    kind: str = "auto",
    transform: Transform | None = None,
    ignore_index: int = 255,
) -> tuple[SegmentationDataset, Listing]:
    """The data set of one split of ``root`` and its listing (whose unpaired files
    :func:`check_dataset` reports). ``kind``: "folder", "ade20k", "cityscapes" or "auto" (:func:`detect_kind`)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such data directory")
    if kind == "auto":
        kind = detect_kind(root)
    if kind == "folder":
        listing, id2label, reduce = list_folder(root, split), read_labels_json(root / "labels.json"), False
    elif kind == "ade20k":
        listing, id2label, reduce = list_folder(root, split), dict(enumerate(ADE20K_CLASSES)), True
    elif kind == "cityscapes":
        listing, id2label, reduce = list_cityscapes(root, split), dict(enumerate(CITYSCAPES_CLASSES)), False
    else:
        raise ValueError(f"dataset kind must be one of auto, {', '.join(KINDS)}, got {kind!r}")
    if not listing.pairs:
        raise ValueError(f"{root}: no image/mask pairs in the {split} split of this {kind} layout")
    dataset = SegmentationDataset(
        listing.pairs, id2label, transform=transform, reduce_labels=reduce, ignore_index=ignore_index,
        name=f"{kind}:{root}:{split}",
    )  # fmt: skip
    return dataset, listing


# ------------------------------------------------------------------------------------------- checking
@dataclass
class DatasetReport:
    """Problems found by :func:`check_dataset`, one line each, naming the file."""

    num_pairs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, limit: int = 50) -> str:
        lines = [f"{len(self.problems)} problem(s) in {self.num_pairs} image/mask pairs:"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def _check_pair(dataset: SegmentationDataset, index: int, check_values: bool) -> list[str]:
    image_path, mask_path = dataset.pairs[index]
    problems = []
    try:
        with Image.open(image_path) as im:
            image_size = im.size
            im.verify() if not check_values else im.load()
    except Exception as exc:
        problems.append(f"{image_path}: unreadable image ({str(exc).strip() or type(exc).__name__})")
        image_size = None
    try:
        with Image.open(mask_path) as im:
            mask_size = im.size
        if check_values:
            mask = load_mask(mask_path)
            if dataset.reduce_labels:
                mask = reduce_labels(mask, dataset.ignore_index)
            values = np.unique(mask)
            bad = values[(values != dataset.ignore_index) & ((values < 0) | (values >= dataset.num_labels))]
            if len(bad):
                shown = ", ".join(str(int(v)) for v in bad[:8])
                problems.append(
                    f"{mask_path}: label value(s) {shown} outside 0..{dataset.num_labels - 1} "
                    f"(and not the ignore index {dataset.ignore_index})"
                )
    except Exception as exc:
        problems.append(f"{mask_path}: unreadable mask ({str(exc).strip() or type(exc).__name__})")
        mask_size = None
    if image_size and mask_size and image_size != mask_size:
        problems.append(
            f"{image_path}: image is {image_size[0]}x{image_size[1]} but its mask {mask_path.name} is "
            f"{mask_size[0]}x{mask_size[1]}"
        )
    return problems


def check_dataset(
    dataset: SegmentationDataset,
    listing: Listing | None = None,
    *,
    check_values: bool = True,
    num_threads: int = 8,
) -> DatasetReport:
    """Open every pair before training: unpaired files, unreadable files, image/mask size mismatches and mask
    values ≥ num_labels (other than the ignore index) are reported with their file names. With
    ``check_values=False`` only headers are read (fast, but label values and truncated files go unchecked)."""
    report = DatasetReport(num_pairs=len(dataset))
    if listing is not None:
        report.problems += [f"{p}: image without a mask" for p in listing.unpaired_images]
        report.problems += [f"{p}: mask without an image" for p in listing.unpaired_masks]
    # PIL decoding releases the GIL: threads make the check of a large set I/O-bound, not CPU-bound.
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for problems in pool.map(lambda i: _check_pair(dataset, i, check_values), range(len(dataset))):
            report.problems += problems
    return report


__all__ = [
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "KINDS",
    "DatasetReport",
    "Listing",
    "SegmentationDataset",
    "build_dataset",
    "check_dataset",
    "detect_kind",
    "list_cityscapes",
    "list_folder",
    "load_image",
    "load_mask",
    "read_labels_json",
    "reduce_labels",
]
