"""``segformer demo``: synthetic data → train a small SegFormer (on the CPU, or CUDA when available) → evaluate →
overlays, no download."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import path_arg, positive_int

# b0's widths with one block per stage and a narrower decoder: it learns the synthetic textures in a few
# minutes on two CPU cores.
DEMO_MODEL = dict(
    depths=[1, 1, 1, 1],
    hidden_sizes=[32, 64, 128, 256],
    num_attention_heads=[1, 2, 4, 8],
    decoder_hidden_size=128,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end demo without downloads: synth → train → eval → overlays",
        description="Write the procedural data set (segformer synth), train a small SegFormer on it from random "
        "weights (no download; on CUDA when available, else the CPU) with the demo's recipe (the paper's schedule "
        "at a higher lr, fewer steps), evaluate its best checkpoint on the validation split, write overlays "
        "(OUTPUT/overlays/val_00.png … val_05.png) and print the mIoU. About 6-8 minutes on two AVX2 CPU cores, "
        "about 4 on AVX-512 ones; longer on a busy machine.",
    )
    p.add_argument("--output", type=path_arg, default=Path("demo_out"), help="output folder (default: demo_out)")
    p.add_argument("--steps", type=positive_int, default=2400, help="training steps (default 2400)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", help="cpu, cuda, mps (default: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil
    import time

    import numpy as np
    from PIL import Image

    from segformer import SegformerConfig
    from segformer.data import build_dataset, write_synthetic_dataset
    from segformer.data.synthetic import CLASSES
    from segformer.evaluate import evaluate
    from segformer.fileio import atomic_save_image
    from segformer.inference import predict_labels
    from segformer.modeling import SegformerForSemanticSegmentation
    from segformer.pretrained import select_device
    from segformer.train import TrainConfig, train
    from segformer.visualize import make_palette, overlay

    if args.device is not None:
        select_device(args.device)  # a device this machine lacks: one line, before any file is written
    start = time.perf_counter()
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out}: a file is there; the demo writes a folder")
    data = write_synthetic_dataset(out / "data", num_train=400, num_val=100, size=96, seed=args.seed)
    print(f"wrote the synthetic data set to {data} (400 train, 100 val, classes: {', '.join(CLASSES)})")

    cfg = TrainConfig(
        data=str(data),
        dataset="folder",
        model=SegformerConfig(**DEMO_MODEL, num_labels=len(CLASSES)),
        output=str(out / "run"),
        steps=args.steps,
        batch_size=16,
        crop=(64, 64),
        scale=(0, 0),
        ratio_range=(0.75, 1.5),
        photometric=False,
        lr=2e-3,
        head_lr_mult=10.0,  # the demo's measured configuration (README), set in full
        cat_max_ratio=0.75,
        warmup_steps=50,
        drop_path_rate=0.0,
        eval_every=max(args.steps // 4, 1),
        save_every=args.steps,
        log_every=50,
        workers=1,
        seed=args.seed,
        device=args.device,
    )
    shutil.rmtree(out / "run", ignore_errors=True)  # a demo always starts afresh
    result = train(cfg)
    best = result["best"] or result["last"]

    model = SegformerForSemanticSegmentation.from_pretrained(best)
    val, _ = build_dataset(data, "val")
    metrics = evaluate(model, val)  # (the training run printed this table at the best step; its last is the last's)

    palette = make_palette(len(CLASSES))
    overlays = out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        image, truth = val.read(i)
        pixels, _ = val[i]
        pred = predict_labels(model, pixels[None])[0].numpy().astype(np.uint8)
        panel = Image.new("RGB", (image.shape[1] * 3 + 8, image.shape[0]), (255, 255, 255))
        for j, picture in enumerate(
            (Image.fromarray(image), overlay(image, truth, palette), overlay(image, pred, palette))
        ):
            panel.paste(picture, (j * (image.shape[1] + 4), 0))
        big = panel.resize((panel.width * 2, panel.height * 2), Image.NEAREST)
        atomic_save_image(overlays / f"val_{i:02d}.png", big, "PNG")
    print(f"wrote {overlays}/val_00.png … val_05.png (image | ground truth | prediction)")
    # (the table printed last is the last evaluation's; the best step's may be an earlier one: audit)
    at = f" (step {result['best_step']} of {result['steps']})" if result["best"] else ""
    print(
        f"demo: mIoU {100 * metrics['mIoU']:.1f} on {len(val)} validation images "
        f"({time.perf_counter() - start:.0f} s); model in {best}{at}"
    )
    return 0
