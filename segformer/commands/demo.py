"""``segformer demo``: an end-to-end run that needs no download."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end-to-end demo without downloads",
        description="Build a SegFormer-b0, save and reload it, segment a generated image and write an overlay.",
    )
    p.add_argument("--output", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from segformer import SegformerConfig, SegformerForSemanticSegmentation
    from segformer.visualize import make_palette, overlay

    torch.manual_seed(args.seed)
    out = Path(args.output)
    model = SegformerForSemanticSegmentation(SegformerConfig.from_variant("b0", num_labels=8)).eval()
    model.save_pretrained(out / "model")
    model = SegformerForSemanticSegmentation.from_pretrained(out / "model")
    print(f"saved and reloaded {out / 'model'} ({model.num_parameters():,} parameters)")

    yy, xx = np.mgrid[0:240, 0:320]
    image = np.stack([(xx * 0.8) % 256, (yy * 1.0) % 256, ((xx + yy) * 0.4) % 256], -1).astype(np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(((image / 255.0 - mean) / std).transpose(2, 0, 1)).float()[None]
    with torch.no_grad():
        logits = model(x).logits
    up = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    mask = up.argmax(1)[0].numpy().astype(np.uint8)
    Image.fromarray(image).save(out / "image.png")
    Image.fromarray(mask).save(out / "mask.png")
    overlay(image, mask, make_palette(8)).save(out / "overlay.png")
    print(f"wrote {out / 'image.png'}, {out / 'mask.png'} and {out / 'overlay.png'}")
    return 0
