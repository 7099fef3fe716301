"""Training-recipe benchmark: `segformer train` with only budget flags against the plain PyTorch loop a user
would write, on small folder data sets this script generates itself.

What it measures
----------------
For each data set (made here, deterministic in --seed, written once under OUTPUT/data/):

  textures  4 texture classes (coarse near-horizontal stripes, fine near-vertical stripes, dot grids, smooth
            noise) in wavy Voronoi regions with random colours per region, on images of random size 128-200 px.
            Colour says nothing; the class is the texture.
  shapes    background + 4 shape classes (disc, square, triangle, ring) in random colours and sizes, on a
            cluttered background (coloured low-frequency noise, random lines and specks, labelled background),
            images of random size 128-200 px.
  thin      background + thin structures and small objects, strongly imbalanced (background ~92% of the pixels):
            wire (1-3 long straight lines 3-5 px wide, in the colour opposite to the background's mean), crack
            (1-3 dark curved random walks 3-5 px wide), spot (2-8 discs of radius 4-8 px in random colours), on a
            textured background (smooth two-colour noise and 5-15 coloured square specks, labelled background),
            images of random height 110-200 and width 90-259 px (many smaller than the crop: padded).

it trains SegFormer-b0 from scratch twice, with the same number of steps, batch and base lr:

  ours   the real CLI in a subprocess: ``segformer train --data D --output O --model b0 --steps N
         --batch-size 8 --crop 128 128 --lr 6e-4 --workers 0 --seed S --no-progress`` plus ``--extra``; the mIoU
         is the final evaluation it writes to O/metrics.jsonl (folder protocol: the whole image).
  plain  the 20-line loop: SegformerForSemanticSegmentation(SegformerConfig.from_variant("b0", num_labels=K)),
         random crop (padded with the ImageNet mean colour, i.e. 0 after normalisation as `segformer train` pads,
         / ignore 255 when the image is smaller) + horizontal flip, ImageNet
         normalisation, AdamW(lr, weight_decay=0.01) on all parameters, lr decayed linearly to 0, CE loss
         (ignore 255) through the model's ``labels=``; evaluated on the whole val image (logits upsampled
         bilinearly to the image size, argmax), mIoU from one confusion matrix over the val set
         (segformer.metrics.ConfusionMatrix), as `segformer train` evaluates folder data.

With ``--init CHECKPOINT`` both sides start from a trained checkpoint instead (fine-tuning, as a user with a
pretrained model does: ours ``--model CHECKPOINT``, the plain loop ``from_pretrained(CHECKPOINT, num_labels=K,
ignore_mismatched_sizes=True)``; the head is re-initialised where the label count differs), at lr 6e-5 unless
--lr is given (the paper's fine-tuning lr, and the one Transformers' SegFormer fine-tuning tutorial uses).
``--pretrain-on NAME`` makes that checkpoint first, here and without a download: ``segformer train`` from fresh
b0 weights on the data set NAME (the same steps, batch, crop and seed, lr 6e-4), kept under OUTPUT/pretrained
and reused by later runs.

and prints one row per data set: ours mIoU, plain mIoU, ours / plain, the majority-class mIoU (predicting
the most frequent val class everywhere) as a floor, and the wall times. Every result is also appended to
OUTPUT/results.jsonl with the settings of its run (steps, batch_size, lr, crop, seed, n_train, n_val and the
extra flags). A plain-loop result is cached per (data set, steps, batch size, lr, crop, seed, image counts; not
per thread count) in OUTPUT/plain-*.json, so recipe experiments with --extra re-run only `ours` (--rerun-plain
forces it).

How to run
----------
    .venv/bin/python bench/bench_training.py --quick                      # smoke: 150 steps, 120/30 images
    .venv/bin/python bench/bench_training.py                              # 600 steps, 300/60 images, all sets
    .venv/bin/python bench/bench_training.py --datasets textures --extra "--scale 0 0 --warmup-steps 60"
    .venv/bin/python bench/bench_training.py --only ours --extra "--head-lr-mult 1 --no-photometric"
    .venv/bin/python bench/bench_training.py --pretrain-on textures --datasets shapes   # fine-tuning

b0 at 128x128, batch 8, takes roughly 0.3-0.6 s a step on 2 CPU threads: 600 steps is a few minutes per run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segformer import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402
from segformer.commands import positive_int  # noqa: E402
from segformer.metrics import ConfusionMatrix  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255
DATASETS = ("textures", "shapes", "thin")  # append only: a set's RNG stream is keyed by its index here
FRESH_LR, FINE_TUNE_LR = 6e-4, 6e-5  # the default base lr from fresh weights, and from a checkpoint


# ------------------------------------------------------------------------------------------- data sets
def _smooth_noise(h: int, w: int, cell: float, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random grid of about (h/cell, w/cell) upsampled bicubically."""
    gh, gw = max(int(h / cell) + 2, 2), max(int(w / cell) + 2, 2)
    out = []
    for _ in range(channels):
        g = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
        out.append(np.asarray(g.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255)
    return np.stack(out, -1) if channels > 1 else out[0]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _texture(cls: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) pattern in [0, 1] of texture class ``cls``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if cls in (0, 1):  # stripes: 0 coarse, near horizontal; 1 fine, near vertical
        period = rng.uniform(13, 19) if cls == 0 else rng.uniform(4.5, 6.5)
        angle = math.radians(rng.uniform(-15, 15) + (0 if cls == 0 else 90))
        phase = rng.uniform(0, 2 * math.pi)
        t = (yy * math.cos(angle) + xx * math.sin(angle)) * 2 * math.pi / period + phase
        return (np.sin(t) > 0).astype(np.float32)
    if cls == 2:  # dot grid
        period, radius = rng.uniform(9, 13), rng.uniform(1.8, 3.2)
        oy, ox = rng.uniform(0, period, 2)
        dy = (yy + oy) % period - period / 2
        dx = (xx + ox) % period - period / 2
        return (dy * dy + dx * dx < radius * radius).astype(np.float32)
    # 3: smooth blotchy noise
    return (_smooth_noise(h, w, rng.uniform(5, 9), rng) > 0.5).astype(np.float32)


def make_texture_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = rng.integers(128, 201, 2)
    n = int(rng.integers(3, 7))
    seeds = rng.uniform(0, 1, (n, 2)) * [h, w]
    classes = rng.integers(0, 4, n)
    classes[: min(n, 4)] = rng.permutation(4)[: min(n, 4)]  # most images hold several classes
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warp = (_smooth_noise(h, w, 40, rng) - 0.5) * 40  # wavy boundaries
    dist = np.stack([(yy - sy + warp) ** 2 + (xx - sx - warp) ** 2 for sy, sx in seeds])
    region = dist.argmin(0)
    image = np.zeros((h, w, 3), np.float32)
    mask = np.zeros((h, w), np.uint8)
    for r in range(n):
        sel = region == r
        t = _texture(int(classes[r]), h, w, rng)[..., None]
        c0, c1 = _random_colour(rng), _random_colour(rng)
        while np.abs(c0 - c1).sum() < 150:
            c1 = _random_colour(rng)
        image[sel] = (c0 * (1 - t) + c1 * t)[sel]
        mask[sel] = classes[r]
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _two_colour_canvas(rng: np.random.Generator, h: int, w: int, cell: tuple[float, float], noise: float):
    """A background blending two random colours through smooth noise of a cell size drawn from ``cell``, plus
    Gaussian noise: (image, its empty mask, a drawer for each, the two colours' mean)."""
    a, b = _random_colour(rng), _random_colour(rng)
    t = _smooth_noise(h, w, rng.uniform(*cell), rng, channels=3)
    background = a * (1 - t) + b * t + rng.normal(0, noise, (h, w, 3))
    img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    msk = Image.new("L", (w, h), 0)
    return img, msk, ImageDraw.Draw(img), ImageDraw.Draw(msk), (a + b) / 2


def make_shape_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = (int(v) for v in rng.integers(128, 201, 2))
    img, msk, di, dm, _ = _two_colour_canvas(rng, h, w, (20, 60), 10)
    for _ in range(int(rng.integers(10, 25))):  # clutter, labelled background
        colour = tuple(int(v) for v in _random_colour(rng))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        if rng.random() < 0.6:
            di.line(
                [x0, y0, x0 + rng.uniform(-60, 60), y0 + rng.uniform(-60, 60)],
                fill=colour,
                width=int(rng.integers(1, 4)),
            )
        else:
            r = rng.uniform(1.5, 4)
            di.rectangle([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
    for _ in range(int(rng.integers(3, 7))):
        cls = int(rng.integers(1, 5))
        r = rng.uniform(12, 32)
        cx, cy = rng.uniform(r * 0.5, w - r * 0.5), rng.uniform(r * 0.5, h - r * 0.5)
        colour = tuple(int(v) for v in _random_colour(rng))
        theta = rng.uniform(0, 2 * math.pi)
        if cls == 1:  # disc
            box = [cx - r, cy - r, cx + r, cy + r]
            di.ellipse(box, fill=colour), dm.ellipse(box, fill=cls)
        elif cls in (2, 3):  # square, triangle
            k = 4 if cls == 2 else 3
            pts = [
                (cx + r * math.cos(theta + 2 * math.pi * i / k), cy + r * math.sin(theta + 2 * math.pi * i / k))
                for i in range(k)
            ]
            di.polygon(pts, fill=colour), dm.polygon(pts, fill=cls)
        else:  # ring
            box = [cx - r, cy - r, cx + r, cy + r]
            width = max(int(r * rng.uniform(0.25, 0.4)), 3)
            di.ellipse(box, outline=colour, width=width), dm.ellipse(box, outline=cls, width=width)
    return np.asarray(img), np.asarray(msk)


def make_thin_sample(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = int(rng.integers(110, 201)), int(rng.integers(90, 260))  # sizes and aspect ratios vary
    img, msk, di, dm, mean = _two_colour_canvas(rng, h, w, (6, 30), 12)
    for _ in range(int(rng.integers(5, 16))):  # distractor specks, labelled background: drawn first, under the rest
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1.5, 4)
        di.rectangle([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in _random_colour(rng)))
    for _ in range(int(rng.integers(1, 4))):  # wire: a long straight line across the image
        x0, y0, theta = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, math.pi)
        d = max(h, w) * 1.5
        pts = [x0 - d * math.cos(theta), y0 - d * math.sin(theta), x0 + d * math.cos(theta), y0 + d * math.sin(theta)]
        colour = tuple(int(v) for v in np.clip(255 - mean + rng.normal(0, 30, 3), 0, 255))
        width = int(rng.integers(3, 6))
        di.line(pts, fill=colour, width=width), dm.line(pts, fill=1, width=width)
    for _ in range(int(rng.integers(1, 4))):  # crack: a dark curved random walk
        x, y, theta = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 2 * math.pi)
        pts = [(x, y)]
        for _ in range(int(rng.integers(8, 25))):
            theta += rng.normal(0, 0.5)
            x, y = x + 6 * math.cos(theta), y + 6 * math.sin(theta)
            pts.append((x, y))
        colour = tuple(int(v) for v in np.clip(mean * 0.25 + rng.normal(0, 10, 3), 0, 255))
        width = int(rng.integers(3, 6))
        di.line(pts, fill=colour, width=width, joint="curve"), dm.line(pts, fill=2, width=width, joint="curve")
    for _ in range(int(rng.integers(2, 9))):  # spot: a small disc
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, 8)
        box = [cx - r, cy - r, cx + r, cy + r]
        di.ellipse(box, fill=tuple(int(v) for v in _random_colour(rng))), dm.ellipse(box, fill=3)
    return np.asarray(img), np.asarray(msk)


GENERATORS = {
    "textures": (make_texture_sample, ["coarse_stripes", "fine_stripes", "dots", "blotches"]),
    "shapes": (make_shape_sample, ["background", "disc", "square", "triangle", "ring"]),
    "thin": (make_thin_sample, ["background", "wire", "crack", "spot"]),
}


def make_dataset(name: str, root: Path, n_train: int, n_val: int, seed: int) -> Path:
    """Write the folder layout (images/{train,val}/*.png, annotations/{train,val}/*.png, labels.json) once;
    generated under a name of this process's own and renamed into place, so parallel runs cannot collide."""
    final = root / f"{name}-seed{seed}-{n_train}-{n_val}"
    if (final / ".complete").exists():
        return final
    out = root / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(out, ignore_errors=True)
    make, names = GENERATORS[name]
    rng = np.random.default_rng([seed, DATASETS.index(name)])
    for split, n in (("train", n_train), ("val", n_val)):
        (out / "images" / split).mkdir(parents=True)
        (out / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image, mask = make(rng)
            Image.fromarray(image).save(out / "images" / split / f"{i:05d}.png")
            Image.fromarray(mask).save(out / "annotations" / split / f"{i:05d}.png")
    (out / "labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}, indent=1) + "\n")
    (out / ".complete").touch()
    if not (final / ".complete").exists():
        shutil.rmtree(final, ignore_errors=True)  # a partial folder from an interrupted run
    try:
        os.replace(out, final)
    except OSError:  # another run finished the same data set first: it is the same data (same seed)
        shutil.rmtree(out, ignore_errors=True)
    return final


def load_split(root: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    for p in sorted((root / "images" / split).glob("*.png")):
        image = np.asarray(Image.open(p).convert("RGB"))
        mask = np.asarray(Image.open(root / "annotations" / split / p.name))
        pairs.append((image, mask))
    return pairs


def majority_miou(val: list[tuple[np.ndarray, np.ndarray]], k: int) -> float:
    """mIoU of predicting the most frequent val class everywhere (the floor a trained model must beat)."""
    counts = np.bincount(np.concatenate([m[m != 255].ravel() for _, m in val]), minlength=k)
    cm = ConfusionMatrix(k)
    for _, m in val:
        t = torch.from_numpy(m.astype(np.int64))
        cm.update(torch.full_like(t, int(counts.argmax())), t)
    return cm.compute()["mIoU"]


# ------------------------------------------------------------------------------------------- plain loop
def random_crop_flip(image: np.ndarray, mask: np.ndarray, crop: tuple[int, int], rng: np.random.Generator):
    ch, cw = crop
    h, w = mask.shape
    if h < ch or w < cw:  # pad bottom/right: image the ImageNet mean colour (0 after normalisation, as segformer
        # train pads: transforms.Pad after Normalize), mask ignore; float32 so that the mean is exact, not rounded
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        padded = np.empty((h + ph, w + pw, 3), np.float32)
        padded[...] = IMAGENET_MEAN
        padded[:h, :w] = image
        image = padded
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=255)
        h, w = mask.shape
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image, mask = image[y : y + ch, x : x + cw], mask[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image, mask


def normalise(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((image.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy())


@torch.no_grad()
def evaluate_whole(model: torch.nn.Module, val: list[tuple[np.ndarray, np.ndarray]], k: int) -> float:
    model.eval()
    cm = ConfusionMatrix(k)
    for image, mask in val:
        logits = model(pixel_values=normalise(image)[None]).logits
        logits = torch.nn.functional.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
        cm.update(logits.argmax(1)[0], torch.from_numpy(mask.astype(np.int64)))
    model.train()
    return cm.compute()["mIoU"]


def train_plain(
    data: Path, k: int, steps: int, batch: int, lr: float, crop: tuple[int, int], seed: int, init: Path | None = None
) -> float:
    """The loop a user writes: random crop + flip, AdamW, linear decay, CE via labels=; whole-image mIoU. From
    fresh b0 weights, or from the checkpoint ``init`` with a new head where the label count differs."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, val = load_split(data, "train"), load_split(data, "val")
    if init is None:
        model = SegformerForSemanticSegmentation(SegformerConfig.from_variant("b0", num_labels=k))
    else:
        model = SegformerForSemanticSegmentation.from_pretrained(init, num_labels=k, ignore_mismatched_sizes=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch:
            order += list(rng.permutation(len(train)))
        idx, order = order[:batch], order[batch:]
        crops = [random_crop_flip(*train[i], crop, rng) for i in idx]
        x = torch.stack([normalise(im) for im, _ in crops])
        y = torch.stack([torch.from_numpy(m.astype(np.int64)) for _, m in crops])
        loss = model(pixel_values=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"  plain step {step + 1}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
    return evaluate_whole(model, val, k)


# ------------------------------------------------------------------------------------------- ours (CLI)
def segformer_cli() -> list[str]:
    exe = Path(sys.executable).parent / "segformer"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "segformer"]


def train_ours(
    data: Path,
    out: Path,
    steps: int,
    batch: int,
    lr: float,
    crop: tuple[int, int],
    seed: int,
    extra: str,
    model: str = "b0",
) -> tuple[float, list[str]]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        *segformer_cli(),
        "train",
        "--data",
        str(data),
        "--output",
        str(out),
        "--model",
        model,
        "--steps",
        str(steps),
        "--batch-size",
        str(batch),
        "--crop",
        str(crop[0]),
        str(crop[1]),
        "--lr",
        str(lr),
        "--workers",
        "0",
        "--seed",
        str(seed),
        "--no-progress",
        *shlex.split(extra),
    ]
    print("  $ " + shlex.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"segformer train failed ({proc.returncode})")
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/mIoU" in r]
    if not evals:
        raise SystemExit(f"{out}/metrics.jsonl holds no evaluation")
    return float(evals[-1]["eval/mIoU"]), cmd


# ------------------------------------------------------------------------------------------- main
def run_key(name: str, steps: int, batch: int, lr: float, crop: tuple[int, int], seed: int, n_train: int,
            n_val: int) -> str:  # fmt: skip
    """A run's settings as a folder / cache-file name."""
    return f"{name}-s{steps}-b{batch}-lr{lr:g}-c{crop[0]}x{crop[1]}-seed{seed}-{n_train}-{n_val}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=positive_int, default=None, help="optimiser steps (default 600; --quick: 150)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 150 steps, 120 train / 30 val images")
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of {', '.join(DATASETS)}")
    ap.add_argument("--seed", type=int, default=0, help="data set and training seed (default 0)")
    ap.add_argument("--output", default="/tmp/segformer-bench-training", help="work directory")
    ap.add_argument("--extra", default="", help='extra flags for segformer train, e.g. "--scale 0 0"')
    ap.add_argument("--only", choices=("both", "ours", "plain"), default="both")
    ap.add_argument("--rerun-plain", action="store_true", help="ignore a cached plain-loop result")
    ap.add_argument("--train-images", type=positive_int, default=None, help="default 300 (--quick: 120)")
    ap.add_argument("--val-images", type=positive_int, default=None, help="default 60 (--quick: 30)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"base lr, both sides (default {FRESH_LR:g}; with a checkpoint {FINE_TUNE_LR:g})",
    )
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--init", type=Path, default=None, help="both sides fine-tune this checkpoint folder")
    start.add_argument(
        "--pretrain-on",
        choices=DATASETS,
        default=None,
        help="fine-tune a checkpoint trained here first: segformer train from fresh b0 weights on this data set",
    )
    ap.add_argument("--crop", type=positive_int, nargs=2, default=(128, 128))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (both sides)")
    args = ap.parse_args(argv)
    steps = args.steps if args.steps is not None else (150 if args.quick else 600)
    n_train = args.train_images if args.train_images is not None else (120 if args.quick else 300)
    n_val = args.val_images if args.val_images is not None else (30 if args.quick else 60)
    crop = tuple(args.crop)
    lr = (
        args.lr
        if args.lr is not None
        else (FRESH_LR if args.init is None and args.pretrain_on is None else FINE_TUNE_LR)
    )
    if args.init is not None and not (args.init / "config.json").is_file():
        ap.error(f"--init {args.init}: not a checkpoint folder (no config.json)")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    for n in names:
        if n not in GENERATORS:
            ap.error(f"unknown data set {n!r}; choose from {', '.join(DATASETS)}")

    init, init_tag = args.init, ""
    if args.pretrain_on is not None:
        source = make_dataset(args.pretrain_on, out / "data", n_train, n_val, args.seed)
        pre_key = run_key(args.pretrain_on, steps, args.batch_size, FRESH_LR, crop, args.seed, n_train, n_val)
        pre_out = out / "pretrained" / pre_key
        init = pre_out / "last"
        if not (init / "config.json").is_file():
            print(f"[{args.pretrain_on}] pre-training the checkpoint to fine-tune, {steps} steps", file=sys.stderr)
            miou, _ = train_ours(source, pre_out, steps, args.batch_size, FRESH_LR, crop, args.seed, "")
            print(f"[{args.pretrain_on}] pre-trained: mIoU {miou:.3f} on its own val set", file=sys.stderr)
    if init is not None:
        init = init.resolve()
        init_tag = "-init" + hashlib.sha1(str(init).encode()).hexdigest()[:8]

    rows = []
    for name in names:
        data = make_dataset(name, out / "data", n_train, n_val, args.seed)
        k = len(GENERATORS[name][1])
        floor = majority_miou(load_split(data, "val"), k)
        row = {
            "dataset": name,
            "steps": steps,
            "batch_size": args.batch_size,
            "lr": lr,
            "init": None if init is None else str(init),
            "crop": list(crop),
            "seed": args.seed,
            "n_train": n_train,
            "n_val": n_val,
            "extra": args.extra,
            "majority": floor,
        }
        key = run_key(name, steps, args.batch_size, lr, crop, args.seed, n_train, n_val) + init_tag
        if args.only in ("both", "plain"):
            cache = out / f"plain-{key}.json"
            if cache.exists() and not args.rerun_plain:
                row.update(json.loads(cache.read_text()))
            else:
                print(f"[{name}] plain loop, {steps} steps", file=sys.stderr, flush=True)
                tic = time.perf_counter()
                miou = train_plain(data, k, steps, args.batch_size, lr, crop, args.seed, init)
                row.update(plain=miou, plain_s=time.perf_counter() - tic)
                cache.write_text(json.dumps({"plain": miou, "plain_s": row["plain_s"]}) + "\n")
        if args.only in ("both", "ours"):
            tag = hashlib.sha1(args.extra.encode()).hexdigest()[:8]
            print(f"[{name}] segformer train, {steps} steps, extra {args.extra!r}", file=sys.stderr, flush=True)
            tic = time.perf_counter()
            model = "b0" if init is None else str(init)
            run_dir = out / "runs" / f"{key}-{tag}"
            miou, cmd = train_ours(data, run_dir, steps, args.batch_size, lr, crop, args.seed, args.extra, model)
            row.update(ours=miou, ours_s=time.perf_counter() - tic)
        rows.append(row)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    print(
        f"# steps {steps}, batch {args.batch_size}, lr {lr:g}, crop {crop[0]}x{crop[1]}, "
        f"{n_train}/{n_val} images, seed {args.seed}, torch threads {torch.get_num_threads()}"
    )
    print(f"# extra flags for segformer train: {args.extra or '(none)'}")
    print(f"# start: {'fresh b0 weights' if init is None else f'the checkpoint {init}'}")
    header = ("dataset", "ours mIoU", "plain mIoU", "ratio", "majority", "ours s", "plain s")
    print(f"{header[0]:<10} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], (9, 10, 6, 8, 7, 7))))
    for r in rows:
        ratio = r["ours"] / r["plain"] if "ours" in r and r.get("plain") else None
        print(
            f"{r['dataset']:<10} {fmt(r.get('ours')):>9} {fmt(r.get('plain')):>10} {fmt(ratio, '.2f'):>6} "
            f"{fmt(r['majority']):>8} {fmt(r.get('ours_s'), '.0f'):>7} {fmt(r.get('plain_s'), '.0f'):>7}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
