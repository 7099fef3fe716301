"""A self-contained evaluation report: ``report.html`` and the pictures it shows, in one folder.

:func:`evaluate_details` runs :func:`segformer.evaluate.evaluate` and keeps, besides the metrics, the confusion
matrix and every image's own mIoU (with the predictions of the k worst images); :func:`write_report` writes

- ``report.html``: the summary (mIoU, aAcc, mAcc, model, data, protocol), the per-class table, and the pictures
  below; plain HTML with inline CSS and relative links only, so it opens from disk with no network;
- ``confusion_matrix.png``: the confusion matrix normalised per true class (rows sum to 1), class names on
  both axes;
- ``per_class_iou.png``: per-class IoU bars, the mIoU marked;
- ``worst_NN.png``: the k images with the lowest mIoU as image | ground truth | prediction, and
  ``legend.png`` (the class colours);
- ``metrics.json``: the metrics (and the robustness study, when given);
- ``robustness.png``: the robustness heat map, when a :class:`~segformer.robustness.RobustnessResult` is given.

Needs matplotlib (``pip install "segformer[plot]"``).

>>> details = evaluate_details(model, dataset, options, worst=8)
>>> write_report("report", details, dataset, model_name="runs/b0/best", options=options)
"""

from __future__ import annotations

import heapq
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image
from torch import nn

from .data.datasets import SegmentationDataset
from .distributed import all_gather_objects
from .evaluate import evaluate
from .fileio import atomic_save_image, atomic_write, atomic_write_text
from .inference import InferenceOptions, resolve_options
from .metrics import confusion_matrix, metrics_to_json
from .robustness import RobustnessResult, plot_heatmap
from .visualize import class_names, colorize, legend, palette_for, plot_text, side_by_side

REPORT_FILE = "report.html"
MAX_TRIPLET_WIDTH = 1500  # pixels; wider triplets are scaled down for the page


@dataclass
class EvalDetails:
    """An evaluation with what a report shows: ``metrics`` (as :func:`~segformer.evaluate.evaluate` returns),
    ``confusion`` ((K, K) int64, rows = true class), ``scores`` ((index, mIoU of that image or None) for every
    image, by index) and ``worst`` ((index, mIoU, predicted ids (H, W)) of the lowest-scoring images, worst
    first)."""

    metrics: dict[str, Any]
    confusion: np.ndarray
    scores: list[tuple[int, float | None]] = field(default_factory=list)
    worst: list[tuple[int, float, np.ndarray]] = field(default_factory=list)


def image_miou(conf: np.ndarray) -> float | None:
    """The mIoU of one image's confusion matrix: the mean IoU over the classes present in its labels or its
    prediction; None when it has no labelled pixel."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    if conf.sum() == 0 or not present.any():
        return None
    return float((tp[present] / union[present]).mean())


@torch.no_grad()
def evaluate_details(
    model: nn.Module,
    dataset: SegmentationDataset,
    options: InferenceOptions | None = None,
    *,
    worst: int = 8,
    amp: str | None = None,
    max_images: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> EvalDetails:
    """:func:`~segformer.evaluate.evaluate` plus the confusion matrix, each image's mIoU and the predictions
    of the ``worst`` lowest-scoring images (ties: the lower index first). Under torchrun every rank returns
    the details of the whole set."""
    if worst < 0:
        raise ValueError(f"worst must be >= 0, got {worst}")
    options = resolve_options(options, {})
    k = dataset.num_labels
    total = np.zeros((k, k), dtype=np.int64)
    scores: list[tuple[int, float | None]] = []
    heap: list[tuple[float, int, np.ndarray]] = []  # the `worst` lowest (mIoU, index), as (-mIoU, -index, pred)

    def collect(index: int, pred: torch.Tensor, labels: torch.Tensor) -> None:
        conf = confusion_matrix(pred, labels, k, dataset.ignore_index).cpu().numpy()
        total[...] += conf
        score = image_miou(conf)
        scores.append((index, score))
        if score is None or worst == 0:
            return
        ids = pred.cpu().numpy().astype(np.uint8 if k <= 256 else np.uint16)
        item = (-score, -index, ids)
        if len(heap) < worst:
            heapq.heappush(heap, item)
        elif item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)

    metrics = evaluate(
        model,
        dataset,
        options,
        amp=amp,
        max_images=max_images,
        num_workers=num_workers,
        progress=progress,
        on_image=collect,
    )
    parts = all_gather_objects((total, scores, [(-s, -i, ids) for s, i, ids in heap]))
    confusion = sum((p[0] for p in parts), np.zeros((k, k), dtype=np.int64))
    all_scores = sorted((item for p in parts for item in p[1]), key=lambda item: item[0])
    candidates = sorted((item for p in parts for item in p[2]), key=lambda item: (item[0], item[1]))
    return EvalDetails(metrics, confusion, all_scores, [(i, s, ids) for s, i, ids in candidates[:worst]])


# ---------------------------------------------------------------------------------------------- pictures
def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError('the evaluation report needs matplotlib: pip install "segformer[plot]"') from None
    return plt


def require_plotting() -> None:
    """A one-line RuntimeError now (before a long evaluation) when matplotlib is missing."""
    _pyplot()


def _save_figure(plt: Any, figure: Any, path: Path, dpi: int) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))
    plt.close(figure)


def plot_confusion(confusion: np.ndarray, names: Sequence[str], path: str | os.PathLike) -> Path:
    """The confusion matrix normalised per true class (each row sums to 1; a class without pixels is grey),
    true classes down, predicted classes across, class names on both axes; values written in the cells for up
    to 25 classes."""
    plt = _pyplot()
    conf = np.asarray(confusion, dtype=np.float64)
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.full_like(conf, np.nan), where=rows > 0)
    k = len(names)
    side = min(max(4.5, 0.32 * k + 2.8), 48.0)
    font = 9 if k <= 25 else max(4, 9 - k // 30)
    figure, axis = plt.subplots(figsize=(side + 1.0, side))
    cmap = plt.get_cmap("Blues").with_extremes(bad="#cccccc")
    image = axis.imshow(np.ma.masked_invalid(norm), cmap=cmap, vmin=0.0, vmax=1.0)
    axis.set_xticks(range(k), [plot_text(n) for n in names], rotation=90, fontsize=font)
    axis.set_yticks(range(k), [plot_text(n) for n in names], fontsize=font)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title("confusion matrix (each true class's pixels, as fractions)", fontsize=10)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if not np.isnan(norm[i, j]) and (norm[i, j] >= 0.005 or i == j):
                    colour = "white" if norm[i, j] > 0.55 else "black"
                    axis.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.tight_layout()
    path = Path(path)
    _save_figure(plt, figure, path, dpi=100 if k <= 60 else 72)
    return path


def plot_class_iou(metrics: Mapping[str, Any], palette: np.ndarray, path: str | os.PathLike) -> Path:
    """Horizontal bars of the per-class IoU (%) in class order, each in its class colour, the mIoU dashed;
    classes without a value are marked n/a."""
    plt = _pyplot()
    names = list(metrics["IoU"])
    values = [metrics["IoU"][n] for n in names]
    k = len(names)
    figure, axis = plt.subplots(figsize=(7.5, min(0.26 * k + 1.4, 60.0)))
    positions = np.arange(k)
    widths = [0.0 if v is None else 100 * v for v in values]
    colours = [tuple(int(c) / 255 for c in palette[i]) if i < len(palette) else (0.5, 0.5, 0.5) for i in range(k)]
    axis.barh(positions, widths, color=colours, edgecolor="black", linewidth=0.4)
    for y, v in zip(positions, values, strict=True):
        axis.text(
            (0 if v is None else 100 * v) + 1, y, "n/a" if v is None else f"{100 * v:.1f}", va="center", fontsize=7
        )
    miou = metrics.get("mIoU")
    if miou is not None and not (isinstance(miou, float) and math.isnan(miou)):
        axis.axvline(100 * miou, color="black", linestyle="--", linewidth=1, label=f"mIoU {100 * miou:.1f}")
        axis.legend(loc="lower right", fontsize=8)
    axis.set_yticks(positions, [plot_text(n) for n in names], fontsize=8 if k <= 40 else 6)
    axis.invert_yaxis()
    axis.set_xlim(0, 108)
    axis.set_xlabel("IoU (%)")
    axis.set_title("IoU per class", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    _save_figure(plt, figure, path, dpi=100)
    return path


def triplet(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, palette: np.ndarray) -> Image.Image:
    """image | ground truth | prediction side by side (ignored pixels black), scaled down to at most
    :data:`MAX_TRIPLET_WIDTH` pixels wide."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if picture.size != (truth.shape[1], truth.shape[0]):
        picture = picture.resize((truth.shape[1], truth.shape[0]), Image.BILINEAR)
    panel = side_by_side([picture, colorize(truth, palette), colorize(pred, palette)], gap=6)
    if panel.width > MAX_TRIPLET_WIDTH:
        height = max(1, round(panel.height * MAX_TRIPLET_WIDTH / panel.width))
        panel = panel.resize((MAX_TRIPLET_WIDTH, height), Image.BILINEAR)
    elif panel.width < 600:  # small images: enlarge (nearest) so that the page shows them at a useful size
        factor = -(-720 // panel.width)
        panel = panel.resize((panel.width * factor, panel.height * factor), Image.NEAREST)
    return panel


def _image_name(dataset: SegmentationDataset, index: int) -> str:
    pairs = getattr(dataset, "pairs", None)
    return Path(pairs[index][0]).name if pairs else f"image {index}"


# -------------------------------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
table.facts td { text-align: left; } table.facts td:first-child { color: #666; }
.summary { font-size: 1.25em; margin: 0.8em 0; } .summary b { font-size: 1.3em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
.na { color: #999; }
"""


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<span class="na">n/a</span>'
    return f"{100 * value:.2f}"


def _img(src: str, alt: str) -> str:
    return f'<img src="{quote(src)}" alt="{html.escape(alt)}">'


def _robustness_html(result: RobustnessResult) -> str:
    columns = sorted({s for sev in result.severities.values() for s in sev})
    head = "".join(f"<th>severity {s}</th>" for s in columns)
    rows = []
    for name in result.corruptions:
        cells = "".join(
            f"<td>{_pct(result.miou(name, s))}</td>" if s in result.severities[name] else '<td class="na">–</td>'
            for s in columns
        )
        relative = result.relative(name)
        rel = '<span class="na">n/a</span>' if relative is None else f"{relative:.3f}"
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}<td>{_pct(result.mean(name))}</td><td>{rel}</td></tr>")
    overall = result.overall_relative
    rel = '<span class="na">n/a</span>' if overall is None else f"{overall:.3f}"
    blank = "<td></td>" * len(columns)
    rows.append(f"<tr><th>mean</th>{blank}<th>{_pct(result.overall_mean)}</th><th>{rel}</th></tr>")
    return (
        f"<p>mIoU (%) on {result.num_images} images under each corruption and severity (corruption seed "
        f"{result.seed}); clean mIoU {_pct(result.clean_miou)}. Relative robustness = corrupted mIoU / clean "
        "mIoU.</p>\n"
        f"<table><tr><th>corruption</th>{head}<th>mean</th><th>relative</th></tr>\n" + "\n".join(rows) + "</table>\n"
    )


def write_report(
    directory: str | os.PathLike,
    details: EvalDetails,
    dataset: SegmentationDataset,
    *,
    model_name: str = "",
    options: InferenceOptions | None = None,
    robustness: RobustnessResult | None = None,
    title: str = "Evaluation report",
) -> Path:
    """Write the report folder (see the module doc) and return the path of ``report.html``. Every file is
    written atomically; the folder is created if needed."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = details.metrics
    names = class_names(dataset.id2label, dataset.num_labels)
    palette = palette_for(names)

    plot_confusion(details.confusion, names, folder / "confusion_matrix.png")
    plot_class_iou(metrics, palette, folder / "per_class_iou.png")
    figures = []
    for rank, (index, score, pred) in enumerate(details.worst, start=1):
        image, truth = dataset.read(index)
        truth = np.where((truth >= 0) & (truth < len(names)), truth, 255)  # ignored pixels drawn black
        panel = triplet(image, truth, pred, palette)
        file = f"worst_{rank:02d}.png"
        atomic_save_image(folder / file, panel, "PNG")
        caption = f"{rank}. {_image_name(dataset, index)} (index {index}): mIoU {100 * score:.1f}%"
        figures.append((file, caption))
    for stale in folder.glob("worst_*.png"):  # an earlier report's further worst images: not this report's
        if re.fullmatch(r"worst_\d{2,}\.png", stale.name) and stale.name not in dict(figures):
            stale.unlink(missing_ok=True)
    if figures:
        key = legend(names, palette, rows_per_column=25)
        atomic_save_image(folder / "legend.png", key, "PNG")

    saved = metrics_to_json(metrics)
    if robustness is not None:
        saved["robustness"] = robustness.to_dict()
        plot_heatmap(robustness, folder / "robustness.png")
    atomic_write_text(folder / "metrics.json", json.dumps(saved, indent=2) + "\n")

    from . import __version__

    protocol = ", ".join(f"{k}={v}" for k, v in (options or resolve_options(None, {})).to_dict().items())
    facts = [
        ("model", model_name or "(in memory)"),
        ("data", dataset.name),
        ("images", str(metrics.get("num_images", len(details.scores)))),
        ("labelled pixels", f"{metrics.get('num_pixels', int(details.confusion.sum())):,}"),
        ("classes", str(len(names))),
        ("inference", protocol),
        ("segformer", __version__),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request
        f"<title>{html.escape(title)}: {html.escape(model_name or dataset.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<table class="facts">'
        + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in facts)
        + "</table>",
        f'<p class="summary">mIoU <b>{_pct(metrics.get("mIoU"))}</b> &nbsp; aAcc {_pct(metrics.get("aAcc"))} '
        f"&nbsp; mAcc {_pct(metrics.get('mAcc'))} &nbsp; (%)</p>",
        '<p>Metrics as JSON: <a href="metrics.json">metrics.json</a>.</p>',
        "<h2>Per-class IoU</h2>",
        _img("per_class_iou.png", "IoU per class"),
        "<table><tr><th>class</th><th>IoU (%)</th><th>Acc (%)</th></tr>"
        + "".join(
            f"<tr><td>{html.escape(n)}</td><td>{_pct(metrics['IoU'].get(n))}</td>"
            f"<td>{_pct(metrics.get('Acc', {}).get(n))}</td></tr>"
            for n in metrics["IoU"]
        )
        + "</table>",
        "<h2>Confusion matrix</h2>",
        "<p>Row <i>t</i>, column <i>p</i>: the fraction of the pixels of true class <i>t</i> predicted as <i>p</i> "
        "(rows sum to 1; a class with no labelled pixels is grey).</p>",
        _img("confusion_matrix.png", "normalised confusion matrix"),
    ]
    if figures:
        parts += [
            f"<h2>The {len(figures)} worst images</h2>",
            "<p>By the image's own mIoU (over the classes in its labels or its prediction); each: image | ground "
            "truth | prediction (unlabelled pixels black).</p>",
            _img("legend.png", "class colours"),
        ]
        parts += [f"<figure>{_img(file, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"
                  for file, caption in figures]  # fmt: skip
    if robustness is not None:
        parts += ["<h2>Robustness</h2>", _robustness_html(robustness), _img("robustness.png", "robustness heat map")]
    parts.append("</body></html>")
    path = folder / REPORT_FILE
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


__all__ = [
    "REPORT_FILE",
    "EvalDetails",
    "evaluate_details",
    "image_miou",
    "plot_class_iou",
    "plot_confusion",
    "require_plotting",
    "triplet",
    "write_report",
]
