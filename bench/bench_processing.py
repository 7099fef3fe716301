"""Image-processor benchmark: segformer's SegformerImageProcessor against Transformers', interleaved.

A batch of random uint8 images (default 16 of 1024x768) is resized to 512x512, rescaled and normalised by
both processors, alternating call by call, and the script prints each one's median time, the speed-up
(Transformers / ours: > 1 means we are faster) and the largest absolute difference of ``pixel_values``.

Cases:
  pil          a list of PIL images; both use their PIL path (ours: backend "auto" picks PIL here)
  tensor       one (B, 3, H, W) uint8 tensor, contiguous; ours: the torch backend; Transformers: the
               processor ``transformers.SegformerImageProcessor`` resolves to (its torchvision backend when
               torchvision is installed, else its PIL backend)
  tensor-nhwc  the same values as a (B, 3, H, W) view of (B, H, W, 3) memory (what stacking decoded
               images and permuting gives); torch's uint8 resize kernel works in that layout

    python bench/bench_processing.py
    python bench/bench_processing.py --images 32 --repeats 11 --threads 2 --cases tensor
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segformer.commands import positive_int  # noqa: E402
from segformer.processing import SegformerImageProcessor  # noqa: E402

CASES = ("pil", "tensor", "tensor-nhwc")


def make_inputs(count: int, height: int, width: int, seed: int) -> dict[str, object]:
    """The same random images as PIL images, a contiguous NCHW tensor and an NHWC-memory tensor."""
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    nhwc = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    return {"pil": [Image.fromarray(a) for a in arrays], "tensor": nhwc.contiguous(), "tensor-nhwc": nhwc}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def call(processor: object, batch: object) -> object:
    return processor(batch, return_tensors="pt")["pixel_values"]


def max_abs_diff(a: object, b: object) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def load_transformers() -> object | None:
    try:
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.set_verbosity_error()  # the torchvision fallback notice
    return transformers.SegformerImageProcessor()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="batch size")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--size", type=int, default=512, help="output side")
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed calls per processor and case")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    inputs = make_inputs(args.images, args.height, args.width, args.seed)
    ours = SegformerImageProcessor(size=args.size)
    theirs = load_transformers()
    if theirs is not None:
        theirs.size = {"height": args.size, "width": args.size}
    print(
        f"{args.images} images {args.width}x{args.height} uint8 -> {args.size}x{args.size}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"Transformers: {type(theirs).__name__ if theirs is not None else 'not installed'}"
    )

    columns = ("case", "ours path", "transformers ms", "ours ms", "speed-up", "max |diff|")
    header = "{:<12} {:<9} {:>15} {:>8} {:>8} {:>10}".format(*columns)
    print(header)
    print("-" * len(header))
    for case in args.cases:
        batch = inputs[case]
        path = "torch" if isinstance(batch, torch.Tensor) else "pil"
        run_ours = partial(call, ours, batch)
        run_theirs = partial(call, theirs, batch) if theirs is not None else None
        ours_times, theirs_times = [], []
        run_ours()  # warm-up
        if run_theirs:
            run_theirs()
        for _ in range(args.repeats):  # interleaved so that machine noise hits both alike
            t, ours_out = timed(run_ours)
            ours_times.append(t)
            if run_theirs:
                t, theirs_out = timed(run_theirs)
                theirs_times.append(t)
        ours_ms = statistics.median(ours_times) * 1e3
        if run_theirs:
            theirs_ms = statistics.median(theirs_times) * 1e3
            diff = max_abs_diff(ours_out, theirs_out)
            speedup = f"{theirs_ms / ours_ms:.2f}x"
            print(f"{case:<12} {path:<9} {theirs_ms:>15.1f} {ours_ms:>8.1f} {speedup:>8} {diff:>10.2e}")
        else:
            print(f"{case:<12} {path:<9} {'-':>15} {ours_ms:>8.1f} {'-':>8} {'-':>10}")


if __name__ == "__main__":
    main()
