"""The fp32 rounding-error model: how far two correct fp32 evaluations of a model may differ.

:func:`reduction_lengths` lists the length of every rounded reduction a pass runs in series and
:func:`fp32_tolerance` turns them into a bound relative to the largest output. ONNX export's verification
(:func:`segformer.export.export_onnx`) takes its default tolerance from it, and every numerical tolerance of the
test suite is derived from it (never tuned on one CPU: it holds for every kernel family, AVX-512, AVX2 and the
portable kernels alike). Its known limit: a LayerNorm whose input has a mean far above its spread (thousands of
times) loses digits to the centring, in every implementation, beyond what the model counts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .modeling import SegformerEfficientSelfAttention

U32 = 2.0**-24  # fp32 unit roundoff: one rounding moves a value by at most this fraction of it


def reduction_lengths(model: nn.Module, *args: torch.Tensor, backward: bool = False) -> list[int]:
    """The length of every rounded reduction a forward pass of ``model`` runs in series (and, with ``backward``,
    the ones its backward pass adds): each Linear, Conv2d and LayerNorm call, a training BatchNorm's batch
    statistics, and each attention's three (query·key scores, the softmax's sum, probabilities·values)."""
    lengths, hooks = [], []

    def linear(module, inputs, _):
        rows = inputs[0].numel() // module.in_features
        lengths.append(module.in_features)
        if backward:  # the input's gradient sums over outputs, the weight's over rows
            lengths.extend([module.out_features, rows])

    def conv(module, _, output):
        window = module.kernel_size[0] * module.kernel_size[1]
        lengths.append(module.in_channels // module.groups * window)
        if backward:
            lengths.extend([module.out_channels // module.groups * window, output.numel() // module.out_channels])

    def layer_norm(module, inputs, _):
        k = math.prod(module.normalized_shape)
        lengths.append(k)
        if backward:  # two row sums of the gradient, and the affine parameters' sums over rows
            lengths.extend([k, inputs[0].numel() // k])

    def batch_norm(module, inputs, _):
        if module.training:  # in eval mode a per-channel affine map (no reduction)
            rows = inputs[0].numel() // module.num_features
            lengths.extend([rows, rows, rows] if backward else [rows])

    def attention(module, args, _):
        x, height, width = args[:3]
        r, n = module.sr_ratio, x.shape[-2]
        keys = n if r == 1 else (height // r) * (width // r)
        lengths.extend([module.head_dim, keys, keys])
        if backward:  # dV = Pᵀ·dO, dP = dO·Vᵀ, the softmax's row sums, dQ = dS·K, dK = dSᵀ·Q
            lengths.extend([n, module.head_dim, keys, keys, n])

    for module in model.modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear))
        elif isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.LayerNorm):
            hooks.append(module.register_forward_hook(layer_norm))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            hooks.append(module.register_forward_hook(batch_norm))
        elif isinstance(module, SegformerEfficientSelfAttention):
            hooks.append(module.register_forward_hook(attention))
    fast = getattr(model, "fast_path", None)
    moving = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    statistics = [(buffer, buffer.clone()) for m in moving for buffer in m.buffers()]  # a training pass moves them
    try:
        if fast is not None:  # counted on the plain path: fused and folded kernels skip the modules' hooks
            model.fast_path = False
        with torch.no_grad():
            model(*args)
    finally:
        if fast is not None:
            model.fast_path = fast
        with torch.no_grad():
            for buffer, value in statistics:
                buffer.copy_(value)
        for hook in hooks:
            hook.remove()
    return lengths


def fp32_tolerance(lengths: list[int]) -> float:
    """Error allowance of an fp32 pass running reductions of ``lengths`` in series, relative to its largest output.

    A sum of K random-sign terms grows as sqrt(j)·s over its j-th partial sum; each addition rounds by up to u of
    it, with a sign of its own, so added one by one the result's error has a root mean square of at most
    u·s·sqrt(K(K+1)/2) against a result of size s·sqrt(K): u·sqrt(K/2) relative (BLAS's blocks, oneDNN's, the
    portable kernels' running sums only shorten the chains, so no kernel family needs a factor of its own), plus
    2u for its own rounding and the pointwise step after it (bias, activation, residual sum, normalisation,
    upsampling: a convex sum). The normalised layers pass relative errors on with a gain near 1, so independent
    errors add in quadrature along the series, u·sqrt(Σ (K/2 + 2)) of each layer's rms; the largest of many
    outputs' errors sits within 4 sigma, and the largest output is at least the rms. A statistical bound, not a
    worst case; with ``backward`` the weight gradients' sums, which run side by side, are counted in series too
    (an over-count).
    """
    return 4 * U32 * math.sqrt(sum(k / 2 + 2 for k in lengths))


__all__ = ["U32", "fp32_tolerance", "reduction_lengths"]
