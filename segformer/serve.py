"""The ``segformer serve`` program: an HTTP API and a web page over :class:`~segformer.predict.SegformerPredictor`.

>>> from segformer.predict import SegformerPredictor
>>> from segformer.serve import ServeConfig, create_app, serve
>>> predictor = SegformerPredictor("./my-checkpoint")               # the checkpoint's own protocol
>>> serve(predictor, ServeConfig(max_batch=8), host="127.0.0.1", port=8000)   # blocks; Ctrl-C stops it
>>> app = create_app(predictor)                                     # or the FastAPI app, for your own server

Needs FastAPI, uvicorn and python-multipart (``pip install "segformer[serve]"``); they are imported here, when
a server is made, so that the rest of the package works without them.

Routes (``/docs`` lists them: our own self-contained page over ``/openapi.json``, no CDN, so it works offline):

- ``POST /v1/segment``: one image, as a multipart upload (field ``file``) or as the raw body; JSON out (size,
  classes present with pixels and percent, the label map as a base64 palette PNG: the file ``segformer predict``
  writes). ``?format=png``: the label PNG itself; ``?format=overlay``: a JPEG overlay (``&alpha=``);
  ``?probs=true``: each class's confidence (the mean, over its pixels, of the top class probability) and the
  confidence map ``confidence_png`` (each pixel's top class probability, a base64 8-bit grayscale PNG, 255 = 1).
- ``GET /v1/model``: variant, labels, palette, input protocol and limits. ``GET /healthz`` (the process and its
  inference workers are alive), ``GET /readyz`` (the model is loaded and warm), ``GET /metrics`` (Prometheus).
- ``GET /``: a self-contained web page (``segformer/static/index.html``); ``GET /docs``: the API reference
  (``segformer/static/docs.html``), which reads ``GET /openapi.json``. Both are public, as are the probes.

How a request travels: the API key, if any (401) → admission (503 with ``Retry-After`` when ``max_queue`` requests
are already waiting for the model, or ``max_uploads`` uploads are arriving) → the body is read in chunks, 413 as
soon as it passes ``max_upload_bytes`` (408 if it has not arrived within ``timeout``) → the image is decoded and
checked by :mod:`segformer.images` (400 with a one-line reason; 413 over the predictor's ``max_pixels``), in a small
thread pool (two threads per core) → only then the job is queued (503 if the queue filled up meanwhile: an upload
holds no queue place while it arrives, so slow clients never keep fast ones from the model), so a bad upload never
reaches a batch → one inference thread (``workers`` of them if asked) takes up to ``max_batch`` queued jobs, waiting
at most ``max_wait_ms`` for requests that were admitted and are still being read, and runs them through
:meth:`SegformerPredictor.predict_iter` (same-size images share a forward pass) → the answer (PNG or JPEG encoding)
is built in a thread. A request still waiting for the model ``timeout`` seconds after admission gets 504 (and is
dropped from the queue). A forward pass that fails is retried one image at a time, so one image never fails the
others of its batch. Each inference thread keeps its full-resolution work areas between requests
(:func:`segformer.inference.reuse_work_areas`: half the post-processing time of a 512×683 photo; the memory of its
largest request's areas stays with the thread).
"""

import asyncio
import base64
import concurrent.futures
import hmac
import io
import json
import logging
import math
import numbers
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from .config import VARIANTS
from .hub import first_line
from .images import IMAGENET_MEAN, IMAGENET_STD, ImageError
from .inference import reuse_work_areas
from .predict import SegformerPredictor, Segmentation
from .visualize import label_image, overlay

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("segformer.serve")
access_log = logging.getLogger("segformer.serve.access")

SERVE_EXTRA = 'pip install "segformer[serve]"'
# A server's pixel limit: below segformer predict's (Pillow's 89.5 MP), since up to --max-queue decoded images
# (3 bytes a pixel) wait in memory at once, besides those of the uploads being decoded; 40 MP still takes any phone
# or DSLR photo. (?probs=true adds 4 bytes a pixel for the confidence, never the K classes' probabilities, with a
# single-pass protocol on the CPU: predict_confidence.)
DEFAULT_MAX_PIXELS = 40_000_000


def require_serve_dependencies() -> None:
    """Raise a one-line RuntimeError naming the install command when FastAPI, uvicorn or python-multipart is
    missing."""
    missing = []
    packages = {"fastapi": ["fastapi"], "uvicorn": ["uvicorn"], "python-multipart": ["python_multipart", "multipart"]}
    for package, modules in packages.items():
        for module in modules:
            try:
                __import__(module)
                break
            except ImportError:
                pass
        else:
            missing.append(package)
    if missing:
        raise RuntimeError(f"segformer serve needs {', '.join(missing)}: {SERVE_EXTRA}")


# ----------------------------------------------------------------------------------------------- settings
MAX_TIMEOUT = 86400.0  # seconds: a day, for any wait the server keeps (far below what timers can hold)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
SEGMENT_PARAMETERS = ("format", "probs", "alpha")  # the query parameters of POST /v1/segment


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches, bounds and guards requests (the ``segformer serve`` options).

    max_batch: jobs one inference worker takes at once (same-size images share a forward pass). max_wait_ms: how
    long a worker holding a job waits for more, only while admitted requests are still being read. max_queue:
    decoded images waiting for a worker; a request that finds it full gets 503 with Retry-After (on arrival, or
    once its image is decoded if the queue filled meanwhile). max_uploads: requests being received and decoded
    at once (each holds up to max_upload_bytes); one more gets 503 with Retry-After. An upload holds no queue
    place while it arrives, so slow clients cannot keep fast ones from the model. timeout: seconds from
    admission to the model's answer, else 504. upload_idle_timeout: seconds an upload may send nothing before
    it gets 408 and gives its upload place back (a stalled or idle client). workers: inference threads, each
    running its own forward passes (1: never two at once on the device). max_upload_bytes: larger bodies get 413
    (Content-Length is checked before anything is read). api_key: a bearer token for the /v1 routes (None:
    open; printable ASCII). cors_origins: origins allowed to call the API from a browser (empty: CORS off).
    alpha: the default overlay opacity.
    """

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 32
    max_uploads: int = 64
    timeout: float = 30.0
    upload_idle_timeout: float = 10.0
    workers: int = 1
    max_upload_bytes: int = 20 * 2**20
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    alpha: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_uploads", "workers", "max_upload_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value == int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.timeout <= MAX_TIMEOUT:  # (NaN fails too; beyond, the event loop's timers overflow)
            raise ValueError(
                f"timeout must be a positive number of seconds up to {MAX_TIMEOUT:g}, got {self.timeout!r}"
            )
        if not 0 <= self.max_wait_ms <= 1000 * self.timeout:
            raise ValueError(f"max_wait_ms must be between 0 and the timeout (in ms), got {self.max_wait_ms!r}")
        if not 0 < self.upload_idle_timeout <= MAX_TIMEOUT:
            raise ValueError(
                f"upload_idle_timeout must be a positive number of seconds, got {self.upload_idle_timeout!r}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (omit it for an open server)")
        if self.api_key is not None and not all("!" <= c <= "~" for c in self.api_key):
            # HTTP headers arrive as Latin-1: a key with spaces, controls or non-ASCII letters would never match
            raise ValueError("api_key must be printable ASCII without spaces (what an HTTP header carries)")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))


# ----------------------------------------------------------------------------------------------- metrics
class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, total = [], 0
        sep = "," if labels else ""
        for bound, n in zip([*map(_fmt, self.buckets), "+Inf"], self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {total}')
        brace = f"{{{labels}}}" if labels else ""
        return [*out, f"{name}_sum{brace} {_fmt(self.sum)}", f"{name}_count{brace} {self.count}"]


def _fmt(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


ERROR_KINDS = {
    "bad_request": "400: no body, wrong content type, bad multipart body or query",
    "bad_image": "400: not an image, truncated, undecodable or too small",
    "unauthorized": "401: missing or wrong API key",
    "not_found": "404/405: no such route or method",
    "upload_timeout": "408: the upload did not arrive in time",
    "too_large": "413: upload over --max-upload-mb",
    "too_many_pixels": "413: image over --max-pixels (decompression bomb)",
    "out_of_memory": "413: the image needed more memory than the device had free at the server's options",
    "queue_full": "503: --max-queue images were waiting for the model",
    "uploads_full": "503: --max-uploads uploads were arriving",
    "client_gone": "499: the client closed the connection while its image waited (a queued image is not run)",
    "timeout": "504: no answer from the model in time",
    "internal": "500: an error in the server or the model",
}


async def _disconnected(request: Any) -> None:
    """Return once the client of ``request`` has closed its connection: the ASGI channel's http.disconnect. Awaited
    once the body has been read, when nothing else arrives on the channel before the answer is sent."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Metrics:
    """Counters and histograms of one server, in Prometheus' text format (:meth:`render`). Thread-safe."""

    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (method, route, status) → count
        self.errors: Counter[str] = Counter({kind: 0 for kind in ERROR_KINDS})
        self.latency: dict[str, _Histogram] = {}
        self.batch_size = _Histogram(self.BATCH_BUCKETS)
        self.inference = _Histogram(self.LATENCY_BUCKETS)
        self.images = 0

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "other"  # (a client's made-up methods: one series)
        with self._lock:
            self.requests[(method, route, status)] += 1
            self.latency.setdefault(route, _Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.inference.observe(seconds)
            self.images += size

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges``: name → (help, value), sampled by the caller."""
        out: list[str] = []

        def family(name: str, kind: str, text: str, samples: list[str]) -> None:
            out.extend([f"# HELP segformer_{name} {text}", f"# TYPE segformer_{name} {kind}", *samples])

        with self._lock:
            requests = [
                f'segformer_requests_total{{method="{m}",route="{r}",status="{c}"}} {n}'
                for (m, r, c), n in sorted(self.requests.items())
            ]
            errors = [f'segformer_errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())]
            latency = [
                line
                for route, hist in sorted(self.latency.items())
                for line in hist.lines("segformer_request_duration_seconds", f'route="{route}"')
            ]
            family("requests_total", "counter", "HTTP requests answered, by method, route and status.", requests)
            family("errors_total", "counter", "Requests answered with an error, by kind.", errors)
            family("request_duration_seconds", "histogram", "Time from arrival to the answer's end.", latency)
            family(
                "batch_size",
                "histogram",
                "Jobs an inference worker took at once.",
                self.batch_size.lines("segformer_batch_size"),
            )
            family(
                "inference_duration_seconds",
                "histogram",
                "Time the model spent on one batch.",
                self.inference.lines("segformer_inference_duration_seconds"),
            )
            family("images_total", "counter", "Images segmented.", [f"segformer_images_total {self.images}"])
        for name, (text, value) in gauges.items():
            family(name, "gauge", text, [f"segformer_{name} {_fmt(value)}"])
        return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- batching
@dataclass
class _Result:
    segmentation: Segmentation
    batch_size: int  # images in the forward pass this one shared (same size, same probs flag)
    queue_s: float
    inference_s: float


@dataclass(eq=False)
class _Job:
    image: Image.Image
    probs: bool
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """The inference workers: threads that own the predictor's forward passes, fed by a bounded queue.

    ``admit()`` gives a request one of ``max_uploads`` upload places before its body is read, if the queue has
    room now; ``submit(job)`` ends the upload and queues its decoded image if one of ``max_queue`` places is free
    (False: full), ``abandon()`` ends an upload that will not be queued. A queue place is freed when a worker takes
    the job."""

    def __init__(
        self, predictor: SegformerPredictor, config: ServeConfig, metrics: Metrics, *, warm_up: bool = True
    ) -> None:
        self.predictor, self.config, self.metrics = predictor, config, metrics
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._uploading = 0  # admitted and being read or decoded, not yet submitted
        self._stopping = False
        self.forced = False  # a forced stop (a second Ctrl-C): queued jobs are dropped, not run
        self._threads: list[threading.Thread] = []
        self._warm_up = warm_up
        self.ready = threading.Event()
        # set once the server has said where it listens (serve() clears it until then): "ready" comes after that
        # line, not before it (a fast warm-up won the race: audit); an app served otherwise does not wait
        self.announced = threading.Event()
        self.announced.set()
        self.warm_up_error: str | None = None
        self.batch_seconds = 0.0  # a running mean, for Retry-After
        self.running = 0  # workers inside a batch now
        self.running_images = 0  # the images of those batches

    # --- the request side
    def admit(self) -> str | None:
        """None: admitted, with an upload place until :meth:`submit` or :meth:`abandon`; else the error kind of
        the refusal (``queue_full``, ``uploads_full``; stopping counts as a full queue)."""
        with self._cond:
            if self._stopping or len(self._jobs) >= self.config.max_queue:
                return "queue_full"
            if self._uploading >= self.config.max_uploads:
                return "uploads_full"
            self._uploading += 1
            return None

    def abandon(self) -> None:
        with self._cond:
            self._uploading -= 1
            self._cond.notify_all()  # a worker waiting for this request to arrive need not wait any longer

    def submit(self, job: _Job) -> bool:
        """End the job's upload and queue it; False (not queued) when ``max_queue`` jobs are already waiting."""
        with self._cond:
            self._uploading -= 1
            self._cond.notify_all()
            if len(self._jobs) >= self.config.max_queue:
                return False
            self._jobs.append(job)
            return True

    def withdraw(self, job: _Job) -> None:
        """Take back a job that timed out: out of the queue (its place is free at once) if no worker has it."""
        with self._cond:
            if job.future.cancel() and job in self._jobs:
                self._jobs.remove(job)

    @property
    def queue_depth(self) -> int:
        return len(self._jobs)

    @property
    def uploading(self) -> int:
        return self._uploading

    @property
    def waiting(self) -> int:
        """Admitted requests not yet taken by a worker: being read or decoded, or queued."""
        return self._uploading + len(self._jobs)

    def retry_after(self) -> int:
        """Seconds until a place is likely to free up: the batches ahead of a new request, at the mean batch time."""
        batches = math.ceil(max(self.waiting, 1) / (self.config.max_batch * self.config.workers))
        return max(1, min(60, math.ceil(batches * self.batch_seconds)))

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    # --- the worker side
    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"segformer-inference-{i}", daemon=True)
            for i in range(self.config.workers)
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the workers finish every queued job, then join them (each for at most
        ``timeout`` seconds; the threads are daemons, so a process that exits does not wait for them)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _loop(self, index: int) -> None:
        # Each worker keeps its full-resolution work areas from request to request (segformer.inference's
        # reuse_work_areas): their first-touch page faults cost as much as a b0 forward pass on a 512x683 photo.
        # They grow to the largest request's and stay (per worker; huge photos are banded, see predict.py).
        with reuse_work_areas():
            if index == 0:
                self._warm()
            else:
                self.ready.wait()
            while (batch := self._take()) is not None:
                self._run(batch)

    def _warm(self) -> None:
        """One forward pass at start-up (with a compiled backend: the compilation for its shape), so that the
        first request is not the slow one."""
        started = time.perf_counter()
        try:
            if self._warm_up:
                side = max(64, self.predictor.min_size)
                self.predictor.predict(np.full((side, side, 3), 127, np.uint8))
            seconds = time.perf_counter() - started
            self.announced.wait(timeout=30)
            log.info(f"segformer serve: ready (warm-up {seconds:.1f} s)")
        except Exception as exc:  # the server stays up (healthz) but says why it is not ready
            self.warm_up_error = first_line(exc)
            log.error(f"segformer serve: warm-up failed: {self.warm_up_error}")
        self.ready.set()

    def _take(self) -> list[_Job] | None:
        """Up to max_batch live jobs; None once stopping and the queue is empty."""
        wait_s = self.config.max_wait_ms / 1000
        with self._cond:
            while True:
                if self.forced:  # (their requests are answered 503 by _Observe as the process ends)
                    for job in self._jobs:
                        job.future.cancel()
                    self._jobs.clear()
                    return None
                while not self._jobs:
                    if self._stopping:
                        return None
                    self._cond.wait()
                batch: list[_Job] = []
                deadline = time.perf_counter() + wait_s
                while len(batch) < self.config.max_batch:
                    if self._jobs:
                        job = self._jobs.popleft()
                        if job.future.set_running_or_notify_cancel():  # False: it timed out in the queue
                            batch.append(job)
                        continue
                    # Wait only for requests already admitted and on their way (being read or decoded): a lone
                    # request never waits.
                    remaining = deadline - time.perf_counter()
                    if not batch or self._uploading <= 0 or remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
                if batch:
                    return batch

    def _run(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        with self._cond:
            self.running += 1
            self.running_images += len(batch)
        outcomes: list[tuple[_Job, _Result | Exception]] = []
        try:
            for want_probs in (False, True):  # confidences cost a softmax: only the jobs that asked pay for them
                group = [j for j in batch if j.probs == want_probs]
                if group:
                    outcomes += self._segment(group, want_probs)
        finally:
            with self._cond:
                self.running -= 1
                self.running_images -= len(batch)
            seconds = time.perf_counter() - started
            self.batch_seconds = seconds if self.batch_seconds == 0 else 0.8 * self.batch_seconds + 0.2 * seconds
            self.metrics.batch(len(batch), seconds)  # before the answers: a client that got one sees it counted
            for job, outcome in outcomes:
                if isinstance(outcome, Exception):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _segment(self, group: list[_Job], want_probs: bool) -> list[tuple[_Job, _Result | Exception]]:
        """Each job of a same-probs group with its result, or the exception its forward pass raised."""
        started = time.perf_counter()
        try:
            images = [j.image for j in group]  # (the confidence without the (K, H, W) probabilities)
            results = [r for _, r in self.predictor.predict_iter(images, return_confidence=want_probs)]
        except Exception as exc:
            if len(group) > 1:  # one image must not fail the others: run each alone
                return [outcome for job in group for outcome in self._segment([job], want_probs)]
            return [(group[0], exc)]
        done = time.perf_counter()
        sizes = Counter(j.image.size for j in group)
        outcomes: list[tuple[_Job, _Result | Exception]] = []
        for job, result in zip(group, results, strict=True):
            if isinstance(result, ImageError):
                outcomes.append((job, result))
            else:
                outcomes.append((job, _Result(result, sizes[job.image.size], started - job.queued_at, done - started)))
        return outcomes


# ----------------------------------------------------------------------------------------------- answers
class ApiError(Exception):
    """An error answer: HTTP status, the metrics' error kind and a one-line reason."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, first_line(message), headers


def _png_bytes(labels: np.ndarray, palette: np.ndarray) -> bytes:
    """The label map as ``segformer predict`` writes NAME.png (visualize.label_image, saved as PNG)."""
    buf = io.BytesIO()
    label_image(labels, palette).save(buf, format="PNG")
    return buf.getvalue()


def _confidence(labels: np.ndarray, top: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) mean over each class's pixels of ``top``, each pixel's winning (top class) probability
    (NaN where a class is absent)."""
    flat = labels.reshape(-1).astype(np.intp)
    sums = np.bincount(flat, weights=top.reshape(-1).astype(np.float64), minlength=num_classes)[:num_classes]
    counts = np.bincount(flat, minlength=num_classes)[:num_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def _confidence_png(top: np.ndarray) -> bytes:
    """The confidence map: each pixel's winning probability p as an 8-bit grayscale PNG, round(255 p)."""
    gray = np.rint(np.clip(top, 0.0, 1.0) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")  # (uint8, 2-D: mode L)
    return buf.getvalue()


def variant_of(config: Any) -> str:
    """The paper variant ("b0" … "b5") when the encoder and decoder widths are a paper variant's, else "custom"."""
    for name, spec in VARIANTS.items():
        if all(getattr(config, key, None) == value for key, value in spec.items()):
            return name
    return "custom"


PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def read_page(name: str = "index.html") -> str:
    """A page of the server, package data ``segformer/static/NAME``: the web page (index.html, at ``/``) or the
    API reference (docs.html, at ``/docs``)."""
    from importlib.resources import files

    return files("segformer").joinpath("static", name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------- the app
def create_app(predictor: SegformerPredictor, config: ServeConfig | None = None, *, warm_up: bool = True) -> "FastAPI":
    """The FastAPI application over ``predictor`` (see the module docstring for the routes). Its lifespan starts
    the inference workers (and the warm-up, unless ``warm_up=False``) and stops them after the last request.
    Sets ``predictor.batch_size`` to ``config.max_batch``. Raises RuntimeError when FastAPI is missing."""
    require_serve_dependencies()
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect

    from . import __version__

    config = config or ServeConfig()
    predictor.batch_size = config.max_batch
    metrics = Metrics()
    batcher = Batcher(predictor, config, metrics, warm_up=warm_up)
    page, docs_page = read_page(), read_page("docs.html")
    names, palette, k = predictor.class_names, predictor.palette, predictor.num_classes
    # A local checkpoint (or ONNX file) is named by its folder (file), not by where it lies on the server.
    local = Path(predictor.model_name).is_dir() or Path(predictor.model_name).is_file()
    name = Path(predictor.model_name).name if local else predictor.model_name
    model_info = {
        "model": name,
        "variant": variant_of(predictor.config),
        "architecture": {
            key: getattr(predictor.config, key) for key in ("depths", "hidden_sizes", "decoder_hidden_size")
        },
        "num_classes": k,
        "labels": names,
        "palette": palette.tolist(),
        "device": str(predictor.device),
        "dtype": model_dtype(predictor),
        "input": {
            "protocol": predictor.options.to_dict(),
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "min_size": predictor.min_size,
            "max_pixels": predictor.max_pixels,
            "max_upload_bytes": config.max_upload_bytes,
            "upload_idle_timeout_s": config.upload_idle_timeout,
            "content_types": ["multipart/form-data (field 'file')", "image/*", "application/octet-stream"],
        },
        "batching": {
            "max_batch": config.max_batch,
            "max_wait_ms": config.max_wait_ms,
            "max_queue": config.max_queue,
            "max_uploads": config.max_uploads,
            "timeout_s": config.timeout,
            "workers": config.workers,
        },
        "auth": config.api_key is not None,
    }

    # Decoding uploads and encoding answers is CPU work: two threads per core do it as fast as forty (Starlette's
    # default pool) and keep the process's memory (thread stacks, allocator arenas) small and steady.
    cpu_pool = concurrent.futures.ThreadPoolExecutor(2 * (os.cpu_count() or 1), thread_name_prefix="segformer-cpu")

    async def in_thread(func: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(cpu_pool.submit(func, *args))

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:  # uvicorn has let the requests in flight finish; what is left in the queue has --timeout to run
            await run_in_threadpool(batcher.stop, config.timeout)

    app = FastAPI(
        title="segformer serve",
        version=__version__,
        description=(
            "Semantic segmentation with a SegFormer. POST an image to /v1/segment; the web page is at /. "
            'Errors are JSON {"detail": one-line reason}. With --api-key the /v1 routes need '
            "`Authorization: Bearer KEY`."
        ),
        lifespan=lifespan,
        docs_url=None,  # FastAPI's Swagger UI loads its code from a CDN: blank offline. Ours is served below.
        redoc_url=None,
    )
    app.state.batcher, app.state.metrics, app.state.config = batcher, metrics, config

    # --- errors: JSON {"detail": one line}, counted by kind
    def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.error(kind)
        return JSONResponse({"detail": first_line(message)}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        request.scope.setdefault("segformer", {})["error"] = exc.message
        return error_response(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = " ".join(str(part) for part in first.get("loc", ()) if part != "query")
        message = f"query parameter {where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg"))
        request.scope.setdefault("segformer", {})["error"] = message
        return error_response(400, "bad_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code in (404, 405) else "bad_request"
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("segformer serve: internal error")
        return error_response(500, "internal", f"internal error: {type(exc).__name__}: {first_line(exc)}")

    # --- middleware: CORS, then (added last, so outermost: it sees every request, the CORS preflights too) the
    # access log, metrics, request id and a few security headers
    if config.cors_origins:
        app.add_middleware(
            _cors_middleware(),
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Request-ID"],  # (not CORS-safelisted: a page could not read them)
        )
    app.add_middleware(_Observe, metrics=metrics, batcher=batcher)

    bearer = HTTPBearer(auto_error=False, description="Only when the server was started with --api-key: `Bearer KEY`.")
    expected_key = config.api_key.encode() if config.api_key is not None else None

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if expected_key is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected_key):  # constant time in the key's content
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                {"WWW-Authenticate": "Bearer"},
            )

    # --- routes
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @app.api_route("/docs", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:  # public, as /openapi.json is: it holds no secret
        return HTMLResponse(docs_page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    # The probes answer HEAD too (uptime checkers and load balancers probe with it); the schema lists GET alone.
    @app.get("/healthz", tags=["operations"], summary="Liveness: the process and its inference workers run")
    @app.head("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        if not batcher.alive:
            return JSONResponse({"status": "inference worker stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["operations"], summary="Readiness: the model is loaded and warm")
    @app.head("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if batcher.warm_up_error is not None:
            return JSONResponse({"status": f"warm-up failed: {batcher.warm_up_error}"}, status_code=503)
        if not batcher.ready.is_set():
            return JSONResponse({"status": "warming up"}, status_code=503)
        if not batcher.alive or batcher._stopping:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        gauges = {
            "queue_depth": ("Decoded images waiting for an inference worker.", batcher.queue_depth),
            "requests_waiting": (
                "Admitted requests not yet taken by a worker (being read, decoded or queued).",
                batcher.waiting,
            ),
            "queue_capacity": ("--max-queue.", config.max_queue),
            "uploads_arriving": ("Admitted requests whose upload is being read or decoded.", batcher.uploading),
            "upload_capacity": ("--max-uploads.", config.max_uploads),
            "batches_running": ("Inference workers busy with a batch now (at most --workers).", batcher.running),
            "images_running": ("Images in the batches being run now.", batcher.running_images),
            "model_ready": ("1 when the model is loaded and warm.", float(batcher.ready.is_set())),
        }
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/model", tags=["model"], summary="The model: variant, labels, palette, input protocol")
    async def model(_: None = Depends(authorize)) -> JSONResponse:  # noqa: B008
        return JSONResponse(model_info)

    async def read_body(request: Request, deadline: float) -> bytes:
        """The body, read in chunks; 413 past the limit (before reading anything when Content-Length says so)."""
        limit = config.max_upload_bytes
        too_large = f"upload is over the limit of {limit:,} bytes (--max-upload-mb)"
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise ApiError(400, "bad_request", f"invalid Content-Length {length!r}")
            if int(length) > limit:
                raise ApiError(
                    413,
                    "too_large",
                    f"upload of {int(length):,} bytes is over the limit of {limit:,} bytes (--max-upload-mb)",
                )
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:  # each chunk within --upload-idle-timeout of the last, all of them within --timeout
            left = deadline - time.perf_counter()
            wait = min(left, config.upload_idle_timeout)
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(wait, 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                if wait < left:
                    reason = f"the upload stalled: nothing arrived for {config.upload_idle_timeout:g} s"
                    raise ApiError(408, "upload_timeout", reason + " (--upload-idle-timeout)") from None
                reason = f"the upload did not arrive within {config.timeout:g} s (--timeout)"
                raise ApiError(408, "upload_timeout", reason) from None
            except ClientDisconnect:
                raise ApiError(400, "bad_request", "the client disconnected during the upload") from None
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", too_large)
            chunks.append(chunk)
        return b"".join(chunks)

    async def image_bytes(request: Request, body: bytes) -> bytes:
        """The image's bytes from a multipart body (field "file", else the one file part) or a raw body."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # (a gzipped PNG would be "not an image")
            raise ApiError(
                400, "bad_request", f"Content-Encoding {encoding!r} is not supported: send the bytes as they are"
            )
        if media == "multipart/form-data":

            async def one_chunk() -> AsyncIterator[bytes]:
                yield body

            try:
                form = await MultiPartParser(request.headers, one_chunk(), max_files=1, max_fields=16).parse()
            except MultiPartException as exc:
                reason = _part_head_problem(body, request.headers.get("content-type", "")) or exc.message
                raise ApiError(400, "bad_request", f"bad multipart body: {reason}") from None
            try:
                parts = [v for _, v in form.multi_items() if hasattr(v, "read")]
                if not parts and "file" in form:
                    reason = "the multipart part 'file' has no filename: send it as a file (curl -F file=@photo.jpg)"
                    raise ApiError(400, "bad_request", reason)
                if not parts and _cut_short(body, request.headers.get("content-type", "")):
                    reason = "the multipart body ends before its closing boundary: the upload was cut short"
                    raise ApiError(400, "bad_request", reason)  # (it said "no file part": audit)
                if not parts:
                    raise ApiError(400, "bad_request", "the multipart body has no file part: send the image as 'file'")
                return await parts[0].read()
            finally:
                await form.close()
        if media and media != "application/octet-stream" and not media.startswith("image/"):
            raise ApiError(
                400,
                "bad_request",
                f"unsupported Content-Type {media!r}: send the image as multipart/form-data (field 'file') or as "
                "the raw body with Content-Type image/* or application/octet-stream",
            )
        if not body:
            raise ApiError(400, "bad_request", "empty body: send an image")
        return body

    def decode(data: bytes) -> Image.Image:
        try:
            return predictor.load(data)  # segformer.images: bomb limit, full decode, EXIF, RGB; min size
        except ImageError as exc:
            if exc.too_large:
                raise ApiError(413, "too_many_pixels", str(exc)) from None
            raise ApiError(400, "bad_image", str(exc)) from None
        except Exception as exc:  # whatever a hostile file makes Pillow raise is the file's fault, not ours
            raise ApiError(400, "bad_image", f"cannot decode: {first_line(exc)}") from None

    def answer(
        image: Image.Image, result: _Result, fmt: str, want_probs: bool, alpha: float, started: float
    ) -> Response:
        seg = result.segmentation
        labels = seg.labels
        if fmt == "png":
            return Response(_png_bytes(labels, palette), media_type="image/png")
        if fmt == "overlay":
            buf = io.BytesIO()
            overlay(image, labels, palette, alpha).save(buf, format="JPEG", quality=92)
            return Response(buf.getvalue(), media_type="image/jpeg")
        counts = seg.areas(k)
        total = int(labels.size)
        with_probs = want_probs and seg.confidence is not None
        confidence = _confidence(labels, seg.confidence, k) if with_probs else None
        classes = []
        for c in np.flatnonzero(counts).tolist():
            entry: dict[str, Any] = {
                "id": c,
                "name": names[c],
                "pixels": int(counts[c]),
                "percent": 100.0 * int(counts[c]) / total,
                "color": palette[c].tolist(),
            }
            if confidence is not None:
                entry["confidence"] = float(confidence[c])
            classes.append(entry)
        classes.sort(key=lambda e: -e["pixels"])
        body: dict[str, Any] = {
            "width": int(labels.shape[1]),
            "height": int(labels.shape[0]),
            "classes": classes,
            "label_png": base64.b64encode(_png_bytes(labels, palette)).decode("ascii"),
        }
        if with_probs:
            body["confidence_png"] = base64.b64encode(_confidence_png(seg.confidence)).decode("ascii")
        body |= {
            "model": name,
            "batch_size": result.batch_size,
            "timing_ms": {
                "queue": round(1000 * result.queue_s, 3),
                "inference": round(1000 * result.inference_s, 3),
                "total": round(1000 * (time.perf_counter() - started), 3),
            },
        }
        return JSONResponse(body)

    upload_schema = {"type": "string", "format": "binary"}

    def busy(kind: str) -> ApiError:
        """The 503 for a full queue or full upload places, with the seconds until a place is likely free."""
        if batcher._stopping:
            reason = "the server is shutting down"
        elif kind == "queue_full":
            reason = f"the server is busy ({config.max_queue} images waiting for the model, --max-queue)"
        else:
            reason = f"the server is busy ({config.max_uploads} uploads arriving, --max-uploads)"
        return ApiError(503, kind, reason + ": retry later", {"Retry-After": str(batcher.retry_after())})

    def check_query(request: Request) -> None:
        """A misspelt or repeated query parameter is a 400 (``?fromat=png`` answered JSON; of two ``format``s the
        last one won), as a bad value of a known one is."""
        params = request.query_params
        unknown = sorted(set(params) - set(SEGMENT_PARAMETERS))
        if unknown:
            known = ", ".join(SEGMENT_PARAMETERS)
            raise ApiError(400, "bad_request", f"unknown query parameter {unknown[0]!r} (the parameters are {known})")
        for name in SEGMENT_PARAMETERS:
            if len(given := params.getlist(name)) > 1:
                raise ApiError(400, "bad_request", f"query parameter {name} given {len(given)} times; give it once")

    @app.post(
        "/v1/segment",
        tags=["model"],
        summary="Segment one image",
        description=(
            "The image as a multipart upload (field `file`) or as the raw body (Content-Type image/* or "
            "application/octet-stream). JSON: size, the classes present (pixels, percent, colour; with "
            "probs=true their confidence, the mean top-class probability over their pixels) and `label_png`, "
            "the base64 palette PNG whose pixel values are class ids (the palette of the label maps "
            "`segformer predict` writes); with probs=true also `confidence_png`, each pixel's top-class "
            "probability as a base64 8-bit grayscale PNG (pixel value / 255). "
            "format=png returns that PNG, format=overlay a JPEG of the colours over the image. 400: not an "
            "image, truncated, empty, wrong content type, too small, an unknown or repeated parameter; 401: API key; "
            "408: the upload stalled or did not arrive in time; 413: upload or pixel count over the limit, or the "
            "image needs more memory than the device has at the server's options; 500: the forward pass failed; "
            "503 (Retry-After): queue full or too many uploads arriving; 504: no answer within the timeout."
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {"type": "object", "properties": {"file": upload_schema}, "required": ["file"]}
                    },
                    "image/*": {"schema": upload_schema},
                    "application/octet-stream": {"schema": upload_schema},
                },
            }
        },
        responses={
            200: {"content": {"application/json": {}, "image/png": {}, "image/jpeg": {}}},
            400: {"description": "bad input (one-line reason in `detail`)"},
            401: {"description": "missing or wrong API key"},
            408: {"description": "the upload stalled (--upload-idle-timeout) or did not arrive within --timeout"},
            413: {"description": "upload or image too large (for the limits, or for the device's memory)"},
            500: {"description": "the forward pass failed"},
            503: {"description": "queue full or too many uploads arriving; see Retry-After"},
            504: {"description": "timed out waiting for the model"},
        },
    )
    async def segment(
        request: Request,
        _: None = Depends(authorize),  # noqa: B008
        fmt: Literal["json", "png", "overlay"] = Query("json", alias="format", description="the answer's form"),
        probs: bool = Query(
            False, description="add each present class's confidence and the per-pixel confidence_png (JSON only)"
        ),
        alpha: float = Query(
            config.alpha, ge=0.0, le=1.0, allow_inf_nan=False, description="overlay opacity of the colours"
        ),
    ) -> Response:
        started = time.perf_counter()
        deadline = started + config.timeout
        check_query(request)
        if probs and fmt != "json":
            raise ApiError(400, "bad_request", "probs=true needs format=json")
        if "alpha" in request.query_params and fmt != "overlay":  # (it changed nothing there, without a word: audit)
            raise ApiError(400, "bad_request", "alpha sets the overlay's opacity: it needs format=overlay")
        if (refused := batcher.admit()) is not None:
            raise busy(refused)
        submitted = False
        try:
            body = await read_body(request, deadline)
            data = await image_bytes(request, body)
            del body
            image = await in_thread(decode, data)
            del data
            job = _Job(image, probs)
            submitted = True
            queued = batcher.submit(job)
        finally:
            if not submitted:
                batcher.abandon()
        if not queued:  # the queue filled up while this upload arrived
            raise busy("queue_full")
        answer_ready = asyncio.ensure_future(asyncio.wrap_future(job.future))
        client_gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait(
                (answer_ready, client_gone),
                timeout=max(deadline - time.perf_counter(), 0.001),
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:  # (this request's task cancelled: a forced stop) its image leaves the queue
            answer_ready.cancel()
            batcher.withdraw(job)
            raise
        finally:
            client_gone.cancel()
        if not answer_ready.done():
            answer_ready.cancel()
            batcher.withdraw(job)  # (out of the queue, its place free at once, unless a worker has it already)
            if client_gone.done() and not client_gone.cancelled():
                raise ApiError(499, "client_gone", "the client closed the connection before the answer")
            reason = f"no answer from the model within {config.timeout:g} s (--timeout)"
            raise ApiError(504, "timeout", reason)
        try:
            result: _Result = answer_ready.result()
        except ImageError as exc:  # (the predictor's: memory could not take this image at the server's options)
            log.warning("segformer serve: %s", exc)
            raise ApiError(413 if exc.too_large else 400, "out_of_memory" if exc.too_large else "bad_image",
                           str(exc)) from None  # fmt: skip
        except Exception as exc:  # the forward pass of this image failed (alone: see Batcher._segment)
            log.error("segformer serve: inference failed", exc_info=exc)
            raise ApiError(500, "internal", f"inference failed: {type(exc).__name__}: {first_line(exc)}") from None
        request.scope.setdefault("segformer", {})["batch_size"] = result.batch_size
        return await in_thread(answer, image, result, fmt, probs, alpha, started)

    # The schema says what the server answers: FastAPI lists 422 for invalid parameters, which this server answers
    # with 400 and a one-line `detail` (_validation_error).
    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = fastapi_openapi()  # (kept by FastAPI as app.openapi_schema: changed in place, once)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None:
                        responses.setdefault("400", {"description": "bad input (one-line reason in `detail`)"})
            models = schema.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                models.pop(unused, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _boundary(content_type: str) -> str:
    """The boundary parameter of a multipart Content-Type ("" where it has none)."""
    return next((p.split("=", 1)[1].strip().strip('"') for p in content_type.split(";")[1:]
                 if p.strip().lower().startswith("boundary=")), "")  # fmt: skip


def _cut_short(body: bytes, content_type: str) -> bool:
    """Whether a multipart ``body`` lacks its closing boundary (``--BOUNDARY--``): an upload cut short, whose
    unfinished part the parser drops without a word."""
    boundary = _boundary(content_type)
    return bool(boundary) and b"--" + boundary.encode("latin-1") + b"--" not in body


def _part_head_problem(body: bytes, content_type: str) -> str | None:
    """Which of python-multipart's limits on a part's head (header line length, header count) ``body`` breaks, or
    None: the parser reports a breach only as "Invalid multipart data"."""
    try:
        from python_multipart import multipart
    except ImportError:  # (python-multipart < 0.0.13: module "multipart", and no such limits)
        return None
    size, count = (getattr(multipart, f"DEFAULT_MAX_HEADER_{k}", None) for k in ("SIZE", "COUNT"))
    boundary = _boundary(content_type)
    if not boundary or size is None or count is None:
        return None
    for part in body.split(b"--" + boundary.encode("latin-1"))[1:]:
        lines = [line for line in part.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:] if line]
        if any(len(line) > size for line in lines):
            return f"a part's header line is over {size:,} bytes"
        if len(lines) > count:
            return f"a part has more than {count} header lines"
    return None


def _cors_middleware() -> type:
    """Starlette's CORS middleware, whose refused preflight answers in JSON as every other error here (it is
    plain text there: "Disallowed CORS origin")."""
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse

    class _JsonCors(CORSMiddleware):
        def preflight_response(self, request_headers: Any) -> Any:
            answer = super().preflight_response(request_headers)
            if answer.status_code < 400:
                return answer
            refused = answer.body.decode("utf-8", "replace").removeprefix("Disallowed CORS ")
            detail = f"CORS preflight refused: this server (--cors) does not allow the request's {refused}"
            headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-type")}
            return JSONResponse({"detail": detail}, status_code=answer.status_code, headers=headers)

    return _JsonCors


class _Observe:
    """ASGI middleware: one JSON access-log line and the request metrics per request, an X-Request-ID header and
    nosniff on every answer. A request still unanswered when a forced stop (a second Ctrl-C) ends the process is
    answered 503 in JSON, not uvicorn's plain-text 500 with a traceback."""

    ROUTES = frozenset({"/", "/v1/segment", "/v1/model", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})

    def __init__(self, app: Any, metrics: Metrics, batcher: Batcher) -> None:
        self.app, self.metrics, self.batcher = app, metrics, batcher

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        status, sent, received = 500, 0, 0

        async def receive_counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def send_observed(message: dict) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode()),
                    (b"x-content-type-options", b"nosniff"),
                ]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive_counted, send_observed)
        except asyncio.CancelledError:
            if not self.batcher.forced or status != 500 or sent:  # (500 and nothing sent: no answer started)
                raise
            body = json.dumps({"detail": "the server was stopped (a forced stop) before answering"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send_observed({"type": "http.response.start", "status": 503, "headers": headers})
            await send_observed({"type": "http.response.body", "body": body})
        finally:
            seconds = time.perf_counter() - started
            path = scope.get("path", "")
            route = path if path in self.ROUTES else "other"
            self.metrics.request(scope.get("method", ""), route, status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                extra = scope.get("segformer", {})
                record = {
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "request_id": request_id,
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "method": scope.get("method"),
                    "path": path,
                    "query": scope.get("query_string", b"").decode("latin-1")[:200],
                    "status": status,
                    "ms": round(1000 * seconds, 2),
                    "bytes_in": received,  # (what arrived: a stalled upload's Content-Length never did)
                    "bytes_out": sent,
                    **({"batch_size": extra["batch_size"]} if "batch_size" in extra else {}),
                    **({"error": extra["error"]} if "error" in extra else {}),
                }
                access_log.info(json.dumps(record))


# ----------------------------------------------------------------------------------------------- the program
def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one); IPv6 when the host is an IPv6 address or name (written
    bare or in brackets, ``::1`` or ``[::1]``)."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        name, _, tail = host.rpartition(":")
        hint = f" (give the port with --port {tail})" if tail.isdigit() and name and name.count(":") == 0 else ""
        raise ValueError(f"cannot resolve --host {host!r}: {exc.strerror}{hint}") from None
    sock = socket.socket(family, kind, proto)
    if os.name == "nt":  # (Windows' SO_REUSEADDR lets a second server take a port in use, without an error)
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_EXCLUSIVEADDRUSE", socket.SO_REUSEADDR), 1)
    else:  # (a restart binds at once, past the old connections' TIME_WAIT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _configure_logging(access: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    access_log.setLevel(logging.INFO if access else logging.WARNING)


def serve(
    predictor: SegformerPredictor,
    config: ServeConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    access_log: bool = True,
) -> None:
    """Run the server until SIGINT or SIGTERM; then stop accepting, let in-flight requests finish (at most
    ``config.timeout`` + 5 s) and return. Logs the URL once listening, then one JSON line per request (stderr).
    Port 0 picks a free port (the start-up line says which)."""
    require_serve_dependencies()
    import uvicorn

    config = config or ServeConfig()
    app = create_app(predictor, config)
    _configure_logging(access_log)
    sock = _bind(host, port)
    url = _url(sock)
    batcher: Batcher = app.state.batcher

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                log.info(
                    f"segformer serve: shutting down ({batcher.waiting} request(s) waiting, {batcher.running_images} "
                    "image(s) being run); in-flight requests finish first (Ctrl-C again forces the stop)"
                )
            elif sig == signal.SIGINT and not batcher.forced:  # uvicorn forces the stop on a second SIGINT
                batcher.forced = True  # (a flag only: a signal handler takes no lock)
                log.info("segformer serve: forced stop: requests not answered yet get 503, queued images are dropped")
            super().handle_exit(sig, frame)

    class QuietForcedStop(logging.Filter):  # uvicorn logs what a forced stop cancels with a traceback
        def filter(self, record: logging.LogRecord) -> bool:
            if not batcher.forced:
                return True
            if record.exc_info is not None:  # a request's task
                return record.exc_info[0] is not asyncio.CancelledError
            return not record.getMessage().rstrip().endswith("CancelledError")  # the lifespan's, as text

    quiet = QuietForcedStop()
    logging.getLogger("uvicorn.error").addFilter(quiet)

    server = Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            server_header=False,
            timeout_graceful_shutdown=int(math.ceil(config.timeout)) + 5,
        )
    )

    batcher.announced.clear()  # (its "ready" line waits for the URL line below)

    async def main() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            device = f"{predictor.device} {model_dtype(predictor)}"
            log.info(
                f"segformer serve: {url}/ (web page; API docs {url}/docs) serving {predictor.model_name} "
                f"({variant_of(predictor.config)}, {predictor.num_classes} classes, {predictor.options.mode}) on "
                f"{device}; {'API key required' if config.api_key else 'open: no API key'}; pid {os.getpid()}; "
                "Ctrl-C stops"
            )
        batcher.announced.set()
        await task

    # uvicorn re-raises the signal that stopped it once it is done; handled here, a stop is a normal exit.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        logging.getLogger("uvicorn.error").removeFilter(quiet)
    log.info(f"segformer serve: stopped after {batcher.metrics.images} image(s)")


def model_dtype(predictor: SegformerPredictor) -> str:
    """The dtype the model computes in: its parameters', or "int8" with dynamically quantised layers."""
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in predictor.model.modules()):
        return "int8"
    if hasattr(predictor.model, "weights_dtype"):  # (an onnxruntime session: the graph's weights)
        return predictor.model.weights_dtype
    return str(next(predictor.model.parameters()).dtype).removeprefix("torch.")


__all__ = ["ApiError", "Batcher", "Metrics", "ServeConfig", "create_app", "require_serve_dependencies", "serve"]
