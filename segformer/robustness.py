"""Robustness study: a model's mIoU on corrupted copies of an evaluation set (the paper's Cityscapes-C study).

Every cell of the study, (corruption, severity), is one :func:`segformer.evaluate.evaluate` pass over a view of
the data set whose images are corrupted on the fly (:class:`CorruptedDataset`; deterministic per image,
corruption, severity and seed; nothing is written over the data), plus one clean pass. From the cells:

- the mIoU per corruption × severity, the mean per corruption (over its severities), per category and overall
  (the mean of the per-corruption means, each corruption counting once); a mean is only given when every cell it
  covers has a value: one over a cell not evaluated (or undefined) is missing too, never a mean of fewer cells;
- the relative robustness, corrupted mIoU / clean mIoU, per corruption and overall.

With an ``output`` folder every finished cell is saved at once (atomically) to ``robustness_partial.json``
there, together with what made it (the model's weights digest, the data, the inference options, amp and seed);
a later run with the same folder skips the finished cells, so a study killed half-way restarts where it
stopped, and refuses (one line) a folder whose cells were made with another model, data or options. Under
torchrun every rank evaluates its share of each cell's images and rank 0 writes the files.

>>> result = run_study(model, dataset, corruptions=["fog", "snow"], severities=(1, 3, 5), output="robust")
>>> print(result.format_table()); result.to_dict()["overall_relative"]
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .corruptions import (
    CORRUPTION_NAMES,
    PAPER_SEVERITIES,
    VERSION,
    category_of,
    check_name,
    check_severity,
    corrupt,
    corruption_rng,
    require_scipy,
)
from .data.datasets import SegmentationDataset
from .distributed import all_gather_objects, get_rank, unwrap_model
from .evaluate import evaluate
from .fileio import atomic_write, atomic_write_text
from .inference import InferenceOptions, resolve_options
from .metrics import metrics_to_json

PARTIAL_FILE = "robustness_partial.json"
RESULT_FILE = "robustness.json"
HEATMAP_FILE = "robustness.png"
FORMAT = 1  # of robustness_partial.json


class CorruptedDataset(torch.utils.data.Dataset):
    """``dataset`` with every image under corruption ``name`` at ``severity``: item i is what ``dataset[(i, i)]``
    would be had its image been ``corrupt(image, name, severity, rng=corruption_rng(i, name, severity, seed))``.

    ``dataset`` must offer ``read(i)`` → (uint8 image (H, W, 3), mask) and ``transform`` (as
    :class:`~segformer.data.datasets.SegmentationDataset` does); its labels, class names and length are
    those of this view.
    """

    def __init__(self, dataset: SegmentationDataset, name: str, severity: int, *, seed: int = 0):
        self.dataset = dataset
        self.corruption = check_name(name)
        self.severity = check_severity(severity)
        self.seed = int(seed)
        self.id2label = dataset.id2label
        self.ignore_index = dataset.ignore_index
        self.name = f"{dataset.name} [{name} {severity}]"

    @property
    def num_labels(self) -> int:
        return self.dataset.num_labels

    def __len__(self) -> int:
        return len(self.dataset)

    def corrupted_image(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(corrupted uint8 image (H, W, 3), mask ids (H, W)) of sample ``index``."""
        image, mask = self.dataset.read(index)
        rng = corruption_rng(index, self.corruption, self.severity, self.seed)
        return corrupt(np.ascontiguousarray(image), self.corruption, self.severity, rng=rng), mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.corrupted_image(index)
        return self.dataset.transform(image, mask, np.random.default_rng(index))


def study_severities(corruptions: Sequence[str], severities: Sequence[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Corruption → the severities to evaluate, in the study's order (noise, blur, weather, digital):
    ``severities`` for every corruption when given, else the paper's
    (:data:`~segformer.corruptions.PAPER_SEVERITIES`: noise 1–3, the rest 1–5)."""
    if not corruptions:
        raise ValueError("a robustness study needs at least one corruption")
    chosen = None if severities is None else tuple(sorted({check_severity(s) for s in severities}))
    if chosen == ():
        raise ValueError("a robustness study needs at least one severity")
    wanted = {check_name(name) for name in corruptions}
    return {name: chosen or PAPER_SEVERITIES[name] for name in CORRUPTION_NAMES if name in wanted}


def _cell_key(name: str, severity: int) -> str:
    return f"{name}/{severity}"


def model_digest(model: nn.Module) -> str:
    """SHA-256 of what the model predicts with: its class, the names, shapes, dtypes and values of its state
    dict and, for a module that runs an exported graph file (``path``, e.g. the onnxruntime backend), the file."""
    net = unwrap_model(model)
    digest = hashlib.sha256(type(net).__name__.encode())
    path = getattr(net, "path", None)
    if isinstance(path, (str, os.PathLike)) and Path(path).is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    for key, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of ``values``, or None unless every one of them is a number: a mean over fewer cells than the
    study has would be compared with complete ones as if it were one of them."""
    if not values or any(v is None or math.isnan(v) for v in values):
        return None
    return sum(values) / len(values)


def _ratio(value: float | None, clean: float | None) -> float | None:
    if value is None or clean is None or not clean > 0:
        return None
    return value / clean


@dataclass
class RobustnessResult:
    """The cells of a study: ``clean`` (the metrics of the clean pass) and ``cells[(name, severity)]`` (the
    metrics of each corrupted pass: mIoU, aAcc, mAcc, IoU per class; fractions, None where undefined)."""

    clean: dict[str, Any]
    cells: dict[tuple[str, int], dict[str, Any]]
    severities: dict[str, tuple[int, ...]]
    num_images: int = 0
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    heatmap: Path | None = field(default=None, compare=False)  # the heat map run_study drew; None where it did not

    @property
    def corruptions(self) -> list[str]:
        return list(self.severities)

    @property
    def clean_miou(self) -> float | None:
        return self.clean.get("mIoU")

    def miou(self, name: str, severity: int) -> float | None:
        """The mIoU of a cell; None where it was not evaluated or is undefined."""
        cell = self.cells.get((name, severity))
        value = None if cell is None else cell.get("mIoU")
        return None if value is None or math.isnan(value) else value

    def missing_cells(self) -> list[tuple[str, int]]:
        """The (corruption, severity) cells of the study without an mIoU (not evaluated, or undefined), in the
        study's order. Every mean that covers one of them is None."""
        return [(n, s) for n, sev in self.severities.items() for s in sev if self.miou(n, s) is None]

    def mean(self, name: str) -> float | None:
        """The mean mIoU of ``name`` over its severities; None unless every one of them has a value."""
        return _mean([self.miou(name, s) for s in self.severities[name]])

    def relative(self, name: str) -> float | None:
        """Relative robustness of ``name``: its mean mIoU / the clean mIoU."""
        return _ratio(self.mean(name), self.clean_miou)

    def category_means(self) -> dict[str, float | None]:
        """Category → the mean of its corruptions' means; None unless every one of them has a mean."""
        groups: dict[str, list[float | None]] = {}
        for name in self.corruptions:
            groups.setdefault(category_of(name), []).append(self.mean(name))
        return {category: _mean(values) for category, values in groups.items()}

    @property
    def overall_mean(self) -> float | None:
        """The mean of the per-corruption means (every corruption counts once); None unless every one of them
        has a mean."""
        return _mean([self.mean(name) for name in self.corruptions])

    @property
    def overall_relative(self) -> float | None:
        return _ratio(self.overall_mean, self.clean_miou)

    def to_dict(self) -> dict[str, Any]:
        """JSON values: ``clean_mIoU``, ``mIoU`` {corruption: {severity: value}}, ``mean``, ``relative``,
        ``categories``, ``overall_mean``, ``overall_relative`` (fractions; null for a mean over a missing cell),
        ``missing`` (the cells without a value, ``"name/severity"``), ``severities``, ``cells`` (every cell's
        metrics, keyed ``"clean"`` and ``"name/severity"``), ``num_images``, ``seed``, ``options``."""
        categories = self.category_means()
        return {
            "clean_mIoU": self.clean_miou,
            "mIoU": {n: {str(s): self.miou(n, s) for s in sev} for n, sev in self.severities.items()},
            "mean": {n: self.mean(n) for n in self.corruptions},
            "relative": {n: self.relative(n) for n in self.corruptions},
            "categories": {c: {"mean": v, "relative": _ratio(v, self.clean_miou)} for c, v in categories.items()},
            "overall_mean": self.overall_mean,
            "overall_relative": self.overall_relative,
            "missing": [_cell_key(n, s) for n, s in self.missing_cells()],
            "severities": {n: list(s) for n, s in self.severities.items()},
            "num_images": self.num_images,
            "seed": self.seed,
            "options": self.options,
            "cells": {
                "clean": metrics_to_json(self.clean),
                **{_cell_key(n, s): metrics_to_json(c) for (n, s), c in self.cells.items()},
            },
        }

    def format_table(self) -> str:
        """A plain-text table: mIoU (%) per corruption and severity, its mean and relative robustness, then
        the category and overall means; "-" where there is no value (a mean over a missing cell included), and
        a last line naming the missing cells when there are any."""

        def pct(v: float | None) -> str:
            return "     -" if v is None or math.isnan(v) else f"{100 * v:6.2f}"

        def rel(v: float | None) -> str:
            return "       -" if v is None else f"{v:8.3f}"

        width = max(len("corruption"), *(len(n) for n in self.corruptions), len("mean (weather)"))
        columns = sorted({s for sev in self.severities.values() for s in sev})
        head = f"{'corruption':<{width}} " + " ".join(f"{'s' + str(s):>6}" for s in columns)
        head += f" {'mean':>6} {'relative':>8}"
        rule = "-" * len(head)
        lines = [f"robustness: mIoU (%) on {self.num_images} images; clean {pct(self.clean_miou).strip()}", head, rule]
        for name in self.corruptions:
            cells = " ".join(pct(self.miou(name, s)) if s in self.severities[name] else "     ." for s in columns)
            lines.append(f"{name:<{width}} {cells} {pct(self.mean(name))} {rel(self.relative(name))}")
        lines.append(rule)
        pad = " " * (7 * len(columns))
        categories = self.category_means()
        if len(categories) > 1:
            for category, value in categories.items():
                label = f"mean ({category})"
                lines.append(f"{label:<{width}} {pad}{pct(value)} {rel(_ratio(value, self.clean_miou))}")
        lines.append(f"{'mean':<{width}} {pad}{pct(self.overall_mean)} {rel(self.overall_relative)}")
        missing = self.missing_cells()
        if missing:
            names = ", ".join(f"{n} s{s}" for n, s in missing)
            lines.append(f"missing: {names} (not evaluated or undefined; the means over them are not given)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ saved cells
def study_fingerprint(
    model: nn.Module,
    dataset: SegmentationDataset,
    options: InferenceOptions,
    *,
    num_images: int,
    amp: str | None,
    seed: int,
) -> dict[str, Any]:
    """What the cells of a study depend on (saved with them, compared on resume)."""
    files = hashlib.sha256()
    for image, mask in list(getattr(dataset, "pairs", []))[:num_images]:
        for path in (Path(image), Path(mask)):
            files.update(f"{path.name}:{path.stat().st_size if path.exists() else -1};".encode())
    spec = getattr(dataset, "spec", None)
    return {
        "model": model_digest(model),
        "data": {
            "name": dataset.name,
            "num_images": num_images,
            "classes": [str(n) for n in dataset.id2label.values()],
            "labels": spec.describe() if spec is not None else None,
            "files": files.hexdigest(),
        },
        "options": options.to_dict(),
        "amp": amp if amp not in (None, "none", "fp32") else None,
        "seed": int(seed),
        "corruptions_version": VERSION,
    }


_WHAT = {"model": "model (other weights or backend)", "data": "data", "options": "inference options", "amp": "--amp",
         "seed": "corruption seed", "corruptions_version": "version of the corruptions"}  # fmt: skip


def load_partial(path: Path, fingerprint: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The finished cells saved in ``path`` ({} when there is none), after checking they were made as
    ``fingerprint`` says; a mismatch or an unreadable file is a one-line ValueError."""
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        made_with, cells = saved["fingerprint"], saved["cells"]
        if saved.get("format") != FORMAT or not isinstance(cells, dict):
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a readable robustness study ({exc}); delete it to start the study over"
        ) from None
    differ = [_WHAT.get(k, k) for k in fingerprint if made_with.get(k) != fingerprint[k]]
    if differ:
        raise ValueError(
            f"{path} holds a study made with another {', '.join(differ)}; use another output folder or delete "
            "it to start over"
        )
    return cells


def _save_partial(path: Path, fingerprint: Mapping[str, Any], cells: Mapping[str, Any]) -> None:
    text = json.dumps({"format": FORMAT, "fingerprint": fingerprint, "cells": cells}, indent=1, allow_nan=False)
    atomic_write_text(path, text + "\n")


# ------------------------------------------------------------------------------------------------ study
class _Progress:
    """One line per finished cell (stderr, rank 0); on a terminal also a bar over the cells."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled and get_rank() == 0
        self.total, self.done, self.start = total, done, time.perf_counter()
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc="robustness", unit="cell", leave=False)

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def cell(self, label: str, miou: float | None, note: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        value = "n/a" if miou is None or math.isnan(miou) else f"{100 * miou:.2f}"
        self.say(f"robustness {self.done}/{self.total}: {label}: mIoU {value}" + (f" ({note})" if note else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_study(
    model: nn.Module,
    dataset: SegmentationDataset,
    options: InferenceOptions | None = None,
    *,
    corruptions: Sequence[str] = CORRUPTION_NAMES,
    severities: Sequence[int] | None = None,
    output: str | os.PathLike | None = None,
    seed: int = 0,
    amp: str | None = None,
    max_images: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    clean_metrics: Mapping[str, Any] | None = None,
) -> RobustnessResult:
    """Evaluate ``model`` on ``dataset`` clean and under each corruption and severity (see the module doc).

    ``corruptions``: names from :data:`~segformer.corruptions.CORRUPTION_NAMES` (default: all 16; evaluated
    and reported in the study's order). ``severities``: the severities of every corruption (default: the
    paper's, noise 1–3 and the rest 1–5). ``options``, ``amp``, ``max_images``, ``num_workers``: as for
    :func:`~segformer.evaluate.evaluate`. ``seed``: the corruptions' seed. ``output``: a folder for the saved
    cells (resume), ``robustness.json`` and, with matplotlib, the heat map ``robustness.png`` (the result's
    ``heatmap``; without matplotlib none, and an earlier run's is removed); None keeps everything in memory.
    ``clean_metrics``: the clean evaluation, when the caller already ran it with the same model, data and
    options. ``progress``: a line per finished cell on stderr (and a bar on a terminal).
    """
    options = resolve_options(options, {})
    plan = study_severities(corruptions, severities)
    require_scipy(list(plan))  # before the first pass, not after the clean one and the noise
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (it seeds numpy's SeedSequence), got {seed!r}")
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    folder = None if output is None else Path(output)
    partial = None if folder is None else folder / PARTIAL_FILE

    # Rank 0 reads and checks the saved cells; every rank gets the same view of them (or the same error).
    if get_rank() == 0:
        try:
            fingerprint = study_fingerprint(model, dataset, options, num_images=count, amp=amp, seed=seed)
            saved = {} if partial is None else load_partial(partial, fingerprint)
            shared: tuple[Any, ...] = ("ok", fingerprint, saved)
        except ValueError as exc:
            shared = ("error", str(exc), None)
    else:
        shared = ("", None, None)
    status, fingerprint, saved = all_gather_objects(shared)[0]
    if status == "error":
        raise ValueError(fingerprint)
    cells: dict[str, Any] = dict(saved)
    if folder is not None and get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)

    todo: list[tuple[str, str, int]] = [("clean", "", 0)]
    todo += [(_cell_key(name, s), name, s) for name, sev in plan.items() for s in sev]
    done = sum(key in cells for key, _, _ in todo)
    bar = _Progress(len(todo), 0, progress)
    if done:
        bar.say(f"robustness: resuming, {done} of {len(todo)} cells already in {partial}")
    try:
        for key, name, severity in todo:
            label = "clean" if key == "clean" else f"{name} severity {severity}"
            if key in cells:
                bar.cell(label, cells[key].get("mIoU"), "saved")
                continue
            if key == "clean" and clean_metrics is not None:
                cells[key] = metrics_to_json(dict(clean_metrics))
            else:
                data = dataset if key == "clean" else CorruptedDataset(dataset, name, severity, seed=seed)
                metrics = evaluate(
                    model, data, options, amp=amp, max_images=max_images, num_workers=num_workers, progress=progress
                )
                cells[key] = metrics_to_json(metrics)
            if partial is not None and get_rank() == 0:
                _save_partial(partial, fingerprint, cells)
            bar.cell(label, cells[key].get("mIoU"))
    finally:
        bar.close()
    if partial is not None and get_rank() == 0:
        _save_partial(partial, fingerprint, cells)
    result = RobustnessResult(
        clean=cells["clean"],
        cells={(name, s): cells[_cell_key(name, s)] for name, sev in plan.items() for s in sev},
        severities=plan,
        num_images=count,
        seed=int(seed),
        options=options.to_dict(),
    )
    if folder is not None and get_rank() == 0:
        write_result(folder / RESULT_FILE, result)
        result.heatmap = plot_heatmap(result, folder / HEATMAP_FILE, missing_ok=True)
        if result.heatmap is None:  # without matplotlib: an earlier run's map would not match these cells
            (folder / HEATMAP_FILE).unlink(missing_ok=True)
    return result


def write_result(path: str | os.PathLike, result: RobustnessResult) -> None:
    """``result.to_dict()`` as JSON, atomically."""
    atomic_write_text(Path(path), json.dumps(result.to_dict(), indent=2) + "\n")


def _pyplot(missing_ok: bool) -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        if missing_ok:
            return None
        raise RuntimeError('drawing the robustness heat map needs matplotlib: pip install "segformer[plot]"') from None
    return plt


def plot_heatmap(result: RobustnessResult, path: str | os.PathLike, *, missing_ok: bool = False) -> Path | None:
    """Draw the study as a heat map PNG: one row per corruption (grouped by category), one column per severity
    plus the mean, each cell's mIoU (%) written in it; the row labels carry the relative robustness. Returns
    the path, or None without matplotlib when ``missing_ok``."""
    plt = _pyplot(missing_ok)
    if plt is None:
        return None
    names = result.corruptions
    columns = sorted({s for sev in result.severities.values() for s in sev})
    grid = np.full((len(names), len(columns) + 1), np.nan)
    missing = np.zeros(grid.shape, dtype=bool)  # cells of the study (or means) without a value: marked "–"
    for i, name in enumerate(names):
        for j, s in enumerate(columns):
            value = result.miou(name, s) if s in result.severities[name] else None
            grid[i, j] = np.nan if value is None else 100 * value
            missing[i, j] = value is None and s in result.severities[name]
        mean = result.mean(name)
        grid[i, -1] = np.nan if mean is None else 100 * mean
        missing[i, -1] = mean is None
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    figure, axis = plt.subplots(figsize=(1.0 * (len(columns) + 1) + 3.2, 0.42 * len(names) + 1.6))
    image = axis.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                colour = "black" if grid[i, j] > 60 else "white"
                axis.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8, color=colour)
            elif missing[i, j]:
                axis.text(j, i, "–", ha="center", va="center", fontsize=8, color="black")
    axis.set_xticks(
        range(len(columns) + 1), [f"severity {s}" if len(columns) < 4 else str(s) for s in columns] + ["mean"]
    )
    if len(columns) >= 4:
        axis.set_xlabel("severity")
    labels = []
    for name in names:
        relative = result.relative(name)
        labels.append(f"{name} ({relative:.2f})" if relative is not None else name)
    axis.set_yticks(range(len(names)), labels)
    axis.axvline(len(columns) - 0.5, color="white", linewidth=2)
    clean = result.clean_miou
    overall = result.overall_relative
    title = "mIoU (%) under corruption"
    if clean is not None:
        title += f"; clean {100 * clean:.1f}"
    if overall is not None:
        title += f", relative {overall:.2f}"
    if result.missing_cells():
        title += f"; {len(result.missing_cells())} cell(s) missing (–)"
    axis.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axis, fraction=0.04, pad=0.02)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)
    return path


__all__ = [
    "HEATMAP_FILE",
    "PARTIAL_FILE",
    "RESULT_FILE",
    "CorruptedDataset",
    "RobustnessResult",
    "load_partial",
    "model_digest",
    "plot_heatmap",
    "run_study",
    "study_fingerprint",
    "study_severities",
    "write_result",
]
