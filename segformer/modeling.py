"""SegFormer: the Mix Transformer (MiT) encoder, the all-MLP decode head and the task models.

Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers" (NeurIPS
2021). Read top to bottom: patch embedding → efficient self-attention → Mix-FFN → block → encoder → decode
head → task models. Module and attribute names are chosen so that ``state_dict()`` keys are exactly the
on-disk names of Transformers' SegFormer checkpoints (``segformer.encoder.block.0.0.attention.self.query``
…), so those checkpoints load with a plain ``load_state_dict``.

Numerics follow Transformers (every LayerNorm uses eps 1e-5 unless ``config.use_layer_norm_eps``; softmax in
fp32; exact GELU; bilinear resizing with align_corners=False). Tokens travel as (B, N, C) and are viewed as
channels-last (B, C, H, W) for the convolutions, so no reshape copies them.

The eval-mode fast path (``model.fast_path``, on by default) is exact algebra, not an approximation:
PyTorch's fused attention kernel (never materialising the N×N' attention matrix), and a decode head whose
per-stage Linear, upsampling, concatenation, 1×1 fuse conv and BatchNorm are folded into one D×C_i matrix
per stage plus one bias (see :meth:`SegformerDecodeHead.folded`). On the CPU in fp32 inference, also
oneDNN's matmul for every Linear and the classifier, the depthwise conv and GELU of each Mix-FFN in one oneDNN
kernel, the head's power-of-two upsamplings as blends of shifted copies added in place, stage 1's projection
accumulated inside its GEMM, and row bands for one image whose Mix-FFN or head maps would exceed glibc's mmap
threshold (same formulas, other rounding order: agreement within fp32 rounding, tested against the plain path).
In fp32 CPU inference each encoder block calls these kernels from one function
(:meth:`SegformerLayer._forward_inference`) rather than through its modules: the same bits, less per-call cost.
Under CPU bf16 autocast the fast path computes in bf16 on casts of the weights, except in the parts (an
encoder stage, the head) too small for bf16 to pay, which run in fp32 (:data:`_BF16_MIN_MACS`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import platform
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module  # (its global forward hooks: _unhooked)
from torch.utils import _pytree as pytree

from .allocator import MMAP_THRESHOLD, ReusableBuffer
from .config import SegformerConfig
from .hub import CheckpointError, for_command_line
from .precision import reduced_precision_problem
from .pretrained import PreTrainedMixin, checkpoint_kwargs

TRANSFORMERS_LAYER_NORM_EPS = 1e-5  # what Transformers uses for every SegFormer LayerNorm


# ------------------------------------------------------------------------------------------------ outputs
# TorchScript would compile the output classes as script classes, and torch.jit.trace then refuses to return
# them; left alone (ignored), a traced model returns them as plain dicts, as it does for Transformers' outputs.
@torch.jit.ignore
class ModelOutput(OrderedDict):
    """A model output: attribute access (``out.logits``), key access (``out["logits"]``) and index access
    (``out[0]``, over the fields that are not None, as with ``return_dict=False``).

    Every output class is a pytree node (the tensors of its present fields, their names as the context), so
    ``torch.export.export`` and ``torch.compile`` take models that return them, and exported programs return them.
    """

    fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls,
            _output_flatten,
            functools.partial(_output_unflatten, cls),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
            flatten_with_keys_fn=_output_flatten_with_keys,
        )

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - set(self.fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        super().__init__((k, values[k]) for k in self.fields if values.get(k) is not None)

    def __getattr__(self, name: str) -> Any:
        if name in type(self).fields:
            return self.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        """``out.loss = custom`` sets the field (``out["loss"]``, ``to_tuple()`` and ``in`` see it), in the fields'
        order, as in Transformers; None removes it."""
        if name not in type(self).fields:
            raise AttributeError(f"{type(self).__name__} has no field {name!r} (fields: {', '.join(self.fields)})")
        present = {k: v for k, v in self.items() if k != name}
        if value is not None:
            present[name] = value
        self.clear()
        self.update((k, present[k]) for k in self.fields if k in present)

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())


def _output_flatten(out: ModelOutput) -> tuple[list[Any], list[str]]:
    return list(out.values()), list(out.keys())


def _output_flatten_with_keys(out: ModelOutput) -> tuple[list[tuple[Any, Any]], list[str]]:
    return [(pytree.MappingKey(k), v) for k, v in out.items()], list(out.keys())


def _output_unflatten(cls: type[ModelOutput], values: Iterable[Any], context: list[str]) -> ModelOutput:
    return cls(**dict(zip(context, values, strict=True)))


class BaseModelOutput(ModelOutput):
    """SegformerModel output: ``last_hidden_state`` (B, C, H/32, W/32) (or (B, N, C) when
    ``reshape_last_stage=False``), ``hidden_states`` (the 4 stage outputs), ``attentions`` (one per block,
    (B, heads, N, N_reduced))."""

    fields = ("last_hidden_state", "hidden_states", "attentions")


class SemanticSegmenterOutput(ModelOutput):
    """``loss`` (with labels), ``logits`` (B, num_labels, H/4, W/4), ``hidden_states``, ``attentions``."""

    fields = ("loss", "logits", "hidden_states", "attentions")


class SegFormerImageClassifierOutput(ModelOutput):
    """``loss`` (with labels), ``logits`` (B, num_labels), ``hidden_states``, ``attentions``."""

    fields = ("loss", "logits", "hidden_states", "attentions")


# ----------------------------------------------------------------------------------------------- helpers
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """GELU written out, x Φ(x) = x (1 + erf(x / √2)) / 2 (Transformers' "gelu_python")."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh_formula(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written out (Transformers' "gelu_python_tanh" and "gelu_accurate")."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _gelu_clipped(x: torch.Tensor) -> torch.Tensor:
    """GELU clipped to [-10, 10] ("gelu_10")."""
    return torch.clip(F.gelu(x), -10.0, 10.0)


def _laplace(x: torch.Tensor) -> torch.Tensor:
    """The Laplace activation, the Gaussian CDF at (x - μ) / σ with μ = 0.707107, σ = 0.282095 ("laplace")."""
    return 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0))))


def _relu_squared(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def _sqrt_softplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x).sqrt()


def make_activation(act: Any) -> nn.Module:
    """The module of a config's ``hidden_act``: a name of :data:`segformer.config.ACTIVATIONS` (Transformers'
    parameter-free activations, under its names and with its definitions), or a callable / module class."""
    if not isinstance(act, str):
        return act() if isinstance(act, type) else _Lambda(act)
    table = {
        "gelu": lambda: nn.GELU(),
        "gelu_new": lambda: nn.GELU(approximate="tanh"),
        "gelu_fast": lambda: nn.GELU(approximate="tanh"),
        "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
        "gelu_python": lambda: _Lambda(_gelu_erf),
        "gelu_python_tanh": lambda: _Lambda(_gelu_tanh_formula),
        "gelu_accurate": lambda: _Lambda(_gelu_tanh_formula),
        "gelu_10": lambda: _Lambda(_gelu_clipped),
        "quick_gelu": QuickGELU,
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "relu2": lambda: _Lambda(_relu_squared),
        "leaky_relu": nn.LeakyReLU,
        "hardswish": nn.Hardswish,
        "laplace": lambda: _Lambda(_laplace),
        "linear": nn.Identity,
        "sqrtsoftplus": lambda: _Lambda(_sqrt_softplus),
        "selu": nn.SELU,
        "silu": nn.SiLU,
        "swish": nn.SiLU,
        "mish": nn.Mish,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    return table[act]()


class _Lambda(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * mask


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) tokens → (B, C, H, W) view in channels-last memory (no copy)."""
    # view (not unflatten): the ONNX tracer keeps view sizes symbolic, so exported graphs stay size-dynamic
    return x.view(x.shape[0], height, width, x.shape[-1]).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H*W, C); free for channels-last maps."""
    return x.flatten(2).transpose(1, 2)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def stage_sizes(config: SegformerConfig, height: int, width: int) -> list[tuple[int, int]]:
    """Spatial size of every stage's tokens for an input of (height, width)."""
    sizes = []
    for k, s in zip(config.patch_sizes, config.strides, strict=True):
        height, width = conv_out(height, k, s, k // 2), conv_out(width, k, s, k // 2)
        sizes.append((height, width))
    return sizes


def min_input_size(config: SegformerConfig) -> int:
    """The smallest height (and width) that every stage's patch embedding and reduction conv accept."""
    size = 1
    while True:
        stages = stage_sizes(config, size, size)
        if all(h >= 1 and h >= sr for (h, _), sr in zip(stages, config.sr_ratios, strict=True)):
            return size
        size += 1


def check_channels_and_dtype(pixel_values: torch.Tensor, num_channels: int | None) -> None:
    """One-line ValueError for a 4-D batch whose channel count (dimension 1) is not ``num_channels`` (None: any)
    or that is not floating point (images not yet normalised)."""
    if num_channels is not None and pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[1]} channels but the model expects {num_channels} "
            f"(shape {tuple(pixel_values.shape)}; channels go in dimension 1)"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be floating point, got {pixel_values.dtype} (normalise images with "
            "SegformerImageProcessor first)"
        )


def check_pixel_values(pixel_values: Any, config: SegformerConfig) -> None:
    """Raise a one-line ValueError for input the encoder cannot take."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must be 4-D (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
        )
    check_channels_and_dtype(pixel_values, config.num_channels)
    height, width = pixel_values.shape[-2:]
    for (h, w), sr in zip(stage_sizes(config, height, width), config.sr_ratios, strict=True):
        if min(h, w) < max(sr, 1):
            raise ValueError(
                f"pixel_values of size {height}x{width} is too small: this model needs at least "
                f"{min_input_size(config)}x{min_input_size(config)} pixels"
            )


# ----------------------------------------------------------------------------- weights derived and kept
# What inference keeps between calls (the folded decode head, bf16 casts of weights) is checked against its
# sources' values on every use, not only against their version counters: a write through ``param.data`` (an EMA,
# a hand-written update, ``w.data.normal_()``) or through a numpy view leaves the version counter alone, and
# a kept result would silently stay the old weights'. Each entry keeps a snapshot of its sources and compares the
# bytes (NaN payloads included): on the CPU one memcmp at memory speed, ~0.3 ms a forward for b0's decode head
# (1.5 MiB of sources), ~2.5 ms for b2's (12 MiB), measured on the 2-core Zen 3.
def _snapshot(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone(memory_format=torch.contiguous_format) for t in tensors]


def _unchanged(tensors: Sequence[torch.Tensor], snapshot: Sequence[torch.Tensor]) -> bool:
    """Whether ``tensors`` hold exactly the bytes of ``snapshot`` (:func:`_snapshot`) in the same shapes."""
    if len(tensors) != len(snapshot):
        return False
    pending = []  # other devices: one synchronisation for all
    for t, kept in zip(tensors, snapshot, strict=True):
        if t.shape != kept.shape or t.dtype != kept.dtype or t.device != kept.device:
            return False
        if t.device.type == "cpu" and t.is_contiguous():
            if not _same_bytes(t, kept):
                return False
        else:
            pending.append(torch.ne(t.detach(), kept).any() if t.numel() else torch.zeros((), dtype=torch.bool))
    return not pending or not bool(torch.stack([p.to(pending[0].device) for p in pending]).any())


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous CPU tensors of one size hold the same bytes: the C library's memcmp (~20 GB/s here;
    ``torch.equal`` took 0.05-8 ms erratically on 1.5 MB, its thread pool waking), else numpy."""
    nbytes = a.numel() * a.element_size()
    if _MEMCMP is not None:
        return nbytes == 0 or _MEMCMP(a.data_ptr(), b.data_ptr(), nbytes) == 0
    return np.array_equal(a.detach().reshape(-1).view(torch.uint8).numpy(), b.reshape(-1).view(torch.uint8).numpy())


def _find_memcmp() -> Any:
    try:
        libc = ctypes.CDLL(None) if sys.platform != "win32" else ctypes.cdll.msvcrt
        memcmp = libc.memcmp
    except (OSError, AttributeError):  # (no C library to load this way: numpy compares)
        return None
    memcmp.restype, memcmp.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_MEMCMP = _find_memcmp()


# --------------------------------------------------------------------------------------------- encoder


def _conv_channels_last(conv: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """``conv(x)`` for a channels-last map ``x``. PyTorch then runs its channels-last kernel on a copy of the NCHW
    weight in that layout, made on every call; in CPU inference (:func:`_on_weight_copy`) the copy is made here
    (:func:`_channels_last_weight`), as fast as PyTorch's and in the dtype bf16 autocast would cast to. Nothing
    is kept between calls: a kept copy would have to be checked against the weight's values on every call (a
    write through ``.data`` moves no version counter), which costs as much as the copy, and doubles the memory
    of these weights (b5: +79 MiB). The parameters themselves stay NCHW: flat views of them
    (``parameters_to_vector``, LBFGS) need contiguous bytes."""
    if _on_weight_copy(conv, x, fast) and x.is_contiguous(memory_format=torch.channels_last):
        dtype = _copy_dtype(conv.weight)
        weight, bias = _channels_last_weight(conv.weight, dtype), _cast(conv.bias, dtype)
        return F.conv2d(x.to(dtype), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return conv(x)


def _channels_last_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A conv weight's channels-last copy in ``dtype`` (one pass over the weight)."""
    return weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)


def _on_weight_copy(conv: nn.Module, x: torch.Tensor, fast: bool) -> bool:
    """Whether ``conv`` runs on a channels-last copy of its weight made for the call (CPU inference: fast path,
    eval mode, no autograd graph, no graph capture, no hooks on the conv; see :func:`_conv_channels_last`)."""
    weight = getattr(conv, "weight", None)
    return (
        fast
        and type(conv) is nn.Conv2d
        and not conv.training
        and conv.padding_mode == "zeros"
        and x.device.type == "cpu"
        and not weight.is_contiguous(memory_format=torch.channels_last)
        and _unhooked(conv)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not _capturing_graph()
        and (not _cpu_autocast() or _inference_dtype(x, weight) is not None)  # (bf16 autocast: a bf16 copy)
    )


def _strided_1x1_backward_on_cpu(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv`` is a 1x1 conv with a stride above 1 whose gradient autograd will compute on the CPU. On a
    channels-last input, PyTorch 2.13's oneDNN (jit_avx2_1x1_convolution_bwd_weights) then writes past its buffer:
    the process aborts ("double free or corruption"), segfaults, or goes on with a corrupted heap (audit, seen
    under valgrind; plain ``nn.Conv2d(3, 8, 1, 2)`` on a channels-last input shows it). An NCHW input takes
    another kernel. Patch embeddings of the published variants (7/3/3/3) are never 1x1."""
    weight = getattr(conv, "weight", None)
    return (
        getattr(conv, "kernel_size", None) == (1, 1)
        and getattr(conv, "stride", (1, 1)) != (1, 1)
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and (x.requires_grad or (weight is not None and weight.requires_grad))
    )


def _conv_nchw(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` with input and weight in NCHW strides. A 1x1 weight in channels-last strides (a model moved to
    channels-last) counts as contiguous, so PyTorch would still choose the channels-last kernel: its standard-stride
    copy is made (a differentiable clone). A conv that is not a plain, unhooked ``nn.Conv2d`` (an adapter's wrapper)
    gets the NCHW input alone."""
    x = x.contiguous()
    if type(conv) is not nn.Conv2d or not _unhooked(conv) or conv.padding_mode != "zeros":
        return conv(x)
    weight = conv.weight.clone(memory_format=torch.contiguous_format)
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class SegformerOverlapPatchEmbeddings(nn.Module):
    """Overlapping patch embedding: strided conv (padding k//2) → tokens → LayerNorm. (OverlapPatchEmbed.)"""

    def __init__(self, patch_size: int, stride: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride, padding=patch_size // 2)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=TRANSFORMERS_LAYER_NORM_EPS)
        self.fast_path = True  # CPU inference: the conv on a channels-last copy of its weight (_conv_channels_last)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if _strided_1x1_backward_on_cpu(self.proj, x):  # (NCHW input and weight: see there)
            x = _conv_nchw(self.proj, x)
        else:
            x = _conv_channels_last(self.proj, x, self.fast_path)  # (B, C, H', W')
        height, width = x.shape[-2:]
        return self.layer_norm(map_to_tokens(x)), height, width  # (B, H'*W', C)


class SegformerEfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from a sequence shortened by ``sr_ratio``² with a
    strided conv (sequence reduction). (Attention class of the original implementation.)"""

    def __init__(self, hidden_size: int, num_heads: int, sr_ratio: int, attention_dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden_size, hidden_size, kernel_size=sr_ratio, stride=sr_ratio)
            self.layer_norm = nn.LayerNorm(hidden_size, eps=TRANSFORMERS_LAYER_NORM_EPS)
        self.fast_path = True  # PyTorch's fused scaled_dot_product_attention unless attention maps are requested

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, heads, N, hd)

    def forward(
        self, x: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.heads(_dense(self.query, x, self.fast_path))
        if self.sr_ratio > 1:
            x = self.layer_norm(self.reduce(x, height, width))  # (B, N', C)
        k, v = self.heads(_dense(self.key, x, self.fast_path)), self.heads(_dense(self.value, x, self.fast_path))
        dropout = self.attention_dropout if self.training else 0.0
        if self.fast_path and not output_attentions:
            context, probs = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout), None
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, heads, N, N')
            probs = scores.float().softmax(dim=-1).to(q.dtype)  # fp32 softmax (also in exported fp16 graphs)
            probs = F.dropout(probs, dropout, self.training)  # returned as used (after dropout), as Transformers'
            context = torch.matmul(probs, v)
        return context.transpose(1, 2).flatten(2), probs  # (B, N, C)

    def reduce(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The sequence reduction: the sr×sr, stride-sr conv over the (B, H*W, C) tokens → (B, N', C) tokens.

        Its windows do not overlap, so where the conv would run on a channels-last copy of its weight (CPU
        inference, see :func:`_conv_channels_last`) it is one GEMM instead: each window's sr·sr·C values
        gathered into a row (one copy of the tokens) times the weight read as a (C, sr·sr·C) matrix in that
        order (one copy of the weight). The same sums in another order, faster than the conv kernel, most at
        small images where the kernel's fixed cost dominates."""
        conv, r = self.sr, self.sr_ratio
        if not _on_weight_copy(conv, x, self.fast_path):
            return map_to_tokens(conv(tokens_to_map(x, height, width)))
        dtype = _copy_dtype(conv.weight)
        x, b, c = x.to(dtype), x.shape[0], x.shape[-1]
        h, w = height // r, width // r  # (the conv's floor: trailing rows / columns that fill no window drop)
        windows = x.view(b, height, width, c)[:, : h * r, : w * r].reshape(b, h, r, w, r, c).transpose(2, 3)
        rows = windows.reshape(b, h * w, r * r * c)  # (B, N', sr·sr·C): (kernel row, kernel column, channel)
        weight = conv.weight.detach().to(dtype).permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (one copy)
        return _linear(rows, weight, _cast(conv.bias, dtype))


class SegformerSelfOutput(nn.Module):
    def __init__(self, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.fast_path = True  # oneDNN's matmul in fp32 / bf16 CPU inference (see _dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(_dense(self.dense, x, self.fast_path))


class SegformerAttention(nn.Module):
    def __init__(self, config: SegformerConfig, hidden_size: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.self = SegformerEfficientSelfAttention(
            hidden_size, num_heads, sr_ratio, config.attention_probs_dropout_prob
        )
        self.output = SegformerSelfOutput(hidden_size, config.hidden_dropout_prob)

    def forward(
        self, x: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, probs = self.self(x, height, width, output_attentions)
        return self.output(context), probs


class SegformerDWConv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        # Channels-last strides, the same bytes (one input channel per group): PyTorch returns this weight's
        # gradient in the channels-last layout of the input, and DistributedDataParallel's bucket views take the
        # parameter's strides; with NCHW strides the two differed on the size-1 axis, and DDP warned and copied.
        # (Flat views of the weight, e.g. parameters_to_vector, work either way: the bytes are contiguous.)
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return map_to_tokens(self.dwconv(tokens_to_map(x, height, width)))

    def forward_gelu(self, x: torch.Tensor, height: int, width: int, approximate: str) -> torch.Tensor:
        """GELU(dwconv(x)) in one oneDNN pass (the activation applied as the convolution writes its output):
        no second pass over the largest activation of the block, and one full-size tensor fewer. In ``x``'s
        dtype (under bf16 autocast: bf16, on casts of the weights)."""
        conv, x = self.dwconv, tokens_to_map(x, height, width)
        geometry = (conv.padding, conv.stride, conv.dilation, conv.groups)
        weight, bias = _cast(conv.weight, x.dtype), _cast(conv.bias, x.dtype)
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, "gelu", [], approximate)
        return map_to_tokens(y)


class SegformerMixFFN(nn.Module):
    """Mix-FFN: Linear → depthwise 3×3 conv (the positional information) → GELU → Linear."""

    def __init__(self, config: SegformerConfig, hidden_size: int, mlp_ratio: int) -> None:
        super().__init__()
        inner = hidden_size * mlp_ratio
        self.dense1 = nn.Linear(hidden_size, inner)
        self.dwconv = SegformerDWConv(inner)
        self.intermediate_act_fn = make_activation(config.hidden_act)
        self.dense2 = nn.Linear(inner, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.fast_path = True  # the depthwise conv and an exact GELU in one oneDNN kernel where it can run

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        act, dwconv = self.intermediate_act_fn, self.dwconv
        fuse = self.fast_path and not self.training and type(act) is nn.GELU and _unhooked(act, dwconv, dwconv.dwconv)
        dtype = _inference_dtype(x, dwconv.dwconv.weight) if fuse and _CONV_POINTWISE else None
        if dtype is not None and torch.backends.mkldnn.enabled:
            x = x.to(dtype)  # (a cast only under autocast, which would make it in dense1)
            band = self._band(x, height, width)
            if band:
                return self._forward_banded(x, height, width, band, act.approximate)
            hidden = _dense(self.dense1, x, True)
            return _dense(self.dense2, dwconv.forward_gelu(hidden, height, width, act.approximate), True)
        x = _dense(self.dense1, x, self.fast_path)
        x = self.dropout(act(self.dwconv(x, height, width)))
        return self.dropout(_dense(self.dense2, x, self.fast_path))

    def _band(self, x: torch.Tensor, height: int, width: int) -> int:
        """Rows per band where one image's fused inference runs banded (:meth:`_forward_banded`), else 0."""
        band = self._band_rows(x, width)
        mapped = _is_mapped(x.shape[1] * self.dense1.out_features * x.element_size())
        return band if x.shape[0] == 1 and band < height and mapped else 0

    def _band_rows(self, x: torch.Tensor, width: int) -> int:
        """Rows per band of the banded inference path, taken where the whole hidden map would be a fresh mapping
        (above glibc's mmap threshold; below it, whole is faster): a band's hidden map with its two halo rows
        stays within _BAND_BYTES."""
        row = width * self.dense1.out_features * x.element_size()
        return max(1, _BAND_BYTES // row - 2)

    def _forward_banded(self, x: torch.Tensor, height: int, width: int, band: int, approximate: str) -> torch.Tensor:
        """One image's Mix-FFN in bands of ``band`` rows, each with one halo row above and below for the 3×3
        depthwise conv (whose zero padding then only acts at the image's own borders): the same values, but the
        4×-wide hidden map never exists whole — at high resolution it would be a fresh mapping (page faults)
        of 64 MB and more per block — and each band's hidden map is still in cache when the conv reads it."""
        out = x.new_empty(*x.shape[:-1], self.dense2.out_features)
        for r0 in range(0, height, band):
            r1 = min(height, r0 + band)
            a, b = max(0, r0 - 1), min(height, r1 + 1)  # rows of the band with its halo
            hidden = _dense(self.dense1, x[:, a * width : b * width], True)
            hidden = self.dwconv.forward_gelu(hidden, b - a, width, approximate)
            keep = hidden[:, (r0 - a) * width : (r1 - a) * width]  # the band's own rows: a contiguous token range
            out[:, r0 * width : r1 * width] = _dense(self.dense2, keep, True)
        return out


class SegformerLayer(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x))). (Block.)"""

    def __init__(self, config: SegformerConfig, stage: int, drop_path_rate: float) -> None:
        super().__init__()
        size = config.hidden_sizes[stage]
        eps = config.layer_norm_eps if config.use_layer_norm_eps else TRANSFORMERS_LAYER_NORM_EPS
        self.layer_norm_1 = nn.LayerNorm(size, eps=eps)
        self.attention = SegformerAttention(config, size, config.num_attention_heads[stage], config.sr_ratios[stage])
        self.drop_path = DropPath(drop_path_rate)
        self.layer_norm_2 = nn.LayerNorm(size, eps=eps)
        self.mlp = SegformerMixFFN(config, size, config.mlp_ratios[stage])

    def forward(
        self, x: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, probs = self.attention(self.layer_norm_1(x), height, width, output_attentions)
        x = x + self.drop_path(attn)
        x = x + self.drop_path(self.mlp(self.layer_norm_2(x), height, width))
        return x, probs

    def _runs_inline(self) -> bool:
        """Whether :meth:`_forward_inference` may stand in for this block's modules: every part is the plain
        module it is built with (no subclass, replacement or quantised Linear), in eval mode, on the fast path,
        with float32 weights, and no forward hook would see a part run (:func:`_unhooked`). Read through
        ``_modules`` and ``_parameters``: ~10 µs a block, where reading the parts as module attributes took ~44."""
        mods = self._modules
        attention, mlp = mods["attention"], mods["mlp"]
        attn, out = attention._modules["self"], attention._modules["output"]
        kinds = (SegformerAttention, SegformerEfficientSelfAttention, SegformerSelfOutput, SegformerMixFFN)
        if type(self) is not SegformerLayer or tuple(map(type, (attention, attn, out, mlp))) != kinds:
            return False
        if not (attn.fast_path and out.fast_path and mlp.fast_path):
            return False
        a, o, f = attn._modules, out._modules, mlp._modules
        dwconv = f["dwconv"]
        parts = [
            (self, SegformerLayer, False),
            (attention, SegformerAttention, False),
            (attn, SegformerEfficientSelfAttention, False),
            (out, SegformerSelfOutput, False),
            (mlp, SegformerMixFFN, False),
            (mods["layer_norm_1"], nn.LayerNorm, False),
            (mods["layer_norm_2"], nn.LayerNorm, False),
            (mods["drop_path"], DropPath, False),
            (a["query"], nn.Linear, True),
            (a["key"], nn.Linear, True),
            (a["value"], nn.Linear, True),
            (o["dense"], nn.Linear, True),
            (o["dropout"], nn.Dropout, False),
            (f["dense1"], nn.Linear, True),
            (f["dense2"], nn.Linear, True),
            (f["dropout"], nn.Dropout, False),
            (f["intermediate_act_fn"], nn.GELU, False),
            (dwconv, SegformerDWConv, False),
            (dwconv._modules["dwconv"], nn.Conv2d, True),
        ]
        if attn.sr_ratio > 1:
            parts += [(a["sr"], nn.Conv2d, True), (a["layer_norm"], nn.LayerNorm, False)]
        for module, kind, weighted in parts:
            if type(module) is not kind or module.training:
                return False
            if weighted:
                weight = module._parameters.get("weight")
                if weight is None or weight.dtype != torch.float32:
                    return False
        return _unhooked(*(module for module, _, _ in parts))

    def _forward_inference(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The block in fp32 CPU inference, where :meth:`SegformerEncoder._inline_blocks` and
        :meth:`_runs_inline` hold: the fast path's own kernels on the same operands in the same order (the same
        bits as the modules' fast path), called straight from here, without a module call or the fast path's
        per-operator checks for each of the block's ~15 parts (b0: ~1.2 ms a forward, 8–9% at 128×128, ~1% at
        512×512; README, Exact fast path)."""
        b, n, c = x.shape
        attn, mlp, f32 = self.attention.self, self.mlp, torch.float32
        h = _layer_norm(self.layer_norm_1, x)
        q = _rows_linear(h.view(b * n, c), attn.query.weight, attn.query.bias, f32)
        kv = _layer_norm(attn.layer_norm, attn.reduce(h, height, width)) if attn.sr_ratio > 1 else h
        kv = kv.reshape(-1, c)
        k = _rows_linear(kv, attn.key.weight, attn.key.bias, f32)
        v = _rows_linear(kv, attn.value.weight, attn.value.bias, f32)
        heads = (attn.num_heads, attn.head_dim)
        context = F.scaled_dot_product_attention(*(t.view(b, -1, *heads).transpose(1, 2) for t in (q, k, v)))
        dense = self.attention.output.dense
        x = _rows_linear_add(context.transpose(1, 2).reshape(b * n, c), dense.weight, dense.bias, x)
        h = _layer_norm(self.layer_norm_2, x)
        approximate = mlp.intermediate_act_fn.approximate
        band = mlp._band(h, height, width)
        if band:
            return x + mlp._forward_banded(h, height, width, band, approximate)
        hidden = _rows_linear(h.view(b * n, c), mlp.dense1.weight, mlp.dense1.bias, f32).view(b, n, -1)
        hidden = mlp.dwconv.forward_gelu(hidden, height, width, approximate).reshape(b * n, -1)
        return _rows_linear_add(hidden, mlp.dense2.weight, mlp.dense2.bias, x)


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` without the module call."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class SegformerEncoder(nn.Module):
    """The hierarchical Mix Transformer: four stages of patch embedding → blocks → LayerNorm."""

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__()
        self.config = config
        total = sum(config.depths)
        # Stochastic-depth rate grows linearly over all blocks: rate * n / (total - 1).
        rates = [config.drop_path_rate * n / (total - 1) if total > 1 else 0.0 for n in range(total)]
        self.patch_embeddings = nn.ModuleList(
            SegformerOverlapPatchEmbeddings(
                config.patch_sizes[i],
                config.strides[i],
                config.num_channels if i == 0 else config.hidden_sizes[i - 1],
                config.hidden_sizes[i],
            )
            for i in range(config.num_encoder_blocks)
        )
        self.block = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            start = sum(config.depths[:i])
            self.block.append(nn.ModuleList(SegformerLayer(config, i, rates[start + j]) for j in range(depth)))
        eps = config.layer_norm_eps if config.use_layer_norm_eps else TRANSFORMERS_LAYER_NORM_EPS
        self.layer_norm = nn.ModuleList(nn.LayerNorm(size, eps=eps) for size in config.hidden_sizes)
        self.gradient_checkpointing = False
        self.gradient_checkpointing_kwargs: dict[str, Any] = {"use_reentrant": False}

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool = False,
        reshape_last_stage: bool = True,
        contiguous_stages: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return the stage outputs — (B, C_i, H_i, W_i) channels-last views; the last one (B, N, C) when
        ``reshape_last_stage`` is False — and the attention maps (empty unless requested).

        ``contiguous_stages`` (asked for hidden states): each stage map is made contiguous (NCHW, as
        Transformers returns them) and that very tensor feeds the next stage and the head, so gradients reach
        the hidden states a caller holds (Grad-CAM, attribution, distillation)."""
        x = pixel_values.contiguous(memory_format=torch.channels_last)
        stages, attentions = [], []
        last = len(self.block) - 1
        for i, (embed, blocks, norm) in enumerate(zip(self.patch_embeddings, self.block, self.layer_norm, strict=True)):
            fp32 = _bf16_does_not_pay(embed, embed.proj.weight, self._stage_macs(i, x))
            with _autocast_disabled("cpu") if fp32 else contextlib.nullcontext():
                x, height, width = embed(x.float() if fp32 else x)  # (B, N, C)
                inline = self._inline_blocks(x, output_attentions)  # (also a stage run in fp32 under autocast)
                for block in blocks:
                    if inline and block._runs_inline():
                        x, probs = block._forward_inference(x, height, width), None
                    elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                        x, probs = torch.utils.checkpoint.checkpoint(
                            block, x, height, width, output_attentions, **self.gradient_checkpointing_kwargs
                        )
                    else:
                        x, probs = block(x, height, width, output_attentions)
                    if output_attentions:
                        attentions.append(probs)
                x = norm(x)
            if i < last or reshape_last_stage:
                x = tokens_to_map(x, height, width)  # (B, C, H, W), channels-last
                x = x.contiguous() if contiguous_stages else x  # the returned tensor is the one used below
            stages.append(x)
        return stages, attentions

    def _inline_blocks(self, x: torch.Tensor, output_attentions: bool) -> bool:
        """Whether this forward may run its blocks through :meth:`SegformerLayer._forward_inference` (each block
        also asks :meth:`SegformerLayer._runs_inline`): fp32 CPU inference with no autograd graph, no autocast,
        no graph being captured, no attention maps asked for, and oneDNN's kernels there."""
        return (
            not output_attentions
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not _cpu_autocast()
            and _CONV_POINTWISE
            and torch.backends.mkldnn.enabled
            and not _capturing_graph()
        )

    def _largest_stage_macs(self, pixel_values: torch.Tensor) -> int:
        """:meth:`_stage_macs` of the largest stage for ``pixel_values`` (B, C, H, W), from the config alone."""
        sizes = stage_sizes(self.config, *pixel_values.shape[-2:])
        return max(self._ffn_macs(i, pixel_values.shape[0], h, w) for i, (h, w) in enumerate(sizes))

    def _stage_macs(self, i: int, x: torch.Tensor) -> int:
        """Multiply-adds of stage ``i``'s largest matrix product (the Mix-FFN's first linear) for input ``x``."""
        k, s = self.config.patch_sizes[i], self.config.strides[i]
        h, w = (conv_out(n, k, s, k // 2) for n in x.shape[-2:])  # the patch embedding's output size
        return self._ffn_macs(i, x.shape[0], h, w)

    def _ffn_macs(self, i: int, batch: int, h: int, w: int) -> int:
        """Multiply-adds of stage ``i``'s first Mix-FFN linear over ``batch`` grids of h × w tokens: B·N·C·rC."""
        d = self.config.hidden_sizes[i]
        return batch * h * w * d * d * self.config.mlp_ratios[i]


# ---------------------------------------------------------------------------------------- decode head
class SegformerMLP(nn.Module):
    """Per-stage linear projection to the decoder width."""

    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class SegformerDecodeHead(nn.Module):
    """The all-MLP decoder: project each stage to D channels, upsample to 1/4 resolution, concatenate
    (stage 4 first), fuse with a 1×1 conv + BatchNorm + ReLU, classify with a 1×1 conv.

    ``forward(encoder_hidden_states)`` takes the stage outputs ((B, C_i, H_i, W_i); the last may be (B, N, C)
    when ``reshape_last_stage=False``, whose size is then derived from the previous stage) and returns logits
    (B, num_labels, H_1, W_1).
    """

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.decoder_hidden_size
        self.linear_c = nn.ModuleList(SegformerMLP(size, d) for size in config.hidden_sizes)
        self.linear_fuse = nn.Conv2d(d * config.num_encoder_blocks, d, kernel_size=1, bias=False)
        self.batch_norm = nn.BatchNorm2d(d)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Conv2d(d, config.num_labels, kernel_size=1)
        self.fast_path = True
        self._fold_cache: tuple[tuple, list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None
        self._logits_buffer = ReusableBuffer()  # a chunked CPU batch's logits (segformer.allocator)

    def _maps(self, hidden_states: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Every stage as a (B, C, H, W) map; a token-shaped last stage gets its size from the stage before."""
        maps: list[torch.Tensor] = []
        for i, x in enumerate(hidden_states):
            if x.ndim == 3:
                if not maps:
                    raise ValueError(
                        f"encoder hidden state {i} is token-shaped {tuple(x.shape)} with no (B, C, H, W) map before it "
                        "to size it by: pass it as a map (segformer.modeling.tokens_to_map)"
                    )
                h, w = maps[-1].shape[-2:]
                k, s = self.config.patch_sizes[i], self.config.strides[i]
                x = tokens_to_map(x, conv_out(h, k, s, k // 2), conv_out(w, k, s, k // 2))
            maps.append(x)
        return maps

    def forward(self, encoder_hidden_states: Iterable[torch.Tensor]) -> torch.Tensor:
        maps = self._maps(encoder_hidden_states)
        if self.fast_path and self.training and self._parts_plain():
            self._fold_cache = None  # the running statistics are about to change
            return self._forward_factored(maps)
        if self._folds():
            return self._forward_folded(maps)
        size = maps[0].shape[-2:]
        projected = []
        for mlp, x in zip(self.linear_c, maps, strict=True):
            y = tokens_to_map(mlp(map_to_tokens(x)), *x.shape[-2:])  # (B, D, H_i, W_i)
            projected.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        x = self.linear_fuse(torch.cat(projected[::-1], dim=1))  # stage 4 first, as in the original
        x = self.dropout(self.activation(self.batch_norm(x.contiguous())))  # NCHW: see _forward_factored
        return self.classifier(x).contiguous()

    def _folds(self) -> bool:
        """Whether an inference forward runs the folded head (:meth:`_forward_folded`): eval mode on the fast
        path, its parts plain (:meth:`_parts_plain`), BatchNorm with running statistics (without them eval
        normalises by the batch's, as in training: the modules run). A batch run in chunks needs it too."""
        return (
            self.fast_path
            and not self.training
            and self._parts_plain()
            and self._modules["batch_norm"].running_mean is not None
        )

    def _parts_plain(self) -> bool:
        """Whether the fast paths, which read the parts' weights instead of calling them, compute what the parts
        would: each of the exact type it was built as (not a subclass, adapter or quantised replacement), the
        convs 1×1 with the biases the paths read (the fuse conv none, the classifier one), and no forward hook on
        any (:func:`_unhooked`). Elsewhere the modules run, one call each, as written. (Read through ``_modules``:
        ~13 µs a forward, where attribute access took 50.)"""
        parts = self._modules
        linear_c, fuse, classifier = parts["linear_c"], parts["linear_fuse"], parts["classifier"]
        norm, activation, dropout = parts["batch_norm"], parts["activation"], parts["dropout"]
        if type(linear_c) is not nn.ModuleList:
            return False
        mlps = list(linear_c._modules.values())
        if not all(type(m) is SegformerMLP for m in mlps):
            return False
        projections = [m._modules["proj"] for m in mlps]
        return (
            all(type(p) is nn.Linear for p in projections)
            and type(fuse) is nn.Conv2d
            and type(classifier) is nn.Conv2d
            and _pointwise_conv(fuse)
            and _pointwise_conv(classifier)
            and fuse.bias is None
            and classifier.bias is not None
            and type(norm) is nn.BatchNorm2d
            and type(activation) is nn.ReLU
            and type(dropout) is nn.Dropout
            and _unhooked(*mlps, *projections, fuse, norm, activation, dropout, classifier)
        )

    # The folded head. In eval mode everything between the stage outputs and the ReLU is linear, and bilinear
    # resizing commutes with per-pixel channel maps (its weights sum to one), so
    #   BN(fuse(cat_i up(W_i x_i + b_i))) = sum_i up(M_i x_i) + c,
    #   M_i = g * F_i W_i,  c = g * (sum_i F_i b_i - mean) + beta,  g = gamma / sqrt(var + eps),
    # with F_i the fuse-conv columns of stage i. The 4D-channel concatenation and the big 1×1 conv vanish.
    def folded(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The folded per-stage matrices M_i (D, C_i) and the bias c (D,), recomputed when weights change."""
        tensors = [p for p in self.linear_c.parameters()] + [self.linear_fuse.weight]
        tensors += [self.batch_norm.weight, self.batch_norm.bias]
        # (a train-mode forward updates the running statistics inside the kernel, without bumping their version
        # counters: the values are compared, see _unchanged)
        tensors += [self.batch_norm.running_mean, self.batch_norm.running_var]
        tensors = [t for t in tensors if t is not None]
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if differentiable or torch.compiler.is_compiling():
            return self._fold()
        key = (*((t.data_ptr(), t.dtype, t.device) for t in tensors), self.batch_norm.eps)
        cache = self._fold_cache
        # (off the CPU the check synchronises with the device: not while a CUDA graph is being captured, nor into
        # a trace; there a cache whose sources are the same tensors is taken as it is)
        check = tensors[0].is_cpu or not (_cuda_capturing() or torch.jit.is_tracing())
        if cache is None or cache[0] != key or (check and not _unchanged(tensors, cache[1])):
            if torch.jit.is_tracing():  # every trace of a model not run yet records the folding (jit.trace checks
                return self._fold()  # that two traces agree); a folded model's trace keeps the constants (ONNX)
            # autocast off: where the fold accumulates in float32 (_fold_dtype), a first call inside an autocast
            # region would otherwise keep low-precision matrices for every later call
            with torch.no_grad(), _autocast_disabled(self.linear_fuse.weight.device.type):
                cache = self._fold_cache = (key, _snapshot(tensors), *self._fold())
        return cache[2], cache[3]

    def _fold(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        bn, weight = self.batch_norm, self.linear_fuse.weight
        dtype = weight.dtype
        acc = _fold_dtype(weight.device)
        d, n = self.config.decoder_hidden_size, len(self.linear_c)
        fuse = weight.reshape(d, n, d).to(acc)  # (D, stage slot, D); slot 0 holds stage n-1
        mean = bn.running_mean if bn.track_running_stats and bn.running_mean is not None else None
        if mean is None:
            raise RuntimeError("the folded decode head needs BatchNorm running statistics")
        gain = bn.weight.to(acc) / torch.sqrt(bn.running_var.to(acc) + bn.eps)
        bias = bn.bias.to(acc) - gain * mean.to(acc)
        matrices = []
        for i, mlp in enumerate(self.linear_c):
            f_i = fuse[:, n - 1 - i, :]  # (D, D)
            matrices.append((gain[:, None] * (f_i @ mlp.proj.weight.to(acc))).to(dtype))  # (D, C_i)
            bias = bias + gain * (f_i @ mlp.proj.bias.to(acc))
        return matrices, bias.to(dtype)

    def _forward_folded(
        self, maps: list[torch.Tensor], out: torch.Tensor | None = None, start: int = 0, total: int | None = None
    ) -> torch.Tensor:
        """Logits of the folded head. With ``total``, the images of ``maps`` are images ``start``… of a batch of
        ``total`` whose logits go to ``out`` (allocated here when None) and ``out`` is returned: a batch run in
        chunks writes each chunk's logits in place, with no concatenation afterwards."""
        _, channels, height, width = maps[0].shape
        # its largest products: stage 1's projection and the classifier, one image at a time in inference (below)
        macs = height * width * self.config.decoder_hidden_size * max(channels, self.classifier.out_channels)
        if _bf16_does_not_pay(self, self.classifier.weight, macs):
            with _autocast_disabled("cpu"):
                return self._forward_folded_in([x.float() for x in maps], out, start, total)
        return self._forward_folded_in(maps, out, start, total)

    def _forward_folded_in(
        self, maps: list[torch.Tensor], out: torch.Tensor | None, start: int, total: int | None
    ) -> torch.Tensor:
        matrices, bias = self.folded()
        dtype = _inference_dtype(maps[0], matrices[0])
        if dtype is not None and _cpu_autocast():  # bf16 autocast: the folded weights cast (_cast)
            matrices, bias = [_cast(m, dtype) for m in matrices], _cast(bias, dtype)
        batch = maps[0].shape[0]
        if total is None and (batch == 1 or torch.is_grad_enabled() or _capturing_graph()):
            return self._folded_logits(maps, matrices, bias)  # (a graph for autograd or export: one pass)
        # One image at a time: the head's full-resolution maps (acc, each upsampled stage, the logits) are the
        # largest tensors of the whole forward pass; per image they stay 1/B the size, in cache longer, and
        # small enough for the C allocator to reuse instead of mapping fresh pages for each (see allocator.py).
        for n in range(batch):
            image = [x[n : n + 1] for x in maps]
            if out is None:
                first = self._folded_logits(image, matrices, bias)
                shape = (total or batch, *first.shape[1:])
                # a batch's logits are the one block above the mmap threshold left: reused once dropped
                buffer = getattr(self, "_logits_buffer", None)  # (None in a head pickled by an older version)
                out = buffer.empty(shape, first.dtype) if buffer and first.is_cpu else first.new_empty(shape)
                out[start + n : start + n + 1] = first
            else:
                self._folded_logits(image, matrices, bias, out, start + n)
        return out

    def _folded_logits(
        self,
        maps: list[torch.Tensor],
        matrices: list[torch.Tensor],
        bias: torch.Tensor,
        out: torch.Tensor | None = None,
        index: int = 0,
    ) -> torch.Tensor:
        """Logits of the folded head; with ``out`` (B, K, H_1, W_1), image ``index`` of it is written in place
        and ``out`` returned, else the logits of the images in ``maps`` (which must then be all of them)."""
        b, _, height, width = maps[0].shape
        # In place (phase resizing, GEMM accumulation) unless a graph is being recorded for autograd or export.
        graph = torch.is_grad_enabled() and any(t.requires_grad for t in (*matrices, *maps))
        eager = not (_capturing_graph() or graph)
        band = self._band_rows(maps, matrices) if eager and b == 1 else 0
        if band:
            return self._folded_logits_banded(maps, matrices, bias, band, out, index)
        # Deepest (smallest) stage first: it carries the bias, cheapest there (an upsampling keeps constants,
        # its weights summing to one up to the rounding of its coefficients, ~1e-7 relative in fp32).
        acc = None  # (b, H_1, W_1, D), contiguous: tokens of stage 1's grid
        for i in reversed(range(len(maps))):
            x = maps[i]
            h, w = x.shape[-2:]
            tokens = map_to_tokens(x)
            same_dtype = acc is not None and acc.dtype == tokens.dtype == matrices[i].dtype  # (autocast: no)
            if (h, w) == (height, width) and same_dtype and eager:  # acc += x W^T in the GEMM itself
                acc.view(-1, acc.shape[-1]).addmm_(tokens.reshape(-1, tokens.shape[-1]), matrices[i].t())
                continue
            y = _linear(tokens, matrices[i], bias if i == len(maps) - 1 else None).view(b, h, w, -1)
            if (h, w) == (height, width):
                acc = y if acc is None else acc.add_(y)
            elif eager and x.device.type == "cpu" and _power_of_two(height, h) and _power_of_two(width, w):
                acc = _upsample_by_phases(y, height // h, width // w, acc)
            else:  # PyTorch's channels-last bilinear kernel: two taps per axis, one pass over its output
                up = F.interpolate(y.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", align_corners=False)
                up = up.permute(0, 2, 3, 1)
                acc = up.contiguous() if acc is None else acc.add_(up)
        features = self.dropout(F.relu(acc.permute(0, 3, 1, 2), inplace=True))  # (b, D, H_1, W_1), channels-last
        if out is None:
            return self._classify(features)
        self._classify(features, out[index : index + 1])
        return out

    def _band_rows(self, maps: list[torch.Tensor], matrices: list[torch.Tensor]) -> int:
        """Rows per band for :meth:`_folded_logits_banded`, or 0 where one image's head runs whole: where the
        (H_1, W_1, D) sum would be a fresh mapping (above glibc's mmap threshold; below it, whole is as fast),
        on the CPU, in one dtype, with every stage a power-of-two factor smaller than stage 1."""
        height, width = maps[0].shape[-2:]
        d, dtype = matrices[0].shape[0], matrices[0].dtype
        if len(maps) < 2 or maps[0].device.type != "cpu" or any(x.dtype != dtype for x in maps):
            return 0  # (in-place accumulation: one dtype)
        if _cpu_autocast() and dtype != _cpu_autocast_dtype():
            return 0  # (autocast would compute in another dtype than the accumulation's)
        if not _is_mapped(height * width * d * maps[0].element_size()):
            return 0
        if not all(_power_of_two(height, x.shape[-2]) and _power_of_two(width, x.shape[-1]) for x in maps):
            return 0
        step = max(height // x.shape[-2] for x in maps)  # bands start on rows of every stage's grid
        return max(step, _BAND_BYTES // (width * d * maps[0].element_size()) // step * step)

    def _folded_logits_banded(
        self,
        maps: list[torch.Tensor],
        matrices: list[torch.Tensor],
        bias: torch.Tensor,
        band: int,
        out: torch.Tensor | None,
        index: int,
    ) -> torch.Tensor:
        """:meth:`_folded_logits` for one image, ``band`` rows of stage 1's grid at a time: the projected deeper
        stages (small) are upsampled band by band (each band's source rows with one halo row each side), stage 1
        is added inside its GEMM, then ReLU and the classifier — the same values, with every full-resolution
        intermediate (the D-channel sum, the upsampled maps) band-sized: in cache, and never a fresh mapping."""
        height, width = maps[0].shape[-2:]
        last = len(maps) - 1
        small = {}  # the deeper stages projected at their own resolution, (1, h_i, w_i, D)
        for i in range(1, len(maps)):
            h, w = maps[i].shape[-2:]
            small[i] = _linear(map_to_tokens(maps[i]), matrices[i], bias if i == last else None).view(1, h, w, -1)
        tokens = map_to_tokens(maps[0]).reshape(height * width, -1)  # (H_1 * W_1, C_1)
        for r0 in range(0, height, band):
            r1 = min(height, r0 + band)
            acc = None  # (1, r1 - r0, W_1, D)
            for i in reversed(range(1, len(maps))):  # deepest first, as in the whole-image path
                sh, sw = height // small[i].shape[1], width // small[i].shape[2]
                acc = _upsample_by_phases(small[i], sh, sw, acc, rows=(r0 // sh, r1 // sh))
            acc.view(-1, acc.shape[-1]).addmm_(tokens[r0 * width : r1 * width], matrices[0].t())
            logits = self._classify(self.dropout(F.relu(acc.permute(0, 3, 1, 2), inplace=True)))
            if out is None:
                out, index = logits.new_empty((1, logits.shape[1], height, width)), 0
            out[index : index + 1, :, r0:r1] = logits
        assert out is not None
        return out

    # In training the BatchNorm needs the batch statistics of the fused map, so it cannot be folded, but the
    # concatenation and the 1×1 fuse conv still can: fuse(cat_i up(W_i x_i + b_i)) = sum_i up(F_i W_i x_i + F_i b_i).
    # Gradients flow through the products F_i W_i, so they are those of the plain head.
    def _forward_factored(self, maps: list[torch.Tensor]) -> torch.Tensor:
        d, n = self.config.decoder_hidden_size, len(self.linear_c)
        fuse = self.linear_fuse.weight.reshape(d, n, d)
        size = maps[0].shape[-2:]
        out = None
        for i in reversed(range(n)):
            f_i, proj = fuse[:, n - 1 - i, :], self.linear_c[i].proj
            y = _linear(map_to_tokens(maps[i]), f_i @ proj.weight, f_i @ proj.bias)  # (B, H_i*W_i, D)
            y = tokens_to_map(y, *maps[i].shape[-2:])
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        # Batch statistics from an NCHW tensor: PyTorch's channels-last BatchNorm kernel accumulates them less
        # accurately (up to ~30x the error on some weights), which would show in every gradient.
        return self._classify(self.dropout(self.activation(self.batch_norm(out.contiguous()))))

    def _classify(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The 1×1 classifier conv as one batched matmul over channels-last pixels → (B, num_labels, H, W),
        into ``out`` (a contiguous tensor of that shape) when given."""
        b, _, h, w = x.shape
        k = self.classifier.out_channels  # (a Python int: an exported graph's class axis stays a number)
        dtype, x, weight, bias = _inference_operands(x, self.classifier.weight, self.classifier.bias)
        weight = weight.flatten(1)  # (K, D); bias (K,)
        pixels = map_to_tokens(x)  # (B, H*W, D)
        large = weight.numel() * pixels.shape[1] >= _ONEDNN_MIN_MACS
        onednn = dtype is not None and _LINEAR_POINTWISE and torch.backends.mkldnn.enabled
        if b == 1 and large and onednn and bias is not None:
            # oneDNN's matmul with the pixels as its "weight" operand: (K, D) @ (D, H*W), NCHW-contiguous logits,
            # 1.2-1.6x the batched BLAS call below on the head's shapes; the bias added in place
            logits = torch.ops.mkldnn._linear_pointwise(weight, pixels[0], None, "none", [], "").add_(bias[:, None])
            if out is None:
                return logits.view(1, k, h, w)
            out.view(k, h * w).copy_(logits)
            return out
        # (K, D) @ (B, D, H*W): the result is already NCHW-contiguous, with no copy of the largest output
        args = (bias[None, :, None], weight.expand(b, -1, -1), pixels.transpose(1, 2))
        if out is not None:  # autocast does not cast for out= variants: in out's dtype, as autocast would
            torch.baddbmm(*(a.to(out.dtype) for a in args), out=out.view(b, k, h * w))
            return out
        return torch.baddbmm(*args).view(b, k, h, w)


def _cuda_capturing() -> bool:
    """Whether a CUDA graph is being captured on this thread's stream (no synchronisation allowed)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _pointwise_conv(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a plain 1×1 channel map: kernel, stride and dilation 1, no padding, one group."""
    plain = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
    return plain and conv.padding in ((0, 0), "valid")


def _capturing_graph() -> bool:
    """Whether a graph is being recorded (jit.trace, ONNX export, torch.compile / torch.export): in-place and
    out= shortcuts and private kernels stay out of such graphs, which keep one op per step for their own
    compilers."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or _is_exporting()


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5


# Under CPU bf16 autocast, an inference part of the model (an encoder stage, the folded head) whose largest matrix
# product is below this many multiply-adds runs in float32: there bf16's per-call costs (the activations' casts,
# oneDNN's bf16 call, ~60-75 µs more than fp32's) outweigh what its arithmetic saves (~6 µs per million, measured
# on AVX-512-BF16 at 67M: break-even ~12M). On an AMX Xeon (2 threads) stages at 2^24 still lost (b2 at 128×128:
# 1.06× fp32's time, b1 1.10×) and at 2^25 none did (b0/b1/b2 at 128-320 px: 0.84-1.02×): 2^25, float32 (the
# exact one) where in doubt. A b0 then runs its encoder in fp32 up to 256×256 and all of it in bf16 at 512×512.
_BF16_MIN_MACS = 1 << 25


def _bf16_does_not_pay(module: nn.Module, weight: torch.Tensor, macs: int) -> bool:
    """Whether ``module``'s forward, whose largest product has ``macs`` multiply-adds, runs in float32 under the
    CPU bf16 autocast it is in (its inputs cast to float32; fp32 is there the faster and the more exact): below
    :data:`_BF16_MIN_MACS`, float32 weights (``weight``, one of them), on the fast path of an eval-mode module,
    with no autograd graph recorded and none being captured."""
    return (
        macs < _BF16_MIN_MACS
        and weight.dtype == torch.float32
        and _cpu_autocast()
        and _cpu_autocast_dtype() == torch.bfloat16
        and not module.training
        and getattr(module, "fast_path", False)
        and not torch.is_grad_enabled()
        and not _capturing_graph()
    )


def _autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``device_type`` (a null context where it has no autocast)."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))  # torch >= 2.4
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


def _fold_dtype(device: torch.device) -> torch.dtype:
    """The decode head's folding arithmetic: float64 where the device has it (the result is rounded once), else
    float32 (MPS)."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


# PyTorch's oneDNN operators, where they were measured: x86-64 builds with oneDNN (AVX2 and AVX-512 kernels)
_ONEDNN_X86 = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
_CONV_POINTWISE = _ONEDNN_X86 and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
_LINEAR_POINTWISE = _ONEDNN_X86 and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_LINEAR_BINARY = _LINEAR_POINTWISE and "binary" in torch.ops.mkldnn._linear_pointwise.overloads()
# oneDNN's matmul reorders the weight on every call (10-30 µs more than BLAS on small products, measured): it
# pays from ~8M multiply-adds (b0's key/value projections of 256 tokens stay with BLAS)
_ONEDNN_MIN_MACS = 1 << 23


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _cpu_autocast_dtype() -> torch.dtype:
    try:
        return torch.get_autocast_dtype("cpu")
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype()


@functools.cache
def _native_cpu_bf16() -> bool:
    """Whether this CPU computes in bfloat16 (segformer.precision.reduced_precision_problem: the instructions,
    PyTorch's AVX-512 kernels, oneDNN's bf16 path). Elsewhere bf16 is emulated and the fast paths leave it to
    PyTorch's ops."""
    return reduced_precision_problem(torch.bfloat16, "cpu") is None


_FAST_DTYPES = (torch.float32, torch.bfloat16)


def _inference_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a CPU inference fast path computes ``x`` with ``weight`` in, or None where it leaves the layer
    to PyTorch's own op: float32 operands; bfloat16 operands on a CPU that computes in bf16; under CPU bfloat16
    autocast (on such a CPU), bfloat16: the operands cast as autocast would cast them (:func:`_cast`). Never
    with an autograd graph to record (autocast's casts must be in it) or while a graph is captured."""
    if x.device.type != "cpu" or _capturing_graph():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    if _cpu_autocast():
        dtype = _cpu_autocast_dtype()
        if dtype != torch.bfloat16 or x.dtype not in _FAST_DTYPES or weight.dtype not in _FAST_DTYPES:
            return None
    else:
        dtype = x.dtype
        if weight.dtype != dtype or dtype not in _FAST_DTYPES:
            return None
    return dtype if dtype == torch.float32 or _native_cpu_bf16() else None


def _copy_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of a conv weight's channels-last copy (:func:`_on_weight_copy` allowed it): the
    weight's own, or under CPU bf16 autocast the bf16 that autocast would cast it to."""
    return _cpu_autocast_dtype() if _cpu_autocast() else weight.dtype


def _inference_operands(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.dtype | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_inference_dtype` of ``x`` and ``weight``, and the operands in it: under CPU bf16 autocast ``x`` cast
    as autocast would cast it and the weights' casts (:func:`_cast`); otherwise as given."""
    dtype = _inference_dtype(x, weight)
    if dtype is not None and _cpu_autocast():
        return dtype, x.to(dtype), _cast(weight, dtype), _cast(bias, dtype)
    return dtype, x, weight, bias


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` (a weight: a parameter, a buffer, a cached fold) in ``dtype``: itself, or a cast made for this call,
    with autocast's values. Not kept between calls: checking a kept cast against the weight's values (a write
    through ``.data`` moves no version counter) reads twice the fp32 bytes that a new cast reads (b2 at 512×512
    on an AMX Xeon, 2 threads: 120 ms per forward cast per call, 129 ms on checked kept casts; 34 against 43 ms
    at 128×128), and a kept cast costs half the fp32 weights' memory while the model lives."""
    return t if t is None or t.dtype == dtype else t.detach().to(dtype)


def _is_mapped(nbytes: int) -> bool:
    """Whether glibc serves a block of ``nbytes`` with a fresh mapping (its pages faulted in on first touch)
    rather than from its heap (see segformer.allocator)."""
    return nbytes >= MMAP_THRESHOLD


def _power_of_two(size: int, source: int) -> bool:
    """Whether ``size`` is ``source`` times a power of two: the kernel's source coordinates (o + 0.5)/s - 0.5
    are then exact in floating point, and so are the blending weights of :func:`_upsample_by_phases`."""
    factor, rest = divmod(size, source)
    return rest == 0 and factor & (factor - 1) == 0


def _upsample_by_phases(
    y: torch.Tensor, sh: int, sw: int, acc: torch.Tensor | None, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of ``y`` (B, h, w, D) by the integer factors ``sh``, ``sw``
    (powers of two, where the weights equal the kernel's exactly), added into ``acc`` ((B, sh*h, sw*w, D),
    contiguous) in place, or into a new tensor when ``acc`` is None. With ``rows`` = (i0, i1), only output rows
    sh*i0 … sh*i1 - 1 (``acc`` then holds just those).

    With an integer factor s, output pixel s*i + p lies at source coordinate i + o_p, o_p = (p + 0.5)/s - 0.5,
    the same offset for every i: each output phase p is one blend of two shifted copies of the input (edge
    pixels repeated, which is the kernel's clamping). Axis by axis, horizontal on the small map first, then
    vertical phases, each a whole-row slice of the output — streaming passes that run 2–4× faster than
    PyTorch's generic kernel (whose per-pixel index arithmetic dominates) and add into ``acc`` directly."""
    b, h, w, d = y.shape
    i0, i1 = rows if rows is not None else (0, h)
    n = i1 - i0
    padded = _edge_padded(y, i0, i1)  # (B, n + 2, w + 2, D)
    wide = y.new_empty(b, n + 2, w, sw, d)  # (B, n + 2, W, D): rows still padded for the vertical pass
    for p in range(sw):
        offset = (p + 0.5) / sw - 0.5
        neighbour = padded[:, :, 0:w] if offset < 0 else padded[:, :, 2 : w + 2]
        torch.lerp(padded[:, :, 1 : w + 1], neighbour, abs(offset), out=wide[:, :, :, p])
    wide = wide.view(b, n + 2, w * sw, d)
    out = y.new_empty(b, n * sh, w * sw, d) if acc is None else acc
    out_rows = out.view(b, n, sh, w * sw, d)
    for p in range(sh):
        offset = (p + 0.5) / sh - 0.5
        centre, neighbour = wide[:, 1 : n + 1], wide[:, 0:n] if offset < 0 else wide[:, 2 : n + 2]
        if acc is None:
            torch.lerp(centre, neighbour, abs(offset), out=out_rows[:, :, p])
        else:
            out_rows[:, :, p].add_(centre, alpha=1 - abs(offset)).add_(neighbour, alpha=abs(offset))
    return out


def _edge_padded(y: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """Rows i0 - 1 … i1 and columns -1 … w of ``y`` (B, h, w, D), edge pixels repeated (the bilinear kernel's
    clamp at the borders): a block copy and its edges, where index_select's gather over an outer axis ran at
    a tenth of the memory's speed (stage 2 of b0 at 512²: ~1.5 ms of a ~100 ms forward on an AVX2 Zen 3)."""
    b, h, w, d = y.shape
    lo, hi = max(i0 - 1, 0), min(i1 + 1, h)  # the rows that exist
    top = lo - (i0 - 1)  # 1 where row i0 - 1 is the repeated first row
    padded = y.new_empty(b, i1 - i0 + 2, w + 2, d)
    padded[:, top : top + hi - lo, 1 : w + 1] = y[:, lo:hi]
    if top:
        padded[:, 0, 1 : w + 1] = y[:, 0]
    if i1 == h:
        padded[:, -1, 1 : w + 1] = y[:, h - 1]
    padded[:, :, 0] = padded[:, :, 1]
    padded[:, :, w + 1] = padded[:, :, w]
    return padded


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over the last axis as one 2-D GEMM (3-D input without bias would take the slower bmm); in fp32
    CPU inference oneDNN's matmul, 5–35% faster than the BLAS call behind F.linear on SegFormer's shapes on an
    AVX-512 CPU (Zen 4, its kernels or capped at AVX2; on an AVX2-only Zen 3 0–10% slower at batch 1, b2 most:
    README, Speed), the weights reordered on the fly; in bf16
    (:func:`_inference_dtype`: native bf16, or bf16 autocast on the weights' casts) oneDNN's too."""
    dtype, x, weight, bias = _inference_operands(x, weight, bias)
    y = _rows_linear(x.reshape(-1, x.shape[-1]), weight, bias, dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def _rows_linear(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None
) -> torch.Tensor:
    """:func:`_linear` of 2-D ``rows`` whose operands are already in the fast path's ``dtype`` (None: none)."""
    if _onednn_matmul(rows, weight, dtype):
        return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return F.linear(rows, weight, bias)


def _onednn_matmul(rows: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None) -> bool:
    """Whether :func:`_rows_linear` runs oneDNN's matmul for ``rows`` times ``weight``ᵀ in the fast path's
    ``dtype`` (None: none): below _ONEDNN_MIN_MACS, oneDNN's overhead outweighs BLAS's fp32 GEMM; bf16 has no
    BLAS (PyTorch's own bf16 matmul calls oneDNN too, through more layers): oneDNN's matmul at every size."""
    large = rows.shape[0] * weight.shape[0] * weight.shape[1] >= _ONEDNN_MIN_MACS or dtype == torch.bfloat16
    return large and dtype is not None and _LINEAR_POINTWISE and torch.backends.mkldnn.enabled


def _rows_linear_add(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """``residual + linear(rows)`` in fp32 (``residual`` (B, N, C) contiguous, ``rows`` (B·N, K)), shaped as
    ``residual``. Where :func:`_rows_linear` runs oneDNN's matmul, the sum is its epilogue: the same two fp32
    roundings in the same order (the product plus bias, then plus the residual: the same bits, tested), one pass
    fewer over the output and no separate output tensor."""
    if _LINEAR_BINARY and residual.is_contiguous() and _onednn_matmul(rows, weight, torch.float32):
        flat = residual.view(-1, weight.shape[0])
        return torch.ops.mkldnn._linear_pointwise.binary(rows, flat, weight, bias, "add").view(residual.shape)
    return residual + _rows_linear(rows, weight, bias, torch.float32).view(residual.shape)


def _dense(linear: nn.Module, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """``linear(x)``; oneDNN's matmul (see :func:`_linear`) when ``fast``, in fp32 or bf16 CPU eval-mode
    inference, for a plain, unhooked nn.Linear (a quantised, wrapped or hooked module, a graph being captured, or
    a train-mode forward without gradients — a reentrant checkpoint's, recomputed later with them — runs the
    module)."""
    if fast and type(linear) is nn.Linear and not linear.training and _unhooked(linear) and not _capturing_graph():
        return _linear(x, linear.weight, linear.bias)  # (which decides oneDNN or BLAS)
    return linear(x)


def _unhooked(*modules: nn.Module) -> bool:
    """Whether no forward hook would see these modules run: fused kernels skip the modules' own forward."""
    if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


# ----------------------------------------------------------------------------------------- task models
_init_state = threading.local()


@contextlib.contextmanager
def _init_deferred() -> Iterator[None]:
    """Inside, models skip their weight initialisation: the enclosing model initialises everything once."""
    previous = getattr(_init_state, "deferred", False)
    _init_state.deferred = True
    try:
        yield
    finally:
        _init_state.deferred = previous


# the modules with a fast path of their own; the model's fast_path switches them all
_FAST_PATH_MODULES = (
    SegformerOverlapPatchEmbeddings,
    SegformerEfficientSelfAttention,
    SegformerSelfOutput,
    SegformerMixFFN,
    SegformerDecodeHead,
)


class SegformerPreTrainedModel(PreTrainedMixin, nn.Module):
    """Common base: config handling, weight initialisation, from_pretrained / save_pretrained."""

    config_class = SegformerConfig
    base_model_prefix = "segformer"

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__()
        if not isinstance(config, SegformerConfig):
            raise TypeError(f"config must be a SegformerConfig, got {type(config).__name__}")
        config.validate()
        self.config = config

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()

    def init_weights(self) -> None:
        """(Re-)initialise every weight: N(0, initializer_range) for Linear/Conv, 0 biases, unit norms."""
        with torch.no_grad():
            self.apply(self._init_weights)

    def post_init(self) -> None:
        if not getattr(_init_state, "deferred", False):
            self.init_weights()

    @property
    def fast_path(self) -> bool:
        """Exact eval-mode fast math (fused attention kernel, folded decode head). Set False for the plain path."""
        return all(m.fast_path for m in self.modules() if isinstance(m, _FAST_PATH_MODULES))

    @fast_path.setter
    def fast_path(self, value: bool) -> None:
        for module in self.modules():
            if isinstance(module, _FAST_PATH_MODULES):
                module.fast_path = bool(value)

    # The PreTrainedModel helpers that training tools call (PEFT, Trainer). SegFormer has no token embeddings and
    # no output embeddings: its "input embeddings" are the first overlapping patch embedding.
    def get_input_embeddings(self) -> nn.Module:
        """The module that embeds the pixels: stage 1's overlapping patch embedding."""
        return self.base_model.encoder.patch_embeddings[0]

    def get_output_embeddings(self) -> None:
        """None: no output embeddings to tie (as for Transformers' vision models)."""
        return None

    def tie_weights(self) -> None:
        """Nothing to tie."""

    @classmethod
    def can_generate(cls) -> bool:
        return False

    def enable_input_require_grads(self) -> None:
        """Make the patch embedding's output require gradients, so that with a frozen encoder (LoRA) and reentrant
        gradient checkpointing (``use_reentrant=True``) the adapters inside the checkpointed blocks still get
        gradients: the reentrant checkpoint passes gradients only to inputs that require them."""
        self.disable_input_require_grads()

        def require_grads(module: nn.Module, args: Any, output: tuple[torch.Tensor, int, int]) -> None:
            output[0].requires_grad_(True)

        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(require_grads)

    def disable_input_require_grads(self) -> None:
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each block's activations in the backward pass (less memory for large crops).
        ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (default use_reentrant=False)."""
        kwargs = checkpoint_kwargs(gradient_checkpointing_kwargs)
        for module in self.modules():
            if isinstance(module, SegformerEncoder):
                module.gradient_checkpointing = True
                module.gradient_checkpointing_kwargs = dict(kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, SegformerEncoder):
                module.gradient_checkpointing = False

    def _flags(
        self, output_attentions: bool | None, output_hidden_states: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        c = self.config
        return (
            c.output_attentions if output_attentions is None else output_attentions,
            c.output_hidden_states if output_hidden_states is None else output_hidden_states,
            c.return_dict if return_dict is None else return_dict,
        )


class SegformerModel(SegformerPreTrainedModel):
    """The bare MiT encoder, returning the raw hidden states of its four stages."""

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__(config)
        self.encoder = SegformerEncoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple[torch.Tensor, ...]:
        """pixel_values: (B, num_channels, H, W) float. Returns :class:`BaseModelOutput` (or a tuple)."""
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict
        )
        check_pixel_values(pixel_values, self.config)
        stages, attentions = self.encoder(
            pixel_values, output_attentions, self.config.reshape_last_stage, contiguous_stages=output_hidden_states
        )
        stages = stages if output_hidden_states else [stages[-1].contiguous()]
        out = BaseModelOutput(
            last_hidden_state=stages[-1],
            hidden_states=tuple(stages) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()


class SegformerForSemanticSegmentation(SegformerPreTrainedModel):
    """MiT encoder + all-MLP decode head; logits at 1/4 of the input resolution."""

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__(config)
        with _init_deferred():
            self.segformer = SegformerModel(config)
        self.decode_head = SegformerDecodeHead(config)
        self.post_init()

    def _head_input(self, stages: list[torch.Tensor], pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The stages for the head: a model of one stage kept token-shaped (``reshape_last_stage=False``) has no map
        before it to size it by, so it becomes a map here, sized from the input (it was an IndexError: audit)."""
        if len(stages) == 1 and stages[0].ndim == 3:
            return [tokens_to_map(stages[0], *stage_sizes(self.config, *pixel_values.shape[-2:])[0])]
        return stages

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SemanticSegmenterOutput | tuple[torch.Tensor, ...]:
        """pixel_values: (B, C, H, W) float; labels: optional (B, h, w) class ids of any size (ignore index
        ``config.semantic_loss_ignore_index``). Returns loss (with labels), logits (B, num_labels, H/4, W/4),
        hidden_states and attentions when asked."""
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict
        )
        check_pixel_values(pixel_values, self.config)
        if self.config.num_labels < 1:
            raise ValueError(f"semantic segmentation needs num_labels >= 1, the config has {self.config.num_labels}")
        head = self.decode_head
        if _bf16_does_not_pay(head, head.classifier.weight, self.segformer.encoder._largest_stage_macs(pixel_values)):
            # every encoder stage too small for bf16 to pay: the head alone in bf16 saved less than autocast's own
            # costs (b0 at 128×128: 1.01-1.06× fp32's time), so the whole forward runs in fp32, autocast off
            with _autocast_disabled("cpu"):
                return self.forward(pixel_values.float(), labels, output_attentions, output_hidden_states, return_dict)
        chunk = self._cpu_chunk(pixel_values) if not (output_attentions or output_hidden_states) else 0
        if 0 < chunk < pixel_values.shape[0]:
            stages, attentions, logits, batch = [], [], None, pixel_values.shape[0]
            for start in range(0, batch, chunk):  # each chunk's logits written into the batch's tensor
                parts = self.segformer.encoder(
                    pixel_values[start : start + chunk], False, self.config.reshape_last_stage
                )
                maps = self.decode_head._maps(self._head_input(parts[0], pixel_values))
                logits = self.decode_head._forward_folded(maps, logits, start, batch)
        else:
            stages, attentions = self.segformer.encoder(
                pixel_values, output_attentions, self.config.reshape_last_stage, contiguous_stages=output_hidden_states
            )
            logits = self.decode_head(self._head_input(stages, pixel_values))
        loss = semantic_loss(logits, labels, self.config) if labels is not None else None
        out = SemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=tuple(stages) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()

    def _cpu_chunk(self, pixel_values: torch.Tensor) -> int:
        """Images per chunk for a CPU inference batch (0: no chunking). A batch runs in chunks whose largest
        encoder activation (stage 1's Mix-FFN hidden map) stays below 32 MiB, the largest block glibc's heap
        reuses; above it every tensor is a fresh mapping, and page faults cost ~45% of a b0 forward at
        batch 8, 512×512. Chunks of the encoder are exact: nothing mixes images in eval mode. (GPUs, training
        and graphs being traced or compiled keep the whole batch.)"""
        if (
            self.training
            or pixel_values.device.type != "cpu"
            or torch.is_grad_enabled()
            or not self.decode_head._folds()  # (chunks write their logits through the folded head)
            or _capturing_graph()
        ):
            return 0
        c = self.config
        stride = c.strides[0]
        tokens = math.ceil(pixel_values.shape[-2] / stride) * math.ceil(pixel_values.shape[-1] / stride)
        per_image = tokens * c.hidden_sizes[0] * c.mlp_ratios[0] * pixel_values.element_size()
        return max(1, (MMAP_THRESHOLD - 1) // per_image)  # strictly below: see _is_mapped (header included)


_BAND_BYTES = 8 << 20  # a banded Mix-FFN's hidden map per band (SegformerMixFFN._forward_banded)


class SegformerForImageClassification(SegformerPreTrainedModel):
    """MiT encoder + a linear classifier on the mean of the last stage's tokens (ImageNet pre-training)."""

    def __init__(self, config: SegformerConfig) -> None:
        super().__init__(config)
        with _init_deferred():
            self.segformer = SegformerModel(config)
        self.classifier = nn.Linear(config.hidden_sizes[-1], config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SegFormerImageClassifierOutput | tuple[torch.Tensor, ...]:
        """pixel_values: (B, C, H, W); labels: (B,) class ids, (B,) or (B, num_labels) regression targets, or
        (B, num_labels) multi-label targets. Returns loss (with labels), logits (B, num_labels), …"""
        output_attentions, output_hidden_states, return_dict = self._flags(
            output_attentions, output_hidden_states, return_dict
        )
        check_pixel_values(pixel_values, self.config)
        stages, attentions = self.segformer.encoder(
            pixel_values, output_attentions, self.config.reshape_last_stage, contiguous_stages=output_hidden_states
        )
        last = stages[-1]
        tokens = map_to_tokens(last) if last.ndim == 4 else last  # (B, N, C)
        logits = self.classifier(tokens.mean(dim=1))
        if labels is not None and self.config.problem_type is None:  # the first labels decide, as in Transformers
            self.config.problem_type = infer_problem_type(self.config.num_labels, labels)
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        out = SegFormerImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=tuple(stages) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()


# ---------------------------------------------------------------------------------------------- losses
def semantic_loss(
    logits: torch.Tensor, labels: torch.Tensor, config: SegformerConfig, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss of (B, K, h, w) logits against (B, H, W) labels of any size: the logits are upsampled bilinearly
    (align_corners=False) to the labels. K > 1: cross-entropy over the pixels that are not
    ``semantic_loss_ignore_index`` (with ``class_weights`` (K,), the weighted mean: sum of w[y] · loss over
    sum of w[y], as PyTorch's ``weight=``). K == 1: binary cross-entropy with logits, zeroed on invalid pixels
    (label < 0 or the ignore index) and averaged over all pixels."""
    ignore = config.semantic_loss_ignore_index
    k = logits.shape[1]  # the classifier's own count (a classifier swapped for another label count: its count)
    if k < 1:
        raise ValueError(f"a loss needs logits of at least one class, got shape {tuple(logits.shape)}")
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape (batch={logits.shape[0]}, height, width), got {tuple(labels.shape)}")
    if labels.is_floating_point() and k > 1:
        raise ValueError(f"labels must hold integer class ids, got {labels.dtype}")
    labels = labels.to(logits.device)
    logits = logits.contiguous(memory_format=torch.channels_last)  # upsampled channels-last too
    if k == 1:  # (in float32 at least, as Transformers' float labels make it; float64 stays float64)
        upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        upsampled = upsampled.to(torch.promote_types(upsampled.dtype, torch.float32))
        valid = ((labels >= 0) & (labels != ignore)).to(upsampled.dtype)
        loss = F.binary_cross_entropy_with_logits(upsampled[:, 0], labels.to(upsampled.dtype), reduction="none")
        return (loss * valid).mean()
    labels = labels.long()
    if torch.compiler.is_compiling():  # the textbook composition, which the compiler fuses by itself
        return _composed_cross_entropy(logits, labels, class_weights, ignore)
    bad = (labels != ignore) & ((labels < 0) | (labels >= k))
    if bad.any():  # a data-dependent check; compiled graphs skip it
        value = labels[bad][0].item()
        raise ValueError(f"labels hold {value}, outside 0..{k - 1} and not the ignore index {ignore}")
    if logits.dtype == torch.float64:  # its own precision: the fused function computes in float32, as autocast
        return _composed_cross_entropy(logits, labels, class_weights, ignore)  # runs cross-entropy
    return _UpsampledCrossEntropy.apply(logits, labels, class_weights, ignore)


def _composed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None, ignore: int
) -> torch.Tensor:
    """semantic_loss's cross-entropy as autograd composes it (the reference for _UpsampledCrossEntropy).
    Over (pixels, classes) rows: the class axis contiguous makes log-softmax and its backward ~2x faster on the
    CPU than over dim 1 of an NCHW tensor. The mean over valid pixels is written as sum / count, so a batch
    whose pixels are all ignored gives a zero loss (with a graph) instead of NaN, without a branch."""
    upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    rows = upsampled.permute(0, 2, 3, 1).reshape(-1, upsampled.shape[1])
    labels = labels.reshape(-1)
    if class_weights is not None:
        weights = class_weights.to(device=rows.device, dtype=rows.dtype)
        total = F.cross_entropy(rows, labels, weight=weights, ignore_index=ignore, reduction="sum")
        valid = labels != ignore
        return total / weights[labels[valid]].sum().clamp_min(torch.finfo(total.dtype).tiny)
    total = F.cross_entropy(rows, labels, ignore_index=ignore, reduction="sum")
    return total / (labels != ignore).sum().clamp_min(1).to(total.dtype)


class _UpsampledCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (B, K, h, w) logits upsampled bilinearly to (B, H, W) labels, one image at a time.

    Autograd's composition keeps the full-resolution (B, K, H, W) upsampled logits, their log-softmax and, in
    the backward pass, the gradients of both: at 512×512, 150 classes and batch 8 that is 1.26 GB each, the
    largest memory of a training step. The gradient of a mean cross-entropy in the upsampled logits z is known
    in closed form as soon as z is, w·(softmax(z) − onehot(y)) / Σw, so this computes it during the forward
    pass, per image, and maps it straight back through the upsampling (its adjoint, PyTorch's own
    upsample_bilinear2d_backward) to the small logits: only one image's full-resolution tensor exists at a
    time, and the backward pass is a scaling. Same math as the composition, in fp32 (as autocast runs
    cross-entropy); the loss sums in float64 where the device has it. No double backward."""

    @staticmethod
    def forward(ctx, logits, labels, class_weights, ignore):  # type: ignore[override]
        b, k, h, w = logits.shape
        height, width = labels.shape[-2:]
        valid = labels != ignore
        safe = labels.masked_fill(~valid, 0)
        weights = valid.float() if class_weights is None else class_weights.to(logits.device).float()[safe] * valid
        # all ignored: a zero loss and zero gradients, not NaN
        denom = weights.sum().clamp_min(1.0 if class_weights is None else torch.finfo(torch.float32).tiny)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits, dtype=torch.float32, memory_format=torch.channels_last) if need_grad else None
        total = logits.new_zeros((), dtype=torch.float32 if logits.device.type == "mps" else torch.float64)
        with torch.autocast(logits.device.type, enabled=False):
            for n in range(b):
                small = logits[n : n + 1].float().contiguous(memory_format=torch.channels_last)
                z = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
                rows = z.permute(0, 2, 3, 1).reshape(-1, k)  # a view: (pixels, classes), classes contiguous
                y, wy = safe[n].reshape(-1, 1), weights[n].reshape(-1)
                lse = torch.logsumexp(rows, dim=1)
                total += ((lse - rows.gather(1, y)[:, 0]) * wy).sum(dtype=total.dtype)
                if need_grad:
                    rows.sub_(lse[:, None]).exp_()  # softmax, in place of z
                    rows.scatter_add_(1, y, torch.full_like(y, -1, dtype=rows.dtype))  # − onehot(y)
                    rows.mul_(wy[:, None])  # weighted; ignored pixels zero
                    grad[n : n + 1] = torch.ops.aten.upsample_bilinear2d_backward(
                        z, [height, width], [1, k, h, w], False
                    )
        ctx.save_for_backward(grad, denom)
        ctx.dtype = logits.dtype
        return (total / denom).to(torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # type: ignore[override]
        grad, denom = ctx.saved_tensors
        return (grad * (grad_loss / denom)).to(ctx.dtype), None, None, None


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """Regression for one label, single-label classification for integer labels, multi-label otherwise."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: SegformerConfig) -> torch.Tensor:
    """MSE (regression), cross-entropy (single label) or BCE-with-logits (multi-label); the problem type is
    ``config.problem_type`` or, when unset, inferred: regression for one label, single-label for integer
    labels, multi-label otherwise."""
    labels = labels.to(logits.device)
    problem = config.problem_type or infer_problem_type(config.num_labels, labels)
    if problem != "single_label_classification":  # float labels: in float32 at least, as Transformers computes
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1).long())
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def load_segmentation_model(name_or_path: Any, **kwargs: Any) -> SegformerForSemanticSegmentation:
    """``SegformerForSemanticSegmentation.from_pretrained(name_or_path, **kwargs)`` for the commands that use
    its predictions (predict, eval, serve, export): a checkpoint without decode-head weights (an encoder such as
    nvidia/mit-b0, an image classifier) is a ValueError, where from_pretrained would warn and leave the head
    random. Without ``kwargs``, a checkpoint whose config.json is missing or does not fit its weights is reported in
    command-line words (:func:`segformer.hub.for_command_line`)."""
    held: list[logging.LogRecord] = []  # the loader's warnings, said only where the model is used (below)
    loading = threading.get_ident()

    class Hold(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.thread != loading:  # (other threads' lines pass as they come)
                return True
            held.append(record)
            return False

    hold, logger = Hold(), logging.getLogger("segformer")
    logger.addFilter(hold)
    try:
        model, info = SegformerForSemanticSegmentation.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except CheckpointError as exc:
        if kwargs:
            raise
        raise for_command_line(exc) from None
    finally:
        logger.removeFilter(hold)
    missing_head = sorted(k for k in info["missing_keys"] if k.startswith("decode_head."))
    if missing_head:  # (without "newly initialised ... train the model before use" first: two lines, one wrong)
        architectures = ", ".join(model.config.architectures or []) or "no decode head"
        raise ValueError(
            f"{name_or_path}: not a segmentation checkpoint ({architectures}; {len(missing_head)} decode-head "
            "weights missing): use a SegformerForSemanticSegmentation checkpoint, e.g. one from segformer train"
        )
    for record in held:
        logger.handle(record)
    return model


__all__ = [
    "BaseModelOutput",
    "SegFormerImageClassifierOutput",
    "SegformerDecodeHead",
    "SegformerForImageClassification",
    "SegformerForSemanticSegmentation",
    "SegformerModel",
    "SegformerPreTrainedModel",
    "SemanticSegmenterOutput",
]
