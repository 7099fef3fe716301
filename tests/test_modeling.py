"""The model family on tiny configs: shapes, outputs, losses, the fast path and clear errors.
Needs no transformers; the oracle comparisons live in test_oracle.py."""

from __future__ import annotations

import copy
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    U32,
    cross_entropy_tol,
    fp32_tol,
    randomize_,
    reductions,
    rel_err,
    rounded_once_tol,
    tiny_config,
)
from torch import nn

from segformer import (
    SegformerConfig,
    SegformerDecodeHead,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerModel,
    modeling,
)
from segformer.modeling import classification_loss, min_input_size, semantic_loss


def fixture_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """FACTS.md §8: every tensor defined by its key and shape."""
    state = {}
    for key, ref in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(ref)
            continue
        seed = zlib.crc32(key.encode()) % 1000
        t = np.sin(np.arange(ref.numel(), dtype=np.float64) * 0.731 + seed * 0.01) * 0.3
        if key.endswith("running_var"):
            t = 1 + 0.5 * np.abs(t)
        elif key.endswith(".weight") and ref.ndim == 1:
            t = 1 + t
        state[key] = torch.from_numpy(t).reshape(ref.shape).float()
    return state


@pytest.mark.parametrize("fast_path", [True, False])
def test_deterministic_fixture(fast_path):
    """FACTS.md §8: Transformers' fp32 output, printed to 6 decimals. The same network in float64 (rounding
    ~1e-16, the same on every CPU) is checked against the print, and our fp32 pass against the float64 one."""
    config = SegformerConfig(depths=[1, 2, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4],
                             decoder_hidden_size=16, num_labels=5)  # fmt: skip
    model = SegformerForSemanticSegmentation(config).eval()
    model.load_state_dict(fixture_weights(model))
    model.fast_path = fast_path
    exact_model = copy.deepcopy(model).double()
    x = torch.from_numpy(np.sin(np.arange(1 * 3 * 64 * 80, dtype=np.float64) * 0.05).reshape(1, 3, 64, 80)) * 2
    labels = torch.arange(64 * 80).reshape(1, 64, 80) % 5
    labels[0, :4, :4] = 255
    with torch.no_grad():
        out = model(x.float(), labels=labels)
        exact = exact_model(x, labels=labels)
    expected = torch.tensor(
        [[[0.410919, -0.141263, -0.597029], [-0.527464, -0.224237, -0.481014]],
         [[1.644349, 1.182533, 0.896957], [1.055781, 1.184547, 0.955705]],
         [[1.657301, 1.614164, 1.701797], [1.836970, 1.699735, 1.661513]]], dtype=torch.float64
    )  # fmt: skip
    assert out.logits.shape == exact.logits.shape == (1, 5, 16, 20)
    # one fp32 pass's error (ours here, or the one that printed the fixture): fp32_tol of its reductions
    err32 = fp32_tol(reductions(model, x.float())) * exact.logits.abs().max().item()
    # the print: half a unit of its last decimal, plus the fp32 error of the pass that printed it
    torch.testing.assert_close(exact.logits[0, :3, :2, :3], expected, atol=5e-7 + err32, rtol=0)
    # the sum of 1600 logits: half of its 3rd decimal, plus 1600 fp32 errors that may all lean one way, each of
    # the 1-sigma size (fp32_tol / 4: the 4-sigma tail does not apply to all)
    assert exact.logits.sum().item() == pytest.approx(1199.877, abs=5e-4 + exact.logits.numel() * err32 / 4)
    assert exact.loss.item() == pytest.approx(2.103478, abs=5e-7 + cross_entropy_tol(err32, 2.103478))
    assert (out.logits.double() - exact.logits).abs().max().item() <= err32
    assert abs(out.loss.item() - exact.loss.item()) <= cross_entropy_tol(err32, exact.loss.item())


def test_parameter_counts_of_the_variants():
    expected = {"b0": 3_752_694, "b1": 13_715_798, "b2": 27_461_974, "b3": 47_337_814, "b4": 64_108_374,
                "b5": 84_708_694}  # fmt: skip
    with torch.device("meta"):
        for variant, count in expected.items():
            model = SegformerForSemanticSegmentation(SegformerConfig.from_variant(variant, num_labels=150))
            assert model.num_parameters() == count, variant


@pytest.mark.parametrize("size", [(29, 29), (64, 80), (77, 101), (130, 45)])
def test_shapes_at_odd_sizes(tiny, size):
    model = randomize_(SegformerForSemanticSegmentation(tiny)).eval()
    x = torch.randn(2, 3, *size)
    out = model(x, output_hidden_states=True, output_attentions=True)
    h, w = size
    sizes = [(-(-h // 4), -(-w // 4))]
    for _ in range(3):
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    assert out.logits.shape == (2, 5, *sizes[0])
    assert [tuple(s.shape) for s in out.hidden_states] == [(2, c, *hw) for c, hw in zip(tiny.hidden_sizes, sizes)]
    assert len(out.attentions) == sum(tiny.depths)
    n1, r1 = sizes[0][0] * sizes[0][1], (sizes[0][0] // 8) * (sizes[0][1] // 8)
    assert out.attentions[0].shape == (2, 1, n1, r1)
    # each row: r1 probabilities, each within 2u (exp, divide), summed with r1 - 1 more roundings
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 1, n1), atol=3 * r1 * U32, rtol=0)
    assert torch.isfinite(out.logits).all()


def test_outputs_index_access_and_tuples(tiny):
    model = randomize_(SegformerForSemanticSegmentation(tiny)).eval()
    x, labels = torch.randn(1, 3, 64, 64), torch.randint(0, 5, (1, 64, 64))
    out = model(x, labels=labels)
    assert out[0] is out.loss and out["logits"] is out.logits and out.hidden_states is None
    plain = model(x, return_dict=False)
    assert isinstance(plain, tuple) and len(plain) == 1 and torch.equal(plain[0], out.logits)
    full = model(x, labels=labels, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert len(full) == 4 and len(full[2]) == 4 and len(full[3]) == 4
    model.config.return_dict = False
    assert isinstance(model(x), tuple)
    base = randomize_(SegformerModel(tiny_config())).eval()
    out = base(x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 32, 2, 2) and out.last_hidden_state.is_contiguous()
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state) and out.attentions is None


@pytest.mark.parametrize("cls", [SegformerModel, SegformerForSemanticSegmentation, SegformerForImageClassification])
def test_reshape_last_stage_false_works_with_every_head(cls):
    torch.manual_seed(0)
    flat = randomize_(cls(tiny_config(reshape_last_stage=False))).eval()
    square = cls(tiny_config())
    square.load_state_dict(flat.state_dict())
    square.eval()
    x = torch.randn(2, 3, 77, 101)
    a, b = flat(x), square(x)
    # one network either way; only the last stage's layout differs, which may pick another kernel blocking
    tol = 2 * fp32_tol(reductions(square, x))
    if cls is SegformerModel:
        assert a.last_hidden_state.shape == (2, 12, 32)  # (B, N, C) with N = 3 * 4
        assert rel_err(a.last_hidden_state, b.last_hidden_state.flatten(2).transpose(1, 2)) <= tol
    else:
        assert rel_err(a.logits, b.logits) <= tol


@pytest.mark.parametrize("training", [False, True])
def test_reshape_last_stage_false_with_one_stage_segments(training):
    """One stage kept token-shaped has no map before it to size it by: the segmentation model was an IndexError
    (audit); it sizes it from the input now. The head called alone says what it needs."""
    config = dict(num_encoder_blocks=1, drop_path_rate=0.0, classifier_dropout_prob=0.0, hidden_dropout_prob=0.0)
    flat = randomize_(SegformerForSemanticSegmentation(tiny_config(reshape_last_stage=False, **config)))
    square = SegformerForSemanticSegmentation(tiny_config(**config))
    square.load_state_dict(flat.state_dict())
    flat.train(training), square.train(training)
    x, labels = torch.randn(2, 3, 77, 101), torch.randint(0, 5, (2, 77, 101))
    a, b = flat(x, labels=labels, output_hidden_states=True), square(x, labels=labels)
    assert a.hidden_states[0].shape == (2, 20 * 26, 8)  # (B, N, C): the stage as asked for
    # one network either way; only the last stage's layout differs, which may pick another kernel blocking
    assert rel_err(a.logits, b.logits) <= 2 * fp32_tol(reductions(square, x))
    if training:
        a.loss.backward()
        assert all(p.grad is not None for p in flat.decode_head.parameters())
    with pytest.raises(ValueError, match=r"encoder hidden state 0 is token-shaped \(2, 520, 8\) with no"):
        flat.decode_head([a.hidden_states[0]])


# Losses against PyTorch's own functions on the same logits: one loss written two ways, a few roundings (u each)
# of the loss apart. LOSS_RTOL = 16u.
LOSS_RTOL = 16 * U32


def test_image_classification_losses(tiny):
    x = torch.randn(3, 3, 64, 64)
    model = randomize_(SegformerForImageClassification(tiny)).eval()
    single = model(x, labels=torch.tensor([0, 4, 2]))
    expected = torch.nn.functional.cross_entropy(single.logits, torch.tensor([0, 4, 2]))
    torch.testing.assert_close(single.loss, expected, rtol=LOSS_RTOL, atol=0)
    assert model.config.problem_type == "single_label_classification"  # stored by the first loss, as Transformers
    model.config.problem_type = None
    multi = model(x, labels=torch.tensor([[0, 1, 0, 1, 1.0]] * 3))
    torch.testing.assert_close(
        multi.loss,
        torch.nn.functional.binary_cross_entropy_with_logits(multi.logits, torch.tensor([[0, 1, 0, 1, 1.0]] * 3)),
        rtol=LOSS_RTOL,
        atol=0,
    )
    model.config.problem_type = "regression"
    target = torch.randn(3, 5)
    torch.testing.assert_close(
        model(x, labels=target).loss, torch.nn.functional.mse_loss(multi.logits, target), rtol=LOSS_RTOL, atol=0
    )
    reg = randomize_(SegformerForImageClassification(tiny_config(num_labels=1))).eval()
    out = reg(x, labels=torch.tensor([0.5, -1.0, 2.0]))
    torch.testing.assert_close(
        out.loss,
        torch.nn.functional.mse_loss(out.logits.squeeze(), torch.tensor([0.5, -1.0, 2.0])),
        rtol=LOSS_RTOL,
        atol=0,
    )


def test_segmentation_losses(tiny):
    model = randomize_(SegformerForSemanticSegmentation(tiny)).eval()
    x = torch.randn(2, 3, 64, 72)
    labels = torch.randint(0, 5, (2, 100, 90))
    labels[:, :10] = 255
    out = model(x, labels=labels)
    up = torch.nn.functional.interpolate(out.logits, size=(100, 90), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        out.loss, torch.nn.functional.cross_entropy(up, labels, ignore_index=255), rtol=LOSS_RTOL, atol=0
    )
    with pytest.raises(ValueError, match="labels hold 7"):
        model(x, labels=torch.full((2, 64, 72), 7))
    all_ignored = model(x, labels=torch.full((2, 64, 72), 255))
    assert all_ignored.loss.item() == 0.0
    binary = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=1))).eval()
    labels = torch.randint(0, 2, (2, 30, 40))
    labels[0, 0] = 255
    out = binary(x, labels=labels)
    up = torch.nn.functional.interpolate(out.logits, size=(30, 40), mode="bilinear", align_corners=False)[:, 0]
    per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(up, labels.float(), reduction="none")
    torch.testing.assert_close(out.loss, (per_pixel * (labels != 255)).mean(), rtol=LOSS_RTOL, atol=0)
    with pytest.warns(UserWarning, match="zero-element"):  # PyTorch's note on the empty classifier
        headless = SegformerForSemanticSegmentation(tiny_config(num_labels=0))
    with pytest.raises(ValueError, match="num_labels >= 1"):
        headless(x, labels=labels)


@pytest.mark.parametrize("weighted", [False, True])
def test_per_image_cross_entropy_equals_the_composition(weighted):
    """semantic_loss's one-image-at-a-time cross-entropy (gradient formed in the forward pass) against autograd
    through upsample → cross-entropy: the same loss and the same gradient in the small logits, with ignored
    pixels, class weights, an all-ignored image in the batch, and under bf16 autocast."""
    from segformer.modeling import _composed_cross_entropy, _UpsampledCrossEntropy

    torch.manual_seed(0)
    k = 7
    logits = (3 * torch.randn(3, k, 16, 20)).requires_grad_()
    labels = torch.randint(0, k, (3, 61, 83))
    labels[0, :20] = 255
    labels[2] = 255  # one image all ignored: it adds nothing, and its gradient is zero
    weights = torch.rand(k) + 0.5 if weighted else None
    ref = _composed_cross_entropy(logits, labels, weights, 255)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    got = _UpsampledCrossEntropy.apply(logits, labels, weights, 255)
    (grad,) = torch.autograd.grad(got, logits)
    # both fp32: log-sum-exp of k terms and a mean, a few u each side (8u); the gradient: the upsampling (a convex
    # sum of 4), one softmax (a sum of k) and the upsampling's adjoint (≤ (61/16 + 1)·(83/20 + 1) ≈ 25 terms)
    assert abs(got.item() - ref.item()) <= 8 * U32 * abs(ref.item())
    assert rel_err(grad, ref_grad) <= fp32_tol([4, k, 25])
    assert grad[2].abs().max().item() == 0.0
    low = logits.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _UpsampledCrossEntropy.apply(low, labels, weights, 255)
    ref_low = _composed_cross_entropy(low.float(), labels, weights, 255)
    # bf16 logits are upsampled and scored in fp32 (autograd's composition would upsample in bf16 first)
    assert auto.dtype == torch.float32
    assert abs(auto.item() - ref_low.item()) <= 8 * U32 * abs(ref_low.item())
    with pytest.raises(RuntimeError, match="twice|does not require grad"):  # no silent second derivative
        out = _UpsampledCrossEntropy.apply(logits, labels, weights, 255)
        (g,) = torch.autograd.grad(out, logits, create_graph=True)
        torch.autograd.grad(g.sum(), logits)


def test_segmentation_loss_needs_no_full_resolution_batch():
    """The training loss at 256×256 labels, 40 classes, batch 4: peak memory of forward + backward stays near
    one image's full-resolution logits, not the batch's (autograd's composition holds several batch-sized ones)."""
    from segformer.modeling import _composed_cross_entropy, _UpsampledCrossEntropy

    logits = torch.randn(4, 40, 64, 64, requires_grad=True)
    labels = torch.randint(0, 40, (4, 256, 256))
    one_image = 40 * 256 * 256 * 4  # bytes of one image's upsampled fp32 logits

    def peak(fn):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(logits, labels, None, 255).backward()
        # the largest live total: the allocations and frees each op made itself, in the order they ran
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        live = top = 0
        for e in events:
            live += e.self_cpu_memory_usage
            top = max(top, live)
        return top

    ours, composed = peak(_UpsampledCrossEntropy.apply), peak(_composed_cross_entropy)
    assert composed >= 4 * one_image  # the batch's upsampled logits at least
    assert ours <= 2.5 * one_image  # one image's z (reused in place for its gradient) + small tensors


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(3, 64, 64), "must be 4-D"),
        (torch.randn(1, 4, 64, 64), "has 4 channels but the model expects 3"),
        (torch.randn(1, 3, 28, 64), "too small: this model needs at least 29x29"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating point"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny, x, message):
    model = SegformerForSemanticSegmentation(tiny).eval()
    with pytest.raises(ValueError, match=message):
        model(x)


def test_min_input_size_is_exact(tiny):
    model = SegformerModel(tiny).eval()
    assert min_input_size(tiny) == 29
    model(torch.randn(1, 3, 29, 29))


def test_drop_path_schedule_and_init():
    config = SegformerConfig.from_variant("b2", drop_path_rate=0.3)
    model = SegformerModel(config)
    rates = [layer.drop_path.p for stage in model.encoder.block for layer in stage]
    assert len(rates) == 16
    np.testing.assert_allclose(rates, [0.3 * n / 15 for n in range(16)])
    q = model.encoder.block[0][0].attention.self.query
    assert abs(q.weight.std().item() - 0.02) < 0.002 and q.bias.abs().max() == 0
    assert model.encoder.layer_norm[0].weight.eq(1).all()
    task = SegformerForSemanticSegmentation(SegformerConfig.from_variant("b0"))  # initialised once, as a whole
    for weight in (task.segformer.encoder.block[2][1].mlp.dense1.weight, task.decode_head.linear_fuse.weight):
        assert abs(weight.std().item() - 0.02) < 0.002
    assert task.decode_head.classifier.bias.abs().max() == 0


def test_train_mode_drop_path_and_dropout_are_active():
    model = SegformerForSemanticSegmentation(tiny_config(drop_path_rate=0.5, hidden_dropout_prob=0.2)).train()
    x = torch.randn(2, 3, 64, 64)
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)


# ------------------------------------------------------------------------------------------ fast path
@pytest.mark.parametrize("config", [tiny_config(), tiny_config(decoder_hidden_size=24, num_labels=3),
                                    tiny_config(depths=[2, 1, 2, 1], num_labels=1)])  # fmt: skip
@pytest.mark.parametrize("size", [(64, 64), (77, 101), (33, 130)])
def test_fast_path_equals_plain_path(config, size):
    model = randomize_(SegformerForSemanticSegmentation(config), seed=size[0]).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fast = model(x).logits
        model.fast_path = False
        plain = model(x).logits
        model.fast_path = True
    assert rel_err(fast, plain) <= 2 * fp32_tol(reductions(model, x))  # two fp32 passes, each within fp32_tol
    assert model.fast_path


@pytest.mark.parametrize("factors", [(2, 2), (4, 4), (8, 8), (16, 16), (2, 4), (1, 2)])
@pytest.mark.parametrize("size", [(5, 7), (1, 3), (2, 1)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_upsampling_by_phases_equals_the_bilinear_kernel(factors, size, accumulate):
    """The folded head's power-of-two upsampling (blends of shifted copies, added in place) against
    F.interpolate(bilinear, align_corners=False), edges included."""
    from segformer.modeling import _upsample_by_phases

    (sh, sw), (h, w) = factors, size
    gen = torch.Generator().manual_seed(sh * 10 + sw)
    y = torch.randn(2, h, w, 6, generator=gen)
    acc = torch.randn(2, h * sh, w * sw, 6, generator=gen) if accumulate else None
    ref = F.interpolate(y.permute(0, 3, 1, 2), size=(h * sh, w * sw), mode="bilinear", align_corners=False)
    ref = ref.permute(0, 2, 3, 1) + (acc if accumulate else 0)
    scale = y.abs().max() + (acc.abs().max() if accumulate else 0)
    out = _upsample_by_phases(y, sh, sw, None if acc is None else acc.clone())
    # each side: a two-tap blend per axis and the add into acc, <= 4 roundings of values <= scale: 8u for both
    assert (out - ref).abs().max() <= 8 * U32 * scale
    for i0, i1 in ((0, 1), (h - 1, h), (h // 2, h)):  # row bands, each with its halo rows: the same rows
        part = None if acc is None else acc[:, i0 * sh : i1 * sh].clone()
        band = _upsample_by_phases(y, sh, sw, part, rows=(i0, i1))
        assert (band - ref[:, i0 * sh : i1 * sh]).abs().max() <= 8 * U32 * scale  # as above


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (1, 4), (6, 1)])
def test_edge_padding_repeats_the_border_pixels_of_every_row_band(size):
    """The upsampling's padded source (rows i0 - 1 … i1, columns -1 … w, borders repeated) is the gather of
    those clamped rows and columns exactly, for every band of rows (the copies round nothing)."""
    from segformer.modeling import _edge_padded

    h, w = size
    y = torch.randn(2, h, w, 3, generator=torch.Generator().manual_seed(h * 10 + w))
    for i0 in range(h):
        for i1 in range(i0 + 1, h + 1):
            rows = torch.arange(i0 - 1, i1 + 1).clamp(0, h - 1)
            cols = torch.arange(-1, w + 1).clamp(0, w - 1)
            assert torch.equal(_edge_padded(y, i0, i1), y[:, rows][:, :, cols]), (i0, i1)


def ops_run_fn(fn) -> tuple[torch.Tensor, list[str]]:
    """``fn()`` and the names of the operators it dispatched ("aten::gelu", "mkldnn::...")."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func.name())
            return func(*args, **(kwargs or {}))

    with Record():
        out = fn()
    return out, names


def ops_run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``model(x).logits`` and the names of the operators it dispatched."""
    return ops_run_fn(lambda: model(x).logits)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_onednn_kernels_equal_the_modules(act, monkeypatch):
    """fp32 CPU inference runs each Linear through oneDNN's matmul and Mix-FFN's depthwise conv + GELU as one
    oneDNN kernel; the plain path, autograd and hooked modules run the modules: same logits everywhere."""
    monkeypatch.setattr(modeling, "_ONEDNN_MIN_MACS", 0)  # the tiny model's products are all small
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(hidden_act=act)), seed=3).eval()
    x = torch.randn(2, 3, 64, 96)
    tol = 2 * fp32_tol(reductions(model, x))  # two fp32 passes
    blocks = sum(model.config.depths)
    with torch.no_grad():
        fast, ops = ops_run(model, x)
        model.fast_path = False
        plain, plain_ops = ops_run(model, x)
        model.fast_path = True
    assert rel_err(fast, plain) <= tol
    assert not any(name.startswith("mkldnn::_") for name in plain_ops)
    if modeling._CONV_POINTWISE and act != "relu":  # oneDNN builds of PyTorch (x86, and ARM with oneDNN)
        assert ops.count("mkldnn::_convolution_pointwise") == blocks and "aten::gelu" not in ops
    if modeling._LINEAR_POINTWISE:
        assert ops.count("mkldnn::_linear_pointwise") >= 6 * blocks  # q, k, v, out, dense1, dense2
        monkeypatch.setattr(modeling, "_ONEDNN_MIN_MACS", 1 << 40)  # small products stay with BLAS
        with torch.no_grad():
            small, ops = ops_run(model, x)
        assert "mkldnn::_linear_pointwise" not in ops and rel_err(small, plain) <= tol
        monkeypatch.setattr(modeling, "_ONEDNN_MIN_MACS", 0)
    # a hook on one block's modules: that block runs them (and the hook sees them), the others stay fused
    seen = []
    first = model.segformer.encoder.block[0][0].mlp
    handles = [m.register_forward_hook(lambda *_: seen.append(1)) for m in (first.dense1, first.dwconv)]
    with torch.no_grad():
        hooked, ops = ops_run(model, x)
    for handle in handles:
        handle.remove()
    assert len(seen) == 2 and rel_err(hooked, plain) <= tol
    if modeling._CONV_POINTWISE and act != "relu":
        assert ops.count("mkldnn::_convolution_pointwise") == blocks - 1
    # with an autograd graph to record: the modules, and gradients reach every weight
    logits, ops = ops_run(model, x)
    assert not any(name.startswith("mkldnn::_") for name in ops)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert rel_err(logits.detach(), plain) <= tol


def _inline_calls(monkeypatch) -> list[int]:
    """Count the blocks run through SegformerLayer._forward_inference (one entry per call)."""
    calls: list[int] = []
    run = modeling.SegformerLayer._forward_inference

    def counted(self, *args):
        calls.append(1)
        return run(self, *args)

    monkeypatch.setattr(modeling.SegformerLayer, "_forward_inference", counted)
    return calls


def _modules_only(monkeypatch) -> None:
    monkeypatch.setattr(modeling.SegformerEncoder, "_inline_blocks", lambda self, x, attentions: False)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("shape", [(1, 64, 96), (2, 61, 45)])
@pytest.mark.parametrize("banded", [False, True])
def test_inline_blocks_equal_the_modules(act, shape, banded, monkeypatch):
    """fp32 CPU inference runs each block's fast-path kernels straight from SegformerLayer._forward_inference,
    without the module calls: the same operators in the same order on the same operands, so the same bits."""
    if not (modeling._CONV_POINTWISE and torch.backends.mkldnn.enabled):
        pytest.skip("the inline blocks need oneDNN's fused depthwise conv + GELU (x86 builds of PyTorch)")
    monkeypatch.setattr(modeling, "_ONEDNN_MIN_MACS", 1 << 14)  # both GEMM kernels on the tiny model's products
    if banded:  # every one-image Mix-FFN in row bands (SegformerMixFFN._forward_banded)
        monkeypatch.setattr(modeling, "MMAP_THRESHOLD", 1)
        monkeypatch.setattr(modeling, "_BAND_BYTES", 1)
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(hidden_act=act)), seed=11).eval()
    x = torch.randn(*shape[:1], 3, *shape[1:], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(x)  # (the kept weight copies made)
        calls = _inline_calls(monkeypatch)
        inline, ops = ops_run(model, x)
        blocks, n = sum(model.config.depths), len(calls)
        assert n in (blocks, shape[0] * blocks)  # (the batch in one-image chunks where it is banded)
        with monkeypatch.context() as m:
            _modules_only(m)
            modules, module_ops = ops_run(model, x)
        assert len(calls) == n  # (not called again)
    assert torch.equal(inline, modules)
    # the same kernels, in the same order; the inline blocks add the residual in oneDNN's GEMM epilogue
    assert _computing(_epilogue_apart(ops)) == _computing(module_ops)
    assert "mkldnn::_linear_pointwise" in ops and "aten::addmm" in ops
    if not banded:  # (banded, one image's products of the second shape are all below the bound: no epilogue)
        assert ("mkldnn::_linear_pointwise.binary" in ops) == modeling._LINEAR_BINARY


_VIEWS = {"view", "_unsafe_view", "reshape", "transpose", "t", "expand", "as_strided", "unsqueeze", "squeeze"}
_VIEWS |= {"detach", "alias", "slice", "select", "permute", "unflatten", "flatten", "split", "narrow"}


def _epilogue_apart(ops: list[str]) -> list[str]:
    """``ops`` with oneDNN's matmul + residual sum (one operator) as the matmul and the addition it stands for."""
    pairs = (
        ["mkldnn::_linear_pointwise", "aten::add.Tensor"] if op == "mkldnn::_linear_pointwise.binary" else [op]
        for op in ops
    )
    return [op for pair in pairs for op in pair]


def _computing(ops: list[str]) -> list[str]:
    """The operators that compute or copy values: views left out (the two paths take different ones)."""
    return [name for name in ops if name.split("::")[-1].split(".")[0] not in _VIEWS]


def test_inline_blocks_only_where_the_modules_would_not_be_seen(monkeypatch):
    """A block runs its modules (and every hook, replacement and train-mode part sees them run) wherever the
    inline path would skip something they do; forwards with autograd, attention maps or float64 too, and
    stages that compute in bf16 under autocast (one that runs in fp32 there, too small for bf16 to pay, is fp32
    inference). The logits agree with the plain path every time."""
    if not (modeling._CONV_POINTWISE and torch.backends.mkldnn.enabled):
        pytest.skip("the inline blocks need oneDNN's fused depthwise conv + GELU (x86 builds of PyTorch)")
    model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=12).eval()
    blocks = sum(model.config.depths)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.fast_path = False
        plain = model(x).logits
        model.fast_path = True
    tol = 2 * fp32_tol(reductions(model, x))  # two fp32 passes
    calls = _inline_calls(monkeypatch)

    def run(expected_inline: int, **kwargs) -> torch.Tensor:
        calls.clear()
        out = model(x, **kwargs)
        assert len(calls) == expected_inline
        return out.logits

    first = model.segformer.encoder.block[0][0]
    with torch.no_grad():
        assert rel_err(run(blocks), plain) <= tol
        seen = []
        for part in (first, first.attention.self.query, first.mlp.dwconv.dwconv, first.attention.self.sr):
            handle = part.register_forward_pre_hook(lambda *_: seen.append(1))
            assert rel_err(run(blocks - 1), plain) <= tol and seen
            handle.remove()
            seen.clear()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: seen.append(1))
        try:
            assert rel_err(run(0), plain) <= tol and seen
        finally:
            handle.remove()
        first.mlp.dropout.train()  # a part in train mode: that block runs its modules (here p = 0)
        assert rel_err(run(blocks - 1), plain) <= tol
        first.mlp.dropout.eval()
        original = first.mlp.dense1  # a replaced part (a subclass of nn.Linear) is run, not skipped
        replaced = type("MyLinear", (nn.Linear,), {})(original.in_features, original.out_features)
        replaced.load_state_dict(original.state_dict())
        first.mlp.dense1 = replaced
        assert rel_err(run(blocks - 1), plain) <= tol
        first.mlp.dense1 = original
        first.attention.self.fast_path = False
        assert rel_err(run(blocks - 1), plain) <= tol
        first.attention.self.fast_path = True
        assert rel_err(run(0, output_attentions=True), plain) <= tol
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run(blocks)  # (every stage of this model is too small for bf16 to pay: fp32, autocast off)
            monkeypatch.setattr(modeling, "_BF16_MIN_MACS", 0)
            run(0)  # stages computing in bf16 run their modules
    assert rel_err(run(0).detach(), plain) <= tol  # autograd recording
    with torch.no_grad():
        double = copy.deepcopy(model).double()
        calls.clear()
        assert rel_err(double(x.double()).logits.float(), plain) <= tol and not calls


def _reducing_attentions(model: torch.nn.Module) -> list[modeling.SegformerEfficientSelfAttention]:
    return [m for m in model.modules() if isinstance(m, modeling.SegformerEfficientSelfAttention) and m.sr_ratio > 1]


@pytest.mark.parametrize("stage", [0, 1, 2])  # sr ratios 8, 4, 2
@pytest.mark.parametrize("size", [(16, 24), (19, 26)])  # the second leaves rows and columns that fill no window
def test_sequence_reduction_gemm_equals_the_conv(stage, size):
    """CPU inference reduces the sequence with one GEMM over gathered windows (no convolution kernel runs); the
    plain path, autograd and a hooked conv run the module. Each against the float64 convolution."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=5).eval()
    attn = _reducing_attentions(model)[stage]
    conv, r, c = attn.sr, attn.sr_ratio, attn.sr.in_channels
    height, width = size
    x = torch.randn(2, height * width, c, generator=torch.Generator().manual_seed(stage))

    def conv64(t, w, b):
        return modeling.map_to_tokens(F.conv2d(modeling.tokens_to_map(t, height, width), w, b, stride=r))

    def reduce():
        return attn.reduce(x, height, width)

    ref = conv64(x.double(), conv.weight.double(), conv.bias.double())
    # Higham's bound for a dot product of K = r*r*C terms plus the bias: (K + 1) u sum |terms|, in any order
    bound = (r * r * c + 1) * U32 * conv64(x.double().abs(), conv.weight.double().abs(), conv.bias.double().abs())
    with torch.no_grad():
        fast, ops = ops_run_fn(reduce)
    assert fast.shape == ref.shape == (2, (height // r) * (width // r), c)
    assert ((fast.double() - ref).abs() <= bound).all() and not any("convolution" in name for name in ops)
    seen = []
    handle = conv.register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad():
        hooked, ops = ops_run_fn(reduce)
    handle.remove()
    assert seen and any("convolution" in name for name in ops) and ((hooked.double() - ref).abs() <= bound).all()
    graph, ops = ops_run_fn(reduce)  # with an autograd graph to record: the module, and gradients
    assert graph.requires_grad and any("convolution" in name for name in ops)
    attn.fast_path = False
    with torch.no_grad():
        plain, ops = ops_run_fn(reduce)
    assert any("convolution" in name for name in ops) and ((plain.double() - ref).abs() <= bound).all()


def test_channels_last_weight_copies_are_made_per_call():
    """CPU inference runs the patch embeddings and sequence reductions on channels-last copies of their weights
    made for the call: nothing is kept on the modules (a copy, pickle or .double() of the model carries none),
    an in-place update is seen by the next call, the parameters stay NCHW, and float64 runs in float64."""
    import pickle

    model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=7).eval()
    x = torch.randn(2, 3, 64, 64)
    convs = [e.proj for e in model.segformer.encoder.patch_embeddings] + [a.sr for a in _reducing_attentions(model)]
    size = len(pickle.dumps(model.segformer))
    with torch.no_grad():
        first = model(x).logits
        assert len(pickle.dumps(model.segformer)) == size  # (nothing kept by the encoder)
        for conv in convs:
            conv.weight.mul_(-1)
        changed = model(x).logits
        fresh = SegformerForSemanticSegmentation(tiny_config())
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(changed, fresh.eval()(x).logits) and not torch.equal(changed, first)
    assert all(conv.weight.is_contiguous() for conv in convs)  # the parameters themselves stay NCHW
    with torch.no_grad():
        assert model.double()(x.double()).logits.dtype == torch.float64


def test_weights_flatten_and_their_gradients_keep_their_strides(tmp_path):
    """Every parameter has contiguous bytes (flat views work: parameters_to_vector, LBFGS), every gradient comes
    back in its parameter's strides (what DistributedDataParallel's bucket views expect: the depthwise convs'
    weights carry channels-last strides for it), and saved files hold contiguous tensors with the same values."""
    from safetensors.torch import load_file

    model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=6)
    flat = torch.nn.utils.parameters_to_vector(model.parameters())
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    depthwise = [m.dwconv.weight for m in model.modules() if isinstance(m, modeling.SegformerDWConv)]
    assert len(depthwise) == 4 and all(w.is_contiguous(memory_format=torch.channels_last) for w in depthwise)
    x = torch.randn(2, 3, 64, 64)
    model.train()(x, labels=torch.randint(0, 5, (2, 64, 64))).loss.backward()
    assert all(p.grad.stride() == p.stride() for p in model.parameters())
    model.save_pretrained(tmp_path)
    saved, state = load_file(str(tmp_path / "model.safetensors")), model.state_dict()
    assert all(t.is_contiguous() and torch.equal(t, state[k]) for k, t in saved.items())
    loaded = SegformerForSemanticSegmentation.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model.eval()(x).logits)


@pytest.mark.parametrize("band_rows", [1, 3, 7])
def test_banded_mix_ffn_equals_the_whole_map(monkeypatch, band_rows):
    """One image whose Mix-FFN hidden map would be a fresh mapping runs in row bands with halo rows: the same
    logits as the whole map (and as the plain path), for bands that do not divide the height too."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=7).eval()
    x = torch.randn(1, 3, 83, 61)  # stage 1: 21 x 16 tokens
    with torch.no_grad():
        whole = model(x).logits
        model.fast_path = False
        plain = model(x).logits
        model.fast_path = True
    ffn = model.segformer.encoder.block[0][0].mlp
    row = 16 * ffn.dense1.out_features * 4  # one stage-1 row of the hidden map, fp32
    monkeypatch.setattr(modeling, "MMAP_THRESHOLD", 1)  # every hidden map counts as mapped
    monkeypatch.setattr(modeling, "_BAND_BYTES", (band_rows + 2) * row)
    calls, real = [], type(ffn)._forward_banded
    monkeypatch.setattr(type(ffn), "_forward_banded", lambda self, *a: calls.append(a[3]) or real(self, *a))
    with torch.no_grad():
        banded = model(x).logits
    assert band_rows in calls  # stage 1 ran in bands of band_rows rows
    tol = 2 * fp32_tol(reductions(model, x))  # two fp32 passes (in practice bit-equal)
    assert rel_err(banded, whole) <= tol and rel_err(banded, plain) <= tol


# Tests with CPU bf16 autocast use the real variants' narrowest widths (32 channels, head size 32). At tiny_config's
# width 8, torch 2.11's oneDNN AMX kernels returned wrong bf16 autocast results, in Transformers' model and ours
# alike. Seen on an Intel Xeon with AMX; right there with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 and at b0's widths.
BF16_WIDTHS = dict(hidden_sizes=[32, 32, 32, 32], num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=32)


@pytest.mark.parametrize("batch", [1, 2])
def test_banded_head_equals_the_whole_head(monkeypatch, batch, bf16_at_every_size):
    """Where one image's D-channel sum would be a fresh mapping, the folded head runs in row bands (each
    deeper stage upsampled from its band's rows plus halo rows): the same logits as whole, and as plain."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(**BF16_WIDTHS)), seed=9).eval()
    x = torch.randn(batch, 3, 160, 96)  # stage 1: 40 x 24, stages 2-4 a power-of-two factor smaller
    with torch.no_grad():
        whole = model(x).logits
        model.fast_path = False
        plain = model(x).logits
        model.fast_path = True
    head, d = model.decode_head, model.config.decoder_hidden_size
    monkeypatch.setattr(modeling, "MMAP_THRESHOLD", 1)  # every full-resolution map counts as mapped
    monkeypatch.setattr(modeling, "_BAND_BYTES", 16 * 24 * d * 4)  # bands of 16 rows: 16 + 16 + 8
    calls, real = [], type(head)._folded_logits_banded
    monkeypatch.setattr(type(head), "_folded_logits_banded", lambda self, *a: calls.append(a[3]) or real(self, *a))
    with torch.no_grad():
        banded = model(x).logits
    assert calls == [16] * batch
    tol = 2 * fp32_tol(reductions(model, x))  # two fp32 passes (in practice bit-equal to whole)
    assert rel_err(banded, whole) <= tol and rel_err(banded, plain) <= tol
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the whole head, in bf16
        low = model(x).logits
    # where the CPU computes in bf16, the head runs on kept bf16 casts, all in one dtype: banded too; elsewhere
    # autocast's own casts would mix dtypes, and it runs whole
    assert low.dtype == torch.bfloat16 and len(calls) == batch * (2 if modeling._native_cpu_bf16() else 1)
    lengths = reductions(model, x)
    assert rel_err(low.float(), whole) <= bf16_tol(len(lengths)) + fp32_tol(lengths)  # bf16 against fp32


U16 = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)


def bf16_tol(count: int) -> float:
    """A bf16 pass of ``count`` reductions in series: operands rounded to bfloat16, products summed in fp32."""
    return rounded_once_tol(count, U16)


def _bf16_runs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """The logits (as float32) and the operators dispatched, for a float32 ``model`` under CPU bf16 autocast
    (its second call, in an autocast region of its own) and for a bfloat16 copy of it, each on the fast path
    and on the plain path."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    runs = {}
    for fast in (True, False):
        model.fast_path = half.fast_path = fast
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)  # (a first call: the fold is made)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a new region: autocast casts again
            logits, ops = ops_run(model, x)
        runs[f"autocast {'fast' if fast else 'plain'}"] = (logits.float(), ops)
        with torch.no_grad():
            logits, ops = ops_run(half, x.bfloat16())
        runs[f"weights {'fast' if fast else 'plain'}"] = (logits.float(), ops)
    model.fast_path = True
    return runs


def test_bfloat16_fast_paths_equal_the_plain_paths(bf16_at_every_size):
    """Where the CPU computes in bfloat16, bf16 inference (bf16 weights, or fp32 weights under bf16 autocast)
    runs the fast paths in bf16: oneDNN's matmul and fused depthwise conv + GELU, the folded head, and under
    autocast on bf16 casts of the weights. Elsewhere bf16 is
    emulated and both run PyTorch's ops, as the plain path does. Either way the logits are the plain path's,
    within bf16's rounding, and bf16 like autocast's."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(**BF16_WIDTHS)), seed=4).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x).logits
    tol = 2 * bf16_tol(len(reductions(model, x)))  # two bf16 passes, each within bf16_tol of exact
    runs = _bf16_runs(model, x)
    native = modeling._native_cpu_bf16()
    for kind in ("autocast", "weights"):
        (fast, fast_ops), (plain, plain_ops) = runs[f"{kind} fast"], runs[f"{kind} plain"]
        assert rel_err(fast, plain) <= tol and rel_err(fast, ref) <= tol, kind
        assert any("_linear_pointwise" in name for name in fast_ops) == native, kind
        assert any("_convolution_pointwise" in name for name in fast_ops) == native, kind
        assert not any("mkldnn::" in name for name in plain_ops), kind
    plain_casts = [name for name in runs["autocast plain"][1] if name == "aten::_to_copy"]
    weights = sum(1 for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert len(plain_casts) >= weights  # autocast casts every Linear and Conv2d weight in each region
    top2 = ref.topk(2, dim=1).values
    confident = (top2[:, 0] - top2[:, 1]) > 0.1 * ref.abs().amax()
    assert confident.float().mean() > 0.3
    for name, (logits, _) in runs.items():
        assert (logits.argmax(1) == ref.argmax(1))[confident].float().mean() >= 0.99, name


def test_cached_fold_is_made_without_autocast(monkeypatch):
    """The folded head's cached matrices are made with autocast off: where the fold accumulates in float32 (MPS;
    here the CPU made to), a first inference call inside a bf16 autocast region must not leave bf16-rounded
    matrices for the float32 calls after it."""
    monkeypatch.setattr(modeling, "_fold_dtype", lambda device: torch.float32)
    head = randomize_(SegformerForSemanticSegmentation(tiny_config(**BF16_WIDTHS)), seed=7).eval().decode_head
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = head.folded()  # the first fold, inside the region
        head._fold_cache = None
        outside = head.folded()
    assert all(torch.equal(a, b) for a, b in zip(inside[0], outside[0], strict=True))
    assert torch.equal(inside[1], outside[1]) and inside[0][0].dtype == torch.float32


def _bf16_outputs(fn) -> tuple[torch.Tensor, int]:
    """``fn()`` and how many of the operators it dispatched returned a bfloat16 tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = 0

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal count
            out = func(*args, **(kwargs or {}))
            leaves = torch.utils._pytree.tree_leaves(out)
            count += any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in leaves)
            return out

    with Record():
        result = fn()
    return result, count


def test_bf16_autocast_runs_all_in_float32_where_no_encoder_stage_pays(monkeypatch):
    """Where every encoder stage is below modeling._BF16_MIN_MACS the whole forward runs in fp32, the head too
    even where its own product is above the bound: the head alone in bf16 saved less than autocast's costs
    (b0 at 128×128 on an AMX Xeon: 1.01-1.06× fp32's time). The logits are fp32's, bit for bit."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(**BF16_WIDTHS, num_labels=400)), seed=7).eval()
    x = torch.randn(2, 3, 64, 96)
    largest = model.segformer.encoder._largest_stage_macs(x)
    assert largest == max(model.segformer.encoder._stage_macs(0, x), largest)  # (stage 1 is the largest here)
    head = 16 * 24 * model.config.decoder_hidden_size * 400  # the head's largest product, one image
    assert head > largest
    monkeypatch.setattr(modeling, "_BF16_MIN_MACS", largest + 1)  # every stage below, the head above
    with torch.no_grad():
        exact = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, low = _bf16_outputs(lambda: model(x).logits)
    assert low == 0 and torch.equal(logits, exact)
    monkeypatch.setattr(modeling, "_BF16_MIN_MACS", largest)  # stage 1 pays: the head's own rule again
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _bf16_outputs(lambda: model(x).logits)[1] > 0


def test_bf16_autocast_runs_float32_where_bf16_does_not_pay(monkeypatch):
    """Under CPU bf16 autocast, inference runs each part of the model (an encoder stage, the folded head) whose
    largest product is below modeling._BF16_MIN_MACS multiply-adds in float32, where bf16's per-call costs
    outweigh its arithmetic: a model whose parts are all small gives the float32 logits bit for bit and makes
    no bf16 tensor; with stage 1 above the bound, stage 1 alone computes in bf16. Autograd recording, training
    and the plain path keep autocast's bf16 everywhere."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(**BF16_WIDTHS)), seed=6).eval()
    x = torch.randn(2, 3, 64, 96)
    c = model.config
    stage1 = model.segformer.encoder._stage_macs(0, x)  # its Mix-FFN's first linear: B·N·C·4C
    assert stage1 == 2 * (64 // c.strides[0]) * (96 // c.strides[0]) * 32 * 32 * c.mlp_ratios[0]
    assert stage1 < modeling._BF16_MIN_MACS  # the test model's parts are all below the bound

    def autocast_run(grad: bool = False) -> tuple[torch.Tensor, int]:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            return _bf16_outputs(lambda: model(x).logits)

    with torch.no_grad():
        exact = model(x).logits
    inline = _inline_calls(monkeypatch)
    logits, low = autocast_run()
    assert low == 0 and logits.dtype == torch.float32 and torch.equal(logits, exact)
    assert len(inline) == sum(c.depths)  # a stage in fp32 under autocast runs fp32's inline blocks too

    monkeypatch.setattr(modeling, "_BF16_MIN_MACS", stage1)  # stage 1 (the largest part) now pays; the rest not
    mixed, low = autocast_run()
    monkeypatch.setattr(modeling, "_BF16_MIN_MACS", 0)
    everywhere, all_low = autocast_run()
    assert 0 < low < all_low
    tol = 2 * bf16_tol(len(reductions(model, x)))  # bf16 against fp32, each within its tolerance of exact
    assert not torch.equal(mixed, exact) and rel_err(mixed, exact) <= tol and rel_err(everywhere.float(), exact) <= tol

    monkeypatch.setattr(modeling, "_BF16_MIN_MACS", 1 << 60)  # nothing pays, except where the rule stands aside:
    assert autocast_run(grad=True)[1] > 0  # an autograd graph recorded: autocast's casts belong in it
    model.fast_path = False
    assert autocast_run()[1] > 0  # the plain path
    model.fast_path = True
    model.train()
    assert autocast_run()[1] > 0  # training (a reentrant checkpoint recomputes what it ran without gradients)
    model.eval().to(torch.bfloat16)  # bf16 weights: bf16 throughout
    x = x.bfloat16()
    assert autocast_run()[0].dtype == torch.bfloat16


def test_bf16_casts_follow_the_weights(bf16_at_every_size):
    """Under CPU bf16 autocast, inference sees an in-place update of a weight on the next call (also one through
    ``.data``, which moves no version counter), and a model with autograd recording gets autocast's own casts
    (and its gradients), where the CPU computes in bf16 (the fast paths' casts) or not (autocast's)."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(**BF16_WIDTHS)), seed=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(x).logits
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.decode_head.classifier.weight.mul_(-1)  # in place
        model.segformer.encoder.block[0][0].mlp.dense1.weight.data.mul_(-1)  # through .data (no version bump) too
        flipped = model(x).logits
    fresh = copy.deepcopy(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(flipped, fresh(x).logits) and not torch.equal(flipped, first)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.zero_grad()
        model(x).logits.float().square().mean().backward()  # autograd: autocast's casts, gradients reach fp32
    assert model.decode_head.classifier.weight.grad.abs().sum() > 0


def test_cpu_batch_chunks_equal_the_whole_batch(monkeypatch):
    """CPU inference splits a batch into chunks (and the folded head runs image by image): same logits."""
    from segformer import modeling

    model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=5).eval()
    x = torch.randn(5, 3, 64, 96)
    c = model.config
    per_image = (64 // c.strides[0]) * (96 // c.strides[0]) * c.hidden_sizes[0] * c.mlp_ratios[0] * 4
    monkeypatch.setattr(modeling, "MMAP_THRESHOLD", 2 * per_image + 1)  # two images per chunk: 2 + 2 + 1
    with torch.no_grad():
        assert model._cpu_chunk(x) == 2
        chunked = model(x).logits
    whole = model(x).logits.detach()  # gradients enabled: the whole batch in one pass
    assert model._cpu_chunk(x) == 0
    assert chunked.shape == whole.shape == (5, c.num_labels, 16, 24)
    assert rel_err(chunked, whole) <= 2 * fp32_tol(reductions(model, x))  # two fp32 passes
    # each image is its own: a chunk boundary (images 1|2, 3|4) does not leak one image into another
    with torch.no_grad():
        single = model(x[3:4]).logits
    assert rel_err(chunked[3:4], single) <= 2 * fp32_tol(reductions(model, x[3:4]))


def test_chunked_batch_logits_reuse_their_memory_only_once_dropped(monkeypatch):
    """A chunked CPU batch's logits (above the mmap threshold) come from the head's ReusableBuffer: the next
    batch gets the same memory once the caller dropped them, and new memory while the caller still holds them
    (whose values then stay those of their own batch)."""
    from segformer import allocator, modeling

    model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=6).eval()
    monkeypatch.setattr(modeling, "MMAP_THRESHOLD", 1)  # chunks of one image
    monkeypatch.setattr(allocator, "MMAP_THRESHOLD", 1)  # and the batch's logits count as a large block
    monkeypatch.delenv(allocator.ENV, raising=False)
    a, b = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected_a, expected_b = (torch.cat([model(x[i : i + 1]).logits for i in range(3)]) for x in (a, b))
        first = model(a).logits
        address = first.data_ptr()
        held = model(b).logits  # `first` still held: new memory, `first` untouched
        assert held.data_ptr() != address
        assert rel_err(first, expected_a) <= 2 * fp32_tol(reductions(model, a[:1]))  # two fp32 passes
        assert rel_err(held, expected_b) <= 2 * fp32_tol(reductions(model, b[:1]))
        address = held.data_ptr()
        del first, held
        again = model(a).logits  # nothing held any more: the kept block again
    assert again.data_ptr() == address and rel_err(again, expected_a) <= 2 * fp32_tol(reductions(model, a[:1]))


def test_kept_weights_follow_writes_the_version_counters_miss():
    """Writes through ``.data`` (an EMA, a hand-written update, re-initialisation) and through numpy views leave
    the version counters alone; the kept channels-last copies and the folded head still follow them, as the
    plain modules do: after copying another model's weights in, the logits are that model's."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=1).eval()
    other = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=2).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)  # the copies and the fold are made
        for mine, theirs in zip(model.state_dict(keep_vars=True).values(), other.state_dict(keep_vars=True).values()):
            mine.data.copy_(theirs.data)
        assert torch.equal(model(x).logits, other(x).logits)
        conv = model.segformer.encoder.patch_embeddings[1].proj
        conv.weight.detach().numpy()[0, 0, 0, 0] += 1.0  # one value, through numpy
        model.decode_head.batch_norm.running_var.data[3] *= 4
        changed = model(x).logits
        fresh = SegformerForSemanticSegmentation(tiny_config()).eval()
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(changed, fresh(x).logits) and not torch.equal(changed, other(x).logits)


def test_model_made_under_inference_mode_runs():
    """Weights made inside torch.inference_mode() are inference tensors (no version counter): the kept copies
    and the fold work from their values all the same."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=3).eval()
        fast = model(x).logits
        model.fast_path = False
        plain = model(x).logits
    assert rel_err(fast, plain) <= 2 * fp32_tol(reductions(model, x))  # two fp32 passes


def test_folded_head_follows_weight_changes():
    model = randomize_(SegformerForSemanticSegmentation(tiny_config())).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x).logits
        model.decode_head.batch_norm.running_mean.add_(0.5)  # in-place change
        changed = model(x).logits
        model.load_state_dict(randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=3).state_dict())
        reloaded = model(x).logits
        model.fast_path = False
        plain = model(x).logits
    assert not torch.allclose(before, changed)
    assert rel_err(reloaded, plain) <= 2 * fp32_tol(reductions(model, x))  # two fp32 passes


def test_folded_head_follows_batchnorm_statistics_updated_in_training():
    """A train-mode forward updates the BatchNorm running statistics inside the kernel (their version counters
    do not move); the next eval forward must still use the new statistics."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config())).eval()
    x = torch.randn(2, 3, 64, 72)
    with torch.no_grad():
        model(x)  # fills the fold cache
        model.train()
        model(x * 3 + 1)  # moves the running statistics, no optimiser step
        model.eval()
        fast = model(x).logits
        model.fast_path = False
        plain = model(x).logits
    assert rel_err(fast, plain) <= 2 * fp32_tol(reductions(model, x))  # two fp32 passes


def test_training_mode_never_folds():
    head = SegformerDecodeHead(tiny_config())
    calls = []
    real = head._forward_folded
    head._forward_folded = lambda maps: calls.append(1) or real(maps)  # a spy around the real method
    head.train()
    head([torch.randn(2, c, s, s) for c, s in zip([8, 16, 24, 32], [16, 8, 4, 2])])
    assert calls == []
    head.eval()
    head([torch.randn(2, c, s, s) for c, s in zip([8, 16, 24, 32], [16, 8, 4, 2])])
    assert calls == [1]


def test_fast_path_gradients_in_eval_mode_match_plain():
    model = randomize_(SegformerForSemanticSegmentation(tiny_config())).eval()
    x = torch.randn(1, 3, 64, 64)
    grads, keys, shapes = [], {}, {}

    def keep_key_gradient(name: str):  # the gradient of a key Linear's output (B, N', C), kept under its bias' name
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            out.register_hook(lambda grad: keys.__setitem__(f"{name}.bias", grad))

        return hook

    def keep_shape(name: str):  # the attention's number of queries N and its head size, under the key bias' name
        def hook(module: nn.Module, args: tuple, out: tuple) -> None:
            shapes[f"{name}.key.bias"] = args[0].shape[-2], module.head_dim

        return hook

    for fast in (True, False):
        model.fast_path = fast
        model.zero_grad()
        hooks = []
        if not fast:  # (the plain pass runs the modules, so their hooks)
            for name, module in model.named_modules():
                if name.endswith("attention.self.key"):
                    hooks.append(module.register_forward_hook(keep_key_gradient(name)))
                elif name.endswith("attention.self"):
                    hooks.append(module.register_forward_hook(keep_shape(name)))
        model(x).logits.square().sum().backward()
        for hook in hooks:
            hook.remove()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    # Two fp32 passes, forward and backward (the chain rule's reductions after the forward's), norm-wise per tensor.
    tol = 2 * fp32_tol(reductions(model, x, backward=True))
    assert len(keys) == sum(model.config.depths)
    for name in grads[0]:
        diff = (grads[0][name] - grads[1][name]).norm().item()
        allowed = tol * grads[1][name].norm().item()
        if name in keys:
            # A key bias's gradient, the sum over the N' keys of dK (its Linear's output gradient), is exactly 0
            # (softmax ignores a per-query constant) for any q, k, v and output gradient, so earlier errors keep it
            # 0: what is left is the rounding of the attention's own 6 reductions in series (softmax sum, P·V,
            # dP = dO·Vᵀ, dS's row sums, dK = dSᵀ·Q, the sum over keys) in each of two passes, relative to the
            # magnitudes that cancel (per channel the sum of |dK| over the keys, here in norm like the others).
            (n, d), m = shapes[name], keys[name].shape[-2]
            allowed = 2 * fp32_tol([m, m, d, m, n, m]) * keys[name].abs().sum(-2).norm().item()
        assert diff <= allowed, name


@pytest.mark.filterwarnings("ignore:.*quantiz:DeprecationWarning", "ignore:.*quantiz:UserWarning")
def test_head_parts_run_where_the_fast_paths_would_not_see_them():
    """The decode head's fast paths read its parts' weights instead of calling them; wherever that would skip
    what a part does (a forward hook, an adapter subclass, a dynamically quantised Linear, a classifier without a
    bias, BatchNorm without running statistics) the parts run, in eval and in training, as Transformers runs them."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=4).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    head = model.decode_head
    tol = 2 * fp32_tol(reductions(model, x))  # two fp32 passes

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            fast = model(x).logits
            model.fast_path = False
            plain = model(x).logits
            model.fast_path = True
        return fast, plain

    handle = head.classifier.register_forward_hook(lambda module, args, out: out * 0)
    assert (both()[0] == 0).all()
    handle.remove()
    seen = []
    handle = head.linear_fuse.register_forward_pre_hook(lambda *_: seen.append(1))
    fast, plain = both()
    assert seen and rel_err(fast, plain) <= tol
    handle.remove()

    class Adapter(nn.Linear):  # (a LoRA-style replacement: its own forward)
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return super().forward(t) + 1.0

    original = head.linear_c[0].proj
    adapter = Adapter(original.in_features, original.out_features)
    adapter.load_state_dict(original.state_dict())
    with torch.no_grad():
        before = model(x).logits
    head.linear_c[0].proj = adapter
    fast, plain = both()
    assert rel_err(fast, plain) <= tol and not torch.allclose(fast, before)
    model.train()
    model(x, labels=torch.zeros(1, 64, 64, dtype=torch.long)).loss.backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    model.eval().zero_grad()
    head.linear_c[0].proj = original

    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        assert rel_err(quantized(x).logits, before) <= 0.1  # (int8 weights: near, not equal)

    batch = x.expand(3, -1, -1, -1)  # a CPU batch run in chunks goes through the head's guard too
    handle = head.classifier.register_forward_hook(lambda module, args, out: out * 0)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling, "MMAP_THRESHOLD", 1)  # (one image per chunk where the head folds)
        assert model._cpu_chunk(batch) == 0 and (model(batch).logits == 0).all()
        handle.remove()
        assert model._cpu_chunk(batch) == 1
    head.classifier = nn.Conv2d(head.classifier.in_channels, head.classifier.out_channels, 1, bias=False)
    fast, plain = both()
    assert rel_err(fast, plain) <= tol
    head.batch_norm = nn.BatchNorm2d(head.batch_norm.num_features, track_running_stats=False)
    fast, plain = both()
    assert rel_err(fast, plain) <= tol


def test_backward_through_a_frozen_model_in_eval_mode():
    """Gradients for the input of a frozen eval-mode model (saliency maps, adversarial examples), and with only
    the head frozen: the head then records its graph instead of resizing in place."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config()), seed=6).eval().requires_grad_(False)
    grads = []
    for fast in (True, False):
        model.fast_path = fast
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        model(x).logits.square().sum().backward()
        grads.append(x.grad)
    # two fp32 passes, forward and backward
    assert rel_err(grads[0], grads[1]) <= 2 * fp32_tol(reductions(model, x, backward=True))
    model.fast_path = True
    model.segformer.requires_grad_(True)
    model(x).logits.sum().backward()
    assert model.segformer.encoder.patch_embeddings[0].proj.weight.grad is not None


def test_attention_maps_in_training_are_the_dropped_probabilities():
    """With attention dropout in training, the returned maps are the probabilities as used: after dropout (zeros,
    the survivors scaled by 1/(1-p)), as Transformers returns them."""
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(tiny_config(attention_probs_dropout_prob=0.5)).train()
    maps = model(torch.randn(1, 3, 64, 64), output_attentions=True).attentions[0]
    zeros = (maps == 0).float().mean().item()
    assert 0.4 < zeros < 0.6
    model.eval()
    maps = model(torch.randn(1, 3, 64, 64), output_attentions=True).attentions[0]
    r1 = maps.shape[-1]  # each row: r1 probabilities, each within 2u (exp, divide), summed with r1 - 1 more roundings
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]), atol=3 * r1 * U32, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize_(
        SegformerForSemanticSegmentation(tiny_config(drop_path_rate=0.0, classifier_dropout_prob=0.0))
    ).train()
    x, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    model(x, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    calls = []
    # a pre-hook: the recompute may stop early, once every saved tensor is back, and skip forward hooks
    model.segformer.encoder.block[0][0].register_forward_pre_hook(lambda *_: calls.append(1))
    model(x, labels=labels).loss.backward()
    assert len(calls) == 2  # the block ran again in the backward pass: activations were not kept
    # the recompute runs the same kernels on the same shapes in the same order: bitwise the same gradients
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, plain[name]), name


def test_bfloat16_agrees_with_float32_where_fp32_is_confident(bf16_at_every_size):
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(**BF16_WIDTHS))).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).logits.float()
        half_model = model.to(torch.bfloat16)
        cast = half_model(x.bfloat16()).logits.float()
    top2 = ref.topk(2, dim=1).values
    confident = (top2[:, 0] - top2[:, 1]) > 0.1 * ref.abs().amax()
    assert confident.float().mean() > 0.3
    for other in (low, cast):
        agree = (other.argmax(1) == ref.argmax(1))[confident].float().mean()
        assert agree >= 0.99


def keep_relu_off_its_kink_(model: SegformerForSemanticSegmentation) -> SegformerForSemanticSegmentation:
    """Shift the decode head's BatchNorm bias to +-5 so that no pre-ReLU value sits within rounding of 0: one
    such value flips its ReLU mask in one fp32 summation order and not in another, and the train-mode BatchNorm
    backward spreads that flip over every gradient below it (measured 3e-3 with the portable kernels). With the
    kink out of reach, gradient comparisons measure the arithmetic."""
    with torch.no_grad():
        bias = model.decode_head.batch_norm.bias
        bias.copy_(5.0 * torch.where(torch.arange(bias.numel()) % 2 == 0, 1.0, -1.0))
    return model


def test_training_fast_path_equals_plain_path():
    """The factored train-mode head: same loss, gradients and BatchNorm running statistics as the plain head."""
    config = tiny_config(drop_path_rate=0.0, classifier_dropout_prob=0.0)
    x, labels = torch.randn(2, 3, 70, 90), torch.randint(0, 5, (2, 70, 90))
    results = []
    for fast in (True, False):
        model = keep_relu_off_its_kink_(randomize_(SegformerForSemanticSegmentation(config))).train()
        model.fast_path = fast
        logits = model(x).logits
        loss = model(x, labels=labels).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((logits.detach(), loss.item(), grads, model.decode_head.batch_norm.running_mean.clone()))
    (logits_a, loss_a, grads_a, mean_a), (logits_b, loss_b, grads_b, mean_b) = results
    forward, backward = 2 * fp32_tol(reductions(model, x)), 2 * fp32_tol(reductions(model, x, backward=True))
    # forward: two fp32 passes, each within fp32_tol of exact
    assert rel_err(logits_a, logits_b) <= forward
    assert abs(loss_a - loss_b) <= cross_entropy_tol(forward * logits_b.abs().max().item(), loss_b)
    # the running mean is a batch mean of the head's pre-BatchNorm activations: a forward quantity of its own
    assert rel_err(mean_a, mean_b) <= forward
    # backward: the forward's reductions and the chain rule's (each layer's input and weight gradients) in series;
    # compared norm-wise (all parameters, then each tensor whose gradient is not cancelled by a normalisation:
    # biases right before BatchNorm and the key bias before the softmax have a true gradient of 0)
    names = list(grads_b)
    flat_a, flat_b = (torch.cat([g[n].flatten() for n in names]) for g in (grads_a, grads_b))
    assert ((flat_a - flat_b).norm() / flat_b.norm()).item() <= backward
    largest = max(grads_b[n].norm().item() for n in names)
    for name in names:
        if grads_b[name].norm() > 1e-3 * largest:
            diff = (grads_a[name] - grads_b[name]).norm() / grads_b[name].norm()
            assert diff.item() <= backward, name


@pytest.mark.slow
def test_torch_compile_full_graph():
    """The eval fast path (fold included) traces as one graph; aot_eager keeps the test free of a C++ build."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config())).eval()
    x = torch.randn(2, 3, 64, 80)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():  # aot_eager decomposes some ops (another summation order): two fp32 passes
        assert rel_err(compiled(x).logits, model(x).logits) <= 2 * fp32_tol(reductions(model, x))
    model.train()
    loss = compiled(x, labels=torch.randint(0, 5, (2, 64, 80))).loss
    loss.backward()
    assert model.decode_head.linear_fuse.weight.grad is not None


@pytest.mark.parametrize("cls", [SegformerModel, SegformerForSemanticSegmentation, SegformerForImageClassification])
@pytest.mark.parametrize("fast_path", [True, False])
def test_gradients_reach_every_hidden_state(cls, fast_path):
    """Grad-CAM, attribution and feature distillation hold the returned hidden states: they are the tensors
    the rest of the network used, so backward reaches each of them (and they are contiguous NCHW)."""
    model = randomize_(cls(tiny_config())).eval()
    model.fast_path = fast_path
    x = torch.randn(1, 3, 64, 64)
    out = model(x, output_hidden_states=True)
    for h in out.hidden_states:
        h.retain_grad()
        assert h.is_contiguous()
    target = out.last_hidden_state if cls is SegformerModel else out.logits
    (target.square().sum() if cls is SegformerModel else target.sum()).backward()
    for i, h in enumerate(out.hidden_states):
        assert h.grad is not None and h.grad.abs().sum() > 0, i
    # asking for hidden states changes the layout, not the result (two fp32 passes)
    with torch.no_grad():
        again = model(x)
    key = "last_hidden_state" if cls is SegformerModel else "logits"
    assert rel_err(out[key], again[key]) <= 2 * fp32_tol(reductions(model, x))


def test_output_fields_set_by_attribute_are_the_outputs():
    """``out.loss = custom`` (a Trainer's compute_loss override) sets the field: ``out["loss"]``, ``in`` and
    ``to_tuple()`` see it, in the fields' order; None removes a field; a name that is no field is an error."""
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=3)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    custom, logits = torch.tensor(1.5), torch.zeros_like(out.logits)
    out.logits = logits
    out.loss = custom
    assert "loss" in out and out["loss"] is custom and out["logits"] is logits
    assert list(out) == ["loss", "logits"] and out.to_tuple() == (custom, logits)
    out.loss = None
    assert "loss" not in out and out.loss is None
    with pytest.raises(AttributeError, match="no field 'lss'"):
        out.lss = custom


def test_losses_keep_float64_and_follow_a_swapped_classifier():
    """A float64 model's segmentation loss and gradient are float64 (they were computed in float32: 1e-8 off a
    float64 reference); half-precision logits give float32 losses for float labels (BCE, multi-label), as
    Transformers' float labels make them; a classifier swapped for another class count (the tutorial's way to a
    new label set) sets the classes the loss checks labels against."""
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=3)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 32, 32))
    out = model(x, labels=labels)
    up = F.interpolate(out.logits, size=(32, 32), mode="bilinear", align_corners=False)
    reference = F.cross_entropy(up, labels)
    assert out.loss.dtype == torch.float64 and rel_err(out.loss, reference) < 1e-13  # (float64 rounding only)
    with pytest.raises(ValueError, match="labels hold 7, outside 0..2"):  # checked on this route too
        model(x, labels=torch.full((2, 32, 32), 7))
    half = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)
    one = SegformerForSemanticSegmentation(tiny_config(num_labels=1))
    assert semantic_loss(half, torch.randint(0, 2, (2, 32, 32)), one.config).dtype == torch.float32
    classifier = SegformerForImageClassification(tiny_config(num_labels=4, problem_type="multi_label_classification"))
    loss = classification_loss(torch.randn(2, 4, dtype=torch.bfloat16), torch.rand(2, 4), classifier.config)
    assert loss.dtype == torch.float32
    swapped = SegformerForSemanticSegmentation(tiny_config(num_labels=3))
    swapped.decode_head.classifier = nn.Conv2d(swapped.config.decoder_hidden_size, 10, 1)
    loss = swapped(torch.randn(1, 3, 32, 32), labels=torch.full((1, 32, 32), 8)).loss
    assert torch.isfinite(loss)


# A model whose third patch embedding is a 1x1 conv of stride 2 (audit's case: PyTorch 2.13's oneDNN AVX2 1x1
# weight-gradient kernel writes past its buffer on channels-last input: abort, segfault or a corrupted heap).
STRIDED_1X1 = dict(num_channels=1, depths=[2, 2, 2, 2], hidden_sizes=[6, 4, 24, 8], num_attention_heads=[3, 1, 3, 2],
                   mlp_ratios=[2, 2, 4, 2], sr_ratios=[4, 3, 3, 1], patch_sizes=[7, 5, 1, 4], strides=[2, 4, 2, 1],
                   decoder_hidden_size=8, hidden_act="silu")  # fmt: skip


def test_a_strided_1x1_patch_embedding_trains_on_nchw_input_and_weight():
    """The mechanism: in training, a strided 1x1 patch conv gets an NCHW input and a standard-stride weight, also
    in a model moved to channels-last (whose 1x1 weights still count as contiguous), with the same gradients."""
    quiet = dict(
        drop_path_rate=0.0, classifier_dropout_prob=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model = SegformerForSemanticSegmentation(tiny_config(**STRIDED_1X1, **quiet))
    model = keep_relu_off_its_kink_(randomize_(model)).train()
    conv = model.segformer.encoder.patch_embeddings[2].proj
    real, seen = F.conv2d, []

    def spy(x, weight, *args):
        if weight.shape == conv.weight.shape:
            seen.append((x.is_contiguous(), weight.stride() == (weight.shape[1], 1, 1, 1)))
        return real(x, weight, *args)

    x, labels = torch.randn(2, 1, 75, 46), torch.randint(0, 5, (2, 25, 23))
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=layout).zero_grad()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(F, "conv2d", spy)
            model(x, labels=labels).loss.backward()
        assert seen == [(True, True)]
        seen.clear()
        grads.append(conv.weight.grad.clone())
    # two fp32 backward passes (the other convs in two layouts), each within fp32_tol of exact
    assert rel_err(grads[1], grads[0]) <= 2 * fp32_tol(reductions(model, x, backward=True))


@pytest.mark.slow  # (a subprocess: ~10 s)
def test_training_a_strided_1x1_patch_embedding_does_not_corrupt_memory():
    """The audit's case end to end, in a process of its own with one thread (where the old code aborted or
    segfaulted in two runs of three): five training steps, NCHW and channels-last models."""
    script = f"""
import torch, segformer
torch.set_num_threads(1)
torch.manual_seed(0)
config = segformer.SegformerConfig(num_labels=5, **{STRIDED_1X1!r})
for layout in (torch.contiguous_format, torch.channels_last):
    model = segformer.SegformerForSemanticSegmentation(config).train().to(memory_format=layout)
    for _ in range(5):
        x, labels = torch.randn(2, 1, 75, 46), torch.randint(0, 5, (2, 25, 23))
        model(x, labels=labels).loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
print("trained")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "trained", (run.returncode, run.stderr[-2000:])
