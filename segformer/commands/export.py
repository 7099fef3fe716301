"""``segformer export``: ONNX export of a segmentation model, verified with onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_model_arguments, model_argument, path_arg, positive_float


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a segmentation model to ONNX (verified with onnxruntime)",
        description=(
            "Export a SegformerForSemanticSegmentation (a save_pretrained directory or a hub id) to ONNX: "
            "input 'pixel_values' (B, C, H, W) float32 (C: the model's channels, 3 RGB), output 'logits' "
            "(B, num_labels, H/4, W/4) float32, "
            "with dynamic batch, height and width unless --static. The eval fast path (fused attention, "
            "folded decode head) is exported. The file is then run with onnxruntime on random input at "
            "another size (batch 2; with --static at the export shape) and compared with PyTorch; above what fp32 "
            "rounding allows two evaluations of this model at that size (relative to the largest logit: about 6e-5 "
            "for b0, 1e-4 for b2, 2e-4 for b5; --tolerance sets another) the export fails and nothing "
            "is written, unless onnxruntime is within twice PyTorch's own distance from float64 logits (weights "
            "far larger than a trained model's: the report says so). The file's metadata holds the "
            "config (class names), the preprocessing, and a local checkpoint's evaluation protocol and label "
            "rules, so that `segformer predict/eval/serve --model FILE.onnx` run it as it is. Needs: pip install "
            "'segformer[onnx]'."
        ),
        epilog="example: segformer export nvidia/segformer-b0-finetuned-ade-512-512 --onnx b0.onnx",
    )
    add_model_arguments(p, "model directory (save_pretrained) or hub id")
    p.add_argument(
        "--onnx", type=path_arg, required=True, metavar="OUT.onnx", help="the ONNX file to write (a .onnx name)"
    )
    p.add_argument(
        "--opset", type=int, default=17, help="ONNX opset, 13 or above (default: 17; >= 14 keeps fused attention)"
    )
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[512, 512],
        metavar=("H", "W"),
        help="input size to trace (the only size with --static; default: 512 512)",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="fixed (1, 3, H, W) input instead of dynamic axes (for other runtimes: segformer predict/eval/serve "
        "refuse such a file)",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help=(
            "float16 weights for GPU runtimes; LayerNorm and softmax stay float32 (verified with tolerance 1e-2 "
            "where onnxruntime's CPU runs float16, else its structure only)"
        ),
    )
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument(
        "--tolerance",
        type=positive_float,
        default=None,
        metavar="REL",
        help="the largest relative difference the comparison accepts (default: the fp32 rounding bound of this "
        "model at the comparison's size; with --fp16 1e-2)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segformer.backends import is_onnx_file
    from segformer.data.datasets import read_label_spec
    from segformer.export import export_onnx
    from segformer.modeling import load_segmentation_model
    from segformer.run_files import LABELS_FILE, load_inference_options, stored_reduce_labels

    name = model_argument(args)
    if is_onnx_file(name):
        raise ValueError(f"{name}: already an ONNX file; export takes a checkpoint directory or hub id")
    if args.no_verify and args.tolerance is not None:  # (a tolerance nothing compares against: said, not ignored)
        raise ValueError("--tolerance sets the comparison's limit, and --no-verify skips the comparison: give one")
    if args.onnx.suffix.lower() != ".onnx":  # (predict/eval/serve know an ONNX model by its name)
        raise ValueError(f"--onnx {args.onnx}: give the file a .onnx name")
    labels = Path(name) / LABELS_FILE  # (a local checkpoint's protocol and label rules go into the metadata)
    text = labels.read_text(encoding="utf-8-sig") if labels.is_file() else None
    if text is not None:
        read_label_spec(labels, text=text)  # (a damaged one is named now, not copied into a file every command refuses)
    model = load_segmentation_model(name)  # (an encoder or classifier checkpoint: a random head, refused)
    report = export_onnx(
        model,
        args.onnx,
        size=tuple(args.size),
        opset=args.opset,
        dynamic=not args.static,
        fp16=args.fp16,
        verify=not args.no_verify,
        tolerance=args.tolerance,
        options=load_inference_options(name),
        labels=text,
        reduce_labels=stored_reduce_labels(name),
    )
    print(report.summary())
    return 0
