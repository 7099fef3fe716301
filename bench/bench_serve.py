"""`segformer serve` under load: throughput and p50/p99 latency at concurrency 1, 4 and 16, next to the predictor's
own single-stream throughput on the same image, in the same protocol.

    .venv/bin/python bench/bench_serve.py                        # random b0, 150 classes, a 512×512 JPEG
    .venv/bin/python bench/bench_serve.py --model runs/x/best --size 640 --threads 1

The server is a real `segformer serve` process on 127.0.0.1 (a free port) with its defaults (--max-batch 8,
--max-wait-ms 5); clients are keep-alive HTTP connections, one per concurrent stream, posting the JPEG as the raw
body and reading the JSON answer (label PNG included); at concurrency 4 and 16 they send --requests uploads in all
(48 by default; at least 16, so that every client sends one: a smaller number is refused). The predictor runs in
this process, with the allocator settings the server's process has, ``SegformerPredictor.predict(jpeg_bytes)``:
decoding, preprocessing, the forward pass and the labels. Overhead at concurrency 1 = predictor throughput /
server throughput - 1: HTTP, the PNG encoding of the answer, the queue.
The predictor and the server at concurrency 1 are timed in alternating rounds, so that a change of machine load
hits both alike. Random weights: speed does not depend on them. On a machine that other jobs load, use --threads 1
(two-thread OpenMP runs swing with the load, which turns the comparison into noise).

Measured 2026-11-30 (2-core machine shared with other jobs, --threads 1, 4 rounds): predictor 1.46 img/s (p50
673 ms); server 1.40 img/s at concurrency 1 (p50 690 ms, overhead +4.4 %), 1.46 at 4 (p50 2.74 s), 1.41 at 16
(p50 11.1 s, p99 11.9 s). With 2 threads: predictor 1.95, server 1.93 at concurrency 1 (+1.0 %).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT))  # this checkout, not an installed copy (the server process too: below)

from segformer import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402
from segformer.commands import positive_int  # noqa: E402
from segformer.labels import ADE20K_CLASSES  # noqa: E402
from segformer.predict import SegformerPredictor  # noqa: E402


def photo_like(size: int) -> bytes:
    """A smooth picture with some texture, as a JPEG (quality 90)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * xx) * 90 + 128, np.cos(5 * yy) * 90 + 128, (xx + yy) * 100 + 20], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def start_server(model: str, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    path = os.pathsep.join([str(CHECKOUT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
    # --timeout: a loaded machine must not turn slow answers into 504s; everything else is the default
    cmd = [sys.executable, "-m", "segformer", "serve", model, "--port", "0", "--no-access-log", "--timeout", "3600",
           *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    said = []  # what the server printed before its URL: its error, if it does not start
    for line in proc.stderr:
        said.append(line.rstrip())
        found = re.search(r"segformer serve: (http://\S+?)/ ", line)
        if found:
            url = found.group(1)
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe empty
            deadline = time.monotonic() + 600
            while httpx.get(url + "/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not become ready")
                time.sleep(0.1)
            return proc, url
    last = next((line for line in reversed(said) if line.strip()), "no output")
    raise RuntimeError(f"the server did not start (exit code {proc.wait()}): {last}")


def hammer(url: str, data: bytes, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Send ``requests`` uploads from ``concurrency`` keep-alive clients: (wall seconds, latencies in seconds)."""
    local = threading.local()

    def one(_: int) -> float:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=600)
        t0 = time.perf_counter()
        r = local.http.post(url + "/v1/segment", content=data, headers={"Content-Type": "image/jpeg"})
        took = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")
        return took

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # connect and warm every client
        t0 = time.perf_counter()
        latencies = list(pool.map(one, range(requests)))
        return time.perf_counter() - t0, latencies


CONCURRENCY = (4, 16)  # the levels measured after concurrency 1; --requests must give every client a request


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: a random b0 with ADE20K's 150 classes)")
    parser.add_argument("--variant", default="b0", help="variant of the random model (b0)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (512)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="alternating predictor / server rounds (3)")
    parser.add_argument("--per-round", type=positive_int, default=8, help="images per round at concurrency 1 (8)")
    parser.add_argument(
        "--requests", type=int, default=48, help=f"requests at concurrency 4 and 16, at least {max(CONCURRENCY)} (48)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, each side")
    parser.add_argument("--serve-args", default="", help="more `segformer serve` options, one string")
    args = parser.parse_args()
    if args.requests < max(CONCURRENCY):
        parser.error(f"--requests must be at least {max(CONCURRENCY)} (the highest concurrency), got {args.requests}")
    torch.set_num_threads(args.threads)
    try:  # the malloc settings every `segformer` command starts with, the server included: both sides alike
        from segformer.allocator import tune_allocator

        tune_allocator()
    except ImportError:  # a version without them
        pass

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            torch.manual_seed(0)
            config = SegformerConfig.from_variant(args.variant, id2label=dict(enumerate(ADE20K_CLASSES)))
            model = str(Path(tmp) / args.variant)
            SegformerForSemanticSegmentation(config).save_pretrained(model)
        data = photo_like(args.size)
        predictor = SegformerPredictor(model, device="cpu")
        proc, url = start_server(model, args.threads, ["--device", "cpu", *args.serve_args.split()])
        try:
            for _ in range(2):
                predictor.predict(data)
            own: list[float] = []
            served: list[float] = []
            one_stream: list[float] = []
            for _ in range(args.rounds):
                for _ in range(args.per_round):
                    t0 = time.perf_counter()
                    predictor.predict(data)
                    own.append(time.perf_counter() - t0)
                wall, latencies = hammer(url, data, args.per_round, 1)
                served.append(wall)
                one_stream += latencies
            results = {1: (sum(served), one_stream)}
            for c in CONCURRENCY:
                results[c] = hammer(url, data, args.requests, c)
        finally:
            proc.terminate()
            proc.wait(60)

    own_rate = len(own) / sum(own)
    mode = predictor.options.mode
    print(
        f"segformer serve: {Path(model).name if args.model else 'random ' + args.variant} "
        f"({predictor.num_classes} classes), {args.size}x{args.size} JPEG, {mode}, cpu float32, "
        f"{args.threads} thread(s) each side, server "
        f"{'options: ' + args.serve_args if args.serve_args.strip() else 'defaults (max-batch 8, max-wait-ms 5)'}"
    )
    print(f"{'':>22} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    print(
        f"{'predictor, 1 stream':>22} {own_rate:8.2f} {1000 * statistics.median(own):8.1f} "
        f"{1000 * percentile(own, 99):8.1f}"
    )
    for c, (wall, latencies) in results.items():
        rate = len(latencies) / wall
        note = f"   overhead vs predictor: {100 * (own_rate / rate - 1):+.1f} %" if c == 1 else ""
        print(
            f"{f'server, concurrency {c}':>22} {rate:8.2f} {1000 * percentile(latencies, 50):8.1f} "
            f"{1000 * percentile(latencies, 99):8.1f}{note}"
        )


if __name__ == "__main__":
    main()
