"""onnxruntime against our PyTorch eval path: b0 and b2 at 512×512, batch 1, fp32, CPU.

    .venv/bin/python bench/bench_onnx.py                     # b0 and b2, 10 timed rounds each
    .venv/bin/python bench/bench_onnx.py --variants b0 --rounds 20 --threads 2

Random weights (speed and agreement do not depend on them; BatchNorm statistics are made non-trivial so the
folded head is exercised). Each model is exported with segformer.export.export_onnx (dynamic axes, opset
17), then both runtimes are timed interleaved (PyTorch, onnxruntime, PyTorch, …) after warm-up, so drifts in
machine load hit both alike. Prints median latencies, the ratio onnxruntime / PyTorch and the max relative
difference of the logits. On a machine that other jobs load, use --threads 1: multi-threaded PyTorch
(OpenMP) degrades far more than onnxruntime under oversubscription, which turns the ratio into noise.

The numbers are in the README (Speed; bench/bench_inference.py has the same onnxruntime column beside
Transformers'). A first measurement, 2026-11-23, before the fast path's later work: onnxruntime 0.94× / 0.82×
of our time for b0 / b2, since overtaken; max relative difference 8.3e-7 / 1.1e-6.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from segformer import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402
from segformer.commands import positive_int  # noqa: E402
from segformer.export import export_onnx  # noqa: E402


def bench(variant: str, size: int, rounds: int, threads: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(SegformerConfig.from_variant(variant, num_labels=150)).eval()
    with torch.no_grad():
        bn = model.decode_head.batch_norm
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{variant}.onnx"
        t0 = time.perf_counter()
        report = export_onnx(model, path, size=(size, size))
        export_s = time.perf_counter() - t0
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's worker threads spin after each run by default, stealing the cores from the PyTorch run
        # that follows in this interleaved loop; without spinning each runtime gets the machine to itself.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, size, size)
    feed = {"pixel_values": x.numpy()}

    def run_torch() -> torch.Tensor:
        with torch.inference_mode():
            return model(x).logits

    def run_ort():
        return session.run(["logits"], feed)[0]

    for _ in range(2):  # warm-up: allocator, oneDNN/MLAS kernels, the folded-head cache
        ref, out = run_torch(), run_ort()
    diff = ((torch.from_numpy(out) - ref).abs().max() / ref.abs().max()).item()
    times: dict[str, list[float]] = {"torch": [], "ort": []}
    for _ in range(rounds):
        for name, fn in (("torch", run_torch), ("ort", run_ort)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    torch_ms = statistics.median(times["torch"]) * 1e3
    ort_ms = statistics.median(times["ort"]) * 1e3
    return dict(torch_ms=torch_ms, ort_ms=ort_ms, ratio=ort_ms / torch_ms, diff=diff, export_s=export_s,
                verify=report.max_rel_diff)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["b0", "b2"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="both runtimes (default: torch's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, "
          f"{args.size}x{args.size}, batch 1, fp32, median of {args.rounds} interleaved rounds")  # fmt: skip
    header = ("model", "PyTorch ms", "ORT ms", "ORT/PyTorch", "max rel diff", "export s")
    print("{:6} {:>11} {:>9} {:>12} {:>13} {:>9}".format(*header))
    for variant in args.variants:
        r = bench(variant, args.size, args.rounds, args.threads)
        print(f"{variant:6} {r['torch_ms']:11.1f} {r['ort_ms']:9.1f} {r['ratio']:12.2f} {r['diff']:13.2e} "
              f"{r['export_s']:9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
