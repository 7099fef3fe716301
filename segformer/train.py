"""Fine-tune SegFormer with the paper's recipe (:mod:`segformer.recipe`), on one process or many.

    # one process (CPU or one GPU)
    segformer train --data ADEChallengeData2016 --dataset ade20k --model nvidia/mit-b0 --output runs/ade-b0
    # 8 GPUs on one node; --batch-size is the global batch (16 = 2 per GPU, as in the paper)
    torchrun --standalone --nproc_per_node=8 -m segformer.train --data ADEChallengeData2016 --model nvidia/mit-b0
    # two nodes: torchrun --nnodes=2 --node_rank=R --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 ...
    # resume the run in --output where it stopped (same weights as if it had never stopped)
    segformer train ... --resume auto

Every constant of a run is a field of :class:`~segformer.recipe.TrainConfig`. Reproducibility (a resumed run
continues exactly, N processes see the same global batches as one): :mod:`segformer.train_state`; reporting
(progress, metrics.jsonl, curves, samples): :mod:`segformer.train_log`.

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
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import SegformerConfig
from .data.build import (
    build_dataset,
    check_splits,
    detect_kind,
    label_options,
    protocol_kind,
    warn_class_coverage,
)
from .data.datasets import (
    ClassTally,
    MissingSplitError,
    SegmentationDataset,
    leave_stops_to_the_main_process,
    reduced_hint,
    workers_stopped_on_error,
)
from .data.statistics import class_tally, median_frequency_weights
from .data.transforms import eval_transform, rescale_size, train_transform
from .distributed import (
    DistInfo,
    SyncBatchNorm,
    all_gather_objects,
    all_reduce_mean,
    any_rank,
    barrier,
    broadcast_buffers,
    broadcast_flag,
    cleanup,
    errors_agreed,
    every_rank_raises,
    init_distributed,
    raised_on_every_rank,
    warnings_from_rank_zero,
)
from .evaluate import evaluate
from .fileio import remove_killed_writes
from .hub import first_line
from .inference import InferenceOptions, autocast, effective_amp, predict_labels, reuse_work_areas
from .metrics import metrics_to_json
from .modeling import SegformerForSemanticSegmentation, min_input_size, semantic_loss
from .recipe import (
    Optimization,
    TrainConfig,
    build_model,
    build_optimizer,
    check_model,
    lr_factor,
    param_groups,
    resolve_recipe,
    starts_fresh,
)
from .run_files import (
    INFERENCE_CONFIG,
    LABELS_FILE,
    inference_json,
    labels_json,
    load_inference_options,
    model_card,
    preprocessor_json,
    processor_size,
)
from .train_log import RunLog
from .train_state import (
    TRAINING_STATE,
    StopRequests,
    StreamSampler,
    find_resume_dir,
    python_state_to_tuple,
    restore_swapped,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .visualize import palette_for


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting its last good checkpoint. Under
    torchrun every rank raises it alike (marked :func:`~segformer.distributed.raised_on_every_rank`: rank 0
    reports it, once)."""


# ----------------------------------------------------------------------------------------- model
# ----------------------------------------------------------------------------------------- set-up
def check_config(cfg: TrainConfig, info: DistInfo) -> int:
    """Validate the options for this launch; return the per-process micro-batch size."""
    if not isinstance(cfg.data, (str, os.PathLike)):  # (a datasets.Dataset in memory: train_config.json names data)
        raise TypeError(
            f"TrainConfig.data must be a path or hub id, got a {type(cfg.data).__name__}; save a Hugging Face "
            "dataset with .save_to_disk(DIR) (a DatasetDict with train and validation splits) and pass DIR"
        )
    if not cfg.data:
        raise ValueError("no data directory given (--data DIR)")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp must be none, bf16 or fp16, got {cfg.amp!r}")
    for flag, value in (("--steps", cfg.steps), ("--batch-size", cfg.batch_size), ("--accum-steps", cfg.accum_steps)):
        if value < 1:  # (one line named all three: audit)
            raise ValueError(f"{flag} must be positive, got {value}")
    if cfg.check_data not in ("full", "headers", "off"):
        raise ValueError(f"--check-data must be full, headers or off, got {cfg.check_data!r}")
    per_step = info.world_size * cfg.accum_steps
    if cfg.batch_size % per_step:
        resumed = (  # (a resume keeps the run's batch: "--batch-size 4" named a flag the command did not give)
            "; the resumed run's batch cannot change: "
            + _ways_to_split(cfg.batch_size, info.world_size, cfg.accum_steps)
            if cfg.resume and _resumes(cfg)
            else ""
        )
        raise ValueError(
            f"--batch-size {cfg.batch_size} (the global batch) must be divisible by processes × accumulation "
            f"steps = {info.world_size} × {cfg.accum_steps}{resumed}"
        )
    if cfg.amp == "fp16" and info.device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (it relies on a gradient scaler); use --amp bf16 on CPU")
    return cfg.batch_size // per_step


def _ways_to_split(batch: int, world_size: int, accum_steps: int) -> str:
    """How a resumed run's global ``batch`` can be split (its processes × accumulation steps must divide it): the
    process counts that fit these accumulation steps, the accumulation steps that fit these processes, or, where
    neither does, the rule itself."""
    procs = [n for n in range(1, batch + 1) if batch % (n * accum_steps) == 0][:8]
    accums = [a for a in range(1, batch + 1) if batch % (world_size * a) == 0][:8]
    ways = [f"resume it on {', '.join(map(str, procs))} process(es)"] if procs else []
    if accums:
        ways.append(f"with --accum-steps {' or '.join(map(str, accums))} on {world_size} process(es)")
    if not ways:
        return f"resume it on processes × --accum-steps that divide its batch {batch}"
    return " or ".join(ways)


def _resumes(cfg: TrainConfig) -> bool:
    """Whether ``cfg.resume`` finds a run to continue (whose settings it then took)."""
    try:
        return find_resume_dir(Path(cfg.output), cfg.resume) is not None
    except ValueError:
        return False


def check_ranges(cfg: TrainConfig) -> None:
    """Every numeric option within its range, before anything is written (one line naming the option): a value
    the optimiser, the schedule or the augmentation would take badly or only reject late. Run on the resolved
    recipe (:func:`resolve_recipe`), so the data-dependent defaults are checked too."""
    unit = lambda v: 0 <= v <= 1  # noqa: E731
    checks = [
        ("--lr", cfg.lr, 0 < cfg.lr < math.inf, "positive and finite"),
        ("--head-lr-mult", cfg.head_lr_mult, cfg.head_lr_mult is None or cfg.head_lr_mult > 0, "positive"),
        ("--weight-decay", cfg.weight_decay, 0 <= cfg.weight_decay < math.inf, ">= 0 and finite"),
        ("--betas", list(cfg.betas), len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "in [0, 1)"),
        ("--adam-eps", cfg.adam_eps, 0 < cfg.adam_eps < math.inf, "positive and finite"),
        ("--warmup-steps", cfg.warmup_steps, cfg.warmup_steps is None or cfg.warmup_steps >= 0, ">= 0"),
        ("--warmup-ratio", cfg.warmup_ratio, unit(cfg.warmup_ratio), "in [0, 1]"),
        ("--poly-power", cfg.poly_power, 0 <= cfg.poly_power < math.inf, ">= 0 and finite"),
        ("--min-lr", cfg.min_lr, 0 <= cfg.min_lr <= cfg.lr, f"in [0, --lr {cfg.lr:g}] (the schedule decays to it)"),
        ("--scale", cfg.scale, cfg.scale is None or (len(cfg.scale) == 2 and (all(s > 0 for s in cfg.scale)
         or tuple(cfg.scale) == (0, 0))), "two positive sizes, or 0 0 (the images' own size)"),
        ("--seed", cfg.seed, cfg.seed >= 0, ">= 0"),
        ("--crop", list(cfg.crop), len(cfg.crop) == 2 and all(c > 0 for c in cfg.crop), "two positive sizes"),
        ("--ratio-range", cfg.ratio_range, cfg.ratio_range is None or 0 < cfg.ratio_range[0] <= cfg.ratio_range[1],
         "LOW HIGH with 0 < LOW <= HIGH"),
        ("--cat-max-ratio", cfg.cat_max_ratio, cfg.cat_max_ratio is None or 0 < cfg.cat_max_ratio <= 1, "in (0, 1]"),
        ("--flip-prob", cfg.flip_prob, unit(cfg.flip_prob), "in [0, 1]"),
        ("--drop-path-rate", cfg.drop_path_rate, cfg.drop_path_rate is None or 0 <= cfg.drop_path_rate < 1,
         "in [0, 1)"),
        ("--dropout", cfg.dropout, cfg.dropout is None or 0 <= cfg.dropout < 1, "in [0, 1)"),
        ("--eval-every", cfg.eval_every, cfg.eval_every >= 0, ">= 0"),
        ("--save-every", cfg.save_every, cfg.save_every >= 1, ">= 1"),
        ("--log-every", cfg.log_every, cfg.log_every >= 1, ">= 1"),
        ("--max-eval-images", cfg.max_eval_images, cfg.max_eval_images is None or cfg.max_eval_images >= 0, ">= 0"),
        ("--workers", cfg.workers, cfg.workers >= 0, ">= 0"),
        ("--stop-at", cfg.stop_at, cfg.stop_at is None or cfg.stop_at >= 1, ">= 1"),
    ]  # fmt: skip
    for name, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {value}")


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


Precision = tuple[str, str | None]  # (the --amp value that runs, why it differs from the requested one or None)


def run_record(cfg: TrainConfig, precision: Precision) -> dict[str, Any]:
    """``cfg`` as JSON (``train_config.json``) with the precision that ran next to the requested ``amp``:
    ``amp_effective`` ("none" where the device would only emulate ``amp``, see
    :func:`segformer.inference.effective_amp`) and ``amp_fallback_reason`` (that one-line reason, or None)."""
    record: dict[str, Any] = {}
    for key, value in _jsonable(cfg).items():
        record[key] = value
        if key == "amp":
            record["amp_effective"], record["amp_fallback_reason"] = precision
    return record


# What may differ when a run is resumed: where and how it runs, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {"data", "output", "resume", "stop_at", "workers", "progress", "device", "check_data", "log_every",
     "eval_every", "save_every", "max_eval_images"}
)  # fmt: skip


def stored_run_config(resume_dir: Path) -> dict[str, Any]:
    """The ``train_config.json`` of the run ``resume_dir`` (its last/ folder) belongs to. Every run writes it when
    it starts; without it the run's settings are unknown, and a resume would silently continue with others (the
    command line's defaults: another recipe, another schedule), so its absence is a ValueError."""
    path = Path(resume_dir).parent / "train_config.json"
    if not path.is_file():
        raise ValueError(
            f"{path}: missing, so the settings of the run in {resume_dir} are unknown and resuming could change "
            "them; restore the file (every run writes it when it starts), or start a new --output"
        )
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the run's configuration ({first_line(exc)})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: not a run configuration (a JSON object)")
    return record


def check_resumed_config(cfg: TrainConfig, stored: dict[str, Any]) -> None:
    """ValueError where a resumed run would compute something else than the run it continues: an option (other
    than :data:`RESUMABLE_CHANGES`) whose value differs from the run's ``train_config.json``. ``segformer train
    --resume`` takes every option it is not given from there."""
    now = _jsonable(cfg)
    differ = [
        f"--{k.replace('_', '-')} {_shown(now[k])} (the run: {_shown(stored[k])})"
        for k in now
        if k not in RESUMABLE_CHANGES and k in stored and now[k] != stored[k]
    ]
    if differ:
        raise ValueError(
            f"{cfg.output}: resuming with other settings than the run's ({'; '.join(differ)}): leave them out to "
            "continue the run as it was, or start a new --output"
        )


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def check_eval_size(config: SegformerConfig, options: InferenceOptions) -> None:
    """ValueError, before training, where the evaluation's windows would be below the model's minimum input."""
    smallest = min_input_size(config)
    if options.mode == "slide" and min(options.crop_size) < smallest:
        raise ValueError(
            f"--eval-crop-size {options.crop_size[0]}x{options.crop_size[1]} is below this model's minimum input "
            f"of {smallest}x{smallest} pixels"
        )


def _log(msg: str, info: DistInfo) -> None:
    if info.is_main:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """The data sets of a run and the evaluation protocol of their kind."""

    kind: str  # how the data is read: folder | ade20k | cityscapes | hf (eval_options: recipe_kind's protocol)
    train_set: SegmentationDataset
    val_set: SegmentationDataset | None  # None: no validation split, so no evaluation and no best/
    eval_options: InferenceOptions
    class_weights: torch.Tensor | None = None  # (K,) loss weight per class, or None: plain cross-entropy


def data_kind(cfg: TrainConfig) -> str:
    return detect_kind(cfg.data) if cfg.dataset == "auto" else cfg.dataset


def recipe_kind(cfg: TrainConfig, kind: str | None = None) -> str:
    """The kind whose recipe and evaluation protocol the run takes: the data's (``kind``, default
    :func:`data_kind`), ADE20K's for a Hugging Face copy of it (segformer.data.build.protocol_kind)."""
    return protocol_kind(cfg.data, data_kind(cfg) if kind is None else kind, **label_options(cfg))


def build_data(cfg: TrainConfig, info: DistInfo, protocol: str | None = None) -> TrainData:
    """The training set with the recipe's augmentation (``cfg`` resolved by :func:`resolve_recipe`) and the
    validation set, checked as ``cfg.check_data`` says (every rank gets the main rank's verdict). ``protocol``: the
    kind whose recipe and evaluation protocol apply (default :func:`recipe_kind`, which may read the data)."""
    kind = data_kind(cfg)
    # (scene_parse_150 is read as "hf" and trained and evaluated as "ade20k")
    protocol = recipe_kind(cfg, kind) if protocol is None else protocol
    cfg = resolve_recipe(cfg, protocol)[0]  # a no-op for a resolved cfg
    eval_opts = cfg.eval_inference_options(protocol)  # a bad --eval-* option fails here, before any work
    transform = train_transform(
        tuple(cfg.crop),
        scale=None if tuple(cfg.scale) == (0, 0) else tuple(cfg.scale),
        ratio_range=tuple(cfg.ratio_range),
        cat_max_ratio=cfg.cat_max_ratio,
        flip_prob=cfg.flip_prob,
        photometric=cfg.photometric,
    )
    labels = dict(kind=kind, **label_options(cfg))
    with errors_agreed(ValueError, OSError):  # (every rank reads the same folder: under torchrun, told once)
        train_set, train_listing = build_dataset(cfg.data, "train", transform=transform, **labels)
        if train_set.num_labels < 2:  # (it trained every step, then its evaluation refused a one-label model: audit)
            raise ValueError(
                f"--data {cfg.data}: one class ({train_set.id2label[0]!r}); segmentation needs two at least, e.g. "
                'background and the object (for 0/255 masks: ["background", "object"] with "map": {"255": 1} in '
                "labels.json)"
            )
        try:
            val_set, val_listing = build_dataset(cfg.data, "val", transform=eval_transform(), **labels)
        except MissingSplitError as exc:  # (a val split that is there but broken is an error, not a warning)
            val_set, val_listing, missing_val = None, None, exc
        else:
            missing_val = None
    if info.is_main:
        _warn_crop_beyond_images(cfg, train_set)
    if missing_val is not None:
        _log(f"warning: no evaluation ({missing_val}); only last/ will be saved", info)
    with every_rank_raises(ValueError):  # the main rank's verdict, on every rank
        tally = check_splits([(train_set, train_listing), (val_set, val_listing)], cfg.check_data, cfg.data)
    with every_rank_raises(ValueError):
        weights = resolve_class_weights(cfg, train_set, info, tally)
    return TrainData(kind, train_set, val_set, eval_opts, weights)


def _keep_the_runs_protocol(data: TrainData, resume_dir: Path, info: DistInfo) -> TrainData:
    """``data`` evaluated as the resumed run was (the protocol ``resume_dir`` keeps in inference_config.json):
    the data set's default may differ from the run's (``--data`` now another form of the same set, e.g.
    scene_parse_150 for the ADE20K folder, or a version whose default changed), and its best/ would then be chosen
    among mIoUs measured two ways. The run's own eval options are all that --resume takes, so the stored
    protocol is the run's."""
    stored = load_inference_options(resume_dir)
    if stored is None or stored == data.eval_options:
        return data
    _log(f"evaluating with the run's protocol ({stored.describe()}, {resume_dir / INFERENCE_CONFIG}), not this "
         f"data set's default ({data.eval_options.describe()})", info)  # fmt: skip
    return dataclasses.replace(data, eval_options=stored)


def _warn_crop_beyond_images(cfg: TrainConfig, train_set: SegmentationDataset, sample: int = 200) -> None:
    """One warning where ``--crop`` is more than twice the area of the largest training image (up to ``sample``
    of them, read by their headers), at the largest random ratio: every sample is then mostly padding that the
    loss ignores, time and memory for nothing (own data at its own scale; audit: 64-200 px images in 512x512
    crops, 94% padding)."""
    pairs = getattr(train_set, "pairs", None)
    if not pairs:
        return
    step = max(1, len(pairs) // sample)
    sizes = []
    for image, _ in pairs[::step]:
        try:
            with Image.open(image) as im:
                sizes.append(im.size)
        except Exception:  # (the data check names unreadable files)
            continue
    if not sizes:
        return
    scaled_to = tuple(cfg.scale) != (0, 0)  # (--scale 10 10 made every sample padding without a word: audit)
    if scaled_to:
        sizes = [rescale_size(h, w, tuple(cfg.scale))[::-1] for w, h in sizes]  # (width, height) as rescaled
    width, height = max(w for w, _ in sizes), max(h for _, h in sizes)
    ratio = max(cfg.ratio_range) if cfg.ratio_range else 1.0
    crop_h, crop_w = cfg.crop
    covered = min(crop_h, height * ratio) * min(crop_w, width * ratio) / (crop_h * crop_w)
    if covered >= 0.5:
        return
    fit = (min(crop_h, -(-round(height * ratio) // 32) * 32), min(crop_w, -(-round(width * ratio) // 32) * 32))
    scaled = f", up to {round(width * ratio)}x{round(height * ratio)} at the random ratio" if ratio != 1 else ""
    images = f"the training images at --scale {cfg.scale[0]} {cfg.scale[1]}" if scaled_to else "the training images"
    # (sides in multiples of 32; where that is the crop given, no smaller crop is offered: it offered the same one)
    offer = f"; --crop {fit[0]} {fit[1]} fits them" if fit != (crop_h, crop_w) else ""
    print(
        f"warning: --crop {crop_h} {crop_w} is larger than {images} (at most {width} wide and {height} "
        f"high{scaled}): at least {100 * (1 - covered):.0f}% of each sample is padding the loss ignores, time and "
        f"memory for nothing{offer}",
        file=sys.stderr,
    )


def resolve_class_weights(
    cfg: TrainConfig, train_set: SegmentationDataset, info: DistInfo, tally: ClassTally | None = None
) -> torch.Tensor | None:
    """``--class-weights``: none; labels (``class_weights`` in labels.json); auto (median-frequency balancing
    over the training masks, counted on the main rank and shared). ``tally``: the full data check's count of
    them (none read again); without one (``--check-data headers`` / ``off``) the masks are read here, and what the
    full check would have said about the classes it finds absent is said here (a class with no pixel keeps weight
    1 and is never learnt; no labelled pixel at all is a ValueError)."""
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights == "labels":
        if train_set.spec.class_weights is None:
            raise ValueError('--class-weights labels: labels.json has no "class_weights"')
        return torch.tensor(train_set.spec.class_weights, dtype=torch.float32)
    if cfg.class_weights != "auto":
        raise ValueError(f"--class-weights must be none, auto or labels, got {cfg.class_weights!r}")
    weights, problems = None, []
    if info.is_main:
        if tally is None:
            tally = class_tally(train_set)
            problems = warn_class_coverage(train_set, tally)
        weights = median_frequency_weights(tally.pixels).tolist()
    weights, problems = all_gather_objects((weights, problems))[0]  # the main rank's, on every rank
    if problems:
        raise ValueError(f"--class-weights auto: {train_set.name}: {problems[0]}")
    names = train_set.id2label  # (the weights were said nowhere: audit)
    shown = ", ".join(f"{names[k]} {w:.3g}" for k, w in enumerate(weights[:12]))
    _log(f"class weights (median frequency): {shown}{', ...' if len(weights) > 12 else ''}", info)
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
        worker_init_fn=leave_stops_to_the_main_process,
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


# ----------------------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """Where a run stands; ``last/training_state.pt`` holds it next to the optimiser and the RNG states."""

    step: int = 0  # optimiser steps done
    best_mIoU: float = -math.inf
    best_step: int | None = None  # None: best/ not written yet


def restore_state(resume_dir: Path, optim: Optimization, cfg: TrainConfig, info: DistInfo) -> RunState:
    """Load ``resume_dir/training_state.pt`` into ``optim`` and this rank's RNGs; return where the run stood."""
    path = resume_dir / TRAINING_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        optim.load_state_dict(state)
        best = state.get("best_mIoU")
        run = RunState(int(state["step"]), float(best) if best is not None else -math.inf, state.get("best_step"))
        rngs = state["rng"]
    except Exception as exc:  # (truncated, not a training state, from another model or optimiser)
        reason = f"{type(exc).__name__}: {first_line(exc)}" if isinstance(exc, KeyError) else first_line(exc)
        raise ValueError(f"{path}: not a readable training state ({reason}); resume from another run") from None
    if len(rngs) == info.world_size:
        rng = rngs[info.rank]
        rng["python"] = python_state_to_tuple(rng["python"])
        set_rng_state(rng)
    else:  # a different process count cannot continue the same dropout streams: reseed, say so
        _log(f"warning: resuming {len(rngs)}-process state on {info.world_size} process(es); RNG streams reseeded",
             info)  # fmt: skip
        seed_everything(cfg.seed + info.rank + run.step)
    _log(f"resumed from {resume_dir} at step {run.step}", info)
    return run


def save_last(
    directory: Path, net: nn.Module, optim: Optimization, run: RunState, info: DistInfo, files: dict[str, str]
) -> None:
    """Write ``directory`` (last/): the weights, ``files`` (see :func:`shareable_files`) and all that an exact
    resume needs. Every rank calls it."""
    rngs = all_gather_objects(rng_state())  # every rank's streams, for an exact resume
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


def shareable_files(
    cfg: TrainConfig,
    data: TrainData,
    step: int,
    metrics: dict[str, Any] | None,
    *,
    precision: Precision,
    metrics_step: int | None = None,
) -> dict[str, str]:
    """What makes a checkpoint folder complete (see :mod:`segformer.run_files`): the matching
    ``preprocessor_config.json``, the evaluation protocol, the label rules (``labels.json``) and a model card
    with ``metrics`` (None: not evaluated; measured at ``metrics_step``, default ``step``) and the
    hyper-parameters, the precision that ran (``precision``, see :func:`run_record`) included."""
    fresh = starts_fresh(cfg.model)
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
        "amp_effective",
        "amp_fallback_reason",
        "seed",
    )
    recipe = {k: v for k, v in run_record(cfg, precision).items() if k in keys}
    if recipe["amp_fallback_reason"] is None:
        del recipe["amp_fallback_reason"]  # no fallback: the card shows amp and amp_effective alike
    card = model_card(
        model_name=Path(cfg.output).name or "segformer",
        base_model=None if fresh else str(cfg.model),
        dataset=Path(cfg.data).name,
        metrics=metrics,
        hyperparameters=recipe,
        options=data.eval_options,
        step=step,
        metrics_step=step if metrics_step is None else metrics_step,
        evaluated_on=_evaluated_on(metrics, data),
    )
    reduce = data.train_set.spec.reduce_labels
    return {
        "preprocessor_config.json": preprocessor_json(size=processor_size(data.eval_options), reduce_labels=reduce),
        INFERENCE_CONFIG: inference_json(data.eval_options),
        LABELS_FILE: labels_json(data.train_set.spec.describe()),
        "README.md": card,
    }


def _evaluated_on(metrics: dict[str, Any] | None, data: TrainData) -> str | None:
    """What the metrics were measured on, for the model card: "all N validation images", or "the first n of N
    validation images (--max-eval-images)" (a card said nothing, and eval of best/ on the whole split then
    reported another number: audit)."""
    count = (metrics or {}).get("num_images")
    if count is None or data.val_set is None:
        return None
    total = len(data.val_set)
    return f"all {total} validation images" if count >= total else (
        f"the first {count} of {total} validation images (--max-eval-images)")  # fmt: skip


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
    amp: str | None = None,
) -> tuple[float, float]:
    """Optimiser step number ``step`` (1-based) over ``cfg.accum_steps`` micro-batches drawn from ``batches``,
    under ``amp`` autocast (default ``cfg.amp``; either way float32 where the device would only emulate it).
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
            with autocast(info.device, cfg.amp if amp is None else amp):
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
        diverged = TrainingDivergedError(
            f"loss is {loss_value} at step {step} (lr {optim.lr:.3g}); stopped, {where}. "
            "Try a lower --lr, a longer --warmup-steps or --amp none"
        )
        raise raised_on_every_rank(diverged)  # (rank 0 reports it; the others stop with it, silently)
    return loss_value, optim.step()


def _evaluates_at(step: int, cfg: TrainConfig) -> bool:
    """Whether the run evaluates after ``step``: every --eval-every steps, and at the last one."""
    return bool(cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps


def evaluate_and_checkpoint(
    net: nn.Module,
    data: TrainData,
    cfg: TrainConfig,
    info: DistInfo,
    run: RunState,
    log: RunLog,
    best_dir: Path,
    *,
    precision: Precision | None = None,
) -> dict[str, Any]:
    """Evaluate ``net`` on the validation set (the ranks share the images) under ``precision`` (see
    :func:`run_record`; default :func:`~segformer.inference.effective_amp` of ``cfg.amp``), log the metrics,
    and write ``best_dir`` when the mIoU beats the best so far. Every rank calls it; returns the metrics."""
    precision = effective_amp(cfg.amp, info.device) if precision is None else precision
    # The training's random streams stay as they were: an evaluation draws from them (a DataLoader's iterator
    # takes its base seed from torch's), which would make the dropout and drop-path masks of every later step
    # depend on --eval-every, and a resumed run differ from one run straight through.
    state = rng_state()
    broadcast_buffers(net)  # (every rank evaluates rank 0's model, the one saved: its BatchNorm statistics too)
    try:
        limit = cfg.max_eval_images or None  # (0: every image, as without the option)
        metrics = evaluate(net, data.val_set, data.eval_options, amp=precision[0], max_images=limit)
        log.evaluation(run.step, metrics)
        if info.is_main:
            log.samples(run.step, validation_samples(net, data), palette_for(data.val_set.id2label))
    finally:
        set_rng_state(state)
    net.train()
    if not math.isnan(metrics["mIoU"]) and metrics["mIoU"] > run.best_mIoU:
        run.best_mIoU, run.best_step = metrics["mIoU"], run.step
        if info.is_main:
            report = json.dumps({"step": run.step, **metrics_to_json(metrics)}, indent=2) + "\n"
            files = shareable_files(cfg, data, run.step, metrics_to_json(metrics), precision=precision)
            save_checkpoint(best_dir, net, {**files, "eval.json": report})
        barrier()
    return metrics


def validation_samples(
    net: nn.Module, data: TrainData, count: int = 4
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image, ground truth, prediction) of the first ``count`` validation images, for a picture."""
    rows = []
    device = next(net.parameters()).device
    with reuse_work_areas():
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
    """Run the recipe. Returns {"step", "steps", "last", "best", "best_mIoU", "best_step", "metrics" (the final
    evaluation or None)}.

    Raises ValueError for bad options or data (problems listed on stderr first), TrainingDivergedError when
    the loss becomes NaN/inf. Call it once per process (torchrun starts one per GPU)."""
    info = init_distributed(cfg.device)
    try:
        with warnings_from_rank_zero():  # (under torchrun every rank would print them alike)
            return _train(cfg, info)
    finally:
        cleanup()


def _check_output(output: Path, cfg: TrainConfig) -> tuple[Path | None, dict[str, Any]]:
    """(the checkpoint to resume from or None, its run's stored config or {}): ValueError for an --output that
    cannot take this run (a file; another run, or an earlier run's best/, that it would overwrite)."""
    if output.exists() and not output.is_dir():  # (it failed with "file exists" at the first save: audit)
        raise ValueError(f"--output {output}: a file, not a folder")
    resume_dir = find_resume_dir(output, cfg.resume)
    if resume_dir is None and any((output / d / TRAINING_STATE).is_file() for d in ("last", ".last.old")):
        raise ValueError(f"{output} already holds a run; pass --resume auto to continue it, or another --output")
    if resume_dir is None and cfg.resume == "auto" and (output / "last").is_dir():
        raise ValueError(f"{output / 'last'} has no {TRAINING_STATE}: it cannot be resumed (start a new --output)")
    if resume_dir is None and (output / "best" / "eval.json").is_file():  # (a new run would replace that model)
        raise ValueError(
            f"{output} holds an earlier run's best/ checkpoint but no last/ to resume; pass another --output (or move "
            "best/ away)"
        )
    if resume_dir is None:
        return None, {}
    elsewhere = output.resolve() != resume_dir.parent.resolve()
    if elsewhere and any((output / d / TRAINING_STATE).is_file() for d in ("last", ".last.old")):
        raise ValueError(
            f"{output} already holds another run: resuming {resume_dir} there would overwrite it; pass "
            f"--output {resume_dir.parent} to continue that run where it is, or a new --output"
        )
    stored = stored_run_config(resume_dir)
    check_resumed_config(cfg, stored)
    return resume_dir, stored


def _train(cfg: TrainConfig, info: DistInfo) -> dict[str, Any]:
    # Errors every rank raises alike (the options, the data check's verdict, a diverged loss) are marked so that
    # under torchrun only rank 0 reports them (segformer.distributed.raised_on_every_rank).
    with every_rank_raises(ValueError):  # the options and the process count alone decide
        micro = check_config(cfg, info)
        check_model(cfg.model)
    protocol = recipe_kind(cfg)  # (a Hugging Face copy of ADE20K: "ade20k"; it reads the data's features)
    cfg, notes = resolve_recipe(cfg, protocol)  # what the run uses, printed and kept in train_config.json
    with every_rank_raises(ValueError):
        check_ranges(cfg)
    # --amp as it runs here: a precision the device would only emulate becomes float32 (one warning line), and
    # train_config.json and the model cards say so next to what was asked for.
    precision = effective_amp(cfg.amp, info.device)
    output = Path(cfg.output)
    with errors_agreed(ValueError, OSError):  # (the folder as every rank sees it: under torchrun, told once)
        resume_dir, stored = _check_output(output, cfg)
    if resume_dir is None and cfg.resume == "auto":  # (the settings are then this command's, with their defaults)
        _log(f"--resume auto: no run in {output} to resume; starting a new one with this command's settings", info)
    if resume_dir is not None and info.is_main:
        restore_swapped(resume_dir.parent, "best")  # (best/ is the main rank's alone)
        # a run killed while it wrote its curves or a sample (rank 0 alone writes them) left a temporary file
        if removed := remove_killed_writes(resume_dir.parent):
            _log(f"removed {removed} temporary file(s) a killed run left in {resume_dir.parent}", info)
    data = build_data(cfg, info, protocol)  # (with the evaluation protocol: its errors now, not after the training)
    if resume_dir is not None:
        data = _keep_the_runs_protocol(data, resume_dir, info)
    if resume_dir is not None and stored.get("train_images") not in (None, len(data.train_set)):
        _log(
            f"warning: {cfg.data} has {len(data.train_set)} training pairs, the run started on "
            f"{stored['train_images']}: the resumed run is not the interrupted one's continuation (the order of the "
            "samples follows their count)",
            info,
        )
    if resume_dir is None:  # (audit: both ran without a word)
        if cfg.batch_size > len(data.train_set):
            _log(f"warning: --batch-size {cfg.batch_size} is more than the {len(data.train_set)} training images: "
                 "each batch holds some of them more than once", info)  # fmt: skip
        if cfg.warmup_steps and cfg.warmup_steps >= cfg.steps:
            _log(f"warning: --warmup-steps {cfg.warmup_steps} is not shorter than --steps {cfg.steps}: the lr never "
                 f"reaches --lr {cfg.lr:g}", info)  # fmt: skip
    labels = json.loads(json.dumps(data.train_set.spec.describe()))  # (as train_config.json holds it)
    stored_spec = stored.get("label_spec") if resume_dir is not None else None
    # (another class count: the model's check below says so in its words)
    if stored_spec not in (None, labels) and stored_spec.get("num_labels") == labels["num_labels"]:
        changed = sorted(k for k in labels if labels.get(k) != stored_spec.get(k))
        raise ValueError(
            f"{cfg.data}: its label rules differ from the run's ({', '.join(changed)}; labels.json or "
            "--labels/--ignore-index/--reduce-labels): resume with the run's own, or start a new --output"
        )
    if notes:  # (after the checks of the options, the folder and the data: a refused run prints its error alone)
        _log("recipe: " + "; ".join(notes), info)

    # ---- model, optimiser, where the run stands
    seed_everything(cfg.seed + info.rank)
    if resume_dir is not None:
        net = SegformerForSemanticSegmentation.from_pretrained(resume_dir, dtype=torch.float32)
    else:
        net = build_model(cfg, data.train_set.id2label)
    if net.config.num_labels != data.train_set.num_labels:
        raise ValueError(
            f"{resume_dir}: the run's model predicts {net.config.num_labels} classes, the data has "
            f"{data.train_set.num_labels} (--data {cfg.data}): "
            + (reduced_hint(data.train_set, net.config.num_labels) or "resume on the run's own data")
        )
    check_eval_size(net.config, data.eval_options)
    model, net = prepare_model(net, cfg, info)
    optim = build_optimizer(net, cfg)
    run = restore_state(resume_dir, optim, cfg, info) if resume_dir is not None else RunState()
    if run.step >= cfg.steps:
        raise ValueError(f"{resume_dir} is at step {run.step}, not before --steps {cfg.steps}: nothing to do")
    if cfg.stop_at is not None and run.step >= cfg.stop_at:
        raise ValueError(f"--stop-at {cfg.stop_at}: {resume_dir} is already at step {run.step}: nothing to do")
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
        {**run_record(cfg, precision), "train_images": len(data.train_set), "label_spec": labels},
        is_main=info.is_main,
        steps=cfg.steps,
        start=run.step,
        batch_size=cfg.batch_size,
        device=info.device,
        progress=cfg.progress,
    )
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    # the last evaluation and its step; on a resume the one metrics.jsonl kept (a card then names it, as it would
    # have had the run not been interrupted)
    metrics_step, metrics = log.last_evaluation if log.last_evaluation is not None else (None, None)
    # (in place: a run resumed elsewhere has no metrics.jsonl there; rank 0 alone reads it, and decides for all)
    in_place = resume_dir is not None and resume_dir.parent.resolve() == output.resolve()
    missed = broadcast_flag(in_place and _evaluates_at(run.step, cfg) and metrics_step != run.step)
    if data.val_set is not None and missed:
        # a stop (StopRequests) came at this evaluation step before its evaluation: it runs now, as it would have
        # (evaluations leave the training's random streams as they were: the run goes on as if never stopped)
        metrics = evaluate_and_checkpoint(net, data, cfg, info, run, log, output / "best", precision=precision)
        metrics_step = run.step
    with workers_stopped_on_error(iter(loader)) as batches, StopRequests(announce=info.is_main) as stop:
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
                amp=precision[0],
            )
            run.step += 1
            # a stop asked for: after this step (on every rank the same), unless it is the last one (it ends anyway)
            stopping = any_rank(stop.signum is not None) and run.step < end
            log.step(run.step, loss, lr, write=run.step % cfg.log_every == 0 or run.step == end or stopping)
            if data.val_set is not None and _evaluates_at(run.step, cfg) and not stopping:  # (a resume runs it)
                metrics = evaluate_and_checkpoint(net, data, cfg, info, run, log, output / "best", precision=precision)
                metrics_step = run.step
            if run.step % cfg.save_every == 0 or run.step == end or stopping:
                files = shareable_files(
                    cfg, data, run.step, metrics_to_json(metrics) if metrics else None, precision=precision,
                    metrics_step=metrics_step,
                )  # fmt: skip
                save_last(output / "last", net, optim, run, info, files)
            if stopping:
                if stop.signum is None:  # (another rank was signalled: this one stops as that signal would)
                    stop.signum = signal.SIGTERM
                stop.take_its_course()
                break  # (a library caller's own handler that does not raise: the run returns at this step)
        if stop.signum is not None and run.step == cfg.steps:
            _log("segformer train: the stop came at the last step: the run ended as it would have", info)
    log.close(metrics)
    best = output / "best"
    if not best.is_dir() and resume_dir is not None:  # resumed into a new folder: the best so far is the old run's
        best = Path(resume_dir).parent / "best"
    return {
        "step": run.step,
        "steps": cfg.steps,
        "last": str(output / "last"),
        "best": str(best) if run.best_step is not None and best.is_dir() else None,
        "best_mIoU": run.best_mIoU if run.best_step is not None else None,
        "best_step": run.best_step,
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
    "run_record",
    "save_checkpoint",
    "save_last",
    "train",
    "train_step",
]

if __name__ == "__main__":  # python -m segformer.train, torchrun -m segformer.train: the `segformer train` command
    from segformer.commands.train import main

    sys.exit(main())
