"""The 16 image corruptions of the SegFormer paper's robustness study (Cityscapes-C), at 5 severities each.

The study (Xie et al. 2021, after Kamann & Rother 2020) corrupts the validation images with the corruptions of
ImageNet-C (Hendrycks & Dietterich 2019) as generalised to images of any size by Michaelis et al. 2019 (the
``imagecorruptions`` package), in four groups:

=========  =====================================================================
noise      gaussian_noise, shot_noise, impulse_noise, speckle_noise
blur       defocus_blur, glass_blur, motion_blur, gaussian_blur
weather    snow, spatter, fog, frost
digital    brightness, contrast, saturate, jpeg_compression
=========  =====================================================================

The paper evaluates the noise corruptions at severities 1–3 and the others at 1–5 (:data:`PAPER_SEVERITIES`).
Every corruption here follows its published definition and per-severity parameter table (:data:`PARAMETERS`),
written for this package, with these deliberate differences:

- randomness comes only from the ``numpy.random.Generator`` passed in (:func:`corruption_rng` seeds one from
  the image index, the corruption and the severity), never from a global state, so a corrupted image is a
  function of (image, corruption, severity, seed);
- ``frost`` blends a random crop of one of five procedurally generated ice "photographs" (a fractal haze with
  branching crystals, 1024x2048, :func:`frost_photo`) instead of the package's frost photographs, chosen, cropped
  and (for larger images) enlarged as the package does, with the published blend weights;
- ``spatter``'s water drops take the Canny edges of the drop layer as the layer's boundary (the layer jumps
  from 0 to at least 0.65·255 there, far above Canny's thresholds, and varies little inside a drop) and an
  exact Euclidean distance transform;
- ``motion_blur`` renormalises its kernel when the streak would leave a tiny image (the published code then
  darkens the image);
- ``glass_blur`` reproduces the published pixel "swap", which numpy's views make a copy: in reverse raster
  order each pixel takes the value of a random neighbour within ``delta`` (offsets in [-delta, delta - 1]);
- results are rounded to the nearest 8-bit level (the package truncates).

Each corruption takes an (H, W, 3) uint8 RGB image and returns a new (H, W, 3) uint8 image; the input is never
modified. Needs scipy (``pip install "segformer[robustness]"``) for the filters, imported on first use.

>>> from segformer.corruptions import corrupt, corruption_rng
>>> foggy = corrupt(image, "fog", 3, rng=corruption_rng(index=0, name="fog", severity=3))
"""

from __future__ import annotations

import functools
import io
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "gaussian_blur"),
    "weather": ("snow", "spatter", "fog", "frost"),
    "digital": ("brightness", "contrast", "saturate", "jpeg_compression"),
}
CORRUPTION_NAMES: tuple[str, ...] = tuple(name for names in CATEGORIES.values() for name in names)
SEVERITIES = (1, 2, 3, 4, 5)
# The paper's study: noise at the first three severities only, everything else at all five.
PAPER_SEVERITIES: dict[str, tuple[int, ...]] = {
    name: (1, 2, 3) if name in CATEGORIES["noise"] else SEVERITIES for name in CORRUPTION_NAMES
}
# Bumped whenever a corruption's output changes, so that saved results of an older version are not mixed in.
VERSION = 1

# The published parameters, one entry per severity 1..5 (Hendrycks & Dietterich 2019; Michaelis et al. 2019).
PARAMETERS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # std of the additive noise, image in [0, 1]
    "shot_noise": (60, 25, 12, 5, 3),  # photons per unit intensity (Poisson)
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),  # fraction of values set to 0 or 1
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),  # std of the multiplicative noise
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),  # disk radius, anti-alias sigma
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),  # sigma, delta, iterations
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),  # radius, sigma
    "gaussian_blur": (1, 2, 3, 4, 6),  # sigma
    # snow: flake mean, std, zoom, threshold, blur radius, blur sigma, image weight
    "snow": (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ),
    # spatter: liquid mean, std, smoothing sigma, threshold, intensity (water) or mud sigma, 0 water / 1 mud
    "spatter": (
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    ),
    "fog": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),  # fog strength, fractal roughness decay
    "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),  # image weight, frost weight
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to HSV value
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # factor on the deviation from the per-channel mean
    "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),  # HSV saturation × a + b
    "jpeg_compression": (25, 18, 15, 10, 7),  # JPEG quality
}
assert set(PARAMETERS) == set(CORRUPTION_NAMES) and all(len(v) == 5 for v in PARAMETERS.values())


# The corruptions whose filters are scipy.ndimage's (the others are numpy and Pillow alone).
NEEDS_SCIPY = frozenset({"defocus_blur", "glass_blur", "gaussian_blur", "snow", "spatter", "frost"})


def require_scipy(names: Sequence[str] = CORRUPTION_NAMES) -> None:
    """A one-line RuntimeError naming the install command when any of the corruptions ``names`` needs scipy and
    it is missing: a study checks before its first pass, not hours into it."""
    needing = [name for name in names if name in NEEDS_SCIPY]
    if needing:
        _ndimage(needing)


# ----------------------------------------------------------------------------------------------- helpers
def _ndimage(needing: Sequence[str] = ()) -> Any:
    """scipy.ndimage, or a one-line error saying how to install scipy."""
    try:
        from scipy import ndimage
    except ImportError:
        many = len(needing) > 1
        which = f"the corruption{'s' if many else ''} {', '.join(needing)} need{'' if many else 's'}"
        which = which if needing else "the image corruptions need"
        raise RuntimeError(f'{which} scipy: pip install "segformer[robustness]"') from None
    return ndimage


def _unit(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255.0


def _to_uint8(values: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """Float values (``scale`` = white) → uint8, clipped and rounded to the nearest level."""
    return np.clip(np.rint(values * (255.0 / scale)), 0, 255).astype(np.uint8)


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the two spatial axes (channels apart), edges extended, 4 sigma wide."""
    ndimage = _ndimage()
    sigmas = (sigma, sigma) + (0,) * (x.ndim - 2)
    return ndimage.gaussian_filter(x, sigma=sigmas, mode="nearest", truncate=4.0)


def _gray(x: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB → (H, W, 1) luma with the ITU-R 601 weights."""
    return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] → (..., 3) HSV in [0, 1]; hue 0 and saturation 0 where undefined (greys, black)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(-1)
    spread = value - rgb.min(-1)
    safe = np.where(spread > 0, spread, 1.0)
    saturation = np.where(value > 0, spread / np.where(value > 0, value, 1.0), 0.0)
    hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(spread > 0, (hue / 6.0) % 1.0, 0.0)
    return np.stack([hue, saturation, value], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.astype(np.int64) % 6
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = (
        (v, t, p),  # sector 0: red → yellow
        (q, v, p),
        (p, v, t),
        (p, q, v),
        (t, p, v),
        (v, p, q),
    )
    out = np.empty(hsv.shape, dtype=np.float64)
    for channel in range(3):
        out[..., channel] = np.choose(sector, [row[channel] for row in table])
    return out


def _shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``x`` moved by (dy, dx) pixels along its first two axes (|dy| < height, |dx| < width), the edge rows and
    columns repeated into the gap: ``out[i, j] = x[clip(i - dy), clip(j - dx)]``."""
    h, w = x.shape[:2]
    out = np.empty_like(x)
    rows_to, rows_from = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    cols_to, cols_from = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[rows_to, cols_to] = x[rows_from, cols_from]
    if dx > 0:
        out[rows_to, :dx] = out[rows_to, dx : dx + 1]
    elif dx < 0:
        out[rows_to, w + dx :] = out[rows_to, w + dx - 1 : w + dx]
    if dy > 0:
        out[:dy] = out[dy : dy + 1]
    elif dy < 0:
        out[h + dy :] = out[h + dy - 1 : h + dy]
    return out


def _streak(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """Motion blur: the image averaged with copies of itself moved 0..2·radius pixels along ``angle``
    (degrees), weighted by a one-sided Gaussian of ``sigma`` pixels."""
    width = 2 * radius + 1
    weights = np.exp(-(np.arange(width, dtype=np.float64) ** 2) / (2 * sigma**2))
    sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    out = np.zeros(x.shape, dtype=np.float64)
    used = 0.0
    for i in range(width):
        dy, dx = -math.ceil(i * sin - 0.5), -math.ceil(i * cos - 0.5)
        if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
            break  # the streak left the image
        out += weights[i] * _shifted(x, dy, dx)
        used += weights[i]
    return out / used


def _centre_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre of ``x`` by ``factor`` (bilinear), keeping its height and width."""
    ndimage = _ndimage()
    h, w = x.shape[:2]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[top : top + ch, left : left + cw]
    zoomed = ndimage.zoom(crop, (factor, factor) + (1,) * (x.ndim - 2), order=1)
    top, left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[top : top + h, left : left + w]


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) fractal cloud in [0, 1] by the diamond-square algorithm (``size`` a power of two): every
    new point is the mean of its four neighbours (wrapping around) plus uniform noise whose amplitude is
    divided by ``decay`` at each halving of the step (larger ``decay``: smoother clouds)."""
    if size < 2 or size & (size - 1):
        raise ValueError(f"plasma_fractal size must be a power of two >= 2, got {size}")
    grid = np.zeros((size, size), dtype=np.float64)
    amplitude = 100.0
    step = size
    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step].copy()
        # square step: the centre of each square from its four corners
        right = np.roll(corners, -1, axis=1)
        four = corners + np.roll(corners, -1, axis=0) + right + np.roll(right, -1, axis=0)
        grid[half::step, half::step] = four / 4 + amplitude * rng.uniform(-amplitude, amplitude, four.shape)
        centres = grid[half::step, half::step].copy()
        # diamond step: edge midpoints from the two corners and the two centres beside them
        between_columns = corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=0)
        grid[0::step, half::step] = between_columns / 4 + amplitude * rng.uniform(
            -amplitude, amplitude, between_columns.shape
        )
        between_rows = corners + np.roll(corners, -1, axis=0) + centres + np.roll(centres, 1, axis=1)
        grid[half::step, 0::step] = between_rows / 4 + amplitude * rng.uniform(
            -amplitude, amplitude, between_rows.shape
        )
        step = half
        amplitude /= decay
    grid -= grid.min()
    return grid / max(float(grid.max()), 1e-12)


def frost_texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural frosted-glass picture, (height, width, 3) float in [0, 255]: a bluish fractal haze with
    branching ice crystals (six-fold branching angles), about as bright on average as a frost photograph."""
    ndimage = _ndimage()
    size = 1 << max(1, math.ceil(math.log2(max(height, width))))
    haze = plasma_fractal(size, 1.8, rng)[:height, :width]
    crystals = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(crystals)
    scale = max(height, width)
    stack: list[tuple[float, float, float, float, int]] = []
    for _ in range(max(3, round(height * width / 900))):
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        stack.append((y, x, rng.uniform(0, 2 * math.pi), rng.uniform(0.01, 0.04) * scale, 3))
    while stack:
        y, x, angle, length, depth = stack.pop()
        y1, x1 = y + length * math.sin(angle), x + length * math.cos(angle)
        draw.line([(x, y), (x1, y1)], fill=int(rng.integers(120, 256)), width=1)
        if depth > 0:
            for turn in (-math.pi / 3, 0.0, math.pi / 3):
                if turn == 0.0 or rng.random() < 0.7:
                    stack.append(
                        (y1, x1, angle + turn + rng.normal(0, 0.15), length * rng.uniform(0.45, 0.7), depth - 1)
                    )
    ice = ndimage.gaussian_filter(np.asarray(crystals, dtype=np.float64) / 255.0, 0.6, mode="nearest")
    ice = np.clip(ice * 2.0, 0, 1)
    brightness = np.clip(0.25 + 0.35 * haze + 0.65 * ice, 0, 1)
    tint = np.array([0.80, 0.90, 1.0])  # cold blue-white
    return brightness[..., None] * tint * 255.0


# ----------------------------------------------------------------------------------------- corruptions
# Each takes (image uint8 (H, W, 3), the severity's parameters, rng) and returns floats with 255 = white.
def _gaussian_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return (_unit(image) + rng.normal(0.0, std, image.shape)) * 255


def _shot_noise(image: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(_unit(image) * photons) / photons * 255


def _impulse_noise(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    x = _unit(image)
    hit = rng.random(x.shape) <= amount  # salt and pepper, each value on its own, half of each
    salt = rng.random(x.shape) <= 0.5
    x[hit & salt] = 1.0
    x[hit & ~salt] = 0.0
    return x * 255


def _speckle_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    x = _unit(image)
    return (x + x * rng.normal(0.0, std, x.shape)) * 255


def _disk_kernel(radius: int, alias_sigma: float) -> np.ndarray:
    """A normalised disk of ``radius`` on a grid of at least 17×17, softened by a small Gaussian (3×3 taps
    up to radius 8, else 5×5) against aliasing."""
    ndimage = _ndimage()
    reach = max(8, radius)
    taps = 3 if radius <= 8 else 5
    yy, xx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    offsets = np.arange(taps) - taps // 2
    gauss = np.exp(-(offsets**2) / (2 * alias_sigma**2))
    gauss /= gauss.sum()
    for axis in (0, 1):
        disk = ndimage.correlate1d(disk, gauss, axis=axis, mode="mirror")
    return disk


def _defocus_blur(image: np.ndarray, params: tuple[int, float], rng: np.random.Generator) -> np.ndarray:
    kernel = _disk_kernel(*params)
    r = kernel.shape[0] // 2
    x = _unit(image)
    h, w = x.shape[:2]
    padded = np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")  # mirrored borders, the edge pixel not repeated
    # the disk is symmetric, so convolution = correlation; by FFT (kernels up to 21x21 at every pixel)
    shape = (padded.shape[0], padded.shape[1])
    spectrum = np.fft.rfft2(padded, s=shape, axes=(0, 1)) * np.fft.rfft2(kernel, s=shape)[..., None]
    full = np.fft.irfft2(spectrum, s=shape, axes=(0, 1))
    return full[2 * r : 2 * r + h, 2 * r : 2 * r + w] * 255


def _glass_blur(image: np.ndarray, params: tuple[float, int, int], rng: np.random.Generator) -> np.ndarray:
    sigma, delta, iterations = params
    x = np.floor(_gaussian(_unit(image), sigma) * 255).astype(np.uint8)  # the published code truncates here
    h, w = x.shape[:2]
    rows = np.arange(h - delta, delta, -1)
    cols = np.arange(w - delta, delta, -1)
    if rows.size and cols.size:
        targets = (rows[:, None] * w + cols[None, :]).ravel()
        source = np.arange(h * w)  # which original pixel each position shows
        for _ in range(iterations):
            offsets = rng.integers(-delta, delta, size=(targets.size, 2))
            source = source[_glass_pass(h * w, targets, targets + offsets[:, 0] * w + offsets[:, 1])]
        x = x.reshape(h * w, 3)[source].reshape(h, w, 3)
    return _gaussian(x / 255.0, sigma) * 255


def _glass_pass(n: int, targets: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """One pass of glass blur's sequential assignments ``value[t] = value[s]`` over (target, source) pairs in
    the given order, as an index map: the position of the value before the pass that each of the ``n``
    positions holds after it: the loop's result, without a Python step per pixel.

    A target reads its source's new value if the pass wrote that source before it (the source is a target that
    comes earlier: here, with a larger index), else the value from before the pass. Following those links from
    a target ends at a target reading an old value (or at a position never written); the links are followed for
    all targets at once by pointer doubling, each round halving what is left."""
    is_target = np.zeros(n, dtype=bool)
    is_target[targets] = True
    linked = is_target[sources] & (sources > targets)  # (targets come in decreasing order)
    end = np.arange(n)  # the end of each position's chain of links
    active = targets[linked]
    end[active] = sources[linked]
    while active.size:
        further = end[end[active]]
        moved = further != end[active]
        end[active] = further
        active = active[moved]
    reads = np.arange(n)  # where the end of a chain reads from: its source (an old value), or itself
    reads[targets[~linked]] = sources[~linked]
    return reads[end]


def _motion_blur(image: np.ndarray, params: tuple[int, float], rng: np.random.Generator) -> np.ndarray:
    radius, sigma = params
    return _streak(image.astype(np.float64), radius, sigma, rng.uniform(-45, 45))


def _gaussian_blur(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _gaussian(_unit(image), sigma) * 255


def _snow(image: np.ndarray, params: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    mean, std, zoom, threshold, radius, sigma, weight = params
    x = _unit(image)
    flakes = _centre_zoom(rng.normal(mean, std, x.shape[:2]), zoom)
    flakes[flakes < threshold] = 0
    flakes = _streak(np.clip(flakes, 0, 1), int(radius), sigma, rng.uniform(-135, -45))
    flakes = (np.rint(flakes * 255) / 255)[..., None]  # the published code stores the layer in 8 bits
    x = weight * x + (1 - weight) * np.maximum(x, _gray(x) * 1.5 + 0.5)  # a whitened, washed-out scene
    return (x + flakes + np.rot90(flakes, k=2)) * 255


def _spatter(image: np.ndarray, params: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    ndimage = _ndimage()
    mean, std, sigma, threshold, strength, mud = params
    x = _unit(image)
    liquid = _gaussian(rng.normal(mean, std, x.shape[:2]), sigma)
    liquid[liquid < threshold] = 0
    if not mud:
        layer = (liquid * 255).astype(np.uint8)
        drops = layer > 0
        edges = drops & ~ndimage.binary_erosion(drops, border_value=1)
        if not edges.any():
            return x * 255
        distance = np.minimum(ndimage.distance_transform_edt(~edges), 20.0)
        distance = ndimage.uniform_filter(distance, 3, mode="mirror").astype(np.uint8)
        distance = _equalize(distance)
        emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
        distance = np.clip(np.rint(ndimage.correlate(distance.astype(np.float64), emboss, mode="mirror")), 0, 255)
        distance = ndimage.uniform_filter(distance, 3, mode="mirror")
        wet = layer * distance
        if wet.max() <= 0:
            return x * 255
        wet = wet / wet.max() * strength
        water = np.array([175, 238, 238]) / 255.0  # pale turquoise
        return (x + wet[..., None] * water) * 255
    mask = _gaussian((liquid > threshold).astype(np.float64), strength)
    mask[mask < 0.8] = 0
    mask = mask[..., None]
    colour = np.array([63, 42, 20]) / 255.0  # mud brown
    return (x * (1 - mask) + colour * mask) * 255


def _equalize(values: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a uint8 array (the lowest level present → 0, the cumulative count → 0..255)."""
    hist = np.bincount(values.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = values.size
    if hist[first] == total:
        return values
    lut = np.clip(np.rint((np.cumsum(hist) - hist[first]) * 255.0 / (total - hist[first])), 0, 255)
    return lut.astype(np.uint8)[values]


def _fog(image: np.ndarray, params: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    strength, decay = params
    x = _unit(image)
    h, w = x.shape[:2]
    size = 1 << max(1, math.ceil(math.log2(max(h, w))))
    peak = x.max()
    x = x + strength * plasma_fractal(size, decay, rng)[:h, :w, None]
    return x * peak / (peak + strength) * 255


# The frost "photographs" crops are taken from, as the package crops one of its five (randint(5)): procedural ones
# of a fixed size, made once per process from fixed seeds. At this size the texture's mean brightness (~155) is
# near the package's photographs' (~164); a texture made at each image's own size grew denser with the size (ice
# on 2% of a 64x128 image's pixels, 32% of a 1024x2048 one's), and so did the corruption.
FROST_PHOTO_SIZE = (1024, 2048)
FROST_PHOTOS = 5


@functools.lru_cache(maxsize=FROST_PHOTOS)
def frost_photo(index: int) -> np.ndarray:
    """Frost photograph ``index`` (0..FROST_PHOTOS-1): a :func:`frost_texture` of :data:`FROST_PHOTO_SIZE`,
    (H, W, 3) uint8, the same in every process (~1.6 s to make on one core; kept once made: 6 MB each)."""
    if not 0 <= index < FROST_PHOTOS:
        raise ValueError(f"frost photo index must be 0..{FROST_PHOTOS - 1}, got {index}")
    texture = frost_texture(*FROST_PHOTO_SIZE, np.random.default_rng([0x66726F7374, index]))
    photo = np.round(texture).astype(np.uint8)
    photo.flags.writeable = False  # (shared by every call)
    return photo


def _frost(image: np.ndarray, params: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A random crop of one of the frost photographs, blended with the published weights; an image larger than
    the photographs takes a crop of one enlarged (bicubic) by the smallest whole factor that covers it, as the
    package does."""
    image_weight, frost_weight = params
    h, w = image.shape[:2]
    photo = frost_photo(int(rng.integers(FROST_PHOTOS)))
    ph, pw = photo.shape[:2]
    factor = max(1, math.ceil(max(h / ph, w / pw)))
    if factor > 1:
        photo = np.asarray(Image.fromarray(photo).resize((pw * factor, ph * factor), Image.Resampling.BICUBIC))
    y, x = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
    return image_weight * image.astype(np.float64) + frost_weight * photo[y : y + h, x : x + w].astype(np.float64)


def _brightness(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    hsv = _rgb_to_hsv(_unit(image))
    hsv[..., 2] = np.clip(hsv[..., 2] + amount, 0, 1)
    return _hsv_to_rgb(hsv) * 255


def _contrast(image: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    x = _unit(image)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return ((x - mean) * factor + mean) * 255


def _saturate(image: np.ndarray, params: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    scale, shift = params
    hsv = _rgb_to_hsv(_unit(image))
    hsv[..., 1] = np.clip(hsv[..., 1] * scale + shift, 0, 1)
    return _hsv_to_rgb(hsv) * 255


def _jpeg_compression(image: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.float64)


_FUNCTIONS: dict[str, Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "gaussian_blur": _gaussian_blur,
    "snow": _snow,
    "spatter": _spatter,
    "fog": _fog,
    "frost": _frost,
    "brightness": _brightness,
    "contrast": _contrast,
    "saturate": _saturate,
    "jpeg_compression": _jpeg_compression,
}
# corruptions whose output depends on the random generator (the others are fixed functions of the image)
RANDOM = frozenset(set(CATEGORIES["noise"]) | set(CATEGORIES["weather"]) | {"glass_blur", "motion_blur"})


# ------------------------------------------------------------------------------------------ public API
def check_name(name: str) -> str:
    """``name`` if it is one of :data:`CORRUPTION_NAMES`, else a ValueError listing them."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTION_NAMES)}")
    return name


def check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")
    return int(severity)


def corruption_rng(index: int, name: str, severity: int, seed: int = 0) -> np.random.Generator:
    """The generator for image ``index`` under (``name``, ``severity``): the same arguments always give the
    same stream, any other argument an independent one (numpy's SeedSequence over all four)."""
    key = zlib.crc32(check_name(name).encode("utf-8"))
    return np.random.default_rng([int(seed), int(index), key, check_severity(severity)])


def corrupt(
    image: np.ndarray,
    name: str,
    severity: int,
    *,
    rng: np.random.Generator | None = None,
    seed: int | None = None,
) -> np.ndarray:
    """``image`` ((H, W, 3) uint8 RGB) under corruption ``name`` at ``severity`` (1–5): a new (H, W, 3) uint8
    array. Randomness comes from ``rng``, else from ``np.random.default_rng(seed)`` (``seed`` default 0), so
    the result is deterministic; the input is left untouched."""
    check_name(name)
    severity = check_severity(severity)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"corrupt takes an (H, W, 3) uint8 RGB image, got shape {shape} of {dtype}")
    if rng is None:
        rng = np.random.default_rng(0 if seed is None else seed)
    out = _FUNCTIONS[name](image, PARAMETERS[name][severity - 1], rng)
    return _to_uint8(out)


def parse_corruptions(text: str | Sequence[str]) -> list[str]:
    """``"all"``, a category (``noise``, ``blur``, ``weather``, ``digital``) or corruption names, comma-separated
    (or a list of such words) → the corruption names in the study's order, each once. Unknown words are a
    ValueError naming them."""
    words = [w.strip() for part in ([text] if isinstance(text, str) else text) for w in part.split(",")]
    words = [w for w in words if w]
    if not words:
        raise ValueError("--corruptions is empty; give all, a category or corruption names")
    chosen: set[str] = set()
    for word in words:
        if word == "all":
            chosen.update(CORRUPTION_NAMES)
        elif word in CATEGORIES:
            chosen.update(CATEGORIES[word])
        elif word in _FUNCTIONS:
            chosen.add(word)
        else:
            raise ValueError(
                f"--corruptions: unknown corruption {word!r}; choose all, {', '.join(CATEGORIES)} or "
                f"{', '.join(CORRUPTION_NAMES)}"
            )
    return [name for name in CORRUPTION_NAMES if name in chosen]


def parse_severities(text: str | Sequence[int | str]) -> tuple[int, ...]:
    """``"1,2,3"`` (or a list) → the sorted distinct severities; anything outside 1..5 is a ValueError."""
    words = text.split(",") if isinstance(text, str) else [str(w) for w in text]
    try:
        values = [int(w) for w in words if w.strip()]
    except ValueError:
        raise ValueError(f"--severities must be integers from 1 to 5 such as 1,2,3, got {text!r}") from None
    if not values or not all(1 <= v <= 5 for v in values):
        raise ValueError(f"--severities must be integers from 1 to 5 such as 1,2,3, got {text!r}")
    return tuple(sorted(set(values)))


def category_of(name: str) -> str:
    return next(category for category, names in CATEGORIES.items() if name in names)


__all__ = [
    "CATEGORIES",
    "CORRUPTION_NAMES",
    "NEEDS_SCIPY",
    "PAPER_SEVERITIES",
    "PARAMETERS",
    "RANDOM",
    "SEVERITIES",
    "VERSION",
    "category_of",
    "check_name",
    "check_severity",
    "corrupt",
    "corruption_rng",
    "frost_photo",
    "frost_texture",
    "parse_corruptions",
    "parse_severities",
    "plasma_fractal",
    "require_scipy",
]
