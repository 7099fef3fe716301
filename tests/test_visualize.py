"""Palettes, class names, label PNGs, overlays, side-by-side pictures and legends."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from segformer import SegformerConfig
from segformer.visualize import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    class_names,
    colorize,
    known_label_set,
    label_image,
    legend,
    make_palette,
    overlay,
    palette_for,
    side_by_side,
)


def test_builtin_palettes_have_the_standard_colours():
    assert ADE20K_PALETTE.shape == (150, 3) and ADE20K_PALETTE.dtype == np.uint8
    assert CITYSCAPES_PALETTE.shape == (19, 3) and CITYSCAPES_PALETTE.dtype == np.uint8
    assert ADE20K_PALETTE[0].tolist() == [120, 120, 120]  # wall
    assert ADE20K_PALETTE[2].tolist() == [6, 230, 230]  # sky
    assert ADE20K_PALETTE[149].tolist() == [92, 0, 255]  # flag
    assert CITYSCAPES_PALETTE[0].tolist() == [128, 64, 128]  # road
    assert CITYSCAPES_PALETTE[13].tolist() == [0, 0, 142]  # car
    assert CITYSCAPES_PALETTE[18].tolist() == [119, 11, 32]  # bicycle
    assert len(ADE20K_CLASSES) == 150 and len(CITYSCAPES_CLASSES) == 19
    with pytest.raises(ValueError, match="read-only"):
        ADE20K_PALETTE[0, 0] = 1  # module constants are read-only


def test_palette_for_recognises_hub_style_label_sets():
    # config.json spelling: string keys, the odd trailing space and renamed class.
    ade = {str(i): n for i, n in enumerate(ADE20K_CLASSES)}
    ade["7"], ade["89"] = "bed ", "television"
    assert known_label_set(ade) == "ade20k"
    assert np.array_equal(palette_for(ade), ADE20K_PALETTE)
    city = SegformerConfig(num_labels=19, id2label=dict(enumerate(CITYSCAPES_CLASSES))).id2label
    assert known_label_set(city) == "cityscapes"
    assert np.array_equal(palette_for(city), CITYSCAPES_PALETTE)
    palette_for(city)[0] = 0  # a copy: the built-in table is untouched
    assert CITYSCAPES_PALETTE[0].tolist() == [128, 64, 128]
    # Same size, other names: not Cityscapes; generic names of 150 classes: not ADE20K.
    assert known_label_set([f"thing {i}" for i in range(19)]) is None
    assert known_label_set({i: f"LABEL_{i}" for i in range(150)}) is None
    assert np.array_equal(palette_for({i: f"LABEL_{i}" for i in range(150)}), make_palette(150))


def test_make_palette_is_deterministic_and_well_separated():
    a, b = make_palette(40), make_palette(40)
    assert a.shape == (40, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(make_palette(40, seed=1), a)
    d = np.abs(a[:, None].astype(int) - a[None].astype(int)).sum(-1) + np.eye(40, dtype=int) * 999
    assert d.min() >= 12  # no two classes share (almost) the same colour
    assert np.array_equal(palette_for(7), make_palette(7))


def test_class_names_fill_gaps():
    assert class_names({0: "sky ", 1: "road"}) == ["sky", "road"]
    assert class_names({0: "sky"}, 3) == ["sky", "class_1", "class_2"]
    assert class_names(None, 2) == ["class_0", "class_1"]
    assert class_names({0: "a", 2: "b"}) == ["a", "class_1"]  # (keys as Transformers allows: names by index)


def test_colorize_and_overlay():
    palette = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    mask = np.array([[0, 1], [1, 255]])
    colours = colorize(mask, palette)
    assert colours.shape == (2, 2, 3) and colours[0, 0].tolist() == [255, 0, 0] and colours[1, 1].tolist() == [0, 0, 0]
    image = np.full((2, 2, 3), 100, np.uint8)
    assert np.array_equal(np.asarray(overlay(image, mask, palette, alpha=0.0)), image)
    full = overlay(Image.fromarray(image).convert("L"), mask, palette, alpha=1.0)  # any PIL mode is made RGB
    assert full.mode == "RGB" and np.array_equal(np.asarray(full), colours)
    half = np.asarray(overlay(image, mask, palette, alpha=0.5))
    assert half[0, 0].tolist() == [178, 50, 50]  # 0.5 * 100 + 0.5 * 255 rounds to 178
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, mask, palette, alpha=1.5)
    with pytest.raises(ValueError, match="mask"):
        overlay(np.zeros((3, 3, 3), np.uint8), mask, palette)


def _png_roundtrip(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out


def test_label_image_is_lossless_with_a_palette():
    mask = np.random.default_rng(0).integers(0, 150, (17, 23))
    back = _png_roundtrip(label_image(mask, ADE20K_PALETTE))
    assert back.mode == "P" and back.size == (23, 17)
    assert np.array_equal(np.asarray(back), mask)  # pixel value = class id
    assert back.getpalette()[:6] == [120, 120, 120, 180, 120, 120]
    big = np.random.default_rng(1).integers(0, 1000, (9, 11))  # > 256 classes: 16-bit grayscale
    back16 = _png_roundtrip(label_image(big))
    assert back16.mode.startswith("I") and np.array_equal(np.asarray(back16), big)
    with pytest.raises(ValueError, match="0 … 65535"):
        label_image(np.array([[-1, 0]]))


def test_side_by_side_and_legend():
    a, b = Image.new("RGB", (10, 8), (255, 0, 0)), np.zeros((6, 5, 3), np.uint8)
    pic = side_by_side([a, b], gap=3)
    assert pic.size == (18, 8) and pic.mode == "RGB"
    assert pic.getpixel((0, 0)) == (255, 0, 0) and pic.getpixel((13, 0)) == (0, 0, 0)
    assert pic.getpixel((11, 0)) == (255, 255, 255)  # the gap
    small = legend(["sky", "road", "car"], make_palette(3))
    big = legend(list(ADE20K_CLASSES), ADE20K_PALETTE)
    assert small.mode == "RGB" and big.width > small.width and big.height > small.height
    colours = {tuple(c) for c in np.asarray(small).reshape(-1, 3).tolist()}
    assert all(tuple(c) in colours for c in make_palette(3).tolist())  # every swatch is drawn
    assert (np.asarray(small) < 100).all(-1).sum() > 20  # and some dark text
    two = legend(list(ADE20K_CLASSES), ADE20K_PALETTE, ids=[2, 12])
    assert two.height < big.height
    assert tuple(ADE20K_PALETTE[12]) in {tuple(c) for c in np.asarray(two).reshape(-1, 3).tolist()}


def test_renamed_classes_compare_names_up_to_spelling():
    """eval's check of a checkpoint's names against the data's: another order is named; a spelling ("Wall") and
    the published ADE20K configs' renames ("television" for "television receiver") are not."""
    from segformer.labels import ADE20K_CLASSES
    from segformer.visualize import renamed_classes

    assert renamed_classes(["a", "b"], ["b", "a"]) == [(0, "a", "b"), (1, "b", "a")]
    assert renamed_classes({0: "Wall", 1: "sky "}, ["wall", "sky"]) == []
    hub = list(ADE20K_CLASSES)
    hub[89] = "television"
    assert renamed_classes(hub, ADE20K_CLASSES) == []
