"""Hugging Face ``datasets`` as training and evaluation data (``pip install "segformer[datasets]"``).

``--data`` (and :func:`build_hf_dataset`) accepts what the Transformers fine-tuning guides keep data in:

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- a folder of parquet files (``train-00000-of-00001.parquet``, ``data/validation-*.parquet``, ... as the hub
  stores them);
- a hub id (``scene_parse_150``, ``owner/name``), resolved through the local cache (``HF_DATASETS_OFFLINE=1``
  / ``HF_HUB_OFFLINE=1`` work as usual; where the hub's host name does not resolve, the caches alone, at once).

Columns are detected (images: ``image``, ``pixel_values``, ``img``; masks: ``annotation``, ``label``, ``mask``,
``semantic_map``, ``segmentation``, ...) or named (``image_column``, ``label_column``); splits map ``train`` /
``val`` (``validation``, ``valid``, ``dev``) / ``test``. Class names come from a ``labels.json`` (or
``id2label.json``) beside the data, or from ``labels=`` (the same formats as the folder layout's); without either,
ADE20K's scene parsing set (``scene_parse_150``: an ``annotation`` beside a ``scene_category`` class label, the set
named so in its info or that label of hundreds of scenes) gets ADE20K's 150 classes with its labels reduced (0
"other" ignored; ``reduce_labels=False``: the stored 0..150, 0 named "other"), as the release does, saying so on
stderr (being ADE20K, ``segformer train`` and ``segformer eval`` give it ADE20K's recipe and protocol:
:func:`reads_as_ade20k`), and other data's classes are numbered 0..max mask value. Masks are the same as on disk:
one-band images of class ids, or colour-coded with a ``palette``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..distributed import get_rank
from ..images import array_to_rgb, to_rgb
from ..labels import ADE20K_CLASSES
from .datasets import (
    IGNORE_INDEX,
    ClassTally,
    LabelSpec,
    MissingSplitError,
    SegmentationDataset,
    Transform,
    check_ignore_values,
    check_values_of,
    mask_values,
    read_label_spec,
)

IMAGE_COLUMNS = ("image", "pixel_values", "img", "images", "input_image")
LABEL_COLUMNS = (
    "annotation",
    "label",
    "mask",
    "semantic_map",
    "segmentation",
    "seg_map",
    "labels",
    "semantic_segmentation",
    "segmentation_mask",
    "gt",
    "target",
)
SPLITS = {"train": ("train", "training"), "val": ("validation", "val", "valid", "dev"), "test": ("test", "testing")}


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            'reading a Hugging Face dataset needs the datasets package: pip install "segformer[datasets]"'
        ) from None
    return datasets


def looks_like_hf_dataset(source: str | os.PathLike) -> bool:
    """A ``save_to_disk`` folder, a folder holding parquet files (but not the folder layout's images/ beside
    annotations/ or masks/), or (not a path at all) a hub id."""
    path = Path(source)
    if not path.exists():
        text = str(source)
        return "/" not in text.strip("/") or (text.count("/") == 1 and not text.startswith((".", "/", "~")))
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    if (path / "images").is_dir() and any((path / d).is_dir() for d in ("annotations", "masks")):
        return False  # (the folder layout: a stray parquet file, a statistics table, made it an imagefolder)
    return any(path.glob("*.parquet")) or any(path.glob("*/*.parquet"))


def _load(source: str | os.PathLike) -> Any:
    """A DatasetDict (or a Dataset, for one saved split) from a save_to_disk folder, parquet files or a hub id.
    A hub id is loaded by ``datasets``; when that cannot reach the hub (offline), its files are taken from the
    local Hugging Face cache (``huggingface_hub`` snapshot) and loaded from there."""
    datasets = _require_datasets()
    path = Path(source)
    try:
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            return _load_saved_splits(datasets, path)
        if path.is_dir() and (path / "state.json").is_file():
            return _load_saved_split(datasets, path)
        if path.is_dir():
            return datasets.load_dataset(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"{source}: cannot load as a Hugging Face dataset ({str(exc).splitlines()[0]})") from None
    from ..hub import hub_unreachable

    # (no network: datasets would retry for ~25 s before its own cache; offline, it reads that cache at once)
    unreachable = hub_unreachable()
    try:
        with _datasets_offline(datasets) if unreachable else contextlib.nullcontext():
            return datasets.load_dataset(str(source))
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as exc:
        first = "the hub cannot be reached" if unreachable else str(exc).splitlines()[0]
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=str(source), repo_type="dataset", local_files_only=True)
    except Exception:
        raise ValueError(
            f"{source}: not a local folder, and not loadable as a hub data set ({first}); offline, it must be in "
            "the Hugging Face cache"
        ) from None
    return datasets.load_dataset(local)


@contextlib.contextmanager
def _datasets_offline(datasets: Any) -> Iterator[None]:
    """``datasets`` in offline mode (as HF_DATASETS_OFFLINE=1 sets it) for the duration: its own cache, or its
    answer that the data is not there, without asking the hub."""
    config = datasets.config
    saved = {name: getattr(config, name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(config, name)}
    for name in saved:
        setattr(config, name, True)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def _load_saved_splits(datasets: Any, path: Path) -> dict[str, Any]:
    """A save_to_disk DatasetDict, split by split (:func:`_load_saved_split`), as a dict of its splits."""
    names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
    return {name: _load_saved_split(datasets, path / name) for name in names}


def _load_saved_split(datasets: Any, path: Path) -> Any:
    """One save_to_disk split. A saved empty split has no data file, and ``datasets`` fails on it with an
    IndexError (which stopped even a run that wanted only the other split, in a traceback: audit); it is an
    empty Dataset of its features here, which the split's use then names as empty."""
    state = json.loads((path / "state.json").read_text(encoding="utf-8")) if (path / "state.json").is_file() else {}
    if state.get("_data_files") == []:
        features = datasets.DatasetInfo.from_directory(str(path)).features
        return datasets.Dataset.from_dict({name: [] for name in features or {}}, features=features)
    return datasets.load_from_disk(str(path))


def _split(data: Any, split: str, source: str | os.PathLike) -> Any:
    if not hasattr(data, "keys"):  # one Dataset: it is the training split
        if split == "train":
            return data
        raise MissingSplitError(f"{source}: a single saved split (no {split} split); save a DatasetDict with one")
    for name in SPLITS.get(split, (split,)):
        if name in data:
            return data[name]
    raise MissingSplitError(f"{source}: no {split} split (it has {', '.join(data.keys())})")


def _column(names: list[str], given: str | None, candidates: tuple[str, ...], what: str, source: Any) -> str:
    if given is not None:
        if given not in names:
            raise ValueError(f"{source}: no column {given!r} ({what}); columns: {', '.join(names)}")
        return given
    found = next((c for c in candidates if c in names), None)
    if found is None:
        option = "--image-column" if what == "images" else "--label-column"
        raise ValueError(f"{source}: no {what} column found among {', '.join(names)}; name it with {option}")
    return found


def _declared_dtype(feature: Any) -> np.dtype | None:
    """The numpy dtype an array column declares (``List(List(Value("uint16")))``, ``Array3D(dtype="uint16")``):
    its rows come back as Python lists (or int64 arrays), which would lose what the pixel rules read from the
    dtype (uint16 is 16-bit data, bool is 0/255). None for other features (Image, ClassLabel, ...)."""
    while feature is not None and not isinstance(getattr(feature, "dtype", None), str):
        feature = getattr(feature, "feature", None)  # (List / Sequence / LargeList wrap their element's feature)
    try:
        return np.dtype(feature.dtype) if feature is not None else None
    except TypeError:  # ("string", "timestamp[s]", ...)
        return None


def _mask_cell(cell: Any, where: str, dtype: np.dtype | None, *, colours: bool = False) -> np.ndarray:
    """A mask column's cell (an Image feature's picture, or an array / nested lists of ``dtype``) → its values."""
    if cell is None:
        raise ValueError(f"{where}: empty (None)")
    if isinstance(cell, Image.Image):
        if cell.format == "JPEG":  # (its compression makes other class ids at every border: the folder layout
            raise ValueError(  # refuses JPEG masks too)
                f"{where}: a JPEG mask (its compression changes class ids at every border); masks must be stored "
                "losslessly (PNG)"
            )
        return mask_values(cell, colours=colours, where=where)
    return mask_array(np.asarray(cell, dtype=dtype), where, colours=colours)


def mask_array(values: Any, where: str, *, colours: bool = False) -> np.ndarray:
    """A mask given as an array → (H, W) class values (int64), or (H, W, 3) uint8 colours with ``colours``: a
    one-band (H, W, 1) / (1, H, W) mask is (H, W); bool is 0/1; floats must hold whole numbers (1.5 is no
    class); anything else is a ValueError naming ``where``."""
    values = np.asarray(values)
    if values.ndim == 3 and 1 in (values.shape[0], values.shape[-1]):
        values = values.reshape(values.shape[1:] if values.shape[0] == 1 else values.shape[:-1])
    if values.ndim not in (2, 3):  # (an image classification set's class id, a list of boxes, ...)
        raise ValueError(
            f"{where}: holds {values.ndim}-D values {values.shape}, not a mask (an image or an H x W array of class "
            "ids); name the mask column with --label-column"
        )
    if values.ndim == 3 and not (colours and values.shape[-1] in (3, 4)):
        hint = ' (colour-coded masks need a "palette" in labels.json)' if values.shape[-1] in (3, 4) else ""
        raise ValueError(f"{where}: a mask must be an H x W array of class ids, got shape {values.shape}{hint}")
    if values.dtype == np.bool_:
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            raise ValueError(f"{where}: label values must be whole numbers, got non-integer floats ({values.dtype})")
    elif values.dtype.kind not in "iu":
        raise ValueError(f"{where}: label values must be integers, got dtype {values.dtype}")
    if values.ndim == 3:
        return values[..., :3].astype(np.uint8)
    return values.astype(np.int64)


class HFSegmentationDataset(SegmentationDataset):
    """A split of a Hugging Face dataset, as a :class:`SegmentationDataset` (same transforms, labels, check)."""

    def __init__(
        self,
        table: Any,
        image_column: str,
        label_column: str,
        labels: LabelSpec,
        *,
        transform: Transform | None,
        name: str,
    ):
        super().__init__([], labels, transform=transform, name=name)
        self.table, self.image_column, self.label_column = table, image_column, label_column
        # one column each: reading a mask must not decode the image of its row, nor the image its mask
        self._columns = {c: table.select_columns([c]) for c in (image_column, label_column)}
        features = getattr(table, "features", None) or {}
        self._dtypes = {c: _declared_dtype(features.get(c)) for c in (image_column, label_column)}

    def __len__(self) -> int:
        return len(self.table)

    def _cell(self, index: int, column: str) -> Image.Image | np.ndarray:
        value = self._columns[column][int(index)][column]
        if value is None:  # (an array column's empty cell: a TypeError inside NumPy named no row)
            raise ValueError(f"{self.name}[{index}].{column}: empty (None)")
        if isinstance(value, dict) and ("bytes" in value or "path" in value):  # an undecoded Image feature
            import io

            value = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        return value if isinstance(value, Image.Image) else np.asarray(value, dtype=self._dtypes[column])

    def read_stored_mask(self, index: int) -> np.ndarray:
        mask = self._cell(index, self.label_column)
        return _mask_cell(
            mask, self.mask_name(index), self._dtypes[self.label_column], colours=self.spec.palette is not None
        )

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, mask ids) of row ``index``: an Image feature through the one input layer's
        mode rules, an array through its array rules (:func:`segformer.images.array_to_rgb`: uint16 / 257, floats
        by their range, channels first or last, gray and alpha), as the predictor reads them."""
        rgb, mask = self._read_pair(index)
        mismatch = self._size_mismatch(index, rgb, mask)
        if mismatch is not None:  # (what the data check reports; with it off, never a misaligned pair: audit)
            raise ValueError(mismatch)
        return rgb, mask

    def _read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = self._cell(index, self.image_column)
        what = f"{self.name}[{index}].{self.image_column}"
        rgb = np.asarray(to_rgb(image, what)) if isinstance(image, Image.Image) else array_to_rgb(image, what)
        return rgb, self.read_mask(index)

    def _size_mismatch(self, index: int, image: np.ndarray, mask: np.ndarray) -> str | None:
        """The line naming row ``index`` when its image and mask differ in size, else None."""
        (h, w), (mh, mw) = image.shape[:2], mask.shape[:2]
        if (h, w) == (mh, mw):
            return None
        turned = (
            " (the datasets library turns photos upright by their EXIF orientation: was the mask drawn on the "
            "stored, sideways pixels?)"
            if (h, w) == (mw, mh)
            else ""
        )
        return f"{self.name}[{index}]: image is {w}x{h} but its mask is {mw}x{mh}{turned}"

    def mask_name(self, index: int) -> str:
        return f"{self.name}[{index}].{self.label_column}"

    def check_item(
        self,
        index: int,
        check_values: bool,
        tally: ClassTally | None = None,
        unturned: list[tuple[str, int]] | None = None,
    ) -> list[str]:
        """As :meth:`SegmentationDataset.check_item`; ``unturned`` stays empty (the datasets library decodes
        images upright)."""
        try:
            image, mask = self._read_pair(index)
        except Exception as exc:
            message = str(exc).strip() or type(exc).__name__
            if message.startswith(f"{self.name}[{index}]."):  # (names its cell already: its own words)
                return [message]
            return [f"{self.name}[{index}]: unreadable ({message})"]
        problems = []
        mismatch = self._size_mismatch(index, image, mask)
        if mismatch is not None:
            problems.append(mismatch)
        if check_values:
            problems += check_values_of(self, index, tally)
        return problems


# ADE20K's scene categories number in the hundreds: a set's own few room or place types beside an annotation column
# are not ADE20K's (the rule read such a set as ADE20K, its class 0 ignored, without a word: review)
_ADE20K_MIN_SCENES = 100


def _scene_parsing(table: Any, label_column: str) -> bool:
    """ADE20K's scene parsing set as the hub keeps it (``scene_parse_150``, 150 classes counted from 1, 0 "other"):
    its ``annotation`` column beside a ``scene_category`` class label, the set named so in its info or that label of
    ADE20K's hundreds of scene names. (Its instance_segmentation configuration has no scene_category.)"""
    scenes = (getattr(table, "features", None) or {}).get("scene_category")
    if label_column != "annotation" or scenes is None:
        return False
    info = getattr(table, "info", None)
    named = {str(getattr(info, key, "") or "") for key in ("builder_name", "dataset_name", "config_name")}
    return "scene_parse_150" in named or len(getattr(scenes, "names", None) or []) >= _ADE20K_MIN_SCENES


_ANNOUNCED: set[str] = set()  # the data read as ADE20K this process has said so of (once, not per split)


def reads_as_ade20k(
    source: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    label_column: str | None = None,
    reduce_labels: bool | None = None,
) -> bool:
    """Whether :func:`build_hf_dataset` reads ``source`` with these options as ADE20K's scene parsing set
    (scene_parse_150: ADE20K's 150 classes, labels reduced): no labels file given or beside the data, labels not
    kept as stored, and its ``annotation`` column beside ADE20K's ``scene_category``. Such data is ADE20K, so a
    run trains and evaluates it as the paper does ADE20K (the data-set kind "ade20k"'s recipe and protocol), as
    the release's folder would be. Data that cannot be read answers False (building it says why)."""
    if reduce_labels is False or _labels_file(source, labels) is not None:
        return False
    try:
        data = _load(source)
        table = data[next(iter(data.keys()))] if hasattr(data, "keys") else data
        column = _column(list(table.column_names), label_column, LABEL_COLUMNS, "masks", source)
    except Exception:  # (whatever the load raises, the build raises again, and reports: under torchrun, once)
        return False
    return _scene_parsing(table, column)


def _labels_file(source: str | os.PathLike, labels: str | os.PathLike | None) -> Path | None:
    """The labels file that names the classes: ``labels`` when given, else a labels.json or id2label.json beside
    the data (a folder), else None."""
    if labels is not None:
        return Path(labels)
    beside = [Path(source) / n for n in ("labels.json", "id2label.json")] if Path(source).is_dir() else []
    return next((path for path in beside if path.is_file()), None)


def _labels(
    source: str | os.PathLike,
    labels: str | os.PathLike | None,
    table: Any,
    name: str,
    label_column: str,
    ignore_index: int | None,
    reduce_labels: bool | None,
) -> LabelSpec:
    """The label spec: ``labels`` (a labels.json), one beside the data, else numbered classes 0..max value."""
    if labels is not None and not Path(labels).is_file():
        raise ValueError(f"--labels {labels}: no such file")
    path = _labels_file(source, labels)
    if path is not None:
        return read_label_spec(path, ignore_index=ignore_index, reduce=reduce_labels)
    if _scene_parsing(table, label_column):  # ADE20K as the hub keeps it (scene_parse_150): 0 "other", 1..150
        ignores = (IGNORE_INDEX,) if ignore_index is None else tuple(sorted({IGNORE_INDEX, ignore_index}))
        if reduce_labels is False:  # the stored values, named without decoding every mask to count them (which
            # took minutes over its 20,000 training masks)
            stored = {0: "other", **{k + 1: name for k, name in enumerate(ADE20K_CLASSES)}}
            check_ignore_values(ignores, stored, False, "or leave it out (255 is ignored)")
            return LabelSpec(stored, ignore_values=ignores, reduce_labels=False)
        # reduced, as the release's masks are read
        check_ignore_values(
            ignores, dict(enumerate(ADE20K_CLASSES)), True, "or leave it out (ADE20K ignores 0 and 255)"
        )
        if get_rank() == 0 and str(source) not in _ANNOUNCED:
            _ANNOUNCED.add(str(source))
            print(
                f"{source}: read as ADE20K's scene parsing set (scene_parse_150): its 150 classes, mask value 0 "
                "ignored and k read as class k - 1; --no-reduce-labels keeps the stored values, a labels.json "
                "beside the data names other classes",
                file=sys.stderr,
            )
        return LabelSpec(dict(enumerate(ADE20K_CLASSES)), ignore_values=ignores, reduce_labels=True)
    top = 0
    ignored = {IGNORE_INDEX, *([] if ignore_index is None else [ignore_index])}
    masks = table.select_columns([label_column])  # without decoding the images
    dtype = _declared_dtype((getattr(table, "features", None) or {}).get(label_column))
    for index in range(len(masks)):
        values = np.unique(_mask_cell(masks[index][label_column], f"{name}[{index}].{label_column}", dtype))
        values = values[~np.isin(values, list(ignored))]
        top = max(top, int(values.max()) if len(values) else 0)
    reduce = bool(reduce_labels)
    count = top if reduce else top + 1
    ignores = tuple(sorted(ignored))
    id2label = {i: f"class_{i}" for i in range(count)}
    remedy = "or pass --reduce-labels if 0 means unlabelled and the classes start at 1"
    check_ignore_values(ignores, id2label, reduce, remedy)
    return LabelSpec(id2label, ignore_values=ignores, reduce_labels=reduce)


def build_hf_dataset(
    source: str | os.PathLike,
    split: str = "train",
    *,
    transform: Transform | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    labels: str | os.PathLike | None = None,
    ignore_index: int | None = None,
    reduce_labels: bool | None = None,
) -> HFSegmentationDataset:
    """One split of a Hugging Face dataset (see the module docstring) as a :class:`SegmentationDataset`."""
    data = _load(source)
    table = _split(data, split, source)
    names = list(table.column_names)
    image_col = _column(names, image_column, IMAGE_COLUMNS, "images", source)
    label_col = _column(names, label_column, LABEL_COLUMNS, "masks", source)
    if len(table) == 0:
        raise ValueError(f"{source}: the {split} split is empty")
    try:  # numbered classes are counted on the training split, so that every split agrees
        counted, counted_split = _split(data, "train", source), "train"
    except ValueError:
        counted, counted_split = table, split
    spec = _labels(source, labels, counted, f"hf:{source}:{counted_split}", label_col, ignore_index, reduce_labels)
    return HFSegmentationDataset(table, image_col, label_col, spec, transform=transform, name=f"hf:{source}:{split}")


__all__ = [
    "HFSegmentationDataset",
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "build_hf_dataset",
    "looks_like_hf_dataset",
    "reads_as_ade20k",
]
