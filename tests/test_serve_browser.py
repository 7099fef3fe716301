"""The web page of `segformer serve` in a real headless Chromium (Debian's, driven by Playwright): upload an image,
read the overlay, the legend, the class under the cursor, the toggles, the downloads and the phone layout."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config
from PIL import Image
from test_predict import _noise
from test_serve import NAMES, K, ServerProcess

from segformer import SegformerForSemanticSegmentation
from segformer.predict import SegformerPredictor

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

# The colour layer's pixels, read back from its canvas: (height, width, 4) RGBA.
READ_LAYER = """() => {
  const c = document.getElementById("layer");
  return { w: c.width, h: c.height, data: Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data) };
}"""


def layer_of(page) -> np.ndarray:
    got = page.evaluate(READ_LAYER)
    return np.asarray(got["data"], np.uint8).reshape(got["h"], got["w"], 4)


@pytest.mark.slow
def test_page_segments_an_upload_in_headless_chromium(tmp_path):
    # Not a skip: `make test` installs Chromium first (the Makefile's browser target); elsewhere say what is missing.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (make browser)"
    from playwright.sync_api import sync_playwright

    torch.manual_seed(0)
    randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=K, id2label=NAMES)), seed=3).save_pretrained(
        tmp_path / "tiny"
    )
    photo = tmp_path / "street photo.png"
    Image.fromarray(_noise(120, 160, 11)).save(photo)
    predictor = SegformerPredictor(tmp_path / "tiny", device="cpu", mode="whole")
    labels = predictor.predict(photo).labels  # a batch of one, as the page's single upload: the same kernels
    present = [int(c) for c in np.flatnonzero(np.bincount(labels.ravel(), minlength=K))]
    assert len(present) >= 2  # a picture worth checking

    server = ServerProcess(tmp_path / "tiny", "--mode", "whole")
    try:
        server.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"),  # a fresh user-data-dir
                executable_path=CHROMIUM,
                headless=True,
                args=ARGS,
                viewport={"width": 1100, "height": 760},
                accept_downloads=True,
            )
            try:
                page = browser.new_page()
                errors: list[str] = []
                requests: list[str] = []
                page.on("console", lambda m: m.type == "error" and errors.append(m.text))
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("request", lambda r: requests.append(r.url))
                page.goto(server.url + "/")
                page.wait_for_selector("body[data-state=idle]", state="attached", timeout=30_000)  # model info read
                page.keyboard.press("Tab")  # the file chooser is reachable from the keyboard (Enter opens it)
                assert page.evaluate("document.activeElement.id") == "file"
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)

                # The legend lists the predicted classes, by area, with their colours.
                names = page.locator("#legend .name").all_inner_texts()
                assert sorted(names) == sorted(NAMES[c] for c in present)
                swatches = page.eval_on_selector_all("#legend .swatch", "els => els.map(e => e.style.background)")
                by_name = {NAMES[c]: c for c in present}
                assert swatches == [f"rgb({', '.join(map(str, predictor.palette[by_name[n]]))})" for n in names]

                # The overlay is not blank: the colour layer is the palette colour of each predicted label, i.e. the
                # page decoded the label PNG to exactly the predictor's class ids.
                layer = layer_of(page)
                assert layer.shape == (120, 160, 4) and (layer[..., 3] == 255).all()
                assert np.array_equal(layer[..., :3], predictor.palette[labels])
                base = page.evaluate("""() => { const c = document.getElementById("base");
                    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                    let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2]; return s; }""")
                assert base > 0  # the photo is drawn under the colours

                # Hover: the class under the cursor.
                box = page.locator("#viewer").bounding_box()
                for x, y in ((10, 10), (150, 100), (80, 60)):
                    page.mouse.move(
                        box["x"] + (x + 0.5) * box["width"] / 160, box["y"] + (y + 0.5) * box["height"] / 120
                    )
                    assert page.locator("#hover").inner_text().startswith(f"{NAMES[int(labels[y, x])]} (class ")

                # The opacity slider and the class toggles.
                page.locator("#opacity").fill("80")
                assert page.eval_on_selector("#layer", "c => c.style.opacity") == "0.8"
                first = page.locator("#legend li").first
                off = int(first.get_attribute("data-id"))
                first.locator("input").uncheck()
                layer = layer_of(page)
                assert (layer[..., 3][labels == off] == 0).all() and (layer[..., 3][labels != off] == 255).all()
                page.locator("#all").click()
                assert (layer_of(page)[..., 3] == 255).all()

                # Downloads: the label PNG is the server's (segformer predict's) file; the overlay a JPEG.
                with page.expect_download() as download:
                    page.locator("#dl-label").click()
                assert download.value.suggested_filename == "street photo.png"
                served = httpx.post(server.url + "/v1/segment?format=png", content=photo.read_bytes())
                assert Path(download.value.path()).read_bytes() == served.content
                with page.expect_download() as download:
                    page.locator("#dl-overlay").click()
                assert download.value.suggested_filename == "street photo_overlay.jpg"
                with Image.open(download.value.path()) as jpeg:
                    assert jpeg.format == "JPEG" and jpeg.size == (160, 120)

                shot = tmp_path / "serve_page.png"
                page.screenshot(path=str(shot), full_page=True)
                with Image.open(shot) as img:
                    assert img.size[0] == 1100 and len(img.convert("RGB").getcolors(1 << 20) or []) > 50

                # A phone-width screen: one column, the picture as wide as the screen, the legend below it.
                page.set_viewport_size({"width": 390, "height": 844})
                viewer, legend = page.locator("#viewer").bounding_box(), page.locator("aside").bounding_box()
                assert (
                    viewer["width"] <= 390 and viewer["width"] > 300 and legend["y"] >= viewer["y"] + viewer["height"]
                )
                width = page.evaluate("document.documentElement.scrollWidth")
                assert width <= 390  # no sideways scrolling
                page.screenshot(path=str(tmp_path / "serve_page_phone.png"), full_page=True)

                assert errors == []

                # A bad upload: the page shows the server's one-line reason, naming the file, and no longer the
                # previous image's result (which would read as this one's).
                (tmp_path / "notes.jpg").write_text("this is not an image")
                page.set_input_files("#file", str(tmp_path / "notes.jpg"))
                page.wait_for_selector("body[data-state=error]", state="attached", timeout=30_000)
                status = page.locator("#status").inner_text()
                assert status == "notes.jpg: not an image (Pillow cannot identify the format)"
                assert page.locator("#result").is_hidden()
                assert errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
                assert all(r.startswith(server.url + "/") or r.startswith(("blob:", "data:")) for r in requests), (
                    requests
                )
            finally:
                browser.close()
    finally:
        assert server.stop() == 0
