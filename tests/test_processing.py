"""SegformerImageProcessor: Transformers parity, conversions, config I/O, errors and the torch fast path.

Every image is random data made here with numpy/PIL; files go to tmp_path. Tests marked ``oracle`` compare
against Transformers' PIL image processor (``SegformerImageProcessorPil`` in 5.x).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import U32, hf_pil_processor
from PIL import Image, ImageOps

from segformer.hub import CheckpointError
from segformer.processing import (
    SegformerBatch,
    SegformerFeatureExtractor,
    SegformerImageProcessor,
    _torch_resize,
)

MIN_STD = 0.224
ONE_LEVEL = 1 / 255 / MIN_STD  # one 8-bit step in normalised units: 0.01751
# The same 8-bit pixels normalised in another order ((x / 255 - mean) / std, or one table lookup): a few fp32
# roundings (u each) of values up to (1 - 0.406) / 0.225 = 2.64; 8u of 2.7 taken.
PIXEL_TOL = 8 * U32 * 2.7


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def raw_processor(**kwargs) -> SegformerImageProcessor:
    """A processor that only converts: output pixel values are the RGB values as float, channels first."""
    return SegformerImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, **kwargs)


def rgb_values(image, **kwargs) -> np.ndarray:
    """(H, W, 3) float values the raw processor produces for one image."""
    return raw_processor(**kwargs)(image, return_tensors="np").pixel_values[0].transpose(1, 2, 0)


def hf_processor(**kwargs):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    return hf_pil_processor(transformers)(**kwargs)


def random_image(rng, height, width, channels=3) -> np.ndarray:
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


# ------------------------------------------------------------------------------------ Transformers parity
ORACLE_CASES = [  # (input kind, (h, w), size for us, size for Transformers, resample)
    ("numpy_hwc", (37, 53), 512, 512, 2),
    ("numpy_chw", (301, 211), (96, 80), {"height": 80, "width": 96}, 2),
    ("pil", (64, 64), {"height": 33, "width": 47}, {"height": 33, "width": 47}, 2),
    ("torch_chw", (90, 121), {"shortest_edge": 50}, {"shortest_edge": 50}, 2),
    ("pil", (121, 90), {"shortest_edge": 64}, {"shortest_edge": 64}, 3),
    ("numpy_hwc", (150, 40), 64, 64, 0),
    ("numpy_hwc", (23, 77), 48, 48, 1),
    ("pil", (200, 300), 72, 72, 4),
    ("numpy_chw", (45, 45), 45, 45, 5),  # same size: no resampling
    ("pil", (37, 53), {"shortest_edge": 20, "longest_edge": 30}, {"shortest_edge": 20, "longest_edge": 30}, 2),
    ("numpy_hwc", (40, 200), {"shortest_edge": 32, "longest_edge": 96}, {"shortest_edge": 32, "longest_edge": 96}, 2),
]


def as_kind(array: np.ndarray, kind: str):
    return {
        "numpy_hwc": array,
        "numpy_chw": np.ascontiguousarray(array.transpose(2, 0, 1)),
        "pil": Image.fromarray(array),
        "torch_chw": torch.from_numpy(array).permute(2, 0, 1).contiguous(),
    }[kind]


@pytest.mark.oracle
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("case", ORACLE_CASES, ids=lambda c: f"{c[0]}-{c[1][0]}x{c[1][1]}-r{c[4]}")
def test_matches_transformers(case, reduce, rng):
    kind, (h, w), size, hf_size, resample = case
    images = [random_image(rng, h, w) for _ in range(2)]
    maps = [rng.integers(0, 30, (h, w), dtype=np.uint8) for _ in range(2)]
    maps[0][:5] = 0
    maps[1][:, :3] = 255
    ours = SegformerImageProcessor(size=size, resample=resample, reduce_labels=reduce, backend="pil")
    theirs = hf_processor(size=hf_size, resample=resample, do_reduce_labels=reduce)
    inputs = [as_kind(im, kind) for im in images]
    a = ours(inputs, maps, return_tensors="np")
    b = theirs(inputs, [m.copy() for m in maps], return_tensors="np")
    assert a.pixel_values.shape == b["pixel_values"].shape and a.pixel_values.dtype == np.float32
    assert np.abs(a.pixel_values - b["pixel_values"]).max() <= PIXEL_TOL
    assert a.labels.dtype == np.int64 and np.array_equal(a.labels, b["labels"])


@pytest.mark.oracle
def test_matches_transformers_single_image_and_lists(rng):
    image = random_image(rng, 70, 50)
    seg = rng.integers(0, 5, (70, 50)).astype(np.int64)
    ours, theirs = SegformerImageProcessor(size=32), hf_processor(size={"height": 32, "width": 32})
    a, b = ours(image, seg), theirs(image, seg.copy())  # return_tensors=None: lists of arrays
    assert isinstance(a.pixel_values, list) and len(a.pixel_values) == 1
    assert np.abs(a.pixel_values[0] - b["pixel_values"][0]).max() <= PIXEL_TOL
    assert np.array_equal(a.labels[0], b["labels"][0])
    a, b = ours(image, seg, return_tensors="pt"), theirs(image, seg.copy(), return_tensors="pt")
    assert a.pixel_values.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert torch.allclose(a.pixel_values, b["pixel_values"], atol=PIXEL_TOL, rtol=0)
    assert torch.equal(a.labels, b["labels"])


@pytest.mark.oracle
def test_float_inputs_against_transformers(rng):
    image = random_image(rng, 40, 52)
    theirs = hf_processor(size={"height": 30, "width": 30})
    ours = SegformerImageProcessor(size=30)
    # integral floats in [0, 255] take the 8-bit path, as in Transformers: same numbers
    a = ours(image.astype(np.float64), return_tensors="np").pixel_values
    assert np.abs(a - theirs(image.astype(np.float64), return_tensors="np")["pixel_values"]).max() <= PIXEL_TOL
    # floats in [0, 1]: Transformers truncates them to 8 bits before resizing, we resize in float (documented)
    scaled = rng.random((40, 52, 3)).astype(np.float32)
    a = ours(scaled, return_tensors="np", do_rescale=False).pixel_values
    b = theirs(scaled, return_tensors="np", do_rescale=False)["pixel_values"]
    diff = np.abs(a - b)
    assert diff.max() <= 2 * ONE_LEVEL and diff.mean() < 0.6 * ONE_LEVEL  # measured: max 0.034, mean 0.009


@pytest.mark.oracle
def test_post_processing_matches_transformers(rng):
    theirs, ours = hf_processor(), SegformerImageProcessor()
    logits = torch.from_numpy(rng.standard_normal((3, 6, 13, 17)).astype(np.float32))

    class Outputs:  # what a model returns: an object with .logits
        def __init__(self, logits):
            self.logits = logits

    sizes = [(40, 30), (7, 9), (13, 17)]
    # Our resized maps come from inference.resized_labels, Transformers' from F.interpolate's float32 logits: each
    # is the argmax of the float64 resize wherever the top two classes are further apart than its own error
    # (resized_labels: 13u of max|z|, tests/test_inference.py; F.interpolate: measured here against float64).
    decided = []
    for i, size in enumerate(sizes):
        one = logits[i : i + 1]
        exact = torch.nn.functional.interpolate(one.double(), size=size, mode="bilinear")[0]
        their_error = (torch.nn.functional.interpolate(one, size=size, mode="bilinear")[0] - exact).abs().max()
        top = exact.topk(2, dim=0).values
        decided.append(top[0] - top[1] > 2 * their_error + 13 * U32 * one.abs().max())
        assert decided[-1].float().mean() > 0.99  # near-ties are rare: the comparison below is not vacuous
    # Transformers 5.23 fails on a (B, 2) tensor of sizes (it hands numpy rows to interpolate); ours takes it
    for target, their_target in ((sizes, sizes), (torch.tensor(sizes), sizes), (None, None)):
        a = ours.post_process_semantic_segmentation(Outputs(logits), target_sizes=target)
        b = theirs.post_process_semantic_segmentation(Outputs(logits), target_sizes=their_target)
        assert len(a) == 3 and all(x.dtype == torch.int64 for x in a)
        for x, y, sure in zip(a, b, decided if target is not None else [None] * 3, strict=True):
            assert torch.equal(x, y) if sure is None else torch.equal(x[sure], y[sure])  # (None: the argmax alone)
    assert [tuple(m.shape) for m in ours.post_process_semantic_segmentation(logits, sizes)] == sizes
    assert tuple(ours.post_process_semantic_segmentation(logits)[0].shape) == (13, 17)


def test_post_processing_maps_skip_the_resized_logits(monkeypatch):
    """Without the scores, CPU float32 maps come from inference.resized_labels (one matrix per axis, the argmax
    by bands: tests/test_inference.py), image by image at its own size; with the scores, from F.interpolate's
    logits, whose argmax they are."""
    from segformer import inference

    logits = torch.randn(2, 19, 16, 20, generator=torch.Generator().manual_seed(4))
    sizes = [(67, 50), (64, 80)]
    calls = []
    real = inference._labels_by_axis_maps
    monkeypatch.setattr(inference, "_labels_by_axis_maps", lambda *a: calls.append(a[4].shape) or real(*a))
    maps = SegformerImageProcessor().post_process_semantic_segmentation(logits, target_sizes=sizes)
    assert calls == [torch.Size(s) for s in sizes]
    assert all(torch.equal(m, inference.resized_labels(z, s)) for m, z, s in zip(maps, logits, sizes, strict=True))
    tracked = logits.clone().requires_grad_()  # a model called outside no_grad, as in the docs page's example
    maps_tracked = SegformerImageProcessor().post_process_semantic_segmentation(tracked, target_sizes=sizes)
    assert all(torch.equal(a, b) for a, b in zip(maps, maps_tracked, strict=True))
    calls.clear()
    scored = SegformerImageProcessor().post_process_semantic_segmentation(logits, sizes, True)
    assert calls == [] and all(torch.equal(r.segmentation, r.segmentation_scores.argmax(0)) for r in scored)


@pytest.mark.oracle
@pytest.mark.parametrize("backend", ["pil", "auto"])
def test_without_resizing_a_map_of_another_size_keeps_it_as_transformers_does(rng, backend):
    """do_resize=False with a map of another size than its image was a ValueError here; Transformers' processor
    passes the map on at its own size (its loss upsamples the logits to the labels: labels finer than their image
    work), so a pipeline written for it failed with ours (spec audit). Now the same labels, with a warning that
    names the sizes (the EXIF hint where the sides are swapped). (The loss at any label size: test_oracle.)"""
    image = random_image(rng, 20, 30)
    seg = rng.integers(0, 5, (40, 60), dtype=np.uint8)
    source = torch.from_numpy(image).permute(2, 0, 1).contiguous() if backend == "auto" else image
    ours = SegformerImageProcessor(do_resize=False, backend=backend)
    with pytest.warns(UserWarning, match=r"map 0 has size \(40, 60\) but its image has \(20, 30\); with "
                      r"do_resize=False the map keeps its own size"):  # fmt: skip
        a = ours(source, seg, return_tensors="pt")
    b = hf_processor(do_resize=False)(image, seg.copy(), return_tensors="pt")
    assert a.labels.shape == (1, 40, 60) and torch.equal(a.labels, b["labels"].long())
    assert torch.allclose(a.pixel_values, b["pixel_values"], atol=PIXEL_TOL, rtol=0)
    with pytest.warns(UserWarning, match=r"sides swapped: an image file turned upright by its EXIF orientation"):
        ours(image, seg[:30, :20])


@pytest.mark.oracle
def test_save_pretrained_is_read_by_transformers(tmp_path, rng):
    transformers = pytest.importorskip("transformers")
    ours = SegformerImageProcessor(
        size=(56, 40), resample=3, reduce_labels=True, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]
    )
    [saved_file] = ours.save_pretrained(tmp_path / "proc")  # the list of files written, as Transformers returns
    path = Path(saved_file)
    assert path.name == "preprocessor_config.json"
    saved = json.loads(path.read_text())
    assert saved["image_processor_type"] == "SegformerImageProcessor" and saved["do_reduce_labels"] is True
    assert saved["size"] == {"height": 40, "width": 56} and saved["resample"] == 3 and "reduce_labels" not in saved
    theirs = hf_processor().from_pretrained(tmp_path / "proc")
    # Transformers 5.x's AutoImageProcessor takes the torchvision backend where torchvision is installed: ask for PIL
    pil = {"backend": "pil"} if hf_pil_processor(transformers) is not transformers.SegformerImageProcessor else {}
    auto = transformers.AutoImageProcessor.from_pretrained(tmp_path / "proc", **pil)
    image, seg = random_image(rng, 61, 83), rng.integers(0, 9, (61, 83), dtype=np.uint8)
    a = ours(image, seg, return_tensors="np")
    for other in (theirs, auto):
        b = other(image, seg.copy(), return_tensors="np")
        assert a.pixel_values.shape == (1, 3, 40, 56)
        assert np.abs(a.pixel_values - b["pixel_values"]).max() <= PIXEL_TOL
        assert np.array_equal(a.labels, b["labels"])
    # and back: a file Transformers wrote
    theirs.save_pretrained(tmp_path / "theirs")
    again = SegformerImageProcessor.from_pretrained(tmp_path / "theirs")
    assert again.to_dict() == ours.to_dict()


@pytest.mark.oracle
def test_feature_extractor_config_is_read_by_transformers(tmp_path):
    SegformerFeatureExtractor(size=64, reduce_labels=True).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "SegformerImageProcessor"  # the name Transformers writes and knows
    theirs = hf_processor().from_pretrained(tmp_path)
    assert theirs.do_reduce_labels is True and (theirs.size.height, theirs.size.width) == (64, 64)
    loaded = SegformerFeatureExtractor.from_pretrained(tmp_path)
    assert isinstance(loaded, SegformerFeatureExtractor) and loaded.to_dict() == saved


# ------------------------------------------------------------------------------------ options and layout
def test_size_forms_and_defaults():
    p = SegformerImageProcessor()
    assert p.size == {"height": 512, "width": 512} and p.resample == 2 and p.do_reduce_labels is False
    assert p.image_mean == [0.485, 0.456, 0.406] and p.image_std == [0.229, 0.224, 0.225]
    assert SegformerImageProcessor(size=(64, 32)).size == {"height": 32, "width": 64}  # (width, height)
    assert SegformerImageProcessor(size={"shortest_edge": 20}).size == {"shortest_edge": 20}
    assert SegformerImageProcessor(resample=Image.Resampling.BICUBIC).resample == 3
    assert SegformerImageProcessor(do_reduce_labels=True).reduce_labels is True
    assert SegformerImageProcessor(reduce_labels=True).do_reduce_labels is True
    out = SegformerImageProcessor(size=(64, 32))(np.zeros((10, 10, 3), np.uint8), return_tensors="np")
    assert out.pixel_values.shape == (1, 3, 32, 64)


def test_shortest_edge_sizes():
    p = SegformerImageProcessor(size={"shortest_edge": 50})
    tall, wide = np.zeros((300, 200, 3), np.uint8), np.zeros((33, 100, 3), np.uint8)
    assert p(tall, return_tensors="np").pixel_values.shape == (1, 3, 75, 50)
    assert p(wide, return_tensors="np").pixel_values.shape == (1, 3, 50, 151)  # int(50 * 100 / 33)


@pytest.mark.oracle
def test_shortest_and_longest_edge_sizes_as_transformers_computes_them():
    """{"shortest_edge", "longest_edge"} was refused (audit); Transformers takes it, with its own rounding (the
    short side rounded, the long one truncated, an image whose short side is already there kept as it is)."""
    from transformers.image_transforms import get_size_with_aspect_ratio

    from segformer.processing import _output_size

    gen = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in gen.integers(1, 400, 2))
        short = int(gen.integers(1, 300))
        size = {"shortest_edge": short, "longest_edge": short + int(gen.integers(1, 300))}
        assert _output_size(h, w, size) == tuple(get_size_with_aspect_ratio((h, w), short, size["longest_edge"])), (
            h, w, size)  # fmt: skip
    with pytest.raises(ValueError, match="size longest_edge must be a positive int"):
        SegformerImageProcessor(size={"shortest_edge": 20, "longest_edge": 0})


def test_per_call_overrides(rng):
    p = SegformerImageProcessor(size=16)
    image = random_image(rng, 20, 30)
    assert p(image, return_tensors="np", do_resize=False).pixel_values.shape == (1, 3, 20, 30)
    assert p(image, return_tensors="np", size={"height": 8, "width": 4}).pixel_values.shape == (1, 3, 8, 4)
    plain = p(image, return_tensors="np", do_normalize=False, do_rescale=False, resample=0).pixel_values
    assert plain.max() > 1 and np.array_equal(plain, np.round(plain))  # raw 8-bit values, NEAREST
    assert p.size == {"height": 16, "width": 16}  # the processor itself is unchanged


def test_size_reads_as_attributes_as_transformers_size_dict():
    """Code written for Transformers 5 reads ``processor.size.height`` (its SizeDict); ours was a plain dict
    (AttributeError: audit). It stays a dict for JSON and ``size["height"]``."""
    p = SegformerImageProcessor(size={"shortest_edge": 20})
    assert (p.size.shortest_edge, p.size.height, p.size["shortest_edge"]) == (20, None, 20)
    assert SegformerImageProcessor(size=(64, 32)).size.width == 64
    assert json.loads(json.dumps(p.size)) == {"shortest_edge": 20}
    with pytest.raises(AttributeError, match="size has no field 'heigth'"):
        p.size.heigth  # noqa: B018


@pytest.mark.oracle
def test_transformers_size_dict_is_taken():
    from transformers.image_utils import SizeDict

    assert SegformerImageProcessor(size=SizeDict(height=8, width=6)).size == {"height": 8, "width": 6}
    assert SegformerImageProcessor(size=hf_processor(size={"shortest_edge": 30}).size).size == {"shortest_edge": 30}


@pytest.mark.oracle
def test_options_of_other_processors_are_ignored_as_transformers_does(rng):
    """Per-call options Transformers' image processors share (do_pad, do_center_crop, do_convert_rgb, ...) were a
    TypeError here; Transformers' SegFormer processor takes and ignores them (audit). A warning names those that
    ask for a step that does not happen; a misspelt option is still an error."""
    image = random_image(rng, 30, 40)
    ours, theirs = SegformerImageProcessor(size=16), hf_processor(size={"height": 16, "width": 16})
    other = dict(do_center_crop=True, crop_size={"height": 8, "width": 8}, do_pad=True, disable_grouping=True)
    with pytest.warns(UserWarning, match=r"do_pad=True, do_center_crop=True: ignored"):
        got = ours(image, return_tensors="np", **other).pixel_values
    assert np.array_equal(got, ours(image, return_tensors="np").pixel_values)
    assert np.abs(got - theirs(image, return_tensors="np", **other).pixel_values).max() <= PIXEL_TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (asking for what happens anyway is not warned about)
        ours(image, do_convert_rgb=True, do_pad=False, crop_size={"height": 8, "width": 8})
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['do_resise'\]"):
        ours(image, do_resise=False)


def test_channels_last_output(rng):
    images = [random_image(rng, 30, 40) for _ in range(2)]
    p = SegformerImageProcessor(size=(24, 20))
    first = p(images, return_tensors="np").pixel_values
    last = p(images, return_tensors="np", data_format="channels_last").pixel_values
    assert last.shape == (2, 20, 24, 3) and np.array_equal(last, first.transpose(0, 2, 3, 1))
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    t_first = p(batch, return_tensors="pt").pixel_values
    t_last = SegformerImageProcessor(size=(24, 20), data_format="channels_last")(batch, return_tensors="pt")
    assert t_last.pixel_values.shape == (2, 20, 24, 3)
    assert torch.equal(t_last.pixel_values, t_first.permute(0, 2, 3, 1))


def test_input_data_format_resolves_ambiguous_layouts(rng):
    ambiguous = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)  # 4 in front, 3 at the back
    raw = raw_processor()
    for image in (ambiguous, ambiguous.astype(np.float32) / 255, torch.from_numpy(ambiguous)):
        with pytest.warns(
            UserWarning, match=r"shape \(4, 6, 3\) could be channels first or last; read as channels last"
        ):
            last = raw(image, return_tensors="np").pixel_values  # the end with RGB's 3 channels
        assert last.shape == (1, 3, 4, 6)
    assert np.array_equal(last[0], ambiguous.transpose(2, 0, 1).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layout given is not guessed: no warning
        first = raw(ambiguous, return_tensors="np", input_data_format="channels_first").pixel_values
        assert np.array_equal(first[0], ambiguous[:3].astype(np.float32))  # RGBA, alpha dropped
        assert raw(random_image(rng, 5, 6), return_tensors="np").pixel_values.shape == (1, 3, 5, 6)  # unambiguous
    gray = rng.integers(0, 256, (1, 6, 4), dtype=np.uint8)  # neither end has 3: the spec's (C, H, W)
    with pytest.warns(UserWarning, match="read as channels first"):
        assert raw(gray, return_tensors="np").pixel_values.shape == (1, 3, 6, 4)
    with pytest.warns(UserWarning, match="read as channels last"):  # one band expected: the end with 1
        one = SegformerImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5])
        assert one(gray.reshape(4, 6, 1), return_tensors="np").pixel_values.shape == (1, 1, 4, 6)


@pytest.mark.oracle
@pytest.mark.parametrize("shape", [(3, 33, 1), (3, 33, 3), (3, 20, 4)])
@pytest.mark.parametrize("kind", ["uint8", "tensor"])
def test_narrow_channels_first_images_read_as_transformers(rng, shape, kind):
    """An image a few pixels wide given channels first is ambiguous: read as the spec's (C, H, W), as
    Transformers reads it (uint8 numpy arrays once read such shapes channels last: another image, silently)."""
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image = torch.from_numpy(image) if kind == "tensor" else image
    theirs = hf_processor(size={"height": 32, "width": 32})
    with pytest.warns(UserWarning, match="could be channels first or last"):
        ours = SegformerImageProcessor(size=32, backend="pil")(image, return_tensors="np").pixel_values
    assert np.abs(ours - theirs(image, return_tensors="np")["pixel_values"]).max() <= PIXEL_TOL


def test_return_types(rng):
    images = [random_image(rng, 12, 14), random_image(rng, 20, 10)]
    maps = [np.zeros((12, 14), np.uint8), np.ones((20, 10), np.uint8)]
    p = SegformerImageProcessor(size=8)
    out = p(images, maps)
    assert isinstance(out, SegformerBatch) and isinstance(out.pixel_values, list)
    assert all(isinstance(x, np.ndarray) and x.shape == (3, 8, 8) and x.dtype == np.float32 for x in out.pixel_values)
    assert all(isinstance(x, np.ndarray) and x.shape == (8, 8) and x.dtype == np.int64 for x in out.labels)
    stacked = p(images, maps, return_tensors="np")
    assert stacked.pixel_values.shape == (2, 3, 8, 8) and stacked["labels"].shape == (2, 8, 8)
    unresized = p(images, maps, do_resize=False)  # different sizes are fine as lists
    assert [x.shape for x in unresized.pixel_values] == [(3, 12, 14), (3, 20, 10)]


def test_batch_attribute_access_and_to(rng):
    out = SegformerImageProcessor(size=8)(random_image(rng, 9, 9), np.ones((9, 9), np.uint8), return_tensors="pt")
    assert out.pixel_values is out["pixel_values"]
    with pytest.raises(AttributeError, match="no field 'nope'"):
        _ = out.nope
    moved = out.to(torch.float16)
    assert moved is out and out.pixel_values.dtype == torch.float16 and out.labels.dtype == torch.int64
    out.to("cpu", non_blocking=False)
    assert out.pixel_values.device.type == "cpu"
    out.to(device="cpu", dtype=torch.bfloat16)
    assert out.pixel_values.dtype == torch.bfloat16 and out.labels.dtype == torch.int64


# ------------------------------------------------------------------------------------------- conversions
def test_grayscale_modes_become_rgb(rng):
    gray = rng.integers(0, 256, (15, 11), dtype=np.uint8)
    expected = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    image_l = Image.fromarray(gray, "L")
    assert np.array_equal(rgb_values(image_l), expected)
    alpha = Image.fromarray(rng.integers(0, 256, (15, 11), dtype=np.uint8), "L")
    assert np.array_equal(rgb_values(Image.merge("LA", (image_l, alpha))), expected)
    assert np.array_equal(rgb_values(gray), expected)  # a 2-D array is a gray image
    assert np.array_equal(rgb_values(gray[None]), expected)  # (1, H, W)
    assert np.array_equal(rgb_values(torch.from_numpy(gray)), expected)  # 2-D tensor, torch backend
    bilevel = Image.fromarray(gray > 127)
    assert bilevel.mode == "1"
    assert np.array_equal(rgb_values(bilevel), np.repeat((gray > 127)[..., None] * 255.0, 3, -1))
    # after resizing too: gray in == the replicated RGB image
    p = SegformerImageProcessor(size=(7, 9))
    assert np.array_equal(
        p(image_l, return_tensors="np").pixel_values,
        p(expected.astype(np.uint8), return_tensors="np").pixel_values,
    )


def test_rgba_palette_cmyk_become_rgb(rng):
    rgba = random_image(rng, 10, 13, channels=4)
    assert np.array_equal(rgb_values(Image.fromarray(rgba, "RGBA")), rgba[..., :3])  # alpha dropped, not blended
    assert np.array_equal(rgb_values(rgba), rgba[..., :3])  # 4-channel array
    rgb = Image.fromarray(random_image(rng, 10, 13))
    palette = rgb.convert("P")
    assert np.array_equal(rgb_values(palette), np.asarray(palette.convert("RGB")))
    cmyk = rgb.convert("CMYK")
    assert np.array_equal(rgb_values(cmyk), np.asarray(cmyk.convert("RGB")))
    # resized RGBA uses the colour channels only (PIL's RGBA resize would premultiply alpha)
    p = SegformerImageProcessor(size=6)
    assert np.array_equal(
        p(Image.fromarray(rgba, "RGBA"), return_tensors="np").pixel_values,
        p(np.ascontiguousarray(rgba[..., :3]), return_tensors="np").pixel_values,
    )


def test_sixteen_bit_images_scale_to_eight_bits(rng):
    values = np.array([[0, 128, 129, 257, 32896, 65535]], np.uint16)
    eight = np.array([[0, 0, 1, 1, 128, 255]], np.float32)  # round(v / 257)
    image16 = Image.fromarray(values)
    assert image16.mode == "I;16"
    assert np.array_equal(rgb_values(image16)[..., 0], eight)
    assert np.array_equal(rgb_values(values)[..., 1], eight)  # 2-D uint16 array
    color16 = rng.integers(0, 65536, (5, 6, 3)).astype(np.uint16)
    assert np.array_equal(rgb_values(color16), np.round(color16 / 257.0))


def test_mode_i_is_sixteen_bit_where_a_file_format_says_so_and_else_follows_the_integer_rule(rng, tmp_path):
    """Mode "I" holds 32-bit integers. Pillow opens 16-bit PGMs (and, before Pillow 10.3, 16-bit PNGs) as "I":
    those are 16-bit data (/ 257). Other mode I images (made in memory, L.convert("I"), a 32-bit TIFF) follow the
    integer rule of int32 arrays: values 0..255 as they are (they were divided by 257, nearly black, where the same
    int32 array was read right), anything else an error naming the mode."""
    values = np.array([[0, 128, 129, 257, 32896, 65535]], np.uint16)
    eight = np.array([[0, 0, 1, 1, 128, 255]], np.float32)  # round(v / 257)
    Image.fromarray(values).save(tmp_path / "sixteen.pgm")
    with Image.open(tmp_path / "sixteen.pgm") as pgm:
        assert (pgm.mode, pgm.format) == ("I", "PPM")
        assert np.array_equal(rgb_values(pgm)[..., 2], eight)
    assert np.array_equal(rgb_values(tmp_path / "sixteen.pgm")[..., 0], eight)
    small = rng.integers(0, 256, (5, 6)).astype(np.int32)
    for image in (Image.fromarray(small, "I"), Image.fromarray(small.astype(np.uint8)).convert("I")):
        assert np.array_equal(rgb_values(image)[..., 1], small) and np.array_equal(rgb_values(small)[..., 1], small)
    with pytest.raises(ValueError, match=r"a mode I \(32-bit integer\) image must hold values in \[0, 255\], got "
                                         r"\[0, 65535\]; for 16-bit data convert it to mode I;16"):  # fmt: skip
        rgb_values(Image.fromarray(values.astype(np.int32), "I"))


def test_exif_orientation_is_applied_to_paths(tmp_path, rng):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white, as stored
    exif = Image.Exif()
    exif[274] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    assert upright.shape == (40, 20, 3)
    values = rgb_values(path)
    assert values.shape == (40, 20, 3) and np.array_equal(values, upright)
    assert values[:10].mean() > 200 and values[-10:].mean() < 50  # the white half is now on top
    same = rgb_values(str(path))
    assert np.array_equal(same, values)


def test_segmentation_map_paths_and_modes(tmp_path, rng):
    seg = rng.integers(0, 40, (12, 9), dtype=np.uint8)
    Image.fromarray(seg).save(tmp_path / "seg.png")
    palette = Image.fromarray(seg, "L").convert("P")  # a VOC-style palette PNG keeps indices
    palette.putpalette(list(rng.integers(0, 256, 768)))
    image = random_image(rng, 12, 9)
    p = raw_processor()
    for m in (
        tmp_path / "seg.png",
        Image.fromarray(seg),
        palette,
        torch.from_numpy(seg),
        seg[None],
        seg[..., None],
    ):
        assert np.array_equal(p([image], [m], return_tensors="np").labels[0], seg)


def test_float_images_and_prescaled_warning(rng):
    image = random_image(rng, 16, 12)
    p = SegformerImageProcessor(size=10)
    expected = p(image, return_tensors="np").pixel_values
    assert np.array_equal(p(image.astype(np.float32), return_tensors="np").pixel_values, expected)
    assert np.array_equal(p(image.astype(np.int64), return_tensors="np").pixel_values, expected)
    scaled = image / 255.0
    with pytest.warns(UserWarning, match="do_rescale=False"):
        p(scaled, return_tensors="np")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close = p(scaled, return_tensors="np", do_rescale=False).pixel_values  # resized in float precision
    assert np.abs(close - expected).max() <= ONE_LEVEL


# --------------------------------------------------------------------------------------------- labels
def test_reduce_labels_values():
    seg = np.array([[0, 1, 2], [255, 10, 150]], np.uint8)
    image = np.zeros((2, 3, 3), np.uint8)
    expected = np.array([[255, 0, 1], [255, 9, 149]])
    for p, kwargs in (
        (raw_processor(reduce_labels=True), {}),
        (raw_processor(), {"do_reduce_labels": True}),
        (raw_processor(), {"reduce_labels": True}),
    ):
        assert np.array_equal(p(image, seg, return_tensors="np", **kwargs).labels[0], expected)
    assert np.array_equal(raw_processor()(image, seg, return_tensors="np").labels[0], seg)
    # a per-call None is "not given": the processor's own setting stays (it turned the reduction off)
    for name in ("do_reduce_labels", "reduce_labels"):
        labels = raw_processor(reduce_labels=True)(image, seg, return_tensors="np", **{name: None}).labels[0]
        assert np.array_equal(labels, expected)


@pytest.mark.parametrize("backend", ["pil", "torch"])
@pytest.mark.parametrize("resize", [False, True])
@pytest.mark.parametrize("reduce", [False, True])
def test_labels_are_int64_on_every_route(backend, resize, reduce):
    """A loss takes the labels as they come (cross_entropy refuses int32 targets): int64 with and without the
    reduction, resized or not, from either backend."""
    image = torch.zeros(3, 20, 24, dtype=torch.uint8)
    seg = np.array([[0, 1], [2, 255]], np.uint8).repeat(10, 0).repeat(12, 1)
    p = SegformerImageProcessor(size=16, do_reduce_labels=reduce, do_resize=resize, backend=backend)
    labels = p(image, seg, return_tensors="pt").labels
    assert labels.dtype == torch.int64
    expected = np.array([[255, 0], [1, 255]] if reduce else [[0, 1], [2, 255]])
    assert np.array_equal(labels[0, :: labels.shape[1] - 1, :: labels.shape[2] - 1].numpy(), expected)
    torch.nn.functional.cross_entropy(torch.zeros(1, 3, *labels.shape[1:]), labels, ignore_index=255)


def test_wide_labels_go_through_mode_i(rng):
    small = rng.integers(0, 256, (33, 27)).astype(np.int32)
    big = small + 65280  # up to 65535
    image = random_image(rng, 33, 27)
    p = SegformerImageProcessor(size=(19, 41), backend="pil")
    a = p(image, small, return_tensors="np").labels
    b = p(image, big, return_tensors="np").labels
    assert b.max() > 255 and np.array_equal(b, a + 65280)
    t = p(torch.from_numpy(image).permute(2, 0, 1), big, return_tensors="np", backend="torch").labels
    assert np.array_equal(t, b)
    as_png16 = Image.fromarray(big.astype(np.uint16))
    assert np.array_equal(p(image, as_png16, return_tensors="np").labels, b)


def test_maps_follow_their_image_size(rng):
    p = SegformerImageProcessor(size={"shortest_edge": 10})
    out = p(random_image(rng, 40, 20), rng.integers(0, 3, (40, 20)), return_tensors="np")
    assert out.pixel_values.shape[-2:] == out.labels.shape[-2:] == (20, 10)


def test_a_map_of_another_size_than_its_image_is_warned_about_when_resized(rng, tmp_path):
    """A phone photo stored 20x40 with EXIF orientation 6 is read upright (40x20); a map drawn on its stored
    pixels is 20x40. Both were resized to the output size without a word, the labels turned against the pixels;
    now one warning per call names the map, both sizes and the likely cause (Transformers resizes both alike)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(random_image(rng, 40, 20)).save(tmp_path / "phone.jpg", exif=exif)
    stored_map = rng.integers(0, 3, (40, 20)).astype(np.uint8)
    with Image.open(tmp_path / "phone.jpg") as stored:  # (the torch backend takes tensors: the upright picture)
        tensor = torch.from_numpy(np.array(ImageOps.exif_transpose(stored))).permute(2, 0, 1)
    for backend, image in (("pil", tmp_path / "phone.jpg"), ("torch", tensor)):
        p = SegformerImageProcessor(size={"height": 16, "width": 16}, backend=backend)
        with pytest.warns(UserWarning) as caught:
            out = p([image] * 2, [stored_map] * 2, return_tensors="np")
        assert out.labels.shape == (2, 16, 16) and len(caught) == 1, backend
        assert str(caught[0].message) == (
            "segmentation map 0 has size (40, 20) but its image has (20, 40) (sides swapped: an image file turned "
            "upright by its EXIF orientation?); both are resized to the output size, so the labels may not line up"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p([image], [np.ascontiguousarray(stored_map.T)])  # a map of the upright size: no warning


# ---------------------------------------------------------------------------------- inputs untouched
def test_caller_inputs_are_not_modified(rng):
    image = random_image(rng, 20, 24)
    seg = rng.integers(0, 5, (20, 24)).astype(np.uint8)
    seg[0] = 0
    pil = Image.fromarray(image)
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float()
    snapshot = (image.copy(), seg.copy(), pil.tobytes(), tensor.clone())
    for backend in ("pil", "auto"):
        p = SegformerImageProcessor(size=16, reduce_labels=True, backend=backend)
        p(image, seg)
        p(pil, Image.fromarray(seg))
        p(tensor, torch.from_numpy(seg), do_resize=False)
        out = p(tensor, do_resize=False, do_rescale=False, do_normalize=False, return_tensors="pt")
        out.pixel_values += 1  # writing into the output must not reach the input
        raw = p(image.astype(np.float32) / 255, do_resize=False, do_rescale=False, do_normalize=False)
        raw.pixel_values[0] += 1
    assert np.array_equal(image, snapshot[0]) and np.array_equal(seg, snapshot[1])
    assert pil.tobytes() == snapshot[2] and torch.equal(tensor, snapshot[3])


# --------------------------------------------------------------------------------------- config files
LEGACY = {
    "feature_extractor_type": "SegformerFeatureExtractor",
    "reduce_labels": True,
    "size": 512,
    "resample": 2,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "keep_ratio": False,
}


def test_legacy_config_is_read(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(LEGACY))
    p = SegformerImageProcessor.from_pretrained(tmp_path)
    assert p.do_reduce_labels is True and p.size == {"height": 512, "width": 512} and p.resample == 2
    saved = p.to_dict()
    assert saved["do_reduce_labels"] is True and "reduce_labels" not in saved
    assert saved["keep_ratio"] is False and "feature_extractor_type" not in saved  # unknown keys kept
    assert saved["image_processor_type"] == "SegformerImageProcessor"
    out = p(np.zeros((5, 5, 3), np.uint8), np.zeros((5, 5), np.uint8), return_tensors="np", do_resize=False)
    assert (out.labels == 255).all()
    override = SegformerImageProcessor.from_pretrained(tmp_path, reduce_labels=False, size=64)
    assert override.do_reduce_labels is False and override.size == {"height": 64, "width": 64}


def test_round_trip_and_json(tmp_path):
    p = SegformerImageProcessor(
        size={"shortest_edge": 40},
        resample=4,
        rescale_factor=0.5,
        do_normalize=False,
        data_format="channels_last",
        processor_class="SegformerProcessor",
    )
    path = Path(*p.save_pretrained(tmp_path / "new" / "dir"))
    assert json.loads(path.read_text()) == json.loads(p.to_json_string()) == p.to_dict()
    assert [f.name for f in path.parent.iterdir()] == ["preprocessor_config.json"]  # no temp file left
    again = SegformerImageProcessor.from_pretrained(path.parent)
    assert again.to_dict() == p.to_dict() and again.extra == {"processor_class": "SegformerProcessor"}
    assert "SegformerImageProcessor {" in repr(again)


def test_hub_id_offline_from_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache, commit = tmp_path / "hub", "a" * 40
    repo = cache / "models--acme--seg-proc"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "preprocessor_config.json").write_text(json.dumps(LEGACY))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    p = SegformerImageProcessor.from_pretrained("acme/seg-proc", cache_dir=cache)
    assert p.do_reduce_labels is True and p.size == {"height": 512, "width": 512}
    with pytest.raises(CheckpointError, match="acme/missing: preprocessor_config.json is not in the local"):
        SegformerImageProcessor.from_pretrained("acme/missing", cache_dir=cache)


def test_bad_config_files(tmp_path):
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        SegformerImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        SegformerImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"w": 3}}))
    with pytest.raises(CheckpointError, match="size must have keys"):
        SegformerImageProcessor.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.zeros(5, np.uint8), ValueError, r"image 0: expected a 2-D or 3-D image .* got shape \(5,\)"),
        (np.zeros((1, 1, 2, 4, 4, 3), np.uint8), ValueError, "expected a 2-D or 3-D image"),
        (
            np.zeros((8, 8, 5), np.uint8),
            ValueError,
            r"shape \(8, 8, 5\) has no channel axis of size 1, 3 or 4",
        ),
        (torch.zeros(5, 8, 8), ValueError, r"shape \(5, 8, 8\) has no channel axis"),
        ({"not": "an image"}, TypeError, "image 0: unsupported type dict"),
        (np.zeros((4, 4, 3), np.complex64), ValueError, "unsupported pixel dtype complex64"),
        (np.full((4, 4, 3), 300, np.int32), ValueError, r"integer pixel values must lie in \[0, 255\]"),
        (np.full((4, 4, 3), np.nan, np.float32), ValueError, "NaN or infinite"),
    ],
)
def test_bad_images(image, error, message):
    with pytest.raises(error, match=message):
        SegformerImageProcessor(size=4)(image)


def test_bad_paths_name_the_file(tmp_path):
    p = SegformerImageProcessor(size=4)
    with pytest.raises(ValueError, match=r"no such image file: .*missing\.png"):
        p(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"cannot read .*notes\.txt as an image"):
        p(str(tmp_path / "notes.txt"))


def test_batch_errors(rng):
    p = SegformerImageProcessor(size=4)
    a, b = random_image(rng, 6, 6), random_image(rng, 7, 5)
    with pytest.raises(ValueError, match="got 2 images but 1 segmentation maps"):
        p([a, b], [np.zeros((6, 6), np.uint8)])
    with pytest.raises(ValueError, match=r"cannot stack pixel_values of different sizes .* return_tensors='pt'"):
        p([a, b], do_resize=False, return_tensors="pt")
    with pytest.raises(ValueError, match="no images given"):
        p([])
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['do_resise'\]"):
        p(a, do_resise=False)
    with pytest.raises(ValueError, match="return_tensors must be None or one of"):
        p(a, return_tensors="torch")
    with pytest.raises(ValueError, match="backend='torch' needs every image to be"):
        p(Image.fromarray(a), backend="torch")


@pytest.mark.parametrize("framework", ["tf", "jax"])
def test_missing_frameworks_are_a_clear_error(framework):
    module = {"tf": "tensorflow", "jax": "jax"}[framework]
    try:
        __import__(module)
        pytest.skip(f"{module} is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=f"return_tensors='{framework}' needs {module}, which is not installed"):
        SegformerImageProcessor(size=4)(np.zeros((4, 4, 3), np.uint8), return_tensors=framework)


@pytest.mark.parametrize(
    "seg, message",
    [
        (np.full((6, 6), -1, np.int64), "label values must be >= 0"),
        (np.full((6, 6), 1.5, np.float32), "label values must be integers"),
        (np.zeros((2, 2, 6, 6), np.uint8), r"must be 2-D \(H, W\)"),
        (Image.new("RGB", (6, 6)), "a RGB image has 3 bands"),
    ],
)
def test_bad_segmentation_maps(seg, message):
    image = np.zeros((6, 6, 3), np.uint8)
    for backend in ("pil", "torch"):
        pixels = image if backend == "pil" else torch.from_numpy(image).permute(2, 0, 1)
        with pytest.raises(ValueError, match=message):
            SegformerImageProcessor(size=4, backend=backend)(pixels, [seg])


def test_bad_options():
    with pytest.raises(ValueError, match="size must be a positive int"):
        SegformerImageProcessor(size=0)
    with pytest.raises(ValueError, match="resample must be a PIL filter"):
        SegformerImageProcessor(resample=9)
    with pytest.raises(ValueError, match="image_mean needs 1, 3 or 4 values"):
        SegformerImageProcessor(image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="backend must be one of"):
        SegformerImageProcessor(backend="cuda")
    with pytest.raises(ValueError, match="data_format must be one of"):
        SegformerImageProcessor(data_format="NHWC")


def test_post_processing_errors():
    p = SegformerImageProcessor()
    logits = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="got 1 target sizes for a batch of 2 logits"):
        p.post_process_semantic_segmentation(logits, target_sizes=[(8, 8)])
    with pytest.raises(TypeError, match="must have .logits"):
        p.post_process_semantic_segmentation(torch.zeros(3, 4, 4))
    # a flat pair and a None were TypeErrors from len(); rows of a (B, 2) tensor taken one by one were refused
    with pytest.raises(ValueError, match=r"one \(height, width\) per image, got the pair \(8, 6\): .* \[\(8, 6\)\]"):
        p.post_process_semantic_segmentation(logits, target_sizes=(8, 6))
    with pytest.raises(ValueError, match="target size 1 must be \\(height, width\\), got None"):
        p.post_process_semantic_segmentation(logits, target_sizes=[(8, 6), None])
    rows = list(torch.tensor([[8, 6], [5, 7]]))
    assert [m.shape for m in p.post_process_semantic_segmentation(logits, target_sizes=rows)] == [(8, 6), (5, 7)]


# ------------------------------------------------------------------------------------ torch fast path
def tolerance(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a - b).abs()
    return diff.max().item(), diff.mean().item()


def random_cases(rng, count):
    """(input h, w, output h, w): downscaling, upscaling and mixed, odd sizes."""
    for _ in range(count):
        h, w, oh, ow = (int(v) for v in rng.integers(9, 160, 4))
        yield h, w, {"height": oh, "width": ow}


def test_torch_path_tolerance_uint8_bilinear(rng):
    """uint8 BILINEAR, torch backend vs PIL backend, in normalised units.

    Measured over 150 random size pairs (noise images, 9..300 px): max 0.01751 (exactly one 8-bit level),
    mean 0.0012 (worst single case 0.0045); 6.7% of values differ by that one level (worst case 26%).
    Pure downscaling (e.g. 1024x768 -> 512x512) and pure upscaling are mostly exact; mixed directions and odd
    ratios differ on some pixels because torch's 8-bit kernel rounds its weights slightly differently from
    PIL. Labels are identical (NEAREST is an index gather reproducing PIL's coordinates).
    """
    p = SegformerImageProcessor()
    worst, means = 0.0, []
    for h, w, size in random_cases(rng, 24):
        images = torch.from_numpy(rng.integers(0, 256, (2, 3, h, w), dtype=np.uint8))
        maps = torch.from_numpy(rng.integers(0, 150, (2, h, w)))
        fast = p(images, maps, size=size, return_tensors="pt")  # auto → torch for a uint8 tensor batch
        explicit = p(images, maps, size=size, return_tensors="pt", backend="torch")
        assert torch.equal(fast.pixel_values, explicit.pixel_values)
        ref = p(images, maps, size=size, return_tensors="pt", backend="pil")
        high, mean = tolerance(fast.pixel_values, ref.pixel_values)
        worst, means = max(worst, high), [*means, mean]
        assert torch.equal(fast.labels, ref.labels)
    assert worst <= ONE_LEVEL * 1.0001 and max(means) < 0.008 and np.mean(means) < 0.003


def test_torch_path_tolerance_other_routes(rng):
    """Other routes of the torch backend against PIL, measured over 150 random size pairs:

    - float inputs: max ~4.4e-5 (both resize in float);
    - NEAREST images: exact (<= 5e-7 after normalising);
    - BICUBIC uint8: mean 0.0016 (worst case 0.0069), but single pixels of noise images differ by up to
      0.44, where PIL clips its intermediate 8-bit pass and torch does not;
    - uint8 through float32 and rounding (the CUDA route, run here on CPU): max one 8-bit level, mean 0.18
      of a level.
    """
    p = SegformerImageProcessor()
    for h, w, size in random_cases(rng, 8):
        images = rng.integers(0, 256, (2, 3, h, w), dtype=np.uint8)
        as_float = torch.from_numpy(images.astype(np.float32) / 255 * 0.98 + 0.01)
        kw = dict(size=size, return_tensors="pt", do_rescale=False)
        high, _ = tolerance(p(as_float, **kw).pixel_values, p(as_float, backend="pil", **kw).pixel_values)
        # not rounding: PIL and torch compute the filter weights by different formulas (measured 4.4e-5
        # over 150 size pairs, the same with the portable kernels); 2e-4 is still 1% of one 8-bit level
        assert high < 2e-4
        t = torch.from_numpy(images)
        for resample, max_bound, mean_bound in ((0, 1e-6, 1e-6), (3, 0.6, 0.012)):
            kw = dict(size=size, return_tensors="pt", resample=resample)
            high, mean = tolerance(p(t, **kw).pixel_values, p(t, backend="pil", **kw).pixel_values)
            assert high <= max_bound and mean <= mean_bound
        out_h, out_w = size["height"], size["width"]
        via_float = _torch_resize(t, out_h, out_w, 2, uint8_kernel=False)
        pil = [np.asarray(Image.fromarray(im.transpose(1, 2, 0)).resize((out_w, out_h), 2)) for im in images]
        diff = (via_float - torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2).float()).abs()
        assert diff.max() <= 1 and diff.mean() < 0.3


def test_torch_path_layouts_and_channels(rng):
    p = SegformerImageProcessor(size=(20, 12))
    hwc = rng.integers(0, 256, (3, 30, 25, 3), dtype=np.uint8)
    from_nhwc = p(torch.from_numpy(hwc), return_tensors="pt").pixel_values  # (B, H, W, C) batch
    listed = p([torch.from_numpy(x).permute(2, 0, 1) for x in hwc], return_tensors="pt").pixel_values
    assert from_nhwc.shape == (3, 3, 12, 20) and torch.equal(from_nhwc, listed)
    rgba = torch.from_numpy(rng.integers(0, 256, (2, 4, 30, 25), dtype=np.uint8))
    assert torch.equal(p(rgba, return_tensors="pt").pixel_values, p(rgba[:, :3], return_tensors="pt").pixel_values)
    gray = torch.from_numpy(rng.integers(0, 256, (2, 1, 30, 25), dtype=np.uint8))
    assert torch.equal(
        p(gray, return_tensors="pt").pixel_values,
        p(gray.expand(-1, 3, -1, -1), return_tensors="pt").pixel_values,
    )
    mixed = [torch.from_numpy(hwc[0]).permute(2, 0, 1), torch.zeros(3, 10, 40, dtype=torch.uint8)]
    assert p(mixed, return_tensors="pt").pixel_values.shape == (2, 3, 12, 20)  # different sizes, one by one
    auto_lanczos = p(gray, return_tensors="pt", resample=1).pixel_values  # LANCZOS: auto falls back to PIL
    assert torch.equal(auto_lanczos, p(gray, return_tensors="pt", resample=1, backend="pil").pixel_values)
    # a uint8 tensor whose both ends could be channels is channels-first on every route (a NumPy array would be
    # channels-last): the PIL route and a PIL-only filter read it as the torch route does
    chw = torch.from_numpy(rng.integers(0, 256, (3, 6, 3), dtype=np.uint8))
    first = p(chw, return_tensors="pt", backend="pil", input_data_format="channels_first").pixel_values
    assert torch.equal(p(chw, return_tensors="pt", backend="pil").pixel_values, first)
    assert torch.equal(
        p(chw, return_tensors="pt", resample=1).pixel_values,
        p(chw, return_tensors="pt", resample=1, backend="pil", input_data_format="channels_first").pixel_values,
    )
    assert (p(chw, return_tensors="pt").pixel_values - first).abs().max() <= 1e-5


def test_feature_extractor_positional_arguments_follow_its_documented_order():
    """docs: SegformerFeatureExtractor(do_resize, size, resample, do_normalize, image_mean, image_std,
    reduce_labels); the rescale options stay keywords."""
    fe = SegformerFeatureExtractor(True, 32, 2, False, [0.5] * 3, [0.2] * 3, True)
    assert fe.do_resize and fe.size == {"height": 32, "width": 32} and fe.do_normalize is False
    assert list(fe.image_mean) == [0.5] * 3 and list(fe.image_std) == [0.2] * 3 and fe.reduce_labels
    assert fe.do_rescale is True  # not taken by the 4th positional argument
    keyword = SegformerFeatureExtractor(do_rescale=False, rescale_factor=0.5)
    assert keyword.do_rescale is False and keyword.rescale_factor == 0.5


def test_an_image_without_pixels_is_an_error_naming_it():
    """Transformers' processor resizes a 0-pixel image into a full 512x512 picture; ours refuses it in every
    input form, naming the image."""
    from PIL import Image

    processor = SegformerImageProcessor()
    cases = [
        (np.zeros((0, 10, 3), np.uint8), "image 0: has no pixels (height x width 0x10)"),
        (Image.new("RGB", (0, 5)), "image 0: has no pixels (height x width 5x0)"),
        (torch.zeros(3, 0, 4, dtype=torch.uint8), "image 0: has no pixels (height x width 0x4)"),
        (torch.zeros(2, 3, 4, 0, dtype=torch.uint8), "images: has no pixels (height x width 4x0)"),
        ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 0, 3), np.uint8)], "image 1: has no pixels"),
    ]
    for images, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            processor(images, return_tensors="pt")


def test_transformers_call_forms_nested_lists_device_and_unused_kwargs(tmp_path, rng):
    """Nested lists of images, ``device=`` and ``from_pretrained(..., return_unused_kwargs=True)`` failed or
    returned another shape of result than Transformers' (audit)."""
    proc = SegformerImageProcessor(size=32)
    a, b, c = (random_image(rng, 40, 30) for _ in range(3))
    nested = proc([[a], [b, c]], return_tensors="pt").pixel_values
    assert torch.equal(nested, proc([a, b, c], return_tensors="pt").pixel_values)
    moved = proc(a, return_tensors="pt", device="cpu")
    assert moved.pixel_values.device.type == "cpu" and moved.pixel_values.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="device='cpu' moves torch tensors: pass return_tensors='pt'"):
        proc(a, return_tensors="np", device="cpu")
    proc.save_pretrained(tmp_path)
    loaded, unused = SegformerImageProcessor.from_pretrained(tmp_path, return_unused_kwargs=True, foo=1, size=48)
    assert unused == {"foo": 1} and loaded.size == {"height": 48, "width": 48}
    assert "foo" not in loaded.to_dict() and "return_unused_kwargs" not in loaded.to_dict()
    assert isinstance(SegformerImageProcessor.from_pretrained(tmp_path), SegformerImageProcessor)
