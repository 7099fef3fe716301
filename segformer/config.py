"""SegformerConfig: the hyper-parameters of a SegFormer model, stored as Transformers' ``config.json``.

The fields, names and defaults are those of the Transformers documentation page; the defaults describe
``nvidia/segformer-b0-finetuned-ade-512-512`` (MiT-b0 with a 256-wide decode head). The b0–b5 variants of
the paper are one table, :data:`VARIANTS`.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_write_text
from .hub import CheckpointError, first_line

# Variants of the paper (Table 6 / the docs page). All share heads (1, 2, 5, 8), sr ratios (8, 4, 2, 1),
# mlp ratio 4, patch sizes (7, 3, 3, 3) and strides (4, 2, 2, 2). Parameter counts are those of
# SegformerForSemanticSegmentation with 150 labels.
VARIANTS: dict[str, dict[str, Any]] = {
    "b0": dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], decoder_hidden_size=256),  # 3,752,694
    "b1": dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=256),  # 13,715,798
    "b2": dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),  # 27,461,974
    "b3": dict(depths=[3, 4, 18, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),  # 47,337,814
    "b4": dict(depths=[3, 8, 27, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),  # 64,108,374
    "b5": dict(depths=[3, 6, 40, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),  # 84,708,694
}

# hidden_act: Transformers' parameter-free activations, under its names (prelu and xielu carry weights of their own)
ACTIVATIONS = (
    "gelu",
    "relu",
    "selu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "silu",
    "swish",
    "mish",
    "tanh",
    "sigmoid",
    "gelu_python",
    "gelu_python_tanh",
    "gelu_accurate",
    "gelu_10",
    "relu6",
    "relu2",
    "leaky_relu",
    "hardswish",
    "laplace",
    "linear",
    "sqrtsoftplus",
)
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
_PER_STAGE = (
    "depths",
    "sr_ratios",
    "hidden_sizes",
    "patch_sizes",
    "strides",
    "num_attention_heads",
    "mlp_ratios",
)

# Keys of config.json that belong to the file format rather than to the model; kept out of ``extra``.
_FORMAT_KEYS = {"model_type", "transformers_version", "segformer_version"}

# The attributes every Transformers config has, with the defaults of its base class (Transformers 5.x). A config's
# diff (``to_diff_dict``, what config.json holds) leaves these out where they keep that default; every SegFormer
# field is always written.
_COMMON_DEFAULTS: dict[str, Any] = {
    "architectures": None,
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "dtype": None,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "id2label": {0: "LABEL_0", 1: "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "problem_type": None,
}
_TRUE_STRINGS, _FALSE_STRINGS = ("true", "1", "y", "yes"), ("false", "0", "n", "no")

# Arguments of Transformers' loaders (``from_pretrained`` of configs and models) that say how to find the files, not
# what the config holds: consumed (or ignored) by the loaders, never stored as fields. ``from_dict`` drops them from
# a file too, so a config.json that an older version polluted with them is cleaned when saved again.
LOADER_ARGUMENTS = frozenset(
    {
        "cache_dir",
        "force_download",
        "resume_download",
        "proxies",
        "token",
        "use_auth_token",
        "local_files_only",
        "revision",
        "trust_remote_code",
        "subfolder",
        "user_agent",
        "return_unused_kwargs",
        "gguf_file",
        "_from_auto",
        "_from_pipeline",
        "_commit_hash",
    }
)
# Names a config answers to besides its constructor's parameters (for ``return_unused_kwargs``).
_ALIASES = frozenset({"torch_dtype", "name_or_path", "_name_or_path"})


class SegformerConfig:
    """Configuration of a SegFormer model (encoder, decode head and task heads).

    Every argument of Transformers' ``SegformerConfig`` is accepted with the same default. Beyond those:

    - ``num_labels`` / ``id2label`` / ``label2id``: the label set (``num_labels`` defaults to 2, as in
      Transformers, when neither is given); ``id2label`` keys may be ints or strings.
    - ``problem_type``: for SegformerForImageClassification; inferred from the labels when None.
    - ``output_hidden_states``, ``output_attentions``, ``return_dict``: defaults of the forward flags.
    - ``dtype`` (or its older name ``torch_dtype``): the weights' dtype, a ``torch.dtype`` or its name
      ("float32", "bfloat16", ...); kept as a ``torch.dtype`` and written as its name. ``save_pretrained`` of a
      model records its own dtype here, and ``from_pretrained`` loads in it unless told otherwise.
    - ``chunk_size_feed_forward``: stored and written back like every Transformers config; SegFormer (there and
      here) does not use it.
    - ``reshape_last_stage``: return the last stage as (B, C, H, W) (True) or (B, H*W, C) (False).
    - ``num_hidden_layers``: another name of ``num_encoder_blocks`` (read, set or passed), as in Transformers.
    - ``use_layer_norm_eps``: Transformers (and so the default here) gives every LayerNorm eps 1e-5 and stores
      ``layer_norm_eps`` without using it. True applies ``layer_norm_eps`` to the block and stage norms, as
      the original NVlabs code did (with 1e-6); logits then differ from Transformers by ~2e-4.
    - unknown keyword arguments (keys of hub configs such as ``image_size``) are kept as attributes and
      written back by :meth:`to_dict`.

    Invalid values raise ValueError naming the field. Serialisation follows Transformers' ``PretrainedConfig``:
    :meth:`to_dict` (every field), :meth:`to_diff_dict` (what config.json holds), :meth:`to_json_string` and
    :meth:`to_json_file` (``use_diff=True`` by default), :meth:`update` and :meth:`update_from_string`.
    """

    model_type = "segformer"

    def __init__(
        self,
        num_channels: int = 3,
        num_encoder_blocks: int = 4,
        depths: list[int] = (2, 2, 2, 2),
        sr_ratios: list[int] = (8, 4, 2, 1),
        hidden_sizes: list[int] = (32, 64, 160, 256),
        patch_sizes: list[int] = (7, 3, 3, 3),
        strides: list[int] = (4, 2, 2, 2),
        num_attention_heads: list[int] = (1, 2, 5, 8),
        mlp_ratios: list[int] = (4, 4, 4, 4),
        hidden_act: str | Callable = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        classifier_dropout_prob: float = 0.1,
        initializer_range: float = 0.02,
        drop_path_rate: float = 0.1,
        layer_norm_eps: float = 1e-6,
        decoder_hidden_size: int = 256,
        is_encoder_decoder: bool = False,
        semantic_loss_ignore_index: int = 255,
        *,
        reshape_last_stage: bool = True,
        use_layer_norm_eps: bool = False,
        num_labels: int | None = None,
        id2label: Mapping[int | str, str] | None = None,
        label2id: Mapping[str, int] | None = None,
        problem_type: str | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
        architectures: list[str] | None = None,
        dtype: str | torch.dtype | None = None,
        chunk_size_feed_forward: int = 0,
        **kwargs: Any,
    ) -> None:
        num_encoder_blocks = kwargs.pop("num_hidden_layers", num_encoder_blocks)  # (Transformers' alias: see below)
        self.num_channels = num_channels
        self.num_encoder_blocks = num_encoder_blocks
        self.depths = list(depths)
        self.sr_ratios = list(sr_ratios)
        self.hidden_sizes = list(hidden_sizes)
        self.patch_sizes = list(patch_sizes)
        self.strides = list(strides)
        self.num_attention_heads = list(num_attention_heads)
        self.mlp_ratios = list(mlp_ratios)
        if _is_int(num_encoder_blocks) and num_encoder_blocks >= 1:  # Transformers builds the first N stages of
            for name in _PER_STAGE:  # longer lists and saves them whole: their first N entries are the model
                if len(getattr(self, name)) > num_encoder_blocks:
                    setattr(self, name, getattr(self, name)[:num_encoder_blocks])
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.classifier_dropout_prob = classifier_dropout_prob
        self.initializer_range = initializer_range
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.decoder_hidden_size = decoder_hidden_size
        self.is_encoder_decoder = is_encoder_decoder
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        self.reshape_last_stage = reshape_last_stage
        self.use_layer_norm_eps = use_layer_norm_eps
        self.problem_type = problem_type
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.return_dict = return_dict
        self.architectures = list(architectures) if architectures else None
        legacy_dtype = kwargs.pop("torch_dtype", None)  # the name before Transformers 4.56
        self.dtype = parse_dtype(dtype if dtype is not None else legacy_dtype)
        self.chunk_size_feed_forward = chunk_size_feed_forward
        self._name_or_path = str(kwargs.pop("_name_or_path", kwargs.pop("name_or_path", "")) or "")
        for key in _FORMAT_KEYS:
            kwargs.pop(key, None)
        self.extra: dict[str, Any] = dict(kwargs)
        self._set_labels(num_labels, id2label, label2id)
        self.validate()

    # ----------------------------------------------------------------------------------------- labels
    def _set_labels(self, num_labels: int | None, id2label: Mapping | None, label2id: Mapping | None) -> None:
        if id2label is not None:
            try:
                id2label = {int(k): str(v) for k, v in dict(id2label).items()}
            except (TypeError, ValueError):
                raise ValueError("id2label: keys must be integers (or strings of integers)") from None
            if sorted(id2label) != list(range(len(id2label))):  # Transformers keeps such a map: so do we, and say so
                last, keys = len(id2label) - 1, sorted(id2label)
                unnamed = [i for i in range(len(id2label)) if i not in id2label]
                logging.getLogger("segformer").warning(
                    f"id2label's keys {keys[:8]}{' …' if len(keys) > 8 else ''} are not 0..{last}: the model has "
                    f"{len(id2label)} outputs, 0..{last}, named by their index: {', '.join(map(str, unnamed[:8]))} "
                    f"{'has' if len(unnamed) == 1 else 'have'} no name, and keys above {last} name no output"
                )
            if num_labels is not None and num_labels != len(id2label):
                raise ValueError(f"num_labels={num_labels} disagrees with id2label, which has {len(id2label)} entries")
        else:
            n = 2 if num_labels is None else num_labels
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"num_labels must be a non-negative integer, got {num_labels!r}")
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.id2label: dict[int, str] = id2label
        if label2id is not None:
            label2id = {str(k): int(v) for k, v in dict(label2id).items()}
        self.label2id: dict[str, int] = label2id if label2id is not None else {v: k for k, v in id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The older name of :attr:`dtype`."""
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value: str | torch.dtype | None) -> None:
        self.dtype = parse_dtype(value)

    @property
    def use_return_dict(self) -> bool:
        """Whether the models return output objects (``return_dict``), as Transformers' config answers it."""
        return bool(self.return_dict)

    @property
    def name_or_path(self) -> str:
        """The directory or hub id the model was loaded from (set by ``from_pretrained``; "" otherwise)."""
        return self._name_or_path

    @name_or_path.setter
    def name_or_path(self, value: str | os.PathLike) -> None:
        self._name_or_path = str(value)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if value != self.num_labels:
            self._set_labels(value, None, None)

    # ------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        n = self.num_encoder_blocks
        if not _is_int(n) or n < 1:
            raise ValueError(f"num_encoder_blocks must be a positive integer, got {n!r}")
        for name in _PER_STAGE:
            values = getattr(self, name)
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries but num_encoder_blocks is {n}")
            if not all(_is_int(v) and v > 0 for v in values):
                raise ValueError(f"{name} must hold positive integers, got {values}")
        for i, (size, heads) in enumerate(zip(self.hidden_sizes, self.num_attention_heads, strict=True)):
            if size % heads:
                raise ValueError(f"hidden_sizes[{i}]={size} is not divisible by num_attention_heads[{i}]={heads}")
        for name in ("num_channels", "decoder_hidden_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout_prob"):
            p = getattr(self, name)  # (1 is nn.Dropout's and Transformers' limit too: everything dropped)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        p = self.drop_path_rate  # (at 1 a kept path would be divided by 0)
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path_rate must be a probability in [0, 1), got {p!r}")
        for name in ("initializer_range", "layer_norm_eps"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if not callable(self.hidden_act) and self.hidden_act not in ACTIVATIONS:
            if self.hidden_act in ("prelu", "xielu"):  # (Transformers' two activations with weights of their own)
                raise ValueError(
                    f"hidden_act {self.hidden_act!r} has learned parameters of its own, which this package does not "
                    f"support; use one of {', '.join(ACTIVATIONS)}"
                )
            raise ValueError(f"hidden_act {self.hidden_act!r} is unknown; use one of {', '.join(ACTIVATIONS)}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is unknown; use one of {', '.join(PROBLEM_TYPES)}")
        if not _is_int(self.semantic_loss_ignore_index):
            raise ValueError(f"semantic_loss_ignore_index must be an integer, got {self.semantic_loss_ignore_index!r}")
        if not _is_int(self.chunk_size_feed_forward) or self.chunk_size_feed_forward < 0:
            raise ValueError(f"chunk_size_feed_forward must be an integer >= 0, got {self.chunk_size_feed_forward!r}")
        parse_dtype(self.dtype)

    # --------------------------------------------------------------------------------------- variants
    @classmethod
    def from_variant(cls, variant: str, **kwargs: Any) -> SegformerConfig:
        """The config of a paper variant: ``"b0"`` … ``"b5"`` (also ``"mit-b2"``, ``"segformer-b2"``)."""
        key = variant.lower().removeprefix("nvidia/").removeprefix("segformer-").removeprefix("mit-")
        if key not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        return cls(**{**VARIANTS[key], **kwargs})

    # ---------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Every field, as Transformers' ``to_dict`` gives it: id2label with int keys, ``dtype`` as its name (or
        None), ``architectures`` and ``_name_or_path`` included; unknown keys of the file kept."""
        if callable(self.hidden_act):
            raise ValueError("hidden_act is a function, which config.json cannot store; use its name")
        out: dict[str, Any] = {"model_type": self.model_type}
        for key, value in self.__dict__.items():
            if key in ("extra", "id2label", "label2id", "dtype"):
                continue
            out[key] = copy.deepcopy(value)
        out["dtype"] = _dtype_name(self.dtype)
        out["id2label"] = dict(self.id2label)
        out["label2id"] = dict(self.label2id)
        for key, value in self.extra.items():
            out.setdefault(key, copy.deepcopy(value))
        return dict(sorted(out.items()))

    def to_diff_dict(self) -> dict[str, Any]:
        """What config.json holds: :meth:`to_dict` without ``_name_or_path`` and without the attributes common to
        every Transformers config (``return_dict``, ``id2label`` of two labels, ``dtype`` None, ...) where they keep
        their default. The SegFormer fields are always written, as Transformers does."""
        return {
            key: value
            for key, value in self.to_dict().items()
            if key != "_name_or_path" and not (key in _COMMON_DEFAULTS and value == _COMMON_DEFAULTS[key])
        }

    def to_json_string(self, use_diff: bool = True) -> str:
        """:meth:`to_diff_dict` (or :meth:`to_dict` with ``use_diff=False``) as JSON: indented, keys sorted."""
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """Write :meth:`to_json_string` atomically (a temporary file in the same directory, then a rename)."""
        atomic_write_text(Path(json_file_path), self.to_json_string(use_diff=use_diff))

    def update(self, config_dict: Mapping[str, Any]) -> None:
        """Set the fields of ``config_dict`` (unknown keys are kept as extra attributes, written back by
        :meth:`to_dict`). All or nothing: the result is validated first, and a bad value raises ValueError
        naming the field with this config unchanged. ``num_labels`` resets the label names, as in the constructor."""
        updated = type(self).from_dict({**self.to_dict(), "dtype": self.dtype}, **dict(config_dict))
        self.__dict__.clear()
        self.__dict__.update(updated.__dict__)

    def update_from_string(self, update_str: str) -> None:
        """Update from ``"key=value,key=value"`` (command-line style): each key must exist, and its value is read
        as the type of the current one (bool: true/false/yes/no/1/0, int, float or str)."""
        current = self.to_dict()
        changes: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in update_str.split(","))):
            key, sep, text = item.partition("=")
            key, text = key.strip(), text.strip()
            if not sep or not key:
                raise ValueError(f"update_from_string: {item!r} is not key=value")
            if key not in current:
                raise ValueError(f"update_from_string: {key!r} is not a field of this config")
            old = current[key]
            try:
                if isinstance(old, bool):
                    if text.lower() not in _TRUE_STRINGS + _FALSE_STRINGS:
                        raise ValueError(f"{text!r} is not true or false")
                    value: Any = text.lower() in _TRUE_STRINGS
                elif isinstance(old, int):
                    value = int(text)
                elif isinstance(old, float):
                    value = float(text)
                elif isinstance(old, str):
                    value = text
                else:
                    raise ValueError(f"only int, float, bool and str fields can be set from a string, it is {old!r}")
            except ValueError as exc:
                raise ValueError(f"update_from_string: {key}: {first_line(exc)}") from None
            changes[key] = value
        self.update(changes)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, return_unused_kwargs: bool = False, **overrides: Any
    ) -> SegformerConfig | tuple[SegformerConfig, dict[str, Any]]:
        """Build a config from a config.json mapping; ``overrides`` replace fields (num_labels resets labels).

        Unknown overrides are kept as extra attributes, as the constructor keeps them; with
        ``return_unused_kwargs=True`` (as in Transformers) those that are not attributes of the config (neither a
        field nor a key of ``data``) are instead returned, unused: ``(config, unused)``. Loader arguments
        (:data:`LOADER_ARGUMENTS`: ``force_download``, ``revision``, ...) are dropped, from ``data`` as well."""
        data = {k: v for k, v in dict(data).items() if k not in LOADER_ARGUMENTS}
        overrides = {k: v for k, v in overrides.items() if k not in LOADER_ARGUMENTS}
        unused: dict[str, Any] = {}
        if return_unused_kwargs:
            known = _constructor_fields() | _ALIASES | set(data)
            unused = {k: v for k, v in overrides.items() if k not in known}
            overrides = {k: v for k, v in overrides.items() if k in known}
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"model_type is {model_type!r}, not 'segformer'")
        if "num_labels" in overrides and "id2label" not in overrides:
            data.pop("id2label", None)
            data.pop("label2id", None)
        elif "id2label" in overrides and "label2id" not in overrides:
            data.pop("label2id", None)
        data.update(overrides)
        if "id2label" in data and data.get("num_labels") is not None and "num_labels" not in overrides:
            data.pop("num_labels")  # stored num_labels is derived from id2label; never let them fight
        config = cls(**data)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_json_file(
        cls, path: str | os.PathLike, *, return_unused_kwargs: bool = False, **overrides: Any
    ) -> SegformerConfig | tuple[SegformerConfig, dict[str, Any]]:
        """Read a config.json (``overrides`` and ``return_unused_kwargs`` as in :meth:`from_dict`). A file that
        cannot be found or read, or is not a JSON object, raises :class:`~segformer.hub.CheckpointError` (an
        OSError, as Transformers raises, and a ValueError); invalid fields a ValueError naming the file and field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({first_line(exc)})") from None
        except OSError as exc:  # a directory, no permission, ...
            raise CheckpointError(f"{path}: cannot read it ({exc.strerror or first_line(exc)})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object, found a JSON {_json_kind(data)}")
        try:
            return cls.from_dict(data, return_unused_kwargs=return_unused_kwargs, **overrides)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str | None = None,
        subfolder: str = "",
        proxies: dict[str, str] | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> SegformerConfig | tuple[SegformerConfig, dict[str, Any]]:
        """Read ``config.json`` from a directory (or its ``subfolder``), a config file, or a hub id (through the
        hub cache; ``force_download`` and ``proxies`` go to huggingface_hub).

        ``kwargs`` replace fields of the file; unknown ones are kept as extra attributes, as the constructor keeps
        them, unless ``return_unused_kwargs=True``, which returns ``(config, unused_kwargs)`` as Transformers does
        (unused: the kwargs that are neither fields nor keys of the file). Transformers' other loader arguments
        (``trust_remote_code``, ``resume_download``, ``user_agent``, ...) are accepted and ignored, never stored;
        ``use_auth_token`` is the old name of ``token``."""
        from .hub import resolve_file

        if kwargs.pop("gguf_file", None) is not None:
            raise ValueError("gguf_file: GGUF checkpoints are not supported; use a config.json")
        legacy_token = kwargs.pop("use_auth_token", None)
        token = token if token is not None else legacy_token
        kwargs = {k: v for k, v in kwargs.items() if k not in LOADER_ARGUMENTS}
        if Path(name_or_path).is_file():
            return cls.from_json_file(name_or_path, return_unused_kwargs=return_unused_kwargs, **kwargs)
        path = resolve_file(
            name_or_path,
            "config.json",
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            subfolder=subfolder,
            force_download=force_download,
            proxies=proxies,
        )
        return cls.from_json_file(path, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *, push_to_hub: bool = False, **hub: Any) -> Path:
        """Write ``config.json`` (:meth:`to_json_file`) into ``save_directory`` and return its path. With
        ``push_to_hub=True`` also upload it (``hub``: the arguments of :meth:`push_to_hub`; ``repo_id`` defaults
        to the directory's name)."""
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory}: exists and is not a directory")
        if hub and not push_to_hub:
            raise TypeError(f"save_pretrained got unexpected argument(s) {', '.join(sorted(hub))}")
        directory.mkdir(parents=True, exist_ok=True)
        self.to_json_file(directory / "config.json")
        if push_to_hub:
            self.push_to_hub(hub.pop("repo_id", directory.resolve().name), **hub)
        return directory / "config.json"

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
    ) -> Any:
        """Upload ``config.json`` to the hub repo ``repo_id`` (created if needed) in one commit; see
        :func:`segformer.hub.push_folder` for the arguments. Returns the commit's ``CommitInfo``."""
        from .hub import push_folder

        return push_folder(
            repo_id,
            lambda folder: [self.save_pretrained(folder)],
            commit_message=commit_message or "Upload config",
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )

    @property
    def num_hidden_layers(self) -> int:
        """``num_encoder_blocks`` under the name Transformers' config maps to it (its ``attribute_map``), which
        generic code reads (layer-wise tools, ``num_hidden_layers=`` in the constructor)."""
        return self.num_encoder_blocks

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int) -> None:
        self.num_encoder_blocks = value

    # ---------------------------------------------------------------------------------------- helpers
    def __getattr__(self, name: str) -> Any:
        # Unknown config.json keys read as attributes, as in Transformers (config.image_size).
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SegformerConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def copy(self, **changes: Any) -> SegformerConfig:
        return type(self).from_dict(self.to_dict(), **changes)


def _constructor_fields() -> set[str]:
    """The named parameters of :class:`SegformerConfig` (its fields)."""
    params = inspect.signature(SegformerConfig.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind != p.VAR_KEYWORD}


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_dtype(value: str | torch.dtype | None, name: str = "dtype") -> torch.dtype | None:
    """None, a floating point ``torch.dtype`` or its name ("float16", "torch.bfloat16") → the dtype or None."""
    dtype = value
    if isinstance(value, str):
        attr = value.removeprefix("torch.")
        dtype = getattr(torch, attr, None) if attr.isidentifier() else None
    if value is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"{name} must be a floating point torch dtype or its name (float32, bfloat16, ...), got {value!r}"
        )
    return dtype


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")
