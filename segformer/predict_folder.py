"""The ``segformer predict`` program: files, folders and globs in; label PNGs, overlays, a summary and a legend out.

>>> from segformer.predict import SegformerPredictor
>>> from segformer.predict_folder import predict_to_folder
>>> report = predict_to_folder(SegformerPredictor("./my-checkpoint"), ["photos/"], "masks/", recursive=True)
>>> [(r.image, r.error) for r in report.failures]                 # each one reported and skipped

Built on :class:`~segformer.predict.SegformerPredictor` (its public ``predict_iter_with_images``). Every output
is written atomically (a temporary name, then a rename), so a killed run leaves only complete files and
``skip_existing`` resumes it. Each label PNG records the image it was made from and what made it (the model as it
runs, its backend, the inference options), and is written after the image's other files: ``skip_existing`` keeps
an image's outputs only when both match this run, and redoes (and counts, in one line) those that another model
or other options made, so the masks, the summary and the legend always belong to one model. Under ``torchrun``
each rank takes every world_size-th image of the sorted list; the records are gathered over torch.distributed and
rank 0 writes the summary and the legend.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from .backends import CompiledModel, OnnxRuntimeModel, config_identity, hash_state
from .distributed import all_gather_objects, barrier, is_distributed
from .fileio import atomic_save_image, atomic_write, atomic_write_text, remove_killed_writes
from .hub import first_line
from .images import IMAGE_EXTENSIONS, ImageError
from .predict import SegformerPredictor, Segmentation
from .visualize import colorize, label_image, legend, overlay, side_by_side

logger = logging.getLogger("segformer")


# ----------------------------------------------------------------------------------------------- inputs
def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def collect_images(
    inputs: Sequence[str | os.PathLike],
    *,
    recursive: bool = False,
    exclude: str | os.PathLike | None = None,
    quiet: bool = False,
) -> list[tuple[Path, Path]]:
    """Files, folders and glob patterns → sorted, de-duplicated ``(path, relative output path)`` pairs.

    A file is taken whatever its name (and reported later if it is not an image). Folders give the files with an
    image extension (:data:`IMAGE_EXTENSIONS`) directly inside them, or below them with ``recursive``, but hidden
    ones (a name, or a folder below, starting with "."); the relative path keeps the sub-folders. Globs (``**``
    allowed) are expanded here when the shell did not, relative to the folder before the first wildcard. A path or
    pattern that matches nothing, and a folder without images, is kept, so that it is reported. Folders and globs
    skip what lies in ``exclude`` where it is a sub-folder of theirs (the run's output folder, whose label maps and
    overlays are no photographs to segment; images there that no run wrote are named in one warning line). Raises
    ValueError when no input exists at all. Paths are kept as the user wrote them (a symlink stays the link:
    summaries show what was passed); a file a folder or glob reaches by two names is taken once, by its own name
    rather than a link's, in one warning line each. Output folders left out are said in one warning line each,
    unless ``quiet`` (a first look for usage errors)."""
    found: dict[Path, tuple[Path, Path]] = {}  # resolved path → (the path as given, relative output path)
    names: dict[Path, list[tuple[Path, Path]]] = {}  # resolved path → every name a folder or glob reached it by
    skip = None if exclude is None else Path(exclude).expanduser().resolve()
    left_out: set[Path] = set()  # output folders a glob's matches lay in
    in_own: list[Path] = []  # images in this run's own output folder that no run wrote (left out: said once)

    def take(f: Path, root: Path, rel: Path) -> bool:
        """Keep image file ``f`` of a folder or glob below ``root`` unless it lies in the excluded folder (the
        run's output folder; where that is the input folder itself or holds it, _check_outputs guards the inputs);
        True where it was kept. A link to nothing with an image's name is kept too, to be reported as such."""
        if f.suffix.lower() not in IMAGE_EXTENSIONS:
            return False
        if not f.is_file():
            if f.is_symlink() and not f.exists():
                found.setdefault(f, (f, rel))
            return False
        resolved = f.resolve()
        if skip is not None and skip != root and not root.is_relative_to(skip) and resolved.is_relative_to(skip):
            if not _written_by_a_run(f, True):  # (a run's own files there are no photos)
                in_own.append(f)
            return False
        found.setdefault(resolved, (f, rel))
        reached = names.setdefault(resolved, [])
        if all(os.path.normpath(g) != os.path.normpath(f) for g, _ in reached):
            reached.append((f, rel))
        return True

    for item in inputs:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_dir():
            root = path.resolve()
            taken = [take(f, root, f.relative_to(path)) for f in _folder_files(path, recursive, skip, quiet)]
            if not any(taken):  # reported (a failure, as a missing file is), not dropped without a word
                found.setdefault(root, (path, Path(path.name)))
        elif not path.exists() and _has_magic(text):
            parts = Path(text).parts
            base = Path(*[p for p in parts[: next(i for i, p in enumerate(parts) if _has_magic(p))]] or ["."])
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            root = base.resolve()
            for f in matches:
                below = f.parent.resolve()  # (what a walk leaves out, a glob leaves out: earlier runs' outputs)
                marks = [d for d in [below, *below.parents] if d.is_relative_to(root) and (d / OUTPUT_MARKER).exists()]
                marked = next((d for d in marks if d != root), None)  # an output folder inside the pattern's base
                if marked is not None and marked not in left_out:  # (one line per folder, as a walk says it)
                    left_out.add(marked)
                    if marked != skip and not quiet:  # (named as the pattern wrote it, as a walk names it)
                        _say_left_out(base / marked.relative_to(root))
                if marked is not None:
                    if marked == skip and f.suffix.lower() in IMAGE_EXTENSIONS and not _written_by_a_run(f, True):
                        in_own.append(f)
                    continue
                if marks and _written_by_a_run(f, True):  # (the base is an output folder: its files, any depth)
                    continue
                take(f, root, f.relative_to(base) if f.is_relative_to(base) else Path(f.name))
            if not matches:  # reported as missing, as a missing file is (not dropped)
                found.setdefault(path, (path, Path(path.name)))
        else:
            found.setdefault(path.resolve() if path.exists() else path, (path, Path(path.name)))
    if not any(given.exists() and not given.is_dir() for given, _ in found.values()):
        missing = [os.fspath(i) for i in inputs if not Path(os.fspath(i)).expanduser().exists()]
        if len(missing) == len(inputs) == 1 and not _has_magic(missing[0]):  # (it read as an empty folder: audit)
            raise ValueError(f"{missing[0]}: no such file or folder")
        raise ValueError(f"no images found in {', '.join(os.fspath(i) for i in inputs) or 'the inputs'}")
    for resolved, reached in names.items():  # a file reached by two names: under the one with fewest links
        if len(reached) > 1:
            found[resolved] = kept = min(reached, key=lambda name: (_links_in(name[0]), str(name[0])))
            for other, _ in reached:
                if other != kept[0] and not quiet:
                    logger.warning(f"{other}: the same file as {kept[0]}, segmented once, as {kept[0]}")
    if in_own and not quiet:
        first, more = in_own[0], f" and {len(in_own) - 1} more" if len(in_own) > 1 else ""
        them = "them" if more else "it"
        where = f"in this run's output folder ({exclude})"
        logger.warning(f"{first}{more}: left out, {where}; pass {them} separately to segment {them}")
    return sorted(found.values(), key=lambda pair: str(pair[0]))


def _links_in(path: Path) -> int:
    """How many of the components of ``path`` (made absolute, not resolved) are symbolic links."""
    absolute = Path(os.path.abspath(path))
    return sum(1 for p in (absolute, *absolute.parents) if p.is_symlink())


def _folder_files(folder: Path, recursive: bool, own: Path | None = None, quiet: bool = False) -> list[Path]:
    """The files (and links) in ``folder``, sorted, with ``recursive`` those in its sub-folders too, following
    links to folders (``**`` in a glob follows them too; Path.glob's walk did not) but never into a folder twice
    (a link back up; a folder and a link to it beside each other: the folder by its own name first, the link left
    out in one line), and leaving out hidden names (a name or a folder starting with ".": .ipynb_checkpoints/) and
    what earlier runs wrote (:func:`_written_by_a_run`: a sub-folder that is a run's output folder, and a run's
    files, at any depth, in an output folder that is also the input). ``own``: this run's output folder
    (resolved), walked all the same (:func:`collect_images` leaves its files out, and names those no run wrote);
    ``quiet``: the other output folders and folders reached twice are left out without a word."""
    if not recursive:
        marked = (folder / OUTPUT_MARKER).exists()
        return sorted(f for f in folder.iterdir() if not f.name.startswith(".") and not f.is_dir() and not
                      (marked and _written_by_a_run(f, True)))  # fmt: skip
    out, seen, marked_tops = [], {}, set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        marked_below = top != os.fspath(folder) and os.path.exists(os.path.join(top, OUTPUT_MARKER))
        if real in seen or (marked_below and Path(real) != own):
            if not quiet:
                if real in seen:
                    logger.warning(f"{top}: the same folder as {seen[real]}, walked once, there")
                else:
                    _say_left_out(top)
            dirs[:] = []
            continue
        seen[real] = top
        kept = sorted(d for d in dirs if not d.startswith("."))  # (a folder before a link to one: its own name)
        dirs[:] = sorted(kept, key=lambda d: os.path.islink(os.path.join(top, d)))  # (stable: names sorted within)
        # a run's files are left out at any depth below a marked folder (sub-folders of the output hold none)
        marked = OUTPUT_MARKER in files or os.path.dirname(top) in marked_tops
        if marked:
            marked_tops.add(top)
        out += [Path(top) / name for name in files
                if not name.startswith(".") and not (marked and _written_by_a_run(Path(top) / name, True))]  # fmt: skip
    return sorted(out)


def _say_left_out(folder: str | os.PathLike) -> None:
    """The one line a folder walk or a glob says about an earlier run's output folder it leaves out."""
    logger.warning(f"{folder}: left out, an output folder of segformer predict ({OUTPUT_MARKER})")


def _written_by_a_run(f: Path, marked: bool, strict: bool = True) -> bool:
    """Whether ``f`` is a file a run of segformer predict wrote: an image carrying a run's stamp (a label map
    recording its source image, an overlay, side image or legend marked :data:`_OUTPUT_STAMP`), anywhere; in an
    output folder holding the marker (``marked``), the summaries and probabilities, named as a run names them (no
    photographs), and unless ``strict`` the images named as a run names them too (those of a version that did not
    stamp them). Strict wherever the folder may hold the user's photographs (a walk of an input folder, an output
    folder that holds inputs): a photo named car_side.jpg there is a photo, not a run's file."""
    if not f.is_file():
        return False
    name = f.name
    if marked and (name in (SUMMARY_CSV, SUMMARY_JSON) or name.endswith("_probs.npy")):
        return True
    if marked and not strict and (name == LEGEND_PNG or name.endswith(("_overlay.jpg", "_overlay.png", "_side.jpg"))):
        return True
    if f.suffix.lower() not in (".png", ".jpg"):
        return False
    try:
        with Image.open(f) as im:  # (a PNG's text chunks and a JPEG's comment precede the pixels: read at open)
            info = im.info
    except Exception:
        return False
    return (
        _SOURCE_KEY in info or info.get(_OUTPUT_KEY) == _OUTPUT_STAMP or info.get("comment") == _OUTPUT_STAMP.encode()
    )


# ----------------------------------------------------------------------------------------------- records
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
    redone: bool = False  # skip_existing found outputs of this image that another model or other options made


@dataclass
class RunReport:
    """What :func:`predict_to_folder` did: one record per input (all ranks), the output folder and files."""

    records: list[ImageRecord]
    output: Path
    class_names: list[str]
    run: dict[str, Any] = field(default_factory=dict)  # what made the outputs (:func:`_run_facts`)

    @property
    def failures(self) -> list[ImageRecord]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def redone(self) -> list[ImageRecord]:
        """The images whose existing outputs ``skip_existing`` did not keep: another model or other options made
        them (or a version that did not record what made them)."""
        return [r for r in self.records if r.redone]


# ----------------------------------------------------------------------------------------------- outputs
def case_blind(folder: str | os.PathLike) -> bool:
    """Whether the file system of ``folder`` (or of the nearest existing folder above it, where it will be made)
    takes names that differ in case alone for one file, as macOS's and Windows' do by default: there Cat.png's
    and cat.jpg's label maps, Cat.png and cat.png, would replace each other (portability audit). Probed with a
    temporary file; where none can be made, the platform's default."""
    import tempfile

    place = Path(folder).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        handle, probe = tempfile.mkstemp(prefix=".segformer-case-", suffix=".tmp", dir=place)
    except OSError:
        return sys.platform in ("darwin", "win32")
    os.close(handle)
    try:
        name = os.path.basename(probe)
        return os.path.exists(os.path.join(os.path.dirname(probe), name.upper()))
    finally:
        os.unlink(probe)


def _name_key(blind: bool) -> Callable[[str | os.PathLike], Path]:
    """The key under which a path names a file: itself, or on a case-blind file system its case-folded form."""
    return (lambda p: Path(str(p).casefold())) if blind else Path


def _output_stems(items: list[tuple[Path, Path]], blind: bool = False) -> list[Path]:
    """Relative output stems (no suffix). Inputs that share a stem (a.jpg, a.png; on a case-blind file system,
    :func:`case_blind`, also Cat.png, cat.jpg) keep their extension (a_jpg, a_png); a clash that remains is a
    ValueError naming both inputs."""
    key = _name_key(blind)
    plain = [rel.with_suffix("") for _, rel in items]
    counts: dict[Path, int] = {}
    for s in plain:
        counts[key(s)] = counts.get(key(s), 0) + 1
    stems = [
        s if counts[key(s)] == 1 else rel.with_name(rel.name.replace(".", "_"))
        for s, (_, rel) in zip(plain, items, strict=True)
    ]
    seen: dict[Path, tuple[Path, Path]] = {}  # (a clash with the run's own files, legend.png: _check_outputs)
    for stem, (src, _) in zip(stems, items, strict=True):
        if key(stem) in seen:
            first, first_stem = seen[key(stem)]
            if first_stem != stem:
                why = f"{stem}.png (names that differ in case alone are one file here)"
            elif first.name == src.name:  # (one name in two folders: it named g0_png.png, as if the suffix told them
                why = f"{Path(src.name).stem}.png"  # apart, which the user read as a bug: audit)
            else:
                why = f"{stem}.png"
            raise ValueError(
                f"{first} and {src} would both be written as {why}: give them separate --output folders, or their "
                "common parent folder with --recursive (which keeps the sub-folders)"
            )
        seen[key(stem)] = (src, stem)
    return stems


SUMMARY_JSON, SUMMARY_CSV, LEGEND_PNG = "summary.json", "summary.csv", "legend.png"
OUTPUT_MARKER = ".segformer-predict"  # written into an output folder: walks of its parent folders leave it out
_RUN_FILES = (SUMMARY_CSV, SUMMARY_JSON, LEGEND_PNG)  # what a run writes besides each image's files


def _check_outputs(items: list[tuple[Path, Path]], stems: list[Path], outputs: _Outputs, blind: bool = False) -> None:
    """ValueError, before anything is written, where a file the run would write is one of its inputs (photo.v1.png
    → photo.v1.png, a.jpg's overlay → an input a_overlay.jpg) or is written for two inputs (a.jpg's overlay and
    a_overlay.png's label map): every output path once, none an input; on a case-blind file system
    (:func:`case_blind`) names that differ in case alone are one."""
    name_key = _name_key(blind)
    owner: dict[Path, str] = {name_key((outputs.folder / name).resolve()): "the run's summary" for name in _RUN_FILES}
    shown = {key: outputs.folder / name for key, name in zip(owner, _RUN_FILES, strict=True)}  # → as --output names it
    for (src, _), stem in zip(items, stems, strict=True):
        for path in outputs.paths(stem).values():
            key = name_key(path.resolve())
            shown[key] = path
            if key in owner:
                raise ValueError(f"{src}: its output {path.name} would also be written for {owner[key]}; rename it")
            owner[key] = str(src)
    for src, _ in items:
        if (made_for := owner.get(name_key(src.resolve()))) is not None:
            what = "its own output" if made_for == str(src) else f"an output of {made_for}"
            raise ValueError(f"{src}: this input would be overwritten by {what}; choose another --output folder")
    # A run replaces only what runs wrote (a photo, a user's file where an output would go: refused). Label maps
    # record their source; the other files count as a run's in its output folder: one holding the marker, or
    # one copied without it that holds a run's label map. An empty file holds nothing to lose.
    existing = [p for p in shown if os.path.lexists(p)]
    for path in existing:
        if path.is_dir():
            raise ValueError(f"{shown[path]}: a folder is where an output would go; choose another --output folder")
    labels = {p for p in existing if p.name.endswith(".png") and _written_by_a_run(p, False)}
    marked = (outputs.folder / OUTPUT_MARKER).exists() or bool(labels)
    strict = _holds_inputs(outputs.folder, items)  # (then an unstamped car_side.jpg there may be a photo)
    foreign = [p for p in existing if p.exists() and p.stat().st_size and p not in labels
               and not _written_by_a_run(p, marked, strict)]  # fmt: skip
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ValueError(
            f"{shown[foreign[0]]}{more}: a file segformer predict did not write (or cannot read) is where an output "
            "would go; move it or choose another --output folder"
        )


def _holds_inputs(folder: Path, items: list[tuple[Path, Path]]) -> bool:
    """Whether an input of the run lies in ``folder`` or below it (an output folder that is the input folder)."""
    top = folder.resolve()
    return any(src.resolve().is_relative_to(top) for src, _ in items)


JPEG_MAX_SIDE = 65500  # libjpeg's limit on a side


def _save(path: Path, image: Image.Image, fmt: str, **params: Any) -> None:
    if fmt == "JPEG" and max(image.size) > JPEG_MAX_SIDE:  # (libjpeg said "broken data stream", and printed twice)
        w, h = image.size
        way = "--overlay-format png writes it as PNG" if path.stem.endswith("_overlay") else "leave out --side-by-side"
        raise ValueError(f"{path.name} would be {w}x{h}, over JPEG's limit of {JPEG_MAX_SIDE:,} pixels a side: {way}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(path, image, fmt, **params)


class _PythonWrites:
    """A file seen by NumPy only through ``write``: np.save then writes in chunks through Python's file write,
    whose short write on a full disk raises ENOSPC; on a real file it calls C's fwrite, whose short write it
    reported as "61440 requested and 16320 written", naming neither the file nor the reason (audit)."""

    def __init__(self, fh: Any) -> None:
        self.write = fh.write


def _write_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append ".npy" to a name without it
        np.save(_PythonWrites(fh), array)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: _write_npy(tmp, array))


_SOURCE_KEY = "segformer:source"  # the label PNG's text chunk naming the image it was made from (--skip-existing)
_OUTPUT_KEY = "segformer:output"  # the PNG text chunk (a JPEG: its comment) of a run's overlays, side images, legend
_OUTPUT_STAMP = "segformer predict"  # its text: a run's file, not a user's photograph (_written_by_a_run)


def _stamp(fmt: str) -> dict[str, Any]:
    """The save parameters that mark an overlay, side image or legend in ``fmt`` ("JPEG" or "PNG") as a run's."""
    if fmt == "JPEG":
        return {"comment": _OUTPUT_STAMP.encode()}
    info = PngImagePlugin.PngInfo()
    info.add_text(_OUTPUT_KEY, _OUTPUT_STAMP)
    return {"pnginfo": info}


_MAKER_KEY = "segformer:maker"  # and the one naming what made it: model, backend, inference options


def _source_stamp(src: Path) -> str | None:
    """Which image, as it is now: its resolved path, size and modification time (an edited or another image with
    the same output name gets another stamp); None for a missing one."""
    try:
        st = src.stat()
    except OSError:
        return None
    return json.dumps({"path": str(src.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})


def _maker_stamp(predictor: SegformerPredictor, alpha: float) -> str:
    """What makes ``predictor``'s label maps, as the JSON text each label PNG records (:data:`_MAKER_KEY`):
    ``{"alpha": the overlays' blend, "backend": ..., "model": 16 hex digits, "options": InferenceOptions.to_dict()}``.

    The model digest covers its config (class names included, but not its path or provenance: a copied checkpoint
    is the same model, :func:`segformer.backends.config_identity`), its weights as they run (their dtype,
    int8-quantised layers, or for onnxruntime the ONNX graph's bytes) and its palette.
    Left out, so that a job resumes on another machine: the device, the batch size and what only decides whether
    an image is taken (max_pixels, min_size); those change at most a few pixels at float ties, or none at all."""
    net, h = predictor.model, hashlib.sha256()
    h.update(json.dumps(config_identity(predictor.config), sort_keys=True, default=str).encode())
    if isinstance(net, OnnxRuntimeModel):
        with open(net.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    else:
        hash_state(h, net.model if isinstance(net, CompiledModel) else net)
    # (the overlays' blend too: outputs of another --alpha are redone, not kept beside new ones; and the colours,
    # which a checkpoint's labels.json may set)
    h.update(np.ascontiguousarray(predictor.palette, dtype=np.uint8).tobytes())
    stamp = {"alpha": alpha, "backend": _backend_name(net), "model": h.hexdigest()[:16],
             "options": predictor.options.to_dict()}  # fmt: skip
    return json.dumps(stamp, sort_keys=True)


def _backend_name(net: Any) -> str:
    """What runs a predictor's model: "onnxruntime", "pytorch compiled" or "pytorch"."""
    if isinstance(net, OnnxRuntimeModel):
        return "onnxruntime"
    return "pytorch compiled" if isinstance(net, CompiledModel) else "pytorch"


def _run_facts(predictor: SegformerPredictor, alpha: float, world_size: int) -> dict[str, Any]:
    """What made a run's outputs, as summary.json records it: the model as given, the backend, the weights'
    precision as they ran (a reduced precision the device would only emulate ran as float32), the device (rank
    0's under torchrun) and the number of processes, the inference options and the overlays' blend. Outputs an
    earlier run made and ``skip_existing`` kept came from the same model and options (their stamps say so), maybe
    on another device or version."""
    from . import __version__

    return {
        "model": predictor.model_name,
        "backend": _backend_name(predictor.model),
        "precision": predictor.precision,
        "device": str(predictor.device),
        "processes": world_size,
        "options": predictor.options.to_dict(),
        "alpha": alpha,
        "segformer": __version__,
    }


def _read_labels(path: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The label map at ``path`` and its PNG's text chunks, or None: missing or unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img), dict(img.info)
    except Exception:
        return None


@dataclass(frozen=True)
class _Outputs:
    """Where the files of one image go: ``paths(stem)`` names each file the run writes for it."""

    folder: Path
    overlay_format: str = "jpg"
    side_by_side_image: bool = False
    save_probs: bool = False

    def others(self, stem: Path) -> list[Path]:
        """The files that runs with other options write for ``stem`` and this one does not."""
        every = [f"{stem}_overlay.jpg", f"{stem}_overlay.png", f"{stem}_side.jpg", f"{stem}_probs.npy"]
        mine = set(self.paths(stem).values())
        return [q for q in (self.folder / name for name in every) if q not in mine]

    def paths(self, stem: Path) -> dict[str, Path]:
        p = {"label": self.folder / f"{stem}.png", "overlay": self.folder / f"{stem}_overlay.{self.overlay_format}"}
        if self.side_by_side_image:
            p["side"] = self.folder / f"{stem}_side.jpg"
        if self.save_probs:
            p["probs"] = self.folder / f"{stem}_probs.npy"
        return p


def _gather(records: list[tuple[int, ImageRecord]]) -> list[tuple[int, ImageRecord]]:
    """Every rank's records, on every rank (one process: unchanged)."""
    if not is_distributed():
        return records
    parts = all_gather_objects([(i, asdict(r)) for i, r in records])
    return [(i, ImageRecord(**r)) for part in parts for i, r in part]


# ----------------------------------------------------------------------------------------------- the run
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
    failures with their reason) and ``legend.png``. Every file is written atomically. ``skip_existing`` resumes
    this job: an image whose outputs all exist, made from it as it is now by this model with these options
    (:func:`_maker_stamp`), is "skipped" (its areas read back); outputs another model or other options made are
    redone, counted in ``RunReport.redone`` and in one warning line. With ``rank`` /
    ``world_size`` (a torchrun job) each rank takes every world_size-th image of the sorted list and rank 0
    writes the merged summary (gathered over torch.distributed, which must then be initialised). The images
    share one set of full-resolution work areas (the one ``predict_iter_with_images`` iteration of the run keeps
    them, :class:`segformer.inference.WorkAreas`: b0, 150 classes, 640×480 photos in "aligned" mode: 285 instead
    of 527 ms per image here).
    Returns the :class:`RunReport` of all images (on every rank)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if overlay_format not in ("jpg", "png"):
        raise ValueError(f"overlay_format must be 'jpg' or 'png', got {overlay_format!r}")
    out = Path(output)
    items = collect_images(inputs, recursive=recursive, exclude=output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: the output must be a folder, and this is a file; choose another --output")
    blind = case_blind(out)
    stems = _output_stems(items, blind)
    outputs = _Outputs(out, overlay_format, side_by_side_image, save_probs)
    _check_outputs(items, stems, outputs, blind)
    barrier()  # (under torchrun: every rank has looked at the folder before any writes to it)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (out / OUTPUT_MARKER).exists():
        atomic_write_text(
            out / OUTPUT_MARKER, "an output folder of segformer predict: walks of the folders above it leave it out\n"
        )
    maker = _maker_stamp(predictor, alpha)
    mine = [(i, items[i][0], stems[i]) for i in range(len(items)) if i % world_size == rank]  # this rank's share
    where = "in it or below it" if recursive else "directly in it (--recursive looks in its sub-folders)"
    records = [(i, ImageRecord(str(src), None, "failed", error=f"a folder without images {where}"))
               for i, src, _ in mine if src.is_dir()]  # fmt: skip
    mine = [item for item in mine if not item[1].is_dir()]
    todo, stale = mine, set()
    if skip_existing:
        if rank == 0:
            _sweep_killed_writes(out)
        found, todo, stale = _find_existing(mine, outputs, maker, predictor.num_classes, rank)
        records += found
    records += _segment_and_write(
        predictor,
        todo,
        outputs,
        maker,
        stale,
        {src.resolve() for src, _ in items},
        alpha=alpha,
        progress=progress and rank == 0,
        rank=rank,
    )

    merged = sorted(_gather(records), key=lambda t: t[0])
    report = RunReport([r for _, r in merged], out, predictor.class_names, _run_facts(predictor, alpha, world_size))
    if rank == 0:
        write_summary(report, predictor.palette)
        if report.redone:
            logger.warning(
                f"--skip-existing: redid {len(report.redone)} image(s) whose existing outputs another model or "
                "other options had made (model, dtype, backend, mode, sizes, scales, flip, alpha)"
            )
    return report


_KILLED_AFTER = 600  # seconds: a write takes seconds at most; older temporaries were left by a killed run


def _sweep_killed_writes(out: Path) -> None:
    """Remove the temporary files a killed run left in ``out`` (a probability file is megabytes), those over
    :data:`_KILLED_AFTER` old: another process writing into the folder now (torchrun's ranks) keeps its own; one
    line says how many went."""
    removed = remove_killed_writes(out, _KILLED_AFTER)
    if removed:
        logger.warning(f"--skip-existing: removed {removed} temporary file(s) a killed run left in {out}")


def _find_existing(
    items: list[tuple[int, Path, Path]], outputs: _Outputs, maker: str, num_classes: int, rank: int
) -> tuple[list[tuple[int, ImageRecord]], list[tuple[int, Path, Path]], set[int]]:
    """Split (index, source, stem) items into records of those whose outputs all exist beside a label map made
    from that very image as it is now (:data:`_SOURCE_KEY`) by ``maker`` (:func:`_maker_stamp`): "skipped", with
    the class areas read back from it; the items still to segment; and the indices among those whose label map
    came from this image but another model or other options (or a version that recorded no maker): redone, not
    skipped, and reported so."""
    records: list[tuple[int, ImageRecord]] = []
    todo: list[tuple[int, Path, Path]] = []
    stale: set[int] = set()
    for i, src, stem in items:
        p = outputs.paths(stem)
        found, source = _read_labels(p["label"]), _source_stamp(src)
        if found is None or source is None or found[1].get(_SOURCE_KEY) != source:
            todo.append((i, src, stem))  # none yet, or made from another image or an earlier version of this one
            continue
        existing, text = found
        if text.get(_MAKER_KEY) != maker or (existing.size and int(existing.max()) >= num_classes):
            todo.append((i, src, stem))
            stale.add(i)
            continue
        if not all(q.exists() for q in p.values()):  # (another --side-by-side or --save-probs than before)
            todo.append((i, src, stem))
            continue
        counts = np.bincount(existing.reshape(-1).astype(np.int64), minlength=num_classes)[:num_classes]
        h, w = existing.shape
        records.append((i, ImageRecord(str(src), str(p["label"]), "skipped", w, h, counts.tolist(), rank=rank)))
    return records, todo, stale


def _segment_and_write(
    predictor: SegformerPredictor,
    todo: list[tuple[int, Path, Path]],
    outputs: _Outputs,
    maker: str,
    stale: set[int],
    protected: set[Path],
    *,
    alpha: float,
    progress: bool,
    rank: int,
) -> list[tuple[int, ImageRecord]]:
    """Segment the (index, source, stem) items and write each one's outputs, stamped with ``maker``; a failure is
    recorded, not raised, and the image's outputs are removed: an earlier run's (another model's, or made from the
    image before it broke) or the part this run wrote before a write failed, so that no mask in the folder
    disagrees with the run's legend and summary. The items in ``stale`` (indices) are redone: their outputs were
    another model's or other options'. ``protected``: every input of the run (every rank's, resolved), never
    removed."""
    from tqdm.auto import tqdm

    records: list[tuple[int, ImageRecord]] = []
    bar = tqdm(total=len(todo), unit="img", desc="segmenting", disable=not progress, file=sys.stderr)
    by_source = {src: (i, stem) for i, src, stem in todo}
    earlier = {i: leftovers for i, _, stem in todo if (leftovers := _leftovers(outputs, stem, protected))}
    results = predictor.predict_iter_with_images([s for _, s, _ in todo], return_probs=outputs.save_probs)
    for src, image, result in results:
        i, stem = by_source[src]  # type: ignore[index]
        if isinstance(result, ImageError) or image is None:
            rec = ImageRecord(str(src), None, "failed", error=str(result))
        else:
            try:
                rec = _write_outputs(
                    src,
                    image,
                    result,
                    outputs.paths(stem),
                    predictor.num_classes,
                    predictor.palette,
                    alpha,
                    outputs.overlay_format,
                    maker,
                )
            except (OSError, ValueError) as exc:  # e.g. disk full: report it like a bad image and go on
                rec = ImageRecord(str(src), None, "failed", error=f"cannot write outputs: {first_line(exc)}")
        if rec.status == "failed":  # its outputs, an earlier run's or half of this one's, are not this run's
            for path in outputs.paths(stem).values():
                path.unlink(missing_ok=True)
        # what an earlier run with other options made for this image (its side-by-side, probabilities, overlay in
        # the other format: another model's, beside this run's mask, audit), where its label map vouched for them
        for path in earlier.get(i, ()):
            path.unlink(missing_ok=True)
        rec.rank, rec.redone = rank, i in stale
        records.append((i, rec))
        bar.update(1)
    bar.close()
    return records


def _leftovers(outputs: _Outputs, stem: Path, protected: set[Path]) -> list[Path]:
    """The files an earlier run with other options wrote for ``stem`` (:meth:`_Outputs.others`) that this run
    does not write, where that run's label map, stamped with its source, vouches for them: the images among them
    stamped as a run's (:func:`_written_by_a_run`, strict: a photo car_side.jpg beside car.jpg's label map is no
    side image); never one of the ``protected`` inputs."""
    found = [q for q in outputs.others(stem) if q.resolve() not in protected and _written_by_a_run(q, True)]
    if not found:
        return []
    try:
        with Image.open(outputs.paths(stem)["label"]) as img:  # (the stamps precede the pixels: no decoding)
            ours = _SOURCE_KEY in img.info
    except Exception:
        return []
    return found if ours else []


def _write_outputs(
    src: Path,
    image: Image.Image,
    result: Segmentation,
    p: dict[str, Path],
    num_classes: int,
    palette: np.ndarray,
    alpha: float,
    overlay_format: str,
    maker: str,
) -> ImageRecord:
    """Write one image's files, the label map last: its stamps (:data:`_SOURCE_KEY`, :data:`_MAKER_KEY`) then
    vouch for the files beside it, which a run killed or failing half-way may have left from an earlier run."""
    labels = result.labels
    blend = overlay(image, labels, palette, alpha)
    if overlay_format == "jpg":
        _save(p["overlay"], blend, "JPEG", quality=92, **_stamp("JPEG"))
    else:
        _save(p["overlay"], blend, "PNG", **_stamp("PNG"))
    if "side" in p:
        _save(p["side"], side_by_side([image, colorize(labels, palette)]), "JPEG", quality=92, **_stamp("JPEG"))
    if "probs" in p and result.probs is not None:
        _save_npy(p["probs"], result.probs.astype(np.float16))
    stamp = PngImagePlugin.PngInfo()
    stamp.add_text(_SOURCE_KEY, _source_stamp(src) or "")
    stamp.add_text(_MAKER_KEY, maker)
    _save(p["label"], label_image(labels, palette), "PNG", pnginfo=stamp)
    counts = result.areas(num_classes)
    return ImageRecord(str(src), str(p["label"]), "ok", labels.shape[1], labels.shape[0], counts.tolist())


def write_summary(report: RunReport, palette: np.ndarray) -> None:
    """``summary.csv`` (one row per image and present class; failed images one row with the error),
    ``summary.json`` (what made the run, :func:`_run_facts`; per image every present class with pixels and
    percent; run totals) and ``legend.png``
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
                rows.append(
                    [
                        r.image,
                        r.label,
                        r.status,
                        r.width,
                        r.height,
                        c["id"],
                        c["name"],
                        c["pixels"],
                        f"{c['percent']:.6f}",
                        "",
                    ]
                )
        images.append(entry)
    counts = {s: sum(r.status == s for r in report.records) for s in ("ok", "skipped", "failed")}
    all_px = int(totals.sum())
    summary = {
        "run": report.run,
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
    atomic_write_text(out / SUMMARY_JSON, json.dumps(summary, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # (text mode writes the platform's: "\r\n" gave "\r\r\n" on Windows)
    header = ["image", "label", "status", "width", "height", "class_id", "class_name", "pixels", "percent"]
    writer.writerow([*header, "error"])
    writer.writerows(rows)
    atomic_write_text(out / SUMMARY_CSV, buf.getvalue(), escape_bytes=True)  # (pandas refused it: audit)
    _save(out / LEGEND_PNG, legend(names, palette), "PNG", **_stamp("PNG"))


__all__ = ["ImageRecord", "RunReport", "collect_images", "predict_to_folder", "write_summary"]
