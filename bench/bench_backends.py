"""Precision and backends on this CPU: fp32, bf16 (autocast and weights), dynamic int8, onnxruntime, and how long
``--compile`` takes to reach its first inference in a new process, the first time and the second.

    .venv/bin/python bench/bench_backends.py --model demo_out/run/best --data demo_out/data   # latency + agreement
    .venv/bin/python bench/bench_backends.py --variant b0 --compile --compile-startup        # + compiled, start-up
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python bench/...

Latency: one (1, 3, S, S) input (S = --size, 512), every case run in turn, round after round (interleaved, so
that drifts in machine load hit all alike; each round starts one case later, so that no case always runs after
the same one: fp32 right after onnxruntime took 9-14% longer); the median of the rounds and its ratio to fp32,
and the fastest round (on a machine other jobs load, the least disturbed one) and its ratio to fp32's fastest.
--eval-amp: the evaluation loop with and without bf16 autocast, per image (on --data, or on synthetic --size
images). Agreement (--data: a folder data set's val split, whole-image mode): the share of pixels whose predicted
class differs from fp32's.
Use a trained checkpoint for agreement: random weights have near-ties everywhere. The header says which kernels
torch runs (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA cap them) and what
segformer.inference.select_dtype makes of a bf16 / fp16 request here. Raw results: bench/RESULTS_int8.txt.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_inference import cpu_capability  # (this folder: the script's own; it puts the checkout first)

from segformer import SegformerConfig, SegformerForSemanticSegmentation
from segformer.backends import quantize_int8, runtime_model
from segformer.commands import positive_int
from segformer.inference import cpu_flags, infer, labels_from_probs, reduced_precision_problem


def header() -> None:
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "bf16"})
    print(f"# torch {torch.__version__}, cpu capability {cpu_capability()}, {torch.get_num_threads()} threads, "
          f"flags {' '.join(flags)}")  # fmt: skip
    for dtype in (torch.bfloat16, torch.float16):
        problem = reduced_precision_problem(dtype, "cpu")
        print(f"# select_dtype({str(dtype)[6:]}, cpu): {'native' if problem is None else 'float32 - ' + problem}")


def load(args: argparse.Namespace) -> SegformerForSemanticSegmentation:
    if args.model:
        return SegformerForSemanticSegmentation.from_pretrained(args.model).eval()
    torch.manual_seed(0)
    return SegformerForSemanticSegmentation(SegformerConfig.from_variant(args.variant, num_labels=150)).eval()


def cases(
    model: SegformerForSemanticSegmentation, cache: str, compiled: bool
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name → a function of normalised float32 pixels (B, 3, H, W) giving float32 logits."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    int8 = quantize_int8(copy.deepcopy(model))
    ort = runtime_model(model, "onnxruntime", cache_dir=cache)

    def autocast(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).logits.float()

    runs = {
        "fp32": lambda x: model(x).logits,
        "bf16 autocast": autocast,
        "bf16 weights": lambda x: bf16(x.bfloat16()).logits.float(),
        "int8 dynamic": lambda x: int8(x).logits,
        "onnxruntime": ort,
    }
    if compiled:
        runs["compiled"] = runtime_model(model, compile=True, cache_dir=cache)  # compiles at the warm-up
    return runs


def latency(runs: dict[str, Callable], size: int, rounds: int) -> None:
    x = torch.randn(1, 3, size, size)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run(x)  # warm-up
        names = list(runs)
        for r in range(rounds):  # each round starts one case later: no case always follows the same one (fp32
            for name in names[r % len(names) :] + names[: r % len(names)]:  # after onnxruntime ran 9-14% slower)
                run = runs[name]
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
    base, fastest = statistics.median(times["fp32"]), min(times["fp32"])
    print(f"\nlatency, (1, 3, {size}, {size}), {rounds} interleaved rounds (median; fastest, the least disturbed):")
    for name, t in times.items():
        median, best = statistics.median(t), min(t)
        print(f"  {name:14s} {median * 1000:8.1f} ms  x{median / base:.2f} of fp32   fastest {best * 1000:8.1f} ms"
              f"  x{best / fastest:.2f}")  # fmt: skip


def eval_amp(args: argparse.Namespace, rounds: int) -> None:
    """``segformer eval``'s loop (:func:`segformer.evaluate.evaluate`, whole image) with ``--amp none`` and ``bf16``,
    interleaved (the order alternating by round): time per image. On --data's val split with --model, else on
    24 synthetic --size images (segformer synth) with random weights of --variant."""
    from segformer.data import build_dataset, write_synthetic_dataset
    from segformer.evaluate import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or write_synthetic_dataset(Path(tmp) / "data", num_train=1, num_val=24, size=args.size, seed=0)
        val, _ = build_dataset(root, "val")
        if args.model:
            model = SegformerForSemanticSegmentation.from_pretrained(args.model).eval()
        else:
            torch.manual_seed(0)
            config = SegformerConfig.from_variant(args.variant, num_labels=val.num_labels)
            model = SegformerForSemanticSegmentation(config).eval()
        times: dict[str, list[float]] = {"none": [], "bf16": []}
        for amp in times:  # warm-up
            evaluate(model, val, amp=amp, max_images=2)
        for r in range(rounds):
            for amp in ("none", "bf16") if r % 2 else ("bf16", "none"):
                start = time.perf_counter()
                metrics = evaluate(model, val, amp=amp)
                times[amp].append((time.perf_counter() - start) / metrics["num_images"])
    base = statistics.median(times["none"])
    print(f"\nsegformer eval, {len(val)} images, {rounds} interleaved rounds (median time per image):")
    for amp, t in times.items():
        print(f"  --amp {amp:5s} {statistics.median(t) * 1000:8.1f} ms  x{statistics.median(t) / base:.2f} of none")


def agreement(runs: dict[str, Callable], data: str, sizes: list[int | None]) -> None:
    from segformer.data import build_dataset

    val, _ = build_dataset(data, "val")
    for size in sizes:
        wrong = {name: 0 for name in runs if name != "fp32"}
        total = 0
        count = len(val) if size is None else min(len(val), 20)  # resized images cost (size / native)² more
        with torch.inference_mode():
            for i in range(count):
                x = val[i][0][None]
                if size is not None:
                    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                ref = labels_from_probs(infer(_Logits(runs["fp32"]), x))
                total += ref.numel()
                for name in wrong:
                    wrong[name] += (labels_from_probs(infer(_Logits(runs[name]), x)) != ref).sum().item()
        where = "native size" if size is None else f"resized to {size}x{size}"
        print(f"\npixels whose class differs from fp32 ({count} val images, {where}, {total:,} pixels):")
        for name, n in wrong.items():
            print(f"  {name:14s} {100 * n / total:.3f}%")


class _Logits(torch.nn.Module):
    """A logits function as a module for infer() (float32 input on the CPU)."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn
        self.anchor = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


CHILD = """
import sys, time
start = float(sys.argv[1])
import numpy as np
from segformer.predict import SegformerPredictor
predictor = SegformerPredictor(sys.argv[2], device="cpu", mode="whole", compile=sys.argv[3] == "1")
image = np.zeros((int(sys.argv[4]), int(sys.argv[4]), 3), np.uint8)
predictor.predict(image)
print(f"{time.time() - start:.2f}")
"""


def compile_startup(model: SegformerForSemanticSegmentation, size: int, threads: int | None = None) -> None:
    """Seconds from starting a new Python process to the end of its first prediction (import, checkpoint load,
    compilation or package load, one forward pass): eager, then --compile twice on one fresh cache."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        env = {**os.environ, "SEGFORMER_CACHE": str(Path(tmp) / "cache")}
        if threads:  # the children run with the parent's thread count (the compile cache's key includes it)
            env["OMP_NUM_THREADS"] = str(threads)
        print(f"\nnew process to first prediction, ({size}x{size}), SegformerPredictor(..., compile=...):")
        for label, flag in (("eager", "0"), ("compile, 1st run", "1"), ("compile, 2nd run", "1"), ("eager", "0")):
            cmd = [sys.executable, "-c", CHILD, repr(time.time()), str(Path(tmp) / "model"), flag, str(size)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"  {label}: failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            print(f"  {label:17s} {float(done.stdout.strip()):7.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint directory (default: random weights of --variant)")
    parser.add_argument("--variant", default="b0", help="without --model: b0..b5 with random weights (b0)")
    parser.add_argument("--data", help="a folder data set: pixel agreement with fp32 on its val split")
    parser.add_argument("--size", type=int, default=512, help="latency input side (512)")
    parser.add_argument("--rounds", type=positive_int, default=7, help="timed rounds (7)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="add the AOT-compiled model to the cases")
    parser.add_argument("--compile-startup", action="store_true", help="also time --compile's first and second run")
    parser.add_argument(
        "--eval-amp",
        action="store_true",
        help="also time segformer eval's loop with --amp none and bf16 (see eval_amp)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header()
    model = load(args)
    with tempfile.TemporaryDirectory() as cache:
        runs = cases(model, cache, args.compile)
        latency(runs, args.size, args.rounds)
        if args.data:
            agreement(runs, args.data, [None, args.size])
    if args.compile_startup:
        compile_startup(model, args.size, args.threads)
    if args.eval_amp:
        eval_amp(args, args.rounds)


if __name__ == "__main__":
    main()
