"""Whole / aligned / sliding-window / multi-scale + flip inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import U32, randomize_, tiny_config
from torch import nn

from segformer import SegformerForSemanticSegmentation
from segformer.inference import InferenceOptions, aligned_size, infer, labels_from_probs, predict_labels


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
    [((20, 30), (32, 32), (16, 16)),  # smaller than the crop: padded, padding cropped away
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
    """An independent sliding window: every window position listed explicitly, logits averaged."""
    _, _, h, w = x.shape
    ys = sorted({min(y, h - crop[0]) for y in range(0, h - crop[0] + stride[0], stride[0])})
    xs = sorted({min(v, w - crop[1]) for v in range(0, w - crop[1] + stride[1], stride[1])})
    total, count = 0, torch.zeros(h, w)
    with torch.no_grad():
        for y in ys:
            for v in xs:
                logits = model(x[:, :, y : y + crop[0], v : v + crop[1]]).logits
                up = F.interpolate(logits, size=crop, mode="bilinear", align_corners=False)
                total = total + F.pad(up, (v, w - v - crop[1], y, h - y - crop[0]))
                count[y : y + crop[0], v : v + crop[1]] += 1
    return (total / count).softmax(1)


def test_slide_matches_a_hand_written_window_loop(seg):
    x = torch.randn(1, 3, 75, 101)
    got = infer(seg, x, mode="slide", crop_size=(64, 64), stride=(40, 48))
    # the same windows through the same kernels, summed in the same order: bitwise the same
    assert torch.equal(got, _hand_slide(seg, x, (64, 64), (40, 48)))


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
    model = PerPixel()
    x = torch.randn(1, 3, 50, 70)
    probs = infer(model, x, mode="aligned", short_side=64, long_side=128)
    assert probs.shape == (1, 4, 50, 70)
    # what aligned mode computes: resize to the aligned size (64 x 96), logits there, back to the input size
    size = aligned_size(50, 70, short_side=64, long_side=128)
    assert size == (64, 96)  # 64/50 = 1.28 limits: 70 x 1.28 = 89.6 → 90 → rounded up to 96
    with torch.no_grad():
        logits = model(F.interpolate(x, size=size, mode="bilinear", align_corners=False))[0]
    expected = F.interpolate(logits, size=(50, 70), mode="bilinear", align_corners=False).softmax(1)
    assert torch.equal(probs, expected)  # the same operations in the same order
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
    ):
        with pytest.raises(ValueError, match=message):
            InferenceOptions(**kwargs)
        with pytest.raises(ValueError, match=message):
            infer(PerPixel(), torch.randn(1, 3, 32, 32), **kwargs)


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
    assert torch.equal(predict_labels(seg, x, opts, output_size=(50, 60)), labels_from_probs(by_keywords))
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
