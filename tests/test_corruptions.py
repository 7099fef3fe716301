"""The 16 corruptions of the paper's robustness study: the list, the contract (uint8 in and out, same size, input
untouched, deterministic for a seed), each one's statistics against its published parameters, and severity
monotone in a measured effect."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from segformer.corruptions import (
    CATEGORIES,
    CORRUPTION_NAMES,
    FROST_PHOTO_SIZE,
    FROST_PHOTOS,
    PAPER_SEVERITIES,
    PARAMETERS,
    RANDOM,
    _frost,
    _glass_pass,
    _rgb_to_hsv,
    corrupt,
    corruption_rng,
    frost_photo,
    frost_texture,
    parse_corruptions,
    parse_severities,
    plasma_fractal,
)
from segformer.data.synthetic import make_sample

# FACTS.md §7: the paper's 16 corruptions, by group
PAPER = {
    "noise": {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"},
    "blur": {"defocus_blur", "glass_blur", "motion_blur", "gaussian_blur"},
    "weather": {"snow", "spatter", "fog", "frost"},
    "digital": {"brightness", "contrast", "saturate", "jpeg_compression"},
}


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Three 128-px scenes of the synthetic set: textures, shapes, gradients and sensor noise."""
    return [make_sample(np.random.default_rng(k), 128)[0] for k in range(3)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def sharpness(a: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels (of the channel mean)."""
    g = a.astype(np.float64).mean(-1)
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def test_the_paper_list_and_severities():
    assert {k: set(v) for k, v in CATEGORIES.items()} == PAPER
    assert len(CORRUPTION_NAMES) == 16 == len(set(CORRUPTION_NAMES))
    assert all(PAPER_SEVERITIES[n] == (1, 2, 3) for n in PAPER["noise"])  # noise: first three severities only
    assert all(PAPER_SEVERITIES[n] == (1, 2, 3, 4, 5) for n in set(CORRUPTION_NAMES) - PAPER["noise"])
    assert PARAMETERS["gaussian_noise"] == (0.08, 0.12, 0.18, 0.26, 0.38)  # spot checks of the published tables
    assert PARAMETERS["jpeg_compression"] == (25, 18, 15, 10, 7)
    assert PARAMETERS["glass_blur"][4] == (1.5, 4, 2)


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_contract_dtype_size_input_untouched_and_deterministic(name, images):
    odd = images[0][:45, :67].copy()  # odd, non-square sizes
    for image in (images[0], odd):
        before = image.copy()
        out = corrupt(image, name, 3, seed=7)
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert np.array_equal(image, before), "the input was modified"
        assert not np.array_equal(out, image), "severity 3 left the image unchanged"
        assert np.array_equal(out, corrupt(image, name, 3, seed=7)), "not deterministic for a seed"
        assert np.array_equal(out, corrupt(image, name, 3, rng=np.random.default_rng(7)))
    other = corrupt(images[0], name, 3, seed=8)
    if name in RANDOM:
        assert not np.array_equal(other, corrupt(images[0], name, 3, seed=7)), "the seed is ignored"
    else:
        assert np.array_equal(other, corrupt(images[0], name, 3, seed=7)), "a fixed function should ignore the seed"


def test_tiny_images_work(images):
    """Down to one pixel a side: a data set's 60x1 image stopped a robustness study after its clean pass (a 2x2
    minimum no corruption needs; audit)."""
    for name in CORRUPTION_NAMES:
        for severity in (1, 5):
            for h, w in ((9, 5), (1, 60), (60, 1), (1, 1)):
                out = corrupt(images[0][:h, :w], name, severity, seed=0)
                assert out.shape == (h, w, 3) and out.dtype == np.uint8, (name, h, w)


# Severity monotone in its measured effect, the same seed at every severity. The measure per corruption: noise
# and JPEG lower the PSNR against the clean image; blurs lower the sharpness; weather hides the scene (lower
# correlation with it); brightness raises the mean, contrast lowers the standard deviation.
def _effect(name: str, clean: np.ndarray, out: np.ndarray) -> float:
    """A number that must fall as the severity rises."""
    if name in PAPER["noise"] or name == "jpeg_compression":
        return psnr(clean, out)
    if name in PAPER["blur"]:
        return sharpness(out) / sharpness(clean)
    if name in PAPER["weather"]:
        return correlation(clean, out)
    if name == "brightness":
        return -float(out.mean())
    if name == "contrast":
        return float(out.astype(np.float64).std())
    raise AssertionError(name)


@pytest.mark.parametrize("name", [n for n in CORRUPTION_NAMES if n != "saturate"])
def test_severity_is_monotone_in_its_measured_effect(name, images):
    effects = [
        np.mean([_effect(name, im, corrupt(im, name, s, seed=k)) for k, im in enumerate(images)]) for s in range(1, 6)
    ]
    assert all(a > b for a, b in zip(effects, effects[1:])), f"{name}: {np.round(effects, 4)}"


def test_saturate_follows_its_published_two_sided_table(images):
    """saturate's table is not one scale: severities 1-2 desaturate (x0.3, x0.1), 3-5 oversaturate (x2, x5 + 0.1,
    x20 + 0.2). Measured: the mean HSV saturation falls from 1 to 2 and rises from 3 to 5; hue and value keep."""
    sat = [
        np.mean([_rgb_to_hsv(corrupt(im, "saturate", s) / 255)[..., 1].mean() for im in images]) for s in range(1, 6)
    ]
    clean = np.mean([_rgb_to_hsv(im / 255)[..., 1].mean() for im in images])
    assert sat[1] < sat[0] < clean < sat[2] < sat[3] <= sat[4]
    assert sat[0] == pytest.approx(0.3 * clean, rel=0.05) and sat[1] == pytest.approx(0.1 * clean, rel=0.1)
    colour = np.broadcast_to(np.array([200, 100, 50], np.uint8), (4, 4, 3)).copy()  # hue 1/18, S 0.75, V 0.784
    for severity, saturation in ((1, 0.225), (2, 0.075), (3, 1.0)):
        h, s, v = _rgb_to_hsv(corrupt(colour, "saturate", severity) / 255)[0, 0]
        assert s == pytest.approx(saturation, abs=0.01) and v == pytest.approx(200 / 255, abs=1e-6)
        assert h == pytest.approx(1 / 18, abs=0.005)


# ----------------------------------------------------------------------------- statistics per corruption
GREY = np.full((96, 96, 3), 128, np.uint8)


def _noise(name: str, severity: int) -> np.ndarray:
    return corrupt(GREY, name, severity, seed=0).astype(np.float64) - 128


@pytest.mark.parametrize("severity", [1, 3])
def test_noise_statistics_match_the_published_parameters(severity):
    c = PARAMETERS["gaussian_noise"][severity - 1]
    assert _noise("gaussian_noise", severity).std() == pytest.approx(c * 255, rel=0.03)
    assert abs(_noise("gaussian_noise", severity).mean()) < 1.0
    photons = PARAMETERS["shot_noise"][severity - 1]  # Poisson(x * photons) / photons: std sqrt(x / photons)
    assert _noise("shot_noise", severity).std() == pytest.approx(math.sqrt(128 / 255 / photons) * 255, rel=0.05)
    c = PARAMETERS["speckle_noise"][severity - 1]  # x + x * N(0, c): std c * x
    assert _noise("speckle_noise", severity).std() == pytest.approx(c * 128, rel=0.03)
    amount = PARAMETERS["impulse_noise"][severity - 1]  # each value set to 0 or 255 with this probability
    out = corrupt(GREY, "impulse_noise", severity, seed=0)
    assert np.isin(out, (0, 255)).mean() == pytest.approx(amount, rel=0.1)
    assert (out == 255).mean() == pytest.approx(amount / 2, rel=0.15)
    assert np.isin(out, (0, 128, 255)).all()


@pytest.mark.parametrize("name", sorted(PAPER["blur"]))
def test_blurs_keep_a_flat_image_flat_and_spread_an_edge(name):
    """Every blur kernel sums to one (a flat image stays as it is) and spreads a step edge over more pixels as
    the severity rises."""
    flat = np.full((40, 50, 3), 77, np.uint8)
    assert np.abs(corrupt(flat, name, 5, seed=0).astype(int) - 77).max() <= 1
    edge = np.zeros((64, 64, 3), np.uint8)
    edge[:, 32:] = 255
    widths = []
    for severity in (1, 5):
        row = corrupt(edge, name, severity, seed=0)[20:44].astype(np.float64).mean(axis=(0, 2))
        widths.append(int(((row > 20) & (row < 235)).sum()))  # columns in the transition
    assert 0 < widths[0] < widths[1], widths


def test_gaussian_blur_spreads_a_step_edge_by_sigma():
    """An edge blurred by a Gaussian of sigma s climbs from 16% to 84% over 2 s pixels."""
    edge = np.zeros((32, 80, 3), np.uint8)
    edge[:, 40:] = 255
    for severity in (2, 4):
        sigma = PARAMETERS["gaussian_blur"][severity - 1]
        row = corrupt(edge, "gaussian_blur", severity)[16, :, 0].astype(np.float64) / 255
        x = np.arange(80)
        span = np.interp(0.84, row, x) - np.interp(0.16, row, x)
        assert span == pytest.approx(2 * sigma, abs=0.3)


def test_digital_corruptions_do_what_their_tables_say():
    # brightness adds to HSV value: a grey of value 128/255 gains exactly c
    for severity in (1, 4):
        c = PARAMETERS["brightness"][severity - 1]
        assert corrupt(GREY, "brightness", severity)[0, 0, 0] == round((128 / 255 + c) * 255)
    # contrast scales the deviation from each channel's mean by c and keeps the mean
    ramp = np.broadcast_to(np.linspace(0, 255, 90).astype(np.uint8)[None, :, None], (10, 90, 3)).copy()
    for severity in (1, 5):
        c = PARAMETERS["contrast"][severity - 1]
        out = corrupt(ramp, "contrast", severity).astype(np.float64)
        assert out.std() == pytest.approx(c * ramp.std(), abs=0.6)
        assert out.mean() == pytest.approx(ramp.mean(), abs=0.6)
    # JPEG: exactly Pillow's encoder at the published quality
    image = make_sample(np.random.default_rng(5), 64)[0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=PARAMETERS["jpeg_compression"][2])
    assert np.array_equal(corrupt(image, "jpeg_compression", 3), np.asarray(Image.open(buffer).convert("RGB")))


def test_weather_corruptions_have_their_look(images):
    black = np.zeros((64, 96, 3), np.uint8)
    # fog lifts dark scenes and lowers the contrast of bright ones: x + c * cloud, scaled by max / (max + c)
    assert corrupt(black, "fog", 3, seed=0).mean() == 0  # the published definition scales by the image maximum 0
    scene = images[0]
    fogged = corrupt(scene, "fog", 5, seed=0).astype(np.float64)
    assert fogged.std() < 0.6 * scene.astype(np.float64).std()
    # snow brightens and whitens
    snowy = corrupt(scene, "snow", 3, seed=0).astype(np.float64)
    assert snowy.mean() > scene.mean() + 30
    assert np.abs(snowy - snowy.mean(-1, keepdims=True)).mean() < np.abs(scene - scene.mean(-1, keepdims=True)).mean()
    # spatter: water drops (severities 1-3) only add light; mud (4-5) paints brown patches (R > G > B)
    wet = corrupt(scene, "spatter", 2, seed=1).astype(np.int64)
    assert (wet >= scene.astype(np.int64) - 1).all() and (wet > scene + 3).mean() > 0.01
    muddy = corrupt(np.full((128, 128, 3), 255, np.uint8), "spatter", 5, seed=1).astype(np.int64)
    patch = muddy.sum(-1) < 3 * 200
    assert 0.01 < patch.mean() < 0.9
    r, g, b = muddy[patch].mean(0)
    assert r > g > b
    # frost: a cold (blue-white) texture blended in with the published weights
    frosted = corrupt(black, "frost", 1, seed=0).astype(np.float64)
    assert frosted.mean() > 20 and frosted[..., 2].mean() > frosted[..., 0].mean()


def test_plasma_fractal_and_frost_texture():
    rng = np.random.default_rng(0)
    cloud = plasma_fractal(64, 2.0, rng)
    assert cloud.shape == (64, 64) and cloud.min() == 0.0 and cloud.max() == pytest.approx(1.0)
    smooth = plasma_fractal(64, 3.0, np.random.default_rng(1))
    rough = plasma_fractal(64, 1.2, np.random.default_rng(1))
    assert np.abs(np.diff(smooth)).mean() < np.abs(np.diff(rough)).mean()  # a larger decay: smoother clouds
    with pytest.raises(ValueError, match="power of two"):
        plasma_fractal(48, 2.0, rng)
    ice = frost_texture(50, 70, np.random.default_rng(0))
    assert ice.shape == (50, 70, 3) and ice.min() >= 0 and ice.max() <= 255
    assert (ice[..., 2] >= ice[..., 1]).all() and (ice[..., 1] >= ice[..., 0]).all()  # blue-white
    assert np.array_equal(ice, frost_texture(50, 70, np.random.default_rng(0)))


def test_frost_is_as_strong_on_small_images_as_on_large_ones():
    """Frost crops one of five fixed photographs (as the package crops its own), so its ice does not grow with the
    image: the mean of 16 crops of 64x128 is the photographs' mean within 3 standard errors (one crop's spread is
    ~20 levels: 15 for 16); a texture made at each image's size was ~45 levels darker at 64x128 than at 1024x2048.
    An image larger than the photographs takes a crop of one enlarged."""
    layer = lambda h, w, seed: _frost(np.zeros((h, w, 3), np.uint8), (1.0, 1.0), np.random.default_rng(seed))  # noqa: E731
    small = np.mean([layer(64, 128, seed).mean() for seed in range(16)])
    photos = np.mean([frost_photo(i).mean() for i in range(FROST_PHOTOS)])
    assert abs(small - photos) < 15, (small, photos)
    assert frost_photo(0).shape == (*FROST_PHOTO_SIZE, 3) and np.array_equal(frost_photo(0), frost_photo(0).copy())
    big = layer(FROST_PHOTO_SIZE[0] + 1, 40, 0)  # (a factor 2 enlargement, cropped)
    assert big.shape == (FROST_PHOTO_SIZE[0] + 1, 40, 3) and abs(big.mean() - photos) < 30


def test_corruption_rng_streams():
    a = corruption_rng(3, "fog", 2).random(4)
    assert np.array_equal(a, corruption_rng(3, "fog", 2).random(4))
    for other in (corruption_rng(4, "fog", 2), corruption_rng(3, "snow", 2), corruption_rng(3, "fog", 3),
                  corruption_rng(3, "fog", 2, seed=1)):  # fmt: skip
        assert not np.array_equal(a, other.random(4))


def test_bad_input_is_a_clear_error():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt(image, "rain", 1)
    with pytest.raises(ValueError, match="severity must be an integer from 1 to 5, got 6"):
        corrupt(image, "fog", 6)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB image, got shape \(8, 8, 3\) of float32"):
        corrupt(image.astype(np.float32), "fog", 1)
    with pytest.raises(ValueError, match=r"got shape \(8, 8\)"):
        corrupt(image[..., 0], "fog", 1)


def test_parse_corruptions_and_severities():
    assert parse_corruptions("all") == list(CORRUPTION_NAMES)
    assert parse_corruptions("fog,noise") == ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "fog"]
    assert parse_corruptions(["contrast", "snow,contrast"]) == ["snow", "contrast"]
    with pytest.raises(ValueError, match="--corruptions: unknown corruption 'rain'"):
        parse_corruptions("fog,rain")
    with pytest.raises(ValueError, match="--corruptions is empty"):
        parse_corruptions(" , ")
    assert parse_severities("3,1,3") == (1, 3)
    for bad in ("0,1", "6", "a", ""):
        with pytest.raises(ValueError, match="--severities must be integers from 1 to 5"):
            parse_severities(bad)


def _glass_loop(n: int, targets: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """The published pass, one pixel at a time: value[t] = value[s] in order (as an index map)."""
    shows = list(range(n))
    for t, s in zip(targets.tolist(), sources.tolist(), strict=True):
        shows[t] = shows[s]
    return np.asarray(shows)


@pytest.mark.parametrize("delta", [1, 2, 3, 4])
def test_glass_pass_equals_the_sequential_loop(delta):
    """The vectorised pass (pointer doubling over the chains of already-written sources) against the loop it
    replaces, on random offsets over sizes where chains are long and short, including narrow strips."""
    rng = np.random.default_rng(delta)
    for h, w in [(2 * delta + 2, 2 * delta + 3), (17, 9), (40, 64), (9, 130)]:
        rows, cols = np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1)
        targets = (rows[:, None] * w + cols[None, :]).ravel()
        for _ in range(4):
            offsets = rng.integers(-delta, delta, size=(targets.size, 2))
            sources = targets + offsets[:, 0] * w + offsets[:, 1]
            assert np.array_equal(_glass_pass(h * w, targets, sources), _glass_loop(h * w, targets, sources))
    # a long chain: every target reads the one written just before it (the next index up)
    targets = np.arange(98, 0, -1)
    assert np.array_equal(_glass_pass(100, targets, targets + 1), _glass_loop(100, targets, targets + 1))
