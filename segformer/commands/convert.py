"""``segformer convert``: original NVlabs/mmseg SegFormer checkpoints → a save_pretrained directory."""

from __future__ import annotations

import argparse

from . import path_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an original NVlabs/mmseg SegFormer .pth checkpoint",
        description=(
            "Convert an original SegFormer checkpoint into a directory that from_pretrained loads "
            "(config.json + model.safetensors). Understands segmentation checkpoints "
            "({'meta', 'state_dict'} with backbone.* and decode_head.* keys) and ImageNet backbones "
            "(mit_b0.pth … mit_b5.pth, written as SegformerForImageClassification). The architecture and "
            "label count are read from the tensor shapes; label names from --dataset, the checkpoint's "
            "meta CLASSES, or the label count (150: ADE20K, 19: Cityscapes)."
        ),
        epilog="example: segformer convert segformer.b0.512x512.ade.160k.pth segformer-b0-ade",
    )
    p.add_argument("checkpoint", type=path_arg, help="the original .pth file")
    p.add_argument(
        "output_dir", type=path_arg, help="directory to write: new, empty, or an earlier conversion (created if needed)"
    )
    p.add_argument(
        "--variant",
        choices=["b0", "b1", "b2", "b3", "b4", "b5"],
        help="architecture to convert into (default: inferred from the shapes)",
    )
    p.add_argument("--num-labels", type=int, help="number of classes; must match the checkpoint's classifier")
    p.add_argument("--dataset", choices=["ade20k", "cityscapes"], help="take the class names of this dataset")
    p.add_argument(
        "--num-heads",
        type=int,
        nargs="+",
        metavar="N",
        help="attention heads per stage (default: the file's meta config where it states them, else MiT's 1 2 5 8; "
        "widths no MiT has, without such a config, need it)",
    )
    p.add_argument(
        "--original-eps",
        action="store_true",
        help="use the original code's LayerNorm eps 1e-6 in block and stage norms "
        "(default: 1e-5 everywhere, as Transformers)",
    )
    p.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="load with torch.load(weights_only=False), which can run code stored in the file: "
        "only for trusted files whose meta holds numpy/mmcv objects",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segformer.convert import convert_checkpoint

    result = convert_checkpoint(
        args.checkpoint,
        args.output_dir,
        variant=args.variant,
        num_labels=args.num_labels,
        dataset=args.dataset,
        num_attention_heads=args.num_heads,
        original_eps=args.original_eps,
        unsafe_pickle=args.unsafe_pickle,
    )
    print(result.summary())
    return 0
