"""``segformer eval``: mIoU / aAcc / mAcc of a checkpoint on a data set (also under torchrun)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_inference_arguments, add_label_arguments, inference_options_from_args


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
    p.add_argument(
        "--data",
        required=True,
        help="data: a folder layout, ADE20K or Cityscapes directory, or a "
        "Hugging Face dataset (save_to_disk folder, parquet folder, hub id)",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (save_pretrained layout) or hub id")
    p.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "folder", "ade20k", "cityscapes", "hf"],
        help="data layout (default: detected)",
    )
    p.add_argument("--split", default="val", help="split to evaluate: train, val or test (default: val)")
    add_label_arguments(p)  # --ignore-index N, --reduce-labels
    # --mode, --crop H W, --stride H W, --short-side, ..., --scales, --flip
    add_inference_arguments(
        p, protocol="the checkpoint's own (inference_config.json, from segformer train), else the data set's"
    )
    p.add_argument("--json", type=Path, help="write the metrics to this JSON file")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="autocast dtype (default none)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images (a quick check)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from segformer.data.build import build_dataset, detect_kind, label_options
    from segformer.distributed import cleanup, init_distributed
    from segformer.evaluate import eval_options, evaluate, load_model_for_eval, write_metrics_json
    from segformer.metrics import format_table
    from segformer.run_files import load_inference_options

    info = init_distributed(args.device)
    try:
        kind = detect_kind(args.data) if args.dataset == "auto" else args.dataset
        dataset, _ = build_dataset(
            args.data,
            args.split,
            kind=kind,
            **label_options(args),
        )
        model = load_model_for_eval(args.model, info.device)
        # the checkpoint's own protocol (inference_config.json, written by segformer train), else the data set's;
        # then the flags
        base = load_inference_options(args.model) or eval_options(kind)
        options = inference_options_from_args(args, base=base)
        metrics = evaluate(
            model, dataset, options, amp=args.amp, max_images=args.max_images, num_workers=args.workers, progress=True
        )
        if info.is_main:
            print(f"{dataset.name}: {metrics['num_images']} images, mode {options.mode}")
            print(format_table(metrics))
            if args.json:
                write_metrics_json(args.json, metrics)
                print(f"wrote {args.json}", file=sys.stderr)
    finally:
        cleanup()
    return 0
