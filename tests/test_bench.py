"""bench/: the numbers the benchmarks print are about the path users run (FLOP counts of our fast path)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from segformer import SegformerConfig, SegformerForSemanticSegmentation

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_inference():
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH / "bench_inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model() -> SegformerForSemanticSegmentation:
    config = SegformerConfig(
        hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1],
        decoder_hidden_size=16, num_labels=5,
    )  # fmt: skip
    torch.manual_seed(0)
    return SegformerForSemanticSegmentation(config).eval()


def test_flop_count_follows_the_folded_head():
    """The folded head computes the plain head's products but the fuse conv (each stage's projection folded
    with its slice of the fuse weights, then the classifier): its count is the plain count less the fuse
    conv's 2·(4D)·D·H₁W₁, exactly. A counter that installs module hooks (FlopCounterMode does) sends the model
    down its plain path, and would count the fuse conv for ours too."""
    bench = _bench_inference()
    model = _model()
    head = model.decode_head
    with torch.inference_mode():
        hidden = model.segformer(torch.randn(2, 3, 64, 96), output_hidden_states=True).hidden_states

    def count(fast: bool) -> int:
        head.fast_path = fast
        with bench._FlopCount() as counts, torch.inference_mode():
            head(hidden)
        return sum(counts.values())

    plain = count(False)
    count(True)  # the first fast forward folds the weights (a few small products, once)
    folded = count(True)
    d = head.config.decoder_hidden_size
    batch, _, h1, w1 = hidden[0].shape
    assert folded == plain - 2 * (4 * d) * d * batch * h1 * w1


def test_model_flops_ours_below_the_architecture():
    """model_flops: (architecture, ours); ours is the folded head's count plus the same encoder and attention."""
    bench = _bench_inference()
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    arch, ours = bench.model_flops(model, x)
    d = model.config.decoder_hidden_size
    fuse = 2 * (4 * d) * d * (64 // 4) * (64 // 4)
    assert arch > 0
    # the encoder's products are the same on both paths up to how its patchified convs are counted (as GEMMs or
    # convolutions: the same products), so ours is the architecture's less the fuse conv
    assert ours == arch - fuse
    assert model.fast_path  # restored


def test_bench_inference_names_what_is_wrong_with_a_case():
    check = _bench_inference().check_case
    assert check("b0:512x512:fp32:1") is None and check("train:b2:64x96:8") is None
    assert check("batch:b0:512x512:8") is None
    assert "is not VARIANT:HxW:DTYPE:BATCH" in check("b0:512x512")
    assert "is not train:VARIANT:HxW:BATCH" in check("train:b0:512x512")
    assert "unknown dtype 'fp64'" in check("b0:64x64:fp64:1")
    assert "unknown variant 'b9'" in check("b9:64x64:fp32:1")
    assert "positive integers" in check("b0:0x64:fp32:1") and "positive integers" in check("b0:64x64:fp32:-1")
