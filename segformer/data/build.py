"""Which data set a path (or hub id) holds, and the data set of one of its splits: the entry point that
dispatches between the layouts on disk (:mod:`segformer.data.datasets`) and Hugging Face datasets
(:mod:`segformer.data.hf`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..labels import ADE20K_CLASSES, CITYSCAPES_CLASSES
from .datasets import (
    IGNORE_INDEX,
    KINDS,
    ClassTally,
    LabelSpec,
    Listing,
    SegmentationDataset,
    Transform,
    check_dataset,
    check_ignore_values,
    class_coverage,
    list_cityscapes,
    list_folder,
    read_label_spec,
)
from .hf import build_hf_dataset, looks_like_hf_dataset

# build_dataset's options for how a data set's masks and columns are read: the fields of the same names of a
# TrainConfig and of `segformer eval`'s arguments
LABEL_OPTIONS = ("ignore_index", "reduce_labels", "image_column", "label_column", "labels")


def label_options(source: object) -> dict[str, object]:
    """The :data:`LABEL_OPTIONS` of ``source`` (a TrainConfig, parsed arguments), as build_dataset keywords."""
    return {name: getattr(source, name, None) for name in LABEL_OPTIONS}


def detect_kind(root: str | os.PathLike) -> str:
    """ "cityscapes" when ``root`` has leftImg8bit/ and gtFine/, "ade20k" for an ADE20K release (images/training,
    no labels.json, and the folder named ADEChallengeData2016 or holding objectInfo150.txt), "hf" for a Hugging
    Face dataset (a save_to_disk or parquet folder, or a hub id), else "folder". (One's own data laid out as
    images/training was read as ADE20K by that layout alone: 150 classes, its 0 ignored, the others shifted by one,
    after one line: audit. It is a folder data set now, which asks for its labels.json.)"""
    if looks_like_hf_dataset(root):
        return "hf"
    root = Path(root)
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return "cityscapes"
    if not (root / "labels.json").exists() and (root / "images" / "training").is_dir() and _ade20k_release(root):
        return "ade20k"
    return "folder"


def protocol_kind(root: str | os.PathLike, kind: str, **options: object) -> str:
    """The data-set kind whose training recipe and evaluation protocol apply to ``root`` read as ``kind`` with
    ``options`` (:data:`LABEL_OPTIONS`): ``kind`` itself, except a Hugging Face dataset read as ADE20K's scene
    parsing set (scene_parse_150), which is ADE20K: "ade20k". (It trained and evaluated as own data, whole images
    at their own size, so a paper checkpoint evaluated on it was not comparable to the published mIoU, nor to the
    same checkpoint on the ADEChallengeData2016 folder: audit.)"""
    if kind != "hf":
        return kind
    from .hf import reads_as_ade20k

    keep = ("labels", "label_column", "reduce_labels")
    return "ade20k" if reads_as_ade20k(root, **{k: v for k, v in options.items() if k in keep}) else kind


def _ade20k_release(root: Path) -> bool:
    """Named ADEChallengeData2016 (as given, or where a link leads), or holding the release's objectInfo150.txt."""
    named = "ADEChallengeData2016" in root.absolute().parts or "ADEChallengeData2016" in root.resolve().parts
    return named or (root / "objectInfo150.txt").is_file()


def build_dataset(
    root: str | os.PathLike,
    split: str = "train",
    *,
    kind: str = "auto",
    transform: Transform | None = None,
    ignore_index: int | None = None,
    reduce_labels: bool | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    labels: str | os.PathLike | None = None,
) -> tuple[SegmentationDataset, Listing]:
    """The data set of one split of ``root`` and its listing (whose unpaired files :func:`check_dataset`
    reports). ``kind``: "folder", "ade20k", "cityscapes" or "auto" (:func:`detect_kind`). ``ignore_index``:
    another stored mask value meaning "unlabelled" (255 always does); ``reduce_labels``: ADE20K's label
    reduction (None: the layout's default, or labels.json's ``reduce_labels``). ``kind="hf"`` (detected for
    ``save_to_disk`` folders, parquet folders and hub ids): a Hugging Face dataset (:mod:`segformer.data.hf`),
    with ``image_column`` / ``label_column`` (default: detected). ``labels``: a labels.json to use instead of the
    one beside the data (Hugging Face data and folder layouts)."""
    if not isinstance(root, (str, os.PathLike)):  # (a datasets.Dataset in memory failed inside pathlib: audit)
        raise TypeError(
            f"build_dataset takes a path or hub id, got a {type(root).__name__}; save a Hugging Face dataset with "
            ".save_to_disk(DIR) (a DatasetDict with train and validation splits) and pass DIR"
        )
    if kind == "hf" or (kind == "auto" and looks_like_hf_dataset(root)):
        dataset = build_hf_dataset(
            root,
            split,
            transform=transform,
            image_column=image_column,
            label_column=label_column,
            labels=labels,
            ignore_index=ignore_index,
            reduce_labels=reduce_labels,
        )
        return dataset, Listing()
    root = Path(root)
    if root.exists() and not root.is_dir():  # (a CSV list of pairs, an archive: "no such directory" beside it)
        raise ValueError(
            f"{root}: a file, not a data directory (a folder with images/ and annotations/ split folders and "
            "labels.json, a Cityscapes or ADE20K folder, or a Hugging Face dataset; lists of pairs are not read)"
        )
    if not root.is_dir():
        raise ValueError(f"{root}: no such data directory")
    if kind == "auto":
        kind = detect_kind(root)
    if kind == "folder":
        listing = list_folder(root, split)
        spec_path = Path(labels) if labels is not None else root / "labels.json"
        if labels is not None and not spec_path.is_file():
            raise ValueError(f"--labels {labels}: no such file")
        if labels is None and not spec_path.exists() and (root / "images" / "training").is_dir():
            raise ValueError(  # (images/training: ADE20K's own folder names; a release is detected by its name)
                f"{spec_path}: missing (the folder layout needs labels.json holding id2label; for ADE20K itself, "
                "a copy under another name than ADEChallengeData2016: --dataset ade20k)"
            )
        spec = read_label_spec(spec_path, ignore_index=ignore_index, reduce=reduce_labels)
    elif kind in ("ade20k", "cityscapes"):
        if labels is not None:
            raise ValueError(f"--labels {labels}: {kind} has its own fixed classes; a labels file is for own data")
        listing = list_folder(root, split) if kind == "ade20k" else list_cityscapes(root, split)
        names = ADE20K_CLASSES if kind == "ade20k" else CITYSCAPES_CLASSES
        ignores = (IGNORE_INDEX,) if ignore_index is None else tuple(sorted({IGNORE_INDEX, ignore_index}))
        reduce = (kind == "ade20k") if reduce_labels is None else reduce_labels
        unlabelled = "0 and 255" if reduce else "255"
        check_ignore_values(ignores, dict(enumerate(names)), reduce, f"or leave it out ({kind} ignores {unlabelled})")
        spec = LabelSpec(dict(enumerate(names)), ignore_values=ignores, reduce_labels=reduce)
    else:
        raise ValueError(f"dataset kind must be one of auto, {', '.join(KINDS)}, got {kind!r}")
    if not listing.pairs:
        raise ValueError(
            f"{root}: no image/mask pairs in the {split} split of this {kind} layout{listing.no_pairs_hint()}"
        )
    dataset = SegmentationDataset(listing.pairs, spec, transform=transform, name=f"{kind}:{root}:{split}")
    return dataset, listing


def check_splits(
    splits: list[tuple[SegmentationDataset | None, Listing | None]], check: str, data: object, *, learning: bool = True
) -> ClassTally | None:
    """``--check-data`` (full, headers, off) for the (dataset, listing) of each split (None: no such split): the
    main rank reads the files and lists each problem on stderr, every rank follows its verdict; a ValueError
    naming ``data`` when a split has problems ("off" reads nothing, and warns of the files the listing left out).

    The first split is the one the command learns from or scores (train's training split, eval's split): with
    "full", whose reading of every mask also counts its classes, its classes without a labelled pixel and its
    masks ignored at every pixel are warned about, and no labelled pixel at all is a problem
    (:func:`class_coverage`): a class that never occurs is silently never learnt, and masks that are 255 throughout
    train at a loss of 0. The other splits are only held to having a labelled pixel at all (a small validation
    split may well lack rare classes).

    Returns the first split's :class:`ClassTally` on the main rank after a full check (``--class-weights auto``
    weighs classes by it without reading the masks again), else None."""
    from ..distributed import broadcast_flag, get_rank

    if check == "off":  # (the listing is known already: what it leaves out is said, not dropped without a word)
        for dataset, listing in splits:
            unused = (listing.unpaired_images, listing.unpaired_masks, listing.not_png_masks) if listing else ()
            left = [path for group in unused for path in group]
            if left and dataset is not None and get_rank() == 0:
                print(
                    f"warning: {dataset.name}: {len(left)} file(s) without a partner or not a PNG mask left out, "
                    f"unchecked (--check-data off), e.g. {left[0]}",
                    file=sys.stderr,
                )
        return None
    ok, first = True, None
    if get_rank() == 0:
        for position, (dataset, listing) in enumerate(splits):
            if dataset is None:
                continue
            report = check_dataset(dataset, listing, check_values=check == "full")
            if report.unturned:
                path, orientation = report.unturned[0]
                print(
                    f"warning: {dataset.name}: {len(report.unturned)} image(s) carry an EXIF orientation but are read "
                    f"as stored, the pixels their masks fit (e.g. {path}: orientation {orientation}); if the masks "
                    "were drawn on the upright photos, turn the files upright first (exiftran -ai, mogrify "
                    "-auto-orient); segformer predict and serve show the model photos upright",
                    file=sys.stderr,
                )
            if position == 0 and report.classes is not None:
                first = report.classes
                report.problems += warn_class_coverage(dataset, first, learning=learning)
            elif report.classes is not None:  # a split to score with no labelled pixel: every evaluation's mIoU
                # would be NaN and best/ never written (it trained to the end without a word: audit)
                report.problems += class_coverage(dataset, report.classes, learning=False)[1]
            if not report.ok:
                print(f"{dataset.name}: {report.format()}", file=sys.stderr)
                ok = False
    if not broadcast_flag(ok):
        raise ValueError(f"{data}: the data check failed (problems listed above; --check-data off skips it)")
    return first


def warn_class_coverage(dataset: SegmentationDataset, tally: ClassTally, *, learning: bool = True) -> list[str]:
    """Print :func:`class_coverage`'s warnings about ``dataset``'s masks on stderr; return its problems."""
    warnings, problems = class_coverage(dataset, tally, learning=learning)
    for warning in warnings:
        print(f"warning: {dataset.name}: {warning}", file=sys.stderr)
    return problems


__all__ = [
    "LABEL_OPTIONS",
    "build_dataset",
    "check_splits",
    "detect_kind",
    "label_options",
    "protocol_kind",
    "warn_class_coverage",
]
