"""The evaluation report: per-image scores and the worst images, the files of the report folder, the command
line, and report.html in a real headless Chromium (no errors, no network, every picture shown)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_, run_cli, tiny_config
from PIL import Image

from segformer import SegformerForSemanticSegmentation
from segformer.data import build_dataset, write_synthetic_dataset
from segformer.evaluate import evaluate
from segformer.inference import InferenceOptions, predict_labels
from segformer.metrics import compute_metrics
from segformer.report import evaluate_details, image_miou, write_report
from segformer.robustness import run_study

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), num_train=1, num_val=5, size=64, seed=2)


@pytest.fixture(scope="module")
def model():
    return randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4)), seed=4).eval()


@pytest.fixture(scope="module")
def val(data):
    return build_dataset(data, "val")[0]


@pytest.fixture(scope="module")
def report(model, val, tmp_path_factory) -> Path:
    """A report folder with a two-corruption robustness study."""
    folder = tmp_path_factory.mktemp("report")
    options = InferenceOptions(mode="slide", crop_size=(48, 48), stride=(32, 32))
    details = evaluate_details(model, val, options, worst=3)
    study = run_study(
        model, val, options, corruptions=["fog", "contrast"], severities=[1, 2], clean_metrics=details.metrics
    )
    write_report(folder, details, val, model_name="tiny <test> model", options=options, robustness=study)
    return folder


def test_image_miou():
    conf = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 4]])  # class 1: predicted once, never true
    # IoU: class 0 3/(4+5-3) = 0.5, class 1 0/1 = 0, class 2 4/(6+4-4) = 2/3
    assert image_miou(conf) == pytest.approx((0.5 + 0 + 2 / 3) / 3)
    assert image_miou(np.diag([0, 5, 0])) == 1.0  # classes absent from labels and prediction do not count
    assert image_miou(np.zeros((3, 3), int)) is None


def test_details_agree_with_evaluate_and_find_the_worst_images(model, val):
    details = evaluate_details(model, val, worst=2)
    metrics = evaluate(model, val)
    assert details.metrics["mIoU"] == metrics["mIoU"] and details.metrics["IoU"] == metrics["IoU"]
    assert compute_metrics(torch.from_numpy(details.confusion), val.id2label)["mIoU"] == pytest.approx(metrics["mIoU"])
    assert details.confusion.sum() == metrics["num_pixels"]
    assert [i for i, _ in details.scores] == list(range(len(val)))
    lowest = sorted((s, i) for i, s in details.scores if s is not None)[:2]
    assert [(s, i) for i, s, _ in details.worst] == lowest
    for index, score, pred in details.worst:
        pixels, labels = val[index]
        assert np.array_equal(pred, predict_labels(model, pixels[None])[0].numpy())
        single = compute_metrics(torch.from_numpy(_conf(pred, labels.numpy(), 4)))
        assert score == pytest.approx(single["mIoU"])
    assert evaluate_details(model, val, worst=0).worst == []
    with pytest.raises(ValueError, match="worst must be >= 0"):
        evaluate_details(model, val, worst=-1)


def _conf(pred: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    keep = labels != 255
    return np.bincount(labels[keep] * k + pred[keep], minlength=k * k).reshape(k, k)


def test_report_folder_holds_every_picture_and_the_metrics(report, val):
    html = (report / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    expected = {"per_class_iou.png", "confusion_matrix.png", "legend.png", "robustness.png",
                "worst_01.png", "worst_02.png", "worst_03.png"}  # fmt: skip
    assert set(sources) == expected
    for name in sources:
        with Image.open(report / name) as im:
            assert im.format == "PNG" and im.width > 50 and im.height > 20, name
            assert np.asarray(im.convert("L")).std() > 1, f"{name} is blank"
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "the report must not reach the network"
    assert "tiny &lt;test&gt; model" in html and "<test>" not in html  # escaped
    for name in ("background", "stripes", "checkerboard", "dots", "fog", "contrast", "relative"):
        assert name in html
    saved = json.loads((report / "metrics.json").read_text())
    assert set(saved["IoU"]) == set(val.id2label.values())
    assert saved["robustness"]["mIoU"]["fog"]["2"] is not None and saved["robustness"]["clean_mIoU"] == saved["mIoU"]
    with Image.open(report / "worst_01.png") as im:
        assert im.width >= 3 * 64  # image | ground truth | prediction


def test_a_report_over_an_earlier_one_keeps_only_its_own_worst_images(model, val, tmp_path):
    for k in (3, 1):
        write_report(tmp_path, evaluate_details(model, val, worst=k), val)
    assert sorted(p.name for p in tmp_path.glob("worst_*")) == ["worst_01.png"]
    html = (tmp_path / "report.html").read_text()
    assert "worst_01.png" in html and "worst_02.png" not in html


def test_cli_writes_a_report(data, tmp_path, capsys):
    model_dir = tmp_path / "model"
    randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=4)), seed=4).save_pretrained(model_dir)
    out = tmp_path / "rep"
    code, stdout, err = run_cli(capsys, "eval", "--data", data, "--model", model_dir, "--device", "cpu",
                                "--workers", "0", "--report", out, "--worst", "2")  # fmt: skip
    assert code == 0, err
    assert f"wrote {out / 'report.html'}" in err and "mIoU" in stdout
    assert sorted(p.name for p in out.glob("worst_*.png")) == ["worst_01.png", "worst_02.png"]
    assert not (out / "robustness.png").exists()  # no study asked
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 5


@pytest.mark.slow
def test_report_opens_in_headless_chromium_without_errors(report):
    """file:// report.html in a real Chromium: no console errors, no failed or non-local requests, every <img>
    decoded (naturalWidth > 0); then the same check catches a missing picture."""
    import playwright.sync_api as playwright  # a dev dependency: missing means a broken set-up, not a skip

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make browser` installs it (apt-get, as root)"
    broken = Path(tempfile.mkdtemp()) / "broken"
    shutil.copytree(report, broken)
    (broken / "confusion_matrix.png").unlink()
    with playwright.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        try:
            for folder, healthy in ((report, True), (broken, False)):
                page = browser.new_page()
                errors: list[str] = []
                failed: list[str] = []
                requests: list[str] = []
                page.on("console", lambda m, errors=errors: m.type == "error" and errors.append(m.text))
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.on("requestfailed", lambda r, failed=failed: failed.append(r.url))
                page.on("request", lambda r, requests=requests: requests.append(r.url))
                page.goto((folder / "report.html").as_uri(), wait_until="load")
                images = page.eval_on_selector_all(
                    "img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth])"
                )
                title = page.title()
                page.close()
                assert len(images) == 7 and "tiny <test> model" in title
                assert all(r.startswith(folder.as_uri() + "/") for r in requests), requests
                if healthy:
                    assert errors == [] and failed == [], (errors, failed)
                    assert all(width > 0 for _, width in images), images
                else:
                    assert [src for src, width in images if not width] == ["confusion_matrix.png"]
                    assert failed and failed[0].endswith("confusion_matrix.png")
        finally:
            browser.close()


def test_class_names_with_dollar_signs_are_drawn_as_written(tmp_path):
    """matplotlib reads text between two $ as math: "a $x^$ b" stopped the report after the whole evaluation
    (a parse error) and "price $5 and $10" lost its dollars. The names go in escaped, and both pictures are made."""
    from segformer.report import plot_class_iou, plot_confusion
    from segformer.visualize import make_palette, plot_text

    names = ["background", "a $x^$ b", "price $5 and $10"]
    assert plot_text("price $5 and $10") == r"price \$5 and \$10" and plot_text("plain") == "plain"
    confusion = np.array([[5, 1, 0], [0, 3, 1], [1, 0, 4]])
    assert plot_confusion(confusion, names, tmp_path / "c.png").stat().st_size > 0
    metrics = {"IoU": dict(zip(names, [0.5, 0.25, None], strict=True)), "mIoU": 0.375}
    assert plot_class_iou(metrics, make_palette(3), tmp_path / "i.png").stat().st_size > 0
