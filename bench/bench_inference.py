"""Inference and training-step benchmark: segformer against Transformers, interleaved in one process.

Both libraries get the same random weights. For every case the script prints the median latency of each,
their ratio (Transformers / ours: > 1 means we are faster), the peak memory each forward adds (peak RSS on
the CPU, read from the kernel's high-water mark in a fresh process per library and case; peak allocated
memory on CUDA) and the maximum relative difference of the logits (or of the loss, for training steps).
On the CPU, fp32 inference cases also time onnxruntime on our own ONNX export (segformer.export, dynamic
axes; the ratio onnxruntime / ours: > 1 means we are faster), interleaved with the other two, and every
inference case prints two FLOP counts, attention included: the architecture's (what the plain model and
Transformers compute) and ours (the folded decode head skips the concatenation and the big fuse conv), and the
share of the machine's measured fp32 GEMM peak that our time reaches on our FLOPs.

A case batch:VARIANT:HxW:BATCH times our model and Transformers' on one batch of BATCH images against BATCH
single-image calls, interleaved, and prints the time per image of each (batching should never cost per image).

The process's allocator is tuned as the ``segformer`` command line tunes it (segformer.allocator; both
libraries run in the same process, so both get it; ``--allocator system`` to compare without). The header
prints the CPU capability torch picked (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA
cap it, to approximate an AVX2 machine on an AVX-512 one) and the measured GEMM peak.

    python bench/bench_inference.py                       # the default cases (bf16 ones where bf16 is native)
    python bench/bench_inference.py --cases b0:512x512:fp32:1 --repeats 10
    python bench/bench_inference.py --device cuda --cases b2:1024x2048:bf16:1 --compile

On CUDA the header names the GPU and PyTorch's TF32 flags: by default cuDNN's convolutions may round their inputs
to TF32 (10 mantissa bits), in both libraries; ``--no-tf32`` times exact fp32.

A case is VARIANT:HxW:DTYPE:BATCH (DTYPE fp32, bf16 (autocast) or fp16 (autocast, CUDA)),
train:VARIANT:HxW:BATCH for a training step (forward + backward, fp32, train mode), or batch:VARIANT:HxW:BATCH.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segformer import VARIANTS, SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402
from segformer.allocator import tune_allocator  # noqa: E402
from segformer.commands import positive_int  # noqa: E402
from segformer.precision import reduced_precision_problem  # noqa: E402
from segformer.pretrained import canonical_keys  # noqa: E402

DEFAULT_CASES = [
    "b0:512x512:fp32:1",
    "b2:512x512:fp32:1",
    "b0:256x256:fp32:1",
    "b2:256x256:fp32:1",
    "b0:512x512:bf16:1",
    "b2:512x512:bf16:1",
    "b0:512x512:fp32:8",
    "b2:512x512:fp32:8",
    "b0:1024x2048:fp32:1",
    "b2:1024x2048:fp32:1",
    "b0:1024x2048:bf16:1",
    "train:b0:512x512:8",
    "batch:b0:512x512:8",
]
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory added by a block: CUDA allocator peak, or the process's peak RSS (Linux VmHWM)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _rss_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = self._rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = self._rss_kib("VmHWM") * 1024 - self.base


def cpu_capability() -> str:
    """torch's CPU capability, and the environment variables that capped the kernels where set (what each
    benchmark's header prints: ``AVX512``, ``AVX2 {'ATEN_CPU_CAPABILITY': 'avx2', ...}``)."""
    caps = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
            if k in os.environ}  # fmt: skip
    return f"{torch.backends.cpu.get_cpu_capability()}{' ' + str(caps) if caps else ''}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ models
def build_pair(variant: str, device: torch.device, num_labels: int = 150):
    import transformers

    config = SegformerConfig.from_variant(variant, num_labels=num_labels)
    hf_config = transformers.SegformerConfig(
        **{k: v for k, v in config.to_dict().items() if k not in ("model_type", "use_layer_norm_eps")}
    )
    torch.manual_seed(0)
    theirs = transformers.SegformerForSemanticSegmentation(hf_config)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the folded head is really exercised
        theirs.decode_head.batch_norm.running_mean.normal_(0, 0.1)
        theirs.decode_head.batch_norm.running_var.uniform_(0.5, 1.5)
    ours = SegformerForSemanticSegmentation(config)
    info = ours.load_checkpoint_state(canonical_keys(theirs.state_dict()))
    assert not (info.missing_keys or info.unexpected_keys or info.mismatched_keys)
    return theirs.to(device).eval(), ours.to(device).eval()


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def gemm_peak(repeats: int = 5) -> float:
    """The machine's fp32 GEMM rate (FLOP/s) at the current thread count: best of a 2048³ matmul."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), torch.device("cpu")) for _ in range(repeats))
    return 2 * 2048**3 / best


class _FlopCount:
    """FLOPs of the operators run inside, by operator (PyTorch's formulas, ``torch.utils.flop_counter``), counted
    by a dispatch mode alone. ``FlopCounterMode`` also installs global module hooks to attribute FLOPs to modules,
    and a hooked model leaves its fused paths (hooks must see the modules run: ``modeling._unhooked``), so it
    would count the plain path for ours too."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counts: dict[str, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                packet = func._overloadpacket
                name = packet.__name__.removesuffix("_")  # an in-place product (addmm_) counts as its out-of-place one
                formula = flop_registry.get(packet) or flop_registry.get(getattr(torch.ops.aten, name, None))
                if formula is None:  # a composite (conv2d, linear): count what it decomposes into
                    with self:
                        out = func.decompose(*args, **kwargs)
                    if out is not NotImplemented:
                        return out
                out = func(*args, **kwargs)
                if formula is not None:
                    key = f"aten.{name}"
                    counts[key] = counts.get(key, 0) + formula(*args, **kwargs, out_val=out)
                return out

        self.counts, self.mode = counts, Mode()

    def __enter__(self) -> dict[str, int]:
        self.mode.__enter__()
        return self.counts

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def model_flops(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """FLOPs of one forward, attention included: (the plain architecture's, ours). The plain count runs the
    unfolded model (explicit-matmul attention, the concatenate-and-fuse head), which the flop counter sees
    op by op; ours runs our inference path with oneDNN's private kernels switched off (the counter does not see
    them; the same products through PyTorch's ops) plus the attention products, which the fused attention kernel
    hides from the counter (the plain run's batched matmuls: attention is the only bmm there)."""

    def count(fast: bool) -> dict[str, int]:
        fast_before = model.fast_path
        model.fast_path = fast
        try:
            with warnings.catch_warnings():  # (flags() warns about TF32 on Intel GPUs, which this is not about)
                warnings.simplefilter("ignore", UserWarning)
                with torch.backends.mkldnn.flags(enabled=not fast), _FlopCount() as counts:
                    with torch.inference_mode():
                        model(x)
        finally:
            model.fast_path = fast_before
        return counts

    plain = count(False)
    count(True)  # (the folded head's weights are made once, on the first fast forward: not counted per forward)
    ours = count(True)
    attention_seen = any("attention" in op for op in ours)  # a future counter that sees the fused kernel
    return float(sum(plain.values())), float(sum(ours.values()) + (0 if attention_seen else plain.get("aten.bmm", 0)))


def ort_session(model: torch.nn.Module, height: int, width: int, workdir: str):
    """onnxruntime on our export of ``model`` (dynamic axes), the thread count torch uses, no spinning."""
    import onnxruntime as ort

    from segformer.export import export_onnx

    path = Path(workdir) / f"model-{height}x{width}.onnx"
    export_onnx(model, path, size=(min(height, 512), min(width, 512)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # onnxruntime's worker threads spin after each run by default, stealing the cores from the PyTorch runs
    # that follow in the interleaved loop; without spinning each runtime gets the machine to itself.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_inference_case(case: str, args: argparse.Namespace, device: torch.device) -> dict:
    variant, size, dtype_name, batch = case.split(":")
    height, width = (int(v) for v in size.split("x"))
    dtype = DTYPES[dtype_name]
    theirs, eager = build_pair(variant, device)
    ours = torch.compile(eager) if args.compile else eager
    x = torch.randn(int(batch), 3, height, width, device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    outputs, times, peaks = {}, {"transformers": [], "segformer": []}, {}
    runners = [("transformers", theirs), ("segformer", ours)]
    nan = float("nan")
    flops = model_flops(ours, x) if device.type == "cpu" and not args.compile else (nan, nan)
    with tempfile.TemporaryDirectory() as workdir:
        if args.ort and device.type == "cpu" and dtype is None:
            session = ort_session(eager, height, width, workdir)  # (the export takes the model, not a compiled one)
            feed = {"pixel_values": x.numpy()}
            runners.append(("onnxruntime", lambda _: torch.from_numpy(session.run(["logits"], feed)[0])))
            times["onnxruntime"] = []

        def forward(name, model):
            with torch.inference_mode(), autocast():
                out = model(x)
                outputs[name] = (out if isinstance(out, torch.Tensor) else out.logits).float()

        for name, model in runners:  # warm-up
            forward(name, model)
            if name != "onnxruntime":
                peaks[name] = measure_in_child(name, case, args) if args.memory else float("nan")
        for _ in range(args.repeats):  # interleaved, so all see the same machine state
            for name, model in runners:
                times[name].append(timed(lambda n=name, m=model: forward(n, m), device))
    ref, got = outputs["transformers"], outputs["segformer"]
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    agree = (got.argmax(1) == ref.argmax(1)).float().mean().item()
    row = _row(case, times, peaks, rel, agree)
    row["flops"] = flops
    if "onnxruntime" in times:
        row["ort"] = statistics.median(times["onnxruntime"])
        ort_out = outputs["onnxruntime"]
        row["ort_rel"] = ((ort_out - ref).abs().max() / ref.abs().max()).item()
    return row


def run_batch_case(case: str, device: torch.device, repeats: int = 5) -> dict:
    """Per-image time of a batch against single-image calls, both libraries, interleaved (fp32, eval)."""
    _, variant, size, batch = case.split(":")
    height, width, b = *(int(v) for v in size.split("x")), int(batch)
    theirs, ours = build_pair(variant, device)
    x = torch.randn(b, 3, height, width, device=device)
    runs = {}
    for name, model in (("theirs", theirs), ("ours", ours)):
        runs[name + "_batch"] = lambda m=model: m(x)
        runs[name + "_single"] = lambda m=model: [m(x[i : i + 1]) for i in range(b)]
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn, device) / b)
    return dict(case=case, batch=b, **{name: statistics.median(t) for name, t in times.items()})


def run_train_case(case: str, args: argparse.Namespace, device: torch.device) -> dict:
    _, variant, size, batch = case.split(":")
    height, width = (int(v) for v in size.split("x"))
    theirs, ours = build_pair(variant, device)
    for model in (theirs, ours):
        model.train()
    # both train with the variant's defaults (drop path 0.1, dropout 0): the same work; the accuracy check below
    # compares eval-mode losses, where neither is random
    x = torch.randn(int(batch), 3, height, width, device=device)
    labels = torch.randint(0, 150, (int(batch), height, width), device=device)
    times, peaks, losses = {"transformers": [], "segformer": []}, {}, {}

    def step(name, model):
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=labels).loss
        loss.backward()
        losses[name] = loss.item()

    for name, model in (("transformers", theirs), ("segformer", ours)):  # warm-up
        step(name, model)
        peaks[name] = measure_in_child(name, case, args) if args.memory else float("nan")
    for _ in range(args.repeats):
        for name, model in (("transformers", theirs), ("segformer", ours)):
            times[name].append(timed(lambda n=name, m=model: step(n, m), device))
    # accuracy: the same eval-mode loss (no dropout) through both
    for model in (theirs, ours):
        model.eval()
    with torch.no_grad():
        ref, got = theirs(x, labels=labels).loss, ours(x, labels=labels).loss
    rel = abs(got.item() - ref.item()) / abs(ref.item())
    return _row(case, times, peaks, rel, float("nan"))


def measure_in_child(name: str, case: str, args: argparse.Namespace) -> float:
    """Peak memory of one forward (or training step) of one library, in a fresh process, so that neither
    library's allocator caches hide or inflate the other's peak."""
    import subprocess

    cmd = [sys.executable, __file__, "--memory-child", name, "--cases", case, "--device", args.device]
    if args.no_tf32:
        cmd.append("--no-tf32")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--allocator", args.allocator]  # (an eager model: under --compile too)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(name: str, case: str, device: torch.device) -> float:
    theirs, ours = build_pair(case.split(":")[1] if case.startswith("train:") else case.split(":")[0], device)
    model = theirs if name == "transformers" else ours
    del theirs, ours
    gc.collect()
    if case.startswith("train:"):
        _, _, size, batch = case.split(":")
        height, width = (int(v) for v in size.split("x"))
        x = torch.randn(int(batch), 3, height, width, device=device)
        labels = torch.randint(0, 150, (int(batch), height, width), device=device)
        model.train()
        with PeakMemory(device) as mem:
            model(x, labels=labels).loss.backward()
    else:
        _, size, dtype_name, batch = case.split(":")
        height, width = (int(v) for v in size.split("x"))
        x = torch.randn(int(batch), 3, height, width, device=device)
        dtype = DTYPES[dtype_name]
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with PeakMemory(device) as mem, torch.inference_mode(), autocast:
            model(x)
    return mem.peak


def check_case(case: str) -> str | None:
    """Why ``case`` is not a case of this script (see the docstring), or None."""
    words = case.split(":")
    kind = words[0] if words[0] in ("train", "batch") else None
    fields = words[1:] if kind else words
    wanted = "VARIANT:HxW:BATCH" if kind else "VARIANT:HxW:DTYPE:BATCH"
    if len(fields) != (3 if kind else 4):
        return f"{case!r} is not {f'{kind}:' if kind else ''}{wanted}"
    variant, size, batch = fields[0], fields[1], fields[-1]
    if variant not in VARIANTS:
        return f"{case!r}: unknown variant {variant!r} (one of {', '.join(VARIANTS)})"
    if not kind and fields[2] not in DTYPES:
        return f"{case!r}: unknown dtype {fields[2]!r} (one of {', '.join(DTYPES)})"
    sides = size.split("x")
    if len(sides) != 2 or not all(v.isdigit() and int(v) > 0 for v in (*sides, batch)):
        return f"{case!r}: the size must be HxW and the batch a count, positive integers (e.g. 512x512 and 1)"
    return None


def _row(case, times, peaks, rel, agree) -> dict:
    t_theirs, t_ours = statistics.median(times["transformers"]), statistics.median(times["segformer"])
    return dict(case=case, theirs=t_theirs, ours=t_ours, ratio=t_theirs / t_ours,
                mem_theirs=peaks["transformers"], mem_ours=peaks["segformer"], rel=rel, agree=agree)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help="cases to run (see above; default: the list above, less its bf16 "
        "cases where the device would only emulate bf16)",
    )
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions per case (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (inference cases)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory measurements (each runs in a fresh process)")  # fmt: skip
    parser.add_argument("--no-ort", dest="ort", action="store_false", help="skip the onnxruntime column")
    parser.add_argument(
        "--no-tf32", action="store_true", help="CUDA: exact fp32, no TF32 in matmuls or cuDNN convolutions"
    )
    parser.add_argument(
        "--allocator",
        choices=["tuned", "system"],
        default="tuned",
        help="tuned: as the segformer command line (segformer.allocator); system: the C library's defaults",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for case in args.cases or ():
        problem = check_case(case)
        if problem:
            parser.error(f"--cases: {problem}")
    tuned = tune_allocator() if args.allocator == "tuned" else False
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.memory_child:
        print(memory_child(args.memory_child, args.cases[0], device))
        return 0
    import transformers

    skipped = None
    if args.cases is None:  # the default list: bf16 cases only where the device computes in bf16
        args.cases = DEFAULT_CASES
        skipped = reduced_precision_problem(torch.bfloat16, device.type)
        if skipped:
            args.cases = [c for c in DEFAULT_CASES if ":bf16:" not in c]
    peak = gemm_peak() if device.type == "cpu" else float("nan")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, device {device}")  # fmt: skip
    print(f"# cpu capability {cpu_capability()}, "
          f"fp32 GEMM peak {peak / 1e9:.0f} GFLOP/s, allocator {'tuned' if tuned else 'system'}")  # fmt: skip
    if skipped:
        print(f"# bf16 cases skipped: {skipped} (name them in --cases to time the emulation anyway)")
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name(device)}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
              f"TF32 cuDNN convolutions {torch.backends.cudnn.allow_tf32} (--no-tf32: exact fp32)")  # fmt: skip
    header = f"{'case':<24}{'transformers':>14}{'segformer':>12}{'speed-up':>10}{'onnxruntime':>13}{'ort/ours':>10}"
    print(header + f"{'GFLOP arch/ours':>17}{'% peak':>8}{'peak MB (T / ours)':>22}{'max rel diff':>14}"
          f"{'argmax agree':>14}")  # fmt: skip
    batching = []
    for case in args.cases:
        if case.startswith("batch:"):
            batching.append(run_batch_case(case, device, args.repeats))
            continue
        row = (run_train_case if case.startswith("train:") else run_inference_case)(case, args, device)
        mem = f"{row['mem_theirs'] / 2**20:,.0f} / {row['mem_ours'] / 2**20:,.0f}"
        agree = "" if row["agree"] != row["agree"] else f"{row['agree']:.4f}"
        ort = f"{row['ort']:>12.4f}s{row['ort'] / row['ours']:>9.2f}x" if "ort" in row else f"{'':>13}{'':>10}"
        arch, ours = row.get("flops", (float("nan"), float("nan")))
        share = f"{100 * ours / row['ours'] / peak:>7.0f}%" if ours == ours else f"{'':>8}"
        gflop = f"{arch / 1e9:>9.1f} / {ours / 1e9:<5.1f}" if ours == ours else f"{'':>17}"
        print(f"{row['case']:<24}{row['theirs']:>13.4f}s{row['ours']:>11.4f}s{row['ratio']:>9.2f}x{ort}{gflop}"
              f"{share}{mem:>22}{row['rel']:>14.1e}{agree:>14}", flush=True)  # fmt: skip
        gc.collect()
    for row in batching:
        b = row["batch"]
        print(f"# {row['case']}: per image, batch {b} vs {b} single-image calls (interleaved, median of "
              f"{args.repeats}): segformer {1e3 * row['ours_batch']:.1f} vs {1e3 * row['ours_single']:.1f} ms "
              f"({row['ours_single'] / row['ours_batch']:.2f}x), transformers {1e3 * row['theirs_batch']:.1f} vs "
              f"{1e3 * row['theirs_single']:.1f} ms ({row['theirs_single'] / row['theirs_batch']:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
