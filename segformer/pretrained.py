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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import SegformerConfig
from .fileio import atomic_write, atomic_write_text
from .hub import CheckpointError, ShapeMismatchError, first_line, push_folder, resolve_file

logger = logging.getLogger("segformer")

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
_BENIGN_MISSING = re.compile(r"(^|\.)num_batches_tracked$")


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
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from None
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]  # {"meta", "state_dict"} files of the original code
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return dict(data)


def find_weights(name_or_path: str | os.PathLike, *, use_safetensors: bool | None = None, **hub: Any) -> list[Path]:
    """The weight files of a model directory or hub repo: one file, or every shard of an index."""
    order = []
    if use_safetensors is not False:
        order += [SAFE_WEIGHTS, SAFE_INDEX]
    if use_safetensors is not True:
        order += [PT_WEIGHTS, PT_INDEX]
    for name in order:
        path = resolve_file(name_or_path, name, required=False, **hub)
        if path is None:
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{path}: not a valid checkpoint index (needs a 'weight_map' object)") from None
        return [resolve_file(name_or_path, shard, **hub) for shard in shards]
    wanted = " or ".join(order)
    raise CheckpointError(f"{name_or_path}: no weights found ({wanted})")


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
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like '2GB' or a number of bytes")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2)]
    return int(float(match.group(1)) * scale)


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
        config: SegformerConfig | str | os.PathLike | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        subfolder: str = "",
        ignore_mismatched_sizes: bool = False,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | int | None = None,
        device_map: str | torch.device | int | None = None,
        low_cpu_mem_usage: bool | None = None,
        use_safetensors: bool | None = None,
        attn_implementation: str | None = None,
        output_loading_info: bool = False,
        **config_overrides: Any,
    ):
        """Load a model from a directory written by ``save_pretrained`` (ours or Transformers') or a hub id.

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
        """
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        name = pretrained_model_name_or_path
        known = set(inspect.signature(SegformerConfig.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(config_overrides) - known)
        if unknown:
            raise TypeError(f"from_pretrained got unknown argument(s) {', '.join(unknown)}")
        if _default_device_is_meta() or str(device_map) == "meta" or str(device) == "meta":
            raise RuntimeError(
                f"{cls.__name__}.from_pretrained loads weights, which the meta device cannot hold; for a model "
                "without weights build it as `with torch.device('meta'): Model(config)`"
            )
        if name is None and (config is None or state_dict is None):
            raise ValueError(
                "from_pretrained(None, ...) needs both config= and state_dict= (or give a directory or hub id)"
            )
        if isinstance(config, SegformerConfig):
            config = config.copy(**config_overrides)
        elif config is not None:
            config = SegformerConfig.from_pretrained(config, **hub, **config_overrides)
        else:
            config = SegformerConfig.from_pretrained(name, subfolder=subfolder, **hub, **config_overrides)
        if state_dict is None:
            state_dict = load_state_dict(name, use_safetensors=use_safetensors, subfolder=subfolder, **hub)
        state = canonical_keys(state_dict)
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
                "to re-initialise those weights (e.g. for a new num_labels)"
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
        **hub: Any,
    ) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``; shards plus an index when
        the weights exceed ``max_shard_size``) in the layout Transformers reads. Every file is written under a
        temporary name and renamed, so an interrupted save never leaves a half-written file. With
        ``push_to_hub=True`` the same files are then uploaded (``hub``: the arguments of :meth:`push_to_hub`;
        ``repo_id`` defaults to the directory's name). Returns the directory."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory}: exists and is not a directory")
        if hub and not push_to_hub:
            raise TypeError(f"save_pretrained got unexpected argument(s) {', '.join(sorted(hub))}")
        directory.mkdir(parents=True, exist_ok=True)
        written = self._write_checkpoint(directory, safe_serialization, max_shard_size, state_dict)
        # Remove weights of an earlier save that would shadow or confuse these ones.
        for stale in directory.iterdir():
            if stale.name not in written and re.fullmatch(
                r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?", stale.name
            ):
                stale.unlink()
        if push_to_hub:
            hub.setdefault("max_shard_size", max_shard_size)
            hub.setdefault("safe_serialization", safe_serialization)
            self.push_to_hub(hub.pop("repo_id", directory.resolve().name), **hub)
        return directory

    def _write_checkpoint(
        self,
        directory: Path,
        safe_serialization: bool,
        max_shard_size: int | str | None,
        state_dict: Mapping[str, torch.Tensor] | None,
    ) -> list[str]:
        """Write the weights and config.json into ``directory``; return the names of the files written."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict or self.state_dict()).items()}
        config = self.config.copy()
        config.architectures = [type(self).__name__]
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        if floats:
            config.dtype = floats[0]
        base, index_name = (SAFE_WEIGHTS, SAFE_INDEX) if safe_serialization else (PT_WEIGHTS, PT_INDEX)
        shards = _shard(state, _parse_size(max_shard_size) if max_shard_size is not None else None)
        written = []
        if len(shards) == 1:
            written.append(base)
            _write_weights(directory / base, shards[0], safe_serialization)
        else:
            stem, ext = base.rsplit(".", 1)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                shard_name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
                _write_weights(directory / shard_name, shard, safe_serialization)
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


def _write_weights(path: Path, state: dict[str, torch.Tensor], safe: bool) -> None:
    if safe:
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
