"""Fine-tune SegFormer with the paper's recipe (FACTS §6), on one process or many.

    # one process (CPU or one GPU)
    segformer train --data ADEChallengeData2016 --dataset ade20k --model nvidia/mit-b0 --output runs/ade-b0
    # 8 GPUs on one node; --batch-size is the global batch (16 = 2 per GPU, as in the paper)
    torchrun --standalone --nproc_per_node=8 -m segformer.train --data ADEChallengeData2016 --model nvidia/mit-b0
    # two nodes: torchrun --nnodes=2 --node_rank=R --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 ...
    # resume the run in --output where it stopped (same weights as if it had never stopped)
    segformer train ... --resume auto

Recipe: AdamW (lr 6e-5, betas (0.9, 0.999), weight decay 0.01); decode-head parameters get lr × 10; the
parameters of normalisation layers get no weight decay; linear warm-up over 1500 steps from ratio 1e-6, then
poly decay (power 1) to 0; cross-entropy ignoring 255. Every constant is a field of :class:`TrainConfig`.

Reproducibility: the training stream is a fixed function of (seed, position): epoch e visits the images in
the order of a permutation seeded by (seed, e), and the augmentation of the sample at position g is seeded by
(seed, g). A resumed run restarts the stream at step × global batch, and restores the optimizer, scheduler,
gradient scaler and the python / numpy / torch RNG states of every rank, so it continues exactly. Under DDP
rank r takes consecutive blocks of the stream, so N processes see the same global batches as one.

Output folder: ``last/`` and ``best/`` (``save_pretrained`` layout; ``last/training_state.pt`` resumes the
run; ``best/eval.json`` holds its metrics), ``metrics.jsonl`` (one JSON object per log line or evaluation),
``train_config.json`` and, when the tensorboard package is installed, ``tensorboard/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import VARIANTS, SegformerConfig
from .data.build import build_dataset, detect_kind
from .data.datasets import SegmentationDataset, check_dataset
from .data.statistics import class_pixel_counts, median_frequency_weights
from .data.transforms import eval_transform, train_transform
from .distributed import (
    DistInfo,
    SyncBatchNorm,
    all_reduce_mean,
    barrier,
    broadcast_flag,
    cleanup,
    init_distributed,
)
from .evaluate import eval_options, evaluate
from .fileio import atomic_write, atomic_write_text
from .inference import InferenceOptions, autocast, predict_labels
from .metrics import metrics_to_json
from .modeling import SegformerForSemanticSegmentation, semantic_loss
from .run_files import INFERENCE_CONFIG, inference_json, model_card, preprocessor_json, processor_size
from .train_log import RunLog
from .visualize import palette_for

TRAINING_STATE = "training_state.pt"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting its last good checkpoint."""


@dataclass
class TrainConfig:
    """Everything a run depends on; the defaults are the paper's ADE20K recipe (FACTS §6)."""

    data: str = ""
    dataset: str = "auto"  # folder | ade20k | cityscapes | hf | auto
    model: str | SegformerConfig = "b0"  # variant b0..b5, config.json, or a checkpoint dir / hub id
    output: str = "runs/segformer"
    # schedule and optimiser
    steps: int = 160_000
    batch_size: int = 16  # global: over all processes and accumulation steps
    accum_steps: int = 1
    lr: float = 6e-5
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    # augmentation
    crop: tuple[int, int] = (512, 512)
    scale: tuple[int, int] | None = None  # None: (2048, 512), Cityscapes (2048, 1024); (0, 0): own size
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
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
    # Evaluation protocol: InferenceOptions fields (see eval_inference_options); None: the data set's (FACTS §7)
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
        """The eval_* fields over the protocol of data-set kind ``kind`` (see segformer.evaluate.eval_options),
        validated: the one place where they become InferenceOptions."""
        return eval_options(
            kind,
            mode=self.eval_mode,
            crop_size=self.eval_crop,
            stride=self.eval_stride,
            short_side=self.eval_short_side,
            long_side=self.eval_long_side,
            align=self.eval_align,
            scales=self.eval_scales,
            flip=self.eval_flip or None,
        )


# ----------------------------------------------------------------------------------------- recipe parts
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based): poly decay to ``min_lr`` over
    ``cfg.steps``, times mmcv's linear warm-up factor 1 - (1 - step / warmup) (1 - warmup_ratio)."""
    progress = min(step / max(cfg.steps, 1), 1.0)
    poly = (1 - progress) ** cfg.poly_power
    factor = poly * (1 - cfg.min_lr / cfg.lr) + cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    if step < cfg.warmup_steps:
        factor *= 1 - (1 - step / cfg.warmup_steps) * (1 - cfg.warmup_ratio)
    return factor


NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: encoder / decode head (lr × head_lr_mult), each split into normalisation-layer parameters
    (no weight decay) and the rest (weight decay, biases included, as in mmseg)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
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
                "lr": cfg.lr * (cfg.head_lr_mult if is_head else 1.0),
                "weight_decay": 0.0 if is_norm else cfg.weight_decay,
                "name": f"{'head' if is_head else 'encoder'}{'/norm' if is_norm else ''}",
            }
        )
    return out


class StreamSampler(torch.utils.data.Sampler):
    """An endless stream of ``(index, augmentation seed)`` pairs for one rank, starting at global position
    ``start``. Epoch e visits the data set in a permutation seeded by (seed, e); position g's augmentation
    is seeded by (seed, g). Rank r takes blocks of ``block`` consecutive positions: r, r + world, …, so N ranks
    with micro-batch ``block`` cover exactly the positions one process with batch N × block would."""

    def __init__(self, size: int, *, seed: int, block: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.size, self.seed, self.block = size, seed, block
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.start + self.rank * self.block
        epoch, perm = -1, np.arange(0)
        while True:
            for pos in range(g, g + self.block):
                e = pos // self.size
                if e != epoch:
                    epoch, perm = e, np.random.default_rng([self.seed, e]).permutation(self.size)
                # the augmentation seed is a pure function of (seed, position)
                aug_seed = int(np.random.default_rng([self.seed, 1 << 20, pos]).integers(2**62))
                yield int(perm[pos % self.size]), aug_seed
            g += self.block * self.world_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) RNG states, in types torch.load(weights_only=True) reads."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_tuple(state: Any) -> Any:
    """random.setstate wants tuples; a state that went through torch.save/load may hold lists."""
    return tuple(_python_state_to_tuple(s) for s in state) if isinstance(state, (list, tuple)) else state


# ----------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, id2label: dict[int, str]) -> SegformerForSemanticSegmentation:
    """The model to fine-tune, with the data set's labels: a fresh variant ("b0".."b5"), a fresh model from a
    ``config.json`` or a SegformerConfig, or a checkpoint (ImageNet ``mit-b*`` encoder, or a segmentation
    model with any label set: a different head is re-initialised, which is logged)."""
    overrides: dict[str, Any] = {"num_labels": len(id2label), "id2label": id2label}
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
    if Path(name).is_file() and Path(name).suffix == ".json":
        return SegformerForSemanticSegmentation(SegformerConfig.from_json_file(name).copy(**overrides))
    # A different label set re-initialises the classifier (its shape changes); from_pretrained logs that.
    return SegformerForSemanticSegmentation.from_pretrained(name, ignore_mismatched_sizes=True, **overrides)


# ----------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(directory: Path, model: nn.Module, files: dict[str, Any]) -> None:
    """Write ``directory`` as a whole: save_pretrained + ``files`` (name → object for torch.save, or str for
    text) into a temporary sibling, then swap it in. A crash leaves either the old folder or, between the two
    renames, ``.NAME.old`` (which :func:`find_resume_dir` falls back on)."""
    tmp, old = directory.parent / f".{directory.name}.tmp", directory.parent / f".{directory.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name, obj in files.items():
        if isinstance(obj, str):
            atomic_write_text(tmp / name, obj)
        else:
            atomic_write(tmp / name, lambda t, o=obj: torch.save(o, t))
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def find_resume_dir(output: Path, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from: None, ``resume`` itself, or for "auto" ``output/last`` (or the
    ``.last.old`` left by a crash during a checkpoint swap) when it exists."""
    if resume is None:
        return None
    if resume == "auto":
        for candidate in (output / "last", output / ".last.old"):
            if (candidate / TRAINING_STATE).is_file():
                return candidate
        return None
    path = Path(resume)
    if not (path / TRAINING_STATE).is_file():
        raise ValueError(f"{path}: no {TRAINING_STATE} here (resume from a run's last/ folder, or --resume auto)")
    return path


def _gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------- set-up
def check_config(cfg: TrainConfig, info: DistInfo) -> int:
    """Validate the options for this launch; return the per-process micro-batch size."""
    if not cfg.data:
        raise ValueError("no data directory given (--data DIR)")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp must be none, bf16 or fp16, got {cfg.amp!r}")
    if cfg.steps < 1 or cfg.accum_steps < 1 or cfg.batch_size < 1:
        raise ValueError("--steps, --batch-size and --accum-steps must be positive")
    if cfg.check_data not in ("full", "headers", "off"):
        raise ValueError(f"--check-data must be full, headers or off, got {cfg.check_data!r}")
    per_step = info.world_size * cfg.accum_steps
    if cfg.batch_size % per_step:
        raise ValueError(
            f"--batch-size {cfg.batch_size} (the global batch) must be divisible by processes × accumulation "
            f"steps = {info.world_size} × {cfg.accum_steps}"
        )
    if cfg.amp == "fp16" and info.device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (it relies on a gradient scaler); use --amp bf16 on CPU")
    return cfg.batch_size // per_step


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    d = (
        dataclasses.asdict(cfg)
        if not isinstance(cfg.model, SegformerConfig)
        else {
            **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "model"},
            "model": cfg.model.to_dict(),
        }
    )
    return json.loads(json.dumps(d, default=str))


def _log(msg: str, info: DistInfo) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """The data sets of a run and the evaluation protocol of their kind."""

    kind: str  # folder | ade20k | cityscapes
    train_set: SegmentationDataset
    val_set: SegmentationDataset | None  # None: no validation split, so no evaluation and no best/
    eval_options: InferenceOptions
    class_weights: torch.Tensor | None = None  # (K,) loss weight per class, or None: plain cross-entropy


def build_data(cfg: TrainConfig, info: DistInfo) -> TrainData:
    """The training set with the paper's augmentation and the validation set, checked as ``cfg.check_data``
    says (every rank gets the main rank's verdict)."""
    kind = detect_kind(cfg.data) if cfg.dataset == "auto" else cfg.dataset
    eval_opts = cfg.eval_inference_options(kind)  # a bad --eval-* option fails here, before any work
    scale = cfg.scale if cfg.scale is not None else ((2048, 1024) if kind == "cityscapes" else (2048, 512))
    transform = train_transform(
        tuple(cfg.crop),
        scale=None if tuple(scale) == (0, 0) else tuple(scale),
        ratio_range=tuple(cfg.ratio_range),
        cat_max_ratio=cfg.cat_max_ratio,
        flip_prob=cfg.flip_prob,
        photometric=cfg.photometric,
    )
    labels = dict(
        kind=kind,
        ignore_index=cfg.ignore_index,
        reduce_labels=cfg.reduce_labels,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        labels=cfg.labels,
    )
    train_set, train_listing = build_dataset(cfg.data, "train", transform=transform, **labels)
    try:
        val_set, val_listing = build_dataset(cfg.data, "val", transform=eval_transform(), **labels)
    except ValueError as exc:
        val_set, val_listing = None, None
        _log(f"warning: no evaluation ({exc}); only last/ will be saved", info)
    if cfg.check_data != "off":
        ok = True
        if info.is_main:  # one rank reads the files; the others follow its verdict
            for ds, listing in ((train_set, train_listing), (val_set, val_listing)):
                if ds is not None:
                    report = check_dataset(ds, listing, check_values=cfg.check_data == "full")
                    if not report.ok:
                        print(f"{ds.name}: {report.format()}", file=sys.stderr)
                        ok = False
        if not broadcast_flag(ok):
            raise ValueError(f"{cfg.data}: the data check failed (problems listed above; --check-data off skips it)")
    return TrainData(kind, train_set, val_set, eval_opts, resolve_class_weights(cfg, train_set, info))


def resolve_class_weights(cfg: TrainConfig, train_set: SegmentationDataset, info: DistInfo) -> torch.Tensor | None:
    """``--class-weights``: none; labels (``class_weights`` in labels.json); auto (median-frequency balancing
    over the training masks, counted once on the main rank and shared)."""
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights == "labels":
        if train_set.spec.class_weights is None:
            raise ValueError('--class-weights labels: labels.json has no "class_weights"')
        return torch.tensor(train_set.spec.class_weights, dtype=torch.float32)
    if cfg.class_weights != "auto":
        raise ValueError(f"--class-weights must be none, auto or labels, got {cfg.class_weights!r}")
    weights = None
    if info.is_main:
        weights = median_frequency_weights(class_pixel_counts(train_set)).tolist()
    weights = _gather_objects(weights, info.world_size)[0]  # the main rank's, on every rank
    return torch.tensor(weights, dtype=torch.float32)


def build_loader(
    train_set: SegmentationDataset, cfg: TrainConfig, info: DistInfo, *, micro: int, start_step: int
) -> torch.utils.data.DataLoader:
    """This rank's micro-batches of the training stream (see :class:`StreamSampler`) from optimiser step
    ``start_step`` on: an endless loader."""
    sampler = StreamSampler(
        len(train_set),
        seed=cfg.seed,
        block=micro,
        rank=info.rank,
        world_size=info.world_size,
        start=start_step * cfg.batch_size,
    )
    # A generator of its own keeps the DataLoader from drawing on the global torch RNG (resume equality).
    return torch.utils.data.DataLoader(
        train_set,
        batch_size=micro,
        sampler=sampler,
        num_workers=cfg.workers,
        drop_last=True,
        pin_memory=info.device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


# ----------------------------------------------------------------------------------------- model and optimiser
def prepare_model(model: nn.Module, cfg: TrainConfig, info: DistInfo) -> tuple[nn.Module, nn.Module]:
    """``model`` on this rank's device in training mode, with gradient checkpointing and SyncBatchNorm as
    configured. Returns (the module to train: DistributedDataParallel under torchrun; the bare module, which
    is evaluated and saved)."""
    model.to(info.device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.sync_bn and info.world_size > 1:
        model = SyncBatchNorm.convert(model)  # torch's SyncBatchNorm is GPU-only; ours also runs on gloo
    if info.world_size == 1:
        return model, model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids), model


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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Optimization:
    """AdamW over :func:`param_groups`, the warm-up + poly schedule of :func:`lr_factor`, a scaler for fp16."""
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return Optimization(optimizer, scheduler, torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None)


# ----------------------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """Where a run stands; ``last/training_state.pt`` holds it next to the optimiser and the RNG states."""

    step: int = 0  # optimiser steps done
    best_mIoU: float = -math.inf
    best_step: int | None = None  # None: best/ not written yet


def restore_state(resume_dir: Path, optim: Optimization, cfg: TrainConfig, info: DistInfo) -> RunState:
    """Load ``resume_dir/training_state.pt`` into ``optim`` and this rank's RNGs; return where the run stood."""
    state = torch.load(resume_dir / TRAINING_STATE, map_location="cpu", weights_only=True)
    optim.load_state_dict(state)
    best = state.get("best_mIoU")
    run = RunState(int(state["step"]), float(best) if best is not None else -math.inf, state.get("best_step"))
    rngs = state["rng"]
    if len(rngs) == info.world_size:
        rng = rngs[info.rank]
        rng["python"] = _python_state_to_tuple(rng["python"])
        set_rng_state(rng)
    else:  # a different process count cannot continue the same dropout streams: reseed, say so
        _log(f"warning: resuming {len(rngs)}-process state on {info.world_size} processes; RNG streams reseeded", info)
        seed_everything(cfg.seed + info.rank + run.step)
    _log(f"resumed from {resume_dir} at step {run.step}", info)
    return run


def save_last(
    directory: Path, net: nn.Module, optim: Optimization, run: RunState, info: DistInfo, files: dict[str, str]
) -> None:
    """Write ``directory`` (last/): the weights, ``files`` (see :func:`shareable_files`) and all that an exact
    resume needs. Every rank calls it."""
    rngs = _gather_objects(rng_state(), info.world_size)  # every rank's streams, for an exact resume
    if info.is_main:
        state = {
            "step": run.step,
            **optim.state_dict(),
            "rng": rngs,
            "best_mIoU": run.best_mIoU if run.best_mIoU > -math.inf else None,
            "best_step": run.best_step,
            "world_size": info.world_size,
        }
        save_checkpoint(directory, net, {**files, TRAINING_STATE: state})
    barrier()


def shareable_files(cfg: TrainConfig, data: TrainData, step: int, metrics: dict[str, Any] | None) -> dict[str, str]:
    """What makes a checkpoint folder complete (see :mod:`segformer.run_files`): the matching
    ``preprocessor_config.json``, the evaluation protocol and a model card with ``metrics`` (None: not
    evaluated)."""
    name = str(cfg.model) if not isinstance(cfg.model, SegformerConfig) else "config"
    fresh = (
        isinstance(cfg.model, SegformerConfig)
        or name.lower().removeprefix("mit-") in VARIANTS
        or name.endswith(".json")
    )
    keys = (
        "model",
        "steps",
        "batch_size",
        "lr",
        "head_lr_mult",
        "weight_decay",
        "warmup_steps",
        "crop",
        "scale",
        "ratio_range",
        "photometric",
        "drop_path_rate",
        "class_weights",
        "amp",
        "seed",
    )
    recipe = {k: v for k, v in _jsonable(cfg).items() if k in keys}
    card = model_card(
        model_name=Path(cfg.output).name or "segformer",
        base_model=None if fresh else name,
        dataset=Path(cfg.data).name,
        metrics=metrics,
        hyperparameters=recipe,
        options=data.eval_options,
        step=step,
    )
    reduce = data.train_set.spec.reduce_labels
    return {
        "preprocessor_config.json": preprocessor_json(size=processor_size(data.eval_options), reduce_labels=reduce),
        INFERENCE_CONFIG: inference_json(data.eval_options),
        "README.md": card,
    }


# ----------------------------------------------------------------------------------------- steps
def train_step(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optim: Optimization,
    cfg: TrainConfig,
    info: DistInfo,
    *,
    step: int,
    last_dir: Path,
    class_weights: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Optimiser step number ``step`` (1-based) over ``cfg.accum_steps`` micro-batches drawn from ``batches``.
    Returns (the loss, averaged over micro-batches and ranks; the lr used). A NaN/inf loss raises
    TrainingDivergedError on every rank before the weights change (``last_dir`` is named in the message)."""
    optim.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=info.device)
    for m in range(cfg.accum_steps):
        pixels, labels = next(batches)
        pixels, labels = pixels.to(info.device, non_blocking=True), labels.to(info.device, non_blocking=True)
        # Gradients are all-reduced only on the last micro-batch of a step.
        sync = info.world_size == 1 or m == cfg.accum_steps - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(info.device, cfg.amp):
                if class_weights is None:
                    loss = model(pixel_values=pixels, labels=labels).loss
                else:
                    logits = model(pixel_values=pixels).logits
                    loss = semantic_loss(logits, labels, _config_of(model), class_weights)
            optim.backward(loss / cfg.accum_steps)
        loss_sum += loss.detach().float()
    loss_value = float(all_reduce_mean(loss_sum / cfg.accum_steps))
    if not math.isfinite(loss_value):  # every rank sees the same reduced value and stops together
        saved = (last_dir / TRAINING_STATE).exists()
        where = f"the last good checkpoint is {last_dir}" if saved else "no checkpoint yet"
        raise TrainingDivergedError(
            f"loss is {loss_value} at step {step} (lr {optim.lr:.3g}); stopped, {where}. "
            "Try a lower --lr, a longer --warmup-steps or --amp none"
        )
    return loss_value, optim.step()


def evaluate_and_checkpoint(
    net: nn.Module, data: TrainData, cfg: TrainConfig, info: DistInfo, run: RunState, log: RunLog, best_dir: Path
) -> dict[str, Any]:
    """Evaluate ``net`` on the validation set (the ranks share the images), log the metrics, and write
    ``best_dir`` when the mIoU beats the best so far. Every rank calls it; returns the metrics."""
    metrics = evaluate(net, data.val_set, data.eval_options, amp=cfg.amp, max_images=cfg.max_eval_images)
    log.evaluation(run.step, metrics)
    if info.is_main:
        log.samples(run.step, validation_samples(net, data), palette_for(data.val_set.id2label))
    net.train()
    if not math.isnan(metrics["mIoU"]) and metrics["mIoU"] > run.best_mIoU:
        run.best_mIoU, run.best_step = metrics["mIoU"], run.step
        if info.is_main:
            report = json.dumps({"step": run.step, **metrics_to_json(metrics)}, indent=2) + "\n"
            files = shareable_files(cfg, data, run.step, metrics_to_json(metrics))
            save_checkpoint(best_dir, net, {**files, "eval.json": report})
        barrier()
    return metrics


def validation_samples(
    net: nn.Module, data: TrainData, count: int = 4
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, ground truth, prediction) of the first ``count`` validation images, for a picture."""
    rows = []
    device = next(net.parameters()).device
    for index in range(min(count, len(data.val_set))):
        image, truth = data.val_set.read(index)
        pixels, _ = data.val_set[index]
        pred = predict_labels(net, pixels[None].to(device), options=data.eval_options)[0].cpu().numpy()
        rows.append((image, truth, pred))
    return rows


def _config_of(model: nn.Module) -> SegformerConfig:
    return getattr(model, "module", model).config


# ----------------------------------------------------------------------------------------- the run
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the recipe. Returns {"step", "last", "best", "best_mIoU", "metrics" (the final evaluation or None)}.

    Raises ValueError for bad options or data (problems listed on stderr first), TrainingDivergedError when
    the loss becomes NaN/inf. Call it once per process (torchrun starts one per GPU)."""
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info)
    finally:
        cleanup()


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    micro = check_config(cfg, info)
    output = Path(cfg.output)
    resume_dir = find_resume_dir(output, cfg.resume)
    if resume_dir is None and (output / "last" / TRAINING_STATE).is_file():
        raise ValueError(f"{output} already holds a run; pass --resume auto to continue it, or another --output")
    data = build_data(cfg, info)

    # ---- model, optimiser, where the run stands
    seed_everything(cfg.seed + info.rank)
    if resume_dir is not None:
        net = SegformerForSemanticSegmentation.from_pretrained(resume_dir)
    else:
        net = build_model(cfg, data.train_set.id2label)
    model, net = prepare_model(net, cfg, info)
    optim = build_optimizer(net, cfg)
    run = restore_state(resume_dir, optim, cfg, info) if resume_dir is not None else RunState()
    if run.step >= cfg.steps:
        raise ValueError(f"{resume_dir} is at step {run.step}, not before --steps {cfg.steps}: nothing to do")
    loader = build_loader(data.train_set, cfg, info, micro=micro, start_step=run.step)

    # ---- the loop
    _log(
        f"training {type(net).__name__} ({sum(p.numel() for p in net.parameters()):,} parameters) on "
        f"{len(data.train_set)} images, {data.train_set.num_labels} classes, {info.world_size} process(es) on "
        f"{info.device}; global batch {cfg.batch_size} = {info.world_size} × {cfg.accum_steps} × {micro}, "
        f"steps {run.step}→{cfg.steps}",
        info,
    )
    log = RunLog(
        output,
        _jsonable(cfg),
        is_main=info.is_main,
        steps=cfg.steps,
        start=run.step,
        batch_size=cfg.batch_size,
        device=info.device,
        progress=cfg.progress,
    )
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    batches, metrics = iter(loader), None
    while run.step < end:
        loss, lr = train_step(
            model,
            batches,
            optim,
            cfg,
            info,
            step=run.step + 1,
            last_dir=output / "last",
            class_weights=data.class_weights,
        )
        run.step += 1
        log.step(run.step, loss, lr, write=run.step % cfg.log_every == 0 or run.step == end)
        if data.val_set is not None and ((cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == cfg.steps):
            metrics = evaluate_and_checkpoint(net, data, cfg, info, run, log, output / "best")
        if run.step % cfg.save_every == 0 or run.step == end:
            files = shareable_files(cfg, data, run.step, metrics_to_json(metrics) if metrics else None)
            save_last(output / "last", net, optim, run, info, files)
    log.close(metrics)
    return {
        "step": run.step,
        "last": str(output / "last"),
        "best": str(output / "best") if run.best_step is not None else None,
        "best_mIoU": run.best_mIoU if run.best_step is not None else None,
        "metrics": metrics,
    }


__all__ = [
    "Optimization",
    "RunLog",
    "RunState",
    "StreamSampler",
    "TrainConfig",
    "TrainData",
    "TrainingDivergedError",
    "build_data",
    "build_loader",
    "build_model",
    "build_optimizer",
    "evaluate_and_checkpoint",
    "lr_factor",
    "param_groups",
    "prepare_model",
    "restore_state",
    "save_checkpoint",
    "save_last",
    "train",
    "train_step",
]

if __name__ == "__main__":  # python -m segformer.train, torchrun -m segformer.train: the `segformer train` command
    from segformer.commands.train import main

    sys.exit(main())
