"""`segformer serve`: every route and every error status through FastAPI's test client, on a tiny checkpoint;
then a real server process on 127.0.0.1 under a bounded load of good and bad uploads, its memory, its limits and
its graceful shutdown."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fp32_tol, randomize_, reductions, run_cli, tiny_config
from PIL import Image
from test_predict import _noise, _png_bomb

from segformer import SegformerForSemanticSegmentation
from segformer.images import normalize
from segformer.predict import SegformerPredictor
from segformer.predict_folder import predict_to_folder
from segformer.visualize import overlay

fastapi = pytest.importorskip("fastapi", reason='segformer serve needs pip install "segformer[serve]"')
from fastapi.testclient import TestClient  # noqa: E402

from segformer.serve import (  # noqa: E402
    DEFAULT_MAX_PIXELS,
    PAGE_CSP,
    Batcher,
    Metrics,
    ServeConfig,
    _Job,
    create_app,
    read_page,
    variant_of,
)

ROOT = Path(__file__).resolve().parents[1]
NAMES = {0: "sky", 1: "road", 2: "tree", 3: "car", 4: "person"}
K = len(NAMES)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=K, id2label=NAMES)), seed=3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def predictor(checkpoint) -> SegformerPredictor:
    return SegformerPredictor(checkpoint, device="cpu", mode="whole")


def encode(array: np.ndarray, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **params)
    return buf.getvalue()


def png_of(h: int, w: int, seed: int) -> bytes:
    return encode(_noise(h, w, seed))


def bomb_bytes(tmp_path: Path) -> bytes:
    _png_bomb(tmp_path / "bomb.png")
    return (tmp_path / "bomb.png").read_bytes()


def client(predictor: SegformerPredictor, **config) -> TestClient:
    """A test client whose lifespan (`with client:`) starts the inference workers, as uvicorn does."""
    return TestClient(create_app(predictor, ServeConfig(**config)), raise_server_exceptions=False)


def labels_of(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        assert img.mode == "P"  # the palette PNG of segformer predict: pixel value = class id
        return np.asarray(img)


def decided(predictor: SegformerPredictor, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The predictor's own labels for an image, and where no other fp32 pass (another batch size: other kernel
    blocking) can change them. Two fp32 passes each lie within fp32_tol x max|logit| of the exact logits
    (conftest's error model), so they differ by at most twice that; the argmax can move only where the top two
    log-probabilities (the logits up to a per-pixel constant; bilinear upsampling is a convex combination, which
    cannot grow the error) are closer than twice the difference."""
    ref = predictor.predict(data, return_probs=True)
    x = torch.from_numpy(normalize(predictor.load(data)))[None]  # (1, 3, H, W)
    with torch.no_grad():
        top_logit = predictor.model(x).logits.abs().max().item()
    bound = 2 * fp32_tol(reductions(predictor.model, x)) * top_logit
    logp = np.sort(np.log(np.clip(ref.probs, 1e-30, None)), axis=0)  # (K, H, W), ascending
    return ref.labels, (logp[-1] - logp[-2]) > 2 * bound


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus exposition."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
    found = re.findall(pattern, text, flags=re.M)
    assert len(found) == 1, f"{name} {labels}: {found}"
    return float(found[0])


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------- segment
def test_segment_answers_the_predictors_labels_and_files(predictor, tmp_path):
    """Multipart and raw bodies; JSON with size, classes and the label PNG; ?format=png and ?format=overlay are
    the NAME.png (the same pixels and palette; predict's file also names its source image) and, byte for byte, the
    NAME_overlay.jpg that segformer predict writes."""
    data = png_of(48, 64, 1)
    (tmp_path / "photo.png").write_bytes(data)
    predict_to_folder(predictor, [tmp_path / "photo.png"], tmp_path / "out", progress=False)
    expected = predictor.predict(data).labels
    with client(predictor) as c:
        multipart = c.post("/v1/segment", files={"file": ("photo.png", data, "image/png")})
        raw = c.post("/v1/segment", content=data, headers={"Content-Type": "image/png"})
        octets = c.post("/v1/segment", content=data, headers={"Content-Type": "application/octet-stream"})
        png = c.post("/v1/segment?format=png", content=data)
        jpeg = c.post("/v1/segment?format=overlay", content=data)
        opaque = c.post("/v1/segment?format=overlay&alpha=1", content=data)
    for r in (multipart, raw, octets):
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        body = r.json()
        assert (body["width"], body["height"]) == (64, 48)
        # one request alone is a batch of one: the predictor's own kernels, so the labels are equal exactly
        assert body["batch_size"] == 1
        assert np.array_equal(labels_of(base64.b64decode(body["label_png"])), expected)
        counts = np.bincount(expected.ravel(), minlength=K)
        assert [c["id"] for c in body["classes"]] == sorted(np.flatnonzero(counts), key=lambda i: -counts[i])
        for c in body["classes"]:
            assert c["name"] == NAMES[c["id"]] and c["pixels"] == counts[c["id"]]
            assert c["percent"] == pytest.approx(100 * counts[c["id"]] / expected.size)
            assert c["color"] == predictor.palette[c["id"]].tolist() and "confidence" not in c
        assert sum(c["pixels"] for c in body["classes"]) == 64 * 48
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as served, Image.open(tmp_path / "out" / "photo.png") as written:
        assert served.mode == written.mode == "P" and served.getpalette() == written.getpalette()
        assert np.array_equal(np.asarray(served), np.asarray(written))
        assert "segformer:source" in written.info and "segformer:source" not in served.info
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    # alpha 0.5, quality 92: the file's bytes but its stamp (a JPEG comment segment that predict's files carry)
    stamp = b"segformer predict"
    segment = b"\xff\xfe" + (len(stamp) + 2).to_bytes(2, "big") + stamp
    written = (tmp_path / "out" / "photo_overlay.jpg").read_bytes()
    assert segment in written and jpeg.content == written.replace(segment, b"", 1)
    colours_only = overlay(predictor.load(data), expected, predictor.palette, alpha=1.0)
    assert opaque.content == encode(np.asarray(colours_only), "JPEG", quality=92)  # ?alpha= is the opacity


def test_probs_gives_each_class_its_mean_winning_probability(predictor):
    data = png_of(40, 56, 2)
    ref = predictor.predict(data, return_confidence=True)
    with client(predictor) as c:
        body = c.post("/v1/segment?probs=true", content=data).json()
    top = ref.confidence
    assert body["classes"]
    for entry in body["classes"]:
        mine = ref.labels == entry["id"]
        expected = top[mine].astype(np.float64).mean()
        # the server's float64 mean of the same float32 probabilities (one request is a batch of one: the predictor's
        # own pass) in another order: each float64 sum of n positive terms within (n - 1) 2^-53, each division 2^-53
        assert abs(entry["confidence"] - expected) <= 2 * mine.sum() * 2.0**-53 * expected
        assert 1 / K <= entry["confidence"] <= 1


def test_probs_keeps_the_labels_segformer_predict_writes(tmp_path):
    """?probs=true answers the label map of the plain request and of `segformer predict`, where rounded
    probabilities tie: a one-label model whose logits are all within 6e-8 of 0, where sigmoid rounds to 0.5, so
    that the argmax of the probabilities (p > 0.5) and of the logits (z > 0) differ wherever z > 0."""
    model = randomize_(SegformerForSemanticSegmentation(tiny_config(num_labels=1)), seed=2).eval()
    with torch.no_grad():
        model.decode_head.classifier.weight.mul_(1e-9)
        model.decode_head.classifier.bias.zero_()
    one_label = SegformerPredictor(model, device="cpu")
    data = png_of(40, 56, 2)
    assert (one_label.predict(data).labels != one_label.predict(data, return_probs=True).labels).any()
    with client(one_label) as c:
        body = c.post("/v1/segment?probs=true", content=data).json()
        plain = c.post("/v1/segment", content=data).json()
    assert body["label_png"] == plain["label_png"]
    assert np.array_equal(labels_of(base64.b64decode(body["label_png"])), one_label.predict(data).labels)


def test_probs_adds_the_per_pixel_confidence_map(predictor):
    """?probs=true adds confidence_png: each pixel's winning probability as an 8-bit gray PNG (round(255 p)), whose
    mean over a class's pixels is that class's confidence; the other fields stay as they were, and without probs
    there is no map."""
    data = png_of(40, 56, 2)
    ref = predictor.predict(data, return_confidence=True)
    with client(predictor) as c:
        body = c.post("/v1/segment?probs=true", content=data).json()
        plain = c.post("/v1/segment", content=data).json()
    common = {"width", "height", "classes", "label_png", "model", "batch_size", "timing_ms"}
    assert set(plain) == common and set(body) == common | {"confidence_png"}
    assert body["label_png"] == plain["label_png"]
    with Image.open(io.BytesIO(base64.b64decode(body["confidence_png"]))) as img:
        assert img.format == "PNG" and img.mode == "L" and img.size == (56, 40)
        conf = np.asarray(img).astype(np.int64)
    expected = np.rint(ref.confidence * 255)
    assert np.abs(conf - expected).max() <= 1  # (a rounding step, where another pass differs in the last bits)
    assert conf.min() >= int(255 / K) and conf.max() <= 255  # a winner has at least 1/K
    labels = labels_of(base64.b64decode(body["label_png"]))
    for entry in body["classes"]:
        assert conf[labels == entry["id"]].mean() / 255 == pytest.approx(entry["confidence"], abs=0.5 / 255 + 1e-6)


def test_exif_orientation_and_image_modes(predictor):
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 wide and 40 high; upright it is 40 x 64
    Image.fromarray(_noise(40, 64, 4)).save(rotated, format="JPEG", exif=exif)
    gray16 = encode(_noise(38, 50, 7)[..., 1].astype(np.uint16) * 257)
    rgba = encode(np.dstack([_noise(33, 45, 6), np.full((33, 45), 128, np.uint8)]))
    with client(predictor) as c:
        sizes = [c.post("/v1/segment", content=d).json() for d in (rotated.getvalue(), gray16, rgba)]
    assert [(s["width"], s["height"]) for s in sizes] == [(40, 64), (50, 38), (45, 33)]


# ---------------------------------------------------------------------------------------------- bad input
def _multipart(field: str, payload: bytes, filename: str | None = "x.png") -> tuple[bytes, str]:
    boundary = "segformerboundary"
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    body = (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").encode() + payload
    return body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def bad_uploads(tmp_path: Path, too_large: int = 300_000) -> list[tuple[str, bytes, dict[str, str], int, str, str]]:
    """(name, body, headers, status, error kind, words of the reason) for each kind of bad upload; the last one is
    ``too_large`` bytes."""
    good = png_of(48, 64, 1)
    jpeg = encode(np.random.default_rng(9).integers(0, 255, (120, 160, 3), dtype=np.uint8), "JPEG")
    text_part, text_type = _multipart("comment", b"hello", filename=None)
    long_name, _ = _multipart("file", good, filename="x" * 5000 + ".png")  # over python-multipart's line limit
    many_heads = text_part.replace(b"\r\n\r\n", b"".join(b"\r\nX-%d: 1" % i for i in range(9)) + b"\r\n\r\n", 1)
    return [
        ("empty body", b"", {"Content-Type": "image/png"}, 400, "bad_request", "empty body"),
        ("not an image", b"this is not an image\n", {"Content-Type": "image/jpeg"}, 400, "bad_image", "not an image"),
        ("truncated", jpeg[: len(jpeg) // 2], {"Content-Type": "image/jpeg"}, 400, "bad_image", "truncated"),
        ("wrong type", good, {"Content-Type": "application/json"}, 400, "bad_request", "unsupported Content-Type"),
        ("form field", b"file=abc", {"Content-Type": "application/x-www-form-urlencoded"}, 400, "bad_request",
         "unsupported Content-Type"),
        ("no file part", text_part, {"Content-Type": text_type}, 400, "bad_request", "no file part"),
        ("file part without a filename", _multipart("file", good, filename=None)[0], {"Content-Type": text_type},
         400, "bad_request", "'file' has no filename"),
        ("PostScript", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n", {"Content-Type": "image/png"},
         400, "bad_image", "not an image"),  # (never handed to Ghostscript: not a raster format)
        ("broken multipart", b"--nope", {"Content-Type": "multipart/form-data"}, 400, "bad_request", "multipart"),
        ("multipart cut short", _multipart("file", good)[0][:-200], {"Content-Type": text_type}, 400, "bad_request",
         "ends before its closing boundary"),  # (it said "no file part": audit)
        ("long part header", long_name, {"Content-Type": text_type}, 400, "bad_request", "header line is over"),
        ("many part headers", many_heads, {"Content-Type": text_type}, 400, "bad_request", "more than 8 header"),
        ("too small", png_of(10, 12, 8), {"Content-Type": "image/png"}, 400, "bad_image", "minimum"),
        ("bomb", bomb_bytes(tmp_path), {"Content-Type": "image/png"}, 413, "too_many_pixels", "decompression bomb"),
        ("too large", b"\0" * too_large, {"Content-Type": "image/png"}, 413, "too_large", "over the limit"),
    ]  # fmt: skip


def test_every_bad_upload_gets_its_status_and_a_one_line_reason(predictor, tmp_path):
    cases = bad_uploads(tmp_path)
    with client(predictor, max_upload_bytes=200_000) as c:
        for name, body, headers, status, _, words in cases:
            r = c.post("/v1/segment", content=body, headers=headers)
            assert r.status_code == status, (name, r.text)
            detail = r.json()["detail"]
            assert words in detail and "\n" not in detail, (name, detail)
        empty_file, empty_type = _multipart("file", b"")
        r = c.post("/v1/segment", content=empty_file, headers={"Content-Type": empty_type})
        assert r.status_code == 400 and r.json()["detail"] == "empty file"
        assert c.post("/v1/segment", content=png_of(48, 64, 1)).status_code == 200  # still serving
        text = c.get("/metrics").text
    expected = Counter(kind for *_, kind, _ in cases) + Counter({"bad_image": 1})  # + the empty multipart file
    for kind, n in expected.items():
        assert metric(text, "segformer_errors_total", kind=kind) == n, kind
    assert metric(text, "segformer_images_total") == 1  # no bad upload reached the model


def test_bad_query_parameters_are_400(predictor):
    data = png_of(48, 64, 1)
    with client(predictor) as c:
        for query, words in (("format=gif", "format"), ("alpha=1.5", "alpha"), ("probs=maybe", "probs"),
                             ("format=png&probs=true", "probs=true needs format=json"),
                             # a misspelt, a repeated and a non-finite parameter were answered as if absent, the
                             # last one, and "less than or equal to 1" (audit)
                             ("fromat=png", "unknown query parameter 'fromat' (the parameters are format, probs, "
                                            "alpha)"),
                             ("format=json&format=png", "query parameter format given 2 times; give it once"),
                             ("alpha=nan", "query parameter alpha: Input should be a finite number"),
                             # the opacity of a JSON or PNG answer changed nothing, without a word (audit)
                             ("alpha=0.5", "alpha sets the overlay's opacity: it needs format=overlay"),
                             ("format=png&alpha=0.5", "it needs format=overlay")):  # fmt: skip
            r = c.post(f"/v1/segment?{query}", content=data)
            assert r.status_code == 400 and words in r.json()["detail"], (query, r.text)
        assert c.post("/v1/segment?format=overlay&alpha=0.25&probs=false", content=data).status_code == 200
        for route in ("/", "/healthz", "/readyz"):  # HEAD, as uptime checkers and load balancers probe
            assert c.head(route).status_code == 200, route
        assert c.get("/v1/segment").status_code == 405
        assert c.get("/nothing/here").status_code == 404
        assert c.get("/v1/../../etc/passwd").status_code == 404  # a client's path is never a file path


# ---------------------------------------------------------------------------------------------- the other routes
def test_model_route_describes_the_model_and_its_protocol(predictor):
    with client(predictor, max_upload_bytes=123_456, max_batch=3, upload_idle_timeout=7.5) as c:
        info = c.get("/v1/model").json()
    assert info["input"]["upload_idle_timeout_s"] == 7.5
    assert info["variant"] == "custom" and info["num_classes"] == K and info["labels"] == list(NAMES.values())
    assert info["palette"] == predictor.palette.tolist()
    assert info["input"]["protocol"] == predictor.options.to_dict() and info["input"]["protocol"]["mode"] == "whole"
    assert info["input"]["min_size"] == predictor.min_size and info["input"]["max_upload_bytes"] == 123_456
    assert info["batching"]["max_batch"] == 3 and info["device"] == "cpu" and info["dtype"] == "float32"
    from segformer import SegformerConfig

    assert variant_of(SegformerConfig.from_variant("b2")) == "b2" and variant_of(tiny_config()) == "custom"


def test_health_readiness_and_metrics(predictor):
    app = create_app(predictor, ServeConfig())
    c = TestClient(app)
    # Before the lifespan has started the inference worker (what uvicorn does first), neither probe is green.
    assert c.get("/healthz").status_code == 503 and c.get("/readyz").json() == {"status": "warming up"}
    with c:
        wait_for(lambda: c.get("/readyz").status_code == 200, what="the warm-up")
        assert c.get("/healthz").json() == {"status": "ok"} and c.get("/readyz").json() == {"status": "ready"}
        for seed in range(3):
            assert c.post("/v1/segment", content=png_of(48, 64, seed)).status_code == 200
        c.post("/v1/segment", content=b"junk")
        for method in ("M1", "M2"):  # made-up methods: one series, not one each
            assert c.request(method, "/v1/segment").status_code == 405
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert metric(text, "segformer_requests_total", method="POST", route="/v1/segment", status="200") == 3
    assert metric(text, "segformer_requests_total", method="POST", route="/v1/segment", status="400") == 1
    assert metric(text, "segformer_errors_total", kind="bad_image") == 1
    assert metric(text, "segformer_requests_total", method="other", route="/v1/segment", status="405") == 2
    assert 'method="M1"' not in text
    pattern = r'^segformer_request_duration_seconds_bucket\{route="/v1/segment",le="[^"]+"\} (\S+)$'
    buckets = [float(v) for v in re.findall(pattern, text, re.M)]
    assert buckets == sorted(buckets) and buckets[-1] == 6  # cumulative, +Inf holds all
    assert metric(text, "segformer_request_duration_seconds_count", route="/v1/segment") == 6
    assert metric(text, "segformer_batch_size_count") >= 3 and metric(text, "segformer_images_total") == 3
    assert metric(text, "segformer_queue_depth") == 0 and metric(text, "segformer_model_ready") == 1
    for line in text.splitlines():  # the exposition format: comments, or `name{labels} value`
        assert line.startswith("# ") or re.fullmatch(r"segformer_\w+(\{[^}]*\})? \S+", line), line


def test_page_is_self_contained_and_package_data(predictor):
    with client(predictor) as c:
        r = c.get("/")
        docs, schema = c.get("/docs"), c.get("/openapi.json").json()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text == read_page()
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp  # the page cannot reach another host
    assert not re.search(r"(src|href)=\"(https?:)?//", r.text) and "http://" not in r.text and "https://" not in r.text
    assert 'type="file"' in r.text and 'id="opacity"' in r.text and 'id="legend"' in r.text
    assert docs.status_code == 200
    assert {"/v1/segment", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(body)


def test_docs_is_our_self_contained_api_page(predictor):
    """/docs is our own page (package data docs.html) under the web page's CSP, loading nothing from elsewhere
    (FastAPI's Swagger UI loads its code from a CDN: blank offline); it reads /openapi.json, which stays FastAPI's.
    Both stay public with an API key, as they were."""
    with client(predictor, api_key="s3cret-key") as c:
        docs, schema = c.get("/docs"), c.get("/openapi.json")
        assert c.head("/docs").status_code == 200
        assert c.get("/v1/model").status_code == 401
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    links = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", docs.text, flags=re.I)
    assert links and not [u for u in links if re.match(r"(https?:)?//", u, flags=re.I)], links
    assert "http://" not in docs.text and "https://" not in docs.text and "cdn" not in docs.text.lower()
    assert docs.headers["content-security-policy"] == PAGE_CSP
    assert docs.text == read_page("docs.html")
    assert '"openapi.json"' in docs.text  # (relative: the same server's, wherever it is mounted)
    assert schema.status_code == 200 and "/v1/segment" in schema.json()["paths"]
    assert "/docs" not in schema.json()["paths"]


def test_the_schema_lists_400_for_invalid_parameters_as_answered(predictor):
    """FastAPI's schema lists 422 for invalid parameters; this server answers 400 with a one-line detail, and its
    schema says so."""
    with client(predictor) as c:
        schema = c.get("/openapi.json").json()
        answer = c.post("/v1/segment?alpha=7", content=png_of(48, 64, 1))
    assert answer.status_code == 400 and "alpha" in answer.json()["detail"]
    assert "422" not in json.dumps(schema) and "HTTPValidationError" not in json.dumps(schema)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if operation.get("parameters") or operation.get("requestBody"):
                assert "400" in operation["responses"], (method, path)
    # every status the upload route answers (408 and 500 were missing: audit)
    assert sorted(schema["paths"]["/v1/segment"]["post"]["responses"]) == [
        "200", "400", "401", "408", "413", "500", "503", "504"]  # fmt: skip


def test_api_key_guards_the_api_routes_only(predictor):
    data = png_of(48, 64, 1)
    with client(predictor, api_key="s3cret-key") as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0LWtleQ=="},
                        {"Authorization": "Bearer s3cret-key-and-more"}):  # fmt: skip
            r = c.post("/v1/segment", content=data, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert "API key" in r.json()["detail"]
            assert c.get("/v1/model", headers=headers).status_code == 401
        good = {"Authorization": "Bearer s3cret-key"}
        assert c.post("/v1/segment", content=data, headers=good).status_code == 200
        assert c.get("/v1/model", headers=good).json()["auth"] is True
        for open_route in ("/", "/healthz", "/readyz", "/metrics"):
            assert c.get(open_route).status_code in (200, 503), open_route
        assert metric(c.get("/metrics").text, "segformer_errors_total", kind="unauthorized") == 8
    with pytest.raises(ValueError, match="api_key"):
        ServeConfig(api_key=" ")


def test_cors_is_off_unless_an_origin_is_given(predictor, caplog):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with client(predictor) as c:
        r = c.options("/v1/segment", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        assert (
            "access-control-allow-origin" not in c.get("/v1/model", headers={"Origin": "https://app.example"}).headers
        )
    with (
        client(predictor, cors_origins=("https://app.example",)) as c,
        caplog.at_level("INFO", logger="segformer.serve.access"),
    ):
        r = c.options("/v1/segment", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options("/v1/segment", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        assert other.status_code == 400 and other.json()["detail"] == (  # (plain text there: audit)
            "CORS preflight refused: this server (--cors) does not allow the request's origin"
        )
        # a page on the origin can read the headers it needs (not CORS-safelisted: exposed by name)
        answer = c.get("/v1/model", headers={"Origin": "https://app.example"})
        exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
        assert {"retry-after", "x-request-id"} <= exposed
        counted = metric(
            c.get("/metrics").text, "segformer_requests_total", method="OPTIONS", route="/v1/segment", status="200"
        )
    # the preflights pass the observing middleware as every request does (audit: no log line, no request id, no
    # metric while CORS sat outside it)
    records = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "segformer.serve.access"]
    assert [(rec["method"], rec["status"]) for rec in records[:2]] == [("OPTIONS", 200), ("OPTIONS", 400)]
    assert r.headers["x-request-id"] == records[0]["request_id"] and "x-request-id" in other.headers
    assert counted >= 1


def test_access_log_is_one_json_line_per_request(predictor, caplog):
    with client(predictor) as c, caplog.at_level("INFO", logger="segformer.serve.access"):
        ok = c.post("/v1/segment?format=png", content=png_of(48, 64, 1))
        bad = c.post("/v1/segment", content=b"junk")
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "segformer.serve.access"]
    assert [(r["method"], r["path"], r["status"]) for r in records] == [("POST", "/v1/segment", 200),
                                                                        ("POST", "/v1/segment", 400)]  # fmt: skip
    assert records[0]["request_id"] == ok.headers["x-request-id"] and records[0]["query"] == "format=png"
    assert records[0]["batch_size"] == 1 and records[0]["bytes_out"] == len(ok.content) and records[0]["ms"] > 0
    assert records[1]["request_id"] == bad.headers["x-request-id"] and "not an image" in records[1]["error"]
    assert records[0]["bytes_in"] == len(png_of(48, 64, 1)) and records[1]["bytes_in"] == 4  # the bytes that came


def test_a_compressed_body_is_named_not_called_not_an_image(predictor):
    """A gzipped PNG sent with Content-Encoding: gzip was answered "not an image (Pillow cannot identify the
    format)"; the encoding is named now (audit)."""
    import gzip

    with client(predictor) as c:
        r = c.post("/v1/segment", content=gzip.compress(png_of(48, 64, 1)), headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and r.json()["detail"].startswith("Content-Encoding 'gzip' is not supported")
        assert c.post("/v1/segment", content=png_of(48, 64, 1), headers={"Content-Encoding": "identity"}).is_success


# ---------------------------------------------------------------------------------------------- batching
def _post_all(c: TestClient, bodies: list[bytes], path: str = "/v1/segment") -> list:
    """POST every body at once, each from its own thread; the responses in order."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: c.post(path, content=b), bodies))


def test_queue_full_is_503_with_retry_after_and_waiting_too_long_is_504(predictor):
    """Without its inference worker (the lifespan not started, as when the model is busy elsewhere), every admitted
    request waits: one fills a queue of one, the next is refused at once, and the first times out."""
    app = create_app(predictor, ServeConfig(max_queue=1, timeout=1.0))
    c = TestClient(app, raise_server_exceptions=False)
    batcher = app.state.batcher
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(c.post, "/v1/segment", content=png_of(48, 64, 1))
        wait_for(lambda: batcher.queue_depth == 1, what="the first request to be queued")
        refused = c.post("/v1/segment", content=png_of(48, 64, 2))
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "busy" in refused.json()["detail"]
        started = time.monotonic()
        late = first.result()
    assert late.status_code == 504 and "--timeout" in late.json()["detail"] and time.monotonic() - started < 5
    text = c.get("/metrics").text
    assert metric(text, "segformer_errors_total", kind="queue_full") == 1
    assert metric(text, "segformer_errors_total", kind="timeout") == 1
    with c:  # the worker starts: the timed-out job is dropped, not run; the queue has room again
        assert c.post("/v1/segment", content=png_of(48, 64, 3)).status_code == 200
        assert metric(c.get("/metrics").text, "segformer_images_total") == 1


def test_uploads_hold_upload_places_not_queue_places(predictor):
    """An admitted upload holds one of --max-uploads places, not a queue place: with a queue of one, two requests are
    admitted while both upload; the first decoded one takes the queue's place and the second is refused then;
    beyond --max-uploads a request is refused before its body is read, and a full queue refuses on arrival."""
    batcher = Batcher(predictor, ServeConfig(max_queue=1, max_uploads=2), Metrics(), warm_up=False)
    assert batcher.admit() is None and batcher.admit() is None  # two uploads arriving, the queue empty
    assert batcher.admit() == "uploads_full" and (batcher.uploading, batcher.queue_depth) == (2, 0)
    image = Image.new("RGB", (64, 48))
    assert batcher.submit(_Job(image, False)) is True  # the first one decoded: queued
    assert batcher.submit(_Job(image, False)) is False  # the second: the queue filled while it arrived
    assert (batcher.uploading, batcher.queue_depth, batcher.waiting) == (0, 1, 1)
    assert batcher.admit() == "queue_full" and batcher.uploading == 0  # refused on arrival: no place taken


def test_concurrent_requests_share_forward_passes_by_size(predictor):
    """Eight requests queued before the worker starts are one batch: two sizes, two forward passes of four; each
    answer holds its own image's labels (where another batch size cannot move them, see `decided`)."""
    bodies = [png_of(48, 64, s) for s in range(4)] + [png_of(40, 56, s) for s in range(4, 8)]
    app = create_app(predictor, ServeConfig(max_batch=8), warm_up=False)
    c = TestClient(app, raise_server_exceptions=False)
    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(c.post, "/v1/segment", content=b) for b in bodies]
        wait_for(lambda: app.state.batcher.queue_depth == 8, what="eight queued requests")
        with c:  # starts the worker, which takes all eight at once
            answers = [f.result() for f in futures]
            text = c.get("/metrics").text
    assert metric(text, "segformer_batch_size_count") == 1 and metric(text, "segformer_batch_size_sum") == 8
    for body, r in zip(bodies, answers):
        assert r.status_code == 200 and r.json()["batch_size"] == 4
        ref, sure = decided(predictor, body)
        got = labels_of(base64.b64decode(r.json()["label_png"]))
        assert sure.mean() > 0.9 and np.array_equal(got[sure], ref[sure])


def test_one_failing_image_does_not_fail_its_batch(predictor):
    """A forward pass that fails (here: a device error injected for all-black images) is retried one image at a
    time: its batch-mates are answered, it alone gets 500. (Not an out-of-memory error: the predictor itself
    answers that one image by image, test_predict.)"""
    model = predictor.model
    black = float(normalize(np.zeros((1, 1, 3), np.uint8)).max())  # the brightest channel of a black pixel

    def device_error(module, args):
        if (args[0].flatten(1).max(dim=1).values <= black + 1e-6).any():
            raise RuntimeError("simulated device failure")

    hook = model.register_forward_pre_hook(device_error)
    try:
        bodies = [png_of(48, 64, 1), encode(np.zeros((48, 64, 3), np.uint8)), png_of(48, 64, 2)]
        app = create_app(predictor, ServeConfig(max_batch=8), warm_up=False)
        c = TestClient(app, raise_server_exceptions=False)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(c.post, "/v1/segment", content=b) for b in bodies]
            wait_for(lambda: app.state.batcher.queue_depth == 3, what="three queued requests")
            with c:
                statuses = [f.result().status_code for f in futures]
                detail = futures[1].result().json()["detail"]
    finally:
        hook.remove()
    assert statuses == [200, 500, 200] and "simulated device failure" in detail


def test_an_image_memory_cannot_take_is_413_naming_its_size_and_the_options(checkpoint):
    """An image whose pass the device's memory could not take was answered 500 "inference failed" (the
    predictor's own line, which names the image's size and the options, sat in the exception). A real allocation
    of more than a petabyte (scales 300000): 413, error kind out_of_memory, that line; a server at usual options
    answers the same image."""
    huge = SegformerPredictor(checkpoint, device="cpu", mode="whole", scales=[300000])
    app = create_app(huge, ServeConfig(max_batch=8), warm_up=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        answer = c.post("/v1/segment", content=png_of(32, 40, 1), headers={"Content-Type": "image/png"})
        metrics = c.get("/metrics").text
    assert answer.status_code == 413, answer.text
    detail = answer.json()["detail"]
    assert re.match(r"not enough memory to segment it \(40x32, whole, scales 300000", detail), detail
    assert metric(metrics, "segformer_errors_total", kind="out_of_memory") == 1
    with client(SegformerPredictor(checkpoint, device="cpu", mode="whole")) as c:
        assert c.post("/v1/segment", content=png_of(32, 40, 1)).status_code == 200


@pytest.mark.parametrize("workers", [1, 2])
def test_forward_passes_never_overlap_unless_workers_say_so(predictor, workers):
    model, lock = predictor.model, threading.Lock()
    state = {"now": 0, "most": 0, "threads": set()}

    def enter(module, args):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["threads"].add(threading.current_thread().name)

    def leave(module, args, output):
        with lock:
            state["now"] -= 1

    hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    try:
        with client(predictor, workers=workers, max_batch=2) as c:
            wait_for(lambda: c.get("/readyz").status_code == 200, what="the warm-up")
            names = {t.name for t in threading.enumerate() if t.name.startswith("segformer-inference-")}
            answers = _post_all(c, [png_of(48, 64 + 8 * (i % 3), i) for i in range(12)])
    finally:
        for h in hooks:
            h.remove()
    assert all(r.status_code == 200 for r in answers)
    assert names == {f"segformer-inference-{i}" for i in range(workers)}
    assert state["threads"] <= names and 1 <= state["most"] <= workers


def test_config_and_missing_dependencies_are_one_line_errors(monkeypatch):
    inf, nan = float("inf"), float("nan")
    for bad in (dict(max_batch=0), dict(max_queue=0), dict(max_uploads=0), dict(workers=0), dict(timeout=0),
                dict(alpha=2), dict(max_wait_ms=-1), dict(max_upload_bytes=0), dict(max_upload_bytes=inf),
                dict(timeout=inf), dict(timeout=nan), dict(timeout=1e10), dict(max_wait_ms=1e300),
                dict(upload_idle_timeout=0), dict(api_key="clé"), dict(api_key="two words")):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            ServeConfig(**bad)
    from segformer.serve import require_serve_dependencies

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    with pytest.raises(RuntimeError, match=r'needs uvicorn: pip install "segformer\[serve\]"'):
        require_serve_dependencies()


def test_command_help_defaults_and_bad_model(capsys, tmp_path, monkeypatch):
    from segformer.commands import serve as command

    assert command.DEFAULT_MAX_PIXELS == DEFAULT_MAX_PIXELS
    code, out, _ = run_cli(capsys, "serve", "--help")
    assert code == 0 and "usage: segformer serve" in out and "--max-batch" in out and "--api-key" in out
    code, _, err = run_cli(capsys, "serve", tmp_path / "missing", "--port", "0")
    assert code == 2 and err.count("\n") == 1 and "cannot load model" in err
    code, _, err = run_cli(capsys, "serve", tmp_path, "--max-batch", "0")
    assert code == 2 and "--max-batch" in err
    for flag in ("--timeout", "--max-upload-mb", "--max-wait-ms", "--upload-idle-timeout"):
        code, _, err = run_cli(capsys, "serve", tmp_path, flag, "inf")
        assert code == 2 and f"argument {flag}: expected" in err.splitlines()[-1]  # (argparse: usage, then it)
    # an empty key named as given (it said "api_key must not be empty"; an empty $SEGFORMER_API_KEY started an
    # open server without a word), a training run's folder pointed at its checkpoints (audit)
    code, _, err = run_cli(capsys, "serve", tmp_path, "--api-key", " ")
    assert code == 2 and err.endswith("error: --api-key is empty: give a key, or leave it out for an open server\n")
    monkeypatch.setenv("SEGFORMER_API_KEY", "")
    code, _, err = run_cli(capsys, "serve", tmp_path)
    assert code == 2 and "error: $SEGFORMER_API_KEY is empty: give a key" in err
    monkeypatch.delenv("SEGFORMER_API_KEY")
    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "best" / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "serve", tmp_path / "run", "--port", "0")
    assert code == 2 and f"(a training run: its checkpoints are {tmp_path / 'run' / 'best'})" in err, err
    from segformer.serve import _bind

    with pytest.raises(
        ValueError, match=r"cannot resolve --host 'localhost:8000': .* \(give the port with --port 8000\)"
    ):
        _bind("localhost:8000", 0)
    _bind("[::1]", 0).close()  # (brackets, as URLs write IPv6 addresses)


# ---------------------------------------------------------------------------------------------- a real server
class ServerProcess:
    """`segformer serve` in a process of its own on 127.0.0.1 and a free port; its stderr is collected."""

    def __init__(self, *args: str | os.PathLike, env: dict[str, str] | None = None, start_timeout: float = 120):
        cmd = [sys.executable, "-m", "segformer", "serve", *map(str, args), "--port", "0"]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self._url: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            self.url = self._url.get(timeout=start_timeout)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines)) from None

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"segformer serve: (http://\S+?)/ ", line)
            if found:
                self._url.put(found.group(1))

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        wait_for(lambda: httpx.get(self.url + "/readyz").status_code == 200, timeout, "the server to be ready")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def _load_mix(tmp_path: Path) -> tuple[list[tuple[str, bytes, dict[str, str], int]], dict[str, bytes]]:
    """Good uploads (two sizes, PNG and JPEG, raw and multipart; 3 in 4 of the mix) and every kind of bad one (an
    upload limit of 0.5 MB), with their statuses."""
    good = {f"good{i}": encode(_noise(144 + 24 * (i % 2), 192, 10 + i), "PNG" if i % 2 else "JPEG") for i in range(5)}
    mix = [(name, data, {"Content-Type": "image/png"}, 200) for name, data in good.items()] * 3
    mix += [(f"{name}-form", data, {"form": "1"}, 200) for name, data in good.items()] * 3
    mix += [(name, body, headers, status) for name, body, headers, status, *_ in bad_uploads(tmp_path, 600_000)]
    return mix, good


def _send(http, url: str, item) -> tuple[str, int, bytes]:
    name, body, headers, _ = item
    if headers.get("form"):
        r = http.post(url + "/v1/segment?format=png", files={"file": ("upload.bin", body, "image/png")})
    else:
        r = http.post(url + "/v1/segment?format=png", content=body, headers=headers)
    return name, r.status_code, r.content


def _hammer(url: str, items: list, clients: int) -> list[tuple[str, int, bytes]]:
    """Send every item, from `clients` concurrent keep-alive connections."""
    import httpx

    local = threading.local()

    def one(item):
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=120)
        return _send(local.http, url, item)

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, items))


@pytest.mark.slow
def test_real_server_under_load_memory_and_graceful_shutdown(checkpoint, predictor, tmp_path):
    """200 requests from 16 concurrent clients, a mix of good and bad uploads: every good one 200 with its own
    labels, every bad one its 4xx, no 5xx; the memory back at its plateau; then SIGTERM while a batch runs: the
    requests in flight are answered and the process exits 0."""
    import httpx

    # oneDNN keeps the kernels it builds for each input shape (up to its cache's capacity), so with its cache the
    # plateau would depend on which batch shapes this load happens to form; without it the memory is the server's.
    server = ServerProcess(checkpoint, "--mode", "whole", "--max-batch", "8", "--max-queue", "64",
                           "--max-upload-mb", "0.5", "--timeout", "60",
                           env={"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"})  # fmt: skip
    try:
        assert server.url.startswith("http://127.0.0.1:")  # the default host: this machine only
        server.wait_ready()
        mix, good = _load_mix(tmp_path)
        expected = {name: status for name, _, _, status in mix}
        references = {name: decided(predictor, data) for name, data in good.items()}
        rng = np.random.default_rng(0)

        def round_of(n: int) -> list:
            return [mix[i] for i in rng.integers(0, len(mix), n)]

        rss_start = server.rss_mb()
        warm = _hammer(server.url, round_of(200), clients=16)  # the allocator's working set for this load
        rss_plateau = server.rss_mb()
        started = time.monotonic()
        results = _hammer(server.url, round_of(200), clients=16)
        load_seconds = time.monotonic() - started
        rss_after = server.rss_mb()
        if rss_after - rss_plateau > 8:  # one more round: a leak grows again, a heap still settling does not
            rss_plateau = rss_after
            results += _hammer(server.url, round_of(200), clients=16)
            rss_after = server.rss_mb()

        for name, status, content in warm + results:
            assert status == expected[name], (name, status, content[:200])
            if status == 200:
                ref, sure = references[name.removesuffix("-form")]
                got = labels_of(content)
                assert sure.mean() > 0.9 and np.array_equal(got[sure], ref[sure]), name
        statuses = Counter(status for _, status, _ in results)
        assert statuses[200] > 0 and statuses[400] > 0 and statuses[413] > 0 and not any(s >= 500 for s in statuses)
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "segformer_batch_size_sum") == metric(text, "segformer_images_total")
        assert metric(text, "segformer_batch_size_sum") > metric(text, "segformer_batch_size_count")  # batched
        # Slack: leaking only the decoded image of each good request (3/4 of 200, 83-97 KB each) would add 13 MB, while
        # the allocator settles by at most ~2.5 MB in the round after a warm-up round (measured here; once 8.2 MB
        # with the tuned allocator, which keeps up to 256 MiB of freed heap: hence the extra round): allow 8 MB.
        assert rss_after - rss_plateau <= 8, (rss_start, rss_plateau, rss_after, load_seconds)

        # Graceful shutdown: big images keep the worker busy; SIGTERM arrives while their batch runs.
        yy, xx = np.mgrid[0:768, 0:768]
        big = encode(np.stack([xx // 3, yy // 3, (xx + yy) // 6], -1).astype(np.uint8))  # smooth: a small upload
        images_before = metric(httpx.get(server.url + "/metrics").text, "segformer_images_total")
        with ThreadPoolExecutor(3) as pool:
            inflight = [pool.submit(_hammer, server.url, [("big", big, {"Content-Type": "image/png"}, 200)], 1)
                        for _ in range(3)]  # fmt: skip

            def all_admitted_one_batch_running() -> bool:  # (a request not yet admitted at SIGTERM is refused)
                text = httpx.get(server.url + "/metrics").text
                done = metric(text, "segformer_images_total") - images_before
                admitted = metric(text, "segformer_images_running") + metric(text, "segformer_requests_waiting")
                return metric(text, "segformer_batches_running") == 1 and admitted + done == 3

            wait_for(all_admitted_one_batch_running, what="a running batch with all three requests admitted")
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            answers = [f.result()[0] for f in inflight]
            answered = time.monotonic()
        assert [status for _, status, _ in answers] == [200, 200, 200]
        assert server.proc.wait(60) == 0
        assert answered > signalled
        log = "".join(server.lines)
        assert "shutting down" in log and "stopped after" in log and "Traceback" not in log
        assert "; open: no API key; pid " in log
        access = [json.loads(line) for line in server.lines if line.startswith("{")]
        assert len([a for a in access if a["path"] == "/v1/segment"]) == 200 + len(results) + 3
        assert {a["status"] for a in access} >= {200, 400, 413}
    finally:
        server.stop()


@pytest.mark.slow
def test_real_server_drops_the_images_of_clients_that_left(checkpoint):
    """A client that closes its connection while its image is queued (the web page cancelling an upload) had the
    image run anyway and the access log and metrics say 200 (audit). Now its request is logged 499 (client_gone)
    and its image leaves the queue: the worker, busy with a large image meanwhile, runs only that one."""
    import httpx

    server = ServerProcess(checkpoint, "--mode", "whole", "--max-batch", "1")
    try:
        server.wait_ready()
        images_before = metric(httpx.get(server.url + "/metrics").text, "segformer_images_total")
        host, port = server.url.removeprefix("http://").split(":")
        small = png_of(64, 64, 5)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, server.url + "/v1/segment", content=png_of(2048, 2048, 4), timeout=120)
            wait_for(lambda: metric(httpx.get(server.url + "/metrics").text, "segformer_batches_running") == 1,
                     what="the large image's batch")  # fmt: skip
            leaving = []
            for _ in range(3):
                s = socket.create_connection((host, int(port)))
                s.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                          + f"Content-Length: {len(small)}\r\n\r\n".encode() + small)  # fmt: skip
                leaving.append(s)
            wait_for(lambda: metric(httpx.get(server.url + "/metrics").text, "segformer_queue_depth") == 3,
                     what="three queued images")  # fmt: skip
            for s in leaving:
                s.close()
            wait_for(lambda: metric(httpx.get(server.url + "/metrics").text, "segformer_queue_depth") == 0,
                     what="the queue to empty")  # fmt: skip
            running = metric(httpx.get(server.url + "/metrics").text, "segformer_batches_running")
            assert first.result().status_code == 200
        text = httpx.get(server.url + "/metrics").text
        assert running == 1  # the queue emptied while the large image still ran: withdrawn, not run
        assert metric(text, "segformer_images_total") - images_before == 1
        assert metric(text, "segformer_errors_total", kind="client_gone") == 3
        wait_for(lambda: sum('"status": 499' in line for line in server.lines) == 3, what="three 499 log lines")
    finally:
        server.stop()


@pytest.mark.slow
def test_real_server_forced_stop_answers_503_without_tracebacks(checkpoint):
    """A second Ctrl-C forces the stop (uvicorn's rule). The requests it left unanswered got uvicorn's plain-text
    500 and the log a CancelledError traceback each, while the worker ran on through the dropped images (audit).
    Now they get a JSON 503, the log says so in one line, and the queued images are not run."""
    import httpx

    server = ServerProcess(checkpoint, "--mode", "whole", "--max-batch", "1")
    try:
        server.wait_ready()
        # (the start-up lines in order: where it listens, then ready; a fast warm-up printed "ready" first: audit)
        wait_for(lambda: "ready (warm-up" in "".join(server.lines), what="the ready line")
        said = [line for line in server.lines if line.startswith("segformer serve: ")]
        assert "(web page;" in said[0] and "ready (warm-up" in said[1], said
        big = png_of(1024, 1024, 3)
        with ThreadPoolExecutor(12) as pool:
            inflight = [pool.submit(httpx.post, server.url + "/v1/segment", content=big, timeout=60) for _ in range(12)]
            wait_for(lambda: metric(httpx.get(server.url + "/metrics").text, "segformer_queue_depth") >= 6,
                     what="six queued requests")  # fmt: skip
            server.proc.send_signal(signal.SIGINT)
            wait_for(lambda: "shutting down" in "".join(server.lines), what="the first Ctrl-C")  # (two at once: one)
            server.proc.send_signal(signal.SIGINT)
            answers = [f.result() for f in inflight]
        assert server.proc.wait(60) == 0
        statuses = Counter(r.status_code for r in answers)
        assert set(statuses) <= {200, 503} and statuses[503] >= 2, statuses
        for r in answers:
            if r.status_code == 503:
                assert r.json() == {"detail": "the server was stopped (a forced stop) before answering"}
        log = "".join(server.lines)
        assert "segformer serve: forced stop: requests not answered yet get 503" in log, log
        assert "Traceback" not in log and "CancelledError" not in log, log
        done = int(re.search(r"stopped after (\d+) image", log).group(1))
        assert done < 12, log  # the queued images were dropped, not run
    finally:
        server.stop()


def _reply(sock: socket.socket) -> bytes:
    """One whole HTTP response (head and a Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


@pytest.mark.slow
def test_real_server_limits_key_and_slow_uploads(checkpoint):
    """Over a real socket: a declared Content-Length over the limit is refused before any of the body is sent, an
    upload that stalls gets 408 after --upload-idle-timeout (one that trickles, after --timeout), and the API key
    comes from the environment."""
    import httpx

    server = ServerProcess(checkpoint, "--mode", "whole", "--max-upload-mb", "1", "--timeout", "3",
                           "--upload-idle-timeout", "1", env={"SEGFORMER_API_KEY": "k3y"})  # fmt: skip
    try:
        server.wait_ready()
        host, port = server.url.removeprefix("http://").split(":")
        head = "POST /v1/segment HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\nContent-Type: image/png\r\n"
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall((head + "Content-Length: 1000000000\r\n\r\n").encode())
            reply = _reply(s)
            assert reply.startswith(b"HTTP/1.1 413 ") and b"over the limit" in reply
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall((head + "Content-Length: 1000\r\n\r\n").encode() + b"\x89PNG")  # and then nothing
            started = time.perf_counter()
            reply = _reply(s)
            assert reply.startswith(b"HTTP/1.1 408 ") and b"stalled" in reply
            assert time.perf_counter() - started < 2.5  # (the idle limit, 1 s, not the whole --timeout, 3 s)
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall((head + "Content-Length: 1000\r\n\r\n").encode())
            for _ in range(12):  # a byte every 0.4 s: never idle for 1 s, never done within 3
                time.sleep(0.4)
                try:
                    s.sendall(b"x")
                except OSError:  # (answered and closed)
                    break
            reply = _reply(s)
            assert reply.startswith(b"HTTP/1.1 408 ")
            assert re.search(rb"did not arrive within [0-9.]+ s \(--timeout\)", reply), reply
        assert httpx.post(server.url + "/v1/segment", content=png_of(48, 64, 1)).status_code == 401
        assert httpx.get(server.url + "/v1/model").status_code == 401
        assert httpx.get(server.url + "/v1/model", headers={"Authorization": "Bearer k3y"}).json()["auth"] is True
        assert "; API key required; pid " in "".join(server.lines)  # the start line says whether it is open
    finally:
        assert server.stop(signal.SIGINT) == 0
    stalled = [json.loads(line) for line in server.lines if line.startswith("{") and '"status": 408' in line]
    assert stalled[0]["bytes_in"] == 4  # what arrived of the 1000 declared (the log said 1000: audit)


@pytest.mark.slow
def test_real_server_slow_uploads_leave_the_queue_to_fast_requests(checkpoint):
    """Over real sockets, with a queue of one place: two uploads trickling in do not keep a fast request from the
    model; a request beyond --max-uploads gets 503 before its body is read; the slow ones, once sent, are answered."""
    import httpx

    server = ServerProcess(checkpoint, "--mode", "whole", "--max-queue", "1", "--max-uploads", "3",
                           "--timeout", "60", "--upload-idle-timeout", "30")  # fmt: skip
    try:
        server.wait_ready()
        host, port = server.url.removeprefix("http://").split(":")
        body = png_of(48, 64, 1)
        head = f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
        slow = [socket.create_connection((host, int(port)), timeout=60) for _ in range(2)]
        try:
            for s in slow:
                s.sendall(head.encode() + body[:16])  # and the rest later
            wait_for(lambda: metric(httpx.get(server.url + "/metrics").text, "segformer_uploads_arriving") == 2,
                     what="two uploads arriving")  # fmt: skip
            fast = httpx.post(server.url + "/v1/segment", content=png_of(48, 64, 2), timeout=60)
            assert fast.status_code == 200, fast.text  # (before --max-uploads: 503, the slow ones held the queue)
            third = socket.create_connection((host, int(port)), timeout=60)
            slow.append(third)
            third.sendall(head.encode() + body[:16])
            wait_for(lambda: metric(httpx.get(server.url + "/metrics").text, "segformer_uploads_arriving") == 3,
                     what="three uploads arriving")  # fmt: skip
            refused = httpx.post(server.url + "/v1/segment", content=png_of(48, 64, 3))
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            assert "--max-uploads" in refused.json()["detail"]
            for s in slow:  # one at a time: each finds the queue's place free
                s.sendall(body[16:])
                reply = _reply(s)
                assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
        finally:
            for s in slow:
                s.close()
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "segformer_errors_total", kind="uploads_full") == 1
        assert metric(text, "segformer_errors_total", kind="queue_full") == 0
        assert metric(text, "segformer_uploads_arriving") == 0 and metric(text, "segformer_upload_capacity") == 3
    finally:
        assert server.stop(signal.SIGINT) == 0
