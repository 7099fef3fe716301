"""End to end: segmenting photos as a user would, with this package and with what they would otherwise use.

Each workflow takes an encoded JPEG and returns a label map at the photo's own size, decoding included:

  transformers   the docs page's recipe with Transformers' classes: the image processor (resize to the data set's
                 square size, rescale, normalise) → the model → ``post_process_semantic_segmentation`` with the
                 photo's size as ``target_sizes``
  onnxruntime    the same recipe with the model run by onnxruntime on our ONNX export (as optimum's
                 ``ORTModelForSemanticSegmentation`` does), Transformers' processor and post-processing around it
  segformer      the same recipe with this package's classes (the same calls: a drop-in replacement)
  ort+ours       onnxruntime with this package's processor and post-processing around it: the runtimes alone
                 compared, the same code around both
  predictor      ``SegformerPredictor(model).predict(jpeg_bytes)`` with its defaults: the aligned ADE20K protocol
                 (short side 512, ratio kept), so other work and other labels; shown for scale only

Every workflow runs on every image in turn, round after round (interleaved, so that a change of machine load hits
all alike); the time per image is the median over rounds of each round's mean. Agreement: the pixels whose label
differs from Transformers', per million (same random weights; only near-ties can differ). Two data sets of synthetic
photos (speed does not depend on the content):

  ade          ADE20K's typical photo sizes (683x512, 512x683, 640x480, 500x375, 512x512), 150 classes, 512x512
  cityscapes   2048x1024 street scenes, 19 classes, 1024x1024 (the Cityscapes checkpoints' processor size)

    .venv/bin/python bench/bench_e2e.py
    .venv/bin/python bench/bench_e2e.py --variant b2 --datasets ade --rounds 3
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import build_pair, cpu_capability, ort_session  # noqa: E402

from segformer import SegformerImageProcessor  # noqa: E402
from segformer.allocator import tune_allocator  # noqa: E402
from segformer.predict import SegformerPredictor  # noqa: E402

DATASETS = {  # name: (photo sizes as (width, height), classes, the processor's square size)
    "ade": ([(683, 512), (512, 683), (640, 480), (500, 375), (512, 512)], 150, 512),
    "cityscapes": ([(2048, 1024), (2048, 1024)], 19, 1024),
}
WORKFLOWS = ("transformers", "onnxruntime", "segformer", "ort+ours", "predictor")
# the table: a column per workflow (ms per photo), Transformers' / onnxruntime's / ort+ours' time over ours, the
# pixels whose label differs from Transformers', per million, for ours and for onnxruntime
HEADERS = ("data set", *WORKFLOWS, "T / ours", "ort / ours", "ort+ours / ours", "differ ppm (ours)", "(ort)")
VALUE_WIDTH = 9  # the widest value a number column holds: "1000000.0" (every pixel differs); ms up to 999999.9


def synthetic_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: smooth colour regions from a coarse random field, plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((height // 32 + 2, width // 32 + 2, 3)) * 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    noisy = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def decode(jpeg: bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def transformers_processor(size: int):
    """Transformers' image processor as ``from_pretrained`` on an ADE20K / Cityscapes checkpoint builds it (its
    PIL class where torchvision is missing, which is what the default class falls back to, without the warning)."""
    import transformers

    cls = getattr(transformers, "SegformerImageProcessorPil", None) or transformers.SegformerImageProcessor
    return cls(size={"height": size, "width": size})


def workflows(variant: str, classes: int, size: int, workdir: str) -> dict[str, Callable[[bytes], np.ndarray]]:
    """The workflows on one set of random weights: jpeg bytes → (H, W) labels as numpy."""
    theirs, ours = build_pair(variant, torch.device("cpu"), num_labels=classes)
    their_processor, our_processor = (
        transformers_processor(size),
        SegformerImageProcessor(size={"height": size, "width": size}),
    )
    session = ort_session(ours, size, size, workdir)
    predictor = SegformerPredictor(ours, device="cpu")

    class Logits:  # what post_process_semantic_segmentation reads from a model's output
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    def recipe(processor, model) -> Callable[[bytes], np.ndarray]:
        def run(jpeg: bytes) -> np.ndarray:
            image = decode(jpeg)
            inputs = processor(images=image, return_tensors="pt")
            with torch.inference_mode():
                outputs = model(pixel_values=inputs["pixel_values"])
            return processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy()

        return run

    def onnxruntime(processor) -> Callable[[bytes], np.ndarray]:
        def run(jpeg: bytes) -> np.ndarray:
            image = decode(jpeg)
            pixels = processor(images=image, return_tensors="np")["pixel_values"]
            (logits,) = session.run(["logits"], {"pixel_values": pixels})
            outputs = Logits(torch.from_numpy(logits))
            return processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy()

        return run

    return {
        "transformers": recipe(their_processor, theirs),
        "onnxruntime": onnxruntime(their_processor),
        "segformer": recipe(our_processor, ours),
        "ort+ours": onnxruntime(our_processor),
        "predictor": lambda jpeg: predictor.predict(jpeg).labels,
    }


def run_dataset(name: str, variant: str, rounds: int, workdir: str) -> dict:
    sizes, classes, size = DATASETS[name]
    photos = [synthetic_jpeg(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    runs = workflows(variant, classes, size, workdir)
    for run in runs.values():  # warm-up: allocator, oneDNN / MLAS kernels, the folded-head cache, the export
        run(photos[0])
    per_round: dict[str, list[float]] = {k: [] for k in runs}
    agree: dict[str, list[float]] = {"segformer": [], "onnxruntime": []}  # against Transformers' labels
    for r in range(rounds):
        totals = dict.fromkeys(runs, 0.0)
        for photo in photos:
            labels = {}
            for key, run in runs.items():
                start = time.perf_counter()
                labels[key] = run(photo)
                totals[key] += time.perf_counter() - start
            if r == 0:
                for key in agree:
                    agree[key].append(float((labels[key] == labels["transformers"]).mean()))
        for key, total in totals.items():
            per_round[key].append(total / len(photos))
    return {
        "name": name,
        "photos": len(photos),
        "classes": classes,
        "size": size,
        "times": {k: statistics.median(v) for k, v in per_round.items()},
        "agree": {k: float(np.mean(v)) for k, v in agree.items()},
    }


def dataset_label(name: str) -> str:
    """The table's first cell for a data set, e.g. ``cityscapes (2 photos, 19 cl, 1024²)``."""
    sizes, classes, size = DATASETS[name]
    return f"{name} ({len(sizes)} photos, {classes} cl, {size}²)"


def table_widths(labels: list[str]) -> list[int]:
    """Column widths that fit every row the table can hold: the first as wide as its longest label (or header),
    each other one its header or ``VALUE_WIDTH`` characters, whichever is wider, plus a gap of two."""
    return [max(len(HEADERS[0]), *map(len, labels))] + [max(len(h), VALUE_WIDTH) + 2 for h in HEADERS[1:]]


def table_line(cells: list[str], widths: list[int]) -> str:
    """One line of the table: the first cell left-aligned, the others right-aligned, in ``widths``."""
    return cells[0].ljust(widths[0]) + "".join(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))


def result_cells(row: dict) -> list[str]:
    """A ``run_dataset`` result as the table's cells, in the order of ``HEADERS``."""
    t, agree = row["times"], row["agree"]
    return [
        dataset_label(row["name"]),
        *(f"{1e3 * t[k]:.1f}" for k in WORKFLOWS),
        *(f"{t[k] / t['segformer']:.2f}x" for k in ("transformers", "onnxruntime", "ort+ours")),
        *(f"{1e6 * (1 - agree[k]):.1f}" for k in ("segformer", "onnxruntime")),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument("--variant", default="b0", help="b0..b5, random weights (default b0)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime
    import transformers

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, "
          f"onnxruntime {onnxruntime.__version__}")  # fmt: skip
    print(f"# cpu capability {cpu_capability()}; "
          f"{args.variant}, random weights, {args.rounds} interleaved rounds, "
          "ms per photo (median of rounds)")  # fmt: skip
    widths = table_widths([dataset_label(name) for name in args.datasets])
    print(table_line(list(HEADERS), widths))
    with tempfile.TemporaryDirectory() as workdir, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export and tracing notices
        for name in args.datasets:
            row = run_dataset(name, args.variant, args.rounds, workdir)
            print(table_line(result_cells(row), widths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
