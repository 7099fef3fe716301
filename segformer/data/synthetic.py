"""A procedural segmentation data set that needs no download, in the folder layout.

Each image has a smooth two-colour gradient background (class 0) and 2–4 overlapping shapes (ellipses and
rotated rectangles) filled with one of three textures: stripes (class 1), a checkerboard (class 2) or dots
(class 3), at random orientation and scale. Every colour is drawn at random per instance, so no colour says
anything about the class: a model has to learn the classes from texture and shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import atomic_save_image, atomic_write_text

CLASSES = ("background", "stripes", "checkerboard", "dots")


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours at least ~110 apart in mean absolute difference (textures must stay visible)."""
    while True:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(a - b).mean() > 110:
            return a.astype(np.float32), b.astype(np.float32)


def _rotated(yy: np.ndarray, xx: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * xx + s * yy, -s * xx + c * yy


def _texture(kind: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) in [0, 1]: the pattern of texture class ``kind`` (1 stripes, 2 checkerboard, 3 dots)."""
    u, v = _rotated(yy, xx, rng.uniform(0, np.pi))
    if kind == 1:
        period = rng.uniform(6, 12)
        return (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    if kind == 2:
        cell = rng.uniform(4, 8)
        return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
    spacing = rng.uniform(6, 10)
    radius = rng.uniform(1.4, 0.3 * spacing)
    du = (u % spacing) - spacing / 2
    dv = (v % spacing) - spacing / 2
    return (du**2 + dv**2 < radius**2).astype(np.float32)


def _shape(yy: np.ndarray, xx: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool: a random ellipse or rotated rectangle covering roughly 5–30 % of the image."""
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    ry, rx = rng.uniform(0.15, 0.35, 2) * size
    u, v = _rotated(yy - cy, xx - cx, rng.uniform(0, np.pi))
    if rng.random() < 0.5:
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1
    return (np.abs(u) <= rx * 0.85) & (np.abs(v) <= ry * 0.85)


def make_sample(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """One (image (size, size, 3) uint8, mask (size, size) uint8) pair with classes 0..3 (see module doc)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a, b = _contrasting_colours(rng) if rng.random() < 0.5 else (rng.integers(0, 256, 3), rng.integers(0, 256, 3))
    u, _ = _rotated(yy, xx, rng.uniform(0, 2 * np.pi))
    t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    image = (1 - t)[..., None] * np.asarray(a, np.float32) + t[..., None] * np.asarray(b, np.float32)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        kind = int(rng.integers(1, len(CLASSES)))
        region = _shape(yy, xx, size, rng)
        fg, bg = _contrasting_colours(rng)
        pattern = _texture(kind, yy, xx, rng)[..., None]
        image = np.where(region[..., None], pattern * fg + (1 - pattern) * bg, image)
        mask[region] = kind
    image = image + rng.normal(0, 6, image.shape)  # sensor-like noise: "smooth" is not "exactly flat"
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask


def write_synthetic_dataset(
    root: str | os.PathLike, *, num_train: int = 400, num_val: int = 100, size: int = 96, seed: int = 0
) -> Path:
    """Write ``root/images/{train,val}/NNNNN.png``, ``root/annotations/{train,val}/NNNNN.png`` and
    ``root/labels.json``; the same seed gives the same files. Returns ``root``."""
    if num_train < 1 or num_val < 0 or size < 32:
        raise ValueError(f"need num_train >= 1, num_val >= 0 and size >= 32; got {num_train}, {num_val}, {size}")
    root = Path(root)
    for split, count, split_seed in (("train", num_train, 0), ("val", num_val, 1)):
        image_dir, mask_dir = root / "images" / split, root / "annotations" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, split_seed])
        for i in range(count):
            image, mask = make_sample(rng, size)
            atomic_save_image(image_dir / f"{i:05d}.png", Image.fromarray(image), "PNG")
            atomic_save_image(mask_dir / f"{i:05d}.png", Image.fromarray(mask), "PNG")
    atomic_write_text(root / "labels.json", json.dumps(dict(enumerate(CLASSES)), indent=2) + "\n")
    return root


__all__ = ["CLASSES", "make_sample", "write_synthetic_dataset"]
