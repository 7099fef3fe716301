"""Segmentation metrics from a confusion matrix accumulated over a whole data set.

``conf[t, p]`` counts the valid pixels (target != ignore_index) of true class t predicted as p. From it:

- IoU_k = TP / (TP + FP + FN) per class; a class absent from both the targets and the predictions has
  0 / 0 = NaN (``None`` in JSON) and is left out of mIoU (the mean over the other classes).
- Acc_k = TP / (TP + FN) (recall); NaN for classes absent from the targets, left out of mAcc.
- aAcc = trace / total (pixel accuracy).

Metrics are computed from the matrix summed over the whole set (and over processes with
:meth:`ConfusionMatrix.reduce`), not averaged per image, as mmseg does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """(K, K) int64 confusion matrix, rows = target class, columns = predicted class.

    pred, target: integer tensors of the same shape (any, e.g. (B, H, W)). Pixels whose target is
    ``ignore_index`` are skipped. A target outside 0..K-1 (other than the ignore index) or a prediction
    outside 0..K-1 is a ValueError.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).to(pred.device).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel():
        for name, t in (("target", target), ("prediction", pred)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name} holds class {bad}, outside 0..{num_classes - 1} (ignore index {ignore_index})"
                )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates a confusion matrix batch by batch; :meth:`reduce` sums it over processes.

    >>> cm = ConfusionMatrix(num_classes=19)
    >>> cm.update(pred, labels)          # (B, H, W) int tensors; labels may hold 255
    >>> cm.reduce(); cm.compute()["mIoU"]
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.mat += confusion_matrix(pred, target, self.num_classes, self.ignore_index).to(self.mat.device)

    def reduce(self) -> None:
        """Sum the matrices of all processes (every rank gets the total); a no-op in a single process."""
        from .distributed import all_reduce_sum

        self.mat = all_reduce_sum(self.mat)

    def compute(self, class_names: Sequence[str] | Mapping[int, str] | None = None) -> dict[str, Any]:
        return compute_metrics(self.mat, class_names)


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def compute_metrics(conf: torch.Tensor, class_names: Sequence[str] | Mapping[int, str] | None = None) -> dict[str, Any]:
    """Metrics of a (K, K) confusion matrix (rows = target).

    Returns ``{"mIoU", "aAcc", "mAcc": float (NaN when no class counts), "IoU": {name: float | None},
    "Acc": {name: float | None}, "num_pixels": int}``; None marks a class whose value is undefined (absent
    from both targets and predictions for IoU, absent from the targets for Acc), excluded from the means.
    Values are fractions in [0, 1]. Class names default to "0", "1", …; a name that several classes share is
    given with its id ("other (1)", "other (2)"), so that each class keeps its own entry.
    """
    conf = conf.detach().to("cpu", torch.float64)
    k = conf.shape[0]
    if isinstance(class_names, Mapping):
        names = [str(class_names.get(i, i)) for i in range(k)]
    elif class_names is not None:
        names = [str(n) for n in class_names]
        if len(names) != k:
            raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    else:
        names = [str(i) for i in range(k)]
    shared = {n for n in names if names.count(n) > 1}
    names = [f"{n} ({i})" if n in shared else n for i, n in enumerate(names)]
    tp = conf.diag()
    gt = conf.sum(1)  # TP + FN
    predicted = conf.sum(0)  # TP + FP
    with torch.no_grad():
        iou = tp / (gt + predicted - tp)  # 0/0 → NaN for absent classes
        acc = tp / gt
    total = conf.sum()
    return {
        "mIoU": float(iou.nanmean()) if not iou.isnan().all() else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mAcc": float(acc.nanmean()) if not acc.isnan().all() else float("nan"),
        "IoU": {n: _nan_to_none(float(v)) for n, v in zip(names, iou, strict=True)},
        "Acc": {n: _nan_to_none(float(v)) for n, v in zip(names, acc, strict=True)},
        "num_pixels": int(total),
    }


def format_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text table: one row per class (IoU and Acc in %), then mIoU / aAcc / mAcc, and how many classes the
    mIoU averages when some are n/a (absent from targets and predictions alike, left out of the mean; a 0.00 is
    counted)."""
    names = list(metrics["IoU"])
    width = max([len("class"), *map(len, names)])

    def pct(v: float | None) -> str:
        return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:6.2f}"

    lines = [f"{'class':<{width}}    IoU    Acc", "-" * (width + 15)]
    for n in names:
        lines.append(f"{n:<{width}} {pct(metrics['IoU'][n])} {pct(metrics.get('Acc', {}).get(n))}")
    lines.append("-" * (width + 15))
    lines.append(f"mIoU {pct(metrics['mIoU'])}   aAcc {pct(metrics['aAcc'])}   mAcc {pct(metrics['mAcc'])}")
    defined = sum(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in metrics["IoU"].values())
    if defined < len(names):
        lines.append(f"(mIoU over the {defined} of {len(names)} classes present in the targets or predictions)")
    return "\n".join(lines)


def metrics_to_json(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics with NaN replaced by None (JSON null), ready for ``json.dumps``."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items()}
        return v

    return {k: clean(v) for k, v in metrics.items()}


__all__ = ["ConfusionMatrix", "compute_metrics", "confusion_matrix", "format_table", "metrics_to_json"]
