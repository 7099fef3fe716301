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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import VARIANTS, SegformerConfig
from .data.datasets import build_dataset, check_dataset, detect_kind
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
from .hub import first_line
from .inference import InferenceOptions, autocast
from .metrics import format_table, metrics_to_json
from .modeling import SegformerForSemanticSegmentation

TRAINING_STATE = "training_state.pt"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting its last good checkpoint."""


@dataclass
class TrainConfig:
    """Everything a run depends on; the defaults are the paper's ADE20K recipe (FACTS §6)."""

    data: str = ""
    dataset: str = "auto"  # folder | ade20k | cityscapes | auto
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
    extra: dict[str, Any] = field(default_factory=dict)

    def eval_inference_options(self, kind: str) -> InferenceOptions:
        """The eval_* fields over the protocol of data-set kind ``kind`` (see segformer.evaluate.eval_options),
        validated: the one place where they become InferenceOptions."""
        return eval_options(
            kind, mode=self.eval_mode, crop_size=self.eval_crop, stride=self.eval_stride,
            short_side=self.eval_short_side, long_side=self.eval_long_side, align=self.eval_align,
            scales=self.eval_scales, flip=self.eval_flip or None,
        )  # fmt: skip


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
        out.append({
            "params": params,
            "lr": cfg.lr * (cfg.head_lr_mult if is_head else 1.0),
            "weight_decay": 0.0 if is_norm else cfg.weight_decay,
            "name": f"{'head' if is_head else 'encoder'}{'/norm' if is_norm else ''}",
        })  # fmt: skip
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
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
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
        overrides.update(hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                         classifier_dropout_prob=cfg.dropout)  # fmt: skip
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


# ----------------------------------------------------------------------------------------- the run
def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg) if not isinstance(cfg.model, SegformerConfig) else {
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "model"},
        "model": cfg.model.to_dict(),
    }  # fmt: skip
    return json.loads(json.dumps(d, default=str))


def _check_config(cfg: TrainConfig, world_size: int) -> int:
    """Validate the options; return the per-process micro-batch size."""
    if not cfg.data:
        raise ValueError("no data directory given (--data DIR)")
    if cfg.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp must be none, bf16 or fp16, got {cfg.amp!r}")
    if cfg.steps < 1 or cfg.accum_steps < 1 or cfg.batch_size < 1:
        raise ValueError("--steps, --batch-size and --accum-steps must be positive")
    if cfg.check_data not in ("full", "headers", "off"):
        raise ValueError(f"--check-data must be full, headers or off, got {cfg.check_data!r}")
    per_step = world_size * cfg.accum_steps
    if cfg.batch_size % per_step:
        raise ValueError(
            f"--batch-size {cfg.batch_size} (the global batch) must be divisible by processes × accumulation "
            f"steps = {world_size} × {cfg.accum_steps}"
        )
    return cfg.batch_size // per_step


def _log(msg: str, dist_info: DistInfo) -> None:
    if dist_info.is_main:
        print(msg, file=sys.stderr, flush=True)


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
    device, world, rank = info.device, info.world_size, info.rank
    micro = _check_config(cfg, world)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (it relies on a gradient scaler); use --amp bf16 on CPU")
    output = Path(cfg.output)
    resume_dir = find_resume_dir(output, cfg.resume)
    if resume_dir is None and (output / "last" / TRAINING_STATE).is_file():
        raise ValueError(f"{output} already holds a run; pass --resume auto to continue it, or another --output")

    # ---- data
    kind = detect_kind(cfg.data) if cfg.dataset == "auto" else cfg.dataset
    ev_opts = cfg.eval_inference_options(kind)  # a bad --eval-* option fails here, before any work
    scale = cfg.scale if cfg.scale is not None else ((2048, 1024) if kind == "cityscapes" else (2048, 512))
    transform = train_transform(
        tuple(cfg.crop), scale=None if tuple(scale) == (0, 0) else tuple(scale), ratio_range=tuple(cfg.ratio_range),
        cat_max_ratio=cfg.cat_max_ratio, flip_prob=cfg.flip_prob, photometric=cfg.photometric,
    )  # fmt: skip
    train_set, train_listing = build_dataset(cfg.data, "train", kind=kind, transform=transform)
    try:
        val_set, val_listing = build_dataset(cfg.data, "val", kind=kind, transform=eval_transform())
    except ValueError as exc:
        val_set, val_listing = None, None
        _log(f"warning: no evaluation ({exc}); only last/ will be saved", info)
    if cfg.check_data != "off":
        ok = True
        if info.is_main:  # one rank reads the files; the others follow its verdict
            for ds, listing in ((train_set, train_listing), (val_set, val_listing)):
                if ds is None:
                    continue
                report = check_dataset(ds, listing, check_values=cfg.check_data == "full")
                if not report.ok:
                    print(f"{ds.name}: {report.format()}", file=sys.stderr)
                    ok = False
        if not broadcast_flag(ok):
            raise ValueError(f"{cfg.data}: the data check failed (problems listed above; --check-data off skips it)")

    # ---- model, optimiser, schedule
    seed_everything(cfg.seed + rank)
    if resume_dir is not None:
        model = SegformerForSemanticSegmentation.from_pretrained(resume_dir)
    else:
        model = build_model(cfg, train_set.id2label)
    model.to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.sync_bn and world > 1:
        model = SyncBatchNorm.convert(model)  # torch's SyncBatchNorm is GPU-only; ours also runs on gloo
    net = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(
        param_groups(net, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    start, best, best_step = 0, -math.inf, None
    if resume_dir is not None:
        state = torch.load(resume_dir / TRAINING_STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, best_step = int(state["step"]), state.get("best_step")
        best = float(state["best_mIoU"]) if state.get("best_mIoU") is not None else -math.inf
        rngs = state["rng"]
        if len(rngs) == world:
            rng = rngs[rank]
            rng["python"] = _python_state_to_tuple(rng["python"])
            set_rng_state(rng)
        else:  # a different process count cannot continue the same dropout streams: reseed, say so
            _log(
                f"warning: resuming {len(rngs)}-process state on {world} processes; RNG streams reseeded",
                info,
            )
            seed_everything(cfg.seed + rank + start)
        _log(f"resumed from {resume_dir} at step {start}", info)
    if start >= cfg.steps:
        raise ValueError(f"{resume_dir} is at step {start}, not before --steps {cfg.steps}: nothing to do")

    sampler = StreamSampler(len(train_set), seed=cfg.seed, block=micro, rank=rank, world_size=world,
                            start=start * cfg.batch_size)  # fmt: skip
    # A generator of its own keeps the DataLoader from drawing on the global torch RNG (resume equality).
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=micro, sampler=sampler, num_workers=cfg.workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip

    # ---- files
    writer = None
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "train_config.json", json.dumps(_jsonable(cfg), indent=2) + "\n")
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(output / "tensorboard"))
        except ImportError:  # tensorboard is optional
            writer = None
    log_file = output / "metrics.jsonl"

    def log(record: dict[str, Any]) -> None:
        if not info.is_main:
            return
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics_to_json(record)) + "\n")
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    writer.add_scalar(key, value, record["step"])

    def checkpoint(step: int) -> None:
        rngs = _gather_objects(rng_state(), world)  # every rank's streams, for an exact resume
        if info.is_main:
            state = {
                "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rngs,
                "best_mIoU": best if best > -math.inf else None, "best_step": best_step, "world_size": world,
            }  # fmt: skip
            save_checkpoint(output / "last", net, {TRAINING_STATE: state})
        barrier()

    def run_eval(step: int) -> dict[str, Any]:
        nonlocal best, best_step
        metrics = evaluate(net, val_set, ev_opts, amp=cfg.amp, max_images=cfg.max_eval_images)
        net.train()
        log({"step": step, "eval/mIoU": metrics["mIoU"], "eval/aAcc": metrics["aAcc"], "eval/mAcc": metrics["mAcc"],
             "eval/IoU": metrics["IoU"]})  # fmt: skip
        _log(f"step {step}: mIoU {100 * metrics['mIoU']:.2f}  aAcc {100 * metrics['aAcc']:.2f}", info)
        if not math.isnan(metrics["mIoU"]) and metrics["mIoU"] > best:
            best, best_step = metrics["mIoU"], step
            if info.is_main:
                save_checkpoint(output / "best", net, {"eval.json": json.dumps(
                    {"step": step, **metrics_to_json(metrics)}, indent=2) + "\n"})  # fmt: skip
            barrier()
        return metrics

    # ---- the loop
    _log(
        f"training {type(net).__name__} ({sum(p.numel() for p in net.parameters()):,} parameters) on "
        f"{len(train_set)} images, {train_set.num_labels} classes, {world} process(es) on {device}; global batch "
        f"{cfg.batch_size} = {world} × {cfg.accum_steps} × {micro}, steps {start}→{cfg.steps}", info,
    )  # fmt: skip
    from tqdm import tqdm

    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True,
               disable=not (cfg.progress and info.is_main and sys.stderr.isatty()))  # fmt: skip
    batches = iter(loader)
    last_metrics, tic = None, time.perf_counter()
    step = start
    while step < end:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for m in range(cfg.accum_steps):
            pixels, labels = next(batches)
            pixels, labels = pixels.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-batch of a step.
            sync = contextlib.nullcontext() if world == 1 or m == cfg.accum_steps - 1 else model.no_sync()
            with sync:
                with autocast(device, cfg.amp):
                    loss = model(pixel_values=pixels, labels=labels).loss
                scaled = loss / cfg.accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        loss_value = float(all_reduce_mean(loss_sum / cfg.accum_steps))
        if not math.isfinite(loss_value):  # every rank sees the same reduced value and stops together
            saved = output / "last"
            where = f"the last good checkpoint is {saved}" if (saved / TRAINING_STATE).exists() else "no checkpoint yet"
            raise TrainingDivergedError(
                f"loss is {loss_value} at step {step + 1} (lr {scheduler.get_last_lr()[0]:.3g}); stopped, {where}. "
                "Try a lower --lr, a longer --warmup-steps or --amp none"
            )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if step % cfg.log_every == 0 or step == end:
            log({"step": step, "loss": loss_value, "lr": lr, "time": round(time.perf_counter() - tic, 3)})
        if val_set is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            last_metrics = run_eval(step)
        if step % cfg.save_every == 0 or step == end:
            checkpoint(step)
    bar.close()
    if writer is not None:
        writer.close()
    if last_metrics is not None and info.is_main:
        print(format_table(last_metrics), file=sys.stderr)
    return {
        "step": step,
        "last": str(output / "last"),
        "best": str(output / "best") if best_step is not None else None,
        "best_mIoU": best if best_step is not None else None,
        "metrics": last_metrics,
    }


def config_from_args(args: Any) -> TrainConfig:
    """A TrainConfig from the parsed ``segformer train`` arguments (see segformer/commands/train.py)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if values.get("eval_scales") is not None:  # --eval-scales groups: "0.75 1.0" and/or "0.75,1.0"
        from .commands import flatten

        values["eval_scales"] = flatten(values["eval_scales"])
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    """``python -m segformer.train`` (and ``torchrun -m segformer.train``): the ``segformer train`` command."""
    import argparse

    from .commands.train import add_arguments, run

    parser = argparse.ArgumentParser(prog="python -m segformer.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"segformer.train: error: {first_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "TrainConfig",
    "TrainingDivergedError",
    "StreamSampler",
    "build_model",
    "config_from_args",
    "lr_factor",
    "param_groups",
    "save_checkpoint",
    "train",
]
