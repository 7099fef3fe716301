"""What a training run adds to a checkpoint folder so that it is complete and shareable.

Besides ``config.json`` and ``model.safetensors`` (:meth:`save_pretrained`), a checkpoint written by
``segformer train`` holds:

- ``preprocessor_config.json``: the image processor that matches how the model was trained (ImageNet
  mean/std, the evaluation size, ``do_reduce_labels``), so that Transformers' ``AutoImageProcessor`` and
  ``pipeline("image-segmentation", model=DIR)`` work on the folder as they do on a hub checkpoint;
- ``inference_config.json``: the evaluation protocol the run reported its metrics with
  (:class:`~segformer.inference.InferenceOptions`), which ``segformer predict``, ``segformer eval`` and
  :class:`~segformer.predict.SegformerPredictor` take as their default, so that what a user sees is what
  the metric measured;
- ``labels.json``: the run's label rules in the format of a data set's ``labels.json`` (class names, the stored
  mask values read as unlabelled, ``map``, ``palette``, ``reduce_labels``), so that ``segformer eval`` takes the
  run's ``--ignore-index``, ``predict`` and ``serve`` colour the classes as the data's palette did, and
  ``--labels DIR/labels.json`` reads another copy of the data the same way;
- ``README.md``: a model card in the Hugging Face convention (YAML metadata, how it was trained, the
  evaluation table with per-class IoU).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text
from .inference import InferenceOptions

INFERENCE_CONFIG = "inference_config.json"
LABELS_FILE = "labels.json"


def inference_json(options: InferenceOptions) -> str:
    """The text of ``inference_config.json``."""
    return json.dumps(options.to_dict(), indent=2) + "\n"


def save_inference_options(directory: str | os.PathLike, options: InferenceOptions) -> Path:
    """Write ``inference_config.json`` (atomically) and return its path."""
    path = Path(directory) / INFERENCE_CONFIG
    atomic_write_text(path, inference_json(options))
    return path


def _onnx_metadata(model: object, key: str) -> tuple[str, str | None] | None:
    """(a name for messages, the metadata value or None) for an ONNX file given as the model, else None."""
    from .backends import is_onnx_file

    if not is_onnx_file(model) or not Path(model).is_file():
        return None
    from .export import read_metadata

    return f"{model} (metadata {key})", read_metadata(model).get(key)


def load_inference_options(model: str | os.PathLike) -> InferenceOptions | None:
    """The evaluation protocol stored with a local checkpoint (or in an ONNX file's metadata), or None (a hub
    id, or no such file)."""
    onnx = _onnx_metadata(model, "segformer.inference")
    if onnx is not None:
        path, text = onnx
    else:
        path = Path(model) / INFERENCE_CONFIG
        text = path.read_text(encoding="utf-8") if path.is_file() else None
    if text is None:
        return None
    try:
        return InferenceOptions.from_dict(json.loads(text))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid inference config ({exc})") from None


def labels_json(spec: Mapping[str, Any]) -> str:
    """The text of a checkpoint's ``labels.json`` from a run's label rules (:meth:`LabelSpec.describe`, as
    ``train_config.json`` holds them); class weights are training's and are left out."""
    ignores = [v for v in spec["ignore_values"] if v != 255]  # (255 always is, unless "map" makes it a class)
    out: dict[str, Any] = {"id2label": spec["id2label"], "reduce_labels": spec["reduce_labels"]}
    if ignores:
        out["ignore_index"] = ignores
    if spec["value_map"]:
        out["map"] = spec["value_map"]
    if spec["palette"] is not None:
        out["palette"] = spec["palette"]
    return json.dumps(out, indent=2, ensure_ascii=False) + "\n"


def stored_label_spec(model: str | os.PathLike | object) -> Any:
    """The label rules stored with a local checkpoint (its ``labels.json``, which segformer train writes) as a
    :class:`~segformer.data.datasets.LabelSpec` (also from an ONNX file's metadata), or None (a hub id, a model
    object, no such file); a damaged file raises ValueError naming it."""
    from .data.datasets import read_label_spec

    onnx = _onnx_metadata(model, "segformer.labels")
    if onnx is not None:
        name, text = onnx
        return None if text is None else read_label_spec(name, text=text)
    if not isinstance(model, (str, os.PathLike)) or not (Path(model) / LABELS_FILE).is_file():
        return None
    return read_label_spec(Path(model) / LABELS_FILE)


def stored_palette(model: str | os.PathLike | object, palette: Any) -> Any:
    """``palette`` ((K, 3) uint8, one row per class) with the colours a local checkpoint's ``labels.json``
    gives its classes in place (a data set of colour-coded masks: predictions come out in the data's own
    colours); unchanged where the checkpoint names none, or names other classes than ``palette`` has rows."""
    spec = stored_label_spec(model)
    if spec is None or spec.palette is None or spec.num_labels != len(palette):
        return palette
    out = palette.copy()
    given = {class_id for class_id in spec.palette.values() if class_id < len(out)}
    for colour, class_id in spec.palette.items():
        if class_id < len(out):
            out[class_id] = colour
    # a class the file gives no colour keeps its own, unless that is one the file gave another class (two classes
    # in one colour: audit); then the first generated colour nobody has
    from .visualize import make_palette

    def rgb(row: Any) -> tuple[int, ...]:
        return tuple(int(c) for c in row)

    taken = {rgb(out[k]) for k in given}
    spare = (rgb(row) for row in make_palette(len(out) + len(taken) + 64, seed=1))
    for k in sorted(set(range(len(out))) - given):
        if rgb(out[k]) in taken:
            in_use = {rgb(row) for row in out}
            out[k] = next(c for c in spare if c not in taken and c not in in_use)
        taken.add(rgb(out[k]))
    return out


def stored_reduce_labels(model: str | os.PathLike) -> bool | None:
    """Whether a local checkpoint was trained on reduced labels (``do_reduce_labels`` in its
    ``preprocessor_config.json``, which segformer train writes; Transformers' older ``reduce_labels`` too), or
    None when it does not say (a hub id, no such file, an unreadable one). An ONNX file says it in its metadata
    (``segformer.reduce_labels``, else its labels.json's ``reduce_labels``)."""
    onnx = _onnx_metadata(model, "segformer.reduce_labels")
    if onnx is not None:
        flag = {"true": True, "false": False}.get(onnx[1] or "")
        spec = stored_label_spec(model) if flag is None else None
        return flag if spec is None else spec.reduce_labels
    path = Path(model) / "preprocessor_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return None
    value = config.get("do_reduce_labels", config.get("reduce_labels")) if isinstance(config, dict) else None
    return value if isinstance(value, bool) else None


def preprocessor_json(*, size: tuple[int, int] | None, reduce_labels: bool = False) -> str:
    """The ``preprocessor_config.json`` of a trained model: resize to ``size`` (height, width) or no resize
    (None, for a model evaluated at each image's own size), ImageNet mean/std, ``do_reduce_labels``."""
    from .processing import SegformerImageProcessor

    if size is None:
        processor = SegformerImageProcessor(do_resize=False, do_reduce_labels=reduce_labels)
    else:
        processor = SegformerImageProcessor(
            size={"height": int(size[0]), "width": int(size[1])}, do_reduce_labels=reduce_labels
        )
    return processor.to_json_string()


def processor_size(options: InferenceOptions) -> tuple[int, int] | None:
    """The fixed size Transformers' processor should resize to for a model evaluated with ``options``: the
    window of a sliding-window protocol, 512 x 512 for ADE20K's aligned protocol (what the published
    checkpoints ship), none for whole-image evaluation."""
    if options.mode == "slide":
        return options.crop_size
    if options.mode == "aligned":
        return (options.short_side, options.short_side)
    return None


def save_preprocessor(
    directory: str | os.PathLike, *, size: tuple[int, int] | None, reduce_labels: bool = False
) -> Path:
    """Write :func:`preprocessor_json` into ``directory`` atomically and return its path."""
    path = Path(directory) / "preprocessor_config.json"
    atomic_write_text(path, preprocessor_json(size=size, reduce_labels=reduce_labels))
    return path


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n  - {json.dumps(item)}" for item in items) if items else " []"


def model_card(
    *,
    model_name: str,
    base_model: str | None,
    dataset: str,
    metrics: Mapping[str, Any] | None,
    hyperparameters: Mapping[str, Any],
    options: InferenceOptions,
    step: int,
    metrics_step: int | None = None,
    evaluated_on: str | None = None,
) -> str:
    """The README.md of a checkpoint: YAML metadata (library, tags, datasets, metrics, model-index), how it was
    trained and how it scores (aggregate metrics and per-class IoU, measured at ``metrics_step``, default
    ``step``: a last/ saved between evaluations carries the latest one, said to be of an earlier step; on
    ``evaluated_on``, e.g. "all 500 validation images")."""
    metrics_step = step if metrics_step is None else metrics_step
    metrics = dict(metrics or {})
    lines = [
        "---",
        "library_name: segformer",
        "pipeline_tag: image-segmentation",
        f"tags:{_yaml_list(['segformer', 'semantic-segmentation', 'vision'])}",
        f"datasets:{_yaml_list([dataset])}",
        f"metrics:{_yaml_list(['mean_iou'] if metrics else [])}",
    ]
    if base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
    if metrics.get("mIoU") is not None:
        lines += [
            "model-index:",
            f"- name: {json.dumps(model_name)}",
            "  results:",
            "  - task:",
            "      type: image-segmentation",
            "      name: Semantic segmentation",
            "    dataset:",
            f"      name: {json.dumps(dataset)}",
            f"      type: {json.dumps(dataset)}",
            "    metrics:",
            "    - type: mean_iou",
            f"      value: {float(metrics['mIoU']):.4f}",
            "      name: mIoU",
        ]
    lines += ["---", "", f"# {model_name}", ""]
    origin = f"fine-tuned from `{base_model}`" if base_model else "trained from scratch"
    lines += [
        f"A SegFormer semantic-segmentation model {origin} on `{dataset}` for {step} steps with "
        "[segformer](https://pypi.org/project/segformer/) (`segformer train`). The folder loads in segformer and "
        "in Transformers alike:",
        "",
        "```python",
        "from segformer import SegformerForSemanticSegmentation",
        'model = SegformerForSemanticSegmentation.from_pretrained("PATH")',
        '# or: transformers.pipeline("image-segmentation", model="PATH")',
        "```",
        "",
        "## Evaluation",
        "",
        f"Protocol: `{json.dumps(options.to_dict())}` (also in `{INFERENCE_CONFIG}`, which `segformer predict` "
        "and `segformer eval` use by default).",
        "",
    ]
    if metrics:
        earlier = f" (these weights are from step {step})" if metrics_step != step else ""
        scope = f" on {evaluated_on}" if evaluated_on else ""
        lines += [f"Measured at step {metrics_step}{earlier}{scope}:", "", "| metric | value |", "|---|---|"]
        for key in ("mIoU", "aAcc", "mAcc"):
            if metrics.get(key) is not None:
                lines.append(f"| {key} | {100 * float(metrics[key]):.2f} |")
        per_class = metrics.get("IoU") or {}
        if per_class:
            lines += ["", "| class | IoU |", "|---|---|"]
            for name, value in per_class.items():
                lines.append(f"| {name} | {'n/a' if value is None else f'{100 * float(value):.2f}'} |")
    else:
        lines.append("No evaluation was run.")
    lines += ["", "## Training hyper-parameters", "", "| name | value |", "|---|---|"]
    for key, value in hyperparameters.items():
        lines.append(f"| {key} | `{json.dumps(value)}` |")
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | os.PathLike, **fields: Any) -> Path:
    """Write ``README.md`` (:func:`model_card`'s text) into ``directory`` atomically."""
    path = Path(directory) / "README.md"
    atomic_write_text(path, model_card(**fields))
    return path


__all__ = [
    "INFERENCE_CONFIG",
    "LABELS_FILE",
    "inference_json",
    "preprocessor_json",
    "processor_size",
    "load_inference_options",
    "model_card",
    "labels_json",
    "save_inference_options",
    "save_preprocessor",
    "stored_reduce_labels",
    "stored_label_spec",
    "stored_palette",
    "write_model_card",
]
