"""Conversion of original NVlabs/SegFormer (mmseg 0.x) checkpoints into our ``save_pretrained`` layout.

Two kinds of file are understood:

- segmentation checkpoints ``{"meta": {..., "CLASSES", "config"}, "state_dict": {...}}`` with keys
  ``backbone.patch_embed1.proj.weight``, ``backbone.block1.0.attn.kv.weight``, ``decode_head.linear_c1.proj``,
  ``decode_head.linear_fuse.conv.weight``, ``decode_head.linear_pred`` … → SegformerForSemanticSegmentation;
- ImageNet backbones ``mit_b*.pth``: the same encoder keys without ``backbone.`` plus a ``head`` classifier
  → SegformerForImageClassification (which also loads into SegformerForSemanticSegmentation as a base).

The renames (stage indices are 1-based there, 0-based here; block indices are 0-based in both):

    patch_embed{i}.proj / .norm          → encoder.patch_embeddings.{i-1}.proj / .layer_norm
    block{i}.{j}.norm1 / .norm2          → encoder.block.{i-1}.{j}.layer_norm_1 / .layer_norm_2
    block{i}.{j}.attn.q                  → ….attention.self.query
    block{i}.{j}.attn.kv                 → ….attention.self.key (rows [:C]) and .value (rows [C:])
    block{i}.{j}.attn.sr / .norm         → ….attention.self.sr / .layer_norm
    block{i}.{j}.attn.proj               → ….attention.output.dense
    block{i}.{j}.mlp.fc1 / .dwconv.dwconv / .fc2 → ….mlp.dense1 / .dwconv.dwconv / .dense2
    norm{i}                              → encoder.layer_norm.{i-1}
    decode_head.linear_c{i}.proj         → decode_head.linear_c.{i-1}.proj
    decode_head.linear_fuse.conv / .bn   → decode_head.linear_fuse / decode_head.batch_norm
    decode_head.linear_pred              → decode_head.classifier
    decode_head.conv_seg                 → dropped (unused by the original SegFormer head)
    head                                 → classifier (ImageNet backbones)

The architecture is read from the tensor shapes (hidden sizes, depths, sr ratios, MLP ratios, patch sizes,
decoder width, label count) and mapped to b0…b5 where it matches :data:`segformer.config.VARIANTS`.
Attention head counts are not visible in the weights: they come from ``num_attention_heads`` where given, else
from the training config mmcv stores in the file's meta (``meta["config"]``: its backbone's ``num_heads``, or MiT's
for a ``mit_b*`` class), else the MiT value (1, 2, 5, 8). Depths that config states are checked against the blocks
the weights hold.
Unknown keys, missing keys and shape conflicts raise :class:`ConversionError` naming the original key.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import VARIANTS, SegformerConfig
from .hub import CheckpointError, first_line
from .labels import ADE20K_CLASSES, CITYSCAPES_CLASSES

DATASETS: dict[str, tuple[str, ...]] = {"ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES}
MIT_HEADS = (1, 2, 5, 8)
_ARCH_FIELDS = (
    "num_channels",
    "num_encoder_blocks",
    "hidden_sizes",
    "patch_sizes",
    "strides",
    "depths",
    "sr_ratios",
    "mlp_ratios",
)
ORIGINAL_LAYER_NORM_EPS = 1e-6  # the original code's block and stage norms
_IGNORED_TOP_LEVEL = ("meta", "optimizer")  # besides "state_dict" in an mmcv checkpoint


class ConversionError(CheckpointError):
    """An original checkpoint that cannot be converted (one line naming the file or key)."""


@dataclass
class ConversionResult:
    """What :func:`convert_checkpoint` produced: the output directory, the model class written, the config,
    the variant name (None when the shapes match no b0–b5) and the keys dropped on purpose."""

    output_dir: Path
    architecture: str
    config: SegformerConfig
    variant: str | None
    dropped_keys: list[str]
    notes: list[str] = field(default_factory=list)  # what the user should know (class names not used, ...)

    def summary(self) -> str:
        variant = f"MiT-{self.variant}" if self.variant else "a custom MiT"
        notes = "".join(f"; {note}" for note in self.notes)
        return (
            f"wrote {self.output_dir} ({self.architecture}, {variant}, {self.config.num_labels} labels"
            f"{', dropped ' + ', '.join(self.dropped_keys) if self.dropped_keys else ''}){notes}"
        )


# ------------------------------------------------------------------------------------------ reading
def load_original_checkpoint(
    path: str | os.PathLike, *, unsafe_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an original ``.pth`` file → (state dict, meta dict; empty when the file has none).

    Files are read with ``torch.load(weights_only=True)``, which executes no code. Some original files keep
    numpy or mmcv objects in ``meta``, which that refuses; ``unsafe_pickle=True`` then loads the full pickle
    — it can run arbitrary code, so use it only for files from a source you trust.
    """
    path = Path(path)
    if path.is_dir():  # (it said "no such file": audit)
        raise ConversionError(
            f"{path}: a folder; convert reads an original .pth file (a save_pretrained folder is no original: it "
            "loads as it is, --model FOLDER)"
        )
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if path.suffix == ".safetensors":
        raise ConversionError(
            f"{path}: a safetensors file, as Transformers and this package save; it needs no conversion: load "
            "its folder as it is (--model FOLDER)"
        )
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch's zip format or a pickle
        raise ConversionError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # (torch warns of a pickle protocol it did not write: not our reader's line)
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            data = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
    except pickle.UnpicklingError as exc:
        if unsafe_pickle or "weights only load failed" not in str(exc).lower():
            raise ConversionError(f"{path}: not a PyTorch checkpoint ({first_line(exc)})") from None
        reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line), "")
        if "global" not in reason.lower() and not _torch_save_file(path, magic):
            # (an opcode the weights-only reader lacks, in a file torch.save did not write: a plain pickle or random
            # bytes, which --unsafe-pickle would not make a checkpoint; audit)
            raise ConversionError(f"{path}: not a PyTorch checkpoint (a pickle torch.save did not write)") from None
        reason = reason.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
        reason = reason or "it holds Python objects"
        raise ConversionError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({reason}); if the file comes from "
            "a source you trust (original checkpoints may keep numpy/mmcv objects in 'meta'), pass "
            "--unsafe-pickle (Python: unsafe_pickle=True), which can run code stored in the file"
        ) from None
    except Exception as exc:  # truncated archives, EOF, bad magic numbers
        reason = first_line(exc)
        # (a cut archive: "[Errno 22] Invalid argument", or torch's "failed finding central directory ...")
        if magic.startswith(b"PK\x03\x04") and isinstance(exc, (OSError, RuntimeError)):
            reason = f"a damaged or truncated torch.save archive: {reason.split('. ')[0]}"
        raise ConversionError(f"{path}: not a PyTorch checkpoint ({reason})") from None
    meta: dict[str, Any] = {}
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        meta = dict(data["meta"]) if isinstance(data.get("meta"), Mapping) else {}
        data = data["state_dict"]
    elif isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]  # the classification code saves {"model", "optimizer", ...}
    if not isinstance(data, Mapping) or not data:
        raise ConversionError(f"{path}: does not hold a state dict")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entry {bad[0]!r} of the state dict is not a tensor")
    state = dict(data)
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, meta


def _torch_save_file(path: Path, magic: bytes) -> bool:
    """Whether ``path`` is a torch.save file: its zip archive, or the legacy format, which opens with a pickled
    magic number (read by an unpickler that loads no class, so no code in the file runs)."""
    if magic.startswith(b"PK\x03\x04"):
        return True

    class _NoClasses(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError(f"{module}.{name}")

    try:
        with path.open("rb") as f:
            return _NoClasses(f).load() == torch.serialization.MAGIC_NUMBER
    except Exception:  # noqa: BLE001 - anything unreadable is not the legacy format
        return False


# ------------------------------------------------------------------------------------------ renaming
# One rename table: original module path → ours, inside a block, a stage and the decode head.
_BLOCK = {
    "norm1": "layer_norm_1",
    "norm2": "layer_norm_2",
    "attn.q": "attention.self.query",
    "attn.kv": "attention.self.{kv}",  # split into key and value
    "attn.sr": "attention.self.sr",
    "attn.norm": "attention.self.layer_norm",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "mlp.dense1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.fc2": "mlp.dense2",
}
_HEAD = {
    "linear_fuse.conv.weight": "linear_fuse.weight",
    **{
        f"linear_fuse.bn.{t}": f"batch_norm.{t}"
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    },
    "linear_pred.weight": "classifier.weight",
    "linear_pred.bias": "classifier.bias",
}
_PARAM = r"(weight|bias)"
_BLOCK_KEY = re.compile(rf"block(\d+)\.(\d+)\.({'|'.join(map(re.escape, _BLOCK))})\.{_PARAM}")
_PATCH_KEY = re.compile(rf"patch_embed(\d+)\.(proj|norm)\.{_PARAM}")
_NORM_KEY = re.compile(rf"norm(\d+)\.{_PARAM}")
_LINEAR_C_KEY = re.compile(rf"linear_c(\d+)\.proj\.{_PARAM}")
_DROPPED = re.compile(r"decode_head\.conv_seg\.(weight|bias)")


def original_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``"segmentation"`` (backbone. + decode_head.), ``"encoder"`` (backbone. only) or ``"backbone"``
    (an ImageNet ``mit_b*.pth``: bare encoder keys, maybe a ``head``); ConversionError otherwise."""
    if "backbone.patch_embed1.proj.weight" in state:
        return "segmentation" if any(k.startswith("decode_head.") for k in state) else "encoder"
    if "patch_embed1.proj.weight" in state:
        return "backbone"
    if any(k.startswith(("segformer.", "encoder.")) for k in state):
        raise ConversionError("this checkpoint is already in the Transformers layout; load it with from_pretrained")
    if any(k.startswith("backbone.layers.") for k in state):
        raise ConversionError(
            "this is an mmsegmentation 1.x MixVisionTransformer checkpoint (backbone.layers.*); only the "
            "original NVlabs/mmseg 0.x layout (backbone.patch_embed1.*) is supported"
        )
    raise ConversionError("not an original SegFormer checkpoint: no 'backbone.patch_embed1.proj.weight' key")


# The rank of each original tensor, by what its key ends with (the first match counts): convs are 4-d (the
# classifier linear_pred is a 1x1 conv), Linear weights 2-d, norms, biases and BatchNorm statistics 1-d.
_RANKS = (
    (re.compile(r".*num_batches_tracked"), 0),
    (re.compile(r".*\.(bias|running_mean|running_var)"), 1),
    (re.compile(r"(.*\.)?(norm\d*|linear_fuse\.bn)\.weight"), 1),  # (block norm1/2, attn.norm, stage norms)
    (re.compile(r".*(patch_embed\d+\.proj|attn\.sr|dwconv\.dwconv|linear_fuse\.conv|linear_pred|conv_seg)\.weight"), 4),
    (re.compile(r".*\.weight"), 2),
)


def _check_tensors(state: Mapping[str, torch.Tensor], layout: str) -> None:
    """ConversionError naming the first key of the layout whose tensor cannot be what the original model held: a
    rank other than its layer's, an empty dimension, a dtype that is not floating point (BatchNorm's step count
    an integer), or a bias or BatchNorm statistic whose weight is missing (its shapes, not the missing weight,
    were blamed: audit). The architecture is read from these shapes, which raised IndexError on a 0-d tensor."""
    for key, tensor in state.items():
        if not (_DROPPED.fullmatch(key) or _rename(key, layout, "") is not None):
            continue  # (an unknown key: named as one by _convert)
        rank = next(r for pattern, r in _RANKS if pattern.fullmatch(key))
        shape = tuple(tensor.shape)
        if tensor.ndim != rank or 0 in shape:
            what = "an empty tensor" if 0 in shape else f"a {tensor.ndim}-d tensor"
            raise ConversionError(f"{key}: {what} of shape {shape} where the original layer holds a {rank}-d one")
        integer = rank == 0 and not tensor.is_floating_point() and not tensor.is_complex()
        if not (tensor.is_floating_point() or integer):
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise ConversionError(f"{key}: a tensor of dtype {dtype}; the original weights are floating point")
    for key in state:
        for tail in (".bias", ".running_mean", ".running_var", ".num_batches_tracked"):
            if key.endswith(tail) and key[: -len(tail)] + ".weight" not in state and not _DROPPED.fullmatch(key):
                raise ConversionError(f"missing {key[: -len(tail)] + '.weight'!r} (the file holds its {key!r})")


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename original keys to ours (see the module docstring) → (converted state, dropped keys).

    The fused ``attn.kv`` matrix is split into ``key`` (first C rows) and ``value`` (last C rows). The task
    prefix follows the layout: ``segformer.`` for a segmentation checkpoint and for an ImageNet backbone with its
    ``head`` (which becomes ``classifier``), none for a bare ``backbone.`` encoder or a headless backbone. Raises
    ConversionError naming the first key that is not part of the original layout or whose kv matrix cannot be split.
    """
    converted, dropped, _ = _convert(state)
    return converted, dropped


def _convert(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """convert_state_dict, plus our key → the original key it came from (for error messages)."""
    layout = original_layout(state)
    _check_tensors(state, layout)
    with_head = layout == "segmentation" or (layout == "backbone" and "head.weight" in state)
    prefix = "segformer." if with_head else ""  # (a headless backbone becomes a SegformerModel, as a bare encoder)
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    dropped: list[str] = []
    for key, tensor in state.items():
        if _DROPPED.fullmatch(key):
            dropped.append(key)
            continue
        new = _rename(key, layout, prefix)
        if new is None:
            raise ConversionError(f"unknown key {key!r}: not part of the original SegFormer {layout} layout")
        if "{kv}" in new:
            if tensor.ndim == 0 or tensor.shape[0] % 2:
                raise ConversionError(f"{key}: shape {tuple(tensor.shape)} cannot be split into key and value halves")
            c = tensor.shape[0] // 2
            out[new.replace("{kv}", "key")] = tensor[:c].clone()  # rows [:C] are the key projection
            out[new.replace("{kv}", "value")] = tensor[c:].clone()
            sources[new.replace("{kv}", "key")] = sources[new.replace("{kv}", "value")] = key
        else:
            out[new] = tensor
            sources[new] = key
    return out, dropped, sources


def _rename(key: str, layout: str, prefix: str) -> str | None:
    """Our name for one original key (None when it is not part of the layout). Stage and linear_c
    indices go from 1-based to 0-based; block indices inside a stage are 0-based in both."""
    if key.startswith("decode_head."):
        if layout != "segmentation":
            return None
        rest = key[len("decode_head.") :]
        if rest in _HEAD:
            return "decode_head." + _HEAD[rest]
        m = _LINEAR_C_KEY.fullmatch(rest)
        return f"decode_head.linear_c.{int(m[1]) - 1}.proj.{m[2]}" if m and int(m[1]) >= 1 else None
    if layout == "backbone":
        if key in ("head.weight", "head.bias"):
            return "classifier." + key.split(".", 1)[1]
    elif key.startswith("backbone."):
        key = key[len("backbone.") :]
    else:
        return None
    if m := _BLOCK_KEY.fullmatch(key):
        name = f"encoder.block.{int(m[1]) - 1}.{m[2]}.{_BLOCK[m[3]]}.{m[4]}"
    elif m := _PATCH_KEY.fullmatch(key):
        name = f"encoder.patch_embeddings.{int(m[1]) - 1}.{'proj' if m[2] == 'proj' else 'layer_norm'}.{m[3]}"
    elif m := _NORM_KEY.fullmatch(key):
        name = f"encoder.layer_norm.{int(m[1]) - 1}.{m[2]}"
    else:
        return None
    return prefix + name if int(m[1]) >= 1 else None


_BLOCK_BACK = {ours.replace("{kv}", kv): orig for orig, ours in _BLOCK.items() for kv in ("key", "value")}
_HEAD_BACK = {ours: orig for orig, ours in _HEAD.items()}


def _original_name(key: str, layout: str) -> str:
    """The original key that our ``key`` comes from (:func:`_rename` backwards; ``key`` and ``value`` both from
    ``attn.kv``), for a weight the file lacks: the user knows the file's names, not ours."""
    key = key.removeprefix("segformer.")
    if key.startswith("decode_head."):
        rest = key[len("decode_head.") :]
        if rest in _HEAD_BACK:
            return "decode_head." + _HEAD_BACK[rest]
        m = re.fullmatch(rf"linear_c\.(\d+)\.proj\.{_PARAM}", rest)
        return f"decode_head.linear_c{int(m[1]) + 1}.proj.{m[2]}" if m else key
    if key.startswith("classifier."):
        return "head." + key[len("classifier.") :]
    pre = "" if layout == "backbone" else "backbone."
    if m := re.fullmatch(rf"encoder\.block\.(\d+)\.(\d+)\.(.+)\.{_PARAM}", key):
        inner = _BLOCK_BACK.get(m[3])
        return f"{pre}block{int(m[1]) + 1}.{m[2]}.{inner}.{m[4]}" if inner else key
    if m := re.fullmatch(rf"encoder\.patch_embeddings\.(\d+)\.(proj|layer_norm)\.{_PARAM}", key):
        return f"{pre}patch_embed{int(m[1]) + 1}.{'proj' if m[2] == 'proj' else 'norm'}.{m[3]}"
    if m := re.fullmatch(rf"encoder\.layer_norm\.(\d+)\.{_PARAM}", key):
        return f"{pre}norm{int(m[1]) + 1}.{m[2]}"
    return key


# -------------------------------------------------------------------------------------- architecture
def infer_config(
    state: Mapping[str, torch.Tensor],
    *,
    meta: Mapping[str, Any] | None = None,
    variant: str | None = None,
    num_labels: int | None = None,
    dataset: str | None = None,
    num_attention_heads: list[int] | None = None,
    original_eps: bool = False,
) -> tuple[SegformerConfig, str | None]:
    """The SegformerConfig of an original state dict → (config, matching variant name or None).

    Reads hidden sizes and patch sizes (patch_embed convs), depths (block counts), sr ratios (attn.sr
    kernels), MLP ratios (fc1), the decoder width (linear_c) and the label count (linear_pred, or the
    ImageNet ``head``). ``variant`` ("b0"…"b5") fixes the architecture instead; the weights must then fit
    it (checked by :func:`convert_checkpoint`). ``num_labels`` must agree with the classifier when given.
    Label names: ``dataset`` ("ade20k" / "cityscapes"), else ``meta["CLASSES"]``, else ADE20K for 150 and
    Cityscapes for 19 labels, else ``LABEL_i``. Head counts: ``num_attention_heads``, else what ``meta["config"]``
    says (:func:`_meta_backbone`), else MiT's. ``original_eps`` uses the original LayerNorm eps 1e-6 in
    the block and stage norms (``use_layer_norm_eps=True``); the default 1e-5 matches Transformers.
    """
    layout = original_layout(state)
    _check_tensors(state, layout)
    pre = "" if layout == "backbone" else "backbone."
    stages = []
    while f"{pre}patch_embed{len(stages) + 1}.proj.weight" in state:
        stages.append(state[f"{pre}patch_embed{len(stages) + 1}.proj.weight"])
    named = [_stage_of(k.removeprefix(pre)) for k in state]
    if max(named, default=0) > len(stages):  # (a later stage's keys without its patch embedding: audit)
        raise ConversionError(
            f"missing '{pre}patch_embed{len(stages) + 1}.proj.weight' (the file holds stage {max(named)}'s weights)"
        )
    hidden = [int(w.shape[0]) for w in stages]
    fields: dict[str, Any] = dict(
        num_channels=int(stages[0].shape[1]),
        num_encoder_blocks=len(stages),
        hidden_sizes=hidden,
        patch_sizes=[int(w.shape[-1]) for w in stages],
        strides=[4] + [2] * (len(stages) - 1),  # not visible in the weights; every MiT uses these
        depths=[_count_blocks(state, f"{pre}block{i + 1}.") for i in range(len(stages))],
        sr_ratios=[_sr_ratio(state, f"{pre}block{i + 1}.0.attn.sr.weight") for i in range(len(stages))],
        mlp_ratios=[_mlp_ratio(state, f"{pre}block{i + 1}.0.mlp.fc1.weight", h) for i, h in enumerate(hidden)],
    )
    if "decode_head.linear_c1.proj.weight" in state:
        fields["decoder_hidden_size"] = int(state["decode_head.linear_c1.proj.weight"].shape[0])
    found = _classifier_labels(state, layout)
    if num_labels is not None and found is not None and num_labels != found[1]:
        raise ConversionError(f"{found[0]}: holds {found[1]} classes but num_labels={num_labels} was given")
    labels = num_labels if num_labels is not None else (found[1] if found else None)

    if variant is not None:
        key = variant.lower().removeprefix("mit-").removeprefix("mit_")
        if key not in VARIANTS:
            raise ConversionError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        # The variant replaces what the shapes said; a checkpoint that does not fit fails the shape check.
        fields = {**fields, **SegformerConfig().to_dict(), **VARIANTS[key]}
        fields = {k: fields[k] for k in (*_ARCH_FIELDS, "decoder_hidden_size")}
        matched: str | None = key
    else:
        matched = _match_variant(fields)
        if matched is None and num_attention_heads is None:
            _refuse_damaged_variant(fields)
        _refuse_missing_reductions(state, pre, fields["depths"], fields["sr_ratios"])  # (a variant: its shapes)
    stated = _meta_backbone(meta or {})
    if "depths" in stated and stated["depths"] != fields["depths"]:
        raise ConversionError(
            f"the file's meta config gives depths {stated['depths']} but its weights hold blocks for "
            f"{fields['depths']}: are blocks missing from the file?"
        )
    if num_attention_heads is not None and len(num_attention_heads) != len(fields["hidden_sizes"]):
        raise ConversionError(
            f"num_attention_heads {list(num_attention_heads)} (CLI: --num-heads) has {len(num_attention_heads)} "
            f"entries for the checkpoint's {len(fields['hidden_sizes'])} stages"
        )
    if num_attention_heads is not None and stated.get("num_heads", num_attention_heads) != list(num_attention_heads):
        raise ConversionError(
            f"num_attention_heads {list(num_attention_heads)} (CLI: --num-heads) contradicts the file's meta "
            f"config, which trained with num_heads={stated['num_heads']}"
        )
    if num_attention_heads is not None:
        heads = list(num_attention_heads)
    elif "num_heads" in stated:  # (what the run trained with; MiT's default would be silently wrong: audit)
        heads = stated["num_heads"]
    elif len(fields["hidden_sizes"]) == len(MIT_HEADS) and all(
        h % n == 0 for h, n in zip(fields["hidden_sizes"], MIT_HEADS, strict=True)
    ):
        heads = list(MIT_HEADS)
    else:
        raise ConversionError(
            f"hidden sizes {fields['hidden_sizes']} are not those of a MiT variant, and the number of "
            "attention heads is not stored in the weights; pass num_attention_heads (CLI: --num-heads)"
        )
    fields["num_attention_heads"] = heads
    if matched is not None and variant is None and heads != list(MIT_HEADS):
        matched = None  # (MiT's widths with other heads, as the meta config says: not that variant)
    if original_eps:
        fields.update(use_layer_norm_eps=True, layer_norm_eps=ORIGINAL_LAYER_NORM_EPS)
    id2label = _id2label(labels, dataset, meta or {}) if labels is not None else None
    try:
        config = SegformerConfig(**fields, id2label=id2label, num_labels=None if id2label else labels)
    except ValueError as exc:
        if num_attention_heads is not None and "num_attention_heads" in str(exc):  # (the option, not the file)
            raise ConversionError(
                f"num_attention_heads {heads} (CLI: --num-heads) does not fit the checkpoint's stages "
                f"{fields['hidden_sizes']}: {exc}"
            ) from None
        raise ConversionError(f"the checkpoint's shapes give an invalid config: {exc}") from None
    return config, matched


def _stage_of(key: str) -> int:
    """The 1-based stage a backbone key (without ``backbone.``) or a head's ``linear_c`` key belongs to; 0 for
    none."""
    m = re.match(r"(?:decode_head\.linear_c|patch_embed|block|norm)(\d+)\.", key)
    return int(m[1]) if m else 0


def _meta_backbone(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the mmseg config text stored in an original checkpoint's meta (``meta["config"]``, the training
    config as Python source) says of the backbone: ``num_heads`` and ``depths`` where it spells them out, MiT's
    heads where it names a ``mit_b*`` class (which fix them). Empty where the file has no such text."""
    text = meta.get("config")
    if not isinstance(text, str):
        return {}
    start = re.search(r"\bbackbone\s*=\s*dict\(", text)
    if start is None:
        return {}
    depth, end = 1, start.end()
    while end < len(text) and depth:  # the backbone's dict(...), nested parentheses included
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        end += 1
    body, found = text[start.end() : end], {}
    for name in ("num_heads", "depths"):
        m = re.search(rf"\b{name}\s*=\s*[\[(]([\d,\s]+)[\])]", body)
        if m and m[1].strip(", "):
            found[name] = [int(v) for v in m[1].replace(",", " ").split()]
    if "num_heads" not in found and re.search(r"""\btype\s*=\s*['"]mit_b[0-5]['"]""", body):
        found["num_heads"] = list(MIT_HEADS)
    return found


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    named = {k[len(prefix) :].split(".", 1)[0]: k for k in state if k.startswith(prefix)}
    for text, key in named.items():
        if not text.isdigit():  # (int() said "invalid literal for int()", naming nothing: audit)
            raise ConversionError(f"unknown key {key!r}: block index {text!r} is not a number")
    indices = {int(text) for text in named}
    if not indices or indices != set(range(len(indices))):
        raise ConversionError(f"{prefix}*: block indices {sorted(indices)} are not 0..n-1")
    return len(indices)


def _sr_ratio(state: Mapping[str, torch.Tensor], key: str) -> int:
    return int(state[key].shape[-1]) if key in state else 1


def _mlp_ratio(state: Mapping[str, torch.Tensor], key: str, hidden: int) -> int:
    if key not in state:
        raise ConversionError(f"missing key {key!r}")
    inner = int(state[key].shape[0])
    if inner % hidden:
        raise ConversionError(f"{key}: {inner} hidden units is not a multiple of the stage width {hidden}")
    return inner // hidden


def _classifier_labels(state: Mapping[str, torch.Tensor], layout: str) -> tuple[str, int] | None:
    key = "head.weight" if layout == "backbone" else "decode_head.linear_pred.weight"
    return (key, int(state[key].shape[0])) if key in state else None


def _match_variant(fields: Mapping[str, Any]) -> str | None:
    if fields["num_encoder_blocks"] != 4 or fields["sr_ratios"] != [8, 4, 2, 1]:
        return None
    if fields["patch_sizes"] != [7, 3, 3, 3] or fields["mlp_ratios"] != [4, 4, 4, 4]:
        return None
    for name, spec in VARIANTS.items():
        if fields["depths"] == spec["depths"] and fields["hidden_sizes"] == spec["hidden_sizes"]:
            if fields.get("decoder_hidden_size", spec["decoder_hidden_size"]) == spec["decoder_hidden_size"]:
                return name
    return None


def _refuse_missing_reductions(state: Mapping[str, torch.Tensor], pre: str, depths: list, ratios: list) -> None:
    """ConversionError where sequence-reduction layers are missing whatever the widths (a custom MiT's, with
    ``--num-heads``, is not checked against a variant): a stage's ``attn.sr`` in some blocks and not others, or a
    stage without reduction before one with it (MiT's ratios only fall: 8, 4, 2, 1). The ratio is read from
    ``attn.sr.weight``, so a file without a stage's reduction layers converted into another model (audit)."""
    for i, depth in enumerate(depths, start=1):
        have = [f"{pre}block{i}.{j}.attn.sr.weight" in state for j in range(depth)]
        if any(have) and not all(have):
            raise ConversionError(
                f"{pre}block{i}.{have.index(False)}.attn.sr.weight: missing while other blocks of stage {i} have "
                "a sequence-reduction layer: a damaged checkpoint?"
            )
    for i in range(len(ratios) - 1):
        if ratios[i] == 1 and ratios[i + 1] > 1:
            raise ConversionError(
                f"{pre}block{i + 1}.*.attn.sr.*: stage {i + 1} has no sequence-reduction layer but stage {i + 2} "
                f"reduces by {ratios[i + 1]} (ratios {list(ratios)}; MiT's fall, 8, 4, 2, 1): are its attn.sr and "
                "attn.norm keys missing from the file?"
            )


def _refuse_damaged_variant(fields: Mapping[str, Any]) -> None:
    """ConversionError where the stage widths are a MiT variant's but its depths, sequence reductions, MLP ratios
    or patch sizes are not: they are read from which keys exist, so a checkpoint missing a block's or a stage's
    ``attn.sr`` keys would otherwise convert into another, smaller model without a word. A custom MiT on purpose
    converts with its head counts given (``num_attention_heads``; CLI ``--num-heads``)."""
    base, checked = SegformerConfig().to_dict(), ("depths", "sr_ratios", "mlp_ratios", "patch_sizes")
    if fields["num_encoder_blocks"] != 4:
        return
    candidates = []  # (how far, name, what differs) for each variant of these widths (b1-b5 share theirs)
    for name, spec in VARIANTS.items():
        expected = {**base, **spec}
        if fields["hidden_sizes"] != expected["hidden_sizes"]:
            continue
        differ = [f for f in checked if list(fields[f]) != list(expected[f])]
        far = len(differ) + sum(abs(a - b) for a, b in zip(fields["depths"], expected["depths"], strict=True))
        candidates.append((far, name, [f"{f} {fields[f]} (MiT-{name}: {expected[f]})" for f in differ]))
    if candidates:
        _, name, differ = min(candidates)
        if differ:
            raise ConversionError(
                f"the stage widths are MiT-{name}'s but the weights give {'; '.join(differ)}: are blocks or "
                f"sequence-reduction layers missing from the file? (--variant {name} checks it against MiT-{name}; "
                "a custom MiT converts with --num-heads)"
            )


def _id2label(num_labels: int, dataset: str | None, meta: Mapping[str, Any]) -> dict[int, str]:
    if dataset is not None:
        names = DATASETS.get(dataset.lower())
        if names is None:
            raise ConversionError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        if len(names) != num_labels:
            raise ConversionError(f"dataset {dataset} has {len(names)} classes but the model has {num_labels} labels")
        return dict(enumerate(names))
    classes = meta.get("CLASSES")
    if isinstance(classes, (list, tuple)) and len(classes) == num_labels and all(isinstance(c, str) for c in classes):
        return {i: c.strip() for i, c in enumerate(classes)}
    if num_labels == len(ADE20K_CLASSES):
        return dict(enumerate(ADE20K_CLASSES))
    if num_labels == len(CITYSCAPES_CLASSES):
        return dict(enumerate(CITYSCAPES_CLASSES))
    return {i: f"LABEL_{i}" for i in range(num_labels)}


# ------------------------------------------------------------------------------------------- driver
def convert_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    variant: str | None = None,
    num_labels: int | None = None,
    dataset: str | None = None,
    num_attention_heads: list[int] | None = None,
    original_eps: bool = False,
    unsafe_pickle: bool = False,
    safe_serialization: bool = True,
) -> ConversionResult:
    """Convert an original ``.pth`` file into a ``save_pretrained`` directory (config.json +
    model.safetensors) that ``from_pretrained`` loads. Arguments as in :func:`infer_config` and
    :func:`load_original_checkpoint`. Every tensor must land on a model weight of the same shape and every
    model weight must be covered (BatchNorm's ``num_batches_tracked`` excepted); otherwise ConversionError
    names the original key. The output directory is written only after all checks passed."""
    from .modeling import SegformerForImageClassification, SegformerForSemanticSegmentation, SegformerModel

    path = Path(checkpoint)
    _check_output_dir(Path(output_dir))
    state, meta = load_original_checkpoint(path, unsafe_pickle=unsafe_pickle)
    try:
        layout = original_layout(state)
        config, matched = infer_config(
            state,
            meta=meta,
            variant=variant,
            num_labels=num_labels,
            dataset=dataset,
            num_attention_heads=num_attention_heads,
            original_eps=original_eps,
        )
        converted, dropped, sources = _convert(state)
    except ConversionError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    if layout == "segmentation":
        cls = SegformerForSemanticSegmentation
    elif layout == "backbone" and "head.weight" in state:
        cls = SegformerForImageClassification
    else:
        cls = SegformerModel
    model = cls(config)
    _check_against_model(path, converted, model.state_dict(), sources, layout)
    model.load_state_dict(converted, strict=False)  # num_batches_tracked may be absent: keeps its 0
    model.eval()
    out = Path(output_dir)
    model.save_pretrained(out, safe_serialization=safe_serialization)
    notes = []
    classes = meta.get("CLASSES")
    if dataset is None and isinstance(classes, (list, tuple)) and len(classes) != config.num_labels:
        notes.append(
            f"the checkpoint's meta names {len(classes)} classes but its classifier has {config.num_labels}: "
            "those names are not used (--dataset names a known set)"
        )
    return ConversionResult(out, cls.__name__, config, matched, dropped, notes)


# What a conversion writes (save_pretrained: the config and the weights, sharded or not): a folder holding only
# these is an earlier conversion, replaced as a whole; anything else there belongs to another checkpoint.
_CONVERSION_FILES = re.compile(
    r"config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)|(model\.safetensors|pytorch_model\.bin)"
    r"\.index\.json"
)


def _check_output_dir(out: Path) -> None:
    """ValueError, before the checkpoint is read, where ``out`` holds files a conversion would not write (another
    checkpoint's eval.json, model card, processor or inference settings): converted weights beside them would make
    a folder whose files describe another model."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if not out.is_dir():
        return
    foreign = sorted(
        p.name for p in out.iterdir() if not p.name.startswith(".") and not _CONVERSION_FILES.fullmatch(p.name)
    )
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise ValueError(
            f"{out}: holds files a conversion does not write ({shown}): convert into a new or empty folder"
        )


def _check_against_model(
    path: Path,
    converted: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    layout: str,
) -> None:
    order = {k: i for i, k in enumerate(expected)}  # the model's own order: a stage's widths before the head's
    for key in sorted(converted, key=lambda k: order.get(k, -1)):  # (unknown keys first; it blamed the head: audit)
        tensor, source = converted[key], names.get(key, key)
        if key not in expected:
            raise ConversionError(f"{path}: unknown key {source!r} (no {key} in the inferred architecture)")
        if tensor.shape != expected[key].shape:
            shape = tuple(tensor.shape)
            raise ConversionError(
                f"{path}: shape conflict at {source!r}: {shape} where the architecture needs "
                f"{tuple(expected[key].shape)} (as {key})"
            )
    missing = [k for k in expected if k not in converted and not k.endswith("num_batches_tracked")]
    if missing:  # (named as the file would name them: it named ours, audit)
        first = [_original_name(k, layout) for k in missing]
        first = list(dict.fromkeys(first))  # (attn.kv once for its key and value halves)
        more = f" and {len(first) - 1} more" if len(first) > 1 else ""
        raise ConversionError(f"{path}: missing {first[0]!r}{more} (as {missing[0]} in the inferred architecture)")
