"""Prediction from Python and from `segformer predict`: real image files of every kind, a tiny checkpoint,
real subprocesses and a real 2-process torchrun."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import U32, randomize_, tiny_config
from PIL import Image, PngImagePlugin

from segformer import SegformerForSemanticSegmentation
from segformer.predict import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL,
    ImageError,
    SegformerPredictor,
    load_image,
    segment,
)
from segformer.predict_folder import collect_images, predict_to_folder

K = 5
ROOT = Path(__file__).resolve().parents[1]


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish colourful picture (so that a random model predicts several classes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _png_bomb(path: Path, side: int = 20000) -> None:
    """A valid PNG header claiming side x side gray pixels, with almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    names = {0: "sky", 1: "road", 2: "tree", 3: "car", 4: "person"}
    randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=K, id2label=names)), seed=3).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, int]], list[str]]:
    """A folder of good images (name → upright (width, height)) and bad ones (names)."""
    d = tmp_path_factory.mktemp("images")
    (d / "sub").mkdir()
    good: dict[str, tuple[int, int]] = {}
    Image.fromarray(_noise(48, 64, 1)).save(d / "photo.jpg", quality=90)
    good["photo.jpg"] = (64, 48)
    Image.fromarray(_noise(40, 56, 2)).save(d / "sub" / "nested.png")
    good["sub/nested.png"] = (56, 40)
    Image.fromarray(_noise(36, 52, 3)).save(d / "web.webp")
    good["web.webp"] = (52, 36)
    rotated = Image.fromarray(_noise(40, 64, 4))  # stored 64 wide, 40 high; EXIF says turn it upright
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(d / "exif.jpg", exif=exif)
    good["exif.jpg"] = (40, 64)
    Image.fromarray(_noise(44, 44, 5)[..., 0]).save(d / "gray.png")
    good["gray.png"] = (44, 44)
    Image.fromarray(np.dstack([_noise(33, 45, 6), np.full((33, 45), 128, np.uint8)])).save(d / "alpha.png")
    good["alpha.png"] = (45, 33)
    Image.fromarray(_noise(38, 50, 7)[..., 1].astype(np.uint16) * 257).save(d / "deep16.png")  # "I;16"
    good["deep16.png"] = (50, 38)
    Image.fromarray(_noise(10, 12, 8)).save(d / "tiny.png")  # below the model's minimum of 29 px
    _png_bomb(d / "bomb.png")
    buf = d / "full.jpg"
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf)
    (d / "truncated.jpg").write_bytes(buf.read_bytes()[: len(buf.read_bytes()) // 2])
    buf.unlink()
    (d / "notes.jpg").write_text("this is not an image\n")
    (d / "readme.txt").write_text("ignored: not an image extension\n")
    return d, good, ["tiny.png", "bomb.png", "truncated.jpg", "notes.jpg"]


def _cli(*args: str | os.PathLike, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "segformer", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        cwd=ROOT,
    )


# ---------------------------------------------------------------------------------------------- loading
def test_load_image_modes_orientation_and_bad_files(images):
    d, good, _ = images
    for name, size in good.items():
        img = load_image(d / name)
        assert img.mode == "RGB" and img.size == size, name
    deep = np.asarray(load_image(d / "deep16.png"))[..., 0]  # 16-bit values scaled by 1/257, not clipped
    assert np.array_equal(deep, _noise(38, 50, 7)[..., 1])
    cmyk = load_image(Image.new("CMYK", (30, 30), (0, 255, 0, 0)))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[0] > 200 and cmyk.getpixel((0, 0))[1] < 50
    assert load_image(Image.new("P", (30, 30))).mode == "RGB"
    assert load_image(np.ones((30, 31), np.float32)).getpixel((0, 0)) == (255, 255, 255)  # floats in [0, 1]
    assert load_image(torch.zeros(3, 30, 31)).size == (31, 30)  # channels first
    pixels_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="truncated"):
        load_image(d / "truncated.jpg")
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(d / "bomb.png")
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(d / "photo.jpg", max_pixels=1000)  # our limit, not Pillow's 2x-before-raising
    with pytest.raises(ImageError, match="not an image"):
        load_image(d / "notes.jpg")
    with pytest.raises(ImageError, match="no such file"):
        load_image(d / "missing.png")
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((5, 5, 7)))
    assert Image.MAX_IMAGE_PIXELS == pixels_before  # Pillow's global is restored
    assert load_image(d / "photo.jpg", max_pixels=None).size == (64, 48)


def test_collect_images_folders_globs_and_name_clashes(images, tmp_path):
    d, good, bad = images
    flat = [rel.as_posix() for _, rel in collect_images([d])]
    assert "sub/nested.png" not in flat and "readme.txt" not in flat and "photo.jpg" in flat
    deep = [rel.as_posix() for _, rel in collect_images([d], recursive=True)]
    assert sorted(deep) == sorted([*good, *bad])
    (d / ".ipynb_checkpoints").mkdir(exist_ok=True)  # a hidden folder's copies are not walked into
    Image.fromarray(_noise(32, 32)).save(d / ".ipynb_checkpoints" / "photo-checkpoint.png")
    assert sorted(rel.as_posix() for _, rel in collect_images([d], recursive=True)) == sorted(deep)
    globbed = [rel.as_posix() for _, rel in collect_images([str(d / "**" / "*.png")])]
    assert "sub/nested.png" in globbed and "photo.jpg" not in globbed
    named = [rel.as_posix() for _, rel in collect_images([d / "notes.jpg", d / "nope.png"])]
    assert sorted(named) == ["nope.png", "notes.jpg"]  # named files are taken whatever they hold
    with pytest.raises(ValueError, match="no images found"):
        collect_images([str(tmp_path / "*.png")])
    with pytest.raises(ValueError, match=r"nope\.png: no such file or folder$"):  # (it said "no images found in"
        collect_images([tmp_path / "nope.png"])  # it, as of an empty folder: audit)


def test_predict_to_folder_keeps_clashing_names_apart(checkpoint, tmp_path):
    src = tmp_path / "in"
    (src / "b").mkdir(parents=True)
    for name in ("a.jpg", "a.png", "b/c.png"):
        Image.fromarray(_noise(32, 32)).save(src / name)
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    report = predict_to_folder(predictor, [src], tmp_path / "out", recursive=True, progress=False)
    assert [r.status for r in report.records] == ["ok"] * 3
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["a_jpg.png", "a_png.png", "b/c.png", "legend.png"]
    Image.fromarray(_noise(32, 32)).save(tmp_path / "c.png")  # same relative name from a second input
    with pytest.raises(ValueError, match=r"would both be written as c\.png: give them separate --output folders"):
        predict_to_folder(predictor, [src / "b", tmp_path / "c.png"], tmp_path / "out2", progress=False)  # (it
        # named c_png.png, which neither would get: audit)


def test_an_image_that_memory_cannot_take_fails_alone_naming_the_options(checkpoint, tmp_path):
    """--scales 100 (a percentage meant) ended the run with the CPU allocator's raw message, naming neither the
    image nor the option (audit). A real allocation of more than a petabyte (more than any address space), at
    batch 2: each image is tried alone and fails with a line naming its size and the options (a predictor with
    usual options then segments them, batched)."""
    from segformer.images import ImageError

    for name, size in (("a.png", 32), ("b.png", 32), ("c.png", 48)):
        Image.fromarray(_noise(size, size)).save(tmp_path / name)
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole", scales=[300000], batch_size=2)
    sources = [tmp_path / n for n in ("a.png", "b.png")]
    results = [result for _, result in predictor.predict_iter(sources)]
    assert all(isinstance(r, ImageError) and r.too_large for r in results), results
    said = r"not enough memory to segment it \(32x32, whole, scales 300000(; \S+ GB asked at once)?\): lower --scales"
    assert re.match(said, str(results[0])), results[0]
    fine = SegformerPredictor(checkpoint, device="cpu", mode="whole", batch_size=2)
    assert [type(r).__name__ for _, r in fine.predict_iter([*sources, tmp_path / "c.png"])] == ["Segmentation"] * 3


def test_a_batch_that_memory_cannot_take_frees_its_tensors_before_each_image_is_tried_alone(checkpoint, tmp_path):
    """The one-by-one retry of a batch that ran out of memory ran inside the except clause, whose traceback kept
    the failed pass's tensors alive through every retry (review audit). The pass here allocates a tensor and then
    fails as an allocator does; by the retries the tensor is gone."""
    import weakref

    for name in ("a.png", "b.png"):
        Image.fromarray(_noise(32, 32)).save(tmp_path / name)
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole", batch_size=2)
    real, held, alive = predictor._run, [], []

    def run(images, *args):
        if len(images) > 1:
            work = torch.empty(1 << 20)  # (the pass's work, referenced from its frame only)
            held.append(weakref.ref(work))
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 80000000000 bytes")
        alive.append(held[0]() is not None)
        return real(images, *args)

    predictor._run = run
    results = [result for _, result in predictor.predict_iter([tmp_path / "a.png", tmp_path / "b.png"])]
    assert [type(r).__name__ for r in results] == ["Segmentation", "Segmentation"]
    assert alive == [False, False]


def test_a_rerun_with_other_options_leaves_no_earlier_extra_outputs(checkpoint, tmp_path):
    """A run with --side-by-side, --save-probs and PNG overlays, then one without into the same folder: the first
    run's side image, probabilities and PNG overlay stayed beside the second run's masks (another model's, in the
    audit's case). They go now, where the image's label map, made by a run, vouches for them; a file of that kind
    whose image has no such label map (a user's own) stays."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(_noise(32, 32)).save(src / name)
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    predict_to_folder(predictor, [src], out, side_by_side_image=True, save_probs=True, overlay_format="png",
                      progress=False)  # fmt: skip
    first = {"a_side.jpg", "a_probs.npy", "a_overlay.png", "b_side.jpg", "b_probs.npy", "b_overlay.png"}
    assert first <= {q.name for q in out.iterdir()}
    (out / "mine_side.jpg").write_bytes(b"a user's file")  # (no mine.png label map of a run beside it)
    report = predict_to_folder(predictor, [src], out, progress=False)
    assert [r.status for r in report.records] == ["ok", "ok"]
    names = {q.name for q in out.iterdir()}
    assert not first & names and {"a.png", "a_overlay.jpg", "b.png", "b_overlay.jpg", "mine_side.jpg"} <= names


def test_names_differing_in_case_alone_stay_apart_where_the_file_system_ignores_case(checkpoint, tmp_path, monkeypatch):
    """On macOS's and Windows' default file systems Cat.png's and cat.jpg's label maps (Cat.png, cat.png) are one
    file: one replaced the other (portability audit). There such inputs keep their extensions, and a clash left
    (Cat.png and cat.png from two folders) is refused. The probe is real; this Linux file system tells case apart
    (a case-insensitive one cannot be mounted here), so the folded rule runs with the probe's answer set."""
    from segformer import predict_folder

    assert predict_folder.case_blind(tmp_path) is predict_folder.case_blind(tmp_path / "not" / "yet") is False
    assert not any(p.name.startswith(".segformer-case-") for p in tmp_path.rglob("*"))  # (the probe is removed)
    src = tmp_path / "in"
    src.mkdir()
    for name in ("Cat.png", "cat.jpg", "dog.png"):
        Image.fromarray(_noise(32, 32)).save(src / name)
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    predict_to_folder(predictor, [src], tmp_path / "here", progress=False)  # (case kept apart: the plain names)
    assert {"Cat.png", "cat.png", "dog.png"} <= {p.name for p in (tmp_path / "here").iterdir()}
    monkeypatch.setattr(predict_folder, "case_blind", lambda folder: True)
    predict_to_folder(predictor, [src], tmp_path / "there", progress=False)
    written = sorted(p.name for p in (tmp_path / "there").glob("*.png"))
    assert written == ["Cat_png.png", "cat_jpg.png", "dog.png", "legend.png"]
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(_noise(32, 32)).save(other / "cat.png")
    with pytest.raises(ValueError, match=r"would both be written as cat_png.png \(names that differ in case alone"):
        predict_to_folder(predictor, [src / "Cat.png", other / "cat.png"], tmp_path / "again", progress=False)


def test_folders_follow_links_and_report_what_they_cannot_take(checkpoint, tmp_path):
    """Audit of real folders: --recursive skipped a linked sub-folder (a glob took it), a dangling link and an
    empty folder given as an input were dropped without a word, .jfif/.heic photos were not looked at, and an
    empty file read "not an image". Each is now taken or named in the run's failures."""
    from segformer.images import _raster_formats

    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (src / "empty").mkdir(parents=True)
    elsewhere.mkdir()
    Image.fromarray(_noise(32, 32)).save(src / "a.png")
    Image.fromarray(_noise(32, 32, 1)).save(elsewhere / "b.png")
    Image.fromarray(_noise(32, 32, 2)).save(src / "phone.jfif", format="JPEG")
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    (src / "loop").symlink_to(src, target_is_directory=True)  # (walked once)
    (src / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (src / "zero.png").write_bytes(b"")
    (src / "iphone.heic").write_bytes(b"not decodable here")
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    report = predict_to_folder(predictor, [src, src / "empty"], tmp_path / "out", recursive=True, progress=False)
    status = {Path(r.image).relative_to(src).as_posix(): (r.status, r.error) for r in report.records}
    assert status["a.png"][0] == status["linked/b.png"][0] == status["phone.jfif"][0] == "ok", status
    assert status["dangling.png"] == ("failed", "a link to a file that does not exist")
    assert status["zero.png"] == ("failed", "empty file")
    assert status["empty"] == ("failed", "a folder without images in it or below it")
    heic = status["iphone.heic"]
    assert heic[0] == "failed" and ("pillow-heif" in heic[1]) == ("HEIF" not in _raster_formats()), heic
    assert not any(name.startswith("loop/") for name in status)


def test_a_file_name_that_is_not_utf8_is_segmented_and_summarised(checkpoint, tmp_path):
    """A Latin-1 name (b"caf\\xe9.png") stopped the whole run at the summary with a codec error naming no file
    (audit); summary.json now names it by its bytes on disk (Python's surrogate escape), summary.csv as readable
    UTF-8 text (its raw byte made the table unreadable to pandas and csv: audit)."""
    src = tmp_path / "in"
    src.mkdir()
    odd = os.fsdecode(os.fsencode(src) + b"/caf\xe9.png")
    Image.fromarray(_noise(32, 32)).save(odd)
    Image.fromarray(_noise(32, 32, 1)).save(src / "ok.png")
    report = predict_to_folder(SegformerPredictor(checkpoint, device="cpu"), [src], tmp_path / "out", progress=False)
    assert [r.status for r in report.records] == ["ok", "ok"]
    assert os.path.exists(os.fsencode(tmp_path / "out") + b"/caf\xe9.png")
    table = (tmp_path / "out" / "summary.csv").read_text(encoding="utf-8")  # (strict: valid UTF-8)
    assert "/caf\\xe9.png," in table
    listed = [entry["image"] for entry in json.loads((tmp_path / "out" / "summary.json").read_text())["images"]]
    assert odd in listed
    # lines end in "\n" as written in text mode (the csv module's "\r\n" became "\r\r\n" on Windows: audit)
    assert b"\r" not in (tmp_path / "out" / "summary.csv").read_bytes()


@pytest.mark.parametrize(
    "names, overlay_format, message",
    [
        (["photo.v1.png"], "jpg", "photo.v1.png: this input would be overwritten by its own output"),
        (["a.jpg", "a_overlay.jpg"], "jpg", "a_overlay.jpg: this input would be overwritten by an output of"),
        (["a.jpg", "a_overlay.png"], "png", "its output a_overlay.png would also be written for"),
    ],
)
def test_no_output_overwrites_an_input_or_another_output(checkpoint, tmp_path, names, overlay_format, message):
    """Every file a run would write is checked before the first is written: none is one of the inputs (a dotted
    name, an input named like another's overlay, writing into the input folder) and none is written for two
    inputs. The inputs are untouched and nothing is written."""
    src = tmp_path / "in"
    src.mkdir()
    for name in names:
        Image.fromarray(_noise(32, 32)).save(src / name, format="PNG" if name.endswith(".png") else "JPEG")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    output = src if overlay_format == "jpg" else tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        predict_to_folder(predictor, [src], output, overlay_format=overlay_format, progress=False)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before and not (tmp_path / "out").exists()


def test_library_runs_map_their_work_areas_once(checkpoint, tmp_path, monkeypatch):
    """predict_to_folder and SegformerPredictor.predict on a list share one set of full-resolution work areas over
    their images (as the command line does): after the first image none is allocated again. Mapping them per image
    cost 527 instead of 311 ms a photo (b0, 150 classes, 640x480, aligned)."""
    from segformer import inference

    src = tmp_path / "in"
    src.mkdir()
    for n in range(3):
        Image.fromarray(_noise(40, 56, seed=n)).save(src / f"{n}.png")
    areas = []  # (image count when allocated, elements) of each work area
    real = inference._empty
    seen = [0]

    def empty(shape, device):
        if len(shape) == 1:  # (the work areas are 1-D)
            areas.append((seen[0], shape[0]))
        return real(shape, device)

    monkeypatch.setattr(inference, "_empty", empty)
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="aligned", short_side=48, long_side=96, align=16)
    real_run = predictor._run
    monkeypatch.setattr(predictor, "_run", lambda *a: (seen.__setitem__(0, seen[0] + 1), real_run(*a))[1])
    report = predict_to_folder(predictor, [src], tmp_path / "out", progress=False)
    assert [r.status for r in report.records] == ["ok"] * 3 and seen[0] == 3
    assert areas and all(image == 1 for image, _ in areas), areas  # all during the first image
    areas.clear()
    seen[0] = 0
    results = predictor.predict([str(p) for p in sorted(src.glob("*.png"))])
    assert len(results) == 3 and areas and all(image == 1 for image, _ in areas), areas
    for result, p in zip(results, sorted(src.glob("*.png")), strict=True):  # the same labels as the folder run
        assert np.array_equal(result.labels, np.asarray(Image.open(tmp_path / "out" / f"{p.stem}.png")))
    # predict_iter keeps them between images, leaving this thread's state alone while it is suspended
    areas.clear()
    seen[0] = 0
    streamed = []
    for _, result in predictor.predict_iter([str(p) for p in sorted(src.glob("*.png"))]):
        assert getattr(inference._shared, "areas", None) is None  # the caller's code runs outside any block
        streamed.append(result)
    assert len(streamed) == 3 and areas and all(image == 1 for image, _ in areas), areas
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(streamed, results, strict=True))
    # inside a caller's block (the server's workers keep theirs from request to request) it uses the block's
    areas.clear()
    with inference.reuse_work_areas():
        counts = [len(list(predictor.predict_iter([str(src / "0.png")]))) == 1 and len(areas) for _ in range(2)]
    assert counts[0] > 0 and counts[1] == counts[0], counts  # none allocated for the second iteration


# ---------------------------------------------------------------------------------------------- Python API
def test_predictor_from_python(checkpoint, images):
    d, good, _ = images
    model = SegformerForSemanticSegmentation.from_pretrained(checkpoint)
    predictor = SegformerPredictor(model, device="cpu", mode="whole", batch_size=4)
    assert predictor.class_names == ["sky", "road", "tree", "car", "person"] and predictor.min_size == 29
    sources = [d / n for n in good] + [Image.open(d / "photo.jpg"), _noise(30, 41), _noise(30, 41)[..., 0]]
    results = predictor.predict(sources, return_probs=True)
    sizes = [*good.values(), (64, 48), (41, 30), (41, 30)]
    for res, size in zip(results, sizes):
        assert res.size == size and res.labels.dtype == np.uint8 and res.labels.max() < K
        assert res.probs.shape == (K, size[1], size[0])
        # a float32 softmax of K logits (its exp's errors cancel in the division): K - 1 roundings of its sum and 2 of
        # each reciprocal and product; and K - 1 of this sum: 2K u
        np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=2 * K * U32, rtol=0)
        assert np.array_equal(res.probs.argmax(0), res.labels)
        assert res.areas(K).sum() == size[0] * size[1]
    assert len(np.unique(np.concatenate([r.labels.ravel() for r in results]))) > 1  # not a constant map
    # Batching same-size images together changes nothing.
    one_by_one = SegformerPredictor(model, device="cpu", mode="whole", batch_size=1).predict(sources)
    for a, b in zip(results, one_by_one):
        assert np.array_equal(a.labels, b.labels)
    generated = predictor.predict(s for s in sources[:2])  # an iterator is a list too (it was "image 0": audit)
    assert [r.size for r in generated] == sizes[:2]
    with pytest.raises(ImageError, match=r"tiny\.png: image is 12x10, smaller than the minimum of 29"):
        predictor.predict(d / "tiny.png")
    # predict_iter reports bad files in order and goes on.
    out = list(predictor.predict_iter([d / "notes.jpg", d / "photo.jpg", d / "bomb.png"]))
    assert [type(r).__name__ for _, r in out] == ["ImageError", "Segmentation", "ImageError"]


@pytest.mark.parametrize(
    "options",
    [
        dict(mode="aligned", short_side=64, long_side=128),
        dict(mode="slide", crop_size=32, stride=24),
        dict(mode="whole", scales=[0.75, 1.0], flip=True),
        dict(mode="whole", dtype="bfloat16"),
    ],
    ids=["aligned", "slide", "multiscale-flip", "bf16"],
)
def test_segment_modes_give_labels_at_the_original_size(checkpoint, options):
    image = _noise(70, 90, 11)
    labels, probs = segment(image, checkpoint, return_probs=True, device="cpu", **options)
    assert labels.shape == (70, 90) and labels.max() < K and probs.dtype == np.float32
    # each pass a float32 softmax (bf16 logits too are cast to float32 first), whose sum with this one is within 2K u
    # (as in test_predictor_from_python); P > 1 passes: P - 1 roundings adding them up and 1 dividing by P
    passes = len(options.get("scales", [1])) * (2 if options.get("flip") else 1)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=(2 * K + (passes if passes > 1 else 0)) * U32, rtol=0)


def test_large_image_in_aligned_mode(checkpoint, tmp_path):
    path = tmp_path / "large.jpg"
    Image.fromarray(_noise(1200, 1600, 12)).save(path, quality=80)
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="aligned", short_side=256, long_side=512)
    full = predictor.predict(path).labels
    # as for a huge photo with many classes: no full-size logits (on the CPU the composed resizes, which the
    # aligned mode takes at any size; elsewhere row chunks: tests/test_inference.py)
    predictor.chunk_threshold = 0
    chunked = predictor.predict(path).labels
    assert full.shape == chunked.shape == (1200, 1600) and full.max() < K
    assert (full == chunked).mean() > 0.999  # the same argmax, up to float rounding at exact ties


def test_a_4d_array_is_a_batch_and_array_errors_name_the_image_once(checkpoint):
    """predict(np.stack([a, b])) was refused with "expected a 2-D or 3-D image (or a 4-D batch)", and array
    errors read "image 0: image: ..."; a 4-D array or tensor is now a batch (a list back), one prefix each."""
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    rng = np.random.default_rng(5)
    a, b = (rng.integers(0, 256, (37, 53, 3), dtype=np.uint8) for _ in range(2))
    for batch in (np.stack([a, b]), torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2)):
        results = predictor.predict(batch)
        assert isinstance(results, list) and len(results) == 2
        for got, image in zip(results, (a, b)):
            assert np.array_equal(got.labels, predictor.predict(image).labels)
    with pytest.raises(ImageError) as caught:
        predictor.predict([a, np.full((8, 8, 3), 300)])
    assert (
        str(caught.value) == "image 1: integer pixel values must lie in [0, 255], got [300, 300] (pass 16-bit "
        "images as uint16)"
    )


def test_bad_options_are_value_errors(checkpoint):
    for options, message in (
        (dict(mode="tiles"), "mode"),
        (dict(batch_size=0), "batch_size"),
        (dict(crop_size=32, stride=64), "stride"),
        (dict(dtype="int4"), "dtype"),  # int8 is a choice (dynamic quantisation), int4 is not
    ):
        with pytest.raises(ValueError, match=message):
            SegformerPredictor(checkpoint, device="cpu", **options)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_folder_run_outputs_summary_failures_and_resume(checkpoint, images, tmp_path):
    d, good, bad = images
    out = tmp_path / "out"
    args = [d, "--recursive", "--model", checkpoint, "--output", out, "--mode", "whole", "--batch-size", "3",
            "--side-by-side", "--save-probs", "--no-progress"]  # fmt: skip
    proc = _cli("predict", *args)
    assert proc.returncode == 1, proc.stderr
    assert f"{len(bad)} of {len(good) + len(bad)} images failed" in proc.stderr
    for name, reason in [("tiny.png", "smaller than the minimum"), ("bomb.png", "decompression bomb"),
                         ("truncated.jpg", "truncated"), ("notes.jpg", "not an image")]:  # fmt: skip
        assert any(line.startswith(str(d / name)) and reason in line for line in proc.stderr.splitlines()), name
    assert "Traceback" not in proc.stderr

    summary = json.loads((out / "summary.json").read_text())
    by_image = {Path(e["image"]).relative_to(d).as_posix(): e for e in summary["images"]}
    assert summary["totals"] == {"images": 11, "ok": 7, "skipped": 0, "failed": 4}
    for name, (w, h) in good.items():
        stem = name.rsplit(".", 1)[0]
        label = Image.open(out / f"{stem}.png")
        assert label.mode == "P" and label.size == (w, h), name
        ids = np.asarray(label)
        assert ids.max() < K
        over = Image.open(out / f"{stem}_overlay.jpg")
        assert over.mode == "RGB" and over.size == (w, h)
        assert Image.open(out / f"{stem}_side.jpg").size[1] == h
        probs = np.load(out / f"{stem}_probs.npy")
        assert probs.dtype == np.float16 and probs.shape == (K, h, w)
        entry = by_image[name]
        assert entry["status"] == "ok" and (entry["width"], entry["height"]) == (w, h)
        assert sum(c["pixels"] for c in entry["classes"]) == w * h
        assert sum(c["percent"] for c in entry["classes"]) == pytest.approx(100.0)
        assert {c["id"]: c["pixels"] for c in entry["classes"]} == dict(
            zip(*np.unique(ids, return_counts=True), strict=True)
        )  # the summary agrees with the PNG
    for name in bad:
        assert by_image[name]["status"] == "failed" and by_image[name]["error"]
        assert not (out / name.replace(".", "_")).exists() and not (out / f"{name.rsplit('.', 1)[0]}.png").exists()
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("image,label,status,width,height,class_id,class_name,pixels,percent")
    assert sum(",failed," in r for r in rows) == len(bad)
    assert Image.open(out / "legend.png").mode == "RGB"
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary files

    # --skip-existing: nothing is rewritten, the summary still has every image's areas.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p.name != "legend.png"}
    os.utime(out / "photo.png", ns=(1, 1))  # an old timestamp that a rewrite would replace
    proc = _cli("predict", *args, "--skip-existing")
    assert proc.returncode == 1 and "4 of 11 images failed" in proc.stderr
    assert (out / "photo.png").stat().st_mtime_ns == 1
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.name != "photo.png")
    again = json.loads((out / "summary.json").read_text())
    assert again["totals"] == {"images": 11, "ok": 0, "skipped": 7, "failed": 4}
    assert [e.get("classes") for e in again["images"]] == [e.get("classes") for e in summary["images"]]


@pytest.mark.slow
def test_cli_all_good_exits_zero_with_png_overlays(checkpoint, images, tmp_path):
    d, _, _ = images
    proc = _cli("predict", d / "photo.jpg", d / "gray.png", "--model", checkpoint, "--output", tmp_path,
                "--mode", "whole", "--overlay-format", "png", "--alpha", "1", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ids = np.asarray(Image.open(tmp_path / "photo.png"))
    over = np.asarray(Image.open(tmp_path / "photo_overlay.png"))
    palette = np.asarray(Image.open(tmp_path / "photo.png").getpalette(), np.uint8).reshape(-1, 3)
    assert np.array_equal(over, palette[ids])  # alpha 1: the overlay is exactly the class colours


def test_cli_usage_errors_exit_2(checkpoint, tmp_path):
    from segformer.cli import main
    from segformer.commands import predict as command

    assert (command.DEFAULT_MODEL, command.DEFAULT_MAX_PIXELS) == (DEFAULT_MODEL, DEFAULT_MAX_PIXELS)
    assert main(["predict", str(tmp_path / "*.jpg"), "--model", str(checkpoint), "--output", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["predict", "x.jpg", "--output", str(tmp_path), "--alpha", "2"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_cli_model_not_found_says_what_to_do(images, tmp_path):
    d, _, _ = images
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = _cli("predict", d / "photo.jpg", "--output", tmp_path / "out", env=env)  # the default hub model
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segformer predict: error: cannot load model")
    for words in (DEFAULT_MODEL, "local checkpoint directory", "save_pretrained", "network", "cache"):
        assert words in lines[0]
    proc = _cli("predict", d / "photo.jpg", "--model", tmp_path / "nope", "--output", tmp_path / "out", env=env)
    assert proc.returncode == 2 and "nope" in proc.stderr and "local checkpoint directory" in proc.stderr
    (tmp_path / "damaged").mkdir()  # a local checkpoint that is there, damaged: its reason, without hub advice
    (tmp_path / "damaged" / "config.json").write_text("{not json")
    proc = _cli("predict", d / "photo.jpg", "--model", tmp_path / "damaged", "--output", tmp_path / "out", env=env)
    assert proc.returncode == 2 and f"cannot load model '{tmp_path / 'damaged'}': " in proc.stderr
    assert "network" not in proc.stderr and "hub ids" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_write_each_image_once(checkpoint, images, tmp_path):
    d, good, bad = images
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run(
        [*launcher, "--nproc_per_node=2", "--standalone", "-m", "segformer", "predict", str(d), "--recursive",
         "--model", str(checkpoint), "--output", str(out), "--mode", "whole", "--device", "cpu",
         "--no-progress"],
        capture_output=True, text=True, timeout=180, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode != 0  # the bad files make it fail, on every rank
    assert proc.stderr.count(f"{len(bad)} of {len(good) + len(bad)} images failed") == 1  # rank 0 reports
    summary = json.loads((out / "summary.json").read_text())
    names = [Path(e["image"]).relative_to(d).as_posix() for e in summary["images"]]
    assert sorted(names) == sorted([*good, *bad]) and len(names) == len(set(names))
    # The sorted inputs are dealt out in turn: each image was handled by exactly one rank.
    order = [Path(p).relative_to(d).as_posix() for p, _ in collect_images([d], recursive=True)]
    assert {e["rank"] for e in summary["images"]} == {0, 1}
    for e in summary["images"]:
        assert e["rank"] == order.index(Path(e["image"]).relative_to(d).as_posix()) % 2
    labels = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if not p.name.endswith("_overlay.png"))
    assert labels == sorted([f"{n.rsplit('.', 1)[0]}.png" for n in good] + ["legend.png"])


@pytest.mark.slow
def test_killed_run_leaves_no_half_written_file_and_resumes(checkpoint, tmp_path):
    """SIGKILL a run in the middle: every output present is a complete file, and --skip-existing finishes it."""
    import signal
    import time

    src = tmp_path / "many"
    src.mkdir()
    for i in range(40):
        Image.fromarray(_noise(300, 400, 100 + i)).save(src / f"img{i:02d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "segformer", "predict", str(src), "--model", str(checkpoint), "--output", str(out),
           "--mode", "whole", "--overlay-format", "png", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("*_overlay.png"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    written = sorted(out.glob("img*.png"))
    assert 3 <= len([p for p in written if p.name.endswith("_overlay.png")]) < 40, "the kill came too late"
    for path in written:  # complete files only: each decodes in full
        with Image.open(path) as im:
            im.load()
    result = _cli("predict", src, "--model", checkpoint, "--output", out, "--mode", "whole", "--overlay-format",
                  "png", "--skip-existing", "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("img*_overlay.png"))) == 40 and len(list(out.glob("img??.png"))) == 40
    # a write cut by SIGKILL can leave its hidden temporary (.NAME.xxxx.tmp), never a visible partial file
    assert all(p.name.startswith(".") for p in out.rglob("*.tmp"))


def test_collected_paths_are_the_ones_the_user_passed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (40, 40)).save(real / "a.png")
    (tmp_path / "link.png").symlink_to(real / "a.png")
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    assert collect_images([tmp_path / "link.png"]) == [(tmp_path / "link.png", Path("link.png"))]
    assert collect_images([tmp_path / "linked"]) == [(tmp_path / "linked" / "a.png", Path("a.png"))]
    # the same file reached twice is segmented once
    assert len(collect_images([tmp_path / "linked", real / "a.png"])) == 1


def test_folder_runs_resume_only_what_they_made(checkpoint, tmp_path):
    """--skip-existing takes an earlier label map only when it was made from that very image as it is now (its
    PNG names the image's path, size and time): not another input that maps to the same name, not an edited
    image. An output folder inside the input tree is left out of the walk, so the run can be resumed; an image
    named summary.* is an image like any other; a pattern that matches nothing is reported, not dropped."""
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(_noise(40, 56, seed=1)).save(src / "x.jpg")
    Image.fromarray(_noise(36, 48, seed=2)).save(src / "summary.jpg")
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    out = src / "masks"
    first = predict_to_folder(predictor, [src], out, recursive=True, progress=False)
    assert [r.status for r in first.records] == ["ok", "ok"] and (out / "summary.png").is_file()
    again = predict_to_folder(predictor, [src], out, recursive=True, skip_existing=True, progress=False)
    assert [r.status for r in again.records] == ["skipped", "skipped"]  # the outputs were not taken as inputs
    # another image with x's output name, then x edited: both segmented, not the stale map's areas
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(_noise(30, 44, seed=3)).save(other / "x.png")
    report = predict_to_folder(predictor, [other / "x.png"], out, skip_existing=True, progress=False)
    assert report.records[0].status == "ok" and (report.records[0].width, report.records[0].height) == (44, 30)
    assert Image.open(out / "x.png").size == (44, 30)
    Image.fromarray(_noise(40, 56, seed=4)).save(src / "summary.jpg")  # edited since the map was made
    report = predict_to_folder(predictor, [src / "summary.jpg"], out, skip_existing=True, progress=False)
    assert report.records[0].status == "ok"
    # a pattern that matches nothing, beside a real image: reported as missing (the run fails, exit 1)
    report = predict_to_folder(predictor, [src / "x.jpg", str(tmp_path / "none" / "*.png")], tmp_path / "o",
                               progress=False)  # fmt: skip
    assert sorted(r.status for r in report.records) == ["failed", "ok"]


def test_segment_refuses_options_beside_a_ready_predictor_and_int8_copies(checkpoint):
    """segment(img, predictor, mode=...) would ignore the options (the predictor keeps its own): a TypeError. An
    int8 predictor quantises a copy: the caller's model computes what it did."""
    image = _noise(40, 48)
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    with pytest.raises(TypeError, match="mode with a ready SegformerPredictor"):
        segment(image, predictor, mode="slide")
    model = SegformerForSemanticSegmentation.from_pretrained(checkpoint).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x).logits
    SegformerPredictor(model, device="cpu", dtype="int8")
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    assert not any("quantized" in type(m).__module__ for m in model.modules())


def test_summary_json_records_what_made_the_run(checkpoint, tmp_path):
    """summary.json says which model, backend, precision (as it ran: bfloat16 falls back to float32 on a CPU that
    would only emulate it), device and options made the outputs, so two folders can be told apart."""
    from segformer import __version__
    from segformer.precision import reduced_precision_problem

    photo = tmp_path / "p.png"
    Image.fromarray(_noise(40, 48)).save(photo)
    bf16 = "float32" if reduced_precision_problem(torch.bfloat16, "cpu") else "bfloat16"
    for dtype, precision in (("float32", "float32"), ("bfloat16", bf16), ("int8", "int8")):
        predictor = SegformerPredictor(checkpoint, device="cpu", dtype=dtype, mode="slide", crop_size=32, stride=24)
        out = tmp_path / dtype
        predict_to_folder(predictor, [photo], out, alpha=0.3, progress=False)
        run = json.loads((out / "summary.json").read_text())["run"]
        assert run == {
            "model": str(checkpoint),
            "backend": "pytorch",
            "precision": precision,
            "device": "cpu",
            "processes": 1,
            "options": predictor.options.to_dict(),
            "alpha": 0.3,
            "segformer": __version__,
        }, dtype
        assert run["options"]["mode"] == "slide" and run["options"]["crop_size"] == [32, 32]


# ---------------------------------------------------------------------------------------------- --skip-existing
def _photos(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir()
    for i in range(n):
        Image.fromarray(_noise(40, 56, seed=20 + i)).save(folder / f"p{i}.png")
    return sorted(folder.glob("*.png"))


@pytest.mark.slow
def test_cli_skip_existing_redoes_what_another_model_made(checkpoint, tmp_path):
    """A second job into the same folder with another model (300 classes: 16-bit maps, other names) and
    --skip-existing redoes every map and says so in one line: masks, summary and legend are then all that model's.
    A third run of that job skips everything and rewrites nothing."""
    from segformer.visualize import legend

    photos = _photos(tmp_path / "in")
    other = tmp_path / "other"
    torch.manual_seed(1)
    randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=300)), seed=7).save_pretrained(other)
    out = tmp_path / "out"
    common = [tmp_path / "in", "--output", out, "--mode", "whole", "--no-progress"]
    first = _cli("predict", *common, "--model", checkpoint)
    assert first.returncode == 0, first.stderr
    second = _cli("predict", *common, "--model", other, "--skip-existing")
    assert second.returncode == 0, second.stderr
    assert "segmented 3 image(s), skipped 0 existing" in second.stderr
    redo = [line for line in second.stderr.splitlines() if "redid" in line]
    assert redo == ["--skip-existing: redid 3 image(s) whose existing outputs another model or other options had "
                    "made (model, dtype, backend, mode, sizes, scales, flip, alpha)"]  # fmt: skip

    predictor = SegformerPredictor(other, device="cpu", mode="whole")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"] == {"images": 3, "ok": 3, "skipped": 0, "failed": 0}
    for photo, entry in zip(photos, summary["images"], strict=True):
        label = Image.open(out / photo.name)
        assert label.mode == "I;16"  # (more than 256 classes)
        ids = np.asarray(label)
        assert np.array_equal(ids, predictor.predict(photo).labels)
        assert [(c["id"], c["name"], c["pixels"]) for c in entry["classes"]] == [
            (int(c), predictor.class_names[c], int(n)) for c, n in zip(*np.unique(ids, return_counts=True))
        ]
    assert [c["name"] for c in summary["classes"]] == predictor.class_names
    assert np.array_equal(np.asarray(Image.open(out / "legend.png")),
                          np.asarray(legend(predictor.class_names, predictor.palette)))  # fmt: skip

    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("p")}
    third = _cli("predict", *common, "--model", other, "--skip-existing")
    assert third.returncode == 0, third.stderr
    assert "segmented 0 image(s), skipped 3 existing" in third.stderr and "redid" not in third.stderr
    assert {p: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("p")} == stamps


@pytest.mark.parametrize(
    "changes",
    [dict(mode="slide", crop_size=32, stride=24), dict(flip=True), dict(short_side=96), dict(dtype="int8")],
    ids=["slide", "flip", "short-side", "int8"],
)
def test_skip_existing_redoes_what_other_options_made(checkpoint, tmp_path, caplog, changes):
    """Options that change the masks (mode, sizes, scales, flip, dtype) make another job: --skip-existing redoes
    its maps, with this run's labels, and back again; the same options skip everything."""
    photos = _photos(tmp_path / "in", n=2)
    out = tmp_path / "out"
    options = dict(device="cpu", mode="aligned", short_side=64, long_side=128)
    base, changed = SegformerPredictor(checkpoint, **options), SegformerPredictor(checkpoint, **{**options, **changes})
    predict_to_folder(base, [tmp_path / "in"], out, progress=False)
    masks = [np.asarray(Image.open(out / photo.name)) for photo in photos]
    for predictor in (changed, base):
        report = predict_to_folder(predictor, [tmp_path / "in"], out, skip_existing=True, progress=False)
        assert [r.status for r in report.records] == ["ok", "ok"] and len(report.redone) == 2
        for photo in photos:
            assert np.array_equal(np.asarray(Image.open(out / photo.name)), predictor.predict(photo).labels)
    assert any((mask != changed.predict(photo).labels).any() for mask, photo in zip(masks, photos))  # (another job)
    assert "--skip-existing: redid 2 image(s)" in caplog.text
    caplog.clear()
    report = predict_to_folder(base, [tmp_path / "in"], out, skip_existing=True, progress=False)
    assert [r.status for r in report.records] == ["skipped", "skipped"] and not report.redone
    assert "redid" not in caplog.text


def test_skip_existing_redoes_overlays_of_another_alpha(checkpoint, tmp_path):
    """--alpha 0.9 --skip-existing kept every overlay blended at 0.2 (audit): overlays of another alpha are redone."""
    _photos(tmp_path / "in", n=2)
    out, predictor = tmp_path / "out", SegformerPredictor(checkpoint, device="cpu", mode="whole")
    predict_to_folder(predictor, [tmp_path / "in"], out, alpha=0.2, overlay_format="png", progress=False)
    overlays = sorted(out.glob("*_overlay.png"))
    before = [np.asarray(Image.open(p)) for p in overlays]
    report = predict_to_folder(predictor, [tmp_path / "in"], out, alpha=0.9, overlay_format="png",
                               skip_existing=True, progress=False)  # fmt: skip
    assert [r.status for r in report.records] == ["ok", "ok"] and len(report.redone) == 2
    assert all(not np.array_equal(np.asarray(Image.open(p)), b) for p, b in zip(overlays, before, strict=True))
    again = predict_to_folder(predictor, [tmp_path / "in"], out, alpha=0.9, overlay_format="png",
                              skip_existing=True, progress=False)  # fmt: skip
    assert [r.status for r in again.records] == ["skipped", "skipped"]


def test_skip_existing_redoes_what_other_colours_made(checkpoint, tmp_path):
    """A checkpoint's labels.json palette changed since a run: --skip-existing kept the label maps and overlays in
    the old colours (the stamp held no colours). They are redone."""
    import shutil

    _photos(tmp_path / "in", n=1)
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(checkpoint, model)
    first = SegformerPredictor(str(model), device="cpu", mode="whole")
    predict_to_folder(first, [tmp_path / "in"], out, progress=False)
    names = [first.class_names[k] for k in range(first.num_classes)]
    colours = {str(k): [255 - 10 * k, 10 * k, 7] for k in range(first.num_classes)}
    (model / "labels.json").write_text(json.dumps({"id2label": names, "palette": colours}))
    second = SegformerPredictor(str(model), device="cpu", mode="whole")
    report = predict_to_folder(second, [tmp_path / "in"], out, skip_existing=True, progress=False)
    assert [r.status for r in report.records] == ["ok"] and len(report.redone) == 1
    assert Image.open(out / "p0.png").getpalette()[:3] == colours["0"]


def test_an_image_that_fails_loses_an_earlier_runs_outputs(checkpoint, tmp_path):
    """A second run with another model, in which one image no longer reads, left that image's mask and overlay from
    the first model beside the second's legend and summary (audit); they are removed with its failure."""
    photos = _photos(tmp_path / "in", n=2)
    out = tmp_path / "out"
    predict_to_folder(SegformerPredictor(checkpoint, device="cpu"), [tmp_path / "in"], out, progress=False)
    assert (out / "p1.png").exists() and (out / "p1_overlay.jpg").exists()
    photos[1].write_bytes(photos[1].read_bytes()[:100])  # truncated since
    other = tmp_path / "other"
    randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=3)), seed=7).save_pretrained(other)
    report = predict_to_folder(SegformerPredictor(other, device="cpu"), [tmp_path / "in"], out, progress=False)
    assert [r.status for r in report.records] == ["ok", "failed"]
    assert sorted(p.name for p in out.iterdir()) == [".segformer-predict", "legend.png", "p0.png", "p0_overlay.jpg",
                                                      "summary.csv", "summary.json"]  # fmt: skip


def test_earlier_outputs_in_the_folders_walked_are_not_photos(checkpoint, tmp_path, caplog, capsys):
    """A second output folder inside the input tree segmented the first one's masks, overlays and legend as photos,
    and an output folder that is its input could not be run again (its legend.png read as an input) (audit).
    Output folders hold a marker: walks and globs leave them out, with one line, and a run's own files in a folder
    that is also its input are not inputs."""
    _photos(tmp_path / "ph", n=2)
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    first = predict_to_folder(predictor, [tmp_path / "ph"], tmp_path / "ph" / "masks", recursive=True, progress=False)
    assert len(first.records) == 2 and (tmp_path / "ph" / "masks" / ".segformer-predict").is_file()
    with caplog.at_level("WARNING", logger="segformer"):
        second = predict_to_folder(predictor, [tmp_path / "ph"], tmp_path / "ph" / "v2", recursive=True,
                                   progress=False)  # fmt: skip
    assert sorted(Path(r.image).name for r in second.records) == ["p0.png", "p1.png"]
    assert caplog.messages == [f"{tmp_path / 'ph' / 'masks'}: left out, an output folder of segformer predict "
                               "(.segformer-predict)"]  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING", logger="segformer"):  # its own output folder, resumed: nothing to say
        predict_to_folder(predictor, [tmp_path / "ph"], tmp_path / "ph" / "masks", recursive=True, skip_existing=True,
                          progress=False)  # fmt: skip
    assert not [m for m in caplog.messages if "left out" in m and "masks:" in m], caplog.messages
    caplog.clear()
    with caplog.at_level("WARNING", logger="segformer"):  # (a glob left them out without a word: notes)
        globbed = predict_to_folder(predictor, [str(tmp_path / "ph" / "**" / "*.png")], tmp_path / "v3",
                                    progress=False)  # fmt: skip
    assert sorted(Path(r.image).name for r in globbed.records) == ["p0.png", "p1.png"]
    assert sorted(caplog.messages) == [
        f"{tmp_path / 'ph' / name}: left out, an output folder of segformer predict (.segformer-predict)"
        for name in ("masks", "v2")
    ]
    # the command says it once per folder (it looked twice: once for usage errors, once to run: audit)
    from conftest import run_cli

    for given in ([tmp_path / "ph", "-r"], [str(tmp_path / "ph" / "**" / "*.png")]):
        caplog.clear()
        with caplog.at_level("WARNING", logger="segformer"):
            code, _, err = run_cli(capsys, "predict", *given, "--model", checkpoint, "--output", tmp_path / "v4",
                                   "--no-progress", "--mode", "whole", "--skip-existing")  # fmt: skip
        assert code == 0, err
        assert sum("masks: left out" in m for m in caplog.messages) == 1, caplog.messages
    same = tmp_path / "same"
    _photos(same, n=1)
    (same / "p0.png").rename(same / "p0.jpg")
    for _ in range(2):  # (the second run: legend.png, p0.png and p0_overlay.jpg are the first run's)
        report = predict_to_folder(predictor, [same], same, progress=False)
        assert [(Path(r.image).name, r.status) for r in report.records] == [("p0.jpg", "ok")]


def test_an_overlay_over_the_jpeg_limit_says_how_to_write_it(checkpoint, tmp_path):
    """A 65,501 px wide image lost every output with "broken data stream" (libjpeg's limit, 65,500 a side; audit):
    the failure now names the file, the limit and the option that writes it."""
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((32, 65501, 3), np.uint8)).save(tmp_path / "in" / "strip.png")
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    report = predict_to_folder(predictor, [tmp_path / "in"], tmp_path / "out", progress=False)
    assert report.records[0].error == ("cannot write outputs: strip_overlay.jpg would be 65501x32, over JPEG's limit "
                                       "of 65,500 pixels a side: --overlay-format png writes it as PNG")  # fmt: skip
    report = predict_to_folder(predictor, [tmp_path / "in"], tmp_path / "png", overlay_format="png", progress=False)
    assert report.records[0].status == "ok" and (tmp_path / "png" / "strip_overlay.png").is_file()


def test_a_files_pixel_errors_follow_its_name_once(tmp_path):
    """ "a.tif: image: float pixel values ..." (audit): a file's errors follow its name, without "image: "."""
    from segformer.images import ImageError, load_image

    Image.fromarray(np.full((8, 8), 300.5, np.float32)).save(tmp_path / "a.tif")
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "a.tif")
    assert str(info.value) == "float pixel values must lie in [0, 1] or [0, 255], got max 300.5"
    with pytest.raises(ImageError, match=r"^image: float pixel values"):  # (an image in memory: named so)
        load_image(Image.open(tmp_path / "a.tif"))


def test_a_resume_removes_what_a_killed_write_left(checkpoint, tmp_path, caplog):
    """After a SIGKILL a hidden ".im_probs.npy.XXXXXXXX.tmp" stayed in the output folder for good (audit): a
    --skip-existing run removes those over ten minutes old (a write in progress elsewhere is younger)."""
    _photos(tmp_path / "in", n=1)
    out, predictor = tmp_path / "out", SegformerPredictor(checkpoint, device="cpu", mode="whole")
    predict_to_folder(predictor, [tmp_path / "in"], out, progress=False)
    old, young = out / ".p0_probs.npy.ab12cd_3.tmp", out / ".p0.png.zz99yy88.tmp"
    for path in (old, young):
        path.write_bytes(b"x" * 1000)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    with caplog.at_level("WARNING", logger="segformer"):
        predict_to_folder(predictor, [tmp_path / "in"], out, skip_existing=True, progress=False)
    assert not old.exists() and young.exists()
    assert f"--skip-existing: removed 1 temporary file(s) a killed run left in {out}" in caplog.messages


def test_skip_existing_redoes_outputs_that_record_no_maker(checkpoint, tmp_path):
    """A label map of an earlier version (it names its image, not what made it) cannot be told from another
    model's: redone, not skipped."""
    _photos(tmp_path / "in", n=2)
    out = tmp_path / "out"
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    predict_to_folder(predictor, [tmp_path / "in"], out, progress=False)
    with Image.open(out / "p0.png") as label:
        label.load()
        old = PngImagePlugin.PngInfo()
        old.add_text("segformer:source", label.info["segformer:source"])  # all that earlier versions wrote
        label.save(out / "p0.png", pnginfo=old)
    report = predict_to_folder(predictor, [tmp_path / "in"], out, skip_existing=True, progress=False)
    assert [r.status for r in report.records] == ["ok", "skipped"]
    assert [r.redone for r in report.records] == [True, False]
    assert Image.open(out / "p0.png").info["segformer:maker"] == Image.open(out / "p1.png").info["segformer:maker"]


def test_failed_redo_removes_what_another_model_made(checkpoint, tmp_path):
    """When an image whose outputs another job made cannot be segmented now (here: smaller than this run's
    min_size), those outputs go: the folder holds no mask the run's summary and legend do not describe."""
    _photos(tmp_path / "in", n=1)
    out = tmp_path / "out"
    predict_to_folder(SegformerPredictor(checkpoint, device="cpu", mode="whole"), [tmp_path / "in"], out,
                      side_by_side_image=True, progress=False)  # fmt: skip
    strict = SegformerPredictor(checkpoint, device="cpu", mode="slide", crop_size=32, stride=24, min_size=100)
    report = predict_to_folder(strict, [tmp_path / "in"], out, side_by_side_image=True, skip_existing=True,
                               progress=False)  # fmt: skip
    assert [r.status for r in report.records] == ["failed"] and report.records[0].redone
    assert "smaller than the minimum of 100" in report.records[0].error
    assert sorted(p.name for p in out.iterdir()) == [".segformer-predict", "legend.png", "summary.csv", "summary.json"]


def test_a_file_no_run_wrote_is_never_overwritten(checkpoint, tmp_path, caplog):
    """A photo in the output folder where an output would go was replaced by another image's label map without a
    word, and with --recursive and the output folder inside the inputs it was also left out of the inputs silently
    (audit). A run replaces only files runs wrote (label maps record their source; the other files are named as a
    run names them, in a folder holding the marker), and names the images of its own output folder it leaves out."""
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    photos = tmp_path / "in"
    _photos(photos, n=1)
    (photos / "p0.png").rename(photos / "a.png")
    (photos / "s").mkdir()
    Image.fromarray(_noise(40, 56, seed=31)).save(photos / "s" / "a.png")  # a photo where a.png's label map goes
    before = (photos / "s" / "a.png").read_bytes()
    refused = r"s/a\.png: a file segformer predict did not write \(or cannot read\) is where an output"
    with pytest.raises(ValueError, match=refused):
        predict_to_folder(predictor, [photos], photos / "s", recursive=True, progress=False)
    assert (photos / "s" / "a.png").read_bytes() == before and not (photos / "s" / ".segformer-predict").exists()
    elsewhere = tmp_path / "out"
    elsewhere.mkdir()
    (elsewhere / "a_overlay.jpg").write_bytes(b"a user's file")  # no marker: not a run's overlay
    with pytest.raises(ValueError, match=r"out/a_overlay\.jpg: a file segformer predict did not write"):
        predict_to_folder(predictor, [photos / "a.png"], elsewhere, progress=False)
    (elsewhere / "a_overlay.jpg").unlink()
    predict_to_folder(predictor, [photos / "a.png"], elsewhere, progress=False)
    again = predict_to_folder(predictor, [photos / "a.png"], elsewhere, progress=False)  # its own files: replaced
    assert [r.status for r in again.records] == ["ok"]

    (photos / "s" / "a.png").rename(photos / "s" / "b.png")  # no clash now: left out of the inputs, said once
    caplog.clear()
    with caplog.at_level("WARNING", logger="segformer"):
        report = predict_to_folder(predictor, [photos], photos / "s", recursive=True, progress=False)
    assert [Path(r.image).name for r in report.records] == ["a.png"]
    said = [m for m in caplog.messages if "left out" in m]
    assert said == [f"{photos / 's' / 'b.png'}: left out, in this run's output folder ({photos / 's'}); pass it "
                    "separately to segment it"]  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING", logger="segformer"):  # the second run: its own outputs are no such images
        predict_to_folder(predictor, [photos], photos / "s", recursive=True, progress=False)
    assert [m for m in caplog.messages if "left out" in m] == said
    caplog.clear()
    with caplog.at_level("WARNING", logger="segformer"):  # a glob says it too (it left them out silently: review)
        predict_to_folder(predictor, [str(photos / "**" / "*.png")], photos / "s", progress=False)
    assert [m for m in caplog.messages if "left out" in m] == said


def test_a_file_reached_by_two_names_is_segmented_under_its_own(checkpoint, tmp_path, caplog):
    """A folder with a link to one of its files: the file is segmented once, under its own name rather than the
    link's (the link's name sorted first and the file had no outputs and no summary row: audit), with one line."""
    folder = tmp_path / "in"
    _photos(folder, n=1)
    (folder / "p0.png").rename(folder / "z.png")
    (folder / "a_link.png").symlink_to("z.png")
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    with caplog.at_level("WARNING", logger="segformer"):
        report = predict_to_folder(predictor, [folder], tmp_path / "out", progress=False)
    assert [Path(r.image).name for r in report.records] == ["z.png"]
    assert (tmp_path / "out" / "z.png").is_file() and not (tmp_path / "out" / "a_link.png").exists()
    assert [m for m in caplog.messages if "same file" in m] == [
        f"{folder / 'a_link.png'}: the same file as {folder / 'z.png'}, segmented once, as {folder / 'z.png'}"
    ]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="/dev/full is Linux's always-full device")
def test_probabilities_on_a_full_disk_say_so():
    """--save-probs on a full disk said NumPy's "61440 requested and 16320 written" (C's fwrite): the file is now
    written through Python's write, whose short write is ENOSPC, which atomic_write names with the file (audit)."""
    import errno

    from segformer.predict_folder import _write_npy

    with pytest.raises(OSError) as raised:
        _write_npy("/dev/full", np.zeros((4, 64, 64), np.float16))
    assert raised.value.errno == errno.ENOSPC


def test_an_output_folder_in_its_inputs_leaves_its_own_files_out_at_any_depth(checkpoint, tmp_path):
    """Output folder = input folder with -r: a second run segmented the first one's label maps and overlays in
    sub-folders as photos (the marker is at the top only), and a third stopped on a name clash (review audit). An
    output folder that is a link inside the inputs to a folder outside them could not be run twice."""
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    tree = tmp_path / "tree"
    for f in (*_photos(tree, n=1), *_photos(tree / "sub", n=2)):  # (JPEGs: PNG photos would be overwritten)
        Image.open(f).save(f.with_suffix(".jpg"))
        f.unlink()
    for _ in range(3):
        report = predict_to_folder(predictor, [tree], tree, recursive=True, progress=False)
        assert sorted(str(Path(r.image).relative_to(tree)) for r in report.records) == [
            "p0.jpg", "sub/p0.jpg", "sub/p1.jpg"
        ]  # fmt: skip
        assert all(r.status == "ok" for r in report.records)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tree / "out").symlink_to(outside)
    for skip in (False, False, True):
        report = predict_to_folder(predictor, [tree], tree / "out", recursive=True, skip_existing=skip,
                                   progress=False)  # fmt: skip
        assert len(report.records) == 3 and not report.failures


def test_a_folder_reached_by_two_names_is_walked_under_its_own(checkpoint, tmp_path, caplog):
    """A link to a folder beside it: the walk took the link's name (sorted first) and the real folder got no
    outputs, without a word (review audit). The real folder by its own name, the link left out in one line; a
    chain of links names the file itself."""
    d = tmp_path / "d"
    d.mkdir()
    _photos(d / "real", n=1)
    (d / "a_link").symlink_to("real")
    (d / "real" / "l1.png").symlink_to("p0.png")
    (d / "real" / "l2.png").symlink_to("l1.png")
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    with caplog.at_level("WARNING", logger="segformer"):
        report = predict_to_folder(predictor, [d], tmp_path / "out", recursive=True, progress=False)
    assert [str(Path(r.image).relative_to(d)) for r in report.records] == ["real/p0.png"]
    said = sorted(m for m in caplog.messages if "same f" in m)
    real = d / "real" / "p0.png"
    assert said == [
        f"{d / 'a_link'}: the same folder as {d / 'real'}, walked once, there",
        *(f"{d / 'real' / name}: the same file as {real}, segmented once, as {real}" for name in ("l1.png", "l2.png")),
    ]


def test_outputs_copied_without_the_marker_empty_ones_and_folders_in_the_way(checkpoint, tmp_path):
    """Outputs copied without the hidden marker (cp out/* elsewhere) are still a run's (its label maps say so); an
    empty file holds nothing to lose; a folder where an output goes is named as a folder (review audit)."""
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    photos = _photos(tmp_path / "in", n=2)
    predict_to_folder(predictor, photos, tmp_path / "out", progress=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in (tmp_path / "out").iterdir():
        if not f.name.startswith("."):
            (copy / f.name).write_bytes(f.read_bytes())
    report = predict_to_folder(predictor, photos, copy, skip_existing=True, progress=False)
    assert [r.status for r in report.records] == ["skipped", "skipped"]
    (copy / "p0.png").write_bytes(b"")  # (a write cut short by a power loss)
    report = predict_to_folder(predictor, photos, copy, skip_existing=True, progress=False)
    assert sorted(r.status for r in report.records) == ["ok", "skipped"]
    (copy / "p1_overlay.jpg").unlink()
    (copy / "p1_overlay.jpg").mkdir()
    with pytest.raises(ValueError, match=r"copy/p1_overlay\.jpg: a folder is where an output would go"):
        predict_to_folder(predictor, photos, copy, progress=False)


def test_photos_in_an_output_folder_that_is_their_input_folder_are_never_lost(checkpoint, tmp_path):
    """Output folder = input folder, holding car.jpg and a photo car_side.jpg: the second run took car_side.jpg
    for car.jpg's side image (a run's name in a marked folder), left it out of the inputs and deleted it as a
    leftover of other options (review audit). A run's overlays, side images and legend now carry a stamp; only
    stamped files are a run's there, and no input of the run (any rank's) is ever removed."""
    predictor = SegformerPredictor(checkpoint, device="cpu", mode="whole")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_noise(32, 48, seed=5)).save(photos / "car.jpg")
    Image.fromarray(_noise(40, 32, seed=6)).save(photos / "car_side.jpg")
    before = (photos / "car_side.jpg").read_bytes()
    for _ in range(3):
        report = predict_to_folder(predictor, [photos], photos, progress=False)
        assert sorted((Path(r.image).name, r.status) for r in report.records) == [("car.jpg", "ok"),
                                                                                 ("car_side.jpg", "ok")]  # fmt: skip
        assert (photos / "car_side.jpg").read_bytes() == before
    with pytest.raises(ValueError, match=r"car_side\.jpg: this input would be overwritten by an output of .*car\.jpg"):
        predict_to_folder(predictor, [photos], photos, side_by_side_image=True, progress=False)
    assert (photos / "car_side.jpg").read_bytes() == before

    # A run's own side image passed as an input, while the rank that handles car.jpg (rank 0 of 2) drops car.jpg's
    # side image of an earlier run: it is an input of rank 1's, so it stays.
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(_noise(32, 48, seed=5)).save(src / "car.jpg")
    predict_to_folder(predictor, [src], out, side_by_side_image=True, progress=False)
    made = (out / "car_side.jpg").read_bytes()
    report = predict_to_folder(predictor, [src / "car.jpg", out / "car_side.jpg"], out, rank=0, world_size=2,
                               progress=False)  # fmt: skip
    assert [Path(r.image).name for r in report.records] == ["car.jpg"]
    assert (out / "car_side.jpg").read_bytes() == made
    predict_to_folder(predictor, [src], out, progress=False)  # (not an input now: a leftover of other options)
    assert not (out / "car_side.jpg").exists() and (out / "car.png").exists()
