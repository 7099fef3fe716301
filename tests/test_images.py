"""The one image-input layer (segformer.images): every entry point gives the same pixels for the same picture,
and bad files fail with one clear reason."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from segformer import SegformerForSemanticSegmentation, SegformerImageProcessor
from segformer.data import build_dataset
from segformer.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    array_to_image,
    load_image,
    normalize,
    normalize_table,
    open_image,
)
from segformer.predict import SegformerPredictor


@pytest.fixture
def picture() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)


def test_normalize_is_the_table_and_the_formula(picture):
    out = normalize(picture)
    assert out.shape == (3, 40, 56) and out.dtype == np.float32
    # Transformers' arithmetic: rescale in float64 then cast, normalise in float32
    scaled = (picture.astype(np.float64) / 255).astype(np.float32)
    expected = (scaled - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    assert np.array_equal(out, expected.transpose(2, 0, 1))
    assert np.array_equal(normalize(picture, channels_first=False), expected)
    assert not normalize_table().flags.writeable  # shared by every caller: read-only
    with pytest.raises(ValueError, match="uint8 RGB"):
        normalize(picture.astype(np.float32))


def test_every_entry_point_gives_the_same_pixels(picture, tmp_path):
    """The processor (no resize), the predictor, the data sets and normalize(): bit for bit."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(picture).save(root / "images" / split / "a.png")
        Image.fromarray(np.zeros((40, 56), np.uint8)).save(root / "annotations" / split / "a.png")
    (root / "labels.json").write_text('{"0": "thing"}')
    reference = normalize(picture)

    processor = SegformerImageProcessor(do_resize=False)
    for source in (picture, Image.fromarray(picture), str(root / "images" / "val" / "a.png")):
        assert np.array_equal(processor(source, return_tensors="np").pixel_values[0], reference)

    model = tmp_path / "model"
    SegformerForSemanticSegmentation(
        SegformerForSemanticSegmentation.config_class(
            depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4],
            decoder_hidden_size=16, num_labels=1,
        )
    ).save_pretrained(model)  # fmt: skip
    predictor = SegformerPredictor(str(model), device="cpu")
    for source in (picture, Image.fromarray(picture), root / "images" / "val" / "a.png"):
        assert torch.equal(predictor.preprocess(predictor.load(source)), torch.from_numpy(reference))

    dataset, _ = build_dataset(root, "val")
    pixels, _ = dataset[0]
    assert torch.equal(pixels, torch.from_numpy(reference))


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([[0, 128, 255]], np.uint8), [0, 128, 255]),
        (np.array([[0, 257 * 128, 65535]], np.uint16), [0, 128, 255]),  # 16 bits: / 257
        (np.array([[False, True, True]]), [0, 255, 255]),
        (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # floats up to 1: [0, 1], x 255
        (np.array([[0.0, 127.6, 255.0]], np.float64), [0, 128, 255]),  # other floats: [0, 255], rounded
        (np.array([[3, 100, 250]], np.int64), [3, 100, 250]),  # other integers: 0..255 as they are
        (np.array([[0.0, 1.0, 1.0]], np.float32), [0, 255, 255]),  # integral, but max <= 1: [0, 1]
    ],
)
def test_array_dtype_policy(array, expected):
    image = array_to_image(array)
    assert np.asarray(image.convert("L"))[0].tolist() == expected
    assert np.asarray(load_image(array))[0, :, 0].tolist() == expected  # the predictor's path


@pytest.mark.parametrize(
    "array, message",
    [
        (np.array([[-5, 100, 300]], np.int64), r"integer pixel values must lie in \[0, 255\], got \[-5, 300\]"),
        (np.array([[0, 70000]], np.int32), r"must lie in \[0, 255\]"),
        (np.array([[0.5, np.nan]], np.float32), "NaN or infinite"),
        (np.array([[-0.2, 0.5]], np.float32), "float pixel values must lie in"),
        (np.array([[2.5, 300.0]], np.float32), "got max 300"),
        (np.zeros((4, 4, 3), np.complex64), "unsupported pixel dtype"),
        (np.zeros((5, 5, 7), np.uint8), "no channel axis"),
    ],
)
def test_out_of_range_pixels_are_errors_never_clipped(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_the_processor_shares_the_integer_rules_and_keeps_floats_for_do_rescale():
    processor = SegformerImageProcessor(do_resize=False, do_normalize=False)
    with pytest.raises(ValueError, match=r"must lie in \[0, 255\]"):
        processor(np.array([[[-5, 100, 300]] * 3] * 3, np.int64).transpose(1, 2, 0))
    wide = np.array([[0, 257 * 128, 65535]], np.uint16)
    assert np.array_equal(processor(wide, return_tensors="np").pixel_values[0, 0, 0] * 255, [0, 128, 255])
    floats = np.full((4, 4, 3), 0.5, np.float32)  # the processor takes floats as given (do_rescale decides)
    assert np.allclose(processor(floats, do_rescale=False, return_tensors="np").pixel_values, 0.5)


def test_bad_files_fail_with_one_reason(tmp_path, picture):
    encoded = io.BytesIO()
    Image.fromarray(picture).save(encoded, format="PNG")
    data = encoded.getvalue()
    assert np.array_equal(np.asarray(open_image(data)), picture)  # bytes decode like files
    with pytest.raises(ImageError, match="empty file"):
        open_image(b"")
    if hasattr(os, "mkfifo"):  # (it was "empty file": audit)
        os.mkfifo(tmp_path / "pipe.png")
        with pytest.raises(ImageError, match=r"not a regular file \(a pipe, socket or device\)"):
            open_image(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match="^no such file, and no file matches it as a pattern$"):
        open_image(tmp_path / "*.xyz")
    with pytest.raises(ImageError, match="^no such file$"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"plain text, not a picture")
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot decode"):
        open_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="over the limit of 1,000"):
        open_image(data, max_pixels=1000)  # 40 x 56 = 2,240 pixels
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "missing.png")
