"""``segformer predict``: segment files, folders and globs into label PNGs, overlays and a summary.

segformer predict photos/ --recursive --output masks/
segformer predict 'frames/*.png' --model ./my-model --mode slide --crop-size 1024 --stride 768
torchrun --nproc_per_node=4 -m segformer predict photos/ -r --output masks/ --skip-existing
"""

from __future__ import annotations

import argparse
import sys

from . import (
    add_backend_arguments,
    add_inference_arguments,
    backend_arguments,
    inference_options_from_args,
    non_negative_int,
    path_arg,
    positive_int,
)


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be in [0, 1], got {text}")
    return value


# The same values as segformer.predict's (a test checks): importing it here would load torch for --help.
DEFAULT_MODEL = "nvidia/segformer-b0-finetuned-ade-512-512"
DEFAULT_MAX_PIXELS = 89_478_485


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment images: files, folders or globs → label PNGs, overlays, summary",
        description=(
            "Segment images and write, per image, NAME.png (palette PNG, pixel value = class id; 16-bit "
            "grayscale with more than 256 classes) and NAME_overlay.jpg (colours over the image), optionally "
            "NAME_side.jpg and NAME_probs.npy; for the run summary.csv, summary.json (class areas in pixels "
            "and percent per image; the model, backend, precision and options that ran) and legend.png. "
            "Unreadable, truncated, non-image, too small or too large "
            "files are reported and skipped; the exit code is then 1. Under torchrun the images are shared "
            "out across the processes."
        ),
        epilog=(
            "examples:\n"
            "  segformer predict photo.jpg --output out/\n"
            "  segformer predict photos/ --recursive --model ./my-checkpoint --output out/ --skip-existing\n"
            "  segformer predict 'city/*.png' --model nvidia/segformer-b0-finetuned-cityscapes-1024-1024 \\\n"
            "      --mode slide --crop-size 1024 --stride 768 --output out/\n"
            "  segformer predict frames/ --model ./my-checkpoint --mode whole --output out/ --compile\n"
            "  segformer predict photos/ --model ./my-checkpoint --output out/ --backend onnxruntime\n"
            "  torchrun --nproc_per_node=2 -m segformer predict photos/ -r --output out/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help="checkpoint directory (from save_pretrained or `segformer convert`), hub id, or an ONNX file "
        f"`segformer export` wrote (run by onnxruntime on the CPU) (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--output", "-o", type=path_arg, required=True, help="output folder (created if missing)")
    p.add_argument(
        "--recursive",
        "-r",
        action="store_true",
        help="descend into sub-folders and linked folders (mirrored in output)",
    )
    # --mode, --crop-size N|H,W, --stride N|H,W, --short-side, --long-side, --align, --scales, --flip: not given,
    # they keep the checkpoint's protocol (inference_config.json), else SegformerPredictor.default_options
    add_inference_arguments(
        p,
        one_word_sizes=True,
        protocol="the checkpoint's own protocol (inference_config.json, written by segformer train), else aligned",
    )
    p.add_argument("--batch-size", "-b", type=positive_int, default=1, help="images per forward pass (1)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, else MPS, else CPU; under torchrun CUDA, else CPU; always the CPU with an ONNX file as "
        "--model, --backend onnxruntime or --dtype int8), cpu, cuda, cuda:N, mps",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "int8"),
        default="float32",
        help="model dtype (float32). float16 / bfloat16 only where the device computes in them and they pay (a "
        "GPU; bfloat16 on a CPU with AVX-512-BF16 or AMX; float16 never on a CPU, where it is slower than float32): "
        "elsewhere the run says so in one line and uses float32. int8 (CPU): the encoder's linear layers dynamically "
        "quantised, 3-21%% less time than float32 at 512x512 (least on an AVX2-only CPU), <0.5%% of pixels changed",
    )
    add_backend_arguments(p)  # --backend pytorch|onnxruntime, --compile
    p.add_argument("--alpha", type=_alpha, default=0.5, help="overlay opacity of the colours, 0 … 1 (0.5)")
    p.add_argument("--overlay-format", choices=("jpg", "png"), default="jpg", help="overlay file type (jpg)")
    p.add_argument("--side-by-side", action="store_true", help="also write NAME_side.jpg: image | colour map")
    p.add_argument("--save-probs", action="store_true", help="also write NAME_probs.npy: float16 (K, H, W)")
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="resume: skip images whose outputs all exist and were made from that image as it is now by this "
        "model with these options (weights, dtype, backend, mode, sizes, scales, flip, alpha); outputs another model "
        "or other options made are redone, and one line says how many",
    )
    p.add_argument(
        "--max-pixels",
        type=non_negative_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images as possible decompression bombs; 0 = no limit ({DEFAULT_MAX_PIXELS:,})",
    )
    p.add_argument(
        "--min-size", type=positive_int, default=None, help="refuse images with a shorter side (model minimum)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segformer.distributed import cleanup, init_distributed, launched_by_torchrun
    from segformer.predict import SegformerPredictor
    from segformer.predict_folder import collect_images, predict_to_folder

    collect_images(args.inputs, recursive=args.recursive, quiet=True)  # usage errors before any model is loaded
    from segformer.backends import is_onnx_file

    backend = backend_arguments(args)
    device = None if args.device == "auto" else args.device
    if device is None and (args.backend == "onnxruntime" or is_onnx_file(args.model) or args.dtype == "int8"):
        device = "cpu"  # (they run on the CPU; under torchrun "auto" would be each rank's GPU)
    distributed = launched_by_torchrun()
    info = init_distributed(device) if distributed else None
    try:
        # A checkpoint that cannot be found raises CheckpointError (a ValueError): one line, exit code 2.
        predictor = SegformerPredictor(
            args.model,
            device=info.device if info is not None else device,
            dtype=args.dtype,
            options=inference_options_from_args(args, base=SegformerPredictor.stored_options(args.model)),
            batch_size=args.batch_size,
            max_pixels=args.max_pixels or None,
            min_size=args.min_size,
            **backend,
        )
        report = predict_to_folder(
            predictor,
            args.inputs,
            args.output,
            recursive=args.recursive,
            alpha=args.alpha,
            overlay_format=args.overlay_format,
            side_by_side_image=args.side_by_side,
            save_probs=args.save_probs,
            skip_existing=args.skip_existing,
            progress=not args.no_progress,
            rank=info.rank if info is not None else 0,
            world_size=info.world_size if info is not None else 1,
        )
    finally:
        if distributed:
            cleanup()
    if info is None or info.is_main:
        records = report.records
        done = sum(r.status == "ok" for r in records)
        skipped = sum(r.status == "skipped" for r in records)
        print(
            f"segmented {done} image(s), skipped {skipped} existing, {len(report.failures)} failed; "
            f"outputs in {report.output} (summary.csv, summary.json, legend.png)",
            file=sys.stderr,
        )
        if report.failures:
            print(f"{len(report.failures)} of {len(records)} images failed:", file=sys.stderr)
            for r in report.failures:  # one line each, whatever a name holds (a newline in it split the line)
                name = r.image.encode("unicode_escape").decode("ascii") if not r.image.isprintable() else r.image
                print(f"{name}: {r.error}", file=sys.stderr)
    return 1 if report.failures else 0
