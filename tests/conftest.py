"""Shared test helpers: tiny configs, seeded random weights, relative error, and the names the suite gives the
fp32 error model (segformer.error_model) that every numerical tolerance in the suite is derived from."""

from __future__ import annotations

import math
import os

import pytest
import torch

from segformer import SegformerConfig
from segformer.error_model import U32  # noqa: F401  (the suite's names for the fp32 error model)
from segformer.error_model import fp32_tolerance as fp32_tol  # noqa: F401
from segformer.error_model import reduction_lengths as reductions  # noqa: F401

# Under pytest-xdist every worker is a process of its own; one thread each keeps 2 cores busy, not thrashing.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TINY = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4],
            decoder_hidden_size=16)  # fmt: skip


# Machine facts of the CPUs that matter: what /proc/cpuinfo lists, which ATen kernels torch picked, oneDNN's answer.
SAPPHIRE_RAPIDS = dict(cpu_capability="AVX512", flags={"sse2", "avx2", "avx512f", "avx512_bf16", "amx_bf16",
                       "avx512_fp16", "amx_fp16"}, onednn_bf16=True, onednn_fp16=True)  # fmt: skip
ZEN4 = dict(cpu_capability="AVX512", flags={"sse2", "avx2", "avx512f", "avx512_bf16"}, onednn_bf16=True,
            onednn_fp16=False)  # fmt: skip
SKYLAKE_X = dict(cpu_capability="AVX512", flags={"sse2", "avx2", "avx512f"}, onednn_bf16=True, onednn_fp16=False)
HASWELL = dict(cpu_capability="AVX2", flags={"sse2", "avx2", "fma"}, onednn_bf16=False, onednn_fp16=False)
GRAVITON3 = dict(cpu_capability="SVE256", flags={"fp", "asimd", "asimdhp", "sve", "bf16"}, onednn_bf16=True,
                 onednn_fp16=True)  # fmt: skip


def pretend_machine(monkeypatch: pytest.MonkeyPatch, facts: dict) -> None:
    """Make every precision decision (select_dtype, autocast, effective_amp, ...) see the machine ``facts``
    (:func:`segformer.inference.reduced_precision_problem`'s keywords, e.g. ``HASWELL``) instead of this one's."""
    import functools

    from segformer import inference

    problem = functools.partial(inference.reduced_precision_problem, **facts)
    monkeypatch.setattr(inference, "reduced_precision_problem", problem)


@pytest.fixture
def bf16_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU bf16 autocast computes in bf16 however small the model's products (inference otherwise runs the parts
    below modeling._BF16_MIN_MACS in float32, as at a test model's sizes): for tests of the bf16 kernels."""
    from segformer import modeling

    monkeypatch.setattr(modeling, "_BF16_MIN_MACS", 0)


def tiny_config(**changes) -> SegformerConfig:
    """A SegFormer small enough for fast tests, with every code path of the real ones (sr ratios 8,4,2,1)."""
    return SegformerConfig(**{**TINY, "num_labels": 5, **changes})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight, bias, norm and BatchNorm statistic a random, non-trivial value (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("bias", "running_mean")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.ndim == 1:
                t.copy_(1 + torch.randn(t.shape, generator=gen) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) / (t[0].numel() ** 0.5))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def short_run(data, model, output, **changes):
    """A TrainConfig for a few steps of a tiny model on a small folder data set, on the CPU, no evaluation unless
    asked (``changes`` override any field, e.g. ``device``)."""
    from segformer.train import TrainConfig

    base = dict(data=str(data), model=str(model), output=str(output), steps=4, batch_size=4, crop=(48, 48),
                scale=(0, 0), ratio_range=(0.75, 1.25), lr=1e-3, warmup_steps=2, eval_every=0, save_every=100,
                log_every=1, workers=0, progress=False, device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **changes})


def hf_pil_processor(transformers):
    """Transformers' PIL image processor, the oracle of ours: ``SegformerImageProcessorPil`` in 5.x, where the
    plain ``SegformerImageProcessor`` is the torchvision backend whenever torchvision is installed; the plain
    class before (PIL only). Where this Transformers builds no image processor at all (5.17 needs torchvision
    for either class), the oracle is missing, not our code: the calling test is skipped, saying so."""
    reason = "no SegformerImageProcessor"
    for name in ("SegformerImageProcessorPil", "SegformerImageProcessor"):
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            cls()
        except ImportError as exc:
            reason = " ".join(str(exc).split())[:160]
            continue
        return cls
    pytest.skip(f"Transformers {transformers.__version__} builds no image processor here: {reason}")


# ------------------------------------------------------------------------------------------ fp32 error model
# The fp32 error model lives in the package (export's verification uses it too): segformer.error_model's
# U32, reduction_lengths (here: reductions) and fp32_tolerance (here: fp32_tol), imported above.


def rounded_once_tol(count: int, unit: float) -> float:
    """Error allowance of a pass of ``count`` reductions in series whose operands are rounded to a format of unit
    ``unit`` (bfloat16; int8's 2^-8 of a tensor's range) and whose products are summed in fp32, relative to its
    largest output. Per reduction both operands, the result and the pointwise step after it round once: four
    relative errors of at most ``unit`` whatever the length K (an operand's rounding errors, random in sign,
    add up like the K products themselves; the fp32 sums' u32·sqrt(K/2) is negligible), in quadrature along the
    series, 4 sigma as in :func:`fp32_tol`: 8·unit·sqrt(count)."""
    return 4 * unit * math.sqrt(4 * count)


def cross_entropy_tol(logit_err: float, loss: float) -> float:
    """|change of a mean cross-entropy| when no logit moves by more than ``logit_err``: the gradient of CE in the
    logits (softmax minus one-hot) has an L1 norm <= 2 per pixel, bilinear upsampling is a convex combination
    (it cannot grow the error) and the mean keeps the bound; plus the loss's own rounding (log-sum-exp and a
    mean: a few u, 8u taken)."""
    return 2 * logit_err + 8 * U32 * abs(loss)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``segformer ARGV`` in this process (what the console script runs): exit code, stdout, stderr."""
    from segformer.cli import main

    capsys.readouterr()  # drop what earlier steps printed
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's usage errors and --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny() -> SegformerConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it in this worker."""
    torch.manual_seed(0)
