"""Paired image/mask transforms: the paper's train pipeline and the evaluation input pipeline.

Every transform takes and returns ``(image, mask)`` with ``image`` a (H, W, 3) uint8 array (float32 and
normalised after :class:`Normalize`) and ``mask`` a (H, W) integer array of class ids, and draws its random
numbers from the ``rng`` (a ``numpy.random.Generator``) it is given. Geometric steps touch both arrays the
same way; masks are resized with NEAREST and padded with the ignore index, so a mask pixel always labels the
image pixel under it. The train pipeline (the paper's, from the NVlabs/mmseg ADE20K and Cityscapes configs):

resize keeping the ratio to ``scale`` × a random ratio in ``ratio_range`` → random crop to ``crop_size``
(up to 10 tries so that no class covers more than ``cat_max_ratio`` of the valid pixels) → horizontal flip
(p = 0.5) → photometric distortion → normalise → pad to the crop size (image 0, mask ignore index).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..images import IMAGENET_MEAN, IMAGENET_STD, normalize


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side ≤ max(scale) and short side ≤ min(scale).
    Returns (height, width)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def resize_pair(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize to (height, width): the image with PIL's bilinear filter (which averages when shrinking, where
    mmseg's cv2 samples 2×2 pixels: kept, see README), the mask with NEAREST (no new class ids)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, mask
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    # Mode "I" keeps ids above 255 intact; NEAREST picks the source pixel, never a blend.
    msk = np.asarray(Image.fromarray(mask.astype(np.int32)).resize((w, h), Image.NEAREST)).astype(mask.dtype)
    return img, msk


class RandomResize:
    """Resize keeping the ratio to ``scale`` (long, short) × a ratio drawn from ``ratio_range``. With
    ``scale=None`` the ratio multiplies the image's own size."""

    def __init__(self, scale: tuple[int, int] | None = (2048, 512), ratio_range: tuple[float, float] = (0.5, 2.0)):
        self.scale, self.ratio_range = scale, ratio_range

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        lo, hi = self.ratio_range
        ratio = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
        h, w = image.shape[:2]
        if self.scale is None:
            size = (max(int(h * ratio + 0.5), 1), max(int(w * ratio + 0.5), 1))
        else:
            size = rescale_size(h, w, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        return resize_pair(image, mask, size)


class RandomCrop:
    """Crop ``crop_size`` (height, width) at a random place (the whole side when the image is smaller); up to
    10 tries to find a crop where no single class covers more than ``cat_max_ratio`` of the valid pixels."""

    def __init__(self, crop_size: tuple[int, int], cat_max_ratio: float = 0.75, ignore_index: int = 255):
        self.crop_size, self.cat_max_ratio, self.ignore_index = tuple(crop_size), cat_max_ratio, ignore_index

    def _box(self, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, int, int, int]:
        h, w = shape[:2]
        ch, cw = self.crop_size
        y = int(rng.integers(0, max(h - ch, 0) + 1))
        x = int(rng.integers(0, max(w - cw, 0) + 1))
        return y, min(y + ch, h), x, min(x + cw, w)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        y1, y2, x1, x2 = self._box(image.shape, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = mask[y1:y2, x1:x2]
                _, counts = np.unique(crop[crop != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                y1, y2, x1, x2 = self._box(image.shape, rng)
        return image[y1:y2, x1:x2], mask[y1:y2, x1:x2]


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        if rng.random() < self.prob:
            return image[:, ::-1], mask[:, ::-1]
        return image, mask


class PhotoMetricDistortion:
    """mmseg's photometric distortion, each step with p = 0.5: brightness (add ±``brightness_delta``),
    contrast (× [0.5, 1.5]) before or after (random order) saturation (× [0.5, 1.5]) and hue (±``hue_delta``
    degrees of 180, in PIL's 0–255 hue scale). Image only; uint8 in and out."""

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range, self.hue_delta = (
            contrast_range,
            saturation_range,
            hue_delta,
        )

    @staticmethod
    def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        img = image
        if rng.integers(2):
            img = self._convert(img, beta=float(rng.uniform(-self.brightness_delta, self.brightness_delta)))
        contrast_first = bool(rng.integers(2))
        if contrast_first and rng.integers(2):
            img = self._convert(img, alpha=float(rng.uniform(*self.contrast_range)))
        do_sat, do_hue = bool(rng.integers(2)), bool(rng.integers(2))
        sat = float(rng.uniform(*self.saturation_range)) if do_sat else 1.0
        hue = int(rng.integers(-self.hue_delta, self.hue_delta + 1)) if do_hue else 0
        if do_sat or do_hue:
            hsv = np.array(Image.fromarray(np.ascontiguousarray(img)).convert("HSV"))
            if do_sat:
                hsv[..., 1] = self._convert(hsv[..., 1], alpha=sat)
            if do_hue:
                hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(hue * 256 / 180)) % 256).astype(np.uint8)
            img = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
        if not contrast_first and rng.integers(2):
            img = self._convert(img, alpha=float(rng.uniform(*self.contrast_range)))
        return img, mask


class Normalize:
    """uint8 (H, W, 3) → float32 (H, W, 3): /255, minus ``mean``, divided by ``std``
    (:func:`segformer.images.normalize`: the same bits as the predictor and the image processor)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None):
        return normalize(image, self.mean, self.std, channels_first=False), mask


class Pad:
    """Pad bottom/right to ``size`` (height, width): the image with 0 (the mean colour once normalised), the
    mask with the ignore index (so the padding adds nothing to the loss)."""

    def __init__(self, size: tuple[int, int], ignore_index: int = 255):
        self.size, self.ignore_index = tuple(size), ignore_index

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None):
        h, w = image.shape[:2]
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
            mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=self.ignore_index)
        return image, mask


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) float image and (H, W) mask → (3, H, W) float32 and (H, W) int64 tensors."""
    pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
    return pixels, torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))


class Compose:
    """Apply paired transforms in order, then convert to tensors: ``(image, mask, rng) → (pixels, labels)``."""

    def __init__(self, steps: Sequence):
        self.steps = list(steps)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for step in self.steps:
            image, mask = step(image, mask, rng)
        return to_tensors(image, mask)

    def __repr__(self) -> str:
        return f"Compose({', '.join(type(s).__name__ for s in self.steps)})"


def train_transform(
    crop_size: tuple[int, int] = (512, 512),
    *,
    scale: tuple[int, int] | None = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
) -> Compose:
    """The paper's train pipeline; the output is (3, crop_h, crop_w) float32 and (crop_h, crop_w) int64."""
    steps: list = [RandomResize(scale, ratio_range), RandomCrop(crop_size, cat_max_ratio, ignore_index)]
    if flip_prob > 0:
        steps.append(RandomFlip(flip_prob))
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [Normalize(mean, std), Pad(crop_size, ignore_index)]
    return Compose(steps)


def eval_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Compose:
    """Evaluation input: the image at its own size, normalised; the mask untouched. The test-time resizing
    (whole / aligned / slide, the published protocols) happens in :func:`segformer.inference.infer`, which returns
    predictions at the mask's size."""
    return Compose([Normalize(mean, std)])


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "Normalize",
    "Pad",
    "PhotoMetricDistortion",
    "RandomCrop",
    "RandomFlip",
    "RandomResize",
    "eval_transform",
    "rescale_size",
    "resize_pair",
    "to_tensors",
    "train_transform",
]
