"""``segformer export``: ONNX export of a segmentation model, verified with onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a segmentation model to ONNX (verified with onnxruntime)",
        description=(
            "Export a SegformerForSemanticSegmentation (a save_pretrained directory or a hub id) to ONNX: "
            "input 'pixel_values' (B, 3, H, W) float32, output 'logits' (B, num_labels, H/4, W/4) float32, "
            "with dynamic batch, height and width unless --static. The eval fast path (fused attention, "
            "folded decode head) is exported. The file is then run with onnxruntime on random input at "
            "another size (batch 2; with --static at the export shape) and compared with PyTorch; above 1e-4 "
            "relative difference (fp32) the export fails and nothing is written. Needs: pip install "
            "'segformer[onnx]'."
        ),
        epilog="example: segformer export nvidia/segformer-b0-finetuned-ade-512-512 --onnx b0.onnx",
    )
    p.add_argument("model", help="model directory (save_pretrained) or hub id")
    p.add_argument("--onnx", type=Path, required=True, metavar="OUT.onnx", help="the ONNX file to write")
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
    p.add_argument("--static", action="store_true", help="fixed (1, 3, H, W) input instead of dynamic axes")
    p.add_argument(
        "--fp16",
        action="store_true",
        help=(
            "float16 weights for GPU runtimes; LayerNorm and softmax stay float32 (verified with tolerance 1e-2 "
            "where onnxruntime's CPU runs float16, else its structure only)"
        ),
    )
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segformer.export import export_onnx
    from segformer.modeling import load_segmentation_model

    model = load_segmentation_model(args.model)  # (an encoder or classifier checkpoint: a random head, refused)
    report = export_onnx(
        model,
        args.onnx,
        size=tuple(args.size),
        opset=args.opset,
        dynamic=not args.static,
        fp16=args.fp16,
        verify=not args.no_verify,
    )
    print(report.summary())
    return 0
