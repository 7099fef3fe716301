"""Whole / aligned / sliding-window / multi-scale + flip inference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import U32, randomize_, tiny_config
from torch import nn

from segformer import SegformerForSemanticSegmentation, inference
from segformer.inference import InferenceOptions, aligned_size, infer, labels_from_probs, predict_labels
from segformer.modeling import min_input_size


class PerPixel(nn.Module):
    """Logits that depend on each pixel alone, at full resolution: any window gives the same values, so a
    sliding window must reproduce the whole-image result exactly, whatever the tiling."""

    def __init__(self, k: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x: torch.Tensor):
        return (torch.sin(3 * self.conv(x)) * 4,)  # a tuple, like return_dict=False

    def tolerance(self, x: torch.Tensor) -> float:
        """How far two tilings' probabilities may differ: the 3-term conv may round differently when a kernel
        vectorises another width (4 roundings, 4u of its largest term sum), 4·sin(3·) multiplies that by 12
        and adds its own 2 roundings of |z| <= 4, the window average adds 2u of |z|, and softmax passes at
        most half of a logit change (the rows of its Jacobian have an L1 norm <= 1/2)."""
        with torch.no_grad():
            terms = (self.conv.weight.abs().sum((1, 2, 3)).max() * x.abs().max() + self.conv.bias.abs().max()).item()
        return 0.5 * (12 * 4 * U32 * terms + 4 * 4 * U32 * 4)


@pytest.fixture(scope="module")
def seg() -> SegformerForSemanticSegmentation:
    return randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4))).eval()


@pytest.mark.parametrize(
    "size, crop, stride",
    [((20, 30), (32, 32), (16, 16)),  # smaller than the crop: one window of the image's size (mmseg)
     ((64, 96), (32, 32), (32, 32)),  # larger, divisible
     ((70, 45), (32, 32), (20, 24))],  # larger, not divisible: the last windows are shifted back
)  # fmt: skip
def test_slide_tiles_the_image_exactly(size, crop, stride):
    x = torch.randn(2, 3, *size)
    model = PerPixel()
    whole = infer(model, x, mode="whole")
    slide = infer(model, x, mode="slide", crop_size=crop, stride=stride)
    assert slide.shape == (2, 4, *size)
    torch.testing.assert_close(slide, whole, atol=model.tolerance(x), rtol=0)


def _hand_slide(model, x, crop, stride):
    """An independent sliding window: every window position listed explicitly, logits averaged, then softmax."""
    return _hand_slide_logits(model, x, crop, stride).softmax(1)


def _hand_slide_logits(model, x, crop, stride, dtype=torch.float32):
    """Every window position listed explicitly, each window's logits upsampled to the crop, summed, divided by the
    number of windows per pixel; along a side shorter than the crop the window is that side (mmseg's
    slide_inference: no padding to the crop), padded (bottom/right) only up to the model's minimum input and
    cropped back."""
    h0, w0 = x.shape[-2:]
    need = min_input_size(model.config) if hasattr(model, "config") else 1
    x = F.pad(x, (0, max(need - w0, 0), 0, max(need - h0, 0)))
    _, _, h, w = x.shape
    crop = (min(crop[0], h), min(crop[1], w))
    ys = sorted({min(y, h - crop[0]) for y in range(0, h - crop[0] + stride[0], stride[0])})
    xs = sorted({min(v, w - crop[1]) for v in range(0, w - crop[1] + stride[1], stride[1])})
    total, count = 0, torch.zeros(h, w, dtype=dtype)
    with torch.no_grad():
        for y in ys:
            for v in xs:
                logits = model(x[:, :, y : y + crop[0], v : v + crop[1]]).logits.to(dtype)
                up = F.interpolate(logits, size=crop, mode="bilinear", align_corners=False)
                total = total + F.pad(up, (v, w - v - crop[1], y, h - y - crop[0]))
                count[y : y + crop[0], v : v + crop[1]] += 1
    return (total / count)[..., :h0, :w0]


def test_slide_matches_a_hand_written_window_loop(seg):
    x = torch.randn(1, 3, 75, 101)
    got = infer(seg, x, mode="slide", crop_size=(64, 64), stride=(40, 48))
    # The same windows summed in the same order, the loop in float64 (from the model's float32 logits): infer's
    # channels-last kernels round each upsampled logit (4 products, 3 sums: 7u), the window sum and division
    # (2 windows: 3u), all of max|z|; softmax passes half of a logit change and adds its own 9u (see below).
    ref = _hand_slide_logits(seg, x, (64, 64), (40, 48), torch.float64)
    tol = 10 * U32 * ref.abs().max().item() / 2 + 9 * U32
    torch.testing.assert_close(got.double(), ref.softmax(1), atol=tol, rtol=0)


def test_slide_below_the_crop_runs_the_image_unpadded(seg):
    """As mmseg's slide_inference: along a side shorter than the crop the window is that side, never padded up
    to the crop (padding changed 2-13% of a model's labels): an image smaller than the crop gives exactly its
    whole-image result, and a strip shorter than the crop slides windows of its height."""
    x = torch.randn(1, 3, 40, 50)
    torch.testing.assert_close(infer(seg, x, mode="slide", crop_size=64, stride=48), infer(seg, x, mode="whole"),
                               rtol=0, atol=0)  # fmt: skip
    strip = torch.randn(1, 3, 40, 150)
    got = infer(seg, strip, mode="slide", crop_size=(64, 64), stride=(40, 48))
    ref = _hand_slide_logits(seg, strip, (64, 64), (40, 48), torch.float64)  # 40x64 windows at x = 0, 48, 86
    tol = 10 * U32 * ref.abs().max().item() / 2 + 9 * U32  # (as test_slide_matches_a_hand_written_window_loop)
    torch.testing.assert_close(got.double(), ref.softmax(1), atol=tol, rtol=0)


def test_multiscale_and_flip_average_softmax_over_all_passes(seg):
    x = torch.randn(1, 3, 64, 80)
    got = infer(seg, x, scales=[0.75, 1.0, 1.5], flip=True)
    expected = 0
    with torch.no_grad():
        for s in (0.75, 1.0, 1.5):
            size = (round(64 * s), round(80 * s))
            xs = x if s == 1.0 else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for flip in (False, True):
                inp = xs.flip(-1) if flip else xs
                logits = F.interpolate(seg(inp).logits, size=inp.shape[-2:], mode="bilinear", align_corners=False)
                logits = logits.flip(-1) if flip else logits
                logits = F.interpolate(logits, size=(64, 80), mode="bilinear", align_corners=False)
                expected = expected + logits.softmax(1) / 6
    # the same passes bitwise; only the mean's rounding differs (sum then divide vs divide then sum: 7 roundings
    # of values <= 1)
    torch.testing.assert_close(got, expected, atol=7 * U32, rtol=0)
    # flipping a per-pixel model changes nothing: flip passes are flipped back before averaging (the mean of two
    # equal probabilities rounds by at most 2u)
    pp = PerPixel()
    torch.testing.assert_close(infer(pp, x, flip=True), infer(pp, x), atol=pp.tolerance(x) + 2 * U32, rtol=0)


def test_aligned_resize_sizes_and_output():
    assert aligned_size(480, 640) == (512, 704)  # scale 512/480: 512 x 682.7 → 683 → rounded up to 704
    assert aligned_size(1024, 2048) == (512, 1024)
    assert aligned_size(100, 3000, short_side=512, long_side=2048) == (
        96,
        2048,
    )  # long side limits: 68.3 → 96
    assert aligned_size(29, 120000) == (32, 2048)  # 0.5 rows would round to none: one row, rounded up to 32
    model = PerPixel()
    x = torch.randn(1, 3, 50, 70)
    probs = infer(model, x, mode="aligned", short_side=64, long_side=128)
    assert probs.shape == (1, 4, 50, 70)
    # what aligned mode computes: resize to the aligned size (64 x 96), logits there, back to the input size
    size = aligned_size(50, 70, short_side=64, long_side=128)
    assert size == (64, 96)  # 64/50 = 1.28 limits: 70 x 1.28 = 89.6 → 90 → rounded up to 96
    with torch.no_grad():
        logits = model(F.interpolate(x, size=size, mode="bilinear", align_corners=False))[0].double()
    expected = F.interpolate(logits, size=(50, 70), mode="bilinear", align_corners=False).softmax(1)
    # The same operations in the same order, in float64 from the same float32 logits. float32 bilinear computes each
    # source position (i + 0.5) * s - 0.5 with 3 roundings of values <= the source side n (3nu), moving a logit by
    # 3nu |z1 - z0| <= 6nu max|z| per axis (n = 64, 96), and rounds its weight products, products and sums (10u of
    # max|z|); softmax passes at most half of a logit change and adds 9u of its own (4 classes).
    tol = (6 * (64 + 96) + 10) * U32 * logits.abs().max().item() / 2 + 9 * U32
    torch.testing.assert_close(probs.double(), expected, atol=tol, rtol=0)
    assert not torch.allclose(probs, infer(model, x, mode="whole"), atol=1e-3)  # the resize really happened


def test_probabilities_labels_dtypes_and_sizes(seg):
    x = torch.randn(2, 3, 40, 56)
    probs = infer(seg, x, output_size=(13, 17))
    assert probs.shape == (2, 4, 13, 17) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 13, 17), atol=8 * U32, rtol=0)  # 4 roundings + 4
    labels = predict_labels(seg, x)
    assert labels.shape == (2, 40, 56) and labels.dtype == torch.int64
    assert torch.equal(labels, infer(seg, x).argmax(1))
    # a bf16 model gives float32 probabilities close to the fp32 ones
    half = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4))).eval().to(torch.bfloat16)
    assert infer(half, x).dtype == torch.float32
    # an image below the model's minimum size is padded, not an error; train mode is restored afterwards
    seg.train()
    assert infer(seg, torch.randn(1, 3, 9, 12)).shape == (1, 4, 9, 12)
    assert seg.training
    seg.eval()


def test_one_label_model_uses_sigmoid():
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=1))).eval()
    x = torch.randn(1, 3, 64, 64)
    probs = infer(model, x)
    with torch.no_grad():
        logits = F.interpolate(model(x).logits, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(probs, logits.sigmoid())  # the same operations in the same order
    assert torch.equal(predict_labels(model, x), (probs[:, 0] > 0.5).long())


# ------------------------------------------------------------------------------- image by image = the definition
def _reference_logits(model, x, opts: InferenceOptions, output_size=None, exact=False) -> list[torch.Tensor]:
    """infer's definition written out on the whole batch at once: per pass (each scale, then flipped), the logits
    brought to the pass's input size (slide: the hand-written window loop; whole/aligned: the input padded up to
    the model's minimum size and cropped back), flipped back, resized to the output size. ``exact``: whole/aligned
    passes resize the model's logits in float64."""
    from segformer.modeling import min_input_size

    H, W = x.shape[-2:]
    out, passes = output_size or (H, W), []
    with torch.no_grad():
        for s in opts.scales or (1.0,):
            if opts.mode == "aligned":  # (mmsegmentation's: scaled targets truncated, a factor's sides half up)
                sides = dict(short_side=int(opts.short_side * s), long_side=int(opts.long_side * s))
                size = aligned_size(H, W, **sides, align=opts.align)
            else:
                size = (int(H * s + 0.5), int(W * s + 0.5))
            xs = x if size == (H, W) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for flip in (False, True) if opts.flip else (False,):
                inp = xs.flip(-1) if flip else xs
                if opts.mode == "slide":
                    logits = _hand_slide_logits(model, inp, opts.crop_size, opts.stride)
                else:
                    need = min_input_size(model.config)
                    padded = F.pad(inp, (0, max(need - size[1], 0), 0, max(need - size[0], 0)))
                    logits = model(padded).logits
                    logits = logits.double() if exact else logits
                    logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
                    logits = logits[..., : size[0], : size[1]]
                logits = logits.flip(-1) if flip else logits
                passes.append(F.interpolate(logits, size=out, mode="bilinear", align_corners=False))
    return passes


def _reference_probs(passes: list[torch.Tensor]) -> torch.Tensor:
    """Softmax (sigmoid for one label) of each pass, averaged."""
    probs = [z.sigmoid() if z.shape[1] == 1 else z.softmax(1) for z in passes]
    return sum(probs[1:], probs[0]) / len(probs)


def _assert_argmax(labels: torch.Tensor, values: torch.Tensor, threshold: float, tol: float) -> None:
    """``labels`` are the argmax of ``values`` (B, K, H, W) (K == 1: value > threshold) wherever the top two
    differ by more than ``tol``; such near-ties must stay rare (a tolerance may not hide a wrong result)."""
    if values.shape[1] == 1:
        want, gap = (values[:, 0] > threshold).long(), (values[:, 0] - threshold).abs()
    else:
        top = values.topk(2, dim=1).values
        want, gap = values.argmax(1), top[:, 0] - top[:, 1]
    decided = gap > tol
    assert labels.shape == want.shape and torch.equal(labels[decided], want[decided])
    # near-ties lie on class borders (the region fixtures: 6 of 21,960 pixels, 15 of 14,140 at a downscaled
    # output); a wrong result would differ over whole regions, which no bound of 0.2% could hide
    assert (~decided).sum().item() <= labels.numel() // 500


def _input_size(model, x: torch.Tensor, opts: InferenceOptions) -> tuple[tuple[int, int], tuple[int, int]]:
    """A single pass's model input: (its size, padded up to the model's minimum)."""
    from segformer.modeling import min_input_size

    h, w = x.shape[-2:]
    if opts.mode == "aligned":
        h, w = aligned_size(h, w, short_side=opts.short_side, long_side=opts.long_side, align=opts.align)
    need = min_input_size(model.config)
    return (h, w), (max(h, need), max(w, need))


def _composed(model, x: torch.Tensor, opts: InferenceOptions, output_size) -> bool:
    """Whether predict_labels takes a single pass's labels through the composed resizes (inference._composes)."""
    size, _ = _input_size(model, x, opts)
    out = output_size or tuple(x.shape[-2:])
    return opts.single_pass and opts.mode != "slide" and model.config.num_labels > 1 and size != out


def _exact_single_pass(model, x: torch.Tensor, opts: InferenceOptions, output_size) -> torch.Tensor:
    """A single whole / aligned pass's logits at the output size with both resizes in float64 (the model's own
    float32 logits, on the input _reference_logits gives it)."""
    (h, w), (ph, pw) = _input_size(model, x, opts)
    out = output_size or tuple(x.shape[-2:])
    xs = x if (h, w) == tuple(x.shape[-2:]) else F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    with torch.no_grad():
        z = model(F.pad(xs, (0, pw - w, 0, ph - h))).logits.double()
    z = F.interpolate(z, size=(ph, pw), mode="bilinear", align_corners=False)[..., :h, :w]
    return F.interpolate(z, size=out, mode="bilinear", align_corners=False)


def composed_tol(model, x: torch.Tensor, opts: InferenceOptions, exact: torch.Tensor) -> float:
    """How far the composed resizes' float32 logits may be from their float64 values: each axis's matrix is
    rounded once (u per tap, at most h' or w' taps) and each GEMM sums at most w' and h' terms ((n + 1)u of their
    magnitudes), with convex weights (bilinear rows are non-negative and sum to one): of max|z|."""
    _, (ph, pw) = _input_size(model, x, opts)
    h1, w1 = -(-ph // 4), -(-pw // 4)  # the logits' size (the model's 1/4, rounded up)
    return (2 * (h1 + w1) + 2 + 2) * U32 * exact.abs().max().item()


def mapped_passes_tol(model, x: torch.Tensor, opts: InferenceOptions, zmax: float) -> float:
    """How far two classes' averaged probabilities in predict_labels may be from the float64 resizes' where its
    passes come through the axis maps (_Pass.label_logits: several whole / aligned passes, K > 1; else 0, infer's
    own logits): each pass's logits within the maps' rounding, (2(h' + w') + 4)u of max|z| (composed_tol); a
    probability within twice that (softmax) plus its own 9u; the mean u per pass and u; a gap within twice all."""
    from segformer.modeling import min_input_size

    if opts.single_pass or opts.mode == "slide" or model.config.num_labels == 1:
        return 0.0
    need, worst = min_input_size(model.config), 0
    for h, w in inference._pass_inputs(*x.shape[-2:], opts):
        h1, w1 = -(-max(h, need) // 4), -(-max(w, need) // 4)
        worst = max(worst, 2 * (h1 + w1) + 4)
    passes = len(opts.scales or (1.0,)) * (2 if opts.flip else 1)
    return 2 * (2 * worst * zmax + 9 + passes + 1) * U32


def _assert_pass_labels(labels: torch.Tensor, model, x, opts: InferenceOptions, output_size, probs) -> None:
    """Several passes' labels: infer's (``probs``) exactly where no pass comes through the axis maps, else the
    float64 resizes' probabilities' argmax wherever the top two are further apart than mapped_passes_tol."""
    exact = _reference_logits(model, x, opts, output_size, exact=True)
    tol = mapped_passes_tol(model, x, opts, max(z.abs().max().item() for z in exact))
    if tol == 0:
        assert torch.equal(labels, labels_from_probs(probs))
    else:
        _assert_argmax(labels, _reference_probs(exact), 0.5, tol)


@pytest.mark.parametrize(
    "chain",
    [(176, 704, 683, 640), (128, 512, 512, 480), (12, 48, 45, 45), (5, 32, 26, 17), (1, 4, 4, 7), (7, 28, 28, 3)],
)
@pytest.mark.parametrize("flip", [False, True])
def test_composed_axis_map_is_the_two_resizes(chain, flip):
    """Each axis's composed matrix (n_src → n_mid, first n_crop kept, reversed with ``flip``, → n_out) is the
    product of F.interpolate's own resize matrices (its kernel on unit vectors, float64), within the float32
    rounding of its entries (<= 1, so u), with bands that cover every nonzero tap."""
    n_src, n_mid, n_crop, n_out = chain

    def resize_matrix(n: int, m: int) -> torch.Tensor:
        eye = torch.eye(n, dtype=torch.float64).view(1, n, n, 1)
        return F.interpolate(eye, size=(m, 1), mode="bilinear", align_corners=False)[0, :, :, 0].t()

    want = resize_matrix(n_src, n_mid)[:n_crop]
    want = want.flip(0) if flip else want
    if n_crop != n_out:
        want = resize_matrix(n_crop, n_out) @ want
    got, bands, (first, last) = inference._axis_map(n_src, n_mid, n_crop, n_out, 3, flip)
    assert got.dtype == torch.float32 and (got.double() - want).abs().max() <= U32
    covered = torch.zeros_like(want, dtype=torch.bool)
    for o0, o1, s0, s1 in bands:
        covered[o0:o1, s0:s1] = True
    assert bands[0][0] == 0 and bands[-1][1] == n_out and not (want != 0)[~covered].any()
    taps = [row.nonzero().flatten() for row in want]  # the spans: each row's first and last nonzero tap
    assert first.tolist() == [t[0].item() for t in taps] and last.tolist() == [t[-1].item() for t in taps]


@pytest.mark.parametrize(
    "size, kwargs, output_size",
    [
        ((45, 61), dict(mode="aligned", short_side=48, long_side=96, align=16), None),  # 48x80, back to 45x61
        ((40, 56), dict(mode="whole"), (50, 60)),  # up to the input, then to another output size
        ((20, 26), dict(mode="whole"), (33, 17)),  # padded to the model's minimum, cropped, resized
    ],
)
def test_composed_resizes_give_the_labels(size, kwargs, output_size, monkeypatch):
    """A single pass that takes two resizes to its output gets its labels on the CPU from the two composed into one
    matrix per axis (inference._composed_labels): the argmax of the two resizes' float64 values wherever the top
    two classes are further apart than the composed float32 arithmetic can move them; a pass with one resize (or
    on another device, or flipped) keeps the resize and the argmax."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=19)), seed=8).eval()  # 19: vector lanes
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    opts = InferenceOptions(**kwargs)
    calls = []
    real = inference._composed_labels
    monkeypatch.setattr(inference, "_composed_labels", lambda *a: calls.append(a[1]) or real(*a))
    labels = predict_labels(model, x, opts, output_size=output_size)
    assert calls == [0, 1] and _composed(model, x, opts, output_size)
    exact = _exact_single_pass(model, x, opts, output_size)
    _assert_argmax(labels, exact, 0.0, 2 * composed_tol(model, x, opts, exact))
    if kwargs["mode"] == "whole":  # at the input size: one resize (PyTorch's kernel) and the argmax
        calls.clear()
        predict_labels(model, x, opts)
        assert calls == []


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The operators run inside (their names, without the overload) and the largest tensor any of them made."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.names.append(func.__name__.split(".")[0])
        outputs = torch.utils._pytree.tree_flatten(result)[0]
        self.largest = max([self.largest, *(t.numel() for t in outputs if isinstance(t, torch.Tensor))])
        return result

    def count(self, name: str) -> int:
        return self.names.count(name)


@pytest.mark.parametrize(
    "k, src, out",
    [
        (19, (13, 17), (40, 30)),
        (19, (32, 43), (128, 171)),
        (150, (16, 16), (67, 50)),
        (5, (24, 24), (9, 11)),
        (19, (64, 64), (256, 320)),  # several bands
    ],
)
def test_resized_labels_are_the_float64_resize_argmax(k, src, out, monkeypatch):
    """inference.resized_labels (K, h, w) → (H, W), through one matrix per axis: the argmax of the float64 resize
    wherever the top two classes are further apart than its float32 arithmetic moves them (per axis: two taps,
    each rounded once (u), two products and a sum (2u), of weights summing to one: 3u of max|z|; two axes 6u, so
    a gap of 12u, and 13u with the u² terms). Where F.interpolate's argmax differs, the top two were within that
    plus F.interpolate's own distance from the float64 values. It holds the column pass (K·h·W) and bands of at
    most 2 MiB of values, never the (K, H, W) resized logits where they are larger."""
    from segformer.allocator import MMAP_THRESHOLD
    from segformer.inference import resized_labels

    logits = torch.randn(k, *src, generator=torch.Generator().manual_seed(k + out[0]))
    calls = []
    real = inference._labels_by_axis_maps
    monkeypatch.setattr(inference, "_labels_by_axis_maps", lambda *a: calls.append(a[2]) or real(*a))

    with _OpLog() as log:
        labels = resized_labels(logits, out)
    assert len(calls) == 1 and labels.shape == out and labels.dtype == torch.int64
    assert log.largest <= max(k * src[0] * out[1], MMAP_THRESHOLD // 16 // 4, out[0] * out[1])
    exact = F.interpolate(logits[None].double(), size=out, mode="bilinear", align_corners=False)
    scale = logits.abs().max().item()
    _assert_argmax(labels[None], exact, 0.0, 13 * U32 * scale)
    theirs = F.interpolate(logits[None], size=out, mode="bilinear", align_corners=False)
    their_error = (theirs.double() - exact).abs().max().item()
    top = exact[0].topk(2, dim=0).values
    differ = labels != theirs[0].argmax(0)
    assert ((top[0] - top[1])[differ] <= 2 * their_error + 13 * U32 * scale).all()


def test_resized_labels_by_chunks_of_source_rows_are_the_same(monkeypatch):
    """The column pass made a few source rows at a time (inference._labels_by_axis_maps' chunks, sized from
    MMAP_THRESHOLD: here shrunk so that a chunk holds 2-3 source rows) gives the labels of the column pass made at
    once, bit for bit (each value comes from its own source row alone), for a single resize and composed ones."""
    from segformer.inference import resized_labels

    logits = torch.randn(19, 24, 20, generator=torch.Generator().manual_seed(2))
    size = (101, 77)
    whole = resized_labels(logits, size)
    scratch = inference._Scratch(torch.device("cpu"))
    composed = torch.empty(90, 70, dtype=torch.long)
    inference._labels_by_axis_maps(logits, (96, 90, 90), (84, 75, 70), scratch, composed)  # padded, cropped, resized
    monkeypatch.setattr(inference, "MMAP_THRESHOLD", 2 * 3 * size[1] * 19 * 4)
    largest = []
    real_take = inference._Scratch.take
    monkeypatch.setattr(inference._Scratch, "take", lambda self, shape, *a, **k: largest.append(shape[2]) or
                        real_take(self, shape, *a, **k))  # fmt: skip
    assert torch.equal(resized_labels(logits, size), whole)
    assert largest[0] <= 3 < logits.shape[1]  # the first take is the chunk's columns: a few source rows
    chunked = torch.empty(90, 70, dtype=torch.long)
    inference._labels_by_axis_maps(logits, (96, 90, 90), (84, 75, 70), inference._Scratch(torch.device("cpu")), chunked)
    assert torch.equal(chunked, composed)


def _regions(k: int, h: int, w: int, seed: int) -> torch.Tensor:
    """(K, h, w) logits with a trained model's structure: regions (nearest of 12 random centres, each a class)
    whose class leads by 4 over noise of 0.5, so that neighbouring pixels mostly share their first class."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 2, generator=gen) * torch.tensor([h, w])
    classes = torch.randint(0, k, (12,), generator=gen)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    nearest = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2).argmin(0)
    logits = torch.randn(k, h, w, generator=gen) * 0.5
    return logits.scatter_add_(0, classes[nearest][None], torch.full((1, h, w), 4.0))


@pytest.mark.parametrize("rows, cols", [((60, 60, 60), (90, 90, 90)), ((96, 90, 70), (84, 75, 101))])
def test_agreed_labels_are_the_class_every_tap_ranks_first(rows, cols, monkeypatch):
    """inference._agreed_labels, by brute force on its definition: an output pixel gets class c where every source
    pixel with a nonzero tap in its row and column of the axis matrices ranks c first, else -1. Those are the
    float64 resize's labels (non-negative weights summing to one keep a common first maximum), and
    resized_labels / _labels_by_axis_maps give the same labels with and without them."""
    logits = _regions(40, 24, 20, seed=rows[0])
    maps = inference._axis_maps(logits, rows, cols, flip=False)
    ay, ax = maps.rows, maps.cols
    agreed = inference._agreed_labels(maps, inference._classes_last(logits))
    assert agreed is not None and agreed.shape == (rows[2], cols[2]) and (agreed >= 0).float().mean() > 0.5
    top = logits.argmax(0)
    for r in range(rows[2]):
        for x in range(cols[2]):
            seen = top[ay[r] != 0][:, ax[x] != 0].unique()
            assert agreed[r, x] == (seen.item() if seen.numel() == 1 else -1)
    exact = (ay.double() @ logits.double() @ ax.double().t()).argmax(0)  # (the float32 maps, in float64)
    known = agreed >= 0
    assert torch.equal(agreed[known], exact[known])
    labels = torch.empty(rows[2], cols[2], dtype=torch.long)
    inference._labels_by_axis_maps(logits, rows, cols, inference._Scratch(torch.device("cpu")), labels)
    monkeypatch.setattr(inference, "_agreed_labels", lambda *a: None)
    plain = torch.empty_like(labels)
    inference._labels_by_axis_maps(logits, rows, cols, inference._Scratch(torch.device("cpu")), plain)
    assert torch.equal(labels, plain)  # (the regions leave no near-ties for rounding to decide)


def test_agreed_chunks_and_bands_skip_their_products(monkeypatch):
    """Where every label of a chunk of source rows is agreed, its column products are skipped, and a band's row
    product where all of its labels are: fewer matrix products, the same labels."""
    from segformer.inference import resized_labels

    logits = torch.randn(40, 24, 20, generator=torch.Generator().manual_seed(3)) * 0.5
    logits[5, :10] += 4.0  # two regions, one above the other: whole rows agree away from their border
    logits[7, 10:] += 4.0
    size = (96, 80)
    monkeypatch.setattr(inference, "MMAP_THRESHOLD", 2 * 3 * size[1] * 40 * 4)  # chunks of 3 source rows
    with _OpLog() as agreed:
        labels = resized_labels(logits, size)
    monkeypatch.setattr(inference, "_agreed_labels", lambda *a: None)
    with _OpLog() as plain:
        assert torch.equal(resized_labels(logits, size), labels)
    # the border between the regions (source rows 9 and 10) reaches one or two chunks and a few output rows;
    # bmm: the column products (batched over a chunk's rows, 2 column bands of 64 and 16), mm: the row products
    assert plain.count("bmm") >= 8 * 2 and 0 < agreed.count("bmm") <= 2 * 2
    assert plain.count("mm") == size[0] and 0 < agreed.count("mm") <= 12


def test_agreed_labels_only_where_they_pay():
    """No agreed labels for fewer than 32 classes (their argmax is cheap) or for a map whose neighbouring pixels
    mostly rank different classes first (random logits: nothing to skip)."""

    def agreed(logits: torch.Tensor) -> torch.Tensor | None:
        maps = inference._axis_maps(logits, (60, 60, 60), (50, 50, 50), flip=False)
        return inference._agreed_labels(maps, inference._classes_last(logits))

    assert agreed(_regions(31, 24, 20, seed=1)) is None
    assert agreed(_regions(32, 24, 20, seed=1)) is not None
    assert agreed(torch.randn(150, 24, 20, generator=torch.Generator().manual_seed(1))) is None


def test_resized_labels_fall_back_to_the_resize_and_argmax(monkeypatch):
    """Where the axis matrices do not apply — float64, one label, a non-finite logit, the same size — the labels
    are F.interpolate's argmax bit for bit, ties (the first maximum) and NaN (the maximum) included."""
    from segformer.inference import resized_labels

    monkeypatch.setattr(inference, "_labels_by_axis_maps", lambda *a: pytest.fail("axis maps used"))
    gen = torch.Generator().manual_seed(5)
    finite = torch.randint(0, 4, (7, 9, 11), generator=gen).float()  # many ties among 4 values
    with_inf, with_nan = finite.clone(), finite.clone()
    with_inf[2, 3, 4], with_nan[5, 2, 3] = float("inf"), float("nan")
    for logits, size in (
        (finite.double(), (18, 22)),
        (finite[:1], (18, 22)),
        (with_inf, (18, 22)),
        (with_nan, (18, 23)),
        (finite, (9, 11)),
    ):
        want = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
        assert torch.equal(resized_labels(logits, size), want)
    with pytest.raises(ValueError, match="size"):
        resized_labels(finite, (0, 4))
    with pytest.raises(ValueError, match=r"\(K, h, w\)"):
        resized_labels(finite[None], (4, 4))


class _AutocastNeutralLogits(nn.Module):
    """(B, K, H/4, W/4) logits from operators that autocast leaves alone (pooling, products, sums): the same
    float32 values inside a bf16 autocast region and outside."""

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_labels, 3, generator=torch.Generator().manual_seed(5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 4, ceil_mode=True)  # (B, 3, h', w')
        return (pooled[:, None] * self.weight[None, :, :, None, None]).sum(2)


def test_post_processing_stays_float32_under_autocast(monkeypatch):
    """Under a CPU bf16 autocast region (segformer eval --amp bf16 runs the whole loop in one), the labels of
    the composed resizes are those of float32 arithmetic: the resizes are not matrix products autocast may
    compute in bf16."""
    model = _AutocastNeutralLogits(19).eval()
    x = torch.randn(2, 3, 45, 61, generator=torch.Generator().manual_seed(4))
    opts = InferenceOptions(mode="aligned", short_side=48, long_side=96, align=16)
    calls = []
    real = inference._composed_labels
    monkeypatch.setattr(inference, "_composed_labels", lambda *a: calls.append(a[1]) or real(*a))
    with torch.no_grad():
        plain = predict_labels(model, x, opts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = predict_labels(model, x, opts)
    assert calls == [0, 1, 0, 1]
    assert torch.equal(low, plain)


def _check_against_reference(model, x, opts: InferenceOptions, output_size, monkeypatch) -> None:
    """infer, predict_labels and predict_labels' row bands against the definition computed on the whole batch."""
    passes = _reference_logits(model, x, opts, output_size)
    ref = _reference_probs(passes)
    # Per image, the same operations in the same order: the logits are bit for bit the reference's, and only softmax
    # and sigmoid may round differently where a kernel splits its work another way (vector lanes vs scalar tail,
    # threads). Each probability: exp 2u apart (vectorised vs libm), the sum of K = 5 such terms 2u + (K - 1)u, the
    # division u: 9u of a probability <= 1 (sigmoid: 4u); the mean's sum adds u per pass and its division u.
    tol = (10 + len(passes)) * U32
    probs = infer(model, x, opts, output_size=output_size)
    assert probs.shape == ref.shape and probs.dtype == torch.float32
    torch.testing.assert_close(probs, ref, atol=tol, rtol=0)
    labels = predict_labels(model, x, opts, output_size=output_size)
    if len(passes) > 1 and mapped_passes_tol(model, x, opts, 1.0) > 0:  # passes through the axis maps
        _assert_pass_labels(labels, model, x, opts, output_size, probs)
    elif len(passes) > 1:  # averaged probabilities within tol of the reference's: a flip needs a gap <= 2 tol
        _assert_argmax(labels, ref, 0.5, 2 * tol)
    elif _composed(model, x, opts, output_size):  # the two resizes as one map, against their float64 values
        exact = _exact_single_pass(model, x, opts, output_size)
        _assert_argmax(labels, exact, 0.0, 2 * composed_tol(model, x, opts, exact))
    else:  # the argmax of the logits (bit for bit the reference's); softmax's rounding may tie two classes
        _assert_argmax(labels, passes[0], 0.0, 0.0)
        _assert_argmax(labels, ref, 0.5, tol)
    if opts.mode == "aligned" and opts.single_pass:
        # band_above=0: the composed resizes come first (they hold no full-size logits either) ...
        calls = []
        banded_argmax = inference._upsampled_argmax
        monkeypatch.setattr(inference, "_upsampled_argmax", lambda *a: calls.append(a) or banded_argmax(*a))
        first = predict_labels(model, x, opts, output_size=output_size, band_above=0)
        if _composed(model, x, opts, output_size):
            assert torch.equal(first, labels) and calls == []
        calls.clear()
        # ... and where they do not apply (another device or dtype, non-finite logits; here switched off), the last
        # upsampling is done in row bands straight into the argmax. It blends the widened source rows t0, t1 with
        # row weights computed exactly, where F.interpolate computes the source row in float32 (scale x (i + 0.5)
        # - 0.5, three roundings of values <= h, the source height: 3hu), so a logit moves by 3hu |t1 - t0| <=
        # 6hu max|z|, plus each blend's own roundings (4u and 5u of max|z|).
        monkeypatch.setattr(inference, "_maps_apply", lambda logits: False)
        h, w = aligned_size(*x.shape[-2:], short_side=opts.short_side, long_side=opts.long_side, align=opts.align)
        band_tol = (6 * h + 9) * U32 * passes[0].abs().max().item()
        banded = predict_labels(model, x, opts, output_size=output_size, band_above=0)
        out = output_size or tuple(x.shape[-2:])
        assert len(calls) == (x.shape[0] if h * w < out[0] * out[1] else 0)  # only where the last step upsamples
        _assert_argmax(banded, passes[0], 0.0, 2 * band_tol)


SIZES_AND_OPTIONS = [
    pytest.param((45, 61), dict(mode="whole"), id="whole"),
    pytest.param((20, 26), dict(mode="whole", flip=True), id="whole-below-minimum"),  # padded, cropped back
    pytest.param((45, 61), dict(mode="whole", scales=[0.75, 1.25], flip=True), id="whole-scales-flip"),
    pytest.param((45, 61), dict(mode="aligned", short_side=48, long_side=96, align=16), id="aligned"),  # → 48x80
    pytest.param((90, 120), dict(mode="aligned", short_side=48, long_side=96, align=16), id="aligned-upsampled"),
    pytest.param(
        (45, 61),
        dict(mode="aligned", short_side=48, long_side=96, align=16, scales=[0.75, 1.0, 1.25], flip=True),
        id="aligned-scales-flip",
    ),
    pytest.param((45, 61), dict(mode="slide", crop_size=(32, 40), stride=(20, 24)), id="slide"),
    pytest.param((20, 26), dict(mode="slide", crop_size=(32, 40), stride=(20, 24)), id="slide-below-crop"),
    pytest.param(  # flipped windows mirrored into the padded area, the crop taken from the right
        (20, 26), dict(mode="slide", crop_size=(32, 40), stride=(20, 24), flip=True), id="slide-below-crop-flip"
    ),
    pytest.param(
        (45, 61),
        dict(mode="slide", crop_size=(32, 40), stride=(20, 24), scales=[0.75, 1.0], flip=True),
        id="slide-scales-flip",
    ),
]


@pytest.fixture(scope="module")
def seg_k1() -> SegformerForSemanticSegmentation:
    return randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=1)), seed=1).eval()


@pytest.mark.parametrize("one_label", [False, True], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("output_size", [None, (37, 50)], ids=["input-size", "output-size"])
@pytest.mark.parametrize("size, kwargs", SIZES_AND_OPTIONS)
def test_image_by_image_equals_the_batched_definition(seg, seg_k1, size, kwargs, output_size, one_label, monkeypatch):
    """infer and predict_labels take each image to full resolution alone (no (B, K, H, W) tensor for labels): the
    same numbers as the definition computed on the whole batch."""
    model = seg_k1 if one_label else seg
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(2))
    _check_against_reference(model, x, InferenceOptions(**kwargs), output_size, monkeypatch)


@pytest.mark.parametrize("one_label", [False, True], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("output_size", [None, (37, 50)], ids=["input-size", "output-size"])
@pytest.mark.parametrize("size, kwargs", SIZES_AND_OPTIONS)
def test_confidence_comes_with_the_labels_predict_labels_gives(seg, seg_k1, size, kwargs, output_size, one_label):
    """predict_confidence: a single pass's labels are predict_labels' bit for bit (the server's page and
    `segformer predict` write the same label map), several passes' are infer's argmax; each pixel's confidence is
    the probability of its label, infer's where it takes infer's logits."""
    model = seg_k1 if one_label else seg
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(2))
    opts = InferenceOptions(**kwargs)
    labels, confidence = inference.predict_confidence(model, x, opts, output_size=output_size)
    out = output_size or tuple(x.shape[-2:])
    assert labels.shape == confidence.shape == (3, *out) and confidence.dtype == torch.float32
    if not opts.single_pass:  # infer image by image: its own numbers
        for i in range(3):
            probs = infer(model, x[i : i + 1], opts, output_size=output_size)
            assert torch.equal(labels[i : i + 1], labels_from_probs(probs))
            top = probs[:, 0].where(labels[i] == 1, 1 - probs[:, 0]) if one_label else probs.amax(1)
            assert torch.equal(confidence[i : i + 1], top)
        return
    assert torch.equal(labels, predict_labels(model, x, opts, output_size=output_size))
    if _composed(model, x, opts, output_size):
        # the composed resizes' logits are within composed_tol of the float64 resizes'; a softmax's largest value
        # moves by at most half the largest logit change (its Jacobian's rows have an L1 norm <= 1/2), plus its
        # own rounding (8u)
        exact = _exact_single_pass(model, x, opts, output_size)
        want = exact.softmax(1).amax(1)
        assert (confidence.double() - want).abs().max() <= 0.5 * composed_tol(model, x, opts, exact) + 8 * U32
    else:  # infer's own logits: two softmax kernels' rounding (a few u each, 8u)
        probs = infer(model, x, opts, output_size=output_size)
        top = probs[:, 0].where(labels == 1, 1 - probs[:, 0]) if one_label else probs.amax(1)
        assert (confidence - top).abs().max() <= 8 * U32


def test_channels_last_logits_equal_the_batched_definition(seg, monkeypatch):
    """A model (or backend) whose logits come channels-last: resized by F.interpolate's kernel for that layout."""

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = seg, seg.config

        def forward(self, x):
            return SimpleNamespace(logits=self.inner(x).logits.contiguous(memory_format=torch.channels_last))

    x = torch.randn(3, 3, 45, 61, generator=torch.Generator().manual_seed(3))
    for kwargs in (dict(mode="whole", scales=[0.75, 1.0], flip=True), dict(mode="slide", crop_size=32, stride=24)):
        _check_against_reference(ChannelsLast().eval(), x, InferenceOptions(**kwargs), (37, 50), monkeypatch)


def test_flipped_pass_mirrors_its_windows_at_the_model_resolution(monkeypatch):
    """A flipped pass whose windows upsample by a power of two flips the small logits and mirrors the windows (and
    their count), else it flips the full-resolution map: the same numbers up to the bilinear kernel's rounding (the
    weights mirror exactly; 3 sums and the border's self-blend of each upsampled logit, the window sum and division:
    8u of max|z|)."""
    g = torch.Generator().manual_seed(6)
    assert inference._mirrors(torch.zeros(1, 1, 2, 10), 40) and inference._mirrors(torch.zeros(1, 1, 2, 10), 10)
    assert not inference._mirrors(torch.zeros(1, 1, 2, 8), 29) and not inference._mirrors(torch.zeros(1, 1, 2, 10), 30)
    count = torch.zeros(1, 1, 32, 56)
    boxes = [(0, 32, 0, 40), (0, 32, 16, 56)]
    for _, _, x1, x2 in boxes:
        count[..., x1:x2] += 1
    for k in (5, 1):
        one_window = [(0, 32, 0, 40, 4 * torch.randn(2, k, 8, 10, generator=g))]
        whole = inference._Pass(one_window, (32, 40), (30, 37), True, None)
        windows = [(*box, 4 * torch.randn(2, k, 8, 10, generator=g)) for box in boxes]
        slide = inference._Pass(windows, (32, 56), (32, 50), True, count)
        for one in (whole, slide):
            got = [one.logits(i, (27, 45), inference._Scratch(torch.device("cpu"))).clone() for i in range(2)]
            with monkeypatch.context() as m:
                m.setattr(inference, "_mirrors", lambda *a: False)
                want = [one.logits(i, (27, 45), inference._Scratch(torch.device("cpu"))).clone() for i in range(2)]
            for a, b in zip(got, want):
                zmax = max(w[4].abs().max().item() for w in one.windows)
                torch.testing.assert_close(a, b, atol=8 * U32 * zmax, rtol=0)
                assert a.abs().max() > 1


def test_work_areas_are_mapped_once_per_call(seg, monkeypatch):
    """Two work areas sized before the first pass (the largest pass, the output; for labels on the CPU, whose
    passes come through the axis maps, the output twice) and one accumulator: three allocations per call whatever
    the scales, the batch and the strategy, so each is page-faulted once."""
    sizes = []
    real = inference._empty
    monkeypatch.setattr(inference, "_empty", lambda shape, device: sizes.append(tuple(shape)) or real(shape, device))
    x = torch.randn(2, 3, 45, 61, generator=torch.Generator().manual_seed(7))
    opts = InferenceOptions(mode="aligned", short_side=48, long_side=96, align=16, scales=[0.75, 1.0, 1.25], flip=True)
    out = (45, 61)
    largest = max(h * w for h, w in inference._pass_inputs(45, 61, opts))  # 1.25: 64 x 112
    with torch.no_grad():
        for run in (inference._labels_keeping_passes, inference._labels_by_running_sum):
            sizes.clear()
            run(seg, x, opts, out)
            assert sizes[:2] == [(4 * 45 * 61,), (4 * 45 * 61,)] and len(sizes) == 3, sizes
            # the accumulator: one image's sum (kept with the work areas, 1-D) or the batch's, channels-last
            assert sizes[2] == ((4 * 45 * 61,) if run is inference._labels_keeping_passes else (2, 45, 61, 4))
        sizes.clear()
        infer(seg, x, opts)
        assert sizes[:2] == [(4 * largest,), (4 * 45 * 61,)] and len(sizes) == 3, sizes
        assert sizes[2] == (2, 4, 45, 61)  # infer's result: contiguous


@pytest.mark.parametrize(
    "opts",
    [
        InferenceOptions(mode="aligned", short_side=48, long_side=96, align=16),
        InferenceOptions(mode="slide", crop_size=32, stride=21, flip=True),
        InferenceOptions(mode="aligned", short_side=48, long_side=96, align=16, scales=[0.75, 1.25], flip=True),
    ],
    ids=["aligned", "slide-flip", "scales-flip"],
)
def test_reused_work_areas_map_once_per_loop_and_change_nothing(seg, monkeypatch, opts):
    """Inside reuse_work_areas() the calls of a loop share their work areas: after the first call no work area is
    allocated again; labels and probabilities are those of separate calls, and no result lives in an area (an
    earlier call's result is unchanged by the next); leaving the outermost block releases them."""
    sizes = []
    real = inference._empty
    monkeypatch.setattr(inference, "_empty", lambda shape, device: sizes.append(tuple(shape)) or real(shape, device))
    gen = torch.Generator().manual_seed(11)
    images = [torch.randn(1, 3, 45, 61, generator=gen) for _ in range(3)]
    with torch.no_grad():
        alone = [predict_labels(seg, x, opts) for x in images] + [infer(seg, images[0], opts)]
        calls, kept = [], []
        with inference.reuse_work_areas():
            for x in images:
                sizes.clear()
                calls.append(predict_labels(seg, x, opts))
                kept.append(calls[-1].clone())  # as it was right after its own call
                areas_allocated = [n for n in sizes if len(n) == 1]  # (the work areas are 1-D)
                assert areas_allocated == [] or len(calls) == 1, (len(calls), sizes)
            with inference.reuse_work_areas():  # nested: the same areas
                calls.append(infer(seg, images[0], opts))
            assert inference._shared.areas  # still inside the outer block
        assert inference._shared.areas is None
    for got, want in zip(calls, alone, strict=True):
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(calls[:3], kept, strict=True))


# A fresh process measures its peak resident memory (VmHWM) around each call. MALLOC_MMAP_THRESHOLD_ makes glibc
# map every block of 64 KiB or more on its own and unmap it when freed, so that resident memory follows the live
# tensors instead of what the heap keeps for reuse.
_PEAK_PROBE = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
sys.path.insert(0, sys.argv[1])
from conftest import tiny_config
from segformer import SegformerForSemanticSegmentation
from segformer.inference import infer, predict_confidence, predict_labels
from segformer.predict import SegformerPredictor

def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))

torch.set_num_threads(1)
torch.manual_seed(0)
model = SegformerForSemanticSegmentation(tiny_config(num_labels=int(sys.argv[2]))).eval()
x = torch.randn(8, 3, 64, 80)
photos = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (100, 125, 3), np.uint8)) for i in range(8)]
predictor = SegformerPredictor(model, device="cpu", batch_size=8, mode="aligned", short_side=128, long_side=512)
tta = dict(scales=[0.75, 1.0, 1.25], flip=True)
cases = {
    "whole": lambda: predict_labels(model, x, mode="whole"),
    "whole+tta": lambda: predict_labels(model, x, mode="whole", **tta),
    "slide": lambda: predict_labels(model, x, mode="slide", crop_size=48, stride=32),
    "slide+tta": lambda: predict_labels(model, x, mode="slide", crop_size=48, stride=32, **tta),
    "predictor": lambda: predictor.predict(photos),  # aligned: 100x125 → 128x160 → 100x125
    "infer": lambda: infer(model, x, mode="whole"),
    "confidence": lambda: predict_confidence(model, x, mode="whole"),
    "predictor+confidence": lambda: predictor.predict(photos, return_confidence=True),
}
with torch.no_grad():  # the first forward of a shape fills oneDNN's primitive cache, for good: not measured
    for size in ((48, 60), (64, 80), (80, 100), (48, 48), (128, 160)):  # scales, windows, predictor
        model(torch.randn(8, 3, *size))
peaks = {}
for name, run in cases.items():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = kib("VmRSS")
    result = run()
    peaks[name] = (kib("VmHWM") - base) * 1024
    del result
print(json.dumps(peaks))
"""


def test_labels_at_batch_8_never_hold_a_full_resolution_batch():
    """Labels only, batch 8, 150 classes: the peak memory a call adds stays below one (B, K, H, W) float32 tensor at
    the output size for a single pass (the code before image-by-image processing held 2 to 2.7 of them; 5 to 6.6
    with scales and flips). infer returns one such tensor and holds little besides."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    k, tests = 150, Path(__file__).parent
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(tests), str(k)], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout  # fmt: skip
    peaks = {name: peak / (8 * k * 64 * 80 * 4) for name, peak in json.loads(out.splitlines()[-1]).items()}
    # In units of one (8, 150, 64, 80) float32 tensor (25 MB); the tiny model's own activations are a few hundredths.
    # One pass: its logits at 1/4 resolution (1/16; x1.8 for the overlapping 48-pixel windows) and one image's
    # at full size (1/8; slide: plus a window's, 0.06): 0.19, windows 0.29.
    assert peaks["whole"] < 0.5 and peaks["slide"] < 0.5, peaks
    # Scales 0.75, 1, 1.25, flipped: every pass's logits at 1/4 resolution (2 (0.75² + 1 + 1.25²) / 16 = 0.39,
    # windows 0.68), one image's 1.25-scale logits and their flipped copy (2 x 1.25² / 8 = 0.39; its probabilities
    # reuse that memory) and their running sum (1/8): 0.91, windows 1.2. (The old code: 5.2 and 6.6.)
    assert peaks["whole+tta"] < 1.5 and peaks["slide+tta"] < 1.5, peaks
    # infer: the result (1), one image's logits (1/8) and the pass's logits at 1/4 resolution (1/16): 1.19.
    assert 1 <= peaks["infer"] < 1.5, peaks
    # The predictor, aligned: 100x125 → 128x160 (1.64 times the pixels) → 100x125. In units of its output (8, 150,
    # 100, 125): logits at 1/4 of the working size (1.64/16), one image's at the working size (1.64/8) and at the
    # output size (1/8): 0.43. (The old code: 2.7.)
    assert peaks["predictor"] * (64 * 80) / (100 * 125) < 1, peaks
    # Labels and each pixel's confidence (what the server's ?probs=true answers): the labels' memory plus one
    # image's softmax (1/8) and the (B, H, W) confidence (1/150): whole 0.32; the predictor's through the composed
    # resizes in bands, as its labels. (Through infer's probabilities, as before: infer's 1.19, the predictor's 1.6.)
    assert peaks["confidence"] < 0.5 and peaks["predictor+confidence"] * (64 * 80) / (100 * 125) < 1, peaks


# ------------------------------------------------------------------- several passes: kept passes or a running sum
def _kept_passes(model, x, opts, output_size=None):
    """predict_labels' two strategies for several passes, each forced, as predict_labels runs them."""
    out = output_size or tuple(x.shape[-2:])
    with torch.no_grad():
        keep = inference._labels_keeping_passes(model, x, opts, out)
        summed = inference._labels_by_running_sum(model, x, opts, out)
    return keep, summed


@pytest.mark.parametrize("one_label", [False, True], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="whole", flip=True),
        dict(mode="whole", scales=[0.75, 1.25], flip=True),
        dict(mode="whole", scales=[0.5, 1.0]),
        dict(mode="aligned", short_side=48, long_side=96, align=16, flip=True),
        dict(mode="aligned", short_side=48, long_side=96, align=16, scales=[0.75, 1.0, 1.25], flip=True),
        dict(mode="slide", crop_size=(32, 40), stride=(20, 24), flip=True),
        dict(mode="slide", crop_size=(32, 40), stride=(20, 24), scales=[0.75, 1.0, 1.5]),
        dict(mode="slide", crop_size=(32, 40), stride=(20, 24), scales=[0.5, 1.0, 1.25], flip=True),
    ],
    ids=lambda kw: "-".join(str(v) for k, v in kw.items() if k in ("mode", "scales", "flip")),
)
def test_kept_passes_and_running_sum_both_equal_infers_argmax(seg, seg_k1, kwargs, one_label):
    """Both strategies add the same per-image probabilities in the same pass order and divide once: bit for bit
    each other's. Where no pass comes through the axis maps (one label, slide windows) those are infer's
    probabilities, so exactly its labels (argmax; one label: > 0.5); else the float64 resizes' labels wherever the
    top two classes are further apart than the maps' rounding can move them (_assert_pass_labels)."""
    model = seg_k1 if one_label else seg
    x = torch.randn(3, 3, 45, 61, generator=torch.Generator().manual_seed(4))
    opts = InferenceOptions(**kwargs)
    for output_size in (None, (37, 50)):
        probs = infer(model, x, opts, output_size=output_size)
        want = labels_from_probs(probs)
        keep, summed = _kept_passes(model, x, opts, output_size)
        labels = predict_labels(model, x, opts, output_size=output_size)
        assert torch.equal(keep, summed) and torch.equal(labels, keep)
        _assert_pass_labels(labels, model, x, opts, output_size, probs)
    assert 0 < want.float().mean() < (1 if one_label else 3)  # not one class everywhere: a real comparison


@pytest.mark.parametrize(
    "size, kwargs",
    [
        ((45, 61), dict(mode="whole", scales=[0.5, 0.75, 1.3], flip=True)),  # odd sides: 23 → ceil(23/4) = 6
        ((20, 26), dict(mode="whole", flip=True)),  # below the minimum side: padded to 29
        ((45, 61), dict(mode="aligned", short_side=48, long_side=96, align=16, scales=[0.6, 1.0])),
        ((45, 61), dict(mode="slide", crop_size=(33, 41), stride=(20, 24), scales=[0.5, 1.0, 1.7], flip=True)),
    ],
)
def test_pass_bytes_estimate_is_what_the_passes_hold(seg, size, kwargs):
    """The estimate from the config (no forward) equals the bytes every real pass holds: its windows' float32
    logits at the first stage's size (ceil(h/4) per side: a 7x7 conv at stride 4, padding 3) and the slide count."""
    x = torch.randn(2, 3, *size)
    opts = InferenceOptions(**kwargs)
    k, held = inference._pass_bytes(seg, x.shape, opts)
    with torch.no_grad():
        passes = list(inference._passes(seg, x, opts))
    real = [
        sum(w[4].nbytes for w in one.windows) + (one.count.nbytes if one.count is not None else 0) for one in passes
    ]
    assert k == 4 and held == real
    for one in passes:
        for y1, y2, x1, x2, logits in one.windows:
            assert logits.shape == (2, 4, -(-(y2 - y1) // 4), -(-(x2 - x1) // 4)) and logits.dtype == torch.float32


def test_memory_plan_by_hand():
    """b0's geometry (patch embedding 7x7 at stride 4), 150 classes, batch 8, 512x512 images: the running sum where
    sliding windows at six scales outgrow the output, kept passes for whole-image scales."""
    model = SegformerForSemanticSegmentation(tiny_config(num_labels=150))  # b0's patch sizes and strides
    shape, image = (8, 3, 512, 512), 150 * 512 * 512 * 4  # one image's (K, H, W) float32 probabilities

    def window(side: int) -> int:  # a side x side window's logits (side / 4 per side), float32
        return 8 * 150 * (side // 4) ** 2 * 4  # 512: 128x128 (78.6 MB)

    # Scales 0.5-1.75: inputs 256, 384 (one window of their own size: no padding to the crop), 512 (1 window), 640,
    # 768 (2x2), 896 (3x3 windows: (896 - 512 + 340) // 341 + 1 = 3 per side); each pass twice (flip), plus its
    # window count (H·W float32).
    opts = InferenceOptions(
        mode="slide", crop_size=512, stride=341, scales=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75], flip=True
    )
    passes = [(1, 256, 256), (1, 384, 384), (1, 512, 512), (4, 512, 640), (4, 512, 768), (9, 512, 896)]
    held = [n * window(crop) + 4 * side * side for n, crop, side in passes]
    plan = inference._memory_plan(model, shape, opts, (512, 512))
    assert plan == (2 * sum(held) + image, 8 * image + max(held))  # 3.13 GB kept, 1.97 GB summed
    assert not inference._keeps_passes(plan)
    # Whole images at scales 0.75, 1, 1.25, flipped: logits 96², 128², 160²: 0.65 GB kept against 1.38 GB summed.
    opts = InferenceOptions(mode="whole", scales=[0.75, 1.0, 1.25], flip=True)
    held = [8 * 150 * side * side * 4 for side in (96, 128, 160)]
    plan = inference._memory_plan(model, shape, opts, (512, 512))
    assert plan == (2 * sum(held) + image, 8 * image + max(held))
    assert inference._keeps_passes(plan)
    # A smaller output makes the running sum's accumulator the smaller one: 8 x 150 x 64² x 4 = 20 MB.
    assert not inference._keeps_passes(inference._memory_plan(model, shape, opts, (64, 64)))
    # Ties keep; no config (nothing to estimate from): the running sum.
    assert inference._keeps_passes((5, 5)) and not inference._keeps_passes((6, 5))
    assert inference._memory_plan(PerPixel(), shape, opts, (512, 512)) is None and not inference._keeps_passes(None)


class RegionNet(nn.Module):
    """Logits shaped like a trained model's, at its resolution (a 4x4 average of the input, ceil): where the
    input's first channel holds (c + 0.5)/K, class c leads by 4 over a smooth term within ±0.5 — regions of one
    class with borders, alike at every scale and flip. A tiny SegFormer config (K labels, b0's stride-4 patch
    embedding) for the pass plans."""

    def __init__(self, k: int = 40):
        super().__init__()
        torch.manual_seed(0)
        self.config = tiny_config(num_labels=k)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x: torch.Tensor):
        k = self.config.num_labels
        pooled = F.avg_pool2d(x, 4, ceil_mode=True)
        lead = F.one_hot((pooled[:, 0] * k).floor().clamp(0, k - 1).long(), k).permute(0, 3, 1, 2) * 4.0
        return SimpleNamespace(logits=(lead + 0.5 * torch.sin(3 * self.conv(pooled))).contiguous())


def _region_images(b: int, h: int, w: int, k: int, seed: int) -> torch.Tensor:
    """(b, 3, h, w) inputs for RegionNet: 8 regions per image (nearest of random centres), each a random class."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=gen) * 0.1
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    for n in range(b):
        centres = torch.rand(8, 2, generator=gen) * torch.tensor([h, w])
        classes = torch.randint(0, k, (8,), generator=gen)
        nearest = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2).argmin(0)
        x[n, 0] = (classes[nearest].float() + 0.5) / k
    return x


_AGREEING = [
    dict(mode="whole", scales=[0.75, 1.0, 1.25], flip=True),
    dict(mode="aligned", short_side=96, long_side=200, align=16, scales=[0.75, 1.0, 1.5], flip=True),
]


@pytest.mark.parametrize("kwargs", _AGREEING, ids=lambda kw: kw["mode"])
def test_passes_agreed_labels_are_every_pass_agreeing(kwargs):
    """inference._agreed_pass_labels on its definition: a pixel's class where every pass's agreed label
    (_agreed_labels through that pass's own axis maps, flipped back for flipped passes) is that class, else -1;
    most pixels of region-shaped logits."""
    net, x = RegionNet(), _region_images(2, 90, 122, 40, seed=1)
    opts = InferenceOptions(**kwargs)
    with torch.no_grad():
        passes = list(inference._passes(net, x, opts))
    for out in ((90, 122), (70, 101)):
        for i in range(2):
            known, maps = inference._agreed_pass_labels(passes, i, out)
            each = []
            for one in passes:
                logits = one.windows[0][4][i]
                pass_maps = inference._axis_maps(logits, *one.axis_chains(out), one.flipped)
                each.append(inference._agreed_labels(pass_maps, inference._classes_last(logits)))
            each = torch.stack(each)
            want = torch.where((each == each[0]).all(0), each[0], -1)
            assert torch.equal(known, want) and len(maps) == len(passes)
            assert (known >= 0).float().mean() > 0.5


@pytest.mark.parametrize("kwargs", _AGREEING, ids=lambda kw: kw["mode"])
def test_kept_passes_take_the_probabilities_only_where_passes_disagree(kwargs, monkeypatch):
    """Kept passes of region-shaped logits (40 classes): the agreed pixels take their class, the others the mean
    of the passes' probabilities made for them alone — per pixel the same arithmetic as every pixel's sum, so the
    labels equal the full sum's bit for bit (the regions leave no near-ties for rounding to decide), and the
    float64 resizes' wherever the top two are apart. Row bands without such a pixel are not made: with three
    horizontal stripes of classes, most bands."""
    opts = InferenceOptions(**kwargs)
    monkeypatch.setattr(inference, "MMAP_THRESHOLD", 16 * 122 * 40 * 4 * 4)  # row bands of 4-5 rows, not 1 band
    differ = []
    real = inference._labels_where_passes_differ
    monkeypatch.setattr(inference, "_labels_where_passes_differ", lambda *a: differ.append(a[3]) or real(*a))
    net, regions = RegionNet(), _region_images(2, 90, 122, 40, seed=2)
    stripes = regions.clone()
    stripes[:, 0] = ((torch.arange(90) * 3 // 90 * 7 + 2).float() + 0.5)[:, None] / 40  # classes 2, 9, 16
    for x, out in ((regions, None), (regions, (70, 101)), (stripes, None)):
        size = out or tuple(x.shape[-2:])
        differ.clear()
        with _OpLog() as agreed_ops, torch.no_grad():
            labels = inference._labels_keeping_passes(net, x, opts, size)
        assert differ == [0, 1]  # every image took the agreed labels
        with monkeypatch.context() as m:
            m.setattr(inference, "_agreed_pass_labels", lambda *a: None)
            with _OpLog() as full_ops, torch.no_grad():
                assert torch.equal(inference._labels_keeping_passes(net, x, opts, size), labels)
        if x is regions:  # (the stripes' straight borders tie two classes along whole rows: no float64 check)
            _assert_pass_labels(labels, net, x, opts, out, infer(net, x, opts, output_size=out))
        assert agreed_ops.count("mm") <= full_ops.count("mm")
    assert agreed_ops.count("mm") < full_ops.count("mm") / 2  # (the stripes)


def test_kept_passes_with_agreed_labels_are_worth_more_memory():
    """The rule: keep every pass where that holds no more than the running sum, or no more than twice as much
    where the labels may come from agreed labels (the CPU, whole or aligned passes, >= 2 classes in the config),
    which only kept passes allow."""
    assert inference._keeps_passes((5, 5)) and not inference._keeps_passes((6, 5))
    assert inference._keeps_passes((10, 5), agreeable=True) and not inference._keeps_passes((11, 5), agreeable=True)
    assert not inference._keeps_passes(None, agreeable=True)
    whole, cpu, out = InferenceOptions(mode="whole", flip=True), torch.device("cpu"), (128, 128)
    assert inference._may_agree(RegionNet(4), whole, cpu, out) and not inference._may_agree(
        RegionNet(1), whole, cpu, out
    )
    assert not inference._may_agree(RegionNet(4), whole, cpu, (127, 128))  # 4·127·128 < 2^16: the plain sum pays
    assert not inference._may_agree(RegionNet(), InferenceOptions(mode="slide", flip=True), cpu, out)
    assert not inference._may_agree(RegionNet(), whole, torch.device("cuda"), out)  # (a device object: no GPU needed)
    assert not inference._may_agree(PerPixel(), whole, cpu, out)  # no config


def test_predict_labels_keeps_passes_for_agreed_labels(monkeypatch):
    """One 96x128 image, scales 0.75-1.25 with flips: keeping the passes holds 1.39 images' probabilities against
    the running sum's 1.10 — more, but less than twice: predict_labels keeps them for the agreed labels where they
    may pay (40 classes; 6: 73,728 values per pass), else takes the running sum (5 classes: 61,440 values, under
    2^16; one label), and gives the running sum's labels either way."""
    ran = []
    for name in ("_labels_keeping_passes", "_labels_by_running_sum"):
        real = getattr(inference, name)
        monkeypatch.setattr(inference, name, lambda *a, _real=real, _name=name: ran.append(_name) or _real(*a))
    x = _region_images(1, 96, 128, 40, seed=3)
    opts = InferenceOptions(mode="whole", scales=[0.75, 1.0, 1.25], flip=True)
    keep, total = "_labels_keeping_passes", "_labels_by_running_sum"
    for k, want in ((40, keep), (6, keep), (5, total), (1, total)):
        net = RegionNet(k)
        kept, summed = inference._memory_plan(net, x.shape, opts, (96, 128))
        assert summed < kept <= 2 * summed
        ran.clear()
        labels = predict_labels(net, x, opts)
        assert ran == [want]
        with torch.no_grad():
            assert torch.equal(labels, inference._labels_by_running_sum(net, x, opts, (96, 128)))


def test_predict_labels_runs_the_strategy_that_holds_less(seg, monkeypatch):
    ran = []
    for name in ("_labels_keeping_passes", "_labels_by_running_sum"):
        real = getattr(inference, name)
        monkeypatch.setattr(inference, name, lambda *a, _real=real, _name=name: ran.append(_name) or _real(*a))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    keep, total = "_labels_keeping_passes", "_labels_by_running_sum"
    cases = [
        # logits 1/16 of the pixels per pass: 2 x (12² + 16²) x 4 classes x 2 images, far below 2 images' output
        (seg, InferenceOptions(mode="whole", scales=[0.75, 1.0], flip=True), keep),
        # 32x32 windows at stride 8, scales 1 and 1.5: 5x5 and 9x9 windows of 8x8 logits, 2 x (25 + 81) x 64 = 13568
        # logits per image and class against 64² = 4096 output pixels: the running sum
        (seg, InferenceOptions(mode="slide", crop_size=32, stride=8, scales=[1.0, 1.5], flip=True), total),
        (PerPixel(), InferenceOptions(mode="whole", flip=True), total),  # no config
    ]
    for model, opts, want in cases:
        ran.clear()
        labels = predict_labels(model, x, opts)
        assert ran == [want], (opts, ran)
        if isinstance(model, SegformerForSemanticSegmentation):
            _assert_pass_labels(labels, model, x, opts, None, infer(model, x, opts))
        else:  # (no config: infer's own passes)
            assert torch.equal(labels, labels_from_probs(infer(model, x, opts)))
        plan = inference._memory_plan(model, x.shape, opts, (64, 64))
        assert plan is None or (plan[0] <= plan[1]) == (want == keep), plan
    ran.clear()
    predict_labels(seg, x, mode="slide", crop_size=32, stride=8)  # one pass: the argmax of its logits
    assert ran == []


# The sliding window of Cityscapes / ADE20K at 1/8 of the size (512 → 64, stride 341 → 43), scales 0.5-1.75, flip,
# batch 8, 100 classes: 40 windows of 16x16 logits. Both strategies in a fresh process (see _PEAK_PROBE).
_SUM_PROBE = r"""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from conftest import tiny_config
from segformer import SegformerForSemanticSegmentation
from segformer import inference

def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))

torch.set_num_threads(1)
torch.manual_seed(0)
model = SegformerForSemanticSegmentation(tiny_config(num_labels=100)).eval()
x = torch.randn(8, 3, 64, 64)
opts = inference.InferenceOptions(mode="slide", crop_size=64, stride=43, scales=[0.5, 0.75, 1, 1.25, 1.5, 1.75],
                                  flip=True)
cases = {"predict": lambda: inference.predict_labels(model, x, opts),
         "keep": lambda: inference._labels_keeping_passes(model, x, opts, (64, 64))}
result = {"plan": inference._memory_plan(model, x.shape, opts, (64, 64))}
with torch.no_grad():
    model(torch.randn(8, 3, 64, 64))  # oneDNN's primitive cache, for good: not measured
    inference.predict_labels(model, x[:1], opts)  # the code pages of every kernel, loaded once: not measured
    for name, run in cases.items():
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = kib("VmRSS")
        labels = run()
        result[name] = (kib("VmHWM") - base) * 1024
        del labels
print(json.dumps(result))
"""


def test_running_sum_peak_is_the_accumulator_and_one_pass():
    """Sliding windows with scales and flips: predict_labels' peak is infer's running sum (the accumulator plus one
    pass) and one image's work, well below what keeping every pass's windows takes (measured too)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _SUM_PROBE, str(Path(__file__).parent)], capture_output=True,
                         text=True, env=env, timeout=120, check=True).stdout  # fmt: skip
    peaks = json.loads(out.splitlines()[-1])
    kept, summed = peaks.pop("plan")
    accumulator, window = 8 * 100 * 64 * 64 * 4, 8 * 100 * 16 * 16 * 4  # 13.1 MB; a window's logits 0.8 MB
    assert summed == accumulator + 9 * window + 4 * 112 * 112  # + scale 1.75's 3x3 windows (112x112) and count
    # every pass twice (flip): scales 0.5 and 0.75 one window of their own 32x32 and 48x48 inputs (logits 8x8 and
    # 12x12: no padding to the crop), 1.0 one 64x64 window, 1.25 and 1.5 2x2, 1.75 3x3 (logits 16x16); the counts
    assert (
        kept
        == 2 * 8 * 100 * 4 * (8**2 + 12**2 + 18 * 16**2)
        + 4 * 2 * (32**2 + 48**2 + 64**2 + 80**2 + 96**2 + 112**2)
        + 100 * 64 * 64 * 4
    )  # 32.7 MB
    # One image's work at the largest pass (112x112), the same for both strategies: _Scratch's two areas and the
    # bilinear kernel's copy of its input (3 x 100 x 112² x 4 = 15 MB), its output and the probabilities at 64x64
    # (2 x 1.6 MB); plus 2 MiB for the model's activations and the scaled inputs.
    work = 3 * 100 * 112 * 112 * 4 + 2 * 100 * 64 * 64 * 4 + (2 << 20)
    assert peaks["predict"] < summed + work, (peaks, summed + work)  # ~30 < 41 MB
    # keeping every pass holds kept - summed (12.2 MB) more; at least half of it shows in the measured peaks
    assert peaks["predict"] + (kept - summed) / 2 < peaks["keep"], (peaks, kept - summed)  # ~30 + 6 < ~40 MB


def test_bad_arguments():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="mode must be"):
        infer(PerPixel(), x, mode="tiles")
    with pytest.raises(ValueError, match="larger than crop_size"):
        infer(PerPixel(), x, mode="slide", crop_size=(16, 16), stride=(32, 32))
    with pytest.raises(ValueError, match="batch, 3, height, width"):
        infer(PerPixel(), x[0])


# ---------------------------------------------------------------------------------------------- InferenceOptions
def test_options_validate_with_the_messages_of_infer():
    for kwargs, message in (
        (dict(mode="tiles"), "mode must be one of whole, aligned, slide, got 'tiles'"),
        (dict(crop_size=(16, 16), stride=(32, 8)), r"stride \(32, 8\) is larger than crop_size \(16, 16\)"),
        (dict(scales=[1.0, 0.0]), "scales must be positive"),
        (dict(crop_size=(0, 4)), "crop_size must be two positive integers"),
        (dict(short_side=0), "short_side must be a positive integer"),
        (dict(align=2.5), "align must be a positive integer"),
        (dict(crop_size=32.7), "crop_size must be two positive integers"),
        (dict(stride=(16, "8")), "stride must be two positive integers"),
        (dict(scales=[1.0, float("nan")]), "scales must be positive finite numbers"),
        (dict(scales=[float("inf")]), "scales must be positive finite numbers"),
        # read as something else, or refused in another library's words, before (audit)
        (dict(scales="12"), "scales must be a list of positive numbers, got '12'"),
        (dict(scales=[True]), r"scales must be a list of positive numbers, got \[True\]"),
        (dict(flip="no"), "flip must be True or False, got 'no'"),
        (dict(short_side=float("nan")), "short_side must be a positive integer, got nan"),
        (dict(long_side=None), "long_side must be a positive integer, got None"),
    ):
        with pytest.raises(ValueError, match=message):
            InferenceOptions(**kwargs)
        with pytest.raises(ValueError, match=message):
            infer(PerPixel(), torch.randn(1, 3, 32, 32), **kwargs)


def test_one_scale_may_be_a_number_and_scales_an_array():
    import numpy as np

    for one in (1.5, np.float64(1.5), torch.tensor(1.5)):
        assert InferenceOptions(scales=one).scales == (1.5,)
    assert InferenceOptions(scales=np.array([0.5, 1.0])).scales == (0.5, 1.0)
    assert InferenceOptions(scales=torch.tensor([0.5, 1.0]), flip=np.bool_(True)).scales == (0.5, 1.0)


def test_a_batch_the_passes_cannot_take_is_refused_naming_pixel_values(seg):
    """(audit) One NaN pixel made every probability of its image NaN and its labels class 0; integers ran
    unnormalised; an empty batch failed in a resize; a channels-last batch's error named the padded width."""
    x = torch.randn(2, 3, 40, 50)
    nan, inf = x.clone(), x.clone()
    nan[1, 0, 3, 4], inf[0, 2, 0, 0] = float("nan"), float("inf")
    for func in (infer, predict_labels, inference.predict_confidence):
        for bad, message in (
            (nan, r"pixel_values holds NaN or infinite values \(image 1 of the batch, shape \(2, 3, 40, 50\)\)"),
            (inf, r"NaN or infinite values \(image 0 of the batch"),
            ((x * 255).to(torch.uint8), "pixel_values must be floating point, got torch.uint8"),
            (x[:, :, :0], r"pixel_values is empty \(shape \(2, 3, 0, 50\)\)"),
            (x[:0], r"pixel_values is empty \(shape \(0, 3, 40, 50\)\)"),
            (x[:1].permute(0, 2, 3, 1), r"has 40 channels but the model expects 3 \(shape \(1, 40, 50, 3\);"),
        ):
            for mode in ("whole", "aligned"):
                with pytest.raises(ValueError, match=message):
                    func(seg, bad, mode=mode)


def test_sizes_may_be_numpy_scalars_or_0d_tensors():
    """What a caller's sizes often are (target sizes from a tensor, NumPy shapes) is taken as the integers it
    holds; a fraction, a string or a bool is not a size."""
    import numpy as np

    logits = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0))
    want = inference.resized_labels(logits, (20, 12))
    assert torch.equal(inference.resized_labels(logits, (torch.tensor(20), np.int64(12))), want)
    assert torch.equal(inference.resized_labels(logits, torch.Size([20, 12])), want)
    for bad in ((20.5, 12), ("20", 12), (True, 12)):
        with pytest.raises(ValueError, match="size must be two positive integers"):
            inference.resized_labels(logits, bad)


def test_extreme_aspect_ratios_and_scales_are_segmented(seg):
    """A strip whose short side the aligned resize would take below one pixel, and a scale that small, still get
    their labels: one row (rounded up to ``align``, padded to the model's minimum), back at the image's size."""
    x = torch.randn(1, 3, 29, 4000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = predict_labels(seg, x, mode="aligned", short_side=64, long_side=128, align=16)
        scaled = predict_labels(seg, x[..., :64], mode="aligned", short_side=64, long_side=128, scales=[0.001, 1.0])
    assert labels.shape == (1, 29, 4000) and scaled.shape == (1, 29, 64)


def test_options_normalise_and_round_trip_through_json():
    import json

    opts = InferenceOptions(mode="slide", crop_size=64, stride=[48, 40], scales=[0.5, 1], flip=1)
    assert (opts.crop_size, opts.stride, opts.scales, opts.flip) == ((64, 64), (48, 40), (0.5, 1.0), True)
    assert InferenceOptions(scales=[]).scales is None and InferenceOptions().single_pass
    d = json.loads(json.dumps(opts.to_dict()))
    assert d == {"mode": "slide", "crop_size": [64, 64], "stride": [48, 40], "short_side": 512,
                 "long_side": 2048, "align": 32, "scales": [0.5, 1.0], "flip": True}  # fmt: skip
    assert InferenceOptions.from_dict(d) == opts and hash(InferenceOptions.from_dict(d)) == hash(opts)
    assert InferenceOptions.from_dict({}) == InferenceOptions()
    with pytest.raises(ValueError, match="unknown inference option"):
        InferenceOptions.from_dict({**d, "tile": 3})
    assert opts.replace(flip=False) == InferenceOptions(mode="slide", crop_size=64, stride=(48, 40), scales=(0.5, 1))
    with pytest.raises(ValueError, match="larger than crop_size"):
        opts.replace(crop_size=32)
    with pytest.raises(AttributeError):
        opts.mode = "whole"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(mode="slide", crop_size=(40, 48), stride=(24, 32)),
        dict(mode="aligned", short_side=48, long_side=96, align=16, scales=[0.75, 1.25], flip=True),
        dict(mode="whole", scales=[0.5, 1.0], flip=True),
    ],
)
def test_infer_with_options_equals_infer_with_keywords(seg, kwargs):
    x = torch.randn(2, 3, 56, 72, generator=torch.Generator().manual_seed(1))
    by_keywords = infer(seg, x, **kwargs, output_size=(50, 60))
    opts = InferenceOptions(**kwargs)
    assert torch.equal(infer(seg, x, opts, output_size=(50, 60)), by_keywords)
    labels = predict_labels(seg, x, opts, output_size=(50, 60))
    assert torch.equal(labels, predict_labels(seg, x, **kwargs, output_size=(50, 60)))
    if not _composed(seg, x, opts, (50, 60)):  # (the composed resizes: test_composed_resizes_give_the_labels)
        _assert_pass_labels(labels, seg, x, opts, (50, 60), by_keywords)  # (several passes: the axis maps)
    # keywords on top of options are changes to them
    assert torch.equal(infer(seg, x, InferenceOptions(), **kwargs, output_size=(50, 60)), by_keywords)


def test_labels_from_probs_argmax_and_binary_threshold():
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]).T.reshape(1, 3, 1, 2)  # (B, K, H, W)
    assert torch.equal(labels_from_probs(probs), torch.tensor([[[1, 0]]]))
    one = torch.tensor([0.2, 0.5, 0.51, 0.9]).reshape(1, 1, 2, 2)
    labels = labels_from_probs(one)
    assert labels.dtype == torch.int64 and torch.equal(labels, torch.tensor([[[0, 0], [1, 1]]]))
    logits = torch.tensor([-1.0, 0.0, 0.01, 3.0]).reshape(1, 1, 2, 2)  # threshold 0 for logits
    assert torch.equal(labels_from_probs(logits, threshold=0.0), labels)


def test_labels_are_torch_argmax_ties_and_nan_included():
    """labels_from_probs (and post_process_semantic_segmentation) take max's indices for speed: the same as
    argmax, the first maximum on ties and NaN as the maximum, in either memory layout."""
    from segformer import SegformerImageProcessor

    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (2, 7, 9, 11), generator=gen).float()  # many ties among 4 values
    x[0, 5, 2, 3] = float("nan")
    for probs in (x, x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(labels_from_probs(probs), x.argmax(dim=1))
    maps = SegformerImageProcessor().post_process_semantic_segmentation(SimpleNamespace(logits=x))
    assert all(torch.equal(m, a) for m, a in zip(maps, x.argmax(dim=1), strict=True))
    resized = SegformerImageProcessor().post_process_semantic_segmentation(x, target_sizes=[(18, 22)] * 2)
    up = F.interpolate(x, size=(18, 22), mode="bilinear", align_corners=False)
    assert all(torch.equal(m, a) for m, a in zip(resized, up.argmax(dim=1), strict=True))


def test_every_command_declares_the_same_inference_options():
    from segformer.cli import build_parser
    from segformer.commands import inference_options_from_args
    from segformer.commands.train import config_from_args
    from segformer.predict import SegformerPredictor

    parser = build_parser()
    predict = parser.parse_args(["predict", "x.png", "-o", "o"])
    base = SegformerPredictor.default_options
    assert inference_options_from_args(predict, base=base) == base  # nothing given: the predictor's defaults
    predict = parser.parse_args(["predict", "x.png", "-o", "o", "--mode", "slide", "--crop-size", "64",
                                 "--stride", "48,40", "--align", "16", "--scales", "0.5,1", "--flip"])  # fmt: skip
    want = InferenceOptions(mode="slide", crop_size=64, stride=(48, 40), align=16, scales=(0.5, 1.0), flip=True)
    assert inference_options_from_args(predict, base=base) == want
    ev = parser.parse_args(["eval", "--data", "d", "--model", "m", "--mode", "slide", "--crop", "64", "64",
                            "--stride", "48", "40", "--align", "16", "--scales", "0.5", "1", "--flip"])  # fmt: skip
    assert inference_options_from_args(ev) == want
    base = InferenceOptions(mode="aligned", short_side=100)
    assert inference_options_from_args(parser.parse_args(["eval", "--data", "d", "--model", "m"]), base=base) == base
    train = parser.parse_args(["train", "--data", "d", "--crop", "32", "32", "--eval-mode", "slide", "--eval-crop",
                               "64", "64", "--eval-stride", "48", "40", "--eval-align", "16", "--eval-scales",
                               "0.5,1", "--eval-flip"])  # fmt: skip
    assert inference_options_from_args(train, "eval-") == want
    assert config_from_args(train).eval_inference_options("folder") == want
    assert config_from_args(parser.parse_args(["train", "--data", "d"])).eval_inference_options("cityscapes") == (
        InferenceOptions(mode="slide", crop_size=1024, stride=768)
    )
    # --no-flip turns off a flip the base (a checkpoint's inference_config.json) asks for; not given, it stays
    flipped = InferenceOptions(mode="slide", crop_size=64, stride=48, flip=True)
    no_flip = parser.parse_args(["eval", "--data", "d", "--model", "m", "--no-flip"])
    assert inference_options_from_args(no_flip, base=flipped) == flipped.replace(flip=False)
    assert (
        inference_options_from_args(parser.parse_args(["eval", "--data", "d", "--model", "m"]), base=flipped) == flipped
    )
    assert not config_from_args(parser.parse_args(["train", "--data", "d", "--no-eval-flip"])).eval_flip
    # a crop below the stride in force, without a stride, takes one in the same proportion (341/512 of it)
    small = parser.parse_args(["eval", "--data", "d", "--model", "m", "--mode", "slide", "--crop", "32"])
    assert inference_options_from_args(small).stride == (21, 21)
    city = config_from_args(parser.parse_args(["train", "--data", "d", "--eval-crop", "512", "512"]))
    assert city.eval_inference_options("cityscapes").stride == (384, 384)  # 768/1024 of 512
    assert InferenceOptions(mode="slide", crop_size=64, stride=48, scales=(0.5, 1.0), flip=True).describe() == (
        "slide 64x64 stride 48x48, scales 0.5,1, flip"
    )
    assert InferenceOptions().describe() == "whole"
    # the Python API applies the same rule to its keywords (SegformerPredictor, infer, evaluate)
    assert inference.resolve_options(None, {"mode": "slide", "crop_size": 32}).stride == (21, 21)


def test_multi_scale_flip_maps_are_made_once_per_image_size(seg):
    """The paper's multi-scale protocol (6 scales and their flips: 18 axis maps for one image size) makes its maps
    for the first image only: a second image of that size finds them all in _axis_map's cache."""
    opts = InferenceOptions(
        mode="aligned", short_side=48, long_side=96, align=16, scales=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75], flip=True
    )
    gen = torch.Generator().manual_seed(5)
    inference._axis_map.cache_clear()
    with torch.no_grad():
        predict_labels(seg, torch.randn(1, 3, 45, 61, generator=gen), opts)
        made = inference._axis_map.cache_info().misses
        assert made >= 12  # (the rows of each scale, its columns plain and flipped; scales may share a size)
        predict_labels(seg, torch.randn(1, 3, 45, 61, generator=gen), opts)
    assert inference._axis_map.cache_info().misses == made


def test_multi_scale_sizes_round_halves_up_as_mmsegmentation():
    """A scaled pass's size is int(side · scale + 0.5), as mmsegmentation rescales by a factor (Python's round()
    takes halves to even: 45 × 0.5 = 22.5 gave 22, mmsegmentation 23); aligned mode's scaled target sides are
    truncated, as mmsegmentation's multi-scale test scales are (int(2048 · r), int(512 · r))."""
    whole = InferenceOptions(scales=(0.5, 1.5))
    assert inference._pass_inputs(45, 61, whole) == [(23, 31), (68, 92)]  # 22.5 → 23, 30.5 → 31; 67.5 → 68
    aligned = InferenceOptions(mode="aligned", short_side=101, long_side=203, align=1, scales=(0.5,))
    # targets int(50.5) = 50 and int(101.5) = 101 (round() gives 50 and 102): the long side caps it, 300 → 101
    assert inference._pass_inputs(100, 300, aligned) == [(34, 101)]  # (round(): (34, 102))


def test_sliding_windows_below_the_models_minimum_are_refused_up_front(seg, tmp_path):
    """--crop-size 10 failed at the first forward, after the output folder was made, naming a tensor
    ("pixel_values of size 10x10"); the options are refused where they meet the model (audit)."""
    from segformer.modeling import min_input_size
    from segformer.predict import SegformerPredictor

    need = min_input_size(seg.config)
    small = dict(mode="slide", crop_size=(10, 40), stride=(8, 8))
    message = rf"crop_size \(--crop-size\) 10x40 is below this model's minimum input of {need}x{need} pixels"
    with pytest.raises(ValueError, match=message):
        infer(seg, torch.randn(1, 3, 64, 64), **small)
    with pytest.raises(ValueError, match=message):
        SegformerPredictor(seg, device="cpu", **small)
    SegformerPredictor(seg, device="cpu", mode="slide", crop_size=(need, need), stride=(8, 8))  # the minimum itself


def test_a_scale_that_shrinks_the_image_below_the_models_minimum_says_so(seg, caplog, monkeypatch):
    """``--scales 1e-9`` (or 0.5 meant as 50) ran a 1x1 image padded up to the model's minimum and gave a label map
    without a word (notes). One line per such scale; a scale that keeps the image above the minimum says nothing,
    nor does an image already below it at scale 1 (padded as it always is)."""
    monkeypatch.setattr(inference, "_SHRUNK_SAID", set())
    need = min_input_size(seg.config)
    x = torch.randn(1, 3, 2 * need, 3 * need)
    with caplog.at_level("WARNING", logger="segformer"):
        infer(seg, x, scales=[1.0, 0.75])
        assert caplog.messages == []
        infer(seg, x, scales=[1e-9, 1.0])
        infer(seg, x, scales=[1e-9])
        infer(seg, torch.randn(1, 3, need // 2, need), scales=[0.5])
    assert caplog.messages == [
        f"scale 1e-09 shrinks a {2 * need}x{3 * need} input to 1x1, below the model's minimum input of {need} pixels "
        "a side: that pass is padded up and sees little of the image (scales are factors: 0.5, not 50)"
    ]
