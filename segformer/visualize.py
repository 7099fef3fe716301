"""Palettes, class names, colourised label maps, overlays, side-by-side pictures and legends.

Label maps are (H, W) integer arrays of class ids; a palette is a (K, 3) uint8 array whose row k is the RGB
colour of class k. ADE20K (150 classes) and Cityscapes (19 classes) have their standard colours built in;
:func:`palette_for` recognises those label sets from a model's ``id2label`` and gives every other label set
a deterministic palette of well-separated colours (:func:`make_palette`).

>>> palette = palette_for(model.config.id2label)
>>> overlay(image, labels, palette, alpha=0.5).save("overlay.jpg")
>>> legend(class_names(model.config.id2label), palette).save("legend.png")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .labels import ADE20K_CLASSES, CITYSCAPES_CLASSES

# The standard ADE20K colours (those of the SceneParse150 benchmark tools and mmseg), class id order, RGB hex.
_ADE20K_HEX = """
787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 96053d 787846 08ff33
ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff
08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff
eb0cff a09614 00a3ff 8c8c8c fa0a0f 14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff
0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00 0052ff 00ff29 00ffad
0a00ff adff00 00ff99 ff5c00 ff00ff ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2
00ff52 000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00 08b8aa
8500ff 00ff5c b800ff ff001f 00b8ff 00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3
ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00 00ccff 1400ff ffff00 0099ff 0029ff
00ffcc 2900ff 29ff00 ad00ff 00f5ff 4700ff 7a00ff 00ffb8 005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff
"""

# The official Cityscapes colours of the 19 evaluated classes (cityscapesScripts' labels.py), trainId order.
_CITYSCAPES_HEX = """
804080 f423e8 464646 66669c be9999 999999 faaa1e dcdc00 6b8e23 98fb98 4682b4 dc143c ff0000 00008e 000046
003c64 005064 0000e6 770b20
"""


def _parse_hex(table: str) -> np.ndarray:
    """Whitespace-separated RRGGBB codes → (N, 3) uint8."""
    return np.array([[int(c[i : i + 2], 16) for i in (0, 2, 4)] for c in table.split()], dtype=np.uint8)


ADE20K_PALETTE: np.ndarray = _parse_hex(_ADE20K_HEX)  # (150, 3) uint8
CITYSCAPES_PALETTE: np.ndarray = _parse_hex(_CITYSCAPES_HEX)  # (19, 3) uint8
ADE20K_PALETTE.flags.writeable = False  # shared module constants: a caller's edit would recolour every run
CITYSCAPES_PALETTE.flags.writeable = False
assert ADE20K_PALETTE.shape == (150, 3) and CITYSCAPES_PALETTE.shape == (19, 3)

KNOWN_LABEL_SETS: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
    "ade20k": (ADE20K_CLASSES, ADE20K_PALETTE),
    "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
}


def make_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """A deterministic (num_classes, 3) uint8 palette of well-separated colours (golden-ratio hues)."""
    hues = (np.arange(num_classes) * 0.6180339887498949 + seed * 0.1) % 1.0
    sat = 0.65 + 0.35 * ((np.arange(num_classes) // 7) % 2)
    val = 0.95 - 0.3 * ((np.arange(num_classes) // 3) % 2)
    hsv = np.stack([hues * 255, sat * 255, val * 255], axis=1).astype(np.uint8)[None]
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))[0]


# ------------------------------------------------------------------------------------------ label sets
def _names_list(id2label: Mapping[int, str] | Sequence[str]) -> list[str]:
    """id2label (int or str keys, as in config.json) or a list of names → names in class-id order."""
    if isinstance(id2label, Mapping):  # (keys other than 0..n-1, which Transformers allows: "" where none names k)
        items = {int(k): str(v) for k, v in id2label.items()}
        return [items.get(i, "") for i in range(len(items))]
    return [str(name) for name in id2label]


def _normalise(name: str) -> str:
    # "bed ", "Wall", "building;edifice" and "building, edifice" all name the same class.
    return name.split(";")[0].split(",")[0].strip().lower().replace("_", " ")


def known_label_set(id2label: Mapping[int, str] | Sequence[str]) -> str | None:
    """ "ade20k" or "cityscapes" when the names are (up to spelling) those of that benchmark in its class
    order, else None. At least 80 % of the names must match, which tolerates the odd renamed class of the
    published configs ("television receiver" / "television", "bed " with a trailing space)."""
    names = [_normalise(n) for n in _names_list(id2label)]
    for key, (reference, _) in KNOWN_LABEL_SETS.items():
        if len(names) == len(reference):
            hits = sum(a == _normalise(b) for a, b in zip(names, reference, strict=True))
            if hits >= 0.8 * len(reference):
                return key
    return None


def renamed_classes(
    first: Mapping[int, str] | Sequence[str], second: Mapping[int, str] | Sequence[str]
) -> list[tuple[int, str, str]]:
    """``(id, first's name, second's name)`` for each class two label sets name otherwise, up to spelling
    (:func:`_normalise`); none where both are one benchmark's set (:func:`known_label_set`: the published configs
    rename a few of its classes), and ids only one of them names are not compared."""
    a, b = _names_list(first), _names_list(second)
    if known_label_set(a) is not None and known_label_set(a) == known_label_set(b):
        return []
    return [(i, x, y) for i, (x, y) in enumerate(zip(a, b, strict=False)) if _normalise(x) != _normalise(y)]


def palette_for(id2label: Mapping[int, str] | Sequence[str] | int) -> np.ndarray:
    """The (K, 3) uint8 palette for a label set: the standard colours of ADE20K or Cityscapes when
    ``id2label`` (or a list of names) is recognised as one of them, else :func:`make_palette` (K). An int
    gives make_palette of that size."""
    if isinstance(id2label, int):
        return make_palette(id2label)
    key = known_label_set(id2label)
    if key is not None:
        return KNOWN_LABEL_SETS[key][1].copy()
    return make_palette(len(_names_list(id2label)))


def class_names(id2label: Mapping[int, str] | Sequence[str] | None, num_labels: int | None = None) -> list[str]:
    """Class names in id order, stripped; "class_k" where id2label has no name (or is None)."""
    names = _names_list(id2label) if id2label else []
    n = len(names) if num_labels is None else num_labels
    return [names[i].strip() if i < len(names) and names[i].strip() else f"class_{i}" for i in range(n)]


# ------------------------------------------------------------------------------------------ pictures
def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids → (H, W, 3) uint8 colours; ids outside the palette (e.g. 255) become black."""
    mask = np.asarray(mask)
    lut = np.zeros((max(int(mask.max(initial=0)) + 1, len(palette)), 3), np.uint8)
    lut[: len(palette)] = palette
    return lut[mask]


def overlay(image: Image.Image | np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend the colourised mask over the RGB image: (1 - alpha) * image + alpha * colours. Returns RGB."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    colours = colorize(mask, palette).astype(np.float32)
    if rgb.shape[:2] != colours.shape[:2]:
        raise ValueError(
            f"image is {rgb.shape[1]}x{rgb.shape[0]} but the mask is {colours.shape[1]}x{colours.shape[0]}"
        )
    return Image.fromarray(np.clip((1 - alpha) * rgb + alpha * colours + 0.5, 0, 255).astype(np.uint8))


def side_by_side(
    images: Sequence[Image.Image | np.ndarray],
    *,
    gap: int = 8,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Place RGB pictures left to right, ``gap`` pixels apart, top-aligned. Returns one RGB image."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    pics = [(im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))).convert("RGB") for im in images]
    width = sum(p.width for p in pics) + gap * (len(pics) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in pics)), background)
    x = 0
    for p in pics:
        canvas.paste(p, (x, 0))
        x += p.width + gap
    return canvas


def label_image(mask: np.ndarray, palette: np.ndarray | None = None) -> Image.Image:
    """A lossless image of the (H, W) class ids for saving as PNG: pixel value = class id.

    Ids up to 255 give a palette ("P") image, coloured by ``palette`` (so viewers show colours while
    ``np.asarray(Image.open(path))`` gives the ids back); larger ids need a 16-bit grayscale ("I;16")
    image, which has no palette. Ids above 65535 or below 0 raise ValueError."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"label map must be (height, width), got shape {mask.shape}")
    low, high = int(mask.min(initial=0)), int(mask.max(initial=0))
    if low < 0 or high > 65535:
        raise ValueError(f"label ids must be in 0 … 65535 to be written as PNG, got {low} … {high}")
    if high <= 255 and (palette is None or len(palette) <= 256):
        u8 = np.ascontiguousarray(mask, dtype=np.uint8)
        img = Image.frombytes("P", (u8.shape[1], u8.shape[0]), u8.tobytes())
        lut = np.zeros((256, 3), np.uint8)
        if palette is not None:
            lut[: len(palette)] = palette
        img.putpalette(lut.reshape(-1).tolist())
        return img
    return Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint16))  # uint16 → mode "I;16"


def plot_text(text: str) -> str:
    """``text`` as matplotlib shows it literally: a ``$`` pair would be read as mathtext (a class named "price $5
    and $10" lost its dollars, "a $x^$ b" stopped the report with a parse error)."""
    return str(text).replace("$", r"\$")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1: a scalable font bundled with Pillow
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def legend(
    names: Sequence[str],
    palette: np.ndarray,
    *,
    ids: Sequence[int] | None = None,
    rows_per_column: int = 50,
    font_size: int = 14,
) -> Image.Image:
    """An RGB legend: one colour swatch and "id name" per class, in columns of ``rows_per_column``.

    ``ids`` picks and orders the classes to show (default: all of them)."""
    ids = list(range(len(names))) if ids is None else [int(i) for i in ids]
    if not ids:
        raise ValueError("legend needs at least one class")
    font = _font(font_size)
    labels = [f"{i} {names[i] if i < len(names) else f'class_{i}'}" for i in ids]
    text_w = max(int(np.ceil(font.getlength(t))) for t in labels)
    row_h, swatch, pad = font_size + 6, font_size + 2, 6
    col_w = pad + swatch + pad + text_w + 2 * pad
    n_cols = -(-len(ids) // rows_per_column)
    n_rows = min(len(ids), rows_per_column)
    canvas = Image.new("RGB", (n_cols * col_w, n_rows * row_h + 2 * pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (cid, text) in enumerate(zip(ids, labels, strict=True)):
        x, y = (k // rows_per_column) * col_w + pad, (k % rows_per_column) * row_h + pad
        colour = tuple(int(c) for c in palette[cid]) if cid < len(palette) else (0, 0, 0)
        draw.rectangle([x, y + 2, x + swatch - 1, y + 2 + swatch - 1], fill=colour, outline=(0, 0, 0))
        draw.text((x + swatch + pad, y + 2), text, fill=(0, 0, 0), font=font)
    return canvas


__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "class_names",
    "colorize",
    "known_label_set",
    "label_image",
    "legend",
    "make_palette",
    "overlay",
    "palette_for",
    "plot_text",
    "side_by_side",
]
