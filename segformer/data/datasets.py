"""Segmentation data sets on disk: a plain folder layout, ADE20K and Cityscapes, and a check of the files.

Layouts (``split`` is "train", "val" or "test"; the folder names "training" / "validation" / "testing" work too):

- folder: ``DIR/images/SPLIT/**/*.{jpg,png,...}`` and ``DIR/annotations/SPLIT/**/*.png`` (or ``DIR/masks/``
  where annotations/ has no split folders) paired by their path below SPLIT without the extension (sub-folders
  included), and
  ``DIR/labels.json`` = id2label (``{"0": "background", ...}`` or a list of names). Mask pixels are class ids;
  255 means "unlabelled" and is ignored by the loss and the metrics (unless a "map" sends it to a class).
  ``labels.json`` may also be an object ``{"id2label": ..., "ignore_index": 11, "map": {"12": 3, "13": 255},
  "palette": {"0": [128, 64, 128], ...}, "reduce_labels": false, "class_weights": [...]}``: another "unlabelled"
  value, a value → class mapping, colour-coded RGB masks (the colour of each class, as annotation tools export
  them), ADE20K's label reduction and per-class loss weights (see :class:`LabelSpec`).
- ade20k: ``ADEChallengeData2016/{images,annotations}/{training,validation}``; 150 classes, labels reduced
  (0 "other" → 255 ignored, k → k - 1).
- cityscapes: ``leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` and ``gtFine/SPLIT/CITY/*_gtFine_labelTrainIds.png``
  (19 classes + 255; make the labelTrainIds files with cityscapesscripts' createTrainIdLabelImgs).

A data set yields ``(pixel_values (3, H, W) float32, labels (H, W) int64)``. Indexing with an ``(index, seed)``
pair seeds the random augmentation of that sample, which makes augmentation a function of the sample's
position in the training stream (see :class:`segformer.train_state.StreamSampler`) and so reproducible across
resumes, data-loader workers and process counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..hub import first_line
from ..images import IMAGE_EXTENSIONS, open_image, to_rgb
from ..labels import ADE20K_CLASSES, CITYSCAPES_CLASSES, reduce_labels
from .transforms import eval_transform

SPLIT_ALIASES = (("train", "training"), ("val", "validation"), ("test", "testing"))
KINDS = ("folder", "ade20k", "cityscapes", "hf")
_LOSSY = (".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".heic", ".heif", ".avif")  # (a WebP may be lossless: rare)


# ------------------------------------------------------------------------------------------- listing
@dataclass
class Listing:
    """Image/mask pairs found for one split, the files that found no partner, and the masks that are not PNG
    (never paired: a lossy format such as JPEG changes label values at every class border)."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_masks: list[Path] = field(default_factory=list)
    not_png_masks: list[Path] = field(default_factory=list)
    # the folder layout's image and mask folders of the split (None: another layout), for no_pairs_hint
    folders: tuple[Path, Path] | None = None

    def no_pairs_hint(self) -> str:
        """Why a split without pairs has none, when the listing can tell: '' or '; ' and the reason."""
        if self.not_png_masks:
            return f"; its masks are {self.not_png_masks[0].suffix} files ({self.not_png_masks[0]}): masks must be PNG"
        if self.folders is None:
            return ""
        image_dir, mask_dir = self.folders
        if self.unpaired_images and self.unpaired_masks:  # (img_001.jpg with img_001_mask.png: said nothing)
            image = self.unpaired_images[0]
            expected = mask_dir / image.relative_to(image_dir).with_suffix(".png")
            case = next((m for m in self.unpaired_masks if str(m).lower() == str(expected).lower()), None)
            found = (
                f"{case}: names differ in case alone" if case is not None else f"found e.g. {self.unpaired_masks[0]}"
            )
            return (
                f"; its {len(self.unpaired_images)} image(s) and {len(self.unpaired_masks)} mask(s) share no name: "
                f"a mask has its image's path and name with .png ({image} pairs with {expected}; {found})"
            )
        if self.unpaired_images:
            return f"; {mask_dir} holds no PNG masks"
        if self.unpaired_masks:
            return f"; {image_dir} holds no images"
        return f"; {image_dir} and {mask_dir} are empty"


class MissingSplitError(ValueError):
    """The data set has no such split (a training run then goes without evaluation); any other problem of a split
    that is there is a plain ValueError."""


def _aliases(split: str) -> tuple[str, ...]:
    """The folder names of ``split``: itself and its alias (train ↔ training, val ↔ validation, test ↔ testing)."""
    return next((group for group in SPLIT_ALIASES if split in group), (split,))


def _layout_hint(root: Path, split: str) -> str:
    """What a folder without images/SPLIT holds instead, where it is a common other layout: images directly in
    images/, or SPLIT/images (the split folders on top): said with the layout asked for (audit: a bare "no train
    split" for both)."""
    wanted = f"the folder layout is {root / 'images' / split}/ with {root / 'annotations' / split}/"
    flat = root / "images"
    if flat.is_dir():
        count = sum(1 for p in flat.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if count:
            return f" ({flat} holds {count} image(s) directly: {wanted}, one folder per split)"
    on_top = next((root / n / "images" for n in _aliases(split) if (root / n / "images").is_dir()), None)
    if on_top is not None:
        return f" (found {on_top}: {wanted})"
    return ""


def _mask_folder(root: Path) -> str:
    """annotations (ADE20K's name), or masks where a data set has that folder and annotations/ has no split
    folders (a common name: the check said "annotations/train does not exist" beside masks/train: audit; a COCO
    annotations/ of JSON files may sit beside it)."""
    splits = [name for group in SPLIT_ALIASES for name in group]
    annotated = any((root / "annotations" / name).is_dir() for name in splits)
    return "masks" if not annotated and (root / "masks").is_dir() else "annotations"


def _split_dir(parent: Path, split: str) -> Path:
    """``parent/split`` or its alias (train ↔ training, val ↔ validation)."""
    names = _aliases(split)
    for name in names:
        if (parent / name).is_dir():
            return parent / name
    names = " or ".join(str(parent / n) for n in names)
    raise MissingSplitError(f"no {split} split: {names} does not exist")


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
    """The files under ``root`` with one of ``suffixes``, hidden ones left out. A broken symbolic link is kept:
    the data check then names it as unreadable, where leaving it out made its partner look unpaired."""
    it = _walk_files(root) if recursive else root.iterdir()
    return sorted(
        p
        for p in it
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and p.name.lower().endswith(suffixes)
        and not p.name.startswith(".")
    )


def _walk_files(root: Path) -> Iterator[Path]:
    """Every entry below ``root`` that is not a folder, through linked subfolders too (rglob leaves them out on
    Python < 3.13: a linked subfolder's pairs were dropped without a word, audit); a folder reached twice, by a
    link or a loop, is walked once."""
    seen: set[str] = set()
    for top, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield from (Path(top, name) for name in files)


def list_folder(root: str | os.PathLike, split: str) -> Listing:
    """Pairs of the folder layout (and ADE20K's): images/SPLIT/X.* with annotations/SPLIT/X.png (masks/SPLIT where
    annotations/ has no split folders: :func:`_mask_folder`), also in subfolders (images/SPLIT/SUB/X.* with
    annotations/SPLIT/SUB/X.png)."""
    root = Path(root)
    try:
        image_dir = _split_dir(root / "images", split)
    except MissingSplitError as exc:
        raise MissingSplitError(f"{exc}{_layout_hint(root, split)}") from None
    try:
        mask_dir = _split_dir(root / _mask_folder(root), split)
    except MissingSplitError as exc:  # (half a split is a broken one, not a missing one: training went on without
        missing = str(exc).split(": ", 1)[1]  # eval; and removing the training split is no advice: audit)
        other = "" if split in _aliases("train") else f", or remove {image_dir.name}/ to go without this split"
        raise ValueError(f"{image_dir} is there but {missing}: add its masks{other}") from None
    images: dict[str, Path] = {}
    for p in _files(image_dir, IMAGE_EXTENSIONS, recursive=True):
        key = p.relative_to(image_dir).with_suffix("").as_posix()
        if key in images:
            raise ValueError(f"{p}: two images share the stem {p.stem!r} ({images[key].name})")
        images[key] = p
    masks, not_png = {}, []
    for p in _files(mask_dir, IMAGE_EXTENSIONS, recursive=True):  # (one walk: PNG masks pair, others are named)
        if p.suffix.lower() == ".png":
            masks[p.relative_to(mask_dir).with_suffix("").as_posix()] = p
        else:
            not_png.append(p)
    listing = _pair_by_key(images, masks)
    listing.not_png_masks = not_png
    listing.folders = (image_dir, mask_dir)
    return listing


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


IGNORE_INDEX = 255  # the value of an ignored pixel inside the library: loss, metrics, padding


@dataclass(frozen=True)
class LabelSpec:
    """How a data set's mask values become training ids (0..K-1, or :data:`IGNORE_INDEX`).

    ``id2label``: the classes. ``ignore_values``: stored values meaning "unlabelled" (255, unless ``value_map``
    sends it to a class). ``value_map``: stored value → class id (or 255), for data sets whose values are not
    0..K-1 (``{255: 1}``: binary masks saved as 0/255). ``palette``:
    RGB colour → class id for colour-coded masks. ``reduce_labels``: ADE20K's 0 ("other") → ignored, k → k - 1
    (applied to the stored values before ``value_map``). ``class_weights``: optional loss weight per class.
    """

    id2label: dict[int, str]
    ignore_values: tuple[int, ...] = (IGNORE_INDEX,)
    value_map: dict[int, int] = field(default_factory=dict)
    palette: dict[tuple[int, int, int], int] | None = None
    reduce_labels: bool = False
    class_weights: tuple[float, ...] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def to_train_ids(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) stored values (or (H, W, 3) colours with a palette) → (H, W) int64 training ids; values that
        no rule covers are kept as they are, for :func:`check_dataset` to report."""
        if mask.ndim == 3:
            mask = self.colours_to_ids(mask)
        stored = values = mask.astype(np.int64)
        if self.reduce_labels:
            values = reduce_labels(values, IGNORE_INDEX)
            above = stored > IGNORE_INDEX  # (no class: kept as stored for the check to report, as without the
            if above.any():  # reduction; 256 became 255, the ignore value, and vanished unreported: audit)
                values[above] = stored[above]
        if not self.value_map and self.ignore_values == (IGNORE_INDEX,):
            return values
        out = values.copy()
        for value, target in self.value_map.items():  # stored values, as ignore_index's (README): with the
            out[stored == value] = target  # reduction on, the keys were the reduced ones, without a word (audit)
        for value in self.ignore_values:  # stored values, whatever the reduction made of them
            out[stored == value] = IGNORE_INDEX
        return out

    def colours_to_ids(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 colours → (H, W) ids by the palette; a colour not in it becomes -1 (reported by the
        data check, ignored if it ever reaches the loss)."""
        if self.palette is None:
            raise ValueError('an RGB mask needs a "palette" in labels.json (class id → [r, g, b])')
        keys = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        out = np.full(keys.shape, -1, np.int64)
        for (r, g, b), class_id in self.palette.items():
            out[keys == ((r << 16) | (g << 8) | b)] = class_id
        return out

    def describe(self) -> dict:
        """The JSON-able summary stored with a run (``train_config.json``: a resume on other rules is refused)."""
        return {
            "num_labels": self.num_labels,
            "id2label": {str(k): v for k, v in sorted(self.id2label.items())},
            "ignore_values": list(self.ignore_values),
            "value_map": {str(k): v for k, v in self.value_map.items()},
            "palette": None if self.palette is None else {str(v): list(k) for k, v in self.palette.items()},
            "reduce_labels": self.reduce_labels,
            "class_weights": None if self.class_weights is None else list(self.class_weights),
        }


def _int_keys(data: object, path: Path, what: str) -> dict[int, object]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: {what} must be an object keyed by integers")
    try:
        return {int(k): v for k, v in data.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {what} keys must be integers, got {sorted(map(str, data))[:5]}") from None


def check_ignore_values(ignores: Iterable[int], id2label: Mapping[int, str], reduce_labels: bool, remedy: str) -> None:
    """A ValueError when a stored value meant as "unlabelled" is also a class's stored value (with the
    reduction, stored value k is class k - 1): its pixels would be ignored, and the class never trained or
    scored. ``remedy`` ends the message (how this data set's classes could be changed instead)."""
    num = len(id2label)
    for value in sorted(ignores):
        class_id = value - 1 if reduce_labels else value
        if 0 <= class_id < num and value != IGNORE_INDEX:
            stored = f"1..{num}" if reduce_labels else f"0..{num - 1}"
            raise ValueError(
                f"ignore index {value} is also the class {id2label[class_id]!r}: give unlabelled pixels a value "
                f"outside {stored}, {remedy}"
            )


# the keys of a labels.json object besides id2label
_SPEC_KEYS = frozenset({"id2label", "ignore_index", "map", "palette", "reduce_labels", "class_weights"})


def read_label_spec(
    path: str | os.PathLike, *, ignore_index: int | None = None, reduce: bool | None = None, text: str | None = None
) -> LabelSpec:
    """The :class:`LabelSpec` of ``labels.json``: ``{"0": "sky", ...}``, ``["sky", ...]``, or an object with
    ``id2label`` and optional ``ignore_index`` (int or list), ``map``, ``palette``, ``reduce_labels``,
    ``class_weights``. ``ignore_index`` / ``reduce`` (the command-line options) override the file. ``text``:
    the file's content, read from elsewhere (an ONNX file's metadata); ``path`` then only names it."""
    path = Path(path)

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:  # (json keeps the last silently: the class names shifted)
            raise ValueError(f"{path}: the key {twice[0]!r} appears twice in one object")
        return dict(pairs)

    try:  # (utf-8-sig: a byte-order mark, which Windows editors write, is read past)
        content = path.read_text(encoding="utf-8-sig") if text is None else text.removeprefix("\ufeff")
        data = json.loads(content, object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (the folder layout needs labels.json holding id2label)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON in UTF-8 ({first_line(exc)})") from None
    extra: Mapping = {}
    if isinstance(data, Mapping) and "id2label" in data:
        extra, data = data, data["id2label"]
        unknown = sorted(set(extra) - _SPEC_KEYS)
        if unknown:
            raise ValueError(
                f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(_SPEC_KEYS))}"
            )
    if isinstance(data, list):
        data = dict(enumerate(data))
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{path}: expected id2label as a non-empty object or list of class names")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()) and not all(
        str(k).lstrip("-").isdigit() for k in data
    ):  # ({"road": 0, ...}: label2id's shape, which the key error did not tell)
        raise ValueError(f'{path}: this looks like label2id (names to ids); give id2label, ids to names {{"0": "..."}}')
    raw = _int_keys(data, path, "id2label")
    unnamed = sorted(k for k, v in raw.items() if not isinstance(v, (str, int, float)) or isinstance(v, bool))
    if unnamed:
        raise ValueError(f"{path}: class {unnamed[0]} has no name ({raw[unnamed[0]]!r}); give every class a name")
    id2label = {k: str(v) for k, v in raw.items()}
    named: dict[str, int] = {}
    for class_id in sorted(id2label):
        name = id2label[class_id]
        if name in named:  # (a checkpoint's label2id keeps one of them; metrics would need ids to tell them apart)
            raise ValueError(
                f"{path}: classes {named[name]} and {class_id} are both named {name!r}; name each class once"
            )
        named[name] = class_id
    num = len(id2label)
    if sorted(id2label) != list(range(num)):
        void = f" ({IGNORE_INDEX} means unlabelled without a name: leave it out)" if IGNORE_INDEX in id2label else ""
        raise ValueError(f"{path}: class ids must be 0..{num - 1} without gaps, got {sorted(id2label)}{void}")
    if num > IGNORE_INDEX:
        raise ValueError(f"{path}: {num} classes; at most {IGNORE_INDEX} (the value {IGNORE_INDEX} means ignored)")

    stored_ignore = extra.get("ignore_index", [])
    ignores = {IGNORE_INDEX, *(stored_ignore if isinstance(stored_ignore, list) else [stored_ignore])}
    if ignore_index is not None:
        ignores.add(ignore_index)
    stored_reduce = extra.get("reduce_labels", False)
    if not isinstance(stored_reduce, bool):  # ("false" is a non-empty string: true to bool())
        raise ValueError(f"{path}: reduce_labels must be true or false, got {stored_reduce!r}")
    reduce_labels = stored_reduce if reduce is None else reduce
    for value in ignores:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{path}: ignore_index must be a non-negative integer, got {value!r}")
    check_ignore_values(ignores, id2label, reduce_labels, f'or map it with "map" in {path}')
    value_map = {}
    for value, target in _int_keys(extra.get("map", {}), path, '"map"').items():
        if not isinstance(target, int) or not (0 <= target < num or target == IGNORE_INDEX):
            raise ValueError(f'{path}: "map" sends {value} to {target!r}; targets are 0..{num - 1} or 255')
        value_map[value] = target
    contradicting = sorted(v for v, t in value_map.items() if v in ignores and v != IGNORE_INDEX and t != IGNORE_INDEX)
    if contradicting:  # (the ignore rule won without a word: the class lost those pixels)
        v = contradicting[0]
        raise ValueError(
            f'{path}: {v} is both ignored (ignore_index) and mapped to class {value_map[v]} ("map"); choose one'
        )
    if value_map.get(IGNORE_INDEX, IGNORE_INDEX) != IGNORE_INDEX:  # "map": {"255": 1}: 255 is a class here
        if reduce_labels:
            raise ValueError(f'{path}: "map" sends 255 to a class, but reduce_labels makes 255 of every stored 0')
        ignores.discard(IGNORE_INDEX)  # (0/255 binary masks: the object, saved as 255, becomes class 1)
    palette = None
    if "palette" in extra:
        raw = extra["palette"]
        items = dict(enumerate(raw)) if isinstance(raw, list) else _int_keys(raw, path, '"palette"')
        palette = {}
        for class_id, colour in items.items():
            if class_id not in id2label and class_id != IGNORE_INDEX:
                raise ValueError(f'{path}: "palette" names class {class_id}, not one of 0..{num - 1} (or 255)')
            ok = isinstance(colour, list) and len(colour) == 3 and all(isinstance(c, int) for c in colour)
            if not ok or not all(0 <= c <= 255 for c in colour):
                raise ValueError(f'{path}: "palette" colour of class {class_id} must be [r, g, b] in 0..255')
            if tuple(colour) in palette:
                raise ValueError(f'{path}: "palette" gives classes {palette[tuple(colour)]} and {class_id} one colour')
            palette[tuple(colour)] = class_id
    if palette is not None and reduce_labels:  # (red, class 0, became ignored and green class 0: audit)
        given = "--reduce-labels" if reduce else '"reduce_labels": true'
        raise ValueError(f'{path}: its "palette" gives the class ids as they are; {given} would shift them: drop it')
    weights = extra.get("class_weights")
    if weights is not None:
        ok = isinstance(weights, list) and len(weights) == num
        if not ok or not all(isinstance(w, (int, float)) and w >= 0 for w in weights) or not any(weights):
            raise ValueError(f'{path}: "class_weights" must be {num} non-negative numbers, one per class, not all zero')
        weights = tuple(float(w) for w in weights)
    return LabelSpec(id2label, tuple(sorted(ignores)), value_map, palette, reduce_labels, weights)


def read_labels_json(path: str | os.PathLike) -> dict[int, str]:
    """id2label from ``labels.json`` (see :func:`read_label_spec` for the rest of the file)."""
    return read_label_spec(path).id2label


# ------------------------------------------------------------------------------------------- data set
# EXIF orientations whose upright picture swaps width and height, and the turn that makes it upright
_TRANSPOSING = {
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_orientation(path: Path) -> int | None:
    """The EXIF orientation tag of an image file (None without one, or with a broken EXIF block)."""
    try:
        with Image.open(path) as image:
            return image.getexif().get(0x0112)
    except Exception:
        return None


def _size_mismatch(image: object, image_size: tuple[int, int], mask: object, mask_size: tuple[int, int]) -> str:
    """The line naming an image and its mask of another size ((width, height) each)."""
    return f"{image}: image is {image_size[0]}x{image_size[1]} but its mask {mask} is {mask_size[0]}x{mask_size[1]}"


def _orientation(exif: bytes | None) -> int:
    """The EXIF orientation tag of raw EXIF bytes (1, upright, where there is none or it cannot be read)."""
    if not exif:
        return 1
    try:
        tags = Image.Exif()
        tags.load(exif)
        value = tags.get(0x0112, 1)
        return value if isinstance(value, int) else 1
    except Exception:
        return 1


def leave_stops_to_the_main_process(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores a SIGTERM that does not come from its main process.
    Slurm, docker stop and systemd signal every process of a job; a worker that died of it made the main process's
    clean stop end in "DataLoader worker is killed by signal: Terminated" and a traceback (audit). The main process
    stops, then shuts its workers down (and a worker whose main process is gone exits by itself). A SIGTERM from
    the main process itself (DataLoader's last resort at shutdown, multiprocessing's at interpreter exit) ends the
    worker: ignoring that one too left the main process waiting for its workers forever after an error (audit:
    a loader whose iterator was freed by the garbage collector never told its workers to stop). Where the
    sender cannot be known (no ``signal.sigwaitinfo``: macOS, Windows), every SIGTERM is ignored.

    A main process that stops while it takes a batch's shared memory from the worker leaves the worker's sharing
    thread (multiprocessing's resource sharer) with a reset connection: that thread's error is the stop, not a
    fault, and is not printed (it followed the clean stop message with a 20-line traceback, once in a while)."""
    import signal
    import threading

    # Ctrl-C reaches every process in the terminal's group: the main process decides (it stops after the current
    # step, or at once on a second one: segformer.train_state.StopRequests) and then shuts its workers down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
        # SIGTERM blocked in this thread and the threads it starts, taken by one thread that reads its sender
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_end_on_the_main_process_sigterm, name="sigterm", daemon=True).start()
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    previous = threading.excepthook

    def quiet_about_a_gone_reader(args: Any) -> None:
        thread = getattr(args, "thread", None)
        if issubclass(args.exc_type, ConnectionError) and thread is not None and "_serve" in thread.name:
            return
        previous(args)

    threading.excepthook = quiet_about_a_gone_reader


@contextlib.contextmanager
def workers_stopped_on_error(batches: Iterator[Any]) -> Iterator[Iterator[Any]]:
    """Yields ``batches`` (a DataLoader's iterator); where an error leaves the block, the iterator's workers are
    told to stop there and then. Left to the garbage collector (the error's traceback holds the iterator in a
    cycle), they were told after their queues had closed: each waited out DataLoader's join timeout (5 s)."""
    try:
        yield batches
    except BaseException:
        shutdown = getattr(batches, "_shutdown_workers", None)  # (a single-process iterator has none)
        if shutdown is not None:
            shutdown()
        raise


def _end_on_the_main_process_sigterm() -> None:
    """(A worker's thread, :func:`leave_stops_to_the_main_process`) Waits for SIGTERM: from the process that
    started the worker, the worker ends at once; from anyone else, nothing happens."""
    import multiprocessing
    import signal

    parent = multiprocessing.parent_process()
    main_pid = parent.pid if parent is not None else os.getppid()
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == main_pid:
            os._exit(0)  # (its main process is stopping it: nothing of the worker's is left to save)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB, as stored (no EXIF rotation: masks are drawn on the stored pixels), through the one
    input layer's mode rules (:func:`segformer.images.to_rgb`); no pixel limit (training data is trusted)."""
    with open_image(path, max_pixels=None) as im:
        return np.asarray(to_rgb(im))


def upright_turn(path: Path, image_size: tuple[int, int], mask_size: tuple[int, int]) -> Image.Transpose | None:
    """The turn that shows the image at ``path`` upright where its EXIF orientation swaps width and height and the
    mask (``mask_size``, (width, height)) has the upright size but not the stored one (``image_size``): a mask
    drawn on the upright picture, as browser-based annotation tools show a phone photo. None otherwise (the
    image is read as stored)."""
    if image_size == mask_size or image_size[::-1] != mask_size:
        return None
    return _TRANSPOSING.get(_exif_orientation(path))


def load_mask(path: str | os.PathLike, *, colours: bool = False) -> np.ndarray:
    """(H, W) values as stored (P or L PNGs hold ids, not colours); uint8, or int32 for 16-bit PNGs. With
    ``colours`` (a palette in labels.json), RGB / RGBA masks come back as (H, W, 3) uint8 colours."""
    with Image.open(path) as im:
        return mask_values(im, colours=colours, where=str(path))


def mask_values(im: Image.Image, *, colours: bool = False, where: str = "mask") -> np.ndarray:
    """A mask image → (H, W) values as stored (uint8, or int32 for 16-bit modes; an RGB image whose three
    channels are equal gives one of them; an alpha band is dropped), or with ``colours`` and an RGB / RGBA / P /
    PA / LA image, (H, W, 3) uint8 colours; any other mode is a ValueError naming ``where``."""
    if colours and im.mode in ("RGB", "RGBA", "P", "PA", "LA"):
        return np.asarray(im.convert("RGB"))
    if im.mode in ("P", "L", "1"):  # (a 1-bit mask holds ids 0 and 1; convert("L") would make the 1s 255)
        return np.asarray(im, dtype=np.uint8)
    if im.mode in ("LA", "PA"):  # gray or palette with an alpha band (GIMP saves so): the ids, alpha dropped as
        return np.asarray(im.getchannel(0), dtype=np.uint8)  # RGBA's is (refused: audit)
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        return np.asarray(im, dtype=np.int32)
    if im.mode in ("RGB", "RGBA"):  # a one-band mask saved as RGB (cv2.imwrite of a gray array): its values
        rgb = np.asarray(im.convert("RGB"))  # (it was refused with advice to add a palette: audit)
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return np.ascontiguousarray(rgb[..., 0])
    hint = ' (colour-coded masks need a "palette" in labels.json)' if im.mode in ("RGB", "RGBA") else ""
    raise ValueError(f"{where}: a mask must be a one-band image of class ids, got mode {im.mode}{hint}")


Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/mask pairs with a paired transform; ``dataset[i]`` or ``dataset[(i, seed)]`` →
    ``(pixel_values (3, H, W) float32, labels (H, W) int64)``.

    ``pairs``: (image path, mask path); ``labels``: a :class:`LabelSpec` (or plain id2label); ``transform``: a
    paired transform ``(image, mask, rng) → tensors`` (default: normalise only). ``dataset[(i, seed)]`` is
    reproducible; ``dataset[i]`` is augmented anew at every access, from ``torch.initial_seed()`` (which a
    DataLoader sets per worker and epoch, per worker once with persistent workers, ``torch.manual_seed`` in the
    main process), i and the count of this copy's accesses (``dataset.accesses``: every ``dataset[i]`` moves it, a
    preview's too; a loop without workers that resumes restores it with torch's RNG state, or it repeats the first
    epoch's draws), without drawing from torch's generator. Ignored pixels are
    :data:`IGNORE_INDEX` (255) in the labels it yields.
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        labels: LabelSpec | Mapping[int, str],
        *,
        transform: Transform | None = None,
        name: str = "dataset",
    ):
        self.pairs = list(pairs)
        self.spec = labels if isinstance(labels, LabelSpec) else LabelSpec(dict(labels))
        self.id2label = dict(self.spec.id2label)
        self.transform = transform or eval_transform()
        self.ignore_index = IGNORE_INDEX
        self.name = name
        self.accesses = 0  # (by int index: each access its own augmentation draw)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def read_stored_mask(self, index: int) -> np.ndarray:
        """The mask of sample ``index`` as stored: (H, W) values, or (H, W, 3) colours with a palette."""
        return load_mask(self.pairs[index][1], colours=self.spec.palette is not None)

    def read_mask(self, index: int) -> np.ndarray:
        """(H, W) int64 training ids of sample ``index`` (0..K-1, or 255 for ignored pixels)."""
        return self.spec.to_train_ids(self.read_stored_mask(index))

    def mask_name(self, index: int) -> str:
        """How problems with sample ``index``'s mask are reported: its path."""
        return str(self.pairs[index][1])

    def check_item(
        self,
        index: int,
        check_values: bool,
        tally: ClassTally | None = None,
        unturned: list[tuple[str, int]] | None = None,
    ) -> list[str]:
        """Problems of sample ``index`` (one line each, naming the file): unreadable files, an image and a mask
        of different sizes, and (``check_values``) mask values no label rule covers, its classes added to
        ``tally``; an image read as stored although its EXIF orientation says to turn it is added to
        ``unturned`` as (path, orientation)."""
        image_path, mask_path = self.pairs[index]
        problems = []
        orientation = 1
        try:
            with Image.open(image_path) as im:
                image_size = im.size
                exif = im.info.get("exif")  # (a JPEG's, read at open: verify() must come straight after it)
                im.verify() if not check_values else im.load()
                orientation = _orientation(exif or im.info.get("exif"))  # (a PNG's eXIf chunk: after the load)
        except Exception as exc:
            problems.append(f"{image_path}: unreadable image ({str(exc).strip() or type(exc).__name__})")
            image_size = None
        try:
            with Image.open(mask_path) as im:
                mask_size = im.size
            if check_values:
                problems += check_values_of(self, index, tally)
        except Exception as exc:
            message = str(exc).strip() or type(exc).__name__
            if message.startswith(f"{mask_path}: "):  # (readable, but not a mask: its own words, the path once)
                problems.append(message)
            else:
                problems.append(f"{mask_path}: unreadable mask ({message})")
            mask_size = None
        other = bool(image_size and mask_size and image_size != mask_size)
        turned = other and upright_turn(image_path, image_size, mask_size) is not None
        if other and not turned:
            problems.append(_size_mismatch(image_path, image_size, mask_path.name, mask_size))
        if unturned is not None and orientation != 1 and not turned and not problems:
            unturned.append((str(image_path), int(orientation)))
        return problems

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw (image uint8 (H, W, 3), mask (H, W) ids after label reduction) of sample ``index``: the image
        as stored, or upright where only its upright size is the mask's (:func:`upright_turn`); a file that
        cannot be read, or a pair of other sizes, is a ValueError naming it."""
        try:
            image = load_image(self.pairs[index][0])
        except (ValueError, OSError) as exc:  # (ImageError is a ValueError)
            raise ValueError(f"{self.pairs[index][0]}: {first_line(exc)}") from None
        try:
            mask = self.read_mask(index)
        except (ValueError, OSError) as exc:
            where = self.mask_name(index)
            message = first_line(exc)
            raise ValueError(message if where in message else f"{where}: {message}") from None
        if image.shape[:2] != mask.shape[:2]:
            (h, w), (mh, mw) = image.shape[:2], mask.shape[:2]
            turn = upright_turn(self.pairs[index][0], (w, h), (mw, mh))
            if turn is None:  # (what the data check reports; with it off, never a misaligned pair)
                raise ValueError(_size_mismatch(self.pairs[index][0], (w, h), self.mask_name(index), (mw, mh)))
            image = np.asarray(Image.fromarray(image).transpose(turn))
        return image, mask

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = key[0] if isinstance(key, tuple) else key
        image, mask = self.read(index)  # (an IndexError first for a key out of range, an empty set's included)
        if isinstance(key, tuple):
            seed = key[1]
        else:  # (seeded by the index alone, every epoch of a plain loader was the same draw)
            self.accesses += 1
            seed = np.random.SeedSequence([torch.initial_seed(), index % len(self), self.accesses])
        self._refuse_uncovered(index, mask)
        return self.transform(image, mask, np.random.default_rng(seed))

    def _refuse_uncovered(self, index: int, ids: np.ndarray) -> None:
        """A ValueError naming the mask (with the data check's advice) when ``ids`` hold a value no label rule
        covers: with the data check off or at headers, the loss or the metrics met it later, in a whole batch,
        and their error named no file. Two reductions per mask (a third where 255 is present)."""
        k = self.num_labels
        if not ids.size:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo >= 0 and (hi < k or (hi == IGNORE_INDEX and not ((ids >= k) & (ids != IGNORE_INDEX)).any())):
            return
        problems = check_values_of(self, index)  # (reads the mask again: only on the way to an error)
        raise ValueError(problems[0] if problems else f"{self.mask_name(index)}: label values outside 0..{k - 1}")

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.name}, {len(self)} images, {self.num_labels} classes)"


# ------------------------------------------------------------------------------------------- checking
@dataclass
class ClassTally:
    """What the masks read by a full data check hold, counted from the values :func:`check_values_of` reads
    anyway (no second pass): labelled pixels per class, ignored pixels, and masks ignored at every pixel."""

    pixels: np.ndarray  # (K,) int64: labelled pixels of each class
    ignored_pixels: int = 0
    masks: int = 0
    ignored_masks: int = 0  # masks with no labelled pixel: the ignore index everywhere
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def add(self, values: np.ndarray, counts: np.ndarray) -> None:
        """One mask's distinct training ids and their pixel counts (``np.unique(ids, return_counts=True)``);
        values outside 0..K-1 are the value check's to report, not counted."""
        valid = (values >= 0) & (values < len(self.pixels))
        ignored = int(counts[values == IGNORE_INDEX].sum())
        with self._lock:  # (check_dataset's threads add concurrently)
            self.pixels[values[valid]] += counts[valid]  # (values are distinct: no lost updates)
            self.ignored_pixels += ignored
            self.masks += 1
            self.ignored_masks += int(ignored == int(counts.sum()))


@dataclass
class DatasetReport:
    """Problems found by :func:`check_dataset`, one line each, naming the file; with the mask values checked,
    also what the masks hold (``classes``, for :func:`class_coverage`; None when only headers were read)."""

    num_pairs: int = 0
    problems: list[str] = field(default_factory=list)
    classes: ClassTally | None = None
    # images whose EXIF orientation was not applied (read as stored: see SegmentationDataset.read), as
    # (path, orientation): not a problem, but worth one warning (their masks may be drawn on the upright photo)
    unturned: list[tuple[str, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, limit: int = 50, shown: int = 3) -> str:
        """The problems, one line each; files with the same problem (the text after "PATH: ") in one line after
        the first's, with up to ``shown`` of their names (the same long hint was repeated for every file: audit);
        ``limit`` lines at most."""
        groups: dict[str, list[str]] = {}
        for problem in self.problems:
            path, sep, message = problem.partition(": ")
            groups.setdefault(message if sep else problem, []).append(path if sep else "")
        lines = [f"{len(self.problems)} problem(s) in {self.num_pairs} image/mask pairs:"]
        for message, paths in groups.items():
            lines.append(f"  {paths[0]}: {message}" if paths[0] else f"  {message}")
            if len(paths) > 1:
                more = f" and {len(paths) - 1 - shown} more" if len(paths) - 1 > shown else ""
                lines.append(f"  ... the same for {len(paths) - 1} more: {', '.join(paths[1 : 1 + shown])}{more}")
        if len(lines) > limit + 1:
            lines = [*lines[: limit + 1], f"  ... and {len(lines) - limit - 1} more line(s)"]
        return "\n".join(lines)


def distinct_counts(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, their pixel counts) of a mask's ids, as ``np.unique(ids, return_counts=True)``; a
    histogram where no id is negative (several times faster than np.unique's sort)."""
    flat = ids.ravel()
    if flat.size and flat.min() >= 0:
        counts = np.bincount(flat)
        values = np.flatnonzero(counts)
        return values, counts[values]
    return np.unique(flat, return_counts=True)


def reduced_hint(dataset: SegmentationDataset, k: int) -> str | None:
    """For a model of ``k`` classes on ``dataset`` read with label reduction, one class fewer: the option that reads
    the stored values instead (a model trained on them, e.g. ADE20K's 151 stored values before the reduction was
    the default for it); None otherwise."""
    if dataset.spec.reduce_labels and k == dataset.num_labels + 1:
        return (
            "the data is read with label reduction (0 ignored, k is class k - 1): "
            f"--no-reduce-labels reads its {k} stored values"
        )
    return None


def _numbered(id2label: Mapping[int, str]) -> bool:
    """Whether the classes carry the names given to classes counted from the masks (class_0, class_1, ...: a
    Hugging Face data set without a labels.json)."""
    return all(name == f"class_{k}" for k, name in id2label.items())


def check_values_of(dataset: SegmentationDataset, index: int, tally: ClassTally | None = None) -> list[str]:
    """Mask values of sample ``index`` that no rule of the label spec covers, with the option that would; the
    mask's classes are added to ``tally`` from the same read (no second pass)."""
    mask_path = dataset.mask_name(index)
    ids = dataset.read_mask(index)
    values, counts = distinct_counts(ids)
    if tally is not None:
        tally.add(values, counts)
    bad = values[(values != IGNORE_INDEX) & ((values < 0) | (values >= dataset.num_labels))]
    if not len(bad):
        return []
    last = dataset.num_labels - 1
    if dataset.spec.palette is not None and -1 in bad:
        raw = dataset.read_stored_mask(index)
        colours = np.unique(raw[ids == -1].reshape(-1, 3), axis=0)[:4]
        shown = ", ".join(str(list(map(int, c))) for c in colours)
        return [f'{mask_path}: colour(s) {shown} not in the "palette" of labels.json']
    reduced = dataset.spec.reduce_labels
    if reduced:  # (name the stored values, which the file holds and --ignore-index takes: it named the reduced;
        bad = np.where(bad > IGNORE_INDEX, bad, bad + 1)  # those above 255 are kept as stored: to_train_ids)
    shown = ", ".join(str(int(v)) for v in bad[:8])
    first, several = int(bad[0]), len(bad) > 1
    kind = dataset.name.split(":", 1)[0]
    where = "a labels.json (beside the data, or --labels FILE)" if kind == "hf" else "labels.json"
    if kind in ("ade20k", "cityscapes"):  # (fixed classes, no labels.json: one --ignore-index is all there is)
        hint = (
            f"if {first} marks unlabelled pixels, pass --ignore-index {first}"
            if not several and first >= 0
            else f"these are no {kind} masks: for your own classes, a labels.json beside images/ (--dataset folder)"
        )
    elif several and first >= 0:  # (offering the first as the ignore index left the others failing)
        listed = ", ".join(str(int(v)) for v in bad[:4])
        hint = (
            f'if they mark unlabelled pixels, add "ignore_index": [{listed}] to {where} (--ignore-index takes one '
            f'value); to merge values into classes, add a "map" to it'
        )
    elif first >= 0:
        hint = (
            f'if {first} marks unlabelled pixels, pass --ignore-index {first} (or "ignore_index": {first} in '
            f'{where}); to merge values into classes, add a "map" to it'
        )
    else:  # (an ignore index is a stored value >= 0: a negative one is mapped instead)
        hint = f'if {first} marks unlabelled pixels, add "map": {{"{first}": 255}} to {where} (or map it to a class)'
    if not reduced and int(bad.max()) == dataset.num_labels and not several:
        # (first: a mask of classes 1..K, without a 0, was only told to ignore K: that drops the last class and
        # shifts every other by one, silently: audit)
        hint = (
            f"if the classes are stored as 1..{last + 1} (ADE20K style: 0 means 'other' and is ignored), pass "
            f"--reduce-labels; {hint}"
        )
    elif first >= 257 and all(int(v) % 257 == 0 for v in bad):
        hint = f"16-bit masks holding 8-bit class ids × 257? save them as 8-bit PNGs (value / 257); {hint}"
    if kind == "hf" and _numbered(dataset.id2label) and first > last:  # (counted on the training split's masks)
        hint = (
            f"the classes were numbered 0..{last} from the training split's masks (no labels.json): if the value(s) "
            f"are classes too, name every class in {where}; " + hint
        )
    stored = f"1..{last + 1} (reduced labels: stored k is class k - 1)" if reduced else f"0..{last}"
    return [f"{mask_path}: label value(s) {shown} outside {stored}: {hint}"]


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
        report.problems += [
            f"{p}: not a PNG mask, left out (masks must be PNG: "
            + ("a lossy format such as JPEG changes label values)" if p.suffix.lower() in _LOSSY else "save it as one)")
            for p in listing.not_png_masks
        ]
    tally = report.classes = ClassTally(np.zeros(dataset.num_labels, np.int64)) if check_values else None
    # PIL decoding releases the GIL: threads make the check of a large set I/O-bound, not CPU-bound.
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        check = lambda i: dataset.check_item(i, check_values, tally, report.unturned)  # noqa: E731
        for problems in pool.map(check, range(len(dataset))):
            report.problems += problems
    report.unturned.sort()
    return report


def class_coverage(
    dataset: SegmentationDataset, tally: ClassTally, *, shown: int = 5, learning: bool = True
) -> tuple[list[str], list[str]]:
    """(warnings, problems), one line each, about what the masks of ``dataset`` hold (``tally``: its
    :class:`DatasetReport`'s ``classes``). Classes without a labelled pixel are a warning (small subsets lack
    rare classes), with the first ``shown`` named; so are masks ignored at every pixel. No labelled pixel of any
    class is a problem: nothing to learn from or score; so is one class alone in the masks a model ``learning``
    from them (training, class weights): nothing to tell apart (a split evaluated may hold one class: a warning).
    Binary masks saved as 0/255 (255 is the ignore index, so every object pixel is ignored and class 1 has none:
    audit, they trained to the end on background alone after a warning) are named with their fix."""
    n = tally.masks
    absent = [k for k in range(dataset.num_labels) if not tally.pixels[k]]
    if not n or (not absent and not tally.ignored_masks):
        return [], []
    if len(absent) == dataset.num_labels:
        where = (
            f": all {n} masks are ignored at every pixel ({IGNORE_INDEX} is the ignore index)"
            if tally.ignored_masks == n
            else f" in the {n} masks ({tally.ignored_masks} of them ignored at every pixel)"
        )
        return [], [f"no class has a labelled pixel{where}, so there is nothing to learn from or score"]
    spec = dataset.spec
    binary = absent == [1] and dataset.num_labels == 2 and spec.palette is None and not spec.reduce_labels
    hint = (
        f'; 0/255 binary masks? {IGNORE_INDEX} means ignored: add "map": {{"{IGNORE_INDEX}": 1}} to labels.json to '
        "make it class 1"
        if binary and tally.ignored_pixels
        else ""
    )
    if len(absent) == dataset.num_labels - 1 and dataset.num_labels > 1:  # one class alone: nothing to tell apart
        (only,) = set(range(dataset.num_labels)) - set(absent)
        line = f"only class {only} {dataset.id2label[only]!r} has labelled pixels in the {n} masks"
        if learning:  # (a model learnt from them predicts that class everywhere)
            return [], [f"{line}, so there is nothing to tell apart{hint}"]
        return [f"{line}: the other classes are scored on false positives alone{hint}"], []
    warnings = []
    if absent:
        names = ", ".join(f"{k} {dataset.id2label[k]!r}" for k in absent[:shown])
        more = f" and {len(absent) - shown} more" if len(absent) > shown else ""
        line = (
            f"class {names} has no labelled pixel in the {n} masks"
            if len(absent) == 1
            else f"{len(absent)} classes have no labelled pixel in the {n} masks: {names}{more}"
        )
        if absent == [0] and _numbered(dataset.id2label) and not spec.reduce_labels:  # (1..K counted, no 0)
            line += "; masks of classes 1..K without a 0 (ADE20K style)? pass --reduce-labels"
        warnings.append(line)
    if tally.ignored_masks:
        verb = "is" if tally.ignored_masks == 1 else "are"
        warnings.append(
            f"{tally.ignored_masks} of the {n} masks {verb} ignored at every pixel ({IGNORE_INDEX} is the ignore "
            "index): they add nothing to the loss or the metrics"
        )
    return warnings, []


__all__ = [
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "IGNORE_INDEX",
    "LabelSpec",
    "leave_stops_to_the_main_process",
    "workers_stopped_on_error",
    "read_label_spec",
    "KINDS",
    "ClassTally",
    "DatasetReport",
    "Listing",
    "MissingSplitError",
    "SegmentationDataset",
    "check_dataset",
    "class_coverage",
    "list_cityscapes",
    "list_folder",
    "load_image",
    "load_mask",
    "mask_values",
    "read_labels_json",
    "reduce_labels",
]
