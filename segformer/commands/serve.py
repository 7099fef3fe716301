"""``segformer serve``: an HTTP API and a web page over a model (needs ``pip install "segformer[serve]"``).

segformer serve ./my-checkpoint
segformer serve ./my-checkpoint --host 0.0.0.0 --port 8080 --api-key "$KEY" --max-batch 16
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading

from . import (
    add_backend_arguments,
    add_inference_arguments,
    add_model_arguments,
    backend_arguments,
    inference_options_from_args,
    model_argument,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
)

# segformer.serve.DEFAULT_MAX_PIXELS (a test checks): importing it here would load torch for --help.
DEFAULT_MAX_PIXELS = 40_000_000
API_KEY_ENV = "SEGFORMER_API_KEY"


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP API and web page: POST an image, get its label map (pip install 'segformer[serve]')",
        description=(
            "Serve a model over HTTP. POST /v1/segment takes an image (multipart field 'file' or the raw body) "
            "and answers JSON (classes present with pixels and percent, the label map as a base64 palette PNG), "
            "the label PNG (?format=png) or a JPEG overlay (?format=overlay); ?probs=true adds each class's "
            "confidence. GET /v1/model, /healthz, /readyz, /metrics (Prometheus); the web page is at / and the "
            "API documentation at /docs. Concurrent requests are batched by the inference worker (--workers for "
            "more); a full queue answers 503, a request that waits past --timeout 504, oversized uploads and images "
            "413, bad ones 400 with a one-line reason. SIGINT/SIGTERM stop the server after the requests in flight "
            "(a second Ctrl-C forces it). Needs FastAPI, uvicorn and python-multipart: pip install "
            "'segformer[serve]'."
        ),
        epilog=(
            "examples:\n"
            "  segformer serve ./my-checkpoint                       # http://127.0.0.1:8000/\n"
            "  curl -F file=@photo.jpg http://127.0.0.1:8000/v1/segment\n"
            "  curl -H 'Content-Type: image/jpeg' --data-binary @photo.jpg \\\n"
            "      'http://127.0.0.1:8000/v1/segment?format=png' -o photo.png\n"
            f"  {API_KEY_ENV}=secret segformer serve ./my-checkpoint --host 0.0.0.0 --cors https://example.org"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(
        p, "checkpoint directory (save_pretrained, segformer train), hub id, or an ONNX file segformer export wrote"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: all)"
    )
    p.add_argument("--port", type=port_number, default=8000, help="port (8000; 0 picks a free one)")
    add_inference_arguments(
        p,
        one_word_sizes=True,
        protocol="the checkpoint's own protocol (inference_config.json, written by segformer train), else aligned",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, else MPS, else CPU; the CPU for an ONNX file, --backend onnxruntime or --dtype int8), cpu, "
        "cuda, cuda:N, mps",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16", "int8"),
        default="float32",
        help="model dtype, as segformer predict's: float32 (default); float16 / bfloat16 where the device computes "
        "in them and they pay (float16 not on a CPU; else float32, said in one line); int8 (CPU): the encoder's "
        "linear layers dynamically quantised. An ONNX file runs in the precision it was exported in",
    )
    add_backend_arguments(p)  # --backend pytorch|onnxruntime, --compile, as segformer predict
    p.add_argument("--max-batch", type=positive_int, default=8, help="images per batch of the worker (8)")
    p.add_argument(
        "--max-wait-ms",
        type=_non_negative_float,
        default=5.0,
        help="how long a batch waits for requests already arriving (5; a lone request never waits)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=32,
        help="decoded images waiting for the model; a request that finds the queue full gets 503 (32)",
    )
    p.add_argument(
        "--max-uploads",
        type=positive_int,
        default=64,
        help="requests being received and decoded at once, each up to --max-upload-mb; more get 503. An upload "
        "holds no --max-queue place while it arrives (64)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        help="seconds from a request's arrival to the model's answer, else 504 (408 while its upload is still "
        "arriving) (30)",
    )
    p.add_argument(
        "--upload-idle-timeout",
        type=positive_float,
        default=10.0,
        help="seconds an upload may send nothing before it gets 408 and frees its upload place (10)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="inference threads running forward passes at the same time on the device (1)",
    )
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="larger uploads get 413 (20)")
    p.add_argument(
        "--max-pixels",
        type=non_negative_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"larger images get 413 (decompression bombs); 0 = no limit ({DEFAULT_MAX_PIXELS:,})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on the /v1 routes (default: ${API_KEY_ENV}, else open)",
    )
    p.add_argument(
        "--cors",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from ORIGIN to call the API (repeatable; default: CORS off)",
    )
    p.add_argument("--no-access-log", action="store_true", help="no JSON access-log line per request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from segformer.predict import SegformerPredictor
    from segformer.serve import ServeConfig, require_serve_dependencies, serve

    require_serve_dependencies()  # before the model is loaded
    if args.api_key is not None and not args.api_key.strip():
        given = f"${API_KEY_ENV}" if args.api_key == os.environ.get(API_KEY_ENV) else "--api-key"
        raise ValueError(f"{given} is empty: give a key, or leave it out for an open server")
    backend = backend_arguments(args)
    args.model = model_argument(args)
    config = ServeConfig(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_uploads=args.max_uploads,
        timeout=args.timeout,
        upload_idle_timeout=args.upload_idle_timeout,
        workers=args.workers,
        max_upload_bytes=max(1, int(args.max_upload_mb * 2**20)),
        api_key=args.api_key,
        cors_origins=tuple(args.cors),
    )
    # A checkpoint that cannot be found raises CheckpointError (a ValueError): one line, exit code 2.
    predictor = SegformerPredictor(
        args.model,
        device=None if args.device == "auto" else args.device,
        dtype=args.dtype,
        options=inference_options_from_args(args, base=SegformerPredictor.stored_options(args.model)),
        batch_size=args.max_batch,
        max_pixels=args.max_pixels or None,
        **backend,
    )
    serve(predictor, config, host=args.host, port=args.port, access_log=not args.no_access_log)
    if any(t.name.startswith("segformer-inference-") and t.is_alive() for t in threading.enumerate()):
        # An inference thread still busy after the stop's wait (a --compile warm-up compiling): the interpreter's
        # exit would tear its modules down under it (audit: "terminate called without an active exception",
        # SIGABRT, after a Ctrl-C during a b3 warm-up). The server is done; the process ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
