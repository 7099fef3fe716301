"""Evaluate a segmentation model on a data set: confusion-matrix metrics (IoU per class, mIoU, aAcc, mAcc).

Works in one process and under torchrun (each rank takes every world_size-th image; the confusion matrices
are summed over ranks, so every rank returns the metrics of the whole set).

>>> from segformer.evaluate import evaluate
>>> from segformer.inference import InferenceOptions
>>> metrics = evaluate(model, dataset, InferenceOptions(mode="slide", crop_size=(1024, 1024), stride=(768, 768)))
>>> metrics = evaluate(model, dataset, mode="slide", crop_size=(1024, 1024), stride=(768, 768))  # the same
>>> metrics["mIoU"], metrics["IoU"]["road"]
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.datasets import SegmentationDataset, reduced_hint
from .distributed import get_rank, get_world_size, unwrap_model
from .fileio import atomic_write_text
from .inference import InferenceOptions, autocast, predict_labels, resolve_options, reuse_work_areas
from .metrics import ConfusionMatrix, metrics_to_json

# The published protocols (NVlabs/mmseg test configs): ADE20K whole-image after an aligned resize, Cityscapes
# sliding window; the plain folder layout runs the image as it is. Each entry: the InferenceOptions fields
# that differ from the defaults.
DEFAULT_EVAL = {
    "folder": {"mode": "whole"},
    "hf": {"mode": "whole"},
    "ade20k": {"mode": "aligned", "short_side": 512, "long_side": 2048},
    "cityscapes": {"mode": "slide", "crop_size": (1024, 1024), "stride": (768, 768)},
}


def eval_options(kind: str, **overrides: Any) -> InferenceOptions:
    """The evaluation protocol of a data-set kind ("folder", "ade20k", "cityscapes") as
    :class:`InferenceOptions`, with ``overrides`` (InferenceOptions fields; None values ignored) applied."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return InferenceOptions(**DEFAULT_EVAL.get(kind, DEFAULT_EVAL["folder"])).changed(**given)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: SegmentationDataset,
    options: InferenceOptions | None = None,
    *,
    amp: str | None = None,
    max_images: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    on_image: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    backend: str = "pytorch",
    compile: bool = False,
    **keywords: Any,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``dataset`` (whose items are (normalised image (3, H, W), labels (H, W))).

    Each image is predicted with :func:`segformer.inference.predict_labels` under ``options`` (an
    :class:`~segformer.inference.InferenceOptions`, default whole image; its fields are also accepted as
    keywords: ``mode=``, ``crop_size=``, ``stride=``, ``short_side=``, ``long_side=``, ``align=``, ``scales=``,
    ``flip=``) at its label's size and counted in one confusion matrix over the whole set (summed over ranks
    under torchrun). ``amp``: None / "none", "bf16" or "fp16" autocast (float32 where the device would only
    emulate it: :func:`segformer.inference.select_dtype`). ``backend`` ("pytorch" or "onnxruntime") and
    ``compile`` run the forward pass through :func:`segformer.backends.runtime_model` (artefacts cached).

    A model with one label (``num_labels=1``, a sigmoid) predicts class 1 where its probability is above 0.5 and
    is evaluated on a data set of two classes, as mmseg evaluates a one-channel head (mmseg's own threshold
    defaults to 0.3; 0.5 is this package's, the decision a sigmoid's probability draws).

    Returns :func:`segformer.metrics.compute_metrics`'s dict: ``mIoU``, ``aAcc``, ``mAcc`` (fractions), ``IoU``
    and ``Acc`` per class name (None for a class absent from targets and predictions), ``num_pixels``, plus
    ``num_images``. ``max_images`` evaluates only the first images (quick checks). ``on_image(index, pred,
    labels)`` is called for every image this rank evaluates, with its index in ``dataset`` and its (H, W)
    predicted and true class ids (the evaluation report collects per-image results with it).
    """
    if not all(hasattr(dataset, a) for a in ("num_labels", "id2label", "name")):  # (a datasets.Dataset: no labels)
        raise TypeError(
            f"evaluate() takes a SegmentationDataset, got a {type(dataset).__name__}; build one with "
            "segformer.data.build_dataset(PATH, split) (a Hugging Face dataset: .save_to_disk(PATH) first)"
        )
    options = resolve_options(options, keywords)
    net = unwrap_model(model)
    if backend != "pytorch" or compile:
        from .backends import runtime_model

        if amp not in (None, "none", "fp32"):
            raise ValueError(f"amp {amp!r} (autocast) needs the eager pytorch backend, without compile")
        net = runtime_model(net, backend, compile=compile)
    device = next(net.parameters()).device
    k = getattr(getattr(net, "config", None), "num_labels", dataset.num_labels)
    if k == 1 and dataset.num_labels != 2:  # one logit (sigmoid): class 1 where its probability is above 0.5
        raise ValueError(
            f"the model has one label (a sigmoid: class 0 or 1) but {dataset.name} has {dataset.num_labels} "
            "classes; a one-label model is evaluated on two classes"
        )
    if k != dataset.num_labels and k != 1:
        raise ValueError(
            f"the model predicts {k} classes but {dataset.name} has {dataset.num_labels}; "
            + (reduced_hint(dataset, k) or "evaluate a model fine-tuned on this label set")
        )
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1 (None: every image), got {max_images}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    indices = list(range(get_rank(), count, get_world_size()))  # no padding: each image counted once
    from .data.datasets import leave_stops_to_the_main_process, workers_stopped_on_error

    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=1,
        num_workers=num_workers,
        shuffle=False,
        worker_init_fn=leave_stops_to_the_main_process,
    )
    cm = ConfusionMatrix(dataset.num_labels, dataset.ignore_index, device=device)
    from tqdm import tqdm

    quiet = not progress or get_rank() != 0 or not sys.stderr.isatty()
    # One autocast region for the whole loop: autocast keeps the weights it casts until its outermost region
    # ends, so they are cast once, not once per image (per image, the casts made bf16 slower than fp32 at 128²).
    # One set of full-resolution work areas for the whole loop, too.
    with workers_stopped_on_error(iter(loader)) as batches, reuse_work_areas(), autocast(device, amp):
        bar = tqdm(batches, total=len(loader), desc="eval", disable=quiet, leave=False)
        for position, (pixels, labels) in enumerate(bar):
            pred = predict_labels(net, pixels.to(device), options, output_size=tuple(labels.shape[-2:]))
            with torch.autocast(device.type, enabled=False):  # (the counting and the caller's hook: as written)
                cm.update(pred, labels.to(device))
                if on_image is not None:
                    on_image(indices[position], pred[0], labels[0])
    cm.reduce()
    metrics = cm.compute(dataset.id2label)
    metrics["num_images"] = count
    return metrics


def write_metrics_json(path: str | os.PathLike, metrics: dict[str, Any]) -> None:
    """Write ``{"mIoU", "aAcc", "mAcc", "IoU": {name: value | null}, ...}`` atomically (NaN → null)."""
    atomic_write_text(Path(path), json.dumps(metrics_to_json(metrics), indent=2) + "\n")


def load_model_for_eval(name_or_path: str | os.PathLike, device: torch.device) -> nn.Module:
    """A SegformerForSemanticSegmentation from a checkpoint directory or hub id, in eval mode on ``device``
    (one without decode-head weights is a ValueError: :func:`segformer.modeling.load_segmentation_model`); an
    ONNX file ``segformer export`` wrote runs on onnxruntime on the CPU
    (:func:`segformer.backends.load_onnx_file`)."""
    from .backends import is_onnx_file, load_onnx_file
    from .modeling import load_segmentation_model

    if is_onnx_file(name_or_path):
        if device.type != "cpu":
            raise ValueError(f"{name_or_path}: an ONNX file runs on the CPU (onnxruntime); got device {device}")
        return load_onnx_file(name_or_path)
    return load_segmentation_model(name_or_path).to(device).eval()


__all__ = ["DEFAULT_EVAL", "eval_options", "evaluate", "load_model_for_eval", "write_metrics_json"]
