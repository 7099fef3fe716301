"""Where a forward pass spends its time: per-operator self time of our eval-mode model, per image.

For each case the script runs a few warm-up passes, then profiles a few more with ``torch.profiler`` and prints
the operators by self time (milliseconds per image, share of the total, calls per pass), plus the wall time per
image and the minor page faults per pass (``getrusage``: fresh pages the C library mapped, see
``segformer.allocator``). Random weights, 150 labels, the allocator tuned as the ``segformer`` commands tune it.
The same case syntax as bench_inference.py (VARIANT:HxW:fp32:BATCH).

    python bench/profile_inference.py                                  # b0 and b2 at 512², batch 1 and 8
    python bench/profile_inference.py --cases b0:1024x2048:fp32:1 --rows 25
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/profile_inference.py
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_inference import cpu_capability  # noqa: E402 (this folder: the script's own)

from segformer import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402
from segformer.allocator import tune_allocator  # noqa: E402
from segformer.commands import positive_int  # noqa: E402

DEFAULT_CASES = ["b0:512x512:fp32:1", "b0:512x512:fp32:8", "b2:512x512:fp32:1"]


def parse_case(case: str) -> tuple[str, int, int, int]:
    try:
        variant, size, dtype, batch = case.split(":")
        height, width = (int(v) for v in size.split("x"))
        if dtype != "fp32":
            raise ValueError
        return variant, height, width, int(batch)
    except ValueError:
        raise SystemExit(f"--cases: {case!r} is not VARIANT:HxW:fp32:BATCH (e.g. b0:512x512:fp32:1)") from None


def profile_case(case: str, passes: int, rows: int) -> None:
    variant, height, width, batch = parse_case(case)
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(SegformerConfig.from_variant(variant, num_labels=150)).eval()
    x = torch.randn(batch, 3, height, width)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(passes):
            model(x)
        wall = (time.perf_counter() - start) / passes / batch
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / passes
        with torch.profiler.profile() as prof:
            for _ in range(passes):
                model(x)
    images = passes * batch
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / images / 1e3
    print(f"\n## {case}: {wall * 1e3:.1f} ms per image (wall), {faults:,.0f} page faults per pass")
    print(f"{'operator':<52} {'ms/image':>9} {'share':>7} {'calls/pass':>11}")
    for event in events[:rows]:
        ms = event.self_cpu_time_total / images / 1e3
        print(f"{event.key[:52]:<52} {ms:>9.2f} {ms / total:>7.1%} {event.count / passes:>11.0f}")
    print(f"{'(profiled total)':<52} {total:>9.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    parser.add_argument("--passes", type=positive_int, default=3, help="profiled passes per case (default 3)")
    parser.add_argument("--rows", type=int, default=15, help="operators listed per case (default 15)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = tune_allocator()
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
        f"{cpu_capability()}, allocator {'tuned' if tuned else 'system'}"
    )
    for case in args.cases:
        profile_case(case, args.passes, args.rows)


if __name__ == "__main__":
    main()
