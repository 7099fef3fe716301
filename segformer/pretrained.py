"""Reading and writing checkpoints in the Transformers layout: ``config.json`` + ``model.safetensors``.

Also reads ``pytorch_model.bin`` (with ``weights_only=True``), sharded checkpoints
(``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``) and hub ids through the
huggingface_hub cache. Loading is loud: missing, unexpected and mis-shaped keys are reported by name, and
nothing is silently re-initialised unless the caller opted in with ``ignore_mismatched_sizes=True``. The mixin also
carries the small API that Transformers users reach for (``push_to_hub``, ``num_parameters``, ``base_model``, ...).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import SegformerConfig
from .fileio import atomic_write, atomic_write_text
from .hub import (
    CheckpointError,
    MissingConfigError,
    NotCachedError,
    ShapeMismatchError,
    first_line,
    push_folder,
    resolve_file,
)

logger = logging.getLogger("segformer")

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
_BENIGN_MISSING = re.compile(r"(^|\.)num_batches_tracked$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_NOT_A_CHECKPOINT = (  # what a file that is neither a folder nor weights is told
    "not a checkpoint: expected a model directory or a weights file (.safetensors, .bin, .pt, .pth, or a shards' "
    ".index.json)"
)


def _saved_weights(variant: str | None) -> re.Pattern[str]:
    """The names of the weight files (and indexes) that save_pretrained writes for ``variant`` (None: none); those
    of an earlier save of the same variant are removed by the next one."""
    v = "" if variant is None else re.escape("." + variant)
    weights = rf"(model|pytorch_model){v}(-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)"
    return re.compile(rf"{weights}|(model\.safetensors|pytorch_model\.bin)\.index{v}\.json")


@dataclass
class LoadingInfo:
    """What :meth:`from_pretrained` found: keys the model wanted but the checkpoint lacked (newly
    initialised), keys the checkpoint had but the model does not use, and keys whose shapes differ
    (re-initialised with ``ignore_mismatched_sizes=True``) as (key, checkpoint shape, model shape)."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def as_dict(self) -> dict[str, set]:
        """Transformers' ``output_loading_info`` format: sets of keys (mismatched: (key, checkpoint shape, model
        shape) tuples) and ``error_msgs`` (always empty: a load that fails raises instead)."""
        return {
            "missing_keys": set(self.missing_keys),
            "unexpected_keys": set(self.unexpected_keys),
            "mismatched_keys": {(k, tuple(a), tuple(b)) for k, a, b in self.mismatched_keys},
            "error_msgs": [],
        }


# ------------------------------------------------------------------------------------------ file reading
def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one safetensors or PyTorch pickle file into a CPU state dict (pickles with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:  # a pickled object (argparse.Namespace, a class of the training code, ...) beside the tensors
            raise CheckpointError(
                f"{path}: holds a pickled {found.group(1)}, which only an unsafe full unpickle could read; .bin files "
                "are always loaded with weights_only=True (unpickling can run code): re-save it as a state dict of "
                "tensors or as safetensors"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_load_reason(exc)})") from None
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]  # {"meta", "state_dict"} files of the original code
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return dict(data)


def _load_reason(exc: BaseException) -> str:
    """What torch.load's error says about the file: the safe unpickler's own reason ("Unsupported operand 181")
    rather than its first line, whose advice to re-run with weights_only=False (unsafe, and for a damaged file
    useless) the package never follows (audit)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", text, re.DOTALL)
    if found and found.group(1).strip():
        return f"damaged or not a PyTorch file: {first_line(found.group(1).strip())}"
    return first_line(exc)


def check_variant(variant: Any) -> None:
    """Raise a one-line ValueError unless ``variant`` is None or a name such as "fp16"."""
    if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"[\w-]+", variant)):
        raise ValueError(f"variant must be a name such as 'fp16' (letters, digits, _ and -), got {variant!r}")


def with_variant(filename: str, variant: str | None) -> str:
    """Transformers' name of a weights file of a ``variant``: "fp16" makes ``model.fp16.safetensors``,
    ``pytorch_model.fp16.bin`` and ``model.safetensors.index.fp16.json``."""
    if variant is None:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _adapter_error(where: str | os.PathLike, subfolder: str = "") -> CheckpointError:
    """A LoRA run's checkpoint holds the adapter alone, on top of the base model it was made from."""
    inside = f", subfolder={subfolder!r}" if subfolder else ""
    return CheckpointError(
        f"{where}: a PEFT adapter (adapter_config.json), not a whole model: load its base model, then "
        f"peft.PeftModel.from_pretrained(base, {str(where)!r}{inside})"
    )


def find_weights(
    name_or_path: str | os.PathLike,
    *,
    use_safetensors: bool | None = None,
    variant: str | None = None,
    **hub: Any,
) -> list[Path]:
    """The weight files of a model directory or hub repo (one file, or every shard of an index), or of a path to
    one weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``) or to an ``.index.json`` of shards beside it.
    ``variant`` ("fp16", ...) looks for Transformers' variant names (:func:`with_variant`)."""
    check_variant(variant)
    file = Path(name_or_path).expanduser()
    if file.is_file():
        return _weights_of_file(file, use_safetensors=use_safetensors, variant=variant, **hub)
    order = []
    if use_safetensors is not False:
        order += [SAFE_WEIGHTS, SAFE_INDEX]
    if use_safetensors is not True:
        order += [PT_WEIGHTS, PT_INDEX]
    order = [with_variant(name, variant) for name in order]
    indexes = {with_variant(name, variant) for name in (SAFE_INDEX, PT_INDEX)}
    uncached = False
    for name in order:
        try:
            path = resolve_file(name_or_path, name, required=False, raise_uncached=True, **hub)
        except NotCachedError:
            uncached = True  # not in the cache and the hub cannot be asked: try the other names, as Transformers
            continue
        if path is None:
            continue
        if name not in indexes:
            return [path]
        return [resolve_file(name_or_path, shard, **hub) for shard in _index_shards(path)]
    subfolder = hub.get("subfolder") or ""
    wanted = " or ".join(f"{subfolder}/{name}" if subfolder else name for name in order)
    if uncached:
        raise CheckpointError(
            f"{name_or_path}: no weights file ({wanted}) is in the local hub cache and the hub cannot be reached "
            "(hub ids need network or a populated cache; pass a local directory made by save_pretrained instead)"
        )
    if resolve_file(name_or_path, "adapter_config.json", required=False, **hub) is not None:
        raise _adapter_error(name_or_path, subfolder)
    raise CheckpointError(f"{name_or_path}: no weights found ({wanted})")


def _index_shards(path: Path) -> list[str]:
    """The shard names of a checkpoint index (``weight_map`` values), sorted."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a valid checkpoint index (needs a 'weight_map' object)") from None
    if not all(isinstance(s, str) and s for s in shards):
        raise CheckpointError(f"{path}: not a valid checkpoint index (its weight_map values must be file names)")
    return shards


def _weights_of_file(
    path: Path, *, use_safetensors: bool | None, variant: str | None, subfolder: str = "", **_: Any
) -> list[Path]:
    """The weights of a path to one weights file or to an index (its shards, which lie beside it)."""
    for argument, value in (("subfolder", subfolder), ("variant", variant)):
        if value:
            raise CheckpointError(f"{path}: {argument}= applies to a model directory or hub id, not to a weights file")
    if path.name.endswith(".index.json"):
        shards = [path.parent / shard for shard in _index_shards(path)]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard {missing[0]} of this index is missing from {path.parent}")
    elif path.suffix in _WEIGHT_SUFFIXES:
        shards = [path]
    else:
        raise CheckpointError(f"{path}: {_NOT_A_CHECKPOINT}")
    safe = all(s.suffix == ".safetensors" for s in shards)
    if use_safetensors is True and not safe:
        raise CheckpointError(f"{path}: use_safetensors=True but this is not a safetensors checkpoint")
    if use_safetensors is False and safe:
        raise CheckpointError(f"{path}: use_safetensors=False but this is a safetensors checkpoint")
    return shards


def load_state_dict(name_or_path: str | os.PathLike, **kwargs: Any) -> dict[str, torch.Tensor]:
    """The whole state dict of a model directory or hub repo (shards merged), on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for path in find_weights(name_or_path, **kwargs):
        state.update(load_weights_file(path))
    return state


# ----------------------------------------------------------------------------------------- key handling
# Transformers 5.x renames SegFormer modules in memory (it still writes the canonical names to disk); a
# state dict saved with torch.save(model.state_dict()) from there uses these names.
_V5_RENAMES = [
    (re.compile(r"(^|\.)stages\.(\d+)\.patch_embeddings\."), r"\1encoder.patch_embeddings.\2."),
    (re.compile(r"(^|\.)stages\.(\d+)\.blocks\.(\d+)\."), r"\1encoder.block.\2.\3."),
    (re.compile(r"(^|\.)stages\.(\d+)\.layer_norm\."), r"\1encoder.layer_norm.\2."),
    (re.compile(r"\.layernorm_before\."), ".layer_norm_1."),
    (re.compile(r"\.layernorm_after\."), ".layer_norm_2."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.self.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.self.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.self.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.attention\.sequence_reduction\.sequence_reduction\."), ".attention.self.sr."),
    (re.compile(r"\.attention\.sequence_reduction\.layer_norm\."), ".attention.self.layer_norm."),
    (re.compile(r"\.mlp\.fc1\."), ".mlp.dense1."),
    (re.compile(r"\.mlp\.fc2\."), ".mlp.dense2."),
    (re.compile(r"^decode_head\.linear_projections\."), "decode_head.linear_c."),
]


def canonical_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Transformers 5.x in-memory names to the on-disk names; reject original NVlabs/mmseg layouts."""
    if any(k.startswith(("backbone.patch_embed", "patch_embed1.")) for k in state):
        raise CheckpointError(
            "this is an original NVlabs/mmseg SegFormer checkpoint; convert it first with "
            "`segformer convert ORIGINAL.pth OUT_DIR`"
        )
    if not any(".stages." in k or k.startswith("stages.") or "linear_projections" in k for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        for pattern, repl in _V5_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def adapt_prefix(state: dict[str, torch.Tensor], model_keys: set[str], prefix: str) -> dict[str, torch.Tensor]:
    """Add or strip the base-model prefix (``segformer.``) so a base checkpoint fits a task model and back."""
    dotted = prefix + "."
    model_has = any(k.startswith(dotted) for k in model_keys)
    ckpt_has = any(k.startswith(dotted) for k in state)
    if model_has and not ckpt_has:
        heads = {k.split(".", 1)[0] for k in model_keys if not k.startswith(dotted)}
        return {(k if k.split(".", 1)[0] in heads else dotted + k): v for k, v in state.items()}
    if ckpt_has and not model_has:
        return {(k[len(dotted) :] if k.startswith(dotted) else k): v for k, v in state.items()}
    return state


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)(B?)\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like '2GB' or a number of bytes")
    unit, binary, b = match.group(2).upper(), match.group(3), match.group(4)
    power = "KMGT".find(unit) + 1 if unit else 0
    # as Transformers reads sizes: KiB, MiB, ... binary; KB, MB decimal; a lowercase b after a unit bits (Mb)
    value = float(match.group(1)) * (1024 if binary else 1000) ** power
    return int(value / 8 if unit and b == "b" else value)


# ------------------------------------------------------------------------------------ device and dtype
# The one reading of device and dtype names: from_pretrained, the predictor and the programs all use these.
_DTYPE_ALIASES = {"fp32": torch.float32, "fp16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16}


def select_device(device: str | torch.device | int | None = None) -> torch.device:
    """None or "auto": CUDA when available, else Apple's MPS, else the CPU; an int N: cuda:N; anything else as
    given. A CUDA or MPS device this machine lacks (or a CUDA index beyond its count) is a ValueError."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: not a device (cpu, cuda, cuda:N, mps, or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """None → float32; a floating point torch dtype or its name: "float32"/"fp32", "float16"/"fp16"/"half",
    "bfloat16"/"bf16" (also "torch.float16", "float64", ...). Anything else is a ValueError."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        value = dtype
    else:
        name = str(dtype).removeprefix("torch.")
        value = _DTYPE_ALIASES.get(name, getattr(torch, name, None))
        if not isinstance(value, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype: use float32, float16 or bfloat16")
    if not value.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    return value


def _checkpoint_dtype(dtype: Any, config: SegformerConfig, state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """from_pretrained's dtype: None or "auto" (the checkpoint's: the config's ``dtype``, else the weights' own,
    as Transformers 5.x loads by default) or a name / dtype for :func:`resolve_dtype`."""
    if dtype is None or dtype == "auto":
        if config.dtype is not None:
            return config.dtype
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        return floats[0] if floats else None
    return resolve_dtype(dtype)


def checkpoint_kwargs(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments of ``torch.utils.checkpoint.checkpoint`` for gradient checkpointing: ``given``
    (checked against what this torch accepts) over the default ``use_reentrant=False``."""
    import torch.utils.checkpoint

    given = dict(given or {})
    params = inspect.signature(torch.utils.checkpoint.checkpoint).parameters
    known = {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY} | {"preserve_rng_state"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(
            f"gradient_checkpointing_kwargs: torch.utils.checkpoint.checkpoint takes no {', '.join(unknown)} "
            f"(it takes {', '.join(sorted(known))})"
        )
    return {"use_reentrant": False, **given}


def _default_device_is_meta() -> bool:
    """Whether new tensors land on the meta device (``with torch.device("meta")`` or set_default_device)."""
    return torch.empty(()).device.type == "meta"


# ----------------------------------------------------------------------------------------------- mixin
class PreTrainedMixin:
    """from_pretrained / save_pretrained for the SegFormer models (mixed into an ``nn.Module``)."""

    config_class: type = SegformerConfig
    base_model_prefix: str = "segformer"

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *,
        config: SegformerConfig | Mapping[str, Any] | str | os.PathLike | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        subfolder: str = "",
        force_download: bool = False,
        proxies: dict[str, str] | None = None,
        resume_download: bool | None = None,
        trust_remote_code: bool | None = None,
        variant: str | None = None,
        ignore_mismatched_sizes: bool = False,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | int | None = None,
        device_map: str | torch.device | int | None = None,
        low_cpu_mem_usage: bool | None = None,
        use_safetensors: bool | None = None,
        weights_only: bool = True,
        key_mapping: Mapping[str, str] | None = None,
        attn_implementation: str | None = None,
        output_loading_info: bool = False,
        **config_overrides: Any,
    ):
        """Load a model from a directory written by ``save_pretrained`` (ours or Transformers'), a hub id, or a
        path to one weights file (``.safetensors`` / ``.bin``, or a shards' ``.index.json``) with its config
        given as ``config=`` or lying beside it as ``config.json``.

        ``config`` is a :class:`SegformerConfig`, a Transformers ``SegformerConfig`` (anything with ``to_dict()``)
        or a mapping, or a directory / config.json / hub id to read one from.
        ``config_overrides`` replace config fields (``num_labels=…``, ``id2label=…``, ``drop_path_rate=…``);
        a new label count needs ``ignore_mismatched_sizes=True``, which re-initialises the classifier (otherwise a
        :class:`~segformer.hub.ShapeMismatchError`, a RuntimeError, names each key and both shapes). A base
        (encoder-only) checkpoint loads into a task model and the reverse; the keys that had to be
        initialised or were left unused are logged (and returned with ``output_loading_info=True``).
        ``state_dict`` replaces the weight files (``from_pretrained(None, config=config, state_dict=sd)`` needs
        no directory); ``subfolder`` is a folder inside the directory or hub repo.
        The dtype is the checkpoint's (its config's ``dtype``, else the weights' own), as Transformers 5.x loads;
        ``torch_dtype`` / ``dtype`` (a dtype or its name) choose another. ``device`` / ``device_map`` ("auto",
        "cpu", "cuda:0", …) place the model; ``low_cpu_mem_usage`` is accepted and changes nothing (loading
        already holds one model plus one copy of the weights). ``attn_implementation="eager"`` turns the fast path
        off. The model is returned in eval mode, with ``config.name_or_path`` set to where it came from.

        Transformers' loading arguments: ``force_download`` and ``proxies`` go to huggingface_hub for hub ids
        (huggingface_hub 1.0 and later ignores ``proxies``: set HTTPS_PROXY); ``resume_download`` and
        ``trust_remote_code`` are accepted and ignored (downloads always resume; this architecture has no remote
        code). ``variant="fp16"`` reads ``model.fp16.safetensors``, ``pytorch_model.fp16.bin`` or their
        ``*.index.fp16.json``. ``key_mapping`` ({regex: replacement}) renames checkpoint keys before loading: the
        first pattern that matches a key is applied (``re.sub``). ``weights_only``: ``.bin`` files are always
        read with ``torch.load(weights_only=True)``, which cannot run code; ``weights_only=False`` is accepted but
        does not make loading unsafe (a file that needs a full unpickle is a CheckpointError saying so).
        """
        del resume_download, trust_remote_code, weights_only, low_cpu_mem_usage  # accepted; nothing to do (above)
        hub: dict[str, Any] = dict(
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        if force_download:
            hub["force_download"] = True
        if proxies is not None:
            hub["proxies"] = proxies
        name = pretrained_model_name_or_path
        known = set(inspect.signature(SegformerConfig.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(config_overrides) - known)
        if unknown:
            raise TypeError(f"from_pretrained got unknown argument(s) {', '.join(unknown)}")
        mapping = _check_key_mapping(key_mapping)
        if _default_device_is_meta() or str(device_map) == "meta" or str(device) == "meta":
            raise RuntimeError(
                f"{cls.__name__}.from_pretrained loads weights, which the meta device cannot hold; for a model "
                "without weights build it as `with torch.device('meta'): Model(config)`"
            )
        if name is None and (config is None or state_dict is None):
            raise ValueError(
                "from_pretrained(None, ...) needs both config= and state_dict= (or give a directory or hub id)"
            )
        weights_file = name is not None and Path(name).expanduser().is_file()
        if weights_file and str(name).lower().endswith(".onnx"):
            raise CheckpointError(
                f"{name}: an ONNX file, not a checkpoint: one segformer export wrote runs as it is with segformer "
                "predict/eval/serve --model FILE.onnx or SegformerPredictor(FILE.onnx); from_pretrained and training "
                "take the checkpoint folder it was exported from"
            )
        if weights_file and not (Path(name).suffix in _WEIGHT_SUFFIXES or str(name).endswith(".index.json")):
            # (--model data/labels.json was "weights without their config.json": audit)
            raise CheckpointError(f"{name}: {_NOT_A_CHECKPOINT}")
        if weights_file and config is None:
            beside = Path(name).expanduser().parent / "config.json"
            if not beside.is_file():
                raise MissingConfigError(
                    f"{name}: a weights file needs its config: pass config= (a SegformerConfig, a model directory "
                    "or a config.json), or put config.json beside it",
                    where=str(name),
                )
            config = beside
        config = _load_config(config, name, subfolder, hub, config_overrides)
        if state_dict is None:
            state_dict = load_state_dict(
                name, use_safetensors=use_safetensors, variant=variant, subfolder=subfolder, **hub
            )
        state = canonical_keys(_apply_key_mapping(state_dict, mapping))
        if name is not None:
            config.name_or_path = str(name)
        model = cls(config)
        source = name if name is not None else "the state_dict"
        info = model.load_checkpoint_state(state, ignore_mismatched_sizes=ignore_mismatched_sizes, source=source)
        if attn_implementation == "flash_attention_2":  # as Transformers answers for SegFormer
            raise ValueError(
                f"{cls.__name__} does not support flash_attention_2; use 'sdpa' (PyTorch's fused kernel, which "
                "picks a flash kernel by itself where the GPU has one) or 'eager'"
            )
        if attn_implementation not in (None, "sdpa", "eager"):
            raise ValueError(f"attn_implementation {attn_implementation!r}: use 'sdpa' or 'eager'")
        if attn_implementation == "eager":
            model.fast_path = False
        target_dtype = _checkpoint_dtype(torch_dtype if torch_dtype is not None else dtype, config, state)
        place = device if device is not None else device_map
        target_device = select_device(place) if place is not None else None
        if target_dtype is not None or target_device is not None:
            model.to(device=target_device, dtype=target_dtype)
        config.dtype = model.dtype  # the dtype it was loaded in, as Transformers records it
        model.eval()
        return (model, info.as_dict()) if output_loading_info else model

    def load_checkpoint_state(
        self,
        state: Mapping[str, torch.Tensor],
        *,
        ignore_mismatched_sizes: bool = False,
        source: Any = "state dict",
    ) -> LoadingInfo:
        """Load canonical-name tensors, adapting the base-model prefix, and report what did not fit."""
        own = self.state_dict()
        state = adapt_prefix(dict(state), set(own), self.base_model_prefix)
        info = LoadingInfo()
        usable = {}
        for key, value in state.items():
            if key not in own:
                info.unexpected_keys.append(key)
            elif value.shape != own[key].shape:
                info.mismatched_keys.append((key, tuple(value.shape), tuple(own[key].shape)))
            else:
                usable[key] = value
        info.missing_keys = [k for k in own if k not in state and not _BENIGN_MISSING.search(k)]
        if info.mismatched_keys and not ignore_mismatched_sizes:
            shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in info.mismatched_keys[:4])
            more = f" (+{len(info.mismatched_keys) - 4} more)" if len(info.mismatched_keys) > 4 else ""
            raise ShapeMismatchError(
                f"{source}: shapes differ from the model for {shown}{more}; pass ignore_mismatched_sizes=True "
                "to re-initialise those weights (e.g. for a new num_labels)",
                source=str(source),
                shapes=f"{shown}{more}",
            )
        if info.mismatched_keys:  # re-initialise the whole module of each mismatched tensor
            modules = {k.rsplit(".", 1)[0] for k, _, _ in info.mismatched_keys}
            for name in modules:
                self._init_weights(self.get_submodule(name))
        self.load_state_dict(usable, strict=False)
        name = type(self).__name__
        if info.missing_keys:
            logger.warning(
                "Some weights of %s were not in %s and are newly initialised: %s. Train the model before use.",
                name,
                source,
                ", ".join(_summarise(info.missing_keys)),
            )
        if info.unexpected_keys:
            logger.warning(
                "Some weights of %s are not used by %s: %s.",
                source,
                name,
                ", ".join(_summarise(info.unexpected_keys)),
            )
        if info.mismatched_keys:
            logger.warning(
                "Some weights of %s were re-initialised because their shapes differ: %s.",
                name,
                ", ".join(f"{k} {a}->{b}" for k, a, b in info.mismatched_keys),
            )
        return info

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        safe_serialization: bool = True,
        max_shard_size: int | str | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        is_main_process: bool = True,
        variant: str | None = None,
        save_function: Callable[[Any, str], Any] | None = None,
        token: str | bool | None = None,
        **hub: Any,
    ) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``; shards plus an index when
        the weights exceed ``max_shard_size``) in the layout Transformers reads. With ``push_to_hub=True`` the same
        files are then uploaded (``hub``: the arguments of :meth:`push_to_hub`, and ``token``; ``repo_id`` defaults
        to the directory's name). Returns the directory.

        As in Transformers: ``is_main_process=False`` (the other processes of a distributed run) writes nothing;
        ``variant="fp16"`` names the weights ``model.fp16.safetensors`` (shards ``model.fp16-00001-of-…``, index
        ``model.safetensors.index.fp16.json``) beside the other variants' files, which are left alone; and
        ``save_function`` (``torch.save`` by default) writes the ``.bin`` files of ``safe_serialization=False``.

        The save is all or nothing: every file is first written under a temporary name (a hidden folder in
        ``save_directory``); a failure there (a full disk, Ctrl-C) removes them and leaves an earlier checkpoint in
        the directory exactly as it was. Only then are they renamed into place: the weights, the index, then
        config.json, and the weight files of the earlier save are removed. An old index whose shards are about to be
        replaced under the same names is removed first, so even a crash during the renames never leaves a mix of
        old and new shards that loads. A process killed outright (SIGKILL, power loss) between the weights' renames
        and config.json's leaves the new weights under the old config.json (a model whose shapes changed then
        fails to load with a shape error naming the folder) and its hidden folder, which the next save there
        removes once it is ten minutes old."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory}: exists and is not a directory")
        if hub and not push_to_hub:
            raise TypeError(f"save_pretrained got unexpected argument(s) {', '.join(sorted(hub))}")
        check_variant(variant)
        if save_function is not None and not callable(save_function):
            raise TypeError(f"save_function must be callable (like torch.save), got {type(save_function).__name__}")
        if not is_main_process:
            return directory
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=".segformer-save-", suffix=".tmp", dir=directory))
        except OSError as exc:
            error = type(exc)(f"{directory}: cannot write there ({exc.strerror})")
            error.errno = exc.errno
            raise error from None
        try:
            try:
                written = self._write_checkpoint(
                    staging, safe_serialization, max_shard_size, state_dict, variant, save_function
                )
            except OSError as exc:  # name the checkpoint's files, not the temporary folder
                text = str(exc).replace(str(staging), str(directory))
                if text == str(exc):
                    raise
                error = type(exc)(text)
                error.errno = exc.errno
                raise error from None
            _commit_checkpoint(staging, directory, written, variant)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created:
                try:
                    directory.rmdir()  # only when empty: what this save made
                except OSError:
                    pass
            raise
        shutil.rmtree(staging, ignore_errors=True)
        _remove_killed_saves(directory)
        if push_to_hub:
            hub.setdefault("max_shard_size", max_shard_size)
            hub.setdefault("safe_serialization", safe_serialization)
            hub.setdefault("token", token)
            self.push_to_hub(hub.pop("repo_id", directory.resolve().name), **hub)
        return directory

    def _write_checkpoint(
        self,
        directory: Path,
        safe_serialization: bool,
        max_shard_size: int | str | None,
        state_dict: Mapping[str, torch.Tensor] | None,
        variant: str | None = None,
        save_function: Callable[[Any, str], Any] | None = None,
    ) -> list[str]:
        """Write the weights and config.json into ``directory``; return the names of the files written."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict or self.state_dict()).items()}
        config = self.config.copy()
        config.architectures = [type(self).__name__]
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        if floats:
            config.dtype = floats[0]
        base, index_name = (SAFE_WEIGHTS, SAFE_INDEX) if safe_serialization else (PT_WEIGHTS, PT_INDEX)
        base, index_name = with_variant(base, variant), with_variant(index_name, variant)
        shards = _shard(state, _parse_size(max_shard_size) if max_shard_size is not None else None)
        written = []
        if len(shards) == 1:
            written.append(base)
            _write_weights(directory / base, shards[0], safe_serialization, save_function)
        else:
            stem, ext = base.rsplit(".", 1)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                shard_name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
                _write_weights(directory / shard_name, shard, safe_serialization, save_function)
                weight_map.update({k: shard_name for k in shard})
                written.append(shard_name)
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(directory / index_name, json.dumps(index, indent=2) + "\n")
            written.append(index_name)
        config.to_json_file(directory / "config.json")
        return [*written, "config.json"]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        safe_serialization: bool = True,
    ) -> Any:
        """Upload the model (what :meth:`save_pretrained` writes: config.json and the weights) to the hub repo
        ``repo_id``, created if needed, in one commit. ``private`` applies when the repo is created; ``revision``
        is the branch (created when missing); ``create_pr=True`` opens a pull request instead. Returns the
        commit's ``CommitInfo``; offline (``HF_HUB_OFFLINE=1``) or refused, a :class:`~segformer.hub.HubError`."""
        name = type(self).__name__
        return push_folder(
            repo_id,
            lambda folder: [
                folder / name for name in self._write_checkpoint(folder, safe_serialization, max_shard_size, None)
            ],
            # Transformers' default message: "Upload model" for SegformerModel, else "Upload <class name>"
            commit_message=commit_message or ("Upload model" if "Model" in name else f"Upload {name}"),
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )

    # Small conveniences that users of Transformers models reach for.
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def base_model(self) -> torch.nn.Module:
        """The encoder (``SegformerModel``) of a task model; a ``SegformerModel`` itself."""
        return getattr(self, self.base_model_prefix, self)

    @property
    def name_or_path(self) -> str:
        """Where the model was loaded from (``config.name_or_path``; "" for a model built from a config)."""
        return self.config.name_or_path

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether :meth:`gradient_checkpointing_enable` is in effect."""
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.modules())

    is_activation_checkpointing = is_gradient_checkpointing  # Transformers 5.x's newer name

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Transformers 5.x's newer name of ``gradient_checkpointing_enable``."""
        self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Transformers 5.x's newer name of ``gradient_checkpointing_disable``."""
        self.gradient_checkpointing_disable()

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters (only those with ``requires_grad`` when ``only_trainable``). SegFormer has no
        ``nn.Embedding``, so ``exclude_embeddings`` changes nothing, as in Transformers."""
        skip = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, torch.nn.Embedding)}
        return sum(
            p.numel()
            for n, p in self.named_parameters()
            if (p.requires_grad or not only_trainable) and not (exclude_embeddings and n in skip)
        )

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and the buffers: BatchNorm statistics, unless ``return_buffers=False``)."""
        tensors = [*self.parameters(), *(self.buffers() if return_buffers else ())]
        return sum(t.numel() * t.element_size() for t in tensors)


def _has_file(name: str | os.PathLike, filename: str, subfolder: str, hub: dict[str, Any]) -> bool:
    """Whether ``name`` (a folder or hub id) has ``filename``, looked up without raising."""
    try:
        return resolve_file(name, filename, required=False, subfolder=subfolder, **hub) is not None
    except (CheckpointError, OSError, ValueError):
        return False


def _load_config(
    config: Any, name: Any, subfolder: str, hub: dict[str, Any], overrides: dict[str, Any]
) -> SegformerConfig:
    """from_pretrained's config: ``config=`` (an object, a mapping or a path / hub id) or the one of ``name``."""
    if isinstance(config, SegformerConfig):
        return config.copy(**overrides)
    if config is None:
        folder = Path(name).expanduser() / subfolder if isinstance(name, (str, os.PathLike)) else None
        if folder is not None and folder.is_dir() and not (folder / "config.json").exists():
            if (folder / "adapter_config.json").is_file():
                raise _adapter_error(folder)
            # weights alone: e.g. a checkpoint of Transformers' Trainer, which saves only our models' state dict
            if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
                raise MissingConfigError(
                    f"{folder}: weights without config.json; pass config= (a SegformerConfig or its folder), or train "
                    "under Trainer with segformer.integrations.SaveConfigCallback",
                    where=str(folder),
                )
        try:
            return SegformerConfig.from_pretrained(name, subfolder=subfolder, **hub, **overrides)
        except CheckpointError:  # (e.g. an adapter pushed to the hub: adapter_config.json, no config.json)
            if isinstance(name, (str, os.PathLike)) and _has_file(name, "adapter_config.json", subfolder, hub):
                raise _adapter_error(name, subfolder) from None
            raise
    if isinstance(config, (str, os.PathLike)):
        return SegformerConfig.from_pretrained(config, **hub, **overrides)
    if isinstance(config, Mapping) or callable(getattr(config, "to_dict", None)):
        data = config if isinstance(config, Mapping) else config.to_dict()  # e.g. a Transformers SegformerConfig
        if not isinstance(data, Mapping):
            raise TypeError(f"config=: {type(config).__name__}.to_dict() gave {type(data).__name__}, not a dict")
        try:
            return SegformerConfig.from_dict(data, **overrides)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"config= ({type(config).__name__}): {first_line(exc)}") from None
    raise TypeError(
        "config= must be a SegformerConfig (ours or Transformers'), a dict, or a directory, config.json path or "
        f"hub id, got {type(config).__name__}"
    )


def _check_key_mapping(key_mapping: Mapping[str, str] | None) -> list[tuple[re.Pattern, str]]:
    if key_mapping is None:
        return []
    if not isinstance(key_mapping, Mapping):
        raise TypeError(f"key_mapping must be a dict {{regex: replacement}}, got {type(key_mapping).__name__}")
    compiled = []
    for pattern, replacement in key_mapping.items():
        if not isinstance(pattern, str) or not isinstance(replacement, str):
            raise TypeError(f"key_mapping: {pattern!r}: {replacement!r}: patterns and replacements must be strings")
        try:
            compiled.append((re.compile(pattern), replacement))
        except re.error as exc:
            raise ValueError(f"key_mapping: {pattern!r} is not a regular expression ({exc})") from None
    return compiled


def _apply_key_mapping(
    state: Mapping[str, torch.Tensor], mapping: list[tuple[re.Pattern, str]]
) -> Mapping[str, torch.Tensor]:
    """Rename each key by the first pattern of ``mapping`` that matches it (as Transformers' ``key_mapping``)."""
    if not mapping:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = key
        for pattern, replacement in mapping:
            try:
                new_key, count = pattern.subn(replacement, key)
            except (re.error, IndexError) as exc:
                raise ValueError(f"key_mapping: replacement {replacement!r} of {pattern.pattern!r}: {exc}") from None
            if count:
                break
        if new_key in out:
            raise ValueError(f"key_mapping maps two checkpoint keys to {new_key!r}")
        out[new_key] = value
    return out


def _move(source: Path, target: Path) -> None:
    os.replace(source, target)


_KILLED_SAVE_AFTER = 600.0  # seconds: a save's hidden folder older than this is a killed save's (another saves now)


def _remove_killed_saves(directory: Path) -> None:
    """Remove the hidden folders of saves that were killed before they could (see save_pretrained)."""
    now = time.time()
    for folder in directory.glob(".segformer-save-*.tmp"):
        try:
            if folder.is_dir() and now - folder.stat().st_mtime >= _KILLED_SAVE_AFTER:
                shutil.rmtree(folder)
        except OSError:
            pass  # (gone meanwhile, or not ours to remove)


def _commit_checkpoint(staging: Path, directory: Path, written: list[str], variant: str | None = None) -> None:
    """Rename the files of a save, all written in ``staging``, into ``directory`` in an order that keeps it loadable
    (old or new weights, never a mix): an old index naming shards about to be replaced goes first; then the weight
    files, the new index, the files of the earlier save that would shadow the new ones (or be left stale: entry
    points before their shards), and config.json last. Only the files of the same ``variant`` are replaced."""
    new = set(written)
    indexes = [n for n in written if n in (with_variant(SAFE_INDEX, variant), with_variant(PT_INDEX, variant))]
    weights = [n for n in written if n != "config.json" and n not in indexes]
    saved_weights = _saved_weights(variant)
    for old_index in (with_variant(SAFE_INDEX, variant), with_variant(PT_INDEX, variant)):
        path = directory / old_index
        if path.is_file():
            try:
                collides = bool(set(_index_shards(path)) & set(weights))
            except CheckpointError:
                collides = True  # unreadable: it goes anyway
            if collides:
                path.unlink()
    for name in [*weights, *indexes]:
        _move(staging / name, directory / name)
    stale = [p for p in directory.iterdir() if p.name not in new and saved_weights.fullmatch(p.name)]
    stale.sort(key=lambda p: (not (p.name.endswith(".index.json") or "-of-" not in p.name), p.name))
    for path in stale:
        path.unlink()
    if "config.json" in new:
        _move(staging / "config.json", directory / "config.json")


def _summarise(keys: list[str], limit: int = 8) -> list[str]:
    return keys[:limit] + ([f"... ({len(keys) - limit} more)"] if len(keys) > limit else [])


def _shard(state: dict[str, torch.Tensor], limit: int | None) -> list[dict[str, torch.Tensor]]:
    if limit is None:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _write_weights(
    path: Path, state: dict[str, torch.Tensor], safe: bool, save_function: Callable[[Any, str], Any] | None = None
) -> None:
    if safe:
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: (save_function or torch.save)(state, str(tmp)))
