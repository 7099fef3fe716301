"""The web page of `segformer serve` in a real headless Chromium (Debian's, driven by Playwright): upload an image,
read the overlay, the legend, the class under the cursor, the toggles, the downloads and the phone layout; then a
real server that stalls (its process stopped with SIGSTOP): an upload replaced by another is cancelled, and one
that gets no answer times out; failures made in the browser's network layer (Playwright's route: refused, not JSON,
busy, no model description); a phone's touch, the keyboard, a transparent upload, and the API page under a reverse
proxy's prefix."""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import os
import shlex
import signal
import subprocess
import time
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


def tiny_checkpoint(folder: Path) -> Path:
    """A tiny random checkpoint with the page's class names, saved as FOLDER/tiny (the same weights every time)."""
    torch.manual_seed(0)
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=K, id2label=NAMES)), seed=3)
    model.save_pretrained(folder / "tiny")
    return folder / "tiny"


# Paste an image (base64 PNG bytes) whose File has no name, as the page's paste handler receives it.
PASTE_NAMELESS = """(b64) => {
  const data = new DataTransfer();
  data.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], "", { type: "image/png" }));
  document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data }));
}"""


def layer_of(page) -> np.ndarray:
    got = page.evaluate(READ_LAYER)
    return np.asarray(got["data"], np.uint8).reshape(got["h"], got["w"], 4)


@pytest.mark.slow
def test_page_segments_an_upload_in_headless_chromium(tmp_path):
    # Not a skip: `make test` installs Chromium first (the Makefile's browser target); elsewhere say what is missing.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (make browser)"

    tiny_checkpoint(tmp_path)
    photo = tmp_path / "street photo.png"
    Image.fromarray(_noise(120, 160, 11)).save(photo)
    predictor = SegformerPredictor(tmp_path / "tiny", device="cpu", mode="whole")
    labels = predictor.predict(photo).labels  # a batch of one, as the page's single upload: the same kernels
    present = [int(c) for c in np.flatnonzero(np.bincount(labels.ravel(), minlength=K))]
    assert len(present) >= 2  # a picture worth checking

    server = ServerProcess(tmp_path / "tiny", "--mode", "whole")
    try:
        server.wait_ready()
        with chromium(tmp_path, viewport={"width": 1100, "height": 760}, accept_downloads=True) as (page, errors):
            requests: list[str] = []
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
                page.mouse.move(box["x"] + (x + 0.5) * box["width"] / 160, box["y"] + (y + 0.5) * box["height"] / 120)
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
            assert download.value.suggested_filename == "street photo_labels.png"  # (not the upload's own name)
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
            assert viewer["width"] <= 390 and viewer["width"] > 300 and legend["y"] >= viewer["y"] + viewer["height"]
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

            # A pasted image without a file name: every message calls it "the image", the download "image.png".
            page.evaluate(PASTE_NAMELESS, base64.b64encode(photo.read_bytes()).decode())
            page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
            assert page.locator("#status").inner_text() == f"the image: {len(present)} classes found"
            assert page.get_attribute("#dl-label", "download") == "image_labels.png"
            assert all(r.startswith(server.url + "/") or r.startswith(("blob:", "data:")) for r in requests), requests
    finally:
        assert server.stop() == 0


# Every text the status line shows, and every result caption (#info), from now on: window.seen = {status, info}.
WATCH = """() => {
  window.seen = { status: [], info: [] };
  for (const [id, key] of [["status", "status"], ["info", "info"]]) {
    const el = document.getElementById(id);
    new MutationObserver(() => window.seen[key].push(el.textContent))
      .observe(el, { childList: true, characterData: true, subtree: true });
  }
}"""


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """A real `segformer serve` on a tiny random checkpoint (whole-image mode), shared by the stall tests."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (make browser)"
    server = ServerProcess(tiny_checkpoint(tmp_path_factory.mktemp("stall")), "--mode", "whole")
    try:
        server.wait_ready()
        yield server
    finally:
        assert server.stop() == 0


def two_photos(tmp_path: Path, first: str, second: str) -> tuple[Path, Path]:
    """Two noise photos, 128×96 then 160×120: a result on the page names its image by its size."""
    paths = tmp_path / first, tmp_path / second
    Image.fromarray(_noise(96, 128, 5)).save(paths[0])
    Image.fromarray(_noise(120, 160, 11)).save(paths[1])
    return paths


@contextlib.contextmanager
def stalled(server: ServerProcess):
    """The server process stopped (SIGSTOP) and resumed on exit: the kernel still takes the browser's connection and
    its request, and nothing answers — a server that hangs, for real."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


@contextlib.contextmanager
def chromium(tmp_path: Path, switches: tuple[str, ...] = (), **options):
    """A page in a fresh headless Chromium (Debian's, a new profile under `tmp_path`; `switches`: more command-line
    switches; `options`: the browser context's, e.g. viewport) and the console errors and uncaught page errors it
    collects."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS + list(switches), **options
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()


@contextlib.contextmanager
def open_page(tmp_path: Path, url: str, **options):
    """A fresh headless Chromium (`options`: chromium()'s) on `url`, once the page has read the model; yields (page,
    console errors, and the segment requests as [url, outcome] with outcome None while in flight, "ok" or the
    browser's failure text)."""
    with chromium(tmp_path, **options) as (page, errors):
        posts: dict[object, list] = {}
        page.on("request", lambda r: r.method == "POST" and posts.setdefault(r, [r.url, None]))
        page.on("requestfinished", lambda r: r in posts and posts[r].__setitem__(1, "ok"))
        page.on("requestfailed", lambda r: r in posts and posts[r].__setitem__(1, r.failure))
        page.goto(url)
        page.wait_for_selector("body[data-state=idle]", state="attached", timeout=30_000)
        page.evaluate(WATCH)
        yield page, errors, posts


def wait_until(page, condition, what: str, timeout: float = 20) -> None:
    """Let the browser's events run (page.wait_for_timeout) until condition() holds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        page.wait_for_timeout(50)


def choose_and_wait_for_the_upload(page, photo: Path, errors: list[str]) -> None:
    """Choose ``photo`` in the page's file input and wait for its upload request to start; where none starts, the
    failure says what the page showed (a CI run once waited 30 s for it, and said no more)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        with page.expect_request(lambda r: r.method == "POST", timeout=30_000):
            page.set_input_files("#file", str(photo))
    except PlaywrightTimeout:
        shown = page.evaluate("[document.body.dataset.state, document.getElementById('status').textContent, "
                              "typeof S === 'undefined' ? null : !!S.model]")  # fmt: skip
        raise AssertionError(f"no upload of {photo.name} within 30 s: state, status, model loaded = {shown}; "
                             f"console errors {errors}") from None  # fmt: skip


@pytest.mark.slow
def test_page_cancels_an_upload_replaced_by_another(tiny_server, tmp_path):
    # Image A is chosen while the server hangs, then image B: A's request is aborted in the browser (not left
    # running), and once the server answers again the page shows B's result and never A's result or an error.
    first, second = two_photos(tmp_path, "first.png", "second.png")
    with open_page(tmp_path, tiny_server.url + "/") as (page, errors, posts):
        assert page.evaluate("timeoutS") == 120  # the page's default upload timeout, as the README says
        with stalled(tiny_server):
            choose_and_wait_for_the_upload(page, first, errors)
            page.wait_for_selector("body[data-state=busy]", state="attached")
            assert page.locator("#status").inner_text() == "Segmenting first.png…"
            mark = page.evaluate("window.seen.status.length")
            choose_and_wait_for_the_upload(page, second, errors)
            assert page.locator("#status").inner_text() == "Segmenting second.png…"
            # The replaced request is cancelled at once, while the server still hangs.
            a = next(iter(posts))
            wait_until(page, lambda: posts[a][1] is not None, "the first upload's request to end")
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
        wait_until(page, lambda: all(outcome is not None for _, outcome in posts.values()), "every request to end")
        page.wait_for_timeout(500)  # time enough for a late answer to A to show, were it still awaited
        assert [outcome for _, outcome in posts.values()] == ["net::ERR_ABORTED", "ok"]
        assert page.evaluate("document.body.dataset.state") == "done"
        assert page.locator("#status").inner_text().startswith("second.png: ")
        assert page.evaluate("[document.getElementById('layer').width, document.getElementById('layer').height]") == [
            160,
            120,
        ]
        seen = page.evaluate("window.seen")
        assert not any("first" in s for s in seen["status"][mark:]), seen  # no late result or error for A
        assert seen["info"] and all(i.startswith("160 × 120 px") for i in seen["info"]), seen  # only B's result
        assert errors == []


@pytest.mark.slow
def test_page_times_out_an_upload_the_server_never_answers(tiny_server, tmp_path):
    # ?timeout=2 sets the page's upload timeout (120 s by default) to 2 s. A first upload succeeds; the next one
    # meets a server that hangs: after 2 s the page gives up, names the file, says it timed out, hides the previous
    # result and cancels the request (no late result once the server answers again); the next upload works.
    photo, slow = two_photos(tmp_path, "photo.png", "slow photo.png")
    with open_page(tmp_path, tiny_server.url + "/?timeout=2") as (page, errors, posts):
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
        assert page.locator("#result").is_visible()
        with stalled(tiny_server):
            started = time.monotonic()
            page.set_input_files("#file", str(slow))
            assert page.locator("#status").inner_text() == "Segmenting slow photo.png…"
            page.wait_for_selector("body[data-state=error]", state="attached", timeout=20_000)
            waited = time.monotonic() - started
            assert page.locator("#status").inner_text() == (
                "slow photo.png: timed out: no answer from the server within 2 s"
            )
            assert page.locator("#status").get_attribute("class") == "error"
            assert page.locator("#result").is_hidden()  # the previous image's result must not read as this one's
            assert waited >= 1.9, waited  # (and within the 20 s above: the 2 s asked for, not 120 s)
            wait_until(page, lambda: list(posts.values())[1][1] is not None, "the timed-out request to end")
        page.wait_for_timeout(1500)  # the server answers again: the abandoned upload stays abandoned
        assert [outcome for _, outcome in posts.values()] == ["ok", "net::ERR_ABORTED"]
        assert page.evaluate("document.body.dataset.state") == "error"
        assert page.locator("#result").is_hidden()
        page.set_input_files("#file", str(slow))
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
        assert page.locator("#status").inner_text().startswith("slow photo.png: ")
        assert page.locator("#result").is_visible()
        assert errors == []


# The rows of one operation's table on the API page: [[cell text, ...], ...] (h4 heading → its following table).
READ_TABLE = """([section, heading]) => {
  const op = document.querySelector(section);
  const h = [...op.querySelectorAll("h4")].find((e) => e.textContent.startsWith(heading));
  let t = h.nextElementSibling;
  while (t && !t.querySelector("table")) t = t.nextElementSibling;
  return [...t.querySelectorAll("tbody tr")].map((tr) => [...tr.children].map((td) => td.textContent));
}"""


@pytest.mark.slow
def test_docs_page_lists_every_operation_offline(tiny_server, tmp_path):
    # /docs in a browser that reaches only this server: the page reads /openapi.json and shows every operation with
    # its parameters, body types and responses, loading nothing from elsewhere, under the server's CSP, without a
    # console error; its curl line for POST /v1/segment works as shown.
    spec = httpx.get(tiny_server.url + "/openapi.json").json()
    with chromium(tmp_path) as (page, errors):
        requests: list[str] = []
        failed: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.on("requestfailed", lambda r: failed.append(f"{r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.url} {r.status}"))
        answer = page.goto(tiny_server.url + "/docs")
        page.wait_for_load_state("networkidle")
        assert failed == [] and all(r.startswith(tiny_server.url + "/") for r in requests), (failed, requests)
        page.wait_for_function("document.body.innerText.includes('/v1/segment')", timeout=15_000)  # not blank
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=15_000)
        assert "default-src 'none'" in answer.headers["content-security-policy"]

        shown = page.eval_on_selector_all(".op", "els => els.map(e => [e.dataset.method, e.dataset.path])")
        listed = [[m.upper(), path] for path, item in spec["paths"].items() for m in item]
        assert sorted(shown) == sorted(listed) and ["POST", "/v1/segment"] in shown

        op = spec["paths"]["/v1/segment"]["post"]
        section = '.op[data-method="POST"][data-path="/v1/segment"]'
        assert page.locator(f"{section} .summary").inner_text() == op["summary"] == "Segment one image"
        assert "label_png" in page.locator(f"{section} > p").first.inner_text()  # the description
        params = page.evaluate(READ_TABLE, [section, "Parameters"])
        assert [row[0] for row in params] == [q["name"] for q in op["parameters"]] == ["format", "probs", "alpha"]
        by_name = {row[0]: row for row in params}
        assert by_name["format"][1:4] == ["query", '"json" | "png" | "overlay"', '"json"']
        assert by_name["probs"][1:4] == ["query", "boolean", "false"]
        assert by_name["alpha"][1:4] == ["query", "number 0–1", "0.5"]
        for q in op["parameters"]:
            assert by_name[q["name"]][4] == q["description"]
        body = page.evaluate(READ_TABLE, [section, "Request body"])
        assert [row[0] for row in body] == list(op["requestBody"]["content"])
        assert body[0] == ["multipart/form-data", "file: binary (required)"]
        responses = page.evaluate(READ_TABLE, [section, "Responses"])
        assert {row[0]: row[1] for row in responses} == {
            code: r["description"].replace("`", "") for code, r in op["responses"].items()
        }
        assert {"200", "400", "401", "413", "503", "504"} <= {row[0] for row in responses}
        assert page.locator(f"{section} .lock").inner_text() == "API key"
        curl = page.locator(f"{section} pre.curl").inner_text()
        assert curl == f"curl -F file=@photo.jpg {tiny_server.url}/v1/segment"
        assert page.locator('.op[data-path="/healthz"] pre.curl').inner_text() == f"curl {tiny_server.url}/healthz"

        assert errors == [] and failed == []
        assert requests == [tiny_server.url + "/docs", tiny_server.url + "/openapi.json"], requests

    # The curl line, run as shown (next to a photo.jpg): the server's JSON answer.
    Image.fromarray(_noise(96, 128, 5)).save(tmp_path / "photo.jpg")
    run = subprocess.run(shlex.split(curl) + ["-sS", "--max-time", "60"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["width"] == 128


def confidence_of(body: dict) -> np.ndarray:
    """The API's confidence map: (H, W) uint8, 255 × each pixel's top class probability."""
    with Image.open(io.BytesIO(base64.b64decode(body["confidence_png"]))) as img:
        return np.asarray(img)


def segmented(server: ServerProcess, photo: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """What the API says for `photo` (?probs=true): its JSON answer, its label map (H, W), each pixel's class colour
    (H, W, 3) and each pixel's confidence as gray (H, W, 3), all uint8."""
    body = httpx.post(
        server.url + "/v1/segment?probs=true", files={"file": (photo.name, photo.read_bytes())}, timeout=60
    ).json()
    with Image.open(io.BytesIO(base64.b64decode(body["label_png"]))) as img:
        labels, palette = np.asarray(img), np.asarray(img.getpalette(), np.uint8).reshape(-1, 3)
    return body, labels, palette[labels], np.repeat(confidence_of(body)[..., None], 3, axis=-1)


@pytest.mark.slow
def test_confidence_switch_shows_the_confidence_map(tiny_server, tmp_path):
    # The "confidence" checkbox, reached with Tab and switched with Space, draws each pixel's confidence (the API's
    # confidence_png) as gray in place of the class colours; switched off, the class colours come back exactly. In
    # confidence mode the legend's switches hide classes and the opacity slider sets the layer's opacity, as before.
    photo = tmp_path / "photo.png"
    Image.fromarray(_noise(120, 160, 11)).save(photo)
    with open_page(tmp_path, tiny_server.url + "/") as (page, errors, _):
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
        colours = layer_of(page)

        page.focus("#opacity")
        page.keyboard.press("Tab")  # the next control is the switch, with its label
        assert page.evaluate("document.activeElement.id") == "confidence"
        assert page.evaluate("document.activeElement.labels[0].textContent.trim()") == "Confidence"
        assert page.locator("#conf-scale").is_hidden()
        page.keyboard.press("Space")
        assert page.locator("#confidence").is_checked()
        gray = layer_of(page)

        # What the API says for the same upload (the same server, a batch of one as well: the same numbers).
        api, labels, api_colours, api_gray = segmented(tiny_server, photo)
        conf = confidence_of(api)
        assert conf.shape == labels.shape and len(np.unique(conf)) > 5  # a map worth checking, not one gray
        assert np.array_equal(colours[..., :3], api_colours) and (colours[..., 3] == 255).all()
        assert not np.array_equal(gray, colours)
        assert (gray[..., 3] == 255).all()
        for y, x in ((0, 0), (60, 80), (119, 159), (30, 120), (100, 10)):  # a few pixels by hand
            assert gray[y, x].tolist() == [int(conf[y, x])] * 3 + [255], (y, x)
        assert np.array_equal(gray[..., :3], api_gray)  # and all of them
        for entry in api["classes"]:  # the map is the API's per-class confidence, pixel by pixel
            assert gray[..., 0][labels == entry["id"]].mean() / 255 == pytest.approx(entry["confidence"], abs=0.003)
        assert page.locator("#conf-scale").is_visible()

        # Hover reads the pixel's confidence; the legend hides a class's pixels; the slider sets the opacity.
        box = page.locator("#viewer").bounding_box()
        page.mouse.move(box["x"] + 80.5 * box["width"] / 160, box["y"] + 60.5 * box["height"] / 120)
        assert page.locator("#hover").inner_text().endswith(f", confidence {conf[60, 80] / 255:.2f}")
        first = page.locator("#legend li").first
        off = int(first.get_attribute("data-id"))
        first.locator("input").uncheck()
        hidden = layer_of(page)
        assert (hidden[..., 3][labels == off] == 0).all()
        assert np.array_equal(hidden[labels != off], gray[labels != off])
        page.locator("#opacity").fill("30")
        assert page.eval_on_selector("#layer", "c => c.style.opacity") == "0.3"
        page.locator("#all").click()
        assert np.array_equal(layer_of(page), gray)

        page.focus("#confidence")
        page.keyboard.press("Space")  # off again: the class colours, exactly
        assert not page.locator("#confidence").is_checked()
        assert np.array_equal(layer_of(page), colours)
        assert page.locator("#conf-scale").is_hidden()
        assert page.eval_on_selector("#layer", "c => c.style.opacity") == "0.3"
        assert errors == []


def blend(photo: np.ndarray, layer: np.ndarray, opacity: float, hidden: np.ndarray | None = None) -> np.ndarray:
    """The view on the page: the layer's RGB over the photo at `opacity`; the photo alone where `hidden`."""
    out = photo * (1 - opacity) + layer * opacity
    if hidden is not None:
        out[hidden] = photo[hidden]
    return out


def overlay_download(page, then: str = "") -> tuple[str, np.ndarray]:
    """Click the overlay button (and at once, in the same task, run the JavaScript `then`): the download's file name
    and its pixels, (H, W, 3) float."""
    with page.expect_download() as download:
        page.evaluate(f"() => {{ document.getElementById('dl-overlay').click(); {then} }}")
    with Image.open(download.value.path()) as img:
        assert img.format == "JPEG"
        return download.value.suggested_filename, np.asarray(img.convert("RGB"), np.float64)


def assert_looks_like(got: np.ndarray, want: np.ndarray, other: np.ndarray) -> None:
    """`got`, a JPEG's pixels, is the picture `want` up to JPEG's loss, and not `other`: each 16×16 block's mean
    within 4 of want's (JPEG keeps block means); where want and other differ, got is near want (within 15 on
    average: JPEG blurs the edges), twice as far from other, and nearer want than other at 9 pixels in 10."""
    assert got.shape == want.shape == other.shape
    h, w = want.shape[0] // 16 * 16, want.shape[1] // 16 * 16

    def blocks(a: np.ndarray) -> np.ndarray:
        return a[:h, :w].reshape(h // 16, 16, w // 16, 16, 3).mean(axis=(1, 3))

    assert np.abs(blocks(got) - blocks(want)).max() <= 4
    differ = np.abs(want - other).mean(axis=-1) > 30
    assert differ.mean() > 0.05  # (pictures the check tells apart)
    near, far = np.abs(got - want)[differ].mean(axis=-1), np.abs(got - other)[differ].mean(axis=-1)
    assert near.mean() < 15 and far.mean() > 2 * near.mean() and (near < far).mean() > 0.9


@pytest.mark.slow
def test_overlay_download_is_the_view_shown_in_confidence_mode(tiny_server, tmp_path):
    # The overlay button saves what the viewer shows: the photo under the colour layer at the slider's opacity,
    # "<stem>_overlay.jpg"; with the "Confidence" switch on, the photo under the confidence map (the API's
    # confidence_png as gray; a class switched off in the legend shows the photo alone), "<stem>_confidence.jpg".
    # The file is named for the picture in it even when the switch flips while the JPEG is being encoded, and after
    # another upload it is that image's view, under its name.
    first, second = two_photos(tmp_path, "street photo.png", "second.png")
    with chromium(tmp_path, accept_downloads=True) as (page, errors):
        page.goto(tiny_server.url + "/")
        page.wait_for_selector("body[data-state=idle]", state="attached", timeout=30_000)
        page.set_input_files("#file", str(first))
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
        page.locator("#opacity").fill("60")
        photo = np.asarray(Image.open(first).convert("RGB"), np.float64)
        _, labels, colours, gray = segmented(tiny_server, first)
        with_colours, with_conf = blend(photo, colours, 0.6), blend(photo, gray, 0.6)

        name, got = overlay_download(page)
        assert name == "street photo_overlay.jpg"
        assert_looks_like(got, with_colours, with_conf)

        page.locator("#confidence").check()
        name, got = overlay_download(page)
        assert name == "street photo_confidence.jpg"
        assert_looks_like(got, with_conf, with_colours)

        first_class = page.locator("#legend li").first  # the largest class
        off = labels == int(first_class.get_attribute("data-id"))
        first_class.locator("input").uncheck()
        name, got = overlay_download(page)
        assert name == "street photo_confidence.jpg"
        assert_looks_like(got, blend(photo, gray, 0.6, hidden=off), with_conf)
        page.locator("#all").click()

        # The switch flipped right after the click, before the JPEG is ready: the name is still the picture's.
        name, got = overlay_download(page, then="document.getElementById('confidence').click();")
        assert not page.locator("#confidence").is_checked()
        assert name == "street photo_confidence.jpg"
        assert_looks_like(got, with_conf, with_colours)
        name, got = overlay_download(page, then="document.getElementById('confidence').click();")
        assert page.locator("#confidence").is_checked()
        assert name == "street photo_overlay.jpg"
        assert_looks_like(got, with_colours, with_conf)

        # Another upload, the switch still on: its confidence view, under its name.
        page.set_input_files("#file", str(second))
        page.wait_for_function("() => document.getElementById('info').textContent.startsWith('160 × 120 px')")
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
        photo = np.asarray(Image.open(second).convert("RGB"), np.float64)
        _, _, colours, gray = segmented(tiny_server, second)
        name, got = overlay_download(page)
        assert name == "second_confidence.jpg"
        assert_looks_like(got, blend(photo, gray, 0.6), blend(photo, colours, 0.6))
        assert errors == []


@pytest.mark.slow
def test_page_asks_for_the_api_key_in_words_for_its_user(tmp_path):
    # A server started with --api-key: the page says, in words for the person at it (no HTTP headers), that a key
    # is needed and where it comes from; a wrong key is refused as such; the right one opens the page.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (make browser)"
    tiny_checkpoint(tmp_path)
    photo = tmp_path / "photo.png"
    Image.fromarray(_noise(96, 128, 5)).save(photo)
    server = ServerProcess(tmp_path / "tiny", "--mode", "whole", "--api-key", "s3cret-key")
    try:
        server.wait_ready()
        with chromium(tmp_path) as (page, errors):
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-state=key]", state="attached", timeout=30_000)
            where = "Enter the key the server was started with (--api-key); whoever runs it can give it to you."
            assert page.locator("#status").inner_text() == "This server needs an API key. " + where
            assert page.locator("#key-row").is_visible() and page.locator("#result").is_hidden()

            page.locator("#key").fill("not-the-key")
            page.locator("#key").press("Enter")
            page.wait_for_function("() => document.getElementById('status').textContent.startsWith('That')")
            assert page.locator("#status").inner_text() == "That API key is not the right one. " + where
            assert page.evaluate("document.body.dataset.state") == "key"

            page.locator("#key").fill("s3cret-key")
            page.locator("#key-ok").click()
            page.wait_for_selector("body[data-state=idle]", state="attached", timeout=30_000)
            assert page.locator("#status").inner_text() == "Key accepted."
            assert page.locator("#key-row").is_hidden()
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
            assert page.locator("#status").inner_text().startswith("photo.png: ")
            unauthorized = "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
            assert errors == [unauthorized] * 2
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_phone_swipe_over_the_image_scrolls_and_a_tall_image_fits_the_screen(tiny_server, tmp_path):
    # On a phone (390 × 844, touch): a tall picture is at most 72 % of the screen's height (it was as wide as the
    # screen, so taller than the screen), and a finger swiped up over it scrolls the page (the viewer kept every
    # touch for itself).
    tall = tmp_path / "tall.png"
    Image.fromarray(_noise(240, 80, 3)).save(tall)
    phone = {"viewport": {"width": 390, "height": 844}, "has_touch": True}
    with open_page(tmp_path, tiny_server.url + "/", **phone) as (page, errors, _):
        page.set_input_files("#file", str(tall))
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
        box = page.locator("#viewer").bounding_box()
        assert box["height"] <= 0.72 * 844 + 1 and box["width"] == pytest.approx(box["height"] / 3, abs=1)
        assert page.evaluate("document.documentElement.scrollHeight") > 844 + 200  # a page to scroll
        x, y = box["x"] + box["width"] / 2, min(box["y"] + box["height"], 844) - 100  # over the picture
        cdp = page.context.new_cdp_session(page)  # a finger's touches, as the browser gets them from the screen
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
        for step in range(1, 11):
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y - 30 * step}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        assert page.evaluate("window.scrollY") > 100
        assert errors == []


@pytest.mark.slow
def test_page_hides_the_previous_result_on_a_network_error_or_an_answer_not_json(tiny_server, tmp_path):
    # The request fails in the network, or something on the way (a proxy's login page) answers 200 in HTML: the
    # message names the file and the previous image's result is hidden (it would read as this one's).
    first, second = two_photos(tmp_path, "first.png", "second.png")
    with open_page(tmp_path, tiny_server.url + "/") as (page, errors, _):
        for failing, reason in (
            (lambda route: route.abort("connectionrefused"), "cannot reach the server: Failed to fetch"),
            (
                lambda route: route.fulfill(status=200, content_type="text/html", body="<p>Sign in</p>"),
                "could not show the result: the server's answer is not JSON (text/html)",
            ),
        ):
            page.set_input_files("#file", str(first))
            page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
            assert page.locator("#result").is_visible()
            page.route("**/v1/segment?*", failing)
            page.set_input_files("#file", str(second))
            page.wait_for_selector("body[data-state=error]", state="attached", timeout=20_000)
            assert page.locator("#status").inner_text() == f"second.png: {reason}"
            assert page.locator("#result").is_hidden()
            page.unroute("**/v1/segment?*")
        assert errors == ["Failed to load resource: net::ERR_CONNECTION_REFUSED"]


@pytest.mark.slow
def test_page_gives_up_on_a_model_description_that_never_comes(tiny_server, tmp_path):
    # GET v1/model gets no answer (the browser's network layer holds it): after the page's timeout (?timeout=2) it
    # says so, where it said "loading the model…" for ever; with the server answering again, an upload reads the
    # model first, then is segmented.
    photo = tmp_path / "photo.png"
    Image.fromarray(_noise(96, 128, 5)).save(photo)
    with chromium(tmp_path) as (page, errors):
        held: list = []
        page.route("**/v1/model", lambda route: held.append(route))  # never answered
        page.goto(tiny_server.url + "/?timeout=2")
        page.wait_for_selector("body[data-state=error]", state="attached", timeout=15_000)
        assert page.locator("#status").inner_text() == "no answer from the server within 2 s"
        assert len(held) == 1
        page.unroute("**/v1/model")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
        assert page.locator("#status").inner_text().startswith("photo.png: ")
        assert page.locator("#model").inner_text().startswith(f"tiny · custom · {K} classes")
        assert errors == []


# The photo canvas's pixels: (height, width, 4) RGBA.
READ_BASE = READ_LAYER.replace('"layer"', '"base"')


@pytest.mark.slow
def test_transparent_pixels_show_the_colours_the_model_segments(tiny_server, tmp_path):
    # An RGBA upload: the server drops the alpha and segments the colours stored under it; the page shows those
    # colours, opaque (it drew the picture with its alpha over black: a transparent pixel showed black). Read back
    # through WebGL they are exact; a browser without WebGL (--disable-3d-apis) shows the server's copy (its overlay
    # at opacity 0, a JPEG: one more request).
    rgb = _noise(96, 128, 7)
    alpha = np.full((96, 128), 255, np.uint8)
    alpha[:, :64], alpha[:48, 64:] = 0, 128
    photo = tmp_path / "cutout.png"
    Image.fromarray(np.dstack([rgb, alpha])).save(photo)
    served = httpx.post(tiny_server.url + "/v1/segment?format=overlay&alpha=0", content=photo.read_bytes(), timeout=60)
    with Image.open(io.BytesIO(served.content)) as img:
        copy = np.asarray(img.convert("RGB"), np.int16)
    for webgl in (True, False):
        (tmp_path / str(webgl)).mkdir()
        switches = () if webgl else ("--disable-3d-apis",)
        with open_page(tmp_path / str(webgl), tiny_server.url + "/", switches=switches) as (page, errors, posts):
            assert page.evaluate("!!document.createElement('canvas').getContext('webgl')") == webgl
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
            got = page.evaluate(READ_BASE)
            base = np.asarray(got["data"], np.uint8).reshape(got["h"], got["w"], 4)
            assert (base[..., 3] == 255).all()
            if webgl:
                assert np.array_equal(base[..., :3], rgb)
                assert len(posts) == 1
            else:
                assert np.abs(base[..., :3] - copy).max() <= 2  # (two JPEG decoders)
                clear = alpha == 0  # there the JPEG's colours are the stored ones (up to its loss), not black
                assert np.abs(base[..., :3] - rgb.astype(np.int16))[clear].mean() < rgb[clear].mean() / 3
                assert [url.split("?")[1] for url, _ in posts.values()] == ["probs=true", "format=overlay&alpha=0"]
            assert errors == []


# Drop files (name and base64 PNG bytes) and text on the drop zone, as the page's drop handler receives them.
DROP = """([files, text]) => {
  const data = new DataTransfer();
  for (const [name, b64] of files)
    data.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, { type: "image/png" }));
  if (text) data.setData("text/plain", text);
  document.getElementById("drop").dispatchEvent(new DragEvent("drop", { bubbles: true, dataTransfer: data }));
}"""


@pytest.mark.slow
def test_page_says_what_it_did_with_several_files_dropped_or_none(tiny_server, tmp_path):
    # Two files dropped: the first is segmented and the messages say that only the first was; a drop of text (no
    # file) says that it held no file, and the result shown stays.
    first, second = two_photos(tmp_path, "first.png", "second.png")
    files = [[p.name, base64.b64encode(p.read_bytes()).decode()] for p in (first, second)]
    with open_page(tmp_path, tiny_server.url + "/") as (page, errors, posts):
        page.evaluate(DROP, [files, ""])
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
        note = " (2 files dropped: only the first is segmented)"
        status = page.locator("#status").inner_text()
        assert status.startswith("first.png: ") and status.endswith(" found" + note), status
        assert page.evaluate("window.seen.status")[0] == "Segmenting first.png…" + note
        assert len(posts) == 1 and page.locator("#info").inner_text().startswith("128 × 96 px")
        page.evaluate(DROP, [[], "some words"])
        assert page.locator("#status").inner_text() == "The drop held no file: drop an image file, or choose one."
        assert page.evaluate("document.body.dataset.state") == "done" and page.locator("#result").is_visible()
        assert len(posts) == 1 and errors == []


@pytest.mark.slow
def test_page_says_when_a_busy_server_asks_to_wait(tiny_server, tmp_path):
    # A 503 (the server's busy answer, as segformer serve words it) or a 429 with Retry-After: the message names the
    # file and says in how many seconds to try again.
    photo = tmp_path / "photo.png"
    Image.fromarray(_noise(96, 128, 5)).save(photo)
    busy = "the server is busy (4 images waiting for the model, --max-queue): retry later"
    with open_page(tmp_path, tiny_server.url + "/") as (page, errors, _):
        for status, headers, body, message in (
            (503, {"Retry-After": "7"}, json.dumps({"detail": busy}), busy.replace("retry later", "try again in 7 s")),
            (429, {"Retry-After": "30"}, "", "429 Too Many Requests: try again in 30 s"),
        ):
            answer = {"status": status, "headers": headers, "content_type": "application/json", "body": body}
            page.route("**/v1/segment?*", functools.partial(lambda answer, route: route.fulfill(**answer), answer))
            with page.expect_response("**/v1/segment?*") as response:
                page.set_input_files("#file", str(photo))
            assert response.value.status == status
            page.wait_for_selector("body[data-state=error]", state="attached", timeout=10_000)
            page.wait_for_function("() => !document.getElementById('status').textContent.startsWith('Segmenting')")
            assert page.locator("#status").inner_text() == f"photo.png: {message}"
            page.unroute("**/v1/segment?*")
        assert len(errors) == 2, errors  # (the browser's "Failed to load resource" for each)


@pytest.mark.slow
def test_image_reads_from_the_keyboard_and_names_itself_to_a_screen_reader(tiny_server, tmp_path):
    # Tab reaches the picture; the arrow keys move a probe that reads the class and confidence under it (a 32nd of
    # the shorter side a press; with Shift, one pixel). The canvases have names; each class's mean confidence is
    # text in the legend (it was a tooltip); the opacity is said once, by the slider (the <output> beside it, a live
    # region, said it again).
    photo = tmp_path / "photo.png"
    Image.fromarray(_noise(120, 160, 11)).save(photo)
    api, labels, _, _ = segmented(tiny_server, photo)
    conf = confidence_of(api)
    with open_page(tmp_path, tiny_server.url + "/") as (page, errors, _):
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=60_000)
        page.focus("#file")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "viewer"

        def reads(x: int, y: int) -> str:
            c = int(labels[y, x])
            return f"{NAMES[c]} (class {c}) at {x}, {y}, confidence {conf[y, x] / 255:.2f}"

        assert page.locator("#hover").inner_text() == reads(80, 60)  # the centre, on focus
        assert page.locator("#probe").is_visible()
        page.keyboard.press("ArrowRight")
        assert page.locator("#hover").inner_text() == reads(84, 60)  # 120 / 32 pixels on
        page.keyboard.press("Shift+ArrowUp")
        assert page.locator("#hover").inner_text() == reads(84, 59)
        for _ in range(25):
            page.keyboard.press("ArrowRight")
        assert page.locator("#hover").inner_text() == reads(159, 59)  # (at the edge)
        assert page.evaluate("window.scrollY") == 0  # the keys moved the probe, not the page

        assert page.get_attribute("#base", "aria-label") == "photo.png, 160 × 120 px"
        assert page.get_attribute("#layer", "aria-label") == "the class colours (see the legend)"
        details = page.locator("#legend .detail")
        assert details.count() == len(api["classes"]) and details.first.is_visible()
        for text, entry in zip(details.all_inner_texts(), api["classes"]):
            assert text == f"mean confidence {entry['confidence']:.2f} · {entry['pixels']:,} px"
        page.locator("#opacity").fill("30")
        slider = page.locator("#opacity")
        assert slider.get_attribute("aria-valuetext") == "30 %"
        assert page.locator("#opacity-out").inner_text() == "30 %"
        assert "status" not in page.locator(".controls").aria_snapshot()  # the <output> is no live region now
        assert errors == []


@pytest.mark.slow
def test_docs_curl_lines_keep_a_reverse_proxy_prefix(tiny_server, tmp_path):
    # The API page under a prefix, as a reverse proxy serves it (here the browser's network layer forwards /seg/...
    # to the server's /...): its curl lines are under /seg/ too, not at the host's root.
    with chromium(tmp_path) as (page, errors):
        page.route(
            tiny_server.url + "/seg/**",
            lambda route: route.fulfill(response=route.fetch(url=route.request.url.replace("/seg/", "/", 1))),
        )
        page.goto(tiny_server.url + "/seg/docs")
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=15_000)
        curl = page.locator('.op[data-method="POST"][data-path="/v1/segment"] pre.curl').inner_text()
        assert curl == f"curl -F file=@photo.jpg {tiny_server.url}/seg/v1/segment"
        assert page.locator('.op[data-path="/healthz"] pre.curl').inner_text() == f"curl {tiny_server.url}/seg/healthz"
        assert errors == []
