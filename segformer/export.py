"""ONNX export of SegformerForSemanticSegmentation, checked against onnxruntime.

>>> from segformer.export import export_onnx
>>> report = export_onnx(model, "segformer.onnx")       # dynamic batch / height / width, opset 17
>>> print(report.summary())

The graph has one input ``pixel_values`` (B, C, H, W) float32 (normalised as for the PyTorch model) and one
output ``logits`` (B, num_labels, ceil(H/4), ceil(W/4)) float32 (stage 1's output size: a quarter for the
published variants; the metadata says it for others). It is the model's eval fast path: fused
attention (ONNX opset >= 14) and the folded decode head (per-stage D×C_i matrices, no 4D-channel
concatenation and no 1×1 fuse conv; see ``SegformerDecodeHead.folded``). Exporting is exact algebra, so the
file is verified numerically: onnxruntime runs random input at a size other than the export size (batch 2
when the axes are dynamic) and the largest difference relative to the largest PyTorch logit must stay within
what fp32 rounding allows two correct evaluations of this model at that size (:func:`fp32_limit`: the error
model of :mod:`segformer.error_model`: about 2e-5 for a tiny model, 6e-5 for b0, 1e-4 for b2, 2e-4 for b5), or, past
that, onnxruntime's logits must be within twice PyTorch fp32's own distance from the model's float64 logits (weights
far larger than a trained model's take both further; the report says so). The file is
written atomically and only after it passed, so a failed export leaves nothing behind.

``fp16=True`` stores the weights in float16 for GPU runtimes while LayerNorm and the attention softmax are
computed in float32 (casts inside the graph), the guard against the float16 overflow that TensorRT-style
engines otherwise hit in the variance and in exp(). Input and output stay float32. It is verified against
the float32 PyTorch model with a looser tolerance (:data:`FP16_TOLERANCE`) where onnxruntime's CPU provider
can run it; otherwise only its structure is checked and the report says so.

The file describes itself in its metadata (``metadata_props``, which Netron shows and :func:`read_metadata`
reads): the model's config (class names included), the input's preprocessing (RGB, /255, ImageNet mean/std),
what the output needs (bilinear resize to the input size, argmax), the axes, and where known the checkpoint's
evaluation protocol and label rules. ``segformer predict/eval/serve --model FILE.onnx`` run such a file as it is.

Needs the ``onnx`` and ``onnxruntime`` packages (``pip install 'segformer[onnx]'``); uses PyTorch's
TorchScript-based exporter (``dynamo=False``), which needs no further packages.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import modeling
from .error_model import fp32_tolerance, reduction_lengths
from .fileio import atomic_write
from .hub import first_line
from .modeling import SegformerEfficientSelfAttention, SegformerForSemanticSegmentation, min_input_size

DEFAULT_OPSET = 17  # the first opset with a LayerNormalization op
try:  # the highest opset this torch's exporter writes; above it, it dumps its whole graph and fails
    from torch.onnx._constants import ONNX_MAX_OPSET as _EXPORTER_MAX
except ImportError:  # (a torch without that private constant: the opsets this package was tested with)
    _EXPORTER_MAX = 20
MAX_OPSET = max(DEFAULT_OPSET, _EXPORTER_MAX)
MIN_OPSET = 14  # scaled_dot_product_attention (the fused path) exports from here; below, explicit attention
LOWEST_OPSET = 13  # the lowest the graph exports at: below, the exporter has no aten::unflatten (and dumps the graph)
# fp16 weights and activations against the fp32 PyTorch model: 3 significant digits of every matmul, summed
# over ~20 layers, give ~1e-3 of the largest logit; 1e-2 leaves room without hiding a broken graph.
FP16_TOLERANCE = 1e-2
# the metadata keys an export writes (see onnx_metadata); "segformer.config" marks a file as ours
METADATA_KEYS = ("segformer.version", "segformer.config", "segformer.axes", "segformer.weights", "segformer.input",
                 "segformer.output", "segformer.inference", "segformer.labels", "segformer.reduce_labels")  # fmt: skip


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it was checked.

    ``max_rel_diff``: max |onnxruntime - PyTorch| / max |PyTorch| over the verification input, None when the
    file was checked structurally only (``verified == "structure"``, with ``note`` saying why).
    """

    path: Path
    opset: int
    dynamic: bool
    fp16: bool
    export_size: tuple[int, int]
    verify_shape: tuple[int, int, int, int] | None
    max_rel_diff: float | None
    tolerance: float | None  # (None: not verified numerically)
    verified: str  # "numeric", "structure" or "no" (verify=False)
    note: str = ""

    def summary(self) -> str:
        axes = "dynamic batch/height/width" if self.dynamic else f"static {self.export_size[0]}x{self.export_size[1]}"
        kind = "fp16 weights (LayerNorm/softmax in fp32)" if self.fp16 else "fp32"
        head = f"wrote {self.path} (opset {self.opset}, {axes}, {kind})"
        if self.verified == "numeric":
            b, _, h, w = self.verify_shape
            beyond = f"; {self.note}" if self.note else ""
            return (
                f"{head}; onnxruntime vs PyTorch at batch {b}, {h}x{w}: max relative difference "
                f"{self.max_rel_diff:.2e} (limit {self.tolerance:.1e}){beyond}"
            )
        if self.verified == "structure":
            return f"{head}; structure checked only: {self.note}"
        return f"{head}; not verified"


class _LogitsGraph(nn.Module):
    """What gets traced: pixel_values (B, C, H, W) float32 → logits (B, K, H/4, W/4) float32."""

    def __init__(self, model: SegformerForSemanticSegmentation, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.model(pixel_values.to(self.dtype), return_dict=True).logits
        return logits.float()


class _Float32LayerNorm(nn.Module):
    """LayerNorm over float16 tokens computed in float32 (mean/variance of fp16 activations overflow)."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape = norm.normalized_shape
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(norm.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.to(x.dtype)


class _Float32SoftmaxAttention(SegformerEfficientSelfAttention):
    """The explicit attention path with the scores cast to float32 before the softmax.

    (The model's own ``softmax(dtype=float32)`` loses its dtype in the TorchScript exporter, which then
    emits a float16 Softmax.) Installed by swapping ``__class__`` on the export copy, so the weights stay.
    """

    def forward(
        self, x: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, None]:
        q = self.heads(self.query(x) * self.scale)  # scaled first: smaller float16 scores
        if self.sr_ratio > 1:
            reduced = self.sr(modeling.tokens_to_map(x, height, width))  # (B, C, H/sr, W/sr)
            x = self.layer_norm(modeling.map_to_tokens(reduced))  # (B, N', C)
        k, v = self.heads(self.key(x)), self.heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2))  # (B, heads, N, N')
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        return torch.matmul(probs, v).transpose(1, 2).flatten(2), None  # (B, N, C)


@contextlib.contextmanager
def _export_mode() -> Iterator[None]:
    """Silence the tracer's warnings about Python checks (input validation, branch conditions) whose outcome
    does not depend on the input size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"ONNX export needs the onnx and onnxruntime packages ({exc.name} is missing): "
            "pip install 'segformer[onnx]'"
        ) from None


def _prepare(model: SegformerForSemanticSegmentation, *, fp16: bool, opset: int) -> _LogitsGraph:
    """A private eval-mode copy of the model set up for tracing (the caller's model is left as it was)."""
    model = copy.deepcopy(model).eval()
    model.float()  # (a float16 / bfloat16 checkpoint: the fp32 graph promised, or fp16 weights below, from fp32)
    for name, module in list(model.named_modules()):  # (a model trained under torchrun with --sync-bn, in memory)
        if type(module) is nn.SyncBatchNorm:
            plain = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)  # fmt: skip
            plain.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain.eval())
    model.fast_path = True
    if opset < MIN_OPSET or fp16:
        # Below opset 14 there is no exporter for the fused kernel; in fp16 the explicit path is the one
        # whose softmax runs in float32. Both are exact rewrites of the same attention.
        for module in model.modules():
            if isinstance(module, SegformerEfficientSelfAttention):
                module.fast_path = False
    if fp16:
        model.half()
        for module in model.modules():
            if isinstance(module, SegformerEfficientSelfAttention):
                module.__class__ = _Float32SoftmaxAttention
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.LayerNorm):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, _Float32LayerNorm(module))
    for p in model.parameters():
        p.requires_grad_(False)
    return _LogitsGraph(model, torch.float16 if fp16 else torch.float32)


def _check_foldable(head: nn.Module) -> None:
    """ValueError where the decode head cannot be exported folded (the export's promise: no concatenation, no big
    fuse conv): a forward hook on one of its parts, or a part replaced by another type (an adapter, a quantised
    layer). A SyncBatchNorm was made a BatchNorm2d by :func:`_prepare` (in eval mode they compute the same)."""
    if head._parts_plain():
        return
    hooked = [n for n, m in head.named_modules() if n and (m._forward_hooks or m._forward_pre_hooks)]
    built = {"linear_c": nn.ModuleList, "linear_fuse": nn.Conv2d, "batch_norm": nn.BatchNorm2d, "activation": nn.ReLU,
             "dropout": nn.Dropout, "classifier": nn.Conv2d}  # fmt: skip
    replaced = [f"{n} ({type(m).__name__})" for n, m in head.named_children() if type(m) is not built.get(n, type(m))]
    replaced += [f"linear_c.{i}.proj ({type(m.proj).__name__})" for i, m in enumerate(head.linear_c)
                 if type(getattr(m, "proj", None)) is not nn.Linear]  # fmt: skip
    found = "; ".join(
        filter(
            None,
            [
                hooked and "forward hooks on " + ", ".join(f"decode_head.{n}" for n in hooked),
                replaced and "replaced parts: " + ", ".join(f"decode_head.{r}" for r in replaced),
            ],
        )
    )
    raise ValueError(
        f"the decode head cannot be exported folded ({found or 'its parts are not the plain modules'}): remove the "
        "hooks, or merge or undo the replacement (an adapter's merge_and_unload), then export"
    )


def _verify_shape(config, size: tuple[int, int], dynamic: bool) -> tuple[int, int, int, int]:
    """Batch 2 at a size other than the export size when the axes are dynamic (odd sizes on purpose, to
    exercise ceil-mode strides and uneven resizing), else the export shape."""
    h, w = size
    if not dynamic:
        return (1, config.num_channels, h, w)
    lo = min_input_size(config)
    vh = h + 13 if h < 256 else h - 51
    vw = w + 29 if w < 256 else w - 77
    return (2, config.num_channels, max(vh, lo), max(vw, lo))


def check_folded_head(
    onnx_path: str | os.PathLike, decoder_hidden_size: int, num_stages: int = 4, *, elsewhere: int = 0
) -> None:
    """Raise RuntimeError if the graph holds the unfolded decode head: the (D, num_stages*D, 1, 1) weight of
    the 1×1 fuse conv over the 4D-channel concatenation, which the folded head replaces. ``elsewhere``: how many
    of the model's other weights have that shape (a 1×1 patch embedding can: audit), which the graph holds too."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    d = decoder_hidden_size
    shapes = [tuple(t.dims) for t in graph.initializer]
    shapes += [tuple(a.t.dims) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    if shapes.count((d, num_stages * d, 1, 1)) > elsewhere:
        raise RuntimeError(f"{onnx_path}: the exported decode head is not the folded one (found the fuse conv)")


def verify_onnx(
    onnx_path: str | os.PathLike,
    model: SegformerForSemanticSegmentation,
    shape: tuple[int, int, int, int],
    *,
    seed: int = 0,
) -> float:
    """Run the ONNX file with onnxruntime (CPU) and the PyTorch model on the same random (B, C, H, W) input;
    return max |onnx - torch| / max |torch| over the logits. Raises RuntimeError if the shapes differ."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x.to(device=param.device, dtype=param.dtype)).logits.float().cpu()
    finally:
        model.train(was_training)
    out = _onnxruntime_logits(onnx_path, x)
    if out.shape != ref.shape:
        raise RuntimeError(f"{onnx_path}: onnxruntime gave logits {tuple(out.shape)}, PyTorch {tuple(ref.shape)}")
    return _relative_difference(out, ref)


def _onnxruntime_logits(onnx_path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """The file's logits for ``x`` (CPU provider)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # shape-hint warnings for dynamic axes are expected
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"pixel_values": x.numpy()})[0])


def _relative_difference(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _against_float64(
    onnx_path: str | os.PathLike, model: SegformerForSemanticSegmentation, shape: tuple[int, int, int, int]
) -> tuple[float, float]:
    """(PyTorch fp32's, onnxruntime's) max relative difference from the model's float64 logits on
    :func:`verify_onnx`'s input."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # (verify_onnx's input)
    exact = copy.deepcopy(model).cpu().double().eval()
    fp32 = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad():
        ref, ours = exact(x.double()).logits, fp32(x).logits
    return _relative_difference(ours, ref), _relative_difference(_onnxruntime_logits(onnx_path, x), ref)


def fp32_limit(model: SegformerForSemanticSegmentation, shape: tuple[int, int, int, int]) -> float:
    """How far onnxruntime's fp32 logits may be from PyTorch's at input ``shape``, relative to the largest: two
    evaluations, each within the error model's bound for the reductions this model runs at that size
    (:func:`~segformer.error_model.fp32_tolerance`): twice it."""
    param = next(model.parameters())
    probe = torch.zeros((1, *shape[1:]), device=param.device, dtype=param.dtype)  # (lengths: batch-independent)
    was_training = model.training
    model.eval()
    try:
        return 2 * fp32_tolerance(reduction_lengths(model, probe))
    finally:
        model.train(was_training)


# batch, height and width free in the graph (the logits are a quarter of the input size, rounded up)
DYNAMIC_AXES = {
    "pixel_values": {0: "batch", 2: "height", 3: "width"},
    "logits": {0: "batch", 2: "logits_height", 3: "logits_width"},
}


def _check_export_arguments(
    model: SegformerForSemanticSegmentation, path: str | os.PathLike, size: tuple[int, int], opset: int
) -> tuple[int, int, Path]:
    """(height, width, path) of a valid export request; a clear error for anything else."""
    if not isinstance(model, SegformerForSemanticSegmentation):
        raise TypeError(f"export_onnx needs a SegformerForSemanticSegmentation, got {type(model).__name__}")
    if not isinstance(opset, int) or not LOWEST_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset must be an integer from {LOWEST_OPSET} to {MAX_OPSET} (this torch's exporter), got {opset!r}"
        )
    side = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if not (isinstance(side, (tuple, list)) and len(side) == 2 and all(_is_int(v) and v > 0 for v in side)):
        raise ValueError(f"size must be (height, width) as two positive integers (or one, for a square), got {size!r}")
    h, w = (int(v) for v in side)
    lo = min_input_size(model.config)
    if min(h, w) < lo:
        raise ValueError(f"export size {h}x{w} is too small: this model needs at least {lo}x{lo}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; give the .onnx file to write")
    if not path.parent.is_dir():
        raise ValueError(f"{path.parent}: no such directory")
    return h, w, path


def _logits_size(config: object) -> str:
    """The logits' height and width for an input of H x W: stage 1's patch embedding's output size."""
    k, stride = config.patch_sizes[0], config.strides[0]
    if k == 7 and stride == 4:
        return "ceil(H/4), ceil(W/4)"
    return f"floor((H + {2 * (k // 2)} - {k}) / {stride}) + 1, the same of W"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def onnx_metadata(
    config: object,
    size: tuple[int, int],
    dynamic: bool,
    *,
    fp16: bool = False,
    options: object = None,
    labels: str | None = None,
    reduce_labels: bool | None = None,
) -> dict[str, str]:
    """The metadata an export writes into its file: ``segformer.version``, ``segformer.config`` (config.json's
    text, id2label included), ``segformer.axes`` ("dynamic", or "static HxW"), ``segformer.weights`` ("float32"
    or "float16"), ``segformer.input`` (JSON: name, layout, channel order, rescale factor, mean and std),
    ``segformer.output`` (what the logits need) and, when given, ``segformer.inference`` (an InferenceOptions:
    the checkpoint's evaluation protocol), ``segformer.labels`` (the text of the checkpoint's labels.json) and
    ``segformer.reduce_labels`` ("true"/"false": whether it was trained on ADE20K-style reduced labels)."""
    from . import __version__
    from .images import IMAGENET_MEAN, IMAGENET_STD

    rgb = config.num_channels == 3
    meta = {
        "segformer.version": __version__,
        "segformer.config": config.to_json_string(),
        "segformer.axes": "dynamic" if dynamic else f"static {size[0]}x{size[1]}",
        "segformer.weights": "float16" if fp16 else "float32",
        "segformer.input": json.dumps(
            {
                "name": "pixel_values",
                "layout": "NCHW",
                "channels": "RGB" if rgb else f"{config.num_channels} (see the checkpoint's preprocessor_config.json)",
                "rescale_factor": 1 / 255,
                "image_mean": list(IMAGENET_MEAN) if rgb else None,  # (ImageNet's are RGB's)
                "image_std": list(IMAGENET_STD) if rgb else None,
            }  # fmt: skip
        ),
        "segformer.output": f"logits (B, num_labels, {_logits_size(config)}): resize bilinearly (align_corners=False) "
        "to the input size, then argmax over the classes",
    }
    if options is not None:
        meta["segformer.inference"] = json.dumps(options.to_dict())
    if labels is not None:
        meta["segformer.labels"] = labels
    if reduce_labels is not None:
        meta["segformer.reduce_labels"] = "true" if reduce_labels else "false"
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``segformer.*`` metadata of an ONNX file (empty for a file another tool wrote); a file that is not
    ONNX raises ValueError naming it."""
    _require_onnx()
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    if stat.st_size == 0:  # (onnx reads an empty file as an empty model: "no metadata" would blame another tool)
        raise ValueError(f"{path}: an empty file, not an ONNX model")
    try:
        return dict(_metadata(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size))
    except ValueError as exc:  # (named as given, as every other message names it)
        raise ValueError(f"{path}: {exc}") from None


@functools.lru_cache(maxsize=8)
def _metadata(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    """(the file is parsed once per version: a predictor reads the config, the protocol and the labels)"""
    import onnx

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # (protobuf's DecodeError and friends)
        raise ValueError(f"not an ONNX file ({first_line(exc)})") from None
    return tuple((p.key, p.value) for p in proto.metadata_props if p.key.startswith("segformer."))


def export_onnx(
    model: SegformerForSemanticSegmentation,
    path: str | os.PathLike,
    *,
    size: tuple[int, int] = (512, 512),
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    fp16: bool = False,
    verify: bool = True,
    tolerance: float | None = None,
    options: object = None,
    labels: str | None = None,
    reduce_labels: bool | None = None,
) -> ExportReport:
    """Export ``model`` (eval mode, fast path) to ONNX at ``path`` and verify it with onnxruntime.

    ``size``: (height, width) traced; with ``dynamic`` (default) batch, height and width are free axes of
    the graph, else the graph only takes (1, C, height, width). ``opset``: ONNX opset (>= 13; 17 default).
    ``fp16``: float16 weights with LayerNorm and softmax in float32 (float32 input and output).
    ``verify``: run onnxruntime and compare (see the module docstring); raises RuntimeError when the
    difference exceeds ``tolerance`` (default: :func:`fp32_limit` for fp32, :data:`FP16_TOLERANCE` for fp16),
    in which case no file is written. ``options`` (an InferenceOptions), ``labels`` (a labels.json's text,
    checked here) and ``reduce_labels``: the checkpoint's evaluation protocol and label rules, written into the
    file's metadata (:func:`onnx_metadata`) with the config and the preprocessing. Returns an
    :class:`ExportReport`.
    """
    _require_onnx()
    h, w, path = _check_export_arguments(model, path, size, opset)
    if labels is not None:  # (a broken labels.json would make a file every command then refuses)
        from .data.datasets import read_label_spec

        read_label_spec("labels.json", text=labels)
    config = model.config
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0 < tolerance < math.inf):
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    if tolerance is None and fp16:
        tolerance = FP16_TOLERANCE

    graph = _prepare(model, fp16=fp16, opset=opset)
    _check_foldable(graph.model.decode_head)
    device = next(model.parameters()).device
    graph.to(device)
    with torch.no_grad():
        # Fold the decode head now, so that the trace records the folded matrices as constants rather than
        # the float64 folding arithmetic.
        graph.model.decode_head.folded()
    if fp16 and device.type == "cpu" and not _cpu_half_ok():
        raise RuntimeError("this PyTorch build cannot run float16 on the CPU; export with fp16 from a GPU model")
    example = torch.randn(1, config.num_channels, h, w, device=device)
    axes = DYNAMIC_AXES if dynamic else None
    report = ExportReport(path, opset, dynamic, fp16, (h, w), None, None, tolerance, "no")

    def write(tmp: str) -> None:
        with _export_mode(), torch.no_grad():
            torch.onnx.export(
                graph,
                (example,),
                tmp,
                dynamo=False,
                opset_version=opset,
                input_names=["pixel_values"],
                output_names=["logits"],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        import onnx

        proto = onnx.load(tmp)
        meta = onnx_metadata(
            config, (h, w), dynamic, fp16=fp16, options=options, labels=labels, reduce_labels=reduce_labels
        )
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, tmp)
        onnx.checker.check_model(tmp)
        fuse = (config.decoder_hidden_size, config.num_encoder_blocks * config.decoder_hidden_size, 1, 1)
        elsewhere = sum(tuple(p.shape) == fuse for p in graph.model.segformer.parameters())
        check_folded_head(tmp, config.decoder_hidden_size, config.num_encoder_blocks, elsewhere=elsewhere)
        if fp16:
            _check_fp16_structure(tmp)
        if not verify:
            return
        shape = _verify_shape(config, (h, w), dynamic)
        report.verify_shape = shape
        # an fp32 graph of a float16 / bfloat16 checkpoint holds its weights upcast: compared with them upcast
        low = next(model.parameters()).dtype != torch.float32
        reference = copy.deepcopy(model).float() if low and not fp16 else model
        try:
            diff = verify_onnx(tmp, reference, shape)
        except Exception as exc:
            if not fp16 or "NOT_IMPLEMENTED" not in str(exc):
                raise
            report.verified = "structure"
            report.note = "onnxruntime's CPU provider has no float16 kernel for part of the graph; run it on a GPU"
            return
        if report.tolerance is None:  # (fp32: what rounding allows two evaluations of this model at this size)
            report.tolerance = fp32_limit(reference, shape)
        report.max_rel_diff = diff
        report.verified = "numeric"
        if not diff <= report.tolerance and tolerance is None and not fp16 and math.isfinite(diff):
            # The error model bounds rounding for weights of a trained model's scale; larger ones (activations
            # that cancel) can take both evaluations further from the exact logits (audit: weights 3/sqrt(fan_in),
            # 8e-4 apart where the limit said 2e-5, onnxruntime the closer of the two). The exact logits decide.
            ours, theirs = _against_float64(tmp, reference, shape)
            if theirs <= 2 * ours + report.tolerance:
                report.note = (f"beyond the error model's limit, as close to float64 logits as PyTorch's: "
                               f"onnxruntime {theirs:.1e}, PyTorch fp32 {ours:.1e}")  # fmt: skip
                return
        if not diff <= report.tolerance:  # also catches NaN
            derived = "" if tolerance is not None or fp16 else " (what fp32 rounding allows this model at that size)"
            raise RuntimeError(
                f"ONNX export failed verification: max relative difference {diff:.3e} between onnxruntime "
                f"and PyTorch at shape {shape} exceeds {report.tolerance:.1e}{derived}"
            )

    def write_naming_the_file(tmp: str) -> None:
        try:
            write(tmp)
        except RuntimeError as exc:  # (the checks name the file they read: the temporary one, gone after this)
            raise RuntimeError(str(exc).replace(tmp, str(path))) from exc

    atomic_write(path, write_naming_the_file)
    return report


def _cpu_half_ok() -> bool:
    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.half), torch.ones(1, 1, 1, 1, dtype=torch.half))
        return True
    except RuntimeError:
        return False


def _check_fp16_structure(onnx_path: str) -> None:
    """Raise RuntimeError unless the weights are float16 while every LayerNormalization and Softmax runs on
    float32 tensors."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(onnx_path))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    big = [t for t in graph.initializer if len(t.dims) >= 2]
    if not big or any(t.data_type != f16 for t in big):
        raise RuntimeError(f"{onnx_path}: fp16 export left weight matrices in another precision")
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax") and types.get(node.input[0]) not in (f32, None):
            raise RuntimeError(f"{onnx_path}: {node.op_type} node {node.name} does not run in float32")
