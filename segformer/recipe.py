"""The training recipe as data: :class:`TrainConfig` (every constant of a run), the model a run starts from,
the learning-rate schedule and the optimiser (AdamW over parameter groups).

The defaults are the paper's ADE20K fine-tuning recipe (the NVlabs / mmseg configs): AdamW (lr 6e-5, betas
(0.9, 0.999), weight decay 0.01); decode-head parameters get lr × 10; normalisation layers get no weight decay;
linear warm-up over 1500 steps from ratio 1e-6, then poly decay (power 1) to 0; crop 512, random resize ratio
0.5–2.0 of a 2048×512 scale, flip, photometric distortion; cross-entropy ignoring 255. The fields that depend
on the data (scale, warm-up, head lr multiplier, random ratio, photometric distortion, one-class crop retry)
default to None and are filled in by :func:`resolve_recipe`: the paper's values for ADE20K and Cityscapes,
values derived from the data and the run for any other data set.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import VARIANTS, SegformerConfig
from .data.datasets import IGNORE_INDEX
from .evaluate import eval_options
from .hub import CheckpointError, first_line, for_command_line
from .inference import InferenceOptions
from .modeling import SegformerForSemanticSegmentation
from .visualize import renamed_classes


@dataclass
class TrainConfig:
    """Everything a run depends on: the paper's ADE20K recipe, with the data-dependent fields left None for
    :func:`resolve_recipe` (see the module docstring)."""

    data: str = ""
    dataset: str = "auto"  # folder | ade20k | cityscapes | hf | auto
    model: str | SegformerConfig = "b0"  # variant b0..b5, config.json, or a checkpoint dir / hub id
    output: str = "runs/segformer"
    # schedule and optimiser
    steps: int = 160_000
    batch_size: int = 16  # global: over all processes and accumulation steps
    accum_steps: int = 1
    lr: float | None = None  # None: resolved: 6e-5 (the paper's; own data from a checkpoint), own data fresh 6e-4
    head_lr_mult: float | None = None  # None: resolved (resolve_recipe): 10 for the paper's data sets
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int | None = None  # None: resolved: 1500 for the paper's data sets
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    # augmentation
    crop: tuple[int, int] = (512, 512)
    scale: tuple[int, int] | None = None  # None: resolved: (2048, 512), Cityscapes (2048, 1024); (0, 0): own size
    ratio_range: tuple[float, float] | None = None  # None: resolved: (0.5, 2.0) for the paper's data sets
    cat_max_ratio: float | None = None  # None: resolved: 0.75 for the paper's data sets
    flip_prob: float = 0.5
    photometric: bool | None = None  # None: resolved: on for the paper's data sets
    # labels
    ignore_index: int | None = None  # a stored mask value meaning "unlabelled" (255 always is)
    reduce_labels: bool | None = None  # ADE20K's 0 → ignored, k → k - 1; None: the data set's default
    class_weights: str = "none"  # none | auto (median-frequency from the training masks) | labels (labels.json)
    image_column: str | None = None  # Hugging Face datasets: the columns (None: detected) and a labels.json
    label_column: str | None = None
    labels: str | None = None
    # model
    drop_path_rate: float | None = None  # None keeps the checkpoint's / variant's value
    dropout: float | None = None  # hidden, attention and classifier dropout; None keeps them
    sync_bn: bool = False
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% slower
    # loop
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    eval_every: int = 16_000  # 0: only at the end
    save_every: int = 2_000
    log_every: int = 50
    # Evaluation protocol: InferenceOptions fields (see eval_inference_options); None: the data set's protocol
    eval_mode: str | None = None
    eval_crop: tuple[int, int] | None = None
    eval_stride: tuple[int, int] | None = None
    eval_short_side: int | None = None
    eval_long_side: int | None = None
    eval_align: int | None = None
    eval_scales: list[float] | None = None
    eval_flip: bool = False
    max_eval_images: int | None = None
    seed: int = 0
    workers: int = 2
    device: str | None = None
    resume: str | None = None  # None, "auto" or a checkpoint folder written as last/
    stop_at: int | None = None  # stop after this step (with a checkpoint), as if interrupted
    check_data: str = "full"  # full | headers | off
    progress: bool = True

    def eval_inference_options(self, kind: str) -> InferenceOptions:
        """The eval_* fields over the protocol of data-set kind ``kind`` (see segformer.evaluate.eval_options;
        segformer.data.build.protocol_kind gives a Hugging Face copy of ADE20K "ade20k"), validated: the one place
        where they become InferenceOptions."""
        given = dict(crop_size=self.eval_crop, stride=self.eval_stride, short_side=self.eval_short_side,
                     long_side=self.eval_long_side, align=self.eval_align)  # fmt: skip
        options = eval_options(kind, mode=self.eval_mode, scales=self.eval_scales, flip=self.eval_flip or None, **given)
        options.warn_unused([name for name, value in given.items() if value is not None], "eval-")
        return options


# The paper's ADE20K / Cityscapes recipe, for the fields a run resolves (see resolve_recipe).
PAPER = {
    "lr": 6e-5,
    "head_lr_mult": 10.0,
    "warmup_steps": 1500,
    "ratio_range": (0.5, 2.0),
    "photometric": True,
    "cat_max_ratio": 0.75,
}
PAPER_SCALE = {"ade20k": (2048, 512), "cityscapes": (2048, 1024)}
# Own data (a folder layout or a Hugging Face dataset) trained from fresh weights: measured with
# bench/bench_training.py against the plain PyTorch loop a user would write (README, "Training on your own
# data"); the reasons are in resolve_recipe.
FRESH_OWN_DATA = {
    "lr": 6e-4,
    "head_lr_mult": 1.0,
    "warmup_steps": 0,
    "ratio_range": (1.0, 1.0),
    "photometric": False,
    "cat_max_ratio": 1.0,
}
PRETRAINED_WARMUP_FRACTION = 0.1  # own data from a pretrained checkpoint: warm-up 10% of the run, <= 1500


def starts_fresh(model: str | SegformerConfig) -> bool:
    """Whether a run of ``model`` starts from fresh weights (a variant name, a config.json, a SegformerConfig)
    rather than a checkpoint (a pretrained encoder or a fine-tuned model)."""
    if isinstance(model, SegformerConfig):
        return True
    name = str(model)
    if Path(name).is_file() and Path(name).suffix == ".json":
        return True
    return name.lower().removeprefix("mit-") in VARIANTS and not Path(name).exists()


def resolve_recipe(cfg: TrainConfig, kind: str) -> tuple[TrainConfig, list[str]]:
    """``cfg`` with every field left None that depends on the data filled in, and one note per resolved field.

    ``kind``: the data set's protocol kind (:func:`segformer.data.build.protocol_kind`: "ade20k" for a Hugging Face
    copy of ADE20K too). ADE20K and Cityscapes get the paper's recipe exactly. Own data (any other kind) gets the
    images at their own scale (``scale`` (0, 0): the paper's 2048×512 resize is a 4x zoom of 128-pixel images, one
    the model never sees at evaluation). From a pretrained checkpoint it keeps the paper's fine-tuning choices (head
    lr x10 for the fresh head, the 0.5-2.0 random ratio, photometric distortion, the one-class crop retry) with a
    warm-up of 10% of the run (at most the paper's 1500 steps, longer than a short run). From fresh weights it
    trains as the plain loop does, which measured better on short runs (bench/bench_training.py): lr 6e-4, ten times
    the fine-tuning lr (at 6e-5 fresh weights stayed at the majority class for 300 steps on a set of thin structures
    where 6e-4 learnt them: audit), one lr for head and encoder (both are new), no warm-up, uniform random crops,
    and neither the random ratio nor the photometric distortion, which regularise a 160k-step schedule. Every choice
    can be set explicitly.
    """
    paper = kind in PAPER_SCALE
    fresh = starts_fresh(cfg.model)
    changes: dict[str, Any] = {}
    if cfg.scale is None:
        changes["scale"] = PAPER_SCALE[kind] if paper else (0, 0)
    for name in ("lr", "head_lr_mult", "warmup_steps", "ratio_range", "photometric", "cat_max_ratio"):
        if getattr(cfg, name) is None:
            changes[name] = FRESH_OWN_DATA[name] if not paper and fresh else PAPER[name]
    if not paper and not fresh and cfg.warmup_steps is None:
        changes["warmup_steps"] = min(PAPER["warmup_steps"], max(1, round(PRETRAINED_WARMUP_FRACTION * cfg.steps)))
    source = "the paper's recipe" if paper else ("own data, fresh weights" if fresh else "own data, pretrained")
    notes = [f"{name} {value} ({source})" for name, value in changes.items()]
    return dataclasses.replace(cfg, **changes), notes


def base_learning_rate(cfg: TrainConfig) -> float:
    """``cfg.lr``; a config :func:`resolve_recipe` has not resolved (a library caller's) takes the paper's."""
    return cfg.lr if cfg.lr is not None else PAPER["lr"]


def lr_factor(step: int, cfg: TrainConfig, base_lr: float | None = None) -> float:
    """Multiplier of a group's base lr (``base_lr``, default ``cfg.lr``) at optimiser step ``step`` (0-based):
    poly decay to ``min_lr`` over ``cfg.steps`` (an absolute lr, the same for every group, as in mmcv: the
    head's 10× lr decays to it too), times mmcv's linear warm-up factor 1 - (1 - step / warmup) (1 - ratio)."""
    base = base_learning_rate(cfg) if base_lr is None else base_lr
    progress = min(step / max(cfg.steps, 1), 1.0)
    poly = (1 - progress) ** cfg.poly_power
    factor = poly * (1 - cfg.min_lr / base) + cfg.min_lr / base if base > 0 else 0.0
    warmup = PAPER["warmup_steps"] if cfg.warmup_steps is None else cfg.warmup_steps  # None: unresolved, the paper's
    if step < warmup:
        factor *= 1 - (1 - step / warmup) * (1 - cfg.warmup_ratio)
    return factor


NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: encoder / decode head (lr × head_lr_mult), each split into normalisation-layer parameters
    and the rest. The encoder's norms get no weight decay; everything else does, biases included, and the decode
    head's BatchNorm too: mmseg's SegFormer recipe matches its custom keys longest first, then alphabetically, so
    "head" (lr × 10) claims the head's norm before "norm" (decay × 0) could. (Four groups still, as in runs saved
    before, whose optimiser states list four.)"""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    head_mult = PAPER["head_lr_mult"] if cfg.head_lr_mult is None else cfg.head_lr_mult  # None: the paper's
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name.startswith("decode_head.")
        groups.setdefault((is_head, id(p) in norm_params), []).append(p)
    out = []
    for (is_head, is_norm), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": base_learning_rate(cfg) * (head_mult if is_head else 1.0),
                "weight_decay": 0.0 if is_norm and not is_head else cfg.weight_decay,
                "name": f"{'head' if is_head else 'encoder'}{'/norm' if is_norm else ''}",
            }
        )
    return out


def build_model(cfg: TrainConfig, id2label: dict[int, str]) -> SegformerForSemanticSegmentation:
    """The model to fine-tune, with the data set's labels: a fresh variant ("b0".."b5"), a fresh model from a
    ``config.json`` or a SegformerConfig, or a checkpoint (ImageNet ``mit-b*`` encoder, or a segmentation
    model with any label set: a different head is re-initialised, which is logged). The loss ignores what the
    data pipeline marks unlabelled (255, whatever value the given config's ``semantic_loss_ignore_index`` had)."""
    overrides: dict[str, Any] = {
        "num_labels": len(id2label),
        "id2label": id2label,
        "semantic_loss_ignore_index": IGNORE_INDEX,
    }
    if cfg.drop_path_rate is not None:
        overrides["drop_path_rate"] = cfg.drop_path_rate
    if cfg.dropout is not None:
        overrides.update(
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            classifier_dropout_prob=cfg.dropout,
        )
    spec = cfg.model
    if isinstance(spec, SegformerConfig):
        return SegformerForSemanticSegmentation(spec.copy(**overrides))
    name = str(spec)
    variant = name.lower().removeprefix("mit-")
    if variant in VARIANTS and not Path(name).exists():
        return SegformerForSemanticSegmentation(SegformerConfig.from_variant(variant, **overrides))
    check_model(spec)
    if Path(name).is_file() and Path(name).suffix == ".json":
        return SegformerForSemanticSegmentation(SegformerConfig.from_json_file(name).copy(**overrides))
    # A different label set re-initialises the classifier: another class count changes its shape (from_pretrained
    # logs that); as many classes named otherwise, _reinitialise_renamed_head below.
    # fp32 master weights whatever the checkpoint stores (a bf16/fp16 file would otherwise load as such, as in
    # Transformers 5.x); reduced precision in training is --amp's job.
    try:
        model = SegformerForSemanticSegmentation.from_pretrained(
            name, ignore_mismatched_sizes=True, dtype=torch.float32, **overrides
        )
        stored = SegformerConfig.from_pretrained(name).id2label
    except CheckpointError as exc:  # (--model names it: from_pretrained's config= advice would not fit)
        raise for_command_line(exc) from None
    _reinitialise_renamed_head(model, name, stored, id2label)
    return model


# A config.json names at least one of these (any JSON object would otherwise be taken for b0's defaults)
_CONFIG_KEYS = ("model_type", "hidden_sizes", "depths", "num_encoder_blocks", "decoder_hidden_size")


def check_model(spec: str | SegformerConfig) -> None:
    """ValueError for a --model that cannot be meant: a variant name that is none (b9: the hub was asked for 30 s),
    a .json file that is not a SegFormer config (a labels.json trained a b0 without a word: audit)."""
    if isinstance(spec, SegformerConfig):
        return
    name = str(spec)
    if re.fullmatch(r"b\d+", name.lower().removeprefix("mit-")) and not Path(name).exists():
        if name.lower().removeprefix("mit-") not in VARIANTS:  # (a hub id of that form would be a typo too)
            raise ValueError(f"--model {name}: no such variant; the variants are {', '.join(VARIANTS)}")
    if Path(name).is_file() and Path(name).suffix == ".json":
        _check_config_file(name)


def _check_config_file(name: str) -> None:
    """ValueError unless ``name`` holds a JSON object with a SegFormer config's keys."""
    try:
        data = json.loads(Path(name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model {name}: not a readable config.json ({first_line(exc)})") from None
    if not isinstance(data, dict) or not any(key in data for key in _CONFIG_KEYS):
        raise ValueError(f"--model {name}: not a SegFormer config.json (it has none of {', '.join(_CONFIG_KEYS)})")
    if data.get("model_type", "segformer") != "segformer":
        raise ValueError(f"--model {name}: a config of model_type {data['model_type']!r}, not segformer")


_NUMBERED = re.compile(r"(LABEL_|class_)\d+")  # the names of a label set that was given none


def _reinitialise_renamed_head(
    model: SegformerForSemanticSegmentation, name: str, stored: dict[int, str], id2label: dict[int, str]
) -> None:
    """A checkpoint with as many classes as the data but other names (up to spelling, and a benchmark's own
    renames): its classifier would have given the data's class k what the checkpoint's class k learned, without
    a word, while the head's lr multiplier treats it as new (audit). It is re-initialised, with one line; numbered
    names on either side (a label set given none) keep it."""
    if len(stored) != len(id2label) or any(_NUMBERED.fullmatch(n) for n in (*stored.values(), *id2label.values())):
        return
    renamed = renamed_classes(stored, id2label)
    if not renamed:
        return
    with torch.no_grad():
        model._init_weights(model.decode_head.classifier)
    shown = ", ".join(f"{i} {a!r} → {b!r}" for i, a, b in renamed[:3]) + (", ..." if len(renamed) > 3 else "")
    logging.getLogger("segformer").warning(
        f"--model {name}: its {len(stored)} classes are named otherwise than the data's ({shown}): its classifier is "
        "re-initialised, as for another label set (name the classes as the checkpoint does to keep it)"
    )


@dataclass
class Optimization:
    """AdamW, its lr schedule and (fp16 only) the gradient scaler: what an optimiser step changes and
    ``last/training_state.pt`` saves."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None

    @property
    def lr(self) -> float:
        """The base lr of the next step (encoder group; the head's is ``head_lr_mult`` times this)."""
        return self.scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        """Update the weights (the fp16 scaler skips a step with inf/NaN gradients), advance the schedule, and
        return the lr that the update used."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        lr = self.lr
        self.scheduler.step()
        return lr

    def state_dict(self) -> dict[str, Any]:
        scaler = self.scaler.state_dict() if self.scaler is not None else None
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": scaler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _group_factor(step: int, *, cfg: TrainConfig, base_lr: float) -> float:
    return lr_factor(step, cfg, base_lr)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Optimization:
    """AdamW over :func:`param_groups`, the warm-up + poly schedule of :func:`lr_factor`, a scaler for fp16."""
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg),
        lr=base_learning_rate(cfg),
        betas=tuple(cfg.betas),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    factors = [functools.partial(_group_factor, cfg=cfg, base_lr=g["lr"]) for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return Optimization(optimizer, scheduler, torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None)


__all__ = [
    "FRESH_OWN_DATA",
    "starts_fresh",
    "PAPER",
    "Optimization",
    "TrainConfig",
    "build_model",
    "build_optimizer",
    "lr_factor",
    "param_groups",
    "resolve_recipe",
]
