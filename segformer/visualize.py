"""Palettes, colourised label maps and overlays."""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """A deterministic (num_classes, 3) uint8 palette of well-separated colours (golden-ratio hues)."""
    hues = (np.arange(num_classes) * 0.6180339887498949 + seed * 0.1) % 1.0
    sat = 0.65 + 0.35 * ((np.arange(num_classes) // 7) % 2)
    val = 0.95 - 0.3 * ((np.arange(num_classes) // 3) % 2)
    hsv = np.stack([hues * 255, sat * 255, val * 255], axis=1).astype(np.uint8)[None]
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))[0]


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids → (H, W, 3) uint8 colours; ids outside the palette (e.g. 255) become black."""
    mask = np.asarray(mask)
    lut = np.zeros((max(int(mask.max(initial=0)) + 1, len(palette)), 3), np.uint8)
    lut[: len(palette)] = palette
    return lut[mask]


def overlay(image: Image.Image | np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend the colourised mask over the RGB image: (1 - alpha) * image + alpha * colours."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    colours = colorize(mask, palette).astype(np.float32)
    if rgb.shape[:2] != colours.shape[:2]:
        raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but the mask is {colours.shape[1]}x{colours.shape[0]}")
    return Image.fromarray(np.clip((1 - alpha) * rgb + alpha * colours + 0.5, 0, 255).astype(np.uint8))
