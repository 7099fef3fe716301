"""Prediction over whole images: whole, aligned (ADE20K), sliding-window (Cityscapes), multi-scale + flip.

Every mode ends the same way, as in mmseg's test-time code: the logits of one pass are brought to that pass's
input size (bilinear, align_corners=False), then resized to the output size, then turned into probabilities;
the probabilities of all passes (scales × flips) are averaged. Logits are cast to float32 before any of this,
so a bf16 or fp16 model gives float32 probabilities.

Memory: each pass runs the model on the whole batch, its logits at the model's 1/4 resolution; everything at
full resolution is computed one image at a time. :func:`infer` adds each pass's probabilities into its
(B, K, H, W) result, one pass held at a time, and holds no second such tensor. :func:`predict_labels` with one
pass holds none at all (b0, 150 classes, batch 8 at 512×512: 0.4 GB added at the peak instead of 2.7 GB); with
several it takes whichever holds less, estimated from the model's config before any forward: every pass's logits
kept, then averaged image by image (scales 0.75, 1, 1.25 and flips: 1.5 GB instead of 6.9 GB), or infer's running
sum, a (B, K, H, W) float32 accumulator plus one pass (overlapping sliding windows at several scales, whose
logits outgrow the output). One image's full-resolution work takes two areas per call, sized up front (the largest
pass; the output) so that they page-fault once; for K > 1 it runs channels-last (:meth:`_Pass.logits`), and the
labels' accumulators too, while :func:`infer`'s result is contiguous. Inside :func:`reuse_work_areas` the calls of
a loop share those areas (mapped once per loop, not per call).

:class:`InferenceOptions` is the one definition of these options (mode, crop_size, stride, short_side,
long_side, align, scales, flip): :func:`infer`, :func:`segformer.evaluate.evaluate`,
:class:`segformer.predict.SegformerPredictor`, ``TrainConfig``'s eval_* fields and the command-line options
(:func:`segformer.commands.add_inference_arguments`) all go through it.

>>> options = InferenceOptions(mode="slide", crop_size=(1024, 1024), stride=(768, 768))
>>> probs = infer(model, pixel_values, options)  # (B, K, H, W); infer(model, pixel_values, mode="slide", ...) too
>>> labels = predict_labels(model, pixel_values, mode="aligned", scales=[0.75, 1.0, 1.25], flip=True)
>>> InferenceOptions.from_dict(options.to_dict()) == options
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import numbers
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .allocator import MMAP_THRESHOLD
from .distributed import unwrap_model
from .modeling import check_channels_and_dtype
from .precision import cpu_flags, reduced_precision_problem

MODES = ("whole", "aligned", "slide")


def _check_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.ndim == 0):
        value = (value, value)
    try:
        whole = [_whole_number(v) for v in value]
    except TypeError:  # (not a sequence)
        whole = [False]
    if len(whole) != 2 or not all(whole) or min(float(v) for v in value) < 1:
        raise ValueError(f"{name} must be two positive integers (height, width), got {value!r}")
    return int(value[0]), int(value[1])


def _whole_number(v: Any) -> bool:
    """An int, or an integral float / NumPy scalar / 0-d tensor (32.0 yes; 32.7, "32", True and NaN no)."""
    if isinstance(v, (bool, str, bytes)):
        return False
    try:
        f = float(v)
    except (TypeError, ValueError, RuntimeError):
        return False
    return math.isfinite(f) and f.is_integer()


def _check_scales(scales: Any) -> tuple[float, ...] | None:
    """``scales`` as a tuple of positive finite floats (None or empty: None; one number: a one-scale tuple);
    ValueError naming the option otherwise ("12" was read as scales 1 and 2, [True] as 1.0: audit)."""
    if scales is None:
        return None
    if isinstance(scales, numbers.Real) or (isinstance(scales, torch.Tensor) and scales.ndim == 0):
        scales = [scales]
    values = None
    if not isinstance(scales, (str, bytes)):
        try:
            values = list(scales)
        except TypeError:
            pass
    numeric = values is not None and all(
        not isinstance(v, (bool, str, bytes)) and (isinstance(v, numbers.Real) or _zero_dim(v)) for v in values
    )
    if not numeric:
        raise ValueError(f"scales must be a list of positive numbers, got {scales!r}")
    floats = tuple(float(v) for v in values)
    if not all(math.isfinite(v) and v > 0 for v in floats):
        raise ValueError(f"scales must be positive finite numbers, got {list(floats)}")
    return floats or None


def _zero_dim(v: Any) -> bool:
    """A 0-d tensor or array of a real dtype (what indexing a tensor or array of scales gives)."""
    return getattr(v, "ndim", None) == 0 and getattr(getattr(v, "dtype", None), "is_complex", False) is False


# the options that one mode alone reads
_MODE_FIELDS = {"slide": ("crop_size", "stride"), "aligned": ("short_side", "long_side", "align")}


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a model over whole images (see :func:`infer` for what each mode does).

    mode: "whole", "aligned" or "slide". crop_size, stride: the sliding window (an int N means (N, N); stored
    as (height, width) tuples of ints; the stride may not exceed the crop). short_side, long_side, align: the
    "aligned" resize target and rounding. scales: multi-scale ratios (None or empty: one pass at scale 1;
    stored as a tuple of floats). flip: add horizontally flipped passes.

    Frozen and validated on construction (ValueError). ``to_dict`` / ``from_dict`` give and take plain JSON
    values, ``replace(**changes)`` a validated copy.
    """

    mode: str = "whole"
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    short_side: int = 512
    long_side: int = 2048
    align: int = 32
    scales: tuple[float, ...] | None = None
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        crop_size, stride = _check_pair(self.crop_size, "crop_size"), _check_pair(self.stride, "stride")
        if stride[0] > crop_size[0] or stride[1] > crop_size[1]:
            raise ValueError(f"stride {stride} is larger than crop_size {crop_size}: some pixels would be skipped")
        sides = {"short_side": self.short_side, "long_side": self.long_side, "align": self.align}
        for name, value in sides.items():
            if not _whole_number(value) or float(value) < 1:  # (NaN, inf and None raised int()'s own errors: audit)
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        scales = _check_scales(self.scales)
        if isinstance(self.flip, (str, bytes)) or self.flip not in (True, False):  # ("no" was True: audit)
            raise ValueError(f"flip must be True or False, got {self.flip!r}")
        for name, value in (
            ("crop_size", crop_size),
            ("stride", stride),
            ("scales", scales),
            ("flip", bool(self.flip)),
            *((k, int(v)) for k, v in sides.items()),
        ):
            object.__setattr__(self, name, value)

    @property
    def single_pass(self) -> bool:
        """True when the options make one pass per image (no multi-scale, no flip)."""
        return self.scales in (None, (1.0,)) and not self.flip

    def replace(self, **changes: Any) -> InferenceOptions:
        """A validated copy with ``changes`` applied (the dataclass fields' names)."""
        return dataclasses.replace(self, **changes)

    def changed(self, **changes: Any) -> InferenceOptions:
        """:meth:`replace` for options a person gives (the command line, a training run's eval options): a crop
        given without a stride, smaller than the stride in force, takes a stride in that stride's proportion to
        its crop (341 of 512: 2/3) instead of being refused for a stride larger than the crop."""
        crop = changes.get("crop_size")
        if crop is not None and changes.get("stride") is None:
            crop = _check_pair(crop, "crop_size")
            if any(s > c for s, c in zip(self.stride, crop, strict=True)):
                ratios = [s / c for s, c in zip(self.stride, self.crop_size, strict=True)]
                changes["stride"] = tuple(max(1, min(c, round(c * r))) for c, r in zip(crop, ratios, strict=True))
        return self.replace(**changes)

    def warn_unused(self, given: Iterable[str], prefix: str = "") -> None:
        """One warning line per mode for the options in ``given`` (field names a person set) that only another mode
        than this one reads, as the command-line flags ``--{prefix}NAME`` (``--crop`` with whole or aligned: the
        mode came from a checkpoint or the data set unless given too). They change nothing, though the options
        record them."""
        given = set(given)
        for mode, fields in _MODE_FIELDS.items():
            unused = [f"--{prefix}{name.replace('_', '-')}" for name in fields if name in given]
            if unused and self.mode != mode:
                one = len(unused) == 1
                logging.getLogger("segformer").warning(
                    f"{' and '.join(unused)} {'applies' if one else 'apply'} to {mode} mode and change"
                    f"{'s' if one else ''} nothing in {self.mode} mode, the mode in force (add --{prefix}mode {mode})"
                )

    def describe(self) -> str:
        """The protocol in a few words, e.g. "slide 1024x1024 stride 768x768, scales 0.5,1,1.5, flip"."""
        if self.mode == "slide":
            words = f"slide {self.crop_size[0]}x{self.crop_size[1]} stride {self.stride[0]}x{self.stride[1]}"
        elif self.mode == "aligned":
            words = f"aligned {self.short_side} short side (long at most {self.long_side}), sides x{self.align}"
        else:
            words = "whole"
        if self.scales not in (None, (1.0,)):
            words += ", scales " + ",".join(f"{v:g}" for v in self.scales)
        return words + (", flip" if self.flip else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON values: ``{"mode": ..., "crop_size": [h, w], "stride": [h, w], ..., "scales": [...] | None}``."""
        d = dataclasses.asdict(self)
        d["crop_size"], d["stride"] = list(self.crop_size), list(self.stride)
        d["scales"] = None if self.scales is None else list(self.scales)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InferenceOptions:
        """The inverse of :meth:`to_dict`; missing keys take the defaults, unknown keys are a ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown inference option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**data)


def resolve_options(options: InferenceOptions | None, keywords: dict[str, Any]) -> InferenceOptions:
    """``options`` (default: InferenceOptions()) with the keyword arguments of the older API applied, as
    :meth:`InferenceOptions.changed` applies them (a crop given alone takes a stride that fits it)."""
    if options is not None and not isinstance(options, InferenceOptions):
        raise TypeError(f"options must be an InferenceOptions, got {type(options).__name__}")
    options = InferenceOptions() if options is None else options
    return options.changed(**keywords) if keywords else options


# ----------------------------------------------------------------------------------------------- precision
# The rule itself (which precisions a device computes in) is segformer.precision's; here, what a request becomes.
_warned: set[str] = set()


def select_dtype(
    dtype: str | torch.dtype | None, device: str | torch.device, *, warn: bool = True, **machine: Any
) -> torch.dtype:
    """The dtype to run ``dtype`` (a torch dtype or a name: "float32", "bf16", "bfloat16", "fp16", ...; None
    is float32) on ``device``: itself where it runs natively (:func:`reduced_precision_problem`, which takes
    ``machine``'s keywords), else float32, with one warning line (logger "segformer", once per reason) saying
    why. The one precision rule of ``segformer predict --dtype``, ``segformer eval --amp``, ``segformer train
    --amp``, :class:`~segformer.predict.SegformerPredictor` and :func:`autocast`."""
    return _select_dtype(dtype, device, warn=warn, machine=machine)[0]


def _select_dtype(
    dtype: str | torch.dtype | None, device: str | torch.device, *, warn: bool, machine: dict[str, Any]
) -> tuple[torch.dtype, str | None]:
    """:func:`select_dtype`'s (dtype, the fallback line or None: the dtype runs as asked)."""
    from .pretrained import resolve_dtype

    value = resolve_dtype(dtype)
    problem = reduced_precision_problem(value, device, **machine)
    if problem is None:
        return value, None
    message = f"{str(value).removeprefix('torch.')} on {torch.device(device).type}: {problem}; using float32"
    if warn and message not in _warned:
        _warned.add(message)
        logging.getLogger("segformer").warning(message + ", which is faster here")
    return torch.float32, message


def effective_amp(amp: str | None, device: str | torch.device, **machine: Any) -> tuple[str, str | None]:
    """The ``--amp`` value that runs on ``device`` and why it is not ``amp``: ("none", None) for None / "none" /
    "fp32"; (``amp``, None) where the device computes in it natively; ("none", the one-line reason, e.g.
    "bfloat16 on cpu: this CPU has no bfloat16 arithmetic (...); using float32") where it would only be emulated
    (:func:`select_dtype`'s rule and warning; ``machine`` as :func:`reduced_precision_problem`)."""
    if amp in (None, "none", "fp32"):
        return "none", None
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16, got {amp!r}")
    dtype, reason = _select_dtype(amp, device, warn=True, machine=machine)
    return ("none", reason) if dtype == torch.float32 else (amp, None)


def autocast(device: torch.device, amp: str | None):
    """The autocast context of an ``--amp`` value: None / "none" / "fp32" (a null context), "bf16", "fp16".
    A reduced precision the device would only emulate becomes float32 (a null context) with one warning line
    (:func:`effective_amp`)."""
    amp = effective_amp(amp, device)[0]
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def labels_from_probs(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, K, H, W) class probabilities → (B, H, W) int64 class ids: the argmax over K, or for a one-label
    (binary, sigmoid) model 1 where the probability is above ``threshold`` (0.5), else 0. Logits work too with
    ``threshold=0``: softmax and sigmoid keep their order, so the labels are the same except where rounding makes
    two probabilities equal (classes a few float32 roundings apart; sigmoid(z) rounds to 0.5 for 0 < z <= ~6e-8)."""
    if probs.shape[1] == 1:
        return (probs[:, 0] > threshold).long()
    # max's indices are argmax's (the first maximum; NaN counts as the maximum), from a kernel 2-4x faster on
    # the CPU over a non-last dimension (b0 slide inference at 1024x2048, 19 classes: 253 -> 68 ms)
    return torch.max(probs, dim=1).indices


def upsampled_argmax(probs: torch.Tensor, size: tuple[int, int], rows: int | None = None) -> torch.Tensor:
    """(B, K, h, w) probabilities → (B, H, W) int64 class ids at ``size`` = (H, W): the argmax of the bilinearly
    upsampled (align_corners=False, as F.interpolate) logits, computed ``rows`` output rows at a time (default:
    as many as keep each (B, K, rows, W) slice within 32 MiB) so that only a slice ever exists at full size.
    K == 1 (sigmoid): logit > 0.

    For huge images: (B, K, H, W) float32 probabilities of a 12 MP photo with 150 classes take 7 GB. log p
    differs from the logits by a per-pixel constant, so upsampling log p gives the argmax of the logits — up to
    what probabilities keep: below 1e-30 (a class ~69 logits under a pixel's top) they count as 1e-30, so where
    a class that far down on one source pixel leads on its neighbour, the border between the two may move (a
    fraction of a pixel). :func:`predict_labels` upsamples the logits themselves and has no such limit."""
    binary = probs.shape[1] == 1
    p = probs.clamp(1e-30, 1 - 1e-7) if binary else probs.clamp_min(1e-30)
    values = p.log() - (-p).log1p() if binary else p.log()  # the logits, up to a per-pixel constant
    return _upsampled_argmax(values, size, rows)


def _upsampled_argmax(
    values: torch.Tensor, size: tuple[int, int], rows: int | None = None, confidence: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, K, h, w) logits (or anything with their per-pixel argmax, such as log-probabilities) → (B, H, W) int64
    argmax of their bilinear upsampling to ``size``, in bands of ``rows`` output rows; K == 1: value > 0.
    Equal to the argmax of F.interpolate's result except where two classes' values are within its rounding.
    With ``confidence`` (B, H, W) float32, each band's :func:`top_probability` is written into it as well."""
    height, width = size
    h = values.shape[-2]
    if rows is None:
        rows = max(1, MMAP_THRESHOLD // (4 * values.shape[0] * values.shape[1] * width))
    (y0, y1), (_, far) = _bilinear_taps(h, height)  # each output row's two source rows, as F.interpolate's
    wy = far.to(device=values.device, dtype=values.dtype)
    out = torch.empty((values.shape[0], height, width), dtype=torch.long, device=values.device)
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        # Widen the needed source rows (same row count: the height is untouched), then blend rows in place:
        # top + (bottom - top) · wy.
        top = F.interpolate(values[:, :, y0[r0:r1]], size=(r1 - r0, width), mode="bilinear", align_corners=False)
        blend = F.interpolate(values[:, :, y1[r0:r1]], size=(r1 - r0, width), mode="bilinear", align_corners=False)
        blend.sub_(top).mul_(wy[r0:r1].view(1, 1, -1, 1)).add_(top)  # (B, K, rows, W)
        del top
        out[:, r0:r1] = labels_from_probs(blend, threshold=0.0)  # blend holds logits: > 0 is p > 0.5
        if confidence is not None:
            confidence[:, r0:r1] = top_probability(blend)
    return out


def top_probability(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Logits with their K classes along ``dim`` (B, K, ... by default) → float32 confidence without that axis:
    the probability of the class the argmax picks, the softmax's largest value (1 / Σ exp(z - max z)); for a
    one-label (sigmoid) model the probability of the label that z > 0 gives, sigmoid(|z|)."""
    if logits.shape[dim] == 1:
        return torch.sigmoid(logits.squeeze(dim).float().abs())
    return torch.softmax(logits.float(), dim=dim).amax(dim=dim)


def label_probability(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) probabilities (:func:`infer`'s) and their (B, H, W) labels (:func:`labels_from_probs`) →
    (B, H, W) the probability of each pixel's label: the largest; for a one-label model p or 1 - p."""
    if probs.shape[1] == 1:
        return probs[:, 0].where(labels == 1, 1 - probs[:, 0])
    return probs.amax(1)


def _resize(t: torch.Tensor, size: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear, align_corners=False; into ``out`` when given (F.interpolate's kernel and arithmetic: its ``out``
    variant, which F.interpolate lacks)."""
    if out is None:
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return torch.ops.aten.upsample_bilinear2d.out(t, list(size), False, None, None, out=out)


def _flip_into(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``t`` (1, K, h, w) flipped left-right into ``out``, in bands of rows: flip has no ``out`` (its out variant
    copies a whole fresh result; index_select is 7x slower), so each band's copy stays small (an eighth of the
    rows, at most 16 MiB)."""
    rows = max(1, min(-(-t.shape[-2] // 8), (MMAP_THRESHOLD // 2) // (4 * t.shape[1] * t.shape[-1])))
    for r0 in range(0, t.shape[-2], rows):
        out[..., r0 : r0 + rows, :] = t[..., r0 : r0 + rows, :].flip(-1)
    return out


def _empty(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape``: every full-resolution allocation of a call goes through here
    (the work areas and one accumulator: three per call)."""
    return torch.empty(tuple(shape), dtype=torch.float32, device=device)


class _Scratch:
    """Two float32 work areas for the per-image tensors of one call, reused for every image and pass: a batch maps
    (and page-faults) its full-resolution temporaries once instead of once per image (for b0 at 512×512 with 150
    classes, 8 fresh 157 MB mappings took longer than the upsampling written into them). :meth:`reserve` sizes
    both before the first pass, so that growing scales do not map them again.
    Each step writes into the area its input is not in, contiguous or (``channels_last``) in (1, H, W, K) memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # the two work areas, and one image's probability sum over passes (labels only), each 1-D
        self.areas: list[torch.Tensor | None] = [None, None, None]

    def _area(self, j: int, n: int) -> torch.Tensor:
        """Area ``j`` with at least ``n`` elements: a smaller one is dropped (before the new one is mapped)."""
        area = self.areas[j]
        if area is None or area.numel() < n:
            self.areas[j] = None
            area = self.areas[j] = _empty((n,), self.device)
        return area

    def _view(self, j: int, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
        """The start of area ``j`` as a (1, K, H, W) tensor, a view of (1, H, W, K) memory with ``channels_last``."""
        area = self._area(j, math.prod(shape))[: math.prod(shape)]
        if channels_last:
            b, k, h, w = shape
            return area.view(b, h, w, k).permute(0, 3, 1, 2)
        return area.view(shape)

    def sum_area(self, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
        """An uninitialised float32 (1, K, H, W) tensor (channels-last memory with ``channels_last``) for one
        image's sum over passes, apart from the two work areas, kept like them for the next call."""
        return self._view(2, shape, channels_last)

    def sum_rows(self, n: int, k: int, most: int) -> torch.Tensor:
        """An uninitialised float32 (n, K) tensor in the same area as :meth:`sum_area`: one image's sum over passes
        for n of its ``most`` pixels (the area sized for all of them: the next image, with more such pixels, maps
        no new one)."""
        return self._area(2, most * k)[: n * k].view(n, k)

    def reserve(self, first: int, second: int) -> None:
        """The areas at ``first`` and ``second`` float32 elements now (:func:`_work_elements`: the first at the
        largest a call takes, the second at one output), so that passes of growing scales page-fault them once,
        not once per scale. The first take of a step goes to the first area, the next to the other."""
        self._area(0, first)
        self._area(1, second)

    def take(
        self, shape: tuple[int, ...], avoid: torch.Tensor | None = None, channels_last: bool = False
    ) -> torch.Tensor:
        """An uninitialised float32 tensor of ``shape`` in the work area that does not hold ``avoid``; with
        ``channels_last``, a (1, K, H, W) view of (1, H, W, K) memory (the layout of :meth:`_Pass.logits`)."""
        held = avoid.untyped_storage().data_ptr() if avoid is not None else None
        first = self.areas[0]
        j = 1 if first is not None and first.untyped_storage().data_ptr() == held else 0
        return self._view(j, shape, channels_last)


_shared = threading.local()  # .areas: {device: _Scratch} inside reuse_work_areas(), else absent or None


class WorkAreas:
    """Work areas an owner keeps between :func:`reuse_work_areas` blocks (``reuse_work_areas(areas)``): a generator
    that yields between images enters a block around each image's work and keeps its areas across the yields,
    without this thread's state changed while it is suspended. They go with the object."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, _Scratch] = {}

    @classmethod
    def current(cls) -> WorkAreas:
        """The areas of the :func:`reuse_work_areas` block this thread is in (the block's owner keeps using them),
        else new ones."""
        areas = cls()
        shared = getattr(_shared, "areas", None)
        if shared is not None:
            areas._by_device = shared
        return areas


@contextlib.contextmanager
def reuse_work_areas(areas: WorkAreas | None = None) -> Iterator[None]:
    """Inside, :func:`infer` and :func:`predict_labels` calls of this thread share their full-resolution work areas
    instead of mapping fresh ones per call: a loop over images pays their first-touch page faults once (b0, 150
    classes, one 512×683 photo in aligned mode: ~105,000 faults, 426 MB, per call otherwise). The areas (per device
    two work areas and one image's probability sum, each as large as the largest call needed) are released on
    leaving the outermost block, or kept in ``areas`` (a :class:`WorkAreas`) for its next block; the results never
    live in them. ``segformer eval`` (:func:`segformer.evaluate.evaluate`), ``segformer predict``
    (:func:`segformer.predict_folder.predict_to_folder`), :class:`~segformer.predict.SegformerPredictor`'s
    ``predict`` and ``predict_iter`` (on its own :class:`WorkAreas`), the server and training's validation pictures
    run their loops inside one."""
    previous = getattr(_shared, "areas", None)
    if areas is not None:
        _shared.areas = areas._by_device
    elif previous is None:
        _shared.areas = {}
    try:
        yield
    finally:
        _shared.areas = previous


def _scratch(device: torch.device) -> _Scratch:
    """This call's work areas: the thread's shared ones inside :func:`reuse_work_areas`, else new ones."""
    areas = getattr(_shared, "areas", None)
    if areas is None:
        return _Scratch(device)
    if device not in areas:
        areas[device] = _Scratch(device)
    return areas[device]


def _model_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) → float32 logits (B, K, h', w') at the model's resolution (1/4 of the input for SegFormer)."""
    out = model(x)
    if isinstance(out, torch.Tensor):  # the backends of segformer.backends return the logits alone
        logits = out
    else:
        logits = out.logits if hasattr(out, "logits") else out[0]  # return_dict=False models give tuples
    return logits.float()


def _min_side(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is None:
        return 1
    from .modeling import min_input_size

    return min_input_size(config)


def _probs(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over dim 1, or sigmoid when K == 1; written into ``out`` when given. Channels-last logits (with an
    ``out`` of that layout) take the softmax over their last memory dimension, a kernel 1.6x faster than over
    dim 1 of NCHW (150 classes at 512x683), which rounds differently."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits, out=out) if out is not None else logits.sigmoid()
    if _nhwc(logits) and (out is None or _nhwc(out)):
        last = torch.softmax(logits.permute(0, 2, 3, 1), -1, out=None if out is None else out.permute(0, 2, 3, 1))
        return last.permute(0, 3, 1, 2)
    return torch.softmax(logits, 1, out=out) if out is not None else logits.softmax(dim=1)


def _nhwc(t: torch.Tensor) -> bool:
    """Whether (B, K, H, W) ``t`` with K > 1 has its classes adjacent in memory (channels-last, or a crop of it)."""
    return t.shape[1] > 1 and t.stride(1) == 1


def _to_nchw(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(1, K, H, W) ``t`` in any layout copied into contiguous ``out``; (1, H, W, K) memory through copy_'s blocked
    2-D transpose (2x faster than an elementwise copy between the layouts)."""
    if _nhwc(t):
        k = t.shape[1]
        out.view(k, -1).copy_(t.permute(0, 2, 3, 1).reshape(-1, k).t())
    else:
        out.copy_(t)
    return out


def _mirrors(logits: torch.Tensor, width: int) -> bool:
    """Whether upsampling ``logits`` (…, w') to ``width`` maps mirrored output columns to mirrored source columns
    with mirrored weights: a power-of-two factor (width = w' · 2^n), so that every source position
    (j + 0.5) · w' / width - 0.5 and its weights are exact. Flipping before upsampling then equals flipping after
    up to rounding, not bit for bit: the kernel adds a pixel's terms in another order, and the right border blends
    a column with itself (0.625 z + 0.375 z) where the left one takes it as is."""
    w = logits.shape[-1]
    factor = width // w
    return width == factor * w and factor & (factor - 1) == 0


@dataclass
class _Pass:
    """One pass (one scale, flipped or not) of a batch, kept at the model's resolution: 1/16 of the pixels.

    windows: (y1, y2, x1, x2, logits (B, K, h', w') float32) of each forward; "whole" and "aligned" have one, over
    the whole ``padded`` input. padded: the (height, width) the windows tile (the pass's input padded up to the
    model's minimum size). size: the pass's input (height, width). count: (1, 1, *padded) windows
    per pixel for the sliding window, else None.
    """

    windows: list[tuple[int, int, int, int, torch.Tensor]]
    padded: tuple[int, int]
    size: tuple[int, int]
    flipped: bool
    count: torch.Tensor | None

    def logits(self, i: int, output_size: tuple[int, int], scratch: _Scratch) -> torch.Tensor:
        """Image ``i``'s float32 logits (1, K, H_out, W_out), valid until ``scratch`` is used again: each window's
        logits upsampled to its input size, window sums divided by the window count, the padding cropped away,
        flipped back, resized to ``output_size``. Every operation works on each image alone, so this is bit for bit
        the slice ``i`` of the same operations on the whole batch.

        Layout: for K > 1 every full-resolution step runs channels-last ((1, H, W, K) memory, returned as a
        (1, K, H, W) view of it): PyTorch's bilinear kernel for that layout is 2x faster, and the softmax over
        the last memory dimension 1.6x (150 classes at 512x683); its results differ from the NCHW kernel's by
        rounding. A flipped pass whose every window upsamples by a power of two (:func:`_mirrors`: SegFormer's
        exact 1/4, not "slide" windows of odd sizes) flips the windows' logits at the model's resolution instead:
        each window is upsampled into its mirrored place (the count mirrored too) and the crop taken from the
        right, the same sums in the same window order; the bilinear terms round differently (:func:`_mirrors`)."""
        k = self.windows[0][4].shape[1]
        (ph, pw), (h, w) = self.padded, self.size
        nhwc = k > 1
        mirror = self.flipped and all(_mirrors(t, x2 - x1) for _, _, x1, x2, t in self.windows)

        def up(logits: torch.Tensor, size: tuple[int, int], avoid: torch.Tensor | None) -> torch.Tensor:
            one = logits[i : i + 1]  # (1, K, h', w'): 1/16 of the pixels, so a flipped or NHWC copy is cheap
            one = one.flip(-1) if mirror else one
            one = one.contiguous(memory_format=torch.channels_last) if nhwc else one.contiguous()
            return _resize(one, size, scratch.take((1, k, *size), avoid, channels_last=nhwc))

        if self.count is None:
            full = up(self.windows[0][4], self.padded, None)
        else:
            full = scratch.take((1, k, ph, pw), channels_last=nhwc).zero_()
            for y1, y2, x1, x2, logits in self.windows:
                c1, c2 = (pw - x2, pw - x1) if mirror else (x1, x2)
                full[:, :, y1:y2, c1:c2] += up(logits, (y2 - y1, x2 - x1), full)  # (1, K, ch, cw)
            full.div_(self.count.flip(-1) if mirror else self.count)
        full = full[..., :h, pw - w :] if mirror else full[..., :h, :w]
        if self.flipped and not mirror:
            full = _flip_into(full, scratch.take(full.shape, full, channels_last=nhwc))
        if full.shape[-2:] != output_size:
            full = _resize(full, output_size, scratch.take((1, k, *output_size), full, channels_last=nhwc))
        return full

    def label_logits(self, i: int, output_size: tuple[int, int], scratch: _Scratch) -> torch.Tensor:
        """:meth:`logits` for labels: on the CPU a single window's (whole, aligned; flipped or not, K > 1, float32,
        finite) come through one matrix per axis (:func:`_values_by_axis_maps`): the same linear map, rounded
        once per axis instead of per resize, so within float32 rounding of :meth:`logits` (what :func:`infer`
        keeps), without the intermediate at the pass's input size. Other passes: :meth:`logits`."""
        logits = self.windows[0][4][i]
        if self.count is not None or not _maps_apply(logits):
            return self.logits(i, output_size, scratch)
        return _values_by_axis_maps(logits, *self.axis_chains(output_size), self.flipped, scratch)

    def axis_chains(self, output_size: tuple[int, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """A single window's way to ``output_size`` along each axis, as :func:`_axis_map` takes it: (resized to the
        padded input, the input kept, resized to the output) for the rows, then for the columns."""
        (ph, pw), (h, w) = self.padded, self.size
        return (ph, h, output_size[0]), (pw, w, output_size[1])


def _pass_inputs(height: int, width: int, opts: InferenceOptions) -> list[tuple[int, int]]:
    """The input (height, width) of each scale of ``opts`` for images of (height, width), in order (a flipped pass
    has the size of its scale's)."""
    sizes = []
    for scale in opts.scales if opts.scales is not None else (1.0,):
        if opts.mode == "aligned":  # the scaled target truncated, as mmsegmentation's multi-scale test scales
            size = aligned_size(
                height,
                width,
                short_side=max(1, int(opts.short_side * scale)),
                long_side=max(1, int(opts.long_side * scale)),
                align=opts.align,
            )
        else:  # half up, as mmsegmentation rescales by a factor (Python's round() takes halves to even: 22.5 → 22)
            size = (max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1))
        sizes.append(size)
    return sizes


def _work_elements(
    net: nn.Module,
    shape: Sequence[int],
    opts: InferenceOptions,
    k: int,
    out: tuple[int, int],
    labels_on: torch.device | None = None,
) -> tuple[int, int]:
    """What :meth:`_Scratch.reserve` takes for one image's full-resolution steps: (K times the largest of the
    passes' padded inputs and the output, K times the output). For labels on the CPU (``labels_on``) of whole or
    aligned passes with K > 1, which come through the axis maps (:meth:`_Pass.label_logits`: nothing at a pass's
    input size), K times the output twice; an area a pass turns out to need more of grows then."""
    if labels_on is not None and labels_on.type == "cpu" and opts.mode != "slide" and k > 1:
        return k * out[0] * out[1], k * out[0] * out[1]
    need = _min_side(net)
    sides = [_tiles(size, opts, need)[0] for size in _pass_inputs(shape[-2], shape[-1], opts)]
    return k * max(h * w for h, w in [*sides, out]), k * out[0] * out[1]


def _pass_count(opts: InferenceOptions) -> int:
    return len(opts.scales or (1.0,)) * (2 if opts.flip else 1)


def _tiles(
    size: tuple[int, int], opts: InferenceOptions, need: int
) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """The (height, width) a pass input of ``size`` is padded to, bottom/right up to the model's minimum side
    ``need``, and its windows (y1, y2, x1, x2): "whole" and "aligned" one; "slide" the windows of crop_size at
    stride, the last row/column shifted back to end at the border, and along an axis shorter than the crop one
    window of the input's length (as mmseg: the image is not padded up to the crop)."""
    h, w = size
    H, W = max(h, need), max(w, need)
    if opts.mode != "slide":
        return (H, W), [(0, H, 0, W)]
    (ch, cw), (sh, sw) = opts.crop_size, opts.stride
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, H), min(c * sw + cw, W)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return (H, W), boxes


def _forward_pass(model: nn.Module, x: torch.Tensor, opts: InferenceOptions, flipped: bool) -> _Pass:
    """The model over one pass's input (B, 3, h, w) (:func:`_tiles`): the image as is, or sliding windows of
    crop_size at stride (an image smaller than the crop in one window of its own size, as mmseg runs it); padded
    bottom/right only up to the model's minimum size (0 is the mean colour after normalising)."""
    h, w = x.shape[-2:]
    (H, W), boxes = _tiles((h, w), opts, _min_side(model))
    if (H, W) != (h, w):
        x = F.pad(x, (0, W - w, 0, H - h))
    if opts.mode != "slide":
        return _Pass([(0, H, 0, W, _model_logits(model, x))], (H, W), (h, w), flipped, None)
    windows = []
    count = torch.zeros((1, 1, H, W), device=x.device, dtype=torch.float32)
    for y1, y2, x1, x2 in boxes:
        windows.append((y1, y2, x1, x2, _model_logits(model, x[:, :, y1:y2, x1:x2])))
        count[:, :, y1:y2, x1:x2] += 1
    return _Pass(windows, (H, W), (h, w), flipped, count)


_SHRUNK_SAID: set[float] = set()  # the scales _say_shrunk has named in this process (one line each)


def _say_shrunk(scale: float, size: tuple[int, int], scaled: tuple[int, int], need: int) -> None:
    """One warning line per scale that shrinks an image below the model's minimum input (``--scales 1e-9`` ran
    on a 1x1 image padded up, and gave a map without a word: notes): that pass sees padding, not the image."""
    if scale in _SHRUNK_SAID:
        return
    _SHRUNK_SAID.add(scale)
    (h, w), (sh, sw) = size, scaled
    logging.getLogger("segformer").warning(
        f"scale {scale:g} shrinks a {h}x{w} input to {sh}x{sw}, below the model's minimum input of {need} pixels a "
        "side: that pass is padded up and sees little of the image (scales are factors: 0.5, not 50)"
    )


def _passes(model: nn.Module, x: torch.Tensor, opts: InferenceOptions) -> Iterator[_Pass]:
    """The passes of ``opts`` over the batch ``x`` (B, 3, H, W), in order: each scale, then its flipped copy."""
    H, W = x.shape[-2:]
    need = _min_side(model)
    for scale, size in zip(opts.scales or (1.0,), _pass_inputs(H, W, opts), strict=True):
        if min(size) < need <= min(H, W):
            _say_shrunk(scale, (H, W), size, need)
        scaled = x if size == (H, W) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if opts.flip else (False,):
            yield _forward_pass(model, scaled.flip(-1) if flipped else scaled, opts, flipped)


def _pass_bytes(model: nn.Module, shape: Sequence[int], opts: InferenceOptions) -> tuple[int, list[int]] | None:
    """(K, the bytes each pass of ``opts`` over a batch of ``shape`` (B, 3, H, W) holds), from the model's config,
    before any forward: every window's float32 logits, B·K·h'·w'·4 with (h', w') the first stage's size for the
    window (the logits' resolution: ceil(h/4) per side for SegFormer's stride-4 patch embedding with padding),
    plus the sliding window's count (padded H·W float32). None for a model without a SegFormer config."""
    config = getattr(model, "config", None)
    k = getattr(config, "num_labels", None)
    if k is None or not hasattr(config, "patch_sizes") or not hasattr(config, "strides"):
        return None
    from .modeling import stage_sizes

    b, need = shape[0], _min_side(model)
    held = []
    for size in _pass_inputs(shape[-2], shape[-1], opts):
        padded, boxes = _tiles(size, opts, need)
        n = sum(b * k * math.prod(stage_sizes(config, y2 - y1, x2 - x1)[0]) * 4 for y1, y2, x1, x2 in boxes)
        n += 4 * padded[0] * padded[1] if opts.mode == "slide" else 0
        held += [n] * (2 if opts.flip else 1)
    return k, held


def _memory_plan(
    model: nn.Module, shape: Sequence[int], opts: InferenceOptions, out_size: tuple[int, int]
) -> tuple[int, int] | None:
    """The bytes :func:`predict_labels`' two strategies for several passes add besides the per-image work areas
    that both use: (keeping every pass: all passes' logits plus one image's (K, H_out, W_out) probabilities;
    the running sum: one (B, K, H_out, W_out) float32 accumulator plus the largest pass). None where the model's
    config does not tell (:func:`_pass_bytes`)."""
    estimate = _pass_bytes(model, shape, opts)
    if estimate is None:
        return None
    k, held = estimate
    image = k * out_size[0] * out_size[1] * 4
    return sum(held) + image, shape[0] * image + max(held)


def _keeps_passes(plan: tuple[int, int] | None, agreeable: bool = False) -> bool:
    """The rule: keep every pass when that holds no more than the running sum (ties keep: no full-size batch to
    fault in), or no more than twice as much where the kept passes' labels can come from agreed labels
    (``agreeable``, :func:`_may_agree`), which only keeping allows; unknown sizes (None) take the running sum,
    bounded by the output plus one pass whatever the tiling."""
    return plan is not None and plan[0] <= (2 if agreeable else 1) * plan[1]


def _may_agree(net: nn.Module, opts: InferenceOptions, device: torch.device, out_size: tuple[int, int]) -> bool:
    """Whether several passes' labels may come from :func:`_agreed_pass_labels` (known before any forward): on the
    CPU, whole or aligned windows (through the axis maps), a config with at least two labels, an output of at
    least _AGREED_MIN_PASS_VALUES values per pass. (Whether the passes' logits then agree is seen only after the
    forwards.)"""
    k = getattr(getattr(net, "config", None), "num_labels", None)
    return device.type == "cpu" and opts.mode != "slide" and isinstance(k, int) and _agreement_may_pay(k, out_size)


def _agreement_may_pay(k: int, out_size: tuple[int, int]) -> bool:
    """Whether agreed labels may save several passes more than they cost: from _AGREED_MIN_CLASSES_PASSES classes
    and _AGREED_MIN_PASS_VALUES output values (K·H·W) per pass."""
    return k >= _AGREED_MIN_CLASSES_PASSES and k * out_size[0] * out_size[1] >= _AGREED_MIN_PASS_VALUES


def aligned_size(
    height: int, width: int, *, short_side: int = 512, long_side: int = 2048, align: int = 32
) -> tuple[int, int]:
    """mmseg's ADE20K test resize: scale keeping the ratio so that the image fits (long_side, short_side),
    i.e. long side ≤ long_side and short side ≤ short_side with one of them equal, then round each side up to
    a multiple of ``align``. Returns (height, width)."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    h, w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))  # (a 29x120000 strip: 1 row)
    return math.ceil(h / align) * align, math.ceil(w / align) * align


def _prepare(
    model: nn.Module, pixel_values: torch.Tensor, options: InferenceOptions | None, keywords: dict[str, Any]
) -> tuple[InferenceOptions, nn.Module, torch.Tensor]:
    """The options, the unwrapped model and the input on its device and dtype; ValueError for bad arguments."""
    opts = resolve_options(options, keywords)
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a (batch, 3, height, width) tensor, got {shape}")
    net = unwrap_model(model)
    _check_input(pixel_values, getattr(getattr(net, "config", None), "num_channels", None))
    check_crop_size(opts, _min_side(net))
    param = next(net.parameters(), None)
    x = pixel_values
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else x.dtype)
    return opts, net, x


def _check_input(pixel_values: torch.Tensor, channels: int | None) -> None:
    """ValueError, naming the caller's shape, for a batch the passes cannot take (audit: an empty one failed in a
    resize or a reshape; integers ran unnormalised into labels all 0, where the model's own forward refuses them; a
    channel error named the padded width; one NaN or infinite pixel made every probability of its image NaN)."""
    shape = tuple(pixel_values.shape)
    if pixel_values.numel() == 0:
        raise ValueError(f"pixel_values is empty (shape {shape})")
    check_channels_and_dtype(pixel_values, channels)  # (the model's own checks, on the caller's tensor)
    finite = torch.isfinite(pixel_values).flatten(1).all(dim=1)
    if not bool(finite.all()):
        image = int((~finite).nonzero()[0, 0])
        raise ValueError(f"pixel_values holds NaN or infinite values (image {image} of the batch, shape {shape})")


def check_crop_size(opts: InferenceOptions, need: int) -> None:
    """ValueError where sliding windows (``opts``) would be smaller than the model's minimum input ``need`` (its
    forward would refuse every window, naming a tensor rather than the option)."""
    if opts.mode == "slide" and min(opts.crop_size) < need:
        ch, cw = opts.crop_size
        raise ValueError(
            f"crop_size (--crop-size) {ch}x{cw} is below this model's minimum input of {need}x{need} pixels"
        )


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


@torch.no_grad()
def infer(
    model: nn.Module,
    pixel_values: torch.Tensor,
    options: InferenceOptions | None = None,
    *,
    output_size: tuple[int, int] | None = None,
    **keywords: Any,
) -> torch.Tensor:
    """Class probabilities for a batch of normalised images.

    pixel_values: (B, 3, H, W) float, normalised (ImageNet mean/std). Returns float32 (B, K, H_out, W_out) at
    ``output_size`` (default (H, W)): softmax over the K classes, or sigmoid when K == 1.

    ``options``: an :class:`InferenceOptions` (default: ``InferenceOptions()``, whole image). Its fields may
    also be passed as keywords (``infer(model, x, mode="slide", crop_size=(1024, 1024), stride=(768, 768))``),
    alone or as changes to ``options``; invalid values raise ValueError.

    Modes: ``"whole"`` runs the tensor as is; ``"aligned"`` first resizes it keeping the ratio to fit
    (long_side, short_side) and rounds each side up to a multiple of ``align`` (mmseg's ADE20K test pipeline);
    ``"slide"`` runs ``crop_size`` windows at ``stride``, sums the logits and divides by the per-pixel window
    count (along a side shorter than the crop, one window of that side's length: as mmseg, no padding to the
    crop; only up to the model's minimum input, cropped away after). ``scales`` (e.g.
    [0.75, 1.0, 1.25]) multiply the image size ("aligned": the (long_side, short_side) target) and ``flip``
    adds a horizontally flipped pass of each scale; the probabilities of all passes are averaged.

    Runs under torch.no_grad with the model in eval mode (its previous mode is restored), on the model's device
    and dtype; the logits are cast to float32 before resizing and softmax. Each pass runs the model on the whole
    batch; everything at full resolution is computed one image at a time and written into the result, so the
    result is the only (B, K, H_out, W_out) tensor (besides, per pass, the model's logits: 1/16 of the pixels).
    """
    opts, net, x = _prepare(model, pixel_values, options, keywords)
    H, W = x.shape[-2:]
    out_size = _check_pair(output_size, "output_size") if output_size is not None else (H, W)
    with _eval_mode(net):
        probs, passes = _summed_probs(net, x, opts, out_size)
    return probs.div_(passes) if passes > 1 else probs


def _summed_probs(
    net: nn.Module, x: torch.Tensor, opts: InferenceOptions, out_size: tuple[int, int], channels_last: bool = False
) -> tuple[torch.Tensor, int]:
    """(the sum of every pass's probabilities (B, K, H_out, W_out) float32, the number of passes): pass by pass,
    image by image, each added into the one result; a pass is dropped before the next one's forward. The result
    is contiguous, or with ``channels_last`` (for labels) in (B, H_out, W_out, K) memory, the layout of
    :meth:`_Pass.logits`, which spares each image's transposition; for labels the passes' logits are their
    :meth:`_Pass.label_logits`."""
    b = x.shape[0]
    probs: torch.Tensor | None = None
    passes, scratch = 0, _scratch(x.device)
    for one in _passes(net, x, opts):
        if probs is None:
            k = one.windows[0][4].shape[1]
            scratch.reserve(*_work_elements(net, x.shape, opts, k, out_size, x.device if channels_last else None))
            if channels_last and k > 1 and b == 1:  # (labels only: kept with the work areas, like one image's sum)
                probs = scratch.sum_area((1, k, *out_size), channels_last=True)
            elif channels_last and k > 1:
                probs = _empty((b, *out_size, k), x.device).permute(0, 3, 1, 2)
            else:
                probs = _empty((b, k, *out_size), x.device)
        for i in range(b):
            # (1, K, H_out, W_out); for labels (channels_last), through the axis maps where they apply
            logits = (one.label_logits if channels_last else one.logits)(i, out_size, scratch)
            if _nhwc(logits) == _nhwc(probs):
                if passes == 0:
                    _probs(logits, out=probs[i : i + 1])
                else:
                    probs[i : i + 1] += _probs(logits, out=scratch.take(logits.shape, logits, _nhwc(logits)))
            else:  # softmax channels-last, then into the NCHW result (an add across layouts is 10x slower)
                p = _probs(logits, out=scratch.take(logits.shape, logits, channels_last=True))
                if passes == 0:
                    _to_nchw(p, probs[i : i + 1])
                else:
                    probs[i : i + 1] += _to_nchw(p, scratch.take(logits.shape, p))
                del p
            del logits  # a view: it would keep an area that the next pass grows
        del one  # before the next pass's forward
        passes += 1
    assert probs is not None
    return probs, passes


@torch.no_grad()
def predict_labels(
    model: nn.Module,
    pixel_values: torch.Tensor,
    options: InferenceOptions | None = None,
    *,
    output_size: tuple[int, int] | None = None,
    band_above: int | None = None,
    **keywords: Any,
) -> torch.Tensor:
    """(B, H_out, W_out) int64 class ids: :func:`labels_from_probs` of ``infer(model, pixel_values, options,
    output_size=output_size, **keywords)`` (the argmax; for a one-label (binary) model, probability > 0.5).
    Takes :func:`infer`'s arguments.

    One pass takes the argmax of the logits themselves (softmax keeps their order; sigmoid(z) > 0.5 is z > 0) and
    holds no (B, K, H_out, W_out) tensor: the model runs on the whole batch, then each image is taken to full
    resolution alone. Labels can differ from the argmax of :func:`infer`'s probabilities only where two classes'
    rounded probabilities are equal. On the CPU, a pass whose logits take two resizes (to the input, then to
    another output size: "aligned", or ``output_size``) gets its labels from the two composed into one linear map
    per axis, in row bands (:func:`_composed_labels`, 10-15% faster end to end at 640x480 for b0 and 150 classes);
    there the labels can also differ where two classes are within that map's float32 rounding.

    Several passes (scales, flip) average the probabilities as :func:`infer` does. Where every pass takes infer's
    resizes (sliding windows, one label, other devices) the labels equal ``labels_from_probs(infer(...))`` bit for
    bit; on the CPU a whole or aligned pass's logits come to the output through one matrix per axis instead
    (:meth:`_Pass.label_logits`: no intermediate at the pass's input size; b0, 150 classes, a 512x683 photo at
    scales 0.5-1.75 with flips: 4.8-5.0 → 4.1-4.2 s, 1.55 → 1.09 GB added), so the labels can also
    differ where two classes' averaged probabilities are within that rounding. Either way, in one of two ways,
    chosen before any forward from the model's
    config (logits of B·K·h'·w' float32 per window, h' = ceil(h/4)): keep every pass's logits, then average image
    by image (holds all passes' logits plus one image's (K, H_out, W_out) probabilities), or :func:`infer`'s
    running sum, pass by pass (holds one (B, K, H_out, W_out) float32 accumulator plus the largest pass's logits).
    The rule: keep when that total is no larger, else the running sum; that is, the running sum where the passes
    outgrow the output, as overlapping sliding windows at several scales do (b0, 150 classes, batch 8, 512×512,
    slide 512/341, scales 0.5-1.75, flip: 3.3 GB against 2.0 GB). Where the kept passes' labels can come from the
    classes every pass agrees on (:func:`_agreed_pass_labels`: on the CPU, whole or aligned passes, from 2
    classes and 2^16 output values per pass), keeping is also chosen up to twice the running sum's bytes: only
    the pixels where the passes disagree then take the softmax and the sum (b0, 150 classes, a 512x683 photo at
    scales 0.5-1.75 with flips, aligned, on logits shaped like a trained model's: 78% of the pixels agreed, the
    step from the passes' logits to the labels 1.36 → 0.78 s; 0.44 GB planned against 0.25 GB). A model without a
    SegFormer config (num_labels, patch_sizes, strides) takes the running sum. Both also use one image's
    full-resolution work areas at the largest pass.

    ``band_above``: for a single pass (no scales, no flip, not "slide") whose last step upsamples to more than
    this many elements per image (K·H_out·W_out) and that the composed resizes do not take (those hold no such
    tensor either: a 3000x4000 photo, b0, 150 classes, aligned: 2-4 s and 0.53 GB instead of 6-8 s and 0.61 GB
    in bands), that upsampling is done in row bands straight into the argmax (:func:`upsampled_argmax`), so not
    even one image's (K, H_out, W_out) logits exist: for huge photos in "aligned" mode. Equal to the exact labels
    except where two classes are within rounding.
    """
    opts, net, x = _prepare(model, pixel_values, options, keywords)
    b, (H, W) = x.shape[0], x.shape[-2:]
    out_size = _check_pair(output_size, "output_size") if output_size is not None else (H, W)
    with _eval_mode(net):
        if _pass_count(opts) > 1:
            if _keeps_passes(_memory_plan(net, x.shape, opts, out_size), _may_agree(net, opts, x.device, out_size)):
                return _labels_keeping_passes(net, x, opts, out_size)
            return _labels_by_running_sum(net, x, opts, out_size)
        one = next(_passes(net, x, opts))  # kept at the model's resolution
    labels = torch.empty((b, *out_size), dtype=torch.long, device=x.device)
    scratch = _scratch(x.device)
    for i in range(b):
        _single_pass_labels(one, i, out_size, scratch, band_above, labels[i])
    return labels


def _single_pass_labels(
    one: _Pass,
    i: int,
    out_size: tuple[int, int],
    scratch: _Scratch,
    band_above: int | None,
    out: torch.Tensor,
    confidence: torch.Tensor | None = None,
) -> None:
    """Image ``i``'s labels of a single pass into ``out`` (H_out, W_out), as :func:`predict_labels` makes them,
    and with ``confidence`` (H_out, W_out) float32 each pixel's :func:`top_probability` of the same logits."""
    if _composes(one, i, out_size):
        _composed_labels(one, i, out_size, scratch, out, confidence)
    elif _banded(one, out_size, band_above):
        (_, _, _, _, logits), size = one.windows[0], one.size
        top = None if confidence is None else confidence[None]
        out.copy_(_upsampled_argmax(_resize(logits[i : i + 1], size), out_size, None, top)[0])
    else:  # the argmax of the logits (> 0 for K == 1)
        logits = one.logits(i, out_size, scratch)
        out.copy_(labels_from_probs(logits, threshold=0.0)[0])
        if confidence is not None:  # in bands of rows: no softmax of the whole image besides its logits
            rows = max(1, MMAP_THRESHOLD // (4 * logits.shape[1] * logits.shape[-1]))
            for r0 in range(0, logits.shape[-2], rows):
                confidence[r0 : r0 + rows] = top_probability(logits[..., r0 : r0 + rows, :])[0]


@torch.no_grad()
def predict_confidence(
    model: nn.Module,
    pixel_values: torch.Tensor,
    options: InferenceOptions | None = None,
    *,
    output_size: tuple[int, int] | None = None,
    band_above: int | None = None,
    **keywords: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, confidence): :func:`predict_labels`' (B, H_out, W_out) int64 labels and each pixel's confidence,
    (B, H_out, W_out) float32: the probability :func:`infer` gives the class the pixel got (its largest; for a
    one-label model that of the label, sigmoid(|z|)). Takes predict_labels' arguments.

    Without (B, K, H_out, W_out) probabilities. A single pass (no scales, no flip) runs once and gives the labels
    predict_labels gives, bit for bit, and the confidence of the same logits, in bands of rows: it holds what the
    labels hold (on the CPU, through the composed resizes, bands: a 3000x4000 photo with 150 classes in "aligned"
    mode holds no 7 GB of probabilities; where the labels take one image's logits, those). Several passes:
    :func:`infer` image by image, the labels its argmax (they can differ from predict_labels' where two classes'
    averaged probabilities are within rounding), holding one image's (K, H_out, W_out) probabilities."""
    opts, net, x = _prepare(model, pixel_values, options, keywords)
    b, (H, W) = x.shape[0], x.shape[-2:]
    out_size = _check_pair(output_size, "output_size") if output_size is not None else (H, W)
    labels = torch.empty((b, *out_size), dtype=torch.long, device=x.device)
    confidence = torch.empty((b, *out_size), dtype=torch.float32, device=x.device)
    if _pass_count(opts) > 1:
        for i in range(b):
            probs = infer(net, x[i : i + 1], opts, output_size=out_size)  # (1, K, H_out, W_out)
            labels[i : i + 1] = labels_from_probs(probs)
            confidence[i : i + 1] = label_probability(probs, labels[i : i + 1])
            del probs
        return labels, confidence
    with _eval_mode(net):
        one = next(_passes(net, x, opts))
    scratch = _scratch(x.device)
    for i in range(b):
        _single_pass_labels(one, i, out_size, scratch, band_above, labels[i], confidence[i])
    return labels, confidence


def _labels_keeping_passes(
    net: nn.Module, x: torch.Tensor, opts: InferenceOptions, out_size: tuple[int, int]
) -> torch.Tensor:
    """Several passes' labels: every forward first, each pass kept at the model's resolution, then image by image
    the probabilities of all passes added up in pass order and averaged (infer's arithmetic per element, on the
    passes' :meth:`_Pass.label_logits`). Where every pass's taps agree on a pixel's class
    (:func:`_agreed_pass_labels`), that class, and the probabilities only for the other pixels
    (:func:`_labels_where_passes_differ`): the same labels as :func:`_labels_by_running_sum`'s but where rounding
    ties two classes."""
    passes = list(_passes(net, x, opts))
    labels = torch.empty((x.shape[0], *out_size), dtype=torch.long, device=x.device)
    scratch = _scratch(x.device)
    scratch.reserve(*_work_elements(net, x.shape, opts, passes[0].windows[0][4].shape[1], out_size, x.device))
    for i in range(x.shape[0]):
        agreed = _agreed_pass_labels(passes, i, out_size)
        if agreed is not None:  # only the pixels whose passes disagree take the probabilities
            labels[i] = _labels_where_passes_differ(*agreed, passes, i, scratch)
            continue
        probs = None
        for one in passes:
            logits = one.label_logits(i, out_size, scratch)  # (1, K, H_out, W_out), channels-last for K > 1
            nhwc = _nhwc(logits)
            if probs is None:
                probs = _probs(logits, out=scratch.sum_area(tuple(logits.shape), channels_last=nhwc))
            else:
                probs += _probs(logits, out=scratch.take(logits.shape, logits, channels_last=nhwc))
            del logits  # a view: it would keep an area that the next pass grows
        assert probs is not None
        labels[i] = labels_from_probs(probs.div_(len(passes)))[0]
    return labels


def _agreed_pass_labels(
    passes: list[_Pass], i: int, out_size: tuple[int, int]
) -> tuple[torch.Tensor, list[_AxisMaps]] | None:
    """For image ``i`` of several passes that all come through the axis maps (whole or aligned windows, logits
    :func:`_maps_apply` takes): the (H, W) labels all passes agree on and each pass's :func:`_axis_maps`, or None
    where some pass has no agreed labels (:func:`_agreed_labels`: one class, no regions), none are left, or the
    output is small (under _AGREED_MIN_PASS_VALUES values per pass).

    Why they are the labels: where every tap's source pixel of every pass ranks class c first, c is the first
    maximum of each pass's mapped logits (see :func:`_agreed_labels`), so of its softmax (monotone), and of the
    mean of the passes' probabilities (a sum of vectors that each have c as first maximum). In float32, only a
    rounding-level tie with an earlier class can differ."""
    if not _agreement_may_pay(passes[0].windows[0][4].shape[1], out_size):
        return None  # (one class, or a small output: the plain sum is as fast)
    known, maps = None, []
    for one in passes:
        logits = one.windows[0][4][i]
        if one.count is not None or not _maps_apply(logits):
            return None
        pass_maps = _axis_maps(logits, *one.axis_chains(out_size), one.flipped)
        agreed = _agreed_labels(pass_maps, _classes_last(logits), _AGREED_MIN_CLASSES_PASSES)  # (copy: made again)
        if agreed is None:
            return None
        known = agreed if known is None else known.masked_fill_(agreed != known, -1)
        maps.append(pass_maps)
    if known is None or not bool((known >= 0).any()):
        return None
    return known, maps


def _labels_where_passes_differ(
    known: torch.Tensor, maps: list[_AxisMaps], passes: list[_Pass], i: int, scratch: _Scratch
) -> torch.Tensor:
    """(H, W) int64 labels: ``known`` (:func:`_agreed_pass_labels`) where it is a class, elsewhere the argmax of
    the passes' mean probabilities, made for those pixels only: each pass's values band by band
    (:func:`_mapped_bands`, bands without such a pixel skipped), the pixels picked, their softmax added up in pass
    order and divided once — per pixel what :func:`_labels_keeping_passes` computes for every pixel."""
    labels = known.long()
    todo = known < 0
    per_row = todo.sum(1)
    starts = [0, *per_row.cumsum(0).tolist()]  # the picked pixels of output row r: starts[r] … starts[r + 1] - 1
    if starts[-1] == 0:
        return labels
    need = (per_row > 0).tolist()
    k, width, band_rows = passes[0].windows[0][4].shape[1], known.shape[1], maps[0].band_rows
    pixels = todo.flatten().nonzero().flatten()  # row-major, as the probabilities below
    pixels %= band_rows * width  # … counted from their band's first pixel
    probs = scratch.sum_rows(starts[-1], k, known.numel())  # (pixels, K)
    for n, (pass_maps, one) in enumerate(zip(maps, passes, strict=True)):
        src = _classes_last(one.windows[0][4][i])
        for r0, r1, values in _mapped_bands(pass_maps, src, scratch, need):  # (bands of band_rows rows in every pass)
            picked = values.view(-1, k).index_select(0, pixels[starts[r0] : starts[r1]])  # (pixels, K)
            if n == 0:
                torch.softmax(picked, -1, out=probs[starts[r0] : starts[r1]])
            else:
                probs[starts[r0] : starts[r1]] += picked.softmax(-1)
    labels[todo] = probs.div_(len(maps)).max(1).indices
    return labels


def _labels_by_running_sum(
    net: nn.Module, x: torch.Tensor, opts: InferenceOptions, out_size: tuple[int, int]
) -> torch.Tensor:
    """Several passes' labels from :func:`infer`'s running sum: one pass held at a time."""
    probs, passes = _summed_probs(net, x, opts, out_size, channels_last=True)
    return labels_from_probs(probs.div_(passes))


# ----------------------------------------------------------------- composed resizes (a single pass's labels)
# A single "whole" or "aligned" pass takes its logits (K, h', w') to the output in two bilinear resizes (to the
# model's input size, cropped, then to the output size). Both are linear along each axis, so per axis they are one
# (n_out, n_src) matrix with a few adjacent taps per row. On the CPU a single pass's labels come from those two
# matrices directly: two banded GEMMs and an argmax per band of output rows, with no (K, H_in, W_in) intermediate
# and not even one image's whole (K, H_out, W_out) logits (b0, 150 classes, a 640x480 photo in "aligned" mode:
# the step from the model's logits to the labels 104 -> 75 ms; most of what is left is the argmax).
_COMPOSED_COLUMNS = 64  # output columns per GEMM of the first step (each reads ~64·w'/W + 2 source columns)


# Multi-scale with flips takes 18 maps for one image size (6 scales' rows; their columns, plain and flipped), made
# again for each image if they did not all fit: 64 keep a few sizes (the largest, Cityscapes' 2048 columns at scale
# 1.75, 7.3 MB; a folder of 512-px photos' 0.5 MB at most).
@functools.lru_cache(maxsize=64)
def _axis_map(
    n_src: int, n_mid: int, n_crop: int, n_out: int, band: int, flip: bool = False
) -> tuple[torch.Tensor, tuple, tuple[torch.Tensor, torch.Tensor]]:
    """One axis of a pass's way to its output as a float32 (n_out, n_src) matrix: bilinear (align_corners=False)
    n_src → n_mid, the first n_crop kept (reversed with ``flip``: a flipped pass flipped back), then bilinear
    n_crop → n_out where they differ. Composed in float64 from the kernel's two taps per output
    (:func:`_bilinear_taps`), rounded once. With its bands: (o0, o1, s0, s1) for each run of ``band`` output rows,
    which read source rows s0…s1-1 only (every row's taps are adjacent); and its spans: each output row's first and
    last source row with a nonzero tap (int64, (n_out,) each).

    Made from each output row's (at most 4) taps, not as dense float64 products (Cityscapes' columns at scale
    1.75: 141 → 1.5 ms); each entry is the dense product's own sum, v0·a(j0, s) + v1·a(j1, s) with a(j, s) = w0 + w1
    where both of crop row j's taps fall on s, so the same bits."""
    (i0, i1), (w0, w1) = _bilinear_taps(n_src, n_mid)
    i0, i1, w0, w1 = i0[:n_crop], i1[:n_crop], w0[:n_crop], w1[:n_crop]
    if flip:
        i0, i1, w0, w1 = i0.flip(0), i1.flip(0), w0.flip(0), w1.flip(0)
    if n_crop != n_out:
        (j0, j1), (v0, v1) = _bilinear_taps(n_crop, n_out)
    else:
        j0 = j1 = torch.arange(n_out)
        v0, v1 = torch.ones(n_out, dtype=torch.float64), torch.zeros(n_out, dtype=torch.float64)
    taps = torch.stack([i0[j0], i1[j0], i0[j1], i1[j1]], 1)  # (n_out, 4) source rows

    def crop_row(j: torch.Tensor) -> torch.Tensor:
        """a(j, s) at each output row's four taps: crop row j's weight on s (both its weights where they meet)."""
        return torch.where(i0[j, None] == taps, w0[j, None], 0.0) + torch.where(i1[j, None] == taps, w1[j, None], 0.0)

    values = v0[:, None] * crop_row(j0) + v1[:, None] * crop_row(j1) if n_crop != n_out else crop_row(j0)
    a = torch.zeros(n_out, n_src).scatter_(1, taps, values.float())  # (a repeated tap: the same value twice)
    nonzero = values != 0
    first = torch.where(nonzero, taps, n_src).min(1).values
    last = torch.where(nonzero, taps, -1).max(1).values
    pad = -n_out % band
    lo = torch.cat([first, first[-1:].expand(pad)]).view(-1, band).min(1).values.tolist()
    hi = torch.cat([last, last[-1:].expand(pad)]).view(-1, band).max(1).values.tolist()
    bands = tuple(
        (o0, min(o0 + band, n_out), s0, s1 + 1) for o0, s0, s1 in zip(range(0, n_out, band), lo, hi, strict=True)
    )
    return a, bands, (first, last)


def _bilinear_taps(n_in: int, n_out: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """The two source indices and float64 weights of each output position of a bilinear resize n_in → n_out with
    align_corners=False, as PyTorch's kernel computes them: source coordinate (i + 0.5)·n_in/n_out - 0.5, clamped
    at 0; the pixel below it and the next (the last pixel repeated at the far border), weighted by distance."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    far = src - i0
    return (i0, (i0 + 1).clamp_max(n_in - 1)), (1 - far, far)


def _composes(one: _Pass, i: int, out_size: tuple[int, int]) -> bool:
    """Whether image ``i`` of a single pass gets its labels from :func:`_composed_labels`: one window (whole,
    aligned) that takes two resizes to ``out_size`` (with one, PyTorch's kernel into the work areas and the argmax
    are as fast), not flipped, and logits :func:`_labels_by_axis_maps` takes (:func:`_maps_apply`)."""
    return one.count is None and one.size != out_size and not one.flipped and _maps_apply(one.windows[0][4][i])


def _composed_labels(
    one: _Pass,
    i: int,
    out_size: tuple[int, int],
    scratch: _Scratch,
    out: torch.Tensor,
    confidence: torch.Tensor | None = None,
) -> None:
    """Image ``i``'s (H, W) labels into ``out``: the argmax of its logits taken to ``out_size`` as
    :meth:`_Pass.logits` takes them (to the padded input, cropped, then to ``out_size``), with each axis's two
    resizes composed into one matrix (:func:`_labels_by_axis_maps`; ``confidence`` as there)."""
    _labels_by_axis_maps(one.windows[0][4][i], *one.axis_chains(out_size), scratch, out, confidence)


def _labels_by_axis_maps(
    logits: torch.Tensor,
    rows: tuple[int, int, int],
    cols: tuple[int, int, int],
    scratch: _Scratch,
    out: torch.Tensor,
    confidence: torch.Tensor | None = None,
) -> None:
    """``out`` (H, W) ← the argmax over K of ``logits`` (K, h', w') taken along each axis through one matrix,
    :func:`_axis_map` of (h', *rows) and (w', *cols): bilinear to rows[0], the first rows[1] kept, bilinear to
    rows[2] = H where it differs (columns likewise), band by band (:func:`_mapped_bands`), with the argmax of each
    band. The same linear map as the resizes, rounded differently: labels differ from theirs only where two
    classes are within rounding of each other. Where every tap's source pixel ranks one class first
    (:func:`_agreed_labels`) that class is the label, and the bands whose labels are all known are never made
    unless ``confidence`` (H, W) float32 asks for each pixel's :func:`top_probability` of the band's values too:
    then every band is made, and the labels are the same."""
    maps, src = _axis_maps(logits, rows, cols, flip=False), _classes_last(logits)
    agreed = _agreed_labels(maps, src)  # known labels (>= 0), -1 where the taps disagree
    todo = None
    if agreed is not None:
        out.copy_(agreed)
        todo = agreed < 0
    need = None if todo is None or confidence is not None else todo.any(1).tolist()
    for r0, r1, values in _mapped_bands(maps, src, scratch, need):
        if confidence is not None:
            confidence[r0:r1] = top_probability(values, dim=-1)
        if todo is None:
            out[r0:r1] = values.max(-1).indices
        else:
            band_todo = todo[r0:r1]
            out[r0:r1][band_todo] = values[band_todo].max(-1).indices


def _mapped_bands(
    maps: _AxisMaps, src: torch.Tensor, scratch: _Scratch, need: list[bool] | None = None
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``src`` (h', w', K) logits (:func:`_classes_last`) taken to the output (H, W) through ``maps``
    (:func:`_axis_maps`) band by band: (r0, r1, values) with values (r1 - r0, W, K) for each band of output rows,
    valid until the next is asked for (both live in ``scratch``'s work areas). With ``need`` (one bool per output
    row), only the bands holding a needed row. First the columns, on the small map: (h', w', K) → (h', W, K), one
    GEMM per band of output columns; then the rows: (rows, W·K) = (rows × s) taps times the band's s source rows.

    The columns are made for a chunk of source rows at a time (below 16 MiB where a band's taps allow: the C
    library hands such blocks out again instead of mapping fresh pages, so a call outside
    :func:`reuse_work_areas` page-faults none of it), each chunk serving the row bands whose taps it holds; a
    source row at a chunk's border is made again for the next, and a chunk whose bands are not needed is not
    made. Each value comes from its own source row alone, so the chunks change no result."""
    ay, row_bands, ax = maps.rows, maps.row_bands, maps.cols
    h1, _, k = src.shape
    width = ax.shape[0]
    widest = max(s1 - s0 for _, _, s0, s1 in row_bands)
    chunk = min(h1, max(widest, (MMAP_THRESHOLD // 2) // (width * k * 4)))  # source rows per chunk of columns
    area = scratch.take((1, k, chunk, width), channels_last=True).permute(0, 2, 3, 1)[0]  # (chunk, W, K)
    band = scratch.take((1, k, maps.band_rows, width), area, channels_last=True).permute(0, 2, 3, 1)[0]
    band = band.view(maps.band_rows, -1)
    first = 0  # the first row band the next chunk serves
    while first < len(row_bands):
        c0 = row_bands[first][2]  # the chunk's first source row
        last = first
        while last + 1 < len(row_bands) and row_bands[last + 1][3] - c0 <= chunk:
            last += 1
        c1, chunk_bands = row_bands[last][3], row_bands[first : last + 1]
        first = last + 1
        if need is not None and not any(need[chunk_bands[0][0] : chunk_bands[-1][1]]):
            continue  # no row of the chunk's bands is needed: no columns made
        flat = _column_pass(ax, maps.col_bands, src[c0:c1], area[: c1 - c0]).view(c1 - c0, width * k)
        for r0, r1, s0, s1 in chunk_bands:
            if need is not None and not any(need[r0:r1]):
                continue
            values = torch.mm(ay[r0:r1, s0:s1], flat[s0 - c0 : s1 - c0], out=band[: r1 - r0])  # (rows, W·K)
            yield r0, r1, values.view(r1 - r0, width, k)


class _AxisMaps(NamedTuple):
    """The way of (K, h', w') logits to (H, W) through one matrix per axis (:func:`_axis_maps`)."""

    rows: torch.Tensor  # (H, h'), :func:`_axis_map`
    row_bands: tuple  # (o0, o1, s0, s1) for each band of ``band_rows`` output rows
    band_rows: int
    row_spans: tuple[torch.Tensor, torch.Tensor]  # each output row's first and last source row with a tap
    cols: torch.Tensor  # (W, w')
    col_bands: tuple  # (o0, o1, s0, s1) for each band of _COMPOSED_COLUMNS output columns
    col_spans: tuple[torch.Tensor, torch.Tensor]


def _axis_maps(logits: torch.Tensor, rows: tuple[int, int, int], cols: tuple[int, int, int], flip: bool) -> _AxisMaps:
    """What :func:`_labels_by_axis_maps` and :func:`_values_by_axis_maps` take (K, h', w') logits through: the row
    and column maps, :func:`_axis_map` of (h', *rows) and (w', *cols). A row band's values are 2 MiB at most (in
    cache for the argmax); the columns reversed after the crop with ``flip``."""
    k, h1, w1 = logits.shape
    band_rows = min(rows[2], max(1, MMAP_THRESHOLD // (16 * cols[2] * k * 4)))
    ay, row_bands, row_spans = _axis_map(h1, *rows, band_rows)
    ax, col_bands, col_spans = _axis_map(w1, *cols, _COMPOSED_COLUMNS, flip)
    return _AxisMaps(ay, row_bands, band_rows, row_spans, ax, col_bands, col_spans)


def _classes_last(logits: torch.Tensor) -> torch.Tensor:
    """(K, h', w') logits as a contiguous (h', w', K): what the axis maps' products and argmaxes read."""
    return logits.permute(1, 2, 0).contiguous()


def _column_pass(ax: torch.Tensor, col_bands: tuple, src: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``columns`` (rows, W, K) ← ``src`` (rows, w', K) through the column map ``ax``, one GEMM per band of output
    columns (float32 under --amp too: autocast would take matmul to bf16); returns ``columns``."""
    with torch.autocast("cpu", enabled=False):
        for o0, o1, s0, s1 in col_bands:
            columns[:, o0:o1] = torch.matmul(ax[o0:o1, s0:s1], src[:, s0:s1])  # (o × s) @ (rows, s, K)
    return columns


# From this many classes up, finding the agreed labels costs less than the argmaxes it saves where neighbouring
# pixels mostly share their class (measured on maps of regions, 256x512 → 1024x2048: 8 classes 31 → 45 ms,
# 19 break even (81 vs 77), 32 122 → 103; 150 classes 128x128 → 512x683: 74 → 53).
_AGREED_MIN_CLASSES = 32
# Several passes: there agreed pixels skip every pass's softmax and sum, not just one argmax; it pays from two
# classes (measured on region-shaped logits, 12 passes to 512x1024: 2 classes 264 → 128 ms, 8 classes 651 → 266,
# 19 classes 468 → 295; 150 classes to 512x683 1421 → 920)
_AGREED_MIN_CLASSES_PASSES = 2
# ... and from this many output values per pass (K·H·W): below, the per-pass set-up outweighs the softmax it saves
# (the demo's b0, 4 classes, 6 passes: 96x96 4.6 → 5.3 ms per image, 192x192 18.5 → 14.9, 384x384 65 → 44)
_AGREED_MIN_PASS_VALUES = 1 << 16


def _agreed_labels(maps: _AxisMaps, src: torch.Tensor, min_classes: int = _AGREED_MIN_CLASSES) -> torch.Tensor | None:
    """(H, W) int16 (int32 from 2¹⁵ classes): for each output pixel of ``src`` (h', w', K) logits
    (:func:`_classes_last`) taken through ``maps`` (:func:`_axis_maps`), the class that every source pixel it
    takes a tap from ranks first (the argmax, first maximum), where they all rank the same class first; -1 where
    they do not. The taps: each output row's and column's span of source rows and columns with nonzero weights
    (:func:`_axis_map`'s spans; a zero weight inside one would only make agreement rarer). None where that pays
    too little: fewer than ``min_classes`` classes, or a map whose neighbouring pixels mostly differ (a random
    model; a trained one has regions).

    Why it is the label: an output pixel's logits are a combination of its source pixels' with non-negative
    weights summing to one (bilinear resizes, composed or not). If class c is the first maximum at every one of
    them, c beats every earlier class strictly and no later class exceeds it at each, so also in any such
    combination: c is the first maximum there too. In float32 (each product and sum rounded monotonically) c can
    only tie with an earlier class, within rounding — where :func:`_labels_by_axis_maps` may differ anyway."""
    h1, w1, k = src.shape
    if k < min_classes:
        return None
    # (h', w'), narrow: less to move. Over the classes' contiguous axis: 2x argmax(0) of (K, h', w')
    top = src.max(-1).indices.to(torch.int16 if k < 1 << 15 else torch.int32)
    alike = ((top[:, 1:] == top[:, :-1]).sum() + (top[1:] == top[:-1]).sum()) / max(1, h1 * (w1 - 1) + w1 * (h1 - 1))
    if alike < 0.5:
        return None

    def spread(values: torch.Tensor, spans: tuple[torch.Tensor, torch.Tensor], dim: int) -> torch.Tensor:
        """``values`` along ``dim`` (source) → output positions: the value where all of a row's taps hold it."""
        lo_tap, hi_tap = spans
        lo = hi = values.index_select(dim, lo_tap)
        for j in range(1, int((hi_tap - lo_tap).max()) + 1):
            other = values.index_select(dim, torch.minimum(lo_tap + j, hi_tap))
            lo, hi = torch.minimum(lo, other), torch.maximum(hi, other)
        return torch.where(lo == hi, lo, -1)  # (-1 stays -1: a disagreement anywhere)

    return spread(spread(top, maps.col_spans, 1), maps.row_spans, 0)


def _values_by_axis_maps(
    logits: torch.Tensor, rows: tuple[int, int, int], cols: tuple[int, int, int], flip: bool, scratch: _Scratch
) -> torch.Tensor:
    """``logits`` (K, h', w') taken to (H, W) = (rows[2], cols[2]) through one matrix per axis, as
    :func:`_labels_by_axis_maps` takes them (the columns reversed after the crop with ``flip``), the values kept:
    (1, K, H, W), a view of (1, H, W, K) memory in one of ``scratch``'s work areas, the other holding the columns
    meanwhile. No intermediate at the model's input size (at scale 1.75 of a 512x683 photo with 150 classes, 0.6 GB
    that the two resizes write and read)."""
    k, h1, _ = logits.shape
    height, width = rows[2], cols[2]
    maps = _axis_maps(logits, rows, cols, flip)
    ay, row_bands, ax, col_bands, src = maps.rows, maps.row_bands, maps.cols, maps.col_bands, _classes_last(logits)
    columns = scratch.take((1, k, h1, width), channels_last=True).permute(0, 2, 3, 1)[0]  # (h', W, K)
    out = scratch.take((1, k, height, width), columns, channels_last=True)  # (1, K, H, W) of (1, H, W, K) memory
    rows_out = out.permute(0, 2, 3, 1)[0].view(height, width * k)
    flat = _column_pass(ax, col_bands, src, columns).view(h1, width * k)
    for r0, r1, s0, s1 in row_bands:
        torch.mm(ay[r0:r1, s0:s1], flat[s0:s1], out=rows_out[r0:r1])  # (rows, W·K); out=: autocast leaves it
    return out


def _maps_apply(logits: torch.Tensor) -> bool:
    """Whether (K, h, w) logits can take :func:`_labels_by_axis_maps`: K > 1, float32 on the CPU (where it was
    measured), finite (a zero tap times an inf would be a NaN where a resize keeps the inf). Finite: the least and
    the greatest value are (a NaN makes both NaN), one pass over the logits (``isfinite(...).all()`` took ~30x as
    long: 32 ms for 150 classes at 224x299)."""
    if logits.shape[0] < 2 or logits.device.type != "cpu" or logits.dtype != torch.float32:
        return False
    low, high = torch.aminmax(logits)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def resized_labels(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) logits → (H, W) int64 class ids at ``size``: the argmax over K (the first maximum on ties) of
    their bilinear resize (align_corners=False, as F.interpolate), without the (K, H, W) resized logits.

    On the CPU, for float32 finite logits with K > 1, each axis's resize is one float32 matrix (F.interpolate's
    two taps per output and their weights, made in float64 and rounded once: :func:`_axis_map`), applied as
    banded GEMMs with the argmax taken per band of rows: 2-3x faster than F.interpolate and the argmax (150
    classes, 128x128 → 512x683: 180 → 90 ms, 60-85 inside :func:`reuse_work_areas`, whose areas it takes;
    → 1080x1920: 1.2 → 0.45 s, 0.15 GB held instead of 1.2 GB). Those
    values are the float64 resize's within float32 rounding, closer to it than F.interpolate's (whose float32
    source coordinates move its values by up to ~1e-5 of the logits' range), so the labels can differ from
    F.interpolate's argmax only where two classes are that close. From 32 classes up, on a trained model's logits
    (regions), a pixel whose source pixels all rank the same class first takes it without an argmax
    (:func:`_agreed_labels`: 150 classes, 683x512, 74 → 53 ms). Elsewhere (other devices and dtypes, K == 1,
    non-finite values, the same size): F.interpolate and the argmax."""
    height, width = _check_pair(size, "size")
    if logits.ndim != 3:
        raise ValueError(f"logits must be (K, h, w), got shape {tuple(logits.shape)}")
    logits = logits.detach()  # (integer labels: no gradient to keep, as from a model called outside no_grad)
    if (height, width) != tuple(logits.shape[-2:]) and _maps_apply(logits):
        out = torch.empty((height, width), dtype=torch.long, device=logits.device)
        _labels_by_axis_maps(logits, (height, height, height), (width, width, width), _scratch(logits.device), out)
        return out
    resized = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)
    return torch.max(resized[0], dim=0).indices  # the argmax (see labels_from_probs)


def _banded(one: _Pass, out_size: tuple[int, int], band_above: int | None) -> bool:
    """Whether a single pass's labels come from :func:`_upsampled_argmax`: its last step is an upsampling of a
    whole image (not cropped, not flipped) to more than ``band_above`` elements per image."""
    if band_above is None or one.count is not None or one.flipped or one.padded != one.size:
        return False
    k = one.windows[0][4].shape[1]
    return k * out_size[0] * out_size[1] > band_above and one.size[0] * one.size[1] < out_size[0] * out_size[1]


__all__ = [
    "MODES",
    "InferenceOptions",
    "WorkAreas",
    "aligned_size",
    "autocast",
    "check_crop_size",
    "cpu_flags",
    "effective_amp",
    "infer",
    "label_probability",
    "labels_from_probs",
    "predict_confidence",
    "predict_labels",
    "reduced_precision_problem",
    "resized_labels",
    "resolve_options",
    "reuse_work_areas",
    "select_dtype",
    "top_probability",
    "upsampled_argmax",
]
