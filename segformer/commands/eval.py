"""``segformer eval``: mIoU / aAcc / mAcc of a checkpoint on a data set (also under torchrun)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import flatten, scales_arg


def add_eval_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The evaluation-protocol options, shared with ``segformer train`` (which prefixes them with eval-)."""
    dash = f"--{prefix}"
    p.add_argument(f"{dash}mode", dest=f"{prefix.replace('-', '_')}mode", choices=["whole", "aligned", "slide"],
                   help="whole image as is; aligned: resize keeping the ratio to fit --long-side x --short-side and "
                        "round the sides up to multiples of 32 (ADE20K); slide: --crop windows at --stride "
                        "(Cityscapes). Default: the data set's protocol (folder: whole)")  # fmt: skip
    p.add_argument(f"{dash}crop", dest=f"{prefix.replace('-', '_')}crop", type=int, nargs=2, metavar=("H", "W"),
                   help="sliding-window size (default 512 512; Cityscapes 1024 1024)")  # fmt: skip
    p.add_argument(
        f"{dash}stride",
        dest=f"{prefix.replace('-', '_')}stride",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="sliding-window stride (default 341 341; Cityscapes 768 768)",
    )
    p.add_argument(
        f"{dash}short-side",
        dest=f"{prefix.replace('-', '_')}short_side",
        type=int,
        help="aligned mode: short-side target (default 512)",
    )
    p.add_argument(
        f"{dash}long-side",
        dest=f"{prefix.replace('-', '_')}long_side",
        type=int,
        help="aligned mode: long-side limit (default 2048)",
    )
    p.add_argument(
        f"{dash}scales",
        dest=f"{prefix.replace('-', '_')}scales",
        type=scales_arg,
        nargs="+",
        metavar="S",
        help="multi-scale test: size ratios, e.g. 0.75 0.875 1.0 1.125 1.25 (or 0.75,0.875,1.0,1.125,1.25)",
    )
    p.add_argument(
        f"{dash}flip",
        dest=f"{prefix.replace('-', '_')}flip",
        action="store_true",
        help="add horizontally flipped passes (softmax averaged)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: per-class IoU, mIoU, aAcc, mAcc",
        description="Evaluate a segmentation checkpoint on a data set's split. Prints a per-class table and, "
        'with --json, writes {"mIoU", "aAcc", "mAcc", "IoU": {class: value}} (null for classes absent '
        "from both labels and predictions). Runs under torchrun too (images split over ranks).",
        epilog="examples:\n"
        "  segformer eval --data ADEChallengeData2016 --model nvidia/segformer-b0-finetuned-ade-512-512\n"
        "  segformer eval --data cityscapes --model runs/city/best --mode slide --scales 0.5 1.0 1.5 --flip",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, type=Path, help="data directory (folder layout, ADE20K or Cityscapes)")
    p.add_argument("--model", required=True, help="checkpoint directory (save_pretrained layout) or hub id")
    p.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "folder", "ade20k", "cityscapes"],
        help="data layout (default: detected)",
    )
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    add_eval_arguments(p)
    p.add_argument("--json", type=Path, help="write the metrics to this JSON file")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype (default none)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images (a quick check)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from segformer.data.datasets import build_dataset, detect_kind
    from segformer.distributed import cleanup, init_distributed
    from segformer.evaluate import eval_options, evaluate, load_model_for_eval, write_metrics_json
    from segformer.metrics import format_table

    info = init_distributed(args.device)
    try:
        kind = detect_kind(args.data) if args.dataset == "auto" else args.dataset
        dataset, _ = build_dataset(args.data, args.split, kind=kind)
        model = load_model_for_eval(args.model, info.device)
        options = eval_options(
            kind, mode=args.mode, crop_size=args.crop and tuple(args.crop), stride=args.stride and tuple(args.stride),
            short_side=args.short_side, long_side=args.long_side, scales=flatten(args.scales), flip=args.flip or None,
        )  # fmt: skip
        metrics = evaluate(model, dataset, **options, amp=args.amp, max_images=args.max_images,
                           num_workers=args.workers, progress=True)  # fmt: skip
        if info.is_main:
            print(f"{dataset.name}: {metrics['num_images']} images, mode {options['mode']}")
            print(format_table(metrics))
            if args.json:
                write_metrics_json(args.json, metrics)
                print(f"wrote {args.json}", file=sys.stderr)
    finally:
        cleanup()
    return 0
