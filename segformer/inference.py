"""Prediction over whole images: whole, aligned (ADE20K), sliding-window (Cityscapes), multi-scale + flip.

Every mode ends the same way, as in mmseg's test-time code: the logits of one pass are brought to that pass's
input size (bilinear, align_corners=False), then resized to the output size, then turned into probabilities;
the probabilities of all passes (scales × flips) are averaged. Logits are cast to float32 before any of this,
so a bf16 or fp16 model gives float32 probabilities.

>>> probs = infer(model, pixel_values, mode="slide", crop_size=(1024, 1024), stride=(768, 768))  # (B, K, H, W)
>>> labels = predict_labels(model, pixel_values, mode="aligned", scales=[0.75, 1.0, 1.25], flip=True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("whole", "aligned", "slide")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers (inference needs no gradient sync)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) → float32 logits (B, K, h, w), upsampled from the model's 1/4 resolution."""
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out[0]  # return_dict=False models give tuples
    logits = logits.float()
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _min_side(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is None:
        return 1
    from .modeling import min_input_size

    return min_input_size(config)


def _whole(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of the image as is; images below the model's minimum size are padded (bottom/right) and the
    padding cropped away, as the sliding window does for small images."""
    h, w = x.shape[-2:]
    need = _min_side(model)
    if h >= need and w >= need:
        return _forward_logits(model, x)
    padded = F.pad(x, (0, max(need - w, 0), 0, max(need - h, 0)))  # 0 = the mean colour after normalising
    return _forward_logits(model, padded)[..., :h, :w]


def _slide(model: nn.Module, x: torch.Tensor, crop_size: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Sliding-window logits (B, K, H, W): windows of crop_size at stride (the last row/column of windows is
    shifted back to end at the border), logits summed and divided by the number of windows per pixel."""
    ch, cw = crop_size
    sh, sw = stride
    h, w = x.shape[-2:]
    # Pad images smaller than the crop so that every window has the crop's size; crop the padding away below.
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    H, W = x.shape[-2:]
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, H, W), device=x.device, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, H), min(c * sw + cw, W)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits = _forward_logits(model, x[:, :, y1:y2, x1:x2])  # (B, K, ch, cw)
            if total is None:
                total = x.new_zeros((x.shape[0], logits.shape[1], H, W), dtype=torch.float32)
            total[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    assert total is not None
    return (total / count)[:, :, :h, :w]


def aligned_size(
    height: int, width: int, *, short_side: int = 512, long_side: int = 2048, align: int = 32
) -> tuple[int, int]:
    """mmseg's ADE20K test resize: scale keeping the ratio so that the image fits (long_side, short_side),
    i.e. long side ≤ long_side and short side ≤ short_side with one of them equal, then round each side up to
    a multiple of ``align``. Returns (height, width)."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    h, w = int(height * scale + 0.5), int(width * scale + 0.5)
    return math.ceil(h / align) * align, math.ceil(w / align) * align


def _check_pair(value: Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be two positive integers (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


@torch.no_grad()
def infer(
    model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    mode: str = "whole",
    crop_size: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    short_side: int = 512,
    long_side: int = 2048,
    align: int = 32,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    output_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Class probabilities for a batch of normalised images.

    pixel_values: (B, 3, H, W) float, normalised (ImageNet mean/std). Returns float32 (B, K, H_out, W_out) at
    ``output_size`` (default (H, W)): softmax over the K classes, or sigmoid when K == 1.

    Modes: ``"whole"`` runs the tensor as is; ``"aligned"`` first resizes it keeping the ratio to fit
    (long_side, short_side) and rounds each side up to a multiple of ``align`` (mmseg's ADE20K test pipeline);
    ``"slide"`` runs ``crop_size`` windows at ``stride``, sums the logits and divides by the per-pixel window
    count (images smaller than the crop are padded and the padding cropped away). ``scales`` (e.g.
    [0.75, 1.0, 1.25]) multiply the image size ("aligned": the (long_side, short_side) target) and ``flip``
    adds a horizontally flipped pass of each scale; the probabilities of all passes are averaged.

    Runs under torch.no_grad with the model in eval mode (its previous mode is restored), on the model's device
    and dtype; the logits are cast to float32 before resizing and softmax.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a (batch, 3, height, width) tensor, got {shape}")
    crop_size, stride = _check_pair(crop_size, "crop_size"), _check_pair(stride, "stride")
    if stride[0] > crop_size[0] or stride[1] > crop_size[1]:
        raise ValueError(f"stride {stride} is larger than crop_size {crop_size}: some pixels would be skipped")
    scales = [1.0] if scales is None or len(scales) == 0 else [float(s) for s in scales]
    if min(scales) <= 0:
        raise ValueError(f"scales must be positive, got {scales}")
    H, W = pixel_values.shape[-2:]
    out_h, out_w = _check_pair(output_size, "output_size") if output_size is not None else (H, W)

    net = _unwrap(model)
    was_training = net.training
    net.eval()
    try:
        param = next(net.parameters(), None)
        x = pixel_values
        if param is not None:
            x = x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else x.dtype)
        probs: torch.Tensor | None = None
        passes = 0
        for scale in scales:
            if mode == "aligned":
                size = aligned_size(
                    H,
                    W,
                    short_side=round(short_side * scale),
                    long_side=round(long_side * scale),
                    align=align,
                )
            else:
                size = (max(round(H * scale), 1), max(round(W * scale), 1))
            scaled = x if size == (H, W) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True) if flip else (False,):
                inp = scaled.flip(-1) if flipped else scaled
                logits = _slide(net, inp, crop_size, stride) if mode == "slide" else _whole(net, inp)
                if flipped:
                    logits = logits.flip(-1)
                if logits.shape[-2:] != (out_h, out_w):
                    logits = F.interpolate(logits, size=(out_h, out_w), mode="bilinear", align_corners=False)
                p = logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=1)
                probs = p if probs is None else probs.add_(p)
                passes += 1
        assert probs is not None
        return probs / passes if passes > 1 else probs
    finally:
        net.train(was_training)


def predict_labels(model: nn.Module, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """(B, H_out, W_out) int64 class ids: ``infer(model, pixel_values, **kwargs).argmax(1)``; for a one-label
    (binary) model, probability > 0.5. Takes the keyword arguments of :func:`infer`."""
    probs = infer(model, pixel_values, **kwargs)
    if probs.shape[1] == 1:
        return (probs[:, 0] > 0.5).long()
    return probs.argmax(dim=1)


__all__ = ["MODES", "aligned_size", "infer", "predict_labels"]
