"""Multi-scale + flip labels (the paper's "MS" evaluation): this package against the loop a user writes.

Both take a normalised image batch and return its label map at the image's size, the same passes over the same
model (each scale of the aligned ADE20K protocol, each also flipped):

  plain       what mmsegmentation's test-time augmentation does and what a user writes: for each pass, resize the
              image, run the model, flip the logits back, resize them to the image's size, softmax, add; argmax
  segformer   ``predict_labels(model, x, InferenceOptions(mode="aligned", scales=..., flip=True))``

The model: a SegFormer (random weights) whose logits also get a region term, +4 for the class coded in the input's
first channel (the synthetic photos are 8-15 regions of one class each, like a trained model's output), so that
the logits are shaped like a trained model's: regions of one leading class with borders. Random logits alone would
change class from pixel to pixel, which no trained model does; they are the "random" data set, for scale. The
times include the forwards (12 passes at scales 0.5-1.75), the same in both.

Interleaved rounds, the median of each workflow's per-round time; "differ ppm": labels differing from the plain
loop's, per million pixels (this package composes each pass's two resizes into one matrix per axis, which rounds
differently; only near-ties can differ); "agreed": the share of pixels where every pass ranked one class first at
every tap, which take that class without a softmax.

  ade          150 classes, photos of 512x683 and 384x512 (ADE20K's sizes), region-shaped logits
  ade-random   the same without the region term (nothing agrees: the plain arithmetic everywhere)

    .venv/bin/python bench/bench_multiscale.py
    .venv/bin/python bench/bench_multiscale.py --variant b2 --rounds 2 --datasets ade
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_inference import cpu_capability  # noqa: E402  (this folder: the script's own)

from segformer import VARIANTS, SegformerConfig, SegformerForSemanticSegmentation, inference  # noqa: E402
from segformer.allocator import tune_allocator  # noqa: E402
from segformer.commands import positive_int  # noqa: E402
from segformer.inference import InferenceOptions, aligned_size, predict_labels  # noqa: E402

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
DATASETS = {"ade": (True, [(512, 683), (384, 512)]), "ade-random": (False, [(512, 683)])}  # regions?, (H, W)


class RegionLogits(nn.Module):
    """A SegFormer whose logits get +4 for the class the input's first channel codes as (c + 0.5)/K, averaged over
    each logit's 4x4 input pixels (ceil): regions of one leading class, as a trained model gives."""

    def __init__(self, model: SegformerForSemanticSegmentation, regions: bool) -> None:
        super().__init__()
        self.model, self.config, self.regions = model, model.config, regions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).logits
        if not self.regions:
            return logits
        k = self.config.num_labels
        code = F.avg_pool2d(x[:, :1], 4, ceil_mode=True)[:, 0]
        lead = F.one_hot((code * k).floor().clamp(0, k - 1).long(), k).permute(0, 3, 1, 2)
        return (logits + 4.0 * lead).contiguous()


def region_image(height: int, width: int, k: int, seed: int) -> torch.Tensor:
    """(1, 3, H, W): 8-15 regions (nearest of random centres), each a random class coded in channel 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, height, width, generator=gen) * 0.5
    n = int(torch.randint(8, 16, (1,), generator=gen))
    centres = torch.rand(n, 2, generator=gen) * torch.tensor([height, width])
    classes = torch.randint(0, k, (n,), generator=gen)
    yy, xx = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    nearest = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2).argmin(0)
    x[0, 0] = (classes[nearest].float() + 0.5) / k
    return x


def plain_labels(model: nn.Module, x: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """The loop a user writes (mmsegmentation's aug_test): every pass to the image's size, softmax, sum, argmax."""
    height, width = x.shape[-2:]
    total = None
    for scale in scales:
        size = aligned_size(height, width, short_side=round(512 * scale), long_side=round(2048 * scale))
        scaled = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            logits = model(scaled.flip(-1) if flip else scaled)
            logits = logits.flip(-1) if flip else logits
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # the pass's input
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            total = probs if total is None else total.add_(probs)
    assert total is not None
    return total.argmax(1)


def agreed_share(model: nn.Module, x: torch.Tensor, options: InferenceOptions) -> float:
    """The share of pixels whose labels predict_labels takes from every pass's agreement."""
    passes = list(inference._passes(model, x, options))
    found = inference._agreed_pass_labels(passes, 0, tuple(x.shape[-2:]))
    return 0.0 if found is None else (found[0] >= 0).float().mean().item()


def run(variant: str, dataset: str, rounds: int) -> list[tuple[str, dict[str, float], float, float]]:
    regions, sizes = DATASETS[dataset]
    torch.manual_seed(0)
    net = SegformerForSemanticSegmentation(SegformerConfig.from_variant(variant, num_labels=150)).eval()
    model = RegionLogits(net, regions).eval()
    options = InferenceOptions(mode="aligned", scales=SCALES, flip=True)
    rows = []
    for n, (height, width) in enumerate(sizes):
        x = region_image(height, width, 150, seed=n)
        with torch.inference_mode():
            plain, ours = plain_labels(model, x, SCALES), predict_labels(model, x, options)  # (warm-up too)
            differ = (plain != ours).sum().item() / plain.numel() * 1e6
            agreed = agreed_share(model, x, options)
            times: dict[str, list[float]] = {"plain": [], "segformer": []}
            for _ in range(rounds):
                for name in times:
                    start = time.perf_counter()
                    plain_labels(model, x, SCALES) if name == "plain" else predict_labels(model, x, options)
                    times[name].append(time.perf_counter() - start)
        rows.append(
            (f"{dataset} {height}x{width}", {k: statistics.median(v) for k, v in times.items()}, differ, agreed)
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="b0", choices=list(VARIANTS), help="model variant (default b0)")
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS), help="photo sets (default: all)"
    )
    parser.add_argument("--rounds", type=positive_int, default=3, help="timed rounds per photo (default 3)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2, both sides)")
    args = parser.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, cpu capability {cpu_capability()}")  # fmt: skip
    print(f"# {args.variant}, 150 classes, aligned, scales {'-'.join(map(str, SCALES))} + flip; {args.rounds} "
          "interleaved rounds, seconds per image (median)")  # fmt: skip
    print(f"{'case':<22}{'plain':>10}{'segformer':>11}{'plain / ours':>14}{'differ ppm':>12}{'agreed':>8}")
    for dataset in args.datasets:
        for case, t, differ, agreed in run(args.variant, dataset, args.rounds):
            print(f"{case:<22}{t['plain']:>10.2f}{t['segformer']:>11.2f}{t['plain'] / t['segformer']:>13.2f}x"
                  f"{differ:>12.1f}{agreed:>8.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
