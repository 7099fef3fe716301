"""Reduced precision only where the hardware computes in it (segformer.inference.select_dtype)."""

from __future__ import annotations

import copy
import logging
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    GRAVITON3,
    HASWELL,
    SAPPHIRE_RAPIDS,
    SKYLAKE_X,
    ZEN4,
    fp32_tol,
    pretend_machine,
    randomize_,
    reductions,
    rel_err,
    rounded_once_tol,
    run_cli,
    tiny_config,
)
from PIL import Image
from torch import nn

from segformer import SegformerForSemanticSegmentation
from segformer.backends import quantize_int8
from segformer.inference import autocast, cpu_flags, effective_amp, reduced_precision_problem, select_dtype

BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    "machine, bf16, fp16",
    [(SAPPHIRE_RAPIDS, None, "slower than float32 here, even with the CPU's float16 arithmetic"),
     (ZEN4, None, "no float16 arithmetic (no amx_fp16/avx512_fp16)"),
     (SKYLAKE_X, "no bfloat16 arithmetic (no amx_bf16/avx512_bf16)", "no float16 arithmetic"),
     (HASWELL, "no bfloat16 arithmetic", "no float16 arithmetic"),
     (GRAVITON3, None, "slower than float32 here"),
     # Zen 4 with ATEN_CPU_CAPABILITY=avx2: the hardware has bf16, torch's kernels do not use it
     ({**ZEN4, "cpu_capability": "AVX2"}, "PyTorch runs its AVX2 kernels", "no float16 arithmetic"),
     # Zen 4 with ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's convolutions and matmuls would emulate it
     ({**ZEN4, "onednn_bf16": False}, "oneDNN has no native bfloat16 path", "no float16 arithmetic"),
     ({**ZEN4, "flags": set()}, "cannot tell", "cannot tell")],
    ids=["sapphire-rapids", "zen4", "skylake-x", "haswell", "graviton3", "zen4-aten-avx2", "zen4-onednn-avx2",
         "no-cpuinfo"],
)  # fmt: skip
def test_cpu_reduced_precision_is_native_only_with_the_instructions_and_the_kernels(machine, bf16, fp16):
    for dtype, expected in ((BF16, bf16), (FP16, fp16)):
        problem = reduced_precision_problem(dtype, "cpu", **machine)
        if expected is None:
            assert problem is None, problem
        else:
            assert problem is not None and expected in problem and "\n" not in problem
    assert reduced_precision_problem(torch.float32, "cpu", **HASWELL) is None


def test_gpu_float16_is_native_and_bfloat16_needs_bf16_arithmetic():
    assert reduced_precision_problem(FP16, "cuda", cuda_bf16=False) is None
    assert reduced_precision_problem(BF16, "cuda", cuda_bf16=True) is None
    assert "no bfloat16 arithmetic" in reduced_precision_problem(BF16, "cuda:1", cuda_bf16=False)


def test_select_dtype_falls_back_to_float32_with_one_line_once(caplog):
    assert select_dtype("bf16", "cpu", **ZEN4) == BF16
    assert select_dtype(torch.bfloat16, "cpu", **SAPPHIRE_RAPIDS) == BF16
    assert select_dtype(None, "cpu", **HASWELL) == torch.float32
    machine = {**ZEN4, "cpu_capability": "avx2-test"}  # a reason no other test in this process logs
    with caplog.at_level(logging.WARNING, logger="segformer"):
        assert select_dtype("bfloat16", "cpu", **machine) == torch.float32
        assert select_dtype("bf16", "cpu", **machine) == torch.float32
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("bfloat16 on cpu: PyTorch runs its AVX2-TEST kernels") and "using float32" in lines[0]
    with pytest.raises(ValueError, match="dtype 'fp8' is not a torch dtype"):
        select_dtype("fp8", "cpu")


def test_effective_amp_is_what_runs_and_says_why():
    assert effective_amp("bf16", "cpu", **ZEN4) == ("bf16", None)
    assert effective_amp("fp16", "cuda", cuda_bf16=False) == ("fp16", None)
    assert effective_amp(None, "cpu") == effective_amp("fp32", "cpu") == ("none", None)
    amp, reason = effective_amp("bf16", "cpu", **HASWELL)
    assert amp == "none" and reason.startswith("bfloat16 on cpu: this CPU has no bfloat16") and "\n" not in reason
    assert effective_amp("fp16", "cpu", **ZEN4)[0] == "none"
    with pytest.raises(ValueError, match="amp must be none, bf16 or fp16"):
        effective_amp("int8", "cpu")


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimdhp bf16\nCPU implementer\t: 0x41\n")
    assert cpu_flags(str(x86)) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert cpu_flags(str(arm)) == {"fp", "asimd", "asimdhp", "bf16"}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="PyTorch's flag checks are x86's")
def test_without_cpuinfo_the_x86_flags_come_from_pytorch(tmp_path):
    """Windows and macOS have no /proc/cpuinfo: bfloat16 was never chosen there, even on an AMX CPU. PyTorch's own
    checks (its cpuinfo library) stand in; on this x86 Linux machine they agree with /proc/cpuinfo flag by flag."""
    from segformer.precision import _TORCH_CPU_CHECKS

    listed = cpu_flags()
    assert "sse2" in listed  # (this machine's file was read)
    derived = cpu_flags(str(tmp_path / "missing"))
    assert "sse2" in derived and "avx2" in derived
    for flag in _TORCH_CPU_CHECKS:
        assert (flag in derived) == (flag in listed), flag
    assert reduced_precision_problem(BF16, "cpu", flags=derived) == reduced_precision_problem(BF16, "cpu")


def test_autocast_and_the_predictor_follow_this_machine():
    native = reduced_precision_problem(BF16, "cpu") is None
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") == native
        if native:
            assert torch.get_autocast_dtype("cpu") == BF16
    with autocast(torch.device("cpu"), "none"):
        assert not torch.is_autocast_enabled("cpu")
    from segformer.predict import SegformerPredictor

    model = randomize_(SegformerForSemanticSegmentation(tiny_config())).eval()
    predictor = SegformerPredictor(model, device="cpu", dtype="bfloat16", mode="whole")
    assert next(predictor.model.parameters()).dtype == (BF16 if native else torch.float32)
    with pytest.raises(ValueError, match="amp must be none, bf16 or fp16"):
        autocast(torch.device("cpu"), "int8")


@pytest.mark.slow
def test_capping_the_kernels_at_avx2_turns_bf16_off():
    """What a user gets with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA capped at AVX2 (as on an AVX2-only CPU)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    code = "import torch; from segformer.inference import select_dtype; print(select_dtype('bf16', 'cpu'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch.float32"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bfloat16 on cpu: ") and "using float32" in lines[0]


# ----------------------------------------------------------------------------------------------- int8
U8 = 2.0**-8  # int8 / uint8 rounding: half a step of 255 levels over a tensor's range, relative to its largest value


def test_int8_quantises_the_encoder_linears_only_and_stays_close():
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(depths=[1, 2, 1, 1]))).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = model(x).logits
        quantized = quantize_int8(copy.deepcopy(model))
        got = quantized(x).logits
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    encoder = list(quantized.segformer.modules())
    assert sum(isinstance(m, DynamicLinear) for m in encoder) == sum(
        isinstance(m, nn.Linear) for m in model.segformer.modules()
    )
    assert not any(type(m) is nn.Linear for m in encoder)
    assert all(type(m) is nn.Linear for m in quantized.decode_head.modules() if isinstance(m, nn.Linear))
    # weights and activations each rounded to 2^-8 of their range, against an fp32 pass
    lengths = reductions(model, x)
    assert rel_err(got, ref) <= rounded_once_tol(len(lengths), U8) + fp32_tol(lengths)


def test_predictor_and_cli_take_dtype_int8(tmp_path, capsys):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from segformer.predict import SegformerPredictor

    model = randomize_(SegformerForSemanticSegmentation(tiny_config())).eval()
    model.save_pretrained(tmp_path / "m")
    predictor = SegformerPredictor(tmp_path / "m", dtype="int8", mode="whole")  # device auto: the CPU
    assert predictor.device.type == "cpu" and any(isinstance(m, DynamicLinear) for m in predictor.model.modules())
    image = np.random.default_rng(0).integers(0, 255, (64, 72, 3), dtype=np.uint8)
    assert predictor.predict(image).labels.shape == (64, 72)
    with pytest.raises(ValueError, match="dtype int8 runs on the eager pytorch backend"):
        SegformerPredictor(tmp_path / "m", dtype="int8", backend="onnxruntime")
    Image.fromarray(image).save(tmp_path / "x.png")
    code, _, err = run_cli(capsys, "predict", tmp_path / "x.png", "--model", tmp_path / "m", "--output",
                           tmp_path / "out", "--dtype", "int8", "--mode", "whole", "--no-progress")  # fmt: skip
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "out" / "x.png")).shape == (64, 72)


@pytest.mark.parametrize("native", [False, True], ids=["emulated-bf16", "native-bf16"])
def test_evaluate_casts_the_weights_once_per_run_not_per_image(monkeypatch, tmp_path, bf16_at_every_size, native):
    """segformer eval --amp bf16: one autocast region around the loop, so autocast's cast copies of the weights
    serve every image (per image, those casts made bf16 slower than fp32 on small images). Where the CPU computes
    in bf16, the fast paths cast the weights they use on each call (modeling._cast: cheaper than checking a kept
    cast against the weight), each at most once per image. Both regimes run on any CPU (bf16 arithmetic is
    emulated where the CPU lacks it), so the test does not depend on the machine it runs on."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from segformer import modeling
    from segformer.data import build_dataset, write_synthetic_dataset
    from segformer.evaluate import evaluate

    pretend_machine(monkeypatch, SAPPHIRE_RAPIDS)  # bf16 autocast runs (emulated where this CPU lacks it)
    monkeypatch.setattr(modeling, "_native_cpu_bf16", lambda: native)  # the fast paths' own view of the CPU
    if native:
        try:  # the fast paths' bf16 GEMM: none where oneDNN is capped below its bf16 ISA (ONEDNN_MAX_CPU_ISA=AVX2)
            modeling._rows_linear(torch.ones(2, 8, dtype=BF16), torch.ones(4, 8, dtype=BF16), None, BF16)
        except RuntimeError as error:
            pytest.skip(f"this process cannot multiply bf16 matrices: {str(error).splitlines()[0]}")
    data = write_synthetic_dataset(tmp_path / "data", num_train=1, num_val=3, size=64, seed=0)
    val, _ = build_dataset(data, "val")
    trained = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=val.num_labels)), seed=2).eval()
    casts, weights = [], set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == BF16:
                casts.append(args[0].data_ptr() in weights and not args[0]._is_view())  # a weight itself
            return func(*args, **kwargs)

    def weight_casts(images: int) -> int:  # a fresh copy of the model each time: no casts kept from before
        model = copy.deepcopy(trained)
        weights.clear()
        weights.update(p.data_ptr() for p in model.parameters() if p.ndim > 1)
        casts.clear()
        with Record():
            metrics = evaluate(model, val, amp="bf16", max_images=images)
        assert metrics["num_images"] == images
        return sum(casts)

    one = weight_casts(1)
    assert one > 0  # autocast ran and cast the weights
    three = weight_casts(3)
    if native:  # the fast paths' casts, per image; the other weights' autocast casts once per run
        assert 0 < three - one <= 2 * len(weights)
    else:
        assert three == one
