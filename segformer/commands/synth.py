"""``segformer synth``: write the procedural data set (no download) in the folder layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import path_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a procedural segmentation data set (folder layout)",
        description="Write DIR/images/{train,val}, DIR/annotations/{train,val} and DIR/labels.json: smooth "
        "gradient backgrounds with shapes filled with stripes, checkerboards or dots in random colours, so "
        "classes must be learned from texture and shape.",
    )
    p.add_argument("dir", type=path_arg, help="output directory")
    p.add_argument("--train", type=int, default=400, help="training images (default 400)")
    p.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    p.add_argument("--size", type=int, default=96, help="image side in pixels (default 96, at least 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segformer.data.synthetic import CLASSES, write_synthetic_dataset

    folder = Path(args.dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if folder.is_dir() and any(folder.iterdir()):  # (its old images would stay, mixed with the new ones)
        raise ValueError(f"{folder} is not empty: write the data set to a new or empty folder")
    write_synthetic_dataset(args.dir, num_train=args.train, num_val=args.val, size=args.size, seed=args.seed)
    print(f"wrote {args.train} + {args.val} images of {args.size}x{args.size} ({', '.join(CLASSES)}) to {args.dir}")
    return 0
